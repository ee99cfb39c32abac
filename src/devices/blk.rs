//! virtio-blk (virtio 1.x, 5.2): read, write, flush and get-id on a host
//! file the VMM opened. Every request header and buffer layout is checked;
//! a bad request gets an error status, never a crash.
use super::aligned::{AlignedBuffer, ALIGN};
use super::disk_ring::{DiskRing, Owner};
use super::features;
use super::io_threads::IoThreads;
use super::request::{Reply, Request};
use super::staging::Lease;
use rpc_schema::DeviceInfo;
use serde_bytes::ByteBuf;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

mod staged;
pub use staged::{Started, StartedBatch};

pub const DEVICE_ID: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
pub const HEADER_SIZE: u64 = 16;
/// Largest request served, data of both directions together; a larger one
/// fails before any of it is read. Linux sends at most 1.25 MiB by default.
const MAX_REQUEST_BYTES: u64 = 16 << 20;
const ID_SIZE: usize = 20;

pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// A discard / write-zeroes segment: sector u64, num_sectors u32, flags u32.
const RANGE_SEGMENT_SIZE: usize = 16;
const RANGE_FLAG_UNMAP: u32 = 1;
/// Largest discard / write-zeroes range in sectors (1 GiB), one range per request.
const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Config-space offsets (virtio 1.x, 5.2.4) of the fields we fill.
const CONFIG_SIZE: usize = 60;
const CONFIG_BLK_SIZE: usize = 20;
const CONFIG_MAX_DISCARD_SECTORS: usize = 36;
const CONFIG_MAX_DISCARD_SEG: usize = 40;
const CONFIG_DISCARD_ALIGNMENT: usize = 44;
const CONFIG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const CONFIG_MAX_WRITE_ZEROES_SEG: usize = 52;
const CONFIG_WRITE_ZEROES_MAY_UNMAP: usize = 56;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub struct BlockDevice {
    file: Arc<File>,
    readonly: bool,
    sectors: u64,
    id: [u8; ID_SIZE],
    /// The disk was opened with O_DIRECT (`direct=on`).
    direct: Option<Direct>,
    /// `rpc`: transfers of posted batches running on the ring.
    staged: staged::Staged,
}

/// O_DIRECT transfers: through an aligned buffer, at offsets and lengths
/// that are multiples of the host's block (512, or 4096 where the host
/// refuses less; then the driver is told so with VIRTIO_BLK_F_BLK_SIZE).
struct Direct {
    buffer: AlignedBuffer,
    block: u64,
    /// What runs transfers many at once, once started.
    io: Option<DiskIo>,
    /// Aligned buffers for transfers in flight, reused.
    spare: Vec<AlignedBuffer>,
}

/// What runs a `direct=on` disk's transfers many at once.
#[derive(Clone)]
pub enum DiskIo {
    /// An io_uring (see [`super::disk_ring`]): the default where the kernel has one.
    Ring(Arc<Mutex<DiskRing>>),
    /// A pool of [`IO_THREADS`] threads: where io_uring is missing or not wanted.
    Threads(IoThreads),
}

/// How a `direct=on` disk's transfers run (`--disk ...,aio=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Aio {
    /// io_uring if the kernel allows it, else threads.
    #[default]
    Auto,
    #[value(name = "io_uring")]
    IoUring,
    Threads,
}

/// Transfers in flight at once on a `direct=on` disk's I/O threads: a
/// guest queue depth up to this reaches the host disk.
pub const IO_THREADS: usize = 32;
/// Larger transfers run one at a time on the device's own thread, so the
/// threads' buffers stay within the sandbox's RLIMIT_DATA.
const THREADED_TRANSFER_MAX: u64 = 1 << 20;

/// A read or write whose header and bounds are checked.
#[derive(Clone, Copy)]
struct Transfer {
    write: bool,
    offset: u64,
    len: u64,
}

/// A batch's transfers in flight, not yet collected: (request index,
/// status byte offset, transfer).
struct InFlight {
    done: Receiver<(usize, bool, AlignedBuffer)>,
    report: Sender<(usize, bool, AlignedBuffer)>,
    transfers: Vec<(usize, u64, Transfer)>,
    /// Ring transfers' buffers (and the iovec naming each) by request index.
    on_ring: Vec<(usize, AlignedBuffer, Box<[libc::iovec; 1]>)>,
}

