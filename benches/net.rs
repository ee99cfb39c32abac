//! virtio-net benchmark across memory modes. Each mode gets a network
//! namespace with a tap (10.0.0.1) and the test guest (10.0.0.2) in
//! `net-ping`, which answers UDP on three ports (see tests/guest/src/net.rs):
//!
//! * round trip: 2,000 echoes (port 7) of 64-byte datagrams, one at a time;
//! * host -> guest: 20,480 datagrams to the sink (port 9), at most 256
//!   beyond the guest's last acknowledgement (it acks every 64th);
//! * guest -> host: the guest blasts 20,480 datagrams back (port 10).
//!
//! 64-byte datagrams give frames per second, 1,472-byte ones (a full
//! 1,500-byte MTU) MiB/s. Run with `cargo bench --bench net` (as root, with
//! iproute2); it prints medians of 5 runs per mode and each against
//! `shared`. QEMU (`qemu-system-x86_64` on PATH, microvm with
//! virtio-net-device on the same tap, vhost off) runs beside skvm unless
//! `-- --no-qemu`; Firecracker with `-- --firecracker PATH`.
#[path = "../tests/common/mod.rs"]
mod common;

use common::Netns;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPEATS: usize = 5;
/// A multiple of 64, so the last datagram is acknowledged.
const DATAGRAMS: u32 = 20_480;
const ECHOES: usize = 2_000;
const GUEST: &str = "10.0.0.2";
const MODES: [&str; 4] = ["rpc", "rpc-dma", "shared", "inprocess"];

const CMDLINE: &str = "scenario=net-bench pings=1";

/// Who runs the guest: skvm in one of its modes, or a peer VMM.
enum System {
    Skvm(&'static str),
    Qemu { path: String, shim: Option<String> },
    Firecracker { path: String },
}

impl System {
    fn name(&self) -> String {
        match self {
            System::Skvm(mode) => mode.to_string(),
            System::Qemu { .. } => "qemu".into(),
            System::Firecracker { .. } => "firecracker".into(),
        }
    }

