//! A fixed set of threads that run a device's disk transfers, so that a
//! guest's queue depth reaches the host disk (`direct=on` disks, where each
//! transfer waits on the device). They are started before the seccomp filter
//! applies (it then covers them too) and never start anything themselves.
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Barrier, Mutex};

pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct IoThreads {
    jobs: Sender<Job>,
}

impl IoThreads {
    /// `count` threads named `name-ioN`. With `outlive_jobs` they never end,
    /// even when the last sender goes: in a sandboxed device process a
    /// thread's exit makes system calls the filter does not allow, and the
    /// process's own exit ends them anyway.
    pub fn start(count: usize, name: &str, outlive_jobs: bool) -> std::io::Result<IoThreads> {
        let (jobs, queue) = channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        // Returns only once every thread runs: a thread's own start-up
        // (rseq, signal stack) must be over before a seccomp filter applies.
        let started = Arc::new(Barrier::new(count + 1));
        for i in 0..count {
            let (queue, started) = (queue.clone(), started.clone());
            // Transfers need little stack; RLIMIT_DATA counts what they get.
            std::thread::Builder::new().name(format!("{name}-io{i}")).stack_size(128 << 10).spawn(move || {
                started.wait();
                loop {
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) if outlive_jobs => loop {
                            std::thread::park();
                        },
                        Err(_) => return,
                    }
                }
            })?;
        }
        started.wait();
        Ok(IoThreads { jobs })
    }

    /// Queues `job` (runs it here if the threads are gone, so it always runs).
    pub fn run(&self, job: Job) {
        if let Err(unsent) = self.jobs.send(job) {
            (unsent.0)();
        }
    }
}
