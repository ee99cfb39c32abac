//! Scenarios that drive virtio-blk devices.
//!
//! * `blk-pattern`: on every disk, write a pattern, flush, read it back and
//!   compare, and read the device id. Exit status: bit i set if disk i failed.
//! * `blk-readonly`: a write must fail with VIRTIO_BLK_S_IOERR, a read succeed.
//! * `blk-zeroes`: write a pattern over 32 sectors, WRITE_ZEROES sectors
//!   8..16, DISCARD sectors 24..28, read back and report.
//! * `blk-hostile`: post malformed requests; each must get an error status,
//!   and a looping chain must leave the device failed (DEVICE_NEEDS_RESET).
//! * `blk-recover`: break the queue seven ways; after each, reset the device
//!   and check it works again.
//! * `driver-flood`: `rounds=N`: N times each, ask the first disk for
//!   features it does not offer, and activate it with rings outside RAM.
//! * `blk-bench`: `rw=read|write|randread|randwrite|mixed bs=BYTES qd=N ops=N`.
//! * `blk-verify`: `ops=N qd=N [hold=1] [recover=1] [stop=1]`: verified
//!   random 4 KiB writes and read-backs over the first 1 MiB, a flush, then a
//!   hash of what the disk must hold; `hold=1` spins afterwards instead of
//!   exiting; `recover=1` resets a device that needs it and posts its
//!   requests again; `layouts=1` lays each request's buffers out one of five
//!   ways (split header, data in 8 pieces, data off the block grid, status
//!   in the data buffer); `stop=1` ends early once the host writes `STOP` at the
//!   disk's 1 MiB mark (so a host sets how long the work runs, at any speed).
use crate::blk::{Arena, Blk, LAYOUTS, SECTOR, SLOTS, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES};
use crate::virtio::{self, DESC_F_NEXT, DESC_F_WRITE, STATUS_NEEDS_RESET};
use crate::{console, platform, println, pvh};

/// Guest RAM for queues and buffers starts here, above the guest image.
const ARENA_START: u64 = 8 << 20;
const PATTERN_SECTORS: u64 = 2048; // 1 MiB
const CHUNK: u64 = 64 * 1024;

pub fn arena(info: &pvh::StartInfo) -> Option<Arena> {
    info.memmap()
        .find(|e| e.kind == pvh::E820_RAM && e.addr <= ARENA_START && e.addr + e.size > ARENA_START + (16 << 20))
        .map(|e| Arena::new(ARENA_START, (e.addr + e.size).min(0xc000_0000)))
}

fn pattern_byte(disk: usize, offset: u64, seed: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 9) ^ seed ^ (disk as u64 * 0x5a)) as u8
}

fn fill(addr: u64, len: u64, f: impl Fn(u64) -> u8) {
    // SAFETY: arena memory we own.
    let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len as usize) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = f(i as u64);
    }
}

fn pattern(blk: &mut Blk, disk: usize, arena: &mut Arena, seed: u64) -> Result<(), &'static str> {
    let sectors = PATTERN_SECTORS.min(blk.capacity);
    let bytes = sectors * SECTOR;
    let out = arena.take(bytes).ok_or("out of memory")?;
    let back = arena.take(bytes).ok_or("out of memory")?;
    fill(out, bytes, |i| pattern_byte(disk, i, seed));
    fill(back, bytes, |_| 0);
    let mut offset = 0;
    while offset < bytes {
        let len = CHUNK.min(bytes - offset);
        if blk.request(T_OUT, offset / SECTOR, out + offset, len as u32)? != 0 {
            return Err("write failed");
        }
        offset += len;
    }
    println!("blk{}: wrote {} sectors", disk, sectors);
    if blk.request(T_FLUSH, 0, 0, 0)? != 0 {
        return Err("flush failed");
    }
    println!("blk{}: flushed", disk);
    // One request for the whole read-back: larger than a device's answer may
    // carry inline, so request-level devices write it back by grant.
    if blk.request(T_IN, 0, back, bytes as u32)? != 0 {
        return Err("read failed");
    }
    // SAFETY: both buffers are ours and `bytes` long.
    let (a, b) = unsafe {
        (
            core::slice::from_raw_parts(out as *const u8, bytes as usize),
            core::slice::from_raw_parts(back as *const u8, bytes as usize),
        )
    };
    if let Some(at) = a.iter().zip(b).position(|(x, y)| x != y) {
        println!("blk{}: mismatch at byte {}", disk, at);
        return Err("read back differs");
    }
    println!("blk{}: read back {} sectors, all match", disk, sectors);
    let id = arena.take(20).ok_or("out of memory")?;
    if blk.request(T_GET_ID, 0, id, 20)? == 0 {
        // SAFETY: 20 bytes we own.
        let raw = unsafe { core::slice::from_raw_parts(id as *const u8, 20) };
        let len = raw.iter().position(|&c| c == 0).unwrap_or(20);
        println!("blk{}: id {}", disk, core::str::from_utf8(&raw[..len]).unwrap_or("?"));
    }
    Ok(())
}

