//! Virtio devices. They run sandboxed in their own process (memory modes
//! `rpc` and `shared`) or as a thread of the VMM (`inprocess`); the code is
//! the same in all three, written against [`memory::DeviceMemory`].
pub mod blk;
mod hostile;
pub mod memory;
pub mod process;
pub mod runner;
pub mod virtqueue;

/// Virtio feature bits shared by every device.
pub mod features {
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}
