//! The VMM's guest-memory service: the only door from a device process to
//! guest memory. Each device has its own channel and [`DeviceAccess`]; every
//! request is checked by `guest_access` against the current RAM map.
use crate::guest_access;
use futures::StreamExt;
use rpc_schema::{GuestMemory, MemoryError, Segment, WriteSegment, PROTOCOL_VERSION};
use serde_bytes::ByteBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tarpc::server::Channel;
use tracing::{debug, warn};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// One device's standing with the memory service, and its counters.
#[derive(Debug, Default)]
pub struct DeviceAccess {
    pub name: String,
    greeted: AtomicBool,
    revoked: AtomicBool,
    pub rpcs: AtomicU64,
    pub bytes: AtomicU64,
    pub refused: AtomicU64,
    /// Time spent checking and copying this device's requests.
    pub service_ns: AtomicU64,
}

impl DeviceAccess {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(DeviceAccess { name: name.into(), ..Default::default() })
    }

    /// From now on every request from this device is refused.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct MemoryServer {
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    access: Arc<DeviceAccess>,
}

impl MemoryServer {
    fn admit(&self) -> Result<(), MemoryError> {
        self.access.rpcs.fetch_add(1, Ordering::Relaxed);
        if self.access.revoked.load(Ordering::SeqCst) {
            return Err(MemoryError::Revoked);
        }
        if !self.access.greeted.load(Ordering::SeqCst) {
            return Err(MemoryError::NoHello);
        }
        Ok(())
    }

    fn account<T>(&self, result: Result<T, MemoryError>, bytes: u64) -> Result<T, MemoryError> {
        match &result {
            Ok(_) => {
                self.access.bytes.fetch_add(bytes, Ordering::Relaxed);
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
        debug!("{}: memory channel open (device calls itself {device:?})", self.access.name);
        self.access.greeted.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn read(self, _: tarpc::context::Context, segments: Vec<Segment>) -> Result<Vec<ByteBuf>, MemoryError> {
        let started = std::time::Instant::now();
        let result = self.admit().and_then(|_| guest_access::read(&self.memory.memory(), &segments));
        self.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let bytes = segments.iter().map(|s| s.len as u64).sum();
        self.account(result, bytes)
    }

    async fn write(self, _: tarpc::context::Context, segments: Vec<WriteSegment>) -> Result<(), MemoryError> {
        let started = std::time::Instant::now();
        let result = self.admit().and_then(|_| guest_access::write(&self.memory.memory(), &segments));
        self.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let bytes = segments.iter().map(|s| s.data.len() as u64).sum();
        self.account(result, bytes)
    }
}

/// Serves one device's memory channel on the VMM's RPC runtime until it closes.
pub fn serve(
    runtime: &tokio::runtime::Handle,
    socket: std::os::unix::net::UnixStream,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    access: Arc<DeviceAccess>,
) -> std::io::Result<()> {
    let _context = runtime.enter();
    let channel = rpc_schema::server_channel(socket)?;
    let server = MemoryServer { memory, access: access.clone() };
    runtime.spawn(async move {
        channel
            .execute(server.serve())
            .for_each(|response| async move {
                tokio::spawn(response);
            })
            .await;
        debug!("{}: memory channel closed", access.name);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_schema::GuestMemoryClient;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn hello_first_then_checked_access_then_revocation() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (vmm_end, device_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let access = DeviceAccess::new("test");
        serve(runtime.handle(), vmm_end, GuestMemoryAtomic::new(memory), access.clone()).unwrap();
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
}
