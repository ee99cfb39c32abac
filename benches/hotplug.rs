//! Memory hotplug benchmark across memory modes, driven through the control
//! API against the test guest's virtio-mem driver (`scenario=mem-churn`):
//!
//! * VMM-side cost of a plug and an unplug of 128 MiB (64 blocks): until the
//!   new map is what every device request sees, KVM slot work, shared-mode
//!   sandbox rebuilds (and how long a rebuilt device stops serving), total;
//! * guest-visible latency: from the guest sending its request to the ACK;
//! * disk I/O throughput (verified 4 KiB writes and read-backs, 8 in flight)
//!   with no hotplug, and while the host keeps plugging and unplugging.
//!
//! Run with `cargo bench --bench hotplug`. Prints medians as Markdown.
#[path = "../tests/common/mod.rs"]
mod common;
// The study's machine probe: only its TSC rate is needed here.
#[allow(dead_code)]
#[path = "../src/bench/machine.rs"]
mod machine;

use common::LiveVm;
use machine::tsc_hz;
use std::time::{Duration, Instant};

const MODES: [&str; 4] = ["rpc", "rpc-dma", "shared", "inprocess"];
const CYCLES: u64 = 30;
const STEP: u64 = 128 << 20;
const IOS: u64 = 60_000;
const LONG: Duration = Duration::from_secs(120);

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn figure(console: &str, key: &str) -> f64 {
    let line = console.lines().find(|l| l.starts_with("churn:")).expect("no churn summary");
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap().parse().unwrap()
}

fn start(mode: &str, disk: &str, cmdline: &str) -> LiveVm {
    let disk = format!("path={disk}");
    let args = ["--memory-mode", mode, "--memory", "256M,hotplug=512M", "--disk", &disk, "--cmdline", cmdline];
    let mut vm = LiveVm::start(&format!("bench-hotplug-{mode}"), &args);
    vm.wait_console("mem: ready", LONG);
    vm
}

#[derive(Default)]
struct Latencies {
    visible: Vec<f64>,
    kvm: Vec<f64>,
    rebuild: Vec<f64>,
    stall: Vec<f64>,
    release: Vec<f64>,
    total: Vec<f64>,
    host_seen: Vec<f64>,
}

impl Latencies {
    fn record(&mut self, times: &serde_json::Value, host_seen: Duration) {
        let us = |key: &str| times[key].as_f64().unwrap();
        self.visible.push(us("device_visible_us"));
        self.kvm.push(us("kvm_us"));
        self.rebuild.push(us("rebuild_us"));
        self.stall.push(us("rebuild_stall_us"));
        self.release.push(us("release_us"));
        self.total.push(us("total_us"));
        self.host_seen.push(host_seen.as_secs_f64() * 1e6);
    }
}

struct ModeResult {
    plug: Latencies,
    unplug: Latencies,
    guest_plug_us: f64,
    guest_unplug_us: f64,
    iops_quiet: f64,
    iops_churn: f64,
    churn_cycles: u64,
}

fn resize(vm: &LiveVm, bytes: u64) -> (serde_json::Value, Duration) {
    let asked = Instant::now();
    vm.resize_and_wait(bytes, LONG);
    let seen = asked.elapsed();
    (vm.api("GET", "/vm", "").1, seen)
}

