//! The one place a VM's end is decided: the first exit request wins, and
//! every vCPU stops at its next exit once it has been made.
use super::exit::VmExit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

pub struct VmControl {
    stopping: AtomicBool,
    sender: Sender<VmExit>,
    receiver: Mutex<Receiver<VmExit>>,
}

impl VmControl {
    pub fn new() -> Self {
        let (sender, receiver) = channel();
        VmControl { stopping: AtomicBool::new(false), sender, receiver: Mutex::new(receiver) }
    }

    /// Asks the VM to stop for `reason`; later requests are ignored.
    pub fn request_exit(&self, reason: VmExit) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            tracing::debug!("exit requested: {reason:?}");
            // The receiver lives as long as self, so this cannot fail.
            let _ = self.sender.send(reason);
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Blocks until the first exit request and returns it.
    pub fn wait(&self) -> VmExit {
        let receiver = self.receiver.lock().unwrap_or_else(|e| e.into_inner());
        receiver.recv().unwrap_or(VmExit::Crash { vcpu: 0, reason: "exit channel closed".into() })
    }
}
