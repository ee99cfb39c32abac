//! virtio-net (virtio 1.x, 5.1) on a host tap: one receive queue (0) and
//! one transmit queue (1). The VMM opened the tap (IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, 12-byte headers); this device only reads and writes it.
//!
//! Transmit: each chain is a virtio-net header and a frame. A chain that is
//! too short, too long or carries offload requests that were not negotiated
//! (or do not fit its frame) is dropped and counted; the tap gets a header
//! rebuilt from the checked fields, never the guest's bytes.
//! Offloads (partial checksums and TSO, both ways) are offered only when
//! the tap takes them; the VMM tells the tap what the driver accepted.
//! Receive: the driver's buffers are held here until a frame comes; with
//! MRG_RXBUF a frame may fill several. A frame larger than every buffer the
//! driver can post is dropped and counted, never truncated.
use super::features;
use super::request::{Reply, Request};
use rpc_schema::{DeviceInfo, NetCounters};
use serde_bytes::ByteBuf;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;

pub const DEVICE_ID: u32 = 1;
pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// `struct virtio_net_hdr_v1`: what precedes every frame, both ways.
pub const HEADER: usize = 12;
/// The longest frame a tap takes or gives: 64 KiB of IP, Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65_535 + 14 + 4;
/// The longest without segmentation offloads: a 1,500-byte MTU, Ethernet
/// and VLAN headers.
pub const MTU_FRAME: usize = 1_500 + 14 + 4;
/// The shortest: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Delivered frames' buffers kept for reuse, and the largest kept (a GSO
/// frame's 64 KiB is not worth holding on to).
const SPARE_FRAMES: usize = QUEUE_SIZE as usize;
const SMALL_FRAME: usize = 4096;

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
/// The offloads offered when the tap takes them.
pub const OFFLOADS: u64 = F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
const S_LINK_UP: u16 = 1;
const HDR_F_NEEDS_CSUM: u8 = 1;
const HDR_F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// The TUNSETOFFLOAD flags (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6) for what
/// the driver accepted: the tap hands the guest only what it can take.
pub fn tap_offload(features: u64) -> u32 {
    let mut flags = 0;
    if features & F_GUEST_CSUM != 0 {
        flags |= 0x01;
        if features & F_GUEST_TSO4 != 0 {
            flags |= 0x02;
        }
        if features & F_GUEST_TSO6 != 0 {
            flags |= 0x04;
        }
    }
    flags
}

/// The device logic; the transport hands it transmit requests and, per mode,
/// receive buffers to hold ([`Held`]).
pub struct NetDevice {
    tap: File,
    watcher: Option<File>,
    mac: [u8; 6],
    pub counters: NetCounters,
    /// The tap takes offloads: offer them.
    offloads: bool,
    /// What the driver accepted.
    negotiated: u64,
    /// A frame read from the tap that waits for receive buffers (header included).
    pending: Option<Vec<u8>>,
    scratch: Vec<u8>,
    /// Buffers of delivered frames, for the next ones.
    spare: Vec<Vec<u8>>,
    /// The vectored calls' iovecs, reused: no allocation per frame.
    iovecs: Iovecs,
    /// The copy-free receive's host pieces, reused likewise.
    pub(super) rx_pieces: super::net_zero_copy::PieceBuffers,
}

/// iovecs kept between vectored calls for their allocation only: emptied
/// before each call returns (and before each is built), so no pointer
/// outlives the call that stored it.
#[derive(Default)]
struct Iovecs(Vec<libc::iovec>);

// SAFETY: empty between calls (see above): nothing is shared or sent but
// the allocation.
unsafe impl Send for Iovecs {}
// SAFETY: as above.
unsafe impl Sync for Iovecs {}

