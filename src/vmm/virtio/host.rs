//! The VMM's end of one device: its control client, its health, and the
//! process or thread that runs it.
use super::super::lock;
use super::memory_service::DeviceAccess;
use rpc_schema::{DeviceControlClient, DeviceInfo, QueueConfig, PROTOCOL_VERSION};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;
use vmm_sys_util::eventfd::EventFd;

/// How long the VMM waits for a device to answer a control request.
const CONTROL_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct DeviceHealth {
    pub failed: AtomicBool,
    pub reason: Mutex<Option<String>>,
    /// The VMM is shutting the device down: its end is not a failure.
    stopping: AtomicBool,
    /// The device's process or thread has finished.
    ended: AtomicBool,
    /// The device's memory access, revoked when it fails.
    access: Option<Arc<DeviceAccess>>,
}

impl DeviceHealth {
    pub fn new(access: Option<Arc<DeviceAccess>>) -> Arc<Self> {
        Arc::new(DeviceHealth { access, ..Default::default() })
    }

    /// Marks the device failed (once), revokes its memory access and logs
    /// why; the guest keeps running.
    pub fn fail(&self, name: &str, reason: String) {
        if let Some(access) = &self.access {
            access.revoke();
        }
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        if !self.failed.swap(true, Ordering::SeqCst) {
            warn!("device {name} failed: {reason}; it now reports DEVICE_NEEDS_RESET");
            *lock(&self.reason) = Some(reason);
        }
    }
}

impl DeviceHealth {
    /// Called by whatever watched the device, once it has finished.
    pub fn mark_ended(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }
}

pub struct DeviceHost {
    pub name: String,
    pub pid: Option<u32>,
    pub health: Arc<DeviceHealth>,
    pub access: Option<Arc<DeviceAccess>>,
    control: Mutex<Option<DeviceControlClient>>,
    runtime: tokio::runtime::Handle,
    notify: EventFd,
}

impl DeviceHost {
    /// Connects to a device's control socket and says hello.
    pub fn connect(
        name: String,
        runtime: &tokio::runtime::Handle,
        control: std::os::unix::net::UnixStream,
        notify: EventFd,
    ) -> Result<(Self, DeviceInfo), String> {
        let client = {
            let _context = runtime.enter();
            DeviceControlClient::new(Default::default(), rpc_schema::transport(control).map_err(|e| e.to_string())?)
                .spawn()
        };
        let host = DeviceHost {
            name,
            pid: None,
            health: DeviceHealth::new(None),
            access: None,
            control: Mutex::new(Some(client)),
            runtime: runtime.clone(),
            notify,
        };
        let info = host.call(|c, ctx| async move { c.hello(ctx, PROTOCOL_VERSION).await })?;
        Ok((host, info))
    }

    fn call<T, F, Fut>(&self, request: F) -> Result<T, String>
    where
        F: FnOnce(DeviceControlClient, tarpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, rpc_schema::DeviceError>, tarpc::client::RpcError>>,
    {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + CONTROL_DEADLINE;
        let client = lock(&self.control).clone();
        let client = client.ok_or_else(|| "the device is shut down".to_string())?;
        let reply = self.runtime.block_on(request(client, ctx));
        match reply {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(refused)) => Err(refused.to_string()),
            Err(e) => {
                let reason = format!("control channel: {e}");
                // A dead process is the likely cause: give its watcher a moment
                // to record why before settling for the channel error.
                let deadline = Instant::now() + Duration::from_millis(200);
                while self.pid.is_some() && !self.health.failed.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                self.health.fail(&self.name, reason.clone());
                Err(reason)
            }
        }
    }

    pub fn activate(&self, features: u64, queues: Vec<QueueConfig>) -> Result<(), String> {
        if self.health.failed.load(Ordering::SeqCst) {
            return Err("the device has failed".into());
        }
        self.call(|c, ctx| async move { c.activate(ctx, features, queues).await })
    }

    pub fn reset(&self) -> Result<(), String> {
        if self.health.failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.call(|c, ctx| async move { c.reset(ctx).await })
    }

    /// Starts an orderly stop: closing the control channel makes the device
    /// return, and its process exit or thread end, releasing its backend.
    pub fn begin_stop(&self) {
        self.health.stopping.store(true, Ordering::SeqCst);
        lock(&self.control).take();
    }

    pub fn has_ended(&self) -> bool {
        self.health.ended.load(Ordering::SeqCst)
    }

    /// A queue notify that reached the VMM (not its ioeventfd): pass it on.
    pub fn notify_fallback(&self) {
        let _ = self.notify.write(1);
    }
}
