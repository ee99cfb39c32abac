//! PCI configuration space through ports 0xCF8/0xCFC (bus 0 only), and the
//! capabilities a modern virtio-pci device describes its windows with
//! (virtio 1.x, 4.1.4).
use crate::platform::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern devices are 0x1040 + the virtio device id; transitional ones
/// 0x1000..=0x103f, with the id in the subsystem id.
const MODERN_BASE: u16 = 0x1040;
const COMMAND: u8 = 0x04;
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
const STATUS_HAS_CAPABILITIES: u32 = 1 << 20;
const SUBSYSTEM: u8 = 0x2c;
const CAPABILITIES: u8 = 0x34;
const CAP_VENDOR: u8 = 0x09;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_DEVICE: u8 = 4;

/// One function on bus 0.
#[derive(Clone, Copy)]
pub struct Function {
    slot: u8,
}

impl Function {
    pub fn read(&self, offset: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inl(CONFIG_DATA)
    }

    pub fn write(&self, offset: u8, value: u32) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outl(CONFIG_DATA, value)
    }

    fn address(&self, offset: u8) -> u32 {
        0x8000_0000 | (self.slot as u32) << 11 | (offset & 0xfc) as u32
    }

    /// The memory address BAR `index` decodes (64-bit BARs take two registers).
    fn bar(&self, index: u8) -> Option<u64> {
        let offset = 0x10 + 4 * index;
        let low = self.read(offset);
        if low & 1 != 0 {
            return None; // an I/O BAR
        }
        let high = match (low >> 1) & 3 {
            2 if index < 5 => self.read(offset + 4) as u64,
            _ => 0,
        };
        Some(high << 32 | (low & !0xf) as u64)
    }
}

/// Where a modern virtio-pci device's registers are, in guest-physical memory.
#[derive(Clone, Copy)]
pub struct VirtioWindows {
    pub device_id: u32,
    pub common: u64,
    pub notify: u64,
    pub notify_multiplier: u32,
    pub device: u64,
}

/// Every virtio device on bus 0 that has the modern capabilities.
pub fn virtio_devices() -> impl Iterator<Item = VirtioWindows> {
    (0..32u8).filter_map(|slot| windows(Function { slot }))
}

fn windows(function: Function) -> Option<VirtioWindows> {
    let id = function.read(0);
    let (vendor, device) = (id as u16, (id >> 16) as u16);
    if vendor != VIRTIO_VENDOR || !(0x1000..=0x107f).contains(&device) {
        return None;
    }
    let device_id = match device.checked_sub(MODERN_BASE) {
        Some(modern) => modern as u32,
        None => function.read(SUBSYSTEM) >> 16,
    };
    let command = function.read(COMMAND);
    if command & STATUS_HAS_CAPABILITIES == 0 {
        return None;
    }
    let mut found = VirtioWindows { device_id, common: 0, notify: 0, notify_multiplier: 0, device: 0 };
    let mut at = function.read(CAPABILITIES) as u8 & 0xfc;
    // A capability list is at most 48 entries long in 256 bytes; stop on loops.
    for _ in 0..48 {
        if at < 0x40 {
            break;
        }
        let header = function.read(at);
        if header as u8 == CAP_VENDOR {
            let kind = (header >> 24) as u8;
            let bar = function.read(at + 4) as u8;
            let offset = function.read(at + 8) as u64;
            let length = function.read(at + 12) as u64;
            let base = (bar < 6).then(|| function.bar(bar)).flatten().filter(|&b| b != 0);
            if let Some(address) = base.map(|b| b + offset) {
                if crate::paging::map(address, length.max(1)).is_ok() {
                    match kind {
                        CAP_COMMON if found.common == 0 => found.common = address,
                        CAP_NOTIFY if found.notify == 0 => {
                            found.notify = address;
                            found.notify_multiplier = function.read(at + 16);
                        }
                        CAP_DEVICE if found.device == 0 => found.device = address,
                        _ => {}
                    }
                }
            }
        }
        at = (header >> 8) as u8 & 0xfc;
    }
    if found.common == 0 || found.notify == 0 {
        return None;
    }
    // Decode the BARs, and let the device reach our rings.
    function.write(COMMAND, (command & 0xffff) | COMMAND_MEMORY | COMMAND_BUS_MASTER);
    Some(found)
}