fn measure(mode: &str, disk: &str, hz: f64) -> ModeResult {
    // Plug and unplug latency.
    let mut vm = start(mode, disk, &format!("scenario=mem-churn cycles={CYCLES}"));
    let (mut plug, mut unplug) = (Latencies::default(), Latencies::default());
    for _ in 0..CYCLES {
        let (info, seen) = resize(&vm, STEP);
        plug.record(&info["hotplug"]["last_plug"], seen);
        let (info, seen) = resize(&vm, 0);
        unplug.record(&info["hotplug"]["last_unplug"], seen);
    }
    let console = vm.wait_console("churn:", LONG);
    assert_eq!(figure(&console, "errors"), 0.0, "{mode}: {console}");
    assert_eq!(figure(&console, "corrupt"), 0.0, "{mode}: {console}");
    let per = |key: &str| figure(&console, key) / CYCLES as f64 / hz * 1e6;
    let (guest_plug_us, guest_unplug_us) = (per("plug-tsc"), per("unplug-tsc"));
    assert_eq!(vm.wait_exit(LONG), Some(0));

    // Throughput without hotplug, then under continuous churn.
    let throughput = |churn: bool| -> (f64, u64) {
        let mut vm = start(mode, disk, &format!("scenario=mem-churn ios={IOS}"));
        let mut cycles = 0;
        // Until the guest is done (and its VM gone, which ends the loop too).
        while churn && !vm.console().contains("churn:") {
            let plug = vm.try_api("PUT", "/vm/memory", &format!("{{\"requested_bytes\":{STEP}}}"));
            std::thread::sleep(Duration::from_millis(20));
            let unplug = vm.try_api("PUT", "/vm/memory", "{\"requested_bytes\":0}");
            std::thread::sleep(Duration::from_millis(20));
            if plug.is_err() || unplug.is_err() {
                break;
            }
            cycles += 1;
        }
        let console = vm.wait_console("churn:", LONG);
        assert_eq!(figure(&console, "errors"), 0.0, "{mode}: {console}");
        assert_eq!(figure(&console, "corrupt"), 0.0, "{mode}: {console}");
        let iops = figure(&console, "ios") / (figure(&console, "tsc") / hz);
        let _ = vm.wait_exit(LONG);
        (iops, cycles)
    };
    let (iops_quiet, _) = throughput(false);
    let (iops_churn, churn_cycles) = throughput(true);
    ModeResult { plug, unplug, guest_plug_us, guest_unplug_us, iops_quiet, iops_churn, churn_cycles }
}

fn main() {
    let disk = format!("/dev/shm/skvm-bench-hotplug-{}.img", std::process::id());
    std::fs::File::create(&disk).expect("tmpfs at /dev/shm").set_len(64 << 20).unwrap();
    let hz = tsc_hz();
    let results: Vec<(&str, ModeResult)> = MODES.iter().map(|&mode| (mode, measure(mode, &disk, hz))).collect();
    let _ = std::fs::remove_file(&disk);

    println!("\nvirtio-mem: 128 MiB (64 x 2 MiB blocks) per plug, test guest, 1 vCPU; medians of {CYCLES} cycles\n");
    println!("| | {} |", MODES.join(" | "));
    println!("|---|{}", "---:|".repeat(MODES.len()));
    let row = |label: &str, f: &dyn Fn(&ModeResult) -> String| {
        let cells: Vec<String> = results.iter().map(|(_, r)| f(r)).collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    let ms = |v: &Vec<f64>| format!("{:.2} ms", median(v.clone()) / 1e3);
    row("plug: new map visible to every device", &|r| ms(&r.plug.visible));
    row("plug: KVM slots registered", &|r| ms(&r.plug.kvm));
    row("plug: shared-mode sandbox rebuild", &|r| ms(&r.plug.rebuild));
    row("plug: longest device pause in rebuild", &|r| ms(&r.plug.stall));
    row("plug: VMM total (request to ACK)", &|r| ms(&r.plug.total));
    row("plug: guest request to ACK", &|r| format!("{:.2} ms", r.guest_plug_us / 1e3));
    row("plug: API resize to plugged (host view)", &|r| ms(&r.plug.host_seen));
    row("unplug: map without the blocks, no request in flight", &|r| ms(&r.unplug.visible));
    row("unplug: KVM slots removed", &|r| ms(&r.unplug.kvm));
    row("unplug: shared-mode sandbox rebuild", &|r| ms(&r.unplug.rebuild));
    row("unplug: memory returned to the host", &|r| ms(&r.unplug.release));
    row("unplug: VMM total", &|r| ms(&r.unplug.total));
    row("unplug: guest request to ACK", &|r| format!("{:.2} ms", r.guest_unplug_us / 1e3));
    row("disk IOPS, no hotplug", &|r| format!("{:.0}", r.iops_quiet));
    row("disk IOPS, under churn", &|r| format!("{:.0} ({} cycles)", r.iops_churn, r.churn_cycles));
    row("churn / no churn", &|r| format!("{:.0} %", 100.0 * r.iops_churn / r.iops_quiet));
}
