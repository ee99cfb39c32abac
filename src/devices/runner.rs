//! A device's event loop, the same in every memory mode: serve the VMM's
//! control requests, wait for queue notifications (an ioeventfd), process
//! the queue through [`DeviceMemory`], and raise the interrupt (an irqfd).
use super::blk::{BlockDevice, Started, StartedBatch};
use super::features;
use super::in_flight::InFlight;
use super::memory::AccessError;
use super::memory::{DeviceMemory, Timed};
use super::net::{Held, RX_QUEUE, TX_QUEUE};
use super::poll_window::PollWindow;
use super::request::{stream_lengths, Reply, Request};
use super::staging::{Lease, StagingArea};
use super::virtqueue::{validate, Chain, QueueError, SplitQueue};
use super::{net_zero_copy, posted, ring, Backend};
use futures::StreamExt;
use rpc_schema::{
    Answer, CompletedRequest, DeviceControl, DeviceControlRequest, DeviceControlResponse, DeviceCounters, DeviceError,
    DeviceInfo, DeviceState, PostedRequest, QueueConfig, StagedWrite, PROTOCOL_VERSION,
};
use serde_bytes::ByteBuf;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tarpc::server::{BaseChannel, Channel};
use tarpc::{ClientMessage, Response, Transport};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Mutex, Notify};
use vmm_sys_util::eventfd::EventFd;

struct Core<M> {
    mem: Timed<M>,
    backend: Backend,
    /// Request level: where the VMM leaves posted bytes and we our answers.
    staging: Option<Arc<StagingArea>>,
    /// Ring-walking modes: the queues this device walks, once active (empty before).
    queues: Vec<SplitQueue>,
    /// A network device's receive buffers, held until frames come: chains
    /// it popped (ring-walking modes) or requests posted to it (`rpc`).
    rx_chains: VecDeque<Held<Chain>>,
    rx_posted: VecDeque<Held<PostedRequest>>,
    /// Request level: each queue's size (the device never learns where the rings are).
    queue_sizes: Vec<u16>,
    /// Request level: the VMM may post requests (activated, not reset).
    posting: bool,
    features: u64,
    /// Ring-walking modes: the interrupt to raise after completing.
    irq: Option<EventFd>,
    counters: DeviceCounters,
    /// Test-only work before serving the first notification or batch.
    on_notify: Option<OnNotify>,
    /// Test-only: rewrites the completions of posted batches.
    tamper: Option<Tamper>,
    /// A `direct=on` disk's zero-copy transfers in flight (mapped modes).
    in_flight: Option<InFlight>,
    /// Rung when a disk transfer in flight ends: by an I/O thread or the
    /// ring's watcher (one waiter in mapped modes; in `rpc`, every batch
    /// whose transfers run).
    io_done: Arc<Notify>,
    /// `rpc`: the disk ring's completions are watched (see `watch_disk`).
    disk_watched: bool,
    /// A network or console device sent something since polling last
    /// started: only then is its transmit queue worth watching.
    sent: bool,
    /// Ring-walking modes: the driver is told not to notify us of new
    /// receive buffers, because we hold some and look for more at every
    /// turn (input wakes us); only a device that runs out needs to hear.
    rx_quiet: bool,
    /// Ring-walking modes: the last turn received frames (see [`yields_to_sender`]).
    rx_streak: bool,
}

/// Test-only behaviour of a device, from `--test-device-misbehave`.
#[derive(Default)]
pub struct TestHooks {
    pub on_notify: Option<OnNotify>,
    pub tamper: Option<Tamper>,
    /// Rewrites each answer to a batch as it leaves.
    pub tamper_answer: Option<TamperAnswer>,
    /// Take this long to answer `activate` (a driver's vCPU waits on it).
    pub slow_activation: Option<std::time::Duration>,
}

impl<M: DeviceMemory> Core<M> {
    fn counters(&self) -> DeviceCounters {
        let mut counters = self.counters.clone();
        self.mem.report(&mut counters);
        if let Backend::Net(net) = &self.backend {
            counters.net = Some(net.counters.clone());
        }
        counters
    }

    /// Features negotiated: what device logic needs to know of them.
    fn set_features(&mut self, features: u64) {
        self.features = features;
        if let Backend::Net(net) = &mut self.backend {
            net.set_features(features);
        }
    }

    /// Forgets receive buffers held and a frame waiting for them.
    fn release_held(&mut self) -> usize {
        if let Backend::Net(net) = &mut self.backend {
            net.drop_pending();
        }
        self.rx_posted.clear();
        let held = self.rx_chains.len();
        self.rx_chains.clear();
        held
    }

    /// The device holds receive buffers that input could go to.
    fn wants_input(&self) -> bool {
        (!self.rx_chains.is_empty() || !self.rx_posted.is_empty()) && self.backend.input_open()
    }

    async fn run_hook(&mut self) {
        if let Some(hook) = self.on_notify.as_mut().and_then(|f| f()) {
            hook.await;
        }
    }

    /// Tells the driver to notify us of new requests on the polled queues
    /// (`on`), or not while we poll.
    async fn notifications(&mut self, on: bool) -> Result<(), QueueError> {
        self.notifications_of(self.polled(), on).await
    }

    async fn notifications_of(&mut self, which: std::ops::Range<usize>, on: bool) -> Result<(), QueueError> {
        let Core { mem, queues, .. } = self;
        for queue in queues.get_mut(which).unwrap_or_default() {
            mem.write(queue.notifications(on)).await?;
        }
        Ok(())
    }

    /// Every queue's driver notifies again (a restored device).
    async fn all_notifications_on(&mut self) -> Result<(), QueueError> {
        self.notifications_of(0..self.queues.len(), true).await?;
        self.rx_quiet = false;
        Ok(())
    }

    /// The queues polling watches: all of them, but only the transmit queue
    /// of a device whose input comes from the host (network, console): its
    /// receive buffers wait for input anyway.
    fn polled(&self) -> std::ops::Range<usize> {
        match self.backend.holds_receive_buffers() {
            true => TX_QUEUE as usize..TX_QUEUE as usize + 1,
            false => 0..self.queues.len(),
        }
    }

