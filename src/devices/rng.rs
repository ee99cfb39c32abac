//! virtio-rng (virtio 1.x, 5.4): fills every device-writable buffer the
//! driver posts with bytes from the host's getrandom(2).
use super::features;
use super::request::{Reply, Request};
use rpc_schema::DeviceInfo;
use serde_bytes::ByteBuf;

pub const DEVICE_ID: u32 = 4;
pub const QUEUE_SIZE: u16 = 256;
/// Most entropy handed out per request; the driver simply asks again.
const MAX_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct RngDevice;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        // SAFETY: writing into our own buffer, within its bounds.
        let got = unsafe { libc::getrandom(buf[filled..].as_mut_ptr() as *mut libc::c_void, len - filled, 0) };
        if got <= 0 {
            break;
        }
        filled += got as usize;
    }
    buf.truncate(filled);
    buf
}

impl RngDevice {
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            device_id: DEVICE_ID,
            features: features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC,
            queue_count: 1,
            max_queue_size: QUEUE_SIZE,
            config: ByteBuf::new(),
        }
    }

    /// Fills each request's writable bytes, up to [`MAX_PER_REQUEST`]
    /// (readable ones are ignored).
    pub fn serve(&mut self, requests: &[Request]) -> Vec<Reply> {
        requests
            .iter()
            .map(|r| {
                let bytes = random_bytes((r.writable_len as usize).min(MAX_PER_REQUEST));
                Reply { used_len: bytes.len() as u32, writes: vec![(0, bytes)], failed: false, ..Reply::default() }
            })
            .collect()
    }
}
