//! A polling virtio-blk driver: up to SLOTS requests in flight, three
//! descriptors each (header, data, status).
use crate::virtio::{Device, Queue, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1};
use core::ptr::{read_volatile, write_volatile};

pub const DEVICE_ID: u32 = 2;
pub const SECTOR: u64 = 512;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const QUEUE_SIZE: u16 = 256;
pub const SLOTS: u16 = 64;

/// Hands out page-aligned guest RAM for queues and buffers.
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    pub fn new(start: u64, end: u64) -> Arena {
        Arena { next: (start + 4095) & !4095, end }
    }

    pub fn take(&mut self, len: u64) -> Option<u64> {
        let addr = self.next;
        let next = (addr + len + 4095) & !4095;
        (next <= self.end).then(|| {
            self.next = next;
            addr
        })
    }
}

pub struct Blk {
    pub device: Device,
    queue: Queue,
    /// 16-byte request headers, then one status byte per slot.
    headers: u64,
    statuses: u64,
    pub capacity: u64,
}

impl Blk {
    pub fn init(device: Device, arena: &mut Arena) -> Result<Blk, &'static str> {
        if !device.is_virtio() || device.device_id() != DEVICE_ID {
            return Err("not a virtio-blk device");
        }
        device.negotiate(F_VERSION_1 | F_FLUSH | F_DISCARD | F_WRITE_ZEROES)?;
        let queue = Queue::new(arena.take(Queue::footprint(QUEUE_SIZE)).ok_or("out of memory")?, QUEUE_SIZE);
        device.setup_queue(0, &queue)?;
        let headers = arena.take(16 * SLOTS as u64 + SLOTS as u64).ok_or("out of memory")?;
        device.driver_ok();
        let capacity = device.read(0x100) as u64 | (device.read(0x104) as u64) << 32;
        Ok(Blk { device, queue, headers, statuses: headers + 16 * SLOTS as u64, capacity })
    }

    /// Queues request `slot` (not yet notified). `data` may be 0 with `len` 0.
    pub fn submit(&mut self, slot: u16, kind: u32, sector: u64, data: u64, len: u32) {
        let header = self.headers + 16 * slot as u64;
        let status = self.statuses + slot as u64;
        // SAFETY: our header and status slots, in RAM we own.
        unsafe {
            write_volatile(header as *mut u32, kind);
            write_volatile((header + 4) as *mut u32, 0);
            write_volatile((header + 8) as *mut u64, sector);
            write_volatile(status as *mut u8, 0xff);
        }
        let head = slot * 3;
        let device_writes = kind == T_IN || kind == T_GET_ID;
        if len == 0 {
            self.queue.set_desc(head, header, 16, DESC_F_NEXT, head + 2);
        } else {
            self.queue.set_desc(head, header, 16, DESC_F_NEXT, head + 1);
            let flags = DESC_F_NEXT | if device_writes { DESC_F_WRITE } else { 0 };
            self.queue.set_desc(head + 1, data, len, flags, head + 2);
        }
        self.queue.set_desc(head + 2, status, 1, DESC_F_WRITE, 0);
        self.queue.push(head);
    }

    /// Queues a raw chain of our own making (hostile-driver tests).
    pub fn queue(&mut self) -> &mut Queue {
        &mut self.queue
    }

    pub fn header_addr(&self, slot: u16) -> u64 {
        self.headers + 16 * slot as u64
    }

    pub fn status_addr(&self, slot: u16) -> u64 {
        self.statuses + slot as u64
    }

    pub fn kick(&self) {
        self.device.notify(0);
    }

    /// Waits for one completion: (slot, status byte, used length).
    pub fn wait(&mut self) -> Option<(u16, u8, u32)> {
        let (head, len) = self.queue.wait_used(&self.device)?;
        let slot = head / 3;
        // SAFETY: the status byte of that slot.
        let status = unsafe { read_volatile((self.statuses + slot as u64) as *const u8) };
        Some((slot, status, len))
    }

    /// One request at queue depth 1; Err on timeout or a failed device.
    pub fn request(&mut self, kind: u32, sector: u64, data: u64, len: u32) -> Result<u8, &'static str> {
        self.submit(0, kind, sector, data, len);
        self.kick();
        self.wait().map(|(_, status, _)| status).ok_or("no completion (timeout or device needs reset)")
    }
}
