//! Device supervision: an `rpc`-mode device whose process dies comes back by
//! itself and the guest loses nothing; a device that dies over and over stays
//! down; in the modes where the device walks its own ring, a dead device
//! reports DEVICE_NEEDS_RESET instead.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

fn disk(name: &str) -> (PathBuf, String) {
    let path = temp_path(name);
    let _ = std::fs::remove_file(&path);
    std::fs::File::create(&path).unwrap().set_len(4 << 20).unwrap();
    let arg = format!("path={}", path.display());
    (path, arg)
}

/// Tells a guest running `blk-verify stop=1` to finish: its work then lasts
/// as long as the test needs, on a fast host or in the nested tier's emulator.
fn stop_verify(path: &Path) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(b"STOP", 1 << 20).unwrap();
}

/// `blk-verify: done ops=N errors=E corrupt=C hash=H` as (errors, corrupt, hash).
fn verify_report(console: &str) -> (u64, u64, String) {
    let line = console.lines().find(|l| l.starts_with("blk-verify: done")).unwrap_or_else(|| panic!("{console}"));
    let field = |key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap().to_string();
    (field("errors=").parse().unwrap(), field("corrupt=").parse().unwrap(), field("hash="))
}

/// Checks a `blk-verify` report: no errors, nothing corrupt, and the host
/// file holds what the guest recorded. `what` names the case in a failure.
fn assert_verified(console: &str, path: &Path, what: &str) {
    let (errors, corrupt, hash) = verify_report(console);
    assert_eq!((errors, corrupt), (0, 0), "{what}: {console}");
    assert_eq!(hash, first_mib_hash(path), "{what}: the host file differs from the guest's record");
}

/// Tells a guest running `blk-verify stop=1` to finish, and checks its report.
fn finish_verify(vm: &mut LiveVm, path: &Path, what: &str) {
    stop_verify(path);
    let console = vm.wait_console("blk-verify: done", LONG);
    assert_verified(&console, path, what);
}

/// The device process under skvm (its only child, started by any of its threads).
fn device_pid(vmm: u32) -> Option<i32> {
    child_pids(vmm).first().copied()
}

#[test]
fn a_device_killed_50_times_mid_io_loses_nothing_in_rpc_mode() {
    // With `direct=on` a kill also finds a batch's transfers on the disk's io_uring.
    let direct_here = temp_dir_has_direct_io();
    if !direct_here {
        eprintln!("supervision: NOT RUN: the direct=on half of the kill loop: the temp dir has no O_DIRECT");
    }
    for direct in [false, true].into_iter().filter(|&d| !d || direct_here) {
        killed_50_times(direct);
    }
}

