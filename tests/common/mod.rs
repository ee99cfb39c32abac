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
