//! The trusted VMM: it owns KVM, guest memory and every vCPU.
//!
//! `run` builds a VM from a [`VmConfig`], runs it and returns why it stopped.
mod boot;
mod config;
mod control;
mod error;
mod exit;
mod layout;
mod legacy;
mod memory;
mod signals;
mod vcpu;
mod vm;

pub use config::{BootProtocol, KernelSource, SerialOutput, VmConfig};
pub use error::Error;
pub use exit::VmExit;

use control::VmControl;
use kvm_ioctls::Kvm;
use std::sync::Arc;

pub type Result<T> = std::result::Result<T, Error>;

/// Boots the guest described by `config` and blocks until it stops.
pub fn run(config: VmConfig) -> Result<VmExit> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    vm::check_capabilities(&kvm, config.vcpus)?;
    let vm = vm::create(&kvm)?;
    let ram = memory::GuestRam::new(config.memory_bytes)?;
    ram.register(&vm)?;

    let control = Arc::new(VmControl::new());
    let legacy = Arc::new(legacy::LegacyDevices::new(&vm, &config.serial, control.clone())?);
    let entry = boot::load(&ram, &config)?;

    // Signals must be blocked before any thread exists so only signals::watch sees them.
    signals::block_exit_signals()?;
    let base_cpuid = vcpu::supported_cpuid(&kvm)?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = vcpu::Vcpu::new(&vm, index, legacy.clone(), control.clone())?;
        vcpu.configure(&base_cpuid, config.vcpus, (index == 0).then_some(&entry))?;
        vcpus.push(vcpu);
    }
    for vcpu in vcpus {
        vcpu.spawn()?;
    }
    signals::watch(control.clone())?;
    legacy.forward_stdin_if_terminal();
    Ok(control.wait())
}
