//! Scenarios that drive virtio-mem (with a virtio-blk disk beside it).
//!
//! * `mem-plug`: wait for the host to request memory, plug it, fill it with
//!   a pattern and check it, write 1 MiB of it to the disk straight from
//!   plugged memory and read it back; then wait for the request to drop to
//!   zero, unplug, and show the memory is gone (STATE, reads, a disk write
//!   from it fails); then wait for a second plug and check it reads zero.
//!   Then idle until the host shuts the VM down.
//! * `mem-hostile`: send malformed and impossible requests (unaligned,
//!   outside the region, wrapping around the address space, beyond the
//!   requested size, unplugging what is not plugged, an unknown type, a
//!   short request); each must be answered with ERROR or NACK and change
//!   nothing.
//! * `mem-follow`: follow every requested-size change, and nothing else.
//! * `mem-churn cycles=N | ios=N`: keep verified disk I/O going (a write and
//!   read-back of 8 x 4 KiB per round, half the buffers in plugged memory
//!   when there is some) while following every requested-size change; stop
//!   after N unplugs, or after N I/Os, and print the totals.
use crate::blk::{Arena, Blk, SECTOR, T_IN, T_OUT};
use crate::blk_scenarios::{first_disk, Rng};
use crate::virtio::{DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio_mem::{Change, Mem, RESP_ERROR, RESP_NACK, STATE_PLUGGED, STATE_UNPLUGGED};
use crate::{platform, println, pvh};

const MIB: u64 = 1 << 20;
/// Give up waiting for the host after this many TSC ticks (about a minute).
const PATIENCE: u64 = 1 << 37;

/// The pattern word at `offset` bytes into the hotplug region; the host
/// test computes the same to check the disk.
pub fn pattern_word(offset: u64) -> u64 {
    offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed_5eed_5eed_5eed
}

fn fill_pattern(region_start: u64, addr: u64, bytes: u64) {
    let mut at = addr;
    while at < addr + bytes {
        // SAFETY: plugged memory this driver owns.
        unsafe { core::ptr::write_volatile(at as *mut u64, pattern_word(at - region_start)) };
        at += 8;
    }
}

/// The offset of the first word that does not hold the pattern.
fn check_pattern(region_start: u64, addr: u64, bytes: u64) -> Option<u64> {
    let mut at = addr;
    while at < addr + bytes {
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(at as *const u64) } != pattern_word(at - region_start) {
            return Some(at);
        }
        at += 8;
    }
    None
}

fn setup(info: &pvh::StartInfo) -> Result<(Mem, Blk, Arena), &'static str> {
    let (blk, mut arena) = first_disk(info)?;
    let device = Mem::find(info.cmdline()).ok_or("no virtio-mem device on the command line")?;
    let mem = Mem::init(device, &mut arena)?;
    println!("mem: region {:#x} {} MiB, block {} KiB", mem.start, mem.size / MIB, mem.block / 1024);
    Ok((mem, blk, arena))
}

/// Waits until the requested size differs from what is plugged, then follows it.
fn await_change(mem: &mut Mem) -> Result<(Change, u64), &'static str> {
    let start = platform::rdtsc();
    loop {
        if mem.requested() != mem.plugged {
            let noticed = platform::rdtsc();
            let change = mem.follow()?.ok_or("requested size changed back")?;
            return Ok((change, platform::rdtsc() - noticed));
        }
        if platform::rdtsc() - start > PATIENCE {
            return Err("the host never changed the requested size");
        }
        for _ in 0..20_000 {
            core::hint::spin_loop();
        }
    }
}

/// Follows the next change and prints it with how long it took.
fn await_and_report(mem: &mut Mem) -> Result<Change, &'static str> {
    let (change, ticks) = await_change(mem)?;
    let (what, addr, bytes) = match change {
        Change::Plugged { addr, bytes } => ("plugged", addr, bytes),
        Change::Unplugged { addr, bytes } => ("unplugged", addr, bytes),
    };
    println!(
        "mem: {} {} MiB at {:#x} in {} tsc, device says {} MiB",
        what,
        bytes / MIB,
        addr,
        ticks,
        mem.device_plugged() / MIB
    );
    Ok(change)
}

/// Writes `bytes` at `addr` to the disk from sector 0 in 64 KiB requests.
fn disk_transfer(blk: &mut Blk, kind: u32, addr: u64, bytes: u64) -> Result<u8, &'static str> {
    let mut offset = 0;
    while offset < bytes {
        let len = (64 * 1024).min(bytes - offset);
        let status = blk.request(kind, offset / SECTOR, addr + offset, len as u32)?;
        if status != 0 {
            return Ok(status);
        }
        offset += len;
    }
    Ok(0)
}

