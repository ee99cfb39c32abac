//! virtio-net benchmark across memory modes. Each mode gets a network
//! namespace with a tap (10.0.0.1) and the test guest (10.0.0.2) in
//! `net-ping`, which answers UDP on three ports (see tests/guest/src/net.rs):
//!
//! * round trip: 2,000 echoes (port 7) of 64-byte datagrams, one at a time;
//! * host -> guest: 20,000 datagrams to the sink (port 9), at most 256
//!   beyond the guest's last acknowledgement (it acks every 64th);
//! * guest -> host: the guest blasts 20,000 datagrams back (port 10).
//!
//! 64-byte datagrams give frames per second, 1,472-byte ones (a full
//! 1,500-byte MTU) MiB/s. Run with `cargo bench --bench net` (as root, with
//! iproute2); it prints medians of 3 runs per mode and each mode against
//! `shared`.
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPEATS: usize = 3;
const DATAGRAMS: u32 = 20_000;
const ECHOES: usize = 2_000;
const GUEST: &str = "10.0.0.2";
const MODES: [&str; 4] = ["rpc", "rpc-dma", "shared", "inprocess"];

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let ns = Netns(format!("skvm-bench-{}-{name}", std::process::id()));
        let steps: [&[&str]; 6] = [
            &["netns", "add", &ns.0],
            &["netns", "exec", &ns.0, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
            &["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"],
            &["-n", &ns.0, "addr", "add", "10.0.0.1/24", "dev", "tap0"],
            &["-n", &ns.0, "link", "set", "tap0", "up"],
            &["-n", &ns.0, "link", "set", "lo", "up"],
        ];
        for step in steps {
            assert!(Command::new("ip").args(step).status().unwrap().success(), "ip {step:?}");
        }
        ns
    }

    /// Runs `work` on a thread inside the namespace.
    fn within<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(path).unwrap();
            // SAFETY: setns on a descriptor we hold, for this thread only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            work()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Boots the guest in `mode` and waits until it serves.
fn start(ns: &Netns, mode: &str) -> Child {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_skvm"), "run", "--memory-mode", mode])
        .args(["--net", "tap=tap0", "--cmdline", "scenario=net-ping pings=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut serving = false;
    for line in stdout.lines().map_while(Result::ok) {
        assert!(!line.starts_with("error:"), "{mode}: {line}");
        if line == "net: serving" {
            serving = true;
            break;
        }
    }
    if !serving {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{mode}: the guest never served");
    }
    child
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
        .map(|_| {
            let sent = Instant::now();
            socket.send(&[0x42; 64]).unwrap();
            socket.recv(&mut buf).expect("an echo was lost");
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
        let rtt = round_trips();
        let mib = |rate: f64| rate * 1472.0 / (1 << 20) as f64;
        Figures {
            rtt_p50: rtt[rtt.len() / 2],
            rtt_p99: rtt[rtt.len() * 99 / 100],
            in_fps: to_guest(64),
            in_mibs: mib(to_guest(1472)),
            out_fps: from_guest(64),
            out_mibs: mib(from_guest(1472)),
        }
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut rows = Vec::new();
    for mode in MODES {
        let ns = Netns::new(mode);
        let mut child = start(&ns, mode);
        let runs: Vec<Figures> = (0..REPEATS).map(|_| measure(&ns)).collect();
        let _ = child.kill();
        let _ = child.wait();
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
    println!("virtio-net, medians of {REPEATS} runs (UDP; 64-byte and 1472-byte datagrams)\n");
    println!("| mode | RTT p50 µs | RTT p99 µs | host->guest 64 B fps | host->guest 1472 B MiB/s | guest->host 64 B fps | guest->host 1472 B MiB/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (mode, f) in &rows {
        println!(
            "| {mode} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} |",
            f.rtt_p50, f.rtt_p99, f.in_fps, f.in_mibs, f.out_fps, f.out_mibs
        );
    }
    let shared = rows.iter().find(|(m, _)| *m == "shared").map(|(_, f)| *f).unwrap();
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
