//! A request-level device's staging area: a memfd of
//! [`STAGING_BYTES`] made afresh for each device process, into which the
//! device writes the bytes of the completions it sends with
//! `complete_staged`, and from which the VMM copies them into guest RAM.
//! It is never guest RAM and never shared between devices, so a device
//! that maps it reaches nothing it did not write itself.
//!
//! The VMM maps it read-only and seals its size before the device gets it:
//! a device cannot shrink it under the VMM's mapping (a SIGBUS in the VMM),
//! and cannot make the VMM read outside it, as every range is checked. What
//! the device changes while the VMM copies only changes bytes the device
//! was entitled to write into its own granted buffers anyway.
use rpc_schema::{MemoryError, STAGING_BYTES};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, MmapRegion, VolatileMemory, VolatileSlice,
};

#[derive(Debug)]
pub struct Staging {
    file: File,
    map: MmapRegion,
}

impl Staging {
    /// A new, sealed staging area, mapped here to read.
    pub fn new() -> std::io::Result<Staging> {
        // SAFETY: memfd_create with a valid name; the descriptor is owned at once.
        let fd = unsafe { libc::memfd_create(c"skvm-staging".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(STAGING_BYTES)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our own memfd.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let offset = FileOffset::new(file.try_clone()?, 0);
        let map = MmapRegion::build(Some(offset), STAGING_BYTES as usize, libc::PROT_READ, libc::MAP_SHARED)
            .map_err(std::io::Error::other)?;
        Ok(Staging { file, map })
    }

    /// The descriptor the device process maps.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The staged bytes at `at`, `len` long: refused unless wholly inside.
    pub fn bytes(&self, at: u32, len: u32) -> Result<VolatileSlice<'_>, MemoryError> {
        self.map
            .as_volatile_slice()
            .subslice(at as usize, len as usize)
            .map_err(|_| MemoryError::OutsideStaging { at, len })
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
        let device = unsafe { File::from_raw_fd(libc::dup(staging.fd())) };
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
}
