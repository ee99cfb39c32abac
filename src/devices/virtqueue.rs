//! Split virtqueues (virtio 1.x, 2.6), device side, over [`DeviceMemory`].
//!
//! The device never trusts the ring: every index, length and chain is
//! checked, loops are cut at the queue size, and a structural error fails
//! the queue (the VMM then marks the device DEVICE_NEEDS_RESET).
//!
//! Round trips: one read fetches the avail ring and the whole descriptor
//! table, a second fetches indirect tables when there are any, and the used
//! ring is updated together with the request's data in one write. Where
//! guest RAM is mapped here there are no round trips to save: a pop reads
//! the entries and descriptors it needs in place, and a completion with no
//! data of its own writes the used ring in place (same checks, same errors).
//!
//! Prefetch (the copying way): drivers reuse their request buffers, so the
//! first read also fetches the device-readable buffers of the chains seen
//! last time. Where the new chains name the same buffers, the device has
//! their contents without another round trip; where not, it reads them as
//! usual. (The read comes after the avail index in the same request, so it
//! sees whatever the driver wrote before publishing.)
use super::memory::{AccessError, DeviceMemory};
use rpc_schema::{QueueConfig, QueueState, Segment, WriteSegment};
use serde_bytes::ByteBuf;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const DESC_SIZE: u64 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// Most buffers, and bytes, the device prefetches on a pop.
const MAX_PREFETCH_BUFFERS: usize = 64;
const MAX_PREFETCH_BYTES: u64 = 64 * 1024;
/// Longest indirect table we follow (the spec bounds chains by the queue size;
/// indirect tables get the same generous cap as Linux's maximum queue).
const MAX_INDIRECT: u32 = 1024;
/// Most buffer bytes one `pop_all` hands out (it always takes at least one
/// request): what a device holds for a batch stays bounded whatever the
/// driver posts.
const MAX_BATCH_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("guest memory: {0}")]
    Memory(#[from] AccessError),
    #[error("avail index {avail} is {pending} ahead of the device (queue size {size})")]
    AvailOverrun { avail: u16, pending: u16, size: u16 },
    #[error("descriptor index {0} is outside the queue")]
    BadIndex(u16),
    #[error("descriptor chain at head {0} loops or is longer than the queue")]
    ChainTooLong(u16),
    #[error("indirect descriptor at head {0} is malformed")]
    BadIndirect(u16),
}

/// One buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (the driver reads it back).
    pub writable: bool,
}

/// A request: the head index to complete, and its buffers in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub buffers: Vec<Buffer>,
}

impl Chain {
    /// The bytes its buffers span, both directions.
    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Its driver-readable and device-writable byte totals.
    pub fn stream_lengths(&self) -> (u64, u64) {
        super::request::totals(self.buffers.iter().map(|b| (b.len, b.writable)))
    }
}

#[derive(Debug, Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn parse_descriptor(table: &[u8], index: usize) -> Descriptor {
    let d = &table[index * DESC_SIZE as usize..][..DESC_SIZE as usize];
    Descriptor {
        addr: u64::from_le_bytes(d[0..8].try_into().unwrap()),
        len: u32::from_le_bytes(d[8..12].try_into().unwrap()),
        flags: u16::from_le_bytes(d[12..14].try_into().unwrap()),
        next: u16::from_le_bytes(d[14..16].try_into().unwrap()),
    }
}

/// A chain as walked: its buffers, or the indirect table its one
/// descriptor names (checked for its length, not yet read).
enum Walked {
    Buffers(Vec<Buffer>),
    Indirect(Segment),
}

impl Walked {
    /// The buffers of a walk that could not meet an indirect table.
    fn direct(self, head: u16) -> Result<Vec<Buffer>, QueueError> {
        match self {
            Walked::Buffers(buffers) => Ok(buffers),
            Walked::Indirect(_) => Err(QueueError::BadIndirect(head)),
        }
    }
}

/// Follows `next` links through `table` from `start`, at most `limit` steps.
fn walk(table: &[u8], start: u16, limit: usize, head: u16, allow_indirect: bool) -> Result<Walked, QueueError> {
    let count = table.len() / DESC_SIZE as usize;
    walk_by(count, |index| Some(parse_descriptor(table, index)), start, limit, head, allow_indirect)
}

