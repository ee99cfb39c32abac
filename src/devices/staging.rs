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
use super::request::PostedView;
use rpc_schema::{
    Answer, BufferWrite, CompletedRequest, StagedBytes, StagedCompletion, StagedWrite, MIN_STAGED_BYTES, STAGING_BYTES,
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

    /// Where the VMM staged a request's readable bytes in the posting
    /// area, read there without a copy; Err for a range outside the area.
    pub fn posted_bytes(&self, staged: StagedBytes) -> Result<PostedView, String> {
        let area = self.posts.as_volatile_slice();
        let from = area.subslice(staged.at as usize, staged.len as usize);
        let from = from.map_err(|_| format!("posted bytes {staged:?} are outside the posting area"))?;
        // SAFETY: within the posting area, which stays mapped as long as
        // this area, for the device's life; `PostedView::new` says who
        // writes it when.
        Ok(unsafe { PostedView::new(from.ptr_guard().as_ptr(), staged.len as usize) })
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
        match self.lease() {
            Some(lease) => lease.answer(completions, Vec::new(), spent),
            None => Answer { completions, ..Default::default() },
        }
    }

    /// Takes a free slot for one batch before it is served (see [`Lease`]).
    pub fn lease(&self) -> Option<Lease<'_>> {
        let slot = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(Lease { area: self, slot, used: 0, kept: false })
    }
}

/// A free answer slot taken for one batch before it is served, so a disk
/// reads straight into it ([`Lease::room`]) rather than into a buffer of
/// its own copied there later. The batch's answer stages the rest of its
/// bytes after them ([`Lease::answer`]); a slot the answer does not use is
/// free again when the lease goes.
pub struct Lease<'a> {
    area: &'a StagingArea,
    slot: u8,
    /// Bytes of the slot handed out by `room`.
    used: u64,
    /// The answer names the slot: it is the VMM's until handed back.
    kept: bool,
}

/// What `room` leaves free at the end of a slot, for the answer's small
/// inline bytes (a disk's status bytes, one per request).
const HEADROOM: u64 = 4096;

/// Where `room` starts each piece: the disk's block grid, as `O_DIRECT` needs.
const ROOM_ALIGN: u64 = 4096;

