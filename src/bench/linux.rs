//! `skvm bench --linux`: fio inside a Linux guest (the project's kit, see
//! scripts/linux-kit.sh), through Linux's own virtio-blk driver, in every
//! memory mode. It needs a host where Linux reaches userspace under KVM; on
//! a PVM host, scripts/linux-tier.sh --bench runs it in the nested tier.
//! Absolute figures there are an emulator's; the ratios between modes are
//! what it reports for.
use super::matrix::MODES;
use super::results::median_of;
use super::runner::{last_line, run_process_within, tmpfs_dir};
use super::BenchArgs;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One fio job: (name, rw, block size, queue depth, I/Os quick, I/Os full).
const WORKLOADS: [(&str, &str, &str, u32, u64, u64); 4] = [
    ("4K randread QD1", "randread", "4k", 1, 500, 5000),
    ("4K randread QD32", "randread", "4k", 32, 4000, 40000),
    ("4K randwrite QD32", "randwrite", "4k", 32, 4000, 40000),
    ("128K seq read QD4", "read", "128k", 4, 400, 4000),
];
const GUEST_MEMORY: &str = "512M";
const DISK_BYTES: usize = 256 << 20;
/// A boot, the job and a power-off, in the nested tier's emulator too.
const RUN_LIMIT: Duration = Duration::from_secs(600);
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet skvm-test=fio";

/// One mode's result on one workload (medians over the repeats).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinuxRow {
    pub workload: String,
    pub mode: String,
    pub ok: bool,
    pub error: Option<String>,
    pub iops: f64,
    pub mib_per_s: f64,
    pub clat_p50_us: f64,
    pub clat_p99_us: f64,
    /// skvm's host CPU (VMM and device processes) per I/O.
    pub host_cpu_us_per_io: f64,
}

/// What fio said about the job, from its JSON report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FioResult {
    pub ios: u64,
    pub iops: f64,
    pub bytes_per_s: f64,
    pub clat_p50_ns: f64,
    pub clat_p99_ns: f64,
}

/// Reads fio's JSON between the kit's markers on the guest console.
pub fn parse_fio(console: &str) -> Result<FioResult, String> {
    let begin = console.find("SKVM-FIO-BEGIN").ok_or("the guest never started fio (no SKVM-FIO-BEGIN)")?;
    let end = console[begin..].find("SKVM-FIO-END").ok_or("fio did not finish (no SKVM-FIO-END)")? + begin;
    parse_fio_json(&console[begin..end])
}

/// Reads fio's JSON report out of `text` (what fio printed, perhaps with a
/// line or two around it).
pub fn parse_fio_json(text: &str) -> Result<FioResult, String> {
    let (Some(open), Some(close)) = (text.find('{'), text.rfind('}')) else {
        let said = text.lines().skip(1).find(|l| !l.trim().is_empty()).unwrap_or("nothing");
        return Err(format!("fio printed no report: {said}"));
    };
    // The serial console turns "\n" into "\r\n"; JSON does not mind.
    let json: serde_json::Value =
        serde_json::from_str(&text[open..=close]).map_err(|e| format!("fio's report is not JSON: {e}"))?;
    let job = &json["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio job error {}", job["error"]));
    }
    let side = if job["write"]["total_ios"].as_u64().unwrap_or(0) > 0 { &job["write"] } else { &job["read"] };
    let percentile = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN);
    let ios = side["total_ios"].as_u64().unwrap_or(0);
    if ios == 0 {
        return Err("fio did no I/O".into());
    }
    Ok(FioResult {
        ios,
        iops: side["iops"].as_f64().unwrap_or(0.0),
        bytes_per_s: side["bw_bytes"].as_f64().unwrap_or(0.0),
        clat_p50_ns: percentile("50.000000"),
        clat_p99_ns: percentile("99.000000"),
    })
}

/// The kit's kernel and initramfs, from its kit.env.
fn kit(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let env = dir.join("kit.env");
    let text = std::fs::read_to_string(&env)
        .map_err(|e| format!("no Linux kit at {} ({e}); scripts/linux-kit.sh builds one", env.display()))?;
    let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let path = |key: &str| -> Result<PathBuf, String> {
        let path = PathBuf::from(vars.get(key).ok_or(format!("{} names no {key}", env.display()))?);
        path.exists()
            .then_some(path.clone())
            .ok_or(format!("{key}={} is missing; rerun scripts/linux-kit.sh", path.display()))
    };
    Ok((path("VMLINUX")?, path("INITRAMFS")?))
}