    /// Whether to poll after this turn: always for a disk, rng or mem; for a
    /// network or console device only after it sent something (polling
    /// after input took the CPU a host sender needed, cutting host-to-guest
    /// throughput by a third on this 2-CPU host).
    fn worth_polling(&mut self) -> bool {
        !self.backend.holds_receive_buffers() || std::mem::take(&mut self.sent)
    }

    /// Back to notifications after polling, then one more look: whether
    /// the driver posted just before it saw them back on (and so did not
    /// notify). The store, a full fence, then the load, as the driver does
    /// in the other order.
    async fn listen_again(&mut self) -> Result<bool, QueueError> {
        self.notifications(true).await?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(self.ring_has_new() == Some(true))
    }

    /// No notifications while we serve what woke us, where the rings are
    /// mapped here (a store, not a memory call): a driver posting meanwhile
    /// would pay an exit for each request, and a guest streaming frames
    /// kicked for two in five. [`Core::settle`] turns them back on.
    async fn hush(&mut self) -> Result<(), QueueError> {
        if self.mem.mapped().is_some() {
            self.notifications(false).await?;
        }
        Ok(())
    }

    /// Notifications back on before the device sleeps, serving (hushed)
    /// what the driver posted before it saw them, until a look finds none.
    async fn settle(&mut self) -> Result<(), QueueError> {
        while self.listen_again().await? {
            self.hush().await?;
            while self.service().await? {}
        }
        Ok(())
    }

    /// Whether any polled queue has requests the driver made available
    /// since the last pop, read from guest RAM mapped here; None where it is
    /// not (`rpc-dma` would need a memory call per look).
    fn ring_has_new(&self) -> Option<bool> {
        let mapped = self.mem.mapped()?;
        Some(self.queues.get(self.polled()).unwrap_or_default().iter().any(|queue| queue.has_new(&mapped)))
    }

    /// Serves one batch of requests; false when the driver had made none.
    async fn service(&mut self) -> Result<bool, QueueError> {
        let started = std::time::Instant::now();
        let result = match self.backend.holds_receive_buffers() {
            true => self.serve_rx_tx().await,
            false => self.serve_batch().await,
        };
        // Transfers that ended meanwhile complete now, not after the queue empties.
        let ended = self.complete_ended(false).await;
        self.counters.busy_ns += started.elapsed().as_nanos() as u64;
        ended.and(result)
    }

    async fn serve_batch(&mut self) -> Result<bool, QueueError> {
        let Core { mem, backend, queues, irq, counters, in_flight, io_done, .. } = self;
        let Some(queue) = queues.first_mut() else { return Ok(false) };
        let (chains, mut prefetched) = queue.pop_all(mem).await?;
        if chains.is_empty() {
            return Ok(false);
        }
        let chains = serve_zero_copy(mem, backend, queue, counters, in_flight, io_done, chains).await?;
        if chains.is_empty() {
            interrupt(irq, mem, std::slice::from_mut(queue), counters);
            return Ok(true);
        }
        let requests = ring::gather(mem, backend, &chains, &mut prefetched).await?;
        let replies = backend.serve(&requests).await?;
        let failed = ring::deliver(mem, queue, backend, &chains, &requests, &replies).await?;
        counters.requests += chains.len() as u64;
        counters.errors += failed;
        interrupt(irq, mem, std::slice::from_mut(queue), counters);
        Ok(true)
    }

    /// Completes the transfers in flight that have ended (all of them, and
    /// waiting for those still running, with `wait`).
    async fn complete_ended(&mut self, wait: bool) -> Result<(), QueueError> {
        let Core { mem, queues, irq, counters, in_flight, .. } = self;
        let Some(io) = in_flight.as_mut() else { return Ok(()) };
        let ended = if wait { io.drain() } else { io.reap() };
        let Some(queue) = queues.first_mut() else { return Ok(()) };
        if complete(mem, queue, counters, &ended).await? {
            interrupt(irq, mem, std::slice::from_mut(queue), counters);
        }
        Ok(())
    }

