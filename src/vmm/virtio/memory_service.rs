//! The VMM's guest-memory service: the only door from a device process to
//! guest memory. Each device has its own channel and [`DeviceAccess`]. A
//! request-level device (`rpc`) reaches only its outstanding grants; an
//! `rpc-dma` device names guest addresses. Either way every range is then
//! checked by `guest_access` against the current RAM map. A request no honest
//! request-level device makes fails the device.
use super::grants::GrantTable;
pub use super::host::DeviceHealth;
use crate::guest_access;
use futures::StreamExt;
use rpc_schema::{
    Answer, GrantRange, GrantWrite, GuestMemory, MemoryError, Segment, WriteSegment, MAX_SEGMENTS, PROTOCOL_VERSION,
};
use serde_bytes::ByteBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tarpc::server::Channel;
use tracing::{debug, warn};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// One device's standing with the memory service, and its counters.
#[derive(Debug, Default)]
pub struct DeviceAccess {
    pub name: String,
    /// Reaches guest memory only by grant (`rpc`), never by address.
    pub request_level: bool,
    /// The chains posted to the device and not yet completed.
    pub grants: Mutex<GrantTable>,
    /// The generation whose process said hello, plus one (0: none has).
    /// A generation, not a flag: an earlier process's hello that races a
    /// restart records its own, which admits no channel of the new one.
    greeted: AtomicU64,
    revoked: AtomicBool,
    /// Memory RPCs the device made.
    pub rpcs: AtomicU64,
    /// Guest bytes moved for it: by those RPCs, and inline with posted
    /// requests and their completions.
    pub bytes: AtomicU64,
    pub refused: AtomicU64,
    /// Time spent checking and copying this device's requests (and, at
    /// request level, walking its ring and applying its completions).
    pub service_ns: AtomicU64,
    /// Request level: batches posted to the device.
    pub batches: AtomicU64,
    /// Request level: interrupts the engine raised for the device's queues.
    pub interrupts: AtomicU64,
    /// Request level: the engine that completes requests the device held
    /// past their batch, while its queues are active.
    pub engine: Mutex<Option<std::sync::Weak<super::requests::Engine>>>,
    /// Request level: the current process's staging area (a new one per
    /// process), from which its answers' staged bytes are read.
    pub staging: Mutex<Option<Arc<super::staging::Staging>>>,
    /// Which process may use the service: a channel opened for an earlier
    /// process of the device (one that failed or died) is refused.
    generation: AtomicU64,
}

impl DeviceAccess {
    pub fn new(name: &str, request_level: bool) -> Arc<Self> {
        Arc::new(DeviceAccess { name: name.into(), request_level, ..Default::default() })
    }

    /// From now on every request from this device is refused.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    /// A new process serves the device: only channels opened from now on
    /// are served, once that process says hello, and the revocation of the
    /// old one is lifted.
    pub fn new_generation(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.revoked.store(false, Ordering::SeqCst);
    }

    /// Whether `generation` is the current process's.
    pub fn is_generation(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == generation
    }

    /// A channel of `generation` said hello.
    fn greet(&self, generation: u64) {
        // Never back: a late hello from an earlier process must not undo its successor's.
        self.greeted.fetch_max(generation + 1, Ordering::SeqCst);
    }

    /// Whether a process of `generation` said hello.
    fn greeted(&self, generation: u64) -> bool {
        self.greeted.load(Ordering::SeqCst) == generation + 1
    }

    #[cfg(test)]
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }
}

/// Requests of one device served per turn of the service thread.
const TURN: usize = 4;

#[derive(Clone)]
struct MemoryServer {
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    access: Arc<DeviceAccess>,
    health: Arc<DeviceHealth>,
    /// The access generation this channel was opened in.
    generation: u64,
}

impl MemoryServer {
    /// Completes requests the device held past their batch, on the engine
    /// of its queues.
    fn complete_held(&self, answer: Answer) -> Result<(), MemoryError> {
        self.admit(true)?;
        let engine = super::super::lock(&self.access.engine).as_ref().and_then(std::sync::Weak::upgrade);
        // No active queues: the driver reset the device, and took the grants back.
        let Some(engine) = engine else { return Ok(()) };
        let started = std::time::Instant::now();
        let result = engine.complete_held(answer, self.generation);
        self.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result.map_err(|_| MemoryError::Revoked)
    }

    /// Opened for an earlier process of the device.
    fn stale(&self) -> bool {
        !self.access.is_generation(self.generation)
    }

