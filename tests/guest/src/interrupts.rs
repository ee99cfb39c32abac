//! Sleeping until a device interrupts (`halt=1`), as a guest kernel does
//! when it has nothing to run, instead of polling on the vCPU.
//!
//! Ring 3 routes a virtio-mmio device's line through the IOAPIC to the
//! local APIC (both mapped user-accessible), then sleeps through the #UD
//! gate in boot.S, which turns the ud2 at `halt_trap` into `sti; hlt`.
//! Ring 3 runs with IF=0, so an interrupt that arrives after its last look
//! at the rings waits, pending, and ends the `hlt` at once: no wake-up is
//! lost. (PVM hosts refuse `int n` from ring 3, and `syscall` does not
//! reach CPL0 there; a fault's gate does.)
use crate::platform::mmio_write32;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const IOAPIC: u64 = 0xfec0_0000;
const IOAPIC_WINDOW: u64 = IOAPIC + 0x10;
const IOAPIC_REDIRECTIONS: u32 = 0x10;
const LAPIC: u64 = 0xfee0_0000;
const LAPIC_TPR: u64 = LAPIC + 0x80;
const LAPIC_SVR: u64 = LAPIC + 0xf0;
/// Software-enabled, spurious vector 0x8f (the IDT's last).
const LAPIC_ENABLE: u32 = 0x18f;
/// Device lines land on vectors from here (the IDT sends every one to
/// the stub that acknowledges it).
const FIRST_VECTOR: u32 = 0x30;
/// The IOAPIC's pins (KVM's has 24).
const PINS: u32 = 24;
const LAPIC_TIMER: u64 = LAPIC + 0x320;
const LAPIC_TIMER_COUNT: u64 = LAPIC + 0x380;
const LAPIC_TIMER_DIVIDE: u64 = LAPIC + 0x3e0;
const TIMER_PERIODIC: u32 = 1 << 17;
/// boot.S's TICK_VECTOR.
const TIMER_VECTOR: u32 = 0x2f;
/// A periodic tick of about a second (bus clock ticks, divided by 1; KVM's
/// APIC bus runs at 1 GHz), so that a sleeping driver still notices a
/// device that stopped answering. Rare, so that even on a slow nested host
/// a device's wake-ups far outnumber the tick's.
const TIMER_TICKS: u32 = 1_000_000_000;
const DIVIDE_BY_1: u32 = 0xb;

static HALT: AtomicBool = AtomicBool::new(false);
/// Sleeps so far, and how many of them the watchdog tick ended.
static SLEEPS: AtomicU64 = AtomicU64::new(0);
static TICK_WAKES: AtomicU64 = AtomicU64::new(0);

/// Reads `halt=1` from the command line (at boot).
pub fn configure(cmdline: &str) {
    HALT.store(crate::scenario::param(cmdline, "halt") == Some("1"), Ordering::Relaxed);
}

/// Whether the command line asked drivers to sleep between completions.
pub fn halt_wanted() -> bool {
    HALT.load(Ordering::Relaxed)
}

/// Routes IOAPIC pin `gsi` to this CPU, edge-triggered and unmasked, and
/// enables the local APIC with its watchdog tick. False if there is no such pin.
pub fn route(gsi: u32) -> bool {
    if gsi >= PINS {
        return false;
    }
    mmio_write32(LAPIC_TPR, 0);
    mmio_write32(LAPIC_SVR, LAPIC_ENABLE);
    mmio_write32(LAPIC_TIMER_DIVIDE, DIVIDE_BY_1);
    mmio_write32(LAPIC_TIMER, TIMER_PERIODIC | TIMER_VECTOR);
    mmio_write32(LAPIC_TIMER_COUNT, TIMER_TICKS);
    let entry = IOAPIC_REDIRECTIONS + 2 * gsi;
    // High word: destination APIC 0. Low: fixed delivery, physical,
    // active high, edge, unmasked.
    mmio_write32(IOAPIC, entry + 1);
    mmio_write32(IOAPIC_WINDOW, 0);
    mmio_write32(IOAPIC, entry);
    mmio_write32(IOAPIC_WINDOW, FIRST_VECTOR + gsi);
    true
}

core::arch::global_asm!(".globl halt_trap", "halt_trap:", "ud2", "ret");

extern "C" {
    /// A ud2 that boot.S's #UD gate turns into a halt.
    fn halt_trap();
    /// Set by boot.S's tick handler.
    static mut tick_seen: u32;
}

/// Sleeps until an interrupt, or returns at once if one is pending.
pub fn halt() {
    // SAFETY: boot.S's #UD gate sees the ud2 at halt_trap, halts with
    // interrupts on and returns past it with IF=0 and every register kept.
    unsafe { halt_trap() }
    // SAFETY: a flag only boot.S's tick handler sets, and only while we halt.
    let tick = unsafe { core::ptr::replace(core::ptr::addr_of_mut!(tick_seen), 0) } != 0;
    SLEEPS.fetch_add(1, Ordering::Relaxed);
    TICK_WAKES.fetch_add(tick as u64, Ordering::Relaxed);
}

/// Sleeps so far, and how many of them ended by the watchdog tick rather
/// than a device's interrupt.
pub fn sleeps() -> (u64, u64) {
    (SLEEPS.load(Ordering::Relaxed), TICK_WAKES.load(Ordering::Relaxed))
}
