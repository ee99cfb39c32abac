//! Boot benchmark: exec of `skvm run` to the test guest's first serial byte,
//! and exec to process exit for a guest that shuts down at once.
//!
//! Run with `cargo bench --bench boot`; prints medians (and p10/p90) over
//! repeated runs, and exec of `/bin/true` as the floor of any process
//! start. The goals (issue #2): first output within 3 ms, exit within 5 ms.
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 60;
const WARMUP: usize = 5;
/// Pause between runs so one run's background VM teardown does not share the
/// CPUs with the next run's start.
const SETTLE: Duration = Duration::from_millis(40);

/// exec -> first byte on the serial console (the guest's banner).
fn first_output(binary: &str) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(binary)
        .args(["run", "--memory", "128M", "--cmdline", "scenario=hello"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start skvm");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut byte = [0u8; 1];
    stdout.read_exact(&mut byte).expect("guest printed nothing");
    let elapsed = start.elapsed();
    let _ = stdout.read_to_end(&mut Vec::new());
    let status = child.wait().expect("wait for skvm");
    assert!(status.success(), "skvm exited with {status}");
    elapsed
}

/// exec -> exit of skvm for a guest that shuts down at once.
fn exit(binary: &str) -> Duration {
    let start = Instant::now();
    let status = Command::new(binary)
        .args(["run", "--memory", "128M", "--serial", "none", "--cmdline", "scenario=shutdown"])
        .stderr(Stdio::null())
        .status()
        .expect("cannot start skvm");
    let elapsed = start.elapsed();
    assert!(status.success(), "skvm exited with {status}");
    elapsed
}

/// exec -> exit of `/bin/true` under the same harness: the floor any
/// process start pays on this host, beside skvm's figures.
fn exec_floor(_: &str) -> Duration {
    let start = Instant::now();
    let status = Command::new("/bin/true").status().expect("cannot start /bin/true");
    let elapsed = start.elapsed();
    assert!(status.success(), "/bin/true exited with {status}");
    elapsed
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Prints the median, p10 and p90 of `values`, and the verdict on a goal where there is one.
fn report(name: &str, mut values: Vec<Duration>, goal_ms: Option<f64>) {
    values.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = ms(percentile(&values, 0.5));
    let verdict = match goal_ms {
        Some(goal) => format!("goal {goal} ms: {}", if median <= goal { "met" } else { "missed" }),
        None => "the harness's floor, no goal".to_string(),
    };
    println!(
        "{name:<28} median {median:7.3} ms   p10 {:7.3} ms   p90 {:7.3} ms   {verdict}",
        ms(percentile(&values, 0.1)),
        ms(percentile(&values, 0.9)),
    );
}

fn main() {
    let binary = env!("CARGO_BIN_EXE_skvm");
    for _ in 0..WARMUP {
        first_output(binary);
        exit(binary);
    }
    let settled = |f: fn(&str) -> Duration| {
        std::thread::sleep(SETTLE);
        f(binary)
    };
    let first: Vec<Duration> = (0..RUNS).map(|_| settled(first_output)).collect();
    let exits: Vec<Duration> = (0..RUNS).map(|_| settled(exit)).collect();
    let floor: Vec<Duration> = (0..RUNS).map(|_| settled(exec_floor)).collect();
    println!("skvm boot benchmark: {RUNS} runs each of the built-in test guest (128M, 1 vCPU)");
    report("exec -> first serial output", first, Some(3.0));
    report("exec -> exit (guest exits at once)", exits, Some(5.0));
    report("exec -> exit of /bin/true", floor, None);
}
