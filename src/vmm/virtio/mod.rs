//! Virtio devices as the VMM sees them: a virtio-mmio transport each, and
//! the device itself in a sandboxed process (`rpc`, `shared`) or a thread
//! (`inprocess`). The VMM is on the data path only as the memory server.
mod host;
pub mod memory_service;
pub mod mmio;
mod spawn;

use super::config::{DiskConfig, MemoryMode, VmConfig};
use super::layout::{MAX_VIRTIO_DEVICES, VIRTIO_GSI_BASE, VIRTIO_MMIO_START};
use super::lock;
use super::memory::GuestRam;
use super::{Error, Result};
use crate::devices::blk::BlockDevice;
use crate::devices::memory::MappedMemory;
use crate::devices::rng::RngDevice;
use crate::devices::Backend;
use host::{DeviceHealth, DeviceHost};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use memory_service::DeviceAccess;
use mmio::{MmioTransport, MMIO_SIZE, QUEUE_NOTIFY};
use spawn::DeviceCommand;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use tracing::{debug, info};
use vmm_sys_util::eventfd::EventFd;

/// Where a virtio-mmio device sits, for ACPI and the kernel command line.
#[derive(Debug, Clone, Copy)]
pub struct MmioSlot {
    pub base: u64,
    pub gsi: u32,
}

pub fn slot(index: usize) -> MmioSlot {
    MmioSlot { base: VIRTIO_MMIO_START + index as u64 * MMIO_SIZE, gsi: VIRTIO_GSI_BASE + index as u32 }
}

pub struct VirtioDevice {
    pub slot: MmioSlot,
    pub transport: Mutex<MmioTransport>,
}

/// What the VMM knows about a device, for the control API and the exit log.
#[derive(Debug, serde::Serialize)]
pub struct DeviceStatus {
    pub name: String,
    pub kind: &'static str,
    pub pid: Option<u32>,
    pub healthy: bool,
    pub failure: Option<String>,
    /// The memory service's counters (rpc mode only).
    pub memory_rpcs: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_refused: Option<u64>,
}

pub fn status(devices: &[VirtioDevice]) -> Vec<DeviceStatus> {
    use std::sync::atomic::Ordering::Relaxed;
    devices
        .iter()
        .map(|device| {
            let transport = lock(&device.transport);
            let host = transport.host();
            let access = host.access.as_ref();
            let failure = lock(&host.health.reason).clone();
            DeviceStatus {
                name: host.name.clone(),
                kind: match transport.device_id() {
                    crate::devices::blk::DEVICE_ID => "block",
                    crate::devices::rng::DEVICE_ID => "rng",
                    _ => "other",
                },
                pid: host.pid,
                healthy: !host.health.failed.load(Relaxed),
                failure,
                memory_rpcs: access.map(|a| a.rpcs.load(Relaxed)),
                memory_bytes: access.map(|a| a.bytes.load(Relaxed)),
                memory_refused: access.map(|a| a.refused.load(Relaxed)),
            }
        })
        .collect()
}

/// Most time skvm waits for its devices to stop before it exits anyway.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Stops every device in order, so that their backends (and disk locks) are
/// released before skvm exits and the next VM can take them.
pub fn stop_all(devices: &[VirtioDevice]) {
    // A vCPU still inside a control call holds its transport: skip it rather than wait.
    let hosts: Vec<_> = devices.iter().filter_map(|d| d.transport.try_lock().ok()).collect();
    hosts.iter().for_each(|t| t.host().begin_stop());
    let deadline = std::time::Instant::now() + STOP_GRACE;
    while !hosts.iter().all(|t| t.host().has_ended()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The VMM's tokio runtime for device RPC: one thread, current-thread scheduler.
pub fn start_rpc_runtime() -> Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Host("starting the RPC runtime".into(), e))?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("rpc".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .map_err(|e| Error::Host("starting the RPC thread".into(), e))?;
    Ok(handle)
}

/// Starts every configured device. Call from the main thread: device
/// processes die with the thread that started them.
pub fn launch(
    config: &VmConfig,
    vm: &VmFd,
    ram: &GuestRam,
    runtime: &tokio::runtime::Handle,
) -> Result<Vec<VirtioDevice>> {
    let mut specs: Vec<DeviceSpec> = config.disks.iter().map(DeviceSpec::Block).collect();
    if config.rng {
        specs.push(DeviceSpec::Rng);
    }
    if specs.len() > MAX_VIRTIO_DEVICES {
        return Err(Error::Device(format!(
            "{} devices given; skvm supports at most {MAX_VIRTIO_DEVICES}",
            specs.len()
        )));
    }
    let mut blocks = 0;
    specs
        .into_iter()
        .enumerate()
        .map(|(index, spec)| {
            let name = match spec {
                DeviceSpec::Block(_) => {
                    blocks += 1;
                    format!("blk{}", blocks - 1)
                }
                DeviceSpec::Rng => "rng0".to_string(),
            };
            let slot = slot(index);
            let transport = launch_device(index, name, slot, spec, config, vm, ram, runtime)?;
            Ok(VirtioDevice { slot, transport: Mutex::new(transport) })
        })
        .collect()
}

/// Two VMs writing one disk corrupt it: take an exclusive lock for a
/// writable disk and a shared one for a read-only disk, held while the VM runs.
fn lock_disk(file: &std::fs::File, disk: &DiskConfig) -> Result<()> {
    let mode = if disk.readonly { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Device(format!("disk {} is in use by another process ({e})", disk.path.display())));
    }
    Ok(())
}

