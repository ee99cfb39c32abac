//! A polling virtio driver core with split queues, in ring 3, over
//! virtio-mmio (version 2) or modern virtio-pci: whichever the VMM offers.
use crate::pci::VirtioWindows;
use crate::platform::{mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8, rdtsc};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_EVENT_IDX: notifications and interrupts by ring index.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Whether the block and network drivers negotiate EVENT_IDX where offered
/// (as Linux does); `event-idx=0` on the command line keeps them on the
/// rings' flags instead.
static EVENT_IDX: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(true);

/// Whether queues ask for interrupts after completions (`interrupts=1`):
/// this driver polls with interrupts off and by default asks for none.
static INTERRUPTS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Reads `event-idx=` and `interrupts=` from the command line (at boot).
pub fn configure(cmdline: &str) {
    EVENT_IDX.store(crate::scenario::param(cmdline, "event-idx") != Some("0"), Ordering::Relaxed);
    INTERRUPTS.store(crate::scenario::param(cmdline, "interrupts") == Some("1"), Ordering::Relaxed);
}

/// F_EVENT_IDX, unless the command line said `event-idx=0`.
pub fn event_idx_wanted() -> u64 {
    if EVENT_IDX.load(Ordering::Relaxed) {
        F_EVENT_IDX
    } else {
        0
    }
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// In the used ring's flags: the device polls and needs no notification.
const USED_F_NO_NOTIFY: u16 = 1;
/// In the avail ring's flags: the driver wants no interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Polls give up after this many TSC ticks (a few seconds on any host).
const TIMEOUT_TICKS: u64 = 1 << 34;

/// Queues a driver here sets up per device, at most.
const MAX_QUEUES: usize = 4;

/// Where a device's registers are: a virtio-mmio window (version 2), or
/// the windows a modern virtio-pci device's capabilities describe.
#[derive(Clone, Copy)]
enum Transport {
    /// `irq`: the GSI the command line gives, if any.
    Mmio {
        base: u64,
        irq: Option<u32>,
    },
    Pci(VirtioWindows),
}

/// One virtio device, on either transport.
#[derive(Clone, Copy)]
pub struct Device {
    transport: Transport,
    /// PCI: each queue's notify address, found when it is set up.
    notify_at: [u64; MAX_QUEUES],
}

/// Every virtio device the VMM offers: `virtio_mmio.device=<size>@<base>:<irq>`
/// entries of the command line, then virtio-pci devices on PCI bus 0.
pub fn devices(cmdline: &str) -> impl Iterator<Item = Device> + '_ {
    let pci = crate::pci::virtio_devices().map(|windows| Device::new(Transport::Pci(windows)));
    mmio_windows(cmdline).map(|(base, irq)| Device::new(Transport::Mmio { base, irq })).chain(pci)
}

/// The base addresses and GSIs of the command line's virtio-mmio windows.
pub fn mmio_windows(cmdline: &str) -> impl Iterator<Item = (u64, Option<u32>)> + '_ {
    cmdline.split_ascii_whitespace().filter_map(|word| {
        let spec = word.strip_prefix("virtio_mmio.device=")?;
        let (_, rest) = spec.split_once('@')?;
        let mut parts = rest.split(':');
        let base = u64::from_str_radix(parts.next()?.strip_prefix("0x")?, 16).ok()?;
        Some((base, parts.next().and_then(|irq| irq.parse().ok())))
    })
}

// virtio-mmio registers (4.2.2).
const MMIO_DEVICE_ID: u64 = 0x008;
const MMIO_DEVICE_FEATURES: u64 = 0x010;
const MMIO_DEVICE_FEATURES_SEL: u64 = 0x014;
const MMIO_DRIVER_FEATURES: u64 = 0x020;
const MMIO_DRIVER_FEATURES_SEL: u64 = 0x024;
const MMIO_QUEUE_SEL: u64 = 0x030;
const MMIO_QUEUE_NUM_MAX: u64 = 0x034;
const MMIO_QUEUE_NUM: u64 = 0x038;
const MMIO_QUEUE_READY: u64 = 0x044;
const MMIO_QUEUE_NOTIFY: u64 = 0x050;
const MMIO_STATUS: u64 = 0x070;
const MMIO_QUEUE_RINGS: [u64; 3] = [0x080, 0x090, 0x0a0];
const MMIO_CONFIG: u64 = 0x100;

