//! How a device reaches guest memory: an async trait with one implementation
//! per memory mode. Devices never see more than this.
use rpc_schema::{GuestMemoryClient, MemoryError, Segment, WriteSegment};
use serde_bytes::ByteBuf;
use std::future::Future;
use tarpc::context;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("the VMM refused: {0}")]
    Refused(#[from] MemoryError),
    #[error("the memory channel failed: {0}")]
    Transport(String),
}

pub trait DeviceMemory: Send + Sync + 'static {
    /// Reads the segments; one buffer per segment, in order.
    fn read(&self, segments: Vec<Segment>) -> impl Future<Output = Result<Vec<ByteBuf>, AccessError>> + Send;
    /// Writes the segments in order.
    fn write(&self, segments: Vec<WriteSegment>) -> impl Future<Output = Result<(), AccessError>> + Send;
}

/// `rpc` mode: every access is a request to the VMM's memory service.
pub struct RpcMemory {
    client: GuestMemoryClient,
}

impl RpcMemory {
    pub fn new(client: GuestMemoryClient) -> Self {
        RpcMemory { client }
    }
}

impl DeviceMemory for RpcMemory {
    async fn read(&self, segments: Vec<Segment>) -> Result<Vec<ByteBuf>, AccessError> {
        let reply = self.client.read(context::current(), segments).await;
        reply.map_err(|e| AccessError::Transport(e.to_string()))?.map_err(AccessError::from)
    }

    async fn write(&self, segments: Vec<WriteSegment>) -> Result<(), AccessError> {
        let reply = self.client.write(context::current(), segments).await;
        reply.map_err(|e| AccessError::Transport(e.to_string()))?.map_err(AccessError::from)
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
