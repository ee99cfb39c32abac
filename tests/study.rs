//! `skvm bench --quick`: the isolation-cost study runs end to end on the
//! self-built guest and writes a complete, sane report. Speed is not judged
//! here; structure and the accounting that separates the modes are.
mod common;

use common::*;
use std::time::Duration;

const MODES: [&str; 4] = ["rpc", "rpc-dma", "shared", "inprocess"];
const WORKLOADS: [&str; 10] = [
    "4K randread QD1",
    "4K randread QD8",
    "4K randread QD32",
    "4K randwrite QD1",
    "4K randwrite QD8",
    "4K randwrite QD32",
    "128K seq read QD4",
    "128K seq write QD4",
    "4K mixed 70/30 QD8",
    "idle",
];
/// On a 1 GiB file in the temp dir with direct=on, beside the host's fio.
const HOST_DISK_WORKLOADS: [&str; 5] = [
    "host disk 4K randread QD1",
    "host disk 4K randread QD32",
    "host disk 4K randread QD32, guest sleeps",
    "host disk 128K seq read QD4",
    "host disk 128K seq write QD4",
];

#[test]
fn quick_study_writes_every_cell_a_report_and_plots() {
    let out = temp_path("study");
    let host_disk_dir = std::env::temp_dir();
    let args = ["bench", "--quick", "--out", out.to_str().unwrap(), "--host-disk-dir", host_disk_dir.to_str().unwrap()];
    let outcome = wait_with_deadline(skvm(&args).spawn().unwrap(), Duration::from_secs(400));
    assert_eq!(outcome.code(), Some(0), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("[ 1/") || outcome.stderr.contains("[  1/"), "no progress: {}", outcome.stderr);
    assert!(outcome.stderr.contains("left)"), "no time estimate: {}", outcome.stderr);

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let machine = &results["machine"];
    for key in ["cpu_model", "kernel", "kvm"] {
        assert!(!machine[key].as_str().unwrap().is_empty(), "machine.{key} missing");
    }
    assert!(machine["tsc_hz"].as_f64().unwrap() > 1e8);
    let rows = results["rows"].as_array().unwrap();
    for vcpus in [1, 2] {
        for mode in MODES {
            for workload in WORKLOADS {
                let row = rows
                    .iter()
                    .find(|r| r["mode"] == mode && r["workload"] == workload && r["vcpus"] == vcpus)
                    .unwrap_or_else(|| panic!("no row for {mode} {workload} {vcpus} vCPU"));
                let what = format!("{mode} {workload} {vcpus} vCPU: {row}");
                assert_eq!(row["ok"], true, "{what}");
                assert!(row["guest_seconds"].as_f64().unwrap() > 0.0, "{what}");
                assert!(row["wall_seconds"].as_f64().unwrap() > 0.0, "{what}");
                // Host CPU covers the vCPU threads, which run the guest all along.
                let (host, vcpu) =
                    (row["host_cpu_seconds"].as_f64().unwrap(), row["vcpu_cpu_seconds"].as_f64().unwrap());
                assert!(vcpu > 0.0 && host >= vcpu, "{what}");
                if workload == "idle" {
                    assert_eq!(row["memory_rpcs"], 0, "an idle guest cost memory RPCs: {what}");
                    continue;
                }
                assert!(row["ops"].as_u64().unwrap() > 0 && row["bytes"].as_u64().unwrap() > 0, "{what}");
                assert_eq!(row["errors"], 0, "{what}");
                let requests = row["device"]["requests"].as_u64().unwrap();
                assert!(requests >= row["ops"].as_u64().unwrap(), "{what}");
                let rpcs = row["memory_rpcs"].as_u64().unwrap();
                // Only the rpc modes reach guest memory through the VMM: rpc-dma by
                // address for every access, rpc by posted batches (the device
                // calls back only for data too large to come inline).
                if mode.starts_with("rpc") {
                    // The VMM counts a call as it admits it and the device as
                    // the reply arrives; the device's last look at an empty
                    // ring can fall on either side of the exit's snapshot
                    // (seen in the nested tier, where everything is slow).
                    let calls = row["device"]["memory_calls"].as_u64().unwrap();
                    assert!(rpcs.abs_diff(calls) <= 1, "{rpcs} RPCs, {calls} calls: {what}");
                    assert!(row["memory_rpc_bytes"].as_u64().unwrap() >= row["bytes"].as_u64().unwrap(), "{what}");
                }
                if mode == "rpc" {
                    let batches = row["batches"].as_u64().unwrap();
                    assert!(batches > 0 && batches <= requests, "{what}");
                    if workload.starts_with("4K") {
                        assert_eq!(rpcs, 0, "4 KiB requests travel inline: {what}");
                    }
                } else if mode == "rpc-dma" {
                    assert!(rpcs > 0, "{what}");
                } else {
                    assert_eq!(rpcs, 0, "{what}");
                    assert!(row["device"]["memory_calls"].as_u64().unwrap() > 0, "{what}");
                }
                let histogram: u64 =
                    row["latency_log2_tsc"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
                assert_eq!(histogram, row["ops"].as_u64().unwrap(), "every request has a latency: {what}");
            }
        }
    }
    // The host-disk group: every mode and the host's fio ran (or, where the
    // temp dir has no O_DIRECT, every row says so), and skvm's 1 GiB file is gone.
    let direct_here = temp_dir_has_direct_io();
    for workload in HOST_DISK_WORKLOADS {
        for mode in MODES.iter().chain(&["fio (host)"]) {
            let row = rows
                .iter()
                .find(|r| r["mode"] == *mode && r["workload"] == workload && r["vcpus"] == 1)
                .unwrap_or_else(|| panic!("no row for {mode} {workload}"));
            if direct_here {
                assert_eq!(row["ok"], true, "{mode} {workload}: {row}");
                assert!(row["ops"].as_u64().unwrap() > 0 && row["guest_seconds"].as_f64().unwrap() > 0.0, "{row}");
                if workload.ends_with("guest sleeps") && *mode != "fio (host)" {
                    // The guest slept between completions: the device's interrupts woke it.
                    assert!(row["device"]["interrupts"].as_u64().unwrap() > 0, "{mode} {workload}: {row}");
                }
            } else {
                assert!(row["note"].as_str().unwrap().contains("no O_DIRECT"), "{mode} {workload}: {row}");
            }
        }
        // Other VMMs do not run this group.
        assert!(!rows.iter().any(|r| r["workload"] == workload && r["system"] == "qemu"), "{workload}");
    }
    if !direct_here {
        eprintln!("study: NOT RUN: the host-disk group's figures: the temp dir has no O_DIRECT here");
    }
    let mut leftovers = std::fs::read_dir(&host_disk_dir).unwrap().flatten();
    assert!(
        !leftovers.any(|e| e.file_name().to_string_lossy().starts_with("skvm-bench-host-disk-")),
        "1 GiB left behind"
    );

    // Peers are accounted for, whether they ran or not.
    let peers = results["peers"].as_array().unwrap();
    let qemu = peers.iter().find(|p| p["name"] == "qemu").expect("the report says what became of QEMU");
    assert!(!qemu["status"].as_str().unwrap().is_empty());

    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), rows.len() + 1);
    assert!(csv.lines().next().unwrap().contains("cpu_model"));

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for heading in [
        "## Peers",
        "## Disk throughput, 1 vCPU",
        "## Disk throughput, 2 vCPUs",
        "## Where the time goes",
        "## Host CPU per request",
        "## Idle guest",
        "## Guest-memory call latency",
        "## Host disk against the host's own fio",
    ] {
        assert!(report.contains(heading), "report lacks {heading}:\n{report}");
    }
    for workload in WORKLOADS.iter().filter(|w| **w != "idle") {
        assert!(report.contains(&format!("| {workload} |")), "report lacks {workload}");
    }
    assert!(report.contains("rpc/inprocess") && report.contains("rpc/shared") && report.contains("rpc/rpc-dma"));
    assert!(report.contains("messages per batch"));
    for plot in ["iops.svg", "throughput.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{plot}");
        assert!(svg.contains("<rect") && svg.contains(">rpc<") && svg.contains(">shared<"), "{plot}");
    }

    // An earlier results file renders again, to the same report, without running anything.
    let again = temp_path("study-render");
    let results_path = out.join("results.json");
    let rendered = run(&["bench", "--render", results_path.to_str().unwrap(), "--out", again.to_str().unwrap()]);
    assert_eq!(rendered.code(), Some(0), "{}", rendered.stderr);
    assert_eq!(std::fs::read_to_string(again.join("report.md")).unwrap(), report);
    assert!(!rendered.stderr.contains("runs ("), "--render ran the study again: {}", rendered.stderr);
}

