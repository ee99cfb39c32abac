//! What the guest does, chosen on the command line:
//!
//! * `scenario=hello` (default): report what the VMM handed over, then exit.
//! * `scenario=shutdown`: exit at once, printing nothing (boot benchmarks).
//! * `scenario=fault`: execute `ud2` in ring 3; the exception path reports
//!   it and exits with 0xe6.
//! * `scenario=triple-fault`: wipe the IDT in memory, then fault: the CPU
//!   cannot deliver the exception and shuts down.
//! * `scenario=poweroff`: ACPI S5 without the debug-exit port.
//! * `scenario=reset`: i8042 reset without the debug-exit port.
//! * `scenario=spin`: loop forever (for signal tests).
//! * `scenario=virtio-fuzz seed=N`: random reads and writes (any width,
//!   any offset, including status and queue registers) on every
//!   virtio-mmio device, then report that the VMM is still answering.
//! * `scenario=ticker`: print `tick N` every 2^27 TSC ticks, forever (pause tests).
//! * `scenario=echo`: echo serial input until a newline or `.`.
//! * `scenario=exit-cost`: time port and MMIO exits to unclaimed addresses.
//! * `scenario=mmio-probe`: write and read an unclaimed MMIO address.
//!
//! * `scenario=rng`: read the virtio-rng device (see `rng.rs`).
//! * `scenario=net-ping`: ping the host over virtio-net, then answer its
//!   pings and echo its UDP datagrams (see `net.rs`).
//! * `scenario=console-echo`: greet on virtio-console's hvc0, then echo
//!   each line the host sends, until `quit` (see `vconsole.rs`).
//! * `scenario=net-hostile [merge=0]`: malformed transmit chains and
//!   unusable receive buffers, then the same service (see `net.rs`).
//! * `scenario=blk-pattern|blk-readonly|blk-hostile|blk-recover|blk-bench|blk-verify|driver-flood`: see
//!   `blk_scenarios.rs`.
//!
//! * `scenario=mem-plug|mem-hostile|mem-follow|mem-churn`: see `mem_scenarios.rs`.
//! * `scenario=idle tsc=N`: do nothing for N TSC ticks, then exit.
//!
//! `exit=N` picks the status for the debug-exit port (default 0); `disk=N`
//! makes the disk scenarios use the Nth virtio-blk device (default 0).
use crate::blk_scenarios::{self, BenchParams};
use crate::{acpi, console, platform, println, pvh};

const MIB: u64 = 1 << 20;
/// An address in the VMM's 32-bit MMIO hole that no device claims.
const UNCLAIMED_MMIO: u64 = 0xdfff_f000;

pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

