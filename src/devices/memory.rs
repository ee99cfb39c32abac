//! How a device reaches guest memory: an async trait with one implementation
//! per memory mode. Devices never see more than this.
use rpc_schema::{Answer, GrantRange, GrantWrite, GuestMemoryClient, MemoryError, Segment, WriteSegment};
use serde_bytes::ByteBuf;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;
use tarpc::context;
use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("the VMM refused: {0}")]
    Refused(#[from] MemoryError),
    #[error("the memory channel failed: {0}")]
    Transport(String),
}

/// By address (a device that walks its own ring) or by grant (a device that
/// serves requests the VMM posted); each mode offers the calls it allows.
pub trait DeviceMemory: Send + Sync + 'static {
    /// Reads the segments; one buffer per segment, in order.
    fn read(&self, segments: Vec<Segment>) -> impl Future<Output = Result<Vec<ByteBuf>, AccessError>> + Send;
    /// Writes the segments in order.
    fn write(&self, segments: Vec<WriteSegment>) -> impl Future<Output = Result<(), AccessError>> + Send;
    /// Reads pieces of granted buffers; one buffer per range, in order.
    fn read_granted(&self, ranges: Vec<GrantRange>) -> impl Future<Output = Result<Vec<ByteBuf>, AccessError>> + Send;
    /// Writes into granted buffers.
    fn write_granted(&self, writes: Vec<GrantWrite>) -> impl Future<Output = Result<(), AccessError>> + Send;
    /// Completes granted requests held past their batch (`rpc` only); a
    /// slot the answer's bytes are staged in is free again once this returns.
    fn complete(&self, _answer: Answer) -> impl Future<Output = Result<(), AccessError>> + Send {
        async { Err(AccessError::Transport("only a request-level device holds requests".into())) }
    }
    /// Guest RAM as this process maps it, for zero-copy transfers: only in
    /// `shared` and `inprocess`. The snapshot keeps the map it names mapped.
    fn mapped(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        None
    }
}

fn rpc_reply<T>(reply: Result<Result<T, MemoryError>, tarpc::client::RpcError>) -> Result<T, AccessError> {
    reply.map_err(|e| AccessError::Transport(e.to_string()))?.map_err(AccessError::from)
}

/// `rpc` mode: every access is a request to the VMM's memory service.
pub struct RpcMemory {
    client: GuestMemoryClient,
    /// The VMM answers at most this many calls at once and refuses the
    /// rest, so the device waits its turn here instead.
    in_flight: tokio::sync::Semaphore,
}

impl RpcMemory {
    pub fn new(client: GuestMemoryClient) -> Self {
        RpcMemory { client, in_flight: tokio::sync::Semaphore::new(rpc_schema::MAX_CALLS_IN_FLIGHT) }
    }

    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, AccessError> {
        self.in_flight.acquire().await.map_err(|e| AccessError::Transport(e.to_string()))
    }
}

impl DeviceMemory for RpcMemory {
    async fn read(&self, segments: Vec<Segment>) -> Result<Vec<ByteBuf>, AccessError> {
        let _turn = self.turn().await?;
        rpc_reply(self.client.read(context::current(), segments).await)
    }

    async fn write(&self, segments: Vec<WriteSegment>) -> Result<(), AccessError> {
        let _turn = self.turn().await?;
        rpc_reply(self.client.write(context::current(), segments).await)
    }

    async fn read_granted(&self, ranges: Vec<GrantRange>) -> Result<Vec<ByteBuf>, AccessError> {
        let _turn = self.turn().await?;
        rpc_reply(self.client.read_granted(context::current(), ranges).await)
    }

    async fn write_granted(&self, writes: Vec<GrantWrite>) -> Result<(), AccessError> {
        let _turn = self.turn().await?;
        rpc_reply(self.client.write_granted(context::current(), writes).await)
    }

    async fn complete(&self, answer: Answer) -> Result<(), AccessError> {
        let _turn = self.turn().await?;
        rpc_reply(self.client.complete(context::current(), answer).await)
    }
}

/// `shared` and `inprocess` modes: guest RAM is mapped here, and accesses go
/// through the same checks the VMM's memory service applies.
pub struct MappedMemory {
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl MappedMemory {
    pub fn new(memory: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        MappedMemory { memory }
    }
}

impl DeviceMemory for MappedMemory {
    async fn read(&self, segments: Vec<Segment>) -> Result<Vec<ByteBuf>, AccessError> {
        use vm_memory::GuestAddressSpace;
        Ok(crate::guest_access::read(&self.memory.memory(), &segments)?)
    }

