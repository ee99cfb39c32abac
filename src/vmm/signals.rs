//! SIGINT and SIGTERM end the VM through [`VmControl`] like any other exit.
use super::control::VmControl;
use super::exit::VmExit;
use super::{Error, Result};
use std::sync::Arc;

fn exit_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT/SIGTERM in the calling thread and every thread it spawns later.
pub fn block_exit_signals() -> Result<()> {
    let set = exit_signals();
    // SAFETY: valid set, no old mask requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Host("blocking SIGINT/SIGTERM".into(), std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Starts a thread that turns the first SIGINT/SIGTERM into a VM exit.
pub fn watch(control: Arc<VmControl>) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = exit_signals();
            let mut signal = 0;
            // SAFETY: valid set and out pointer; the signals are blocked in all threads.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                control.request_exit(VmExit::Signal(signal));
            }
        })
        .map(drop)
        .map_err(|e| Error::Host("starting the signal thread".into(), e))
}