/// Guest RAM that no request ever names (the first 64 KiB of the arena): a
/// device that could reach more than the buffers posted to it could change it.
const CANARY_BYTES: u64 = 64 * 1024;

fn canary_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9d) ^ 0xc3) as u8
}

pub fn run_pattern(info: &pvh::StartInfo, seed: u64) -> u8 {
    let Some(mut arena) = arena(info) else {
        println!("blk: not enough RAM for buffers");
        return 0xff;
    };
    let canary = arena.take(CANARY_BYTES).unwrap_or(0);
    fill(canary, CANARY_BYTES, canary_byte);
    let mut failed = 0u8;
    let mut count = 0;
    let disks = virtio::devices(info.cmdline()).filter(|d| d.is_virtio() && d.device_id() == crate::blk::DEVICE_ID);
    for (disk, device) in disks.enumerate() {
        count += 1;
        report_transport(disk, &device);
        let result = Blk::init(device, &mut arena).and_then(|mut blk| pattern(&mut blk, disk, &mut arena, seed));
        match result {
            Ok(()) => println!("blk{}: ok", disk),
            Err(why) => {
                println!("blk{}: failed: {}", disk, why);
                failed |= 1 << disk.min(7);
            }
        }
    }
    println!("blk: {} disks tested", count);
    // SAFETY: the canary is ours and CANARY_BYTES long.
    let kept = unsafe { core::slice::from_raw_parts(canary as *const u8, CANARY_BYTES as usize) };
    match kept.iter().enumerate().position(|(i, &b)| b != canary_byte(i as u64)) {
        None => println!("canary at {:#x}: intact", canary),
        Some(at) => println!("canary at {:#x}: changed at byte {}", canary, at),
    }
    failed
}

/// Which transport disk `index` came over, and where its registers are.
fn report_transport(index: usize, device: &virtio::Device) {
    let (transport, registers) = device.transport();
    println!("blk{} transport: {} registers at {:#x}", index, transport, registers);
}

pub fn first_disk(info: &pvh::StartInfo) -> Result<(Blk, Arena), &'static str> {
    let mut arena = arena(info).ok_or("not enough RAM")?;
    let index = crate::scenario::param(info.cmdline(), "disk").and_then(|n| n.parse().ok()).unwrap_or(0);
    let device = virtio::devices(info.cmdline())
        .filter(|d| d.is_virtio() && d.device_id() == crate::blk::DEVICE_ID)
        .nth(index)
        .ok_or("no such virtio-blk device")?;
    report_transport(index, &device);
    Ok((Blk::init(device, &mut arena)?, arena))
}

pub fn run_readonly(info: &pvh::StartInfo) -> Result<(), &'static str> {
    let (mut blk, mut arena) = first_disk(info)?;
    let buf = arena.take(4096).ok_or("out of memory")?;
    println!("blk0: write status {}", blk.request(T_OUT, 0, buf, 4096)?);
    println!("blk0: read status {}", blk.request(T_IN, 0, buf, 4096)?);
    Ok(())
}

/// A malformed request: name, descriptors (address 0 = our header, 1 = our
/// status byte), request type and the status the device must answer with.
type HostileCase<'a> = (&'a str, &'a [(u64, u32, u16)], u32, u8);