    async fn write(&self, segments: Vec<WriteSegment>) -> Result<(), AccessError> {
        use vm_memory::GuestAddressSpace;
        Ok(crate::guest_access::write(&self.memory.memory(), &segments)?)
    }

    async fn read_granted(&self, _: Vec<GrantRange>) -> Result<Vec<ByteBuf>, AccessError> {
        Err(AccessError::Transport("a device that maps guest RAM holds no grants".into()))
    }

    async fn write_granted(&self, _: Vec<GrantWrite>) -> Result<(), AccessError> {
        Err(AccessError::Transport("a device that maps guest RAM holds no grants".into()))
    }

    fn mapped(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        use vm_memory::GuestAddressSpace;
        Some(self.memory.memory())
    }
}

/// Counts and times every call on the memory it wraps, in every mode, so a
/// device can say where its time went.
pub struct Timed<M> {
    inner: M,
    stats: MemoryStats,
}

#[derive(Default)]
struct MemoryStats {
    calls: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    wait_ns: AtomicU64,
    latency: [AtomicU64; rpc_schema::LATENCY_BUCKETS],
}

impl<M: DeviceMemory> Timed<M> {
    pub fn new(inner: M) -> Self {
        Timed { inner, stats: MemoryStats::default() }
    }

    fn record(&self, started: Instant, read: u64, written: u64) {
        let elapsed = started.elapsed();
        let s = &self.stats;
        s.calls.fetch_add(1, Relaxed);
        s.bytes_read.fetch_add(read, Relaxed);
        s.bytes_written.fetch_add(written, Relaxed);
        s.wait_ns.fetch_add(elapsed.as_nanos() as u64, Relaxed);
        let micros = elapsed.as_micros() as u64;
        let bucket = (64 - micros.leading_zeros() as usize).min(rpc_schema::LATENCY_BUCKETS - 1);
        s.latency[bucket].fetch_add(1, Relaxed);
    }

    /// Counts bytes that moved between guest memory and the disk directly
    /// (zero copy: no memory call of the device's own).
    pub fn count_direct(&self, read: u64, written: u64) {
        self.stats.bytes_read.fetch_add(read, Relaxed);
        self.stats.bytes_written.fetch_add(written, Relaxed);
    }

    /// Fills the memory fields of `counters`.
    pub fn report(&self, counters: &mut rpc_schema::DeviceCounters) {
        let s = &self.stats;
        counters.memory_calls = s.calls.load(Relaxed);
        counters.bytes_read = s.bytes_read.load(Relaxed);
        counters.bytes_written = s.bytes_written.load(Relaxed);
        counters.memory_wait_ns = s.wait_ns.load(Relaxed);
        counters.memory_latency_log2_us = s.latency.iter().map(|b| b.load(Relaxed)).collect();
    }

    /// Carries a saved device's figures over (shared-mode rebuilds).
    pub fn resume_from(&self, counters: &rpc_schema::DeviceCounters) {
        let s = &self.stats;
        s.calls.store(counters.memory_calls, Relaxed);
        s.bytes_read.store(counters.bytes_read, Relaxed);
        s.bytes_written.store(counters.bytes_written, Relaxed);
        s.wait_ns.store(counters.memory_wait_ns, Relaxed);
        for (bucket, value) in s.latency.iter().zip(&counters.memory_latency_log2_us) {
            bucket.store(*value, Relaxed);
        }
    }
}

impl<M: DeviceMemory> DeviceMemory for Timed<M> {
    async fn read(&self, segments: Vec<Segment>) -> Result<Vec<ByteBuf>, AccessError> {
        let started = Instant::now();
        let bytes = segments.iter().map(|s| s.len as u64).sum();
        let result = self.inner.read(segments).await;
        self.record(started, bytes, 0);
        result
    }

    async fn write(&self, segments: Vec<WriteSegment>) -> Result<(), AccessError> {
        let started = Instant::now();
        let bytes = segments.iter().map(|s| s.data.len() as u64).sum();
        let result = self.inner.write(segments).await;
        self.record(started, 0, bytes);
        result
    }

