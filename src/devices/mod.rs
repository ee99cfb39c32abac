//! Virtio devices. They run sandboxed in their own process (memory modes
//! `rpc`, `rpc-dma` and `shared`) or as a thread of the VMM (`inprocess`).
//! Device logic ([`Backend`]) is the same in all four: it serves
//! [`request::Request`]s, which reach it either as requests the VMM posted
//! (`rpc`, [`posted`]) or from the device's own ring walk over
//! [`memory::DeviceMemory`] (the other modes, [`ring`]).
pub mod aligned;
pub mod blk;
pub mod console;
mod disk_ring;
mod hostile;
mod in_flight;
mod io_threads;
pub mod mem;
pub mod memory;
pub mod net;
mod net_zero_copy;
pub mod poll_window;
mod posted;
pub mod process;
pub mod request;
mod reserve;
mod ring;
pub mod rng;
pub mod runner;
mod staging;
pub mod virtqueue;
mod zero_copy;

/// Virtio feature bits shared by every device.
pub mod features {
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

use memory::AccessError;
use request::{Reply, Request};
use rpc_schema::DeviceInfo;

/// The device logic behind a transport: the only part that differs between
/// devices, written once for every memory mode (see [`request`]).
pub enum Backend {
    Block(blk::BlockDevice),
    Rng(rng::RngDevice),
    Mem(mem::MemDevice),
    Net(net::NetDevice),
    Console(console::ConsoleDevice),
}

impl Backend {
    /// The disk, if this is one.
    pub fn block(&mut self) -> Option<&mut blk::BlockDevice> {
        match self {
            Backend::Block(blk) => Some(blk),
            _ => None,
        }
    }

    pub fn info(&self) -> DeviceInfo {
        match self {
            Backend::Block(blk) => blk.info(),
            Backend::Rng(rng) => rng.info(),
            Backend::Mem(mem) => mem.info(),
            Backend::Net(net) => net.info(),
            Backend::Console(console) => console.info(),
        }
    }

    /// How many leading driver-readable bytes a request of this shape needs.
    pub fn wanted(&self, readable_len: u64, writable_len: u64) -> u64 {
        match self {
            Backend::Block(_) => blk::BlockDevice::wanted(readable_len, writable_len),
            Backend::Rng(_) => 0,
            Backend::Mem(_) => readable_len.min(mem::REQUEST_SIZE),
            Backend::Net(_) => net::NetDevice::wanted(readable_len),
            Backend::Console(_) => console::ConsoleDevice::wanted(readable_len),
        }
    }

    /// The answer to a request whose buffers are not all guest RAM.
    pub fn refuse(&self, writable_len: u64) -> Reply {
        match self {
            Backend::Block(_) => blk::BlockDevice::refuse(writable_len),
            _ => Reply { failed: true, ..Reply::default() },
        }
    }

    /// Whether the device runs I/O threads (a `direct=on` disk).
    pub fn needs_io_threads(&self) -> bool {
        matches!(self, Backend::Block(blk) if blk.is_direct())
    }

    /// Starts what the device needs before its sandbox closes (a `direct=on`
    /// disk's io_uring or I/O threads); returns whether a ring runs.
    pub fn start_io(&mut self, aio: blk::Aio, name: &str, sandboxed: bool) -> std::io::Result<bool> {
        match self {
            Backend::Block(blk) => blk.start_io(aio, name, sandboxed),
            _ => Ok(false),
        }
    }

    /// Serves the requests, one reply each, in order. Only a broken channel
    /// to the VMM is an error; a bad request gets an error reply.
    pub async fn serve(&mut self, requests: &[Request]) -> Result<Vec<Reply>, AccessError> {
        match self {
            Backend::Block(blk) => Ok(blk.serve(requests, None)),
            Backend::Rng(rng) => Ok(rng.serve(requests)),
            Backend::Mem(device) => device.serve(requests).await,
            // The transmit queue's requests; receive buffers are held instead.
            Backend::Net(net) => Ok(net.transmit(requests)),
            Backend::Console(console) => Ok(console.transmit(requests)),
        }
    }

    /// A device with a receive queue (0) whose buffers it holds until input
    /// comes, and a transmit queue (1): virtio-net and virtio-console.
    pub fn holds_receive_buffers(&self) -> bool {
        matches!(self, Backend::Net(_) | Backend::Console(_))
    }

    /// The descriptor whose readiness means input for the receive queue.
    pub fn take_watcher(&mut self) -> Option<std::fs::File> {
        match self {
            Backend::Net(net) => net.take_watcher(),
            Backend::Console(console) => console.take_watcher(),
            _ => None,
        }
    }

    /// More input may come (a console's input has not ended).
    pub fn input_open(&self) -> bool {
        match self {
            Backend::Console(console) => console.input_open(),
            _ => true,
        }
    }

    /// Fills held receive buffers with the input waiting, front first;
    /// each filled (or given back) buffer with its reply. `ring_full`: the
    /// driver has posted all it can; `budget`: most bytes to deliver.
    pub fn receive<T>(
        &mut self,
        held: &mut std::collections::VecDeque<net::Held<T>>,
        ring_full: bool,
        budget: u64,
    ) -> Vec<(T, Reply)> {
        match self {
            Backend::Net(net) => net.receive(held, ring_full, budget),
            Backend::Console(console) => console.receive(held, budget),
            _ => Vec::new(),
        }
    }

    /// Input waits for the driver to post receive buffers (more of them,
    /// or larger: a frame is held back until they take it).
    pub fn waits_for_buffers(&self) -> bool {
        matches!(self, Backend::Net(net) if net.waits_for_buffers())
    }

    /// Takes back delivered receive replies, whose buffers the next input reuses.
    pub fn recycle(&mut self, replies: Vec<Reply>) {
        if let Backend::Net(net) = self {
            net.recycle(replies);
        }
    }
}