/// Posts one hand-made request and reports its status (0xff: untouched).
fn hostile_one(blk: &mut Blk, name: &str, descs: &[(u64, u32, u16)], kind: u32) -> Option<u8> {
    let (header, status) = (blk.header_addr(0), blk.status_addr(0));
    // SAFETY: our header and status slot.
    unsafe {
        core::ptr::write_volatile(header as *mut u32, kind);
        core::ptr::write_volatile((header + 8) as *mut u64, 0);
        core::ptr::write_volatile(status as *mut u8, 0xff);
    }
    let queue = blk.queue();
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let addr = match addr {
            0 => header,
            1 => status,
            a => a,
        };
        queue.set_desc(i as u16, addr, len, flags, i as u16 + 1);
    }
    queue.push(0);
    blk.kick();
    let done = blk.wait();
    // SAFETY: as above.
    let status = unsafe { core::ptr::read_volatile(status as *const u8) };
    println!("hostile {}: completed {} status {}", name, done.is_some(), status);
    done.map(|_| status)
}

pub fn run_hostile(info: &pvh::StartInfo) -> Result<(), &'static str> {
    let (mut blk, mut arena) = first_disk(info)?;
    let buf = arena.take(4096).ok_or("out of memory")?;
    let (n, w) = (DESC_F_NEXT, DESC_F_WRITE);
    // Requests the device must answer with an error status.
    let cases: [HostileCase; 5] = [
        ("bad request type", &[(0, 16, n), (buf, 512, n | w), (1, 1, w)], 99, 2),
        // 32 MiB of real RAM to write: refused before the device reads any of it.
        ("huge write", &[(0, 16, n), (0x10_0000, 32 << 20, n), (1, 1, w)], T_OUT, 1),
        ("data outside RAM", &[(0, 16, n), (0xd800_0000, 512, n | w), (1, 1, w)], T_IN, 1),
        ("huge length", &[(0, 16, n), (buf, 0xffff_fe00, n | w), (1, 1, w)], T_IN, 1),
        ("zero-length header", &[(0, 0, n), (buf, 512, n | w), (1, 1, w)], T_IN, 1),
    ];
    for (name, descs, kind, expected) in cases {
        match hostile_one(&mut blk, name, descs, kind) {
            Some(status) if status == expected => {}
            _ => return Err("a malformed request did not get the expected error status"),
        }
    }
    // A request whose own status byte is not RAM fails alone: it completes
    // (nothing written) and the next ordinary request is served.
    let header = blk.header_addr(0);
    // SAFETY: our header slot.
    unsafe { core::ptr::write_volatile(header as *mut u32, T_IN) };
    let queue = blk.queue();
    queue.set_desc(0, header, 16, n, 1);
    queue.set_desc(1, buf, 512, n | w, 2);
    queue.set_desc(2, 0xd800_0000, 1, w, 0);
    queue.push(0);
    blk.kick();
    let done = blk.wait();
    println!("hostile status outside RAM: completed {}", done.is_some());
    match blk.request(T_IN, 0, buf, 512) {
        Ok(status) => println!("hostile status outside RAM: next read status {}", status),
        Err(_) => return Err("a bad status byte took the disk down"),
    }
    let sector_past_end = blk.capacity;
    blk.submit(0, T_IN, sector_past_end, buf, 512);
    blk.kick();
    match blk.wait() {
        Some((_, 1, _)) => println!("hostile read past the end: status 1"),
        _ => return Err("a read past the end was not refused"),
    }
    // A chain that loops onto itself: the device must give up on the queue.
    let queue = blk.queue();
    queue.set_desc(0, buf, 16, n, 0);
    queue.push(0);
    blk.kick();
    let done = blk.wait();
    let needs_reset = blk.device.status() & STATUS_NEEDS_RESET != 0;
    println!("hostile looping chain: completed {} needs-reset {}", done.is_some(), needs_reset);
    if !needs_reset {
        return Err("a looping chain did not fail the device");
    }
    Ok(())
}

/// A xorshift generator for sectors and data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub struct BenchParams<'a> {
    pub rw: &'a str,
    pub block_size: u64,
    pub depth: u16,
    pub ops: u64,
    /// Where the random blocks start: runs with the same seed read the same
    /// blocks, which a host's caches then hold (the study gives each run its
    /// own, as fio's `randrepeat=0` does).
    pub seed: u64,
}

/// The seed a run without `seed=` uses.
pub const DEFAULT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

