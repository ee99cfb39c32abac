//! A `direct=on` disk's zero-copy transfers in flight on its I/O threads,
//! across batches: each request completes (used ring, interrupt) as soon as
//! its own transfer ends, while new ones keep arriving, so a guest's queue
//! depth reaches the host disk. A transfer that overlaps one in flight that
//! writes (or a write over any) waits for it: a request is never seen half
//! old, half new.
use super::blk::clash;
use super::io_threads::IoThreads;
use super::zero_copy::{Plan, Served};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use tokio::sync::Notify;

pub struct InFlight {
    threads: IoThreads,
    file: Arc<File>,
    report: Sender<Served>,
    done: Receiver<Served>,
    /// Wakes the device's event loop when a transfer ends.
    wake: Arc<Notify>,
    /// (head, (offset, length, write)) of each transfer running.
    running: Vec<(u16, (u64, u64, bool))>,
    /// Transfers waiting for an overlapping one to end, in arrival order.
    waiting: VecDeque<Plan>,
}

impl InFlight {
    pub fn new(threads: IoThreads, file: Arc<File>, wake: Arc<Notify>) -> InFlight {
        let (report, done) = channel();
        InFlight { threads, file, report, done, wake, running: Vec::new(), waiting: VecDeque::new() }
    }

    /// Requests not yet completed.
    pub fn outstanding(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    fn blocked(&self, plan: &Plan) -> bool {
        self.running.iter().any(|r| clash(plan.extent(), r.1))
            || self.waiting.iter().any(|p| clash(plan.extent(), p.extent()))
    }

    /// Starts `plan` on a thread, or queues it behind an overlapping transfer.
    pub fn start(&mut self, plan: Plan) {
        if self.blocked(&plan) {
            self.waiting.push_back(plan);
        } else {
            self.launch(plan);
        }
    }

    fn launch(&mut self, plan: Plan) {
        self.running.push((plan.head(), plan.extent()));
        let (file, report, wake) = (self.file.clone(), self.report.clone(), self.wake.clone());
        self.threads.run(Box::new(move || {
            let _ = report.send(plan.run(file.as_raw_fd()));
            wake.notify_one();
        }));
    }

    /// The transfers that have ended since the last call; starts the
    /// waiting ones they unblocked.
    pub fn reap(&mut self) -> Vec<Served> {
        let ended: Vec<Served> = self.done.try_iter().collect();
        self.forget(&ended);
        ended
    }

    /// Waits for every transfer, running and waiting, to end.
    pub fn drain(&mut self) -> Vec<Served> {
        let mut ended = Vec::new();
        while self.outstanding() > 0 {
            let Ok(served) = self.done.recv() else { break };
            self.forget(std::slice::from_ref(&served));
            ended.push(served);
        }
        ended
    }

    fn forget(&mut self, ended: &[Served]) {
        for served in ended {
            if let Some(i) = self.running.iter().position(|r| r.0 == served.head) {
                self.running.swap_remove(i);
            }
        }
        // Start what no longer overlaps anything ahead of it.
        let mut still: VecDeque<Plan> = VecDeque::new();
        while let Some(plan) = self.waiting.pop_front() {
            let ahead = self.running.iter().map(|r| r.1).chain(still.iter().map(Plan::extent));
            if ahead.into_iter().any(|other| clash(plan.extent(), other)) {
                still.push_back(plan);
            } else {
                self.launch(plan);
            }
        }
        self.waiting = still;
    }
}
