//! Running the study: every cell of the matrix on skvm's modes and on the
//! peers, with a progress line and an estimate of the time left.
use super::machine::{self, Machine};
use super::matrix::{self, Kind, Workload, MODES, VCPUS, WORKLOADS};
use super::peers::{self, Peer};
use super::results::{PeerInfo, Results, Row};
use super::BenchArgs;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 64 << 20;
const GUEST_MEMORY: &str = "256M";
/// Longest any single run may take before it counts as failed.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// What the test guest printed about its workload.
#[derive(Debug, Default)]
pub struct GuestReport {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub tsc: u64,
    pub latency_sum: u64,
    pub histogram: Vec<u64>,
    /// The seed the guest's random blocks came from (disk workloads).
    pub seed: Option<u64>,
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Reads `blk-bench: done ...` and its histogram, or `idle: done ...`.
pub fn parse_guest(console: &str) -> Result<GuestReport, String> {
    let mut report = GuestReport { histogram: vec![0; 48], ..Default::default() };
    if let Some(line) = console.lines().find(|l| l.starts_with("idle: done")) {
        report.tsc = field(line, "tsc").ok_or("malformed idle line")?;
        return Ok(report);
    }
    let line = console.lines().find(|l| l.starts_with("blk-bench: done")).ok_or_else(|| {
        let error = console.lines().find(|l| l.starts_with("error:")).unwrap_or("the guest printed no result");
        error.to_string()
    })?;
    let get = |key| field(line, key).ok_or_else(|| format!("no {key}= in `{line}`"));
    report.ops = get("ops")?;
    report.bytes = get("bytes")?;
    report.errors = get("errors")?;
    report.tsc = get("tsc")?;
    report.latency_sum = get("latency-tsc-sum")?;
    report.seed = console.lines().find(|l| l.starts_with("blk-bench: start")).and_then(|l| field(l, "seed"));
    if let Some(hist) = console.lines().find_map(|l| l.strip_prefix("blk-bench: latency-log2-tsc")) {
        for pair in hist.split_whitespace() {
            if let Some((bucket, count)) = pair.split_once(':') {
                if let (Ok(b), Ok(c)) = (bucket.parse::<usize>(), count.parse::<u64>()) {
                    if b < report.histogram.len() {
                        report.histogram[b] = c;
                    }
                }
            }
        }
    }
    Ok(report)
}

/// What a finished process left behind.
pub struct Finished {
    pub stdout: String,
    pub stderr: String,
    pub code: Option<i32>,
    pub wall: Duration,
    /// User plus system CPU time of the process and of every child it
    /// reaped (skvm reaps its device processes before it exits).
    pub cpu: Duration,
}

/// Runs `command` to the end (or kills it after `RUN_LIMIT`).
pub fn run_process(command: Command) -> Result<Finished, String> {
    run_process_within(command, RUN_LIMIT)
}

/// Runs `command` to the end, or kills it after `limit`.
pub fn run_process_within(mut command: Command, limit: Duration) -> Result<Finished, String> {
    let started = Instant::now();
    let mut child = super::child::dies_with_study(&mut command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let ended = loop {
        if let Some(ended) = reap(child.id())? {
            break Some(ended);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall = started.elapsed();
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    match ended {
        Some((code, cpu)) => Ok(Finished { stdout, stderr, code, wall, cpu }),
        None => Err(format!("did not finish within {limit:?}")),
    }
}

/// `wait4` without blocking: the exit code (None when a signal ended it)
/// and the CPU time, once the process has ended.
fn reap(pid: u32) -> Result<Option<(Option<i32>, Duration)>, String> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing only into the two locals.
    let reaped = unsafe { libc::wait4(pid as libc::pid_t, &mut status, libc::WNOHANG, &mut usage) };
    match reaped {
        0 => Ok(None),
        r if r < 0 => Err(format!("cannot wait for process {pid}: {}", std::io::Error::last_os_error())),
        _ => {
            let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            Ok(Some((code, time(usage.ru_utime) + time(usage.ru_stime))))
        }
    }
}

/// One cell to run.
pub struct Cell<'a> {
    system: System<'a>,
    pub workload: &'static Workload,
    pub vcpus: u8,
    pub repeat: usize,
    /// Where the guest's random blocks start: every run reads its own, as
    /// fio's `randrepeat=0` does. With one seed for all, every run after
    /// the first read blocks the host's caches (and the disk's, below
    /// it) held, while fio read fresh ones.
    pub seed: u64,
}

/// The `n`th run's seed (splitmix64: neighbouring runs get unrelated blocks).
fn run_seed(n: usize) -> u64 {
    let mut z = (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

#[derive(Clone, Copy)]
enum System<'a> {
    Skvm(&'static str),
    Peer(&'a Peer),
    /// The host's own fio on the host-disk file: the physical limit.
    Fio,
}

impl System<'_> {
    fn label(&self) -> String {
        match self {
            System::Skvm(mode) => mode.to_string(),
            System::Peer(peer) => peer.name.clone(),
            System::Fio => FIO_COLUMN.into(),
        }
    }
}

/// The study's column for the host's fio.
pub const FIO_COLUMN: &str = "fio (host)";
const HOST_DISK_BYTES: u64 = 1 << 30;

pub struct Scratch {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub guest: PathBuf,
    /// The host-disk group's file, or why there is none.
    pub host_disk: Result<PathBuf, String>,
}

/// A 1 GiB file of real data in `dir`, which must support O_DIRECT.
fn create_host_disk(dir: &Path) -> Result<PathBuf, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("skvm-bench-host-disk-{}.img", std::process::id()));
    let mut file = std::fs::File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..HOST_DISK_BYTES / chunk.len() as u64 {
        if let Err(e) = file.write_all(&chunk) {
            let _ = std::fs::remove_file(&path);
            return Err(format!("cannot write {}: {e}", path.display()));
        }
    }
    let _ = file.sync_all();
    let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path);
    if let Err(e) = direct {
        let _ = std::fs::remove_file(&path);
        return Err(format!("{} has no O_DIRECT ({e}); give --host-disk-dir on a disk filesystem", dir.display()));
    }
    Ok(path)
}

/// Where a benchmark's disk files go: tmpfs (so the host disk does not
/// dominate) where there is one.
pub fn tmpfs_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl Scratch {
    /// A disk file in tmpfs (so the host disk does not dominate), the
    /// host-disk group's file, and the test guest's ELF.
    fn create(out: &Path, host_disk_dir: &Path) -> Result<Scratch, String> {
        let dir = tmpfs_dir().join(format!("skvm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let disk = dir.join("disk.img");
        // Real data, so reads touch real pages.
        std::fs::write(&disk, vec![0x5au8; DISK_BYTES as usize]).map_err(|e| format!("cannot write the disk: {e}"))?;
        let guest = out.join("test-guest.elf");
        std::fs::write(&guest, crate::test_guest::IMAGE).map_err(|e| format!("cannot write the test guest: {e}"))?;
        let host_disk = create_host_disk(host_disk_dir);
        Ok(Scratch { dir, disk, guest, host_disk })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Ok(path) = &self.host_disk {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The host's fio on the host-disk file, the same job the guest runs.
fn fio_row(cell: &Cell, scratch: &Scratch, quick: bool) -> Row {
    let mut row = empty_row("fio", FIO_COLUMN, cell);
    let (Some((rw, block_size, depth, ops)), Ok(file)) = (cell.workload.fio_job(quick), &scratch.host_disk) else {
        return failed(row, "not run: no host-disk file".into());
    };
    let engine = if depth == 1 { "psync" } else { "io_uring" };
    let mut command = Command::new("fio");
    command
        .args(["--name=skvm-study", "--direct=1", "--randrepeat=0", "--norandommap", "--output-format=json"])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={block_size}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--number_ios={ops}"))
        .arg(format!("--size={HOST_DISK_BYTES}"));
    let finished = match run_process(command) {
        Ok(f) => f,
        Err(e) => return failed(row, format!("fio (setup.sh installs it): {e}")),
    };
    row.wall_seconds = finished.wall.as_secs_f64();
    row.host_cpu_seconds = Some(finished.cpu.as_secs_f64());
    match super::linux::parse_fio_json(&finished.stdout) {
        Ok(fio) if fio.iops > 0.0 => {
            row.ops = fio.ios;
            row.bytes = fio.ios * block_size;
            // So that ops / guest_seconds is fio's own IOPS figure.
            row.guest_seconds = fio.ios as f64 / fio.iops;
            row
        }
        Ok(_) => failed(row, "fio did no I/O".into()),
        Err(e) => failed(row, format!("{e} ({})", last_line(&finished.stderr))),
    }
}

fn skvm_row(cell: &Cell, mode: &str, scratch: &Scratch, machine: &Machine, quick: bool) -> Row {
    let stats = scratch.dir.join("stats.json");
    let _ = std::fs::remove_file(&stats);
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let disk = if cell.workload.on_host_disk() {
        match &scratch.host_disk {
            Ok(path) => format!("path={},direct=on", path.display()),
            Err(why) => return failed(empty_row("skvm", mode, cell), format!("not run: {why}")),
        }
    } else {
        format!("path={}", scratch.disk.display())
    };
    let mut command = Command::new(exe);
    command
        .args(["run", "--memory", GUEST_MEMORY, "--cpus", &cell.vcpus.to_string(), "--memory-mode", mode])
        .arg("--disk")
        .arg(disk)
        .arg("--stats-file")
        .arg(&stats)
        .args(["--cmdline", &cell.workload.cmdline(quick, machine.tsc_hz, cell.seed)]);
    let mut row = empty_row("skvm", mode, cell);
    let finished = match run_process(command) {
        Ok(f) => f,
        Err(e) => return failed(row, e),
    };
    row.wall_seconds = finished.wall.as_secs_f64();
    row.host_cpu_seconds = Some(finished.cpu.as_secs_f64());
    if finished.code != Some(0) {
        return failed(row, format!("skvm exited with {:?}: {}", finished.code, last_line(&finished.stderr)));
    }
    if let Err(e) = fill_guest(&mut row, &finished.stdout, machine, cell) {
        return failed(row, e);
    }
    match std::fs::read_to_string(&stats).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) {
        Some(stats) => {
            row.exits_pio = stats["exits"]["pio"].as_u64();
            row.exits_mmio = stats["exits"]["mmio"].as_u64();
            row.vcpu_cpu_seconds = stats["vcpu_cpu_ns"].as_u64().map(|ns| ns as f64 / 1e9);
            let disk = &stats["devices"][0];
            row.memory_rpcs = Some(disk["memory_rpcs"].as_u64().unwrap_or(0));
            row.memory_rpc_bytes = Some(disk["memory_bytes"].as_u64().unwrap_or(0));
            row.memory_service_ns = Some(disk["memory_service_ns"].as_u64().unwrap_or(0));
            row.batches = disk["batches"].as_u64();
            row.device = serde_json::from_value(disk["counters"].clone()).ok();
        }
        None => row.note = Some("no stats file".into()),
    }
    row
}

pub fn last_line(text: &str) -> &str {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

pub fn empty_row(system: &str, mode: &str, cell: &Cell) -> Row {
    Row {
        system: system.into(),
        mode: mode.into(),
        workload: cell.workload.name.into(),
        vcpus: cell.vcpus,
        repeat: cell.repeat,
        ok: true,
        note: None,
        ops: 0,
        bytes: 0,
        errors: 0,
        guest_seconds: 0.0,
        wall_seconds: 0.0,
        host_cpu_seconds: None,
        vcpu_cpu_seconds: None,
        latency_sum_tsc: 0,
        latency_log2_tsc: Vec::new(),
        exits_pio: None,
        exits_mmio: None,
        memory_rpcs: None,
        memory_rpc_bytes: None,
        memory_service_ns: None,
        batches: None,
        device: None,
    }
}

pub fn failed(mut row: Row, why: String) -> Row {
    row.ok = false;
    row.note = Some(why);
    row
}

/// Fills the guest's figures into `row`; Err when the guest reported none,
/// had errors, or read other blocks than `cell`'s seed picks.
pub fn fill_guest(row: &mut Row, console: &str, machine: &Machine, cell: &Cell) -> Result<(), String> {
    let report = parse_guest(console)?;
    if cell.workload.is_disk() && report.seed != Some(cell.seed) {
        return Err(format!("the guest did not take its seed={} (it says {:?}): rebuild it", cell.seed, report.seed));
    }
    row.ops = report.ops;
    row.bytes = report.bytes;
    row.errors = report.errors;
    row.guest_seconds = report.tsc as f64 / machine.tsc_hz;
    row.latency_sum_tsc = report.latency_sum;
    row.latency_log2_tsc = report.histogram;
    if report.errors > 0 {
        return Err(format!("the guest saw {} I/O errors", report.errors));
    }
    Ok(())
}

/// Prints progress on stderr: in place on a terminal, a line per run otherwise.
struct Progress {
    total: usize,
    done: usize,
    started: Instant,
    terminal: bool,
}

impl Progress {
    fn step(&mut self, what: &str, outcome: &str) {
        self.done += 1;
        let elapsed = self.started.elapsed().as_secs_f64();
        let left = elapsed / self.done as f64 * (self.total - self.done) as f64;
        let line = format!(
            "[{:>3}/{} {:>3}%] {what}: {outcome}  (elapsed {}, about {} left)",
            self.done,
            self.total,
            100 * self.done / self.total,
            clock(elapsed),
            clock(left)
        );
        let mut stderr = std::io::stderr();
        if self.terminal {
            let _ = write!(stderr, "\r\x1b[2K{line}");
            if self.done == self.total {
                let _ = writeln!(stderr);
            }
        } else {
            let _ = writeln!(stderr, "{line}");
        }
    }
}

fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

fn outcome(row: &Row, workload: &Workload) -> String {
    if !row.ok {
        return format!("FAILED ({})", row.note.as_deref().unwrap_or("?"));
    }
    match workload.kind {
        Kind::Idle { .. } => {
            format!("{} memory RPCs, {} exits", row.memory_rpcs.unwrap_or(0), row.exits_mmio.unwrap_or(0))
        }
        Kind::Disk { .. } if workload.reports_throughput() => format!("{:.0} MiB/s", row.mib_per_s()),
        Kind::Disk { .. } => format!("{:.0} IOPS", row.iops()),
    }
}

pub fn study(args: &BenchArgs) -> Result<Results, String> {
    let quick = args.quick;
    eprintln!("skvm bench: measuring the machine");
    let machine = machine::describe();
    let scratch = Scratch::create(&args.out, &args.host_disk_dir)?;
    if let Err(why) = &scratch.host_disk {
        eprintln!("skvm bench: the host-disk group will not run: {why}");
    }
    let (peers, mut peer_infos): (Vec<Peer>, Vec<PeerInfo>) = peers::prepare(args, &scratch)?;
    let repeats = matrix::repeats(quick);
    let mut cells = Vec::new();
    for &vcpus in &VCPUS {
        for workload in &WORKLOADS {
            for repeat in 0..repeats {
                let mut add = |system| {
                    let seed = run_seed(cells.len());
                    cells.push(Cell { system, workload, vcpus, repeat, seed });
                };
                // Modes interleaved per repeat, so drift on a shared host hits them alike.
                MODES.iter().for_each(|&m| add(System::Skvm(m)));
                if workload.on_host_disk() {
                    // The group compares skvm with the host itself, not with other VMMs.
                    add(System::Fio);
                } else {
                    peers.iter().filter(|p| p.runs(workload)).for_each(|p| add(System::Peer(p)));
                }
            }
        }
    }
    eprintln!(
        "skvm bench: {} runs ({} preset: {} workloads x {} systems x {:?} vCPUs x {repeats}), disk in {}",
        cells.len(),
        if quick { "quick" } else { "full" },
        WORKLOADS.len(),
        MODES.len() + peers.len(),
        VCPUS,
        scratch.dir.display()
    );
    let mut progress =
        Progress { total: cells.len(), done: 0, started: Instant::now(), terminal: std::io::stderr().is_terminal() };
    let mut rows = Vec::with_capacity(cells.len());
    for cell in &cells {
        let row = match cell.system {
            System::Skvm(mode) => skvm_row(cell, mode, &scratch, &machine, quick),
            System::Peer(peer) => peer.run(cell, &scratch, &machine, quick),
            System::Fio => fio_row(cell, &scratch, quick),
        };
        let what = format!("{} {}, {} vCPU", cell.system.label(), cell.workload.name, cell.vcpus);
        progress.step(&what, &outcome(&row, cell.workload));
        rows.push(row);
    }
    peers::summarise(&peers, &mut peer_infos, &rows);
    let failures = rows.iter().filter(|r| !r.ok && r.system == "skvm").count();
    eprintln!(
        "skvm bench: {} runs in {}, {failures} skvm runs failed",
        rows.len(),
        clock(progress.started.elapsed().as_secs_f64())
    );
    Ok(Results {
        date: today(),
        preset: if quick { "quick" } else { "full" }.into(),
        repeats,
        machine,
        peers: peer_infos,
        rows,
    })
}

pub fn today() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_reads_its_own_random_blocks() {
        let seeds: std::collections::HashSet<u64> = (0..100_000).map(run_seed).collect();
        assert_eq!(seeds.len(), 100_000, "a seed repeats");
        assert!(!seeds.contains(&0), "xorshift stays at zero");
        let workload = WORKLOADS.iter().find(|w| w.on_host_disk()).unwrap();
        assert!(workload.cmdline(true, 1e9, run_seed(7)).ends_with(&format!("seed={}", run_seed(7))));
    }
}
