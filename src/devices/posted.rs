//! The request-level transport (`rpc`): the VMM walks the ring and posts
//! each chain as a [`PostedRequest`] named by its grant. Readable bytes come
//! inline (or are fetched by grant), replies go back inline (or are written
//! by grant first when a reply would outgrow its frame). The device never
//! sees a guest address.
use super::memory::{AccessError, DeviceMemory};
use super::request::{pieces, stream_lengths, Reply, Request};
use super::Backend;
use rpc_schema::{
    BufferWrite, CompletedRequest, GrantRange, GrantWrite, PostedBuffer, PostedRequest, MAX_BATCH_INLINE, MAX_SEGMENTS,
    MAX_TRANSFER,
};
use serde_bytes::ByteBuf;

/// Serves a batch; returns its completions and how many ended in an error.
pub async fn serve<M: DeviceMemory>(
    mem: &M,
    backend: &mut Backend,
    batch: Vec<PostedRequest>,
) -> Result<(Vec<CompletedRequest>, u64), AccessError> {
    let mut requests = Vec::with_capacity(batch.len());
    for posted in &batch {
        requests.push(request(mem, backend, posted).await?);
    }
    let replies = backend.serve(&requests).await?;
    let mut failed = 0;
    let mut budget = MAX_BATCH_INLINE;
    let mut completions = Vec::with_capacity(batch.len());
    for ((posted, request), mut reply) in batch.iter().zip(&requests).zip(replies) {
        let mut writes = buffer_writes(&posted.buffers, &reply);
        let bytes: u64 = writes.iter().map(|w| w.data.len() as u64).sum();
        if bytes <= budget {
            budget -= bytes;
        } else {
            match write_by_grant(mem, posted.grant, std::mem::take(&mut writes)).await {
                Ok(()) => {}
                // The guest's buffer went away (an unplug): an error reply instead.
                Err(AccessError::Refused(e)) if !e.is_violation() => {
                    reply = backend.refuse(request.writable_len);
                    writes = buffer_writes(&posted.buffers, &reply);
                }
                Err(e) => return Err(e),
            }
        }
        failed += u64::from(reply.failed);
        completions.push(CompletedRequest { grant: posted.grant, used_len: reply.used_len, writes });
    }
    Ok((completions, failed))
}

/// The request device logic sees: its readable bytes inline, topped up by
/// grant reads to what the device wants; none when a buffer is not RAM.
async fn request<M: DeviceMemory>(mem: &M, backend: &Backend, posted: &PostedRequest) -> Result<Request, AccessError> {
    let (readable_len, writable_len) = stream_lengths(&posted.buffers);
    let wanted = backend.wanted(readable_len, writable_len);
    let mut request = Request { readable_len, writable_len, readable: None };
    if posted.faulty {
        return Ok(request);
    }
    let mut bytes = posted.readable.to_vec();
    bytes.truncate(wanted as usize);
    let have = bytes.len() as u64;
    if have < wanted {
        let ranges = pieces(&posted.buffers, false, have, wanted - have)
            .into_iter()
            .flat_map(|(buffer, offset, len)| split(posted.grant, buffer, offset, len))
            .collect::<Vec<_>>();
        let calls = ranges.chunks(MAX_SEGMENTS).flat_map(by_transfer).map(|group| mem.read_granted(group));
        match futures::future::try_join_all(calls).await {
            Ok(parts) => parts.into_iter().flatten().for_each(|part| bytes.extend_from_slice(&part)),
            Err(AccessError::Refused(e)) if !e.is_violation() => return Ok(request),
            Err(e) => return Err(e),
        }
    }
    request.readable = Some(bytes);
    Ok(request)
}

