//! Memory hotplug through virtio-mem, driven through the control API the way
//! a user would, with the test guest plugging, using and unplugging memory.
mod common;

use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(60);

/// The word the guest writes at `offset` bytes into the hotplug region
/// (mem_scenarios.rs in the test guest).
fn pattern_word(offset: u64) -> u64 {
    offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed_5eed_5eed_5eed
}

fn disk(name: &str, bytes: u64) -> (std::path::PathBuf, String) {
    let path = temp_path(name);
    std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
    let arg = format!("path={}", path.display());
    (path, arg)
}

/// Where the rpc-dma probe looks: 128 MiB into a region that starts right after 512 MiB of RAM.
const PROBE: u64 = 0x2800_0000;

fn plug_use_unplug(mode: &str) {
    let (disk_path, disk_arg) = disk(&format!("hotplug-{mode}.img"), 64 * MIB);
    let probe = format!("{PROBE:#x}");
    let mut args = vec!["--memory-mode", mode, "--memory", "512M,hotplug=1G", "--disk", &disk_arg];
    args.extend(["--cmdline", "scenario=mem-plug"]);
    if mode == "rpc-dma" {
        args.extend(["--test-device-probe", &probe]);
    }
    let mut vm = LiveVm::start(&format!("hotplug-{mode}"), &args);
    vm.wait_console("mem: ready", LONG);
    let rss_before = vm.rss_kib();
    let device_maps = |vm: &LiveVm| (mode == "shared").then(|| guest_ram_mapped_by_disk(vm));
    assert!(matches!(device_maps(&vm), None | Some(512)), "before the plug: {:?} MiB", device_maps(&vm));

    let (status, body) = vm.api("PUT", "/vm/memory", &format!("{{\"requested_bytes\":{}}}", 256 * MIB));
    assert_eq!(status, 200, "{body}");
    let console = vm.wait_console("read back matches", LONG);
    assert!(console.contains("mem: plugged 256 MiB at 0x20000000"), "{console}");
    assert!(console.contains("mem: pattern verified over 256 MiB of plugged memory"), "{console}");
    let (_, info) = vm.api("GET", "/vm", "");
    assert_eq!(info["hotplug"]["plugged_bytes"], 256 * MIB, "{info}");
    let rss_plugged = vm.rss_kib();
    assert!(rss_plugged >= rss_before + 240 * 1024, "RSS {rss_before} -> {rss_plugged} KiB after plugging 256 MiB");
    // A shared-mode device maps RAM and what is plugged, never the whole reservation.
    assert!(matches!(device_maps(&vm), None | Some(768)), "plugged: {:?} MiB", device_maps(&vm));

    // The disk holds the MiB the guest wrote straight from plugged memory.
    let line = console.lines().find(|l| l.contains("from plugged memory at region offset")).unwrap();
    let offset = u64::from_str_radix(line.split("0x").nth(1).unwrap().split(',').next().unwrap(), 16).unwrap();
    let bytes = std::fs::read(&disk_path).unwrap();
    for (i, word) in bytes[..MIB as usize].chunks_exact(8).enumerate() {
        let expected = pattern_word(offset + 8 * i as u64);
        assert_eq!(u64::from_le_bytes(word.try_into().unwrap()), expected, "disk word {i} in {mode} mode");
    }

    let (status, body) = vm.api("PUT", "/vm/memory", "{\"requested_bytes\":0}");
    assert_eq!(status, 200, "{body}");
    let console = vm.wait_console("mem: disk write from unplugged memory", LONG);
    assert!(console.contains("mem: unplugged 256 MiB"), "{console}");
    // The guest no longer owns it: STATE says unplugged (checked in the guest),
    // the addresses are not RAM any more, and a disk write from there fails.
    assert!(console.contains("mem: unplugged memory reads 0xffffffff"), "{console}");
    assert!(console.contains("mem: disk write from unplugged memory: status 1"), "{console}");
    let (_, info) = vm.api("GET", "/vm", "");
    assert_eq!(info["hotplug"]["plugged_bytes"], 0, "{info}");
    let rss_after = vm.rss_kib();
    assert!(rss_after + 240 * 1024 <= rss_plugged, "RSS {rss_plugged} -> {rss_after} KiB after unplugging 256 MiB");
    for device in info["devices"].as_array().unwrap() {
        assert_eq!(device["healthy"], true, "{info}");
    }
    // The device counted the write from unplugged memory as its one error.
    assert_eq!(info["devices"][0]["counters"]["errors"], 1, "{info}");
    assert!(matches!(device_maps(&vm), None | Some(512)), "unplugged: {:?} MiB", device_maps(&vm));

    // Plugged again, the blocks the guest filled read zero.
    let (status, body) = vm.api("PUT", "/vm/memory", &format!("{{\"requested_bytes\":{}}}", 256 * MIB));
    assert_eq!(status, 200, "{body}");
    let console = vm.wait_console("mem: done", LONG);
    assert!(console.contains("mem: replugged 256 MiB reads zero"), "{console}");
    if mode == "rpc-dma" {
        // A device asking for an address in the unplugged range is refused.
        let stderr = vm.stderr();
        assert!(stderr.contains(&format!("skvm-test-probe blk0 {probe}: ok")), "{stderr}");
        let refused = format!("skvm-test-probe blk0 {probe}: refused: range {probe}+0x8 is not guest RAM");
        assert!(stderr.contains(&refused), "{stderr}");
    }
    assert_eq!(vm.shutdown(), Some(0));
}

