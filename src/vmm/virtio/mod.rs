//! Virtio devices as the VMM sees them: a virtio-mmio transport each, and
//! the device itself in a sandboxed process (`rpc`, `shared`) or a thread
//! (`inprocess`). The VMM is on the data path only as the memory server.
mod device_text;
mod grants;
mod host;
pub mod memory_service;
pub mod mmio;
mod requests;
mod spawn;
mod staging;
mod supervisor;

use super::config::{DiskConfig, MemoryMode, NetConfig, SerialOutput, VmConfig};
use super::hotplug::{self, DeviceHooks, HotplugRegion};
use super::layout::{MAX_VIRTIO_DEVICES, VIRTIO_GSI_BASE, VIRTIO_MMIO_START};
use super::lock;
use super::memory::GuestRam;
use super::{Error, Result};
use crate::devices::blk::BlockDevice;
use crate::devices::mem::MemDevice;
use crate::devices::memory::MappedMemory;
use crate::devices::process::SharedRegion;
use crate::devices::rng::RngDevice;
use crate::devices::Backend;
use host::{DeviceHealth, DeviceHost, Respawn};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use memory_service::DeviceAccess;
use mmio::{MmioTransport, MMIO_SIZE, QUEUE_NOTIFY};
use spawn::{ProcessKind, ProcessMemory, ProcessRecipe};
use staging::Staging;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use tracing::{debug, info};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
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
    /// The lock on a disk's backing file (block devices only).
    disk_lock: Option<DiskLock>,
    /// What status reports read, without the transport.
    view: DeviceView,
}

/// A device as status reports see it. A vCPU holds the transport through
/// the driver's control writes, for seconds when a device activates slowly
/// or a reset waits for a restart; the API and the exit log must not wait
/// behind it.
struct DeviceView {
    kind: &'static str,
    mac: Option<String>,
    host: host::HostView,
    driver: Arc<mmio::DriverState>,
}

impl DeviceView {
    fn of(transport: &MmioTransport) -> Self {
        DeviceView {
            kind: match transport.device_id() {
                crate::devices::blk::DEVICE_ID => "block",
                crate::devices::rng::DEVICE_ID => "rng",
                crate::devices::mem::DEVICE_ID => "mem",
                crate::devices::net::DEVICE_ID => "net",
                crate::devices::console::DEVICE_ID => "console",
                _ => "other",
            },
            mac: transport.mac().map(|mac| crate::devices::net::format_mac(&mac)),
            host: transport.host().view(),
            driver: transport.driver_state(),
        }
    }
}

/// What the VMM knows about a device, for the control API and the exit log.
#[derive(Debug, serde::Serialize)]
pub struct DeviceStatus {
    pub name: String,
    pub kind: &'static str,
    /// A network device's MAC address.
    pub mac: Option<String>,
    pub pid: Option<u32>,
    pub healthy: bool,
    pub failure: Option<String>,
    /// The driver has brought the device up (DRIVER_OK) and not reset it since.
    pub driver_ok: bool,
    /// The device's own counters: requests, errors, memory calls and where
    /// its time went (absent when it has failed or does not answer).
    pub counters: Option<rpc_schema::DeviceCounters>,
    /// The memory service's counters (rpc mode only).
    pub memory_rpcs: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_refused: Option<u64>,
    /// Time the memory service spent checking and copying for this device.
    pub memory_service_ns: Option<u64>,
    /// Request level (rpc mode): batches posted to the device, and chains
    /// it holds now (each a grant).
    pub batches: Option<u64>,
    pub grants_outstanding: Option<usize>,
    /// Times the device's process was replaced after it died (rpc mode),
    /// and why it went down last.
    pub restarts: u32,
    pub last_failure: Option<String>,
    /// Driver requests the transport refused (unoffered features, failed
    /// activations): a guest may repeat them at will, so they are counted
    /// here and logged only a few at a time.
    pub driver_errors: u64,
    /// For each restart whose new process served (before it went down
    /// again), from the death seen to the first batch it served; the
    /// latest [`host::RECOVERIES_KEPT`].
    pub recovery_ms: Vec<f64>,
}