// virtio-pci common configuration (4.1.4.3).
const PCI_DEVICE_FEATURE_SELECT: u64 = 0x00;
const PCI_DEVICE_FEATURE: u64 = 0x04;
const PCI_DRIVER_FEATURE_SELECT: u64 = 0x08;
const PCI_DRIVER_FEATURE: u64 = 0x0c;
const PCI_DEVICE_STATUS: u64 = 0x14;
const PCI_QUEUE_SELECT: u64 = 0x16;
const PCI_QUEUE_SIZE: u64 = 0x18;
const PCI_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const PCI_QUEUE_ENABLE: u64 = 0x1c;
const PCI_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const PCI_QUEUE_RINGS: [u64; 3] = [0x20, 0x28, 0x30];
/// We poll: no MSI-X vector for any queue.
const PCI_NO_VECTOR: u16 = 0xffff;

impl Device {
    fn new(transport: Transport) -> Device {
        Device { transport, notify_at: [0; MAX_QUEUES] }
    }

    /// The transport's name and where its registers start, for reports.
    pub fn transport(&self) -> (&'static str, u64) {
        match self.transport {
            Transport::Mmio { base, .. } => ("mmio", base),
            Transport::Pci(windows) => ("pci", windows.common),
        }
    }

    pub fn is_virtio(&self) -> bool {
        match self.transport {
            Transport::Mmio { base, .. } => mmio_read32(base) == MAGIC && mmio_read32(base + 0x004) == 2,
            Transport::Pci(_) => true,
        }
    }

    pub fn device_id(&self) -> u32 {
        match self.transport {
            Transport::Mmio { base, .. } => mmio_read32(base + MMIO_DEVICE_ID),
            Transport::Pci(windows) => windows.device_id,
        }
    }

    pub fn status(&self) -> u32 {
        match self.transport {
            Transport::Mmio { base, .. } => mmio_read32(base + MMIO_STATUS),
            Transport::Pci(w) => mmio_read8(w.common + PCI_DEVICE_STATUS) as u32,
        }
    }

    pub fn set_status(&self, status: u32) {
        match self.transport {
            Transport::Mmio { base, .. } => mmio_write32(base + MMIO_STATUS, status),
            Transport::Pci(w) => mmio_write8(w.common + PCI_DEVICE_STATUS, status as u8),
        }
    }

    /// Word `select` (0: features 0-31, 1: 32-63) of what the device offers.
    fn device_features_word(&self, select: u32) -> u32 {
        match self.transport {
            Transport::Mmio { base, .. } => {
                mmio_write32(base + MMIO_DEVICE_FEATURES_SEL, select);
                mmio_read32(base + MMIO_DEVICE_FEATURES)
            }
            Transport::Pci(w) => {
                mmio_write32(w.common + PCI_DEVICE_FEATURE_SELECT, select);
                mmio_read32(w.common + PCI_DEVICE_FEATURE)
            }
        }
    }

    pub fn features(&self) -> u64 {
        self.device_features_word(0) as u64 | (self.device_features_word(1) as u64) << 32
    }

    /// Writes the driver's feature bits (any bits: hostile tests write all).
    pub fn set_driver_features(&self, features: u64) {
        for (select, word) in [(0u32, features as u32), (1, (features >> 32) as u32)] {
            match self.transport {
                Transport::Mmio { base, .. } => {
                    mmio_write32(base + MMIO_DRIVER_FEATURES_SEL, select);
                    mmio_write32(base + MMIO_DRIVER_FEATURES, word);
                }
                Transport::Pci(w) => {
                    mmio_write32(w.common + PCI_DRIVER_FEATURE_SELECT, select);
                    mmio_write32(w.common + PCI_DRIVER_FEATURE, word);
                }
            }
        }
    }