pub fn run_bench(info: &pvh::StartInfo, p: &BenchParams) -> Result<(), &'static str> {
    let (mut blk, mut arena) = first_disk(info)?;
    let depth = p.depth.clamp(1, SLOTS);
    let bs = p.block_size.clamp(SECTOR, 1 << 20) / SECTOR * SECTOR;
    let span = blk.capacity * SECTOR / bs;
    if span == 0 {
        return Err("disk smaller than one block");
    }
    let buffers = arena.take(bs * depth as u64).ok_or("out of memory")?;
    // xorshift never leaves zero.
    let mut rng = Rng(if p.seed == 0 { DEFAULT_SEED } else { p.seed });
    let mut next_seq = 0u64;
    let mut pick = |rng: &mut Rng| -> (u32, u64) {
        let random = matches!(p.rw, "randread" | "randwrite" | "mixed");
        let block = if random {
            rng.next() % span
        } else {
            let b = next_seq % span;
            next_seq += 1;
            b
        };
        let kind = match p.rw {
            "write" | "randwrite" => T_OUT,
            "mixed" if rng.next() % 10 >= 7 => T_OUT,
            _ => T_IN,
        };
        (kind, block * bs / SECTOR)
    };
    let wait = if blk.sleeps() { "halt" } else { "poll" };
    println!("blk-bench: start rw={} bs={} qd={} ops={} wait={} seed={}", p.rw, bs, depth, p.ops, wait, rng.0);
    // Per-request latency, in log2 buckets of TSC ticks.
    let mut histogram = [0u64; 48];
    let mut submitted_at = [0u64; SLOTS as usize];
    let mut latency_sum = 0u64;
    let start = platform::rdtsc();
    let (mut submitted, mut completed, mut errors) = (0u64, 0u64, 0u64);
    for slot in 0..depth.min(p.ops as u16) {
        let (kind, sector) = pick(&mut rng);
        submitted_at[slot as usize] = platform::rdtsc();
        blk.submit(slot, kind, sector, buffers + slot as u64 * bs, bs as u32);
        submitted += 1;
    }
    blk.kick();
    while completed < submitted {
        let Some((slot, status, _)) = blk.wait() else { return Err("no completion (timeout or device needs reset)") };
        let latency = platform::rdtsc() - submitted_at[slot as usize];
        histogram[(63 - latency.max(1).leading_zeros() as usize).min(47)] += 1;
        latency_sum += latency;
        completed += 1;
        errors += (status != 0) as u64;
        if submitted < p.ops {
            let (kind, sector) = pick(&mut rng);
            submitted_at[slot as usize] = platform::rdtsc();
            blk.submit(slot, kind, sector, buffers + slot as u64 * bs, bs as u32);
            submitted += 1;
            blk.kick();
        }
    }
    let ticks = platform::rdtsc() - start;
    println!(
        "blk-bench: done ops={} bytes={} errors={} tsc={} latency-tsc-sum={}",
        completed,
        completed * bs,
        errors,
        ticks,
        latency_sum
    );
    // How many submissions the device wanted to hear of (it says not while it polls).
    println!("blk-bench: notifications sent={} skipped={}", blk.notified, blk.unwanted);
    console::write_str("blk-bench: latency-log2-tsc");
    for (bucket, count) in histogram.iter().enumerate().filter(|(_, c)| **c > 0) {
        use core::fmt::Write as _;
        let _ = write!(console::Console, " {}:{}", bucket, count);
    }
    console::write_str("\n");
    Ok(())
}

/// One range request (DISCARD or WRITE_ZEROES) for `count` sectors at `sector`.
fn zero_request(blk: &mut Blk, arena: &mut Arena, kind: u32, sector: u64, count: u32) -> Result<u8, &'static str> {
    let range = arena.take(16).ok_or("out of memory")?;
    // SAFETY: 16 bytes we own.
    unsafe {
        core::ptr::write_volatile(range as *mut u64, sector);
        core::ptr::write_volatile((range + 8) as *mut u32, count);
        core::ptr::write_volatile((range + 12) as *mut u32, 0);
    }
    blk.request(kind, 0, range, 16)
}

