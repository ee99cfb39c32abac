//! virtio-blk (virtio 1.x, 5.2): read, write, flush and get-id on a host
//! file the VMM opened. Every request header and buffer layout is checked;
//! a bad request gets an error status, never a crash.
use super::features;
use super::memory::{read_all, AccessError, DeviceMemory};
use super::virtqueue::{Buffer, Chain, Completion, Prefetched};
use rpc_schema::{DeviceInfo, Segment, WriteSegment};
use serde_bytes::ByteBuf;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub const DEVICE_ID: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
const HEADER_SIZE: u32 = 16;
/// Largest request served, data of both directions together; a larger one
/// fails before any of it is read. Linux sends at most 1.25 MiB by default.
const MAX_REQUEST_BYTES: u64 = 16 << 20;
const ID_SIZE: usize = 20;

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
const CONFIG_MAX_DISCARD_SECTORS: usize = 36;
const CONFIG_MAX_DISCARD_SEG: usize = 40;
const CONFIG_DISCARD_ALIGNMENT: usize = 44;
const CONFIG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const CONFIG_MAX_WRITE_ZEROES_SEG: usize = 52;
const CONFIG_WRITE_ZEROES_MAY_UNMAP: usize = 56;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Counters a benchmark or the VMM can read.
#[derive(Debug, Default, Clone, Copy)]
pub struct BlockStats {
    pub requests: u64,
    pub errors: u64,
}

pub struct BlockDevice {
    file: File,
    readonly: bool,
    sectors: u64,
    id: [u8; ID_SIZE],
    pub stats: BlockStats,
}

/// A request split into its parts, or the reason it cannot be served.
struct Parsed {
    head: u16,
    header: Buffer,
    data: Vec<Buffer>,
    status: Option<Buffer>,
}

impl BlockDevice {
    pub fn new(file: File, readonly: bool, id: &str) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        let mut serial = [0u8; ID_SIZE];
        let bytes = id.as_bytes();
        serial[..bytes.len().min(ID_SIZE)].copy_from_slice(&bytes[..bytes.len().min(ID_SIZE)]);
        Ok(BlockDevice { file, readonly, sectors, id: serial, stats: BlockStats::default() })
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

    fn parse(chain: Chain) -> Parsed {
        let mut buffers = chain.buffers;
        let status = match buffers.last() {
            Some(last) if buffers.len() >= 2 && last.writable && last.len >= 1 => buffers.pop(),
            _ => None,
        };
        let header = if buffers.is_empty() { Buffer { addr: 0, len: 0, writable: true } } else { buffers.remove(0) };
        Parsed { head: chain.head, header, data: buffers, status }
    }

    /// Serves `chains`; the caller writes the completions back.
    pub async fn process<M: DeviceMemory>(
        &mut self,
        mem: &M,
        chains: Vec<Chain>,
        mut prefetched: Prefetched,
    ) -> Result<Vec<Completion>, AccessError> {
        let requests: Vec<Parsed> = chains.into_iter().map(Self::parse).collect();
        // Every header and driver-to-device buffer: prefetched, or read in one batch.
        let mut inputs: Vec<Vec<Option<Vec<u8>>>> = Vec::with_capacity(requests.len());
        let mut wanted = Vec::new();
        for r in &requests {
            let segments = Self::input_segments(r);
            let got: Vec<Option<Vec<u8>>> = segments.iter().map(|s| prefetched.take(s.addr, s.len)).collect();
            wanted.extend(segments.into_iter().zip(&got).filter(|(_, g)| g.is_none()).map(|(s, _)| s));
            inputs.push(got);
        }
        let mut fetched = match read_all(mem, &wanted).await {
            Ok(bytes) => Some(bytes.into_iter()),
            // A refused batch means some request names memory outside RAM:
            // fall back to one request at a time to find it.
            Err(AccessError::Refused(_)) => None,
            Err(e) => return Err(e),
        };
        for (r, slots) in requests.iter().zip(inputs.iter_mut()) {
            if slots.iter().all(Option::is_some) {
                continue;
            }
            match fetched.as_mut() {
                Some(iter) => slots.iter_mut().filter(|s| s.is_none()).for_each(|s| *s = iter.next()),
                None => {
                    if let Ok(bytes) = read_all(mem, &Self::input_segments(r)).await {
                        *slots = bytes.into_iter().map(Some).collect();
                    }
                }
            }
        }

        let mut completions = Vec::with_capacity(requests.len());
        for (r, slots) in requests.iter().zip(inputs) {
            // None: no usable header, or its buffers could not be read.
            let inputs: Option<Vec<Vec<u8>>> = if slots.is_empty() { None } else { slots.into_iter().collect() };
            let (status, data, written) = match inputs {
                Some(inputs) => self.execute(r, inputs),
                None => (S_IOERR, Vec::new(), 0),
            };
            self.stats.requests += 1;
            if status != S_OK {
                self.stats.errors += 1;
            }
            completions.push(Completion { head: r.head, data, status_addr: r.status.map(|s| s.addr), status, written });
        }
        Ok(completions)
    }