/// [`walk`] through a table of `count` descriptors that `desc` reads by
/// index; each buffer as it is met, with no copy of the descriptors.
fn walk_by(
    count: usize,
    desc: impl Fn(usize) -> Option<Descriptor>,
    start: u16,
    limit: usize,
    head: u16,
    allow_indirect: bool,
) -> Result<Walked, QueueError> {
    let mut out = Vec::new();
    let mut index = start;
    loop {
        if index as usize >= count {
            return Err(QueueError::BadIndex(index));
        }
        if out.len() >= limit {
            return Err(QueueError::ChainTooLong(head));
        }
        let desc = desc(index as usize).ok_or(QueueError::BadIndex(index))?;
        if desc.flags & DESC_F_INDIRECT != 0 {
            // Only alone, at the head, and not inside another table.
            if !allow_indirect || desc.flags & DESC_F_NEXT != 0 || !out.is_empty() {
                return Err(QueueError::BadIndirect(head));
            }
            let len = desc.len;
            if len == 0 || len % DESC_SIZE as u32 != 0 || len / DESC_SIZE as u32 > MAX_INDIRECT {
                return Err(QueueError::BadIndirect(head));
            }
            return Ok(Walked::Indirect(Segment { addr: desc.addr, len }));
        }
        out.push(Buffer { addr: desc.addr, len: desc.len, writable: desc.flags & DESC_F_WRITE != 0 });
        if desc.flags & DESC_F_NEXT == 0 {
            return Ok(Walked::Buffers(out));
        }
        index = desc.next;
    }
}

/// Buffer contents fetched ahead of need (see the module notes).
#[derive(Debug, Default)]
pub struct Prefetched(Vec<(Segment, ByteBuf)>);

impl Prefetched {
    /// The first `len` bytes at `addr`, if they were prefetched.
    pub fn take(&mut self, addr: u64, len: u32) -> Option<Vec<u8>> {
        let at = self.0.iter().position(|(s, _)| s.addr == addr && s.len >= len)?;
        let (_, mut bytes) = self.0.swap_remove(at);
        bytes.truncate(len as usize);
        Some(bytes.into_vec())
    }
}

#[derive(Debug, Clone)]
pub struct SplitQueue {
    config: QueueConfig,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    indirect: bool,
    /// Device-readable buffers of the last chains, to prefetch next time.
    predicted: Vec<Segment>,
    /// The device is polling the avail ring and has told the driver not to
    /// notify it (see [`SplitQueue::notifications`]).
    polling: bool,
    /// The used index when the device last decided whether to interrupt
    /// (None: not since it started, so it does).
    signalled: Option<u16>,
}

