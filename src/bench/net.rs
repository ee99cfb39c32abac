//! `skvm bench --net`: virtio-net in every memory mode, beside QEMU,
//! Firecracker and Cloud Hypervisor where they run. Each system gets a
//! network namespace with a tap (10.0.0.1) and the test guest (10.0.0.2)
//! in `net-bench`, which answers UDP on three ports (tests/guest/src/net.rs):
//!
//! * round trip: 64-byte echoes on port 7, one at a time;
//! * host -> guest: datagrams to the sink (port 9), at most 256 beyond the
//!   guest's last acknowledgement (it acks every 64th);
//! * guest -> host: the guest blasts datagrams back (port 10).
//!
//! 64-byte datagrams give frames per second, 1,472-byte ones (a full
//! 1,500-byte MTU) MiB/s. Writes net.json and net.md into `--out`.
use super::host_cpu;
use super::machine::{self, Machine};
use super::matrix::MODES;
use super::netns::Netns;
use super::peers::{self, PeerKind};
use super::BenchArgs;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GUEST: &str = "10.0.0.2";
const CMDLINE: &str = "scenario=net-bench pings=1";
/// How long a guest may take to boot and start serving.
const BOOT_LIMIT: Duration = Duration::from_secs(60);

struct Preset {
    /// Every system is booted and measured once per round, the systems
    /// taking turns, so a slow spell of the host falls on all of them.
    rounds: usize,
    /// A multiple of 64, so the last datagram is acknowledged. The full
    /// preset's phases last about half a second each: at 20,480 they took
    /// 80-150 ms, and one slow spell of the host moved a round's figure by
    /// a fifth (`shared` and Firecracker, 9 rounds at each, 2026-12-02 AMD
    /// EPYC: `shared` host->guest 1,472 B spread 187-353 MiB/s at 20,480,
    /// 245-328 at 102,400).
    datagrams: u32,
    echoes: usize,
}

const FULL: Preset = Preset { rounds: 9, datagrams: 102_400, echoes: 2_000 };
const QUICK: Preset = Preset { rounds: 2, datagrams: 4_096, echoes: 500 };

/// Who runs the guest: skvm in one of its modes, or a peer VMM.
enum System {
    Skvm(&'static str),
    Qemu { path: PathBuf, shim: Option<PathBuf> },
    Firecracker { path: PathBuf },
    CloudHypervisor { path: PathBuf },
}

impl System {
    fn name(&self) -> String {
        match self {
            System::Skvm(mode) => mode.to_string(),
            System::Qemu { .. } => "qemu".into(),
            System::Firecracker { .. } => "firecracker".into(),
            System::CloudHypervisor { .. } => "cloud-hypervisor".into(),
        }
    }

    /// The command that boots the test guest (`guest`) on tap0 inside `ns`.
    fn command(&self, ns: &Netns, guest: &Path, scratch: &Path) -> Result<Command, String> {
        let guest = guest.display().to_string();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns.0]);
        match self {
            System::Skvm(mode) => {
                let skvm = std::env::current_exe().map_err(|e| format!("cannot find skvm itself: {e}"))?;
                command.arg(skvm).args(["run", "--memory-mode", mode]);
                command.args(["--net", "tap=tap0", "--cmdline", CMDLINE]);
            }
            System::Qemu { path, shim } => {
                if let Some(shim) = shim {
                    command.arg("env").arg(format!("LD_PRELOAD={}", shim.display()));
                }
                command.arg(path).args(peers::qemu_microvm_args(&guest, CMDLINE, 1));
                command.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off"]);
                command.args(["-device", "virtio-net-device,netdev=n0,mac=02:53:4b:00:00:01"]);
            }
            System::Firecracker { path } => {
                let mut config = peers::firecracker_config(&guest, CMDLINE, 1);
                config["network-interfaces"] = serde_json::json!([
                    { "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:53:4b:00:00:02" }
                ]);
                let file = scratch.join("firecracker-net.json");
                std::fs::write(&file, config.to_string())
                    .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
                command.arg(path).arg("--no-api").arg("--config-file").arg(file).args(["--level", "Error"]);
            }
            System::CloudHypervisor { path } => {
                command.arg(path).args(peers::cloud_hypervisor_args(&guest, CMDLINE, 1));
                command.args(["--memory", "size=256M"]);
                // Cloud Hypervisor sets the tap's address itself: give it the one it has.
                command.args(["--net", "tap=tap0,mac=02:53:4b:00:00:03,ip=10.0.0.1,mask=255.255.255.0"]);
            }
        }
        Ok(command)
    }
}

