//! The VMM's side of the request-level protocol (`rpc` mode): it owns the
//! device's notifier, walks its rings with `virtio-queue` over its own
//! mapping of guest RAM, records a grant per chain, posts batches to the
//! device and applies the completions that come back (in a batch's reply,
//! or later for requests the device held): each write checked against its
//! grant, then the used ring, then the interrupt (honouring event-idx).
//!
//! Everything here runs on the VMM's RPC thread and never waits for a vCPU
//! (the transport's lock is not taken): a vCPU may be blocked on this very
//! thread in a control call.
use super::super::lock;
use super::grants::{Grant, GrantedBuffer};
use super::host::{bounded, DeviceHealth};
use super::memory_service::DeviceAccess;
use super::staging::Staging;
use crate::devices::poll_window::PollWindow;
use rpc_schema::{
    Answer, CompletedRequest, DeviceControlClient, PostedBuffer, PostedRequest, QueueConfig, MAX_BATCH_BUFFERS,
    MAX_BATCH_INLINE, MAX_CHAIN_BUFFERS, MAX_INLINE_REQUEST, MIN_STAGED_BYTES, STAGING_SLOTS, STAGING_SLOT_BYTES,
};
use serde_bytes::ByteBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryMmap, VolatileSlice,
};
use vmm_sys_util::eventfd::EventFd;

/// How long a device may take over one batch before it counts as hung.
const BATCH_DEADLINE: Duration = rpc_schema::MAX_DEADLINE;

/// The active queues of a request-level device; dropping them stops the
/// work and revokes every outstanding grant.
pub struct RequestQueue {
    engine: Arc<Engine>,
    task: tokio::task::JoinHandle<()>,
}

/// What a request-level queue needs from its device host.
pub struct QueueContext {
    pub name: String,
    pub memory: GuestMemoryAtomic<GuestMemoryMmap>,
    pub access: Arc<DeviceAccess>,
    pub health: Arc<DeviceHealth>,
    pub client: DeviceControlClient,
    pub notify: EventFd,
    pub irq: EventFd,
    /// How long to watch the rings after a completion (see [`Engine::watch`]).
    pub poll: Duration,
    /// The queue whose requests the device holds until input comes (a
    /// network or console device's receive queue). On every other queue
    /// the device answers what it is posted soon, so the driver is told not
    /// to notify while the device holds its requests (a completion comes,
    /// and the rings are looked at then) or while the rings are watched.
    pub held_queue: Option<u16>,
    /// A `direct=on` disk: its transfers take hundreds of µs on the host
    /// disk, and the device runs them across batches, a quarter of a deep
    /// queue held back. Its requests go in batches of at most
    /// [`DIRECT_DISK_BATCH`], so the rest of a queue runs while one waits;
    /// while some are served, its driver notifies once a batch's worth of
    /// new ones is available (see [`notify_after`]): they join those
    /// running instead of waiting for them all to end.
    pub direct_disk: bool,
}

/// The most requests in one batch of a `direct=on` disk.
pub const DIRECT_DISK_BATCH: usize = 8;

impl QueueContext {
    /// Whether the driver may be told not to notify on `queue`.
    fn quiet(&self, queue: u16) -> bool {
        self.held_queue != Some(queue)
    }

    /// The most requests in one batch.
    fn batch_requests(&self) -> usize {
        if self.direct_disk {
            DIRECT_DISK_BATCH
        } else {
            usize::MAX
        }
    }

    /// Requests the device holds that it will answer soon.
    fn answering(&self, grants: &super::grants::GrantTable) -> usize {
        grants.outstanding() - self.held_queue.map_or(0, |q| grants.outstanding_on(q))
    }
}

pub struct Engine {
    context: QueueContext,
    /// The device's queues, by index; one lock for all (completions for
    /// several queues come in one reply).
    queues: Mutex<Vec<Queue>>,
    /// Reset or stopped: replies still on their way are dropped.
    stopped: AtomicBool,
    /// The device process requests go to, and which one it is: a restart
    /// moves to a new epoch, and what the old process answered is dropped.
    connection: Mutex<Connection>,
    /// Whether watching the rings after a completion is worth the CPU.
    watching: Mutex<PollWindow>,
}

struct Connection {
    /// Moves on at every disconnect and reconnect. A batch is sent only in
    /// the epoch it was popped in: one popped before a reconnect has its
    /// grants posted by the reconnect itself, so sending it would post them
    /// twice (and the second completion would fail the device).
    epoch: u64,
    /// None while the device is being restarted: requests wait as grants.
    client: Option<DeviceControlClient>,
    /// When the restart began, until the new process completes a batch.
    restarting_since: Option<Instant>,
    /// That process's staging area.
    staging: Option<Arc<Staging>>,
}

/// Where a batch went: the connection's epoch, its client, and the process
/// that served it then.
struct Posting {
    epoch: u64,
    client: DeviceControlClient,
    staging: Option<Arc<Staging>>,
    served_by: Option<u32>,
}

impl RequestQueue {
    /// Checks the driver's queues and starts serving them on `runtime`.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        context: QueueContext,
        configs: &[QueueConfig],
        max_size: u16,
        event_idx: bool,
    ) -> Result<Self, String> {
        let queues = checked_queues(configs, max_size, event_idx, &context.memory.memory())?;
        let notify = context.notify.try_clone().map_err(|e| e.to_string())?;
        let engine = Engine::new(context, queues);
        let _context = runtime.enter();
        // SAFETY: the AsyncFd owns this clone of the eventfd and closes it only when dropped.
        let notify =
            unsafe { tokio::io::unix::AsyncFd::register(notify) }.map_err(|e| format!("watching the notifier: {e}"))?;
        let worker = engine.clone();
        let task = runtime.spawn(async move {
            // The driver may have posted before DRIVER_OK: look once first.
            worker.pump();
            while let Ok(mut ready) = notify.readable().await {
                let _ = ready.get_inner().read();
                ready.clear_ready();
                // Only a notification with work behind it on a queue the
                // watch is for (see `PollWindow`): a network device's new
                // receive buffers say nothing of its next transmit.
                if worker.has_new_where(|q| worker.context.quiet(q)) {
                    lock(&worker.watching).notified(Instant::now());
                }
                if !worker.pump() {
                    return;
                }
            }
        });
        Ok(RequestQueue { engine, task })
    }

    /// The engine, for a restart to reconnect.
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }
}