impl Iovecs {
    /// `pieces` as iovecs, after `first` and before `last` (if given),
    /// handed to `call`; empty again afterwards.
    fn with<R>(
        &mut self,
        first: libc::iovec,
        pieces: &[(*mut u8, usize)],
        last: Option<libc::iovec>,
        call: impl FnOnce(&[libc::iovec]) -> R,
    ) -> R {
        let iovecs = &mut self.0;
        iovecs.clear();
        iovecs.push(first);
        iovecs.extend(pieces.iter().map(|&(ptr, len)| libc::iovec { iov_base: ptr.cast(), iov_len: len }));
        iovecs.extend(last);
        let result = call(iovecs);
        iovecs.clear();
        result
    }
}

/// A receive buffer the driver posted, held until a frame fills it.
pub struct Held<T> {
    pub buffer: T,
    /// Device-writable bytes.
    pub capacity: u64,
}

/// Where a frame goes: in the `buffers` front held buffers, each filled to
/// its capacity but the last, which takes the `last` bytes left (see
/// [`take_placed`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    Fits {
        buffers: usize,
        last: u64,
    },
    /// Not enough buffers yet: wait for the driver to post more.
    Wait,
    /// No buffers the driver could post would take it.
    TooBig,
}

/// Where a frame of `len` bytes (header included) goes in buffers of these
/// capacities, front first; only as many are looked at as the frame needs.
/// `ring_full`: the driver has posted all it can.
pub fn place(len: u64, capacities: impl IntoIterator<Item = u64>, mergeable: bool, ring_full: bool) -> Placement {
    let mut capacities = capacities.into_iter().peekable();
    let Some(&first) = capacities.peek() else { return Placement::Wait };
    if !mergeable {
        return if first >= len { Placement::Fits { buffers: 1, last: len } } else { Placement::TooBig };
    }
    let mut left = len;
    for (buffers, capacity) in (1..).zip(capacities) {
        if capacity >= left {
            return Placement::Fits { buffers, last: left };
        }
        left -= capacity;
    }
    if ring_full {
        Placement::TooBig
    } else {
        Placement::Wait
    }
}

/// Takes the held buffers a frame was placed in, front first, each with
/// the bytes it takes ([`Placement::Fits`]).
pub fn take_placed<T>(held: &mut VecDeque<Held<T>>, buffers: usize, last: u64) -> impl Iterator<Item = (T, u64)> + '_ {
    (1..=buffers).map_while(move |nth| {
        let next = held.pop_front()?;
        let len = if nth == buffers { last } else { next.capacity };
        Some((next.buffer, len))
    })
}

/// Parses `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A stable, locally administered unicast MAC for a tap: the same name gives
/// the same address on every run.
pub fn default_mac(tap: &str) -> [u8; 6] {
    // FNV-1a: stable across Rust releases, unlike the std hasher.
    let hash = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let h = hash.to_le_bytes();
    [0x02, 0x53, 0x4b, h[0], h[1], h[2]]
}

impl NetDevice {
    /// Takes the tap the VMM opened; makes it non-blocking for the event loop.
    pub fn new(tap: File, mac: [u8; 6], offloads: bool) -> std::io::Result<Self> {
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let watcher = Some(tap.try_clone()?);
        Ok(NetDevice {
            watcher,
            tap,
            mac,
            counters: NetCounters::default(),
            offloads,
            negotiated: 0,
            pending: None,
            scratch: vec![0; HEADER + MAX_FRAME],
            spare: Vec::new(),
            iovecs: Iovecs::default(),
            rx_pieces: Default::default(),
        })
    }

    /// A second descriptor of the tap, for the event loop to watch (made
    /// here, before the sandbox forbids duplicating descriptors).
    pub fn take_watcher(&mut self) -> Option<File> {
        self.watcher.take()
    }

    pub fn info(&self) -> DeviceInfo {
        let mut config = self.mac.to_vec();
        config.extend_from_slice(&S_LINK_UP.to_le_bytes());
        // max_virtqueue_pairs: one (read only with VIRTIO_NET_F_MQ, which is not offered).
        config.extend_from_slice(&1u16.to_le_bytes());
        DeviceInfo {
            device_id: DEVICE_ID,
            features: features::VERSION_1
                | features::RING_EVENT_IDX
                | features::RING_INDIRECT_DESC
                | F_MAC
                | F_STATUS
                | F_MRG_RXBUF
                | if self.offloads { OFFLOADS } else { 0 },
            queue_count: 2,
            max_queue_size: QUEUE_SIZE,
            config: ByteBuf::from(config),
        }
    }