    /// The command that boots the test guest (`guest`) on tap0 inside `ns`.
    fn command(&self, ns: &Netns, guest: &str, scratch: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns.0]);
        match self {
            System::Skvm(mode) => {
                command.args([env!("CARGO_BIN_EXE_skvm"), "run", "--memory-mode", mode]);
                command.args(["--net", "tap=tap0", "--cmdline", CMDLINE]);
            }
            System::Qemu { path, shim } => {
                if let Some(shim) = shim {
                    command.args(["env", &format!("LD_PRELOAD={shim}")]);
                }
                // microvm's transports, listed for a PVH guest that reads them from its command line.
                let mmio: String = (0..24)
                    .map(|i| format!(" virtio_mmio.device=512@{:#x}:{}", 0xfeb0_0000u64 + i * 512, 5 + i))
                    .collect();
                command.args([path, "-M", "microvm", "-enable-kvm", "-cpu", "host", "-m", "256M", "-smp", "1"]);
                command.args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"]);
                command.args(["-kernel", guest, "-append", &format!("{CMDLINE}{mmio}")]);
                command.args(["-global", "virtio-mmio.force-legacy=false"]);
                command.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off"]);
                command.args(["-device", "virtio-net-device,netdev=n0,mac=02:53:4b:00:00:01"]);
            }
            System::Firecracker { path } => {
                let config = format!(
                    r#"{{"boot-source":{{"kernel_image_path":"{guest}","boot_args":"{CMDLINE}"}},
                    "drives":[],"machine-config":{{"vcpu_count":1,"mem_size_mib":256}},
                    "network-interfaces":[{{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:53:4b:00:00:02"}}]}}"#
                );
                let file = format!("{scratch}/firecracker.json");
                std::fs::write(&file, config).unwrap();
                command.args([path, "--no-api", "--config-file", &file, "--level", "Error"]);
            }
        }
        command
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
fn start(ns: &Netns, system: &System, guest: &str, scratch: &str) -> Running {
    let mode = system.name();
    let mut child = system.command(ns, guest, scratch).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut serving = false;
    for line in lines.by_ref().map_while(Result::ok) {
        assert!(!line.starts_with("error:"), "{mode}: {line}");
        if line == "net: serving" {
            serving = true;
            break;
        }
    }
    // Keep reading the console: a VMM whose serial output pipe closed may die of SIGPIPE.
    std::thread::spawn(move || lines.for_each(drop));
    let running = Running(child);
    assert!(serving, "{mode}: the guest never served");
    running
}

fn socket() -> UdpSocket {
    use std::os::fd::AsRawFd;
    let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Room for a whole blast, so the host's socket does not drop what the guest sent.
    let size: libc::c_int = 32 << 20;
    // SAFETY: setsockopt with an int of the size we pass (root may exceed rmem_max).
    unsafe {
        let at = &size as *const libc::c_int as *const libc::c_void;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, at, len);
    }
    socket
}

/// Round-trip times of 64-byte echoes, in microseconds, sorted.
fn round_trips() -> Vec<f64> {
    let socket = socket();
    socket.connect((GUEST, 7)).unwrap();
    let mut buf = [0u8; 2048];
    let mut times: Vec<f64> = (0..ECHOES)
        .map(|i| {
            let sent = Instant::now();
            socket.send(&[0x42; 64]).unwrap();
            socket.recv(&mut buf).unwrap_or_else(|e| panic!("echo {i} was lost: {e}"));
            sent.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// Host -> guest: datagrams per second the guest took (acknowledged).
fn to_guest(size: usize) -> f64 {
    let socket = socket();
    socket.connect((GUEST, 9)).unwrap();
    socket.set_nonblocking(true).unwrap();
    let payload = vec![0x17u8; size];
    let (mut sent, mut acked, mut buf) = (0u64, 0u64, [0u8; 64]);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    while acked < DATAGRAMS as u64 {
        while sent < DATAGRAMS as u64 && sent < acked + 256 {
            if socket.send(&payload).is_ok() {
                sent += 1;
            }
        }
        while let Ok(got) = socket.recv(&mut buf) {
            if got == 8 {
                acked = acked.max(u64::from_le_bytes(buf[..8].try_into().unwrap()));
                last_progress = Instant::now();
            }
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            // Lost datagrams (the tap's queue overflowed): resend the window.
            sent = acked;
            last_progress = Instant::now();
        }
    }
    acked as f64 / started.elapsed().as_secs_f64()
}

/// Guest -> host: datagrams per second the host received.
fn from_guest(size: usize) -> f64 {
    let socket = socket();
    socket.connect((GUEST, 10)).unwrap();
    let mut request = DATAGRAMS.to_le_bytes().to_vec();
    request.extend_from_slice(&(size as u16).to_le_bytes());
    socket.send(&request).unwrap();
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
    let first = first.expect("the guest sent nothing");
    // The first datagram starts the clock: count the ones after it.
    (received - 1) as f64 / (last - first).as_secs_f64()
}

#[derive(Clone, Copy, Default)]
struct Figures {
    rtt_p50: f64,
    rtt_p99: f64,
    in_fps: f64,
    in_mibs: f64,
    out_fps: f64,
    out_mibs: f64,
}

fn measure(ns: &Netns) -> Figures {
    ns.within(|| {
        let mib = |rate: f64| rate * 1472.0 / (1 << 20) as f64;
        let rtt = round_trips();
        let in_fps = to_guest(64);
        let in_mibs = mib(to_guest(1472));
        let out_fps = from_guest(64);
        let out_mibs = mib(from_guest(1472));
        Figures { rtt_p50: rtt[rtt.len() / 2], rtt_p99: rtt[rtt.len() * 99 / 100], in_fps, in_mibs, out_fps, out_mibs }
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn on_path(program: &str) -> Option<String> {
    let path = std::env::var("PATH").ok()?;
    path.split(':').map(|dir| format!("{dir}/{program}")).find(|p| std::path::Path::new(p).is_file())
}

/// The LD_PRELOAD shim QEMU needs on PVM hosts (their KVM takes only 0 for MSR 0x10a).
fn msr_shim(scratch: &str) -> Option<String> {
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return None;
    }
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/kvm-msr-shim.c");
    let library = format!("{scratch}/kvm-msr-shim.so");
    let built = Command::new("cc").args(["-shared", "-fPIC", "-O2", "-o", &library, source, "-ldl"]).status();
    built.is_ok_and(|s| s.success()).then_some(library)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let scratch = format!("/tmp/skvm-net-bench-{}", std::process::id());
    std::fs::create_dir_all(&scratch).unwrap();
    let guest = format!("{scratch}/guest.elf");
    let exported = Command::new(env!("CARGO_BIN_EXE_skvm")).args(["export-test-guest", "--output", &guest]).status();
    assert!(exported.unwrap().success(), "cannot export the test guest");
    let mut systems: Vec<System> = MODES.into_iter().map(System::Skvm).collect();
    if !args.iter().any(|a| a == "--no-qemu") {
        match on_path("qemu-system-x86_64") {
            Some(path) => systems.push(System::Qemu { path, shim: msr_shim(&scratch) }),
            None => eprintln!("net bench: QEMU not run: qemu-system-x86_64 is not installed"),
        }
    }
    if let Some(at) = args.iter().position(|a| a == "--firecracker") {
        let path = args.get(at + 1).expect("--firecracker PATH").clone();
        systems.push(System::Firecracker { path });
    }
    // `--only NAME`: just that mode or peer.
    if let Some(at) = args.iter().position(|a| a == "--only") {
        let only = args.get(at + 1).expect("--only NAME").clone();
        systems.retain(|s| s.name() == only);
    }
    let mut rows = Vec::new();
    for system in &systems {
        let mode = system.name();
        eprintln!("net bench: {mode}...");
        let ns = Netns::create(&mode);
        let running = start(&ns, system, &guest, &scratch);
        let runs: Vec<Figures> = (0..REPEATS).map(|_| measure(&ns)).collect();
        drop(running);
        let pick = |f: fn(&Figures) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let figures = Figures {
            rtt_p50: pick(|f| f.rtt_p50),
            rtt_p99: pick(|f| f.rtt_p99),
            in_fps: pick(|f| f.in_fps),
            in_mibs: pick(|f| f.in_mibs),
            out_fps: pick(|f| f.out_fps),
            out_mibs: pick(|f| f.out_mibs),
        };
        eprintln!("net bench: {mode} done");
        rows.push((mode, figures));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("virtio-net, medians of {REPEATS} runs (UDP; 64-byte and 1472-byte datagrams)\n");
    println!("| mode | RTT p50 µs | RTT p99 µs | host->guest 64 B fps | host->guest 1472 B MiB/s | guest->host 64 B fps | guest->host 1472 B MiB/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (mode, f) in &rows {
        println!(
            "| {mode} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} |",
            f.rtt_p50, f.rtt_p99, f.in_fps, f.in_mibs, f.out_fps, f.out_mibs
        );
    }
    let Some(shared) = rows.iter().find(|(m, _)| m == "shared").map(|(_, f)| *f) else { return };
    println!("\nAgainst `shared` (throughput: higher is better; RTT: lower is better)\n");
    println!("| mode | RTT p50 | host->guest 1472 B | guest->host 1472 B | host->guest 64 B | guest->host 64 B |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (mode, f) in &rows {
        let pct = |a: f64, b: f64| format!("{:.0} %", 100.0 * a / b);
        println!(
            "| {mode} | {} | {} | {} | {} | {} |",
            pct(f.rtt_p50, shared.rtt_p50),
            pct(f.in_mibs, shared.in_mibs),
            pct(f.out_mibs, shared.out_mibs),
            pct(f.in_fps, shared.in_fps),
            pct(f.out_fps, shared.out_fps)
        );
    }
}