    /// Resets and negotiates `wanted & offered`; Err when the device refuses.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, &'static str> {
        self.set_status(0);
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let features = self.features() & wanted;
        self.set_driver_features(features);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err("device refused our features");
        }
        Ok(features)
    }

    /// The largest ring queue `index` takes (0: the queue does not exist).
    pub fn queue_max(&self, index: u32) -> u16 {
        match self.transport {
            Transport::Mmio { base, .. } => {
                mmio_write32(base + MMIO_QUEUE_SEL, index);
                mmio_read32(base + MMIO_QUEUE_NUM_MAX).min(u16::MAX as u32) as u16
            }
            Transport::Pci(w) => {
                mmio_write16(w.common + PCI_QUEUE_SELECT, index as u16);
                mmio_read16(w.common + PCI_QUEUE_SIZE)
            }
        }
    }

    pub fn setup_queue(&mut self, index: u32, queue: &Queue) -> Result<(), &'static str> {
        self.activate_queue(index, queue.size, [queue.desc, queue.avail, queue.used])
    }

    /// Gives queue `index` its size and ring addresses, and enables it.
    pub fn activate_queue(&mut self, index: u32, size: u16, rings: [u64; 3]) -> Result<(), &'static str> {
        match self.transport {
            Transport::Mmio { base, .. } => {
                mmio_write32(base + MMIO_QUEUE_SEL, index);
                if (mmio_read32(base + MMIO_QUEUE_NUM_MAX) as u16) < size {
                    return Err("queue too small");
                }
                mmio_write32(base + MMIO_QUEUE_NUM, size as u32);
                for (register, addr) in MMIO_QUEUE_RINGS.into_iter().zip(rings) {
                    mmio_write32(base + register, addr as u32);
                    mmio_write32(base + register + 4, (addr >> 32) as u32);
                }
                mmio_write32(base + MMIO_QUEUE_READY, 1);
            }
            Transport::Pci(w) => {
                let slot = self.notify_at.get_mut(index as usize).ok_or("too many queues")?;
                mmio_write16(w.common + PCI_QUEUE_SELECT, index as u16);
                if mmio_read16(w.common + PCI_QUEUE_SIZE) < size {
                    return Err("queue too small");
                }
                mmio_write16(w.common + PCI_QUEUE_SIZE, size);
                mmio_write16(w.common + PCI_QUEUE_MSIX_VECTOR, PCI_NO_VECTOR);
                for (register, addr) in PCI_QUEUE_RINGS.into_iter().zip(rings) {
                    mmio_write32(w.common + register, addr as u32);
                    mmio_write32(w.common + register + 4, (addr >> 32) as u32);
                }
                let offset = mmio_read16(w.common + PCI_QUEUE_NOTIFY_OFF) as u64;
                *slot = w.notify + offset * w.notify_multiplier as u64;
                mmio_write16(w.common + PCI_QUEUE_ENABLE, 1);
            }
        }
        Ok(())
    }

    /// Routes the device's interrupt line to this CPU, for drivers that
    /// sleep between completions (`halt=1`). Only virtio-mmio devices
    /// whose line the command line names: false for the others.
    pub fn route_interrupts(&self) -> bool {
        match self.transport {
            Transport::Mmio { irq: Some(gsi), .. } => crate::interrupts::route(gsi),
            _ => false,
        }
    }

    pub fn driver_ok(&self) {
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    pub fn notify(&self, queue: u32) {
        fence(Ordering::SeqCst);
        match self.transport {
            Transport::Mmio { base, .. } => mmio_write32(base + MMIO_QUEUE_NOTIFY, queue),
            Transport::Pci(_) => {
                if let Some(&at) = self.notify_at.get(queue as usize).filter(|&&at| at != 0) {
                    mmio_write16(at, queue as u16);
                }
            }
        }
    }

    /// 32 bits of the device-specific configuration at `offset`.
    pub fn config_read32(&self, offset: u64) -> u32 {
        match self.transport {
            Transport::Mmio { base, .. } => mmio_read32(base + MMIO_CONFIG + offset),
            Transport::Pci(w) if w.device != 0 => mmio_read32(w.device + offset),
            Transport::Pci(_) => 0,
        }
    }

    /// The 64-bit configuration field at `offset`, read as two halves.
    pub fn config_read64(&self, offset: u64) -> u64 {
        self.config_read32(offset) as u64 | (self.config_read32(offset + 4) as u64) << 32
    }
}

