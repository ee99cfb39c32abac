//! Other VMMs run beside skvm's modes on the same test guest: QEMU (found
//! on PATH), and Firecracker or Cloud Hypervisor where the user points at
//! them. Given a vhost-user-blk backend too (`vhost-user-blk=PATH`, e.g.
//! Cloud Hypervisor's `vhost_user_block`), Firecracker and Cloud Hypervisor
//! each also run with their disk served by that backend: the out-of-process
//! design as deployed, a separate process that maps all of guest RAM.
//! Cloud Hypervisor offers virtio-pci only, which the test guest drives
//! too. skvm never builds or ships them; it records their versions, and
//! says in the report when one could not run and why.
use super::machine::Machine;
use super::matrix::Workload;
use super::results::{PeerInfo, Row};
use super::runner::{empty_row, failed, fill_guest, run_process, Cell, Scratch};
use super::BenchArgs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The shim QEMU needs on hosts whose KVM accepts only 0 for MSR 0x10a.
const MSR_SHIM_SOURCE: &str = include_str!("../../benches/peers/kvm-msr-shim.c");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    Qemu,
    Firecracker,
    CloudHypervisor,
    /// Not a VMM: the backend Firecracker gets its disk from in a second column.
    VhostUserBlk,
}

/// How the vhost-user-blk backend is started (the report quotes it).
pub const VHOST_USER_OPTIONS: &str = "--block-backend path=DISK,socket=SOCK,num_queues=1,queue_size=256";

#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub kind: PeerKind,
    pub path: PathBuf,
}

pub fn parse_peer(text: &str) -> Result<PeerSpec, String> {
    let (name, path) = text.split_once('=').ok_or("expected NAME=PATH, e.g. firecracker=/usr/bin/firecracker")?;
    let kind = match name {
        "qemu" => PeerKind::Qemu,
        "firecracker" => PeerKind::Firecracker,
        "cloud-hypervisor" => PeerKind::CloudHypervisor,
        "vhost-user-blk" => PeerKind::VhostUserBlk,
        _ => return Err(format!("unknown peer `{name}`: use qemu, firecracker, cloud-hypervisor or vhost-user-blk")),
    };
    Ok(PeerSpec { kind, path: PathBuf::from(path) })
}

pub struct Peer {
    pub name: String,
    kind: PeerKind,
    path: PathBuf,
    /// LD_PRELOAD library, when the host needs one.
    preload: Option<PathBuf>,
    /// Firecracker's disk comes from this vhost-user-blk backend.
    backend: Option<PathBuf>,
}

fn name(kind: PeerKind) -> &'static str {
    match kind {
        PeerKind::Qemu => "qemu",
        PeerKind::Firecracker => "firecracker",
        PeerKind::CloudHypervisor => "cloud-hypervisor",
        PeerKind::VhostUserBlk => "vhost-user-blk",
    }
}

/// A vhost-user-blk backend serving the study's disk on `socket`, killed on drop.
struct Backend {
    child: std::process::Child,
}

