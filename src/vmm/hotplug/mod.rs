//! The hotplug region behind virtio-mem: guest-physical space above RAM that
//! the guest plugs and unplugs in blocks, at run time.
//!
//! The whole region is reserved in the VMM's address space up front (no
//! memory is used until a block is touched). Each plugged block is its own
//! KVM memory slot and its own region in the guest-memory map, so a block
//! comes and goes without disturbing its neighbours. Plugging swaps in a map
//! with the new blocks before KVM learns of them; unplugging swaps them out,
//! waits until no device request still uses them, removes their slots and
//! gives the memory back to the host.
pub mod service;

use super::config::HotplugConfig;
use super::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use super::memory::{GuestMemory, GuestRam};
use super::{lock, Error, Result};
use crate::devices::process::SharedRegion;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use rpc_schema::{BlockState, HotplugError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::{debug, info};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestRegionMmap, MmapRegion};

/// Hotplug regions start on Linux's memory block size, so every block the
/// guest plugs falls inside one of its memory blocks.
pub const REGION_ALIGN: u64 = 128 << 20;
/// KVM slot of hotplug block `i` is `FIRST_SLOT + i`; boot RAM uses the slots below.
const FIRST_SLOT: u32 = 8;
/// KVM on this kind of host offers 32764 slots; keep well inside that.
pub const MAX_BLOCKS: u64 = 32_000;

/// Where the hotplug region goes: right after RAM on a 128 MiB boundary,
/// or above 4 GiB when it would run into the MMIO hole.
pub fn region_start(ram_bytes: u64, region_bytes: u64) -> u64 {
    let ram_top = if ram_bytes <= MMIO_HOLE_START { ram_bytes } else { MMIO_HOLE_END + ram_bytes - MMIO_HOLE_START };
    let start = ram_top.next_multiple_of(REGION_ALIGN);
    if start >= MMIO_HOLE_END || start + region_bytes <= MMIO_HOLE_START {
        start
    } else {
        MMIO_HOLE_END
    }
}

/// What one plug or unplug cost, for the API and the benchmarks.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct OperationTimes {
    pub blocks: u64,
    /// From the request to the new map being what every device request sees.
    pub device_visible_us: u64,
    /// KVM slot registration or removal.
    pub kvm_us: u64,
    /// Rebuilding shared-mode device sandboxes (0 in other modes).
    pub rebuild_us: u64,
    /// The longest time any rebuilt device stopped serving its queues.
    pub rebuild_stall_us: u64,
    /// Returning unplugged memory to the host (unplug only).
    pub release_us: u64,
    pub total_us: u64,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct HotplugStatus {
    pub region_start: u64,
    pub region_bytes: u64,
    pub block_bytes: u64,
    pub requested_bytes: u64,
    pub plugged_bytes: u64,
    pub plugs: u64,
    pub unplugs: u64,
    pub last_plug: Option<OperationTimes>,
    pub last_unplug: Option<OperationTimes>,
}

/// What the region needs from the rest of the VMM once devices exist.
pub trait DeviceHooks: Send + Sync {
    /// The guest should look at the virtio-mem config again (requested size changed).
    fn config_changed(&self);
    /// Shared mode: devices that map guest RAM must now map exactly `regions`.
    /// Returns the longest time one device stopped serving.
    fn remap_shared(&self, regions: &[SharedRegion]) -> std::result::Result<Duration, String>;
}

struct State {
    /// The map region of each plugged block.
    blocks: Vec<Option<Arc<GuestRegionMmap>>>,
}

/// What plugs and unplugs have happened; the rest of the status is derived.
#[derive(Default)]
struct History {
    plugs: u64,
    unplugs: u64,
    last_plug: Option<OperationTimes>,
    last_unplug: Option<OperationTimes>,
}

