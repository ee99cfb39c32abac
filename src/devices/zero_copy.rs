//! Zero-copy disk transfers where guest RAM is mapped in this process
//! (`shared` and `inprocess`): a plain read or write moves between the host
//! file and the guest's own buffers, one pread/pwrite per piece of buffer,
//! with no buffer in between. (One call per piece rather than preadv: Linux
//! posts a few large buffers per request, and the block allowlist stays
//! without the vectored calls.)
//!
//! The checks are the copying path's: every buffer is found in the current
//! map of guest RAM before anything is read or written, and the map stays
//! alive (and mapped) while the transfer runs. A request this path does not
//! take (another type, a range off the disk, a buffer outside RAM, a
//! `direct=on` disk's buffer off its block grid) goes the copying way, which
//! answers it as before. A `direct=on` disk's transfers run on its I/O
//! threads, many at once.
use super::blk::{BlockDevice, HEADER_SIZE};
use super::virtqueue::Chain;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A request served here: what the used ring gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub head: u16,
    pub used_len: u32,
    pub failed: bool,
    /// Bytes moved out of (written to disk) or into (read from disk) the guest.
    pub out_bytes: u64,
    pub in_bytes: u64,
}

/// The host pieces (address, length) of bytes `start..start+len` of one of
/// a chain's streams, or None if some byte is not guest RAM.
pub(super) fn host_pieces(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    writable: bool,
    start: u64,
    len: u64,
) -> Option<Vec<(*mut u8, usize)>> {
    let mut out = Vec::new();
    host_pieces_into(mem, chain, writable, start, len, &mut out).map(|()| out)
}

/// [`host_pieces`], appended to `out`: for callers that reuse one vector
/// (a receive path walks a buffer per frame). None if some byte is not
/// guest RAM, or the stream is shorter.
pub(super) fn host_pieces_into(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    writable: bool,
    start: u64,
    len: u64,
    out: &mut Vec<(*mut u8, usize)>,
) -> Option<()> {
    let end = start.saturating_add(len);
    let (mut at, mut covered) = (0u64, 0u64);
    for buffer in chain.buffers.iter().filter(|b| b.writable == writable) {
        let from = at;
        at += u64::from(buffer.len);
        let (lo, hi) = (from.max(start), at.min(end));
        if lo < hi {
            let addr = buffer.addr.checked_add(lo - from)?;
            for slice in mem.get_slices(GuestAddress(addr), (hi - lo) as usize) {
                let slice = slice.ok()?;
                out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
                covered += slice.len() as u64;
            }
        }
        if at >= end {
            break;
        }
    }
    (covered == len).then_some(())
}

/// Moves every piece between the file (from `offset` on) and guest memory.
fn transfer(fd: i32, pieces: &[(*mut u8, usize)], mut offset: u64, write: bool) -> bool {
    for &(mut ptr, mut len) in pieces {
        while len > 0 {
            // SAFETY: ptr..ptr+len lies in guest RAM mapped by `mem`, which the
            // caller holds for the whole transfer; the guest may change it at
            // any time, which only changes the bytes moved.
            let done = unsafe {
                if write {
                    libc::pwrite(fd, ptr as *const libc::c_void, len, offset as i64)
                } else {
                    libc::pread(fd, ptr as *mut libc::c_void, len, offset as i64)
                }
            };
            if done <= 0 {
                // An error, or the end of a file someone truncated.
                if done < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return false;
            }
            let done = done as usize;
            // SAFETY: advancing within the piece.
            ptr = unsafe { ptr.add(done) };
            len -= done;
            offset += done as u64;
        }
    }
    true
}

/// A checked zero-copy transfer, ready to run: host addresses in guest RAM.
pub struct Plan {
    head: u16,
    write: bool,
    offset: u64,
    len: u64,
    pieces: Vec<(*mut u8, usize)>,
    status: *mut u8,
    /// Keeps the map the pointers name mapped while the plan waits or runs
    /// elsewhere (see [`Plan::keeping`]).
    map: Option<std::sync::Arc<GuestMemoryMmap>>,
}

