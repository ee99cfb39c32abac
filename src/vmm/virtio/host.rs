//! The VMM's end of one device: its control client, its health, and the
//! process or thread that runs it.
use super::super::lock;
use super::device_text;
use super::memory_service::DeviceAccess;
use super::requests::{Engine, QueueContext, RequestQueue};
use super::spawn::{ProcessMemory, ProcessRecipe};
use crate::devices::process::SharedRegion;
use crate::vmm::throttle::{held_back, Throttle};
use rpc_schema::{DeviceControlClient, DeviceInfo, QueueConfig, PROTOCOL_VERSION};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarpc::client::RpcError;
use tracing::warn;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How long the VMM waits for a device to answer a control request.
const CONTROL_DEADLINE: Duration = Duration::from_secs(10);
/// How long a status report waits for a device's counters.
const COUNTERS_DEADLINE: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct DeviceHealth {
    pub failed: AtomicBool,
    pub reason: Mutex<Option<String>>,
    /// The VMM is shutting the device down: its end is not a failure.
    stopping: AtomicBool,
    /// The device's process or thread has finished.
    ended: AtomicBool,
    /// The device's memory access, revoked when it fails.
    access: Option<Arc<DeviceAccess>>,
    /// The process that runs the device now (shared-mode rebuilds replace it).
    current_pid: AtomicU32,
    /// Every process of this device not yet reaped, by PID and pidfd: a
    /// failed device is killed, so none keeps serving with an old memory map.
    processes: Mutex<Vec<(u32, OwnedFd)>>,
    /// Held while deciding which process is current and whether the device
    /// has failed: a failure, a death report, the driver's reset and a
    /// supervisor's restart each act on the device as the last one left it,
    /// never on a process that came after the one they are about.
    succession: Mutex<()>,
    /// Held by whoever starts a replacement process (the driver's reset, a
    /// supervisor's restart) until it has taken over or given up: two
    /// replacements never start at once and both name themselves current.
    starting: Mutex<()>,
    /// rpc mode: starts a new process when the current one dies (the
    /// device's supervisor); without it a death fails the device.
    restarter: std::sync::OnceLock<Box<dyn Fn(String, Instant) + Send + Sync>>,
    /// Times the device was brought back, and why it went down last.
    pub restarts: AtomicU32,
    pub last_failure: Mutex<Option<String>>,
    /// Restarts since the device last completed a batch: a crash loop.
    consecutive: AtomicU32,
    /// From a death seen to the first batch the new process completed.
    pub recovery_ns: Mutex<Vec<u64>>,
    log_limit: Throttle,
}

impl std::fmt::Debug for DeviceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHealth").field("failed", &self.failed).field("reason", &self.reason).finish()
    }
}

/// Restarts in a row, with no batch completed in between, after which a
/// device stays failed: it crashes as soon as it starts or serves.
pub const MAX_CONSECUTIVE_RESTARTS: u32 = 5;

impl DeviceHealth {
    pub fn new(access: Option<Arc<DeviceAccess>>) -> Arc<Self> {
        Arc::new(DeviceHealth { access, ..Default::default() })
    }

    /// Marks the device failed (once), revokes its memory access and logs
    /// why; the guest keeps running.
    pub fn fail(&self, name: &str, reason: String) {
        let _turn = lock(&self.succession);
        self.fail_now(name, reason);
    }

    /// [`Self::fail`], the succession lock held.
    fn fail_now(&self, name: &str, reason: String) {
        // A reason may carry a device's own text (a refusal's): it reaches
        // the log and the API only escaped and bounded, as the rest does.
        let reason = device_text::printable(&reason, MAX_FAILURE_TEXT);
        if let Some(access) = &self.access {
            access.revoke();
        }
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        // Kill, and record why, before the failure shows: the driver may see
        // DEVICE_NEEDS_RESET and reset at once, and the process that reset
        // starts must neither be killed by this call nor lose this reason.
        self.kill("the device failed");
        let first = {
            let mut why = lock(&self.reason);
            let first = !self.failed.load(Ordering::SeqCst);
            if first {
                *why = Some(reason.clone());
                self.failed.store(true, Ordering::SeqCst);
            }
            first
        };
        // A guest can fail a device, reset it and fail it again at will.
        if let Some(skipped) = first.then(|| self.log_limit.allow()).flatten() {
            warn!("device {name} failed: {reason}; it now reports DEVICE_NEEDS_RESET{}", held_back(skipped));
        }
    }