pub fn status(devices: &[VirtioDevice]) -> Vec<DeviceStatus> {
    use std::sync::atomic::Ordering::Relaxed;
    devices
        .iter()
        .map(|device| {
            let DeviceView { kind, mac, host, driver } = &device.view;
            let access = host.access.as_ref();
            let mut status = DeviceStatus {
                name: host.name.clone(),
                kind,
                mac: mac.clone(),
                pid: host.health.pid(),
                healthy: !host.health.failed.load(Relaxed),
                failure: lock(&host.health.reason).clone(),
                driver_ok: driver.driver_ok(),
                counters: None,
                memory_rpcs: access.map(|a| a.rpcs.load(Relaxed)),
                memory_bytes: access.map(|a| a.bytes.load(Relaxed)),
                memory_refused: access.map(|a| a.refused.load(Relaxed)),
                memory_service_ns: access.map(|a| a.service_ns.load(Relaxed)),
                batches: access.filter(|a| a.request_level).map(|a| a.batches.load(Relaxed)),
                grants_outstanding: access.filter(|a| a.request_level).map(|a| lock(&a.grants).outstanding()),
                restarts: host.health.restarts.load(Relaxed),
                driver_errors: driver.errors(),
                last_failure: lock(&host.health.last_failure).clone(),
                recovery_ms: lock(&host.health.recovery_ns).iter().map(|&ns| ns as f64 / 1e6).collect(),
            };
            // The device may take its time (within the query's deadline).
            status.counters = host.counters_query().and_then(|q| q.send());
            // In `rpc` the VMM's engine raises the device's interrupts.
            let engine_interrupts = access.filter(|a| a.request_level).map(|a| a.interrupts.load(Relaxed));
            if let (Some(counters), Some(raised)) = (status.counters.as_mut(), engine_interrupts) {
                // The device's own count may be anything: it cannot overflow ours.
                counters.interrupts = counters.interrupts.saturating_add(raised);
            }
            status
        })
        .collect()
}

/// Most time skvm waits for its devices to stop before it exits anyway.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Stops every device in order, so that their backends (and disk locks) are
/// released before skvm exits and the next VM can take them.
pub fn stop_all(devices: &[VirtioDevice]) {
    // A vCPU still inside a control call holds its transport: skip it rather than wait.
    let mut hosts: Vec<_> = devices.iter().filter_map(|d| d.transport.try_lock().ok()).collect();
    hosts.iter_mut().for_each(|t| t.host_mut().begin_stop());
    let deadline = std::time::Instant::now() + STOP_GRACE;
    while !hosts.iter().all(|t| t.host().has_ended()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(hosts);
    // Closing our descriptors is not enough: skvm's exit helper shares the
    // file table and lives on through the VM's teardown. A device that did
    // not stop keeps its disk locked until it is gone.
    for device in devices {
        let ended = device.transport.try_lock().is_ok_and(|t| t.host().has_ended());
        if let (true, Some(lock)) = (ended, &device.disk_lock) {
            lock.release();
        }
    }
}

/// The VMM's tokio runtime for device RPC: one thread, current-thread scheduler.
pub fn start_rpc_runtime() -> Result<tokio::runtime::Handle> {
    rpc_runtime("rpc".into(), false)
}

/// A network device's own RPC thread (`rpc` modes): its frames never wait
/// behind another device's requests, and it runs under `SCHED_BATCH` (see
/// `scheduling`), which a disk's thread does not: there a woken thread
/// that waits for the running one to sleep leaves the driver notifying
/// more often.
fn frames_runtime(device: &str) -> Result<tokio::runtime::Handle> {
    rpc_runtime(format!("rpc-{device}"), true)
}

fn rpc_runtime(name: String, batch: bool) -> Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Host("starting the RPC runtime".into(), e))?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if batch {
                crate::scheduling::batch_this_thread(&format!("RPC thread {name}"));
            }
            runtime.block_on(std::future::pending::<()>())
        })
        .map_err(|e| Error::Host("starting the RPC thread".into(), e))?;
    Ok(handle)
}

/// The hotplug region's way to reach the devices.
pub struct Hooks {
    io: Arc<super::io::IoBus>,
    /// Where boot RAM sits in the memfd (shared mode).
    ram_regions: Vec<SharedRegion>,
    /// The virtio-mem device, and the devices a map change rebuilds. Known
    /// up front so that a plug never locks a transport it has no business with
    /// (the virtio-mem one may be held by a vCPU waiting on that very plug).
    mem_device: Option<usize>,
    rebuilt: Vec<usize>,
}

