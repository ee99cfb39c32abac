//! The KVM VM itself: capabilities, in-kernel interrupt controllers and PIT.
use super::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use super::memory::GuestRam;
use super::{Error, Result};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

pub fn check_capabilities(kvm: &Kvm, vcpus: u8) -> Result<()> {
    let required = [
        (Cap::Irqchip, "an in-kernel IRQ chip (KVM_CAP_IRQCHIP)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    ];
    for (cap, what) in required {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(what));
        }
    }
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(Error::TooManyVcpus { requested: vcpus, max });
    }
    Ok(())
}

/// Creates the VM with `ram` registered. Memory slots go in before the
/// interrupt controllers and PIT: once those exist, every slot update waits
/// for an SRCU grace period (milliseconds on nested hosts).
pub fn create(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd> {
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    ram.register(&vm)?;
    // Both addresses sit in the MMIO hole, away from RAM and devices; they must be
    // set before the first vCPU exists.
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR).map_err(Error::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(KVM_TSS_ADDR).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
    Ok(vm)
}
