//! A network device's frames without a copy where guest RAM is mapped in
//! this process (`shared` and `inprocess`).
//!
//! Receive: the tap's next frame is read (one `readv`) straight into the
//! receive buffers the driver posted, as many as a full-MTU frame takes.
//! Its header is read into the device's own bytes and rebuilt, as on the
//! copying path, before the driver sees it.
//!
//! Transmit: one `writev` to the tap from the driver's buffers, after a
//! header the device rebuilt from a copy it checked (the driver's header
//! itself never reaches the tap).
//!
//! Every buffer is found in the current map of guest RAM first, and the map
//! stays mapped for the read. What this path does not take goes the copying
//! way ([`NetDevice::receive`]): a frame longer than the buffers held (it
//! waits for more, or is dropped as too big), a buffer outside RAM, or a
//! frame already waiting.
use super::net::{place, take_placed, Held, NetDevice, Placement, HEADER, MAX_FRAME, MIN_FRAME, MTU_FRAME};
use super::request::Reply;
use super::virtqueue::Chain;
use super::zero_copy::host_pieces_into;
use std::collections::VecDeque;
use vm_memory::GuestMemoryMmap;

/// Host memory: (address, length) pieces.
type Pieces = Vec<(*mut u8, usize)>;

/// Fills held receive buffers with frames from the tap, front first, while
/// both last; returns each filled buffer with its reply (no writes: the
/// bytes are in place), and whether the tap ran dry (then the copying path
/// has nothing to read either, and a read of its own would cost a system
/// call that finds nothing). `ring_full`: the driver has posted all it can.
pub fn receive(
    net: &mut NetDevice,
    mem: &GuestMemoryMmap,
    held: &mut VecDeque<Held<Chain>>,
    ring_full: bool,
) -> (Vec<(Chain, Reply)>, bool) {
    // Filled afresh for each frame, and allocated once for the device's life.
    let mut scratch = std::mem::take(&mut net.rx_pieces);
    let received = receive_with(net, mem, held, ring_full, &mut scratch.header, &mut scratch.frame);
    scratch.header.clear();
    scratch.frame.clear();
    net.rx_pieces = scratch;
    received
}

/// Host memory pieces kept between receives for their allocation only:
/// emptied before [`receive`] returns, so no pointer outlives the call
/// that stored it.
#[derive(Default)]
pub struct PieceBuffers {
    header: Pieces,
    frame: Pieces,
}

// SAFETY: empty between calls (see above): nothing is shared or sent but
// the allocations.
unsafe impl Send for PieceBuffers {}
// SAFETY: as above.
unsafe impl Sync for PieceBuffers {}

fn receive_with(
    net: &mut NetDevice,
    mem: &GuestMemoryMmap,
    held: &mut VecDeque<Held<Chain>>,
    ring_full: bool,
    header_at: &mut Pieces,
    pieces: &mut Pieces,
) -> (Vec<(Chain, Reply)>, bool) {
    let mut done = Vec::new();
    loop {
        while held.front().is_some_and(|h| (h.capacity as usize) < HEADER) {
            net.counters.rx_bad_buffers += 1;
            done.push((held.pop_front().unwrap().buffer, Reply::default()));
        }
        if held.is_empty() || net.waits_for_buffers() {
            return (done, false);
        }
        if frame_pieces(mem, held, net.mergeable(), header_at, pieces).is_none() {
            return (done, false);
        }
        let mut header = [0u8; HEADER];
        // SAFETY: the pieces lie in guest RAM mapped by `mem`, which we hold.
        let Some(got) = (unsafe { net.read_scattered(&mut header, pieces) }) else { return (done, true) };
        if got < HEADER + MIN_FRAME {
            // A runt: nothing reaches the driver (its buffer is still ours).
            continue;
        }
        let capacities = held.iter().map(|h| h.capacity);
        let in_place = pieces.iter().map(|p| p.1).sum::<usize>() + HEADER;
        let (buffers, last) = match place(got as u64, capacities, net.mergeable(), ring_full) {
            Placement::Fits { buffers, last } if got <= in_place => (buffers, last),
            _ => {
                // SAFETY: as for the read.
                unsafe { net.keep_overflow(&header, pieces, got) };
                return (done, false);
            }
        };
        let header = net.header_for_driver(&header, buffers as u16);
        let mut header = &header[..];
        for &(ptr, len) in header_at.iter() {
            // SAFETY: checked guest RAM, mapped by `mem`, within the buffer.
            unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), ptr, len) };
            header = &header[len..];
        }
        net.delivered(got);
        let placed = take_placed(held, buffers, last);
        done.extend(placed.map(|(buffer, len)| {
            (buffer, Reply { writes: Vec::new(), used_len: len as u32, failed: false, ..Reply::default() })
        }));
    }
}

