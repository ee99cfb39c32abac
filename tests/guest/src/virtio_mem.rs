//! A polling virtio-mem driver (virtio 1.2, 5.15): it follows the device's
//! requested size by plugging or unplugging blocks at the top of what it
//! has plugged, so plugged memory is always one run from the region start.
use crate::blk::Arena;
use crate::virtio::{Device, Queue, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1};
use core::ptr::{read_volatile, write_volatile};

pub const DEVICE_ID: u32 = 24;
const F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 16;

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
pub const RESP_ACK: u16 = 0;
/// How long a request may take, in TSC ticks (about a minute, as long as
/// the host lets the device wait for a plug).
const REQUEST_PATIENCE: u64 = 1 << 37;
pub const RESP_NACK: u16 = 1;
pub const RESP_ERROR: u16 = 3;
pub const STATE_PLUGGED: u16 = 0;
pub const STATE_UNPLUGGED: u16 = 1;

/// Config-space offsets (5.15.4).
const CFG_BLOCK_SIZE: u64 = 0;
const CFG_ADDR: u64 = 16;
const CFG_REGION_SIZE: u64 = 24;
const CFG_PLUGGED: u64 = 40;
const CFG_REQUESTED: u64 = 48;

pub struct Mem {
    device: Device,
    queue: Queue,
    request: u64,
    response: u64,
    pub block: u64,
    pub start: u64,
    pub size: u64,
    /// Bytes this driver has plugged, from `start` up.
    pub plugged: u64,
}

/// What `follow` did.
#[derive(Clone, Copy)]
pub enum Change {
    Plugged { addr: u64, bytes: u64 },
    Unplugged { addr: u64, bytes: u64 },
}

impl Mem {
    pub fn find(cmdline: &str) -> Option<Device> {
        crate::virtio::devices(cmdline).find(|d| d.is_virtio() && d.device_id() == DEVICE_ID)
    }

    pub fn init(mut device: Device, arena: &mut Arena) -> Result<Mem, &'static str> {
        device.negotiate(F_VERSION_1 | F_UNPLUGGED_INACCESSIBLE)?;
        let queue = Queue::new(arena.take(Queue::footprint(QUEUE_SIZE)).ok_or("out of memory")?, QUEUE_SIZE);
        device.setup_queue(0, &queue)?;
        let request = arena.take(64).ok_or("out of memory")?;
        device.driver_ok();
        let config = |offset| device.config_read64(offset);
        let mem = Mem {
            block: config(CFG_BLOCK_SIZE),
            start: config(CFG_ADDR),
            size: config(CFG_REGION_SIZE),
            plugged: config(CFG_PLUGGED),
            device,
            queue,
            request,
            response: request + 32,
        };
        if mem.block == 0 || !mem.size.is_multiple_of(mem.block) {
            return Err("virtio-mem config has no usable block size");
        }
        Ok(mem)
    }

    fn config(&self, offset: u64) -> u64 {
        self.device.config_read64(offset)
    }

    /// The size the host asks us to have plugged.
    pub fn requested(&self) -> u64 {
        self.config(CFG_REQUESTED)
    }

    /// The size the device says is plugged.
    pub fn device_plugged(&self) -> u64 {
        self.config(CFG_PLUGGED)
    }

    /// One request; returns (response type, state).
    pub fn send(&mut self, kind: u16, addr: u64, blocks: u16) -> Result<(u16, u16), &'static str> {
        // SAFETY: our request and response buffers.
        unsafe {
            core::ptr::write_bytes(self.request as *mut u8, 0, 24);
            write_volatile(self.request as *mut u16, kind);
            write_volatile((self.request + 8) as *mut u64, addr);
            write_volatile((self.request + 16) as *mut u16, blocks);
            write_volatile(self.response as *mut u16, 0xffff);
        }
        self.queue.set_desc(0, self.request, 24, DESC_F_NEXT, 1);
        self.queue.set_desc(1, self.response, 10, DESC_F_WRITE, 0);
        self.queue.push(0);
        self.device.notify(0);
        // A plug may take seconds when the host rebuilds device sandboxes.
        self.queue.wait_used_for(&self.device, REQUEST_PATIENCE).ok_or("virtio-mem: no completion")?;
        // SAFETY: as above.
        unsafe { Ok((read_volatile(self.response as *const u16), read_volatile((self.response + 8) as *const u16))) }
    }

    /// A PLUG request whose readable buffer is only `request_len` bytes long.
    pub fn send_raw(&mut self, request_len: u32, request_flags: u16, response_flags: u16) -> Result<u16, &'static str> {
        // SAFETY: our response buffer.
        unsafe { write_volatile(self.response as *mut u16, 0xffff) };
        self.queue.set_desc(0, self.request, request_len, request_flags, 1);
        self.queue.set_desc(1, self.response, 10, response_flags, 0);
        self.queue.push(0);
        self.device.notify(0);
        self.queue.wait_used(&self.device).ok_or("virtio-mem: no completion")?;
        // SAFETY: as above.
        Ok(unsafe { read_volatile(self.response as *const u16) })
    }

    /// The state of `bytes` at `addr` (STATE request).
    pub fn state(&mut self, addr: u64, bytes: u64) -> Result<u16, &'static str> {
        match self.send(REQ_STATE, addr, (bytes / self.block) as u16)? {
            (RESP_ACK, state) => Ok(state),
            _ => Err("virtio-mem: STATE refused"),
        }
    }

    /// Plugs or unplugs at the top until `plugged` matches the requested size.
    pub fn follow(&mut self) -> Result<Option<Change>, &'static str> {
        let requested = self.requested().min(self.size);
        if requested == self.plugged {
            return Ok(None);
        }
        let (kind, from, to) = if requested > self.plugged {
            (REQ_PLUG, self.plugged, requested)
        } else {
            (REQ_UNPLUG, requested, self.plugged)
        };
        if requested == 0 {
            // Everything goes: one UNPLUG_ALL.
            if self.send(REQ_UNPLUG_ALL, 0, 0)?.0 != RESP_ACK {
                return Err("virtio-mem: UNPLUG_ALL refused");
            }
            let bytes = self.plugged;
            self.plugged = 0;
            return Ok(Some(Change::Unplugged { addr: self.start, bytes }));
        }
        let max_chunk = 0xffff * self.block;
        let mut at = from;
        while at < to {
            let bytes = (to - at).min(max_chunk);
            let (response, _) = self.send(kind, self.start + at, (bytes / self.block) as u16)?;
            if response != RESP_ACK {
                return Err(if kind == REQ_PLUG { "virtio-mem: PLUG refused" } else { "virtio-mem: UNPLUG refused" });
            }
            at += bytes;
        }
        let (addr, bytes) = (self.start + from, to - from);
        if kind == REQ_PLUG {
            self.plugged = to;
            Ok(Some(Change::Plugged { addr, bytes }))
        } else {
            self.plugged = from;
            Ok(Some(Change::Unplugged { addr, bytes }))
        }
    }
}