fn one_run(kernel: &Path, initrd: &Path, disk: &Path, mode: &str, cmdline: &str) -> Result<(FioResult, f64), String> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut command = Command::new(exe);
    command
        .args(["run", "--memory", GUEST_MEMORY, "--memory-mode", mode, "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .args(["--cmdline", cmdline]);
    let finished = run_process_within(command, RUN_LIMIT)?;
    let fio = parse_fio(&finished.stdout)?;
    if finished.code != Some(0) {
        return Err(format!("skvm exited with {:?}: {}", finished.code, last_line(&finished.stderr)));
    }
    Ok((fio, finished.cpu.as_secs_f64()))
}

fn row(workload: &str, mode: &str, runs: Vec<Result<(FioResult, f64), String>>) -> LinuxRow {
    let mut row = LinuxRow {
        workload: workload.into(),
        mode: mode.into(),
        ok: false,
        error: None,
        iops: 0.0,
        mib_per_s: 0.0,
        clat_p50_us: 0.0,
        clat_p99_us: 0.0,
        host_cpu_us_per_io: 0.0,
    };
    let mut good = Vec::new();
    for run in runs {
        match run {
            Ok(run) => good.push(run),
            Err(e) => row.error = Some(e),
        }
    }
    if good.is_empty() || row.error.is_some() {
        return row;
    }
    let pick = |f: &dyn Fn(&(FioResult, f64)) -> f64| median_of(good.iter().map(f).collect()).unwrap_or(0.0);
    row.ok = true;
    row.iops = pick(&|(r, _)| r.iops);
    row.mib_per_s = pick(&|(r, _)| r.bytes_per_s / (1 << 20) as f64);
    row.clat_p50_us = pick(&|(r, _)| r.clat_p50_ns / 1e3);
    row.clat_p99_us = pick(&|(r, _)| r.clat_p99_ns / 1e3);
    // The whole run's CPU over the job's I/Os: boot included, so an upper bound.
    row.host_cpu_us_per_io = pick(&|(r, cpu)| cpu * 1e6 / r.ios as f64);
    row
}

/// Runs every workload in every mode and writes linux.json and linux.md.
pub fn run(args: &BenchArgs) -> Result<u8, String> {
    if super::machine::is_pvm() {
        return Err("this host's /dev/kvm is PVM, where a Linux guest does not reach userspace; \
                    run `scripts/linux-tier.sh --bench` to run this benchmark in the nested tier"
            .into());
    }
    let (kernel, initrd) = kit(&args.linux_kit)?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let disk = tmpfs_dir().join(format!("skvm-bench-linux-{}.img", std::process::id()));
    std::fs::write(&disk, vec![0x5au8; DISK_BYTES]).map_err(|e| format!("cannot write {}: {e}", disk.display()))?;
    let repeats = if args.quick { 1 } else { 3 };
    let total = WORKLOADS.len() * MODES.len() * repeats;
    let (started, mut done, mut rows) = (Instant::now(), 0, Vec::new());
    for (name, rw, bs, qd, quick_ios, full_ios) in WORKLOADS {
        let ios = if args.quick { quick_ios } else { full_ios };
        let cmdline = format!("{CMDLINE} fio={rw},{bs},{qd},{ios}");
        for mode in MODES {
            let mut runs = Vec::new();
            for _ in 0..repeats {
                let run = one_run(&kernel, &initrd, &disk, mode, &cmdline);
                done += 1;
                let outcome = match &run {
                    Ok((fio, _)) => format!("{:.0} IOPS", fio.iops),
                    Err(e) => format!("failed: {e}"),
                };
                eprintln!(
                    "[{done:>2}/{total}] linux fio {name} {mode}: {outcome} (elapsed {:.0} s)",
                    started.elapsed().as_secs_f64()
                );
                runs.push(run);
            }
            rows.push(row(name, mode, runs));
        }
    }
    let _ = std::fs::remove_file(&disk);
    let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
    super::write_output(&args.out, "linux.json", &json)?;
    let table = markdown(&rows, repeats);
    super::write_output(&args.out, "linux.md", &table)?;
    println!("{table}");
    let failed = rows.iter().filter(|r| !r.ok).count();
    eprintln!("skvm bench --linux: {} rows, {failed} failed, in {:.0} s", rows.len(), started.elapsed().as_secs_f64());
    Ok(if failed == 0 { 0 } else { 1 })
}

/// One column of figures: how to read it from a row.
type Metric = fn(&LinuxRow) -> f64;

/// The table: each workload's figure per mode, and each mode against `shared`.
pub fn markdown(rows: &[LinuxRow], repeats: usize) -> String {
    let mut out = format!(
        "## fio in a Linux guest (Linux's virtio-blk driver), medians of {repeats}\n\n\
         | workload | metric | {} | {} |\n|---|---|{}{}\n",
        MODES.join(" | "),
        MODES.iter().filter(|&&m| m != "shared").map(|m| format!("{m}/shared")).collect::<Vec<_>>().join(" | "),
        "---|".repeat(MODES.len()),
        "---|".repeat(MODES.len() - 1),
    );
    let find = |workload: &str, mode: &str| rows.iter().find(|r| r.workload == workload && r.mode == mode);
    for (name, _, bs, ..) in WORKLOADS {
        let large = bs != "4k";
        let metrics: [(&str, Metric); 4] = [
            (if large { "MiB/s" } else { "IOPS" }, if large { |r| r.mib_per_s } else { |r| r.iops }),
            ("p50 latency µs", |r| r.clat_p50_us),
            ("p99 latency µs", |r| r.clat_p99_us),
            ("host CPU µs per I/O", |r| r.host_cpu_us_per_io),
        ];
        for (metric, value) in metrics {
            let _ = write!(out, "| {name} | {metric} |");
            for mode in MODES {
                match find(name, mode) {
                    Some(r) if r.ok => {
                        let _ = write!(out, " {:.0} |", value(r));
                    }
                    _ => out.push_str(" failed |"),
                }
            }
            let shared = find(name, "shared").filter(|r| r.ok).map(value);
            for mode in MODES.iter().filter(|&&m| m != "shared") {
                match (find(name, mode).filter(|r| r.ok).map(value), shared) {
                    (Some(v), Some(s)) if s > 0.0 => {
                        let _ = write!(out, " {:.0} % |", 100.0 * v / s);
                    }
                    _ => out.push_str(" - |"),
                }
            }
            out.push('\n');
        }
    }
    for r in rows.iter().filter(|r| !r.ok) {
        let _ = writeln!(out, "\n{} {}: {}", r.workload, r.mode, r.error.as_deref().unwrap_or("failed"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_reports_are_read_from_between_the_markers() {
        let console = "boot noise\r\nSKVM-FIO-BEGIN\r\n{\r\n\"jobs\": [{\"error\": 0, \"read\": {\"total_ios\": 500, \
            \"iops\": 1234.5, \"bw_bytes\": 5056512, \"clat_ns\": {\"percentile\": {\"50.000000\": 700000, \
            \"99.000000\": 2000000}}}, \"write\": {\"total_ios\": 0}}]\r\n}\r\nSKVM-FIO-END\r\n";
        let fio = parse_fio(console).unwrap();
        assert_eq!((fio.ios, fio.iops, fio.clat_p50_ns, fio.clat_p99_ns), (500, 1234.5, 700000.0, 2000000.0));
        assert!(parse_fio("SKVM-FIO-BEGIN\nfio: engine io_uring not loadable\nSKVM-FIO-END")
            .unwrap_err()
            .contains("io_uring"));
        assert!(parse_fio("Kernel panic").unwrap_err().contains("never started"));
        assert!(parse_fio("SKVM-FIO-BEGIN\n{\"jobs\":[{\"error\":5}]}\nSKVM-FIO-END").unwrap_err().contains("error 5"));
    }

    #[test]
    fn the_table_gives_each_mode_against_shared_and_names_failures() {
        let good = |mode: &str, iops| {
            let mut r = row(
                "4K randread QD1",
                mode,
                vec![Ok((
                    FioResult { ios: 100, iops, bytes_per_s: iops * 4096.0, clat_p50_ns: 1e5, clat_p99_ns: 2e5 },
                    0.01,
                ))],
            );
            r.mode = mode.into();
            r
        };
        let rows = vec![
            good("rpc", 800.0),
            good("shared", 1000.0),
            good("inprocess", 1100.0),
            row("4K randread QD1", "rpc-dma", vec![Err("skvm exited with Some(1)".into())]),
        ];
        let table = markdown(&rows, 1);
        assert!(
            table.contains("| 4K randread QD1 | IOPS | 800 | failed | 1000 | 1100 | 80 % | - | 110 % |"),
            "{table}"
        );
        assert!(table.contains("host CPU µs per I/O | 100 |"), "{table}");
        assert!(table.contains("4K randread QD1 rpc-dma: skvm exited with Some(1)"), "{table}");
    }
}
