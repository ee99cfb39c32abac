//! The one place a VM's end is decided (the first exit request wins, and
//! every vCPU stops at its next exit once it has been made), and where it is
//! paused: vCPUs are kicked out of KVM_RUN and park until resumed.
use super::exit::VmExit;
use super::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long `pause` waits for every vCPU to park.
const PAUSE_DEADLINE: Duration = Duration::from_secs(2);

pub struct VmControl {
    stopping: AtomicBool,
    sender: Sender<VmExit>,
    receiver: Mutex<Receiver<VmExit>>,
    paused: AtomicBool,
    /// vCPUs parked right now, and the threads that run vCPUs.
    parked: Mutex<usize>,
    changed: Condvar,
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    /// Each vCPU thread's CPU-time clock, for the stats file.
    vcpu_clocks: Mutex<Vec<VcpuClock>>,
}

/// A vCPU thread's CPU clock, read one last time as the thread ends (a
/// clock of an ended thread cannot be read).
struct VcpuClock {
    clock: Option<libc::clockid_t>,
    final_time: Option<Duration>,
}

impl VcpuClock {
    fn read(&self) -> Duration {
        let Some(clock) = self.clock else { return Duration::ZERO };
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: reads a clock into a timespec we own.
        if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
            return Duration::ZERO;
        }
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }
}

impl VmControl {
    pub fn new() -> Self {
        let (sender, receiver) = channel();
        VmControl {
            stopping: AtomicBool::new(false),
            sender,
            receiver: Mutex::new(receiver),
            paused: AtomicBool::new(false),
            parked: Mutex::new(0),
            changed: Condvar::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            vcpu_clocks: Mutex::new(Vec::new()),
        }
    }

    pub fn register_vcpu_thread(&self, thread: libc::pthread_t) {
        lock(&self.vcpu_threads).push(thread);
    }

    /// Call on the vCPU thread itself, first thing; returns its slot.
    pub fn register_vcpu_clock(&self) -> usize {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: asks for the calling thread's own CPU clock.
        let live = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0;
        let mut clocks = lock(&self.vcpu_clocks);
        clocks.push(VcpuClock { clock: live.then_some(clock), final_time: None });
        clocks.len() - 1
    }

    /// Call on the vCPU thread itself, last thing: its clock dies with it.
    pub fn vcpu_thread_ending(&self, slot: usize) {
        let mut clocks = lock(&self.vcpu_clocks);
        if let Some(entry) = clocks.get_mut(slot) {
            entry.final_time = Some(entry.read());
        }
    }

    /// CPU time the vCPU threads used: the guest's own work plus exit handling.
    pub fn vcpu_cpu_time(&self) -> Duration {
        lock(&self.vcpu_clocks).iter().map(|c| c.final_time.unwrap_or_else(|| c.read())).sum()
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Stops every vCPU; returns once all are parked.
    pub fn pause(&self) -> Result<(), String> {
        if self.is_stopping() {
            return Err("the VM is stopping".into());
        }
        self.paused.store(true, Ordering::SeqCst);
        let threads = lock(&self.vcpu_threads).clone();
        threads.iter().for_each(|&t| super::vcpu::kick(t));
        let deadline = Instant::now() + PAUSE_DEADLINE;
        let mut parked = lock(&self.parked);
        while *parked < threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A refused pause changes nothing: let the parked ones go again.
                self.paused.store(false, Ordering::SeqCst);
                self.changed.notify_all();
                return Err(format!("only {} of {} vCPUs stopped in time", *parked, threads.len()));
            }
            parked = self.changed.wait_timeout(parked, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let _parked = lock(&self.parked);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread that saw `is_paused`: waits for resume or stop.
    pub fn park(&self) {
        let mut parked = lock(&self.parked);
        *parked += 1;
        self.changed.notify_all();
        while self.is_paused() && !self.is_stopping() {
            parked = self.changed.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
    }

    /// Asks the VM to stop for `reason`; later requests are ignored.
    pub fn request_exit(&self, reason: VmExit) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            tracing::debug!("exit requested: {reason:?}");
            // The receiver lives as long as self, so this cannot fail.
            let _ = self.sender.send(reason);
            let _parked = lock(&self.parked);
            self.changed.notify_all();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Blocks until the first exit request and returns it.
    pub fn wait(&self) -> VmExit {
        let receiver = lock(&self.receiver);
        receiver.recv().unwrap_or(VmExit::Crash { vcpu: 0, reason: "exit channel closed".into() })
    }
}