pub struct HotplugRegion {
    pub start: u64,
    pub size: u64,
    pub block: u64,
    /// Host address of the reservation backing the region.
    host: usize,
    /// Shared mode: the RAM memfd, which holds the region after boot RAM.
    memfd: Option<(File, u64)>,
    vm: Arc<VmFd>,
    memory: GuestMemoryAtomic<GuestMemory>,
    state: Mutex<State>,
    /// Kept apart from `state`, which a plug holds for its whole length, so
    /// that the status can be read meanwhile.
    history: Mutex<History>,
    /// Requested and plugged bytes, readable without the state lock: a vCPU
    /// reading the config space must never wait for a plug in progress.
    requested: AtomicU64,
    plugged: AtomicU64,
    hooks: OnceLock<Box<dyn DeviceHooks>>,
}

// SAFETY: `host` is an address, used only to build mappings and call madvise.
unsafe impl Sync for HotplugRegion {}
// SAFETY: as above.
unsafe impl Send for HotplugRegion {}

fn block_error(what: String) -> HotplugError {
    HotplugError::Invalid(what)
}

impl HotplugRegion {
    /// Reserves host address space for the region; nothing is plugged yet.
    pub fn new(config: &HotplugConfig, ram: &GuestRam, vm: Arc<VmFd>) -> Result<Self> {
        let start = region_start(ram.size(), config.size);
        let memfd = match ram.memfd_file() {
            Some(file) => {
                let file = file.try_clone().map_err(|e| Error::Host("cloning the RAM memfd".into(), e))?;
                file.set_len(ram.size() + config.size)
                    .map_err(|e| Error::Host("sizing the RAM memfd for the hotplug region".into(), e))?;
                Some((file, ram.size()))
            }
            None => None,
        };
        let (flags, fd, offset) = match &memfd {
            Some((file, offset)) => (libc::MAP_SHARED | libc::MAP_NORESERVE, file.as_raw_fd(), *offset as i64),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0),
        };
        // SAFETY: a fresh mapping; nothing else refers to it yet.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                config.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(Error::Host("reserving the hotplug region".into(), std::io::Error::last_os_error()));
        }
        let blocks = (config.size / config.block) as usize;
        info!("hotplug region {:#x}+{} MiB in {} MiB blocks", start, config.size >> 20, config.block >> 20);
        Ok(HotplugRegion {
            start,
            size: config.size,
            block: config.block,
            host: host as usize,
            memfd,
            vm,
            memory: ram.atomic(),
            state: Mutex::new(State { blocks: vec![None; blocks] }),
            history: Mutex::default(),
            requested: AtomicU64::new(0),
            plugged: AtomicU64::new(0),
            hooks: OnceLock::new(),
        })
    }

    /// Connects the region to the devices once they exist.
    pub fn attach(&self, hooks: Box<dyn DeviceHooks>) {
        let _ = self.hooks.set(hooks);
    }

    pub fn status(&self) -> HotplugStatus {
        let history = lock(&self.history);
        HotplugStatus {
            region_start: self.start,
            region_bytes: self.size,
            block_bytes: self.block,
            requested_bytes: self.requested.load(Ordering::SeqCst),
            plugged_bytes: self.plugged.load(Ordering::SeqCst),
            plugs: history.plugs,
            unplugs: history.unplugs,
            last_plug: history.last_plug,
            last_unplug: history.last_unplug,
        }
    }

    /// The virtio-mem configuration space (virtio 1.2, 5.15.4), read live.
    pub fn config_space(&self) -> Vec<u8> {
        let (plugged, requested) = (self.plugged.load(Ordering::SeqCst), self.requested.load(Ordering::SeqCst));
        let mut config = Vec::with_capacity(56);
        config.extend_from_slice(&self.block.to_le_bytes());
        config.extend_from_slice(&[0u8; 8]); // node_id and padding
        for value in [self.start, self.size, self.size, plugged, requested] {
            config.extend_from_slice(&value.to_le_bytes());
        }
        config
    }

    /// Sets the size the guest is asked to have plugged (the API's resize).
    pub fn request(&self, bytes: u64) -> std::result::Result<(), String> {
        if bytes > self.size {
            return Err(format!("{} MiB is more than the hotplug region's {} MiB", bytes >> 20, self.size >> 20));
        }
        if bytes % self.block != 0 {
            return Err(format!("{bytes} bytes is not a multiple of the {} MiB block size", self.block >> 20));
        }
        self.requested.store(bytes, Ordering::SeqCst);
        if let Some(hooks) = self.hooks.get() {
            hooks.config_changed();
        }
        Ok(())
    }

    /// The block indices of `[addr, addr + blocks * block)`, if it is a valid range.
    fn range(&self, addr: u64, blocks: u16) -> std::result::Result<std::ops::Range<usize>, HotplugError> {
        if blocks == 0 {
            return Err(block_error("a request for zero blocks".into()));
        }
        if addr < self.start || (addr - self.start) % self.block != 0 {
            return Err(block_error(format!("{addr:#x} is not a block of the region")));
        }
        // Counted in blocks: any guest address is accepted here, and in bytes
        // the end of a range far beyond the region would wrap around.
        let (first, count) = ((addr - self.start) / self.block, self.size / self.block);
        if first >= count || u64::from(blocks) > count - first {
            return Err(block_error(format!("{addr:#x} + {blocks} blocks runs past the region")));
        }
        Ok(first as usize..(first + u64::from(blocks)) as usize)
    }

    pub fn state_of(&self, addr: u64, blocks: u16) -> std::result::Result<BlockState, HotplugError> {
        let range = self.range(addr, blocks)?;
        let state = lock(&self.state);
        let plugged = state.blocks[range.clone()].iter().filter(|b| b.is_some()).count();
        Ok(match plugged {
            0 => BlockState::Unplugged,
            n if n == range.len() => BlockState::Plugged,
            _ => BlockState::Mixed,
        })
    }

    fn guest_addr(&self, block: usize) -> u64 {
        self.start + block as u64 * self.block
    }

    fn kvm_slot(&self, block: usize, size: u64) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: FIRST_SLOT + block as u32,
            flags: 0,
            guest_phys_addr: self.guest_addr(block),
            memory_size: size,
            userspace_addr: (self.host + block * self.block as usize) as u64,
        }
    }

    fn map_region(&self, block: usize) -> std::result::Result<Arc<GuestRegionMmap>, HotplugError> {
        let flags = if self.memfd.is_some() { libc::MAP_SHARED } else { libc::MAP_PRIVATE | libc::MAP_ANONYMOUS };
        let host = (self.host + block * self.block as usize) as *mut u8;
        // SAFETY: the block lies inside the reservation, which lives as long as the VMM.
        let mapping =
            unsafe { MmapRegion::build_raw(host, self.block as usize, libc::PROT_READ | libc::PROT_WRITE, flags) }
                .map_err(|e| HotplugError::Refused(format!("cannot describe block {block}: {e}")))?;
        GuestRegionMmap::new(mapping, GuestAddress(self.guest_addr(block)))
            .map(Arc::new)
            .ok_or_else(|| HotplugError::Refused("block overflows the address space".into()))
    }

    /// Plugs the blocks: the memory map first (devices can use them at once),
    /// then KVM, then shared-mode device rebuilds. Acknowledged after all three.
    pub fn plug(&self, addr: u64, blocks: u16) -> std::result::Result<(), HotplugError> {
        let started = Instant::now();
        let range = self.range(addr, blocks)?;
        let mut state = lock(&self.state);
        if state.blocks[range.clone()].iter().any(Option::is_some) {
            return Err(block_error(format!("{addr:#x} + {blocks} blocks holds plugged blocks")));
        }
        let plugged = self.plugged.load(Ordering::SeqCst) + range.len() as u64 * self.block;
        let requested = self.requested.load(Ordering::SeqCst);
        if plugged > requested {
            return Err(HotplugError::Refused(format!(
                "plugging would make {} MiB, the requested size is {} MiB",
                plugged >> 20,
                requested >> 20
            )));
        }
        // A plugged block reads zero whatever was written there while it was
        // unplugged (nothing, unless a device wrote where it should not).
        range.clone().for_each(|b| self.release(b));
        let regions = range.clone().map(|b| self.map_region(b)).collect::<std::result::Result<Vec<_>, _>>()?;
        self.swap_map(|mut map| {
            for region in &regions {
                map = map.insert_region(region.clone()).map_err(|e| e.to_string())?;
            }
            Ok(map)
        })
        .map_err(HotplugError::Refused)?;
        let visible = started.elapsed();
        for (i, block) in range.clone().enumerate() {
            // SAFETY: the block's host memory lives as long as the VMM.
            if let Err(e) = unsafe { self.vm.set_user_memory_region(self.kvm_slot(block, self.block)) } {
                // Devices may have used the blocks already: take them back as
                // an unplug would, so a later plug finds them empty.
                self.remove_slots(range.start..block);
                let _ = self.swap_map(|map| remove_from(map, &regions));
                wait_unused(&regions);
                range.clone().for_each(|b| self.release(b));
                return Err(HotplugError::Refused(format!("KVM refused block {i} of the plug: {e}")));
            }
        }
        let kvm = started.elapsed() - visible;
        for (block, region) in range.clone().zip(regions) {
            state.blocks[block] = Some(region);
        }
        let stall = self.remap_shared(&state);
        let total = started.elapsed();
        let mut history = lock(&self.history);
        // Counted plugged once every device can use it (shared-mode rebuilds
        // done), together with the plug: a client that waits for the size
        // then finds the devices as the plug left them.
        self.plugged.store(plugged, Ordering::SeqCst);
        history.plugs += 1;
        history.last_plug = Some(OperationTimes {
            blocks: range.len() as u64,
            device_visible_us: visible.as_micros() as u64,
            kvm_us: kvm.as_micros() as u64,
            rebuild_us: (total - visible - kvm).as_micros() as u64,
            rebuild_stall_us: stall.as_micros() as u64,
            release_us: 0,
            total_us: total.as_micros() as u64,
        });
        debug!("plugged {} blocks at {addr:#x} in {total:?}", range.len());
        Ok(())
    }

    /// Unplugs the blocks: out of the map (devices are refused from here on),
    /// out of KVM, out of shared-mode devices, then back to the host.
    pub fn unplug(&self, addr: u64, blocks: u16) -> std::result::Result<(), HotplugError> {
        let range = self.range(addr, blocks)?;
        let mut state = lock(&self.state);
        if state.blocks[range.clone()].iter().any(Option::is_none) {
            return Err(block_error(format!("{addr:#x} + {blocks} blocks holds unplugged blocks")));
        }
        self.unplug_blocks(&mut state, range.collect())
    }

    pub fn unplug_all(&self) -> std::result::Result<(), HotplugError> {
        let mut state = lock(&self.state);
        let plugged: Vec<usize> = (0..state.blocks.len()).filter(|&b| state.blocks[b].is_some()).collect();
        if plugged.is_empty() {
            return Ok(());
        }
        self.unplug_blocks(&mut state, plugged)
    }

    fn unplug_blocks(&self, state: &mut State, blocks: Vec<usize>) -> std::result::Result<(), HotplugError> {
        let started = Instant::now();
        let regions: Vec<_> = blocks.iter().filter_map(|&b| state.blocks[b].take()).collect();
        self.swap_map(|map| remove_from(map, &regions)).map_err(HotplugError::Refused)?;
        wait_unused(&regions);
        let visible = started.elapsed();
        for &block in &blocks {
            self.remove_slots(block..block + 1);
        }
        let kvm = started.elapsed() - visible;
        let stall = self.remap_shared(state);
        let rebuilt = started.elapsed() - visible - kvm;
        for &block in &blocks {
            self.release(block);
        }
        let total = started.elapsed();
        let mut history = lock(&self.history);
        // As for a plug: the size changes with the count, once all is done.
        self.plugged.fetch_sub(blocks.len() as u64 * self.block, Ordering::SeqCst);
        history.unplugs += 1;
        history.last_unplug = Some(OperationTimes {
            blocks: blocks.len() as u64,
            device_visible_us: visible.as_micros() as u64,
            kvm_us: kvm.as_micros() as u64,
            rebuild_us: rebuilt.as_micros() as u64,
            rebuild_stall_us: stall.as_micros() as u64,
            release_us: (total - visible - kvm - rebuilt).as_micros() as u64,
            total_us: total.as_micros() as u64,
        });
        debug!("unplugged {} blocks in {total:?}", blocks.len());
        Ok(())
    }

    fn remove_slots(&self, blocks: std::ops::Range<usize>) {
        for block in blocks {
            // SAFETY: deleting a slot (size 0) never exposes memory.
            if let Err(e) = unsafe { self.vm.set_user_memory_region(self.kvm_slot(block, 0)) } {
                tracing::warn!("KVM kept hotplug block {block}: {e}");
            }
        }
    }

    /// Gives a block's memory back to the host; it reads as zeros when plugged again.
    fn release(&self, block: usize) {
        let offset = block * self.block as usize;
        let len = self.block as usize;
        if let Some((file, base)) = &self.memfd {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: punching a hole in our own memfd, inside the region.
            unsafe { libc::fallocate(file.as_raw_fd(), mode, (*base as usize + offset) as i64, len as i64) };
        }
        // SAFETY: the block is in our reservation and no longer used by KVM or any device.
        unsafe { libc::madvise((self.host + offset) as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    }

    /// Installs `change(current map)` as the map every reader sees.
    fn swap_map(
        &self,
        change: impl FnOnce(GuestMemory) -> std::result::Result<GuestMemory, String>,
    ) -> std::result::Result<(), String> {
        let guard = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let current = (*self.memory.memory()).clone();
        guard.replace(change(current)?);
        Ok(())
    }

    /// Where the plugged blocks sit in the memfd, merged into runs (shared mode).
    fn shared_regions(&self, state: &State) -> Vec<SharedRegion> {
        let Some((_, base)) = &self.memfd else { return Vec::new() };
        let mut runs: Vec<SharedRegion> = Vec::new();
        for block in (0..state.blocks.len()).filter(|&b| state.blocks[b].is_some()) {
            let guest_addr = self.guest_addr(block);
            match runs.last_mut() {
                Some(run) if run.guest_addr + run.size == guest_addr => run.size += self.block,
                _ => runs.push(SharedRegion {
                    guest_addr,
                    size: self.block,
                    file_offset: base + block as u64 * self.block,
                }),
            }
        }
        runs
    }

    /// A device that cannot be rebuilt is failed (and its processes killed)
    /// by its host; the memory change itself stands.
    fn remap_shared(&self, state: &State) -> Duration {
        let (Some(_), Some(hooks)) = (&self.memfd, self.hooks.get()) else { return Duration::ZERO };
        hooks.remap_shared(&self.shared_regions(state)).unwrap_or_else(|e| {
            tracing::warn!("shared-mode devices after a memory change: {e}");
            Duration::ZERO
        })
    }

    /// Plugged runs to hand a shared-mode device at start.
    pub fn plugged_shared_regions(&self) -> Vec<SharedRegion> {
        self.shared_regions(&lock(&self.state))
    }
}

fn remove_from(mut map: GuestMemory, regions: &[Arc<GuestRegionMmap>]) -> std::result::Result<GuestMemory, String> {
    use vm_memory::GuestMemoryRegion;
    for region in regions {
        map = map.remove_region(region.start_addr(), region.len()).map_err(|e| e.to_string())?.0;
    }
    Ok(map)
}

/// Waits until no device request that loaded an older map still holds one
/// of `regions`: such a request may still be copying (at most 1 MiB), and
/// nothing may touch the blocks once they leave. However long it takes.
fn wait_unused(regions: &[Arc<GuestRegionMmap>]) {
    let started = Instant::now();
    let mut warn_at = started + Duration::from_secs(1);
    while regions.iter().any(|r| Arc::strong_count(r) > 1) {
        if Instant::now() > warn_at {
            tracing::warn!("a memory request still holds blocks being removed after {:?}", started.elapsed());
            warn_at += Duration::from_secs(5);
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn region_follows_ram_and_avoids_the_hole() {
        assert_eq!(region_start(512 * MIB, 1024 * MIB), 512 * MIB);
        assert_eq!(region_start(500 * MIB, 256 * MIB), 512 * MIB);
        // Would cross into the MMIO hole: goes above 4 GiB instead.
        assert_eq!(region_start(2048 * MIB, 2048 * MIB), MMIO_HOLE_END);
        // RAM already above 4 GiB: right after it.
        assert_eq!(region_start(4096 * MIB, 1024 * MIB), MMIO_HOLE_END + 1024 * MIB);
    }
}
