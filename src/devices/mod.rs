//! Virtio devices. They run sandboxed in their own process (memory modes
//! `rpc`, `rpc-dma` and `shared`) or as a thread of the VMM (`inprocess`).
//! Device logic ([`Backend`]) is the same in all four: it serves
//! [`request::Request`]s, which reach it either as requests the VMM posted
//! (`rpc`, [`posted`]) or from the device's own ring walk over
//! [`memory::DeviceMemory`] (the other modes, [`ring`]).
pub mod aligned;
pub mod blk;
mod hostile;
mod in_flight;
mod io_threads;
pub mod mem;
pub mod memory;
pub mod net;
mod posted;
pub mod process;
pub mod request;
mod ring;
pub mod rng;
pub mod runner;
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
}

impl Backend {
    pub fn info(&self) -> DeviceInfo {
        match self {
            Backend::Block(blk) => blk.info(),
            Backend::Rng(rng) => rng.info(),
            Backend::Mem(mem) => mem.info(),
            Backend::Net(net) => net.info(),
        }
    }

    /// How many leading driver-readable bytes a request of this shape needs.
    pub fn wanted(&self, readable_len: u64, writable_len: u64) -> u64 {
        match self {
            Backend::Block(_) => blk::BlockDevice::wanted(readable_len, writable_len),
            Backend::Rng(_) => 0,
            Backend::Mem(_) => readable_len.min(mem::REQUEST_SIZE),
            Backend::Net(_) => net::NetDevice::wanted(readable_len),
        }
    }

    /// The answer to a request whose buffers are not all guest RAM.
    pub fn refuse(&self, writable_len: u64) -> Reply {
        match self {
            Backend::Block(_) => blk::BlockDevice::refuse(writable_len),
            Backend::Rng(_) | Backend::Mem(_) | Backend::Net(_) => Reply { failed: true, ..Reply::default() },
        }
    }

    /// Whether the device runs I/O threads (a `direct=on` disk).
    pub fn needs_io_threads(&self) -> bool {
        matches!(self, Backend::Block(blk) if blk.is_direct())
    }

    /// Starts what the device needs before its sandbox closes (a `direct=on`
    /// disk's I/O threads).
    pub fn start_io_threads(&mut self, name: &str, sandboxed: bool) -> std::io::Result<()> {
        match self {
            Backend::Block(blk) => blk.start_io_threads(name, sandboxed),
            Backend::Rng(_) | Backend::Mem(_) | Backend::Net(_) => Ok(()),
        }
    }

    /// Serves the requests, one reply each, in order. Only a broken channel
    /// to the VMM is an error; a bad request gets an error reply.
    pub async fn serve(&mut self, requests: &[Request]) -> Result<Vec<Reply>, AccessError> {
        match self {
            Backend::Block(blk) => Ok(blk.serve(requests)),
            Backend::Rng(rng) => Ok(rng.serve(requests)),
            Backend::Mem(device) => device.serve(requests).await,
            // The transmit queue's requests; receive buffers are held instead.
            Backend::Net(net) => Ok(net.transmit(requests)),
        }
    }
}