    /// A network or console device, ring-walking modes: sends what the
    /// driver queued to transmit, takes its new receive buffers, and fills
    /// them with input (frames from the tap). False when nothing moved.
    async fn serve_rx_tx(&mut self) -> Result<bool, QueueError> {
        let Core { mem, backend, queues, irq, counters, rx_chains, sent, rx_quiet, rx_streak, .. } = self;
        let [rx, tx] = queues.as_mut_slice() else { return Ok(false) };
        let mut moved = false;
        let (chains, mut prefetched) = tx.pop_all(mem).await?;
        if !chains.is_empty() {
            *sent = true;
            let (requests, replies) = match (&mut *backend, mem.mapped()) {
                (Backend::Net(net), Some(map)) => {
                    let requests = chains.iter().map(|c| Request::about(c.stream_lengths())).collect();
                    (requests, net_zero_copy::transmit(net, &map, &chains))
                }
                _ => {
                    let requests = ring::gather(mem, backend, &chains, &mut prefetched).await?;
                    let replies = backend.serve(&requests).await?;
                    (requests, replies)
                }
            };
            counters.errors += ring::deliver(mem, tx, backend, &chains, &requests, &replies).await?;
            counters.requests += chains.len() as u64;
            moved = true;
        }
        let transmitted = moved;
        // One look at the receive ring per turn (a pop takes up to 16 MiB of
        // buffers, more than a ring holds); what the driver adds later is
        // taken at the next turn, or comes with its notification once we
        // run out.
        let (chains, _) = rx.pop_all(mem).await?;
        rx_chains.extend(chains.into_iter().map(|chain| {
            let (_, capacity) = chain.stream_lengths();
            Held { buffer: chain, capacity }
        }));
        let ring_full = rx_chains.len() >= rx.state().config.size as usize;
        let (mut filled, dry) = match (&mut *backend, mem.mapped()) {
            (Backend::Net(net), Some(map)) => net_zero_copy::receive(net, &map, rx_chains, ring_full),
            _ => (Vec::new(), false),
        };
        if !dry {
            filled.extend(backend.receive(rx_chains, ring_full, u64::MAX));
        }
        let starving = rx_chains.is_empty() || backend.waits_for_buffers();
        let mut look_again = false;
        if starving == *rx_quiet {
            mem.write(rx.notifications(starving)).await?;
            *rx_quiet = !starving;
            // Back on: the driver may have posted just before it saw them,
            // so one more turn looks (the store, a fence, the load).
            look_again = starving;
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
        let received = filled.len();
        if received > 0 {
            let (chains, replies): (Vec<Chain>, Vec<_>) = filled.into_iter().unzip();
            let requests: Vec<Request> = chains.iter().map(|c| Request::about((0, c.stream_lengths().1))).collect();
            counters.errors += ring::deliver(mem, rx, backend, &chains, &requests, &replies).await?;
            // The frames' buffers serve the next frames.
            backend.recycle(replies);
            counters.requests += chains.len() as u64;
            moved = true;
        }
        if moved {
            interrupt(irq, mem, queues, counters);
        }
        if yields_to_sender(dry, received, *rx_streak, transmitted) {
            std::thread::yield_now();
        }
        *rx_streak = received > 0;
        Ok(moved || look_again)
    }

    /// Request level: fills held receive buffers with input (frames from
    /// the tap); their completions, within one reply's inline limit.
    fn receive_posted(&mut self, budget: u64) -> Vec<CompletedRequest> {
        let size = self.queue_sizes.get(RX_QUEUE as usize).copied().unwrap_or(u16::MAX);
        let ring_full = self.rx_posted.len() >= size as usize;
        let filled = self.backend.receive(&mut self.rx_posted, ring_full, budget);
        self.counters.requests += filled.len() as u64;
        filled
            .into_iter()
            .map(|(posted, reply)| CompletedRequest {
                grant: posted.grant,
                used_len: reply.used_len,
                writes: posted::buffer_writes(&posted.buffers, reply.writes),
            })
            .collect()
    }

    /// Request level: completes receive buffers filled outside a batch's
    /// answer, their bytes in a free slot of the answer area where there is
    /// one (else inline): the frames then cross with one copy in and one
    /// out, as a batch answer's do. The slot is free again once the VMM
    /// replies, and the frames' buffers take the next frames.
    async fn complete_held(
        &mut self,
        completions: Vec<CompletedRequest>,
        staging: Option<&StagingArea>,
    ) -> Result<(), AccessError> {
        let mut spent = Vec::new();
        let answer = match staging {
            Some(area) => area.stage(completions, &mut spent),
            None => Answer { completions, ..Default::default() },
        };
        let slot = answer.slot;
        let done = self.mem.complete(answer).await;
        // Whatever the reply, the VMM reads the slot no more.
        if let (Some(area), Some(slot)) = (staging, slot) {
            area.free(&[slot]);
        }
        if let Backend::Net(net) = &mut self.backend {
            net.recycle_bytes(spent.into_iter());
        }
        done
    }

    /// Request level: serves a batch the VMM posted, or starts it when it
    /// is a disk's transfers on its ring ([`super::blk::BlockDevice::start`]).
    async fn serve_posted(
        &mut self,
        batch: Vec<PostedRequest>,
        mut lease: Option<&mut Lease<'_>>,
    ) -> Result<Stage, DeviceError> {
        if !self.posting {
            return Err(DeviceError::NotActive);
        }
        self.run_hook().await;
        let started = std::time::Instant::now();
        let seen = self.tamper.is_some().then(|| batch.clone());
        // A network or console device holds its receive buffers for input to come.
        let (held, mut batch): (Vec<_>, Vec<_>) = match self.backend.holds_receive_buffers() {
            true => batch.into_iter().partition(|p| p.queue == RX_QUEUE),
            false => (Vec::new(), batch),
        };
        let mut given_back = Vec::new();
        for posted in held {
            let (_, capacity) = stream_lengths(&posted.buffers);
            if posted.faulty {
                given_back.push(CompletedRequest { grant: posted.grant, used_len: 0, writes: Vec::new() });
                if let Backend::Net(net) = &mut self.backend {
                    net.counters.rx_bad_buffers += 1;
                }
            } else {
                self.rx_posted.push_back(Held { buffer: posted, capacity });
            }
        }
        let failed = |e: AccessError| DeviceError::Failed(e.to_string());
        let staging = self.staging.as_deref();
        let requests = posted::requests(&self.mem, &self.backend, &mut batch, staging).await.map_err(failed)?;
        let posted = Posted { batch, requests, given_back, seen };
        let watched = self.watch_disk();
        let replies = match &mut self.backend {
            Backend::Block(blk) => match blk.start(&posted.requests, lease.as_deref_mut()) {
                Started::Served(replies) => replies,
                Started::Running(on_disk) if watched => {
                    self.counters.busy_ns += started.elapsed().as_nanos() as u64;
                    return Ok(Stage::OnDisk(posted, on_disk));
                }
                Started::Running(on_disk) => {
                    // Its end cannot be watched: wait for it here.
                    blk.wait_for(&on_disk);
                    blk.finish(on_disk, &posted.requests, lease)
                }
            },
            backend => backend.serve(&posted.requests).await.map_err(failed)?,
        };
        self.answer(posted, replies, started).await.map(Stage::Served)
    }

    /// Request level: answers a disk batch whose transfers have ended.
    async fn finish_posted(
        &mut self,
        posted: Posted,
        on_disk: StartedBatch,
        lease: Option<&mut Lease<'_>>,
    ) -> Result<Answered, DeviceError> {
        let started = std::time::Instant::now();
        let Backend::Block(blk) = &mut self.backend else {
            return Err(DeviceError::Failed("a disk batch on a device that is not a disk".into()));
        };
        let replies = blk.finish(on_disk, &posted.requests, lease);
        self.answer(posted, replies, started).await
    }

    /// Whether the end of a disk batch running on the ring wakes `io_done`
    /// (the ring's completions are watched from the first batch on).
    fn watch_disk(&mut self) -> bool {
        if self.disk_watched {
            return true;
        }
        let Backend::Block(blk) = &self.backend else { return false };
        let Some(super::blk::DiskIo::Ring(ring)) = blk.disk_io() else { return false };
        let done = self.io_done.clone();
        match super::in_flight::watch_ring(ring, move || done.notify_waiters()) {
            Ok(()) => self.disk_watched = true,
            Err(e) => tracing::warn!("cannot watch the disk ring ({e}): its batches wait in the kernel"),
        }
        self.disk_watched
    }

    /// Request level: a batch's completions from its replies.
    async fn answer(
        &mut self,
        posted: Posted,
        replies: Vec<Reply>,
        started: std::time::Instant,
    ) -> Result<Answered, DeviceError> {
        let Posted { batch, requests, given_back, seen } = posted;
        let count = batch.len() as u64 + given_back.len() as u64;
        let result = posted::answer(&self.mem, &mut self.backend, &batch, &requests, replies).await;
        self.counters.busy_ns += started.elapsed().as_nanos() as u64;
        let (mut completions, prestaged, failed) = result.map_err(|e| DeviceError::Failed(e.to_string()))?;
        completions.extend(given_back);
        let inline: u64 = completions.iter().flat_map(|c| &c.writes).map(|w| w.data.len() as u64).sum();
        completions.extend(self.receive_posted(rpc_schema::MAX_BATCH_INLINE.saturating_sub(inline)));
        self.counters.requests += count;
        self.counters.errors += failed;
        if let (Some(tamper), Some(batch)) = (self.tamper.as_mut(), seen) {
            completions = tamper(batch, completions).await;
        }
        Ok(Answered { completions, prestaged })
    }
}

/// A posted batch between being started and answered.
struct Posted {
    batch: Vec<PostedRequest>,
    requests: Vec<Request>,
    /// Receive buffers given back unused (faulty).
    given_back: Vec<CompletedRequest>,
    /// Test-only: the batch as posted, for the tamper hook.
    seen: Option<Vec<PostedRequest>>,
}

/// A batch's completions, and the bytes its reads left in the batch's
/// answer slot, as staged writes by grant (see [`Lease`]).
struct Answered {
    completions: Vec<CompletedRequest>,
    prestaged: Vec<(u64, Vec<StagedWrite>)>,
}

enum Stage {
    Served(Answered),
    /// A disk batch whose transfers run on the ring.
    OnDisk(Posted, StartedBatch),
}

/// Request level: serves a batch the VMM posted. A disk batch whose
/// transfers run on the ring waits for room among those running (a quarter
/// of a deep queue is held back, see [`super::blk`]'s `staged`), then lets
/// go of the core while they run, so the batches posted behind it start
/// meanwhile.
async fn serve_posted<M: DeviceMemory>(
    core: &Mutex<Core<M>>,
    batch: Vec<PostedRequest>,
    mut lease: Option<&mut Lease<'_>>,
) -> Result<Answered, DeviceError> {
    let waiting = {
        let mut core = core.lock().await;
        match core.watch_disk() {
            true => core.backend.block().and_then(|blk| blk.arrive(batch.len())),
            false => None,
        }
    };
    if let Some(waiting) = waiting {
        on_disk_until(core, |blk| blk.has_room(&waiting)).await;
    }
    let (posted, on_disk) = match core.lock().await.serve_posted(batch, lease.as_deref_mut()).await? {
        Stage::Served(answered) => return Ok(answered),
        Stage::OnDisk(posted, on_disk) => (posted, on_disk),
    };
    on_disk_until(core, |blk| blk.has_ended(&on_disk)).await;
    core.lock().await.finish_posted(posted, on_disk, lease).await
}

/// Waits until `ready`, asked of the disk (with the core held) at first and
/// whenever transfers on its ring end, says so.
async fn on_disk_until<M: DeviceMemory>(core: &Mutex<Core<M>>, mut ready: impl FnMut(&mut BlockDevice) -> bool) {
    let io_done = core.lock().await.io_done.clone();
    loop {
        let ended = io_done.notified();
        tokio::pin!(ended);
        // Listening before looking: an end between the two still wakes us.
        ended.as_mut().enable();
        if core.lock().await.backend.block().is_none_or(&mut ready) {
            return;
        }
        ended.await;
    }
}

/// Where guest RAM is mapped here, serves a batch's plain disk reads and
/// writes straight between the disk and guest memory; returns the chains
/// left for the copying path. (Requests in one batch are all in flight at
/// once, so serving some first reorders nothing a driver may rely on.) A
/// `direct=on` disk's transfers go to its I/O threads and complete as they
/// end ([`Core::complete_ended`]); the others complete here.
async fn serve_zero_copy<M: DeviceMemory>(
    mem: &Timed<M>,
    backend: &Backend,
    queue: &mut SplitQueue,
    counters: &mut DeviceCounters,
    in_flight: &mut Option<InFlight>,
    io_done: &Arc<Notify>,
    chains: Vec<super::virtqueue::Chain>,
) -> Result<Vec<super::virtqueue::Chain>, QueueError> {
    use std::os::fd::AsRawFd;
    let (Backend::Block(blk), Some(guest)) = (backend, mem.mapped()) else { return Ok(chains) };
    if in_flight.is_none() {
        // Without it (it cannot fail but for lack of descriptors) transfers run here, one by one.
        *in_flight = blk.disk_io().and_then(|io| InFlight::new(io, blk.file().clone(), io_done.clone()).ok());
    }
    let (mut rest, mut served) = (Vec::new(), Vec::new());
    let map = in_flight.is_some().then(|| guest.clone().into_inner());
    for chain in chains {
        match (super::zero_copy::plan(&guest, blk, &chain), in_flight.as_mut(), &map) {
            (Some(plan), Some(io), Some(map)) => io.start(plan.keeping(map.clone())),
            (Some(plan), _, _) => served.push(plan.run(blk.file().as_raw_fd())),
            (None, _, _) => rest.push(chain),
        }
    }
    if let Some(io) = in_flight.as_mut() {
        io.submit();
    }
    // Every transfer served here has ended: the map they used may go.
    drop(guest);
    complete(mem, queue, counters, &served).await?;
    Ok(rest)
}

/// Publishes zero-copy completions in the used ring; true if there were any.
async fn complete<M: DeviceMemory>(
    mem: &Timed<M>,
    queue: &mut SplitQueue,
    counters: &mut DeviceCounters,
    served: &[super::zero_copy::Served],
) -> Result<bool, QueueError> {
    if served.is_empty() {
        return Ok(false);
    }
    for s in served {
        mem.count_direct(s.out_bytes, s.in_bytes);
        counters.errors += u64::from(s.failed);
    }
    let done: Vec<(u16, u32)> = served.iter().map(|s| (s.head, s.used_len)).collect();
    mem.write(queue.complete(&done)).await?;
    counters.requests += served.len() as u64;
    counters.zero_copy_requests += served.len() as u64;
    Ok(true)
}

struct Control<M> {
    core: Arc<Mutex<Core<M>>>,
    kick: Arc<Notify>,
    info: DeviceInfo,
    /// Serves requests the VMM posts (`rpc`) rather than walking a ring.
    request_level: bool,
    /// Request level: where answers leave their bytes.
    staging: Option<Arc<StagingArea>>,
    tamper_answer: Option<Arc<std::sync::Mutex<TamperAnswer>>>,
    slow_activation: Option<std::time::Duration>,
}

impl<M> Clone for Control<M> {
    fn clone(&self) -> Self {
        Control {
            core: self.core.clone(),
            kick: self.kick.clone(),
            info: self.info.clone(),
            request_level: self.request_level,
            staging: self.staging.clone(),
            tamper_answer: self.tamper_answer.clone(),
            slow_activation: self.slow_activation,
        }
    }
}

impl<M: DeviceMemory> Control<M> {
    fn queues(&self, features: u64, configs: &[QueueConfig]) -> Result<Vec<SplitQueue>, DeviceError> {
        self.check_count(configs.len())?;
        configs
            .iter()
            .map(|config| {
                validate(config, self.info.max_queue_size).map_err(DeviceError::BadQueue)?;
                Ok(SplitQueue::new(
                    *config,
                    features & features::RING_EVENT_IDX != 0,
                    features & features::RING_INDIRECT_DESC != 0,
                ))
            })
            .collect()
    }

