//! The Markdown report: headline table, per-vCPU tables with ratios, where
//! each mode's time goes per request, latency percentiles, and what did not run.
use super::matrix::{Kind, Workload, MODES, VCPUS, WORKLOADS};
use super::results::{median, Results, Row};
use std::fmt::Write;

fn value(results: &Results, column: &str, workload: &Workload, vcpus: u8) -> Option<f64> {
    let rows = results.cell(column, workload.name, vcpus);
    if workload.reports_throughput() {
        median(rows, Row::mib_per_s)
    } else {
        median(rows, Row::iops)
    }
}

fn figure(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => group_thousands(v.round() as u64),
        Some(v) => format!("{v:.1}"),
        None => "-".into(),
    }
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.0} %", 100.0 * a / b),
        _ => "-".into(),
    }
}

/// Workload x system table for one vCPU count, with ratios between modes.
fn table(results: &Results, vcpus: u8) -> String {
    let columns = results.columns();
    let mut out = format!(
        "| workload | unit | {} | rpc/shared | rpc/rpc-dma | rpc/inprocess | shared/inprocess |\n",
        columns.join(" | ")
    );
    out.push_str(&format!("|---|---|{}---:|---:|---:|---:|\n", "---:|".repeat(columns.len())));
    for workload in WORKLOADS.iter().filter(|w| w.is_disk() && ran(results, w)) {
        let unit = if workload.reports_throughput() { "MiB/s" } else { "IOPS" };
        let cells: Vec<String> = columns.iter().map(|c| figure(value(results, c, workload, vcpus))).collect();
        let v = |mode| value(results, mode, workload, vcpus);
        let _ = writeln!(
            out,
            "| {} | {unit} | {} | {} | {} | {} | {} |",
            workload.name,
            cells.join(" | "),
            ratio(v("rpc"), v("shared")),
            ratio(v("rpc"), v("rpc-dma")),
            ratio(v("rpc"), v("inprocess")),
            ratio(v("shared"), v("inprocess"))
        );
    }
    out
}

/// Whether the results hold any run of `workload` (a results file from
/// before a workload existed has none, and renders as it did).
fn ran(results: &Results, workload: &Workload) -> bool {
    results.rows.iter().any(|r| r.workload == workload.name)
}

/// The host-disk group beside the host's own fio on the same file (1 vCPU).
fn host_disk_table(results: &Results) -> String {
    let fio = super::runner::FIO_COLUMN;
    let mut out = format!(
        "| workload | unit | {fio} | {} | rpc/fio | rpc-dma/fio | shared/fio | inprocess/fio |\n|---|---|---:|{}---:|---:|---:|---:|\n",
        MODES.join(" | "),
        "---:|".repeat(MODES.len())
    );
    for workload in WORKLOADS.iter().filter(|w| w.on_host_disk() && ran(results, w)) {
        let unit = if workload.reports_throughput() { "MiB/s" } else { "IOPS" };
        let v = |column| value(results, column, workload, 1);
        let modes: Vec<String> = MODES.iter().map(|m| figure(v(m))).collect();
        let ratios: Vec<String> = MODES.iter().map(|m| ratio(v(m), v(fio))).collect();
        let _ = writeln!(
            out,
            "| {} | {unit} | {} | {} | {} |",
            workload.name,
            figure(v(fio)),
            modes.join(" | "),
            ratios.join(" | ")
        );
    }
    out
}

/// The table README.md carries: 1 vCPU, every disk workload, every system.
pub fn headline(results: &Results) -> String {
    format!(
        "skvm isolation-cost study, {} ({} preset), {}, {} CPUs, {}:\n\n{}",
        results.date,
        results.preset,
        results.machine.cpu_model,
        results.machine.cpus,
        results.machine.kvm,
        table(results, 1)
    )
}

fn per_request(rows: &[&Row], f: impl Fn(&Row) -> Option<f64>) -> Option<f64> {
    median(rows.iter().copied().filter(|r| f(r).is_some()), |r| f(r).unwrap_or(0.0))
}