/// In the used ring's flags: the driver need not notify (virtio 1.x, 2.7.10).
const USED_F_NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;
/// In the avail ring's flags: the device need not interrupt (virtio 1.x, 2.7.6).
pub const AVAIL_F_NO_INTERRUPT: u16 = virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Whether the used index moving from `old` to `new` passed `event`
/// (virtio 1.x, 2.7.7.2; the same test as Linux's `vring_need_event`).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl SplitQueue {
    pub fn new(config: QueueConfig, event_idx: bool, indirect: bool) -> Self {
        let (predicted, polling, signalled) = (Vec::new(), false, None);
        SplitQueue { config, next_avail: 0, next_used: 0, event_idx, indirect, predicted, polling, signalled }
    }

    pub fn restore(state: &QueueState, event_idx: bool, indirect: bool) -> Self {
        SplitQueue {
            next_avail: state.next_avail,
            next_used: state.next_used,
            ..Self::new(state.config, event_idx, indirect)
        }
    }

    pub fn state(&self) -> QueueState {
        QueueState { config: self.config, next_avail: self.next_avail, next_used: self.next_used }
    }

    fn size(&self) -> u16 {
        self.config.size
    }

    /// Whether the driver has made requests available that were not popped
    /// yet, read straight from guest RAM mapped here (no memory call).
    pub fn has_new(&self, mapped: &vm_memory::GuestMemoryMmap) -> bool {
        self.avail_idx(mapped).is_some_and(|idx| idx != self.next_avail)
    }

    /// The driver's avail index, read from guest RAM mapped here.
    fn avail_idx(&self, mapped: &vm_memory::GuestMemoryMmap) -> Option<u16> {
        use vm_memory::Bytes;
        let idx = mapped.read_obj::<u16>(vm_memory::GuestAddress(self.config.avail.wrapping_add(2)));
        idx.ok().map(u16::from_le)
    }

    /// Whether the driver wants an interrupt for what the device completed
    /// since it last asked (virtio 1.x, 2.7.7.2), read from guest RAM mapped
    /// here: with EVENT_IDX, once the used index passed the driver's used
    /// event; without, unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT (a
    /// driver that polls, or Linux's while it is polling). Each interrupt
    /// not sent spares the device an irqfd write and the guest its handler.
    /// Call after publishing the used index.
    pub fn wants_interrupt(&mut self, mapped: &vm_memory::GuestMemoryMmap) -> bool {
        use vm_memory::Bytes;
        // The used index is published before we read what the driver asked,
        // as the driver writes what it asks before it reads the index.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let Some(old) = self.signalled.replace(self.next_used) else { return true };
        if old == self.next_used {
            return false;
        }
        let read = |addr: u64| mapped.read_obj::<u16>(vm_memory::GuestAddress(addr)).ok().map(u16::from_le);
        if self.event_idx {
            let used_event = read(self.config.avail.wrapping_add(4 + 2 * self.size() as u64));
            used_event.is_none_or(|event| need_event(event, self.next_used, old))
        } else {
            read(self.config.avail).is_none_or(|flags| flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Takes the requests the driver has made available since the last call
    /// (up to [`MAX_BATCH_BYTES`] of buffers; call again for the rest), with
    /// whatever of their readable buffers was prefetched.
    pub async fn pop_all<M: DeviceMemory>(&mut self, mem: &M) -> Result<(Vec<Chain>, Prefetched), QueueError> {
        // Where guest RAM is mapped a look is a load: an empty ring costs no
        // copies (a ring that is not RAM fails below, as before).
        if let Some(mapped) = mem.mapped() {
            if self.avail_idx(&mapped) == Some(self.next_avail) {
                return Ok((Vec::new(), Prefetched(Vec::new())));
            }
            if let Some(popped) = self.pop_mapped(&mapped) {
                return popped.map(|chains| (chains, Prefetched(Vec::new())));
            }
        }
        let size = self.size();
        let avail_len = 4 + 2 * size as u32;
        let table_len = DESC_SIZE as u32 * size as u32;
        let rings =
            [Segment { addr: self.config.avail, len: avail_len }, Segment { addr: self.config.desc, len: table_len }];
        let mut request = rings.to_vec();
        request.extend_from_slice(&self.predicted);
        let mut snapshot = match mem.read(request).await {
            Err(AccessError::Refused(_)) if !self.predicted.is_empty() => {
                // A predicted buffer is no longer RAM: fetch just the rings.
                self.predicted.clear();
                mem.read(rings.to_vec()).await?
            }
            other => other?,
        };
        let prefetched: Vec<(Segment, ByteBuf)> = self.predicted.iter().copied().zip(snapshot.drain(2..)).collect();
        let (avail, table) = (&snapshot[0], &snapshot[1]);
        let avail_idx = u16::from_le_bytes([avail[2], avail[3]]);
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > size {
            return Err(QueueError::AvailOverrun { avail: avail_idx, pending, size });
        }
        let mut chains = Vec::with_capacity(pending as usize);
        let mut indirect = Vec::new();
        for i in 0..pending {
            let slot = (self.next_avail.wrapping_add(i) % size) as usize;
            let head = u16::from_le_bytes([avail[4 + 2 * slot], avail[5 + 2 * slot]]);
            let buffers = match walk(table, head, size as usize, head, self.indirect)? {
                Walked::Buffers(buffers) => buffers,
                Walked::Indirect(segment) => {
                    // Its buffers come with the tables' read, below.
                    indirect.push((chains.len(), segment));
                    Vec::new()
                }
            };
            chains.push(Chain { head, buffers });
        }
        if !indirect.is_empty() {
            let tables = mem.read(indirect.iter().map(|(_, s)| *s).collect()).await?;
            for ((at, _), table) in indirect.iter().zip(tables) {
                let head = chains[*at].head;
                chains[*at].buffers = walk(&table, 0, MAX_INDIRECT as usize, head, false)?.direct(head)?;
            }
        }
        self.take_within_batch(&mut chains);
        if !chains.is_empty() {
            self.predict(&chains);
        }
        Ok((chains, Prefetched(prefetched)))
    }

    /// Keeps the chains within [`MAX_BATCH_BYTES`] (at least one) and moves
    /// past them.
    fn take_within_batch(&mut self, chains: &mut Vec<Chain>) {
        let mut bytes = 0u64;
        let taken = chains
            .iter()
            .enumerate()
            .take_while(|(i, chain)| {
                bytes = bytes.saturating_add(chain.bytes());
                *i == 0 || bytes <= MAX_BATCH_BYTES
            })
            .count();
        chains.truncate(taken);
        self.next_avail = self.next_avail.wrapping_add(taken as u16);
    }

    /// [`SplitQueue::pop_all`] where guest RAM is mapped here: the avail
    /// entries and descriptors it needs read in place, checked the same
    /// way, with no snapshot of the whole rings and no memory call (at a
    /// frame or two per look, the snapshot's copy and allocations were most
    /// of a network device's own work per frame). None when a ring or an
    /// indirect table is not wholly RAM: the copying way then fails the
    /// queue as it always has.
    fn pop_mapped(&mut self, mapped: &GuestMemoryMmap) -> Option<Result<Vec<Chain>, QueueError>> {
        let size = self.size();
        let ram = |addr: u64, len: u64| mapped.check_range(GuestAddress(addr), len as usize);
        if !ram(self.config.avail, 4 + 2 * size as u64) || !ram(self.config.desc, DESC_SIZE * size as u64) {
            return None;
        }
        let avail_idx = self.avail_idx(mapped)?;
        // What the driver wrote before publishing the index is seen after it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > size {
            return Some(Err(QueueError::AvailOverrun { avail: avail_idx, pending, size }));
        }
        let desc_in = |table: u64| {
            move |index: usize| {
                let mut bytes = [0u8; DESC_SIZE as usize];
                let at = GuestAddress(table.wrapping_add(index as u64 * DESC_SIZE));
                mapped.read_slice(&mut bytes, at).ok()?;
                Some(parse_descriptor(&bytes, 0))
            }
        };
        let mut chains = Vec::with_capacity(pending as usize);
        for i in 0..pending {
            let slot = self.next_avail.wrapping_add(i) % size;
            let entry = GuestAddress(self.config.avail + 4 + 2 * slot as u64);
            let head = u16::from_le(mapped.read_obj::<u16>(entry).ok()?);
            let walked = walk_by(size as usize, desc_in(self.config.desc), head, size as usize, head, self.indirect);
            let buffers = match walked {
                Ok(Walked::Buffers(buffers)) => Ok(buffers),
                Ok(Walked::Indirect(table)) if ram(table.addr, table.len as u64) => {
                    let count = (table.len / DESC_SIZE as u32) as usize;
                    let walked = walk_by(count, desc_in(table.addr), 0, MAX_INDIRECT as usize, head, false);
                    walked.and_then(|walked| walked.direct(head))
                }
                // Not RAM: the copying way reports it.
                Ok(Walked::Indirect(_)) => return None,
                Err(e) => Err(e),
            };
            match buffers {
                Ok(buffers) => chains.push(Chain { head, buffers }),
                Err(e) => return Some(Err(e)),
            }
        }
        self.take_within_batch(&mut chains);
        Some(Ok(chains))
    }

    fn predict(&mut self, chains: &[Chain]) {
        self.predicted.clear();
        let mut bytes = 0;
        for buffer in chains.iter().flat_map(|c| c.buffers.iter()).filter(|b| !b.writable && b.len > 0) {
            if self.predicted.len() >= MAX_PREFETCH_BUFFERS || bytes + buffer.len as u64 > MAX_PREFETCH_BYTES {
                break;
            }
            bytes += buffer.len as u64;
            self.predicted.push(Segment { addr: buffer.addr, len: buffer.len });
        }
    }

    /// The used-ring writes that complete `done` (head, bytes written), to be
    /// sent after the requests' own data: elements, then the index, then (with
    /// EVENT_IDX) where the driver should next notify us.
    pub fn complete(&mut self, done: &[(u16, u32)]) -> Vec<WriteSegment> {
        let mut writes = Vec::with_capacity(done.len() + 2);
        for &(head, len) in done {
            let slot = (self.next_used % self.size()) as u64;
            let mut elem = Vec::with_capacity(8);
            elem.extend_from_slice(&(head as u32).to_le_bytes());
            elem.extend_from_slice(&len.to_le_bytes());
            writes.push(WriteSegment { addr: self.config.used + 4 + 8 * slot, data: ByteBuf::from(elem) });
            self.next_used = self.next_used.wrapping_add(1);
        }
        writes.push(WriteSegment {
            addr: self.config.used + 2,
            data: ByteBuf::from(self.next_used.to_le_bytes().to_vec()),
        });
        if self.event_idx && !self.polling {
            writes.push(self.avail_event());
        }
        writes
    }

    /// [`SplitQueue::complete`] written in place where guest RAM is mapped
    /// here: the entries, then the index (released after them), then with
    /// EVENT_IDX the avail event. False, with nothing written, when the
    /// used ring is not wholly RAM (the copying way then fails as before).
    pub fn complete_mapped(&mut self, mapped: &GuestMemoryMmap, done: &[(u16, u32)]) -> bool {
        let (used, size) = (self.config.used, self.size());
        // Flags, index, the entries and the avail event after them.
        if !mapped.check_range(GuestAddress(used), 6 + 8 * size as usize) {
            return false;
        }
        // Within the range just checked, which the caller's snapshot keeps mapped.
        for &(head, len) in done {
            let entry = used + 4 + 8 * (self.next_used % size) as u64;
            let _ = mapped.write_obj((head as u32).to_le(), GuestAddress(entry));
            let _ = mapped.write_obj(len.to_le(), GuestAddress(entry + 4));
            self.next_used = self.next_used.wrapping_add(1);
        }
        let _ = mapped.store(self.next_used.to_le(), GuestAddress(used + 2), std::sync::atomic::Ordering::Release);
        if self.event_idx && !self.polling {
            let _ = mapped.write_obj(self.next_avail.to_le(), GuestAddress(used + 4 + 8 * size as u64));
        }
        true
    }

    /// With EVENT_IDX: notify us once the driver makes available beyond what we have taken.
    fn avail_event(&self) -> WriteSegment {
        let addr = self.config.used + 4 + 8 * self.size() as u64;
        WriteSegment { addr, data: ByteBuf::from(self.next_avail.to_le_bytes().to_vec()) }
    }

    /// The writes that tell the driver whether to notify us of new requests:
    /// not while we poll the avail ring (the used ring's NO_NOTIFY flag, and
    /// with EVENT_IDX an avail event left behind), and again once we stop.
    /// After turning them back on, look at the ring once more before
    /// sleeping: the driver may have skipped a notification just before.
    pub fn notifications(&mut self, on: bool) -> Vec<WriteSegment> {
        self.polling = !on;
        let flags = if on { 0 } else { USED_F_NO_NOTIFY };
        let mut writes =
            vec![WriteSegment { addr: self.config.used, data: ByteBuf::from(flags.to_le_bytes().to_vec()) }];
        if on && self.event_idx {
            writes.push(self.avail_event());
        }
        writes
    }
}

/// Checks a queue the driver configured before the device uses it.
pub fn validate(config: &QueueConfig, max_size: u16) -> Result<(), String> {
    let size = config.size;
    if size == 0 || size > max_size || !size.is_power_of_two() {
        return Err(format!("queue {} size {size} (max {max_size}, power of two)", config.index));
    }
    let aligned = config.desc % 16 == 0 && config.avail % 2 == 0 && config.used % 4 == 0;
    if !aligned {
        return Err(format!("queue {} rings are misaligned", config.index));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(descs: &[(u64, u32, u16, u16)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, len, flags, next) in descs {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&next.to_le_bytes());
        }
        out
    }

    #[test]
    fn walks_a_chain_and_stops_loops_and_bad_indices() {
        let t = table(&[
            (0x1000, 16, DESC_F_NEXT, 1),
            (0x2000, 512, DESC_F_NEXT | DESC_F_WRITE, 2),
            (0x3000, 1, DESC_F_WRITE, 0),
        ]);
        let chain = walk(&t, 0, 3, 0, true).unwrap().direct(0).unwrap();
        assert_eq!(chain.len(), 3);
        assert!(chain[2].writable && !chain[0].writable);
        let looped = table(&[(0, 1, DESC_F_NEXT, 1), (0, 1, DESC_F_NEXT, 0)]);
        assert!(matches!(walk(&looped, 0, 2, 0, true), Err(QueueError::ChainTooLong(0))));
        let bad = table(&[(0, 1, DESC_F_NEXT, 7)]);
        assert!(matches!(walk(&bad, 0, 1, 0, true), Err(QueueError::BadIndex(7))));
        let nested = table(&[(0, 16, DESC_F_INDIRECT | DESC_F_NEXT, 0)]);
        assert!(matches!(walk(&nested, 0, 1, 0, true), Err(QueueError::BadIndirect(0))));
        // An indirect descriptor alone names its table, of whole descriptors,
        // where indirect tables are allowed (not inside one).
        let indirect = table(&[(0x9000, 32, DESC_F_INDIRECT, 0)]);
        let named = match walk(&indirect, 0, 1, 5, true) {
            Ok(Walked::Indirect(segment)) => segment,
            _ => panic!("an indirect table"),
        };
        assert_eq!((named.addr, named.len), (0x9000, 32));
        assert!(matches!(walk(&indirect, 0, 1, 5, false), Err(QueueError::BadIndirect(5))));
        let ragged = table(&[(0x9000, 24, DESC_F_INDIRECT, 0)]);
        assert!(matches!(walk(&ragged, 0, 1, 5, true), Err(QueueError::BadIndirect(5))));
    }

    #[test]
    fn completion_writes_elements_index_and_avail_event() {
        let config = QueueConfig { index: 0, size: 4, desc: 0x1000, avail: 0x2000, used: 0x3000 };
        let mut q = SplitQueue::new(config, true, true);
        q.next_avail = 2;
        let writes = q.complete(&[(3, 512), (1, 1)]);
        assert_eq!(writes.len(), 4);
        assert_eq!(writes[0].addr, 0x3004);
        assert_eq!(writes[0].data.as_slice(), &[3, 0, 0, 0, 0, 2, 0, 0]);
        assert_eq!(writes[1].addr, 0x300c);
        assert_eq!((writes[2].addr, writes[2].data.as_slice()), (0x3002, &[2u8, 0][..]));
        assert_eq!((writes[3].addr, writes[3].data.as_slice()), (0x3000 + 4 + 32, &[2u8, 0][..]));
    }

    #[test]
    fn interrupts_follow_the_drivers_used_event_or_flag() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let config = QueueConfig { index: 0, size: 8, desc: 0x1000, avail: 0x2000, used: 0x3000 };
        let used_event = |value: u16| mem.write_obj(value, GuestAddress(0x2000 + 4 + 2 * 8)).unwrap();
        let flags = |value: u16| mem.write_obj(value, GuestAddress(0x2000)).unwrap();
        // EVENT_IDX: the first decision interrupts whatever the driver asked.
        let mut queue = SplitQueue::new(config, true, false);
        used_event(100);
        queue.complete(&[(0, 1)]);
        assert!(queue.wants_interrupt(&mem), "the first decision");
        // Nothing completed since: no interrupt.
        assert!(!queue.wants_interrupt(&mem));
        // Used index 1 -> 3 passes a used event of 1 and 2, not of 3 or 0.
        for (event, wanted) in [(1, true), (2, true), (3, false), (0, false)] {
            let mut queue = SplitQueue::new(config, true, false);
            queue.complete(&[(0, 1)]);
            queue.wants_interrupt(&mem);
            used_event(event);
            queue.complete(&[(1, 1), (2, 1)]);
            assert_eq!(queue.wants_interrupt(&mem), wanted, "used event {event}");
        }
        // Across the index's wrap: 65535 -> 1 passes 65535 and 0.
        let state = QueueState { config, next_avail: 0, next_used: 65534 };
        let mut queue = SplitQueue::restore(&state, true, false);
        queue.complete(&[(0, 1)]);
        queue.wants_interrupt(&mem);
        used_event(0);
        queue.complete(&[(1, 1), (2, 1)]);
        assert!(queue.wants_interrupt(&mem), "across the wrap");
        // Without EVENT_IDX: the flag, read at each decision.
        let mut queue = SplitQueue::new(config, false, false);
        flags(AVAIL_F_NO_INTERRUPT);
        queue.complete(&[(0, 1)]);
        assert!(queue.wants_interrupt(&mem), "the first decision");
        queue.complete(&[(1, 1)]);
        assert!(!queue.wants_interrupt(&mem), "the driver wants none");
        flags(0);
        queue.complete(&[(2, 1)]);
        assert!(queue.wants_interrupt(&mem), "the driver wants one");
    }

    #[test]
    fn queue_configs_are_checked() {
        let ok = QueueConfig { index: 0, size: 256, desc: 0x1000, avail: 0x2000, used: 0x3000 };
        assert!(validate(&ok, 256).is_ok());
        assert!(validate(&QueueConfig { size: 3, ..ok }, 256).is_err());
        assert!(validate(&QueueConfig { size: 512, ..ok }, 256).is_err());
        assert!(validate(&QueueConfig { desc: 0x1008, ..ok }, 256).is_err());
    }
}