    /// The device's memory access record (rpc modes).
    pub fn access(&self) -> Option<Arc<DeviceAccess>> {
        self.access.clone()
    }

    /// A process now runs this device; `pidfd` lets the VMM kill it safely.
    pub fn add_process(&self, pid: u32, pidfd: OwnedFd) {
        lock(&self.processes).push((pid, pidfd));
    }

    /// Its watcher has reaped process `pid`.
    pub fn process_reaped(&self, pid: u32) {
        lock(&self.processes).retain(|(p, _)| *p != pid);
    }
}

impl DeviceHealth {
    /// Called by whatever watched the device, once it has finished.
    pub fn mark_ended(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    pub fn set_current_process(&self, pid: u32) {
        self.current_pid.store(pid, Ordering::SeqCst);
    }

    /// The process running the device now, if any.
    pub fn pid(&self) -> Option<u32> {
        Some(self.current_pid.load(Ordering::SeqCst)).filter(|&pid| pid != 0)
    }

    /// A device process ended: restarted by its supervisor if it has one,
    /// a failure otherwise; nothing if a rebuild or restart had retired it.
    pub fn process_ended(&self, name: &str, pid: u32, reason: String) {
        tracing::debug!("device {name}: {reason}");
        let _turn = lock(&self.succession);
        if self.current_pid.load(Ordering::SeqCst) != pid {
            tracing::debug!("device {name}: that was a retired process");
            return;
        }
        let down = self.stopping.load(Ordering::SeqCst) || self.failed.load(Ordering::SeqCst);
        match self.restarter.get() {
            Some(restart) if !down => {
                let since = Instant::now();
                *lock(&self.last_failure) = Some(reason.clone());
                if self.consecutive.fetch_add(1, Ordering::SeqCst) + 1 >= MAX_CONSECUTIVE_RESTARTS {
                    let limit = MAX_CONSECUTIVE_RESTARTS;
                    self.fail_now(
                        name,
                        format!("{reason}; it died {limit} times in a row without serving, so it stays down"),
                    );
                    self.mark_ended();
                } else {
                    if let Some(skipped) = self.log_limit.allow() {
                        warn!("device {name}: {reason}; restarting it{}", held_back(skipped));
                    }
                    restart(reason, since);
                }
            }
            _ => {
                self.fail_now(name, reason);
                self.mark_ended();
            }
        }
    }

    /// Makes process deaths restart the device through `restart`.
    pub fn supervise(&self, restart: Box<dyn Fn(String, Instant) + Send + Sync>) {
        let _ = self.restarter.set(restart);
    }

    pub fn supervised(&self) -> bool {
        self.restarter.get().is_some()
    }

    /// A new process or thread is about to serve the device: requests from
    /// its predecessors' memory channels are refused from now on.
    pub fn new_generation(&self) {
        if let Some(access) = &self.access {
            access.new_generation();
        }
    }

    /// The right to start a replacement process, until the guard drops.
    pub fn starting(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.starting)
    }

    /// The driver's reset replaces a failed device: its processes are killed
    /// and none is current any more, so a death reported late changes
    /// nothing, and their memory channels are refused from now on.
    pub fn retire_all(&self) {
        let _turn = lock(&self.succession);
        self.current_pid.store(0, Ordering::SeqCst);
        self.kill("it is being replaced");
        self.new_generation();
    }

    /// A supervisor's restart may go ahead: the device has not failed (a
    /// failed one waits for the driver's reset). Requests from earlier
    /// processes' memory channels are refused from now on.
    pub fn begin_restart(&self) -> bool {
        let _turn = lock(&self.succession);
        if self.failed.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        self.new_generation();
        true
    }

