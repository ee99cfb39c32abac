//! Port I/O, MMIO and the ways a guest can end the VM, all usable from ring 3
//! (IOPL=3, every page user-accessible).
use core::arch::asm;

/// skvm's debug-exit port: the byte written becomes skvm's exit status.
/// QEMU's isa-debug-exit at the same port exits with `(status << 1) | 1`.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Sleep control register of the hardware-reduced ACPI platform that skvm
/// and Cloud Hypervisor expose; `SLP_TYP=5 | SLP_EN` powers off (S5).
const ACPI_SLEEP_PORT: u16 = 0x600;
const ACPI_S5: u8 = 0x34;
/// i8042 command port; 0xfe pulses the CPU reset line (Firecracker stops on it).
const I8042_CMD_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as above.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as above.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as above.
    unsafe { asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

pub fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: the address is mapped (see `mmio_read32`); a device or the VMM answers.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

pub fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

pub fn mmio_write16(addr: u64, value: u16) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the low 4 GiB are identity mapped, and `paging::map` maps
    // device windows above; a device or the VMM answers.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Current privilege level, from the low bits of CS.
pub fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    cs & 3
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc is allowed at CPL3 (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

/// Ends the VM with `status`: skvm's debug-exit port first, then ACPI S5 and
/// an i8042 reset for VMMs that lack it.
pub fn exit(status: u8) -> ! {
    outb(DEBUG_EXIT_PORT, status);
    acpi_poweroff()
}

pub fn acpi_poweroff() -> ! {
    outb(ACPI_SLEEP_PORT, ACPI_S5);
    i8042_reset()
}

pub fn i8042_reset() -> ! {
    outb(I8042_CMD_PORT, I8042_RESET);
    loop {
        core::hint::spin_loop();
    }
}