    /// The features the driver accepted (none after a reset).
    pub fn set_features(&mut self, features: u64) {
        self.negotiated = features;
    }

    pub fn mergeable(&self) -> bool {
        self.negotiated & F_MRG_RXBUF != 0
    }

    /// The header the driver gets for a frame the tap gave with `header`,
    /// spread over `buffers` receive buffers.
    pub fn header_for_driver(&self, header: &[u8; HEADER], buffers: u16) -> [u8; HEADER] {
        receive_header(header, self.negotiated, buffers)
    }

    /// Counts a frame (header included) handed to the driver.
    pub fn delivered(&mut self, len: usize) {
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += (len - HEADER) as u64;
    }

    /// Reads the tap's next frame: its header into `header`, then its
    /// bytes into `pieces`, then whatever is left into this device's own
    /// buffer. Returns the bytes read (header included), or None when the
    /// tap has nothing (or failed).
    ///
    /// # Safety
    /// Every piece must be writable memory that stays mapped for the call.
    pub unsafe fn read_scattered(&mut self, header: &mut [u8; HEADER], pieces: &[(*mut u8, usize)]) -> Option<usize> {
        let iovec = |ptr: *mut u8, len: usize| libc::iovec { iov_base: ptr.cast(), iov_len: len };
        let (first, last) = (iovec(header.as_mut_ptr(), HEADER), iovec(self.scratch.as_mut_ptr(), self.scratch.len()));
        let tap = self.tap.as_raw_fd();
        // SAFETY: our own header and scratch, and pieces the caller vouches for.
        let read = |iovecs: &[libc::iovec]| unsafe { libc::readv(tap, iovecs.as_ptr(), iovecs.len() as i32) };
        let got = self.iovecs.with(first, pieces, Some(last), read);
        (got >= 0).then_some(got as usize)
    }

    /// Sends a frame whose header the driver gave as `header` and whose
    /// bytes lie in `pieces` (None: they cannot be had, as where some byte
    /// is not guest RAM, and the frame is malformed), `readable_len` bytes
    /// in all: dropped and counted if oversized or malformed, else written
    /// to the tap after a header rebuilt from the checked fields.
    ///
    /// # Safety
    /// Every piece must be readable memory that stays mapped for the call.
    pub unsafe fn send_scattered(
        &mut self,
        readable_len: u64,
        header: &[u8; HEADER],
        pieces: Option<&[(*mut u8, usize)]>,
    ) -> bool {
        let counters = &mut self.counters;
        if readable_len > (HEADER + MAX_FRAME) as u64 {
            counters.tx_dropped_oversized += 1;
            return false;
        }
        let frame_len = (readable_len as usize).saturating_sub(HEADER);
        let checked = match (pieces, frame_len >= MIN_FRAME) {
            (Some(pieces), true) => transmit_header(header, frame_len, self.negotiated).map(|h| (h, pieces)),
            _ => None,
        };
        let Some((header, pieces)) = checked else {
            counters.tx_dropped_malformed += 1;
            return false;
        };
        let first = libc::iovec { iov_base: header.as_ptr() as *mut libc::c_void, iov_len: HEADER };
        let tap = self.tap.as_raw_fd();
        // SAFETY: our own header, and pieces the caller vouches for (the
        // guest may change them meanwhile, which changes only its frame).
        let write = |iovecs: &[libc::iovec]| unsafe { libc::writev(tap, iovecs.as_ptr(), iovecs.len() as i32) };
        let written = self.iovecs.with(first, pieces, None, write);
        if written != readable_len as isize {
            counters.tx_dropped_refused += 1;
            return false;
        }
        counters.tx_frames += 1;
        counters.tx_bytes += frame_len as u64;
        true
    }