    /// A supervisor's restart takes over with process `pid` (`commit`
    /// installs it), unless the device failed or another process replaced
    /// it meanwhile: then `pid` is killed and false returned.
    pub fn finish_restart(&self, pid: Option<u32>, commit: impl FnOnce()) -> bool {
        let _turn = lock(&self.succession);
        let superseded = self.failed.load(Ordering::SeqCst) || self.pid() != pid;
        if superseded {
            if let Some(pid) = pid {
                self.kill_process(pid);
            }
            return false;
        }
        commit();
        self.restarts.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// The device comes back after it failed (the driver reset it): a new
    /// process or thread, already started, serves it with a clean record.
    pub fn revive(&self) {
        let _turn = lock(&self.succession);
        let why = lock(&self.reason).take();
        if why.is_some() {
            *lock(&self.last_failure) = why;
        }
        self.consecutive.store(0, Ordering::SeqCst);
        self.ended.store(false, Ordering::SeqCst);
        self.failed.store(false, Ordering::SeqCst);
        self.restarts.fetch_add(1, Ordering::SeqCst);
    }

    /// Kills, through their pidfds, the device's processes `which` picks.
    fn kill_where(&self, which: impl Fn(u32) -> bool) {
        for (_, pidfd) in lock(&self.processes).iter().filter(|(pid, _)| which(*pid)) {
            // SAFETY: sends SIGKILL through a pidfd we own; no memory is passed.
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, 0, 0) };
        }
    }

    /// Kills one of the device's processes.
    pub fn kill_process(&self, pid: u32) {
        self.kill_where(|p| p == pid);
    }

    /// Kills the device's processes (their deaths then take the usual path).
    pub fn kill(&self, why: &str) {
        tracing::debug!("killing a device process: {why}");
        self.kill_where(|_| true);
    }

    /// A restarted device completed its first batch, `took` after its death.
    pub fn recovered(&self, name: &str, took: Duration) {
        self.consecutive.store(0, Ordering::SeqCst);
        let mut kept = lock(&self.recovery_ns);
        // A device that dies after each batch it serves restarts at will:
        // its report keeps the latest recoveries, not one for each.
        if kept.len() >= RECOVERIES_KEPT {
            kept.remove(0);
        }
        kept.push(took.as_nanos() as u64);
        drop(kept);
        tracing::info!("device {name}: serving again {took:?} after it went down");
    }
}

/// What a device's restart replaces, shared by its host (under the
/// transport's lock) and its supervisor (which must not take that lock: a
/// vCPU may hold it while waiting on the dead process).
#[derive(Default)]
pub struct Lifeline {
    pub control: Mutex<Option<DeviceControlClient>>,
    /// rpc mode: the request engine while the driver has the device active.
    pub engine: Mutex<Option<Arc<Engine>>>,
    /// The features the driver negotiated, to activate a new process with.
    pub features: std::sync::atomic::AtomicU64,
}

/// Shared mode: how to start the device's process again over a new memory map.
pub struct Respawn {
    pub recipe: Arc<ProcessRecipe>,
    pub memfd: RawFd,
}

/// How long a rebuild waits for the retired process to go.
const RETIRE_DEADLINE: Duration = Duration::from_secs(2);

fn process_gone(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) != 0 }
}

/// Request level (`rpc`): the VMM walks the device's queue itself.
pub struct Posting {
    pub memory: GuestMemoryAtomic<GuestMemoryMmap>,
    pub max_queue_size: u16,
    pub queue_count: u16,
    /// The active queue, from DRIVER_OK until a reset.
    pub queue: Option<RequestQueue>,
    /// How long the VMM watches the rings after a completion (`--device-poll-us`).
    pub poll: Duration,
    /// The queue whose requests the device holds until input comes (a
    /// network or console device's receive queue).
    pub held_queue: Option<u16>,
    /// A `direct=on` disk (see [`QueueContext::direct_disk`]).
    pub direct_disk: bool,
}

/// Work the VMM does itself when the driver accepts these features.
pub type OnActivate = Box<dyn Fn(u64) -> Result<(), String> + Send>;

