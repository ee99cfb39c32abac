//! Guest RAM: anonymous mappings registered with KVM as memory slots.
//!
//! The map lives behind a `GuestMemoryAtomic`, so it can later be swapped
//! whole (memory hotplug) while vCPUs and device servers read a snapshot.
use super::layout::{EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};
use super::{Error, Result};
use crate::devices::process::SharedRegion;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

pub type GuestMemory = GuestMemoryMmap<()>;

const MIB: u64 = 1 << 20;

/// The kind of an entry in the memory map given to the guest (e820 types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub start: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// Host mappings backing `size` bytes of guest RAM: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), (size - low) as usize));
    }
    ranges
}

/// The memory map the guest sees. The legacy BIOS area below 1 MiB is
/// reserved: it holds the ACPI tables, and kernels expect it not to be RAM.
pub fn memory_map(size: u64) -> Vec<MemoryMapEntry> {
    let low_end = size.min(MMIO_HOLE_START);
    let mut map = vec![
        MemoryMapEntry { start: 0, size: EBDA_START, kind: MemoryKind::Ram },
        MemoryMapEntry { start: EBDA_START, size: HIMEM_START - EBDA_START, kind: MemoryKind::Reserved },
        MemoryMapEntry { start: HIMEM_START, size: low_end - HIMEM_START, kind: MemoryKind::Ram },
    ];
    if size > low_end {
        map.push(MemoryMapEntry { start: MMIO_HOLE_END, size: size - low_end, kind: MemoryKind::Ram });
    }
    map
}

fn host_ram_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub struct GuestRam {
    memory: GuestMemoryAtomic<GuestMemory>,
    size: u64,
    /// Backing file when RAM must be shareable with device processes.
    memfd: Option<File>,
}

fn create_memfd(size: u64) -> Result<File> {
    // SAFETY: valid NUL-terminated name; the new descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"skvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Host("memfd_create for guest RAM".into(), std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::Host("sizing the guest RAM memfd".into(), e))?;
    Ok(file)
}

impl GuestRam {
    /// `shareable` backs RAM with a memfd that device processes can map
    /// (the `shared` memory mode); otherwise it is private anonymous memory.
    pub fn new(size: u64, shareable: bool) -> Result<Self> {
        if let Some(host) = host_ram_bytes() {
            if size > host {
                return Err(Error::MemoryTooLarge { requested: size / MIB, available: host / MIB });
            }
        }
        let ranges = ram_ranges(size);
        let alloc_err = |e| Error::AllocateMemory(size / MIB, e);
        let (mmap, memfd) = if shareable {
            let file = create_memfd(size)?;
            let mut offset = 0u64;
            let mut with_files = Vec::with_capacity(ranges.len());
            for &(addr, len) in &ranges {
                let handle = file.try_clone().map_err(|e| Error::Host("cloning the RAM memfd".into(), e))?;
                with_files.push((addr, len, Some(FileOffset::new(handle, offset))));
                offset += len as u64;
            }
            (GuestMemory::from_ranges_with_files(with_files).map_err(alloc_err)?, Some(file))
        } else {
            (GuestMemory::from_ranges(&ranges).map_err(alloc_err)?, None)
        };
        Ok(GuestRam { memory: GuestMemoryAtomic::new(mmap), size, memfd })
    }

    /// A handle on the swappable map, for device memory servers.
    pub fn atomic(&self) -> GuestMemoryAtomic<GuestMemory> {
        self.memory.clone()
    }

    pub fn memfd(&self) -> Option<RawFd> {
        self.memfd.as_ref().map(|f| f.as_raw_fd())
    }

    pub fn memfd_file(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// Where each piece of the memfd sits in the guest.
    pub fn shared_regions(&self) -> Vec<SharedRegion> {
        let mut offset = 0;
        ram_ranges(self.size)
            .into_iter()
            .map(|(addr, len)| {
                let region = SharedRegion { guest_addr: addr.0, size: len as u64, file_offset: offset };
                offset += len as u64;
                region
            })
            .collect()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// A snapshot of the current map.
    pub fn memory(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemory> {
        self.memory.memory()
    }

    /// Registers every region with KVM, one slot each.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        let memory = self.memory();
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|_| Error::Boot("guest memory region has no host mapping".into()))?;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping stays alive as long as the VM: GuestRam outlives
            // every vCPU, and skvm exits without unmapping guest memory.
            unsafe { vm.set_user_memory_region(slot_region) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_low_range() {
        assert_eq!(ram_ranges(512 * MIB), vec![(GuestAddress(0), (512 * MIB) as usize)]);
        let map = memory_map(512 * MIB);
        let ram: u64 = map.iter().filter(|e| e.kind == MemoryKind::Ram).map(|e| e.size).sum();
        assert_eq!(ram, 512 * MIB - (HIMEM_START - EBDA_START));
        assert_eq!(map.last().unwrap().start + map.last().unwrap().size, 512 * MIB);
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let size = 4096 * MIB;
        let ranges = ram_ranges(size);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(ranges[1], (GuestAddress(MMIO_HOLE_END), (size - MMIO_HOLE_START) as usize));
        let last = memory_map(size).pop().unwrap();
        assert_eq!(last.start + last.size, MMIO_HOLE_END + size - MMIO_HOLE_START);
    }
}
