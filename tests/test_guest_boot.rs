//! The PVH test guest boots, sees what skvm hands it, and every way it can
//! end the VM becomes the documented exit status with a one-line reason.
mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// The legacy BIOS hole between 0x9fc00 and 1 MiB is reserved, not RAM.
const LOW_HOLE: u64 = 0x10_0000 - 0x9_fc00;

fn hex(value: &str) -> u64 {
    let digits = value.split_whitespace().next().unwrap().trim_start_matches("0x");
    u64::from_str_radix(digits, 16).unwrap()
}

fn assert_boot_report(out: &Outcome, memory: u64, cpus: u32) {
    assert!(out.stdout.contains("skvm-test-guest: hello from ring 3"), "no banner: {}", out.stdout);
    assert_eq!(out.guest_value("cpl"), Some("3"), "guest work must run in ring 3");
    assert_eq!(out.guest_value("cpus"), Some(cpus.to_string().as_str()));
    let ram: u64 = out.guest_value("ram-bytes").unwrap().parse().unwrap();
    assert_eq!(ram, memory - LOW_HOLE, "RAM in the guest's memory map");
    let end = hex(out.guest_value("ram-end").unwrap());
    let expected_end = if memory <= 3 << 30 { memory } else { (4 << 30) + memory - (3 << 30) };
    assert_eq!(end, expected_end, "top of RAM");
}

#[test]
fn boots_on_one_vcpu_and_reports_memory_and_cmdline() {
    let out = run_guest(&["--memory", "256M"], "scenario=hello exit=0 marker=one-vcpu");
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert_boot_report(&out, 256 * MIB, 1);
    assert_eq!(out.guest_value("cmdline"), Some("scenario=hello exit=0 marker=one-vcpu"));
    assert!(out.stderr.contains("skvm: guest exited through the debug port with status 0"), "{}", out.stderr);
}

#[test]
fn boots_on_two_and_four_vcpus() {
    for cpus in [2u32, 4] {
        let out = run_guest(&["--memory", "96M", "--cpus", &cpus.to_string()], "scenario=hello");
        assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
        assert_boot_report(&out, 96 * MIB, cpus);
    }
}

#[test]
fn memory_above_the_mmio_hole_is_reported_to_the_page() {
    let memory = 4 * 1024 * MIB + 4096 * 3;
    let out = run_guest(&["--memory", &format!("{}K", memory / 1024)], "scenario=hello");
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert_boot_report(&out, memory, 1);
    assert_eq!(out.guest_value("ram-ranges"), Some("3"));
}

#[test]
fn guest_status_becomes_skvm_status() {
    for status in [1u8, 42, 255] {
        let out = run_guest(&["--memory", "64M"], &format!("exit={status}"));
        assert_eq!(out.code(), Some(status as i32));
        assert!(out.stderr.contains(&format!("with status {status}")), "{}", out.stderr);
    }
}

#[test]
fn builtin_guest_runs_without_arguments() {
    let out = run(&["run"]);
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert_boot_report(&out, 512 * MIB, 1);
    assert_eq!(out.guest_value("cmdline"), Some("scenario=hello"));
}

#[test]
fn same_guest_boots_from_a_file() {
    let out = run_guest(&["--kernel", TEST_GUEST, "--memory", "64M"], "exit=9");
    assert_eq!(out.code(), Some(9), "stderr: {}", out.stderr);
    assert!(out.stdout.contains("hello from ring 3"));
}

#[test]
fn exported_guest_is_the_embedded_one() {
    let path = temp_path("exported-guest.elf");
    let out = run(&["export-test-guest", "--output", path.to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(TEST_GUEST).unwrap());
}

#[test]
fn initrd_arrives_as_pvh_module() {
    let path = temp_path("initrd.bin");
    let mut data = vec![0xabu8; 3 * 4096 + 17];
    data[0] = 0x5c;
    std::fs::write(&path, &data).unwrap();
    let out = run_guest(&["--memory", "64M", "--initrd", path.to_str().unwrap()], "scenario=hello");
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.guest_value("modules"), Some("1"));
    let module = out.guest_value("module0").unwrap();
    assert!(module.contains(&format!("{} bytes", data.len())), "{module}");
    assert!(module.ends_with("first byte 0x5c"), "{module}");
    // Placed page-aligned at the top of RAM.
    let addr = hex(module);
    assert_eq!(addr % 4096, 0);
    assert!(addr + data.len() as u64 <= 64 * MIB && addr + data.len() as u64 > 64 * MIB - 8192);
}

#[test]
fn acpi_power_off_exits_zero() {
    let out = run_guest(&["--memory", "64M"], "scenario=poweroff");
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("skvm: guest powered off (ACPI S5)"), "{}", out.stderr);
}