// SAFETY: the pointers name guest RAM mapped by a map snapshot that whoever
// made the plan holds until the plan has run (see `runner`), on any thread.
unsafe impl Send for Plan {}

impl Plan {
    pub fn head(&self) -> u16 {
        self.head
    }

    /// (file offset, length, write): what [`super::blk::clash`] compares.
    pub fn extent(&self) -> (u64, u64, bool) {
        (self.offset, self.len, self.write)
    }

    /// The plan, holding `map` (the one it was made from) until it has run:
    /// for a plan that outlives the caller's snapshot.
    pub fn keeping(mut self, map: std::sync::Arc<GuestMemoryMmap>) -> Plan {
        self.map = Some(map);
        self
    }

    /// Moves the data and writes the status byte.
    pub fn run(self, fd: i32) -> Served {
        let ok = transfer(fd, &self.pieces, self.offset, self.write);
        self.finish(ok)
    }

    /// A plan that names no memory, for tests of what carries plans.
    #[cfg(test)]
    pub fn dummy() -> Plan {
        Plan { head: 0, write: false, offset: 0, len: 0, pieces: Vec::new(), status: std::ptr::null_mut(), map: None }
    }

    /// The pieces as iovecs, for a transfer that runs elsewhere (a ring).
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.pieces.iter().map(|&(ptr, len)| libc::iovec { iov_base: ptr.cast(), iov_len: len }).collect()
    }

    /// Writes the status byte of a transfer that has ended (`ok`: wholly).
    pub fn finish(self, ok: bool) -> Served {
        let status = if ok { super::blk::S_OK } else { super::blk::S_IOERR };
        // SAFETY: a checked one-byte piece of mapped guest RAM.
        unsafe { std::ptr::write_volatile(self.status, status) };
        let read_len = if ok && !self.write { self.len } else { 0 };
        Served {
            head: self.head,
            used_len: 1 + read_len as u32,
            failed: !ok,
            out_bytes: if self.write { self.len } else { 0 },
            in_bytes: read_len + 1,
        }
    }
}

/// Serves `chain` straight between the disk and guest memory if it is a
/// plain read or write whose buffers are all guest RAM; None otherwise.
#[cfg(test)]
fn serve(mem: &GuestMemoryMmap, blk: &BlockDevice, chain: &Chain) -> Option<Served> {
    use std::os::fd::AsRawFd;
    plan(mem, blk, chain).map(|plan| plan.run(blk.file().as_raw_fd()))
}

