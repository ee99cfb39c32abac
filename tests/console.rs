//! virtio-console: the guest's hvc0 reaches the host's stdout or a file,
//! and the host's input reaches the guest, in every memory mode.
mod common;

use common::{temp_path, SKVM};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const MODES: [&str; 4] = ["rpc", "rpc-dma", "shared", "inprocess"];

#[test]
fn console_output_reaches_stdout_and_input_reaches_the_guest_in_every_memory_mode() {
    for mode in MODES {
        let serial = temp_path(&format!("console-{mode}.serial"));
        let serial_arg = format!("file:{}", serial.display());
        let mut child = Command::new(SKVM)
            .args(["run", "--memory-mode", mode, "--console", "stdio", "--serial", &serial_arg])
            .args(["--cmdline", "scenario=console-echo"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let (lines, seen) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let expect = |wanted: &str| loop {
            match seen.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line == wanted => break,
                Ok(_) => continue,
                Err(e) => panic!("{mode}: no {wanted:?} on stdout ({e})"),
            }
        };
        expect("hvc0: hello from the test guest");
        for text in ["ping 1", "a longer line, with punctuation: \u{e9}t\u{e9}!"] {
            writeln!(stdin, "{text}").unwrap();
            expect(&format!("hvc0 echo: {text}"));
        }
        writeln!(stdin, "quit").unwrap();
        expect("hvc0: bye");
        drop(stdin);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            match child.try_wait().unwrap() {
                Some(status) => break status,
                None if std::time::Instant::now() > deadline => panic!("{mode}: skvm did not exit"),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(0), "{mode}: {stderr}");
        // COM1 is still the guest's serial console, and hvc0's output is not on it.
        let serial = std::fs::read_to_string(&serial).unwrap();
        assert!(serial.contains("console: ready") && !serial.contains("hvc0:"), "{mode}: {serial}");
    }
}

#[test]
fn console_output_can_go_to_a_file() {
    let output = temp_path("console-file.out");
    let arg = format!("file:{}", output.display());
    // No input: the guest greets, then waits for a `quit` that never comes.
    let mut child = common::skvm(&["run", "--console", &arg, "--serial", "none", "--cmdline", "scenario=console-echo"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    while !text.ends_with('\n') && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        text = std::fs::read_to_string(&output).unwrap_or_default();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(text, "hvc0: hello from the test guest\n");
}