    /// The header and driver-to-device buffers of a well-formed request
    /// (none when it has no usable header or status buffer).
    fn input_segments(r: &Parsed) -> Vec<Segment> {
        let data_bytes: u64 = r.data.iter().map(|b| u64::from(b.len)).sum();
        if r.status.is_none() || r.header.writable || r.header.len < HEADER_SIZE || data_bytes > MAX_REQUEST_BYTES {
            return Vec::new();
        }
        let mut segments = vec![Segment { addr: r.header.addr, len: HEADER_SIZE }];
        segments.extend(r.data.iter().filter(|b| !b.writable).map(|b| Segment { addr: b.addr, len: b.len }));
        segments
    }

    /// Runs one request whose header and input buffers are in `inputs`.
    /// Returns (status, writes of data for the driver, bytes of such data).
    fn execute(&mut self, r: &Parsed, inputs: Vec<Vec<u8>>) -> (u8, Vec<WriteSegment>, u32) {
        let header = &inputs[0];
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data_len: u64 = r.data.iter().map(|b| b.len as u64).sum();
        let in_bounds = || {
            data_len % SECTOR_SIZE == 0
                && sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|o| o.checked_add(data_len))
                    .is_some_and(|end| end <= self.sectors * SECTOR_SIZE)
        };
        match kind {
            T_IN if r.data.iter().all(|b| b.writable) && in_bounds() => {
                let mut bytes = vec![0u8; data_len as usize];
                if self.file.read_exact_at(&mut bytes, sector * SECTOR_SIZE).is_err() {
                    return (S_IOERR, Vec::new(), 0);
                }
                let mut offset = 0usize;
                let writes = r
                    .data
                    .iter()
                    .map(|b| {
                        let chunk = &bytes[offset..offset + b.len as usize];
                        offset += b.len as usize;
                        WriteSegment { addr: b.addr, data: ByteBuf::from(chunk.to_vec()) }
                    })
                    .collect();
                (S_OK, writes, data_len as u32)
            }
            T_OUT if !self.readonly && r.data.iter().all(|b| !b.writable) && in_bounds() => {
                let bytes: Vec<u8> = inputs[1..].concat();
                match self.file.write_all_at(&bytes, sector * SECTOR_SIZE) {
                    Ok(()) => (S_OK, Vec::new(), 0),
                    Err(_) => (S_IOERR, Vec::new(), 0),
                }
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, Vec::new(), 0),
                Err(_) => (S_IOERR, Vec::new(), 0),
            },
            T_GET_ID => match r.data.first() {
                Some(b) if b.writable && r.data.len() == 1 => {
                    let len = (b.len as usize).min(ID_SIZE);
                    (
                        S_OK,
                        vec![WriteSegment { addr: b.addr, data: ByteBuf::from(self.id[..len].to_vec()) }],
                        len as u32,
                    )
                }
                _ => (S_IOERR, Vec::new(), 0),
            },
            T_DISCARD | T_WRITE_ZEROES if !self.readonly => {
                let ranges = inputs[1..].concat();
                (self.zero_range(kind, &ranges), Vec::new(), 0)
            }
            T_IN | T_OUT | T_DISCARD | T_WRITE_ZEROES => (S_IOERR, Vec::new(), 0),
            _ => (S_UNSUPP, Vec::new(), 0),
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
            if self.file.write_all_at(&zeroes[..chunk], offset + done).is_err() {
                return S_IOERR;
            }
            done += chunk as u64;
        }
        S_OK
    }
}