/// Per request, medians over repeats: where each mode's time and bytes go.
fn breakdown(results: &Results, vcpus: u8) -> String {
    let hz = results.machine.tsc_hz;
    let mut out = String::from(
        "| workload | mode | guest latency | memory calls | of them RPCs | requests per batch | messages per batch | VMM memory service | device waiting on memory | device's own work | bytes copied | I/O exits | VMM + device CPU |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for workload in WORKLOADS.iter().filter(|w| w.is_disk() && ran(results, w)) {
        for mode in MODES {
            let rows: Vec<&Row> = results.cell(mode, workload.name, vcpus).collect();
            if rows.is_empty() {
                continue;
            }
            let requests = |r: &Row| r.device.as_ref().map(|d| d.requests.max(1) as f64);
            let per = |f: &dyn Fn(&Row) -> Option<f64>| per_request(&rows, |r| Some(f(r)? / requests(r)?));
            let micros = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1} µs", v / 1e3));
            let latency = median(rows.iter().copied(), |r| r.mean_latency_us(hz));
            // A batch is one message out and one back, plus a round trip per memory RPC.
            let batches = |r: &Row| r.batches.filter(|&b| b > 0).map(|b| b as f64);
            let per_batch = |f: &dyn Fn(&Row) -> Option<f64>| per_request(&rows, |r| Some(f(r)? / batches(r)?));
            let _ = writeln!(
                out,
                "| {} | {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                workload.name,
                latency.map_or("-".into(), |v| format!("{v:.1} µs")),
                per(&|r| r.device.as_ref().map(|d| d.memory_calls as f64)).map_or("-".into(), |v| format!("{v:.2}")),
                per(&|r| r.memory_rpcs.map(|v| v as f64)).map_or("-".into(), |v| format!("{v:.2}")),
                per_batch(&|r| r.device.as_ref().map(|d| d.requests as f64)).map_or("-".into(), |v| format!("{v:.1}")),
                per_batch(&|r| Some(2.0 * (r.batches? + r.memory_rpcs?) as f64))
                    .map_or("-".into(), |v| format!("{v:.2}")),
                micros(per(&|r| r.memory_service_ns.map(|v| v as f64))),
                micros(per(&|r| r.device.as_ref().map(|d| d.memory_wait_ns as f64))),
                micros(per(&|r| r.device.as_ref().map(|d| d.busy_ns.saturating_sub(d.memory_wait_ns) as f64))),
                per(&|r| r.device.as_ref().map(|d| (d.bytes_read + d.bytes_written) as f64))
                    .map_or("-".into(), |v| group_thousands(v.round() as u64)),
                per(&|r| Some((r.exits_mmio? + r.exits_pio?) as f64)).map_or("-".into(), |v| format!("{v:.2}")),
                micros(per(&|r| r.io_path_cpu_seconds().map(|s| s * 1e9))),
            );
        }
    }
    out
}

