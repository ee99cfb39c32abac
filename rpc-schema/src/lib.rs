//! The wire contract between the skvm VMM and its sandboxed device processes.
//!
//! Nothing else in skvm defines messages that cross the process boundary.
//! Two tarpc services run over two unix sockets per device, encoded with
//! bincode 1.3 and length-delimited frames of at most [`MAX_FRAME`] bytes:
//!
//! * [`GuestMemory`], served by the VMM: the device's only way to reach
//!   guest memory. Every request is checked against the current RAM map.
//! * [`DeviceControl`], served by the device: the VMM activates, configures,
//!   resets, saves and restores it.
//! * [`MemoryHotplug`], served by the VMM to the virtio-mem device alone: the
//!   one privileged request a device can make, to plug or unplug blocks of
//!   the hotplug region. The device parses the guest's requests; the VMM
//!   checks each one against its own record of the region and does the work.
//!
//! Both begin with a `hello` that carries [`PROTOCOL_VERSION`]; any other
//! call before a successful hello is refused.
//!
//! ## Two ways a device reaches guest memory
//!
//! * **Request level** (`rpc` mode). The VMM walks the virtqueue. For each
//!   descriptor chain it records a *grant* (the chain's buffers, lengths and
//!   directions) and sends the device a [`PostedRequest`] that names the
//!   grant and its buffers by index, never by guest address. A batch of
//!   requests is one [`DeviceControl::requests`] call and its completions are
//!   the reply: two messages per batch. Driver-readable bytes travel inline
//!   with the request (up to [`MAX_INLINE_REQUEST`] per request and
//!   [`MAX_BATCH_INLINE`] per batch); device-writable bytes travel inline
//!   with the completion (up to [`MAX_BATCH_INLINE`] per reply). Anything
//!   larger moves with [`GuestMemory::read_granted`] and
//!   [`GuestMemory::write_granted`], addressed as (grant, buffer, offset,
//!   length). The VMM refuses, and fails the device for, any access outside
//!   an outstanding grant: an unknown or completed grant, a buffer index or
//!   range past the buffer, the wrong direction, an address-style call, or a
//!   completion for a grant it does not hold. A grant is revoked the moment
//!   its completion arrives. A device may also hold a request past its
//!   batch and complete it later with [`GuestMemory::complete`]: a network
//!   device's receive buffers wait there for frames. Instead of inline, a
//!   batch may leave its requests' readable bytes in a slot of the VMM's
//!   posting area, and an answer its completions' bytes in a slot of the
//!   device's answer area (each a memfd of [`STAGING_BYTES`], not guest RAM,
//!   written by one side and read by the other), named by offset. A
//!   posting slot is free again when its batch is answered; an answer slot
//!   when the VMM hands it back with a later batch.
//! * **DMA style** (`rpc-dma` mode, the 2011 "Secure KVM" design). The device
//!   walks its own ring and reads and writes guest-physical ranges with
//!   [`GuestMemory::read`] and [`GuestMemory::write`], each checked only
//!   against the RAM map.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::LengthDelimitedCodec;

/// Version of the protocol. A device and a VMM talk only when theirs match;
/// any change to a message's meaning or encoding bumps it.
pub const PROTOCOL_VERSION: u32 = 10;

/// Most bytes one memory request may move (sum over its segments).
pub const MAX_TRANSFER: u64 = 1 << 20;
/// Most segments in one memory request.
pub const MAX_SEGMENTS: usize = 1024;
/// Most calls a server works on at once for one client; it refuses the
/// rest with an error. Bounds what one device can make the VMM buffer
/// (this many transfers of at most [`MAX_TRANSFER`]).
pub const MAX_CALLS_IN_FLIGHT: usize = 64;
/// Largest frame either side accepts: a maximal transfer plus encoding overhead.
pub const MAX_FRAME: usize = MAX_TRANSFER as usize + 64 * 1024;
/// A request's driver-readable bytes travel inline only when there are at
/// most this many; otherwise the device fetches what it needs with
/// `read_granted`.
pub const MAX_INLINE_REQUEST: u64 = 256 * 1024;
/// Most inline data bytes in one batch of requests, and in one reply.
pub const MAX_BATCH_INLINE: u64 = MAX_TRANSFER;
/// Size of each of a request-level device's two staging areas, which the
/// VMM creates for each device process (never guest RAM, and never shared
/// between devices), each written by one side only. In the *answer* area
/// the device leaves the bytes of its answers to batches ([`Answer`]); the
/// VMM maps it read-only. In the *posting* area the VMM leaves the
/// driver-readable bytes of the requests it posts
/// ([`PostedRequest::staged`]); the device maps it read-only. Both are
/// sealed at their size. Bytes cross with one copy in and one out, where
/// inline bytes are encoded, copied into and out of the socket, decoded
/// into a new buffer each, and copied again.
pub const STAGING_BYTES: u64 = STAGING_SLOTS as u64 * STAGING_SLOT_BYTES;
/// Each staging area is cut into this many slots, one per batch or answer that uses it.
pub const STAGING_SLOTS: u8 = 8;
/// A batch or answer with fewer bytes than this to carry sends them
/// inline: a slot's bookkeeping costs more than it saves there.
pub const MIN_STAGED_BYTES: u64 = 512;
/// A slot holds the most inline bytes one batch or answer may carry.
pub const STAGING_SLOT_BYTES: u64 = MAX_BATCH_INLINE;
/// Most buffers in one chain the VMM accepts (a longer chain breaks the ring).
pub const MAX_CHAIN_BUFFERS: usize = 1024;
/// Most buffers, over all requests, in one batch (keeps a frame's metadata
/// well inside the frame's slack over [`MAX_BATCH_INLINE`]).
pub const MAX_BATCH_BUFFERS: usize = 4096;

