//! Debian's kernel under skvm, as far as this host lets it go.
//!
//! The kit (vmlinux, bzImage, busybox initramfs) comes from
//! `scripts/linux-kit.sh`, which `scripts/test.sh` runs first. On PVM hosts
//! guest ring 0 is emulated: the kernel needs about 30 s to print its first
//! line and later stops with a KVM internal error, so the default tier checks
//! the first lines only, and the full boot to the init marker is a slow-tier
//! test that needs hardware virtualisation.
mod common;

use common::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// Time allowed for "Linux version": about 30 s on an idle PVM host, with
/// room for a loaded machine.
const FIRST_LINE_LIMIT: Duration = Duration::from_secs(240);
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 skvm-test-marker";
const INIT_MARKER: &str = "SKVM-LINUX-INIT-OK";

struct Kit {
    vars: HashMap<String, String>,
}

impl Kit {
    fn load() -> Kit {
        let env_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("build/linux-kit/kit.env");
        let text = std::fs::read_to_string(&env_file).unwrap_or_else(|e| {
            panic!("no Linux guest kit at {} ({e}); run scripts/linux-kit.sh first", env_file.display())
        });
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
            .collect();
        Kit { vars }
    }

    fn path(&self, key: &str) -> &str {
        let path = self.vars.get(key).unwrap_or_else(|| panic!("kit.env has no {key}"));
        assert!(Path::new(path).exists(), "{key}={path} is missing; rerun scripts/linux-kit.sh");
        path
    }
}

fn on_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// `memory` may carry a hotplug region: the kernel must then be told to
/// online what virtio-mem plugs, and must not see the region as RAM.
fn boots_to_first_lines(kernel_key: &str, protocol: &str, memory: &str) {
    let kit = Kit::load();
    let args = [
        "run",
        "--kernel",
        kit.path(kernel_key),
        "--initrd",
        kit.path("INITRAMFS"),
        "--memory",
        memory,
        "--boot-protocol",
        protocol,
        "--cmdline",
        CMDLINE,
    ];
    let console = run_until_console_has(
        &args,
        &[
            "Linux version",
            &format!("Command line: {CMDLINE}"),
            "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        ],
        FIRST_LINE_LIMIT,
    );
    // A hotplug region starts at 512 MiB here; virtio-mem announces it, the e820 map must not.
    assert!(!console.contains("BIOS-e820: [mem 0x0000000020000000"), "the hotplug region is in e820:\n{console}");
    if memory.contains("hotplug=") {
        let command_line = console.lines().find(|l| l.contains("Command line:")).unwrap();
        assert!(command_line.contains("memhp_default_state=online_movable"), "{command_line}");
    }
    eprintln!(
        "linux_boot: {kernel_key} via {protocol}: the kernel printed its banner, our command line and our e820 map. \
         Not checked here: the boot to the init marker (slow tier, needs hardware virtualisation)."
    );
    assert!(console.contains(&kit.vars["KERNEL_VERSION"].replace("-amd64", "")), "unexpected kernel:\n{console}");
}

#[test]
fn vmlinux_via_pvh_prints_banner_cmdline_and_memory_map() {
    boots_to_first_lines("VMLINUX", "pvh", "512M,hotplug=256M");
}

#[test]
fn vmlinux_via_linux_64bit_protocol_prints_banner_cmdline_and_memory_map() {
    boots_to_first_lines("VMLINUX", "linux", "512M");
}

#[test]
fn bzimage_loads_at_its_64bit_entry_and_runs() {
    // The bzImage's decompressor runs at CPL0, emulated on PVM hosts, so the
    // default tier checks that skvm loads it, enters it at load address +
    // 0x200 in long mode, and that it runs for a while without crashing.
    let kit = Kit::load();
    let args =
        ["--log-level", "debug", "run", "--kernel", kit.path("BZIMAGE"), "--memory", "256M", "--cmdline", CMDLINE];
    let out = run_for(&args, Duration::from_secs(3));
    assert!(out.stderr.contains("guest loaded: Linux 64-bit entry (long mode) at 0x100200"), "{}", out.stderr);
    assert!(!out.stderr.contains("crashed"), "{}", out.stderr);
    assert!(out.status.code().is_none(), "skvm stopped by itself: {}", out.stderr);
}

#[test]
#[ignore = "slow tier: the bzImage decompressor runs at CPL0 (minutes on PVM hosts)"]
fn slow_bzimage_prints_banner() {
    boots_to_first_lines("BZIMAGE", "linux", "512M");
}

const NOT_ON_PVM: &str = "NOT RUN: this host's /dev/kvm is PVM (/sys/module/kvm_pvm), where Debian's kernel \
    cannot reach userspace (guest ring 0 is emulated and it stops with a KVM internal error); the full boot \
    needs hardware virtualisation";

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_virtio_mem_onlines_plugged_memory() {
    assert!(!on_pvm_host(), "{NOT_ON_PVM}");
    let kit = Kit::load();
    let cmdline = format!("{CMDLINE} skvm-virtio-mem");
    let args = [
        "--kernel",
        kit.path("VMLINUX"),
        "--initrd",
        kit.path("INITRAMFS"),
        "--memory",
        "512M,hotplug=512M",
        "--cmdline",
        &cmdline,
    ];
    let mut vm = LiveVm::start("linux-virtio-mem", &args);
    vm.wait_console("SKVM-LINUX-MEM-READY", Duration::from_secs(600));
    let (status, reply) = vm.api("PUT", "/vm/memory", &format!("{{\"requested_bytes\":{}}}", 256u64 << 20));
    assert_eq!(status, 200, "{reply}");
    // The kernel's virtio_mem driver plugs it and, with memhp_default_state
    // (which skvm adds), the memory comes online: MemTotal grows.
    let console = vm.wait_console("SKVM-LINUX-MEM-ONLINE", Duration::from_secs(300));
    let (_, info) = vm.api("GET", "/vm", "");
    assert_eq!(info["hotplug"]["plugged_bytes"], 256u64 << 20, "{info}\n{console}");
    vm.wait_console(INIT_MARKER, Duration::from_secs(60));
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_reaches_init_marker() {
    assert!(!on_pvm_host(), "{NOT_ON_PVM}");
    let kit = Kit::load();
    let args = [
        "run",
        "--kernel",
        kit.path("VMLINUX"),
        "--initrd",
        kit.path("INITRAMFS"),
        "--memory",
        "512M",
        "--cmdline",
        CMDLINE,
    ];
    run_until_console_has(&args, &[INIT_MARKER], Duration::from_secs(600));
}