impl Hooks {
    pub fn new(io: Arc<super::io::IoBus>, ram_regions: Vec<SharedRegion>) -> Self {
        let (mut mem_device, mut rebuilt) = (None, Vec::new());
        for (index, device) in io.virtio.iter().enumerate() {
            let transport = lock(&device.transport);
            if transport.device_id() == crate::devices::mem::DEVICE_ID {
                mem_device = Some(index);
            }
            if transport.host().respawn.is_some() {
                rebuilt.push(index);
            }
        }
        Hooks { io, ram_regions, mem_device, rebuilt }
    }
}

impl DeviceHooks for Hooks {
    fn config_changed(&self) {
        if let Some(index) = self.mem_device {
            lock(&self.io.virtio[index].transport).config_changed();
        }
    }

    fn remap_shared(&self, plugged: &[SharedRegion]) -> std::result::Result<std::time::Duration, String> {
        let regions: Vec<SharedRegion> = self.ram_regions.iter().chain(plugged).copied().collect();
        let mut longest = std::time::Duration::ZERO;
        let mut failures = Vec::new();
        for &index in &self.rebuilt {
            let mut transport = lock(&self.io.virtio[index].transport);
            match transport.host_mut().rebuild(&regions) {
                Ok(Some(stall)) => longest = longest.max(stall),
                Ok(None) => {}
                Err(e) => failures.push(e),
            }
        }
        if failures.is_empty() {
            Ok(longest)
        } else {
            Err(failures.join("; "))
        }
    }
}

/// Everything `launch` needs besides the configuration.
pub struct LaunchContext<'a> {
    pub vm: &'a VmFd,
    pub ram: &'a GuestRam,
    pub hotplug: Option<&'a Arc<HotplugRegion>>,
    pub runtime: &'a tokio::runtime::Handle,
}

/// `launch`'s own state: the supervisor that restarts `rpc`-mode devices.
struct Launcher<'a> {
    context: &'a LaunchContext<'a>,
    supervisor: Option<Arc<supervisor::Supervisor>>,
}

/// Starts every configured device. Call from the main thread: device
/// processes die with the thread that started them.
pub fn launch(config: &VmConfig, context: &LaunchContext) -> Result<Vec<VirtioDevice>> {
    refuse_repeated_disks(&config.disks)?;
    let mut specs: Vec<DeviceSpec> = config.disks.iter().map(DeviceSpec::Block).collect();
    specs.extend(config.nets.iter().map(DeviceSpec::Net));
    specs.extend(config.console.iter().map(DeviceSpec::Console));
    if config.rng {
        specs.push(DeviceSpec::Rng);
    }
    if let Some(region) = context.hotplug {
        specs.push(DeviceSpec::Mem(region.clone()));
    }
    if specs.len() > MAX_VIRTIO_DEVICES {
        return Err(Error::Device(format!(
            "{} devices given; skvm supports at most {MAX_VIRTIO_DEVICES}",
            specs.len()
        )));
    }
    let (mut blocks, mut nets) = (0, 0);
    let supervisor = match config.memory_mode {
        MemoryMode::Rpc => Some(supervisor::Supervisor::start()?),
        _ => None,
    };
    let launcher = Launcher { context, supervisor };
    specs
        .into_iter()
        .enumerate()
        .map(|(index, spec)| {
            let name = match spec {
                DeviceSpec::Block(_) => {
                    blocks += 1;
                    format!("blk{}", blocks - 1)
                }
                DeviceSpec::Net(_) => {
                    nets += 1;
                    format!("net{}", nets - 1)
                }
                DeviceSpec::Console(_) => "console0".to_string(),
                DeviceSpec::Rng => "rng0".to_string(),
                DeviceSpec::Mem(_) => "mem0".to_string(),
            };
            let slot = slot(index);
            let (transport, disk_lock) = launch_device(index, name, slot, spec, config, &launcher)?;
            let view = DeviceView::of(&transport);
            Ok(VirtioDevice { slot, transport: Mutex::new(transport), disk_lock, view })
        })
        .collect()
}