pub fn run_zeroes(info: &pvh::StartInfo) -> Result<(), &'static str> {
    let (mut blk, mut arena) = first_disk(info)?;
    let bytes = 32 * SECTOR;
    let buf = arena.take(bytes).ok_or("out of memory")?;
    fill(buf, bytes, |i| pattern_byte(0, i, 7));
    if blk.request(T_OUT, 0, buf, bytes as u32)? != 0 {
        return Err("write failed");
    }
    println!("blk0: write-zeroes status {}", zero_request(&mut blk, &mut arena, T_WRITE_ZEROES, 8, 8)?);
    println!("blk0: discard status {}", zero_request(&mut blk, &mut arena, T_DISCARD, 24, 4)?);
    let end = blk.capacity;
    println!("blk0: write-zeroes past the end status {}", zero_request(&mut blk, &mut arena, T_WRITE_ZEROES, end, 1)?);
    fill(buf, bytes, |_| 0xee);
    if blk.request(T_IN, 0, buf, bytes as u32)? != 0 {
        return Err("read failed");
    }
    // SAFETY: our buffer.
    let data = unsafe { core::slice::from_raw_parts(buf as *const u8, bytes as usize) };
    let zeroed = data[8 * 512..16 * 512].iter().all(|&b| b == 0);
    let kept = (0..bytes as usize)
        .filter(|i| !(8 * 512..16 * 512).contains(i) && !(24 * 512..28 * 512).contains(i))
        .all(|i| data[i] == pattern_byte(0, i as u64, 7));
    println!("blk0: zeroed range reads zero {}, the rest kept {}", zeroed, kept);
    Ok(())
}

/// Blocks of 4 KiB that `blk-verify` works on (the first 1 MiB of the disk).
const VERIFY_BLOCKS: u64 = 256;
const VERIFY_BLOCK: u64 = 4096;
/// `stop=1`: the block right after them holds the host's stop mark, read
/// once every [`STOP_EVERY`] requests.
const STOP_BLOCK: u64 = VERIFY_BLOCKS;
const STOP_EVERY: u64 = 256;

/// The byte at `i` of block `block` as written for the `generation`th time
/// (generation 0: never written, zero).
fn verify_byte(block: u64, generation: u32, i: u64) -> u8 {
    if generation == 0 {
        return 0;
    }
    (block.wrapping_mul(0x9e37_79b1) ^ (generation as u64).wrapping_mul(0x85eb_ca6b) ^ i.wrapping_mul(31)) as u8
}

