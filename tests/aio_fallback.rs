//! A host that refuses io_uring (`kernel.io_uring_disabled`, as hardened
//! hosts set it): a `direct=on` disk falls back to its I/O threads with a
//! warning and keeps every byte, and `aio=io_uring` is a clear error. This
//! file is its own test binary because it changes a host-wide setting for
//! a moment (cargo runs test binaries one at a time).
mod common;
use common::*;

const SETTING: &str = "/proc/sys/kernel/io_uring_disabled";

/// Sets the host's io_uring switch, and puts it back when dropped.
struct IoUringDisabled(String);

impl IoUringDisabled {
    fn set(value: &str) -> Option<Self> {
        let old = std::fs::read_to_string(SETTING).ok()?;
        std::fs::write(SETTING, value).ok()?;
        Some(IoUringDisabled(old.trim().to_string()))
    }
}

impl Drop for IoUringDisabled {
    fn drop(&mut self) {
        let _ = std::fs::write(SETTING, &self.0);
    }
}

#[test]
fn without_io_uring_a_direct_disk_runs_on_threads_and_keeps_every_byte() {
    if !temp_dir_has_direct_io() {
        eprintln!("aio_fallback: NOT RUN: the temp dir has no O_DIRECT here");
        return;
    }
    let Some(_disabled) = IoUringDisabled::set("2") else {
        eprintln!("aio_fallback: NOT RUN: cannot set {SETTING} (not root, or a kernel without the switch)");
        return;
    };
    let path = temp_path("no-ring.img");
    std::fs::File::create(&path).unwrap().set_len(4 << 20).unwrap();
    let disk = |options: &str| format!("path={}{options}", path.display());
    for mode in ["rpc", "shared", "inprocess"] {
        let fallback = disk(",direct=on");
        let args = ["--memory", "64M", "--memory-mode", mode, "--disk", &fallback];
        let out = run_guest(&args, "scenario=blk-pattern seed=7");
        assert_eq!(out.code(), Some(0), "{mode}: {}", out.stderr);
        assert!(out.stderr.contains("no io_uring") && out.stderr.contains("run on threads"), "{mode}: {}", out.stderr);
        assert_pattern_on_disk(&path, 0, 7);

        let insisted = disk(",direct=on,aio=io_uring");
        let args = ["--memory", "64M", "--memory-mode", mode, "--disk", &insisted];
        let out = run_guest(&args, "scenario=blk-pattern seed=8");
        assert_ne!(out.code(), Some(0), "{mode}: {}", out.stdout);
        assert!(out.stderr.contains("aio=io_uring, but the kernel refuses a ring"), "{mode}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{mode}: {}", out.stderr);
    }
}
