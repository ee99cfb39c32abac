//! A polling virtio-net driver (virtio 1.x, 5.1), and just enough Ethernet,
//! ARP, IPv4, ICMP and UDP to ping, answer pings and echo datagrams.
use crate::blk::Arena;
use crate::platform::rdtsc;
use crate::virtio::{Device, Queue, DESC_F_WRITE, F_VERSION_1};

pub const DEVICE_ID: u32 = 1;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
/// Checksum offload both ways: the device takes partial checksums, and
/// hands the guest frames whose checksum the host left partial.
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
const HDR_F_NEEDS_CSUM: u8 = 1;
const F_STATUS: u64 = 1 << 16;
/// The largest ring the driver uses. As Linux's driver does, it takes the
/// device's largest ring (skvm, Firecracker, Cloud Hypervisor and QEMU all
/// offer 256); with 64, a request-level device that waits for the VMM to
/// post each receive buffer back ran out of them every 32 frames or so.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`.
pub const HEADER: usize = 12;
/// Each receive and transmit buffer: a header and a full-size frame.
pub const BUFFER: u64 = 2048;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IP: u16 = 0x0800;
pub const UDP_ECHO_PORT: u16 = 7;
/// Datagrams here are counted and dropped; every 64th is acknowledged with
/// the count so far from that sender (the host's benchmark paces itself by
/// the acks; a new source port starts a new count).
pub const UDP_SINK_PORT: u16 = 9;
/// A datagram here (count: u32, size: u16, little-endian) makes the guest
/// send `count` datagrams of `size` bytes back to its sender, the last
/// one's first byte 0xff.
pub const UDP_BLAST_PORT: u16 = 10;

pub struct Net {
    pub device: Device,
    rx: Queue,
    tx: Queue,
    rx_buffers: u64,
    tx_buffers: u64,
    /// Transmit slots in use, and the next to use.
    tx_busy: u16,
    tx_next: u16,
    pub mac: [u8; 6],
    pub mergeable: bool,
    /// How receive buffers are posted: length and descriptor flags (the
    /// hostile scenario posts tiny and read-only ones).
    pub rx_len: u32,
    pub rx_flags: u16,
    /// Receive buffers the device gave back empty.
    pub rx_empty: u64,
    /// The features negotiated.
    pub features: u64,
    /// The last frame's header: flags, csum_start, csum_offset.
    pub rx_header: (u8, u16, u16),
    /// Receive buffers posted again since the last notification.
    rx_unannounced: bool,
    /// Transmit kicks that notified the device, and those it did not want.
    tx_notified: u64,
    tx_skipped: u64,
    /// The same for receive buffers posted again.
    rx_notified: u64,
    rx_skipped: u64,
}

/// The first virtio-net device on the command line.
pub fn find(cmdline: &str) -> Option<Device> {
    crate::virtio::devices(cmdline).find(|d| d.is_virtio() && d.device_id() == DEVICE_ID)
}