/// What one virtio device is backed by.
#[derive(Debug, Clone, Copy)]
enum DeviceSpec<'a> {
    Block(&'a DiskConfig),
    Rng,
}

fn device_error(name: &str, what: &str) -> impl FnOnce(String) -> Error {
    let context = format!("device {name}: {what}");
    move |detail| Error::Device(format!("{context}: {detail}"))
}

#[allow(clippy::too_many_arguments)]
fn launch_device(
    index: usize,
    name: String,
    slot: MmioSlot,
    spec: DeviceSpec,
    config: &VmConfig,
    vm: &VmFd,
    ram: &GuestRam,
    runtime: &tokio::runtime::Handle,
) -> Result<MmioTransport> {
    // The VMM opens the backend; the device only ever gets the descriptor.
    let disk = match spec {
        DeviceSpec::Block(disk) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!disk.readonly)
                .open(&disk.path)
                .map_err(|source| Error::ReadFile { what: "disk", path: disk.path.clone(), source })?;
            lock_disk(&file, disk)?;
            Some((file, disk.readonly))
        }
        DeviceSpec::Rng => None,
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&irq, slot.gsi).map_err(Error::kvm("KVM_IRQFD (virtio)"))?;
    let notify = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_ioevent(&notify, &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY), NoDatamatch)
        .map_err(Error::kvm("KVM_IOEVENTFD (virtio)"))?;
    let (control_vmm, control_device) = UnixStream::pair()?;
    let access = (config.memory_mode == MemoryMode::Rpc).then(|| DeviceAccess::new(&name));
    let health = DeviceHealth::new(access.clone());
    let misbehave = if index == 0 { config.test_misbehaviour } else { None };

    let pid = match config.memory_mode {
        MemoryMode::Inprocess => {
            let backend = match disk {
                Some((file, readonly)) => Backend::Block(
                    BlockDevice::new(file, readonly, &name).map_err(|e| device_error(&name, "disk")(e.to_string()))?,
                ),
                None => Backend::Rng(RngDevice),
            };
            spawn_thread(&name, ram, backend, control_device, notify.try_clone()?, irq.try_clone()?, health.clone())?;
            None
        }
        MemoryMode::Rpc | MemoryMode::Shared => {
            let mut child = DeviceCommand::new(&name, misbehave);
            child.fd("--control-fd", control_device.as_raw_fd());
            child.fd("--notify-fd", notify.as_raw_fd());
            child.fd("--irq-fd", irq.as_raw_fd());
            match &disk {
                Some((file, readonly)) => {
                    child.arg("--kind=blk".into());
                    child.fd("--disk-fd", file.as_raw_fd());
                    if *readonly {
                        child.arg("--readonly".into());
                    }
                }
                None => child.arg("--kind=rng".into()),
            }
            let _memory_end; // the child's end of the memory channel, open until spawn
            if let Some(access) = &access {
                let (vmm_end, device_end) = UnixStream::pair()?;
                child.fd("--memory-fd", device_end.as_raw_fd());
                memory_service::serve(runtime, vmm_end, ram.atomic(), access.clone())?;
                _memory_end = Some(device_end);
            } else {
                let memfd = ram.memfd().ok_or_else(|| Error::Device("shared mode needs memfd-backed RAM".into()))?;
                child.fd("--memfd", memfd);
                for region in ram.shared_regions() {
                    child.arg(format!("--region={}:{}:{}", region.guest_addr, region.size, region.file_offset));
                }
                _memory_end = None;
            }
            let pid = child.spawn(health.clone())?;
            // The child has its own copies now.
            drop(control_device);
            Some(pid)
        }
    };

    let (mut host, info) =
        DeviceHost::connect(name.clone(), runtime, control_vmm, notify).map_err(device_error(&name, "no hello"))?;
    host.pid = pid;
    host.health = health;
    host.access = access;
    info!(
        "device {name}: virtio id {} at {:#x} (GSI {}), {:?} mode, pid {:?}",
        info.device_id, slot.base, slot.gsi, config.memory_mode, pid
    );
    Ok(MmioTransport::new(info, host))
}

fn spawn_thread(
    name: &str,
    ram: &GuestRam,
    backend: Backend,
    control: UnixStream,
    notify: EventFd,
    irq: EventFd,
    health: Arc<DeviceHealth>,
) -> Result<()> {
    let memory = MappedMemory::new(ram.atomic());
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let run = async move {
                let transport = rpc_schema::transport(control).map_err(|e| e.to_string())?;
                crate::devices::runner::serve(memory, backend, transport, notify, irq, None).await
            };
            let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(run),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => debug!("device {thread_name}: stopped"),
                Err(reason) => health.fail(&thread_name, reason),
            }
            health.mark_ended();
        })
        .map(drop)
        .map_err(|e| Error::Host("starting a device thread".into(), e))
}
