//! Helpers shared by the integration tests: run skvm with a deadline and
//! collect what a user would look at (exit status, console, stderr).
#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const SKVM: &str = env!("CARGO_BIN_EXE_skvm");
/// The test guest ELF that build.rs built (and skvm embeds).
pub const TEST_GUEST: &str = env!("SKVM_TEST_GUEST");

pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The value of a `key: value` line the test guest printed.
    pub fn guest_value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}: ");
        self.stdout.lines().find_map(|line| line.trim_end_matches('\r').strip_prefix(prefix.as_str()))
    }

    pub fn assert_clean_error(&self) {
        assert_ne!(self.code(), Some(0), "expected failure, got success; stderr: {}", self.stderr);
        assert!(self.code().is_some(), "killed by a signal: {:?}", self.status);
        assert!(!self.stderr.contains("panicked"), "skvm panicked: {}", self.stderr);
        assert!(!self.stderr.contains("RUST_BACKTRACE"), "skvm panicked: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "no error message");
        assert!(lines[0].contains("error"), "first stderr line is not an error: {}", self.stderr);
    }
}

pub fn skvm(args: &[&str]) -> Command {
    let mut cmd = Command::new(SKVM);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Waits for `child` for at most `limit`, killing it when the time is up.
pub fn wait_with_deadline(mut child: Child, limit: Duration) -> Outcome {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!(
                "skvm did not finish within {limit:?} ({status:?}); stdout: {}; stderr: {}",
                out.join().unwrap(),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Runs skvm for `time`, then kills it (if it is still running) and returns what it printed.
pub fn run_for(args: &[&str], time: Duration) -> Outcome {
    let mut child = skvm(args).spawn().expect("cannot start skvm");
    let deadline = Instant::now() + time;
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    wait_with_deadline(child, Duration::from_secs(10))
}

pub fn run(args: &[&str]) -> Outcome {
    wait_with_deadline(skvm(args).spawn().expect("cannot start skvm"), Duration::from_secs(60))
}

pub fn run_guest(extra: &[&str], cmdline: &str) -> Outcome {
    let mut args = vec!["run", "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run(&args)
}

/// Whether files in the test directory can be opened O_DIRECT (tmpfs
/// before Linux 6.6 cannot).
pub fn temp_dir_has_direct_io() -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = temp_path("direct-probe.img");
    std::fs::write(&probe, [0u8; 4096]).unwrap();
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&probe);
    let _ = std::fs::remove_file(&probe);
    opened.is_ok()
}

/// FNV-1a of the first MiB of a disk: what the test guest's `blk-verify`
/// prints as the hash of what the disk must hold.
pub fn first_mib_hash(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let hash =
        bytes[..1 << 20].iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("{hash:#x}")
}

/// The value of `key` in /proc/PID/status.
pub fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key}"))
        .trim()
        .to_string()
}

/// A size in /proc/PID/status (`VmRSS`, say), in KiB.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    let value = status_field(pid, key);
    value.split_whitespace().next().and_then(|kib| kib.parse().ok()).unwrap_or_else(|| panic!("{key}: {value}"))
}

/// The size of the mapping a line of /proc/PID/maps describes.
pub fn mapping_size(line: &str) -> u64 {
    let (start, end) = line.split_whitespace().next().unwrap().split_once('-').unwrap();
    u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap()
}

