//! The ring-walking transport (`rpc-dma`, `shared`, `inprocess`): the
//! device pops chains itself ([`super::virtqueue`]), reads what device logic
//! wants of each chain's readable bytes, and writes the replies and the used
//! ring back by guest address.
use super::memory::{read_all, write_then, AccessError, DeviceMemory};
use super::request::{pieces, Reply, Request};
use super::virtqueue::{Chain, Prefetched, QueueError, SplitQueue};
use super::Backend;
use rpc_schema::{PostedBuffer, Segment, WriteSegment};
use serde_bytes::ByteBuf;

pub(super) fn posted(chain: &Chain) -> Vec<PostedBuffer> {
    chain.buffers.iter().map(|b| PostedBuffer { len: b.len, writable: b.writable }).collect()
}

/// The guest ranges that hold `len` bytes from `start` of a chain's stream.
fn ranges(chain: &Chain, writable: bool, start: u64, len: u64) -> Vec<(Segment, u64)> {
    let mut at = start;
    pieces(&posted(chain), writable, start, len)
        .into_iter()
        .map(|(index, offset, len)| {
            let segment = Segment { addr: chain.buffers[index as usize].addr.wrapping_add(offset as u64), len };
            let stream_offset = at;
            at += len as u64;
            (segment, stream_offset)
        })
        .collect()
}

/// Each chain as a request, with the readable bytes the device wants:
/// prefetched where possible, the rest in one batch of reads (or one request
/// at a time, to find which names memory that is not RAM).
pub async fn gather<M: DeviceMemory>(
    mem: &M,
    backend: &Backend,
    chains: &[Chain],
    prefetched: &mut Prefetched,
) -> Result<Vec<Request>, AccessError> {
    let mut plans = Vec::with_capacity(chains.len());
    let mut missing = Vec::new();
    for chain in chains {
        let (readable_len, writable_len) = chain.stream_lengths();
        let wanted = backend.wanted(readable_len, writable_len);
        let segments: Vec<Segment> = ranges(chain, false, 0, wanted).into_iter().map(|(s, _)| s).collect();
        let got: Vec<Option<Vec<u8>>> = segments.iter().map(|s| prefetched.take(s.addr, s.len)).collect();
        missing.extend(segments.iter().zip(&got).filter(|(_, g)| g.is_none()).map(|(s, _)| *s));
        plans.push((readable_len, writable_len, segments, got));
    }
    let mut fetched = match read_all(mem, &missing).await {
        Ok(bytes) => Some(bytes.into_iter()),
        Err(AccessError::Refused(_)) => None,
        Err(e) => return Err(e),
    };
    let mut requests = Vec::with_capacity(plans.len());
    for (readable_len, writable_len, segments, mut got) in plans {
        if got.iter().any(Option::is_none) {
            match fetched.as_mut() {
                Some(iter) => got.iter_mut().filter(|g| g.is_none()).for_each(|g| *g = iter.next()),
                None => match read_all(mem, &segments).await {
                    Ok(bytes) => got = bytes.into_iter().map(Some).collect(),
                    Err(AccessError::Refused(_)) => {}
                    Err(e) => return Err(e),
                },
            }
        }
        let readable = got.into_iter().collect::<Option<Vec<Vec<u8>>>>().map(|parts| parts.concat().into());
        requests.push(Request { readable_len, writable_len, readable });
    }
    Ok(requests)
}

/// The guest writes that carry a reply into its chain's writable buffers.
fn writes(chain: &Chain, reply: &Reply) -> Vec<WriteSegment> {
    let mut out = Vec::new();
    for (start, bytes) in &reply.writes {
        for (segment, at) in ranges(chain, true, *start, bytes.len() as u64) {
            let from = (at - start) as usize;
            let data = ByteBuf::from(bytes[from..from + segment.len as usize].to_vec());
            out.push(WriteSegment { addr: segment.addr, data });
        }
    }
    out
}

/// Writes every reply and then the used ring, in one go where it fits.
/// Where the VMM refuses (some buffer is not RAM), each request is tried on
/// its own; one whose buffers are bad gets the device's error reply, or, if
/// even that cannot be written, completes with nothing written. Returns how
/// many replies ended in an error.
pub async fn deliver<M: DeviceMemory>(
    mem: &M,
    queue: &mut SplitQueue,
    backend: &Backend,
    chains: &[Chain],
    requests: &[Request],
    replies: &[Reply],
) -> Result<u64, QueueError> {
    let mut failed = replies.iter().filter(|r| r.failed).count() as u64;
    let mut done: Vec<(u16, u32)> = chains.iter().zip(replies).map(|(c, r)| (c.head, r.used_len)).collect();
    let data = chains.iter().zip(replies).flat_map(|(chain, reply)| writes(chain, reply)).collect();
    if deliver_all(mem, queue, &done, data).await? {
        return Ok(failed);
    }
    for ((slot, chain), (request, reply)) in done.iter_mut().zip(chains).zip(requests.iter().zip(replies)) {
        let data = writes(chain, reply);
        if data.is_empty() {
            continue;
        }
        match mem.write(data).await {
            Ok(()) => continue,
            Err(AccessError::Refused(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let refusal = backend.refuse(request.writable_len);
        failed += u64::from(!reply.failed);
        slot.1 = match mem.write(writes(chain, &refusal)).await {
            Ok(()) => refusal.used_len,
            Err(AccessError::Refused(_)) => 0,
            Err(e) => return Err(e.into()),
        };
    }
    if !deliver_all(mem, queue, &done, Vec::new()).await? {
        return Err(QueueError::Memory(AccessError::Transport("the used ring is not in RAM".into())));
    }
    Ok(failed)
}

/// Writes `data`, then the used ring entries `done` (head, used length).
/// Returns false (and leaves the queue as it was) when the VMM refused part of it.
pub(super) async fn deliver_all<M: DeviceMemory>(
    mem: &M,
    queue: &mut SplitQueue,
    done: &[(u16, u32)],
    data: Vec<WriteSegment>,
) -> Result<bool, QueueError> {
    // Nothing but the used ring (a network device's frames are in place
    // already), where guest RAM is mapped here: written in place.
    if data.is_empty() && mem.mapped().is_some_and(|mapped| queue.complete_mapped(&mapped, done)) {
        return Ok(true);
    }
    let before = queue.clone();
    let ring = queue.complete(done);
    match write_then(mem, data, ring).await {
        Ok(()) => Ok(true),
        Err(AccessError::Refused(_)) => {
            *queue = before;
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}
