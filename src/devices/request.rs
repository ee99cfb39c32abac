//! A request as device logic sees it, in every memory mode: the chain's
//! driver-readable bytes as one stream and its device-writable bytes as
//! another (virtio 1.x lets a driver split either across buffers as it
//! likes). Device logic reads the first stream and answers with writes at
//! offsets into the second; the transport (the VMM's grants, or the
//! device's own ring walk) maps stream offsets to buffers.
use rpc_schema::PostedBuffer;

/// One request for device logic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Total driver-readable bytes.
    pub readable_len: u64,
    /// Total device-writable bytes.
    pub writable_len: u64,
    /// The first bytes of the readable stream, as many as the device asked
    /// for ([`super::Backend::wanted`]); None when they cannot be read (a
    /// buffer is not guest RAM).
    pub readable: Option<Readable>,
}

/// A request's readable bytes: its own, or (`rpc`) where the VMM staged
/// them in its posting area, read there without a copy.
#[derive(Debug, Clone)]
pub enum Readable {
    Owned(Vec<u8>),
    Posted(PostedView),
}

impl Readable {
    /// Keeps the first `len` bytes at most.
    pub fn truncate(&mut self, len: usize) {
        match self {
            Readable::Owned(bytes) => bytes.truncate(len),
            Readable::Posted(view) => view.len = view.len.min(len),
        }
    }

    /// The bytes as a vector of their own (a copy of a view).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Readable::Owned(bytes) => bytes,
            Readable::Posted(_) => self.to_vec(),
        }
    }
}

impl std::ops::Deref for Readable {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Readable::Owned(bytes) => bytes,
            // SAFETY: see `PostedView::new`.
            Readable::Posted(view) => unsafe { std::slice::from_raw_parts(view.address, view.len) },
        }
    }
}

impl PartialEq for Readable {
    fn eq(&self, other: &Readable) -> bool {
        self[..] == other[..]
    }
}

impl Eq for Readable {}

impl From<Vec<u8>> for Readable {
    fn from(bytes: Vec<u8>) -> Readable {
        Readable::Owned(bytes)
    }
}

/// Bytes of the VMM's posting area, which this process maps read-only for
/// as long as it runs (see [`super::staging::StagingArea::posted_bytes`]).
#[derive(Debug, Clone, Copy)]
pub struct PostedView {
    address: *const u8,
    len: usize,
}

impl PostedView {
    /// # Safety
    /// `address` names `len` bytes that stay mapped while the view is in
    /// use and that nothing writes meanwhile. The VMM writes a posting
    /// slot before it posts the batch that names it, and again only once
    /// the device has answered that batch or been killed; a request lives
    /// only while its batch is served.
    pub unsafe fn new(address: *const u8, len: usize) -> PostedView {
        PostedView { address, len }
    }
}

// SAFETY: read-only bytes nothing writes while the view is used (see `new`).
unsafe impl Send for PostedView {}
unsafe impl Sync for PostedView {}

impl Request {
    /// A request of these (readable, writable) lengths whose bytes the
    /// device logic does not read (they were moved in place).
    pub fn about((readable_len, writable_len): (u64, u64)) -> Request {
        Request { readable_len, writable_len, readable: None }
    }
}

/// Device logic's answer to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// (offset into the writable stream, bytes), in any order, within the stream.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// `rpc`: bytes read straight into the batch's answer slot, as
    /// (offset into the writable stream, offset in the answer area, length).
    pub staged: Vec<(u64, u32, u32)>,
    /// What the driver sees as the used length.
    pub used_len: u32,
    /// The request ended with an error status (for the counters).
    pub failed: bool,
}

/// The readable and writable totals of a chain's buffers.
pub fn stream_lengths(buffers: &[PostedBuffer]) -> (u64, u64) {
    totals(buffers.iter().map(|b| (b.len, b.writable)))
}

/// The readable and writable totals of buffers given as (length, device-writable).
pub fn totals(buffers: impl IntoIterator<Item = (u32, bool)>) -> (u64, u64) {
    buffers.into_iter().fold((0, 0), |(r, w), (len, writable)| match writable {
        true => (r, w + u64::from(len)),
        false => (r + u64::from(len), w),
    })
}

/// The pieces (buffer index, offset in it, length) that hold bytes
/// `start..start+len` of the stream made of the buffers going one way.
pub fn pieces(buffers: &[PostedBuffer], writable: bool, start: u64, len: u64) -> Vec<(u16, u32, u32)> {
    let mut out = Vec::new();
    let (mut at, end) = (0u64, start.saturating_add(len));
    for (index, buffer) in buffers.iter().enumerate().filter(|(_, b)| b.writable == writable) {
        let (from, to) = (at, at + buffer.len as u64);
        at = to;
        let (lo, hi) = (from.max(start), to.min(end));
        if lo < hi {
            out.push((index as u16, (lo - from) as u32, (hi - lo) as u32));
        }
        if at >= end {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(len: u32, writable: bool) -> PostedBuffer {
        PostedBuffer { len, writable }
    }

    #[test]
    fn streams_map_to_buffer_pieces() {
        let chain = [b(16, false), b(100, true), b(50, false), b(1, true)];
        assert_eq!(stream_lengths(&chain), (66, 101));
        assert_eq!(pieces(&chain, false, 0, 66), vec![(0, 0, 16), (2, 0, 50)]);
        assert_eq!(pieces(&chain, false, 10, 10), vec![(0, 10, 6), (2, 0, 4)]);
        assert_eq!(pieces(&chain, true, 100, 1), vec![(3, 0, 1)]);
        assert_eq!(pieces(&chain, true, 99, 2), vec![(1, 99, 1), (3, 0, 1)]);
        assert!(pieces(&chain, true, 101, 5).is_empty(), "nothing past the stream");
        assert!(pieces(&chain, true, u64::MAX, 5).is_empty());
    }
}
