//! Device supervision benchmark (`rpc` mode): how long a crashed device
//! takes to serve again. The test guest runs verified 4 KiB writes and
//! read-backs at queue depth 8 while this harness kills the disk's device
//! process every 100 ms; skvm reports, per restart, the time from seeing
//! the death to the first batch the new process completed.
//!
//! Run with `cargo bench --bench restart`. Prints the median and spread, and
//! the guest's verdict on its I/O.
#[path = "../tests/common/mod.rs"]
mod common;

use common::{child_pids, LiveVm};
use std::time::Duration;

const KILLS: usize = 40;

fn device_pid(vmm: u32) -> Option<i32> {
    child_pids(vmm).first().copied()
}

fn main() {
    let disk = format!("/dev/shm/skvm-bench-restart-{}.img", std::process::id());
    std::fs::File::create(&disk).expect("tmpfs at /dev/shm").set_len(4 << 20).unwrap();
    let disk_arg = format!("path={disk}");
    let args = ["--memory", "64M", "--disk", &disk_arg, "--cmdline", "scenario=blk-verify ops=100000000 qd=8"];
    let mut vm = LiveVm::start("bench-restart", &args);
    vm.wait_console("blk-verify: start", Duration::from_secs(60));
    let mut last_killed = None;
    let mut killed = 0;
    while killed < KILLS {
        assert!(vm.child.try_wait().unwrap().is_none(), "skvm exited: {}", vm.console());
        std::thread::sleep(Duration::from_millis(100));
        let Some(pid) = device_pid(vm.child.id()).filter(|&pid| Some(pid) != last_killed) else { continue };
        // SAFETY: kill(2) on skvm's device process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        (killed, last_killed) = (killed + 1, Some(pid));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (_, info) = vm.api("GET", "/vm", "");
    let blk = &info["devices"][0];
    let mut ms: Vec<f64> = blk["recovery_ms"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q) as usize];
    println!(
        "device restart, rpc mode: {KILLS} kills of the disk's process, one every 100 ms, under verified I/O at QD8"
    );
    println!(
        "death seen -> first batch served again: median {:.2} ms, p10 {:.2} ms, p90 {:.2} ms, max {:.2} ms ({} restarts; goal 10 ms)",
        at(0.5),
        at(0.1),
        at(0.9),
        at(1.0),
        blk["restarts"]
    );
    println!("device healthy afterwards: {}", blk["healthy"]);
    assert!(!vm.console().contains("error"), "the guest saw an error: {}", vm.console());
    drop(vm);
    let _ = std::fs::remove_file(&disk);
}