fn killed_50_times(direct: bool) {
    let (path, mut arg) = disk(&format!("kill-loop-{direct}.img"));
    if direct {
        arg.push_str(",direct=on");
    }
    let args =
        ["--memory", "64M", "--disk", &arg, "--cmdline", "scenario=blk-verify ops=1000000000 qd=8 hold=1 stop=1"];
    let mut vm = LiveVm::start(&format!("kill-loop-{direct}"), &args);
    vm.wait_console("blk-verify: start", LONG);
    let (mut killed, mut last_killed) = (0, None);
    while killed < 50 {
        assert!(vm.child.try_wait().unwrap().is_none(), "skvm exited: {}\n{}", vm.console(), vm.stderr());
        std::thread::sleep(Duration::from_millis(50 + (killed * 7 % 50)));
        // A new process, not the one just killed (its restart takes a few ms).
        let Some(pid) = device_pid(vm.child.id()).filter(|&pid| Some(pid) != last_killed) else { continue };
        // SAFETY: kill(2) on skvm's device process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        (killed, last_killed) = (killed + 1, Some(pid));
        // The next kill waits for this restart to take over: a process killed
        // while it starts is replaced by the same restart (on a loaded host
        // the count then lags the kills).
        let deadline = std::time::Instant::now() + LONG;
        while vm.api("GET", "/vm", "").1["devices"][0]["restarts"].as_u64() < Some(killed) {
            assert!(std::time::Instant::now() < deadline, "restart {killed} never took over: {}", vm.stderr());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!vm.console().contains("blk-verify: done"), "the guest finished before 50 kills");
    }
    finish_verify(&mut vm, &path, &format!("killed 50 times, direct {direct}"));
    let (_, info) = vm.api("GET", "/vm", "");
    let blk = &info["devices"][0];
    assert_eq!(blk["healthy"], true, "{info}");
    assert_eq!(blk["restarts"], 50, "{info}");
    assert!(blk["last_failure"].as_str().unwrap().contains("killed by signal 9"), "{info}");
    // One recovery time per new process that served before the next kill.
    let recoveries = blk["recovery_ms"].as_array().unwrap().len();
    assert!((1..=50).contains(&recoveries), "{info}");
    let summary = run(&["ctl", "--api-socket", vm.socket.to_str().unwrap(), "info"]);
    assert!(summary.stdout.contains("restarted 50 times (last: process"), "{}", summary.stdout);
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn a_device_killed_by_its_seccomp_filter_mid_io_comes_back_in_rpc_mode() {
    let (path, arg) = disk("sigsys-mid-io.img");
    let args = [
        "--memory",
        "64M",
        "--disk",
        &arg,
        "--test-device-misbehave",
        "forbidden-syscall-mid-io",
        "--cmdline",
        "scenario=blk-verify ops=3000 qd=8 hold=1",
    ];
    let mut vm = LiveVm::start("sigsys-mid-io", &args);
    let console = vm.wait_console("blk-verify: done", LONG);
    assert_verified(&console, &path, "SIGSYS mid-I/O");
    let (_, info) = vm.api("GET", "/vm", "");
    let blk = &info["devices"][0];
    assert_eq!(blk["healthy"], true, "{info}");
    // Every new process dies the same way after its 100th batch: many restarts, none in a row.
    assert!(blk["restarts"].as_u64().unwrap() >= 3, "{info}");
    assert!(blk["last_failure"].as_str().unwrap().contains("SIGSYS"), "{info}");
    assert_eq!(vm.shutdown(), Some(0));
}

/// A device that stops answering (SIGSTOP here) does not hold up `GET /vm`:
/// the report comes without its counters, the device is not failed for
/// it, and once it runs again it carries on with nothing lost.
#[test]
fn a_stopped_device_does_not_hold_up_the_report() {
    let (path, arg) = disk("stopped-report.img");
    let args =
        ["--memory", "64M", "--disk", &arg, "--cmdline", "scenario=blk-verify ops=1000000000 qd=8 hold=1 stop=1"];
    let mut vm = LiveVm::start("stopped-report", &args);
    vm.wait_console("blk-verify: start", LONG);
    let pid = device_pid(vm.child.id()).expect("blk0 has a process");
    // SAFETY: stops and continues our own grandchild, the device process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    for _ in 0..3 {
        let (status, info) = vm.api("GET", "/vm", "");
        let blk = &info["devices"][0];
        assert_eq!((status, &blk["healthy"], blk["pid"].as_i64()), (200, &true.into(), Some(pid as i64)), "{info}");
        assert!(blk["counters"].is_null(), "a stopped device answered: {info}");
    }
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let deadline = std::time::Instant::now() + LONG;
    while vm.api("GET", "/vm", "").1["devices"][0]["counters"]["requests"].as_u64().unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "the device never answered again: {}", vm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    finish_verify(&mut vm, &path, "stopped and continued");
    let (_, info) = vm.api("GET", "/vm", "");
    assert_eq!(info["devices"][0]["restarts"], 0, "{info}");
    assert_eq!(vm.shutdown(), Some(0));
}