/// MiB of the guest RAM memfd that the disk device (blk0) maps.
fn guest_ram_mapped_by_disk(vm: &LiveVm) -> u64 {
    let (_, info) = vm.api("GET", "/vm", "");
    let pid = info["devices"][0]["pid"].as_u64().unwrap_or_else(|| panic!("no blk0 pid: {info}"));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let bytes: u64 = maps.lines().filter(|l| l.contains("memfd:skvm-guest-ram")).map(mapping_size).sum();
    bytes / MIB
}

#[test]
fn plug_256_mib_use_it_for_disk_io_and_unplug_in_rpc_mode() {
    plug_use_unplug("rpc");
}

#[test]
fn plug_256_mib_use_it_for_disk_io_and_unplug_in_rpc_dma_mode() {
    plug_use_unplug("rpc-dma");
}

#[test]
fn plug_256_mib_use_it_for_disk_io_and_unplug_in_shared_mode() {
    plug_use_unplug("shared");
}

#[test]
fn plug_256_mib_use_it_for_disk_io_and_unplug_in_inprocess_mode() {
    plug_use_unplug("inprocess");
}

/// `churn: key=value ...` from the guest.
fn churn_figure(console: &str, key: &str) -> u64 {
    let line = console.lines().find(|l| l.starts_with("churn:")).unwrap_or_else(|| panic!("no summary: {console}"));
    let value = line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap();
    value.parse().unwrap()
}

