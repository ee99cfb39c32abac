//! Leaving quickly. Destroying a KVM VM waits for several RCU grace periods
//! (10-25 ms on nested hosts), which would sit between the guest's last
//! instruction and skvm's exit. Instead, a tiny helper process that shares
//! skvm's memory and file table inherits the last references to the VM and
//! lets the kernel tear it down after skvm has exited.
use std::io::Write;

const REAPER_STACK_SIZE: usize = 16 * 1024;

/// The helper: drop stdio (so pipes reading skvm see EOF now), wait for
/// skvm to be gone (it must be the last sharer of the VM's descriptors, or
/// skvm's own exit would pay for the teardown), then exit.
/// Only raw system calls: it shares skvm's TLS and must not touch libc state.
extern "C" fn reaper(parent: *mut libc::c_void) -> libc::c_int {
    // SAFETY: closing descriptors, prctl, getppid, pause and exit touch no memory.
    unsafe {
        for fd in 0..3 {
            libc::syscall(libc::SYS_close, fd);
        }
        libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        // If skvm already exited, the death signal will never come.
        if libc::syscall(libc::SYS_getppid) == parent as libc::c_long {
            libc::syscall(libc::SYS_pause);
        }
        libc::syscall(libc::SYS_exit, 0);
    }
    0
}

/// Ends skvm with `status` without waiting for the VM's teardown.
pub fn exit_now(status: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // The stack is leaked on purpose: the helper outlives every Rust frame here.
    let stack = Box::leak(vec![0u8; REAPER_STACK_SIZE].into_boxed_slice());
    // SAFETY: the helper runs only `reaper` on its own stack; CLONE_VM keeps
    // that stack valid after this process exits, and no signal is asked for.
    unsafe {
        let top = stack.as_mut_ptr().add(REAPER_STACK_SIZE) as *mut libc::c_void;
        // If clone fails we simply pay for the teardown ourselves.
        let parent = libc::getpid() as usize as *mut libc::c_void;
        libc::clone(reaper, top, libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_FS, parent);
        libc::_exit(status as i32)
    }
}