impl Net {
    /// Sets the device up with every receive buffer posted as `rx_len`
    /// bytes with `rx_flags` (the hostile scenario posts tiny and read-only ones).
    pub fn init(
        mut device: Device,
        arena: &mut Arena,
        rx_len: u32,
        rx_flags: u16,
        merge: bool,
        offload: bool,
    ) -> Result<Net, &'static str> {
        let merge = if merge { F_MRG_RXBUF } else { 0 };
        let offload = if offload { F_CSUM | F_GUEST_CSUM } else { 0 };
        let event_idx = crate::virtio::event_idx_wanted();
        let features = device.negotiate(F_VERSION_1 | F_MAC | F_STATUS | merge | offload | event_idx)?;
        if features & F_MAC == 0 {
            return Err("the device has no MAC");
        }
        let (low, high) = (device.config_read32(0), device.config_read32(4));
        let mac = [low as u8, (low >> 8) as u8, (low >> 16) as u8, (low >> 24) as u8, high as u8, (high >> 8) as u8];
        let offered = device.queue_max(0).min(device.queue_max(1)).min(MAX_QUEUE_SIZE);
        if offered == 0 {
            return Err("the device has no receive or transmit queue");
        }
        let size = 1u16 << (15 - offered.leading_zeros());
        let footprint = Queue::footprint(size);
        let mut rx = Queue::new(arena.take(footprint).ok_or("out of memory")?, size);
        let mut tx = Queue::new(arena.take(footprint).ok_or("out of memory")?, size);
        if features & crate::virtio::F_EVENT_IDX != 0 {
            rx.use_event_idx();
            tx.use_event_idx();
        }
        let rx_buffers = arena.take(BUFFER * size as u64).ok_or("out of memory")?;
        let tx_buffers = arena.take(BUFFER * size as u64).ok_or("out of memory")?;
        device.setup_queue(0, &rx)?;
        device.setup_queue(1, &tx)?;
        let mut net = Net {
            device,
            rx,
            tx,
            rx_buffers,
            tx_buffers,
            tx_busy: 0,
            tx_next: 0,
            mac,
            mergeable: features & F_MRG_RXBUF != 0,
            rx_len,
            rx_flags,
            rx_empty: 0,
            features,
            rx_header: (0, 0, 0),
            rx_unannounced: false,
            tx_notified: 0,
            tx_skipped: 0,
            rx_notified: 0,
            rx_skipped: 0,
        };
        for slot in 0..size {
            net.rx.set_desc(slot, rx_buffers + slot as u64 * BUFFER, rx_len, rx_flags, 0);
            net.rx.push(slot);
        }
        device.driver_ok();
        device.notify(0);
        Ok(net)
    }

    /// Posts receive slot `slot` again, as the current `rx_len` and `rx_flags` say.
    fn repost(&mut self, slot: u16) {
        self.rx.set_desc(slot, self.rx_buffers + slot as u64 * BUFFER, self.rx_len, self.rx_flags, 0);
        self.rx.push(slot);
    }

    /// The next frame received, reassembled into `out` from as many buffers
    /// as its header's `num_buffers` says; its length (0 for a buffer the
    /// device gave back empty). The buffers are posted again.
    pub fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        let (head, len) = self.rx.pop_used()?;
        let mut slot = head % self.rx.size;
        let mut at = self.rx_buffers + slot as u64 * BUFFER;
        let mut len = (len as usize).min(BUFFER as usize);
        if len < HEADER {
            self.rx_empty += 1;
            self.repost(slot);
            self.rx_unannounced = true;
            return Some(0);
        }
        // SAFETY: our own receive buffer, which the device wrote a header into.
        let buffers = unsafe { core::ptr::read_volatile((at + 10) as *const u16) }.max(1);
        // SAFETY: as above.
        self.rx_header = unsafe {
            (
                core::ptr::read_volatile(at as *const u8),
                core::ptr::read_volatile((at + 6) as *const u16),
                core::ptr::read_volatile((at + 8) as *const u16),
            )
        };
        let (mut skip, mut filled) = (HEADER, 0usize);
        for i in 0..buffers {
            if i > 0 {
                let start = rdtsc();
                let (next, next_len) = loop {
                    if let Some(done) = self.rx.pop_used() {
                        break done;
                    }
                    if rdtsc() - start > 1 << 32 {
                        return Some(filled);
                    }
                };
                slot = next % self.rx.size;
                at = self.rx_buffers + slot as u64 * BUFFER;
                len = (next_len as usize).min(BUFFER as usize);
                skip = 0;
            }
            let take = len.saturating_sub(skip).min(out.len() - filled);
            // SAFETY: our own receive buffer, `len` bytes of which the device wrote.
            unsafe {
                core::ptr::copy_nonoverlapping((at + skip as u64) as *const u8, out[filled..].as_mut_ptr(), take)
            };
            filled += take;
            self.repost(slot);
        }
        self.rx_unannounced = true;
        Some(filled)
    }

    /// Tells the device about receive buffers posted again: once for all
    /// that `recv` took since the last time, unless it says it will look
    /// anyway (as Linux's driver does).
    pub fn announce_rx(&mut self) {
        if core::mem::take(&mut self.rx_unannounced) {
            if self.rx.wants_notification() {
                self.device.notify(0);
                self.rx_notified += 1;
            } else {
                self.rx_skipped += 1;
            }
        }
    }

    /// Queues one transmit chain of hand-made descriptors (address, length)
    /// and waits for the device to complete it; false if it never does.
    pub fn send_chain(&mut self, descs: &[(u64, u32)]) -> bool {
        while self.tx_busy > 0 {
            self.reclaim();
        }
        let base = self.tx.size - descs.len() as u16;
        for (i, &(addr, len)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let (flags, next) = if last { (0, 0) } else { (crate::virtio::DESC_F_NEXT, base + i as u16 + 1) };
            self.tx.set_desc(base + i as u16, addr, len, flags, next);
        }
        self.tx.push(base);
        self.device.notify(1);
        let start = rdtsc();
        while self.tx.pop_used().is_none() {
            if rdtsc() - start > 1 << 34 {
                return false;
            }
        }
        true
    }

    /// Both rings' size (a power of two).
    pub fn queue_size(&self) -> u16 {
        self.rx.size
    }

    /// A transmit buffer of ours (slot 0), for hand-made chains.
    pub fn tx_buffer(&self) -> u64 {
        self.tx_buffers
    }

    /// Queues `frame` for transmission, waiting for a free slot if need be.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), &'static str> {
        self.send_raw(&[0u8; HEADER], frame)
    }

    /// Queues `header` then `frame` as one buffer (the hostile scenario
    /// sends headers of its own).
    pub fn send_raw(&mut self, header: &[u8], frame: &[u8]) -> Result<(), &'static str> {
        let len = header.len() + frame.len();
        if len as u64 > BUFFER {
            return Err("frame too long for a transmit buffer");
        }
        self.reclaim();
        let start = rdtsc();
        while self.tx_busy == self.tx.size {
            self.reclaim();
            if rdtsc() - start > 1 << 34 {
                return Err("the device never finished transmitting");
            }
        }
        let slot = self.tx_next % self.tx.size;
        self.tx_next = self.tx_next.wrapping_add(1);
        let at = self.tx_buffers + slot as u64 * BUFFER;
        // SAFETY: our own transmit buffer, BUFFER bytes long.
        unsafe {
            core::ptr::copy_nonoverlapping(header.as_ptr(), at as *mut u8, header.len());
            core::ptr::copy_nonoverlapping(frame.as_ptr(), (at + header.len() as u64) as *mut u8, frame.len());
        }
        self.tx.set_desc(slot, at, len as u32, 0, 0);
        self.tx.push(slot);
        self.tx_busy += 1;
        // Unless the device says it is watching the queue anyway (as Linux does).
        if self.tx.wants_notification() {
            self.device.notify(1);
            self.tx_notified += 1;
        } else {
            self.tx_skipped += 1;
        }
        Ok(())
    }

    fn reclaim(&mut self) {
        while self.tx.pop_used().is_some() {
            self.tx_busy -= 1;
        }
    }
}