pub struct DeviceHost {
    pub name: String,
    pub pid: Option<u32>,
    pub health: Arc<DeviceHealth>,
    pub access: Option<Arc<DeviceAccess>>,
    pub respawn: Option<Respawn>,
    pub posting: Option<Posting>,
    pub lifeline: Arc<Lifeline>,
    /// Starts the device afresh: how a failed device comes back at a reset.
    pub starter: Option<super::Starter>,
    /// What the VMM itself does when the driver accepts features (a network
    /// device's tap learns which offloads the guest takes).
    pub on_activate: Option<OnActivate>,
    runtime: tokio::runtime::Handle,
    notify: EventFd,
    /// The device's interrupt, for config-change interrupts the VMM raises.
    irq: EventFd,
}

/// What a status report reads about a device, shared with its host so
/// that the report never takes the device's transport: a vCPU may hold
/// that for seconds (an activation, or a reset waiting for a restart).
pub struct HostView {
    pub name: String,
    /// Its current process (none for an `inprocess` thread) is `health.pid()`.
    pub health: Arc<DeviceHealth>,
    pub access: Option<Arc<DeviceAccess>>,
    lifeline: Arc<Lifeline>,
    runtime: tokio::runtime::Handle,
}

impl HostView {
    /// A request for the device's counters, to send without holding
    /// anything a vCPU needs. None when the device has failed or is stopping.
    pub fn counters_query(&self) -> Option<CountersQuery> {
        if self.health.failed.load(Ordering::SeqCst) || self.health.stopping.load(Ordering::SeqCst) {
            return None;
        }
        Some(CountersQuery { client: lock(&self.lifeline.control).clone()?, runtime: self.runtime.clone() })
    }
}

pub struct CountersQuery {
    client: DeviceControlClient,
    runtime: tokio::runtime::Handle,
}

impl CountersQuery {
    /// The counters; None when the device does not answer in time. A report
    /// must not hang on a busy or stuck device, nor fail it. The wait is
    /// this thread's own: tarpc times a request out only once its channel
    /// has written it, and the RPC thread drives that channel and every
    /// timer, so neither a device that stops reading nor a busy RPC thread
    /// can hold the report past the deadline.
    pub fn send(self) -> Option<rpc_schema::DeviceCounters> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let client = self.client;
        self.runtime.spawn(async move {
            let asked = client.counters(within(COUNTERS_DEADLINE));
            // Dropping the call on time cancels it, so none piles up.
            let counters = tokio::time::timeout(COUNTERS_DEADLINE, asked).await;
            let _ = reply.send(counters.ok().and_then(|r| r.ok()));
        });
        answer.recv_timeout(COUNTERS_DEADLINE).ok().flatten()
    }
}

/// Longest error text from a device that the VMM logs or reports.
const MAX_DEVICE_TEXT: usize = 200;
/// Recovery times a device's status keeps (the latest).
pub const RECOVERIES_KEPT: usize = 1000;
/// A failure's reason: the VMM's words around at most a device's text.
const MAX_FAILURE_TEXT: usize = 2 * MAX_DEVICE_TEXT;

/// A request context that gives up after `limit`.
pub fn within(limit: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + limit;
    ctx
}

/// How long past its deadline a call to a device may wait to be sent.
const UNSENT_GRACE: Duration = Duration::from_secs(1);

/// Makes a call to a device with a context that gives up after `limit`
/// ([`within`]) and awaits it for at most `limit` and a grace: tarpc starts
/// a request's deadline only once the request is written, so one queued
/// behind the full socket of a device that stopped reading would otherwise
/// wait forever (and a vCPU with it).
pub async fn bounded<T, Fut>(limit: Duration, call: impl FnOnce(tarpc::context::Context) -> Fut) -> Result<T, RpcError>
where
    Fut: std::future::Future<Output = Result<T, RpcError>>,
{
    let call = call(within(limit));
    tokio::time::timeout(limit + UNSENT_GRACE, call).await.unwrap_or(Err(RpcError::DeadlineExceeded))
}

pub fn control_client(runtime: &tokio::runtime::Handle, control: UnixStream) -> Result<DeviceControlClient, String> {
    let _context = runtime.enter();
    let transport = rpc_schema::transport(control).map_err(|e| e.to_string())?;
    Ok(DeviceControlClient::new(Default::default(), transport).spawn())
}