impl Drop for RequestQueue {
    fn drop(&mut self) {
        self.task.abort();
        self.engine.stop();
    }
}

/// The driver's queues, each checked: its size, and rings in guest RAM.
fn checked_queues(
    configs: &[QueueConfig],
    max_size: u16,
    event_idx: bool,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Queue>, String> {
    let mut queues = Vec::with_capacity(configs.len());
    for config in configs {
        let i = config.index;
        let mut queue = Queue::new(max_size).map_err(|e| e.to_string())?;
        queue.try_set_size(config.size).map_err(|e| format!("queue {i} size {}: {e}", config.size))?;
        queue
            .try_set_desc_table_address(GuestAddress(config.desc))
            .map_err(|e| format!("queue {i} descriptor table: {e}"))?;
        queue
            .try_set_avail_ring_address(GuestAddress(config.avail))
            .map_err(|e| format!("queue {i} avail ring: {e}"))?;
        queue.try_set_used_ring_address(GuestAddress(config.used)).map_err(|e| format!("queue {i} used ring: {e}"))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(format!("queue {i}'s rings are not in guest RAM"));
        }
        queues.push(queue);
    }
    Ok(queues)
}

/// Why the VMM gave up on a device's queue.
fn broken(what: impl std::fmt::Display) -> String {
    format!("the guest broke its virtqueue: {what}")
}

impl Engine {
    fn new(context: QueueContext, queues: Vec<Queue>) -> Arc<Self> {
        let staging = lock(&context.access.staging).clone();
        let connection = Connection { epoch: 0, client: Some(context.client.clone()), restarting_since: None, staging };
        let poll = context.poll;
        Arc::new(Engine {
            context,
            queues: Mutex::new(queues),
            stopped: AtomicBool::new(false),
            watching: Mutex::new(PollWindow::new(poll)),
            connection: Mutex::new(connection),
        })
    }