    async fn read_granted(&self, ranges: Vec<GrantRange>) -> Result<Vec<ByteBuf>, AccessError> {
        let started = Instant::now();
        let bytes = ranges.iter().map(|r| r.len as u64).sum();
        let result = self.inner.read_granted(ranges).await;
        self.record(started, bytes, 0);
        result
    }

    async fn write_granted(&self, writes: Vec<GrantWrite>) -> Result<(), AccessError> {
        let started = Instant::now();
        let bytes = writes.iter().map(|w| w.write.data.len() as u64).sum();
        let result = self.inner.write_granted(writes).await;
        self.record(started, 0, bytes);
        result
    }

    async fn complete(&self, answer: Answer) -> Result<(), AccessError> {
        let started = Instant::now();
        let staged = answer.staged.iter().flat_map(|c| &c.writes).map(|w| u64::from(w.len));
        let bytes = staged.chain(answer.completions.iter().flat_map(|c| &c.writes).map(|w| w.data.len() as u64)).sum();
        let result = self.inner.complete(answer).await;
        self.record(started, 0, bytes);
        result
    }

    fn mapped(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.inner.mapped()
    }
}

/// Splits `segments` into requests within the protocol's limits, issues them
/// concurrently, and returns one buffer per input segment.
pub async fn read_all<M: DeviceMemory>(mem: &M, segments: &[Segment]) -> Result<Vec<Vec<u8>>, AccessError> {
    let pieces = split(segments.iter().map(|s| (s.addr, s.len as u64)));
    let requests = group(&pieces);
    let replies = futures::future::try_join_all(
        requests
            .iter()
            .map(|r| mem.read(r.iter().map(|&i| Segment { addr: pieces[i].1, len: pieces[i].2 as u32 }).collect())),
    )
    .await?;
    let mut out: Vec<Vec<u8>> = segments.iter().map(|s| Vec::with_capacity(s.len as usize)).collect();
    for (request, reply) in requests.iter().zip(replies) {
        for (&piece, bytes) in request.iter().zip(reply) {
            out[pieces[piece].0].extend_from_slice(&bytes);
        }
    }
    Ok(out)
}

/// Writes `data` (split and concurrent as needed), then `last` in one final
/// request, so that `last` (a used ring update) lands after everything else.
pub async fn write_then<M: DeviceMemory>(
    mem: &M,
    data: Vec<WriteSegment>,
    last: Vec<WriteSegment>,
) -> Result<(), AccessError> {
    let total: u64 = data.iter().chain(&last).map(|w| w.data.len() as u64).sum();
    if total <= rpc_schema::MAX_TRANSFER && data.len() + last.len() <= rpc_schema::MAX_SEGMENTS {
        let mut all = data;
        all.extend(last);
        return mem.write(all).await;
    }
    let pieces = split(data.iter().map(|w| (w.addr, w.data.len() as u64)));
    let requests = group(&pieces);
    futures::future::try_join_all(requests.iter().map(|r| {
        mem.write(
            r.iter()
                .map(|&i| {
                    let (seg, addr, len, offset) = pieces[i];
                    let bytes = &data[seg].data[offset as usize..(offset + len) as usize];
                    WriteSegment { addr, data: ByteBuf::from(bytes.to_vec()) }
                })
                .collect(),
        )
    }))
    .await?;
    mem.write(last).await
}

/// (input index, addr, len, offset in the input) pieces of at most MAX_TRANSFER bytes.
fn split(segments: impl Iterator<Item = (u64, u64)>) -> Vec<(usize, u64, u64, u64)> {
    let mut pieces = Vec::new();
    for (index, (addr, len)) in segments.enumerate() {
        let mut offset = 0;
        loop {
            let take = (len - offset).min(rpc_schema::MAX_TRANSFER);
            pieces.push((index, addr.wrapping_add(offset), take, offset));
            offset += take;
            if offset >= len {
                break;
            }
        }
    }
    pieces
}

/// Groups consecutive pieces into requests within the byte and segment limits.
fn group(pieces: &[(usize, u64, u64, u64)]) -> Vec<Vec<usize>> {
    let mut requests: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for (i, piece) in pieces.iter().enumerate() {
        let full = requests
            .last()
            .is_none_or(|r| r.len() >= rpc_schema::MAX_SEGMENTS || bytes + piece.2 > rpc_schema::MAX_TRANSFER);
        if full {
            requests.push(Vec::new());
            bytes = 0;
        }
        requests.last_mut().unwrap().push(i);
        bytes += piece.2;
    }
    requests
}