impl DeviceHost {
    /// Connects to a device's control socket and says hello.
    pub fn connect(
        name: String,
        runtime: &tokio::runtime::Handle,
        control: UnixStream,
        notify: EventFd,
        irq: EventFd,
    ) -> Result<(Self, DeviceInfo), String> {
        let client = control_client(runtime, control)?;
        let host = DeviceHost {
            name,
            pid: None,
            health: DeviceHealth::new(None),
            access: None,
            respawn: None,
            posting: None,
            starter: None,
            on_activate: None,
            lifeline: Arc::new(Lifeline { control: Mutex::new(Some(client)), ..Default::default() }),
            runtime: runtime.clone(),
            notify,
            irq,
        };
        let info = host.call(|c, ctx| async move { c.hello(ctx, PROTOCOL_VERSION).await })?;
        Ok((host, info))
    }

    fn call<T, F, Fut>(&self, request: F) -> Result<T, String>
    where
        F: FnOnce(DeviceControlClient, tarpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, rpc_schema::DeviceError>, tarpc::client::RpcError>>,
    {
        let served_by = self.health.pid();
        let client = lock(&self.lifeline.control).clone();
        let client = client.ok_or_else(|| "the device is shut down".to_string())?;
        let reply = self.runtime.block_on(bounded(CONTROL_DEADLINE, |ctx| request(client, ctx)));
        match reply {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(refused)) => Err(device_text::printable(&refused.to_string(), MAX_DEVICE_TEXT)),
            Err(e) => {
                let reason = format!("control channel: {e}");
                // A dead process is the likely cause: give its watcher a moment
                // to record why before settling for the channel error.
                let deadline = Instant::now() + Duration::from_millis(200);
                while self.pid.is_some() && !self.health.failed.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if self.health.supervised() {
                    // Its supervisor brings it back (or fails it): this call alone
                    // is lost. Only the process that failed the call is killed,
                    // never one the supervisor has started since.
                    if let Some(pid) = served_by {
                        self.health.kill_process(pid);
                    }
                } else {
                    self.health.fail(&self.name, reason.clone());
                }
                Err(reason)
            }
        }
    }

    pub fn activate(&mut self, features: u64, queues: Vec<QueueConfig>) -> Result<(), String> {
        if self.health.failed.load(Ordering::SeqCst) {
            return Err("the device has failed".into());
        }
        if let Some(hook) = &self.on_activate {
            hook(features)?;
        }
        if self.posting.is_none() {
            return self.call(|c, ctx| async move { c.activate(ctx, features, queues).await });
        }
        // Request level: the device learns the features, never the rings.
        let posting = self.posting.as_ref().ok_or("not a request-level device")?;
        if queues.len() != posting.queue_count as usize {
            return Err(format!("{} queues set up, the device has {}", queues.len(), posting.queue_count));
        }
        // Each queue's size, and nowhere it lives.
        let sizes: Vec<QueueConfig> =
            queues.iter().map(|q| QueueConfig { index: q.index, size: q.size, desc: 0, avail: 0, used: 0 }).collect();
        let restarts = self.health.restarts.load(Ordering::SeqCst);
        let again = sizes.clone();
        if let Err(first) = self.call(|c, ctx| async move { c.activate(ctx, features, sizes).await }) {
            // The process died under the call: its supervisor starts another,
            // which is activated instead (the driver never knows).
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.health.supervised()
                && !self.health.failed.load(Ordering::SeqCst)
                && self.health.restarts.load(Ordering::SeqCst) == restarts
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.health.restarts.load(Ordering::SeqCst) == restarts {
                return Err(first);
            }
            self.call(|c, ctx| async move { c.activate(ctx, features, again).await })?;
        }
        let context = QueueContext {
            name: self.name.clone(),
            memory: self.posting.as_ref().map(|p| p.memory.clone()).ok_or("no guest memory")?,
            access: self.access.clone().ok_or("no memory access record")?,
            health: self.health.clone(),
            client: lock(&self.lifeline.control).clone().ok_or("the device is shut down")?,
            notify: self.notify.try_clone().map_err(|e| e.to_string())?,
            irq: self.irq.try_clone().map_err(|e| e.to_string())?,
            poll: self.posting.as_ref().map_or(Duration::ZERO, |p| p.poll),
            held_queue: self.posting.as_ref().and_then(|p| p.held_queue),
            direct_disk: self.posting.as_ref().is_some_and(|p| p.direct_disk),
        };
        let Some(posting) = self.posting.as_mut() else { return Err("not a request-level device".into()) };
        let event_idx = features & crate::devices::features::RING_EVENT_IDX != 0;
        let queue = RequestQueue::start(&self.runtime, context, &queues, posting.max_queue_size, event_idx)?;
        self.lifeline.features.store(features, Ordering::SeqCst);
        *lock(&self.lifeline.engine) = Some(queue.engine());
        if let Some(access) = &self.access {
            *lock(&access.engine) = Some(Arc::downgrade(&queue.engine()));
        }
        posting.queue = Some(queue);
        Ok(())
    }

