//! The device's side of its staging area (`rpc` mode): a memfd of
//! [`STAGING_BYTES`] the VMM made for this process alone and sealed at that
//! size, cut into [`STAGING_SLOTS`] slots. An answer to a batch leaves its
//! completions' bytes in a free slot and names them by offset, so they
//! cross with one copy in and one out, instead of being encoded, copied
//! through the socket both ways and decoded into a new buffer each. The
//! slot is the VMM's until it hands it back with a later batch; with no
//! slot free, the bytes travel inline as before.
use rpc_schema::{
    Answer, CompletedRequest, StagedCompletion, StagedWrite, STAGING_BYTES, STAGING_SLOTS, STAGING_SLOT_BYTES,
};
use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Mutex;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

#[derive(Debug)]
pub struct StagingArea {
    map: MmapRegion,
    /// Slots whose bytes the VMM has taken (or that never held any).
    free: Mutex<Vec<u8>>,
}

impl StagingArea {
    /// Maps the area the VMM handed over as `fd` (before confinement: the
    /// sandbox forbids mapping files), and closes the descriptor.
    pub fn map(fd: RawFd) -> Result<StagingArea, String> {
        // SAFETY: a descriptor the VMM handed us to own.
        let file = unsafe { File::from_raw_fd(fd) };
        let size = file.metadata().map_err(|e| format!("staging area: {e}"))?.len();
        if size != STAGING_BYTES {
            return Err(format!("staging area: {size} bytes, not {STAGING_BYTES}"));
        }
        let offset = FileOffset::new(file, 0);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let map = MmapRegion::build(Some(offset), size as usize, prot, libc::MAP_SHARED)
            .map_err(|e| format!("staging area: {e}"))?;
        Ok(StagingArea { map, free: Mutex::new((0..STAGING_SLOTS).rev().collect()) })
    }

    /// Takes back the slots the VMM is done with.
    pub fn free(&self, slots: &[u8]) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        for &slot in slots {
            // The VMM hands back only what it was given; anything else is ignored.
            if slot < STAGING_SLOTS && !free.contains(&slot) {
                free.push(slot);
            }
        }
    }

    /// The answer to a batch: its completions' bytes in a free slot, or
    /// inline when there are none, none is free, or they do not fit.
    pub fn stage(&self, completions: Vec<CompletedRequest>) -> Answer {
        let total: u64 = completions.iter().flat_map(|c| &c.writes).map(|w| w.data.len() as u64).sum();
        let slot = match total {
            1..=STAGING_SLOT_BYTES => self.free.lock().unwrap_or_else(|e| e.into_inner()).pop(),
            _ => None,
        };
        let Some(slot) = slot else { return Answer { completions, ..Default::default() } };
        let area = self.map.as_volatile_slice();
        let mut at = slot as usize * STAGING_SLOT_BYTES as usize;
        let staged = completions.iter().map(|c| {
            let writes = c.writes.iter().map(|w| {
                let len = w.data.len();
                // Within the slot: their sum fits, checked above.
                if let Ok(room) = area.subslice(at, len) {
                    room.copy_from(&w.data[..]);
                }
                let write = StagedWrite { buffer: w.buffer, offset: w.offset, at: at as u32, len: len as u32 };
                at += len;
                write
            });
            StagedCompletion { grant: c.grant, used_len: c.used_len, writes: writes.collect() }
        });
        Answer { completions: Vec::new(), staged: staged.collect(), slot: Some(slot) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_schema::BufferWrite;
    use serde_bytes::ByteBuf;
    use std::os::fd::IntoRawFd;
    use std::os::unix::fs::FileExt;

    fn memfd(size: u64) -> File {
        // SAFETY: memfd_create with a valid name; owned at once.
        let file = unsafe { File::from_raw_fd(libc::memfd_create(c"test".as_ptr(), 0)) };
        file.set_len(size).unwrap();
        file
    }

    fn write(buffer: u16, data: &[u8]) -> BufferWrite {
        BufferWrite { buffer, offset: 12, data: ByteBuf::from(data.to_vec()) }
    }

    #[test]
    fn an_answer_is_staged_back_to_back_in_a_free_slot_until_handed_back() {
        let file = memfd(STAGING_BYTES);
        let vmm_view = file.try_clone().unwrap();
        let area = StagingArea::map(file.into_raw_fd()).unwrap();
        let completions = vec![
            CompletedRequest { grant: 7, used_len: 15, writes: vec![write(0, b"header"), write(1, b"frame")] },
            CompletedRequest { grant: 9, used_len: 0, writes: vec![] },
            CompletedRequest { grant: 8, used_len: 4, writes: vec![write(0, b"next")] },
        ];
        let answer = area.stage(completions.clone());
        let slot = answer.slot.expect("a slot");
        assert!(answer.completions.is_empty());
        let base = slot as u32 * STAGING_SLOT_BYTES as u32;
        let at = |buffer, at, len| StagedWrite { buffer, offset: 12, at: base + at, len };
        let named: Vec<_> = answer.staged.iter().map(|c| (c.grant, c.used_len, c.writes.clone())).collect();
        assert_eq!(named, vec![(7, 15, vec![at(0, 0, 6), at(1, 6, 5)]), (9, 0, vec![]), (8, 4, vec![at(0, 11, 4)])]);
        let mut seen = [0u8; 15];
        vmm_view.read_exact_at(&mut seen, base as u64).unwrap();
        assert_eq!(&seen, b"headerframenext");

        // Every slot taken: the next answer goes inline, until one comes back.
        let mut taken = vec![slot];
        for _ in 1..STAGING_SLOTS {
            taken.push(area.stage(completions.clone()).slot.expect("a free slot"));
        }
        taken.sort_unstable();
        assert_eq!(taken, (0..STAGING_SLOTS).collect::<Vec<_>>(), "each slot once");
        let inline = area.stage(completions.clone());
        assert_eq!((inline.slot, &inline.completions), (None, &completions));
        area.free(&[slot, slot, 200]);
        assert_eq!(area.stage(completions.clone()).slot, Some(slot), "handed back once; 200 is no slot");
        assert_eq!(area.stage(completions.clone()).slot, None);

        // Nothing to stage, or more than a slot: inline.
        area.free(&[slot]);
        let empty = vec![CompletedRequest { grant: 1, used_len: 0, writes: vec![] }];
        assert_eq!(area.stage(empty).slot, None);
        let big = vec![CompletedRequest {
            grant: 1,
            used_len: 0,
            writes: vec![write(0, &vec![0; STAGING_SLOT_BYTES as usize + 1])],
        }];
        assert_eq!(area.stage(big).slot, None);
    }

    #[test]
    fn an_area_of_the_wrong_size_is_refused() {
        assert!(StagingArea::map(memfd(4096).into_raw_fd()).unwrap_err().contains("4096 bytes"));
    }
}