pub fn run_plug(info: &pvh::StartInfo) -> Result<(), &'static str> {
    let (mut mem, mut blk, _arena) = setup(info)?;
    println!("mem: ready");
    let Change::Plugged { addr, bytes } = await_and_report(&mut mem)? else { return Err("expected a plug") };
    if mem.state(addr, bytes)? != STATE_PLUGGED {
        return Err("STATE does not say plugged");
    }
    fill_pattern(mem.start, addr, bytes);
    if let Some(at) = check_pattern(mem.start, addr, bytes) {
        println!("mem: pattern differs at {:#x}", at);
        return Err("plugged memory does not keep a pattern");
    }
    println!("mem: pattern verified over {} MiB of plugged memory", bytes / MIB);
    // The last MiB of plugged memory goes to the disk, and back into the MiB below it.
    let out = addr + bytes - MIB;
    let back = out - MIB;
    if disk_transfer(&mut blk, T_OUT, out, MIB)? != 0 {
        return Err("disk write from plugged memory failed");
    }
    // SAFETY: plugged memory we own.
    unsafe { core::ptr::write_bytes(back as *mut u8, 0, MIB as usize) };
    if disk_transfer(&mut blk, T_IN, back, MIB)? != 0 {
        return Err("disk read into plugged memory failed");
    }
    // SAFETY: both MiBs are ours.
    let same = unsafe {
        core::slice::from_raw_parts(out as *const u8, MIB as usize)
            == core::slice::from_raw_parts(back as *const u8, MIB as usize)
    };
    if !same {
        return Err("disk read-back into plugged memory differs");
    }
    println!("mem: disk holds 1 MiB from plugged memory at region offset {:#x}, read back matches", out - mem.start);

    let Change::Unplugged { addr, bytes } = await_and_report(&mut mem)? else { return Err("expected an unplug") };
    if mem.state(addr, bytes)? != STATE_UNPLUGGED {
        return Err("STATE does not say unplugged");
    }
    // With no memory slot behind it, the address is no longer RAM: writes go
    // nowhere and reads come back as all-ones.
    platform::mmio_write32(addr, 0x1234_5678);
    println!("mem: unplugged memory reads {:#x}", platform::mmio_read32(addr));
    let status = disk_transfer(&mut blk, T_OUT, addr, 4096)?;
    println!("mem: disk write from unplugged memory: status {}", status);

    // Plugged again, the blocks read zero: nothing written before reaches us.
    let Change::Plugged { addr, bytes } = await_and_report(&mut mem)? else { return Err("expected a second plug") };
    // SAFETY: plugged memory we own, read as words.
    let words = unsafe { core::slice::from_raw_parts(addr as *const u64, (bytes / 8) as usize) };
    match words.iter().position(|&w| w != 0) {
        Some(i) => println!("mem: replugged memory holds {:#x} at {:#x}", words[i], addr + 8 * i as u64),
        None => println!("mem: replugged {} MiB reads zero", bytes / MIB),
    }
    println!("mem: done");
    loop {
        core::hint::spin_loop();
    }
}

/// Follows every requested-size change and reports it, touching no disk.
pub fn run_follow(info: &pvh::StartInfo) -> Result<(), &'static str> {
    let (mut mem, _blk, _arena) = setup(info)?;
    loop {
        await_and_report(&mut mem)?;
    }
}

pub fn run_hostile(info: &pvh::StartInfo) -> Result<(), &'static str> {
    let (mut mem, _blk, _arena) = setup(info)?;
    let (start, block, size) = (mem.start, mem.block, mem.size);
    // A range from the top block of the address space whose end in bytes
    // wraps to exactly 0: only a check made in blocks sees it run past.
    let (top, wrapping_blocks) = (0u64.wrapping_sub(block), (1 + start / block) as u16);
    let cases: [(&str, u16, u64, u16, u16); 9] = [
        ("plug unaligned", 0, start + 4096, 1, RESP_ERROR),
        ("plug below the region", 0, start - block, 1, RESP_ERROR),
        ("plug past the region", 0, start + size - block, 2, RESP_ERROR),
        ("plug zero blocks", 0, start, 0, RESP_ERROR),
        ("plug beyond the requested size", 0, start, 1, RESP_NACK),
        ("unplug unplugged blocks", 1, start, 1, RESP_ERROR),
        ("unknown request type", 7, start, 1, RESP_ERROR),
        ("state of a range that wraps around", 3, top, wrapping_blocks, RESP_ERROR),
        ("plug a range that wraps around", 0, top, wrapping_blocks, RESP_ERROR),
    ];
    let mut failed = 0;
    for (name, kind, addr, blocks, expected) in cases {
        let (response, _) = mem.send(kind, addr, blocks)?;
        let verdict = if response == expected { "ok" } else { "WRONG" };
        failed += (response != expected) as u32;
        println!("mem-hostile: {}: response {} ({})", name, response, verdict);
    }
    // A request too short to hold a header: the device answers ERROR.
    let queue = mem_queue_short_request(&mut mem)?;
    println!("mem-hostile: short request: response {} ({})", queue, if queue == RESP_ERROR { "ok" } else { "WRONG" });
    failed += (queue != RESP_ERROR) as u32;
    if mem.state(start, block)? != STATE_UNPLUGGED || mem.device_plugged() != 0 {
        return Err("a refused request changed the region");
    }
    println!("mem-hostile: {} wrong answers; region unchanged", failed);
    if failed == 0 {
        Ok(())
    } else {
        Err("some hostile requests were not refused")
    }
}