#[cfg(test)]
mod ring_tests {
    use super::*;
    use crate::devices::memory::MappedMemory;
    use vm_memory::GuestMemoryAtomic;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const INDIRECT: u64 = 0x4000;

    fn put_desc(mem: &GuestMemoryMmap, table: u64, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * index;
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    /// The same memory, not mapped here: the copying way, as `rpc-dma`
    /// walks its rings (one snapshot of both rings, prefetched buffers).
    struct Copied(MappedMemory);

    impl DeviceMemory for Copied {
        async fn read(&self, segments: Vec<Segment>) -> Result<Vec<ByteBuf>, AccessError> {
            self.0.read(segments).await
        }
        async fn write(&self, segments: Vec<WriteSegment>) -> Result<(), AccessError> {
            self.0.write(segments).await
        }
        async fn read_granted(&self, ranges: Vec<rpc_schema::GrantRange>) -> Result<Vec<ByteBuf>, AccessError> {
            self.0.read_granted(ranges).await
        }
        async fn write_granted(&self, writes: Vec<rpc_schema::GrantWrite>) -> Result<(), AccessError> {
            self.0.write_granted(writes).await
        }
    }

    /// Head 0: a direct chain 0 -> 1. Head 2: an indirect table of two
    /// descriptors. Both available, in a queue of 4.
    fn two_chains() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        put_desc(&mem, DESC, 0, 0x5000, 16, DESC_F_NEXT, 1);
        put_desc(&mem, DESC, 1, 0x6000, 512, DESC_F_WRITE, 0);
        put_desc(&mem, DESC, 2, INDIRECT, 32, DESC_F_INDIRECT, 0);
        put_desc(&mem, INDIRECT, 0, 0x7000, 16, DESC_F_NEXT, 1);
        put_desc(&mem, INDIRECT, 1, 0x8000, 1, DESC_F_WRITE, 0);
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(2u16, GuestAddress(AVAIL + 6)).unwrap();
        mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap(); // avail idx
        mem
    }