impl Lease<'_> {
    /// `len` bytes of the slot for a read to land in, at an aligned offset:
    /// their offset in the area and their address here. None for a piece
    /// too small to be worth a slot, or that does not fit. Nothing else
    /// writes them until the answer that names them (the VMM reads a slot
    /// only once an answer hands it over).
    pub fn room(&mut self, len: u64) -> Option<(u32, *mut u8)> {
        let start = self.used.next_multiple_of(ROOM_ALIGN);
        if len < MIN_STAGED_BYTES || start + len + HEADROOM > STAGING_SLOT_BYTES {
            return None;
        }
        self.used = start + len;
        let at = self.slot as u64 * STAGING_SLOT_BYTES + start;
        // Within the mapping: the slot's end bounds it.
        let address = self.area.map.as_ptr().wrapping_add(at as usize);
        Some((at as u32, address))
    }

    /// The batch's answer: `prestaged`, by grant, names bytes already in
    /// this slot (from [`Lease::room`]); each completion's own bytes follow
    /// back to back, those of completions with prestaged bytes first. A
    /// completion whose bytes do not fit goes inline, its prestaged bytes
    /// copied out; with nothing prestaged, the answer is staged only as
    /// [`StagingArea::stage`] would stage it.
    pub fn answer(
        mut self,
        completions: Vec<CompletedRequest>,
        mut prestaged: Vec<(u64, Vec<StagedWrite>)>,
        spent: &mut Vec<Vec<u8>>,
    ) -> Answer {
        let inline: u64 = completions.iter().flat_map(|c| &c.writes).map(|w| w.data.len() as u64).sum();
        if prestaged.is_empty() && !(MIN_STAGED_BYTES..=STAGING_SLOT_BYTES).contains(&inline) {
            return Answer { completions, ..Default::default() };
        }
        let area = self.area.map.as_volatile_slice();
        let end = (self.slot as usize + 1) * STAGING_SLOT_BYTES as usize;
        let mut at = self.slot as usize * STAGING_SLOT_BYTES as usize + self.used as usize;
        let mut answer = Answer::default();
        // Those with bytes in the slot first: their own few bytes (a disk's
        // status bytes) then fit in what `room` left free, so none of them
        // goes inline taking its slot's bytes along.
        let (mut ordered, rest): (Vec<_>, Vec<_>) =
            completions.into_iter().partition(|c| prestaged.iter().any(|p| p.0 == c.grant));
        ordered.extend(rest);
        for mut c in ordered {
            let bytes: usize = c.writes.iter().map(|w| w.data.len()).sum();
            let mut writes = match prestaged.iter().position(|p| p.0 == c.grant) {
                Some(i) => prestaged.swap_remove(i).1,
                None => Vec::new(),
            };
            if at + bytes > end {
                // Inline, every byte of it.
                let copied = writes.iter().map(|w| {
                    let mut data = vec![0u8; w.len as usize];
                    if let Ok(from) = area.subslice(w.at as usize, w.len as usize) {
                        from.copy_to(&mut data[..]);
                    }
                    BufferWrite { buffer: w.buffer, offset: w.offset, data: ByteBuf::from(data) }
                });
                let mut all: Vec<BufferWrite> = copied.collect();
                all.append(&mut c.writes);
                answer.completions.push(CompletedRequest { writes: all, ..c });
                continue;
            }
            for w in c.writes {
                let len = w.data.len();
                // Within the slot: checked above.
                if let Ok(room) = area.subslice(at, len) {
                    room.copy_from(&w.data[..]);
                }
                writes.push(StagedWrite { buffer: w.buffer, offset: w.offset, at: at as u32, len: len as u32 });
                spent.push(w.data.into_vec());
                at += len;
            }
            answer.staged.push(StagedCompletion { grant: c.grant, used_len: c.used_len, writes });
        }
        if !answer.staged.is_empty() {
            answer.slot = Some(self.slot);
            self.kept = true;
        }
        answer
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.area.free(&[self.slot]);
        }
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
pub(super) mod tests {
    use super::*;
    use rpc_schema::BufferWrite;
    use serde_bytes::ByteBuf;
    use std::os::fd::IntoRawFd;
    use std::os::unix::fs::FileExt;

