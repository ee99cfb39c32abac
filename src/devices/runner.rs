//! A device's event loop, the same in every memory mode: serve the VMM's
//! control requests, wait for queue notifications (an ioeventfd), process
//! the queue through [`DeviceMemory`], and raise the interrupt (an irqfd).
use super::features;
use super::memory::{write_then, AccessError, DeviceMemory, Timed};
use super::virtqueue::Completion;
use super::virtqueue::{validate, QueueError, SplitQueue};
use super::Backend;
use futures::StreamExt;
use rpc_schema::{
    DeviceControl, DeviceControlRequest, DeviceControlResponse, DeviceCounters, DeviceError, DeviceInfo, DeviceState,
    QueueConfig, PROTOCOL_VERSION,
};
use serde_bytes::ByteBuf;
use std::sync::Arc;
use tarpc::server::{BaseChannel, Channel};
use tarpc::{ClientMessage, Response, Transport};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Mutex, Notify};
use vmm_sys_util::eventfd::EventFd;

struct Core<M> {
    mem: Timed<M>,
    backend: Backend,
    queue: Option<SplitQueue>,
    features: u64,
    irq: EventFd,
    counters: DeviceCounters,
}

impl<M: DeviceMemory> Core<M> {
    fn counters(&self) -> DeviceCounters {
        let mut counters = self.counters.clone();
        self.mem.report(&mut counters);
        counters
    }

    /// Serves one batch of requests; false when the driver had made none.
    async fn service(&mut self) -> Result<bool, QueueError> {
        let started = std::time::Instant::now();
        let result = self.serve_batch().await;
        self.counters.busy_ns += started.elapsed().as_nanos() as u64;
        result
    }

    async fn serve_batch(&mut self) -> Result<bool, QueueError> {
        let Core { mem, backend, queue, irq, counters, .. } = self;
        let Some(queue) = queue.as_mut() else { return Ok(false) };
        let (chains, prefetched) = queue.pop_all(mem).await?;
        if chains.is_empty() {
            return Ok(false);
        }
        let mut completions = backend.process(mem, chains, prefetched).await?;
        if !deliver_all(mem, queue, &completions).await? {
            // Some buffer the driver gave is not RAM (the VMM refused the
            // batch and wrote nothing): fail just those requests.
            for completion in completions.iter_mut().filter(|c| !c.data.is_empty()) {
                match mem.write(completion.data.clone()).await {
                    Ok(()) => completion.data.clear(),
                    Err(AccessError::Refused(_)) => completion.fail(),
                    Err(e) => return Err(e.into()),
                }
            }
            if !deliver_all(mem, queue, &completions).await? {
                return Err(QueueError::Memory(AccessError::Transport("the used ring is not in RAM".into())));
            }
        }
        counters.requests += completions.len() as u64;
        counters.errors += completions.iter().filter(|c| c.status_addr.is_some() && c.status != 0).count() as u64;
        // Always interrupt: polling drivers ignore it, interrupt-driven
        // ones tolerate a spurious one, and none can miss one.
        let _ = irq.write(1);
        Ok(true)
    }
}