impl Backend {
    fn start(path: &Path, disk: &Path, socket: &Path) -> Result<Backend, String> {
        let _ = std::fs::remove_file(socket);
        let spec = format!("path={},socket={},num_queues=1,queue_size=256", disk.display(), socket.display());
        let child = super::child::dies_with_study(&mut Command::new(path))
            .args(["--block-backend", &spec])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", path.display()))?;
        let mut backend = Backend { child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() {
            if std::time::Instant::now() > deadline || backend.child.try_wait().ok().flatten().is_some() {
                return Err("the vhost-user-blk backend never opened its socket".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(backend)
    }

    /// CPU time the backend has used so far (user + system), from /proc.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<u64> = rest.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        fields.get(10..12).map_or(0.0, |t| (t[0] + t[1]) as f64 / ticks)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The VMMs that can take their disk from a vhost-user-blk backend.
fn uses_vhost_user(kind: PeerKind) -> bool {
    matches!(kind, PeerKind::Firecracker | PeerKind::CloudHypervisor)
}

/// The column of `kind` with its disk served by the vhost-user-blk backend.
fn vhost_user_column(kind: PeerKind) -> String {
    format!("{}+vhost-user-blk", name(kind))
}

pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(program)).find(|p| p.is_file())
}

fn version(path: &Path) -> Option<String> {
    let output = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    text.lines().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string())
}

/// QEMU's microvm puts its virtio-mmio transports here; PVH guests do not
/// get them on the command line, so list every slot (empty ones read as no device).
fn qemu_mmio_devices() -> String {
    (0..24).map(|i| format!(" virtio_mmio.device=512@{:#x}:{}", 0xfeb0_0000u64 + i * 512, 5 + i)).collect()
}

/// QEMU `microvm` booting the test guest with 256 MiB on `vcpus` vCPUs, its
/// COM1 on stdout and microvm's virtio-mmio slots on its command line.
pub fn qemu_microvm_args(guest: &str, cmdline: &str, vcpus: u8) -> Vec<String> {
    let (smp, append) = (vcpus.to_string(), format!("{cmdline}{}", qemu_mmio_devices()));
    ["-M", "microvm", "-enable-kvm", "-cpu", "host", "-m", "256M", "-smp", &smp]
        .into_iter()
        .chain(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
        // Threads named for what they run (`CPU 0/KVM`): the net study leaves the vCPUs' time out.
        .chain(["-name", "skvm-bench,debug-threads=on"])
        .chain(["-kernel", guest, "-append", &append])
        .chain(["-global", "virtio-mmio.force-legacy=false"])
        .map(String::from)
        .collect()
}

/// Firecracker's configuration for the test guest with 256 MiB on `vcpus`
/// vCPUs and no devices; callers add theirs.
pub fn firecracker_config(guest: &str, cmdline: &str, vcpus: u8) -> serde_json::Value {
    serde_json::json!({
        "boot-source": { "kernel_image_path": guest, "boot_args": cmdline },
        "drives": [],
        "machine-config": { "vcpu_count": vcpus, "mem_size_mib": 256 },
    })
}

/// Cloud Hypervisor booting the test guest on `vcpus` vCPUs, its serial
/// console on stdout; callers add its memory and devices.
pub fn cloud_hypervisor_args(guest: &str, cmdline: &str, vcpus: u8) -> Vec<String> {
    let cpus = format!("boot={vcpus}");
    ["--kernel", guest, "--cmdline", cmdline, "--cpus", &cpus, "--serial", "tty", "--console", "off"]
        .into_iter()
        .map(String::from)
        .collect()
}

impl Peer {
    fn command(&self, cmdline: &str, vcpus: u8, scratch: &Scratch, with_disk: bool) -> Command {
        let mut command = Command::new(&self.path);
        if let Some(preload) = &self.preload {
            command.env("LD_PRELOAD", preload);
        }
        let guest = scratch.guest.display().to_string();
        let disk = scratch.disk.display().to_string();
        match self.kind {
            PeerKind::Qemu => {
                command.args(qemu_microvm_args(&guest, cmdline, vcpus));
                command.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
                if with_disk {
                    command.args(["-drive", &format!("id=d,file={disk},format=raw,if=none")]);
                    command.args(["-device", "virtio-blk-device,drive=d"]);
                }
            }
            PeerKind::Firecracker => {
                let socket = scratch.dir.join("vhost-user-blk.sock").display().to_string();
                let drives = match (with_disk, &self.backend) {
                    (true, Some(_)) => {
                        serde_json::json!([{ "drive_id": "vub", "is_root_device": false, "socket": socket }])
                    }
                    (true, None) => {
                        serde_json::json!([{ "drive_id": "d", "path_on_host": disk, "is_root_device": false, "is_read_only": false }])
                    }
                    (false, _) => serde_json::json!([]),
                };
                let mut config = firecracker_config(&guest, cmdline, vcpus);
                config["drives"] = drives;
                let path = scratch.dir.join("firecracker.json");
                let _ = std::fs::write(&path, config.to_string());
                command.arg("--no-api").arg("--config-file").arg(path).args(["--level", "Error"]);
            }
            PeerKind::VhostUserBlk => unreachable!("a backend is not run as a VMM"),
            PeerKind::CloudHypervisor => {
                command.args(cloud_hypervisor_args(&guest, cmdline, vcpus));
                // The test guest keeps up to 64 requests of 3 descriptors in a 256-entry queue.
                let socket = scratch.dir.join("vhost-user-blk.sock").display().to_string();
                match (with_disk, &self.backend) {
                    (true, Some(_)) => {
                        // A vhost-user backend maps guest RAM, so it must be shareable.
                        command.args(["--memory", "size=256M,shared=on"]);
                        command.args(["--disk", &format!("vhost_user=true,socket={socket},queue_size=256")]);
                    }
                    (true, None) => {
                        command.args(["--memory", "size=256M"]);
                        command.args(["--disk", &format!("path={disk},image_type=raw,queue_size=256")]);
                    }
                    (false, _) => {
                        command.args(["--memory", "size=256M"]);
                    }
                }
            }
        }
        command
    }

    /// A column whose disk comes from a backend runs only the disk workloads
    /// (the VMM's own column has the rest).
    pub fn runs(&self, workload: &Workload) -> bool {
        workload.is_disk() || self.backend.is_none()
    }

    pub fn run(&self, cell: &Cell, scratch: &Scratch, machine: &Machine, quick: bool) -> Row {
        let mut row = empty_row(&self.name, &self.name, cell);
        let backend = match &self.backend {
            Some(path) => match Backend::start(path, &scratch.disk, &scratch.dir.join("vhost-user-blk.sock")) {
                Ok(backend) => Some(backend),
                Err(e) => return failed(row, e),
            },
            None => None,
        };
        let command = self.command(&cell.workload.cmdline(quick, machine.tsc_hz, cell.seed), cell.vcpus, scratch, true);
        let finished = match run_process(command) {
            Ok(f) => f,
            Err(e) => return failed(row, e),
        };
        row.wall_seconds = finished.wall.as_secs_f64();
        // The backend's CPU counts with the VMM's, as skvm's device processes do.
        let backend_cpu = backend.as_ref().map_or(0.0, Backend::cpu_seconds);
        row.host_cpu_seconds = Some(finished.cpu.as_secs_f64() + backend_cpu);
        if let Err(e) = fill_guest(&mut row, &finished.stdout, machine, cell) {
            let detail = finished.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            return failed(row, format!("{e} ({} exited {:?}: {detail})", self.name, finished.code));
        }
        row
    }

    /// Boots the guest once with `scenario=shutdown`; Err says why it could not.
    fn probe(&self, scratch: &Scratch) -> Result<(), String> {
        let finished = run_process(self.command("scenario=hello", 1, scratch, false))?;
        if finished.stdout.contains("skvm-test-guest: hello from ring 3") && finished.stdout.contains("exit: 0") {
            Ok(())
        } else {
            let stderr = finished.stderr.lines().filter(|l| !l.trim().is_empty()).take(2).collect::<Vec<_>>();
            Err(format!("exit {:?}: {}", finished.code, stderr.join(" / ")))
        }
    }
}

/// Builds the MSR shim with the host's C compiler into `dir`.
pub fn build_msr_shim(dir: &Path) -> Result<PathBuf, String> {
    let source = dir.join("kvm-msr-shim.c");
    let library = dir.join("kvm-msr-shim.so");
    std::fs::write(&source, MSR_SHIM_SOURCE).map_err(|e| e.to_string())?;
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()
        .map_err(|e| format!("no C compiler to build the MSR shim: {e}"))?;
    if !output.status.success() {
        return Err(format!("building the MSR shim failed: {}", String::from_utf8_lossy(&output.stderr)));
    }
    Ok(library)
}

/// Finds the peers, checks that each boots the test guest, and records what happened.
pub fn prepare(args: &BenchArgs, scratch: &Scratch) -> Result<(Vec<Peer>, Vec<PeerInfo>), String> {
    let mut specs = args.peer.clone();
    let qemu_given = specs.iter().any(|s| s.kind == PeerKind::Qemu);
    let mut infos = Vec::new();
    if !args.no_qemu && !qemu_given {
        match on_path("qemu-system-x86_64") {
            Some(path) => specs.insert(0, PeerSpec { kind: PeerKind::Qemu, path }),
            None => infos.push(PeerInfo {
                name: "qemu".into(),
                path: None,
                version: None,
                status: "not run: qemu-system-x86_64 is not installed (Debian: qemu-system-x86)".into(),
            }),
        }
    }
    // A backend is a second column of each VMM that can use it, not a VMM of its own.
    let backend = specs.iter().find(|s| s.kind == PeerKind::VhostUserBlk).map(|s| s.path.clone());
    specs.retain(|s| s.kind != PeerKind::VhostUserBlk);
    let mut columns: Vec<(PeerSpec, Option<PathBuf>)> = specs.iter().map(|s| (s.clone(), None)).collect();
    if let Some(path) = &backend {
        let hosts: Vec<PeerSpec> = specs.iter().filter(|s| uses_vhost_user(s.kind)).cloned().collect();
        if hosts.is_empty() {
            infos.push(PeerInfo {
                name: "vhost-user-blk".into(),
                path: Some(path.display().to_string()),
                version: version(path),
                status: "not run: vhost-user-blk=PATH needs firecracker=PATH or cloud-hypervisor=PATH too".into(),
            });
        }
        columns.extend(hosts.into_iter().map(|host| (host, Some(path.clone()))));
    }
    let mut peers = Vec::new();
    for (spec, backend) in columns {
        let mut info = PeerInfo {
            name: match &backend {
                Some(_) => vhost_user_column(spec.kind),
                None => name(spec.kind).into(),
            },
            path: Some(spec.path.display().to_string()),
            version: version(&spec.path),
            status: String::new(),
        };
        if let Some(path) = &backend {
            // The report names the backend, its version and how it was started.
            let backend_version = version(path).unwrap_or_else(|| "version unknown".into());
            info.version = Some(format!(
                "{}; disk from {} ({backend_version}) {VHOST_USER_OPTIONS}",
                info.version.as_deref().unwrap_or("version unknown"),
                path.display()
            ));
            if !path.is_file() {
                info.status = format!("not run: {} does not exist", path.display());
                infos.push(info);
                continue;
            }
        }
        if !spec.path.is_file() {
            info.status = format!("not run: {} does not exist", spec.path.display());
            infos.push(info);
            continue;
        }
        let mut peer = Peer { name: info.name.clone(), kind: spec.kind, path: spec.path, preload: None, backend };
        eprintln!("skvm bench: trying {} ({})", peer.name, info.version.as_deref().unwrap_or("version unknown"));
        let mut result = peer.probe(scratch);
        if let Err(why) = &result {
            if spec.kind == PeerKind::Qemu && why.contains("MSR 0x10a") {
                match build_msr_shim(&scratch.dir) {
                    Ok(shim) => {
                        peer.preload = Some(shim);
                        result = peer.probe(scratch);
                    }
                    Err(e) => result = Err(format!("{why}; {e}")),
                }
            }
        }
        match result {
            Ok(()) => {
                info.status = match peer.preload {
                    Some(_) => "ran with the LD_PRELOAD MSR shim: this host's KVM accepts only 0 for \
                                MSR_IA32_ARCH_CAPABILITIES (0x10a), which QEMU otherwise aborts on"
                        .into(),
                    None => "ran".into(),
                };
                peers.push(peer);
            }
            Err(why) => info.status = format!("not run: it could not boot the test guest ({why})"),
        }
        infos.push(info);
    }
    Ok((peers, infos))
}

/// Adds each peer's success count to its status.
pub fn summarise(peers: &[Peer], infos: &mut [PeerInfo], rows: &[Row]) {
    for peer in peers {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.system == peer.name).collect();
        let ok = mine.iter().filter(|r| r.ok).count();
        if let Some(info) = infos.iter_mut().find(|i| i.name == peer.name) {
            info.status = format!("{}; {ok} of {} runs succeeded", info.status, mine.len());
        }
    }
}
