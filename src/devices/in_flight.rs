//! A `direct=on` disk's zero-copy transfers in flight, across batches: each
//! request completes (used ring, interrupt) as soon as its own transfer
//! ends, while new ones keep arriving, so a guest's queue depth reaches the
//! host disk. A transfer that overlaps one in flight that writes (or a write
//! over any) waits for it: a request is never seen half old, half new.
//!
//! Transfers go to the disk's io_uring where it has one (no hand-off
//! between threads), else to its I/O threads.
//!
//! A quarter of a deep queue is held back ([`Reserve`]): a host disk that
//! completes its queue together would otherwise sit idle while the guest
//! turns the completions around (an interrupt, its wake-up, its next
//! requests); the requests held back start the moment it finishes.
use super::blk::{clash, DiskIo};
use super::disk_ring::{DiskRing, Owner};
use super::io_threads::IoThreads;
use super::reserve::Reserve;
use super::zero_copy::{Plan, Served};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub struct InFlight {
    engine: Engine,
    /// (head, (offset, length, write)) of each transfer running.
    running: Vec<(u16, (u64, u64, bool))>,
    /// Transfers waiting for an overlapping one to end, in arrival order.
    waiting: VecDeque<Plan>,
    /// Transfers that failed to start, answered at the next reap.
    failed: Vec<Served>,
    reserve: Reserve,
}

enum Engine {
    Threads {
        threads: IoThreads,
        file: Arc<File>,
        report: Sender<Served>,
        done: Receiver<Served>,
        /// Wakes the device's event loop when a transfer ends.
        wake: Arc<Notify>,
    },
    Ring {
        ring: Arc<Mutex<DiskRing>>,
        /// Each submission's plan and what of it is done, by tag.
        slots: Vec<Option<Submitted>>,
    },
}

/// A plan on the ring: its pieces still to move, as iovecs the kernel reads.
struct Submitted {
    plan: Plan,
    iovecs: Vec<libc::iovec>,
    offset: u64,
}

// SAFETY: the iovecs name guest RAM the plan keeps mapped (see `Plan`).
unsafe impl Send for Submitted {}

impl InFlight {
    /// Transfers of `io`; `wake` is rung when one ends. Call on the
    /// device's event loop (a ring's completions are watched there).
    pub fn new(io: &DiskIo, file: Arc<File>, wake: Arc<Notify>) -> std::io::Result<InFlight> {
        let engine = match io {
            DiskIo::Ring(ring) => {
                watch_ring(ring, move || wake.notify_one())?;
                Engine::Ring { ring: ring.clone(), slots: Vec::new() }
            }
            DiskIo::Threads(threads) => {
                let (report, done) = channel();
                Engine::Threads { threads: threads.clone(), file, report, done, wake }
            }
        };
        let reserve = Reserve::default();
        Ok(InFlight { engine, running: Vec::new(), waiting: VecDeque::new(), failed: Vec::new(), reserve })
    }

    /// Whether transfers run on a ring: their ends can be watched without
    /// a system call, and no thread of ours needs the CPU meanwhile.
    pub fn on_ring(&self) -> bool {
        matches!(self.engine, Engine::Ring { .. })
    }

