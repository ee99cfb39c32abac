//! Getting a vCPU thread out of KVM_RUN: a real-time signal whose handler
//! sets the thread's `immediate_exit`, so the kick is not lost even when it
//! lands just before the thread enters KVM_RUN.
use kvm_ioctls::VcpuFd;
use std::cell::Cell;
use std::ptr;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, once the thread runs a vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|flag| {
        let flag = flag.get();
        if !flag.is_null() {
            // SAFETY: points into this thread's kvm_run mapping, set by `arm`.
            unsafe { ptr::write_volatile(flag, 1) };
        }
    });
}

pub fn signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the handler (once per process).
pub fn install() -> Result<(), String> {
    register_signal_handler(signal(), on_kick).map_err(|e| format!("installing the vCPU kick handler: {e}"))
}

/// Points the handler at this thread's vCPU. Call on the vCPU thread.
pub fn arm(fd: &mut VcpuFd) {
    let run = fd.get_kvm_run();
    IMMEDIATE_EXIT.with(|flag| flag.set(ptr::addr_of_mut!(run.immediate_exit)));
}

/// Kicks one vCPU thread.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: the thread is a live vCPU thread of this process.
    unsafe { libc::pthread_kill(thread, signal()) };
}