    /// Admits a call by address (`by_grant` false) or by grant.
    fn admit(&self, by_grant: bool) -> Result<(), MemoryError> {
        self.access.rpcs.fetch_add(1, Ordering::Relaxed);
        if self.stale() || self.access.revoked.load(Ordering::SeqCst) {
            return Err(MemoryError::Revoked);
        }
        if !self.access.greeted(self.generation) {
            return Err(MemoryError::NoHello);
        }
        if by_grant != self.access.request_level {
            return Err(if by_grant { MemoryError::UnknownGrant(0) } else { MemoryError::AddressAccess });
        }
        Ok(())
    }

    /// The guest ranges behind `pieces` (grant, buffer, offset, len), each
    /// checked against its grant and direction.
    fn resolve(
        &self,
        pieces: impl ExactSizeIterator<Item = (u64, u16, u32, u64)>,
        writable: bool,
    ) -> Result<Vec<(u64, u64)>, MemoryError> {
        if pieces.len() > MAX_SEGMENTS {
            return Err(MemoryError::TooManySegments { count: pieces.len(), max: MAX_SEGMENTS });
        }
        let grants = super::super::lock(&self.access.grants);
        pieces
            .map(|(grant, buffer, offset, len)| {
                Ok((grants.get(grant)?.resolve(grant, buffer, offset, len, writable)?, len))
            })
            .collect()
    }

    fn account<T>(&self, result: Result<T, MemoryError>, bytes: u64) -> Result<T, MemoryError> {
        match &result {
            Ok(_) => {
                self.access.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) if self.access.request_level && e.is_violation() => {
                self.access.refused.fetch_add(1, Ordering::Relaxed);
                self.health.fail(&self.access.name, format!("it broke the grant protocol: {e}"));
            }
            Err(e) => {
                if self.access.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!("{}: refused a memory request: {e}", self.access.name);
                } else {
                    debug!("{}: refused a memory request: {e}", self.access.name);
                }
            }
        }
        result
    }
}

impl GuestMemory for MemoryServer {
    async fn hello(self, _: tarpc::context::Context, version: u32, device: String) -> Result<(), MemoryError> {
        if version != PROTOCOL_VERSION {
            return self.account(Err(MemoryError::VersionMismatch { device: version, vmm: PROTOCOL_VERSION }), 0);
        }
        // An earlier process's hello must not open the door for its successor's channel.
        if self.stale() {
            return self.account(Err(MemoryError::Revoked), 0);
        }
        debug!("{}: memory channel open (device calls itself {device:?})", self.access.name);
        self.access.greet(self.generation);
        Ok(())
    }

    async fn read(self, _: tarpc::context::Context, segments: Vec<Segment>) -> Result<Vec<ByteBuf>, MemoryError> {
        let started = std::time::Instant::now();
        let result = self.admit(false).and_then(|_| guest_access::read(&self.memory.memory(), &segments));
        self.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let bytes = segments.iter().map(|s| s.len as u64).sum();
        self.account(result, bytes)
    }

    async fn write(self, _: tarpc::context::Context, segments: Vec<WriteSegment>) -> Result<(), MemoryError> {
        let started = std::time::Instant::now();
        let result = self.admit(false).and_then(|_| guest_access::write(&self.memory.memory(), &segments));
        self.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let bytes = segments.iter().map(|s| s.data.len() as u64).sum();
        self.account(result, bytes)
    }

    async fn read_granted(
        self,
        _: tarpc::context::Context,
        ranges: Vec<GrantRange>,
    ) -> Result<Vec<ByteBuf>, MemoryError> {
        let started = std::time::Instant::now();
        let pieces = ranges.iter().map(|r| (r.grant, r.buffer, r.offset, r.len as u64));
        let result = self.admit(true).and_then(|_| self.resolve(pieces, false)).and_then(|ranges| {
            let segments: Vec<Segment> = ranges.iter().map(|&(addr, len)| Segment { addr, len: len as u32 }).collect();
            guest_access::read(&self.memory.memory(), &segments)
        });
        self.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let bytes = ranges.iter().map(|r| r.len as u64).sum();
        self.account(result, bytes)
    }

    async fn write_granted(self, _: tarpc::context::Context, writes: Vec<GrantWrite>) -> Result<(), MemoryError> {
        let started = std::time::Instant::now();
        let pieces = writes.iter().map(|w| (w.grant, w.write.buffer, w.write.offset, w.write.data.len() as u64));
        let result = self.admit(true).and_then(|_| self.resolve(pieces, true)).and_then(|ranges| {
            let segments: Vec<WriteSegment> = ranges
                .iter()
                .zip(writes.iter())
                .map(|(&(addr, _), w)| WriteSegment { addr, data: w.write.data.clone() })
                .collect();
            guest_access::write(&self.memory.memory(), &segments)
        });
        self.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let bytes = writes.iter().map(|w| w.write.data.len() as u64).sum();
        self.account(result, bytes)
    }

