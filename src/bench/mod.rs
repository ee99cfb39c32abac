//! `skvm bench`: the isolation-cost study. One command runs every memory
//! mode (and QEMU or other VMMs where they run) on the same test guest and
//! workloads, and writes the results (JSON, CSV), a Markdown report and SVG
//! plots. A results file can be rendered again without re-running.
mod child;
mod host_cpu;
pub mod linux;
mod machine;
mod matrix;
mod net;
pub mod netns;
mod peers;
mod plot;
mod report;
mod results;
mod runner;

use results::Results;
use std::path::{Path, PathBuf};

/// What `skvm bench` was asked to do.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A short preset (one run per cell, fewer operations) that finishes in under two
    /// minutes, for CI smoke runs. Without it every cell is repeated five times.
    #[arg(long)]
    pub quick: bool,
    /// Where results.json, results.csv, report.md and the SVG plots go.
    #[arg(long, value_name = "DIR", default_value = "skvm-bench")]
    pub out: PathBuf,
    /// Another VMM to run beside skvm's modes, as NAME=PATH: `firecracker=PATH` or
    /// `cloud-hypervisor=PATH`. QEMU is found on PATH by itself. Repeat for more.
    /// `vhost-user-blk=PATH` (a vhost-user-blk backend, e.g. Cloud Hypervisor's
    /// vhost_user_block) adds a column of Firecracker and of Cloud Hypervisor
    /// (whichever are given) whose disk that backend serves.
    #[arg(long, value_name = "NAME=PATH", value_parser = peers::parse_peer)]
    pub peer: Vec<peers::PeerSpec>,
    /// Do not look for QEMU.
    #[arg(long)]
    pub no_qemu: bool,
    /// Re-render the report and plots from this results.json instead of running.
    #[arg(long, value_name = "RESULTS.json")]
    pub render: Option<PathBuf>,
    /// Instead of the study: fio inside a Linux guest (the kit's kernel and initramfs),
    /// through Linux's own virtio-blk driver, in every memory mode; writes linux.md and
    /// linux.json. Needs a host where Linux boots under KVM (on a PVM host,
    /// scripts/linux-tier.sh --bench runs it in the nested tier).
    #[arg(long)]
    pub linux: bool,
    /// Instead of the study: virtio-net in every memory mode, beside QEMU (unless
    /// --no-qemu) and the Firecracker and Cloud Hypervisor given with --peer. Each
    /// system gets its own network namespace and tap; the test guest answers UDP
    /// round trips and takes and sends 64-byte and 1,472-byte datagrams (frames per
    /// second, MiB/s). In 9 rounds (2 with --quick), the systems taking turns, so a
    /// slow spell of the host falls on all of them; medians, spread, and the rounds
    /// each system did better in. Writes net.md and net.json. Needs root and iproute2.
    #[arg(long, conflicts_with_all = ["linux", "render"])]
    pub net: bool,
    /// With --net: run only these systems, by the names the report gives them (skvm's
    /// modes rpc, rpc-dma, shared, inprocess; qemu, firecracker, cloud-hypervisor), to
    /// compare a few side by side in less time. Peers still need --peer.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',', requires = "net")]
    pub systems: Vec<String>,
    /// The Linux kit for --linux (scripts/linux-kit.sh builds it).
    #[arg(long, value_name = "DIR", default_value = "build/linux-kit")]
    pub linux_kit: PathBuf,
    /// Where the host-disk group's 1 GiB file goes: a directory on the host's own
    /// filesystem (one with O_DIRECT; tmpfs before Linux 6.6 has none). skvm opens it
    /// with direct=on, and the host's fio runs the same jobs on it.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub host_disk_dir: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<u8, String> {
    if args.linux {
        return linux::run(&args);
    }
    if args.net {
        return net::run(&args);
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let results = match &args.render {
        Some(path) => Results::load(path)?,
        None => {
            let results = runner::study(&args)?;
            results.save(&args.out)?;
            results
        }
    };
    write_outputs(&results, &args.out)?;
    println!("{}", report::headline(&results));
    println!("report: {}", args.out.join("report.md").display());
    Ok(0)
}

fn write_outputs(results: &Results, out: &Path) -> Result<(), String> {
    write_output(out, "report.md", &report::markdown(results))?;
    for (name, svg) in plot::all(results) {
        write_output(out, name, &svg)?;
    }
    Ok(())
}

/// Writes one output file `name` into `dir`, or says which could not be written.
fn write_output(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
