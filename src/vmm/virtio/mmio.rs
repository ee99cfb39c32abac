//! The virtio-mmio transport (virtio 1.x, 4.2, register layout version 2),
//! in the VMM. It negotiates features, collects queue addresses and turns
//! DRIVER_OK and resets into control requests to the device. Queue notifies
//! go straight to the device through an ioeventfd, and its interrupts come
//! straight from it through an irqfd.
use super::host::DeviceHost;
use crate::vmm::hotplug::HotplugRegion;
use crate::vmm::throttle::{held_back, Throttle};
use rpc_schema::{DeviceInfo, QueueConfig};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use tracing::{debug, warn};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4b53; // "SKVM"
pub const MMIO_SIZE: u64 = 0x1000;
pub const QUEUE_NOTIFY: u64 = 0x50;
const CONFIG_SPACE: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;
const INTERRUPT_VRING: u32 = 1;
const INTERRUPT_CONFIG: u32 = 2;
const VERSION_1: u64 = 1 << 32;

#[derive(Debug, Default, Clone, Copy)]
struct QueueRegs {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

pub struct MmioTransport {
    info: DeviceInfo,
    host: DeviceHost,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    config_generation: u32,
    needs_reset_seen: bool,
    /// A config change the driver has not acknowledged yet.
    config_changed: bool,
    /// virtio-mem: the config space is the hotplug region's live state.
    live_config: Option<Arc<HotplugRegion>>,
    /// What the driver has done with the device, for status reports.
    driver: Arc<DriverState>,
    log_limit: Throttle,
}

/// The driver's side of a transport as status reports see it, published
/// by the transport so that a report never waits for it.
#[derive(Debug, Default)]
pub struct DriverState {
    /// The device status the driver last saw (virtio 1.x, 2.1).
    status: AtomicU32,
    /// Driver requests refused (unoffered features, failed activations):
    /// counted all, logged a few at a time (a guest can repeat them at will).
    errors: AtomicU64,
}

impl DriverState {
    /// The driver has brought the device up (DRIVER_OK) and not reset it since.
    pub fn driver_ok(&self) -> bool {
        self.status.load(Ordering::Relaxed) & STATUS_DRIVER_OK != 0
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn refused(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (half as u64) << 32;
    } else {
        *value = (*value & !0xffff_ffff) | half as u64;
    }
}

impl MmioTransport {
    pub fn new(info: DeviceInfo, host: DeviceHost, live_config: Option<Arc<HotplugRegion>>) -> Self {
        let queues = vec![QueueRegs::default(); info.queue_count as usize];
        MmioTransport {
            info,
            host,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            needs_reset_seen: false,
            config_changed: false,
            live_config,
            driver: Arc::default(),
            log_limit: Throttle::default(),
        }
    }

    /// The device's configuration changed: tell the driver (virtio 1.x, 2.5.1).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & STATUS_DRIVER_OK != 0 {
            self.config_changed = true;
            self.host.interrupt();
        }
    }

    pub fn host_mut(&mut self) -> &mut DeviceHost {
        &mut self.host
    }

    pub fn device_id(&self) -> u32 {
        self.info.device_id
    }

    /// A network device's MAC address: the first bytes of its config space.
    pub fn mac(&self) -> Option<[u8; 6]> {
        let is_net = self.info.device_id == crate::devices::net::DEVICE_ID;
        is_net.then(|| self.info.config.get(..6)?.try_into().ok()).flatten()
    }

    pub fn host(&self) -> &DeviceHost {
        &self.host
    }

    pub fn driver_state(&self) -> Arc<DriverState> {
        self.driver.clone()
    }

