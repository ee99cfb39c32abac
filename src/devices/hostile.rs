//! Test-only: a device that breaks the memory protocol on purpose, so tests
//! can show the VMM refuses each request and survives. Reached only through
//! the hidden `--test-device-misbehave hostile-rpc` flag.
use rpc_schema::{GuestMemoryClient, Segment, WriteSegment, MAX_SEGMENTS, MAX_TRANSFER, PROTOCOL_VERSION};
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