/// A reply's writes as pieces of the chain's writable buffers.
pub(super) fn buffer_writes(buffers: &[PostedBuffer], reply: &Reply) -> Vec<BufferWrite> {
    let mut out = Vec::new();
    for (start, bytes) in &reply.writes {
        let mut from = 0usize;
        for (buffer, offset, len) in pieces(buffers, true, *start, bytes.len() as u64) {
            let data = ByteBuf::from(bytes[from..from + len as usize].to_vec());
            from += len as usize;
            out.push(BufferWrite { buffer, offset, data });
        }
    }
    out
}

/// Writes a reply's data by grant, in calls within the protocol's limits.
async fn write_by_grant<M: DeviceMemory>(mem: &M, grant: u64, writes: Vec<BufferWrite>) -> Result<(), AccessError> {
    let mut calls = Vec::new();
    let (mut call, mut bytes) = (Vec::new(), 0u64);
    for write in writes {
        for at in (0..write.data.len()).step_by(MAX_TRANSFER as usize) {
            let chunk = &write.data[at..(at + MAX_TRANSFER as usize).min(write.data.len())];
            if bytes + chunk.len() as u64 > MAX_TRANSFER || call.len() == MAX_SEGMENTS {
                calls.push(std::mem::take(&mut call));
                bytes = 0;
            }
            bytes += chunk.len() as u64;
            let offset = write.offset + at as u32;
            call.push(GrantWrite {
                grant,
                write: BufferWrite { buffer: write.buffer, offset, data: ByteBuf::from(chunk) },
            });
        }
    }
    calls.push(call);
    futures::future::try_join_all(calls.into_iter().filter(|c| !c.is_empty()).map(|c| mem.write_granted(c))).await?;
    Ok(())
}

/// A piece of a buffer as ranges of at most [`MAX_TRANSFER`] bytes.
fn split(grant: u64, buffer: u16, offset: u32, len: u32) -> Vec<GrantRange> {
    let step = MAX_TRANSFER as u32;
    (0..len.div_ceil(step))
        .map(|i| GrantRange { grant, buffer, offset: offset + i * step, len: (len - i * step).min(step) })
        .collect()
}

/// Consecutive ranges grouped into calls of at most [`MAX_TRANSFER`] bytes.
fn by_transfer(ranges: &[GrantRange]) -> Vec<Vec<GrantRange>> {
    let mut calls: Vec<Vec<GrantRange>> = Vec::new();
    let mut bytes = 0u64;
    for range in ranges {
        if calls.is_empty() || bytes + range.len as u64 > MAX_TRANSFER {
            calls.push(Vec::new());
            bytes = 0;
        }
        bytes += range.len as u64;
        calls.last_mut().unwrap().push(*range);
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_read_in_calls_within_the_limits() {
        let ranges = split(7, 1, 16, 3 * MAX_TRANSFER as u32 + 5);
        assert_eq!(ranges.len(), 4);
        assert_eq!(ranges[3], GrantRange { grant: 7, buffer: 1, offset: 16 + 3 * MAX_TRANSFER as u32, len: 5 });
        let calls = by_transfer(&ranges);
        assert_eq!(calls.len(), 4);
        assert!(calls.iter().all(|c| c.iter().map(|r| r.len as u64).sum::<u64>() <= MAX_TRANSFER));
    }

    #[test]
    fn replies_land_in_the_right_buffers() {
        let buffers = [
            PostedBuffer { len: 16, writable: false },
            PostedBuffer { len: 4, writable: true },
            PostedBuffer { len: 1, writable: true },
        ];
        let reply = Reply { writes: vec![(0, vec![1, 2, 3, 4]), (4, vec![0])], used_len: 5, failed: false };
        let writes = buffer_writes(&buffers, &reply);
        assert_eq!(writes.len(), 2);
        assert_eq!((writes[0].buffer, writes[0].offset, writes[0].data.as_slice()), (1, 0, &[1, 2, 3, 4][..]));
        assert_eq!((writes[1].buffer, writes[1].offset, writes[1].data.as_slice()), (2, 0, &[0][..]));
    }
}