    /// Pops [`two_chains`], then head 0 again, and completes both: the same
    /// chains and used ring whichever way the device reaches the rings.
    fn pop_and_complete<M: DeviceMemory>(memory: &M, mem: &GuestMemoryMmap) -> (Vec<Chain>, Prefetched) {
        let config = QueueConfig { index: 0, size: 4, desc: DESC, avail: AVAIL, used: USED };
        let mut queue = SplitQueue::new(config, true, true);
        let (chains, _) = block_on(queue.pop_all(memory)).unwrap();
        assert_eq!(chains.len(), 2);
        assert_eq!(
            chains[0].buffers,
            vec![Buffer { addr: 0x5000, len: 16, writable: false }, Buffer { addr: 0x6000, len: 512, writable: true }]
        );
        assert_eq!(chains[1].head, 2);
        assert_eq!(chains[1].buffers[1], Buffer { addr: 0x8000, len: 1, writable: true });
        let (chains, _) = block_on(queue.pop_all(memory)).unwrap();
        assert!(chains.is_empty(), "nothing new the second time");
        mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0u16, GuestAddress(AVAIL + 8)).unwrap();
        mem.write_obj(3u16, GuestAddress(AVAIL + 2)).unwrap();
        let popped = block_on(queue.pop_all(memory)).unwrap();
        assert_eq!(popped.0.len(), 1, "head 0 again");