fn churn(mode: &str, cycles: u64) {
    let (_disk_path, disk_arg) = disk(&format!("churn-{mode}.img"), 16 * MIB);
    // Each cycle unplugs twice: half with UNPLUG, the rest with UNPLUG_ALL.
    let cmdline = format!("scenario=mem-churn cycles={}", 2 * cycles);
    let args = ["--memory-mode", mode, "--memory", "256M,hotplug=256M", "--disk", &disk_arg, "--cmdline", &cmdline];
    let mut vm = LiveVm::start(&format!("churn-{mode}"), &args);
    vm.wait_console("mem: ready", LONG);
    let (_, info) = vm.api("GET", "/vm", "");
    let blk_pid = info["devices"][0]["pid"].clone();
    for cycle in 0..cycles {
        vm.resize_and_wait(64 * MIB, LONG);
        if cycle + 1 == cycles {
            // Before the last unplug, while the VM still runs: the disk device
            // never failed, never restarted (rpc) and was never refused.
            let (_, info) = vm.api("GET", "/vm", "");
            let blk = &info["devices"][0];
            assert_eq!(blk["healthy"], true, "{info}");
            assert_eq!(blk["driver_ok"], true, "{info}");
            assert!(blk["counters"]["requests"].as_u64().unwrap() > 0, "{info}");
            assert_eq!(blk["counters"]["errors"], 0, "{info}");
            if mode.starts_with("rpc") {
                assert_eq!(blk["pid"], blk_pid, "the {mode} device restarted: {info}");
                assert_eq!(blk["memory_refused"], 0, "{info}");
            }
            assert_eq!(info["hotplug"]["plugs"], cycle + 1, "{info}");
        }
        vm.resize_and_wait(32 * MIB, LONG);
        vm.resize_and_wait(0, LONG);
    }
    let console = vm.wait_console("churn:", LONG);
    assert_eq!(churn_figure(&console, "errors"), 0, "{console}");
    assert_eq!(churn_figure(&console, "corrupt"), 0, "{console}");
    assert_eq!(churn_figure(&console, "plugs"), cycles, "{console}");
    assert_eq!(churn_figure(&console, "unplugs"), 2 * cycles, "{console}");
    assert!(churn_figure(&console, "plugged-ios") > 0, "no I/O went through plugged memory: {console}");
    assert_eq!(vm.wait_exit(LONG), Some(0));
}

#[test]
fn churn_100_plug_unplug_cycles_under_verified_io_in_rpc_mode() {
    churn("rpc", 100);
}

#[test]
fn churn_under_verified_io_in_rpc_dma_mode() {
    churn("rpc-dma", 20);
}

#[test]
fn churn_under_verified_io_in_inprocess_mode() {
    churn("inprocess", 20);
}

#[test]
fn churn_with_sandbox_rebuilds_in_shared_mode() {
    churn("shared", 20);
}