    fn check_count(&self, count: usize) -> Result<(), DeviceError> {
        if count != self.info.queue_count as usize {
            return Err(DeviceError::BadQueue(format!("{count} queues, the device has {}", self.info.queue_count)));
        }
        Ok(())
    }
}

impl<M: DeviceMemory> DeviceControl for Control<M> {
    async fn hello(self, _: tarpc::context::Context, version: u32) -> Result<DeviceInfo, DeviceError> {
        if version != PROTOCOL_VERSION {
            return Err(DeviceError::VersionMismatch { vmm: version, device: PROTOCOL_VERSION });
        }
        Ok(self.info.clone())
    }

    async fn activate(
        self,
        _: tarpc::context::Context,
        features: u64,
        queues: Vec<QueueConfig>,
    ) -> Result<(), DeviceError> {
        if let Some(delay) = self.slow_activation {
            tokio::time::sleep(delay).await;
        }
        let features = features & self.info.features;
        if self.request_level {
            // The VMM walks the rings: the device learns their sizes, never where they are.
            self.check_count(queues.len())?;
            if queues.iter().any(|q| q.desc != 0 || q.avail != 0 || q.used != 0) {
                return Err(DeviceError::BadQueue("a request-level device takes no queue addresses".into()));
            }
            let mut core = self.core.lock().await;
            core.set_features(features);
            core.queue_sizes = queues.iter().map(|q| q.size).collect();
            core.posting = true;
            return Ok(());
        }
        let queues = self.queues(features, &queues)?;
        let mut core = self.core.lock().await;
        core.set_features(features);
        core.queues = queues;
        core.rx_quiet = false;
        self.kick.notify_one();
        Ok(())
    }

