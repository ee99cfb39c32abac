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
    needs hardware virtualisation: ./scripts/test.sh --linux runs it one level down, under QEMU with SVM";

/// A whole Linux boot under skvm, its kit init running `skvm-test=NAME`;
/// returns the console and skvm's exit status.
fn linux_run(kernel_key: &str, protocol: &str, test: &str, extra: &[&str]) -> Outcome {
    assert!(!on_pvm_host(), "{NOT_ON_PVM}");
    let kit = Kit::load();
    let cmdline = format!("{CMDLINE} skvm-test={test}");
    let mut args = vec!["run", "--kernel", kit.path(kernel_key), "--initrd", kit.path("INITRAMFS")];
    args.extend(["--boot-protocol", protocol, "--cmdline", &cmdline]);
    args.extend_from_slice(extra);
    if !extra.contains(&"--memory") {
        args.extend(["--memory", "512M"]);
    }
    // Under the nested tier's emulator an L2 guest has been seen to stop
    // (rarely, in any mode): a silent console is reported with what every
    // skvm thread was doing, and the run tried once more.
    let out = run_watched(&args, STALL_LIMIT, SLOW_LIMIT).unwrap_or_else(|stalled| {
        eprintln!("linux_boot: STALL, trying once more: {stalled}");
        run_watched(&args, STALL_LIMIT, SLOW_LIMIT).unwrap_or_else(|again| panic!("stalled twice:\n{stalled}\n{again}"))
    });
    assert!(!out.stdout.contains("SKVM-LINUX-FAIL"), "the guest reported a failure:\n{}", out.stdout);
    out
}

/// A full boot takes about 15 s in the nested tier; allow a loaded host.
const SLOW_LIMIT: Duration = Duration::from_secs(600);
/// The kit's guest prints within seconds at every step (the slowest, 8 MiB
/// through ext4, is about 10 s in the nested tier).
const STALL_LIMIT: Duration = Duration::from_secs(90);

