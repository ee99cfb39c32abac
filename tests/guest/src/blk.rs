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
    /// With indirect descriptors negotiated ([`Blk::init_with_layouts`]):
    /// one table of [`TABLE_ENTRIES`] per slot, and where each slot's
    /// status byte is (a layout may put it in the data buffer).
    tables: Option<u64>,
    status_at: [u64; SLOTS as usize],
    /// Kicks that notified the device, and kicks it did not want (it polled).
    pub notified: u64,
    pub unwanted: u64,
}

const F_INDIRECT_DESC: u64 = 1 << 28;
const DESC_F_INDIRECT: u16 = 4;
const TABLE_ENTRIES: u64 = 16;
/// How many buffer layouts [`Blk::submit_layout`] knows.
pub const LAYOUTS: u32 = 5;

impl Blk {
    pub fn init(device: Device, arena: &mut Arena) -> Result<Blk, &'static str> {
        Self::init_features(device, arena, 0)
    }

    /// Like [`Blk::init`], with indirect descriptors for [`Blk::submit_layout`].
    pub fn init_with_layouts(device: Device, arena: &mut Arena) -> Result<Blk, &'static str> {
        let mut blk = Self::init_features(device, arena, F_INDIRECT_DESC)?;
        blk.tables = Some(arena.take(16 * TABLE_ENTRIES * SLOTS as u64).ok_or("out of memory")?);
        Ok(blk)
    }

    fn init_features(mut device: Device, arena: &mut Arena, extra: u64) -> Result<Blk, &'static str> {
        if !device.is_virtio() || device.device_id() != DEVICE_ID {
            return Err("not a virtio-blk device");
        }
        let wanted = F_VERSION_1 | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | crate::virtio::event_idx_wanted() | extra;
        let features = device.negotiate(wanted)?;
        if features & extra != extra {
            return Err("the device lacks a feature we need");
        }
        let mut queue = Queue::new(arena.take(Queue::footprint(QUEUE_SIZE)).ok_or("out of memory")?, QUEUE_SIZE);
        if features & crate::virtio::F_EVENT_IDX != 0 {
            queue.use_event_idx();
        }
        if crate::interrupts::halt_wanted() && device.route_interrupts() {
            queue.sleep_when_idle();
        }
        device.setup_queue(0, &queue)?;
        let headers = arena.take(16 * SLOTS as u64 + SLOTS as u64).ok_or("out of memory")?;
        device.driver_ok();
        let capacity = device.config_read64(0);
        let statuses = headers + 16 * SLOTS as u64;
        let status_at = core::array::from_fn(|slot| statuses + slot as u64);
        Ok(Blk { device, queue, headers, statuses, capacity, tables: None, status_at, notified: 0, unwanted: 0 })
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
        self.status_at[slot as usize] = status;
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

    /// Queues request `slot` as one indirect descriptor whose table lays the
    /// buffers out in `layout` (0..LAYOUTS), the ways a driver may:
    /// 0 header, data, status; 1 the header split in two; 2 the data in 8
    /// pieces; 3 the data at `data + 8` (off every block grid; the caller
    /// leaves room); 4 for reads, the status byte right after the data in
    /// the same buffer (the caller leaves room), for writes as 0.
    /// Needs [`Blk::init_with_layouts`].
    pub fn submit_layout(&mut self, slot: u16, kind: u32, sector: u64, data: u64, len: u32, layout: u32) {
        let Some(tables) = self.tables else { return self.submit(slot, kind, sector, data, len) };
        let header = self.headers + 16 * slot as u64;
        let table = tables + 16 * TABLE_ENTRIES * slot as u64;
        let reads = kind == T_IN;
        let data = if layout == 3 { data + 8 } else { data };
        let status = if layout == 4 && reads { data + len as u64 } else { self.statuses + slot as u64 };
        // SAFETY: our header, and a status byte in RAM we own.
        unsafe {
            write_volatile(header as *mut u32, kind);
            write_volatile((header + 4) as *mut u32, 0);
            write_volatile((header + 8) as *mut u64, sector);
            write_volatile(status as *mut u8, 0xff);
        }
        self.status_at[slot as usize] = status;
        let w = if reads { DESC_F_WRITE } else { 0 };
        let mut buffers = [(0u64, 0u32, 0u16); 12];
        let mut n = 0;
        let mut add = |addr, len, flags| {
            buffers[n] = (addr, len, flags);
            n += 1;
        };
        if layout == 1 {
            add(header, 8, 0);
            add(header + 8, 8, 0);
        } else {
            add(header, 16, 0);
        }
        match layout {
            2 => (0..8u64).for_each(|i| add(data + i * (len as u64 / 8), len / 8, w)),
            4 if reads => add(data, len + 1, w),
            _ => add(data, len, w),
        }
        if !(layout == 4 && reads) {
            add(status, 1, DESC_F_WRITE);
        }
        for (i, &(addr, len, flags)) in buffers[..n].iter().enumerate() {
            let next = if i + 1 < n { DESC_F_NEXT } else { 0 };
            crate::virtio::write_desc(table, i as u16, addr, len, flags | next, i as u16 + 1);
        }
        let head = slot * 3;
        self.queue.set_desc(head, table, 16 * n as u32, DESC_F_INDIRECT, 0);
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

    /// Notifies the device of new requests, unless it says it is polling.
    pub fn kick(&mut self) {
        if self.queue.wants_notification() {
            self.device.notify(0);
            self.notified += 1;
        } else {
            self.unwanted += 1;
        }
    }

    /// Whether waits sleep until an interrupt (`halt=1`) rather than poll.
    pub fn sleeps(&self) -> bool {
        self.queue.sleeps()
    }

    /// Waits for one completion: (slot, status byte, used length).
    pub fn wait(&mut self) -> Option<(u16, u8, u32)> {
        let (head, len) = self.queue.wait_used(&self.device)?;
        let slot = head / 3;
        // SAFETY: the status byte of that slot, in RAM we own.
        let status = unsafe { read_volatile(self.status_at[(slot % SLOTS) as usize] as *const u8) };
        Some((slot, status, len))
    }

    /// One request at queue depth 1; Err on timeout or a failed device.
    pub fn request(&mut self, kind: u32, sector: u64, data: u64, len: u32) -> Result<u8, &'static str> {
        self.submit(0, kind, sector, data, len);
        self.kick();
        self.wait().map(|(_, status, _)| status).ok_or("no completion (timeout or device needs reset)")
    }
}