    /// Requests not yet completed.
    pub fn outstanding(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// As many transfers run as the reserve allows.
    fn full(&self) -> bool {
        self.running.len() >= self.reserve.limit()
    }

    fn blocked(&self, plan: &Plan) -> bool {
        self.running.iter().any(|r| clash(plan.extent(), r.1))
            || self.waiting.iter().any(|p| clash(plan.extent(), p.extent()))
    }

    /// Starts `plan`, or queues it behind an overlapping transfer or the
    /// reserve's limit (on a ring, it reaches the kernel at the next
    /// [`InFlight::submit`]).
    pub fn start(&mut self, plan: Plan) {
        self.reserve.seen(self.outstanding() + 1);
        if self.blocked(&plan) || self.full() {
            self.waiting.push_back(plan);
        } else {
            self.launch(plan);
        }
    }

    /// Starts `plan` (one that cannot start fails, answered at the next reap).
    fn launch(&mut self, plan: Plan) {
        let (head, extent) = (plan.head(), plan.extent());
        match &mut self.engine {
            Engine::Threads { threads, file, report, wake, .. } => {
                let (file, report, wake) = (file.clone(), report.clone(), wake.clone());
                threads.run(Box::new(move || {
                    let _ = report.send(plan.run(file.as_raw_fd()));
                    wake.notify_one();
                }));
            }
            Engine::Ring { ring, slots } => {
                let tag = slots.iter().position(Option::is_none).unwrap_or_else(|| {
                    slots.push(None);
                    slots.len() - 1
                });
                let iovecs = plan.iovecs();
                let offset = plan.extent().0;
                let slot = slots[tag].insert(Submitted { plan, iovecs, offset });
                let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: the slot keeps the iovecs, and the plan keeps the
                // guest RAM they name mapped, until the completion is taken.
                let (write, iovecs, offset) = (slot.plan.extent().2, &slot.iovecs, slot.offset);
                if unsafe { ring.push(Owner::InFlight, tag as u64, write, iovecs, offset) }.is_err() {
                    self.failed.extend(slots[tag].take().map(|s| s.plan.finish(false)));
                    return;
                }
            }
        }
        self.running.push((head, extent));
    }

    /// Hands what was started to the kernel: a batch's ring transfers in one call.
    pub fn submit(&mut self) {
        if let Engine::Ring { ring, .. } = &self.engine {
            // A failed submit leaves them queued; the next one (at the next
            // request or completion) retries.
            if let Err(e) = ring.lock().unwrap_or_else(|e| e.into_inner()).submit() {
                tracing::warn!("disk ring: submitting failed ({e}); will retry");
            }
        }
    }

    /// The transfers that have ended since the last call; starts the
    /// waiting ones they unblocked.
    pub fn reap(&mut self) -> Vec<Served> {
        let ended = self.ended(false);
        self.forget(&ended);
        self.submit();
        let mut all = std::mem::take(&mut self.failed);
        all.extend(ended);
        all
    }

    /// Waits for every transfer, running and waiting, to end.
    pub fn drain(&mut self) -> Vec<Served> {
        let mut all = std::mem::take(&mut self.failed);
        while self.outstanding() > 0 {
            let ended = self.ended(true);
            self.forget(&ended);
            self.submit();
            let stuck = ended.is_empty() && self.failed.is_empty() && self.running.is_empty();
            all.extend(ended);
            all.append(&mut self.failed);
            if stuck {
                break;
            }
        }
        all
    }

    /// Transfers that have ended; with `wait`, at least one if any runs.
    fn ended(&mut self, wait: bool) -> Vec<Served> {
        match &mut self.engine {
            Engine::Threads { done, .. } => {
                let mut ended: Vec<Served> = done.try_iter().collect();
                if wait && ended.is_empty() && !self.running.is_empty() {
                    ended.extend(done.recv().ok());
                }
                ended
            }
            Engine::Ring { ring, slots } => {
                let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                if wait && !self.running.is_empty() && ring.wait(Owner::InFlight, 1).is_err() {
                    return Vec::new();
                }
                let completions = ring.completions(Owner::InFlight);
                let mut ended = Vec::new();
                for (tag, result) in completions {
                    let Some(slot) = slots.get_mut(tag as usize) else { continue };
                    let Some(submitted) = slot.as_mut() else { continue };
                    match advance(submitted, result) {
                        Progress::Done(ok) => ended.extend(slot.take().map(|s| s.plan.finish(ok))),
                        Progress::More => {
                            // SAFETY: as in `launch`.
                            let (write, iovecs, offset) =
                                (submitted.plan.extent().2, &submitted.iovecs, submitted.offset);
                            if unsafe { ring.push(Owner::InFlight, tag, write, iovecs, offset) }.is_err() {
                                ended.extend(slot.take().map(|s| s.plan.finish(false)));
                            }
                        }
                    }
                }
                ended
            }
        }
    }

    fn forget(&mut self, ended: &[Served]) {
        self.reserve.ended(ended.len());
        for served in ended {
            if let Some(i) = self.running.iter().position(|r| r.0 == served.head) {
                self.running.swap_remove(i);
            }
        }
        // Start what no longer overlaps anything ahead of it.
        let mut still: VecDeque<Plan> = VecDeque::new();
        while let Some(plan) = self.waiting.pop_front() {
            let ahead = self.running.iter().map(|r| r.1).chain(still.iter().map(Plan::extent));
            if self.full() || ahead.into_iter().any(|other| clash(plan.extent(), other)) {
                still.push_back(plan);
            } else {
                self.launch(plan);
            }
        }
        self.waiting = still;
    }
}

/// Runs `wake` on the device's event loop whenever transfers on `ring`
/// have ended (its completion eventfd). Once per ring.
pub fn watch_ring(ring: &Mutex<DiskRing>, wake: impl Fn() + Send + 'static) -> std::io::Result<()> {
    let completed = ring.lock().unwrap_or_else(|e| e.into_inner()).take_completed();
    let completed = completed.ok_or_else(|| std::io::Error::other("the ring is watched already"))?;
    // SAFETY: the AsyncFd owns the eventfd and closes it only when dropped.
    let completed = unsafe { tokio::io::unix::AsyncFd::register(completed) }?;
    tokio::spawn(async move {
        while let Ok(mut ready) = completed.readable().await {
            let _ = ready.get_inner().read();
            ready.clear_ready();
            wake();
        }
    });
    Ok(())
}

enum Progress {
    Done(bool),
    More,
}

/// Takes a completion's bytes off the front of a submission's iovecs.
fn advance(submitted: &mut Submitted, result: i32) -> Progress {
    if result == -libc::EINTR || result == -libc::EAGAIN {
        return Progress::More;
    }
    if result <= 0 {
        // An error, or the end of a file someone truncated.
        return Progress::Done(false);
    }
    let mut moved = result as usize;
    submitted.offset += moved as u64;
    while moved > 0 && !submitted.iovecs.is_empty() {
        let first = &mut submitted.iovecs[0];
        if moved >= first.iov_len {
            moved -= first.iov_len;
            submitted.iovecs.remove(0);
        } else {
            // SAFETY: advancing within the piece.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(moved) }.cast();
            first.iov_len -= moved;
            moved = 0;
        }
    }
    if submitted.iovecs.is_empty() {
        Progress::Done(true)
    } else {
        Progress::More
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_transfer_goes_on_from_where_it_stopped() {
        let mut bytes = vec![0u8; 4096];
        let base = bytes.as_mut_ptr();
        let piece = |at: usize, len: usize| libc::iovec { iov_base: unsafe { base.add(at) }.cast(), iov_len: len };
        let iovecs = vec![piece(0, 1024), piece(1024, 3072)];
        let mut submitted = Submitted { plan: Plan::dummy(), iovecs, offset: 8192 };
        // 1,536 bytes moved: the rest is half the second piece.
        assert!(matches!(advance(&mut submitted, 1536), Progress::More));
        assert_eq!((submitted.offset, submitted.iovecs.len()), (8192 + 1536, 1));
        assert_eq!((submitted.iovecs[0].iov_base as usize - base as usize, submitted.iovecs[0].iov_len), (1536, 2560));
        assert!(matches!(advance(&mut submitted, -libc::EAGAIN), Progress::More), "tried again");
        assert!(matches!(advance(&mut submitted, 2560), Progress::Done(true)));
        let mut failed = Submitted { plan: Plan::dummy(), iovecs: vec![piece(0, 512)], offset: 0 };
        assert!(matches!(advance(&mut failed, -libc::EIO), Progress::Done(false)));
        assert!(matches!(advance(&mut failed, 0), Progress::Done(false)), "the end of the file");
    }
}