    async fn write_config(self, _: tarpc::context::Context, offset: u32, data: ByteBuf) -> Result<(), DeviceError> {
        // Our devices' config spaces are read-only for the features we offer.
        Err(DeviceError::BadConfigAccess { offset, len: data.len() as u32 })
    }

    async fn reset(self, _: tarpc::context::Context) -> Result<(), DeviceError> {
        let mut core = self.core.lock().await;
        // No transfer may touch the driver's buffers after the reset.
        if let Some(io) = core.in_flight.as_mut() {
            io.drain();
        }
        core.queues.clear();
        core.release_held();
        core.posting = false;
        core.set_features(0);
        Ok(())
    }

    async fn save(self, _: tarpc::context::Context) -> Result<DeviceState, DeviceError> {
        // Holding the core means no request is half served; dropping the
        // queue means none starts here after the state is taken.
        let mut core = self.core.lock().await;
        // Transfers in flight end and complete first: the state includes them.
        core.complete_ended(true).await.map_err(|e| DeviceError::Failed(e.to_string()))?;
        if core.queues.is_empty() {
            return Err(DeviceError::NotActive);
        }
        let counters = core.counters();
        let mut states: Vec<_> = std::mem::take(&mut core.queues).iter().map(SplitQueue::state).collect();
        // Receive buffers held here go back to the ring: the next process takes them again.
        let held = core.release_held() as u16;
        if let Some(rx) = states.get_mut(RX_QUEUE as usize).filter(|_| held > 0) {
            rx.next_avail = rx.next_avail.wrapping_sub(held);
        }
        Ok(DeviceState { features: core.features, queues: states, counters })
    }

