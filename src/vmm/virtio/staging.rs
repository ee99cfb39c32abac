//! A request-level device's two staging areas, made afresh for each device
//! process, each a memfd of [`STAGING_BYTES`] in [`STAGING_SLOTS`] slots:
//! the *answer* area, where the device leaves the bytes of its answers and
//! the VMM copies them into guest RAM, and the *posting* area, where the
//! VMM leaves the readable bytes of the requests it posts. Neither is ever
//! guest RAM or shared between devices, so a device that maps them reaches
//! nothing but what it wrote itself and what was posted to it.
//!
//! Each is written by one side only. The VMM maps the answer area
//! read-only; it maps the posting area to write and then seals it against
//! new writable mappings, so the device can map it only to read. Both are
//! sealed at their size before the device gets them: it cannot shrink one
//! under the VMM's mapping (a SIGBUS in the VMM). Every staged range the
//! device names is checked against the area; what the device changes while
//! the VMM copies only changes bytes it was entitled to write into its own
//! granted buffers anyway.
use rpc_schema::{MemoryError, StagedBytes, STAGING_BYTES, STAGING_SLOTS, STAGING_SLOT_BYTES};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Mutex;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, MmapRegion, VolatileMemory, VolatileSlice,
};

#[derive(Debug)]
pub struct Staging {
    answers: Area,
    posts: Area,
    /// Posting slots no batch in flight uses.
    free_posts: Mutex<Vec<u8>>,
    /// Answer slots whose bytes are in guest RAM (or never will be), to
    /// hand back to the device with the next batch. Per process, as the
    /// slots are: a driver reset keeps the process and so these.
    answered: Mutex<Vec<u8>>,
}

#[derive(Debug)]
struct Area {
    file: File,
    map: MmapRegion,
}

impl Area {
    /// A sealed memfd of [`STAGING_BYTES`], mapped here with `prot`; with
    /// `writable`, nobody may map it to write after us.
    fn new(name: &std::ffi::CStr, writable: bool) -> std::io::Result<Area> {
        // SAFETY: memfd_create with a valid name; the descriptor is owned at once.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(STAGING_BYTES)?;
        seal(&file, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)?;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        let offset = FileOffset::new(file.try_clone()?, 0);
        let map = MmapRegion::build(Some(offset), STAGING_BYTES as usize, prot, libc::MAP_SHARED)
            .map_err(std::io::Error::other)?;
        let last = if writable { libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL } else { libc::F_SEAL_SEAL };
        seal(&file, last)?;
        Ok(Area { file, map })
    }
}

