//! One thread per vCPU, each running KVM_RUN and dispatching exits.
mod cpuid;
mod kick;
mod setup;

pub use cpuid::supported_cpuid;
pub use kick::{install as install_kick_handler, kick};

use super::boot::BootEntry;
use super::control::VmControl;
use super::exit::VmExit;
use super::io::IoBus;
use super::{Error, Result};
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::sync::Arc;
use tracing::debug;

pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    io: Arc<IoBus>,
    control: Arc<VmControl>,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8, io: Arc<IoBus>, control: Arc<VmControl>) -> Result<Self> {
        let fd = vm.create_vcpu(index as u64).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        Ok(Vcpu { fd, index, io, control })
    }

    /// CPUID, MSRs, FPU and LAPIC for every vCPU; registers only for the boot
    /// vCPU (the others wait for INIT/SIPI in the in-kernel LAPIC).
    pub fn configure(&self, base_cpuid: &CpuId, vcpu_count: u8, boot: Option<&BootEntry>) -> Result<()> {
        let cpuid = cpuid::for_vcpu(base_cpuid, self.index, vcpu_count);
        self.fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        setup::set_boot_msrs(&self.fd)?;
        setup::set_fpu(&self.fd)?;
        setup::set_lint(&self.fd)?;
        if let Some(entry) = boot {
            entry.apply(&self.fd)?;
        }
        Ok(())
    }

    pub fn spawn(self) -> Result<()> {
        let control = self.control.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
            .map(|handle| {
                use std::os::unix::thread::JoinHandleExt;
                control.register_vcpu_thread(handle.as_pthread_t());
            })
            .map_err(|e| Error::Host("starting a vCPU thread".into(), e))
    }

    fn run(mut self) {
        let clock = self.control.register_vcpu_clock();
        self.run_until_stopped();
        self.control.vcpu_thread_ending(clock);
    }

    fn run_until_stopped(&mut self) {
        let index = self.index;
        kick::arm(&mut self.fd);
        while !self.control.is_stopping() {
            if self.control.is_paused() {
                self.control.park();
                continue;
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: clear it; the loop head parks if it was a pause.
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => {
                    self.control.request_exit(VmExit::Crash { vcpu: index, reason: format!("KVM_RUN failed: {e}") });
                    return;
                }
            };
            match exit {
                VcpuExit::IoIn(port, data) => self.io.pio_read(port, data),
                VcpuExit::IoOut(port, data) => self.io.pio_write(port, data),
                VcpuExit::MmioRead(addr, data) => self.io.mmio_read(addr, data),
                VcpuExit::MmioWrite(addr, data) => self.io.mmio_write(addr, data),
                VcpuExit::Shutdown => self.control.request_exit(VmExit::TripleFault { vcpu: index }),
                VcpuExit::SystemEvent(kind, _) => self.control.request_exit(system_event(kind, index)),
                VcpuExit::Hlt => debug!("vCPU {index} halted"),
                VcpuExit::FailEntry(reason, cpu) => self.control.request_exit(VmExit::Crash {
                    vcpu: index,
                    reason: format!("VM entry failed (hardware reason {reason:#x}, host CPU {cpu})"),
                }),
                VcpuExit::InternalError => {
                    let reason = internal_error(&mut self.fd);
                    self.control.request_exit(VmExit::Crash { vcpu: index, reason });
                }
                other => self
                    .control
                    .request_exit(VmExit::Crash { vcpu: index, reason: format!("unexpected KVM exit {other:?}") }),
            }
        }
    }
}

fn system_event(kind: u32, vcpu: u8) -> VmExit {
    match kind {
        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset { source: "KVM system event" },
        other => VmExit::Crash { vcpu, reason: format!("KVM system event {other}") },
    }
}

/// KVM_EXIT_INTERNAL_ERROR with its suberror and the guest RIP, for the exit line.
fn internal_error(fd: &mut VcpuFd) -> String {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let rip = fd.get_regs().map(|r| format!("{:#x}", r.rip)).unwrap_or_else(|_| "unknown".into());
    format!("KVM internal error (suberror {suberror}) at rip {rip}")
}