    /// Keeps a frame [`NetDevice::read_scattered`] read that outgrew its
    /// pieces, for [`NetDevice::receive`] to place (or drop as too big).
    ///
    /// # Safety
    /// As for `read_scattered`, with the same pieces.
    pub unsafe fn keep_overflow(&mut self, header: &[u8; HEADER], pieces: &[(*mut u8, usize)], got: usize) {
        let mut frame = Vec::with_capacity(got);
        frame.extend_from_slice(header);
        for &(ptr, len) in pieces {
            let (at, len) = (frame.len(), len.min(got - frame.len()));
            frame.resize(at + len, 0);
            // SAFETY: the caller vouches for the piece; the guest may have
            // changed its bytes since, which only changes its own frame.
            unsafe { std::ptr::copy_nonoverlapping(ptr, frame[at..].as_mut_ptr(), len) };
        }
        let rest = got - frame.len();
        frame.extend_from_slice(&self.scratch[..rest]);
        self.pending = Some(frame);
    }

    /// How many leading readable bytes a transmit request needs: all of
    /// them, up to the longest frame (a longer one is dropped unread).
    pub fn wanted(readable_len: u64) -> u64 {
        if readable_len > (HEADER + MAX_FRAME) as u64 {
            0
        } else {
            readable_len
        }
    }

    /// Sends each transmit request's frame to the tap. Transmit buffers
    /// are only read: every reply is empty.
    pub fn transmit(&mut self, requests: &[Request]) -> Vec<Reply> {
        requests.iter().map(|r| Reply { failed: !self.send(r), ..Reply::default() }).collect()
    }

    /// [`NetDevice::send_scattered`] for a request whose bytes came with it:
    /// the same checks and counters, and the frame goes to the tap from
    /// where it lies, after the rebuilt header.
    fn send(&mut self, request: &Request) -> bool {
        let within = request.readable_len <= (HEADER + MAX_FRAME) as u64;
        let bytes = request.readable.as_deref().filter(|_| within);
        match bytes.and_then(|b| b.split_first_chunk::<HEADER>().map(|(header, frame)| (b.len(), header, frame))) {
            // SAFETY: our own bytes, which outlive the call (the tap only reads them).
            Some((len, header, frame)) => unsafe {
                self.send_scattered(len as u64, header, Some(&[(frame.as_ptr().cast_mut(), frame.len())]))
            },
            // SAFETY: no pieces: it is dropped (oversized or malformed) and counted.
            None => unsafe { self.send_scattered(request.readable_len, &[0; HEADER], None) },
        }
    }

    /// The next frame from the tap (header included), if one is waiting:
    /// the one that waited for buffers, or a new one.
    fn next_frame(&mut self) -> Option<Vec<u8>> {
        if let Some(frame) = self.pending.take() {
            return Some(frame);
        }
        // A used buffer rather than a new one, and the frame read straight
        // into it (the scratch takes only what a large frame has past it):
        // at 100k frames a second the allocator and the copy show in profiles.
        let mut frame = self.spare.pop().unwrap_or_default();
        frame.clear();
        frame.reserve(SMALL_FRAME);
        let room = frame.capacity();
        loop {
            let iovecs = [
                libc::iovec { iov_base: frame.as_mut_ptr().cast(), iov_len: room },
                libc::iovec { iov_base: self.scratch.as_mut_ptr().cast(), iov_len: self.scratch.len() },
            ];
            // SAFETY: reads into our own buffers, within their capacities.
            let got = unsafe { libc::readv(self.tap.as_raw_fd(), iovecs.as_ptr(), 2) };
            if got < 0 {
                self.spare.push(frame);
                return None;
            }
            let got = got as usize;
            if got < HEADER + MIN_FRAME {
                continue;
            }
            // SAFETY: the tap wrote the first `got` bytes, `room` of them here.
            unsafe { frame.set_len(got.min(room)) };
            if got > room {
                frame.extend_from_slice(&self.scratch[..got - room]);
            }
            return Some(frame);
        }
    }