/// Writes descriptor `index` of the table at `table` (a queue's, or an
/// indirect one), in RAM the driver owns.
pub fn write_desc(table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = (table + 16 * index as u64) as *mut u8;
    // SAFETY: the caller's table, with room for entry `index`.
    unsafe {
        write_volatile(d as *mut u64, addr);
        write_volatile(d.add(8) as *mut u32, len);
        write_volatile(d.add(12) as *mut u16, flags);
        write_volatile(d.add(14) as *mut u16, next);
    }
}

/// A split virtqueue in guest memory that the driver owns.
pub struct Queue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
    used_seen: u16,
    /// EVENT_IDX was negotiated (see [`Queue::use_event_idx`]).
    event_idx: bool,
    /// The avail index when we last decided whether to notify.
    notify_checked: u16,
    /// Ask for an interrupt after each completion (`interrupts=1`).
    interrupts: bool,
    /// Sleep until an interrupt when nothing completed ([`Queue::sleep_when_idle`]).
    sleeps: bool,
}

impl Queue {
    /// Lays a queue of `size` entries out at `base` (page-aligned, zeroed here).
    pub fn new(base: u64, size: u16) -> Queue {
        let desc = base;
        let avail = desc + 16 * size as u64;
        let used = (avail + 6 + 2 * size as u64 + 4095) & !4095;
        let end = used + 6 + 8 * size as u64;
        // SAFETY: the caller hands us [base, end) of RAM for the queue alone.
        unsafe { core::ptr::write_bytes(base as *mut u8, 0, (end - base) as usize) };
        // Interrupts: none asked for through the flag, unless `interrupts=1`
        // (with EVENT_IDX the device reads the used event instead).
        let interrupts = INTERRUPTS.load(Ordering::Relaxed);
        if !interrupts {
            // SAFETY: the avail ring's flags, in RAM we own.
            unsafe { write_volatile(avail as *mut u16, AVAIL_F_NO_INTERRUPT) };
        }
        Queue {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            event_idx: false,
            notify_checked: 0,
            interrupts,
            sleeps: false,
        }
    }