fn seal(file: &File, seals: i32) -> std::io::Result<()> {
    // SAFETY: F_ADD_SEALS on our own memfd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Staging {
    /// New staging areas for one device process.
    pub fn new() -> std::io::Result<Staging> {
        Ok(Staging {
            answers: Area::new(c"skvm-staging", false)?,
            posts: Area::new(c"skvm-posting", true)?,
            free_posts: Mutex::new((0..STAGING_SLOTS).rev().collect()),
            answered: Mutex::new(Vec::new()),
        })
    }

    /// The descriptors the device process maps: the answer area, the posting area.
    pub fn fds(&self) -> (RawFd, RawFd) {
        (self.answers.file.as_raw_fd(), self.posts.file.as_raw_fd())
    }

    /// Staged answer bytes at `at`, `len` long: refused unless wholly inside.
    pub fn bytes(&self, at: u32, len: u32) -> Result<VolatileSlice<'_>, MemoryError> {
        let area = self.answers.map.as_volatile_slice();
        area.subslice(at as usize, len as usize).map_err(|_| MemoryError::OutsideStaging { at, len })
    }

    /// The VMM is done with the answer slot `slot`, if any.
    pub fn answered(&self, slot: Option<u8>) {
        self.answered.lock().unwrap_or_else(|e| e.into_inner()).extend(slot);
    }

    /// The answer slots to hand back now.
    pub fn take_answered(&self) -> Vec<u8> {
        std::mem::take(&mut *self.answered.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A posting slot for a batch, if one is free.
    pub fn take_post_slot(&self) -> Option<u8> {
        self.free_posts.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// The batch that used `slot` was answered (or will never be).
    pub fn free_post_slot(&self, slot: u8) {
        self.free_posts.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
    }

    /// Copies guest RAM `ranges` (address, length) into posting slot `slot`
    /// at `offset`, back to back; None if they do not fit or are not RAM.
    pub fn post(&self, slot: u8, offset: u64, mem: &GuestMemoryMmap, ranges: &[(u64, u32)]) -> Option<StagedBytes> {
        let len: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        if offset + len > STAGING_SLOT_BYTES {
            return None;
        }
        let start = slot as u64 * STAGING_SLOT_BYTES + offset;
        let area = self.posts.map.as_volatile_slice();
        let mut at = start as usize;
        for &(addr, len) in ranges {
            for piece in mem.get_slices(GuestAddress(addr), len as usize) {
                let piece = piece.ok()?;
                piece.copy_to_volatile_slice(area.subslice(at, piece.len()).ok()?);
                at += piece.len();
            }
        }
        Some(StagedBytes { at: start as u32, len: len as u32 })
    }

    /// Bytes this side staged with [`Staging::post`].
    #[cfg(test)]
    pub fn posted(&self, staged: StagedBytes) -> Vec<u8> {
        let mut bytes = vec![0u8; staged.len as usize];
        let area = self.posts.map.as_volatile_slice();
        if let Ok(from) = area.subslice(staged.at as usize, staged.len as usize) {
            from.copy_to(&mut bytes[..]);
        }
        bytes
    }
}

/// Copies `bytes` into guest RAM at `addr` (across regions); false when
/// the range is not all RAM (any more): the guest's own loss.
pub fn store<B: BitmapSlice>(mem: &GuestMemoryMmap, addr: u64, bytes: &VolatileSlice<'_, B>) -> bool {
    let mut done = 0;
    for piece in mem.get_slices(GuestAddress(addr), bytes.len()) {
        let Ok(piece) = piece else { return false };
        let Ok(from) = bytes.subslice(done, piece.len()) else { return false };
        from.copy_to_volatile_slice(piece);
        done += piece.len();
    }
    done == bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn staged_bytes_reach_guest_ram_and_nothing_outside_the_area_is_read() {
        let staging = Staging::new().unwrap();
        // The device's view: the same memfd, written through its descriptor.
        // SAFETY: dup of our own descriptor, owned at once.
        let device = unsafe { File::from_raw_fd(libc::dup(staging.fds().0)) };
        device.write_all_at(b"frame bytes", 4096).unwrap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0x2000)]).unwrap();
        // Across the two regions' boundary.
        assert!(store(&mem, 0x1ffa, &staging.bytes(4096, 11).unwrap()));
        let mut back = [0u8; 11];
        vm_memory::Bytes::read_slice(&mem, &mut back, GuestAddress(0x1ffa)).unwrap();
        assert_eq!(&back, b"frame bytes");
        assert!(!store(&mem, 0x3ffa, &staging.bytes(4096, 11).unwrap()), "past the end of RAM");
        let end = STAGING_BYTES as u32;
        assert_eq!(staging.bytes(end - 4, 5).unwrap_err(), MemoryError::OutsideStaging { at: end - 4, len: 5 });
        assert!(staging.bytes(u32::MAX, u32::MAX).is_err(), "an overflowing range");
        assert!(staging.bytes(end - 4, 4).is_ok());
        // The device cannot shrink it under the VMM's mapping.
        assert!(device.set_len(4096).is_err(), "the size is sealed");
        assert_eq!(device.metadata().unwrap().len(), STAGING_BYTES);
    }

    #[test]
    fn posted_bytes_land_in_their_slot_and_the_device_can_only_read_them() {
        let staging = Staging::new().unwrap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0x2000)]).unwrap();
        vm_memory::Bytes::write_slice(&mem, b"head", GuestAddress(0x100)).unwrap();
        vm_memory::Bytes::write_slice(&mem, b"across", GuestAddress(0x1ffd)).unwrap();
        let slot = staging.take_post_slot().unwrap();
        let staged = staging.post(slot, 10, &mem, &[(0x100, 4), (0x1ffd, 6)]).unwrap();
        let at = slot as u64 * STAGING_SLOT_BYTES + 10;
        assert_eq!(staged, StagedBytes { at: at as u32, len: 10 });
        // SAFETY: dup of our own descriptor, owned at once.
        let device = unsafe { File::from_raw_fd(libc::dup(staging.fds().1)) };
        let mut seen = [0u8; 10];
        device.read_exact_at(&mut seen, at).unwrap();
        assert_eq!(&seen, b"headacross");
        assert_eq!(staging.posted(staged), b"headacross");
        assert!(staging.post(slot, STAGING_SLOT_BYTES - 9, &mem, &[(0x100, 10)]).is_none(), "past the slot");
        assert!(staging.post(slot, 0, &mem, &[(0x3ffc, 8)]).is_none(), "not RAM");
        // The device may read it, never write it, whatever it maps.
        assert!(device.write_all_at(b"x", 0).is_err(), "written through the descriptor");
        // SAFETY: a shared writable mapping of the memfd, which must be refused.
        let writable = unsafe {
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_WRITE, libc::MAP_SHARED, device.as_raw_fd(), 0)
        };
        assert_eq!(writable, libc::MAP_FAILED, "mapped to write");
        // Slots: each once, until freed.
        let mut taken = vec![slot];
        taken.extend(std::iter::from_fn(|| staging.take_post_slot()));
        assert_eq!(taken.len(), STAGING_SLOTS as usize);
        staging.free_post_slot(slot);
        assert_eq!(staging.take_post_slot(), Some(slot));
    }
}