/// Whether two transfers, as (offset, length, write), may not run at once:
/// they overlap and one of them writes. The later one waits, so the guest
/// sees each request whole, never a mix of two.
pub fn clash(a: (u64, u64, bool), b: (u64, u64, bool)) -> bool {
    (a.2 || b.2) && a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl InFlight {
    fn conflicts(&self, t: &Transfer) -> bool {
        self.transfers.iter().any(|(_, _, o)| clash((t.offset, t.len, t.write), (o.offset, o.len, o.write)))
    }
}

impl Direct {
    fn probe(file: &File) -> Direct {
        let mut buffer = AlignedBuffer::new();
        let refused_512 = match buffer.get(SECTOR_SIZE as usize) {
            Some(bytes) => file.read_at(bytes, 0).is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL)),
            None => false,
        };
        let block = if refused_512 { ALIGN as u64 } else { SECTOR_SIZE };
        Direct { buffer, block, io: None, spare: Vec::new() }
    }
}

impl BlockDevice {
    pub fn new(file: File, readonly: bool, id: &str) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let direct = (flags >= 0 && flags & libc::O_DIRECT != 0).then(|| Direct::probe(&file));
        let mut serial = [0u8; ID_SIZE];
        let bytes = id.as_bytes();
        serial[..bytes.len().min(ID_SIZE)].copy_from_slice(&bytes[..bytes.len().min(ID_SIZE)]);
        Ok(BlockDevice { file: Arc::new(file), readonly, sectors, id: serial, direct, staged: Default::default() })
    }

    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// A `direct=on` disk's block: the grid its transfers keep to.
    pub fn direct_block(&self) -> Option<u64> {
        self.direct.as_ref().map(|d| d.block)
    }

    /// What runs a `direct=on` disk's transfers, once started.
    pub fn disk_io(&self) -> Option<&DiskIo> {
        self.direct.as_ref()?.io.as_ref()
    }

    /// A request that is a plain read or write, on the disk and its grid, as
    /// (write, file offset, length): what [`super::zero_copy`] serves
    /// straight from guest memory. None for anything else.
    pub fn plain_transfer(&self, header: &[u8], readable_len: u64, writable_len: u64) -> Option<(bool, u64, u64)> {
        if Self::wanted(readable_len, writable_len) == 0 || header.len() < HEADER_SIZE as usize {
            return None;
        }
        let (kind, sector) = Self::header(header);
        let t = self.transfer(kind, sector, readable_len - HEADER_SIZE, writable_len - 1)?;
        Some((t.write, t.offset, t.len))
    }

    /// Starts what runs a `direct=on` disk's transfers many at once: its
    /// io_uring or its I/O threads, as `aio` says (nothing for other disks:
    /// with the page cache a transfer is a memory copy, which a hand-off
    /// would only slow). Call before confinement. `sandboxed`: threads
    /// never end (see [`IoThreads::start`]). Returns whether a ring runs.
    pub fn start_io(&mut self, aio: Aio, name: &str, sandboxed: bool) -> std::io::Result<bool> {
        let Some(direct) = self.direct.as_mut() else { return Ok(false) };
        let ring = match aio {
            Aio::Threads => None,
            Aio::IoUring => Some(DiskRing::new(&self.file, QUEUE_SIZE as u32).map_err(|e| {
                std::io::Error::new(e.kind(), format!("aio=io_uring, but the kernel refuses a ring: {e}"))
            })?),
            Aio::Auto => match DiskRing::new(&self.file, QUEUE_SIZE as u32) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!("{name}: no io_uring ({e}): direct=on transfers run on threads");
                    None
                }
            },
        };
        let uses_ring = ring.is_some();
        direct.io = Some(match ring {
            Some(ring) => DiskIo::Ring(Arc::new(Mutex::new(ring))),
            None => DiskIo::Threads(IoThreads::start(IO_THREADS, name, sandboxed)?),
        });
        Ok(uses_ring)
    }

    pub fn info(&self) -> DeviceInfo {
        let mut features = features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC | F_FLUSH;
        if self.readonly {
            features |= F_RO;
        } else {
            features |= F_DISCARD | F_WRITE_ZEROES;
        }
        // Config space: capacity in 512-byte sectors, and the discard and
        // write-zeroes limits (fields for features we do not offer stay 0).
        let mut config = vec![0u8; CONFIG_SIZE];
        let mut put = |offset: usize, value: u32| config[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        put(CONFIG_MAX_DISCARD_SECTORS, MAX_RANGE_SECTORS);
        put(CONFIG_MAX_DISCARD_SEG, 1);
        put(CONFIG_DISCARD_ALIGNMENT, 1);
        put(CONFIG_MAX_WRITE_ZEROES_SECTORS, MAX_RANGE_SECTORS);
        put(CONFIG_MAX_WRITE_ZEROES_SEG, 1);
        if let Some(direct) = self.direct.as_ref().filter(|d| d.block > SECTOR_SIZE) {
            features |= F_BLK_SIZE;
            put(CONFIG_BLK_SIZE, direct.block as u32);
        }
        config[CONFIG_WRITE_ZEROES_MAY_UNMAP] = 1;
        config[..8].copy_from_slice(&self.sectors.to_le_bytes());
        DeviceInfo {
            device_id: DEVICE_ID,
            features,
            queue_count: 1,
            max_queue_size: QUEUE_SIZE,
            config: ByteBuf::from(config),
        }
    }

    /// The readable bytes a request needs: all of them (header, then data),
    /// or none when its shape alone fails it (no header or status byte, or
    /// more than [`MAX_REQUEST_BYTES`] of data: refused unread).
    pub fn wanted(readable_len: u64, writable_len: u64) -> u64 {
        let usable = writable_len >= 1
            && readable_len >= HEADER_SIZE
            && readable_len - HEADER_SIZE <= MAX_REQUEST_BYTES
            && writable_len - 1 <= MAX_REQUEST_BYTES;
        if usable {
            readable_len
        } else {
            0
        }
    }

    /// The answer to a request that cannot be served: VIRTIO_BLK_S_IOERR in
    /// the status byte (the writable stream's last), if there is one.
    pub fn refuse(writable_len: u64) -> Reply {
        match writable_len.checked_sub(1) {
            Some(status_at) => {
                Reply { writes: vec![(status_at, vec![S_IOERR])], used_len: 1, failed: true, ..Reply::default() }
            }
            None => Reply { failed: true, ..Reply::default() },
        }
    }

    /// Serves the requests: reads and writes of a `direct=on` disk many at
    /// once on its ring or I/O threads, anything else (a flush waits for
    /// every transfer before it) in order on this thread.
    /// `lease`: `rpc`'s answer slot for the batch, which reads land in.
    pub fn serve(&mut self, requests: &[Request], mut lease: Option<&mut Lease>) -> Vec<Reply> {
        let threaded = self.direct.as_ref().is_some_and(|d| d.io.is_some());
        if !threaded || requests.len() < 2 {
            return requests.iter().map(|r| self.serve_one(r, lease.as_deref_mut())).collect();
        }
        let mut replies: Vec<Option<Reply>> = requests.iter().map(|_| None).collect();
        let (report, done) = channel();
        let mut in_flight = InFlight { done, report, transfers: Vec::new(), on_ring: Vec::new() };
        for (index, request) in requests.iter().enumerate() {
            match self.threaded_transfer(request) {
                Some(transfer) => {
                    if in_flight.conflicts(&transfer) {
                        self.collect(&mut in_flight, &mut replies, lease.as_deref_mut());
                    }
                    if self.start_transfer(index, request, transfer, &mut in_flight).is_none() {
                        // No buffer for it: it runs here instead.
                        self.collect(&mut in_flight, &mut replies, lease.as_deref_mut());
                        replies[index] = Some(self.serve_one(request, lease.as_deref_mut()));
                    }
                }
                None => {
                    self.collect(&mut in_flight, &mut replies, lease.as_deref_mut());
                    replies[index] = Some(self.serve_one(request, lease.as_deref_mut()));
                }
            }
        }
        self.collect(&mut in_flight, &mut replies, lease);
        let unanswered =
            |(reply, request): (Option<Reply>, &Request)| reply.unwrap_or_else(|| Self::refuse(request.writable_len));
        replies.into_iter().zip(requests).map(unanswered).collect()
    }

    /// The transfer a request asks for, if it may run on an I/O thread.
    fn threaded_transfer(&self, request: &Request) -> Option<Transfer> {
        let readable = request.readable.as_ref()?;
        let wanted = Self::wanted(request.readable_len, request.writable_len);
        if wanted == 0 || readable.len() as u64 != wanted {
            return None;
        }
        let (kind, sector) = Self::header(readable);
        let out = readable.len() as u64 - HEADER_SIZE;
        self.transfer(kind, sector, out, request.writable_len - 1).filter(|t| t.len <= THREADED_TRANSFER_MAX)
    }

    fn start_transfer(&mut self, index: usize, request: &Request, t: Transfer, in_flight: &mut InFlight) -> Option<()> {
        let io = self.direct.as_ref()?.io.clone()?;
        let mut buffer = self.transfer_buffer(request, t)?;
        match io {
            DiskIo::Threads(threads) => {
                let (file, report) = (self.file.clone(), in_flight.report.clone());
                threads.run(Box::new(move || {
                    let ok = match buffer.get(t.len as usize) {
                        Some(bytes) if t.write => file.write_all_at(bytes, t.offset).is_ok(),
                        Some(bytes) => file.read_exact_at(bytes, t.offset).is_ok(),
                        None => false,
                    };
                    let _ = report.send((index, ok, buffer));
                }));
            }
            DiskIo::Ring(ring) => {
                // Kept in `on_ring` until `collect` has taken the completion.
                let (buffer, iovec) = self.push_on_ring(&ring, index as u64, t, buffer)?;
                in_flight.on_ring.push((index, buffer, iovec));
            }
        }
        in_flight.transfers.push((index, request.writable_len - 1, t));
        Some(())
    }

    /// An aligned buffer for `t`, holding the data of a write.
    fn transfer_buffer(&mut self, request: &Request, t: Transfer) -> Option<AlignedBuffer> {
        let direct = self.direct.as_mut()?;
        let mut buffer = direct.spare.pop().unwrap_or_else(AlignedBuffer::new);
        let bytes = buffer.get(t.len as usize)?;
        if t.write {
            bytes.copy_from_slice(request.readable.as_ref().map_or(&[][..], |r| &r[HEADER_SIZE as usize..]));
        }
        Some(buffer)
    }

    /// Puts `t` on the ring under `tag`, with `buffer` (from
    /// [`Self::transfer_buffer`]) as its bytes. The caller keeps the buffer
    /// and the iovec naming it until the completion is taken; None (the
    /// buffer back among the spares) when the ring takes no more.
    fn push_on_ring(
        &mut self,
        ring: &Mutex<DiskRing>,
        tag: u64,
        t: Transfer,
        mut buffer: AlignedBuffer,
    ) -> Option<(AlignedBuffer, Box<[libc::iovec; 1]>)> {
        let bytes = buffer.get(t.len as usize)?;
        let iovec = Box::new([libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() }]);
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller keeps the buffer and its iovec until the
        // completion is taken (or never frees them).
        if unsafe { ring.push(Owner::Batch, tag, t.write, &iovec[..], t.offset) }.is_err() {
            self.direct.as_mut()?.spare.push(buffer);
            return None;
        }
        Some((buffer, iovec))
    }

    /// Whether a ring transfer that moved `moved` bytes (or failed) moved
    /// them all, moving a short one's rest here.
    fn rest_of(&self, t: Transfer, moved: i32, buffer: &mut AlignedBuffer) -> bool {
        match (moved, buffer.get(t.len as usize)) {
            (m, _) if m as u64 == t.len => true,
            // A short transfer (rare): the rest here.
            (m, Some(bytes)) if m > 0 => {
                let (rest, at) = (&mut bytes[m as usize..], t.offset + m as u64);
                if t.write {
                    self.file.write_all_at(rest, at).is_ok()
                } else {
                    self.file.read_exact_at(rest, at).is_ok()
                }
            }
            _ => false,
        }
    }

    /// Waits for every transfer in flight and fills in its reply.
    fn collect(&mut self, in_flight: &mut InFlight, replies: &mut [Option<Reply>], mut lease: Option<&mut Lease>) {
        let ended = match self.direct.as_ref().and_then(|d| d.io.clone()) {
            Some(DiskIo::Ring(ring)) => self.ring_ended(&ring, in_flight),
            _ => (0..in_flight.transfers.len()).map_while(|_| in_flight.done.recv().ok()).collect(),
        };
        for (index, ok, mut buffer) in ended {
            let Some(&(_, status_at, t)) = in_flight.transfers.iter().find(|(i, _, _)| *i == index) else { continue };
            let data = (ok && !t.write).then(|| Self::landed(&mut buffer, t.len, lease.as_deref_mut())).flatten();
            let status = if ok { S_OK } else { S_IOERR };
            replies[index] = Some(Self::reply(status, data, status_at));
            if let Some(direct) = self.direct.as_mut() {
                direct.spare.push(buffer);
            }
        }
        in_flight.transfers.clear();
    }

    /// Submits the batch's ring transfers and waits for them all: (request
    /// index, whether it moved every byte, its buffer).
    fn ring_ended(&self, ring: &Mutex<DiskRing>, in_flight: &mut InFlight) -> Vec<(usize, bool, AlignedBuffer)> {
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut results: Vec<(u64, i32)> = Vec::new();
        while results.len() < in_flight.on_ring.len() {
            if ring.wait(Owner::Batch, in_flight.on_ring.len() - results.len()).is_err() {
                break;
            }
            results.extend(ring.completions(Owner::Batch));
        }
        let mut ended = Vec::new();
        for (index, mut buffer, iovec) in in_flight.on_ring.drain(..) {
            let Some(&(_, _, t)) = in_flight.transfers.iter().find(|(i, _, _)| *i == index) else { continue };
            let Some(moved) = results.iter().find(|r| r.0 == index as u64).map(|r| r.1) else {
                // Never reported (the ring failed): the kernel may still
                // use the buffer, so it is never reused or freed; the
                // request, unanswered, fails.
                std::mem::forget((buffer, iovec));
                continue;
            };
            let ok = self.rest_of(t, moved, &mut buffer);
            ended.push((index, ok, buffer));
        }
        ended
    }

    /// A read's bytes from the aligned buffer the transfer used: copied
    /// into the lease's slot where it has room (the kernel never writes
    /// there: a slot goes back once its batch is answered, and a transfer
    /// may outlive a batch that is given up), else into bytes of their own.
    fn landed(buffer: &mut AlignedBuffer, len: u64, lease: Option<&mut Lease>) -> Option<Data> {
        let bytes = buffer.get(len as usize)?;
        if let Some((at, address)) = lease.and_then(|l| l.room(len)) {
            // SAFETY: `room` gave us `len` bytes of the slot, which nothing
            // else touches until the answer that names them.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), address, bytes.len()) };
            return Some(Data::Staged { at, len: len as u32 });
        }
        Some(Data::Bytes(bytes.to_vec()))
    }

    fn reply(status: u8, data: Option<Data>, status_at: u64) -> Reply {
        let mut reply =
            Reply { used_len: 1, failed: status != S_OK, writes: Vec::with_capacity(2), ..Reply::default() };
        match data {
            Some(Data::Bytes(data)) => {
                reply.used_len += data.len() as u32;
                reply.writes.push((0, data));
            }
            Some(Data::Staged { at, len }) => {
                reply.used_len += len;
                reply.staged.push((0, at, len));
            }
            None => {}
        }
        reply.writes.push((status_at, vec![status]));
        reply
    }

    fn header(readable: &[u8]) -> (u32, u64) {
        (
            u32::from_le_bytes(readable[0..4].try_into().unwrap()),
            u64::from_le_bytes(readable[8..16].try_into().unwrap()),
        )
    }

    /// A read (`room` bytes) or write (`out` bytes) request's transfer, if
    /// it is one and lies on the disk's grid and within it.
    fn transfer(&self, kind: u32, sector: u64, out: u64, room: u64) -> Option<Transfer> {
        let (write, len) = match kind {
            T_IN => (false, room),
            T_OUT if !self.readonly => (true, out),
            _ => return None,
        };
        let block = self.direct.as_ref().map_or(SECTOR_SIZE, |d| d.block);
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let fits = len % block == 0
            && offset % block == 0
            && offset.checked_add(len).is_some_and(|end| end <= self.sectors * SECTOR_SIZE);
        fits.then_some(Transfer { write, offset, len })
    }

    fn serve_one(&mut self, request: &Request, lease: Option<&mut Lease>) -> Reply {
        let wanted = Self::wanted(request.readable_len, request.writable_len);
        let readable = match &request.readable {
            Some(bytes) if wanted > 0 && bytes.len() as u64 == wanted => bytes,
            _ => return Self::refuse(request.writable_len),
        };
        let status_at = request.writable_len - 1;
        let (status, data) =
            self.execute(&readable[..HEADER_SIZE as usize], &readable[HEADER_SIZE as usize..], status_at, lease);
        Self::reply(status, data, status_at)
    }

    /// Runs one request: `out` is the driver's data after the header, and
    /// `room` the writable bytes before the status byte. Returns the status
    /// and any data for the driver (at the start of the writable stream).
    fn execute(&mut self, header: &[u8], out: &[u8], room: u64, lease: Option<&mut Lease>) -> (u8, Option<Data>) {
        let (kind, sector) = Self::header(header);
        let done = |result: std::io::Result<()>| if result.is_ok() { S_OK } else { S_IOERR };
        match self.transfer(kind, sector, out.len() as u64, room) {
            Some(t) if t.write => return (done(self.write_at(out, t.offset)), None),
            Some(t) => {
                return match self.read_at(t.len as usize, t.offset, lease) {
                    Ok(data) => (S_OK, Some(data)),
                    Err(_) => (S_IOERR, None),
                }
            }
            None => {}
        }
        match kind {
            T_FLUSH => (done(self.file.sync_data()), None),
            T_GET_ID if room > 0 => {
                let len = (room as usize).min(ID_SIZE);
                (S_OK, Some(Data::Bytes(self.id[..len].to_vec())))
            }
            T_DISCARD | T_WRITE_ZEROES if !self.readonly => (self.zero_range(kind, out), None),
            T_IN | T_OUT | T_GET_ID | T_DISCARD | T_WRITE_ZEROES => (S_IOERR, None),
            _ => (S_UNSUPP, None),
        }
    }

    /// DISCARD or WRITE_ZEROES of the one range in `ranges`. Both punch a hole
    /// (the file reads back zeroes); where the filesystem cannot, write-zeroes
    /// writes zeroes and discard, being advisory, does nothing.
    fn zero_range(&mut self, kind: u32, ranges: &[u8]) -> u8 {
        if ranges.len() != RANGE_SEGMENT_SIZE {
            return S_IOERR;
        }
        let sector = u64::from_le_bytes(ranges[0..8].try_into().unwrap());
        let count = u32::from_le_bytes(ranges[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(ranges[12..16].try_into().unwrap());
        let allowed_flags = if kind == T_WRITE_ZEROES { RANGE_FLAG_UNMAP } else { 0 };
        let end = sector.checked_add(count as u64);
        if count > MAX_RANGE_SECTORS || flags & !allowed_flags != 0 || end.is_none_or(|e| e > self.sectors) {
            return S_IOERR;
        }
        let (offset, len) = (sector * SECTOR_SIZE, count as u64 * SECTOR_SIZE);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on the disk descriptor we own, within its size.
        let punched = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) } == 0;
        if punched || kind == T_DISCARD {
            return S_OK;
        }
        let zeroes = vec![0u8; (len as usize).min(1 << 20)];
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(zeroes.len() as u64) as usize;
            if self.write_at(&zeroes[..chunk], offset + done).is_err() {
                return S_IOERR;
            }
            done += chunk as u64;
        }
        S_OK
    }

    /// `len` bytes of the disk at `offset` (through the aligned buffer with O_DIRECT).
    /// Straight into the lease's slot where it has room (aligned there, so
    /// `direct=on` needs no bounce buffer either).
    fn read_at(&mut self, len: usize, offset: u64, lease: Option<&mut Lease>) -> std::io::Result<Data> {
        if let Some((at, address)) = lease.and_then(|l| l.room(len as u64)) {
            // SAFETY: `room` gave us `len` bytes of the slot, which nothing
            // else touches until the answer that names them.
            unsafe { read_exact_into(&self.file, address, len, offset) }?;
            return Ok(Data::Staged { at, len: len as u32 });
        }
        match self.direct.as_mut() {
            None => {
                let mut bytes = vec![0u8; len];
                self.file.read_exact_at(&mut bytes, offset).map(|()| Data::Bytes(bytes))
            }
            Some(direct) => {
                let buffer = direct.buffer.get(len).ok_or(std::io::ErrorKind::OutOfMemory)?;
                self.file.read_exact_at(buffer, offset).map(|()| Data::Bytes(buffer.to_vec()))
            }
        }
    }

    /// Writes `data` at `offset` (through the aligned buffer with O_DIRECT).
    fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        match self.direct.as_mut() {
            None => self.file.write_all_at(data, offset),
            Some(direct) => {
                let buffer = direct.buffer.get(data.len()).ok_or(std::io::ErrorKind::OutOfMemory)?;
                buffer.copy_from_slice(data);
                self.file.write_all_at(buffer, offset)
            }
        }
    }
}