fn boots_to_init_and_powers_off(kernel_key: &str, protocol: &str) {
    let out = linux_run(kernel_key, protocol, "none", &[]);
    assert!(out.stdout.contains(INIT_MARKER), "no init marker:\n{}\n{}", out.stdout, out.stderr);
    // `poweroff` in the guest is a clean exit.
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_vmlinux_via_pvh_boots_to_init_and_powers_off() {
    boots_to_init_and_powers_off("VMLINUX", "pvh");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_vmlinux_via_linux_protocol_boots_to_init_and_powers_off() {
    boots_to_init_and_powers_off("VMLINUX", "linux");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_bzimage_boots_to_init_and_powers_off() {
    boots_to_init_and_powers_off("BZIMAGE", "linux");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_sees_two_vcpus() {
    let out = linux_run("VMLINUX", "pvh", "cpus", &["--cpus", "2"]);
    assert!(out.stdout.contains("SKVM-LINUX-CPUS 2"), "{}", out.stdout);
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_reboot_ends_skvm_with_the_reset_status() {
    let out = linux_run("VMLINUX", "pvh", "reboot", &[]);
    assert!(out.stdout.contains("SKVM-LINUX-REBOOTING"), "{}", out.stdout);
    assert!(!out.stdout.contains(INIT_MARKER), "{}", out.stdout);
    assert_eq!(out.code(), Some(3), "README: 3 when the guest asks for a reset; {}", out.stderr);
}

fn host_tool(program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed on the host (e2fsprogs, coreutils): {e}"))
}

fn md5(path: &Path) -> String {
    let out = host_tool("md5sum", &[path.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// Linux's own drivers on skvm's devices in `mode`: ext4 on a 64 MiB disk,
/// checked on the host; an 8 MiB read-only disk; virtio-rng.
fn linux_drivers_use_the_devices(mode: &str) {
    let rw = temp_path(&format!("linux-ext4-{mode}.img"));
    std::fs::File::create(&rw).unwrap().set_len(64 << 20).unwrap();
    let ro = temp_path(&format!("linux-ro-{mode}.img"));
    std::fs::write(&ro, (0..8u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect::<Vec<_>>())
        .unwrap();
    let ro_before = md5(&ro);
    let (rw_arg, ro_arg) = (format!("path={}", rw.display()), format!("path={},readonly=on", ro.display()));
    let extra = ["--memory-mode", mode, "--disk", &rw_arg, "--disk", &ro_arg, "--rng"];
    let out = linux_run("VMLINUX", "pvh", "devices", &extra);
    let console = &out.stdout;
    assert_eq!(out.code(), Some(0), "{console}\n{}", out.stderr);
    assert!(console.contains("SKVM-LINUX-EXT4-DONE"), "{console}");

    // The host reads what Linux wrote: a clean filesystem and both files.
    let fsck = host_tool("e2fsck", &["-fn", rw.to_str().unwrap()]);
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let hello = host_tool("debugfs", &["-R", "cat /hello.txt", rw.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&hello.stdout), "written by Linux under skvm\n");
    let copy = temp_path(&format!("linux-random-{mode}.bin"));
    let dump = format!("dump /dir/random.bin {}", copy.display());
    host_tool("debugfs", &["-R", &dump, rw.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&copy).map(|m| m.len()).unwrap_or(0), 8 << 20);
    assert!(console.contains(&format!("SKVM-LINUX-MD5 {}", md5(&copy))), "the 8 MiB file differs:\n{console}");

    // Read-only in the guest: the flag, the right bytes, and a refused write.
    assert!(console.contains("SKVM-LINUX-RO 1"), "{console}");
    let first_block = temp_path(&format!("linux-ro-block-{mode}.bin"));
    std::fs::write(&first_block, &std::fs::read(&ro).unwrap()[..4096]).unwrap();
    assert!(console.contains(&format!("SKVM-LINUX-RO-READ {}", md5(&first_block))), "{console}");
    assert!(console.contains("SKVM-LINUX-RO-WRITE refused"), "{console}");
    assert_eq!(md5(&ro), ro_before, "the read-only disk changed");

    // virtio-rng is the guest's hardware RNG and yields bytes.
    assert!(console.contains("SKVM-LINUX-RNG-CURRENT virtio_rng"), "{console}");
    assert!(console.contains("SKVM-LINUX-RNG-BYTES 4096"), "{console}");
    for path in [rw, ro, copy, first_block] {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_drivers_use_the_devices_in_rpc_mode() {
    linux_drivers_use_the_devices("rpc");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_drivers_use_the_devices_in_rpc_dma_mode() {
    linux_drivers_use_the_devices("rpc-dma");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_drivers_use_the_devices_in_shared_mode() {
    linux_drivers_use_the_devices("shared");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_drivers_use_the_devices_in_inprocess_mode() {
    linux_drivers_use_the_devices("inprocess");
}

/// `skvm ctl resize` up and down while Linux runs: its virtio_mem driver
/// onlines what is plugged, a process uses it, and it goes when asked.
fn linux_follows_resize(mode: &str) {
    assert!(!on_pvm_host(), "{NOT_ON_PVM}");
    let kit = Kit::load();
    let cmdline = format!("{CMDLINE} skvm-test=virtio-mem");
    let args = [
        "--kernel",
        kit.path("VMLINUX"),
        "--initrd",
        kit.path("INITRAMFS"),
        "--memory",
        "512M,hotplug=512M",
        "--memory-mode",
        mode,
        "--cmdline",
        &cmdline,
    ];
    let mut vm = LiveVm::start(&format!("linux-virtio-mem-{mode}"), &args);
    vm.wait_console("SKVM-LINUX-MEM-READY", SLOW_LIMIT);
    let (status, reply) = vm.api("PUT", "/vm/memory", &format!("{{\"requested_bytes\":{}}}", 256u64 << 20));
    assert_eq!(status, 200, "{reply}");
    // With memhp_default_state (which skvm adds) plugged memory comes online.
    vm.wait_console("SKVM-LINUX-MEM-ONLINE", Duration::from_secs(300));
    let (_, info) = vm.api("GET", "/vm", "");
    assert_eq!(info["hotplug"]["plugged_bytes"], 256u64 << 20, "{info}");
    let console = vm.wait_console("SKVM-LINUX-MEM-RELEASED", Duration::from_secs(300));
    assert!(console.contains("SKVM-LINUX-MEM-USED 560 MiB"), "{console}");
    let (status, reply) = vm.api("PUT", "/vm/memory", "{\"requested_bytes\":0}");
    assert_eq!(status, 200, "{reply}");
    let console = vm.wait_console(INIT_MARKER, Duration::from_secs(300));
    assert!(console.contains("SKVM-LINUX-MEM-SHRUNK"), "Linux did not give the memory back:\n{console}");
    assert!(!console.contains("SKVM-LINUX-FAIL"), "{console}");
    let (_, info) = vm.api("GET", "/vm", "");
    assert_eq!(info["hotplug"]["plugged_bytes"], 0, "{info}");
    assert_eq!(vm.wait_exit(Duration::from_secs(60)), Some(0));
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_virtio_mem_follows_resize_in_rpc_mode() {
    linux_follows_resize("rpc");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_virtio_mem_follows_resize_in_rpc_dma_mode() {
    linux_follows_resize("rpc-dma");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_virtio_mem_follows_resize_in_shared_mode() {
    linux_follows_resize("shared");
}

#[test]
#[ignore = "slow tier: a full Linux boot; needs hardware virtualisation"]
fn slow_linux_virtio_mem_follows_resize_in_inprocess_mode() {
    linux_follows_resize("inprocess");
}

/// `skvm bench --linux --quick`: fio through Linux's virtio-blk driver, one
/// run of each workload in each mode, every run succeeds and the table has
/// a figure for each.
#[test]
#[ignore = "slow tier: sixteen full Linux boots; needs hardware virtualisation"]
fn slow_bench_linux_runs_fio_in_every_mode() {
    let kit = Path::new(env!("CARGO_MANIFEST_DIR")).join("build/linux-kit");
    let out_dir = temp_path("bench-linux");
    let args =
        ["bench", "--linux", "--quick", "--linux-kit", kit.to_str().unwrap(), "--out", out_dir.to_str().unwrap()];
    let out = wait_with_deadline(skvm(&args).spawn().unwrap(), Duration::from_secs(3000));
    assert_eq!(out.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("linux.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 16, "4 workloads in 4 modes");
    for row in &rows {
        assert_eq!(row["ok"], true, "{row}");
        assert!(row["iops"].as_f64().unwrap() > 0.0 && row["clat_p99_us"].as_f64().unwrap() > 0.0, "{row}");
    }
    let table = std::fs::read_to_string(out_dir.join("linux.md")).unwrap();
    assert!(table.contains("| 4K randread QD32 | IOPS |") && !table.contains("failed"), "{table}");
}
