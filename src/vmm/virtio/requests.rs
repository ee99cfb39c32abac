//! The VMM's side of the request-level protocol (`rpc` mode): it owns the
//! queue's notifier, walks the ring with `virtio-queue` over its own mapping
//! of guest RAM, records a grant per chain, posts batches to the device and
//! applies the completions that come back: each write checked against its
//! grant, then the used ring, then the interrupt (honouring event-idx).
//!
//! Everything here runs on the VMM's RPC thread and never waits for a vCPU
//! (the transport's lock is not taken): a vCPU may be blocked on this very
//! thread in a control call.
use super::super::lock;
use super::grants::{Grant, GrantedBuffer};
use super::host::DeviceHealth;
use super::memory_service::DeviceAccess;
use rpc_schema::{
    CompletedRequest, DeviceControlClient, PostedBuffer, PostedRequest, QueueConfig, MAX_BATCH_BUFFERS,
    MAX_BATCH_INLINE, MAX_CHAIN_BUFFERS, MAX_INLINE_REQUEST,
};
use serde_bytes::ByteBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

/// How long a device may take over one batch before it counts as hung.
const BATCH_DEADLINE: Duration = rpc_schema::MAX_DEADLINE;

/// One active queue of a request-level device; dropping it stops the work
/// and revokes every outstanding grant.
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
}

struct Engine {
    context: QueueContext,
    queue: Mutex<Queue>,
    /// Reset or stopped: replies still on their way are dropped.
    stopped: AtomicBool,
}

impl RequestQueue {
    /// Checks the driver's queue and starts serving it on `runtime`.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        context: QueueContext,
        config: QueueConfig,
        max_size: u16,
        event_idx: bool,
    ) -> Result<Self, String> {
        let mut queue = Queue::new(max_size).map_err(|e| e.to_string())?;
        queue.try_set_size(config.size).map_err(|e| format!("queue size {}: {e}", config.size))?;
        queue.try_set_desc_table_address(GuestAddress(config.desc)).map_err(|e| format!("descriptor table: {e}"))?;
        queue.try_set_avail_ring_address(GuestAddress(config.avail)).map_err(|e| format!("avail ring: {e}"))?;
        queue.try_set_used_ring_address(GuestAddress(config.used)).map_err(|e| format!("used ring: {e}"))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(&*context.memory.memory()) {
            return Err("the queue's rings are not in guest RAM".into());
        }
        let notify = context.notify.try_clone().map_err(|e| e.to_string())?;
        let engine = Arc::new(Engine { context, queue: Mutex::new(queue), stopped: AtomicBool::new(false) });
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
                if !worker.pump() {
                    return;
                }
            }
        });
        Ok(RequestQueue { engine, task })
    }
}

impl Drop for RequestQueue {
    fn drop(&mut self) {
        self.engine.stopped.store(true, Ordering::SeqCst);
        self.task.abort();
        lock(&self.engine.context.access.grants).revoke_all();
    }
}

/// Why the VMM gave up on a device's queue.
fn broken(what: impl std::fmt::Display) -> String {
    format!("the guest broke its virtqueue: {what}")
}