/// A running VMM, killed however the benchmark ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the guest and waits until it serves.
fn start(ns: &Netns, system: &System, guest: &Path, scratch: &Path) -> Result<Running, String> {
    let mut command = system.command(ns, guest, scratch)?;
    let mut child = super::child::dies_with_study(&mut command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let stdout = child.stdout.take().ok_or("no console pipe")?;
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    // Read the console on a thread, and keep reading it: a VMM whose serial
    // output pipe closed may die of SIGPIPE.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("error:") || line == "net: serving" {
                let _ = tx.send(line);
            }
        }
    });
    match rx.recv_timeout(BOOT_LIMIT) {
        Ok(line) if line == "net: serving" => Ok(running),
        Ok(error) => Err(format!("the guest failed: {error}")),
        Err(_) => Err(format!("the guest did not serve within {} s", BOOT_LIMIT.as_secs())),
    }
}

fn socket() -> Result<UdpSocket, String> {
    let socket = UdpSocket::bind("10.0.0.1:0").map_err(|e| format!("cannot bind 10.0.0.1: {e}"))?;
    socket.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    // Room for a whole blast, so the host's socket does not drop what the guest sent.
    super::netns::force_receive_buffer(&socket, 32 << 20).map_err(|e| format!("SO_RCVBUFFORCE: {e}"))?;
    Ok(socket)
}

