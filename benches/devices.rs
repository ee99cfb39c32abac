//! virtio-blk benchmark across memory modes: the test guest drives a disk
//! file in tmpfs (so the host disk does not dominate) and this harness times
//! each run between the guest's start and done lines.
//!
//! Run with `cargo bench --bench devices`. Prints medians per mode and
//! workload, the ratios of `rpc` to the other modes, and, from the VMM's
//! counters, memory RPCs per request (`rpc-dma`) and messages per batch
//! (`rpc`: one out, one back, two per memory RPC).
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REPEATS: usize = 5;
const DISK_BYTES: u64 = 256 << 20;
const MODES: [&str; 4] = ["rpc", "rpc-dma", "shared", "inprocess"];

struct Workload {
    name: &'static str,
    rw: &'static str,
    block_size: u64,
    depth: u32,
    ops: u64,
}

const WORKLOADS: [Workload; 4] = [
    Workload { name: "4K randread QD1", rw: "randread", block_size: 4096, depth: 1, ops: 3000 },
    Workload { name: "4K randread QD32", rw: "randread", block_size: 4096, depth: 32, ops: 20000 },
    Workload { name: "128K seq read QD4", rw: "read", block_size: 128 << 10, depth: 4, ops: 2000 },
    Workload { name: "128K seq write QD4", rw: "write", block_size: 128 << 10, depth: 4, ops: 2000 },
];

struct Sample {
    seconds: f64,
    rpcs: Option<u64>,
    batches: Option<u64>,
}

fn run(disk: &str, mode: &str, w: &Workload) -> Sample {
    let cmdline = format!("scenario=blk-bench rw={} bs={} qd={} ops={}", w.rw, w.block_size, w.depth, w.ops);
    let mut child = Command::new(env!("CARGO_BIN_EXE_skvm"))
        .args(["--log-level", "info", "run", "--memory", "256M", "--memory-mode", mode])
        .args(["--disk", &format!("path={disk}"), "--cmdline", &cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start skvm");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut start, mut seconds) = (None, None);
    for line in stdout.lines().map_while(Result::ok) {
        if line.starts_with("blk-bench: start") {
            start = Some(Instant::now());
        } else if line.starts_with("blk-bench: done") {
            seconds = start.map(|s| s.elapsed().as_secs_f64());
            assert!(line.contains("errors=0"), "{mode} {}: {line}", w.name);
        } else if line.starts_with("error:") {
            panic!("{mode} {}: guest reported {line}", w.name);
        }
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{mode} {}: skvm {status}: {stderr}", w.name);
    let figure =
        |unit: &str| stderr.lines().find_map(|l| l.split("device blk0: ").nth(1)?.split(unit).next()?.parse().ok());
    Sample { seconds: seconds.expect("no done line"), rpcs: figure(" memory RPCs"), batches: figure(" batches posted") }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn main() {
    let disk = format!("/dev/shm/skvm-bench-{}.img", std::process::id());
    let file = std::fs::File::create(&disk).expect("tmpfs at /dev/shm");
    file.set_len(DISK_BYTES).unwrap();
    // Fill the disk so reads touch real pages.
    std::fs::write(&disk, vec![0x5au8; DISK_BYTES as usize]).unwrap();

    println!("virtio-blk benchmark: test guest, 1 vCPU, 256M, disk in tmpfs; medians of {REPEATS} runs");
    println!(
        "{:<20} {:>13} {:>13} {:>13} {:>13} {:>10} {:>11} {:>10} {:>13} {:>13}",
        "workload",
        "rpc",
        "rpc-dma",
        "shared",
        "inprocess",
        "rpc/shared",
        "rpc/rpc-dma",
        "rpc/inproc",
        "rpc msg/batch",
        "dma RPCs/req"
    );
    for w in &WORKLOADS {
        let mut per_mode = Vec::new();
        let (mut messages_per_batch, mut dma_rpcs_per_request) = (0.0, 0.0);
        for mode in MODES {
            let samples: Vec<Sample> = (0..REPEATS).map(|_| run(&disk, mode, w)).collect();
            let (rpcs, batches) = (samples[0].rpcs.unwrap_or(0) as f64, samples[0].batches.unwrap_or(0) as f64);
            match mode {
                "rpc" if batches > 0.0 => messages_per_batch = 2.0 * (batches + rpcs) / batches,
                "rpc-dma" => dma_rpcs_per_request = rpcs / w.ops as f64,
                _ => {}
            }
            per_mode.push(median(samples.iter().map(|s| s.seconds).collect()));
            std::thread::sleep(Duration::from_millis(50));
        }
        let rate = |seconds: f64| {
            if w.block_size >= 64 << 10 {
                (w.ops * w.block_size) as f64 / seconds / (1 << 20) as f64
            } else {
                w.ops as f64 / seconds
            }
        };
        let unit = if w.block_size >= 64 << 10 { "MiB/s" } else { "IOPS" };
        let [rpc, dma, shared, inproc] = [0, 1, 2, 3].map(|i| rate(per_mode[i]));
        println!(
            "{:<20} {:>13} {:>13} {:>13} {:>13} {:>9.0}% {:>10.0}% {:>9.0}% {:>13.2} {:>13.2}",
            w.name,
            format!("{rpc:.0} {unit}"),
            format!("{dma:.0} {unit}"),
            format!("{shared:.0} {unit}"),
            format!("{inproc:.0} {unit}"),
            100.0 * rpc / shared,
            100.0 * rpc / dma,
            100.0 * rpc / inproc,
            messages_per_batch,
            dma_rpcs_per_request
        );
    }
    let _ = std::fs::remove_file(&disk);
}