/// One end of a channel: a unix socket framed and encoded as this contract says.
pub type Transport<Item, SinkItem> =
    tarpc::serde_transport::Transport<tokio::net::UnixStream, Item, SinkItem, Bincode<Item, SinkItem>>;

/// Wraps one end of a `socketpair` as a channel of this protocol (frames of
/// at most [`MAX_FRAME`] bytes, bincode), for the client side. Call it
/// inside a tokio runtime.
pub fn transport<Item, SinkItem>(socket: std::os::unix::net::UnixStream) -> std::io::Result<Transport<Item, SinkItem>>
where
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    Ok(tarpc::serde_transport::new(framed(socket)?, Bincode::default()))
}

/// The server side of a channel: the same wire format, but a request's
/// deadline is capped at [`MAX_DEADLINE`] before tarpc sees it.
pub type ServerTransport<Req, Resp> = tarpc::serde_transport::Transport<
    tokio::net::UnixStream,
    tarpc::ClientMessage<Req>,
    tarpc::Response<Resp>,
    wire::ServerCodec<tarpc::ClientMessage<Req>, tarpc::Response<Resp>>,
>;

/// Wraps one end of a `socketpair` for serving a service of this protocol.
fn server_transport<Req, Resp>(socket: std::os::unix::net::UnixStream) -> std::io::Result<ServerTransport<Req, Resp>>
where
    Req: for<'de> Deserialize<'de>,
    Resp: Serialize,
{
    Ok(tarpc::serde_transport::new(framed(socket)?, wire::ServerCodec::default()))
}

/// A server's end of a channel, ready to `execute` a service: deadlines
/// capped, at most [`MAX_CALLS_IN_FLIGHT`] calls worked on at once and as
/// many answers queued, so one client can make the server hold at most
/// twice that many replies.
pub type ServerChannel<Req, Resp> = tarpc::server::limits::requests_per_channel::MaxRequests<
    tarpc::server::BaseChannel<Req, Resp, ServerTransport<Req, Resp>>,
>;

/// Wraps one end of a `socketpair` for serving a service of this protocol
/// to a client that is not trusted. Call it inside a tokio runtime.
pub fn server_channel<Req, Resp>(socket: std::os::unix::net::UnixStream) -> std::io::Result<ServerChannel<Req, Resp>>
where
    Req: for<'de> Deserialize<'de>,
    Resp: Serialize,
{
    use tarpc::server::Channel;
    let config = tarpc::server::Config { pending_response_buffer: MAX_CALLS_IN_FLIGHT };
    Ok(config.channel(server_transport(socket)?).max_concurrent_requests(MAX_CALLS_IN_FLIGHT))
}

fn framed(
    socket: std::os::unix::net::UnixStream,
) -> std::io::Result<tarpc::tokio_util::codec::Framed<tokio::net::UnixStream, LengthDelimitedCodec>> {
    socket.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(socket)?;
    Ok(LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_framed(stream))
}

/// Longest deadline a server grants a request. The client sets it, and
/// tarpc turns it into an `Instant` and a timer: a deadline years away
/// would make either panic, so a larger one is cut to this.
pub const MAX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

pub mod wire;

/// A range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// Bytes to store at a guest-physical address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteSegment {
    pub addr: u64,
    pub data: ByteBuf,
}