#[test]
fn bench_refuses_a_missing_results_file_and_an_unknown_peer() {
    let out = run(&["bench", "--render", "/nonexistent/results.json", "--out", temp_path("x").to_str().unwrap()]);
    out.assert_clean_error();
    assert!(out.stderr.contains("/nonexistent/results.json"), "{}", out.stderr);
    let out = run(&["bench", "--peer", "bochs=/usr/bin/bochs"]);
    out.assert_clean_error();
    assert!(out.stderr.contains("unknown peer"), "{}", out.stderr);
}

/// Each published report is what its committed results file renders to, so
/// a change to the report's format cannot leave one stale.
#[test]
fn the_published_reports_render_from_their_results_files() {
    for study in [
        "study-2026-11-30",
        "study-2026-12-01",
        "study-2026-12-01-staging",
        "study-2026-12-01-event-idx",
        "study-2026-12-01-halt",
        "study-2026-12-02",
        "study-2026-12-02-rings",
    ] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(study);
        let again = temp_path(&format!("published-render-{study}"));
        let results = dir.join("results.json");
        let rendered = run(&["bench", "--render", results.to_str().unwrap(), "--out", again.to_str().unwrap()]);
        assert_eq!(rendered.code(), Some(0), "{study}: {}", rendered.stderr);
        let published = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert_eq!(std::fs::read_to_string(again.join("report.md")).unwrap(), published, "{study}");
    }
}

