//! Fair share of the VMM's memory service: one thread serves every `rpc-dma`
//! device's memory requests. The test guest benchmarks its second disk while
//! the first disk's device (the test-only `memory-flood` misbehaviour) keeps
//! 64 reads of 1 MiB in flight. For scale, the same run beside a process
//! that only burns one CPU.
//!
//! Run with `cargo bench --bench fairness`. Prints the median IOPS of each
//! case and its slowdown against the disk alone.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const REPEATS: usize = 5;
const DISK_BYTES: u64 = 64 << 20;
const OPS: u64 = 3000;

#[derive(Clone, Copy, PartialEq)]
enum Neighbour {
    Idle,
    CpuHog,
    MemoryFlood,
}

/// IOPS of 4 KiB random reads at `depth` on disk 1.
fn iops(disks: &[String; 2], depth: u32, neighbour: Neighbour) -> f64 {
    let hog = (neighbour == Neighbour::CpuHog).then(burn_one_cpu);
    let cmdline = format!("scenario=blk-bench disk=1 rw=randread bs=4096 qd={depth} ops={OPS}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_skvm"));
    command.args(["run", "--memory", "256M", "--memory-mode", "rpc-dma", "--cmdline", &cmdline]);
    command.args(["--disk", &format!("path={}", disks[0]), "--disk", &format!("path={}", disks[1])]);
    if neighbour == Neighbour::MemoryFlood {
        command.args(["--test-device-misbehave", "memory-flood"]);
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("cannot start skvm");
    let (mut start, mut seconds) = (None, None);
    for line in BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        if line.starts_with("blk-bench: start") {
            start = Some(Instant::now());
        } else if line.starts_with("blk-bench: done") {
            seconds = start.map(|s| s.elapsed().as_secs_f64());
            assert!(line.contains("errors=0"), "{line}");
        }
    }
    let status = child.wait().unwrap();
    if let Some(mut hog) = hog {
        let _ = hog.kill();
        let _ = hog.wait();
    }
    assert!(status.success(), "skvm {status}");
    OPS as f64 / seconds.expect("no done line")
}

fn burn_one_cpu() -> Child {
    Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("cannot start sh")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn main() {
    let disks = [0, 1].map(|i| format!("/dev/shm/skvm-fairness-{}-{i}.img", std::process::id()));
    for disk in &disks {
        std::fs::File::create(disk).expect("tmpfs at /dev/shm").set_len(DISK_BYTES).unwrap();
    }
    println!("memory-service fairness: rpc-dma, disk 1 4K randread, {OPS} ops; medians of {REPEATS} runs");
    println!(
        "{:<6} {:>12} {:>16} {:>18} {:>12} {:>14}",
        "depth", "alone", "beside CPU hog", "beside mem flood", "hog slowdown", "flood slowdown"
    );
    for depth in [1, 32] {
        let case = |n| median((0..REPEATS).map(|_| iops(&disks, depth, n)).collect());
        let (alone, hog, flood) = (case(Neighbour::Idle), case(Neighbour::CpuHog), case(Neighbour::MemoryFlood));
        println!(
            "QD{:<4} {:>12.0} {:>16.0} {:>18.0} {:>11.2}x {:>13.2}x",
            depth,
            alone,
            hog,
            flood,
            alone / hog,
            alone / flood
        );
    }
    for disk in &disks {
        let _ = std::fs::remove_file(disk);
    }
}
