//! The system calls a block device process makes in its steady state, and
//! nothing else. Every entry says why it is there.
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// Allowlist for a virtio-blk device process (all memory modes).
pub const BLOCK_DEVICE_SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_read, "RPC socket, queue-notify eventfd"),
    (libc::SYS_write, "RPC socket, irqfd, stderr"),
    (libc::SYS_writev, "RPC socket (framed writes)"),
    (libc::SYS_recvfrom, "RPC socket reads (tokio)"),
    (libc::SYS_epoll_wait, "tokio event loop"),
    (libc::SYS_epoll_ctl, "tokio event loop"),
    (libc::SYS_pread64, "disk reads"),
    (libc::SYS_pwrite64, "disk writes"),
    (libc::SYS_fdatasync, "VIRTIO_BLK_T_FLUSH"),
    (libc::SYS_fallocate, "VIRTIO_BLK_T_DISCARD and WRITE_ZEROES (punch a hole)"),
    (libc::SYS_futex, "tokio and allocator locks"),
    (libc::SYS_getrandom, "RPC trace ids (tarpc), hash seeds"),
    (libc::SYS_mmap, "allocator"),
    (libc::SYS_munmap, "allocator"),
    (libc::SYS_mremap, "allocator"),
    (libc::SYS_madvise, "allocator"),
    (libc::SYS_brk, "allocator"),
    (libc::SYS_rt_sigreturn, "return from a signal handler"),
    (libc::SYS_close, "the event loop's descriptors, dropped when the device stops"),
    (libc::SYS_sigaltstack, "Rust's runtime removes its signal stack as the process exits"),
    (libc::SYS_exit_group, "process exit"),
];

/// The compiled filter: default action kills the process with SIGSYS.
pub fn block_device_filter() -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        BLOCK_DEVICE_SYSCALLS.iter().map(|&(nr, _)| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())
}
