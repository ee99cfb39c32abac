//! The VMM's hotplug service: the one privileged request a device can make.
//! Only the virtio-mem device has a channel to it. Every request is checked
//! by [`HotplugRegion`] against the VMM's own record of the region; the
//! device's view of which blocks are plugged is never trusted.
use super::HotplugRegion;
use futures::StreamExt;
use rpc_schema::{BlockState, HotplugError, MemoryHotplug, PROTOCOL_VERSION};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tarpc::server::Channel;
use tracing::debug;

#[derive(Clone)]
struct HotplugServer {
    region: Arc<HotplugRegion>,
    greeted: Arc<AtomicBool>,
    /// One call works at a time. The permit goes with the work, not with
    /// the request: a call whose deadline passes (or that the device
    /// cancels) stops waiting, but work already started keeps its permit
    /// until it ends, so a device cannot pile up workers.
    worker: Arc<tokio::sync::Semaphore>,
}

impl HotplugServer {
    /// Runs `op` off the RPC thread: plugging waits on KVM and, in shared
    /// mode, on device rebuilds, while memory requests keep being served.
    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&HotplugRegion) -> Result<T, HotplugError> + Send + 'static,
    ) -> Result<T, HotplugError> {
        if !self.greeted.load(Ordering::SeqCst) {
            return Err(HotplugError::NoSession("the first call must be hello".into()));
        }
        let permit = self.worker.clone().acquire_owned().await;
        let permit = permit.map_err(|e| HotplugError::Refused(format!("hotplug worker gone: {e}")))?;
        let region = self.region.clone();
        tokio::task::spawn_blocking(move || {
            let done = op(&region);
            drop(permit);
            done
        })
        .await
        .unwrap_or_else(|e| Err(HotplugError::Refused(format!("hotplug worker failed: {e}"))))
    }
}

impl MemoryHotplug for HotplugServer {
    async fn hello(self, _: tarpc::context::Context, version: u32) -> Result<(), HotplugError> {
        if version != PROTOCOL_VERSION {
            return Err(HotplugError::NoSession(format!("protocol version {version} is not {PROTOCOL_VERSION}")));
        }
        self.greeted.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn plug(self, _: tarpc::context::Context, addr: u64, blocks: u16) -> Result<(), HotplugError> {
        self.run(move |r| r.plug(addr, blocks)).await
    }

    async fn unplug(self, _: tarpc::context::Context, addr: u64, blocks: u16) -> Result<(), HotplugError> {
        self.run(move |r| r.unplug(addr, blocks)).await
    }

    async fn unplug_all(self, _: tarpc::context::Context) -> Result<(), HotplugError> {
        self.run(|r| r.unplug_all()).await
    }

    async fn state(self, _: tarpc::context::Context, addr: u64, blocks: u16) -> Result<BlockState, HotplugError> {
        self.run(move |r| r.state_of(addr, blocks)).await
    }
}

/// Serves the virtio-mem device's hotplug channel on the VMM's RPC runtime.
pub fn serve(
    runtime: &tokio::runtime::Handle,
    socket: std::os::unix::net::UnixStream,
    region: Arc<HotplugRegion>,
) -> std::io::Result<()> {
    let _context = runtime.enter();
    let channel = rpc_schema::server_channel(socket)?;
    let server = HotplugServer { region, greeted: Arc::default(), worker: Arc::new(tokio::sync::Semaphore::new(1)) };
    runtime.spawn(async move {
        channel
            .execute(server.serve())
            .for_each(|response| async move {
                tokio::spawn(response);
            })
            .await;
        debug!("hotplug channel closed");
    });
    Ok(())
}
