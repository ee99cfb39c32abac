//! The trusted VMM: it owns KVM, guest memory and every vCPU.
//!
//! `run` builds a VM from a [`VmConfig`], runs it and returns why it stopped.
mod api;
mod boot;
mod config;
mod control;
mod error;
mod exit;
mod host_files;
mod hotplug;
mod io;
mod layout;
mod legacy;
mod memory;
mod signals;
mod teardown;
mod throttle;
mod vcpu;
pub mod virtio;
mod vm;

pub use config::{
    BootProtocol, DiskConfig, HotplugConfig, KernelSource, MemoryMode, NetConfig, SerialOutput, VmConfig,
};
pub use error::Error;
pub use exit::VmExit;
pub use hotplug::MAX_BLOCKS as MAX_HOTPLUG_BLOCKS;
pub use teardown::exit_now;
pub use virtio::{memory_service, start_rpc_runtime};

use control::VmControl;
use kvm_ioctls::Kvm;
use std::sync::Arc;
use tracing::debug;

pub type Result<T> = std::result::Result<T, Error>;

/// Locks `mutex`; VMM state stays usable even if a thread panicked holding it.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Boots the guest described by `config` and blocks until it stops.
pub fn run(config: VmConfig) -> Result<VmExit> {
    let images = boot::BootImages::read(&config)?;
    if let Some(path) = &config.stats_file {
        host_files::check_output(path).map_err(|source| Error::OutputFile {
            what: "stats file",
            path: path.clone(),
            source,
        })?;
    }
    let mut api_socket = config.api_socket.as_deref().map(api::bind).transpose()?;
    // Blocked before any thread exists, so that only signals::watch sees them.
    signals::block_exit_signals()?;
    let kvm = Arc::new(Kvm::new().map_err(Error::OpenKvm)?);
    // KVM_GET_SUPPORTED_CPUID is slow on some hosts and needs no VM: fetch it
    // on the second core while this one builds the VM.
    let cpuid = {
        let kvm = kvm.clone();
        std::thread::spawn(move || vcpu::supported_cpuid(&kvm))
    };
    vm::check_capabilities(&kvm, config.vcpus)?;
    let has_devices = !config.disks.is_empty()
        || !config.nets.is_empty()
        || config.console.is_some()
        || config.rng
        || config.hotplug.is_some();
    let shareable = config.memory_mode == MemoryMode::Shared && has_devices;
    let ram = memory::GuestRam::new(config.memory_bytes, shareable)?;
    let vm = Arc::new(vm::create(&kvm, &ram)?);
    let hotplug = match &config.hotplug {
        Some(hotplug) => Some(Arc::new(hotplug::HotplugRegion::new(hotplug, &ram, vm.clone())?)),
        None => None,
    };
    debug!("VM created with {} MiB of RAM", config.memory_bytes >> 20);

    let control = Arc::new(VmControl::new());
    let legacy = Arc::new(legacy::LegacyDevices::new(&vm, &config.serial, control.clone())?);
    let devices = if !has_devices {
        Vec::new()
    } else {
        let runtime = virtio::start_rpc_runtime()?;
        let context = virtio::LaunchContext { vm: &vm, ram: &ram, hotplug: hotplug.as_ref(), runtime: &runtime };
        virtio::launch(&config, &context)?
    };
    let slots: Vec<virtio::MmioSlot> = devices.iter().map(|d| d.slot).collect();
    let io = Arc::new(io::IoBus::new(legacy.clone(), devices));
    if let Some(region) = &hotplug {
        region.attach(Box::new(virtio::Hooks::new(io.clone(), ram.shared_regions())));
    }
    let entry = boot::load(&ram, &config, images, &slots)?;
    debug!("guest loaded: {entry}");

    let base_cpuid = cpuid.join().map_err(|_| Error::Boot("CPUID query thread panicked".into()))??;
    vcpu::install_kick_handler().map_err(Error::Device)?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = vcpu::Vcpu::new(&vm, index, io.clone(), control.clone())?;
        vcpu.configure(&base_cpuid, config.vcpus, (index == 0).then_some(&entry))?;
        vcpus.push(vcpu);
    }
    for vcpu in vcpus {
        vcpu.spawn()?;
    }
    debug!("{} vCPUs running", config.vcpus);
    if let Some(socket) = api_socket.as_mut() {
        let api = api::Api {
            control: control.clone(),
            io: io.clone(),
            vcpus: config.vcpus,
            memory_bytes: config.memory_bytes,
            memory_mode: config.memory_mode,
            hotplug: hotplug.clone(),
            started: std::time::Instant::now(),
        };
        api::serve(socket, api)?;
    }
    signals::watch(control.clone())?;
    // A console on stdio reads stdin itself.
    if config.console != Some(SerialOutput::Stdio) {
        legacy.forward_stdin_if_terminal();
    }
    let exit = control.wait();
    report(&io, &control, hotplug.as_deref(), config.stats_file.as_deref());
    virtio::stop_all(&io.virtio);
    drop(api_socket);
    // The caller leaves through `exit_now`, which hands the VM's teardown to the
    // kernel in the background; unmapping guest memory here would cost more.
    std::mem::forget((vm, ram, kvm, io, hotplug));
    Ok(exit)
}

/// What the VM's exits and devices did, on the info log and, with
/// `--stats-file`, as JSON for benchmarks.
fn report(
    io: &io::IoBus,
    control: &VmControl,
    hotplug: Option<&hotplug::HotplugRegion>,
    stats_file: Option<&std::path::Path>,
) {
    let devices = virtio::status(&io.virtio);
    for device in &devices {
        if let (Some(rpcs), Some(bytes), Some(refused)) =
            (device.memory_rpcs, device.memory_bytes, device.memory_refused)
        {
            tracing::info!("device {}: {rpcs} memory RPCs, {bytes} bytes, {refused} refused", device.name);
        }
        if let Some(batches) = device.batches {
            tracing::info!("device {}: {batches} batches posted", device.name);
        }
        if let Some(reason) = &device.failure {
            tracing::info!("device {}: failed during the run: {reason}", device.name);
        }
    }
    let Some(path) = stats_file else { return };
    let stats = serde_json::json!({
        "exits": &io.exits,
        "vcpu_cpu_ns": control.vcpu_cpu_time().as_nanos() as u64,
        "hotplug": hotplug.map(|h| h.status()),
        "devices": devices,
    });
    if let Err(e) = std::fs::write(path, stats.to_string()) {
        tracing::warn!("cannot write the stats file {}: {e}", path.display());
    }
}