    /// Bytes the queue occupies from its base.
    pub fn footprint(size: u16) -> u64 {
        let avail_end = 16 * size as u64 + 6 + 2 * size as u64;
        ((avail_end + 4095) & !4095) + 6 + 8 * size as u64
    }

    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(self.desc, index, addr, len, flags, next);
    }

    /// Makes the chain at `head` available (the caller notifies).
    pub fn push(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        // SAFETY: inside the avail ring we own.
        unsafe {
            write_volatile((self.avail + 4 + 2 * slot as u64) as *mut u16, head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            write_volatile((self.avail + 2) as *mut u16, self.avail_idx);
        }
    }

    /// With EVENT_IDX negotiated: notifications by the device's avail
    /// event, and interrupts by the used event. Unless `interrupts=1`, the
    /// used event stays at 0 (zeroed with the queue), as Linux's driver
    /// leaves it while it polls: this driver polls with interrupts off, so
    /// a device that honours it interrupts once in 65,536 completions. With
    /// `interrupts=1` it follows the completions taken, as Linux's does
    /// when it waits for an interrupt.
    pub fn use_event_idx(&mut self) {
        self.event_idx = true;
    }

    /// Waits by sleeping until the device interrupts, not by polling (the
    /// device's line must be routed: [`Device::route_interrupts`]).
    pub fn sleep_when_idle(&mut self) {
        self.sleeps = true;
        // SAFETY: the avail ring's flags, in RAM we own.
        unsafe { write_volatile(self.avail as *mut u16, 0) };
    }

    /// Asks for an interrupt at the next completion, as Linux's
    /// virtio-blk driver does when it re-enables its callback.
    fn ask_for_interrupt(&self) {
        if self.event_idx {
            self.set_used_event(self.used_seen);
        }
        // The wish must be visible before we look at the used index again.
        fence(Ordering::SeqCst);
    }

    /// Whether the device wants to hear of the requests made available
    /// since we last asked (virtio 1.x, 2.7.10; as Linux's driver does):
    /// with EVENT_IDX, once the avail index passed the device's avail
    /// event; without, unless it set VIRTQ_USED_F_NO_NOTIFY in the used
    /// ring's flags because it polls the avail ring anyway.
    pub fn wants_notification(&mut self) -> bool {
        // The avail index written by `push` must be seen before we look.
        fence(Ordering::SeqCst);
        let (new, old) = (self.avail_idx, core::mem::replace(&mut self.notify_checked, self.avail_idx));
        if self.event_idx {
            let event = self.avail_event();
            return new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
        }
        // SAFETY: the used ring's flags, in RAM we own.
        unsafe { read_volatile(self.used as *const u16) & USED_F_NO_NOTIFY == 0 }
    }

    /// Whether waits sleep ([`Queue::sleep_when_idle`]) rather than poll.
    pub fn sleeps(&self) -> bool {
        self.sleeps
    }

    /// With EVENT_IDX: the device wants a notification once our avail
    /// index passes this.
    fn avail_event(&self) -> u16 {
        // SAFETY: the avail event, after the used ring, in RAM we own.
        unsafe { read_volatile((self.used + 4 + 8 * self.size as u64) as *const u16) }
    }

    /// How many completions the device has published.
    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring's index, in RAM we own.
        unsafe { read_volatile((self.used + 2) as *const u16) }
    }

    /// With EVENT_IDX: the device interrupts once its used index passes `idx`.
    fn set_used_event(&self, idx: u16) {
        // SAFETY: the used event, after the avail ring, in RAM we own.
        unsafe { write_volatile((self.avail + 4 + 2 * self.size as u64) as *mut u16, idx) };
    }

    /// The next completion (head, length), if the device has published one.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = (self.used_seen % self.size) as u64;
        let elem = self.used + 4 + 8 * slot;
        // SAFETY: as above.
        let (head, len) = unsafe { (read_volatile(elem as *const u32), read_volatile((elem + 4) as *const u32)) };
        self.used_seen = self.used_seen.wrapping_add(1);
        if self.interrupts && self.event_idx {
            // The next completion interrupts.
            self.set_used_event(self.used_seen);
        }
        Some((head as u16, len))
    }

    /// Waits for a completion; None on timeout or when the device needs a reset.
    pub fn wait_used(&mut self, device: &Device) -> Option<(u16, u32)> {
        self.wait_used_for(device, TIMEOUT_TICKS)
    }

    /// `wait_used`, giving up after `patience` TSC ticks.
    pub fn wait_used_for(&mut self, device: &Device, patience: u64) -> Option<(u16, u32)> {
        let start = rdtsc();
        let mut spins = 0u32;
        loop {
            if let Some(done) = self.pop_used() {
                return Some(done);
            }
            if self.sleeps {
                self.ask_for_interrupt();
                if let Some(done) = self.pop_used() {
                    return Some(done);
                }
                // The local APIC's tick ends this within about a second.
                crate::interrupts::halt();
                if let Some(done) = self.pop_used() {
                    return Some(done);
                }
                // Woken with nothing done: the tick, or a device in trouble.
                if self.gives_up(device, start, patience) {
                    return None;
                }
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(65536) && self.gives_up(device, start, patience) {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Whether a wait begun at `start` ends with nothing: the device needs a
    /// reset, or `patience` ran out. A timeout prints the ring's indices, so
    /// that a lost notification (the device's avail event behind our avail
    /// index, no kick sent) reads apart from a device that took the
    /// requests and never completed them.
    fn gives_up(&self, device: &Device, start: u64, patience: u64) -> bool {
        if device.status() & STATUS_NEEDS_RESET != 0 {
            return true;
        }
        if rdtsc() - start <= patience {
            return false;
        }
        crate::println!(
            "virtqueue: no completion in time: avail index {}, used index {} ({} taken), device's avail event {}{}, notify checked at {}",
            self.avail_idx,
            self.used_idx(),
            self.used_seen,
            self.avail_event(),
            if self.event_idx { "" } else { " (no EVENT_IDX)" },
            self.notify_checked
        );
        true
    }
}