    async fn complete(self, _: tarpc::context::Context, answer: Answer) -> Result<(), MemoryError> {
        self.complete_held(answer)
    }
}

/// Serves one device's memory channel on the VMM's RPC runtime until it closes.
pub fn serve(
    runtime: &tokio::runtime::Handle,
    socket: std::os::unix::net::UnixStream,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    health: Arc<DeviceHealth>,
) -> std::io::Result<()> {
    let access = health.access().ok_or_else(|| std::io::Error::other("the device has no memory access record"))?;
    let _context = runtime.enter();
    let channel = rpc_schema::server_channel(socket)?;
    let generation = access.generation.load(Ordering::SeqCst);
    let server = MemoryServer { memory, access: access.clone(), health, generation };
    runtime.spawn(async move {
        channel
            .execute(server.serve())
            .for_each_concurrent(TURN, |response| async move {
                response.await;
                // Let every other channel have its turn: one device's flood
                // must not queue another device's requests behind all of it.
                tokio::task::yield_now().await;
            })
            .await;
        debug!("{}: memory channel closed", access.name);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::super::lock;
    use super::*;
    use rpc_schema::GuestMemoryClient;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn hello_first_then_checked_access_then_revocation() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (vmm_end, device_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let access = DeviceAccess::new("test", false);
        let health = DeviceHealth::new(Some(access.clone()));
        serve(runtime.handle(), vmm_end, GuestMemoryAtomic::new(memory), health).unwrap();
        runtime.block_on(async {
            let client = GuestMemoryClient::new(Default::default(), rpc_schema::transport(device_end).unwrap()).spawn();
            let ctx = tarpc::context::current;
            let read = |addr, len| client.read(ctx(), vec![Segment { addr, len }]);
            assert_eq!(read(0, 4).await.unwrap(), Err(MemoryError::NoHello));
            assert!(matches!(
                client.hello(ctx(), PROTOCOL_VERSION + 1, "x".into()).await.unwrap(),
                Err(MemoryError::VersionMismatch { .. })
            ));
            client.hello(ctx(), PROTOCOL_VERSION, "x".into()).await.unwrap().unwrap();
            let data = ByteBuf::from(vec![7u8; 4]);
            client.write(ctx(), vec![WriteSegment { addr: 0x100, data }]).await.unwrap().unwrap();
            assert_eq!(read(0x100, 4).await.unwrap().unwrap()[0].as_slice(), &[7, 7, 7, 7]);
            assert!(matches!(read(0x10000, 1).await.unwrap(), Err(MemoryError::OutOfRange { .. })));
            access.revoke();
            assert_eq!(read(0x100, 4).await.unwrap(), Err(MemoryError::Revoked));
        });
        assert_eq!(access.refused.load(Ordering::Relaxed), 4);
    }

    /// A restarted device's memory channel from its earlier process is
    /// refused for good, whatever it calls (a held completion too, and a
    /// hello first); the new process's channel is served once it says hello.
    #[test]
    fn a_channel_opened_by_an_earlier_process_is_refused_after_a_restart() {
        use super::super::grants::{Grant, GrantedBuffer};
        use rpc_schema::GrantRange;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let access = DeviceAccess::new("test", true);
        let health = DeviceHealth::new(Some(access.clone()));
        let buffer = GrantedBuffer { addr: 0x100, len: 16, writable: false };
        let (id, _) = lock(&access.grants).issue(Grant { queue: 0, head: 0, buffers: vec![buffer] });
        let channel = || {
            let (vmm_end, device_end) = std::os::unix::net::UnixStream::pair().unwrap();
            serve(runtime.handle(), vmm_end, memory.clone(), health.clone()).unwrap();
            let _context = runtime.enter();
            GuestMemoryClient::new(Default::default(), rpc_schema::transport(device_end).unwrap()).spawn()
        };
        let ctx = tarpc::context::current;
        let read = |client: &GuestMemoryClient| {
            let client = client.clone();
            async move { client.read_granted(ctx(), vec![GrantRange { grant: id, buffer: 0, offset: 0, len: 16 }]).await }
        };
        let hello = |client: &GuestMemoryClient| {
            let client = client.clone();
            async move { client.hello(ctx(), PROTOCOL_VERSION, "x".into()).await }
        };
        let empty = || Answer { completions: Vec::new(), staged: Vec::new(), slot: None };
        let old = channel();
        runtime.block_on(async {
            hello(&old).await.unwrap().unwrap();
            assert_eq!(read(&old).await.unwrap().unwrap()[0].len(), 16);
        });
        // The process died; its successor is about to start.
        health.new_generation();
        let new = channel();
        runtime.block_on(async {
            assert_eq!(read(&old).await.unwrap(), Err(MemoryError::Revoked));
            assert_eq!(old.complete(ctx(), empty()).await.unwrap(), Err(MemoryError::Revoked));
            assert_eq!(hello(&old).await.unwrap(), Err(MemoryError::Revoked));
            assert_eq!(read(&new).await.unwrap(), Err(MemoryError::NoHello), "served before its hello");
            hello(&new).await.unwrap().unwrap();
            assert_eq!(read(&new).await.unwrap().unwrap()[0].len(), 16);
            assert_eq!(read(&old).await.unwrap(), Err(MemoryError::Revoked));
        });
        assert!(!health.failed.load(Ordering::SeqCst), "a stale channel is no fault of the device");
    }

    /// A hello counts for its own process only, whenever it lands: one from
    /// an earlier process that passed its check just before a restart
    /// neither greets the new process nor undoes the new process's hello.
    #[test]
    fn a_late_hello_from_an_earlier_process_greets_no_other() {
        let access = DeviceAccess::new("test", true);
        access.greet(0);
        assert!(access.greeted(0));
        access.new_generation();
        assert!(!access.greeted(1), "the new process is served before its hello");
        access.greet(0);
        assert!(!access.greeted(1), "an earlier process's hello greeted the new one");
        access.greet(1);
        access.greet(0);
        assert!(access.greeted(1), "a late hello undid the new process's");
        assert!(!access.greeted(0));
    }

    /// Request level: only outstanding grants reach memory, only their way
    /// and within their buffers; a violation fails the device; a grant whose
    /// buffer has left the RAM map (an unplug) is refused without blame.
    #[test]
    fn grants_bound_what_a_request_level_device_reaches() {
        use super::super::grants::{Grant, GrantedBuffer};
        use rpc_schema::{BufferWrite, GrantRange, GrantWrite};
        let map =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)]).unwrap();
        let memory = GuestMemoryAtomic::new(map.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (vmm_end, device_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let access = DeviceAccess::new("test", true);
        let health = DeviceHealth::new(Some(access.clone()));
        serve(runtime.handle(), vmm_end, memory.clone(), health.clone()).unwrap();
        let readable = GrantedBuffer { addr: 0x100, len: 16, writable: false };
        let writable = GrantedBuffer { addr: 0x20000, len: 8, writable: true };
        let (id, _) = lock(&access.grants).issue(Grant { queue: 0, head: 0, buffers: vec![readable, writable] });
        runtime.block_on(async {
            let client = GuestMemoryClient::new(Default::default(), rpc_schema::transport(device_end).unwrap()).spawn();
            let ctx = tarpc::context::current;
            client.hello(ctx(), PROTOCOL_VERSION, "x".into()).await.unwrap().unwrap();
            let range = |buffer, offset, len| vec![GrantRange { grant: id, buffer, offset, len }];
            let put = |buffer, offset| {
                vec![GrantWrite { grant: id, write: BufferWrite { buffer, offset, data: ByteBuf::from(vec![9u8; 4]) } }]
            };
            assert_eq!(client.read_granted(ctx(), range(0, 4, 12)).await.unwrap().unwrap()[0].len(), 12);
            client.write_granted(ctx(), put(1, 4)).await.unwrap().unwrap();
            assert_eq!(map.read_obj::<u32>(GuestAddress(0x20004)).unwrap(), 0x0909_0909);

            // The writable buffer's region leaves the map: refused, the device stays healthy.
            let (smaller, _) = map.remove_region(GuestAddress(0x20000), 0x10000).unwrap();
            memory.lock().unwrap().replace(smaller);
            assert!(matches!(
                client.write_granted(ctx(), put(1, 0)).await.unwrap(),
                Err(MemoryError::OutOfRange { .. })
            ));
            assert!(!health.failed.load(Ordering::SeqCst));

            // Past the buffer: refused, and the device is failed for it.
            assert!(matches!(
                client.read_granted(ctx(), range(0, 12, 8)).await.unwrap(),
                Err(MemoryError::OutsideBuffer { .. })
            ));
            assert!(health.failed.load(Ordering::SeqCst));
            assert_eq!(client.read_granted(ctx(), range(0, 0, 1)).await.unwrap(), Err(MemoryError::Revoked));
        });
    }
}