/// Durability: what the guest flushed is on the host file even if the whole
/// VMM is killed right after.
#[test]
fn flushed_writes_survive_kill_9_of_the_vmm() {
    let direct_here = temp_dir_has_direct_io();
    if !direct_here {
        eprintln!("supervision: NOT RUN: the direct=on half of the kill -9 check: the temp dir has no O_DIRECT");
    }
    for mode in ["rpc", "rpc-dma", "shared", "inprocess"] {
        for direct in [false, true].into_iter().filter(|&d| !d || direct_here) {
            let (path, mut arg) = disk(&format!("durable-{mode}-{direct}.img"));
            if direct {
                arg.push_str(",direct=on");
            }
            let args = [
                "--memory",
                "64M",
                "--memory-mode",
                mode,
                "--disk",
                &arg,
                "--cmdline",
                "scenario=blk-verify ops=3000 qd=8 hold=1",
            ];
            let mut vm = LiveVm::start(&format!("durable-{mode}-{direct}"), &args);
            let console = vm.wait_console("blk-verify: done", LONG);
            vm.child.kill().unwrap();
            vm.child.wait().unwrap();
            assert_verified(&console, &path, &format!("{mode}, direct {direct}, flushed, then kill -9 of the VMM"));
        }
    }
}

/// In the modes where the device walks its own ring, the VMM cannot know
/// which requests the dead process had taken: the device reports
/// DEVICE_NEEDS_RESET, never a silent loss, and comes back at the driver's
/// reset; a driver that posts again what it had not seen completed loses
/// nothing.
#[test]
fn a_killed_device_in_a_ring_walking_mode_comes_back_at_the_drivers_reset() {
    for mode in ["rpc-dma", "shared"] {
        let (path, arg) = disk(&format!("killed-{mode}.img"));
        let cmdline = "scenario=blk-verify ops=1000000000 qd=8 recover=1 hold=1 stop=1";
        let args = ["--memory", "64M", "--memory-mode", mode, "--disk", &arg, "--cmdline", cmdline];
        let mut vm = LiveVm::start(&format!("killed-{mode}"), &args);
        vm.wait_console("blk-verify: start", LONG);
        let mut last_killed = None;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(300));
            let pid = device_pid(vm.child.id()).filter(|&pid| Some(pid) != last_killed).expect("no new device process");
            // SAFETY: kill(2) on skvm's device process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            last_killed = Some(pid);
        }
        stop_verify(&path);
        let console = vm.wait_console("blk-verify: done", Duration::from_secs(300));
        assert_verified(&console, &path, mode);
        assert!(console.contains("resets=3 "), "{mode}: the guest did not see each death: {console}");
        let (_, info) = vm.api("GET", "/vm", "");
        assert_eq!(
            (&info["devices"][0]["healthy"], &info["devices"][0]["restarts"]),
            (&true.into(), &3.into()),
            "{info}"
        );
        assert_eq!(vm.shutdown(), Some(0));
    }
}

/// The driver's answer to DEVICE_NEEDS_RESET is a reset: after each way of
/// breaking the queue the device comes back (a fresh process, or thread)
/// and works, in every memory mode.
#[test]
fn a_reset_brings_a_failed_device_back_in_every_mode() {
    for mode in ["rpc", "rpc-dma", "shared", "inprocess"] {
        let (_, arg) = disk(&format!("recover-{mode}.img"));
        let stats = temp_path(&format!("recover-{mode}.json"));
        let args = ["--memory", "64M", "--memory-mode", mode, "--disk", &arg, "--stats-file", stats.to_str().unwrap()];
        let out = run_guest(&args, "scenario=blk-recover");
        assert_eq!(out.code(), Some(0), "{mode}: stdout {} stderr {}", out.stdout, out.stderr);
        for breakage in [
            "looping chain",
            "self-referencing indirect table",
            "bad indirect length",
            "over-long chain",
            "avail index jumping ahead",
            "rings outside RAM",
        ] {
            let line = format!("recover {breakage}: needs-reset true works-again true");
            assert!(out.stdout.contains(&line), "{mode}: {line}: {}", out.stdout);
        }
        assert!(out.stdout.contains("recover garbage notifications: needs-reset false works-again true"), "{mode}");
        let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        let blk = &stats["devices"][0];
        assert_eq!(blk["healthy"], true, "{mode}: {blk}");
        // Five ring breakages fail the device in every mode; rings outside RAM
        // fail activation (rpc) or the device (where it walks the ring itself).
        let restarts = blk["restarts"].as_u64().unwrap();
        assert!((5..=6).contains(&restarts), "{mode}: {blk}");
        assert!(blk["last_failure"].as_str().is_some(), "{mode}: {blk}");
    }
}
