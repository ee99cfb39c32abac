//! virtio-mem (virtio 1.2, 5.15): the guest plugs and unplugs blocks of the
//! hotplug region. This device only parses the guest's requests; each one
//! becomes a request to the VMM's hotplug service, which checks it against
//! its own record of the region and does the work. The configuration space
//! (block size, region, plugged and requested size) is served by the VMM.
use super::features;
use super::memory::AccessError;
use super::request::{Reply, Request as Posted};
use rpc_schema::{BlockState, DeviceInfo, HotplugError, MemoryHotplugClient};
use serde_bytes::ByteBuf;

pub const DEVICE_ID: u32 = 24;
pub const QUEUE_SIZE: u16 = 128;
/// Unplugged memory is not accessible to the guest (and here, to no device either).
pub const F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

/// Readable bytes a request needs.
pub const REQUEST_SIZE: u64 = 24;
const RESPONSE_SIZE: u32 = 10;

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;

const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_ERROR: u16 = 3;

const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;

pub struct MemDevice {
    hotplug: MemoryHotplugClient,
}

/// A guest request, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Plug { addr: u64, blocks: u16 },
    Unplug { addr: u64, blocks: u16 },
    UnplugAll,
    State { addr: u64, blocks: u16 },
}

fn decode(bytes: &[u8]) -> Option<Request> {
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    if bytes.len() < REQUEST_SIZE as usize {
        return None;
    }
    let addr = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let blocks = u16_at(16);
    match u16_at(0) {
        REQ_PLUG => Some(Request::Plug { addr, blocks }),
        REQ_UNPLUG => Some(Request::Unplug { addr, blocks }),
        REQ_UNPLUG_ALL => Some(Request::UnplugAll),
        REQ_STATE => Some(Request::State { addr, blocks }),
        _ => None,
    }
}

fn response(kind: u16, state: u16) -> Vec<u8> {
    let mut bytes = vec![0u8; RESPONSE_SIZE as usize];
    bytes[0..2].copy_from_slice(&kind.to_le_bytes());
    bytes[8..10].copy_from_slice(&state.to_le_bytes());
    bytes
}

fn response_kind(error: &HotplugError) -> u16 {
    match error {
        HotplugError::Refused(_) => RESP_NACK,
        HotplugError::Invalid(_) | HotplugError::NoSession(_) => RESP_ERROR,
    }
}

impl MemDevice {
    /// Opens the session with the VMM's hotplug service on `socket`.
    pub async fn connect(socket: std::os::unix::net::UnixStream) -> Result<Self, String> {
        let transport = rpc_schema::transport(socket).map_err(|e| format!("hotplug socket: {e}"))?;
        let hotplug = MemoryHotplugClient::new(Default::default(), transport).spawn();
        let hello = hotplug.hello(tarpc::context::current(), rpc_schema::PROTOCOL_VERSION).await;
        hello.map_err(|e| format!("hotplug hello: {e}"))?.map_err(|e| format!("hotplug hello: {e}"))?;
        Ok(MemDevice { hotplug })
    }

    /// Test-only: the channel to the VMM's hotplug service.
    pub fn hotplug_client(&self) -> MemoryHotplugClient {
        self.hotplug.clone()
    }

    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            device_id: DEVICE_ID,
            features: features::VERSION_1
                | features::RING_EVENT_IDX
                | features::RING_INDIRECT_DESC
                | F_UNPLUGGED_INACCESSIBLE,
            queue_count: 1,
            max_queue_size: QUEUE_SIZE,
            // Served live by the VMM, which owns the region's state.
            config: ByteBuf::new(),
        }
    }

    /// Answers one decoded request through the VMM: (response type, state).
    async fn answer(&self, request: Request) -> Result<(u16, u16), AccessError> {
        // A plug or unplug may take seconds in shared mode, where every device
        // sandbox is rebuilt: allow as long as the VMM's servers allow.
        let ctx = || {
            let mut ctx = tarpc::context::current();
            ctx.deadline = std::time::Instant::now() + rpc_schema::MAX_DEADLINE;
            ctx
        };
        let reply = match request {
            Request::Plug { addr, blocks } => self.hotplug.plug(ctx(), addr, blocks).await.map(|r| r.map(|_| 0)),
            Request::Unplug { addr, blocks } => self.hotplug.unplug(ctx(), addr, blocks).await.map(|r| r.map(|_| 0)),
            Request::UnplugAll => self.hotplug.unplug_all(ctx()).await.map(|r| r.map(|_| 0)),
            Request::State { addr, blocks } => self.hotplug.state(ctx(), addr, blocks).await.map(|r| {
                r.map(|s| match s {
                    BlockState::Plugged => STATE_PLUGGED,
                    BlockState::Unplugged => STATE_UNPLUGGED,
                    BlockState::Mixed => STATE_MIXED,
                })
            }),
        };
        match reply.map_err(|e| AccessError::Transport(format!("hotplug channel: {e}")))? {
            Ok(state) => Ok((RESP_ACK, state)),
            Err(refused) => {
                tracing::debug!("virtio-mem: {request:?}: {refused}");
                Ok((response_kind(&refused), 0))
            }
        }
    }

    /// Serves the requests in order (each may change the memory map): the
    /// first readable bytes are the request, the first writable ones take
    /// the response. Only a broken hotplug channel is an error.
    pub async fn serve(&mut self, requests: &[Posted]) -> Result<Vec<Reply>, AccessError> {
        let mut replies = Vec::with_capacity(requests.len());
        for request in requests {
            let decoded = request.readable.as_deref().and_then(decode);
            let (kind, state) = match decoded {
                Some(decoded) => self.answer(decoded).await?,
                None => (RESP_ERROR, 0),
            };
            let reply = if request.writable_len >= RESPONSE_SIZE as u64 {
                Reply {
                    writes: vec![(0, response(kind, state))],
                    used_len: RESPONSE_SIZE,
                    failed: kind == RESP_ERROR,
                    ..Reply::default()
                }
            } else {
                Reply { failed: true, ..Reply::default() }
            };
            replies.push(reply);
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_four_requests_and_refuses_the_rest() {
        let mut bytes = vec![0u8; 24];
        bytes[8..16].copy_from_slice(&0x2000_0000u64.to_le_bytes());
        bytes[16..18].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(decode(&bytes), Some(Request::Plug { addr: 0x2000_0000, blocks: 3 }));
        bytes[0] = 1;
        assert_eq!(decode(&bytes), Some(Request::Unplug { addr: 0x2000_0000, blocks: 3 }));
        bytes[0] = 2;
        assert_eq!(decode(&bytes), Some(Request::UnplugAll));
        bytes[0] = 3;
        assert_eq!(decode(&bytes), Some(Request::State { addr: 0x2000_0000, blocks: 3 }));
        bytes[0] = 9;
        assert_eq!(decode(&bytes), None);
        assert_eq!(decode(&bytes[..20]), None);
        assert_eq!(response(RESP_NACK, 2), vec![1, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
    }
}
