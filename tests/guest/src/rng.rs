//! `scenario=rng`: read entropy from the virtio-rng device twice and report
//! how varied it is (two reads that match, or all-zero bytes, fail).
use crate::blk::Arena;
use crate::virtio::{self, Queue, DESC_F_WRITE, F_VERSION_1};
use crate::{blk_scenarios, println, pvh};

const DEVICE_ID: u32 = 4;
/// QEMU's virtio-rng offers 8 entries; two are used.
const QUEUE_SIZE: u16 = 8;
const READ_BYTES: u32 = 4096;

pub fn run(info: &pvh::StartInfo) -> Result<(), &'static str> {
    let mut arena: Arena = blk_scenarios::arena(info).ok_or("not enough RAM")?;
    let mut device = virtio::devices(info.cmdline())
        .find(|d| d.is_virtio() && d.device_id() == DEVICE_ID)
        .ok_or("no virtio-rng device")?;
    device.negotiate(F_VERSION_1)?;
    let mut queue = Queue::new(arena.take(Queue::footprint(QUEUE_SIZE)).ok_or("out of memory")?, QUEUE_SIZE);
    device.setup_queue(0, &queue)?;
    device.driver_ok();
    let buffers =
        [arena.take(READ_BYTES as u64).ok_or("out of memory")?, arena.take(READ_BYTES as u64).ok_or("out of memory")?];
    for (i, &buf) in buffers.iter().enumerate() {
        queue.set_desc(i as u16, buf, READ_BYTES, DESC_F_WRITE, 0);
        queue.push(i as u16);
        device.notify(0);
        let (_, len) = queue.wait_used(&device).ok_or("no completion")?;
        // SAFETY: a buffer we own, `len` <= READ_BYTES bytes filled by the device.
        let bytes = unsafe { core::slice::from_raw_parts(buf as *const u8, len.min(READ_BYTES) as usize) };
        let mut seen = [false; 256];
        bytes.iter().for_each(|&b| seen[b as usize] = true);
        println!("rng: read {} bytes, {} distinct values", len, seen.iter().filter(|&&s| s).count());
    }
    // SAFETY: both buffers are ours.
    let (a, b) = unsafe {
        (
            core::slice::from_raw_parts(buffers[0] as *const u8, 64),
            core::slice::from_raw_parts(buffers[1] as *const u8, 64),
        )
    };
    if a == b || a.iter().all(|&x| x == 0) {
        return Err("entropy repeats or is zero");
    }
    println!("rng: two reads differ");
    Ok(())
}
