//! The scheduling policy of the threads that move a network device's
//! frames: its process (or `inprocess` thread), and in the `rpc` modes its
//! own RPC thread in the VMM.
//!
//! On a small host the guest's vCPU holds one CPU, and the tap's sender,
//! the device and the VMM's RPC thread share the other. Under the default
//! policy each wake-up of one of them preempts whichever is running, so a
//! stream of frames becomes a switch per frame or two, each paid by both
//! sides, and a woken thread that lands on the vCPU's CPU preempts the vCPU.
//! `SCHED_BATCH` (sched(7)) keeps the fair share but does not preempt on
//! wake-up: the woken thread runs once the running one sleeps or its slice
//! ends, and finds several frames waiting. docs/benchmark-history.md ("Wake-ups and
//! `SCHED_BATCH`") has what it changed, and `skvm bench --net` the figures.

/// Puts the calling thread under `SCHED_BATCH` (threads it starts inherit
/// it); where the host refuses, `who` runs on under the default policy,
/// with a warning.
pub fn batch_this_thread(who: &str) {
    if let Err(e) = set_batch() {
        tracing::warn!("{who} keeps the default scheduling policy: {e}");
    }
}

fn set_batch() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; the parameter is valid for SCHED_BATCH.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's policy (`SCHED_*`).
#[cfg(test)]
fn this_thread_policy() -> i32 {
    // SAFETY: pid 0 is the calling thread.
    unsafe { libc::sched_getscheduler(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_put_under_batch_runs_under_batch_and_its_siblings_do_not() {
        let inside = std::thread::spawn(|| {
            set_batch().unwrap();
            let child = std::thread::spawn(this_thread_policy).join().unwrap();
            (this_thread_policy(), child)
        });
        assert_eq!(inside.join().unwrap(), (libc::SCHED_BATCH, libc::SCHED_BATCH), "the thread and what it starts");
        assert_eq!(this_thread_policy(), libc::SCHED_OTHER, "the rest of the process is untouched");
    }
}