fn mem_queue_short_request(mem: &mut Mem) -> Result<u16, &'static str> {
    mem.send_raw(8, DESC_F_NEXT, DESC_F_WRITE)
}

const ROUND: u16 = 8;
const IO: u64 = 4096;

/// Waits for a round's completions; returns how many failed.
fn complete_round(blk: &mut Blk) -> Result<u64, &'static str> {
    let mut errors = 0;
    for _ in 0..ROUND {
        match blk.wait() {
            Some((_, 0, _)) => {}
            Some(_) => errors += 1,
            None => return Err("no completion (timeout or device needs reset)"),
        }
    }
    Ok(errors)
}

pub fn run_churn(info: &pvh::StartInfo, cycles: u64, ios: u64) -> Result<(), &'static str> {
    let (mut mem, mut blk, mut arena) = setup(info)?;
    let base_out = arena.take(ROUND as u64 * IO).ok_or("out of memory")?;
    let base_back = arena.take(ROUND as u64 * IO).ok_or("out of memory")?;
    let span = blk.capacity * SECTOR / IO;
    if span < ROUND as u64 {
        return Err("the disk is smaller than 32 KiB");
    }
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (mut done, mut errors, mut corrupt, mut plugs, mut unplugs, mut plugged_io) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut plug_ticks, mut unplug_ticks) = (0u64, 0u64);
    println!("mem: ready");
    let start = platform::rdtsc();
    loop {
        if (cycles > 0 && unplugs >= cycles) || (ios > 0 && done >= ios) {
            break;
        }
        if platform::rdtsc() - start > PATIENCE * 8 {
            return Err("churn took too long");
        }
        let asked = platform::rdtsc();
        match mem.follow()? {
            Some(Change::Plugged { addr, bytes }) => {
                plugs += 1;
                plug_ticks += platform::rdtsc() - asked;
                // Fresh memory must hold what we write, at both ends.
                for at in [addr, addr + bytes - IO] {
                    fill_pattern(mem.start, at, IO);
                    if check_pattern(mem.start, at, IO).is_some() {
                        corrupt += 1;
                    }
                }
            }
            Some(Change::Unplugged { .. }) => {
                unplugs += 1;
                unplug_ticks += platform::rdtsc() - asked;
            }
            None => {}
        }
        // Half the buffers in plugged memory when there is enough of it.
        let in_plugged = mem.plugged >= 2 * ROUND as u64 * IO;
        let buffer = |slot: u16, back: bool| -> u64 {
            let local = if back { base_back } else { base_out } + slot as u64 * IO;
            match (in_plugged && slot % 2 == 1, back) {
                (true, false) => mem.start + slot as u64 * IO,
                (true, true) => mem.start + (ROUND + slot) as u64 * IO,
                _ => local,
            }
        };
        let mut sectors = [0u64; ROUND as usize];
        for slot in 0..ROUND {
            let seed = rng.next();
            let out = buffer(slot, false);
            let mut at = 0;
            while at < IO {
                // SAFETY: our buffer (local arena or plugged memory we own).
                unsafe { core::ptr::write_volatile((out + at) as *mut u64, seed ^ at) };
                at += 8;
            }
            // A distinct 4 KiB block per slot, so each read sees its own write.
            sectors[slot as usize] = ((rng.next() % (span / ROUND as u64)) * ROUND as u64 + slot as u64) * IO / SECTOR;
            blk.submit(slot, T_OUT, sectors[slot as usize], out, IO as u32);
        }
        blk.kick();
        errors += complete_round(&mut blk)?;
        for slot in 0..ROUND {
            blk.submit(slot, T_IN, sectors[slot as usize], buffer(slot, true), IO as u32);
        }
        blk.kick();
        errors += complete_round(&mut blk)?;
        for slot in 0..ROUND {
            let (out, back) = (buffer(slot, false), buffer(slot, true));
            // SAFETY: both buffers are ours.
            let same = unsafe {
                core::slice::from_raw_parts(out as *const u8, IO as usize)
                    == core::slice::from_raw_parts(back as *const u8, IO as usize)
            };
            if !same {
                corrupt += 1;
            }
            if in_plugged && slot % 2 == 1 {
                plugged_io += 2;
            }
        }
        done += 2 * ROUND as u64;
    }
    let ticks = platform::rdtsc() - start;
    println!(
        "churn: ios={} errors={} corrupt={} plugs={} unplugs={} plugged-ios={} tsc={} plug-tsc={} unplug-tsc={}",
        done, errors, corrupt, plugs, unplugs, plugged_io, ticks, plug_ticks, unplug_ticks
    );
    Ok(())
}
