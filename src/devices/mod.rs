//! Virtio devices. They run sandboxed in their own process (memory modes
//! `rpc` and `shared`) or as a thread of the VMM (`inprocess`); the code is
//! the same in all three, written against [`memory::DeviceMemory`].
pub mod blk;
mod hostile;
pub mod mem;
pub mod memory;
pub mod process;
pub mod rng;
pub mod runner;
pub mod virtqueue;

/// Virtio feature bits shared by every device.
pub mod features {
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

use memory::{AccessError, DeviceMemory};
use rpc_schema::DeviceInfo;
use virtqueue::{Chain, Completion, Prefetched};

/// The device behind a transport: the only part that differs between devices.
pub enum Backend {
    Block(blk::BlockDevice),
    Rng(rng::RngDevice),
    Mem(mem::MemDevice),
}

impl Backend {
    pub fn info(&self) -> DeviceInfo {
        match self {
            Backend::Block(blk) => blk.info(),
            Backend::Rng(rng) => rng.info(),
            Backend::Mem(mem) => mem.info(),
        }
    }

    /// Serves the requests; the caller writes the completions back.
    pub async fn process<M: DeviceMemory>(
        &mut self,
        mem: &M,
        chains: Vec<Chain>,
        prefetched: Prefetched,
    ) -> Result<Vec<Completion>, AccessError> {
        match self {
            Backend::Block(blk) => blk.process(mem, chains, prefetched).await,
            Backend::Rng(rng) => Ok(rng.process(chains)),
            Backend::Mem(device) => device.process(mem, chains, prefetched).await,
        }
    }
}