    pub(in crate::devices) fn memfd(size: u64) -> File {
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

    /// An area, and the VMM's view of its answers.
    pub(in crate::devices) fn area_for_test() -> (StagingArea, File) {
        let (area, answers, _) = areas_for_test();
        (area, answers)
    }

    /// An area, and the VMM's views of its answers and of its posts.
    pub(in crate::devices) fn areas_for_test() -> (StagingArea, File, File) {
        let (answers, posts) = (memfd(STAGING_BYTES), memfd(STAGING_BYTES));
        let views = (answers.try_clone().unwrap(), posts.try_clone().unwrap());
        (StagingArea::map(answers.into_raw_fd(), posts.into_raw_fd()).unwrap(), views.0, views.1)
    }

    #[test]
    fn a_lease_answers_with_the_bytes_read_into_it_and_frees_a_slot_it_did_not_use() {
        let (area, vmm_view) = area_for_test();
        let free = |area: &StagingArea| area.free.lock().unwrap().len();
        drop(area.lease().expect("a slot"));
        assert_eq!(free(&area), STAGING_SLOTS as usize, "a lease that answers nothing gives its slot back");

        let mut lease = area.lease().unwrap();
        let (slot, base) = (lease.slot, lease.slot as u32 * STAGING_SLOT_BYTES as u32);
        assert_eq!(lease.room(MIN_STAGED_BYTES - 1), None, "too small to be worth it");
        assert_eq!(lease.room(STAGING_SLOT_BYTES), None, "more than a slot");
        let (first, address) = lease.room(600).unwrap();
        // SAFETY: the 600 bytes `room` gave.
        unsafe { std::ptr::write_bytes(address, 0xab, 600) };
        let (second, _) = lease.room(512).unwrap();
        assert_eq!((first, second), (base, base + 4096), "each piece on the 4 KiB grid");
        let prestaged = StagedWrite { buffer: 0, offset: 0, at: first, len: 600 };
        let completions = vec![
            CompletedRequest { grant: 8, used_len: 4, writes: vec![write(0, b"next")] },
            CompletedRequest { grant: 7, used_len: 601, writes: vec![write(1, &[0])] },
        ];
        let answer = lease.answer(completions, vec![(7, vec![prestaged])], &mut Vec::new());
        assert_eq!(answer.slot, Some(slot));
        assert!(answer.completions.is_empty());
        let at = |buffer, at, len| StagedWrite { buffer, offset: 12, at, len };
        let named: Vec<_> = answer.staged.iter().map(|c| (c.grant, c.writes.clone())).collect();
        let after = base + 4096 + 512;
        assert_eq!(named, vec![(7, vec![prestaged, at(1, after, 1)]), (8, vec![at(0, after + 1, 4)])]);
        let mut seen = vec![0u8; 600];
        vmm_view.read_exact_at(&mut seen, first as u64).unwrap();
        assert_eq!(seen, [0xab; 600]);
        assert_eq!(free(&area), STAGING_SLOTS as usize - 1, "the answer's slot is the VMM's now");

        // A completion whose bytes no longer fit goes inline, its read bytes copied out.
        let mut lease = area.lease().unwrap();
        let (full, address) = lease.room(STAGING_SLOT_BYTES - HEADROOM).unwrap();
        // SAFETY: the first bytes of those `room` gave.
        unsafe { std::ptr::write_bytes(address, 0xcd, 4) };
        let prestaged = StagedWrite { buffer: 0, offset: 0, at: full, len: 4 };
        let big = CompletedRequest { grant: 9, used_len: 0, writes: vec![write(1, &[1; HEADROOM as usize + 1])] };
        let answer = lease.answer(vec![big], vec![(9, vec![prestaged])], &mut Vec::new());
        assert_eq!((answer.slot, answer.staged.len()), (None, 0));
        let inline = &answer.completions[0].writes;
        assert_eq!((&inline[0].data[..], inline[0].buffer, inline[1].data.len()), (&[0xcd; 4][..], 0, 4097));
        assert_eq!(free(&area), STAGING_SLOTS as usize - 1, "an answer all inline gives its slot back");
    }

    #[test]
    fn posted_bytes_are_read_in_the_posting_area_and_checked() {
        use crate::devices::request::Readable;
        let posts = memfd(STAGING_BYTES);
        posts.write_all_at(b"readable", 1 << 20).unwrap();
        let area = StagingArea::map(memfd(STAGING_BYTES).into_raw_fd(), posts.into_raw_fd()).unwrap();
        let view = area.posted_bytes(StagedBytes { at: 1 << 20, len: 8 }).unwrap();
        assert_eq!(&Readable::Posted(view)[..], b"readable");
        let outside = area.posted_bytes(StagedBytes { at: STAGING_BYTES as u32 - 4, len: 8 });
        assert!(outside.unwrap_err().contains("outside the posting area"));
    }

    #[test]
    fn an_area_of_the_wrong_size_is_refused() {
        let wrong = StagingArea::map(memfd(4096).into_raw_fd(), memfd(STAGING_BYTES).into_raw_fd());
        assert!(wrong.unwrap_err().contains("4096 bytes"));
        let wrong = StagingArea::map(memfd(STAGING_BYTES).into_raw_fd(), memfd(8192).into_raw_fd());
        assert!(wrong.unwrap_err().contains("8192 bytes"));
    }
}