/// Our end of the link: addresses, and the peer's MAC once ARP found it.
pub struct Stack {
    pub ip: [u8; 4],
    pub peer_ip: [u8; 4],
    pub peer_mac: Option<[u8; 6]>,
    /// Echo replies received, by sequence number bit.
    pub replies: u64,
    pub pings_answered: u64,
    pub udp_echoed: u64,
    pub sunk: u64,
    sink_from: [u8; 6],
    /// Frames the host left with a partial checksum (GUEST_CSUM).
    pub partial: u64,
}

pub fn parse_ip(text: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split('.');
    for byte in ip.iter_mut() {
        *byte = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet header into `out`; returns its length.
fn ethernet(out: &mut [u8], to: [u8; 6], from: [u8; 6], kind: u16) -> usize {
    out[..6].copy_from_slice(&to);
    out[6..12].copy_from_slice(&from);
    out[12..14].copy_from_slice(&kind.to_be_bytes());
    14
}

/// An IPv4 header (20 bytes) at `out[14..]` for a payload of `len` bytes.
fn ipv4(out: &mut [u8], from: [u8; 4], to: [u8; 4], proto: u8, len: usize) {
    let ip = &mut out[14..34];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&from);
    ip[16..20].copy_from_slice(&to);
    let sum = checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// A UDP datagram carrying `data` (at most 1472 bytes) in answer to the
/// datagram whose UDP header starts `request`: from the port it was sent
/// to, back to the port it came from. Built in `out`; the frame is returned.
fn udp<'a>(
    out: &'a mut [u8; 1514],
    mac: [u8; 6],
    to_mac: [u8; 6],
    ip: [u8; 4],
    to_ip: [u8; 4],
    request: &[u8],
    data: &[u8],
) -> &'a [u8] {
    let len = 8 + data.len();
    ethernet(out, to_mac, mac, ETH_IP);
    ipv4(out, ip, to_ip, 17, len);
    let header = &mut out[34..42];
    header[0..2].copy_from_slice(&request[2..4]);
    header[2..4].copy_from_slice(&request[0..2]);
    header[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    // A zero UDP checksum: none (allowed in IPv4).
    header[6..8].fill(0);
    out[42..42 + data.len()].copy_from_slice(data);
    &out[..34 + len]
}

impl Stack {
    pub fn arp_request(&self, net: &mut Net) -> Result<(), &'static str> {
        let mut f = [0u8; 42];
        ethernet(&mut f, [0xff; 6], net.mac, ETH_ARP);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&net.mac);
        f[28..32].copy_from_slice(&self.ip);
        f[38..42].copy_from_slice(&self.peer_ip);
        net.send(&f)
    }

    /// An ICMP echo request to the peer with `payload` bytes.
    pub fn ping(&self, net: &mut Net, seq: u16, payload: usize) -> Result<(), &'static str> {
        let to = self.peer_mac.ok_or("the peer's MAC is unknown")?;
        let mut f = [0u8; 1514];
        let len = 8 + payload;
        ethernet(&mut f, to, net.mac, ETH_IP);
        ipv4(&mut f, self.ip, self.peer_ip, 1, len);
        let icmp = &mut f[34..34 + len];
        icmp[0] = 8;
        icmp[4..6].copy_from_slice(&0x5b5bu16.to_be_bytes());
        icmp[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in icmp[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let sum = checksum(icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        net.send(&f[..34 + len])
    }

    /// Handles one received frame: answers ARP for our address, echo
    /// requests, and UDP datagrams to the echo port; notes ARP and echo
    /// replies from the peer. Anything else is ignored.
    pub fn handle(&mut self, net: &mut Net, frame: &[u8]) -> Result<(), &'static str> {
        if frame.len() < 14 {
            return Ok(());
        }
        let src_mac: [u8; 6] = frame[6..12].try_into().unwrap();
        match be16(frame, 12) {
            ETH_ARP if frame.len() >= 42 && frame[28..32] != [0; 4] => {
                let op = be16(frame, 20);
                let sender_ip: [u8; 4] = frame[28..32].try_into().unwrap();
                if sender_ip == self.peer_ip {
                    self.peer_mac = Some(frame[22..28].try_into().unwrap());
                }
                if op == 1 && frame[38..42] == self.ip {
                    let mut f = [0u8; 42];
                    ethernet(&mut f, src_mac, net.mac, ETH_ARP);
                    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
                    f[22..28].copy_from_slice(&net.mac);
                    f[28..32].copy_from_slice(&self.ip);
                    f[32..42].copy_from_slice(&frame[22..32]);
                    net.send(&f)?;
                }
            }
            ETH_IP if frame.len() >= 34 && frame[14] == 0x45 && frame[30..34] == self.ip => {
                let total = (be16(frame, 16) as usize).min(frame.len() - 14);
                if total < 20 {
                    return Ok(());
                }
                let src_ip: [u8; 4] = frame[26..30].try_into().unwrap();
                let payload = &frame[34..14 + total];
                match frame[23] {
                    1 if payload.len() >= 8 && payload[0] == 8 => {
                        let mut f = [0u8; 1514];
                        ethernet(&mut f, src_mac, net.mac, ETH_IP);
                        ipv4(&mut f, self.ip, src_ip, 1, payload.len());
                        let icmp = &mut f[34..34 + payload.len()];
                        icmp.copy_from_slice(payload);
                        icmp[0] = 0;
                        icmp[2..4].fill(0);
                        let sum = checksum(icmp);
                        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                        net.send(&f[..34 + payload.len()])?;
                        self.pings_answered += 1;
                    }
                    1 if payload.len() >= 8 && payload[0] == 0 && src_ip == self.peer_ip => {
                        let seq = be16(payload, 6);
                        self.replies |= 1u64 << (seq % 64);
                    }
                    17 if payload.len() >= 8 && be16(payload, 2) == UDP_SINK_PORT => {
                        let mut from = [0u8; 6];
                        from[..4].copy_from_slice(&src_ip);
                        from[4..].copy_from_slice(&payload[0..2]);
                        if from != self.sink_from {
                            (self.sink_from, self.sunk) = (from, 0);
                        }
                        self.sunk += 1;
                        if self.sunk.is_multiple_of(64) {
                            let mut f = [0u8; 1514];
                            let reply =
                                udp(&mut f, net.mac, src_mac, self.ip, src_ip, payload, &self.sunk.to_le_bytes());
                            net.send(reply)?;
                        }
                    }
                    17 if payload.len() >= 14 && be16(payload, 2) == UDP_BLAST_PORT => {
                        let count = u32::from_le_bytes(payload[8..12].try_into().unwrap());
                        let size = (u16::from_le_bytes([payload[12], payload[13]]) as usize).clamp(1, 1472);
                        let mut data = [0u8; 1472];
                        let mut f = [0u8; 1514];
                        let (notified, skipped) = (net.tx_notified, net.tx_skipped);
                        for i in 0..count {
                            data[0] = if i + 1 == count { 0xff } else { 0 };
                            let reply = udp(&mut f, net.mac, src_mac, self.ip, src_ip, payload, &data[..size]);
                            net.send(reply)?;
                        }
                        crate::println!(
                            "net: blasted {} datagrams; transmit notifications sent={} skipped={}",
                            count,
                            net.tx_notified - notified,
                            net.tx_skipped - skipped
                        );
                    }
                    17 if payload.len() >= 8 && be16(payload, 2) == UDP_ECHO_PORT => {
                        let data = &payload[8..(be16(payload, 4) as usize).clamp(8, payload.len())];
                        if data.len() <= 1472 {
                            let mut f = [0u8; 1514];
                            let reply = udp(&mut f, net.mac, src_mac, self.ip, src_ip, payload, data);
                            net.send(reply)?;
                            self.udp_echoed += 1;
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Stack {
    /// Our address from `ip=` (default 10.0.0.2), the peer's from `peer=` (default 10.0.0.1).
    pub fn from_cmdline(cmdline: &str) -> Stack {
        let param = |key, default| crate::scenario::param(cmdline, key).and_then(parse_ip).unwrap_or(default);
        Stack {
            ip: param("ip", [10, 0, 0, 2]),
            peer_ip: param("peer", [10, 0, 0, 1]),
            peer_mac: None,
            replies: 0,
            pings_answered: 0,
            udp_echoed: 0,
            sunk: 0,
            sink_from: [0; 6],
            partial: 0,
        }
    }

    /// Handles every frame waiting.
    pub fn poll(&mut self, net: &mut Net) -> Result<(), &'static str> {
        let mut frame = [0u8; BUFFER as usize];
        while let Some(len) = net.recv(&mut frame) {
            if len == 0 {
                continue;
            }
            let (flags, start, offset) = net.rx_header;
            if flags & HDR_F_NEEDS_CSUM != 0 {
                self.partial += 1;
                if self.partial == 1 {
                    crate::println!("net: partial checksum from the host (start {}, offset {})", start, offset);
                }
            }
            self.handle(net, &frame[..len])?;
        }
        net.announce_rx();
        Ok(())
    }

    /// A UDP datagram to the peer's `port` whose checksum the device (the
    /// host) finishes: the header says NEEDS_CSUM, the field holds the
    /// pseudo-header sum.
    pub fn send_partial(&self, net: &mut Net, port: u16, data: &[u8]) -> Result<(), &'static str> {
        let to = self.peer_mac.ok_or("the peer's MAC is unknown")?;
        let mut f = [0u8; 1514];
        let len = 8 + data.len();
        ethernet(&mut f, to, net.mac, ETH_IP);
        ipv4(&mut f, self.ip, self.peer_ip, 17, len);
        f[34..36].copy_from_slice(&4242u16.to_be_bytes());
        f[36..38].copy_from_slice(&port.to_be_bytes());
        f[38..40].copy_from_slice(&(len as u16).to_be_bytes());
        f[42..42 + data.len()].copy_from_slice(data);
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&self.ip);
        pseudo[4..8].copy_from_slice(&self.peer_ip);
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&(len as u16).to_be_bytes());
        // The folded sum, not its complement: the device's side completes it.
        let sum = !checksum(&pseudo);
        f[40..42].copy_from_slice(&sum.to_be_bytes());
        let mut header = [0u8; HEADER];
        header[0] = HDR_F_NEEDS_CSUM;
        header[6..8].copy_from_slice(&34u16.to_le_bytes());
        header[8..10].copy_from_slice(&6u16.to_le_bytes());
        net.send_raw(&header, &f[..34 + len])
    }

    /// Finds the peer's MAC by ARP, asking again every 2^28 ticks.
    pub fn resolve(&mut self, net: &mut Net) -> Result<(), &'static str> {
        let start = rdtsc();
        while self.peer_mac.is_none() {
            self.arp_request(net)?;
            let asked = rdtsc();
            while self.peer_mac.is_none() && rdtsc() - asked < 1 << 28 {
                self.poll(net)?;
            }
            if rdtsc() - start > 1 << 36 {
                return Err("the peer never answered ARP");
            }
        }
        Ok(())
    }

    /// Pings the peer `count` times, each waiting for its reply.
    pub fn ping_peer(&mut self, net: &mut Net, count: u16) -> Result<(), &'static str> {
        self.replies = 0;
        for seq in 0..count.min(64) {
            self.ping(net, seq, 56)?;
            let sent = rdtsc();
            while self.replies & (1 << seq) == 0 {
                self.poll(net)?;
                if rdtsc() - sent > 1 << 34 {
                    return Err("no echo reply from the peer");
                }
            }
            crate::println!("net: reply seq={}", seq);
        }
        Ok(())
    }

    /// Answers ARP, pings and UDP echo forever, printing a count line every 2^33 ticks.
    pub fn serve(&mut self, net: &mut Net) -> Result<(), &'static str> {
        crate::println!("net: serving");
        let mut last = rdtsc();
        loop {
            self.poll(net)?;
            if rdtsc() - last > 1 << 33 {
                last = rdtsc();
                crate::println!(
                    "net: answered {} pings, echoed {} datagrams; notifications: transmit sent={} skipped={}, receive sent={} skipped={}",
                    self.pings_answered,
                    self.udp_echoed,
                    net.tx_notified,
                    net.tx_skipped,
                    net.rx_notified,
                    net.rx_skipped
                );
            }
        }
    }
}