    /// Stops for good (a reset), taking back every grant: replies still on
    /// their way are dropped, and a pop running on meanwhile issues none.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        lock(&self.context.access.grants).revoke_all();
    }

    fn fail(&self, reason: String) {
        self.stopped.store(true, Ordering::SeqCst);
        self.context.health.fail(&self.context.name, reason);
    }

    /// Posts every request the driver has made available, in batches.
    /// False once the queue is done for (failed or stopped).
    fn pump(self: &Arc<Self>) -> bool {
        loop {
            if self.stopped.load(Ordering::SeqCst) || self.context.health.failed.load(Ordering::SeqCst) {
                return false;
            }
            let started = Instant::now();
            let batch = self.pop_batch();
            let access = &self.context.access;
            access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match batch {
                Ok(batch) if batch.is_empty() => return true,
                Ok(batch) => self.send(batch),
                Err(reason) => {
                    self.fail(reason);
                    return false;
                }
            }
        }
    }

    /// Takes available chains of every queue into a batch within the batch
    /// limits, each checked and granted; empty when there are none
    /// (notifications are then re-enabled, and a chain that raced in is
    /// taken after all; on a quiet queue they stay off while the device
    /// holds its requests, whose completion makes us look again, but for a
    /// `direct=on` disk's, which come by the batch).
    ///
    /// The connection stays locked throughout, so a reconnect's snapshot of
    /// the grants sees either none of the batch or all of it.
    fn pop_batch(&self) -> Result<Outgoing, String> {
        let memory = self.context.memory.memory();
        let mem = &*memory;
        let connection = lock(&self.connection);
        let mut queues = lock(&self.queues);
        let mut grants = lock(&self.context.access.grants);
        let mut batch = Batcher::new(connection.epoch, connection.staging.clone(), self.context.batch_requests());
        // A reset stops the engine before it revokes the grants: none are issued after.
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(batch.take());
        }
        for (index, queue) in queues.iter_mut().enumerate() {
            let index = index as u16;
            let quiet = self.context.quiet(index);
            loop {
                let mut chains = queue.iter(mem).map_err(broken)?;
                let Some(chain) = chains.next() else {
                    let served = grants.outstanding_on(index) > 0;
                    let by_the_batch = self.context.direct_disk && queue.event_idx_enabled();
                    if batch.is_empty() && served && by_the_batch {
                        if notify_after(queue, mem, self.context.batch_requests() as u16)? {
                            continue;
                        }
                        break;
                    }
                    let busy = !batch.is_empty() || (quiet && served);
                    if busy {
                        if quiet {
                            queue.disable_notification(mem).map_err(broken)?;
                        }
                        break;
                    }
                    if !queue.enable_notification(mem).map_err(broken)? {
                        break;
                    }
                    continue;
                };
                let head = chain.head_index();
                let granted = collect(chain, head)?;
                if batch.full_for(&granted) {
                    chains.go_to_previous_position();
                    return Ok(batch.take());
                }
                let (grant, granted) = grants.issue(Grant { queue: index, head, buffers: granted });
                let inline = batch.push(grant, index, &granted.buffers, mem).map_err(broken)?;
                self.context.access.bytes.fetch_add(inline, Ordering::Relaxed);
            }
        }
        Ok(batch.take())
    }

    /// Posts a batch to the process it was popped for. If a restart has
    /// begun since, its grants wait and the restart posts them; a stopped
    /// queue sends nothing (a reset takes the grants back, a failure waits
    /// for the driver's reset).
    fn send(self: &Arc<Self>, mut batch: Outgoing) {
        let (epoch, client, staging) = {
            let connection = lock(&self.connection);
            match &connection.client {
                Some(client) if connection.epoch == batch.epoch && !self.stopped.load(Ordering::SeqCst) => {
                    (connection.epoch, client.clone(), connection.staging.clone())
                }
                _ => return batch.release(),
            }
        };
        // A client is installed only after its process became current.
        let served_by = self.context.health.pid();
        self.context.access.batches.fetch_add(1, Ordering::Relaxed);
        let engine = self.clone();
        tokio::spawn(async move { engine.post(Posting { epoch, client, staging, served_by }, batch).await });
    }

    /// Sends a batch and applies its completions; a device that refuses or
    /// breaks the protocol fails. One that does not answer is killed: its
    /// supervisor restarts it (and its grants are posted again) or fails it.
    async fn post(self: Arc<Self>, to: Posting, mut batch: Outgoing) {
        let Posting { epoch, client, staging, served_by } = to;
        // Answer slots of this process the VMM is done with go back with the batch.
        let freed = staging.as_ref().map(|area| area.take_answered()).unwrap_or_default();
        let requests = std::mem::take(&mut batch.requests);
        let reply = bounded(BATCH_DEADLINE, |ctx| client.requests(ctx, requests, freed)).await;
        if reply.is_ok() {
            // Answered: the device is done reading the posting slot. One
            // that did not answer may still read it; it is killed or failed
            // below, and its successor gets a posting area of its own.
            batch.release();
        }
        let current = |engine: &Self, connection: &Connection| {
            !engine.stopped.load(Ordering::SeqCst) && connection.epoch == epoch
        };
        let started = Instant::now();
        let outcome = match reply {
            Ok(Ok(answer)) => {
                let slot = answer.slot;
                // Checked and applied under the connection lock: a restart
                // that began since has posted these grants again, and
                // completing them now would make the new process's
                // completions unknown.
                let connection = lock(&self.connection);
                if !current(&self, &connection) {
                    drop(connection);
                    // Dropped unread: its answer slot can go back at once.
                    staging.iter().for_each(|a| a.answered(slot));
                    return;
                }
                let applied = self.apply_answer(answer, staging.as_deref());
                drop(connection);
                // Its bytes are in guest RAM: the slot goes back with the next batch.
                applied.map(|()| staging.iter().for_each(|a| a.answered(slot)))
            }
            _ if !current(&self, &lock(&self.connection)) => return,
            Ok(Err(refused)) => Err(format!("it refused a batch: {refused}")),
            Err(e) => {
                // A dead process is the likely cause: give its watcher a
                // moment to record why (and start a new one).
                for _ in 0..40 {
                    if self.context.health.failed.load(Ordering::SeqCst) || !current(&self, &lock(&self.connection)) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if self.context.health.supervised() {
                    // Only the process that failed the batch: never one its
                    // supervisor has started since.
                    tracing::debug!("device {}: control channel: {e}", self.context.name);
                    if let Some(pid) = served_by {
                        self.context.health.kill_process(pid);
                    }
                    return;
                }
                Err(format!("control channel: {e}"))
            }
        };
        self.context.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                let recovered = lock(&self.connection).restarting_since.take();
                if let Some(since) = recovered {
                    self.context.health.recovered(&self.context.name, since.elapsed());
                }
                // What the driver posted meanwhile (it may not have notified).
                // An empty ring is left to `watch`: a pump would turn the
                // driver's notifications back on before the watching starts.
                if self.has_new() && !self.pump() {
                    return;
                }
                self.watch().await;
            }
            Err(reason) => self.fail(reason),
        }
    }

    /// Watches the rings for `poll` after a completion that left the device
    /// with nothing to answer, and posts what the driver makes available
    /// meanwhile: a driver that answers a completion with its next request
    /// saves the wake-up of this thread by its notifier (tens of µs on
    /// nested hosts). Yields between looks, so the thread's other work goes
    /// on; a look is a load from guest RAM. While the device still holds
    /// requests it will answer it does not watch: the device (and its I/O
    /// threads) need the CPU more, and the next completion comes anyway. A
    /// watch that finds nothing stops watching until it would have helped
    /// again ([`PollWindow`]).
    async fn watch(self: &Arc<Self>) {
        let window = lock(&self.watching).window();
        let until = Instant::now() + window;
        let mut told = false;
        loop {
            if self.context.answering(&lock(&self.context.access.grants)) > 0 {
                return;
            }
            if Instant::now() >= until {
                break;
            }
            if !told {
                // We are looking anyway: notifications would only cost the driver exits.
                self.notifications_off();
                told = true;
            }
            if self.has_new() {
                self.pump();
                return;
            }
            tokio::task::yield_now().await;
        }
        // Notifications back on where nothing is held, and one more look (see `pop_batch`).
        self.pump();
        lock(&self.watching).asleep(Instant::now(), !window.is_zero());
    }

    fn notifications_off(&self) {
        let memory = self.context.memory.memory();
        for (index, queue) in lock(&self.queues).iter_mut().enumerate() {
            if self.context.quiet(index as u16) {
                // A ring that is not RAM fails at the next pop instead.
                let _ = queue.disable_notification(&*memory);
            }
        }
    }

    /// Whether a queue's avail index has moved past what was popped.
    fn has_new(&self) -> bool {
        self.has_new_where(|_| true)
    }

    /// `has_new` for the queues `which` picks, by index.
    fn has_new_where(&self, which: impl Fn(u16) -> bool) -> bool {
        let memory = self.context.memory.memory();
        let queues = lock(&self.queues);
        let moved = |q: &Queue| q.avail_idx(&*memory, Ordering::Acquire).is_ok_and(|idx| idx.0 != q.next_avail());
        queues.iter().enumerate().any(|(i, q)| which(i as u16) && moved(q))
    }

    /// Each queue's size, and nowhere it lives: what a request-level device
    /// is activated with.
    pub fn queue_sizes(&self) -> Vec<QueueConfig> {
        lock(&self.queues)
            .iter()
            .enumerate()
            .map(|(i, q)| QueueConfig { index: i as u16, size: q.size(), desc: 0, avail: 0, used: 0 })
            .collect()
    }

    /// Completions for requests the device held past their batch, checked
    /// and applied as a batch's answer is; a device that breaks the
    /// protocol fails. The device takes a staged answer's slot back when we
    /// reply, so it is never handed back with a batch.
    ///
    /// `from`: the memory-channel generation it came on. It is applied
    /// under the connection lock, and only while that generation is the
    /// current one: a restart starts a new generation before it posts the
    /// grants again, so what the earlier process completes late is dropped
    /// rather than make its successor's completions unknown.
    pub fn complete_held(&self, answer: Answer, from: u64) -> Result<(), String> {
        let connection = lock(&self.connection);
        if self.stopped.load(Ordering::SeqCst) || !self.context.access.is_generation(from) {
            return Ok(());
        }
        let applied = self.apply_answer(answer, connection.staging.as_deref());
        drop(connection);
        applied.inspect_err(|reason| self.fail(reason.clone()))
    }

    /// A restart begins: nothing more goes to the old process, and what it
    /// still answers is dropped. `since`: when its death was seen.
    pub fn disconnect(&self, since: Instant) {
        let mut connection = lock(&self.connection);
        connection.epoch += 1;
        connection.client = None;
        connection.restarting_since.get_or_insert(since);
    }

    /// The restarted process takes over: every outstanding grant is posted
    /// to it again (a write may reach the disk twice; each request still
    /// completes once, as its grant is revoked at its first completion).
    pub fn reconnect(self: &Arc<Self>, client: DeviceControlClient) -> Result<(), String> {
        // One step: every batch popped before it is in the snapshot (and
        // is not sent), every one popped after goes to the new process.
        let (epoch, staging, held) = {
            let mut connection = lock(&self.connection);
            connection.epoch += 1;
            connection.client = Some(client);
            connection.staging = lock(&self.context.access.staging).clone();
            (connection.epoch, connection.staging.clone(), lock(&self.context.access.grants).snapshot())
        };
        let memory = self.context.memory.memory();
        let mem = &*memory;
        let mut batch = Batcher::new(epoch, staging, self.context.batch_requests());
        for (grant, chain) in held {
            if batch.full_for(&chain.buffers) {
                self.send(batch.take());
            }
            batch.push(grant, chain.queue, &chain.buffers, mem).map_err(broken)?;
        }
        if !batch.is_empty() {
            self.send(batch.take());
        }
        drop(memory);
        self.pump();
        Ok(())
    }

    /// Checks an answer's completions, inline ones and those whose bytes
    /// are staged in the device's answer area (each within the answer's
    /// one slot), and applies them.
    fn apply_answer(&self, answer: Answer, staging: Option<&Staging>) -> Result<(), String> {
        let Answer { completions, staged, slot } = answer;
        let mut writes = Vec::new();
        let mut all: Vec<Completion> = completions.iter().map(|c| inline(c, &mut writes)).collect();
        let protocol = |what: String| format!("it broke the grant protocol: {what}");
        if let Some(slot) = slot {
            let area = staging.ok_or("it staged an answer without a staging area")?;
            if slot >= STAGING_SLOTS {
                return Err(protocol(format!("staging slot {slot} does not exist")));
            }
            // Within its one slot, and no more bytes than a slot holds in
            // all: an answer costs the VMM at most one slot's copying, as
            // an inline one costs at most its frame.
            let slot_start = slot as u64 * STAGING_SLOT_BYTES;
            let mut total = 0u64;
            for c in &staged {
                let first = writes.len();
                for w in &c.writes {
                    let bytes = area.bytes(w.at, w.len).map_err(|e| protocol(e.to_string()))?;
                    let (at, end) = (w.at as u64, w.at as u64 + w.len as u64);
                    total += w.len as u64;
                    if at < slot_start || end > slot_start + STAGING_SLOT_BYTES || total > STAGING_SLOT_BYTES {
                        return Err(protocol(format!("staged bytes {at:#x}+{:#x} are outside slot {slot}", w.len)));
                    }
                    writes.push((w.buffer, w.offset, Written::Staged(bytes)));
                }
                all.push(Completion { grant: c.grant, used_len: c.used_len, writes: first..writes.len() });
            }
        } else if !staged.is_empty() {
            return Err(protocol("staged completions without a slot".into()));
        }
        self.apply(&all, &writes)
    }

    /// Applies `completions`, whose writes are ranges of `writes`.
    fn apply(&self, completions: &[Completion], writes: &[BufferBytes<'_>]) -> Result<(), String> {
        let memory = self.context.memory.memory();
        let mem = &*memory;
        let mut queues = lock(&self.queues);
        let mut touched = vec![false; queues.len()];
        let mut moved = 0u64;
        for completion in completions {
            let protocol = |e: rpc_schema::MemoryError| format!("it broke the grant protocol: {e}");
            let id = completion.grant;
            let grant = match lock(&self.context.access.grants).complete(id) {
                Ok(grant) => grant,
                // Taken back by a reset while the device held it: not its fault.
                Err(rpc_schema::MemoryError::GrantReset(_)) => continue,
                Err(e) => return Err(protocol(e)),
            };
            if completion.used_len as u64 > grant.writable_len() {
                return Err(format!("it completed grant {id} with {} bytes used of {}", completion.used_len, {
                    grant.writable_len()
                }));
            }
            let writes = &writes[completion.writes.clone()];
            let resolve =
                |(buffer, offset, data): &BufferBytes| grant.resolve(id, *buffer, *offset, data.len() as u64, true);
            // Every write is checked before any is made.
            if let Some(refused) = writes.iter().map(resolve).find_map(Result::err) {
                return Err(protocol(refused));
            }
            for write in writes {
                // A buffer that is not RAM (any more) is the guest's own loss.
                if resolve(write).is_ok_and(|addr| write.2.store(mem, addr)) {
                    moved += write.2.len() as u64;
                }
            }
            let queue = queues.get_mut(grant.queue as usize).ok_or("a grant names no queue")?;
            queue.add_used(mem, grant.head, completion.used_len).map_err(broken)?;
            touched[grant.queue as usize] = true;
        }
        self.context.access.bytes.fetch_add(moved, Ordering::Relaxed);
        let mut interrupt = false;
        for (queue, _) in queues.iter_mut().zip(&touched).filter(|(_, t)| **t) {
            interrupt |= wants_interrupt(queue, mem).map_err(broken)?;
        }
        if interrupt {
            self.context.access.interrupts.fetch_add(1, Ordering::Relaxed);
            let _ = self.context.irq.write(1);
        }
        Ok(())
    }
}