    /// Request level: stops walking the queue and revokes its grants.
    fn stop_posting(&mut self) {
        lock(&self.lifeline.engine).take();
        if let Some(posting) = self.posting.as_mut() {
            posting.queue = None;
        }
    }

    /// What a status report reads, without the transport. Take it once the
    /// host is complete (its memory access set).
    pub fn view(&self) -> HostView {
        HostView {
            name: self.name.clone(),
            health: self.health.clone(),
            access: self.access.clone(),
            lifeline: self.lifeline.clone(),
            runtime: self.runtime.clone(),
        }
    }

    /// The driver's reset. A device that had failed comes back as a fresh
    /// process or thread (virtio 1.x, 2.1.2: a reset is how a driver answers
    /// DEVICE_NEEDS_RESET), unless it is shutting down or cannot be restarted.
    pub fn reset(&mut self) -> Result<(), String> {
        self.stop_posting();
        if self.health.failed.load(Ordering::SeqCst) {
            return self.revive();
        }
        self.call(|c, ctx| async move { c.reset(ctx).await })
    }

    fn revive(&mut self) -> Result<(), String> {
        let Some(start) = self.starter.clone() else { return Err("this device cannot be restarted".into()) };
        if self.health.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        // A supervisor's restart under way finishes (or gives up) first.
        let starting = self.health.starting();
        // Whatever is left of the failed one goes first: it holds the backend too.
        self.health.retire_all();
        let started = start().and_then(|control| control_client(&self.runtime, control));
        let client = match started {
            Ok(client) => client,
            Err(e) => {
                self.health.fail(&self.name, format!("restarting it at the driver's reset failed: {e}"));
                return Err(e);
            }
        };
        // A clean record only once the new process is current (the old
        // one's death, reported late, is ignored since `retire_all`).
        self.health.revive();
        *lock(&self.lifeline.control) = Some(client);
        drop(starting);
        self.call(|c, ctx| async move { c.hello(ctx, PROTOCOL_VERSION).await })?;
        tracing::info!("device {}: restarted at the driver's reset", self.name);
        Ok(())
    }

    /// Starts an orderly stop: closing the control channel makes the device
    /// return, and its process exit or thread end, releasing its backend.
    pub fn begin_stop(&mut self) {
        self.health.stopping.store(true, Ordering::SeqCst);
        self.stop_posting();
        lock(&self.lifeline.control).take();
    }

    pub fn has_ended(&self) -> bool {
        self.health.ended.load(Ordering::SeqCst)
    }

    /// A queue notify that reached the VMM (not its ioeventfd): pass it on.
    pub fn notify_fallback(&self) {
        let _ = self.notify.write(1);
    }

    pub fn interrupt(&self) {
        let _ = self.irq.write(1);
    }

    /// Shared mode: replaces the device's process with one that maps exactly
    /// `regions`, carrying its queue state over. The new process is started
    /// and greeted first, so the device stops serving only between save and
    /// restore; that pause is returned. None for a device that maps nothing.
    /// A rebuild that fails fails the device: its processes, old and new,
    /// are killed rather than left serving with a map that is no longer true.
    pub fn rebuild(&mut self, regions: &[SharedRegion]) -> Result<Option<Duration>, String> {
        if self.respawn.is_none() || self.health.failed.load(Ordering::SeqCst) {
            return Ok(None);
        }
        self.try_rebuild(regions).inspect_err(|e| self.health.fail(&self.name, format!("rebuild: {e}")))
    }