#[test]
fn resize_refuses_impossible_sizes_and_malformed_bodies() {
    let (_disk_path, disk_arg) = disk("resize-bad.img", MIB);
    let vm = LiveVm::start(
        "resize-bad",
        &["--memory", "64M,hotplug=256M", "--disk", &disk_arg, "--cmdline", "scenario=spin"],
    );
    for (body, why) in [
        (format!("{{\"requested_bytes\":{}}}", 512 * MIB), "more than the hotplug region"),
        (format!("{{\"requested_bytes\":{}}}", 3 * MIB), "not a multiple"),
        ("{\"requested_bytes\":-1}".to_string(), "expected"),
        ("{\"requested\":1}".to_string(), "expected"),
        ("{\"requested_bytes\":0,\"extra\":1}".to_string(), "expected"),
        ("not json".to_string(), "not JSON"),
        (String::new(), "expected"),
    ] {
        let (status, reply) = vm.api("PUT", "/vm/memory", &body);
        assert_eq!(status, 400, "{body}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains(why), "{body}: {reply}");
    }
    let (status, _) = vm.api("GET", "/vm/memory", "");
    assert_eq!(status, 405);
    let (_, info) = vm.api("GET", "/vm", "");
    assert_eq!(info["hotplug"]["requested_bytes"], 0, "a refused resize changed something: {info}");
    assert_eq!(vm.shutdown(), Some(0));

    let plain = LiveVm::start("resize-none", &["--memory", "64M", "--cmdline", "scenario=spin"]);
    let (status, reply) = plain.api("PUT", "/vm/memory", "{\"requested_bytes\":0}");
    assert_eq!(status, 409, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("no hotplug region"), "{reply}");
    assert_eq!(plain.shutdown(), Some(0));
}

#[test]
fn bad_hotplug_flags_are_clear_usage_errors() {
    for (memory, why) in [
        ("512M,hotplug=3M", "multiple"),
        ("512M,hotplug=1G,block=3M", "power of two"),
        ("512M,block=2M", "needs hotplug"),
        ("512M,hotplug", "hotplug=SIZE"),
    ] {
        let outcome = run(&["run", "--memory", memory]);
        outcome.assert_clean_error();
        assert_eq!(outcome.code(), Some(2), "{memory}: {}", outcome.stderr);
        assert!(outcome.stderr.contains(why), "{memory}: {}", outcome.stderr);
    }
}

/// A device process dies with the thread that started it. A shared-mode
/// rebuild happens on a hotplug worker thread, which tokio retires after
/// 10 s idle: the rebuilt process must not go with it, and must still be
/// serving the guest's disk I/O (verified by the guest) a minute later.
#[test]
fn a_rebuilt_shared_mode_device_outlives_the_thread_that_asked_for_it() {
    let requests = |info: &serde_json::Value| info["devices"][0]["counters"]["requests"].as_u64().unwrap_or(0);
    let (_disk_path, disk_arg) = disk("rebuilt-lives.img", MIB);
    let args = ["--memory-mode", "shared", "--memory", "64M,hotplug=64M", "--disk", &disk_arg];
    let mut vm = LiveVm::start("rebuilt-lives", &[&args[..], &["--cmdline", "scenario=mem-churn"]].concat());
    vm.wait_console("mem: ready", LONG);
    let (_, before) = vm.api("GET", "/vm", "");
    vm.resize_and_wait(32 * MIB, LONG);
    let (_, after) = vm.api("GET", "/vm", "");
    let pid = after["devices"][0]["pid"].as_u64().unwrap();
    assert_ne!(pid, before["devices"][0]["pid"].as_u64().unwrap(), "the plug did not rebuild the device");
    std::thread::sleep(Duration::from_secs(60));
    let (_, minute) = vm.api("GET", "/vm", "");
    std::thread::sleep(Duration::from_secs(1));
    let (_, later) = vm.api("GET", "/vm", "");
    assert_eq!(later["devices"][0]["healthy"], true, "{later}");
    assert_eq!(later["devices"][0]["pid"].as_u64(), Some(pid), "the device was restarted: {later}");
    assert_eq!(later["devices"][0]["restarts"].as_u64(), Some(0), "{later}");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the rebuilt device process is gone");
    assert!(requests(&later) > requests(&minute), "no disk I/O served a minute after the rebuild: {later}");
    assert_eq!(later["devices"][0]["counters"]["errors"].as_u64(), Some(0), "{later}");
    assert!(!vm.console().contains("error:"), "{}", vm.console());
    assert_eq!(vm.shutdown(), Some(0));
}

/// A rebuild retires the old process by closing its channel; one that will
/// not go (it keeps the memfd, the disk and the eventfds) is killed.
#[test]
fn a_retired_shared_mode_process_that_will_not_exit_is_killed() {
    let (_disk_path, disk_arg) = disk("retired-lingers.img", MIB);
    let args = ["--memory-mode", "shared", "--memory", "64M,hotplug=64M", "--disk", &disk_arg];
    let extra = ["--test-device-misbehave", "linger", "--cmdline", "scenario=mem-follow"];
    let mut vm = LiveVm::start("retired-lingers", &[&args[..], &extra[..]].concat());
    vm.wait_console("mem: region", LONG);
    let (_, before) = vm.api("GET", "/vm", "");
    let old = before["devices"][0]["pid"].as_u64().unwrap();
    vm.resize_and_wait(32 * MIB, LONG);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{old}")).exists() {
        assert!(std::time::Instant::now() < deadline, "the retired process {old} lives on");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, after) = vm.api("GET", "/vm", "");
    assert_eq!(after["devices"][0]["healthy"], true, "{after}");
    assert!(vm.stderr().contains(&format!("retired process {old} did not exit; killing it")), "{}", vm.stderr());
    assert_eq!(vm.shutdown(), Some(0));
}

