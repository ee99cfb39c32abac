//! A polling virtio-mmio (version 2) driver with split queues, in ring 3.
use crate::platform::{mmio_read32, mmio_write32, rdtsc};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Polls give up after this many TSC ticks (a few seconds on any host).
const TIMEOUT_TICKS: u64 = 1 << 34;

/// One virtio-mmio device found on the command line.
#[derive(Clone, Copy)]
pub struct Device {
    pub base: u64,
}

/// `virtio_mmio.device=<size>@<base>:<irq>` entries of the command line.
pub fn devices(cmdline: &str) -> impl Iterator<Item = Device> + '_ {
    cmdline.split_ascii_whitespace().filter_map(|word| {
        let spec = word.strip_prefix("virtio_mmio.device=")?;
        let (_, rest) = spec.split_once('@')?;
        let base = rest.split(':').next()?.strip_prefix("0x")?;
        Some(Device { base: u64::from_str_radix(base, 16).ok()? })
    })
}

impl Device {
    pub fn read(&self, offset: u64) -> u32 {
        mmio_read32(self.base + offset)
    }

    pub fn write(&self, offset: u64, value: u32) {
        mmio_write32(self.base + offset, value)
    }

    pub fn is_virtio(&self) -> bool {
        self.read(0x000) == MAGIC && self.read(0x004) == 2
    }

    pub fn device_id(&self) -> u32 {
        self.read(0x008)
    }

    pub fn status(&self) -> u32 {
        self.read(0x070)
    }

    pub fn features(&self) -> u64 {
        self.write(0x014, 0);
        let low = self.read(0x010) as u64;
        self.write(0x014, 1);
        low | (self.read(0x010) as u64) << 32
    }

    /// Resets and negotiates `wanted & offered`; Err when the device refuses.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, &'static str> {
        self.write(0x070, 0);
        self.write(0x070, STATUS_ACKNOWLEDGE);
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let features = self.features() & wanted;
        self.write(0x024, 0);
        self.write(0x020, features as u32);
        self.write(0x024, 1);
        self.write(0x020, (features >> 32) as u32);
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err("device refused our features");
        }
        Ok(features)
    }

    pub fn setup_queue(&self, index: u32, queue: &Queue) -> Result<(), &'static str> {
        self.write(0x030, index);
        if (self.read(0x034) as u16) < queue.size {
            return Err("queue too small");
        }
        self.write(0x038, queue.size as u32);
        for (offset, addr) in [(0x080, queue.desc), (0x090, queue.avail), (0x0a0, queue.used)] {
            self.write(offset, addr as u32);
            self.write(offset + 4, (addr >> 32) as u32);
        }
        self.write(0x044, 1);
        Ok(())
    }

    pub fn driver_ok(&self) {
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    pub fn notify(&self, queue: u32) {
        fence(Ordering::SeqCst);
        self.write(0x050, queue);
    }
}

/// Writes descriptor `index` of the table at `table` (a queue's, or an
/// indirect one), in RAM the driver owns.
pub fn write_desc(table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = (table + 16 * index as u64) as *mut u8;
    // SAFETY: the caller's table, with room for entry `index`.
    unsafe {
        write_volatile(d as *mut u64, addr);
        write_volatile(d.add(8) as *mut u32, len);
        write_volatile(d.add(12) as *mut u16, flags);
        write_volatile(d.add(14) as *mut u16, next);
    }
}

/// A split virtqueue in guest memory that the driver owns.
pub struct Queue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Queue {
    /// Lays a queue of `size` entries out at `base` (page-aligned, zeroed here).
    pub fn new(base: u64, size: u16) -> Queue {
        let desc = base;
        let avail = desc + 16 * size as u64;
        let used = (avail + 6 + 2 * size as u64 + 4095) & !4095;
        let end = used + 6 + 8 * size as u64;
        // SAFETY: the caller hands us [base, end) of RAM for the queue alone.
        unsafe { core::ptr::write_bytes(base as *mut u8, 0, (end - base) as usize) };
        Queue { size, desc, avail, used, avail_idx: 0, used_seen: 0 }
    }

    /// Bytes the queue occupies from its base.
    pub fn footprint(size: u16) -> u64 {
        let avail_end = 16 * size as u64 + 6 + 2 * size as u64;
        ((avail_end + 4095) & !4095) + 6 + 8 * size as u64
    }

    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(self.desc, index, addr, len, flags, next);
    }

    /// Makes the chain at `head` available (the caller notifies).
    pub fn push(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        // SAFETY: inside the avail ring we own.
        unsafe {
            write_volatile((self.avail + 4 + 2 * slot as u64) as *mut u16, head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            write_volatile((self.avail + 2) as *mut u16, self.avail_idx);
        }
    }

    /// The next completion (head, length), if the device has published one.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: inside the used ring we own.
        let idx = unsafe { read_volatile((self.used + 2) as *const u16) };
        if idx == self.used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = (self.used_seen % self.size) as u64;
        let elem = self.used + 4 + 8 * slot;
        // SAFETY: as above.
        let (head, len) = unsafe { (read_volatile(elem as *const u32), read_volatile((elem + 4) as *const u32)) };
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((head as u16, len))
    }

    /// Waits for a completion; None on timeout or when the device needs a reset.
    pub fn wait_used(&mut self, device: &Device) -> Option<(u16, u32)> {
        self.wait_used_for(device, TIMEOUT_TICKS)
    }

    /// `wait_used`, giving up after `patience` TSC ticks.
    pub fn wait_used_for(&mut self, device: &Device, patience: u64) -> Option<(u16, u32)> {
        let start = rdtsc();
        let mut spins = 0u32;
        loop {
            if let Some(done) = self.pop_used() {
                return Some(done);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(65536) && (device.status() & STATUS_NEEDS_RESET != 0 || rdtsc() - start > patience)
            {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}
