//! Bringing a crashed `rpc`-mode device back without the guest noticing.
//! When a device process dies (a crash, a signal, its seccomp filter, a
//! broken channel), its watcher asks the supervisor for a new one: a fresh
//! process over the same backend, greeted and activated with the features
//! the driver negotiated; the request engine then posts every outstanding
//! grant to it again. The queue itself never left the VMM, so the guest
//! sees nothing but a slower request or two.
//!
//! Restarts run one at a time on the supervisor's own thread, not on the
//! watcher that saw the death (which ends with its process); the process
//! itself is started, like every device process, on the spawner thread
//! (`spawn.rs`).
use super::super::lock;
use super::host::{bounded, control_client, DeviceHealth, Lifeline};
use super::{Error, Result, Starter};
use rpc_schema::PROTOCOL_VERSION;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How long a new process may take to greet and accept activation.
const START_DEADLINE: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// The VM's one supervisor thread.
pub struct Supervisor {
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
}

impl Supervisor {
    pub fn start() -> Result<Arc<Self>> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || queue.into_iter().for_each(|job| job()))
            .map_err(|e| Error::Host("starting the device supervisor".into(), e))?;
        Ok(Arc::new(Supervisor { jobs: std::sync::Mutex::new(jobs) }))
    }

    /// From now on, a death of this device's process starts a new one.
    pub fn watch(self: &Arc<Self>, device: Restartable) {
        let device = Arc::new(device);
        let supervisor = self.clone();
        let health = device.health.clone();
        health.supervise(Box::new(move |reason, since| {
            let device = device.clone();
            let _ = lock(&supervisor.jobs).send(Box::new(move || device.restart(reason, since)));
        }));
    }
}

/// One `rpc`-mode device, as its supervisor restarts it.
pub struct Restartable {
    pub name: String,
    pub start: Starter,
    pub runtime: tokio::runtime::Handle,
    pub health: Arc<DeviceHealth>,
    pub lifeline: Arc<Lifeline>,
}

impl Restartable {
    fn restart(&self, reason: String, since: Instant) {
        let mut started = None;
        match self.try_restart(since, &mut started) {
            Ok(()) => {}
            // The new process went down too before it took over: its own
            // death starts the next attempt (and counts towards a crash loop).
            Err(Retry::Later(e)) => {
                tracing::debug!("device {}: the new process could not take over: {e}", self.name);
                if let Some(pid) = started {
                    self.health.kill_process(pid);
                }
            }
            Err(Retry::Never(e)) => self.health.fail(&self.name, format!("{reason}; restarting it failed: {e}")),
        }
    }

    /// `started`: the new process, once there is one.
    fn try_restart(&self, since: Instant, started: &mut Option<u32>) -> std::result::Result<(), Retry> {
        // One replacement at a time: a driver's reset waits for this one.
        let _starting = self.health.starting();
        // A device that failed meanwhile waits for the driver's reset instead.
        if !self.health.begin_restart() {
            return Ok(());
        }
        let engine = lock(&self.lifeline.engine).clone();
        if let Some(engine) = &engine {
            engine.disconnect(since);
        }
        let control = (self.start)().map_err(Retry::Never)?;
        *started = self.health.pid();
        let client = control_client(&self.runtime, control).map_err(Retry::Later)?;
        let hello = self.runtime.block_on(bounded(START_DEADLINE, |ctx| client.hello(ctx, PROTOCOL_VERSION)));
        hello.map_err(|e| Retry::Later(format!("hello: {e}")))?.map_err(|e| Retry::Never(format!("hello: {e}")))?;
        if let Some(engine) = &engine {
            let features = self.lifeline.features.load(Ordering::SeqCst);
            let sizes = engine.queue_sizes();
            let active = self.runtime.block_on(bounded(START_DEADLINE, |ctx| client.activate(ctx, features, sizes)));
            active
                .map_err(|e| Retry::Later(format!("activate: {e}")))?
                .map_err(|e| Retry::Never(format!("activate: {e}")))?;
        }
        let took_over = self.health.finish_restart(*started, || *lock(&self.lifeline.control) = Some(client.clone()));
        if !took_over {
            // Failed, or replaced at the driver's reset, while it started.
            return Ok(());
        }
        if let Some(engine) = engine {
            let _context = self.runtime.enter();
            engine.reconnect(client).map_err(Retry::Never)?;
        }
        Ok(())
    }
}

/// Why a restart did not take.
enum Retry {
    /// The new process's channel broke (it died too): its death retries.
    Later(String),
    /// It cannot work: starting failed, or the new process refused.
    Never(String),
}