/// Given a vhost-user-blk backend (`SKVM_TEST_VHOST_USER_BLK`) and at least
/// one VMM to put it under (`SKVM_TEST_FIRECRACKER`,
/// `SKVM_TEST_CLOUD_HYPERVISOR`: paths, e.g. ../shared/peers/vhost_user_block
/// and ../shared/peers/firecracker), the quick study has a
/// VMM+vhost-user-blk row for every disk workload, each a success with its
/// CPU counted, plus Cloud Hypervisor's own virtio-blk rows (over the test
/// guest's virtio-pci), and a report section comparing skvm with them.
/// Without them the test says so and checks nothing: CI never depends on a
/// peer binary.
#[test]
fn quick_study_with_a_vhost_user_backend_adds_its_columns() {
    let backend = std::env::var("SKVM_TEST_VHOST_USER_BLK").ok();
    let vmms: Vec<(&str, String)> =
        [("firecracker", "SKVM_TEST_FIRECRACKER"), ("cloud-hypervisor", "SKVM_TEST_CLOUD_HYPERVISOR")]
            .into_iter()
            .filter_map(|(name, var)| Some((name, std::env::var(var).ok()?)))
            .collect();
    let Some(backend) = backend.filter(|_| !vmms.is_empty()) else {
        eprintln!(
            "SKIPPED: set SKVM_TEST_VHOST_USER_BLK and SKVM_TEST_FIRECRACKER or SKVM_TEST_CLOUD_HYPERVISOR \
             to run the vhost-user columns"
        );
        return;
    };
    let out = temp_path("study-vhost-user");
    let mut args: Vec<String> =
        ["bench", "--quick", "--no-qemu", "--out", out.to_str().unwrap()].map(String::from).into();
    for (name, path) in &vmms {
        args.extend(["--peer".into(), format!("{name}={path}")]);
    }
    args.extend(["--peer".into(), format!("vhost-user-blk={backend}")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = wait_with_deadline(skvm(&args).spawn().unwrap(), Duration::from_secs(900));
    assert_eq!(outcome.code(), Some(0), "{}", outcome.stderr);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rows = results["rows"].as_array().unwrap();
    let mut columns: Vec<String> = vmms.iter().map(|(name, _)| format!("{name}+vhost-user-blk")).collect();
    if vmms.iter().any(|(name, _)| *name == "cloud-hypervisor") {
        columns.push("cloud-hypervisor".into());
    }
    for column in &columns {
        for vcpus in [1, 2] {
            for workload in WORKLOADS.iter().filter(|w| **w != "idle") {
                let row = rows
                    .iter()
                    .find(|r| r["system"] == column.as_str() && r["workload"] == *workload && r["vcpus"] == vcpus)
                    .unwrap_or_else(|| panic!("no {column} row for {workload} {vcpus} vCPU"));
                assert_eq!(row["ok"], true, "{row}");
                assert!(row["host_cpu_seconds"].as_f64().unwrap() > 0.0, "{row}");
            }
        }
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## skvm against vhost-user-blk"), "{report}");
    assert!(report.contains("--block-backend path=DISK,socket=SOCK,num_queues=1,queue_size=256"), "{report}");
    for (name, _) in &vmms {
        assert!(report.contains(&format!("| 4K randread QD32 | {name} | IOPS |")), "{report}");
    }
}
