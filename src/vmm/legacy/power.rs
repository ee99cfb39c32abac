//! Ports through which a guest ends the VM.
//!
//! * 0xf4, debug exit: the byte written becomes skvm's exit status (the
//!   port QEMU's isa-debug-exit uses, so one guest serves both).
//! * 0x600, the sleep control register of skvm's hardware-reduced ACPI
//!   platform (named in the FADT): `SLP_TYP=5 | SLP_EN` (0x34) is S5,
//!   power off. It doubles as the FADT reset register: writing 1 resets.
//!   Cloud Hypervisor uses the same port and values.
use super::super::exit::VmExit;

pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_VALUE: u8 = 1;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const S5: u8 = 5;

pub fn sleep_control_write(value: u8) -> Option<VmExit> {
    if value == ACPI_RESET_VALUE {
        return Some(VmExit::Reset { source: "ACPI reset register" });
    }
    let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
    (value & SLP_EN != 0 && sleep_type == S5).then_some(VmExit::PowerOff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_other_states_are_ignored() {
        assert_eq!(sleep_control_write(0x34), Some(VmExit::PowerOff));
        assert_eq!(sleep_control_write(5 << 2), None); // SLP_EN missing
        assert_eq!(sleep_control_write((3 << 2) | SLP_EN), None); // S3 is not supported
        assert!(matches!(sleep_control_write(1), Some(VmExit::Reset { .. })));
    }
}