/// The zero-copy plan for `chain`, if it is a plain read or write whose
/// buffers are all guest RAM (and, for a `direct=on` disk, on its block grid).
pub fn plan(mem: &GuestMemoryMmap, blk: &BlockDevice, chain: &Chain) -> Option<Plan> {
    let (readable_len, writable_len) = chain.stream_lengths();
    if readable_len < HEADER_SIZE || writable_len == 0 {
        return None;
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    let mut at = 0;
    for (ptr, len) in host_pieces(mem, chain, false, 0, HEADER_SIZE)? {
        // SAFETY: a checked piece of mapped guest RAM, read once.
        unsafe { std::ptr::copy_nonoverlapping(ptr, header[at..].as_mut_ptr(), len) };
        at += len;
    }
    let (write, offset, len) = blk.plain_transfer(&header, readable_len, writable_len)?;
    let data =
        if write { host_pieces(mem, chain, false, HEADER_SIZE, len)? } else { host_pieces(mem, chain, true, 0, len)? };
    // O_DIRECT moves whole blocks between the disk and block-aligned memory.
    let block = blk.direct_block().unwrap_or(1) as usize;
    if data.iter().any(|&(ptr, len)| ptr as usize % block != 0 || len % block != 0) {
        return None;
    }
    let status = host_pieces(mem, chain, true, writable_len - 1, 1)?[0].0;
    Some(Plan { head: chain.head, write, offset, len, pieces: data, status, map: None })
}

#[cfg(test)]
mod tests {
    use super::super::virtqueue::Buffer;
    use super::*;
    use vm_memory::Bytes;

    fn disk(bytes: &[u8]) -> BlockDevice {
        let path = std::env::temp_dir().join(format!("skvm-zero-copy-{}-{}.img", std::process::id(), bytes.len()));
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        BlockDevice::new(file, false, "zc").unwrap()
    }

    fn header(kind: u32, sector: u64) -> Vec<u8> {
        [kind.to_le_bytes().to_vec(), vec![0; 4], sector.to_le_bytes().to_vec()].concat()
    }

    fn buffer(addr: u64, len: u32, writable: bool) -> Buffer {
        Buffer { addr, len, writable }
    }

    /// Two regions with a hole, like skvm's layout in miniature.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)]).unwrap()
    }

    #[test]
    fn reads_and_writes_land_in_guest_buffers_split_any_way() {
        let mem = mem();
        let blk = disk(&(0..8192).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        // A read of sectors 1..9 into three writable buffers: 100 bytes, the
        // rest minus one, then the status byte in a buffer of its own.
        mem.write_slice(&header(0, 1), GuestAddress(0x100)).unwrap();
        let chain = Chain {
            head: 3,
            buffers: vec![
                buffer(0x100, 16, false),
                buffer(0x1000, 100, true),
                buffer(0x2000, 4096 - 100, true),
                buffer(0x3000, 1, true),
            ],
        };
        let served = serve(&mem, &blk, &chain).unwrap();
        assert_eq!((served.head, served.used_len, served.failed), (3, 4097, false));
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got[..100], GuestAddress(0x1000)).unwrap();
        mem.read_slice(&mut got[100..], GuestAddress(0x2000)).unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == ((i + 512) % 251) as u8));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0);

        // A write with the header and data in one buffer that straddles the
        // end of the first region is refused here (the copying path answers).
        mem.write_slice(&header(1, 0), GuestAddress(0xfff0)).unwrap();
        let straddling = Chain { head: 4, buffers: vec![buffer(0xfff0, 16 + 512, false), buffer(0x3000, 1, true)] };
        assert_eq!(serve(&mem, &blk, &straddling), None);

        // A write, header and data in one buffer, in the second region.
        let mut request = header(1, 2);
        request.extend_from_slice(&[0xab; 1024]);
        mem.write_slice(&request, GuestAddress(0x20000)).unwrap();
        let chain = Chain { head: 5, buffers: vec![buffer(0x20000, 16 + 1024, false), buffer(0x20800, 1, true)] };
        let served = serve(&mem, &blk, &chain).unwrap();
        assert_eq!((served.used_len, served.failed, served.out_bytes), (1, false, 1024));
        let mut on_disk = vec![0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(blk.file().as_ref(), &mut on_disk, 1024).unwrap();
        assert_eq!(on_disk, vec![0xab; 1024]);
    }

    #[test]
    fn anything_but_a_plain_transfer_in_ram_goes_the_copying_way() {
        let mem = mem();
        let blk = disk(&[0u8; 4096]);
        let cases: [(Vec<u8>, Vec<Buffer>); 5] = [
            (header(4, 0), vec![buffer(0x100, 16, false), buffer(0x200, 1, true)]), // flush
            (header(0, 8), vec![buffer(0x100, 16, false), buffer(0x1000, 512, true), buffer(0x200, 1, true)]), // past the end
            (header(0, 0), vec![buffer(0x100, 16, false), buffer(0x18000, 512, true), buffer(0x200, 1, true)]), // a hole
            (header(0, 0), vec![buffer(0x100, 16, false)]), // no status byte
            (header(0, 0), vec![buffer(0x100, 16, false), buffer(0x1000, 100, true), buffer(0x200, 1, true)]), // off the grid
        ];
        for (i, (request, buffers)) in cases.into_iter().enumerate() {
            mem.write_slice(&request, GuestAddress(0x100)).unwrap();
            assert_eq!(serve(&mem, &blk, &Chain { head: 0, buffers }), None, "case {i}");
        }
    }
}
