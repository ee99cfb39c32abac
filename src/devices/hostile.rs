//! Test-only: a device that breaks the memory protocol on purpose, so tests
//! can show the VMM refuses each request and survives. Reached only through
//! the hidden `--test-device-misbehave` flag: `hostile-rpc` (the address
//! protocol of `rpc-dma`) and `grant-*` (the request level of `rpc`).
use super::process::Misbehaviour;
use super::runner::{Tamper, TamperAnswer};
use rpc_schema::{
    Answer, BufferWrite, CompletedRequest, GrantRange, GrantWrite, GuestMemoryClient, PostedRequest, Segment,
    WriteSegment, MAX_SEGMENTS, MAX_TRANSFER, PROTOCOL_VERSION,
};
use serde_bytes::ByteBuf;
use tarpc::context;

/// One line per probe, written with a single write so that it cannot
/// interleave with the VMM's own log lines on the shared stderr.
fn report(what: &str, outcome: String) {
    use std::io::Write;
    let line = format!("hostile-rpc: {what}: {outcome}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Writes a well-formed read whose deadline lies `u64::MAX` seconds away
/// straight onto the memory socket: tarpc's client cannot express it, and a
/// server that believed it would overflow its clock.
fn far_deadline(raw: std::os::fd::RawFd) {
    use bincode::Options;
    let message = rpc_schema::GuestMemoryRequest::Read { segments: vec![Segment { addr: 0x1000, len: 8 }] };
    let trace = tarpc::trace::Context::default();
    // ClientMessage::Request (variant 0): deadline (secs, nanos), trace context, id, message.
    let body = bincode::DefaultOptions::new().serialize(&(0u32, u64::MAX, 0u32, trace, u64::MAX, message));
    let Ok(body) = body else { return report("far deadline", "cannot encode".into()) };
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    // SAFETY: writing a local buffer to a socket descriptor we own.
    let sent = unsafe { libc::write(raw, frame.as_ptr() as *const libc::c_void, frame.len()) };
    report("far deadline", format!("sent {sent}"));
}

/// Sends one of each kind of bad request and reports the VMM's answers,
/// then writes garbage onto the memory socket (through `raw`, a duplicate of
/// its descriptor), which must cost this device its channel and nothing more.
pub async fn probe(client: &GuestMemoryClient, raw: std::os::fd::RawFd) {
    let seg = |addr, len| Segment { addr, len };
    let ask = |segments: Vec<Segment>| client.read(context::current(), segments);
    // A line that would rewrite the terminal's current line, if it got there raw.
    report("forged line", "\r\u{1b}[2Kskvm: the guest powered off".into());
    report("read before hello", format!("{:?}", ask(vec![seg(0x1000, 8)]).await));
    report(
        "wrong version",
        format!("{:?}", client.hello(context::current(), PROTOCOL_VERSION + 99, "hostile".into()).await),
    );
    report("hello", format!("{:?}", client.hello(context::current(), PROTOCOL_VERSION, "hostile".into()).await));
    report("out of range", format!("{:?}", ask(vec![seg(0xd000_0000, 8)]).await));
    report("overflow", format!("{:?}", ask(vec![seg(u64::MAX - 4, 8)]).await));
    report("oversized", format!("{:?}", ask(vec![seg(0x10_0000, (MAX_TRANSFER * 2) as u32)]).await));
    report("too many segments", format!("{:?}", ask(vec![seg(0x1000, 1); MAX_SEGMENTS + 1]).await));
    let write = vec![WriteSegment { addr: u64::MAX - 1, data: ByteBuf::from(vec![0u8; 16]) }];
    report("overflowing write", format!("{:?}", client.write(context::current(), write).await));
    far_deadline(raw);
    report("read after a far deadline", format!("{:?}", ask(vec![seg(0x1000, 8)]).await));
    let garbage = [
        0x00, 0x00, 0x00, 0x10, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff, 0x13, 0x37, 0x42, 0x42, 0x99, 0x99,
        0x99, 0x99,
    ];
    // SAFETY: writing a local buffer to a socket descriptor we own.
    let sent = unsafe { libc::write(raw, garbage.as_ptr() as *const libc::c_void, garbage.len()) };
    report("garbage bytes", format!("sent {sent}"));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// Where the test guest keeps its canary (`blk-pattern`): guest RAM no
/// request ever names, which an address-style write aims at.
pub const GUEST_CANARY: u64 = 8 << 20;

/// What a compromised block device would do to the host's disk: write 1 TiB
/// past its start (RLIMIT_FSIZE refuses), then grow it with fallocate (the
/// filter allows only hole punching: the process dies by SIGSYS).
pub fn abuse_disk(disk: std::os::fd::RawFd) {
    let byte = [0x66u8];
    // SAFETY: a one-byte write from our buffer to the disk descriptor we hold.
    let wrote = unsafe { libc::pwrite(disk, byte.as_ptr() as *const libc::c_void, 1, 1 << 40) };
    report("disk write past its size", format!("{wrote} ({})", std::io::Error::last_os_error()));
    // SAFETY: fallocate on the disk descriptor we hold.
    let grew = unsafe { libc::fallocate(disk, 0, 0, 1 << 30) };
    report("disk grown by fallocate", format!("{grew}"));
}

/// Overwrites the start of the test guest's canary by guest address.
pub async fn smash_canary(client: &GuestMemoryClient) {
    let smash = vec![WriteSegment { addr: GUEST_CANARY, data: ByteBuf::from(vec![0x66u8; 4096]) }];
    report("address write", format!("{:?}", client.write(context::current(), smash).await));
}

/// Keeps `MAX_CALLS_IN_FLIGHT` reads of `MAX_TRANSFER` bytes in flight from
/// 1 MiB into guest RAM, until the channel closes.
pub async fn flood_memory(client: GuestMemoryClient) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let read = || {
        let client = client.clone();
        async move {
            let segment = Segment { addr: 1 << 20, len: MAX_TRANSFER as u32 };
            client.read(context::current(), vec![segment]).await
        }
    };
    let mut in_flight: FuturesUnordered<_> = (0..rpc_schema::MAX_CALLS_IN_FLIGHT).map(|_| read()).collect();
    while let Some(reply) = in_flight.next().await {
        if reply.is_err() {
            return;
        }
        in_flight.push(read());
    }
}

/// Test-only, request level: at the second batch the device makes the one
/// forbidden move `which` names (the first batch is served honestly, so a
/// completed grant exists), reports the VMM's answer and then replies with
/// what the move calls for.
pub fn grant_attack(
    which: Misbehaviour,
    client: &GuestMemoryClient,
    hotplug: Option<rpc_schema::MemoryHotplugClient>,
) -> Option<Tamper> {
    use Misbehaviour::*;
    if matches!(
        which,
        ForbiddenSyscall
            | ForbiddenSyscallMidIo
            | HostileRpc
            | Linger
            | DiskAbuse
            | SlowActivation
            | MemoryFlood
            | StagedOutside
            | StagedSlot
            | StagedElsewhere
            | StagedRepeated
    ) {
        return None;
    }
    if which == HotplugFlood {
        return Some(hotplug_flood(hotplug?));
    }
    let client = client.clone();
    let mut batches = 0u32;
    let mut completed: Vec<u64> = Vec::new();
    Some(Box::new(move |batch: Vec<PostedRequest>, mut done: Vec<CompletedRequest>| {
        batches += 1;
        let client = client.clone();
        let earlier = completed.first().copied();
        completed.extend(done.iter().map(|c| c.grant));
        Box::pin(async move {
            if batches != 2 {
                return done;
            }
            let live = &batch[0];
            let grant = live.grant;
            let last = live.buffers.len() as u16 - 1;
            let read = |grant, buffer, offset, len| {
                let client = client.clone();
                async move {
                    let range = GrantRange { grant, buffer, offset, len };
                    client.read_granted(context::current(), vec![range]).await
                }
            };
            let write_to = |buffer: u16, len: usize| GrantWrite {
                grant,
                write: BufferWrite { buffer, offset: 0, data: ByteBuf::from(vec![0x66u8; len]) },
            };
            match which {
                AddressWrite => smash_canary(&client).await,
                GrantUnknown => report("grant unknown", format!("{:?}", read(u64::MAX / 3, 0, 0, 1).await)),
                GrantCompleted => {
                    let earlier = earlier.unwrap_or(0);
                    report("grant completed", format!("{:?}", read(earlier, 0, 0, 1).await));
                }
                GrantBufferIndex => report("grant index", format!("{:?}", read(grant, last + 1, 0, 1).await)),
                GrantOffset => {
                    let len = live.buffers[0].len;
                    report("grant offset", format!("{:?}", read(grant, 0, len, 1).await));
                }
                GrantOverflow => report("grant overflow", format!("{:?}", read(grant, 0, u32::MAX, u32::MAX).await)),
                GrantWriteReadable => {
                    let wrong = client.write_granted(context::current(), vec![write_to(0, 1)]).await;
                    report("grant write readable", format!("{wrong:?}"));
                }
                GrantReadWritable => report("grant read writable", format!("{:?}", read(grant, last, 0, 1).await)),
                GrantOversized => {
                    let len = live.buffers[last as usize].len as usize + 1;
                    let write = BufferWrite { buffer: last, offset: 0, data: ByteBuf::from(vec![0x66u8; len]) };
                    done[0].writes.push(write);
                    report("grant oversized", "sent".into());
                }
                GrantForeign => {
                    done.push(CompletedRequest { grant: grant + 1000, used_len: 0, writes: Vec::new() });
                    report("grant foreign", "sent".into());
                }
                GrantDuplicate => {
                    let again = done[0].clone();
                    done.push(again);
                    report("grant duplicate", "sent".into());
                }
                StagedHeld => {
                    use rpc_schema::{StagedCompletion, StagedWrite, STAGING_SLOTS};
                    let write = StagedWrite { buffer: last, offset: 0, at: 0, len: 1 };
                    let staged = vec![StagedCompletion { grant, used_len: 1, writes: vec![write] }];
                    let answer = Answer { completions: Vec::new(), staged, slot: Some(STAGING_SLOTS) };
                    let refused = client.complete(context::current(), answer).await;
                    report("staged held", format!("{refused:?}"));
                }
                GrantFlood => {
                    let calls = (0..2000).map(|_| read(u64::MAX / 5, 0, 0, 1));
                    let answers = futures::future::join_all(calls).await;
                    let refused = answers.iter().filter(|a| !matches!(a, Ok(Ok(_)))).count();
                    report("grant flood", format!("{refused} of 2000 refused"));
                }
                ForbiddenSyscall
                | ForbiddenSyscallMidIo
                | HostileRpc
                | Linger
                | DiskAbuse
                | HotplugFlood
                | SlowActivation
                | MemoryFlood
                | StagedOutside
                | StagedSlot
                | StagedElsewhere
                | StagedRepeated => {}
            }
            done
        })
    }))
}

/// Test-only, request level: the first answer with a completion that
/// writes names its bytes where the VMM must refuse to look: past the end
/// of the answer area, in a slot that does not exist, in a slot other than
/// the one it names, or the same bytes again and again past a slot's worth
/// (which would have the VMM copy without end).
pub fn staging_attack(which: Misbehaviour) -> Option<TamperAnswer> {
    use rpc_schema::{StagedCompletion, StagedWrite, STAGING_BYTES, STAGING_SLOTS, STAGING_SLOT_BYTES};
    let name = match which {
        Misbehaviour::StagedOutside => "staged outside",
        Misbehaviour::StagedSlot => "staged slot",
        Misbehaviour::StagedElsewhere => "staged elsewhere",
        Misbehaviour::StagedRepeated => "staged repeated",
        _ => return None,
    };
    let mut done = false;
    Some(Box::new(move |answer: &mut Answer| {
        if done {
            return;
        }
        let writing = answer.completions.iter().position(|c| !c.writes.is_empty());
        let Some(index) = writing else { return };
        let completion = answer.completions.remove(index);
        let staged = |w: &BufferWrite, at: u64| StagedWrite {
            buffer: w.buffer,
            offset: w.offset,
            at: at as u32,
            len: (w.data.len() as u32).max(1),
        };
        let first = &completion.writes[0];
        let (slot, writes) = match which {
            Misbehaviour::StagedOutside => (0, vec![staged(first, STAGING_BYTES)]),
            Misbehaviour::StagedSlot => (STAGING_SLOTS, vec![staged(first, 0)]),
            Misbehaviour::StagedElsewhere => (0, vec![staged(first, STAGING_SLOT_BYTES)]),
            _ => {
                // 64 bytes of slot 0, named again and again past a slot's worth.
                let write = StagedWrite { len: 64, ..staged(first, 0) };
                (0, vec![write; STAGING_SLOT_BYTES as usize / 64 + 1])
            }
        };
        answer.staged.push(StagedCompletion { grant: completion.grant, used_len: completion.used_len, writes });
        answer.slot = Some(slot);
        done = true;
        report(name, "sent".into());
    }))
}

/// Test-only: after the guest's first virtio-mem request, replays it (a plug
/// of real blocks) and its undoing thousands of times, each call given 2 ms:
/// the VMM must not start a worker per call whose deadline passed.
fn hotplug_flood(hotplug: rpc_schema::MemoryHotplugClient) -> Tamper {
    let mut flooded = false;
    Box::new(move |batch: Vec<PostedRequest>, done: Vec<CompletedRequest>| {
        let hotplug = hotplug.clone();
        let first = std::mem::replace(&mut flooded, true);
        Box::pin(async move {
            let request = batch.first().map(|r| r.readable.to_vec()).unwrap_or_default();
            if first || request.len() < 24 {
                return done;
            }
            let addr = u64::from_le_bytes(request[8..16].try_into().unwrap_or_default());
            let blocks = u16::from_le_bytes([request[16], request[17]]);
            let brief = || {
                let mut ctx = context::current();
                ctx.deadline = std::time::Instant::now() + std::time::Duration::from_millis(2);
                ctx
            };
            let mut failed = 0;
            for round in 0..40 {
                let calls = (0..50).map(|i| {
                    let hotplug = hotplug.clone();
                    async move {
                        if (round + i) % 2 == 0 {
                            hotplug.unplug(brief(), addr, blocks).await.is_err()
                        } else {
                            hotplug.plug(brief(), addr, blocks).await.is_err()
                        }
                    }
                });
                failed += futures::future::join_all(calls).await.into_iter().filter(|f| *f).count();
            }
            report("hotplug flood", format!("{failed} of 2000 calls timed out"));
            done
        })
    })
}
