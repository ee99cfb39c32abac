//! The skvm test guest: a freestanding PVH kernel whose real work runs in ring 3.
//!
//! `boot.S` is the whole ring-0 part (long mode, tables, drop to ring 3).
//! Everything in Rust runs at CPL3 with IOPL=3 and interrupts off, so it
//! runs at native speed on PVM hosts and reaches devices through port I/O
//! and MMIO, polling for completions.
//!
//! The command line selects a scenario (see `scenario.rs`); results go to
//! COM1 as `key: value` lines that tests and benchmarks parse.
#![no_std]
#![no_main]

mod acpi;
mod blk;
mod blk_scenarios;
mod console;
mod interrupts;
mod mem;
mod mem_scenarios;
mod net;
mod paging;
mod pci;
mod platform;
mod pvh;
mod rng;
mod scenario;
mod vconsole;
mod virtio;
mod virtio_mem;

use core::arch::global_asm;

global_asm!(include_str!("boot.S"), options(att_syntax));

/// Ring-3 entry, called from `ring3_entry` in boot.S with the physical
/// address of the PVH `hvm_start_info`.
#[no_mangle]
extern "C" fn guest_main(start_info_addr: u32) -> ! {
    let Some(info) = pvh::StartInfo::at(start_info_addr as u64) else {
        println!("skvm-test-guest: error: no valid hvm_start_info at {:#x}", start_info_addr);
        platform::exit(0xd0);
    };
    scenario::run(&info)
}

/// The precompiled libcore references an unwinding personality even with
/// `panic=abort`; nothing ever unwinds here.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo) -> ! {
    println!("panic: {}", panic);
    platform::exit(0xdf)
}