    fn try_rebuild(&mut self, regions: &[SharedRegion]) -> Result<Option<Duration>, String> {
        let Some(respawn) = &self.respawn else { return Ok(None) };
        let (pid, control) = respawn
            .recipe
            .spawn(ProcessMemory::Shared { memfd: respawn.memfd, regions })
            .map_err(|e| format!("device {}: restarting it: {e}", self.name))?;
        let retired = self.pid.replace(pid);
        let client = control_client(&self.runtime, control)?;
        let old = lock(&self.lifeline.control).replace(client);
        self.call(|c, ctx| async move { c.hello(ctx, PROTOCOL_VERSION).await })?;
        let paused = Instant::now();
        let saved = match old {
            Some(old) => self.runtime.block_on(bounded(CONTROL_DEADLINE, |ctx| old.save(ctx))),
            None => return Err("the device is shut down".into()),
        };
        match saved {
            Ok(Ok(state)) => self.call(|c, ctx| async move { c.restore(ctx, state).await })?,
            // Not activated yet: the fresh process waits for the driver, as the old one did.
            Ok(Err(rpc_schema::DeviceError::NotActive)) => {}
            Ok(Err(e)) => return Err(format!("device {}: save: {e}", self.name)),
            Err(e) => return Err(format!("device {}: save: {e}", self.name)),
        }
        let stall = paused.elapsed();
        // The old process sees its control channel close and exits; it may have
        // taken a notification meant for the new one, so kick once it is gone.
        if let Some(old_pid) = retired {
            let deadline = Instant::now() + RETIRE_DEADLINE;
            while !process_gone(old_pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
            }
            if !process_gone(old_pid) {
                // It keeps the memfd, the disk and the eventfds while it lives.
                warn!("device {}: retired process {old_pid} did not exit; killing it", self.name);
                self.health.kill_process(old_pid);
            }
        }
        self.notify_fallback();
        Ok(Some(stall))
    }
}