/// `blk-verify ops=N qd=D`: random 4 KiB writes and read-backs at queue
/// depth D over the first 1 MiB, never two in flight on one block; every
/// read is checked against the guest's own record of what each block holds,
/// every status must be OK. Then a flush, and an FNV-1a hash of the record
/// (the whole 1 MiB as it must be on the disk) for the host to compare.
pub fn run_verify(info: &pvh::StartInfo, ops: u64, depth: u16, recover: bool, stop: bool) -> Result<(), &'static str> {
    let (mut blk, mut arena) = first_disk(info)?;
    if blk.capacity * SECTOR < (VERIFY_BLOCKS + stop as u64) * VERIFY_BLOCK {
        return Err("disk smaller than 1 MiB (and a block for the stop mark)");
    }
    // `layouts=1`: each request lays its buffers out one of the ways a
    // driver may (see Blk::submit_layout), through indirect descriptors.
    let layouts = crate::scenario::param(info.cmdline(), "layouts") == Some("1");
    if layouts {
        blk = Blk::init_with_layouts(blk.device, &mut arena)?;
    }
    // Room past each block for the layouts that move the data or add the status.
    let stride = 2 * VERIFY_BLOCK;
    let mut ops = ops;
    let depth = depth.clamp(1, SLOTS.min(8));
    let buffers = arena.take(stride * depth as u64).ok_or("out of memory")?;
    let data_at = |slot: u64, layout: u32| buffers + slot * stride + if layout == 3 { 8 } else { 0 };
    let mut generation = [0u32; VERIFY_BLOCKS as usize];
    // Per slot: (block, kind | layout << 16, generation it writes or must read).
    let mut in_flight = [(u64::MAX, 0u32, 0u32); 8];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut submitted, mut completed, mut errors, mut corrupt) = (0u64, 0u64, 0u64, 0u64);
    let busy = |in_flight: &[(u64, u32, u32); 8], block: u64| in_flight.iter().any(|f| f.0 == block);
    let mut start = |blk: &mut Blk, slot: u16, in_flight: &mut [(u64, u32, u32); 8], generation: &mut [u32], probe| {
        let base = data_at(slot as u64, 0);
        if probe && !busy(in_flight, STOP_BLOCK) {
            // Not a verified block: the host's stop mark, read like the rest.
            in_flight[slot as usize] = (STOP_BLOCK, T_IN, 0);
            blk.submit(slot, T_IN, STOP_BLOCK * VERIFY_BLOCK / SECTOR, base, VERIFY_BLOCK as u32);
            return;
        }
        let layout = if layouts { (rng.next() % LAYOUTS as u64) as u32 } else { 0 };
        let buffer = data_at(slot as u64, layout);
        let mut block = rng.next() % VERIFY_BLOCKS;
        while busy(in_flight, block) {
            block = (block + 1) % VERIFY_BLOCKS;
        }
        let (kind, expect) = if rng.next().is_multiple_of(2) {
            let next = generation[block as usize] + 1;
            generation[block as usize] = next;
            fill(buffer, VERIFY_BLOCK, |i| verify_byte(block, next, i));
            (T_OUT, next)
        } else {
            fill(buffer, VERIFY_BLOCK, |_| 0xee);
            (T_IN, generation[block as usize])
        };
        in_flight[slot as usize] = (block, kind | layout << 16, expect);
        blk.submit_layout(slot, kind, block * VERIFY_BLOCK / SECTOR, base, VERIFY_BLOCK as u32, layout);
    };
    println!("blk-verify: start ops={} qd={}", ops, depth);
    for slot in 0..depth.min(ops as u16) {
        start(&mut blk, slot, &mut in_flight, &mut generation, false);
        submitted += 1;
    }
    blk.kick();
    let mut resets = 0u32;
    while completed < submitted {
        let Some((slot, status, _)) = blk.wait() else {
            if !recover || resets == 100 {
                return Err("no completion (timeout or device needs reset)");
            }
            // What a driver does with DEVICE_NEEDS_RESET: reset the device,
            // set it up again and post what it had not completed once more.
            resets += 1;
            blk = if layouts {
                Blk::init_with_layouts(blk.device, &mut arena)?
            } else {
                Blk::init(blk.device, &mut arena)?
            };
            for (slot, &(block, kind, _)) in in_flight.iter().enumerate().filter(|(_, f)| f.0 != u64::MAX) {
                let (base, sector) = (data_at(slot as u64, 0), block * VERIFY_BLOCK / SECTOR);
                blk.submit_layout(slot as u16, kind & 0xffff, sector, base, VERIFY_BLOCK as u32, kind >> 16);
            }
            blk.kick();
            continue;
        };
        let (block, kind, expect) = in_flight[slot as usize];
        if block == u64::MAX {
            // A completion for a request not in flight: completed twice.
            errors += 1;
            continue;
        }
        completed += 1;
        in_flight[slot as usize].0 = u64::MAX;
        if status != 0 {
            errors += 1;
        } else if block == STOP_BLOCK {
            // SAFETY: the slot's buffer, VERIFY_BLOCK bytes we own.
            let got = unsafe { core::slice::from_raw_parts(data_at(slot as u64, 0) as *const u8, 4) };
            if got == b"STOP" {
                ops = submitted;
            }
        } else if kind & 0xffff == T_IN {
            // SAFETY: the slot's buffer, VERIFY_BLOCK bytes we own.
            let got = unsafe {
                core::slice::from_raw_parts(data_at(slot as u64, kind >> 16) as *const u8, VERIFY_BLOCK as usize)
            };
            if got.iter().enumerate().any(|(i, &b)| b != verify_byte(block, expect, i as u64)) {
                corrupt += 1;
            }
        }
        if submitted < ops {
            let probe = stop && submitted.is_multiple_of(STOP_EVERY);
            start(&mut blk, slot, &mut in_flight, &mut generation, probe);
            submitted += 1;
            blk.kick();
        }
    }
    if blk.request(T_FLUSH, 0, 0, 0)? != 0 {
        errors += 1;
    }
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for block in 0..VERIFY_BLOCKS {
        for i in 0..VERIFY_BLOCK {
            hash = (hash ^ verify_byte(block, generation[block as usize], i) as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    println!(
        "blk-verify: done ops={} errors={} corrupt={} resets={} hash={:#x}",
        completed, errors, corrupt, resets, hash
    );
    if errors + corrupt > 0 {
        return Err("some requests failed or read back wrong");
    }
    Ok(())
}

/// Ways a driver can break its ring (or its queue set-up); `blk-recover`
/// breaks each in turn.
const BREAKAGES: [&str; 7] = [
    "looping chain",
    "self-referencing indirect table",
    "bad indirect length",
    "over-long chain",
    "avail index jumping ahead",
    "rings outside RAM",
    "garbage notifications",
];

/// `blk-recover`: for each kind of breakage, break the disk's queue, see
/// what the device says, then reset it (a fresh `Blk::init` starts with a
/// reset) and check it works again: a sector written and read back.
pub fn run_recover(info: &pvh::StartInfo) -> Result<(), &'static str> {
    let (mut blk, mut arena) = first_disk(info)?;
    let device = blk.device;
    let table = arena.take(4096).ok_or("out of memory")?;
    let data = arena.take(2 * 4096).ok_or("out of memory")?;
    let (n, indirect) = (DESC_F_NEXT, 4u16);
    let mut failures = 0;
    for (round, breakage) in BREAKAGES.iter().enumerate() {
        let queue = blk.queue();
        match *breakage {
            "looping chain" => queue.set_desc(0, data, 16, n, 0),
            "self-referencing indirect table" => {
                queue.set_desc(0, table, 16, indirect, 0);
                // SAFETY: our table page; entry 0 points back at the table, indirect again.
                unsafe {
                    core::ptr::write_volatile(table as *mut u64, table);
                    core::ptr::write_volatile((table + 8) as *mut u32, 16);
                    core::ptr::write_volatile((table + 12) as *mut u16, indirect);
                }
            }
            "bad indirect length" => queue.set_desc(0, table, 17, indirect, 0),
            "over-long chain" => {
                for i in 0..crate::blk::QUEUE_SIZE {
                    queue.set_desc(i, data, 16, n, (i + 1) % crate::blk::QUEUE_SIZE);
                }
            }
            "avail index jumping ahead" => {
                let avail = queue.avail;
                // SAFETY: the avail ring's index, in RAM we own.
                unsafe {
                    let idx = core::ptr::read_volatile((avail + 2) as *const u16);
                    core::ptr::write_volatile((avail + 2) as *mut u16, idx.wrapping_add(crate::blk::QUEUE_SIZE + 5));
                }
            }
            "rings outside RAM" => {
                activate_outside_ram(device)?;
            }
            _ => {
                for value in [7u32, 0xffff_ffff, 0x5a5a_5a5a] {
                    device.notify(value);
                }
            }
        }
        let pushes = !matches!(*breakage, "avail index jumping ahead" | "rings outside RAM" | "garbage notifications");
        if pushes {
            blk.queue().push(0);
        }
        if *breakage == "avail index jumping ahead" {
            // Our own avail index did not move: notify whatever the device asked.
            device.notify(0);
            let _ = blk.wait();
        } else if *breakage != "garbage notifications" {
            blk.kick();
            let _ = blk.wait();
        }
        let needs_reset = device.status() & STATUS_NEEDS_RESET != 0;
        // The reset, and the device again from scratch.
        blk = Blk::init(device, &mut arena)?;
        let sector = round as u64 * 8;
        fill(data, 4096, |i| pattern_byte(round, i, 0x77));
        fill(data + 4096, 4096, |_| 0);
        let wrote = blk.request(T_OUT, sector, data, 4096)?;
        let read = blk.request(T_IN, sector, data + 4096, 4096)?;
        // SAFETY: both halves of our data pages.
        let same = unsafe {
            core::slice::from_raw_parts(data as *const u8, 4096)
                == core::slice::from_raw_parts((data + 4096) as *const u8, 4096)
        };
        let works = wrote == 0 && read == 0 && same;
        println!("recover {}: needs-reset {} works-again {}", breakage, needs_reset, works);
        failures += (!works) as u32;
    }
    if failures > 0 {
        return Err("a device did not come back after its reset");
    }
    Ok(())
}

/// Sets the device up with its rings in the MMIO hole (not RAM) and says DRIVER_OK.
fn activate_outside_ram(mut device: crate::virtio::Device) -> Result<(), &'static str> {
    device.negotiate(crate::virtio::F_VERSION_1)?;
    device.activate_queue(0, 16, [0xd800_0000; 3])?;
    device.driver_ok();
    Ok(())
}

/// `driver-flood`: what a hostile driver can make the VMM log at will.
pub fn run_driver_flood(info: &pvh::StartInfo, rounds: u32) -> Result<(), &'static str> {
    let (blk, _) = first_disk(info)?;
    let device = blk.device;
    for _ in 0..rounds {
        device.set_status(0);
        device.set_status(1 | 2);
        device.set_driver_features(0xffff_ffff << 32);
        device.set_status(1 | 2 | 8);
    }
    for _ in 0..rounds {
        activate_outside_ram(device)?;
    }
    println!("driver-flood: {} rounds done", rounds);
    Ok(())
}
