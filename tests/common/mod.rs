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
        self.stdout
            .lines()
            .find_map(|line| line.trim_end_matches('\r').strip_prefix(prefix.as_str()))
    }

    pub fn assert_clean_error(&self) {
        assert_ne!(
            self.code(),
            Some(0),
            "expected failure, got success; stderr: {}",
            self.stderr
        );
        assert!(
            self.code().is_some(),
            "killed by a signal: {:?}",
            self.status
        );
        assert!(
            !self.stderr.contains("panicked"),
            "skvm panicked: {}",
            self.stderr
        );
        assert!(
            !self.stderr.contains("RUST_BACKTRACE"),
            "skvm panicked: {}",
            self.stderr
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(!lines.is_empty(), "no error message");
        assert!(
            lines[0].contains("error"),
            "first stderr line is not an error: {}",
            self.stderr
        );
    }
}

pub fn skvm(args: &[&str]) -> Command {
    let mut cmd = Command::new(SKVM);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
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
    Outcome {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub fn run(args: &[&str]) -> Outcome {
    wait_with_deadline(
        skvm(args).spawn().expect("cannot start skvm"),
        Duration::from_secs(60),
    )
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