        assert!(block_on(super::super::ring::deliver_all(memory, &mut queue, &[(0, 513), (2, 1)], Vec::new())).unwrap());
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2, "used idx");
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4)).unwrap(), 0, "first used element's head");
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 513, "first used element's length");
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4 + 8)).unwrap(), 2, "second used element's head");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 4 + 8 * 4)).unwrap(), 3, "avail_event");
        popped
    }

    #[test]
    fn pops_direct_and_indirect_chains_and_publishes_avail_event() {
        // The copying way: the readable buffers just seen come back
        // prefetched on the next pop that has something (head 0 again).
        let mem = two_chains();
        let (_, mut prefetched) =
            pop_and_complete(&Copied(MappedMemory::new(GuestMemoryAtomic::new(mem.clone()))), &mem);
        assert_eq!(prefetched.take(0x5000, 8), Some(0x1122_3344_5566_7788u64.to_le_bytes().to_vec()));
        assert_eq!(prefetched.take(0x7000, 16).map(|b| b.len()), Some(16));
        assert_eq!(prefetched.take(0x6000, 1), None, "writable buffers are not prefetched");
        // Where guest RAM is mapped, the same, read and written in place:
        // nothing is copied ahead (a buffer is read where it lies).
        let mem = two_chains();
        let (_, mut prefetched) = pop_and_complete(&MappedMemory::new(GuestMemoryAtomic::new(mem.clone())), &mem);
        assert_eq!(prefetched.take(0x5000, 8), None);
    }

    /// Where guest RAM is mapped, a broken chain fails the queue just as it
    /// does the copying way, and a used ring outside RAM is left to it.
    #[test]
    fn mapped_rings_are_checked_as_copied_ones_are() {
        let broken = |setup: &dyn Fn(&GuestMemoryMmap)| {
            let mem = two_chains();
            setup(&mem);
            let config = QueueConfig { index: 0, size: 4, desc: DESC, avail: AVAIL, used: USED };
            let mapped = block_on(
                SplitQueue::new(config, true, true).pop_all(&MappedMemory::new(GuestMemoryAtomic::new(mem.clone()))),
            )
            .err();
            let copied = block_on(
                SplitQueue::new(config, true, true).pop_all(&Copied(MappedMemory::new(GuestMemoryAtomic::new(mem)))),
            )
            .err();
            (mapped.map(|e| e.to_string()), copied.map(|e| e.to_string()))
        };
        type Breaks<'a> = &'a dyn Fn(&GuestMemoryMmap);
        let cases: [(&str, Breaks); 5] = [
            ("a loop", &|mem| put_desc(mem, DESC, 1, 0x6000, 512, DESC_F_WRITE | DESC_F_NEXT, 0)),
            ("an index outside the queue", &|mem| put_desc(mem, DESC, 1, 0x6000, 512, DESC_F_NEXT, 9)),
            ("a bad indirect length", &|mem| put_desc(mem, DESC, 2, INDIRECT, 24, DESC_F_INDIRECT, 0)),
            ("an indirect table outside RAM", &|mem| put_desc(mem, DESC, 2, 0xfff0, 32, DESC_F_INDIRECT, 0)),
            ("an avail index past the queue", &|mem| mem.write_obj(9u16, GuestAddress(AVAIL + 2)).unwrap()),
        ];
        for (case, setup) in cases {
            let (mapped, copied) = broken(setup);
            assert!(mapped.is_some(), "{case}: the mapped pop took it");
            assert_eq!(mapped, copied, "{case}");
        }
        // A used ring that is not RAM: nothing written in place, and the queue unmoved.
        let mem = two_chains();
        let memory = MappedMemory::new(GuestMemoryAtomic::new(mem.clone()));
        let config = QueueConfig { index: 0, size: 4, desc: DESC, avail: AVAIL, used: 0xfff8 };
        let mut queue = SplitQueue::new(config, true, true);
        let before = queue.state();
        assert!(!queue.complete_mapped(&memory.mapped().unwrap(), &[(0, 1)]));
        assert_eq!(queue.state().next_used, before.next_used);
    }

    #[test]
    fn a_pop_takes_at_most_a_batch_of_bytes_and_leaves_the_rest_available() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // Three single-buffer requests of 10 MiB each (the buffers need not be RAM to be popped).
        for head in 0..3u16 {
            put_desc(&mem, DESC, head.into(), 0x100_0000, 10 << 20, DESC_F_WRITE, 0);
            mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(head))).unwrap();
        }
        mem.write_obj(3u16, GuestAddress(AVAIL + 2)).unwrap();
        let memory = MappedMemory::new(GuestMemoryAtomic::new(mem));
        let config = QueueConfig { index: 0, size: 4, desc: DESC, avail: AVAIL, used: USED };
        let mut queue = SplitQueue::new(config, false, false);
        let mut heads = Vec::new();
        loop {
            let (chains, _) = block_on(queue.pop_all(&memory)).unwrap();
            if chains.is_empty() {
                break;
            }
            assert_eq!(chains.len(), 1, "20 MiB would exceed a batch");
            heads.extend(chains.iter().map(|c| c.head));
        }
        assert_eq!(heads, [0, 1, 2], "every request is taken, in order, once");
    }

    #[test]
    fn refuses_an_avail_index_beyond_the_queue_and_out_of_ram_rings() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(9u16, GuestAddress(AVAIL + 2)).unwrap();
        let memory = MappedMemory::new(GuestMemoryAtomic::new(mem));
        let config = QueueConfig { index: 0, size: 4, desc: DESC, avail: AVAIL, used: USED };
        let mut queue = SplitQueue::new(config, false, false);
        assert!(matches!(block_on(queue.pop_all(&memory)), Err(QueueError::AvailOverrun { .. })));
        let outside = QueueConfig { desc: 0xfff0, ..config };
        let mut queue = SplitQueue::new(outside, false, false);
        assert!(matches!(block_on(queue.pop_all(&memory)), Err(QueueError::Memory(_))));
    }
}