    /// Fills held receive buffers with frames from the tap, front first,
    /// while both last. Returns each filled buffer with its reply (the
    /// header and frame at offset 0 of its writable bytes). Buffers too
    /// small for a header come back unused. `ring_full`: the driver has
    /// posted as many buffers as its queue holds. Stops before the frame
    /// that would take the bytes delivered past `budget`.
    pub fn receive<T>(&mut self, held: &mut VecDeque<Held<T>>, ring_full: bool, budget: u64) -> Vec<(T, Reply)> {
        let mut done = Vec::new();
        let mut delivered = 0u64;
        loop {
            while held.front().is_some_and(|h| (h.capacity as usize) < HEADER) {
                self.counters.rx_bad_buffers += 1;
                done.push((held.pop_front().unwrap().buffer, Reply::default()));
            }
            if held.is_empty() {
                return done;
            }
            let Some(mut frame) = self.next_frame() else { return done };
            if delivered + frame.len() as u64 > budget {
                self.pending = Some(frame);
                return done;
            }
            let capacities = held.iter().map(|h| h.capacity);
            let (buffers, last) = match place(frame.len() as u64, capacities, self.mergeable(), ring_full) {
                Placement::Fits { buffers, last } => (buffers, last),
                Placement::Wait => {
                    self.pending = Some(frame);
                    return done;
                }
                Placement::TooBig => {
                    self.counters.rx_dropped_too_big += 1;
                    continue;
                }
            };
            // Only the offload state the driver accepted reaches it.
            let header = receive_header(&frame[..HEADER], self.negotiated, buffers as u16);
            frame[..HEADER].copy_from_slice(&header);
            self.delivered(frame.len());
            delivered += frame.len() as u64;
            if buffers == 1 {
                // The usual case: the whole frame in one buffer, no copy.
                let buffer = held.pop_front().expect("placed in a held buffer").buffer;
                done.push((
                    buffer,
                    Reply { writes: vec![(0, frame)], used_len: last as u32, failed: false, ..Reply::default() },
                ));
                continue;
            }
            let mut at = 0usize;
            for (buffer, len) in take_placed(held, buffers, last) {
                let piece = frame[at..at + len as usize].to_vec();
                at += len as usize;
                done.push((
                    buffer,
                    Reply { writes: vec![(0, piece)], used_len: len as u32, failed: false, ..Reply::default() },
                ));
            }
        }
    }

    /// Keeps delivered frames' buffers for the next frames (a ring's worth).
    pub fn recycle(&mut self, replies: Vec<Reply>) {
        self.recycle_bytes(replies.into_iter().flat_map(|r| r.writes).map(|(_, bytes)| bytes));
    }

    /// [`NetDevice::recycle`] for buffers whose bytes went elsewhere (a staging slot).
    pub fn recycle_bytes(&mut self, frames: impl Iterator<Item = Vec<u8>>) {
        let room = SPARE_FRAMES.saturating_sub(self.spare.len());
        self.spare.extend(frames.filter(|b| b.capacity() <= SMALL_FRAME).take(room));
    }

    /// A frame waits for receive buffers that take it.
    pub fn waits_for_buffers(&self) -> bool {
        self.pending.is_some()
    }

    /// Forgets a frame waiting for buffers (a reset or a save).
    pub fn drop_pending(&mut self) {
        self.pending = None;
    }
}

fn field(header: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([header[at], header[at + 1]])
}

