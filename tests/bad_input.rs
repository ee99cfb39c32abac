//! Bad flags and bad files: one clear error line, a non-zero status, no panic.
mod common;

use common::*;

fn write_temp(name: &str, bytes: &[u8]) -> String {
    let path = temp_path(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn missing_kernel_file() {
    let out = run(&["run", "--kernel", "/nonexistent/vmlinux"]);
    out.assert_clean_error();
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("cannot read kernel /nonexistent/vmlinux: No such file"), "{}", out.stderr);
}

#[test]
fn directory_as_kernel() {
    let out = run(&["run", "--kernel", "/tmp"]);
    out.assert_clean_error();
    assert!(out.stderr.contains("kernel /tmp is a directory"), "{}", out.stderr);
}

#[test]
fn truncated_elf() {
    let guest = std::fs::read(TEST_GUEST).unwrap();
    for (name, len) in [("trunc-header.elf", 40), ("trunc-body.elf", 4096)] {
        let path = write_temp(name, &guest[..len]);
        let out = run(&["run", "--kernel", &path]);
        out.assert_clean_error();
        assert!(out.stderr.contains(&format!("kernel {path} is")), "{}", out.stderr);
    }
}

#[test]
fn random_bytes_as_kernel() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let path = write_temp("random.bin", &bytes);
    let out = run(&["run", "--kernel", &path]);
    out.assert_clean_error();
    assert!(out.stderr.contains("not a kernel skvm can boot"), "{}", out.stderr);
}

#[test]
fn compressed_kernel_is_named_as_such() {
    let path = write_temp("vmlinuz.gz", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    let out = run(&["run", "--kernel", &path]);
    out.assert_clean_error();
    assert!(out.stderr.contains("compressed"), "{}", out.stderr);
}

#[test]
fn elf_without_pvh_note_cannot_force_pvh() {
    let mut guest = std::fs::read(TEST_GUEST).unwrap();
    // Rename the note type (XEN_ELFNOTE_PHYS32_ENTRY = 18) so no PVH entry remains.
    let needle = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    let at = guest.windows(needle.len()).position(|w| w == needle).expect("PVH note in the test guest");
    guest[at + 8] = 17;
    let path = write_temp("no-pvh.elf", &guest);
    let out = run(&["run", "--kernel", &path, "--boot-protocol", "pvh"]);
    out.assert_clean_error();
    assert!(out.stderr.contains("without a PVH entry note"), "{}", out.stderr);
}

#[test]
fn missing_initrd() {
    let out = run(&["run", "--initrd", "/nonexistent/initrd.img"]);
    out.assert_clean_error();
    assert!(out.stderr.contains("cannot read initrd /nonexistent/initrd.img"), "{}", out.stderr);
}

#[test]
fn initrd_too_big_for_memory() {
    let path = write_temp("big-initrd.bin", &vec![0u8; 9 << 20]);
    let out = run(&["run", "--memory", "8M", "--initrd", &path]);
    out.assert_clean_error();
    assert!(out.stderr.contains("is 9 MiB, more than the 8 MiB that can be loaded"), "{}", out.stderr);
}

#[test]
fn bad_memory_sizes() {
    for (size, expect) in [
        ("0", "too small"),
        ("1K", "too small"),
        ("8193K", "4 KiB page"),
        ("lots", "not a size"),
        ("12Q", "unknown size suffix"),
        ("99999999999999999999G", "too large"),
    ] {
        let out = run(&["run", "--memory", size]);
        out.assert_clean_error();
        assert_eq!(out.code(), Some(2), "usage errors exit 2");
        assert!(out.stderr.contains(expect), "--memory {size}: {}", out.stderr);
    }
}

#[test]
fn bad_poll_windows() {
    for value in ["10001", "-1", "soon"] {
        let out = run(&["run", &format!("--device-poll-us={value}")]);
        out.assert_clean_error();
        assert_eq!(out.code(), Some(2), "usage errors exit 2");
        assert!(out.stderr.contains("--device-poll-us"), "{value}: {}", out.stderr);
    }
}

#[test]
fn memory_beyond_the_host_is_refused() {
    let out = run(&["run", "--memory", "64T"]);
    out.assert_clean_error();
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("more than this host's"), "{}", out.stderr);
}

#[test]
fn bad_vcpu_counts() {
    for cpus in ["0", "255", "-1", "many"] {
        let out = run(&["run", "--cpus", cpus]);
        out.assert_clean_error();
        assert_eq!(out.code(), Some(2), "--cpus {cpus}");
    }
}

#[test]
fn bad_serial_and_protocol_values() {
    for args in [["--serial", "tcp:1234"], ["--serial", "file:"], ["--boot-protocol", "multiboot"]] {
        let mut full = vec!["run"];
        full.extend_from_slice(&args);
        let out = run(&full);
        out.assert_clean_error();
        assert_eq!(out.code(), Some(2), "{args:?}");
    }
}

#[test]
fn unwritable_serial_file() {
    let out = run(&["run", "--serial", "file:/nonexistent/dir/console.log"]);
    out.assert_clean_error();
    assert!(out.stderr.contains("cannot open serial output /nonexistent/dir/console.log"), "{}", out.stderr);
}

