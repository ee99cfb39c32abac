//! The device's side of its two staging areas (`rpc` mode): memfds of
//! [`STAGING_BYTES`] the VMM made for this process alone and sealed at that
//! size, cut into [`STAGING_SLOTS`] slots. An answer to a batch leaves its
//! completions' bytes in a free slot of the answer area and names them by
//! offset, so they cross with one copy in and one out, instead of being
//! encoded, copied through the socket both ways and decoded into a new
//! buffer each. The slot is the VMM's until it hands it back with a later
//! batch; with no slot free, the bytes travel inline as before. The
//! posting area is the other way round: the VMM writes the readable bytes
//! of the requests it posts there, and this process may only read it.
use rpc_schema::{
    Answer, CompletedRequest, PostedRequest, StagedCompletion, StagedWrite, MIN_STAGED_BYTES, STAGING_BYTES,
    STAGING_SLOTS, STAGING_SLOT_BYTES,
};
use serde_bytes::ByteBuf;
use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Mutex;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

#[derive(Debug)]
pub struct StagingArea {
    map: MmapRegion,
    /// The VMM's posting area, read-only here.
    posts: MmapRegion,
    /// Slots whose bytes the VMM has taken (or that never held any).
    free: Mutex<Vec<u8>>,
}

impl StagingArea {
    /// Maps the areas the VMM handed over as `answers` and `posts` (before
    /// confinement: the sandbox forbids mapping files). The descriptors stay
    /// open with their mappings; the seals make them worth nothing more.
    pub fn map(answers: RawFd, posts: RawFd) -> Result<StagingArea, String> {
        let map = map_area(answers, libc::PROT_READ | libc::PROT_WRITE)?;
        let posts = map_area(posts, libc::PROT_READ)?;
        Ok(StagingArea { map, posts, free: Mutex::new((0..STAGING_SLOTS).rev().collect()) })
    }

    /// Each request's readable bytes the VMM staged, into the request
    /// (where device logic finds inline bytes); Err for a range outside
    /// the posting area.
    pub fn take_posted(&self, batch: &mut [PostedRequest]) -> Result<(), String> {
        let area = self.posts.as_volatile_slice();
        for request in batch {
            if let Some(staged) = request.staged.take() {
                let from = area.subslice(staged.at as usize, staged.len as usize);
                let from = from.map_err(|_| format!("posted bytes {staged:?} are outside the posting area"))?;
                let mut bytes = vec![0u8; staged.len as usize];
                from.copy_to(&mut bytes[..]);
                request.readable = ByteBuf::from(bytes);
            }
        }
        Ok(())
    }

    /// Takes back the answer slots the VMM is done with.
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
    /// inline when there are none, none is free, or they do not fit. The
    /// buffers of bytes staged go to `spent`, for the device to reuse.
    pub fn stage(&self, completions: Vec<CompletedRequest>, spent: &mut Vec<Vec<u8>>) -> Answer {
        let total: u64 = completions.iter().flat_map(|c| &c.writes).map(|w| w.data.len() as u64).sum();
        let slot = match total {
            MIN_STAGED_BYTES..=STAGING_SLOT_BYTES => self.free.lock().unwrap_or_else(|e| e.into_inner()).pop(),
            _ => None,
        };
        let Some(slot) = slot else { return Answer { completions, ..Default::default() } };
        let area = self.map.as_volatile_slice();
        let mut at = slot as usize * STAGING_SLOT_BYTES as usize;
        let staged = completions.into_iter().map(|c| {
            let writes = c.writes.into_iter().map(|w| {
                let len = w.data.len();
                // Within the slot: their sum fits, checked above.
                if let Ok(room) = area.subslice(at, len) {
                    room.copy_from(&w.data[..]);
                }
                let write = StagedWrite { buffer: w.buffer, offset: w.offset, at: at as u32, len: len as u32 };
                spent.push(w.data.into_vec());
                at += len;
                write
            });
            StagedCompletion { grant: c.grant, used_len: c.used_len, writes: writes.collect() }
        });
        Answer { completions: Vec::new(), staged: staged.collect(), slot: Some(slot) }
    }
}