/// A read's data for the driver: bytes of our own, or bytes already in
/// the batch's answer slot (offset in the answer area, length).
enum Data {
    Bytes(Vec<u8>),
    Staged { at: u32, len: u32 },
}

/// `read_exact_at` into memory named by address.
///
/// # Safety
/// `address` must name `len` writable bytes that nothing else uses meanwhile.
unsafe fn read_exact_into(file: &File, address: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: within the `len` bytes the caller vouches for.
        let moved = unsafe {
            libc::pread(file.as_raw_fd(), address.add(done).cast(), len - done, (offset + done as u64) as i64)
        };
        match moved {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn request(kind: u32, sector: u64, data: &[u8], room: u64) -> Request {
        let mut readable = [kind.to_le_bytes(), [0; 4]].concat();
        readable.extend_from_slice(&sector.to_le_bytes());
        readable.extend_from_slice(data);
        Request { readable_len: readable.len() as u64, writable_len: room + 1, readable: Some(readable.into()) }
    }

    pub(super) fn status(reply: &Reply) -> u8 {
        reply.writes.last().unwrap().1[0]
    }

    #[test]
    fn a_host_that_needs_4k_direct_io_gets_4k_requests_only() {
        let file = tempfile_with(64 << 10);
        let mut disk = BlockDevice::new(file, false, "d").unwrap();
        disk.direct = Some(Direct { buffer: AlignedBuffer::new(), block: 4096, io: None, spare: Vec::new() });
        let info = disk.info();
        assert_ne!(info.features & F_BLK_SIZE, 0, "the driver is told the block size");
        assert_eq!(u32::from_le_bytes(info.config[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4].try_into().unwrap()), 4096);

        let replies = disk.serve(
            &[
                request(T_OUT, 8, &[7u8; 4096], 0),
                request(T_IN, 8, &[], 4096),
                request(T_IN, 1, &[], 4096),
                request(T_OUT, 8, &[7u8; 512], 0),
            ],
            None,
        );
        assert_eq!(status(&replies[0]), S_OK);
        assert_eq!((status(&replies[1]), &replies[1].writes[0].1[..]), (S_OK, &[7u8; 4096][..]));
        assert_eq!(status(&replies[2]), S_IOERR, "an offset off the 4 KiB grid");
        assert_eq!(status(&replies[3]), S_IOERR, "a length off the 4 KiB grid");
    }

    #[test]
    fn rpc_reads_land_in_the_answer_slot_where_the_lease_has_room() {
        let (area, vmm_view) = crate::devices::staging::tests::area_for_test();
        let mut disk = BlockDevice::new(tempfile_with(4 << 20), false, "d").unwrap();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(status(&disk.serve(&[request(T_OUT, 0, &pattern, 0)], None)[0]), S_OK);
        let mut lease = area.lease().unwrap();
        let all = rpc_schema::STAGING_SLOT_BYTES;
        let replies = disk.serve(
            &[
                request(T_IN, 0, &[], 4096),
                request(T_IN, 8, &[], 512),
                request(T_IN, 0, &[], all),
                request(T_GET_ID, 0, &[], 20),
            ],
            Some(&mut lease),
        );
        let [(start, at, len)] = replies[0].staged[..] else { panic!("{:?}", replies[0].staged) };
        assert_eq!((start, len, replies[0].used_len, status(&replies[0])), (0, 4096, 4097, S_OK));
        let mut seen = vec![0u8; 4096];
        vmm_view.read_exact_at(&mut seen, at as u64).unwrap();
        assert_eq!(seen, pattern[..4096], "the read's bytes, in the slot");
        let [(_, at, 512)] = replies[1].staged[..] else { panic!("{:?}", replies[1].staged) };
        vmm_view.read_exact_at(&mut seen[..512], at as u64).unwrap();
        assert_eq!(seen[..512], pattern[4096..4608]);
        assert!(
            replies[2].staged.is_empty() && replies[2].writes[0].1.len() == all as usize,
            "a slot's worth does not fit"
        );
        assert!(replies[3].staged.is_empty() && replies[3].writes[0].1.len() == 20, "get-id: inline");
    }

    /// A `direct=on` disk with its ring or I/O threads, on a file in the temp
    /// dir (None where that filesystem has no O_DIRECT, like tmpfs before 6.6).
    pub(super) fn threaded_disk(len: u64, aio: Aio) -> Option<BlockDevice> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!("skvm-blk-direct-{aio:?}-{}.img", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        let opened = options.read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(&path);
        let _ = std::fs::remove_file(&path);
        let Ok(file) = opened else {
            eprintln!("blk: NOT RUN: the threaded-transfer checks: {} has no O_DIRECT", path.display());
            return None;
        };
        file.set_len(len).unwrap();
        let mut disk = BlockDevice::new(file, false, "d").unwrap();
        assert!(disk.is_direct());
        assert_eq!(disk.start_io(aio, "test", false).unwrap(), aio == Aio::IoUring);
        Some(disk)
    }

    #[test]
    fn transfers_in_flight_keep_each_request_whole_and_in_order_where_they_overlap() {
        for aio in [Aio::IoUring, Aio::Threads] {
            if let Some(disk) = threaded_disk(1 << 20, aio) {
                batches_keep_each_request_whole(disk);
            }
        }
    }

    fn batches_keep_each_request_whole(mut disk: BlockDevice) {
        // Writes of 64 blocks, each read back in the same batch; the first
        // block written twice, then read: the second write's bytes.
        let mut batch = Vec::new();
        for block in 0..64u64 {
            batch.push(request(T_OUT, block * 8, &[block as u8 + 1; 4096], 0));
            batch.push(request(T_IN, block * 8, &[], 4096));
        }
        batch.push(request(T_OUT, 0, &[0xee; 4096], 0));
        batch.push(request(T_FLUSH, 0, &[], 0));
        batch.push(request(T_IN, 0, &[], 8192));
        let replies = disk.serve(&batch, None);
        for block in 0..64usize {
            assert_eq!(status(&replies[2 * block]), S_OK);
            let read = &replies[2 * block + 1];
            assert_eq!((status(read), &read.writes[0].1[..]), (S_OK, &[block as u8 + 1; 4096][..]), "block {block}");
        }
        assert_eq!(status(&replies[129]), S_OK, "flush");
        let last = &replies[130].writes[0].1;
        assert_eq!((&last[..4096], &last[4096..]), (&[0xee; 4096][..], &[2u8; 4096][..]));
        // A transfer past the end fails alone, beside others that succeed.
        let replies = disk
            .serve(&[request(T_IN, 0, &[], 4096), request(T_IN, 2048, &[], 4096), request(T_IN, 8, &[], 512)], None);
        assert_eq!([status(&replies[0]), status(&replies[1]), status(&replies[2])], [S_OK, S_IOERR, S_OK]);
    }

    fn tempfile_with(len: u64) -> File {
        let path = std::env::temp_dir().join(format!("skvm-blk-unit-{}.img", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(len).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
