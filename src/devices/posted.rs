//! The request-level transport (`rpc`): the VMM walks the ring and posts
//! each chain as a [`PostedRequest`] named by its grant. Readable bytes come
//! inline (or are fetched by grant), replies go back inline (or are written
//! by grant first when a reply would outgrow its frame). The device never
//! sees a guest address.
use super::memory::{AccessError, DeviceMemory};
use super::request::{pieces, stream_lengths, Readable, Reply, Request};
use super::staging::StagingArea;
use super::Backend;
use rpc_schema::{
    BufferWrite, CompletedRequest, GrantRange, GrantWrite, PostedBuffer, PostedRequest, StagedWrite, MAX_BATCH_INLINE,
    MAX_SEGMENTS, MAX_TRANSFER,
};
use serde_bytes::ByteBuf;

/// The requests device logic sees, one per chain of the batch; each takes
/// its chain's readable bytes (no copy), which the answer does not need.
pub async fn requests<M: DeviceMemory>(
    mem: &M,
    backend: &Backend,
    batch: &mut [PostedRequest],
    staging: Option<&StagingArea>,
) -> Result<Vec<Request>, AccessError> {
    let mut requests = Vec::with_capacity(batch.len());
    for posted in batch {
        requests.push(request(mem, backend, posted, staging).await?);
    }
    Ok(requests)
}

/// A batch's completions from its replies; the bytes its replies left in
/// the answer slot, as staged writes by grant; how many ended in an error.
pub async fn answer<M: DeviceMemory>(
    mem: &M,
    backend: &mut Backend,
    batch: &[PostedRequest],
    requests: &[Request],
    replies: Vec<Reply>,
) -> Result<(Vec<CompletedRequest>, Vec<(u64, Vec<StagedWrite>)>, u64), AccessError> {
    let mut failed = 0;
    let mut prestaged = Vec::new();
    let mut budget = MAX_BATCH_INLINE;
    let mut completions = Vec::with_capacity(batch.len());
    for ((posted, request), mut reply) in batch.iter().zip(requests).zip(replies) {
        let mut writes = buffer_writes(&posted.buffers, std::mem::take(&mut reply.writes));
        let bytes: u64 = writes.iter().map(|w| w.data.len() as u64).sum();
        if bytes <= budget {
            budget -= bytes;
        } else {
            match write_by_grant(mem, posted.grant, std::mem::take(&mut writes)).await {
                Ok(()) => {}
                // The guest's buffer went away (an unplug): an error reply instead.
                Err(AccessError::Refused(e)) if !e.is_violation() => {
                    reply = backend.refuse(request.writable_len);
                    writes = buffer_writes(&posted.buffers, std::mem::take(&mut reply.writes));
                }
                Err(e) => return Err(e),
            }
        }
        failed += u64::from(reply.failed);
        let staged = staged_writes(&posted.buffers, std::mem::take(&mut reply.staged));
        if !staged.is_empty() {
            prestaged.push((posted.grant, staged));
        }
        completions.push(CompletedRequest { grant: posted.grant, used_len: reply.used_len, writes });
    }
    Ok((completions, prestaged, failed))
}

/// A reply's bytes already in the answer slot as pieces of the chain's
/// writable buffers, each piece named where it lies in the slot.
fn staged_writes(buffers: &[PostedBuffer], staged: Vec<(u64, u32, u32)>) -> Vec<StagedWrite> {
    let mut out = Vec::new();
    for (start, mut at, len) in staged {
        // Bytes past the writable stream go nowhere.
        for (buffer, offset, len) in pieces(buffers, true, start, u64::from(len)) {
            out.push(StagedWrite { buffer, offset, at, len });
            at += len;
        }
    }
    out
}

/// The request device logic sees: its readable bytes inline or where the
/// VMM staged them in the posting area (read there), topped up by grant
/// reads to what the device wants; none when a buffer is not RAM.
async fn request<M: DeviceMemory>(
    mem: &M,
    backend: &Backend,
    posted: &mut PostedRequest,
    staging: Option<&StagingArea>,
) -> Result<Request, AccessError> {
    let (readable_len, writable_len) = stream_lengths(&posted.buffers);
    let wanted = backend.wanted(readable_len, writable_len);
    let mut request = Request { readable_len, writable_len, readable: None };
    if posted.faulty {
        return Ok(request);
    }
    let mut bytes: Readable = match (posted.staged.take(), staging) {
        (Some(staged), Some(area)) => Readable::Posted(area.posted_bytes(staged).map_err(AccessError::Transport)?),
        (Some(_), None) => return Err(AccessError::Transport("bytes posted without a posting area".into())),
        (None, _) => std::mem::take(&mut posted.readable).into_vec().into(),
    };
    bytes.truncate(wanted as usize);
    let have = bytes.len() as u64;
    if have < wanted {
        let mut owned = bytes.into_vec();
        let ranges = pieces(&posted.buffers, false, have, wanted - have)
            .into_iter()
            .flat_map(|(buffer, offset, len)| split(posted.grant, buffer, offset, len))
            .collect::<Vec<_>>();
        let calls = ranges.chunks(MAX_SEGMENTS).flat_map(by_transfer).map(|group| mem.read_granted(group));
        match futures::future::try_join_all(calls).await {
            Ok(parts) => parts.into_iter().flatten().for_each(|part| owned.extend_from_slice(&part)),
            Err(AccessError::Refused(e)) if !e.is_violation() => return Ok(request),
            Err(e) => return Err(e),
        }
        bytes = owned.into();
    }
    request.readable = Some(bytes);
    Ok(request)
}