#[test]
fn overlong_or_binary_cmdline() {
    let long = "x".repeat(3000);
    for cmdline in [long.as_str(), "bad\u{1}byte"] {
        let out = run(&["run", "--cmdline", cmdline]);
        out.assert_clean_error();
        assert!(out.stderr.contains("command line"), "{}", out.stderr);
    }
}

#[test]
fn help_teaches() {
    let out = run(&["run", "--help"]);
    assert_eq!(out.code(), Some(0));
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--cpus",
        "--serial",
        "--boot-protocol",
        "--disk",
        "--rng",
        "--memory-mode",
        "--rpc-memory",
        "--api-socket",
        "Exit status",
        "Examples",
    ] {
        assert!(out.stdout.contains(flag), "--help lacks {flag}");
    }
}

/// The commands a `--help` lists, each `(name, summary)` line under its
/// `Commands:` heading (clap's layout), but for `help` itself.
fn commands_in(help: &str) -> Vec<String> {
    let listed = help.split("Commands:").nth(1).and_then(|rest| rest.split("\n\n").next()).unwrap_or("");
    let names = listed.lines().filter(|l| l.starts_with("  ") && !l.starts_with("   "));
    names.filter_map(|l| l.split_whitespace().next()).filter(|n| *n != "help").map(String::from).collect()
}

/// The long flags a `--help` lists, each at the start of its own line.
fn flags_in(help: &str) -> Vec<String> {
    let long_flag = |line: &str| {
        let line = line.trim_start();
        // `-x, --flag`: the long form.
        let line = match line.split_once(", ") {
            Some((short, long)) if short.len() == 2 && short.starts_with('-') => long,
            _ => line,
        };
        let flag = line.split(|c: char| c != '-' && !c.is_ascii_alphanumeric()).next()?;
        flag.starts_with("--").then(|| flag.to_string())
    };
    help.lines().filter_map(long_flag).filter(|f| f != "--help" && f != "--version").collect()
}

/// The long flags `skvm COMMAND --help` lists, and those of them README
/// does not have (as `skvm COMMAND --flag`).
fn undocumented_flags(readme: &str, command: &[&str]) -> (Vec<String>, Vec<String>) {
    let help = run(&[command, &["--help"]].concat());
    assert_eq!(help.code(), Some(0), "skvm {command:?} --help: {}", help.stderr);
    let flags = flags_in(&help.stdout);
    let command = command.join(" ");
    let missing =
        flags.iter().filter(|f| !readme.contains(f.as_str())).map(|f| format!("skvm {command} {f}")).collect();
    (flags, missing)
}

/// README is where users look up a flag: every command and every flag
/// that a `--help` lists is in it (`skvm NAME`, `--flag`), and `skvm
/// ctl`'s usage line names every control command.
#[test]
fn readme_documents_every_command_and_flag() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let commands = commands_in(&run(&["--help"]).stdout);
    assert!(commands.len() >= 4 && commands.contains(&"run".to_string()), "commands found: {commands:?}");
    let mut missing = Vec::new();
    for command in &commands {
        if !readme.contains(&format!("skvm {command}")) {
            missing.push(format!("skvm {command}"));
        }
        let (flags, undocumented) = undocumented_flags(&readme, &[command]);
        assert!(command != "run" || flags.len() > 10, "flags found in skvm run --help: {flags:?}");
        missing.extend(undocumented);
    }
    let ctl_usage =
        readme.lines().find(|l| l.starts_with("`skvm ctl --api-socket")).expect("README has skvm ctl's usage line");
    for command in commands_in(&run(&["ctl", "--help"]).stdout) {
        if !ctl_usage.contains(&command) {
            missing.push(format!("skvm ctl {command}"));
        }
        missing.extend(undocumented_flags(&readme, &["ctl", &command]).1);
    }
    assert!(missing.is_empty(), "README does not document: {missing:?}");
}

/// A FIFO with nobody at the other end, a character device or a directory
/// where a file belongs: a clear error at once, never a hang (SIGINT is
/// blocked while the VM is set up) or an endless read.
#[test]
fn the_wrong_kind_of_host_file_is_refused_at_once() {
    let fifo = temp_path("nobody-reads.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    let serial = format!("file:{fifo}");
    let disk = format!("path={fifo},readonly=on");
    for (args, expected) in [
        (vec!["run", "--serial", &serial], "a FIFO that nobody reads"),
        (vec!["run", "--disk", &disk], "nobody-reads.fifo is a FIFO"),
        (vec!["run", "--stats-file", "/dev/null"], "character device"),
        (vec!["run", "--kernel", "/dev/zero"], "kernel /dev/zero is a character device"),
        (vec!["run", "--initrd", "/dev/zero"], "initrd /dev/zero is a character device"),
    ] {
        let out = run(&args);
        out.assert_clean_error();
        assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    }
}

#[test]
fn bench_linux_says_what_it_needs() {
    let out = run(&[
        "bench",
        "--linux",
        "--linux-kit",
        "/nonexistent/kit",
        "--out",
        temp_path("bench-linux").to_str().unwrap(),
    ]);
    out.assert_clean_error();
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // Linux cannot reach userspace here: point at the nested tier instead of booting 16 guests that fail.
        assert!(out.stderr.contains("PVM") && out.stderr.contains("scripts/linux-tier.sh --bench"), "{}", out.stderr);
    } else {
        assert!(out.stderr.contains("no Linux kit at /nonexistent/kit/kit.env"), "{}", out.stderr);
    }
}