/// One file given as two disks, one of them writable, would be two devices
/// writing or reading under each other (read-only twice is harmless).
fn refuse_repeated_disks(disks: &[DiskConfig]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: std::collections::HashMap<_, &DiskConfig> = std::collections::HashMap::new();
    for disk in disks {
        let Ok(meta) = std::fs::metadata(&disk.path) else { continue };
        match seen.insert((meta.dev(), meta.ino()), disk) {
            Some(first) if !(first.readonly && disk.readonly) => {
                return Err(Error::Device(format!(
                    "disk {} is given twice (also as {}), not both read-only",
                    disk.path.display(),
                    first.path.display()
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// How long a disk's lock is waited for (see [`DiskLock::take`]).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Two VMs writing one disk corrupt it: an exclusive lock for a writable
/// disk and a shared one for a read-only disk, held while the VM runs. The
/// lock belongs to the open file, which the device's descriptor shares.
struct DiskLock(std::fs::File);

impl DiskLock {
    fn take(file: &std::fs::File, disk: &DiskConfig) -> Result<Self> {
        let mode = if disk.readonly { libc::LOCK_SH } else { libc::LOCK_EX };
        // A VM killed with SIGKILL cannot unlock; its lock goes with the last
        // reference to the file, which a disk's io_uring drops shortly after
        // its process has died (the kernel tears rings down in the
        // background). So a busy disk is tried again for a while.
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        // SAFETY: flock on a descriptor we own.
        while unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) || std::time::Instant::now() >= deadline {
                return Err(Error::Device(format!("disk {} is in use by another process ({e})", disk.path.display())));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(Self(file.try_clone()?))
    }

    fn release(&self) {
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// What one virtio device is backed by.
#[derive(Clone)]
enum DeviceSpec<'a> {
    Block(&'a DiskConfig),
    Net(&'a NetConfig),
    Console(&'a SerialOutput),
    Rng,
    Mem(Arc<HotplugRegion>),
}

fn device_error(name: &str, what: &str) -> impl FnOnce(String) -> Error {
    let context = format!("device {name}: {what}");
    move |detail| Error::Device(format!("{context}: {detail}"))
}

fn launch_device(
    index: usize,
    name: String,
    slot: MmioSlot,
    spec: DeviceSpec,
    config: &VmConfig,
    launcher: &Launcher,
) -> Result<(MmioTransport, Option<DiskLock>)> {
    let context = launcher.context;
    let LaunchContext { vm, ram, runtime, .. } = *context;
    let frames;
    let runtime = match (&spec, config.memory_mode) {
        (DeviceSpec::Net(_), MemoryMode::Rpc | MemoryMode::RpcDma) => {
            frames = frames_runtime(&name)?;
            &frames
        }
        _ => runtime,
    };
    // The VMM opens the backend; the device only ever gets the descriptor.
    let mut disk_lock = None;
    let mut on_activate: Option<host::OnActivate> = None;
    let kind = match &spec {
        DeviceSpec::Block(disk) => {
            let file = super::host_files::open_disk(&disk.path, disk.readonly, disk.direct)?;
            disk_lock = Some(DiskLock::take(&file, disk)?);
            ProcessKind::Block { disk: file, readonly: disk.readonly, aio: disk.aio }
        }
        DeviceSpec::Net(net) => {
            let (tap, offloads) = super::host_files::open_tap(&net.tap, crate::devices::net::HEADER)?;
            let own = tap.try_clone()?;
            on_activate = Some(Box::new(move |features| {
                let flags = crate::devices::net::tap_offload(features);
                super::host_files::set_tap_offload(&own, flags).map_err(|e| format!("tap offloads {flags:#x}: {e}"))
            }));
            ProcessKind::Net { tap, mac: net.mac, offloads }
        }
        DeviceSpec::Console(output) => {
            let (output, input) = super::host_files::open_console(output)?;
            ProcessKind::Console { output, input }
        }
        DeviceSpec::Rng => ProcessKind::Rng,
        DeviceSpec::Mem(region) => {
            // The virtio-mem device's one privileged channel: plug and unplug.
            let (vmm_end, device_end) = UnixStream::pair()?;
            hotplug::service::serve(runtime, vmm_end, region.clone())?;
            ProcessKind::Mem { hotplug: device_end }
        }
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&irq, slot.gsi).map_err(Error::kvm("KVM_IRQFD (virtio)"))?;
    let notify = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_ioevent(&notify, &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY), NoDatamatch)
        .map_err(Error::kvm("KVM_IOEVENTFD (virtio)"))?;
    let request_level = config.memory_mode == MemoryMode::Rpc;
    let access = matches!(config.memory_mode, MemoryMode::Rpc | MemoryMode::RpcDma)
        .then(|| DeviceAccess::new(&name, request_level));
    let health = DeviceHealth::new(access.clone());
    // A request-level device gets neither notifier nor interrupt: the VMM
    // walks its queue and completes its requests.
    let doorbell = if request_level { None } else { Some((notify.try_clone()?, irq.try_clone()?)) };
    let recipe = ProcessRecipe {
        name: name.clone(),
        kind,
        doorbell,
        // Test-only: the first device misbehaves (a hotplug flood needs virtio-mem).
        misbehave: config.test_misbehaviour.filter(|&m| {
            let for_mem = m == crate::devices::process::Misbehaviour::HotplugFlood;
            if for_mem {
                matches!(spec, DeviceSpec::Mem(_))
            } else {
                index == 0
            }
        }),
        probe: config.test_probe,
        poll_us: config.device_poll_us,
        health: health.clone(),
    };

    let recipe = Arc::new(recipe);
    let starter = starter(config.memory_mode, &recipe, context, runtime)?;
    let control = starter().map_err(device_error(&name, "start"))?;
    let pid = health.pid().filter(|_| config.memory_mode != MemoryMode::Inprocess);
    // virtio-mem's own queue lives in boot RAM, which never changes: it is not
    // rebuilt; and its hotplug channel is not remade: it is not restarted.
    let is_mem = matches!(spec, DeviceSpec::Mem(_));
    let respawn = match (config.memory_mode, ram.memfd()) {
        (MemoryMode::Shared, Some(memfd)) if !is_mem => Some(Respawn { recipe: recipe.clone(), memfd }),
        _ => None,
    };
    let (mut host, info) =
        DeviceHost::connect(name.clone(), runtime, control, notify, irq).map_err(device_error(&name, "no hello"))?;
    host.pid = pid;
    host.health = health;
    host.access = access;
    host.respawn = respawn;
    host.on_activate = on_activate;
    if request_level {
        host.posting = Some(host::Posting {
            memory: ram.atomic(),
            max_queue_size: info.max_queue_size,
            queue_count: info.queue_count,
            queue: None,
            poll: std::time::Duration::from_micros(config.device_poll_us.into()),
            held_queue: [crate::devices::net::DEVICE_ID, crate::devices::console::DEVICE_ID]
                .contains(&info.device_id)
                .then_some(crate::devices::net::RX_QUEUE),
            direct_disk: matches!(spec, DeviceSpec::Block(disk) if disk.direct),
        });
    }
    if !is_mem {
        host.starter = Some(starter.clone());
    }
    if let (Some(supervisor), false) = (&launcher.supervisor, is_mem) {
        supervisor.watch(supervisor::Restartable {
            name: name.clone(),
            start: starter,
            runtime: runtime.clone(),
            health: host.health.clone(),
            lifeline: host.lifeline.clone(),
        });
    }
    info!(
        "device {name}: virtio id {} at {:#x} (GSI {}), {:?} mode, pid {:?}",
        info.device_id, slot.base, slot.gsi, config.memory_mode, pid
    );
    let live_config = match spec {
        DeviceSpec::Mem(region) => Some(region),
        _ => None,
    };
    Ok((MmioTransport::new(info, host, live_config), disk_lock))
}

/// Starts a device's process or thread afresh; returns the VMM's end of its
/// control channel. Used at launch, and again when the device is restarted.
pub type Starter = Arc<dyn Fn() -> std::result::Result<UnixStream, String> + Send + Sync>;

fn starter(
    mode: MemoryMode,
    recipe: &Arc<ProcessRecipe>,
    context: &LaunchContext,
    runtime: &tokio::runtime::Handle,
) -> Result<Starter> {
    let recipe = recipe.clone();
    let ram = context.ram.atomic();
    Ok(match mode {
        MemoryMode::Inprocess => Arc::new(move || {
            let (control_vmm, control_device) = UnixStream::pair().map_err(|e| e.to_string())?;
            spawn_thread(&ram, &recipe, control_device).map_err(|e| e.to_string())?;
            Ok(control_vmm)
        }),
        MemoryMode::Rpc | MemoryMode::RpcDma => {
            let runtime = runtime.clone();
            Arc::new(move || {
                let (vmm_end, device_end) = UnixStream::pair().map_err(|e| e.to_string())?;
                // A fresh staging area per process: nothing a dead one left behind carries over.
                let staging = match mode {
                    MemoryMode::Rpc => {
                        Some(Arc::new(Staging::new().map_err(|e| format!("cannot make a staging area: {e}"))?))
                    }
                    _ => None,
                };
                let staging_fds = staging.as_ref().map(|s| s.fds());
                if let Some(access) = recipe.health.access() {
                    *lock(&access.staging) = staging.clone();
                }
                memory_service::serve(&runtime, vmm_end, ram.clone(), recipe.health.clone())
                    .map_err(|e| e.to_string())?;
                let memory = ProcessMemory::Rpc(device_end, staging_fds);
                let (_, control) = recipe.spawn(memory).map_err(|e| e.to_string())?;
                Ok(control)
            })
        }
        MemoryMode::Shared => {
            let memfd =
                context.ram.memfd().ok_or_else(|| Error::Device("shared mode needs memfd-backed RAM".into()))?;
            let boot = context.ram.shared_regions();
            let hotplug = context.hotplug.cloned();
            Arc::new(move || {
                let mut regions = boot.clone();
                regions.extend(hotplug.as_ref().map(|h| h.plugged_shared_regions()).unwrap_or_default());
                let (_, control) =
                    recipe.spawn(ProcessMemory::Shared { memfd, regions: &regions }).map_err(|e| e.to_string())?;
                Ok(control)
            })
        }
    })
}

/// `inprocess` mode: the device runs on a thread of the VMM, over its map.
fn spawn_thread(ram: &GuestMemoryAtomic<GuestMemoryMmap>, recipe: &ProcessRecipe, control: UnixStream) -> Result<()> {
    let memory = MappedMemory::new(ram.clone());
    let (name, health) = (recipe.name.clone(), recipe.health.clone());
    let kind = recipe.kind.try_clone()?;
    let poll_us = recipe.poll_us;
    let (notify, irq) = match &recipe.doorbell {
        Some((notify, irq)) => (notify.try_clone()?, irq.try_clone()?),
        None => return Err(Error::Device("an inprocess device walks its own ring".into())),
    };
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if let ProcessKind::Net { .. } = kind {
                crate::scheduling::batch_this_thread(&format!("device {name}"));
            }
            let run = async {
                let mut aio = crate::devices::blk::Aio::Auto;
                let mut backend = match kind {
                    ProcessKind::Block { disk, readonly, aio: chosen } => {
                        aio = chosen;
                        Backend::Block(BlockDevice::new(disk, readonly, &name).map_err(|e| format!("disk: {e}"))?)
                    }
                    ProcessKind::Rng => Backend::Rng(RngDevice),
                    ProcessKind::Mem { hotplug } => Backend::Mem(MemDevice::connect(hotplug).await?),
                    ProcessKind::Net { tap, mac, offloads } => Backend::Net(
                        crate::devices::net::NetDevice::new(tap, mac, offloads).map_err(|e| format!("tap: {e}"))?,
                    ),
                    ProcessKind::Console { output, input } => Backend::Console(
                        crate::devices::console::ConsoleDevice::new(output, input)
                            .map_err(|e| format!("console: {e}"))?,
                    ),
                };
                backend.start_io(aio, &name, false).map_err(|e| format!("disk I/O: {e}"))?;
                let transport = rpc_schema::transport(control).map_err(|e| e.to_string())?;
                let poll = std::time::Duration::from_micros(poll_us.into());
                let doorbell = crate::devices::runner::Doorbell::Ring { notify, irq, poll };
                crate::devices::runner::serve(memory, backend, transport, doorbell, Default::default()).await
            };
            let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(run),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => debug!("device {name}: stopped"),
                Err(reason) => health.fail(&name, reason),
            }
            health.mark_ended();
        })
        .map(drop)
        .map_err(|e| Error::Host("starting a device thread".into(), e))
}
