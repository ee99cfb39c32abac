//! Confinement for device processes. A device calls [`confine`] after it has
//! opened everything it needs and before it touches any guest data:
//!
//! 1. it dies with the VMM (`PR_SET_PDEATHSIG`);
//! 2. new user, mount, pid, ipc, net and uts namespaces, with an empty,
//!    read-only tmpfs as its root;
//! 3. resource limits: no new files, no core dumps, no locked memory;
//! 4. every capability dropped (effective, permitted, inheritable, ambient,
//!    bounding set) and `no_new_privs`;
//! 5. a seccomp-BPF allowlist whose default action kills the process.
mod seccomp;

#[cfg(test)]
pub use seccomp::under_filter;
pub use seccomp::{device_filter, DeviceFilter};

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("seccomp filter: {0}")]
    Seccomp(String),
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), SandboxError> {
    if rc < 0 {
        return Err(SandboxError::Step { step, source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Closes every descriptor except `keep` (which must be sorted).
pub fn close_other_fds(keep: &[RawFd]) -> Result<(), SandboxError> {
    let mut first = 0u32;
    for &fd in keep {
        if fd as u32 > first {
            // SAFETY: closing a range of descriptors we do not use.
            check("close_range", unsafe { libc::syscall(libc::SYS_close_range, first, fd as u32 - 1, 0) } as i32)?;
        }
        first = fd as u32 + 1;
    }
    // SAFETY: as above, up to the highest possible descriptor.
    check("close_range", unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) } as i32)
}

fn empty_root() -> Result<(), SandboxError> {
    let c = |s: &str| CString::new(s).unwrap();
    let (root, tmp, tmpfs, dot) = (c("/"), c("/tmp"), c("tmpfs"), c("."));
    let null = std::ptr::null();
    // SAFETY: plain mount-namespace syscalls on constant, NUL-terminated paths.
    unsafe {
        check("make / private", libc::mount(null, root.as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, null as _))?;
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let options = c("size=4k,mode=0555");
        check(
            "mount an empty root",
            libc::mount(tmpfs.as_ptr(), tmp.as_ptr(), tmpfs.as_ptr(), flags, options.as_ptr() as _),
        )?;
        check("chdir to the new root", libc::chdir(tmp.as_ptr()))?;
        check("pivot_root", libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as i32)?;
        check("detach the old root", libc::umount2(dot.as_ptr(), libc::MNT_DETACH))?;
        check("chdir /", libc::chdir(root.as_ptr()))?;
    }
    Ok(())
}

fn limit(resource: libc::__rlimit_resource_t, value: u64, step: &'static str) -> Result<(), SandboxError> {
    let rlim = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: valid pointer to a local rlimit.
    check(step, unsafe { libc::setrlimit(resource, &rlim) })
}

fn drop_capabilities() -> Result<(), SandboxError> {
    // SAFETY: prctl/capset with valid arguments; failures are reported.
    unsafe {
        for cap in 0..64 {
            // Caps beyond the kernel's last one fail with EINVAL: that is the end.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                break;
            }
        }
        check(
            "clear ambient capabilities",
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
        )?;
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        let header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
        check("capset", libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as i32)?;
    }
    Ok(())
}

/// Most private memory a device may have (heap and anonymous maps; the
/// guest-RAM memfd of `shared` mode is a shared map and does not count). A
/// device needs tens of MiB; a guest that drove it past this would only
/// cost that device its life.
const DATA_LIMIT: u64 = 512 << 20;

/// Confines the calling process; `open_fds` is how many descriptors it
/// holds (the limit on new ones), `max_file_size` the largest a file may
/// grow (a block device's disk size; 0 for the others). The process must be
/// single-threaded when it calls.
///
/// `start_threads`, if given, runs once the process is otherwise confined
/// (namespaces, limits, no capabilities, no_new_privs): the threads it
/// starts inherit all of that, and the filters then apply to every thread.
/// Such a process unshares no pid namespace: Linux refuses a thread in a
/// process that has. (Unsharing one moves only the caller's children, so
/// every device stays in skvm's; the filters forbid creating processes and
/// sending signals, which are what a pid namespace would bound.)
pub fn confine(
    filters: &dyn Fn() -> Result<Vec<seccompiler::BpfProgram>, String>,
    open_fds: u64,
    max_file_size: u64,
    start_threads: Option<&mut dyn FnMut() -> std::io::Result<()>>,
) -> Result<(), SandboxError> {
    // SAFETY: process-wide settings with valid arguments.
    unsafe {
        check("PR_SET_PDEATHSIG", libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        let mut namespaces =
            libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET | libc::CLONE_NEWUTS;
        if start_threads.is_none() {
            namespaces |= libc::CLONE_NEWPID;
        }
        check("unshare namespaces", libc::unshare(namespaces))?;
    }
    empty_root()?;
    limit(libc::RLIMIT_NOFILE, open_fds, "RLIMIT_NOFILE")?;
    limit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    limit(libc::RLIMIT_MSGQUEUE, 0, "RLIMIT_MSGQUEUE")?;
    limit(libc::RLIMIT_DATA, DATA_LIMIT, "RLIMIT_DATA")?;
    // A write past the limit fails with EFBIG instead of killing the device.
    // SAFETY: ignoring a signal; no handler runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    limit(libc::RLIMIT_FSIZE, max_file_size, "RLIMIT_FSIZE")?;
    drop_capabilities()?;
    // SAFETY: as above.
    check("no_new_privs", unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    if let Some(start) = start_threads {
        start().map_err(|e| SandboxError::Seccomp(format!("starting threads before the filter: {e}")))?;
    }
    // After the start: a disk's io_uring counts its rings as locked memory.
    limit(libc::RLIMIT_MEMLOCK, 0, "RLIMIT_MEMLOCK")?;
    // Built after the threads start: what they set up (a disk's ring) decides it.
    for filter in filters().map_err(SandboxError::Seccomp)? {
        seccompiler::apply_filter_all_threads(&filter).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}