/// Asks the driver to notify once `more` requests past those popped are
/// available (event-idx's avail_event, virtio 1.x, 2.7.10); true if they
/// already are. Fewer wait for the next completion, which looks again: call
/// only while the device serves some from this queue. A notification per
/// request would cost an exit each, and the batches would shrink to one or
/// two requests, each a round trip to the device.
fn notify_after(queue: &mut Queue, mem: &GuestMemoryMmap, more: u16) -> Result<bool, String> {
    let (next, more) = (queue.next_avail(), more.max(1));
    // The used ring's last field (virtio-queue keeps its own setter private).
    let avail_event = queue.used_ring() + 4 + 8 * u64::from(queue.size());
    mem.store(next.wrapping_add(more - 1).to_le(), GuestAddress(avail_event), Ordering::Relaxed).map_err(broken)?;
    std::sync::atomic::fence(Ordering::SeqCst);
    let idx = queue.avail_idx(mem, Ordering::Acquire).map_err(broken)?;
    Ok(idx.0.wrapping_sub(next) >= more)
}

/// Whether the driver wants an interrupt for what was just completed on
/// `queue`: virtio-queue answers with EVENT_IDX (the used event) and, as it
/// does not read the avail ring's VIRTQ_AVAIL_F_NO_INTERRUPT, we do
/// (virtio 1.x, 2.7.7.2: a driver that polls says it wants none).
fn wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
    use crate::devices::virtqueue::AVAIL_F_NO_INTERRUPT;
    // After the fence in needs_notification, which orders the used index before this load.
    let wanted = queue.needs_notification(mem)?;
    if !wanted || queue.event_idx_enabled() {
        return Ok(wanted);
    }
    let flags = mem.read_obj::<u16>(GuestAddress(queue.avail_ring())).map(u16::from_le);
    Ok(flags.map_or(true, |flags| flags & AVAIL_F_NO_INTERRUPT == 0))
}