/// Why the VMM refused a memory request. Nothing of the request was done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MemoryError {
    #[error("protocol version {device} is not the VMM's {vmm}")]
    VersionMismatch { device: u32, vmm: u32 },
    #[error("no hello yet: the first call must be hello")]
    NoHello,
    #[error("range {addr:#x}+{len:#x} overflows the address space")]
    Overflow { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} is not guest RAM")]
    OutOfRange { addr: u64, len: u64 },
    #[error("request moves {len} bytes; the limit is {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("request has {count} segments; the limit is {max}")]
    TooManySegments { count: usize, max: usize },
    #[error("this device's access to guest memory was revoked")]
    Revoked,
    #[error("this device may touch only the buffers posted to it, not guest addresses")]
    AddressAccess,
    #[error("grant {0} is not outstanding (never issued, or already completed)")]
    UnknownGrant(u64),
    #[error("grant {0} was taken back when the driver reset the device")]
    GrantReset(u64),
    #[error("grant {grant} has no buffer {buffer}")]
    NoSuchBuffer { grant: u64, buffer: u16 },
    #[error("grant {grant} buffer {buffer}: {offset:#x}+{len:#x} is outside the buffer")]
    OutsideBuffer { grant: u64, buffer: u16, offset: u32, len: u64 },
    #[error("staged bytes {at:#x}+{len:#x} are outside the staging area")]
    OutsideStaging { at: u32, len: u32 },
    #[error("grant {grant} buffer {buffer} goes the other way (a read of a device-writable buffer or a write to a driver-readable one)")]
    WrongDirection { grant: u64, buffer: u16 },
}

impl MemoryError {
    /// True for a request no honest device makes: the VMM fails the device.
    /// (A granted buffer that is not guest RAM is the guest's doing.)
    pub fn is_violation(&self) -> bool {
        matches!(
            self,
            MemoryError::AddressAccess
                | MemoryError::UnknownGrant(_)
                | MemoryError::NoSuchBuffer { .. }
                | MemoryError::OutsideBuffer { .. }
                | MemoryError::WrongDirection { .. }
                | MemoryError::OutsideStaging { .. }
                | MemoryError::TooLarge { .. }
                | MemoryError::TooManySegments { .. }
        )
    }
}

/// One buffer of a posted request, as the device sees it: no address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostedBuffer {
    pub len: u32,
    /// Device-writable (the driver reads it back); otherwise driver-readable.
    pub writable: bool,
}

/// One request (descriptor chain) handed to a device, named by its grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostedRequest {
    pub grant: u64,
    pub buffers: Vec<PostedBuffer>,
    /// The driver-readable buffers' bytes in chain order, when they fit
    /// inline; empty otherwise (the device reads what it needs).
    pub readable: ByteBuf,
    /// Or where those bytes wait in the VMM's posting area (`readable`
    /// then empty).
    pub staged: Option<StagedBytes>,
    /// Some buffer is not guest RAM: the device answers with its error status.
    pub faulty: bool,
    /// The virtqueue the chain came from (a network device's receive or
    /// transmit queue).
    pub queue: u16,
}

/// Bytes waiting in a staging area, at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBytes {
    pub at: u32,
    pub len: u32,
}

/// Bytes for one device-writable buffer of a grant, at `offset` into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferWrite {
    pub buffer: u16,
    pub offset: u32,
    pub data: ByteBuf,
}

/// A device's answer to one posted request: inline writes, and the used
/// length the driver sees (at most the chain's writable bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedRequest {
    pub grant: u64,
    pub used_len: u32,
    pub writes: Vec<BufferWrite>,
}

/// A write whose bytes wait in the device's staging area, at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedWrite {
    pub buffer: u16,
    pub offset: u32,
    pub at: u32,
    pub len: u32,
}

/// [`CompletedRequest`], its bytes in the staging area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedCompletion {
    pub grant: u64,
    pub used_len: u32,
    pub writes: Vec<StagedWrite>,
}

/// A device's answer to a batch: completions whose bytes travel inline,
/// and completions whose bytes wait in staging slot `slot`, which stays the
/// VMM's until it hands it back (`requests`' `freed`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub completions: Vec<CompletedRequest>,
    pub staged: Vec<StagedCompletion>,
    pub slot: Option<u8>,
}

/// A piece of a granted buffer to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRange {
    pub grant: u64,
    pub buffer: u16,
    pub offset: u32,
    pub len: u32,
}

/// Bytes to store into a granted, device-writable buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantWrite {
    pub grant: u64,
    pub write: BufferWrite,
}