/// The header the tap gets for a guest frame of `frame_len` bytes, or None
/// when the guest's asks for what was not negotiated or does not fit the
/// frame: a partial checksum needs CSUM and must lie inside the frame; TSO
/// needs HOST_TSO4/6, a partial checksum, a segment size and headers
/// inside the frame; no other flag or GSO type (ECN, UDP) is offered.
fn transmit_header(header: &[u8], frame_len: usize, negotiated: u64) -> Option<[u8; HEADER]> {
    let (flags, gso) = (header[0], header[1]);
    let (hdr_len, gso_size, csum_start, csum_offset) =
        (field(header, 2), field(header, 4), field(header, 6), field(header, 8));
    let mut out = [0u8; HEADER];
    match flags {
        0 => {}
        HDR_F_NEEDS_CSUM if negotiated & F_CSUM != 0 => {
            if csum_start as usize + csum_offset as usize + 2 > frame_len {
                return None;
            }
            out[0] = HDR_F_NEEDS_CSUM;
            out[6..10].copy_from_slice(&header[6..10]);
        }
        _ => return None,
    }
    let allowed = match gso {
        GSO_NONE => return Some(out),
        GSO_TCPV4 => negotiated & F_HOST_TSO4 != 0,
        GSO_TCPV6 => negotiated & F_HOST_TSO6 != 0,
        _ => false,
    };
    if !allowed || flags != HDR_F_NEEDS_CSUM || gso_size == 0 || hdr_len as usize > frame_len {
        return None;
    }
    out[1] = gso;
    out[2..6].copy_from_slice(&header[2..6]);
    Some(out)
}