pub fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("skvm-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs skvm until its console prints a line containing every one of `wanted`
/// (in any lines), then kills it. Returns the console so far, or panics with
/// it when `limit` passes first.
pub fn run_until_console_has(args: &[&str], wanted: &[&str], limit: Duration) -> String {
    use std::io::BufRead;
    use std::sync::mpsc;
    let mut child = skvm(args).stderr(Stdio::inherit()).spawn().expect("cannot start skvm");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut console = String::new();
    let result = loop {
        if wanted.iter().all(|w| console.contains(w)) {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(mpsc::RecvTimeoutError::Timeout) => break Err("deadline passed"),
            Err(mpsc::RecvTimeoutError::Disconnected) => break Err("skvm exited"),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    if let Err(why) = result {
        panic!("console never showed {wanted:?} ({why} after {limit:?}); console:\n{console}");
    }
    console
}

/// A VM left running for a test to drive through its control API, with its
/// console and stderr going to files the test reads as it goes.
pub struct LiveVm {
    pub child: Child,
    pub socket: std::path::PathBuf,
    console: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl LiveVm {
    /// Starts `skvm run ARGS` with an API socket; returns once the API answers
    /// a request (skvm listens early, but serves only once its devices run).
    pub fn start(name: &str, args: &[&str]) -> LiveVm {
        Self::start_in(None, name, args)
    }

    /// Starts skvm inside network namespace `netns` (`ip netns exec`), or here.
    pub fn start_in(netns: Option<&str>, name: &str, args: &[&str]) -> LiveVm {
        let socket = temp_path(&format!("{name}.sock"));
        let console = temp_path(&format!("{name}.console"));
        let stderr = temp_path(&format!("{name}.stderr"));
        // A console left by an earlier VM of the same name must not be read as this one's.
        let _ = std::fs::remove_file(&console);
        let serial = format!("file:{}", console.display());
        let mut all = vec!["run", "--api-socket", socket.to_str().unwrap(), "--serial", &serial];
        all.extend_from_slice(args);
        let err_file = std::fs::File::create(&stderr).unwrap();
        let mut command = match netns {
            Some(ns) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", ns, SKVM]);
                ip
            }
            None => Command::new(SKVM),
        };
        let child = command.args(&all).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err_file).spawn().unwrap();
        let mut vm = LiveVm { child, socket, console, stderr };
        for _ in 0..500 {
            if vm.try_api("GET", "/vm", "").is_ok() {
                return vm;
            }
            if vm.child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = vm.child.kill();
        panic!("the API socket never came up; stderr: {}", vm.stderr());
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for a whole console line containing `text`; panics with the console after `limit`.
    pub fn wait_console(&mut self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let console = self.console();
            if console.find(text).is_some_and(|at| console[at..].contains('\n')) {
                return console;
            }
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                panic!("no `{text}` on the console; console:\n{console}\nstderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One API request: the HTTP status and the JSON body. A request that
    /// fails (a reply that never came, say) panics with where every thread
    /// of skvm and of its device processes was then.
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        self.try_api(method, path, body).unwrap_or_else(|e| {
            let pid = self.child.id();
            let devices: String =
                child_pids(pid).iter().map(|&p| format!("process {p}:\n{}", threads_report(p as u32))).collect();
            panic!("{method} {path}: {e}\nskvm's threads:\n{}{devices}stderr:\n{}", threads_report(pid), self.stderr())
        })
    }

    /// One API request; Err when skvm is gone or the reply is not HTTP with JSON.
    pub fn try_api(&self, method: &str, path: &str, body: &str) -> Result<(u16, serde_json::Value), String> {
        use std::io::Write;
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).map_err(|e| e.to_string())?;
        // Long enough for the nested tier, where a device restart that holds
        // the device's state took over 30 s under load (a hang still fails).
        stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let request = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).map_err(|e| e.to_string())?;
        let (head, body) = reply.split_once("\r\n\r\n").ok_or("not HTTP")?;
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
        Ok((status, serde_json::from_str(body).map_err(|e| e.to_string())?))
    }

    /// Sets the requested hotplug size and waits until the guest has plugged exactly that.
    pub fn resize_and_wait(&self, bytes: u64, limit: Duration) {
        let (status, body) = self.api("PUT", "/vm/memory", &format!("{{\"requested_bytes\":{bytes}}}"));
        assert_eq!(status, 200, "{body}");
        let deadline = Instant::now() + limit;
        loop {
            let (_, info) = self.api("GET", "/vm", "");
            if info["hotplug"]["plugged_bytes"].as_u64() == Some(bytes) {
                return;
            }
            assert!(Instant::now() < deadline, "the guest did not follow a resize to {bytes}: {info}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Resident memory of the VMM process in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.child.id(), "VmRSS")
    }

    /// Shuts the VM down through the API and returns skvm's exit status.
    pub fn shutdown(mut self) -> Option<i32> {
        let _ = self.api("PUT", "/vm/shutdown", "");
        wait_child(&mut self.child, Duration::from_secs(10))
    }

    /// Waits for skvm to exit by itself.
    pub fn wait_exit(mut self, limit: Duration) -> Option<i32> {
        wait_child(&mut self.child, limit)
    }
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("skvm did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every child process of `pid`, whichever of its threads started it (skvm
/// starts device processes on a thread of their own).
#[allow(dead_code)]
pub fn child_pids(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| children.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect()
}

/// Runs `skvm ARGS` for at most `limit`; if its console (stdout) stays
/// silent for `stall` while it runs, kills it and returns what each of its
/// threads was doing then (state, system call, kernel stack), so a report
/// can tell a guest stuck inside KVM_RUN from skvm stuck in its own code.
pub fn run_watched(args: &[&str], stall: Duration, limit: Duration) -> Result<Outcome, String> {
    use std::sync::{Arc, Mutex};
    let mut child = skvm(args).spawn().unwrap();
    let console = Arc::new(Mutex::new(String::new()));
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let sink = console.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (start, mut last_len, mut last_change) = (Instant::now(), 0, Instant::now());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        let len = console.lock().unwrap().len();
        if len != last_len {
            (last_len, last_change) = (len, Instant::now());
        }
        if last_change.elapsed() > stall || start.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(status) = status else {
        let why = if start.elapsed() > limit { "ran too long" } else { "console silent" };
        let report = format!(
            "skvm {why} after {:.0?} (console silent for {:.0?}); its threads:\n{}",
            start.elapsed(),
            last_change.elapsed(),
            threads_report(child.id())
        );
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        let tail: String =
            console.lock().unwrap().chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!("{report}\nconsole tail: {tail}\nstderr: {}", errors.join().unwrap()));
    };
    let _ = reader.join();
    let stdout = console.lock().unwrap().clone();
    Ok(Outcome { status, stdout, stderr: errors.join().unwrap() })
}

/// One line per thread of `pid`: name, state, the system call it is in,
/// and the top of its kernel stack.
/// Each thread of process `pid` whose name `wanted` picks: its name and
/// its `/proc` stat line.
pub fn thread_stats(pid: u32, wanted: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        if wanted(&comm) {
            found.push((comm, std::fs::read_to_string(task.path().join("stat")).unwrap_or_default()));
        }
    }
    found
}

pub fn threads_report(pid: u32) -> String {
    let mut out = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let read = |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
        let state = read("stat").rsplit(')').next().unwrap_or("").split_whitespace().next().unwrap_or("?").to_string();
        let stack: Vec<String> =
            read("stack").lines().take(6).map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string()).collect();
        let syscall = read("syscall").split_whitespace().next().unwrap_or("?").to_string();
        out += &format!(
            "  {} [{}] state {state} syscall {syscall} stack {}\n",
            read("comm").trim(),
            task.file_name().to_string_lossy(),
            stack.join(" < ")
        );
    }
    out
}

/// A network namespace with a tap, shared with `skvm bench --net`.
#[path = "../../src/bench/netns.rs"]
mod netns;
#[allow(unused_imports)] // only the net tests use them
pub use netns::{force_receive_buffer, Netns};

/// Bytes the test guest's `blk-pattern` writes at the start of each disk.
pub const PATTERN_BYTES: u64 = 1 << 20;

/// The byte the test guest's blk-pattern writes at `offset` of disk `index`.
pub fn pattern_byte(index: u64, offset: u64, seed: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 9) ^ seed ^ (index * 0x5a)) as u8
}

/// The disk file holds exactly `blk-pattern`'s bytes, and zeros after them.
pub fn assert_pattern_on_disk(path: &std::path::Path, index: u64, seed: u64) {
    let bytes = std::fs::read(path).unwrap();
    for (offset, byte) in bytes[..PATTERN_BYTES as usize].iter().enumerate() {
        assert_eq!(*byte, pattern_byte(index, offset as u64, seed), "{} byte {offset}", path.display());
    }
    assert!(bytes[PATTERN_BYTES as usize..].iter().all(|&b| b == 0), "bytes beyond the pattern changed");
}