/// Maps one staging area of the expected size (the mapping keeps its descriptor).
fn map_area(fd: RawFd, prot: i32) -> Result<MmapRegion, String> {
    // SAFETY: a descriptor the VMM handed us to own.
    let file = unsafe { File::from_raw_fd(fd) };
    let size = file.metadata().map_err(|e| format!("staging area: {e}"))?.len();
    if size != STAGING_BYTES {
        return Err(format!("staging area: {size} bytes, not {STAGING_BYTES}"));
    }
    let offset = FileOffset::new(file, 0);
    MmapRegion::build(Some(offset), size as usize, prot, libc::MAP_SHARED).map_err(|e| format!("staging area: {e}"))
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
        let area = StagingArea::map(file.into_raw_fd(), memfd(STAGING_BYTES).into_raw_fd()).unwrap();
        let frame = [b'f'; 600];
        let completions = vec![
            CompletedRequest { grant: 7, used_len: 606, writes: vec![write(0, b"header"), write(1, &frame)] },
            CompletedRequest { grant: 9, used_len: 0, writes: vec![] },
            CompletedRequest { grant: 8, used_len: 4, writes: vec![write(0, b"next")] },
        ];
        let mut spent = Vec::new();
        let answer = area.stage(completions.clone(), &mut spent);
        let slot = answer.slot.expect("a slot");
        assert_eq!(spent, [&b"header"[..], &frame, b"next"].map(<[u8]>::to_vec), "the staged bytes' buffers, to reuse");
        assert!(answer.completions.is_empty());
        let base = slot as u32 * STAGING_SLOT_BYTES as u32;
        let at = |buffer, at, len| StagedWrite { buffer, offset: 12, at: base + at, len };
        let named: Vec<_> = answer.staged.iter().map(|c| (c.grant, c.used_len, c.writes.clone())).collect();
        assert_eq!(
            named,
            vec![(7, 606, vec![at(0, 0, 6), at(1, 6, 600)]), (9, 0, vec![]), (8, 4, vec![at(0, 606, 4)])]
        );
        let mut seen = [0u8; 610];
        vmm_view.read_exact_at(&mut seen, base as u64).unwrap();
        assert_eq!(seen.to_vec(), [&b"header"[..], &frame, b"next"].concat());

        // Every slot taken: the next answer goes inline, until one comes back.
        let mut taken = vec![slot];
        for _ in 1..STAGING_SLOTS {
            taken.push(area.stage(completions.clone(), &mut Vec::new()).slot.expect("a free slot"));
        }
        taken.sort_unstable();
        assert_eq!(taken, (0..STAGING_SLOTS).collect::<Vec<_>>(), "each slot once");
        let mut spent = Vec::new();
        let inline = area.stage(completions.clone(), &mut spent);
        assert_eq!((inline.slot, &inline.completions, spent.len()), (None, &completions, 0));
        area.free(&[slot, slot, 200]);
        assert_eq!(
            area.stage(completions.clone(), &mut Vec::new()).slot,
            Some(slot),
            "handed back once; 200 is no slot"
        );
        assert_eq!(area.stage(completions.clone(), &mut Vec::new()).slot, None);

        // Nothing to stage, too little to be worth a slot, or more than a slot: inline.
        area.free(&[slot]);
        let empty = vec![CompletedRequest { grant: 1, used_len: 0, writes: vec![] }];
        assert_eq!(area.stage(empty, &mut Vec::new()).slot, None);
        let status = vec![CompletedRequest { grant: 1, used_len: 1, writes: vec![write(0, &[0])] }];
        assert_eq!(area.stage(status, &mut Vec::new()).slot, None);
        let big = vec![CompletedRequest {
            grant: 1,
            used_len: 0,
            writes: vec![write(0, &vec![0; STAGING_SLOT_BYTES as usize + 1])],
        }];
        assert_eq!(area.stage(big, &mut Vec::new()).slot, None);
    }

    #[test]
    fn posted_bytes_are_taken_from_the_posting_area_and_checked() {
        let posts = memfd(STAGING_BYTES);
        posts.write_all_at(b"readable", 1 << 20).unwrap();
        let area = StagingArea::map(memfd(STAGING_BYTES).into_raw_fd(), posts.into_raw_fd()).unwrap();
        let posted = |staged| PostedRequest {
            grant: 1,
            buffers: vec![],
            readable: ByteBuf::from(b"inline".to_vec()),
            staged,
            faulty: false,
            queue: 0,
        };
        let mut batch = vec![posted(Some(rpc_schema::StagedBytes { at: 1 << 20, len: 8 })), posted(None)];
        area.take_posted(&mut batch).unwrap();
        assert_eq!((&batch[0].readable[..], batch[0].staged), (&b"readable"[..], None));
        assert_eq!(&batch[1].readable[..], b"inline", "inline bytes stay");
        let mut outside = vec![posted(Some(rpc_schema::StagedBytes { at: STAGING_BYTES as u32 - 4, len: 8 }))];
        assert!(area.take_posted(&mut outside).unwrap_err().contains("outside the posting area"));
    }

    #[test]
    fn an_area_of_the_wrong_size_is_refused() {
        let wrong = StagingArea::map(memfd(4096).into_raw_fd(), memfd(STAGING_BYTES).into_raw_fd());
        assert!(wrong.unwrap_err().contains("4096 bytes"));
        let wrong = StagingArea::map(memfd(STAGING_BYTES).into_raw_fd(), memfd(8192).into_raw_fd());
        assert!(wrong.unwrap_err().contains("8192 bytes"));
    }
}