fn print_mac(net: &Net) {
    let m = net.mac;
    crate::println!(
        "net: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} mergeable {} rings {}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        net.mergeable,
        net.queue_size()
    );
}

/// `net-ping [offload=1]`: resolve the peer by ARP, ping it `pings=N` times
/// (default 5), then answer ARP, pings and UDP echo (port 7) from the host
/// forever. With `offload=1` it negotiates checksum offload both ways,
/// sends the host one datagram (port 5555) whose checksum the host must
/// finish, and reports the first partial checksum the host sends.
pub fn run_ping(info: &crate::pvh::StartInfo) -> Result<(), &'static str> {
    let cmdline = info.cmdline();
    let pings: u16 = crate::scenario::param(cmdline, "pings").and_then(|n| n.parse().ok()).unwrap_or(5).min(64);
    let mut arena = crate::blk_scenarios::arena(info).ok_or("not enough RAM")?;
    let device = find(cmdline).ok_or("no virtio-net device")?;
    let offload = crate::scenario::param(cmdline, "offload") == Some("1");
    let mut net = Net::init(device, &mut arena, BUFFER as u32, DESC_F_WRITE, true, offload)?;
    let mut stack = Stack::from_cmdline(cmdline);
    print_mac(&net);
    stack.resolve(&mut net)?;
    crate::println!("net: peer found");
    stack.ping_peer(&mut net, pings)?;
    crate::println!("net-ping: {}/{} replies", stack.replies.count_ones(), pings);
    if offload {
        if net.features & (F_CSUM | F_GUEST_CSUM) != F_CSUM | F_GUEST_CSUM {
            return Err("the device offers no checksum offload");
        }
        stack.send_partial(&mut net, 5555, b"checksum left to the host")?;
        crate::println!("net: sent a datagram with a partial checksum");
    }
    stack.serve(&mut net)
}