/// Device -> VMM: guest memory access, the device's only way to reach it.
#[tarpc::service]
pub trait GuestMemory {
    /// Opens the session. `device` names the device in the VMM's logs.
    async fn hello(version: u32, device: String) -> Result<(), MemoryError>;
    /// Reads each segment; the reply holds one buffer per segment, in order.
    async fn read(segments: Vec<Segment>) -> Result<Vec<ByteBuf>, MemoryError>;
    /// Writes each segment in order; all are checked before any is written.
    async fn write(segments: Vec<WriteSegment>) -> Result<(), MemoryError>;
    /// Request level: reads pieces of driver-readable granted buffers, one
    /// reply buffer per range (limits as for `read`).
    async fn read_granted(ranges: Vec<GrantRange>) -> Result<Vec<ByteBuf>, MemoryError>;
    /// Request level: writes into device-writable granted buffers; all are
    /// checked before any is written.
    async fn write_granted(writes: Vec<GrantWrite>) -> Result<(), MemoryError>;
    /// Request level: completes requests held past their batch (each grant
    /// once), checked as a batch's answer is: inline, or staged in one slot
    /// of the answer area. The VMM has taken a staged answer's bytes once
    /// it replies, so its slot is the device's again then (it is never
    /// handed back with a batch).
    async fn complete(answer: Answer) -> Result<(), MemoryError>;
}

/// One virtqueue as the driver set it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// What a device is, reported in its hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Virtio device id (2 = block, 4 = entropy).
    pub device_id: u32,
    pub features: u64,
    pub queue_count: u16,
    pub max_queue_size: u16,
    /// The device-specific configuration space.
    pub config: ByteBuf,
}

/// A device's state, enough to rebuild its process and carry on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub features: u64,
    pub queues: Vec<QueueState>,
    /// Carried over so a rebuilt device keeps counting where the old one stopped.
    pub counters: DeviceCounters,
}

/// Buckets in [`DeviceCounters::memory_latency_log2_us`].
pub const LATENCY_BUCKETS: usize = 24;

/// What a device has served since it started, and where its time went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCounters {
    /// Requests completed.
    pub requests: u64,
    /// Requests completed with an error status.
    pub errors: u64,
    /// Guest-memory calls: RPCs to the VMM in rpc mode, local copies otherwise.
    pub memory_calls: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Time spent waiting for guest-memory calls to finish.
    pub memory_wait_ns: u64,
    /// Time spent serving the queue, memory waits included.
    pub busy_ns: u64,
    /// Guest-memory call latency: bucket i counts calls under 2^i µs (the last, the rest).
    pub memory_latency_log2_us: Vec<u64>,
    /// Requests whose data moved straight between the disk and guest memory
    /// mapped in the device (zero copy; `shared` and `inprocess` only).
    /// (Absent from results files written before it existed.)
    #[serde(default)]
    pub zero_copy_requests: u64,
    /// Interrupts raised for the device's queues: by the device where it
    /// walks its own rings, by the VMM's request engine in `rpc`. A driver
    /// that polls asks for none (EVENT_IDX's used event, or
    /// VIRTQ_AVAIL_F_NO_INTERRUPT), and none is raised then.
    #[serde(default)]
    pub interrupts: u64,
    /// A network device's traffic; None for the other kinds.
    #[serde(default)]
    pub net: Option<NetCounters>,
}

/// What a network device moved, and what it dropped, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames (and their bytes, headers excluded) from the guest to the tap.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames (and bytes) from the tap to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Guest frames dropped: shorter than the virtio-net header, or no frame after it.
    pub tx_dropped_malformed: u64,
    /// Guest frames dropped: longer than the largest frame a tap takes.
    pub tx_dropped_oversized: u64,
    /// Guest frames the tap refused (for instance, a bad offload header).
    pub tx_dropped_refused: u64,
    /// Host frames dropped: larger than every receive buffer the guest posted.
    pub rx_dropped_too_big: u64,
    /// Receive buffers given back unused: too small for the header, or not RAM.
    pub rx_bad_buffers: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub config: QueueConfig,
    pub next_avail: u16,
    pub next_used: u16,
}

/// Why a device refused a control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DeviceError {
    #[error("protocol version {vmm} is not the device's {device}")]
    VersionMismatch { vmm: u32, device: u32 },
    #[error("invalid queue configuration: {0}")]
    BadQueue(String),
    #[error("config access {offset}+{len} is outside the config space")]
    BadConfigAccess { offset: u32, len: u32 },
    #[error("the device is not active")]
    NotActive,
    #[error("the device failed: {0}")]
    Failed(String),
}