/// Round-trip times of 64-byte echoes, in microseconds, sorted.
fn round_trips(echoes: usize) -> Result<Vec<f64>, String> {
    let socket = socket()?;
    socket.connect((GUEST, 7)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let mut times = Vec::with_capacity(echoes);
    for i in 0..echoes {
        let sent = Instant::now();
        socket.send(&[0x42; 64]).map_err(|e| format!("echo {i}: {e}"))?;
        socket.recv(&mut buf).map_err(|e| format!("echo {i} was lost: {e}"))?;
        times.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Host -> guest: datagrams per second the guest took (acknowledged). The
/// sender keeps at most 256 datagrams beyond the guest's last
/// acknowledgement and sleeps on its socket while the window is full, as a
/// paced sender does: a sender that spun would take a CPU from whoever moves
/// the frames (on a 2-CPU host, the device, the VMM and the vCPU).
fn to_guest(size: usize, datagrams: u32) -> Result<Moved, String> {
    let socket = socket()?;
    socket.connect((GUEST, 9)).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let payload = vec![0x17u8; size];
    let (mut sent, mut acked, mut buf) = (0u64, 0u64, [0u8; 64]);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    while acked < datagrams as u64 {
        while sent < datagrams as u64 && sent < acked + 256 {
            socket.send(&payload).map_err(|e| format!("sending datagram {sent}: {e}"))?;
            sent += 1;
        }
        match socket.recv(&mut buf) {
            Ok(8) => {
                acked = acked.max(u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")));
                last_progress = Instant::now();
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("waiting for the guest's acknowledgement: {e}")),
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            if started.elapsed() > Duration::from_secs(120) {
                return Err(format!("the guest acknowledged {acked} of {datagrams} datagrams in 120 s"));
            }
            // Lost datagrams (the tap's queue overflowed): resend the window.
            sent = acked;
            last_progress = Instant::now();
        }
    }
    Ok(Moved { rate: acked as f64 / started.elapsed().as_secs_f64(), frames: acked })
}

/// Guest -> host: datagrams per second the host received.
fn from_guest(size: usize, datagrams: u32) -> Result<Moved, String> {
    let socket = socket()?;
    socket.connect((GUEST, 10)).map_err(|e| e.to_string())?;
    let mut request = datagrams.to_le_bytes().to_vec();
    request.extend_from_slice(&(size as u16).to_le_bytes());
    socket.send(&request).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let (mut received, mut first, mut last) = (0u64, None, Instant::now());
    while let Ok(got) = socket.recv(&mut buf) {
        first.get_or_insert_with(Instant::now);
        last = Instant::now();
        received += 1;
        if got > 0 && buf[0] == 0xff {
            break;
        }
    }
    let first = first.ok_or("the guest sent nothing")?;
    if received < 2 {
        return Err("the guest sent one datagram only".into());
    }
    // The first datagram starts the clock: count the ones after it.
    Ok(Moved { rate: (received - 1) as f64 / (last - first).as_secs_f64(), frames: received })
}

/// What a throughput phase moved: datagrams per second, and how many.
struct Moved {
    rate: f64,
    frames: u64,
}

/// Host CPU per frame of one throughput phase, in µs.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseCpu {
    /// The VMM's ([`host_cpu`]: its vCPUs left out).
    vmm: f64,
    /// Of `vmm`, the processes it started (skvm's device processes).
    started: f64,
    /// The host's end: this thread, sending or receiving the datagrams.
    host_end: f64,
}

/// A throughput phase's rate, and the host CPU the VMM `vmm` and this
/// thread spent per frame through it.
fn with_cpu(vmm: u32, phase: impl FnOnce() -> Result<Moved, String>) -> Result<(f64, PhaseCpu), String> {
    let (before, host_before) = (host_cpu::vmm_cpu_ns(vmm), host_cpu::this_thread_cpu_ns());
    let moved = phase()?;
    let (after, host_after) = (host_cpu::vmm_cpu_ns(vmm), host_cpu::this_thread_cpu_ns());
    let per_frame = |ns: u64| ns as f64 / 1e3 / moved.frames.max(1) as f64;
    let cpu = PhaseCpu {
        vmm: per_frame(after.all.saturating_sub(before.all)),
        started: per_frame(after.started.saturating_sub(before.started)),
        host_end: per_frame(host_after.saturating_sub(host_before)),
    };
    Ok((moved.rate, cpu))
}

/// One system's figures: medians over the rounds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetRow {
    pub system: String,
    pub runs: usize,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub host_to_guest_64b_fps: f64,
    pub host_to_guest_1472b_mibs: f64,
    pub guest_to_host_64b_fps: f64,
    pub guest_to_host_1472b_mibs: f64,
    /// Host CPU the VMM spent per frame, in µs (every thread of its process
    /// and of those it started, its vCPUs left out), medians over the
    /// rounds: host->guest 64 B and 1,472 B, guest->host 64 B and 1,472 B.
    /// None in runs from before it was measured.
    #[serde(default)]
    pub cpu_us_per_frame: Option<[f64; 4]>,
    /// Each round's CPU figures, in that order (round i as in `rounds`).
    #[serde(default)]
    pub cpu_rounds: Vec<[f64; 4]>,
    /// Of `cpu_us_per_frame`, the processes the VMM started (skvm's device
    /// processes; the peers run their devices as threads): medians, then
    /// each round's.
    #[serde(default)]
    pub started_cpu_us_per_frame: Option<[f64; 4]>,
    #[serde(default)]
    pub started_cpu_rounds: Vec<[f64; 4]>,
    /// The host's end (skvm bench's thread sending or receiving the
    /// datagrams) per frame, the same work whatever the VMM: medians, then
    /// each round's.
    #[serde(default)]
    pub host_end_cpu_us_per_frame: Option<[f64; 4]>,
    #[serde(default)]
    pub host_end_cpu_rounds: Vec<[f64; 4]>,
    /// Each round's figures, in the order above (RTT p50 and p99, then the
    /// four throughputs): round i of every system ran in the same turn.
    #[serde(default)]
    pub rounds: Vec<[f64; 6]>,
    /// Why the system did not run, when it did not.
    pub error: Option<String>,
}

impl NetRow {
    fn from_rounds(system: String, rounds: Vec<[f64; 6]>, cpu: Vec<[PhaseCpu; 4]>) -> NetRow {
        let pick = |i: usize| median(rounds.iter().map(|r| r[i]).collect());
        let of = |field: fn(&PhaseCpu) -> f64| cpu.iter().map(|r| r.each_ref().map(field)).collect::<Vec<_>>();
        let (cpu_rounds, started_cpu_rounds, host_end_cpu_rounds) =
            (of(|c| c.vmm), of(|c| c.started), of(|c| c.host_end));
        let medians = |rounds: &[[f64; 4]]| {
            (!rounds.is_empty()).then(|| std::array::from_fn(|i| median(rounds.iter().map(|r| r[i]).collect())))
        };
        NetRow {
            cpu_us_per_frame: medians(&cpu_rounds),
            started_cpu_us_per_frame: medians(&started_cpu_rounds),
            host_end_cpu_us_per_frame: medians(&host_end_cpu_rounds),
            started_cpu_rounds,
            host_end_cpu_rounds,
            system,
            runs: rounds.len(),
            rtt_p50_us: pick(0),
            rtt_p99_us: pick(1),
            host_to_guest_64b_fps: pick(2),
            host_to_guest_1472b_mibs: pick(3),
            guest_to_host_64b_fps: pick(4),
            guest_to_host_1472b_mibs: pick(5),
            rounds,
            cpu_rounds,
            error: None,
        }
    }

    /// The medians, in a round's order.
    fn medians(&self) -> [f64; 6] {
        [
            self.rtt_p50_us,
            self.rtt_p99_us,
            self.host_to_guest_64b_fps,
            self.host_to_guest_1472b_mibs,
            self.guest_to_host_64b_fps,
            self.guest_to_host_1472b_mibs,
        ]
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NetResults {
    pub machine: Machine,
    pub started_utc: String,
    pub preset: String,
    pub rows: Vec<NetRow>,
}

/// One round of a system whose VMM is process `vmm`: its figures, and the
/// host CPU per frame of each throughput phase.
fn measure(ns: &Netns, preset: &Preset, vmm: u32) -> Result<([f64; 6], [PhaseCpu; 4]), String> {
    let (echoes, datagrams) = (preset.echoes, preset.datagrams);
    ns.within(move || {
        let mib = |rate: f64| rate * 1472.0 / (1 << 20) as f64;
        let rtt = round_trips(echoes)?;
        let (p50, p99) = (rtt[rtt.len() / 2], rtt[rtt.len() * 99 / 100]);
        let (in_small, in_small_cpu) = with_cpu(vmm, || to_guest(64, datagrams))?;
        let (in_large, in_large_cpu) = with_cpu(vmm, || to_guest(1472, datagrams))?;
        let (out_small, out_small_cpu) = with_cpu(vmm, || from_guest(64, datagrams))?;
        let (out_large, out_large_cpu) = with_cpu(vmm, || from_guest(1472, datagrams))?;
        Ok((
            [p50, p99, in_small, mib(in_large), out_small, mib(out_large)],
            [in_small_cpu, in_large_cpu, out_small_cpu, out_large_cpu],
        ))
    })?
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// One system through the rounds: its namespace, and what it measured.
struct Contender {
    system: System,
    ns: Netns,
    rounds: Vec<[f64; 6]>,
    cpu_rounds: Vec<[PhaseCpu; 4]>,
    error: Option<String>,
}

impl Contender {
    /// Boots the guest, measures once and shuts it down.
    fn run_round(&mut self, preset: &Preset, guest: &Path, scratch: &Path) -> Result<[f64; 6], String> {
        let running = start(&self.ns, &self.system, guest, scratch)?;
        let (figures, cpu) = measure(&self.ns, preset, running.0.id())?;
        drop(running);
        self.rounds.push(figures);
        self.cpu_rounds.push(cpu);
        Ok(figures)
    }

    fn into_row(self) -> NetRow {
        match self.error {
            Some(why) => NetRow { system: self.system.name(), error: Some(why), ..NetRow::default() },
            None => NetRow::from_rounds(self.system.name(), self.rounds, self.cpu_rounds),
        }
    }
}

/// Runs the rounds: in each, every system that has not failed boots and
/// measures once, starting one further along each time so that no system
/// always follows the same one.
fn run_rounds(contenders: &mut [Contender], preset: &Preset, guest: &Path, scratch: &Path) {
    let count = contenders.len();
    for round in 0..preset.rounds {
        for turn in 0..count {
            let contender = &mut contenders[(round + turn) % count];
            if contender.error.is_some() {
                continue;
            }
            let name = contender.system.name();
            match contender.run_round(preset, guest, scratch) {
                Ok(f) => eprintln!(
                    "skvm bench --net: round {}/{}, {name}: RTT p50 {:.0} µs, host->guest {:.0} fps / {:.1} MiB/s, \
                     guest->host {:.0} fps / {:.1} MiB/s",
                    round + 1,
                    preset.rounds,
                    f[0],
                    f[2],
                    f[3],
                    f[4],
                    f[5]
                ),
                Err(why) => {
                    eprintln!("skvm bench --net: {name} failed in round {}: {why}", round + 1);
                    contender.error = Some(format!("round {}: {why}", round + 1));
                }
            }
        }
    }
}

/// skvm's modes, then QEMU (unless `--no-qemu`) and the peers given.
fn systems(args: &BenchArgs, scratch: &Path) -> (Vec<System>, Vec<NetRow>) {
    let mut systems: Vec<System> = MODES.into_iter().map(System::Skvm).collect();
    let mut not_run = Vec::new();
    let qemu = args.peer.iter().find(|p| p.kind == PeerKind::Qemu).map(|p| p.path.clone());
    match qemu.or_else(|| (!args.no_qemu).then(|| peers::on_path("qemu-system-x86_64")).flatten()) {
        Some(path) => {
            let shim = machine::is_pvm().then(|| peers::build_msr_shim(scratch).ok()).flatten();
            systems.push(System::Qemu { path, shim });
        }
        None if !args.no_qemu => not_run.push(NetRow {
            system: "qemu".into(),
            error: Some("not run: qemu-system-x86_64 is not installed (Debian: qemu-system-x86)".into()),
            ..NetRow::default()
        }),
        None => {}
    }
    for peer in &args.peer {
        match peer.kind {
            PeerKind::Firecracker => systems.push(System::Firecracker { path: peer.path.clone() }),
            PeerKind::CloudHypervisor => systems.push(System::CloudHypervisor { path: peer.path.clone() }),
            PeerKind::Qemu | PeerKind::VhostUserBlk => {}
        }
    }
    (systems, not_run)
}

/// The systems `--systems` names, in the usual order (all when it names
/// none); a name that is not one of them is an error, not an empty run.
fn chosen(systems: Vec<System>, names: &[String]) -> Result<Vec<System>, String> {
    if names.is_empty() {
        return Ok(systems);
    }
    let known: Vec<String> = systems.iter().map(System::name).collect();
    if let Some(unknown) = names.iter().find(|name| !known.contains(name)) {
        return Err(format!(
            "--systems: no system `{unknown}` here (these can run: {}; a peer needs --peer NAME=PATH)",
            known.join(", ")
        ));
    }
    Ok(systems.into_iter().filter(|system| names.contains(&system.name())).collect())
}

pub fn run(args: &BenchArgs) -> Result<u8, String> {
    if let Some(why) = Netns::unavailable() {
        return Err(format!("--net needs network namespaces and taps: {why}"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("--net needs root: it makes a network namespace and a tap per system".into());
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let preset = if args.quick { &QUICK } else { &FULL };
    let scratch = std::env::temp_dir().join(format!("skvm-net-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let guest = scratch.join("guest.elf");
    std::fs::write(&guest, crate::test_guest::IMAGE).map_err(|e| format!("cannot write the test guest: {e}"))?;
    let started_utc = super::runner::today();
    let (systems, mut rows) = systems(args, &scratch);
    let systems = chosen(systems, &args.systems)?;
    rows.retain(|row| args.systems.is_empty() || args.systems.contains(&row.system));
    let mut contenders = Vec::new();
    for system in systems {
        match Netns::create(&format!("bench-{}", system.name())) {
            Ok(ns) => {
                contenders.push(Contender { system, ns, rounds: Vec::new(), cpu_rounds: Vec::new(), error: None })
            }
            Err(why) => rows.push(NetRow { system: system.name(), error: Some(why), ..NetRow::default() }),
        }
    }
    eprintln!(
        "skvm bench --net: {} rounds of {} systems ({})",
        preset.rounds,
        contenders.len(),
        contenders.iter().map(|c| c.system.name()).collect::<Vec<_>>().join(", ")
    );
    run_rounds(&mut contenders, preset, &guest, &scratch);
    rows.extend(contenders.into_iter().map(Contender::into_row));
    let _ = std::fs::remove_dir_all(&scratch);
    let results = NetResults {
        machine: machine::describe(),
        started_utc,
        preset: if args.quick { "quick" } else { "full" }.into(),
        rows,
    };
    let json = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
    super::write_output(&args.out, "net.json", &json)?;
    let report = markdown(&results, preset);
    super::write_output(&args.out, "net.md", &report)?;
    println!("{report}");
    println!("report: {}", args.out.join("net.md").display());
    // Every skvm mode must have run; a peer that could not is reported, not fatal.
    let failed: Vec<&str> =
        results.rows.iter().filter(|r| is_mode(&r.system) && r.error.is_some()).map(|r| r.system.as_str()).collect();
    if failed.is_empty() {
        return Ok(0);
    }
    eprintln!("skvm bench --net: failed in {}", failed.join(", "));
    Ok(1)
}

fn is_mode(system: &str) -> bool {
    MODES.contains(&system)
}

fn pct(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.0} %", 100.0 * a / b)
    } else {
        "-".into()
    }
}

/// The figures' columns in a round's array, in the tables' order, and
/// whether lower is better.
const COLUMNS: [(usize, bool); 5] = [(0, true), (3, false), (5, false), (2, false), (4, false)];

/// `row` against `base` on one figure: the ratio of the medians, and in how
/// many rounds `row` did better (each round's figures were taken in the
/// same turn, so the pairs share the host's mood).
fn against(row: &NetRow, base: &NetRow, (column, lower_is_better): (usize, bool)) -> String {
    let ratio = pct(row.medians()[column], base.medians()[column]);
    let pairs: Vec<(f64, f64)> = row.rounds.iter().zip(&base.rounds).map(|(r, b)| (r[column], b[column])).collect();
    if pairs.is_empty() || std::ptr::eq(row, base) {
        return ratio;
    }
    let better = pairs.iter().filter(|(r, b)| if lower_is_better { r < b } else { r > b }).count();
    format!("{ratio} ({better}/{})", pairs.len())
}

/// Lowest-highest across the rounds of one column, with `decimals`.
fn spread(row: &NetRow, column: usize, decimals: usize) -> String {
    low_high(row.rounds.iter().map(|r| r[column]), decimals)
}

/// `values` as lowest-highest with `decimals`; "-" when there are none.
fn low_high(values: impl ExactSizeIterator<Item = f64>, decimals: usize) -> String {
    if values.len() == 0 {
        return "-".into();
    }
    let (low, high) = values.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
    format!("{low:.decimals$}-{high:.decimals$}")
}

/// The host CPU each VMM spent per frame, when the run measured it.
fn cpu_table(out: &mut String, results: &NetResults) {
    let measured: Vec<&NetRow> = results.rows.iter().filter(|r| r.cpu_us_per_frame.is_some()).collect();
    if measured.is_empty() {
        return;
    }
    out.push_str(
        "\n## Host CPU per frame\n\nMicroseconds of host CPU the VMM spent per datagram moved in each \
         throughput phase: every thread of its process and of the processes it started (skvm's device \
         processes), less its vCPU threads, which the polling guest keeps busy whatever the VMM does. \
         Medians over the rounds, lowest-highest in brackets. The host's sender (skvm bench itself) is \
         not counted.\n\n| system | host->guest 64 B | host->guest 1472 B | guest->host 64 B | guest->host \
         1472 B |\n|---|---:|---:|---:|---:|\n",
    );
    for row in measured {
        let cells: Vec<String> = (0..4)
            .map(|i| {
                let median = row.cpu_us_per_frame.map_or(0.0, |m| m[i]);
                format!("{median:.2} ({})", low_high(row.cpu_rounds.iter().map(|r| r[i]), 2))
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", row.system, cells.join(" | "));
    }
}

/// Where each VMM's host CPU per frame goes: its own process and the
/// processes it started, beside what the host's end of the traffic costs.
fn cpu_split_table(out: &mut String, results: &NetResults) {
    let measured: Vec<&NetRow> = results.rows.iter().filter(|r| r.started_cpu_us_per_frame.is_some()).collect();
    if measured.is_empty() {
        return;
    }
    out.push_str(
        "\n## Host CPU per frame, by process\n\nThe figures above split: the VMM's own process + the processes \
         it started (skvm's device processes; the peers run their devices as threads of their own), then, \
         after the semicolon, skvm bench's thread at the host's end (sending the datagrams, or receiving \
         them), which does the same work whatever the VMM. Microseconds per datagram, medians over the \
         rounds.\n\n| system | host->guest 64 B | host->guest 1472 B | guest->host 64 B | guest->host \
         1472 B |\n|---|---:|---:|---:|---:|\n",
    );
    for row in measured {
        let cells: Vec<String> = (0..4)
            .map(|i| {
                // The VMM's own process, round by round: all it spent less what it started.
                let own = row.cpu_rounds.iter().zip(&row.started_cpu_rounds).map(|(all, started)| all[i] - started[i]);
                let started = row.started_cpu_us_per_frame.map_or(0.0, |m| m[i]);
                let host = row.host_end_cpu_us_per_frame.map_or(0.0, |m| m[i]);
                format!("{:.2} + {started:.2}; {host:.2}", median(own.collect()).max(0.0))
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", row.system, cells.join(" | "));
    }
}

/// net.md: the figures, their spread, each mode against `shared`, and
/// `shared` and `inprocess` against each peer.
fn markdown(results: &NetResults, preset: &Preset) -> String {
    let m = &results.machine;
    let mut out = format!(
        "# virtio-net across memory modes and peers\n\nRun {} with the {} preset: {} round{}, each booting \
         every system once and measuring it once, the systems taking turns; medians over the rounds. {} \
         datagrams per throughput figure, {} echoes for the round trip. Machine: {}, {} CPUs, {} GiB, \
         Linux {}, KVM: {}.\n\nThe test guest (`net-bench`, 1 vCPU, 256 MiB) on a tap in its own network \
         namespace; UDP from the host at 10.0.0.1 to the guest at 10.0.0.2. Host->guest counts datagrams \
         the guest acknowledged; guest->host counts datagrams a host socket received.\n\n",
        results.started_utc,
        results.preset,
        preset.rounds,
        if preset.rounds == 1 { "" } else { "s" },
        preset.datagrams,
        preset.echoes,
        m.cpu_model,
        m.cpus,
        m.memory_gib,
        m.kernel,
        m.kvm
    );
    out.push_str(
        "| system | RTT p50 µs | RTT p99 µs | host->guest 64 B fps | host->guest 1472 B MiB/s | \
         guest->host 64 B fps | guest->host 1472 B MiB/s |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &results.rows {
        match &row.error {
            Some(why) => {
                let _ = writeln!(out, "| {} | {why} | | | | | |", row.system);
            }
            None => {
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} |",
                    row.system,
                    row.rtt_p50_us,
                    row.rtt_p99_us,
                    row.host_to_guest_64b_fps,
                    row.host_to_guest_1472b_mibs,
                    row.guest_to_host_64b_fps,
                    row.guest_to_host_1472b_mibs
                );
            }
        }
    }
    out.push_str(
        "\n## Spread across the rounds (lowest-highest)\n\n| system | RTT p50 µs | host->guest 64 B fps | \
         host->guest 1472 B MiB/s | guest->host 64 B fps | guest->host 1472 B MiB/s |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for row in results.rows.iter().filter(|r| r.error.is_none()) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.system,
            spread(row, 0, 0),
            spread(row, 2, 0),
            spread(row, 3, 1),
            spread(row, 4, 0),
            spread(row, 5, 1)
        );
    }
    cpu_table(&mut out, results);
    cpu_split_table(&mut out, results);
    let ran = |name: &str| results.rows.iter().find(|r| r.system == name && r.error.is_none());
    let comparison = |out: &mut String, title: &str, base: &NetRow, others: &[&NetRow]| {
        let _ = write!(
            out,
            "\n{title}\n\nThe ratio of the medians, and (in brackets) the rounds in which the system did \
             better.\n\n| system | RTT p50 (lower is better) | host->guest 1472 B | guest->host 1472 B | \
             host->guest 64 B | guest->host 64 B |\n|---|---:|---:|---:|---:|---:|\n"
        );
        for row in others {
            let cells: Vec<String> = COLUMNS.iter().map(|&column| against(row, base, column)).collect();
            let _ = writeln!(out, "| {} | {} |", row.system, cells.join(" | "));
        }
    };
    if let Some(shared) = ran("shared") {
        let modes: Vec<&NetRow> = MODES.iter().filter_map(|m| ran(m)).collect();
        comparison(&mut out, "## Each mode against `shared`", shared, &modes);
    }
    let peers: Vec<&NetRow> = results.rows.iter().filter(|r| r.error.is_none() && !is_mode(&r.system)).collect();
    for peer in peers {
        let modes: Vec<&NetRow> = ["shared", "inprocess"].iter().filter_map(|m| ran(m)).collect();
        comparison(&mut out, &format!("## `shared` and `inprocess` against {}", peer.system), peer, &modes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(systems: &[System]) -> Vec<String> {
        systems.iter().map(System::name).collect()
    }

    #[test]
    fn a_namespace_left_by_a_process_that_is_gone_is_deleted() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || Netns::unavailable().is_some() {
            eprintln!("skipped: making network namespaces needs root and iproute2");
            return;
        }
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let stale = format!("skvm-{}-stale", gone.id());
        assert!(std::process::Command::new("ip").args(["netns", "add", &stale]).status().unwrap().success());
        let ours = Netns::create("kept").unwrap();
        assert!(!std::path::Path::new(&format!("/run/netns/{stale}")).exists(), "{stale} is still there");
        assert!(std::path::Path::new(&format!("/run/netns/{}", ours.0)).exists(), "our own went too");
    }

    #[test]
    fn systems_picks_by_name_in_the_usual_order_and_refuses_an_unknown_one() {
        let all = || MODES.into_iter().map(System::Skvm).collect::<Vec<_>>();
        assert_eq!(names(&chosen(all(), &[]).unwrap()), MODES);
        let picked = chosen(all(), &["shared".into(), "rpc".into()]).unwrap();
        assert_eq!(names(&picked), ["rpc", "shared"]);
        let why = chosen(all(), &["firecracker".into()]).err().unwrap();
        assert!(why.contains("`firecracker`") && why.contains("--peer"), "{why}");
    }
}