/// A completion whose bytes came inline, its writes appended to `writes`.
fn inline<'a>(c: &'a CompletedRequest, writes: &mut Vec<BufferBytes<'a>>) -> Completion {
    let first = writes.len();
    writes.extend(c.writes.iter().map(|w| (w.buffer, w.offset, Written::Inline(&w.data))));
    Completion { grant: c.grant, used_len: c.used_len, writes: first..writes.len() }
}

/// A completion as [`Engine::apply`] takes it: its writes are a range of
/// one list for the whole answer (one allocation per answer, not per
/// completion: at 100k frames a second the allocator shows in profiles).
struct Completion {
    grant: u64,
    used_len: u32,
    writes: std::ops::Range<usize>,
}

/// Bytes for a granted buffer: (buffer, offset, bytes).
type BufferBytes<'a> = (u16, u32, Written<'a>);

/// A completion's bytes: inline in its message, or in the staging area.
enum Written<'a> {
    Inline(&'a [u8]),
    Staged(VolatileSlice<'a>),
}

impl Written<'_> {
    fn len(&self) -> usize {
        match self {
            Written::Inline(data) => data.len(),
            Written::Staged(bytes) => bytes.len(),
        }
    }

    /// Into guest RAM at `addr`; false where that is not RAM (any more).
    fn store(&self, mem: &GuestMemoryMmap, addr: u64) -> bool {
        match self {
            Written::Inline(data) => mem.write_slice(data, GuestAddress(addr)).is_ok(),
            Written::Staged(bytes) => super::staging::store(mem, addr, bytes),
        }
    }
}

/// Posted requests packed into a batch within the batch limits; their
/// readable bytes go in a slot of the posting area where the process has
/// one and a slot is free, else inline.
struct Batcher {
    epoch: u64,
    batch: Vec<PostedRequest>,
    buffers: usize,
    /// Readable bytes the batch carries, inline or staged.
    carried: u64,
    staging: Option<Arc<Staging>>,
    slot: Option<u8>,
    /// The most requests it takes.
    max_requests: usize,
}

/// A batch ready to post, with the posting slot it holds, if any.
struct Outgoing {
    /// The connection's epoch it was popped in.
    epoch: u64,
    requests: Vec<PostedRequest>,
    staging: Option<Arc<Staging>>,
    slot: Option<u8>,
}

impl Outgoing {
    fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Gives the posting slot back (the batch was answered, or never will be).
    fn release(&mut self) {
        free_post_slot(&self.staging, &mut self.slot);
    }
}

/// A batch abandoned before it was taken (a broken ring ends the pop) was
/// never posted: its posting slot goes straight back.
impl Drop for Batcher {
    fn drop(&mut self) {
        free_post_slot(&self.staging, &mut self.slot);
    }
}

/// Gives `slot`, if held, back to the posting area it was taken from.
fn free_post_slot(staging: &Option<Arc<Staging>>, slot: &mut Option<u8>) {
    if let (Some(area), Some(slot)) = (staging, slot.take()) {
        area.free_post_slot(slot);
    }
}

impl Batcher {
    fn new(epoch: u64, staging: Option<Arc<Staging>>, max_requests: usize) -> Self {
        Batcher { epoch, batch: Vec::new(), buffers: 0, carried: 0, staging, slot: None, max_requests }
    }

    fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// `chain` belongs in the next batch: its buffers, or the readable bytes
    /// it would carry, do not fit this one, or it holds its most requests.
    fn full_for(&self, chain: &[GrantedBuffer]) -> bool {
        let readable = readable_len(chain);
        let carried_overflow = readable <= MAX_INLINE_REQUEST && self.carried + readable > MAX_BATCH_INLINE;
        let requests_overflow = self.batch.len() >= self.max_requests;
        !self.batch.is_empty()
            && (self.buffers + chain.len() > MAX_BATCH_BUFFERS || carried_overflow || requests_overflow)
    }