    fn queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A device that failed shows DEVICE_NEEDS_RESET (and a config interrupt once).
    fn status(&mut self) -> u32 {
        if self.host.health.failed.load(Ordering::Relaxed) && self.status & STATUS_DRIVER_OK != 0 {
            self.status |= STATUS_NEEDS_RESET;
            if !self.needs_reset_seen {
                self.needs_reset_seen = true;
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        }
        self.status
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            let live = self.live_config.as_ref().map(|region| region.config_space());
            let config = live.as_deref().unwrap_or(&self.info.config);
            let start = (offset - CONFIG_SPACE) as usize;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            debug!("virtio-mmio: ignored {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        let value = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.info.device_id,
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.info.features as u32,
                1 => (self.info.features >> 32) as u32,
                _ => 0,
            },
            0x034 => {
                let max = self.info.max_queue_size as u32;
                self.queue().map_or(0, |_| max)
            }
            0x044 => self.queue().map_or(0, |q| q.ready as u32),
            0x060 => {
                let vring = if self.status & STATUS_DRIVER_OK != 0 { INTERRUPT_VRING } else { 0 };
                let config = if self.needs_reset_seen || self.config_changed { INTERRUPT_CONFIG } else { 0 };
                vring | config
            }
            0x070 => self.status(),
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            debug!("virtio-mmio: ignored write to read-only config space at {offset:#x}");
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            debug!("virtio-mmio: ignored {}-byte write at {offset:#x}", data.len());
            return;
        }
        let value = u32::from_le_bytes(data.try_into().unwrap());
        let setting_up = self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0;
        match offset {
            0x014 => self.device_features_sel = value,
            0x020 if setting_up && self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => set_half(&mut self.driver_features, false, value),
                1 => set_half(&mut self.driver_features, true, value),
                _ => {}
            },
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            0x038 if setting_up => {
                let max = self.info.max_queue_size;
                if let Some(q) = self.queue() {
                    q.size = value.min(max as u32) as u16;
                }
            }
            0x044 if setting_up => {
                if let Some(q) = self.queue() {
                    q.ready = value == 1;
                }
            }
            QUEUE_NOTIFY => self.host.notify_fallback(),
            0x064 => {
                if value & INTERRUPT_CONFIG != 0 {
                    self.config_changed = false;
                    if !self.host.health.failed.load(Ordering::Relaxed) {
                        self.needs_reset_seen = false;
                    }
                }
            }
            0x070 => self.write_status(value),
            0x080..=0x0a4 if setting_up => {
                let high = offset % 8 == 4;
                if let Some(q) = self.queue() {
                    match offset & !0x7 {
                        0x080 => set_half(&mut q.desc, high, value),
                        0x090 => set_half(&mut q.avail, high, value),
                        0x0a0 => set_half(&mut q.used, high, value),
                        _ => {}
                    }
                }
            }
            _ => debug!("virtio-mmio: ignored write {value:#x} at {offset:#x} (status {:#x})", self.status),
        }
    }

    /// The driver's status write. Only driver bits are kept, bits are never
    /// cleared except by a reset (writing 0), FEATURES_OK is granted only for
    /// features we offer, and DRIVER_OK activates the device only after it.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let driver_bits = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED;
        let new = value & driver_bits & !self.status;
        let mut status = self.status | (new & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED));
        let introduced = status & (STATUS_ACKNOWLEDGE | STATUS_DRIVER) == (STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        if new & STATUS_FEATURES_OK != 0 && introduced {
            let acceptable = self.driver_features & !self.info.features == 0 && self.driver_features & VERSION_1 != 0;
            if acceptable {
                status |= STATUS_FEATURES_OK;
            } else {
                self.driver.refused();
                if let Some(skipped) = self.log_limit.allow() {
                    warn!(
                        "virtio-mmio: {}: the driver asked for features {:#x} of {:#x}{}",
                        self.host.name,
                        self.driver_features,
                        self.info.features,
                        held_back(skipped)
                    );
                }
            }
        }
        if new & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK != 0 {
            let queues: Vec<QueueConfig> = self
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.ready)
                .map(|(i, q)| QueueConfig { index: i as u16, size: q.size, desc: q.desc, avail: q.avail, used: q.used })
                .collect();
            match self.host.activate(self.driver_features, queues) {
                Ok(()) => status |= STATUS_DRIVER_OK,
                Err(e) => {
                    self.driver.refused();
                    if let Some(skipped) = self.log_limit.allow() {
                        warn!("virtio-mmio: {} refused activation: {e}{}", self.host.name, held_back(skipped));
                    }
                    status |= STATUS_DRIVER_OK | STATUS_NEEDS_RESET;
                    self.needs_reset_seen = true;
                }
            }
        }
        self.set_status(status);
    }

    fn set_status(&mut self, status: u32) {
        self.status = status;
        self.driver.status.store(status, Ordering::Relaxed);
    }

    fn reset(&mut self) {
        if self.status != 0 {
            if let Err(e) = self.host.reset() {
                debug!("virtio-mmio: reset of {}: {e}", self.host.name);
            }
        }
        self.set_status(0);
        self.driver_features = 0;
        self.queue_sel = 0;
        self.needs_reset_seen = false;
        self.config_changed = false;
        self.queues.iter_mut().for_each(|q| *q = QueueRegs::default());
    }
}