/// Sends each chain's frame from guest memory; one reply per chain (none
/// writes: transmit buffers are only read).
pub fn transmit(net: &mut NetDevice, mem: &GuestMemoryMmap, chains: &[Chain]) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(chains.len());
    // Reused across the call's frames: no allocation per frame.
    let (mut front, mut pieces) = (Vec::new(), Vec::new());
    for chain in chains {
        let (readable_len, _) = chain.stream_lengths();
        let mut header = [0u8; HEADER];
        front.clear();
        pieces.clear();
        let mapped = (HEADER as u64..=(HEADER + MAX_FRAME) as u64).contains(&readable_len)
            && host_pieces_into(mem, chain, false, 0, readable_len, &mut pieces).is_some();
        if mapped {
            // The device checks its own copy of the header.
            split_front(&mut pieces, HEADER, &mut front);
            let mut at = 0;
            for &(ptr, len) in &front {
                // SAFETY: checked guest RAM, mapped by `mem`, which we hold.
                unsafe { std::ptr::copy_nonoverlapping(ptr, header[at..].as_mut_ptr(), len) };
                at += len;
            }
        }
        let frame = mapped.then_some(&pieces[..]);
        // SAFETY: the pieces lie in guest RAM mapped by `mem`, which we hold.
        let sent = unsafe { net.send_scattered(readable_len, &header, frame) };
        replies.push(Reply { failed: !sent, ..Reply::default() });
    }
    replies
}

/// Host memory of the driver's header (into `header`) and of the bytes a
/// full-MTU frame fills after it (into `pieces`): the front buffer's, and
/// with MRG_RXBUF the next ones' until they hold one (or all that are
/// held). A longer frame (GSO) goes on into the device's own buffer, and
/// the copying path places it. None if some byte is not guest RAM.
fn frame_pieces(
    mem: &GuestMemoryMmap,
    held: &VecDeque<Held<Chain>>,
    mergeable: bool,
    header: &mut Pieces,
    pieces: &mut Pieces,
) -> Option<()> {
    header.clear();
    pieces.clear();
    let mut room = 0u64;
    for h in held {
        host_pieces_into(mem, &h.buffer, true, 0, h.capacity, pieces)?;
        room += h.capacity;
        if !mergeable || room >= (HEADER + MTU_FRAME) as u64 {
            break;
        }
    }
    // The front buffer holds at least a header (see `receive`).
    split_front(pieces, HEADER, header);
    Some(())
}