/// A compromised virtio-mem device replays real plugs and unplugs with 2 ms
/// deadlines: calls it gives up on must not leave VMM workers behind.
#[test]
fn a_flood_of_hotplug_calls_cannot_pile_up_vmm_threads() {
    let threads = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix("Threads:")).map_or(0, |n| n.trim().parse().unwrap_or(0))
    };
    let (_disk_path, disk_arg) = disk("hotplug-flood.img", MIB);
    let args = [
        "--memory",
        "64M,hotplug=64M",
        "--disk",
        &disk_arg,
        "--test-device-misbehave",
        "hotplug-flood",
        "--cmdline",
        "scenario=mem-follow",
    ];
    let mut vm = LiveVm::start("hotplug-flood", &args);
    vm.wait_console("mem: region", LONG);
    let (status, _) = vm.api("PUT", "/vm/memory", &format!("{{\"requested_bytes\":{}}}", 8 * MIB));
    assert_eq!(status, 200);
    let (mut most, deadline) = (0, std::time::Instant::now() + LONG);
    while !vm.stderr().contains("hostile-rpc: hotplug flood") {
        assert!(std::time::Instant::now() < deadline, "the flood never ended: {}", vm.stderr());
        most = most.max(threads(vm.child.id()));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(most < 40, "the VMM grew to {most} threads");
    let (status, info) = vm.api("GET", "/vm", "");
    assert_eq!(status, 200, "{info}");
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn malformed_and_impossible_virtio_mem_requests_are_refused_in_every_mode() {
    for mode in ["rpc", "rpc-dma", "shared", "inprocess"] {
        let (_disk_path, disk_arg) = disk(&format!("mem-hostile-{mode}.img"), MIB);
        let args = ["--memory-mode", mode, "--memory", "64M,hotplug=64M", "--disk", &disk_arg];
        let out = run_guest(&args, "scenario=mem-hostile");
        assert_eq!(out.code(), Some(0), "{mode}: {}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("mem-hostile: 0 wrong answers; region unchanged"), "{mode}: {}", out.stdout);
        assert_eq!(out.stdout.matches("(ok)").count(), 10, "{mode}: {}", out.stdout);
    }
}

/// Shared mode: a device process that cannot be saved (stopped here with
/// SIGSTOP) fails the device at the next memory change. Both its processes,
/// old and new, are killed rather than left serving with a stale map, and
/// the plug itself completes although it took longer than a plain RPC may.
#[test]
fn a_device_that_cannot_be_rebuilt_fails_and_its_processes_are_killed() {
    let (_disk_path, disk_arg) = disk("rebuild-fails.img", MIB);
    let mut vm = LiveVm::start(
        "rebuild-fails",
        &[
            "--memory-mode",
            "shared",
            "--memory",
            "64M,hotplug=64M",
            "--disk",
            &disk_arg,
            "--cmdline",
            "scenario=mem-follow",
        ],
    );
    vm.wait_console("mem: region", LONG);
    let (_, info) = vm.api("GET", "/vm", "");
    let old = info["devices"][0]["pid"].as_u64().expect("blk0 has a process") as i32;
    // SAFETY: stops our own grandchild, the device process.
    assert_eq!(unsafe { libc::kill(old, libc::SIGSTOP) }, 0);

    vm.resize_and_wait(32 * MIB, LONG);
    let (_, info) = vm.api("GET", "/vm", "");
    let blk = &info["devices"][0];
    assert_eq!(blk["healthy"], false, "{info}");
    assert!(blk["failure"].as_str().unwrap().contains("rebuild"), "{info}");
    let new = blk["pid"].as_u64().unwrap() as i32;
    assert_ne!(new, old, "no new process was started");
    for pid in [old, new] {
        // Well before the guest gives up waiting for a resize (about a minute).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(std::time::Instant::now() < deadline, "process {pid} of the failed device lives on");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(info["devices"][1]["healthy"], true, "the virtio-mem device suffered: {info}");
    let console = vm.console();
    assert_eq!(vm.shutdown(), Some(0), "{console}");
}