fn parse_u8(text: &str) -> Option<u8> {
    match text.strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn report(info: &pvh::StartInfo) {
    println!("cpl: {}", platform::cpl());
    println!("start-info-version: {}", info.version());
    println!("modules: {}", info.module_count());
    if let Some(module) = info.first_module() {
        println!("module0: {:#x} {} bytes, first byte {:#04x}", module.paddr, module.size, module.first_byte());
    }
    println!("cmdline: {}", info.cmdline());
    let (mut ram, mut ranges, mut ram_end) = (0u64, 0u32, 0u64);
    for entry in info.memmap() {
        println!("memmap: {:#012x}-{:#012x} type {}", entry.addr, entry.addr + entry.size, entry.kind);
        if entry.kind == pvh::E820_RAM {
            ram += entry.size;
            ranges += 1;
            ram_end = ram_end.max(entry.addr + entry.size);
        }
    }
    println!("ram-bytes: {}", ram);
    println!("ram-ranges: {}", ranges);
    println!("ram-end: {:#x} ({} MiB)", ram_end, ram_end / MIB);
    match info.rsdp().and_then(acpi::cpu_count) {
        Some(cpus) => println!("cpus: {}", cpus),
        None => println!("cpus: unknown (no valid ACPI MADT)"),
    }
}

pub fn run(info: &pvh::StartInfo) -> ! {
    let cmdline = info.cmdline();
    crate::virtio::configure(cmdline);
    crate::interrupts::configure(cmdline);
    let status = param(cmdline, "exit").and_then(parse_u8).unwrap_or(0);
    let scenario = param(cmdline, "scenario").unwrap_or("hello");
    if scenario == "shutdown" {
        platform::exit(status);
    }
    console::write_str("skvm-test-guest: hello from ring 3\n");
    report(info);
    println!("scenario: {}", scenario);
    match scenario {
        "hello" => {}
        "fault" => {
            // SAFETY: deliberately raises #UD to exercise the exception path.
            unsafe { core::arch::asm!("ud2") }
        }
        "triple-fault" => wipe_idt_and_fault(),
        "poweroff" => platform::acpi_poweroff(),
        "reset" => platform::i8042_reset(),
        "spin" => loop {
            core::hint::spin_loop();
        },
        "ticker" => ticker(),
        "virtio-fuzz" => {
            let seed = param(cmdline, "seed").and_then(|s| s.parse().ok()).unwrap_or(1);
            virtio_fuzz(cmdline, seed);
        }
        "echo" => echo(),
        "exit-cost" => exit_cost(),
        "blk-pattern" => {
            let seed = param(cmdline, "seed").and_then(|s| s.parse().ok()).unwrap_or(1);
            let failed = blk_scenarios::run_pattern(info, seed);
            if failed != 0 {
                platform::exit(failed);
            }
        }
        "rng" => check(crate::rng::run(info)),
        // net-bench: the same service, which the host's `cargo bench --bench net` drives.
        "net-ping" | "net-bench" => check(crate::net::run_ping(info)),
        "net-hostile" => check(crate::net::run_hostile(info)),
        "console-echo" => check(crate::vconsole::run_echo(info)),
        "blk-readonly" => check(blk_scenarios::run_readonly(info)),
        "blk-zeroes" => check(blk_scenarios::run_zeroes(info)),
        "blk-hostile" => check(blk_scenarios::run_hostile(info)),
        "blk-recover" => check(blk_scenarios::run_recover(info)),
        "driver-flood" => {
            let rounds = param(cmdline, "rounds").and_then(|s| s.parse().ok()).unwrap_or(1000);
            check(blk_scenarios::run_driver_flood(info, rounds));
        }
        "blk-bench" => {
            let number = |key, default| param(cmdline, key).and_then(|s| s.parse().ok()).unwrap_or(default);
            let params = BenchParams {
                rw: param(cmdline, "rw").unwrap_or("randread"),
                block_size: number("bs", 4096),
                depth: number("qd", 1) as u16,
                ops: number("ops", 1000),
                seed: number("seed", blk_scenarios::DEFAULT_SEED),
            };
            check(blk_scenarios::run_bench(info, &params));
        }
        "blk-verify" => {
            let number = |key, default| param(cmdline, key).and_then(|s| s.parse().ok()).unwrap_or(default);
            let recover = number("recover", 0) != 0;
            let stop = number("stop", 0) != 0;
            check(blk_scenarios::run_verify(info, number("ops", 10000), number("qd", 8) as u16, recover, stop));
            // `hold=1`: stay up after the report (for a host that kills the VMM there).
            while number("hold", 0) != 0 {
                core::hint::spin_loop();
            }
        }
        "mem-plug" => check(crate::mem_scenarios::run_plug(info)),
        "mem-hostile" => check(crate::mem_scenarios::run_hostile(info)),
        "mem-follow" => check(crate::mem_scenarios::run_follow(info)),
        "mem-churn" => {
            let number = |key| param(cmdline, key).and_then(|s| s.parse().ok()).unwrap_or(0);
            check(crate::mem_scenarios::run_churn(info, number("cycles"), number("ios")));
        }
        "idle" => {
            // Nothing but time passing, for `idle tsc=N` ticks: what the VMM
            // and devices cost while the guest does no I/O.
            let ticks = param(cmdline, "tsc").and_then(|s| s.parse().ok()).unwrap_or(1u64 << 30);
            let start = platform::rdtsc();
            while platform::rdtsc() - start < ticks {
                core::hint::spin_loop();
            }
            println!("idle: done tsc={}", ticks);
        }
        "mmio-probe" => {
            platform::mmio_write32(UNCLAIMED_MMIO, 0x5a5a_5a5a);
            println!("mmio-read: {:#x}", platform::mmio_read32(UNCLAIMED_MMIO));
        }
        other => {
            println!("error: unknown scenario {}", other);
            platform::exit(0xd1);
        }
    }
    if crate::interrupts::halt_wanted() {
        let (sleeps, tick_wakes) = crate::interrupts::sleeps();
        println!("sleeps: {} woken-by-tick: {}", sleeps, tick_wakes);
    }
    println!("exit: {}", status);
    platform::exit(status)
}

/// Reports a scenario's failure and exits with 0xb0.
fn check(result: Result<(), &'static str>) {
    if let Err(why) = result {
        println!("error: {}", why);
        platform::exit(0xb0);
    }
}

fn echo() {
    console::write_str("echo: ready\n");
    loop {
        if let Some(byte) = console::try_read() {
            let mut buf = [0u8; 4];
            console::write_str((byte as char).encode_utf8(&mut buf));
            if byte == b'\n' || byte == b'.' {
                console::write_str("\necho: done\n");
                return;
            }
        }
    }
}

fn wipe_idt_and_fault() -> ! {
    extern "C" {
        static mut idt: [u8; 512];
    }
    // SAFETY: the IDT page is user-writable in this guest by design; wiping
    // it makes the next exception undeliverable, which is the point.
    unsafe {
        core::ptr::write_bytes(core::ptr::addr_of_mut!(idt) as *mut u8, 0, 512);
        core::arch::asm!("ud2", options(noreturn))
    }
}

/// TSC ticks per VM exit for a ring-3 port write and a ring-3 MMIO write.
fn exit_cost() {
    const ROUNDS: u64 = 2000;
    const UNCLAIMED_PORT: u16 = 0x80;
    let start = platform::rdtsc();
    for _ in 0..ROUNDS {
        platform::outb(UNCLAIMED_PORT, 0);
    }
    let port = (platform::rdtsc() - start) / ROUNDS;
    let start = platform::rdtsc();
    for _ in 0..ROUNDS {
        platform::mmio_write32(UNCLAIMED_MMIO, 0);
    }
    let mmio = (platform::rdtsc() - start) / ROUNDS;
    println!("exit-cost-port-tsc: {}", port);
    println!("exit-cost-mmio-tsc: {}", mmio);
}

fn ticker() -> ! {
    const PERIOD: u64 = 1 << 27;
    let (mut count, mut last) = (0u64, platform::rdtsc());
    loop {
        if platform::rdtsc() - last > PERIOD {
            count += 1;
            println!("tick {}", count);
            last = platform::rdtsc();
        }
        core::hint::spin_loop();
    }
}

/// Hammers every virtio-mmio register window with random accesses.
fn virtio_fuzz(cmdline: &str, seed: u64) {
    use crate::platform::{mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write8};
    const ROUNDS: u32 = 1500;
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut devices = 0;
    for (base, _) in crate::virtio::mmio_windows(cmdline) {
        devices += 1;
        // Registers are 32 bits wide: narrower accesses to a fresh device
        // read nothing and change nothing (the magic value and status).
        let (magic8, magic16) = (mmio_read8(base), mmio_read16(base));
        mmio_write8(base + 0x070, 1);
        mmio_write16(base + 0x070, 1);
        println!(
            "fuzz: narrow reads of magic {:#x} {:#x}, of 32 bits {:#x}; status after narrow writes {:#x}",
            magic8,
            magic16,
            mmio_read32(base),
            mmio_read32(base + 0x070)
        );
        for _ in 0..ROUNDS {
            let r = next();
            // Mostly the register block, sometimes config space or beyond.
            let offset = (r >> 8) % 0x180;
            let addr = base + offset;
            let value = next() as u32;
            // SAFETY: MMIO to the device window; widths 1, 2 and 4.
            unsafe {
                match r % 8 {
                    0 => core::ptr::write_volatile(addr as *mut u8, value as u8),
                    1 => core::ptr::write_volatile((addr & !1) as *mut u16, value as u16),
                    2 => {
                        let _ = core::ptr::read_volatile(addr as *const u8);
                    }
                    3 => {
                        let _ = core::ptr::read_volatile((addr & !3) as *const u32);
                    }
                    _ => core::ptr::write_volatile((addr & !3) as *mut u32, value),
                }
            }
        }
        println!("fuzz: device at {:#x} status {:#x}", base, mmio_read32(base + 0x070));
    }
    println!("fuzz: done, {} devices", devices);
}