/// Moves the pieces of the first `n` bytes off the front of `pieces`,
/// which hold at least that many, onto `front`.
fn split_front(pieces: &mut Pieces, n: usize, front: &mut Pieces) {
    let mut left = n;
    while left > 0 {
        let (ptr, len) = pieces[0];
        let take = len.min(left);
        front.push((ptr, take));
        if take < len {
            // SAFETY: within the piece.
            pieces[0] = (unsafe { ptr.add(take) }, len - take);
        } else {
            pieces.remove(0);
        }
        left -= take;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::net::F_MRG_RXBUF;
    use crate::devices::virtqueue::Buffer;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use vm_memory::{Bytes, GuestAddress};

    /// A device whose "tap" is a datagram socket (frames keep their
    /// bounds), the other end, and 1 MiB of guest RAM.
    fn setup(features: u64) -> (NetDevice, UnixDatagram, GuestMemoryMmap) {
        let (tap, host) = UnixDatagram::pair().unwrap();
        let mut net = NetDevice::new(OwnedFd::from(tap).into(), [2, 0, 0, 0, 0, 1], false).unwrap();
        net.set_features(features);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (net, host, mem)
    }

    fn held(head: u16, addr: u64, len: u32) -> Held<Chain> {
        let buffer = Chain { head, buffers: vec![Buffer { addr, len, writable: true }] };
        Held { buffer, capacity: len as u64 }
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER];
        bytes[0] = 0xff; // flags the driver did not accept: must not reach it
        bytes.extend((0..len).map(|i| (i * 7 + 3) as u8));
        bytes
    }

    #[test]
    fn frames_land_in_the_drivers_buffers_with_a_rebuilt_header() {
        let (mut net, host, mem) = setup(F_MRG_RXBUF);
        let mut buffers: VecDeque<_> = (0..4).map(|i| held(i, 0x1000 * (i as u64 + 1), 1024)).collect();
        // One frame in one buffer, then one across two (MRG_RXBUF).
        let (small, large) = (frame(100), frame(1500));
        host.send(&small).unwrap();
        host.send(&large).unwrap();
        let (done, dry) = receive(&mut net, &mem, &mut buffers, false);
        assert!(dry, "the tap ran dry: the copying path has nothing to read");
        let used: Vec<(u16, u32)> = done.iter().map(|(c, r)| (c.head, r.used_len)).collect();
        assert_eq!(used, [(0, 112), (1, 1024), (2, 1512 - 1024)]);
        let mut got = vec![0u8; 112];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got[HEADER..], &small[HEADER..]);
        assert_eq!(&got[..HEADER], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "header: one buffer, no flags");
        let mut spread = vec![0u8; 1512];
        mem.read_slice(&mut spread[..1024], GuestAddress(0x2000)).unwrap();
        mem.read_slice(&mut spread[1024..], GuestAddress(0x3000)).unwrap();
        assert_eq!(&spread[HEADER..], &large[HEADER..]);
        assert_eq!(spread[10], 2, "num_buffers");
        assert_eq!(net.counters.rx_frames, 2);
        assert_eq!(buffers.len(), 1);
    }

    #[test]
    fn a_frame_longer_than_the_buffers_held_waits_and_one_too_big_is_dropped() {
        // MRG_RXBUF, one small buffer held: the frame waits for more.
        let (mut net, host, mem) = setup(F_MRG_RXBUF);
        let mut buffers: VecDeque<_> = [held(0, 0x1000, 256)].into();
        let long = frame(1000);
        host.send(&long).unwrap();
        let (done, dry) = receive(&mut net, &mem, &mut buffers, false);
        assert!(done.is_empty());
        assert!(net.waits_for_buffers() && !dry, "the frame waits, for the copying path");
        buffers.extend([held(1, 0x2000, 1024)]);
        let done = net.receive(&mut buffers, false, u64::MAX);
        let mut bytes: Vec<u8> = done.iter().flat_map(|(_, r)| r.writes[0].1.clone()).collect();
        bytes[..HEADER].fill(0);
        assert_eq!(&bytes[HEADER..], &long[HEADER..], "the copying path delivers it whole");
        // Without MRG_RXBUF a frame longer than a buffer is dropped and counted, not truncated.
        let (mut net, host, mem) = setup(0);
        let mut buffers: VecDeque<_> = [held(0, 0x1000, 256)].into();
        host.send(&frame(1000)).unwrap();
        assert!(receive(&mut net, &mem, &mut buffers, false).0.is_empty());
        assert!(net.receive(&mut buffers, false, u64::MAX).is_empty());
        assert_eq!((net.counters.rx_dropped_too_big, net.counters.rx_frames), (1, 0));
        assert_eq!(buffers.len(), 1, "the buffer is still held");
    }

    #[test]
    fn transmit_sends_the_guests_bytes_behind_a_checked_header_and_drops_the_malformed() {
        let (mut net, host, mem) = setup(0);
        let mut sent = frame(200);
        sent[0] = 0;
        // The frame split over two buffers, its header across the split.
        mem.write_slice(&sent[..5], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&sent[5..], GuestAddress(0x2000)).unwrap();
        // The same frame asking for a checksum offload that was not negotiated.
        mem.write_slice(&frame(200), GuestAddress(0x3000)).unwrap();
        let buffer = |addr, len| Buffer { addr, len, writable: false };
        let good = Chain { head: 0, buffers: vec![buffer(0x1000, 5), buffer(0x2000, sent.len() as u32 - 5)] };
        let unasked = Chain { head: 1, buffers: vec![buffer(0x3000, sent.len() as u32)] };
        let runt = Chain { head: 2, buffers: vec![buffer(0x2000, 8)] };
        let outside = Chain { head: 3, buffers: vec![buffer(2 << 20, 100)] };
        let replies = transmit(&mut net, &mem, &[good, unasked, runt, outside]);
        assert_eq!(replies.iter().map(|r| r.failed).collect::<Vec<_>>(), [false, true, true, true]);
        let mut got = vec![0u8; 4096];
        let len = host.recv(&mut got).unwrap();
        assert_eq!(&got[..len], &sent[..]);
        assert_eq!((net.counters.tx_frames, net.counters.tx_dropped_malformed), (1, 3));
    }
}
