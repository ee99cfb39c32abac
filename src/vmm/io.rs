//! Address dispatch for vCPU exits: port I/O to the legacy devices, MMIO to
//! the virtio-mmio transports. Unclaimed addresses read as all-ones and
//! ignore writes, as on real hardware with nothing decoding them.
use super::legacy::LegacyDevices;
use super::lock;
use super::virtio::mmio::MMIO_SIZE;
use super::virtio::VirtioDevice;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, MutexGuard};
use tracing::debug;

pub struct IoBus {
    pub legacy: Arc<LegacyDevices>,
    pub virtio: Vec<VirtioDevice>,
    pub exits: ExitCounters,
}

/// vCPU exits to userspace for I/O (ioeventfd notifications never get here).
#[derive(Debug, Default, serde::Serialize)]
pub struct ExitCounters {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
}

impl IoBus {
    pub fn new(legacy: Arc<LegacyDevices>, virtio: Vec<VirtioDevice>) -> Self {
        IoBus { legacy, virtio, exits: ExitCounters::default() }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.exits.pio.fetch_add(1, Relaxed);
        self.legacy.pio_read(port, data)
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        self.exits.pio.fetch_add(1, Relaxed);
        self.legacy.pio_write(port, data)
    }

    fn transport(&self, addr: u64) -> Option<(MutexGuard<'_, super::virtio::mmio::MmioTransport>, u64)> {
        self.virtio.iter().find(|d| (d.slot.base..d.slot.base + MMIO_SIZE).contains(&addr)).map(|d| {
            let transport = lock(&d.transport);
            (transport, addr - d.slot.base)
        })
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.exits.mmio.fetch_add(1, Relaxed);
        match self.transport(addr) {
            Some((mut transport, offset)) => transport.read(offset, data),
            None => {
                debug!("unclaimed MMIO read {addr:#x} ({} bytes)", data.len());
                data.fill(0xff);
            }
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.exits.mmio.fetch_add(1, Relaxed);
        match self.transport(addr) {
            Some((mut transport, offset)) => transport.write(offset, data),
            None => debug!("unclaimed MMIO write {addr:#x} = {data:02x?}"),
        }
    }
}