/// Host CPU per guest request for every system: everything the VMM
/// process and its devices used, and for skvm, the part outside the vCPUs.
fn cpu_table(results: &Results) -> String {
    let columns = results.columns();
    let mut out = format!("| workload | {} |\n|---|{}\n", columns.join(" | "), "---:|".repeat(columns.len()));
    for workload in WORKLOADS.iter().filter(|w| w.is_disk() && ran(results, w)) {
        let cells: Vec<String> = columns
            .iter()
            .map(|column| {
                let rows: Vec<&Row> = results.cell(column, workload.name, 1).filter(|r| r.ops > 0).collect();
                let per_op = |f: &dyn Fn(&Row) -> Option<f64>| per_request(&rows, |r| Some(f(r)? * 1e6 / r.ops as f64));
                match (per_op(&|r| r.host_cpu_seconds), per_op(&|r| r.io_path_cpu_seconds())) {
                    (Some(total), Some(outside)) => format!("{total:.1} µs ({outside:.1} µs)"),
                    (Some(total), None) => format!("{total:.1} µs"),
                    _ => "-".into(),
                }
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", workload.name, cells.join(" | "));
    }
    out
}

/// Columns whose disk a vhost-user-blk backend serves end with this.
const VHOST_USER_SUFFIX: &str = "+vhost-user-blk";

/// The vhost-user-blk columns with at least one successful run.
fn vhost_user_columns(results: &Results) -> Vec<String> {
    let mut columns: Vec<String> = results
        .rows
        .iter()
        .filter(|r| r.ok && r.system.ends_with(VHOST_USER_SUFFIX))
        .map(|r| r.system.clone())
        .collect();
    columns.sort();
    columns.dedup();
    columns
}

/// skvm's modes against vhost-user-blk, per workload and VMM (1 vCPU): the
/// cost of confining a device to the buffers posted to it, against the
/// deployed out-of-process design whose backend maps all of guest RAM.
fn vhost_user_table(results: &Results) -> String {
    let hz = results.machine.tsc_hz;
    let mut out = String::from(
        "| workload | VMM | unit | vhost-user-blk | rpc | rpc / vhost-user | shared / vhost-user | inprocess / vhost-user | p50 rpc | p50 vhost-user | p99 rpc | p99 vhost-user | host CPU per request, rpc | host CPU per request, vhost-user |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let percentile = |column: &str, workload: &str, fraction| {
        let hist = merged_histogram(results, column, workload, 1);
        percentile_us(&hist, fraction, hz).map_or("-".into(), |v| format!("< {v:.0} µs"))
    };
    let cpu = |column: &str, workload: &str| {
        let rows: Vec<&Row> = results.cell(column, workload, 1).filter(|r| r.ops > 0).collect();
        per_request(&rows, |r| Some(r.host_cpu_seconds? * 1e6 / r.ops as f64))
            .map_or("-".into(), |v| format!("{v:.1} µs"))
    };
    for workload in WORKLOADS.iter().filter(|w| w.is_disk() && !w.on_host_disk() && ran(results, w)) {
        let unit = if workload.reports_throughput() { "MiB/s" } else { "IOPS" };
        let name = workload.name;
        for column in vhost_user_columns(results) {
            let vhost = value(results, &column, workload, 1);
            let mode = |mode| value(results, mode, workload, 1);
            let _ = writeln!(
                out,
                "| {name} | {} | {unit} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                column.trim_end_matches(VHOST_USER_SUFFIX),
                figure(vhost),
                figure(mode("rpc")),
                ratio(mode("rpc"), vhost),
                ratio(mode("shared"), vhost),
                ratio(mode("inprocess"), vhost),
                percentile("rpc", name, 0.5),
                percentile(&column, name, 0.5),
                percentile("rpc", name, 0.99),
                percentile(&column, name, 0.99),
                cpu("rpc", name),
                cpu(&column, name)
            );
        }
    }
    out
}

/// The request latency under which `fraction` of requests finished (log2 buckets: an upper bound).
pub fn percentile_us(histogram: &[u64], fraction: f64, tsc_hz: f64) -> Option<f64> {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (bucket, count) in histogram.iter().enumerate() {
        seen += count;
        if seen as f64 >= fraction * total as f64 {
            return Some((1u64 << (bucket + 1)) as f64 / tsc_hz * 1e6);
        }
    }
    None
}

/// Histograms of every run of a cell added together.
pub fn merged_histogram(results: &Results, column: &str, workload: &str, vcpus: u8) -> Vec<u64> {
    let mut total = vec![0u64; 48];
    for row in results.cell(column, workload, vcpus) {
        for (t, v) in total.iter_mut().zip(&row.latency_log2_tsc) {
            *t += v;
        }
    }
    total
}

fn latency_table(results: &Results, workload: &str) -> String {
    let hz = results.machine.tsc_hz;
    let mut out = String::from("| system | p50 | p90 | p99 |\n|---|---:|---:|---:|\n");
    for column in results.columns() {
        let hist = merged_histogram(results, &column, workload, 1);
        let p = |f| percentile_us(&hist, f, hz).map_or("-".into(), |v| format!("< {v:.0} µs"));
        let _ = writeln!(out, "| {column} | {} | {} | {} |", p(0.5), p(0.9), p(0.99));
    }
    out
}

/// The device's view of its guest-memory calls: an RPC round trip in rpc
/// mode, a checked local copy otherwise (bucket i: under 2^i µs).
fn memory_call_table(results: &Results, workload: &str) -> String {
    let mut out = String::from("| mode | calls | p50 | p99 |\n|---|---:|---:|---:|\n");
    for mode in MODES {
        let mut hist = [0u64; rpc_schema::LATENCY_BUCKETS];
        for row in results.cell(mode, workload, 1) {
            if let Some(device) = &row.device {
                for (h, v) in hist.iter_mut().zip(&device.memory_latency_log2_us) {
                    *h += v;
                }
            }
        }
        let total: u64 = hist.iter().sum();
        let bound = |fraction: f64| {
            let mut seen = 0;
            for (bucket, count) in hist.iter().enumerate() {
                seen += count;
                if total > 0 && seen as f64 >= fraction * total as f64 {
                    return format!("< {} µs", 1u64 << bucket);
                }
            }
            "-".into()
        };
        let _ = writeln!(out, "| {mode} | {total} | {} | {} |", bound(0.5), bound(0.99));
    }
    out
}

fn idle_table(results: &Results) -> String {
    let Some(idle) = WORKLOADS.iter().find(|w| matches!(w.kind, Kind::Idle { .. })) else { return String::new() };
    let mut out = String::from(
        "| system | vCPUs | idle time | wall, start to exit | host CPU | of it outside vCPUs | I/O exits | \
         memory RPCs | device busy |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &vcpus in &VCPUS {
        for column in results.columns() {
            let rows: Vec<&Row> = results.cell(&column, idle.name, vcpus).filter(|r| r.ok).collect();
            // Medians over the runs that have the figure; "-" where a system does not report it.
            let m = |f: &dyn Fn(&Row) -> Option<f64>, unit: &str| {
                let decimals = if unit.is_empty() { 0 } else { 1 };
                per_request(&rows, f).map_or("-".into(), |v| format!("{v:.decimals$}{unit}"))
            };
            let _ = writeln!(
                out,
                "| {column} | {vcpus} | {} | {} | {} | {} | {} | {} | {} |",
                m(&|r| Some(r.guest_seconds * 1e3), " ms"),
                m(&|r| Some(r.wall_seconds * 1e3), " ms"),
                m(&|r| Some(r.host_cpu_seconds? * 1e3), " ms"),
                m(&|r| Some(r.io_path_cpu_seconds()? * 1e3), " ms"),
                m(&|r| Some((r.exits_mmio? + r.exits_pio?) as f64), ""),
                m(&|r| r.memory_rpcs.map(|v| v as f64), ""),
                m(&|r| r.device.as_ref().map(|d| d.busy_ns as f64 / 1e3), " µs"),
            );
        }
    }
    out
}

pub fn markdown(results: &Results) -> String {
    let m = &results.machine;
    let mut out = String::from("# skvm isolation-cost study\n\n");
    let _ = writeln!(
        out,
        "Run {} with the {} preset ({} run{} per cell). Machine: {}, {} CPUs, {} GiB, Linux {}, KVM: {}; \
         TSC {:.3} GHz; skvm {}.\n",
        results.date,
        results.preset,
        results.repeats,
        if results.repeats == 1 { "" } else { "s" },
        m.cpu_model,
        m.cpus,
        m.memory_gib,
        m.kernel,
        m.kvm,
        m.tsc_hz / 1e9,
        m.skvm_version
    );
    out.push_str(
        "Every run boots the self-built test guest (`tests/guest`, 256 MiB), which drives a virtio-blk disk in \
         tmpfs and times itself with the TSC. Memory modes: `rpc`, a sandboxed device that never maps guest \
         memory: the VMM walks its queue and posts it batches of requests, and it reaches only the buffers \
         the guest posted (by grant); `rpc-dma`, a sandboxed device that walks its own queue and asks the VMM \
         to read and write guest addresses; `shared`, a sandboxed device that maps guest RAM; `inprocess`, a \
         device thread inside the VMM. Figures are medians over the runs of a cell; ratios compare \
         medians.\n\n## Peers\n\n",
    );
    if results.peers.is_empty() {
        out.push_str("None.\n");
    }
    for peer in &results.peers {
        let _ = writeln!(
            out,
            "- **{}** ({}): {}",
            peer.name,
            peer.version.as_deref().unwrap_or("version unknown"),
            peer.status
        );
    }
    for &vcpus in &VCPUS {
        let _ = write!(out, "\n## Disk throughput, {vcpus} vCPU{}\n\n", if vcpus == 1 { "" } else { "s" });
        out.push_str(&table(results, vcpus));
    }
    if !vhost_user_columns(results).is_empty() {
        out.push_str(
            "\n## skvm against vhost-user-blk (1 vCPU)\n\n\
             vhost-user-blk is the out-of-process disk as deployed: a separate backend process that maps all of \
             guest RAM (here under each VMM named in Peers, with the backend named there). `rpc` confines its \
             device to the buffers the guest posted; `shared` is the same design as vhost-user (a separate \
             process that maps guest RAM). The rpc ratio is what that confinement costs; host CPU counts the \
             VMM and its device processes for skvm, the VMM and the backend for vhost-user.\n\n",
        );
        out.push_str(&vhost_user_table(results));
    }
    if WORKLOADS.iter().any(|w| w.on_host_disk() && ran(results, w)) {
        out.push_str(
            "\n## Host disk against the host's own fio (1 vCPU)\n\n\
             The host-disk group's disk is a 1 GiB file on the host's own filesystem (`--host-disk-dir`), which \
             skvm opens with `direct=on` and on which the host's fio runs the same job (`--direct=1`, io_uring, \
             psync at QD1): what the host itself reaches is the limit. Other VMMs do not run this group.\n\n",
        );
        out.push_str(&host_disk_table(results));
    }
    out.push_str(
        "\n## Where the time goes, per request (1 vCPU)\n\n\
         Guest latency is from submitting a request to seeing it completed. Memory calls are the device's \
         reads and writes of guest memory beyond what came inline (in the rpc modes each is an RPC to the \
         VMM); in `rpc` mode a batch of requests is one message to the device and one back, plus two per \
         memory RPC; the VMM memory service is the time the VMM spent checking and copying (in `rpc` mode \
         also walking the ring and applying completions); waiting on memory is the device's view of its \
         calls (round trips included); the device's own work is the rest of its busy time; bytes copied are \
         guest-memory bytes the device read or wrote through calls; VMM + device CPU is the host CPU time of \
         the VMM's threads other than the vCPUs and of the device processes, over the whole run (boot \
         included) divided by its requests.\n\n",
    );
    out.push_str(&breakdown(results, 1));
    out.push_str(
        "\n## Host CPU per request (1 vCPU)\n\n\
         User plus system CPU time of the VMM process and every device process, from start to exit, divided \
         by the guest's requests. The test guest polls for completions, so its vCPU is busy for the whole run \
         and that time is in the total (except where a workload says the guest sleeps: it halts until the \
         device interrupts); in brackets, for skvm, the part outside the vCPU threads: what the \
         I/O path itself costs the host.\n\n",
    );
    out.push_str(&cpu_table(results));
    out.push_str("\n## Request latency, 4K random read at QD1 (1 vCPU)\n\n");
    out.push_str(&latency_table(results, "4K randread QD1"));
    out.push_str(
        "\n## Guest-memory call latency, 4K random read at QD1 (1 vCPU)\n\n\
         As the device sees it: in the rpc modes an RPC round trip to the VMM, otherwise a checked local copy \
         (`rpc` mode makes calls only for data too large to travel inline).\n\n",
    );
    out.push_str(&memory_call_table(results, "4K randread QD1"));
    out.push_str(
        "\n## Idle guest\n\nWhat a VM costs while the guest does no I/O, boot and exit \
         included. The guest waits by reading the TSC, so its vCPU is busy throughout; host CPU outside the \
         vCPUs is what the VMM and its idle devices cost (mostly starting the device processes). The exits are \
         the guest's boot-time console output (port I/O); idle devices cost no RPCs and no time.\n\n",
    );
    out.push_str(&idle_table(results));
    let failures: Vec<&Row> = results.rows.iter().filter(|r| !r.ok).collect();
    out.push_str("\n## Runs that failed or could not run\n\n");
    if failures.is_empty() {
        out.push_str("None.\n");
    }
    let mut seen = Vec::new();
    for row in failures {
        let line = format!("- {} {}: {}", row.mode, row.workload, row.note.as_deref().unwrap_or("no reason recorded"));
        if !seen.contains(&line) {
            let _ = writeln!(out, "{line}");
            seen.push(line);
        }
    }
    out.push_str(
        "\n## Files\n\n- `results.json`: one row per run with the machine and peers; \
         `skvm bench --render results.json --out DIR` renders this report and the plots again.\n\
         - `results.csv`: the same rows, flat.\n\
         - `iops.svg`: 4 KiB IOPS by mode and queue depth; `throughput.svg`: 128 KiB MiB/s by mode; \
         `latency.svg`: the latency distribution of 4 KiB random reads at QD1 per mode.\n",
    );
    out
}