    /// Adds a granted chain; returns the readable bytes it carries.
    fn push(
        &mut self,
        grant: u64,
        queue: u16,
        chain: &[GrantedBuffer],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, GuestMemoryError> {
        let in_ram = |b: &GrantedBuffer| GuestMemoryBackend::check_range(mem, GuestAddress(b.addr), b.len as usize);
        let faulty = chain.iter().any(|b| b.len > 0 && !in_ram(b));
        let buffers = chain.iter().map(|b| PostedBuffer { len: b.len, writable: b.writable }).collect();
        let mut request = PostedRequest { grant, buffers, readable: ByteBuf::new(), staged: None, faulty, queue };
        let readable = readable_len(chain);
        let carried = !faulty && readable > 0 && readable <= MAX_INLINE_REQUEST.min(MAX_BATCH_INLINE - self.carried);
        if carried {
            let ranges: Vec<(u64, u32)> = chain.iter().filter(|b| !b.writable).map(|b| (b.addr, b.len)).collect();
            let offset = self.carried;
            if readable >= MIN_STAGED_BYTES {
                request.staged = self.slot().and_then(|(area, slot)| area.post(slot, offset, mem, &ranges));
            }
            if request.staged.is_none() {
                request.readable = ByteBuf::from(read_inline(mem, &ranges, readable)?);
            }
            self.carried += readable;
        }
        self.buffers += chain.len();
        self.batch.push(request);
        Ok(if carried { readable } else { 0 })
    }

    /// The posting slot this batch fills, taken at its first readable bytes.
    fn slot(&mut self) -> Option<(&Staging, u8)> {
        let area = self.staging.as_deref()?;
        if self.slot.is_none() {
            self.slot = area.take_post_slot();
        }
        Some((area, self.slot?))
    }

    fn take(&mut self) -> Outgoing {
        (self.buffers, self.carried) = (0, 0);
        Outgoing {
            epoch: self.epoch,
            requests: std::mem::take(&mut self.batch),
            staging: self.staging.clone(),
            slot: self.slot.take(),
        }
    }
}

/// The bytes of guest `ranges`, back to back.
fn read_inline(mem: &GuestMemoryMmap, ranges: &[(u64, u32)], len: u64) -> Result<Vec<u8>, GuestMemoryError> {
    let mut bytes = vec![0u8; len as usize];
    let mut at = 0;
    for &(addr, len) in ranges {
        mem.read_slice(&mut bytes[at..at + len as usize], GuestAddress(addr))?;
        at += len as usize;
    }
    Ok(bytes)
}

fn readable_len(chain: &[GrantedBuffer]) -> u64 {
    chain.iter().filter(|b| !b.writable).map(|b| b.len as u64).sum()
}

/// A chain's buffers, or why the chain is broken. `virtio-queue` stops a
/// chain early, silently, at a loop, a bad index, a bad indirect table or
/// memory it cannot read: a chain that ends on a descriptor still pointing
/// on is broken, as is one longer than [`MAX_CHAIN_BUFFERS`].
fn collect<M>(chain: virtio_queue::DescriptorChain<M>, head: u16) -> Result<Vec<GrantedBuffer>, String>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut buffers = Vec::new();
    let mut open = true;
    for desc in chain {
        if buffers.len() == MAX_CHAIN_BUFFERS {
            return Err(broken(format!("the chain at head {head} has more than {MAX_CHAIN_BUFFERS} buffers")));
        }
        buffers.push(GrantedBuffer { addr: desc.addr().0, len: desc.len(), writable: desc.is_write_only() });
        open = desc.has_next();
    }
    if open {
        return Err(broken(format!("the chain at head {head} loops, leaves its table or has a bad indirect table")));
    }
    Ok(buffers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use rpc_schema::{DeviceControl, DeviceCounters, DeviceError, DeviceInfo, DeviceState};
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use tarpc::context::Context;
    use tarpc::server::{BaseChannel, Channel};

    const QUEUE_SIZE: u16 = 16;
    // Where the queue's rings live.
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// A device process that records every grant posted to it and
    /// completes each at once, writing [`FILL`] at the start of its first
    /// buffer if told to: inline, or staged in slot 0 of its answer area.
    #[derive(Clone, Default)]
    struct Recorder {
        posted: Arc<Mutex<Vec<u64>>>,
        fill: Option<Fill>,
    }

    #[derive(Clone)]
    enum Fill {
        Inline,
        /// The answer area, as the device process sees it.
        Staged(Arc<File>),
    }

    const FILL: [u8; 16] = [0xaa; 16];

    impl DeviceControl for Recorder {
        async fn hello(self, _: Context, _: u32) -> Result<DeviceInfo, DeviceError> {
            Err(DeviceError::NotActive)
        }
        async fn activate(self, _: Context, _: u64, _: Vec<QueueConfig>) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn write_config(self, _: Context, _: u32, _: ByteBuf) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn reset(self, _: Context) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn save(self, _: Context) -> Result<DeviceState, DeviceError> {
            Err(DeviceError::NotActive)
        }
        async fn restore(self, _: Context, _: DeviceState) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn counters(self, _: Context) -> DeviceCounters {
            DeviceCounters::default()
        }
        async fn requests(self, _: Context, batch: Vec<PostedRequest>, _: Vec<u8>) -> Result<Answer, DeviceError> {
            use rpc_schema::{BufferWrite, StagedCompletion, StagedWrite};
            use std::os::unix::fs::FileExt;
            lock(&self.posted).extend(batch.iter().map(|r| r.grant));
            let len = FILL.len() as u32;
            let mut answer = Answer { completions: Vec::new(), staged: Vec::new(), slot: None };
            for (i, r) in batch.iter().enumerate() {
                let grant = r.grant;
                match &self.fill {
                    None => answer.completions.push(CompletedRequest { grant, used_len: 0, writes: Vec::new() }),
                    Some(Fill::Inline) => {
                        let data = ByteBuf::from(FILL.to_vec());
                        let writes = vec![BufferWrite { buffer: 0, offset: 0, data }];
                        answer.completions.push(CompletedRequest { grant, used_len: len, writes });
                    }
                    Some(Fill::Staged(area)) => {
                        let at = i as u32 * len;
                        area.write_all_at(&FILL, at.into()).unwrap();
                        let writes = vec![StagedWrite { buffer: 0, offset: 0, at, len }];
                        answer.staged.push(StagedCompletion { grant, used_len: len, writes });
                        answer.slot = Some(0);
                    }
                }
            }
            Ok(answer)
        }
    }

    /// A client whose requests `device` serves (call within a runtime).
    fn client(device: &Recorder) -> DeviceControlClient {
        let (ours, theirs) = tarpc::transport::channel::unbounded();
        let served = BaseChannel::with_defaults(theirs).execute(device.clone().serve());
        tokio::spawn(served.for_each(|response| async move {
            tokio::spawn(response);
        }));
        DeviceControlClient::new(Default::default(), ours).spawn()
    }

    /// An engine for one queue in `mem`, posting to `client`.
    fn engine(mem: &GuestMemoryMmap, client: DeviceControlClient) -> (Arc<Engine>, Arc<DeviceHealth>) {
        engine_staging(mem, client, None)
    }

    /// `engine`, for a process with the staging area `staging`.
    fn engine_staging(
        mem: &GuestMemoryMmap,
        client: DeviceControlClient,
        staging: Option<Arc<Staging>>,
    ) -> (Arc<Engine>, Arc<DeviceHealth>) {
        let access = DeviceAccess::new("test", true);
        *lock(&access.staging) = staging;
        let health = DeviceHealth::new(Some(access.clone()));
        let config = QueueConfig { index: 0, size: QUEUE_SIZE, desc: DESC, avail: AVAIL, used: USED };
        let queues = checked_queues(&[config], QUEUE_SIZE, false, mem).unwrap();
        let context = QueueContext {
            name: "test".into(),
            memory: GuestMemoryAtomic::new(mem.clone()),
            access,
            health: health.clone(),
            client,
            notify: EventFd::new(0).unwrap(),
            irq: EventFd::new(0).unwrap(),
            poll: Duration::ZERO,
            held_queue: None,
            direct_disk: false,
        };
        (Engine::new(context, queues), health)
    }

    /// The driver makes a chain of one 16-byte readable buffer available at `head`.
    fn offer(mem: &GuestMemoryMmap, head: u16) {
        offer_buffer(mem, head, 0x4000 + 0x100 * u64::from(head), false);
    }

    /// The driver makes a chain of one 16-byte buffer at `addr` available at `head`.
    fn offer_buffer(mem: &GuestMemoryMmap, head: u16, addr: u64, writable: bool) {
        const DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let desc = DESC + 16 * u64::from(head);
        mem.write_obj(addr, GuestAddress(desc)).unwrap();
        mem.write_obj(16u32, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(if writable { DESC_F_WRITE } else { 0 }, GuestAddress(desc + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(desc + 14)).unwrap();
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % QUEUE_SIZE))).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2)).unwrap();
    }

    /// The heads in the used ring, in order.
    fn used(mem: &GuestMemoryMmap) -> Vec<u32> {
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..u64::from(idx)).map(|i| mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap()).collect()
    }

    /// An engine whose process died (a restart is under way: the old
    /// process is disconnected), with a request at head 3 to pop; the old
    /// process and the new one to take over.
    fn restarting(mem: &GuestMemoryMmap) -> (Recorder, Recorder, Arc<Engine>, Arc<DeviceHealth>) {
        let (old, new) = (Recorder::default(), Recorder::default());
        let (engine, health) = engine(mem, client(&old));
        engine.disconnect(Instant::now());
        offer(mem, 3);
        (old, new, engine, health)
    }

    /// The request at head 3 was posted to `new` once, never to `old`, and
    /// completed once, and the device did not fail.
    async fn served_once_by(new: &Recorder, old: &Recorder, health: &DeviceHealth, mem: &GuestMemoryMmap) {
        completed(mem, 1).await;
        // Time for a second posting to be answered too.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*lock(&new.posted), [1], "the grants the new process was posted");
        assert!(lock(&old.posted).is_empty(), "the old process was posted a request after its death");
        assert!(!health.failed.load(Ordering::SeqCst), "{:?}", lock(&health.reason));
        assert_eq!(used(mem), [3], "the request completed once");
    }

    /// A batch popped while a restart is under way, and sent only once the
    /// new process took over, reaches that process once: its grant is
    /// posted by the takeover itself. Sent as well, the request would be
    /// served twice, and its second completion would fail the device.
    #[test]
    fn a_batch_popped_before_a_takeover_reaches_the_new_process_once() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let (old, new, engine, health) = restarting(&mem);
            let popped = engine.pop_batch().unwrap();
            assert_eq!(popped.requests.len(), 1);
            engine.reconnect(client(&new)).unwrap();
            engine.send(popped);
            served_once_by(&new, &old, &health, &mem).await;
        });
    }

    /// A takeover that comes while a pop is under way waits for it (the pop
    /// holds the connection throughout), so its snapshot has the pop's
    /// grant and the popped batch, of the earlier epoch, is not sent: the
    /// request reaches the new process once. Were the connection held only
    /// to read the epoch, the grant would be issued after the snapshot and
    /// the batch dropped as stale: the request would never be served.
    #[test]
    fn a_takeover_during_a_pop_waits_for_it_and_posts_what_it_popped() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let (old, new, engine, health) = restarting(&mem);
            let pause = Duration::from_millis(50);
            // With the queues held, the pop stops once it has the connection.
            let queues = lock(&engine.queues);
            let popping = std::thread::spawn({
                let engine = engine.clone();
                move || engine.pop_batch().unwrap()
            });
            std::thread::sleep(pause);
            let taking_over = std::thread::spawn({
                let (engine, client, runtime) = (engine.clone(), client(&new), tokio::runtime::Handle::current());
                move || {
                    let _context = runtime.enter();
                    engine.reconnect(client)
                }
            });
            std::thread::sleep(pause);
            drop(queues);
            let popped = popping.join().unwrap();
            taking_over.join().unwrap().unwrap();
            engine.send(popped);
            served_once_by(&new, &old, &health, &mem).await;
        });
    }

    /// Waits (a while at most) for `count` completions in the used ring.
    async fn completed(mem: &GuestMemoryMmap, count: usize) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while used(mem).len() < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        used(mem)
    }

    /// Memory unplugged after a request was posted cannot be written by its
    /// completion, whether the bytes come inline or staged: the engine
    /// writes through the map as it is when the answer comes. The request
    /// still completes (the guest's own loss), the device does not fail,
    /// and a buffer in RAM that stayed gets its bytes.
    #[test]
    fn a_completion_cannot_write_memory_unplugged_since_the_request_was_posted() {
        const HOT: u64 = 0x10_0000;
        for staged in [false, true] {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mem =
                    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(HOT), 0x1000)]).unwrap();
                let staging = staged.then(|| Arc::new(Staging::new().unwrap()));
                // SAFETY: dup of the area's own descriptor, owned at once.
                let area = staging.as_ref().map(|s| unsafe { File::from_raw_fd(libc::dup(s.fds().0)) });
                let fill = Some(area.map_or(Fill::Inline, |a| Fill::Staged(Arc::new(a))));
                let device = Recorder { fill, ..Default::default() };
                let (engine, health) = engine_staging(&mem, client(&device), staging);
                offer_buffer(&mem, 0, 0x5000, true);
                offer_buffer(&mem, 1, HOT + 0x100, true);
                let popped = engine.pop_batch().unwrap();
                assert_eq!(popped.requests.len(), 2);
                // The hot block leaves the map, as an unplug does, before the device answers.
                let (unplugged, _) = mem.remove_region(GuestAddress(HOT), 0x1000).unwrap();
                engine.context.memory.lock().unwrap().replace(unplugged);
                engine.send(popped);
                assert_eq!(completed(&mem, 2).await, [0, 1], "both requests complete ({staged})");
                assert!(!health.failed.load(Ordering::SeqCst), "{:?}", lock(&health.reason));
                let read = |addr| mem.read_obj::<[u8; 16]>(GuestAddress(addr)).unwrap();
                assert_eq!(read(0x5000), FILL, "the buffer in RAM was not written ({staged})");
                assert_eq!(read(HOT + 0x100), [0; 16], "unplugged memory was written ({staged})");
            });
        }
    }

    /// A held request that an earlier process completes on its memory
    /// channel once a restart has begun is not completed: the restart posts
    /// it again, and its new process's completion is the one that counts.
    #[test]
    fn a_held_completion_from_an_earlier_process_is_dropped() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _context = runtime.enter();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (engine, health) = engine(&mem, client(&Recorder::default()));
        offer(&mem, 5);
        let grant = engine.pop_batch().unwrap().requests[0].grant;
        let done = || Answer {
            completions: vec![CompletedRequest { grant, used_len: 0, writes: Vec::new() }],
            staged: Vec::new(),
            slot: None,
        };
        // The process died: a new generation begins before its grants go to the next.
        engine.context.access.new_generation();
        engine.complete_held(done(), 0).unwrap();
        assert!(used(&mem).is_empty(), "the dead process's completion was applied");
        assert_eq!(lock(&engine.context.access.grants).outstanding(), 1);
        engine.complete_held(done(), 1).unwrap();
        assert_eq!(used(&mem), [5]);
        assert!(!health.failed.load(Ordering::SeqCst), "{:?}", lock(&health.reason));
    }

    /// A reset stops the engine and takes back every grant; a pop that was
    /// already running (on the RPC thread) issues none after that.
    #[test]
    fn nothing_is_granted_once_a_reset_took_the_grants_back() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _context = runtime.enter();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (engine, _) = engine(&mem, client(&Recorder::default()));
        offer(&mem, 0);
        engine.stop();
        assert!(engine.pop_batch().unwrap().is_empty());
        assert_eq!(lock(&engine.context.access.grants).outstanding(), 0);
    }

    /// A pop that a broken chain ends gives back the posting slot its
    /// batch had filled: that batch is never posted, and a slot kept would
    /// be one fewer for every later batch of the process.
    #[test]
    fn a_batch_abandoned_on_a_broken_ring_gives_its_posting_slot_back() {
        const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _context = runtime.enter();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let staging = Arc::new(Staging::new().unwrap());
        let (engine, _) = engine_staging(&mem, client(&Recorder::default()), Some(staging.clone()));
        // A readable chain big enough to be staged, then one that leaves its table.
        offer(&mem, 0);
        mem.write_obj(MIN_STAGED_BYTES as u32, GuestAddress(DESC + 8)).unwrap();
        offer(&mem, 1);
        mem.write_obj(VRING_DESC_F_NEXT, GuestAddress(DESC + 16 + 12)).unwrap();
        mem.write_obj(QUEUE_SIZE, GuestAddress(DESC + 16 + 14)).unwrap();
        assert!(engine.pop_batch().is_err(), "the broken chain ends the pop");
        let free = std::iter::from_fn(|| staging.take_post_slot()).count();
        assert_eq!(free, STAGING_SLOTS as usize, "every posting slot is free again");
    }

    /// A pop that waits for the grant table while a reset stops the engine
    /// and takes the grants back issues none: it looks at `stopped` only
    /// once it holds the table. Looked at before, it would grant a request
    /// after the reset had taken every grant back.
    #[test]
    fn a_pop_waiting_on_the_grants_during_a_reset_issues_none() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _context = runtime.enter();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (engine, _) = engine(&mem, client(&Recorder::default()));
        offer(&mem, 0);
        let mut grants = lock(&engine.context.access.grants);
        let popping = std::thread::spawn({
            let engine = engine.clone();
            move || engine.pop_batch().unwrap().requests.len()
        });
        std::thread::sleep(Duration::from_millis(50));
        // `Engine::stop`'s two steps, the pop waiting on the table meanwhile.
        engine.stopped.store(true, Ordering::SeqCst);
        grants.revoke_all();
        drop(grants);
        assert_eq!(popping.join().unwrap(), 0, "the pop posts nothing");
        assert_eq!(lock(&engine.context.access.grants).outstanding(), 0, "a grant was issued after the reset");
    }

    #[test]
    fn a_direct_disk_driver_is_asked_to_notify_once_a_batch_is_available() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut queue = Queue::new(16).unwrap();
        queue.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
        queue.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
        queue.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
        queue.set_event_idx(true);
        queue.set_ready(true);
        let (avail_idx, avail_event) = (GuestAddress(0x2002), GuestAddress(0x3000 + 4 + 8 * 16));
        assert!(!notify_after(&mut queue, &mem, 8).unwrap());
        // The driver notifies when its index passes avail_event: at the 8th.
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 7);
        mem.write_obj(7u16, avail_idx).unwrap();
        assert!(!notify_after(&mut queue, &mem, 8).unwrap(), "seven wait for a completion or the eighth");
        mem.write_obj(8u16, avail_idx).unwrap();
        assert!(notify_after(&mut queue, &mem, 8).unwrap(), "a batch that came before the ask is taken now");
        // Around the index's wrap.
        queue.set_next_avail(u16::MAX - 2);
        mem.write_obj(u16::MAX, avail_idx).unwrap();
        assert!(!notify_after(&mut queue, &mem, 8).unwrap());
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 4);
    }
}