impl Engine {
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
                Ok(batch) => {
                    access.batches.fetch_add(1, Ordering::Relaxed);
                    let engine = self.clone();
                    tokio::spawn(async move { engine.post(batch).await });
                }
                Err(reason) => {
                    self.fail(reason);
                    return false;
                }
            }
        }
    }

    /// Takes available chains into a batch within the batch limits, each
    /// checked and granted; empty when there are none (notifications are
    /// then re-enabled, and a chain that raced in is taken after all).
    fn pop_batch(&self) -> Result<Vec<PostedRequest>, String> {
        let memory = self.context.memory.memory();
        let mem = &*memory;
        let mut queue = lock(&self.queue);
        let mut grants = lock(&self.context.access.grants);
        let (mut batch, mut buffers, mut inline) = (Vec::new(), 0usize, 0u64);
        loop {
            let mut chains = queue.iter(mem).map_err(broken)?;
            let Some(chain) = chains.next() else {
                if !batch.is_empty() || !queue.enable_notification(mem).map_err(broken)? {
                    return Ok(batch);
                }
                continue;
            };
            let head = chain.head_index();
            let granted = collect(chain, head)?;
            if !batch.is_empty() && buffers + granted.len() > MAX_BATCH_BUFFERS {
                chains.go_to_previous_position();
                return Ok(batch);
            }
            buffers += granted.len();
            let posted: Vec<PostedBuffer> =
                granted.iter().map(|b| PostedBuffer { len: b.len, writable: b.writable }).collect();
            let in_ram = |b: &GrantedBuffer| GuestMemoryBackend::check_range(mem, GuestAddress(b.addr), b.len as usize);
            let faulty = granted.iter().any(|b| b.len > 0 && !in_ram(b));
            let readable_len: u64 = granted.iter().filter(|b| !b.writable).map(|b| b.len as u64).sum();
            let inlined = !faulty && readable_len <= MAX_INLINE_REQUEST;
            if inlined && inline + readable_len > MAX_BATCH_INLINE && !batch.is_empty() {
                // Its bytes would not fit this batch: it leads the next one.
                chains.go_to_previous_position();
                return Ok(batch);
            }
            let mut readable = Vec::new();
            if inlined {
                inline += readable_len;
                readable.reserve(readable_len as usize);
                for b in granted.iter().filter(|b| !b.writable) {
                    let at = readable.len();
                    readable.resize(at + b.len as usize, 0);
                    mem.read_slice(&mut readable[at..], GuestAddress(b.addr)).map_err(broken)?;
                }
            }
            self.context.access.bytes.fetch_add(readable.len() as u64, Ordering::Relaxed);
            let grant = grants.issue(Grant { head, buffers: granted });
            batch.push(PostedRequest { grant, buffers: posted, readable: ByteBuf::from(readable), faulty });
        }
    }

    /// Sends a batch and applies its completions; a device that does not
    /// answer, refuses, or breaks the protocol fails.
    async fn post(self: Arc<Self>, batch: Vec<PostedRequest>) {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + BATCH_DEADLINE;
        let reply = self.context.client.requests(ctx, batch).await;
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        let outcome = match reply {
            Ok(Ok(completions)) => self.complete(completions),
            Ok(Err(refused)) => Err(format!("it refused a batch: {refused}")),
            Err(e) => {
                // A dead process is the likely cause: give its watcher a
                // moment to record why before settling for the channel error.
                for _ in 0..40 {
                    if self.context.health.failed.load(Ordering::SeqCst) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(format!("control channel: {e}"))
            }
        };
        self.context.access.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(reason) = outcome {
            self.fail(reason);
        }
    }

    /// Revokes each completed grant, checks and applies its writes, and
    /// returns its chain to the driver; then interrupts if the driver asked.
    fn complete(&self, completions: Vec<CompletedRequest>) -> Result<(), String> {
        let memory = self.context.memory.memory();
        let mem = &*memory;
        let mut queue = lock(&self.queue);
        let mut moved = 0u64;
        for completion in completions {
            let protocol = |e: rpc_schema::MemoryError| format!("it broke the grant protocol: {e}");
            let id = completion.grant;
            let grant = lock(&self.context.access.grants).complete(id).map_err(protocol)?;
            if completion.used_len as u64 > grant.writable_len() {
                return Err(format!("it completed grant {id} with {} bytes used of {}", completion.used_len, {
                    grant.writable_len()
                }));
            }
            let mut writes = Vec::with_capacity(completion.writes.len());
            for w in &completion.writes {
                let addr = grant.resolve(id, w.buffer, w.offset, w.data.len() as u64, true).map_err(protocol)?;
                writes.push((addr, &w.data));
            }
            for (addr, data) in writes {
                // A buffer that is not RAM (any more) is the guest's own loss.
                if mem.write_slice(data, GuestAddress(addr)).is_ok() {
                    moved += data.len() as u64;
                }
            }
            queue.add_used(mem, grant.head, completion.used_len).map_err(broken)?;
        }
        self.context.access.bytes.fetch_add(moved, Ordering::Relaxed);
        if queue.needs_notification(mem).map_err(broken)? {
            let _ = self.context.irq.write(1);
        }
        Ok(())
    }
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