/// A reply's writes as pieces of the chain's writable buffers. The bytes
/// move rather than copy: a write that fits one buffer (a block read's
/// data, most often) goes on the wire in the allocation it was read into.
pub(super) fn buffer_writes(buffers: &[PostedBuffer], writes: Vec<(u64, Vec<u8>)>) -> Vec<BufferWrite> {
    let mut out = Vec::new();
    for (start, mut bytes) in writes {
        let pieces = pieces(buffers, true, start, bytes.len() as u64);
        // Bytes past the writable stream go nowhere.
        bytes.truncate(pieces.iter().map(|p| p.2 as usize).sum());
        let first = out.len();
        // From the back, so the first piece keeps the original allocation.
        for &(buffer, offset, len) in pieces.iter().rev() {
            let data = match bytes.len() == len as usize {
                true => std::mem::take(&mut bytes),
                false => bytes.split_off(bytes.len() - len as usize),
            };
            out.push(BufferWrite { buffer, offset, data: ByteBuf::from(data) });
        }
        out[first..].reverse();
    }
    out
}

/// Writes a reply's data by grant, in calls within the protocol's limits.
async fn write_by_grant<M: DeviceMemory>(mem: &M, grant: u64, writes: Vec<BufferWrite>) -> Result<(), AccessError> {
    let mut calls = Vec::new();
    let (mut call, mut bytes) = (Vec::new(), 0u64);
    for write in writes {
        if write.data.len() as u64 <= MAX_TRANSFER {
            // Whole, without a copy.
            if bytes + write.data.len() as u64 > MAX_TRANSFER || call.len() == MAX_SEGMENTS {
                calls.push(std::mem::take(&mut call));
                bytes = 0;
            }
            bytes += write.data.len() as u64;
            call.push(GrantWrite { grant, write });
            continue;
        }
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
    use crate::devices::request::Reply;

    /// Memory a device cannot reach at all.
    struct NoMemory;

    impl DeviceMemory for NoMemory {
        async fn read(&self, _: Vec<rpc_schema::Segment>) -> Result<Vec<ByteBuf>, AccessError> {
            Err(AccessError::Transport("no memory".into()))
        }
        async fn write(&self, _: Vec<rpc_schema::WriteSegment>) -> Result<(), AccessError> {
            Err(AccessError::Transport("no memory".into()))
        }
        async fn read_granted(&self, _: Vec<GrantRange>) -> Result<Vec<ByteBuf>, AccessError> {
            Err(AccessError::Transport("no memory".into()))
        }
        async fn write_granted(&self, _: Vec<GrantWrite>) -> Result<(), AccessError> {
            Err(AccessError::Transport("no memory".into()))
        }
    }

    #[test]
    fn a_request_reads_its_posted_bytes_where_the_vmm_left_them() {
        use crate::devices::staging::tests::{areas_for_test, memfd};
        use std::os::unix::fs::FileExt;
        let (area, _, posts) = areas_for_test();
        // A disk write of one sector: the header (type 1, sector 0), then its bytes.
        let bytes = [&1u32.to_le_bytes()[..], &[0; 12], &[0x5a; 512]].concat();
        posts.write_all_at(&bytes, 4096).unwrap();
        let posted = PostedRequest {
            grant: 1,
            buffers: vec![PostedBuffer { len: 528, writable: false }, PostedBuffer { len: 1, writable: true }],
            readable: ByteBuf::new(),
            staged: Some(rpc_schema::StagedBytes { at: 4096, len: 528 }),
            faulty: false,
            queue: 0,
        };
        let disk = crate::devices::blk::BlockDevice::new(memfd(1 << 20), false, "d").unwrap();
        let backend = Backend::Block(disk);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut batch = [posted.clone()];
        let got = runtime.block_on(requests(&NoMemory, &backend, &mut batch, Some(&area))).unwrap();
        assert!(matches!(got[0].readable, Some(Readable::Posted(_))), "read in place, not copied");
        assert_eq!(got[0].readable.as_deref(), Some(&bytes[..]));
        let unplaced = runtime.block_on(requests(&NoMemory, &backend, &mut [posted], None));
        assert!(unplaced.is_err(), "bytes posted where there is no posting area");
    }

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
        let reply =
            Reply { writes: vec![(0, vec![1, 2, 3, 4]), (4, vec![0])], used_len: 5, failed: false, ..Reply::default() };
        let writes = buffer_writes(&buffers, reply.writes);
        assert_eq!(writes.len(), 2);
        assert_eq!((writes[0].buffer, writes[0].offset, writes[0].data.as_slice()), (1, 0, &[1, 2, 3, 4][..]));
        assert_eq!((writes[1].buffer, writes[1].offset, writes[1].data.as_slice()), (2, 0, &[0][..]));
    }

    #[test]
    fn a_write_across_buffers_is_split_in_order_and_clipped_at_the_end() {
        let buffers = [
            PostedBuffer { len: 2, writable: true },
            PostedBuffer { len: 8, writable: false },
            PostedBuffer { len: 3, writable: true },
            PostedBuffer { len: 2, writable: true },
        ];
        let writes = buffer_writes(&buffers, vec![(1, (1..=9).collect())]);
        let got: Vec<(u16, u32, &[u8])> = writes.iter().map(|w| (w.buffer, w.offset, w.data.as_slice())).collect();
        assert_eq!(got, vec![(0, 1, &[1][..]), (2, 0, &[2, 3, 4][..]), (3, 0, &[5, 6][..])]);
    }
}