#[test]
fn i8042_reset_exits_three() {
    let out = run_guest(&["--memory", "64M"], "scenario=reset");
    assert_eq!(out.code(), Some(3), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("reset (i8042 reset line)"), "{}", out.stderr);
}

#[test]
fn triple_fault_exits_four() {
    let out = run_guest(&["--memory", "64M"], "scenario=triple-fault");
    assert_eq!(out.code(), Some(4), "stdout: {} stderr: {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("triple fault on vCPU 0"), "{}", out.stderr);
}

#[test]
fn guest_exception_is_reported_by_the_guest() {
    let out = run_guest(&["--memory", "64M"], "scenario=fault");
    // #UD is vector 6: the guest's handler exits with 0xe0 | 6.
    assert_eq!(out.code(), Some(0xe6), "stderr: {}", out.stderr);
    assert!(out.stdout.contains("exception 0x0000000000000006"), "{}", out.stdout);
}

/// Signals skvm once its guest is spinning; returns the exit status and stderr.
fn stopped_by(signal: i32) -> (Option<i32>, String) {
    let mut vm = LiveVm::start(&format!("signal-{signal}"), &["--memory", "64M", "--cmdline", "scenario=spin"]);
    vm.wait_console("scenario: spin", Duration::from_secs(20));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(vm.child.id() as i32, signal) };
    let code = vm.child.wait().unwrap().code();
    (code, vm.stderr())
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly() {
    let (code, stderr) = stopped_by(libc::SIGTERM);
    assert_eq!(code, Some(143), "stderr: {stderr}");
    assert!(stderr.contains("skvm: stopped by SIGTERM"), "{stderr}");
    let (code, stderr) = stopped_by(libc::SIGINT);
    assert_eq!(code, Some(130), "stderr: {stderr}");
    assert!(stderr.contains("skvm: stopped by SIGINT"), "{stderr}");
}

#[test]
fn serial_to_file_and_to_nowhere() {
    let path = temp_path("console.log");
    let spec = format!("file:{}", path.display());
    let out = run_guest(&["--memory", "64M", "--serial", &spec], "scenario=hello marker=to-file");
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty(), "console leaked to stdout: {}", out.stdout);
    let console = std::fs::read_to_string(&path).unwrap();
    assert!(console.contains("hello from ring 3") && console.contains("marker=to-file"), "{console}");

    let out = run_guest(&["--memory", "64M", "--serial", "none"], "scenario=hello");
    assert_eq!(out.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn ring3_mmio_reaches_skvm() {
    let out = run_guest(&["--memory", "64M", "--log-level", "debug"], "scenario=mmio-probe");
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    // Nothing claims the address: the write is seen and the read floats high.
    assert!(out.stderr.contains("unclaimed MMIO write 0xdffff000"), "{}", out.stderr);
    assert_eq!(out.guest_value("mmio-read"), Some("0xffffffff"));
}

#[test]
fn exit_costs_are_measured_from_ring3() {
    let out = run_guest(&["--memory", "64M"], "scenario=exit-cost");
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    for key in ["exit-cost-port-tsc", "exit-cost-mmio-tsc"] {
        let ticks: u64 = out.guest_value(key).unwrap().parse().unwrap();
        assert!(ticks > 0, "{key}");
    }
}

#[test]
fn stdin_that_is_not_a_terminal_is_left_alone() {
    let mut child = skvm(&["run", "--memory", "64M", "--cmdline", "exit=5"]);
    child.stdin(Stdio::piped());
    let out = wait_with_deadline(child.spawn().unwrap(), Duration::from_secs(30));
    assert_eq!(out.code(), Some(5));
}

#[test]
fn terminal_input_reaches_the_guest() {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // A pseudo-terminal stands in for the user's terminal on stdin.
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors we then own.
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both descriptors are fresh and owned here.
    let (mut master, slave) = unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) };
    let mut cmd = skvm(&["run", "--memory", "64M", "--cmdline", "scenario=echo exit=11"]);
    cmd.stdin(slave);
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    master.write_all(b"ping.\n").unwrap();
    let out = wait_with_deadline(child, Duration::from_secs(30));
    assert_eq!(out.code(), Some(11), "stdout: {} stderr: {}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("echo: ready") && out.stdout.contains("ping.") && out.stdout.contains("echo: done"),
        "{}",
        out.stdout
    );
}

/// A console nobody reads any more (a closed pipe) costs one warning, not
/// one per byte, and the guest runs to its end.
#[test]
fn a_closed_console_pipe_is_reported_once() {
    use std::io::Read;
    let mut child = skvm(&["run", "--memory", "64M", "--cmdline", "scenario=hello"]).spawn().unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{stderr}");
    assert_eq!(stderr.matches("serial output failed").count(), 1, "{stderr}");
}