/// `net-hostile [merge=0]`: transmit chains the device must drop (a short
/// header, a header alone, a zero-length buffer, offloads never offered,
/// an oversized frame, a buffer outside RAM), each of which must still
/// complete; then receive buffers posted read-only and too small for a
/// header, which must come back unused; then, with 64-byte buffers (128
/// without `MRG_RXBUF` when `merge=0`), ARP and pings to the host, whose
/// frames span several buffers. Then it serves, like `net-ping`.
pub fn run_hostile(info: &crate::pvh::StartInfo) -> Result<(), &'static str> {
    let cmdline = info.cmdline();
    let merge = crate::scenario::param(cmdline, "merge") != Some("0");
    let mut arena = crate::blk_scenarios::arena(info).ok_or("not enough RAM")?;
    let big = arena.take(80 * 1024).ok_or("out of memory")?;
    let device = find(cmdline).ok_or("no virtio-net device")?;
    // Every receive buffer read-only to start with.
    let mut net = Net::init(device, &mut arena, BUFFER as u32, 0, merge, false)?;
    let mut stack = Stack::from_cmdline(cmdline);
    print_mac(&net);
    let buf = net.tx_buffer();
    let (csum, gso) = (buf + 128, buf + 256);
    // SAFETY: our own transmit buffers, zeroed and then given offload headers.
    unsafe {
        core::ptr::write_bytes(buf as *mut u8, 0, 512);
        core::ptr::write_volatile(csum as *mut u8, 1); // NEEDS_CSUM
        core::ptr::write_volatile((gso + 1) as *mut u8, 1); // GSO_TCPV4
    }
    let cases: [(&str, &[(u64, u32)]); 7] = [
        ("short header", &[(buf, 5)]),
        ("header alone", &[(buf, HEADER as u32)]),
        ("zero-length buffer", &[(buf, 0)]),
        ("checksum offload never offered", &[(csum, HEADER as u32 + 60)]),
        ("segmentation offload never offered", &[(gso, HEADER as u32 + 60)]),
        ("oversized frame", &[(buf, HEADER as u32), (big, 70_000)]),
        ("buffer outside RAM", &[(buf, HEADER as u32), (0xff_0000_0000, 60)]),
    ];
    let mut stuck = 0;
    for (name, descs) in cases {
        let done = net.send_chain(descs);
        stuck += u32::from(!done);
        crate::println!("net-hostile: {}: {}", name, if done { "completed" } else { "NOT COMPLETED" });
    }
    // Read-only buffers come back unused; post them again 4 bytes long
    // (no room for a header): those come back unused too.
    for (len, round) in [(4u32, 1u64), (if merge { 64 } else { 128 }, 2)] {
        net.rx_len = len;
        net.rx_flags = DESC_F_WRITE;
        let start = rdtsc();
        while net.rx_empty < round * net.queue_size() as u64 {
            let mut frame = [0u8; 64];
            net.recv(&mut frame);
            net.announce_rx();
            if rdtsc() - start > 1 << 34 {
                return Err("receive buffers the device cannot use did not come back");
            }
        }
    }
    crate::println!("net-hostile: {} unusable receive buffers came back unused", net.rx_empty);
    // Small buffers: the host's frames span several (with MRG_RXBUF).
    stack.resolve(&mut net)?;
    stack.ping_peer(&mut net, 3)?;
    crate::println!("net-hostile: small receive buffers ok (mergeable {})", net.mergeable);
    net.rx_len = BUFFER as u32;
    crate::println!("net-hostile: {} transmit cases left stuck", stuck);
    if stuck != 0 {
        return Err("a transmit chain never completed");
    }
    stack.serve(&mut net)
}