    async fn restore(self, _: tarpc::context::Context, state: DeviceState) -> Result<(), DeviceError> {
        let features = state.features & self.info.features;
        self.check_count(state.queues.len())?;
        let mut queues = Vec::with_capacity(state.queues.len());
        for saved in &state.queues {
            validate(&saved.config, self.info.max_queue_size).map_err(DeviceError::BadQueue)?;
            queues.push(SplitQueue::restore(
                saved,
                features & features::RING_EVENT_IDX != 0,
                features & features::RING_INDIRECT_DESC != 0,
            ));
        }
        let mut core = self.core.lock().await;
        core.set_features(features);
        core.queues = queues;
        // The device we replace may have stopped while it polled or held
        // receive buffers, with the driver told not to notify.
        core.all_notifications_on().await.map_err(|e| DeviceError::Failed(e.to_string()))?;
        core.mem.resume_from(&state.counters);
        if let (Backend::Net(net), Some(carried)) = (&mut core.backend, &state.counters.net) {
            net.counters = carried.clone();
        }
        core.counters = state.counters;
        self.kick.notify_one();
        Ok(())
    }

    async fn counters(self, _: tarpc::context::Context) -> DeviceCounters {
        self.core.lock().await.counters()
    }

    async fn requests(
        self,
        _: tarpc::context::Context,
        batch: Vec<PostedRequest>,
        freed: Vec<u8>,
    ) -> Result<Answer, DeviceError> {
        if let Some(area) = &self.staging {
            area.free(&freed);
        }
        // A disk's reads land straight in the answer's slot, taken now.
        let is_disk = self.info.device_id == super::blk::DEVICE_ID;
        let mut lease = self.staging.as_ref().filter(|_| is_disk).and_then(|area| area.lease());
        let answered = serve_posted(&self.core, batch, lease.as_mut()).await;
        // A network device may hold new receive buffers: its receive loop looks again.
        self.kick.notify_one();
        let Answered { completions, prestaged } = answered?;
        let mut spent = Vec::new();
        let mut answer = match (lease, &self.staging) {
            (Some(lease), _) => lease.answer(completions, prestaged, &mut spent),
            (None, Some(area)) => area.stage(completions, &mut spent),
            (None, None) => Answer { completions, ..Default::default() },
        };
        // Received frames' buffers, whose bytes are in the slot now, take
        // the next frames (a disk's just go: its core is not locked for them).
        if !spent.is_empty() && self.info.device_id == super::net::DEVICE_ID {
            if let Backend::Net(net) = &mut self.core.lock().await.backend {
                net.recycle_bytes(spent.into_iter());
            }
        }
        if let Some(tamper) = &self.tamper_answer {
            (tamper.lock().unwrap_or_else(|e| e.into_inner()))(&mut answer);
        }
        Ok(answer)
    }
}

/// How a device learns of work: its own queue notifier and interrupt (it
/// walks the ring), or batches the VMM posts over the control channel.
pub enum Doorbell {
    /// `poll`: how long to watch the ring after the last request, where
    /// guest RAM is mapped here (see [`poll_ring`]).
    Ring { notify: EventFd, irq: EventFd, poll: Duration },
    /// `staging`: where answers may leave their bytes (see [`StagingArea`]).
    Requests { staging: Option<StagingArea> },
}

/// Raises the interrupt for what the device completed on `queues`, unless
/// the driver said it wants none (see [`SplitQueue::wants_interrupt`]),
/// which the device reads where the rings are mapped here; in `rpc-dma` a
/// look would be a memory call, so it always raises it (a driver tolerates
/// a spurious interrupt, and none can miss one).
fn interrupt<M: DeviceMemory>(
    irq: &Option<EventFd>,
    mem: &Timed<M>,
    queues: &mut [SplitQueue],
    counters: &mut DeviceCounters,
) {
    let Some(irq) = irq else { return };
    let wanted = match mem.mapped() {
        // Every queue's decision, so each remembers where it stands.
        Some(mapped) => queues.iter_mut().fold(false, |any, queue| queue.wants_interrupt(&mapped) | any),
        None => true,
    };
    if wanted {
        counters.interrupts += 1;
        let _ = irq.write(1);
    }
}

/// Test-only work a device does before serving a notification.
pub type Hook = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
/// Test-only: given a posted batch and its honest completions, what to reply instead.
pub type Tamper = Box<
    dyn FnMut(
            Vec<PostedRequest>,
            Vec<CompletedRequest>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<CompletedRequest>> + Send>>
        + Send,
>;
/// Test-only: rewrites an answer to a batch before it is sent.
pub type TamperAnswer = Box<dyn FnMut(&mut Answer) + Send>;
/// Called at every notification; the hook it returns, if any, runs first.
pub type OnNotify = Box<dyn FnMut() -> Option<Hook> + Send>;

/// Runs a device until its control channel closes (Ok) or its queue
/// breaks (Err with the reason). Must run on a tokio runtime.
/// Whether a turn that read the tap `dry` lets the host's other threads run
/// before the next look. On a small host, where a polling guest's vCPU
/// holds a CPU, the tap's sender shares the other with this device; a
/// device that slept each time the tap ran dry was woken for every frame or
/// two, and a wake-up costs both sides (at 64 bytes, three times as many
/// sleeps as Firecracker's device and a quarter more CPU per frame). A
/// stream (several frames this turn, or one after a turn with frames and
/// no transmit between, as a request and its reply would have) gets the
/// sender's next frames in the time a yield takes, and the next look reads
/// them together; a lone frame or an exchange does not wait.
fn yields_to_sender(dry: bool, received: usize, streak: bool, transmitted: bool) -> bool {
    dry && (received > 1 || (received == 1 && streak && !transmitted))
}

pub async fn serve<M, T>(
    mem: M,
    mut backend: Backend,
    control: T,
    doorbell: Doorbell,
    hooks: TestHooks,
) -> Result<(), String>
where
    M: DeviceMemory,
    T: Transport<Response<DeviceControlResponse>, ClientMessage<DeviceControlRequest>> + Send + 'static,
{
    let info = backend.info();
    let (notify, irq, poll, staging) = match doorbell {
        Doorbell::Ring { notify, irq, poll } => (Some(notify), Some(irq), poll, None),
        Doorbell::Requests { staging } => (None, None, Duration::ZERO, staging.map(Arc::new)),
    };
    let io_done = Arc::new(Notify::new());
    let input = backend.take_watcher();
    let core = Arc::new(Mutex::new(Core {
        mem: Timed::new(mem),
        backend,
        staging: staging.clone(),
        queues: Vec::new(),
        rx_chains: VecDeque::new(),
        rx_posted: VecDeque::new(),
        queue_sizes: Vec::new(),
        posting: false,
        features: 0,
        irq,
        counters: DeviceCounters::default(),
        on_notify: hooks.on_notify,
        tamper: hooks.tamper,
        in_flight: None,
        io_done: io_done.clone(),
        disk_watched: false,
        sent: false,
        rx_quiet: false,
        rx_streak: false,
    }));
    let kick = Arc::new(Notify::new());
    let server = Control {
        core: core.clone(),
        kick: kick.clone(),
        info,
        request_level: notify.is_none(),
        staging: staging.clone(),
        tamper_answer: hooks.tamper_answer.map(|t| Arc::new(std::sync::Mutex::new(t))),
        slow_activation: hooks.slow_activation,
    };
    let control_done = BaseChannel::with_defaults(control).execute(server.serve()).for_each(|response| async move {
        tokio::spawn(response);
    });
    let input = match input {
        // SAFETY: the AsyncFd owns this descriptor of the input and closes it only when dropped.
        Some(file) => Some(unsafe { AsyncFd::register(file) }.map_err(|e| format!("cannot watch the input: {e}"))?),
        None => None,
    };
    let Some(notify) = notify else {
        let Some(input) = input else {
            control_done.await;
            return Ok(());
        };
        // Request level: input (frames from the tap) completes held receive requests.
        let receive_loop = async {
            loop {
                if core.lock().await.wants_input() {
                    tokio::select! {
                        guard = input.readable() => guard.map_err(|e| format!("input: {e}"))?.clear_ready(),
                        _ = kick.notified() => {}
                    }
                } else {
                    kick.notified().await;
                }
                let mut core = core.lock().await;
                loop {
                    let completions = core.receive_posted(rpc_schema::MAX_BATCH_INLINE);
                    if completions.is_empty() {
                        break;
                    }
                    let done = core.complete_held(completions, staging.as_deref()).await;
                    done.map_err(|e| format!("completing received frames: {e}"))?;
                }
            }
        };
        return tokio::select! {
            _ = control_done => Ok(()),
            result = receive_loop => result,
        };
    };
    // SAFETY: the eventfd is owned by the AsyncFd from here on and closed only with it.
    let notify = unsafe { AsyncFd::register(notify) }.map_err(|e| format!("cannot watch the queue notifier: {e}"))?;
    let mut learned = PollWindow::new(poll);
    let queue_loop = async {
        loop {
            let wants_input = input.is_some() && core.lock().await.wants_input();
            tokio::select! {
                guard = async { input.as_ref().unwrap().readable().await }, if wants_input => {
                    guard.map_err(|e| format!("input: {e}"))?.clear_ready();
                }
                guard = notify.readable() => {
                    let mut guard = guard.map_err(|e| format!("queue notifier failed: {e}"))?;
                    let _ = guard.get_inner().read();
                    guard.clear_ready();
                    // Only a notification with work behind it: one the driver
                    // sent while we polled may still be waiting here.
                    if core.lock().await.ring_has_new() == Some(true) {
                        learned.notified(Instant::now());
                    }
                }
                _ = kick.notified() => {}
                _ = io_done.notified() => {
                    core.lock().await.complete_ended(false).await.map_err(|e| format!("virtqueue: {e}"))?;
                    // The driver answers a completion with its next request: watch for it.
                    poll_ring(&core, &mut learned).await.map_err(|e| format!("virtqueue: {e}"))?;
                    continue;
                }
            }
            core.lock().await.run_hook().await;
            core.lock().await.hush().await.map_err(|e| format!("virtqueue: {e}"))?;
            // A batch at a time, letting go of the core in between: a guest
            // that keeps its queue full must not keep `save` waiting.
            while core.lock().await.service().await.map_err(|e| format!("virtqueue: {e}"))? {}
            poll_ring(&core, &mut learned).await.map_err(|e| format!("virtqueue: {e}"))?;
        }
    };
    tokio::select! {
        _ = control_done => Ok(()),
        result = queue_loop => result,
    }
}

/// Watches the rings for a window after the last request before going back
/// to sleep on the notifier, where guest RAM is mapped here (a look is a
/// load, not a memory call), serving what the driver posts meanwhile. A
/// driver that posts its next request within the window saves the device
/// a cross-CPU wake-up, tens of µs on nested hosts and most of a 4 KiB
/// request's latency; vhost-user backends poll the same way. It costs CPU
/// only within the window, and yields between looks so control requests
/// are answered; a window that finds nothing stops polling until it would
/// have helped again ([`PollWindow`]). Meanwhile the driver is told not to
/// notify (each notification is an exit); notifications come back on
/// before the device sleeps. It stops while transfers are in flight on the
/// I/O threads, which need the CPU more (their ends wake the device
/// anyway), and watches a ring's completions too. A network or console
/// device watches only its transmit queue, and only after the guest sent
/// (see `worth_polling`).
async fn poll_ring<M: DeviceMemory>(core: &Mutex<Core<M>>, learned: &mut PollWindow) -> Result<(), QueueError> {
    let window;
    {
        let mut core = core.lock().await;
        if core.ring_has_new().is_none() {
            // Not mapped here: notifications never went off.
            return Ok(());
        }
        if !core.worth_polling() {
            return core.settle().await;
        }
        // Transfers on a ring end soon, and the driver answers their ends at
        // once: watch through them whatever the window learned (a disk's
        // latency outlasts the window, so waiting for the driver alone would
        // never turn polling back on, and each request would cost two
        // wake-ups).
        let transferring = core.in_flight.as_ref().is_some_and(|io| io.on_ring() && io.outstanding() > 0);
        window = if transferring { learned.max() } else { learned.window() };
        if window.is_zero() {
            core.settle().await?;
            learned.asleep(Instant::now(), false);
            return Ok(());
        }
    }
    let mut until = Instant::now() + window;
    let mut told = false;
    loop {
        {
            let mut core = core.lock().await;
            let in_flight = core.in_flight.as_ref().map_or(0, |io| io.outstanding());
            let on_ring = core.in_flight.as_ref().is_some_and(InFlight::on_ring);
            if in_flight > 0 && !on_ring {
                // The threads need the CPU: back to notifications.
                core.settle().await?;
                learned.asleep(Instant::now(), false);
                return Ok(());
            }
            if !told {
                // We are looking anyway: the driver's notifications would only cost it exits.
                core.notifications(false).await?;
                told = true;
            }
            if in_flight > 0 {
                // Transfers on a ring: watch for their ends too.
                until = Instant::now() + window;
            }
            if Instant::now() >= until {
                // A window passed with nothing from the driver (what it posts
                // as notifications come back on is served, but does not count:
                // on a busy CPU this loop may not have looked for a while).
                core.settle().await?;
                learned.asleep(Instant::now(), true);
                return Ok(());
            }
            if core.backend.holds_receive_buffers() {
                // Input from the host is served as it comes, but only what the
                // driver sends keeps the window open.
                while core.service().await? {}
                if core.worth_polling() {
                    until = Instant::now() + window;
                }
            } else if core.ring_has_new() == Some(true) {
                while core.service().await? {}
                until = Instant::now() + window;
            } else {
                core.complete_ended(false).await?;
            }
        }
        // Other tasks first, then other threads on this CPU (on a small host
        // a poller must not starve whoever feeds its input).
        tokio::task::yield_now().await;
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::memory::MappedMemory;
    use crate::devices::rng::RngDevice;
    use rpc_schema::{DeviceControlClient, QueueState};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    #[test]
    fn control_activates_saves_restores_and_resets() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let (vmm_end, device_end) = std::os::unix::net::UnixStream::pair().unwrap();
            let device_transport = rpc_schema::transport(device_end).unwrap();
            let (notify, irq) = (EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
            let memory = MappedMemory::new(GuestMemoryAtomic::new(mem.clone()));
            tokio::spawn(serve(
                memory,
                Backend::Rng(RngDevice),
                device_transport,
                Doorbell::Ring { notify, irq, poll: Duration::ZERO },
                TestHooks::default(),
            ));
            let client = DeviceControlClient::new(Default::default(), rpc_schema::transport(vmm_end).unwrap()).spawn();
            let ctx = tarpc::context::current;

            let info = client.hello(ctx(), PROTOCOL_VERSION).await.unwrap().unwrap();
            assert_eq!(info.device_id, crate::devices::rng::DEVICE_ID);
            assert!(matches!(
                client.hello(ctx(), PROTOCOL_VERSION + 1).await.unwrap(),
                Err(DeviceError::VersionMismatch { .. })
            ));
            assert!(matches!(client.save(ctx()).await.unwrap(), Err(DeviceError::NotActive)));

            let queue = QueueConfig { index: 0, size: 16, desc: 0x1000, avail: 0x2000, used: 0x3000 };
            let odd = QueueConfig { size: 3, ..queue };
            assert!(matches!(
                client.activate(ctx(), info.features, vec![odd]).await.unwrap(),
                Err(DeviceError::BadQueue(_))
            ));
            client.activate(ctx(), info.features, vec![queue]).await.unwrap().unwrap();
            let state = client.save(ctx()).await.unwrap().unwrap();
            assert_eq!(state.queues, vec![QueueState { config: queue, next_avail: 0, next_used: 0 }]);
            // Saving stops the device: a second save finds nothing active.
            assert!(matches!(client.save(ctx()).await.unwrap(), Err(DeviceError::NotActive)));

            // A rebuilt device carries on where the old one stopped.
            mem.write_obj(5u16, GuestAddress(queue.avail + 2)).unwrap();
            let moved = DeviceState {
                counters: DeviceCounters {
                    requests: 7,
                    errors: 1,
                    memory_calls: 3,
                    memory_latency_log2_us: vec![0; rpc_schema::LATENCY_BUCKETS],
                    ..Default::default()
                },
                features: state.features,
                queues: vec![QueueState { config: queue, next_avail: 5, next_used: 5 }],
            };
            client.restore(ctx(), moved.clone()).await.unwrap().unwrap();
            // The restored device may already have looked at its (empty) queue,
            // which adds memory calls but no requests.
            let carried = |c: &DeviceCounters| c.requests == 7 && c.errors == 1 && c.memory_calls >= 3;
            let counters = client.counters(ctx()).await.unwrap();
            assert!(carried(&counters), "{counters:?}");
            let saved = client.save(ctx()).await.unwrap().unwrap();
            assert_eq!((saved.features, &saved.queues), (moved.features, &moved.queues));
            assert!(carried(&saved.counters), "{:?}", saved.counters);

            client.reset(ctx()).await.unwrap().unwrap();
            assert!(matches!(client.save(ctx()).await.unwrap(), Err(DeviceError::NotActive)));
        });
    }

    /// A stream from the host yields to its sender; a lone frame, an
    /// exchange (a frame, the guest's reply, the next frame) and a turn
    /// that did not run the tap dry do not.
    #[test]
    fn only_a_stream_that_ran_the_tap_dry_yields_to_its_sender() {
        // (dry, received this turn, the last turn received, transmitted this turn)
        assert!(yields_to_sender(true, 8, false, false), "a burst");
        assert!(yields_to_sender(true, 2, false, true), "a burst, whatever the guest sent");
        assert!(yields_to_sender(true, 1, true, false), "one frame after a turn with frames");
        assert!(!yields_to_sender(true, 1, false, false), "a lone frame");
        assert!(!yields_to_sender(true, 1, true, true), "the next request after the guest's reply");
        assert!(!yields_to_sender(true, 0, true, false), "nothing came");
        assert!(!yields_to_sender(false, 8, true, false), "the tap still has frames (the buffers ran out)");
    }
}