#[cfg(test)]
mod tests {
    use super::super::memory_service::DeviceAccess;
    use super::*;
    use std::os::fd::FromRawFd;
    use std::process::{Child, Command};

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    /// Makes `child` one of the device's processes, as spawning one does.
    fn register(health: &DeviceHealth, child: &Child) {
        // SAFETY: pidfd_open on our own, not yet reaped, child.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id(), 0) };
        assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor pidfd_open just gave us.
        health.add_process(child.id(), unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });
    }

    fn watched(health: &DeviceHealth) -> Child {
        let child = sleeper();
        register(health, &child);
        child
    }

    /// A device that refuses a batch with text of its own cannot forge log
    /// lines or flood the log and the API with the failure's reason.
    #[test]
    fn a_failures_reason_is_escaped_and_bounded() {
        let health = DeviceHealth::new(None);
        let forged = format!("it refused a batch: no\n\u{1b}[2Kskvm: guest exited{}", "x".repeat(10_000));
        health.fail("test", forged);
        let reason = lock(&health.reason).clone().unwrap();
        assert!(reason.starts_with("it refused a batch: no\\n\\u{1b}[2Kskvm: guest exited"), "{reason}");
        assert!(!reason.chars().any(char::is_control), "{reason}");
        // Cut after its bound; the two escapes and the "..." add 1 + 5 + 3.
        assert_eq!(reason.chars().count(), MAX_FAILURE_TEXT + 9, "{reason}");
    }

    /// A call that is never sent (queued behind a device's full socket)
    /// still ends, at its deadline and the grace, as one that timed out.
    #[test]
    fn a_call_never_sent_still_ends() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let never = |_| std::future::pending::<Result<(), RpcError>>();
        let ended = runtime.block_on(bounded(Duration::from_millis(10), never));
        assert!(matches!(ended, Err(RpcError::DeadlineExceeded)), "{ended:?}");
        let answered = runtime.block_on(bounded(Duration::from_millis(10), |_| async { Ok(7) }));
        assert_eq!(answered.ok(), Some(7));
    }

    /// However often a device recovers, its status keeps the latest
    /// recovery times only.
    #[test]
    fn recovery_times_are_bounded() {
        let health = DeviceHealth::new(None);
        for ms in 0..RECOVERIES_KEPT as u64 + 10 {
            health.recovered("test", Duration::from_millis(ms));
        }
        let kept = lock(&health.recovery_ns).clone();
        assert_eq!(kept.len(), RECOVERIES_KEPT);
        assert_eq!(kept.last(), Some(&((RECOVERIES_KEPT as u64 + 9) * 1_000_000)), "the latest is kept");
        assert_eq!(kept[0], 10 * 1_000_000, "the oldest went first");
    }

    /// A driver that sees DEVICE_NEEDS_RESET may reset at once, and the
    /// reset starts a new process: the failure that showed must not then
    /// kill it (a race CI once caught in `blk-recover`).
    #[test]
    fn a_process_started_once_the_failure_shows_survives_it() {
        for _ in 0..20 {
            let health = DeviceHealth::new(None);
            let mut failed_one = watched(&health);
            let mut next = sleeper();
            let failing = {
                let health = health.clone();
                std::thread::spawn(move || health.fail("test", "it broke".into()))
            };
            while !health.failed.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            assert_eq!(lock(&health.reason).as_deref(), Some("it broke"), "the failure showed before its reason");
            register(&health, &next);
            failing.join().unwrap();
            assert!(failed_one.wait().is_ok_and(|s| !s.success()), "the failed process was not killed");
            std::thread::sleep(Duration::from_millis(50));
            assert!(next.try_wait().unwrap().is_none(), "the failure killed the process started after it");
            next.kill().unwrap();
            next.wait().unwrap();
        }
    }

    /// The driver's reset has begun replacing a failed device when the old
    /// process's death is reported (its watcher was slow): the report is
    /// the retired process's, and neither kills, revokes nor ends what the
    /// reset starts.
    #[test]
    fn a_death_reported_after_the_reset_began_changes_nothing() {
        let health = DeviceHealth::new(Some(DeviceAccess::new("test", true)));
        let access = health.access().unwrap();
        let mut old = watched(&health);
        health.set_current_process(old.id());
        health.fail("test", "it broke".into());
        assert!(old.wait().is_ok_and(|s| !s.success()), "the failed process was not killed");
        health.process_reaped(old.id());

        health.retire_all();
        assert!(!access.is_revoked(), "the new generation's channels are refused");
        let mut next = watched(&health);
        health.process_ended("test", old.id(), format!("process {} was killed by signal 9", old.id()));
        assert!(!access.is_revoked(), "a late report revoked the new generation");
        assert!(!health.ended.load(Ordering::SeqCst), "a late report ended the device");
        std::thread::sleep(Duration::from_millis(50));
        assert!(next.try_wait().unwrap().is_none(), "a late report killed the reset's new process");

        health.set_current_process(next.id());
        health.revive();
        assert!(!health.failed.load(Ordering::SeqCst));
        assert_eq!(lock(&health.last_failure).as_deref(), Some("it broke"));
        next.kill().unwrap();
        next.wait().unwrap();
    }

    /// A supervisor's restart that finds the device failed, or replaced,
    /// when its new process is ready does not take over: the process is
    /// killed and nothing is counted.
    #[test]
    fn a_restart_overtaken_by_a_failure_does_not_take_over() {
        let health = DeviceHealth::new(None);
        assert!(health.begin_restart());
        let mut started = watched(&health);
        health.set_current_process(started.id());
        health.fail("test", "it broke".into());
        let mut committed = false;
        assert!(!health.finish_restart(Some(started.id()), || committed = true));
        assert!(!committed && health.restarts.load(Ordering::SeqCst) == 0);
        assert!(started.wait().is_ok_and(|s| !s.success()), "the overtaken process lives on");
        assert!(!health.begin_restart(), "a failed device restarted before the driver's reset");
    }
}