/// Writes every completion's data and status, then the used ring, in one go
/// where it fits. Returns false (and leaves the queue as it was) when the
/// VMM refused part of it.
async fn deliver_all<M: DeviceMemory>(
    mem: &M,
    queue: &mut SplitQueue,
    completions: &[Completion],
) -> Result<bool, QueueError> {
    let before = queue.clone();
    let done: Vec<(u16, u32)> = completions.iter().map(|c| (c.head, c.used_len())).collect();
    let ring = queue.complete(&done);
    let data = completions.iter().flat_map(|c| c.data.iter().cloned().chain(c.status_write())).collect();
    match write_then(mem, data, ring).await {
        Ok(()) => Ok(true),
        Err(AccessError::Refused(_)) => {
            *queue = before;
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

struct Control<M> {
    core: Arc<Mutex<Core<M>>>,
    kick: Arc<Notify>,
    info: DeviceInfo,
}

impl<M> Clone for Control<M> {
    fn clone(&self) -> Self {
        Control { core: self.core.clone(), kick: self.kick.clone(), info: self.info.clone() }
    }
}

impl<M: DeviceMemory> Control<M> {
    fn queues(&self, features: u64, states: &[QueueConfig]) -> Result<SplitQueue, DeviceError> {
        let [config] = states else {
            return Err(DeviceError::BadQueue(format!("{} queues, the device has 1", states.len())));
        };
        validate(config, self.info.max_queue_size).map_err(DeviceError::BadQueue)?;
        Ok(SplitQueue::new(
            *config,
            features & features::RING_EVENT_IDX != 0,
            features & features::RING_INDIRECT_DESC != 0,
        ))
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
        let features = features & self.info.features;
        let queue = self.queues(features, &queues)?;
        let mut core = self.core.lock().await;
        core.features = features;
        core.queue = Some(queue);
        self.kick.notify_one();
        Ok(())
    }

    async fn write_config(self, _: tarpc::context::Context, offset: u32, data: ByteBuf) -> Result<(), DeviceError> {
        // Our devices' config spaces are read-only for the features we offer.
        Err(DeviceError::BadConfigAccess { offset, len: data.len() as u32 })
    }

    async fn reset(self, _: tarpc::context::Context) -> Result<(), DeviceError> {
        let mut core = self.core.lock().await;
        core.queue = None;
        core.features = 0;
        Ok(())
    }

    async fn save(self, _: tarpc::context::Context) -> Result<DeviceState, DeviceError> {
        // Holding the core means no request is half served; dropping the
        // queue means none starts here after the state is taken.
        let mut core = self.core.lock().await;
        let queue = core.queue.take().ok_or(DeviceError::NotActive)?;
        let counters = core.counters();
        Ok(DeviceState { features: core.features, queues: vec![queue.state()], counters })
    }

    async fn restore(self, _: tarpc::context::Context, state: DeviceState) -> Result<(), DeviceError> {
        let features = state.features & self.info.features;
        let [saved] = state.queues.as_slice() else {
            return Err(DeviceError::BadQueue("a saved state must hold exactly one queue".into()));
        };
        validate(&saved.config, self.info.max_queue_size).map_err(DeviceError::BadQueue)?;
        let queue = SplitQueue::restore(
            saved,
            features & features::RING_EVENT_IDX != 0,
            features & features::RING_INDIRECT_DESC != 0,
        );
        let mut core = self.core.lock().await;
        core.features = features;
        core.queue = Some(queue);
        core.mem.resume_from(&state.counters);
        core.counters = state.counters;
        self.kick.notify_one();
        Ok(())
    }

    async fn counters(self, _: tarpc::context::Context) -> DeviceCounters {
        self.core.lock().await.counters()
    }
}

/// Test-only work a device does before serving a notification.
pub type Hook = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
/// Called at every notification; the hook it returns, if any, runs first.
pub type OnNotify = Box<dyn FnMut() -> Option<Hook> + Send>;

/// Runs a device until its control channel closes (Ok) or its queue
/// breaks (Err with the reason). Must run on a tokio runtime.
pub async fn serve<M, T>(
    mem: M,
    backend: Backend,
    control: T,
    notify: EventFd,
    irq: EventFd,
    mut on_notify: Option<OnNotify>,
) -> Result<(), String>
where
    M: DeviceMemory,
    T: Transport<Response<DeviceControlResponse>, ClientMessage<DeviceControlRequest>> + Send + 'static,
{
    let info = backend.info();
    let core = Arc::new(Mutex::new(Core {
        mem: Timed::new(mem),
        backend,
        queue: None,
        features: 0,
        irq,
        counters: DeviceCounters::default(),
    }));
    let kick = Arc::new(Notify::new());
    let server = Control { core: core.clone(), kick: kick.clone(), info };
    let control_done = BaseChannel::with_defaults(control).execute(server.serve()).for_each(|response| async move {
        tokio::spawn(response);
    });
    // SAFETY: the eventfd is owned by the AsyncFd from here on and closed only with it.
    let notify = unsafe { AsyncFd::register(notify) }.map_err(|e| format!("cannot watch the queue notifier: {e}"))?;
    let queue_loop = async {
        loop {
            tokio::select! {
                guard = notify.readable() => {
                    let mut guard = guard.map_err(|e| format!("queue notifier failed: {e}"))?;
                    let _ = guard.get_inner().read();
                    guard.clear_ready();
                }
                _ = kick.notified() => {}
            }
            if let Some(hook) = on_notify.as_mut().and_then(|f| f()) {
                hook.await;
            }
            // A batch at a time, letting go of the core in between: a guest
            // that keeps its queue full must not keep `save` waiting.
            while core.lock().await.service().await.map_err(|e| format!("virtqueue: {e}"))? {}
        }
    };
    tokio::select! {
        _ = control_done => Ok(()),
        result = queue_loop => result,
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
            tokio::spawn(serve(memory, Backend::Rng(RngDevice), device_transport, notify, irq, None));
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
}