/// VMM -> device: lifecycle and configuration.
#[tarpc::service]
pub trait DeviceControl {
    /// Opens the session and describes the device.
    async fn hello(version: u32) -> Result<DeviceInfo, DeviceError>;
    /// Starts processing with the negotiated features and the driver's queues.
    async fn activate(features: u64, queues: Vec<QueueConfig>) -> Result<(), DeviceError>;
    /// Writes to the device-specific config space.
    async fn write_config(offset: u32, data: ByteBuf) -> Result<(), DeviceError>;
    /// Stops processing and forgets the queues.
    async fn reset() -> Result<(), DeviceError>;
    /// The state a fresh device process needs to carry on. The device stops
    /// processing its queues first (requests in progress complete), so the
    /// state stays true until it is restored elsewhere.
    async fn save() -> Result<DeviceState, DeviceError>;
    /// Resumes from a saved state.
    async fn restore(state: DeviceState) -> Result<(), DeviceError>;
    /// The device's own counters.
    async fn counters() -> DeviceCounters;
    /// Request level: serves a batch of posted requests. The reply completes
    /// them (in any order; each grant once). `freed`: the staging slots of
    /// earlier answers whose bytes the VMM has taken since its last batch.
    async fn requests(batch: Vec<PostedRequest>, freed: Vec<u8>) -> Result<Answer, DeviceError>;
}

/// Why the VMM refused a hotplug request; each maps to a virtio-mem response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HotplugError {
    /// The request is malformed or names blocks in the wrong state (VIRTIO_MEM_RESP_ERROR).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Valid, but not allowed now, e.g. beyond the requested size (VIRTIO_MEM_RESP_NACK).
    #[error("refused: {0}")]
    Refused(String),
    /// No hello yet, or a protocol version mismatch.
    #[error("no session: {0}")]
    NoSession(String),
}

/// The state of a range of hotplug blocks (virtio-mem STATE request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockState {
    Plugged,
    Unplugged,
    Mixed,
}

/// Device -> VMM, for the virtio-mem device only: plug and unplug blocks of
/// the hotplug region. Ranges are guest-physical, `blocks` long, in units of
/// the device block size the VMM announced.
#[tarpc::service]
pub trait MemoryHotplug {
    async fn hello(version: u32) -> Result<(), HotplugError>;
    /// Backs the blocks with host memory and makes them guest RAM.
    async fn plug(addr: u64, blocks: u16) -> Result<(), HotplugError>;
    /// Takes the blocks away from the guest and every device, and frees them.
    async fn unplug(addr: u64, blocks: u16) -> Result<(), HotplugError>;
    /// Unplugs every plugged block.
    async fn unplug_all() -> Result<(), HotplugError>;
    async fn state(addr: u64, blocks: u16) -> Result<BlockState, HotplugError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tarpc::client::RpcError;
    use tarpc::server::Channel;
    use tokio::sync::Semaphore;

    /// A service whose calls wait until the test lets them go.
    #[tarpc::service]
    trait Hold {
        async fn hold();
    }

    #[derive(Clone)]
    struct Holder(Arc<Semaphore>);

    impl Hold for Holder {
        async fn hold(self, _: tarpc::context::Context) {
            let _ = self.0.acquire().await;
        }
    }

    /// A client that sends more calls than a server channel works on at
    /// once gets the extra ones refused at once; the others are served.
    #[test]
    fn a_server_channel_works_on_at_most_64_calls_and_refuses_more() {
        const EXTRA: usize = 6;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (server_end, client_end) = std::os::unix::net::UnixStream::pair().unwrap();
            let gate = Arc::new(Semaphore::new(0));
            let served = server_channel(server_end).unwrap().execute(Holder(gate.clone()).serve());
            tokio::spawn(served.for_each(|response| async move {
                tokio::spawn(response);
            }));
            let client = HoldClient::new(Default::default(), transport(client_end).unwrap()).spawn();
            let calls: Vec<_> = (0..MAX_CALLS_IN_FLIGHT + EXTRA)
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move { client.hold(tarpc::context::current()).await })
                })
                .collect();
            let deadline = Instant::now() + Duration::from_secs(10);
            while calls.iter().filter(|c| c.is_finished()).count() < EXTRA && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Time for a wrongly refused call to come back too.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (done, held): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| c.is_finished());
            assert_eq!((done.len(), held.len()), (EXTRA, MAX_CALLS_IN_FLIGHT));
            for call in done {
                let refused = call.await.unwrap();
                assert!(matches!(&refused, Err(RpcError::Server(e)) if e.detail.contains("throttled")), "{refused:?}");
            }
            gate.add_permits(MAX_CALLS_IN_FLIGHT);
            for call in held {
                assert!(call.await.unwrap().is_ok(), "a held call was not served");
            }
        });
    }
}
