//! Architectural state every vCPU starts with: MSRs, FPU and LAPIC LINT pins.
use super::super::{Error, Result};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use tracing::debug;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// Reset values for the MSRs a 64-bit kernel expects to find sane. Some hosts
/// refuse some of them (PVM takes only 0 for ARCH_CAPABILITIES, which skvm
/// therefore never sets); a partial write is logged, not fatal.
pub fn set_boot_msrs(fd: &VcpuFd) -> Result<()> {
    let values = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ];
    let entries: Vec<kvm_msr_entry> =
        values.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Boot("too many boot MSRs".into()))?;
    let written = fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
    if written < entries.len() {
        debug!("KVM took {written} of {} boot MSRs; first refused: {:#x}", entries.len(), entries[written].index);
    }
    Ok(())
}

pub fn set_fpu(fd: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    fd.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 takes the legacy PIC's interrupts (ExtINT), LINT1 takes NMIs, as
/// firmware leaves them on a PC.
pub fn set_lint(fd: &VcpuFd) -> Result<()> {
    let mut lapic = fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let value = u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
        for (dst, src) in reg.iter_mut().zip(set_delivery_mode(value, mode).to_le_bytes()) {
            *dst = src as libc::c_char;
        }
    }
    fd.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_8_to_10() {
        assert_eq!(set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT), 0x0001_0700);
        assert_eq!(set_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }
}