/// The header the guest gets for a frame from the tap: checksum state only
/// with GUEST_CSUM, segmentation only with GUEST_TSO4/6 (the tap was told
/// the same), and the number of buffers the frame took.
fn receive_header(header: &[u8], negotiated: u64, buffers: u16) -> [u8; HEADER] {
    let mut out = [0u8; HEADER];
    if negotiated & F_GUEST_CSUM != 0 {
        out[0] = header[0] & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID);
        out[6..10].copy_from_slice(&header[6..10]);
        let tso = match header[1] {
            GSO_TCPV4 => negotiated & F_GUEST_TSO4 != 0,
            GSO_TCPV6 => negotiated & F_GUEST_TSO6 != 0,
            _ => false,
        };
        if tso {
            out[1..6].copy_from_slice(&header[1..6]);
        }
    }
    out[10..12].copy_from_slice(&buffers.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_go_in_one_buffer_or_merge_across_several() {
        assert_eq!(place(100, [200], false, false), Placement::Fits { buffers: 1, last: 100 });
        assert_eq!(place(300, [200, 200], false, false), Placement::TooBig);
        assert_eq!(place(300, [200, 200], true, false), Placement::Fits { buffers: 2, last: 100 });
        assert_eq!(place(400, [200, 200, 50], true, false), Placement::Fits { buffers: 2, last: 200 });
        let mut held: VecDeque<Held<char>> = [('a', 200), ('b', 150), ('c', 200)]
            .into_iter()
            .map(|(buffer, capacity)| Held { buffer, capacity })
            .collect();
        let taken: Vec<(char, u64)> = take_placed(&mut held, 2, 100).collect();
        assert_eq!(taken, [('a', 200), ('b', 100)], "each full but the last");
        assert_eq!(held.len(), 1);
        assert_eq!(place(500, [200, 200], true, false), Placement::Wait);
        assert_eq!(place(500, [200, 200], true, true), Placement::TooBig);
        assert_eq!(place(10, [], true, false), Placement::Wait);
    }

    fn header(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        (h[0], h[1]) = (flags, gso);
        for (at, value) in [(2, hdr_len), (4, gso_size), (6, csum_start), (8, csum_offset)] {
            h[at..at + 2].copy_from_slice(&value.to_le_bytes());
        }
        h[10] = 7; // num_buffers: never passed on
        h
    }

    #[test]
    fn transmit_headers_carry_only_negotiated_offloads_that_fit_the_frame() {
        let csum = header(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 6);
        assert_eq!(transmit_header(&csum, 100, 0), None, "CSUM not negotiated");
        let sent = transmit_header(&csum, 100, F_CSUM).unwrap();
        assert_eq!((sent[0], sent[6], sent[8], sent[10]), (HDR_F_NEEDS_CSUM, 34, 6, 0));
        assert_eq!(transmit_header(&header(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 90, 9), 100, F_CSUM), None);
        let tso = header(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        assert_eq!(transmit_header(&tso, 9000, F_CSUM), None, "HOST_TSO4 not negotiated");
        assert!(transmit_header(&tso, 9000, F_CSUM | F_HOST_TSO4).is_some());
        assert_eq!(transmit_header(&tso, 9000, F_CSUM | F_HOST_TSO6), None);
        let no_size = header(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16);
        assert_eq!(transmit_header(&no_size, 9000, OFFLOADS), None);
        let no_csum = header(0, GSO_TCPV4, 54, 1448, 0, 0);
        assert_eq!(transmit_header(&no_csum, 9000, OFFLOADS), None);
        let ecn = header(HDR_F_NEEDS_CSUM, GSO_TCPV4 | 0x80, 54, 1448, 34, 16);
        assert_eq!(transmit_header(&ecn, 9000, OFFLOADS), None);
        assert_eq!(transmit_header(&header(HDR_F_DATA_VALID, 0, 0, 0, 0, 0), 100, OFFLOADS), None);
        assert_eq!(transmit_header(&header(0, 0, 9, 9, 9, 9), 100, 0), Some([0; HEADER]));
    }

    #[test]
    fn receive_headers_pass_on_only_what_the_driver_accepted() {
        let tso = header(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        let mut plain = [0u8; HEADER];
        plain[10] = 1;
        assert_eq!(receive_header(&tso, 0, 1), plain, "no offload state without GUEST_CSUM");
        let csum_only = receive_header(&tso, F_GUEST_CSUM, 2);
        assert_eq!((csum_only[0], csum_only[1], csum_only[6], csum_only[10]), (HDR_F_NEEDS_CSUM, 0, 34, 2));
        let all = receive_header(&tso, F_GUEST_CSUM | F_GUEST_TSO4, 1);
        assert_eq!((all[1], field(&all, 4)), (GSO_TCPV4, 1448));
        assert_eq!(tap_offload(F_GUEST_TSO4), 0, "TSO without checksums is not offered to the tap");
        assert_eq!(tap_offload(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6), 0x07);
    }

    #[test]
    fn macs_parse_and_the_default_is_stable_and_local() {
        assert_eq!(parse_mac("02:00:0a:ff:10:01"), Some([2, 0, 0xa, 0xff, 0x10, 1]));
        for bad in ["02:00:0a:ff:10", "02:00:0a:ff:10:01:02", "02:00:0a:ff:10:1", "zz:00:0a:ff:10:01", ""] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let mac = default_mac("tap0");
        assert_eq!(mac, default_mac("tap0"));
        assert_ne!(mac, default_mac("tap1"));
        assert_eq!(mac[0] & 0b11, 0b10, "locally administered unicast");
        assert_eq!(format_mac(&[2, 0, 0xa, 0xff, 0x10, 1]), "02:00:0a:ff:10:01");
    }

    #[test]
    fn transmit_drops_what_is_malformed_and_counts_why() {
        let (mine, _theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(mine));
        let mut net = NetDevice::new(file, default_mac("t"), false).unwrap();
        let request = |bytes: Vec<u8>| Request {
            readable_len: bytes.len() as u64,
            writable_len: 0,
            readable: Some(bytes.into()),
        };
        let mut offload = vec![0u8; HEADER + 60];
        offload[0] = 1; // NEEDS_CSUM, never offered
        let replies = net.transmit(&[
            request(vec![0; 5]),
            request(vec![0; HEADER]),
            request(offload),
            request(vec![0; HEADER + 60]),
            Request { readable_len: (HEADER + MAX_FRAME + 1) as u64, writable_len: 0, readable: None },
        ]);
        assert_eq!(replies.iter().map(|r| r.failed).collect::<Vec<_>>(), [true, true, true, false, true]);
        assert_eq!((net.counters.tx_dropped_malformed, net.counters.tx_dropped_oversized), (3, 1));
        assert_eq!((net.counters.tx_frames, net.counters.tx_bytes), (1, 60));
    }
}
