//! virtio-net on a host tap, in every memory mode. Each test makes its own
//! network namespace with a tap in it (10.0.0.1 on the host side), runs
//! skvm there and talks to the test guest (10.0.0.2): nothing leaves the
//! namespace.
mod common;

use common::{run, LiveVm, Netns};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const MODES: [&str; 4] = ["rpc", "rpc-dma", "shared", "inprocess"];
const GUEST: &str = "10.0.0.2";
const LONG: Duration = Duration::from_secs(60);

/// A namespace for one test, or None (with the reason printed) where this
/// host cannot make one.
fn netns(name: &str) -> Option<Netns> {
    if let Some(why) = Netns::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(Netns::create(name).unwrap())
}

fn net_counters(vm: &LiveVm) -> serde_json::Value {
    let (_, info) = vm.api("GET", "/vm", "");
    let devices = info["devices"].as_array().unwrap();
    let net = devices.iter().find(|d| d["name"] == "net0").unwrap_or_else(|| panic!("no net0: {info}"));
    net["counters"]["net"].clone()
}

fn counter(counters: &serde_json::Value, key: &str) -> u64 {
    counters[key].as_u64().unwrap_or_else(|| panic!("no {key} in {counters}"))
}

/// `SCHED_BATCH`, sched(7).
const SCHED_BATCH: u32 = 3;

/// The scheduling policy of each thread of process `pid` named `name` (of
/// every thread, for None), from `/proc`.
fn policies(pid: u32, name: Option<&str>) -> Vec<u32> {
    let threads = common::thread_stats(pid, |comm| name.is_none_or(|name| comm == name));
    // Field 41; the fields after the command's closing parenthesis start at 3.
    let policy = |stat: &str| stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(38).unwrap().parse().unwrap();
    threads.iter().map(|(_, stat)| policy(stat)).collect()
}

/// Boots the guest's `net-ping` in `mode` inside `ns`; returns once it has
/// pinged the host 5 times and serves.
fn ping_guest(ns: &Netns, mode: &str) -> LiveVm {
    ping_guest_with(ns, mode, &[])
}

fn ping_guest_with(ns: &Netns, mode: &str, extra: &[&str]) -> LiveVm {
    let args = ["--memory-mode", mode, "--net", "tap=tap0", "--cmdline", "scenario=net-ping pings=5"];
    let mut vm = LiveVm::start_in(Some(&ns.0), &format!("net-{}", ns.0), &[&args[..], extra].concat());
    let console = vm.wait_console("net: serving", LONG);
    assert!(console.contains("net-ping: 5/5 replies"), "{console}");
    vm
}

#[test]
fn guest_and_host_ping_each_other_in_every_memory_mode() {
    for mode in MODES {
        let Some(ns) = netns(&format!("ping-{mode}")) else { return };
        let stats = common::temp_path(&format!("net-ping-{mode}.json"));
        let vm = ping_guest_with(&ns, mode, &["--stats-file", stats.to_str().unwrap()]);
        let ping = ns.exec(&["ping", "-c", "5", "-i", "0.2", "-W", "5", GUEST]).unwrap();
        let text = String::from_utf8_lossy(&ping.stdout);
        assert!(ping.status.success(), "{mode}: host ping failed: {text}\n{}", vm.console());
        assert!(text.contains("5 received"), "{mode}: {text}");
        let counters = net_counters(&vm);
        // ARP both ways, 5 pings each way: at least 6 frames each way.
        assert!(counter(&counters, "tx_frames") >= 11 && counter(&counters, "rx_frames") >= 11, "{mode}: {counters}");
        for drop in ["tx_dropped_malformed", "tx_dropped_oversized", "tx_dropped_refused", "rx_dropped_too_big"] {
            assert_eq!(counter(&counters, drop), 0, "{mode}: {counters}");
        }
        // The threads that move frames do not preempt on wake-up: the
        // device's, and in `rpc` modes the device's own RPC thread in the
        // VMM; the vCPU and the other devices' RPC thread do.
        let (_, info) = vm.api("GET", "/vm", "");
        let vmm = vm.child.id();
        let device = match mode {
            "inprocess" => policies(vmm, Some("net0")),
            _ => policies(info["devices"][0]["pid"].as_u64().unwrap() as u32, None),
        };
        assert!(!device.is_empty() && device.iter().all(|&p| p == SCHED_BATCH), "{mode}: {device:?}");
        if mode.starts_with("rpc") {
            assert_eq!(policies(vmm, Some("rpc-net0")), [SCHED_BATCH], "{mode}");
            assert_eq!(policies(vmm, Some("rpc")), [0], "{mode}");
        }
        assert_eq!(policies(vmm, Some("vcpu0")), [0], "{mode}");
        assert_eq!(vm.shutdown(), Some(0), "{mode}");
        // The stats file written at the end holds the same counters and the MAC.
        let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        let device = &stats["devices"][0];
        assert_eq!(
            (device["kind"].as_str(), device["mac"].as_str().map(str::len)),
            (Some("net"), Some(17)),
            "{device}"
        );
        let last = &device["counters"]["net"];
        assert!(counter(last, "rx_frames") >= counter(&counters, "rx_frames"), "{mode}: {last}");
        assert!(counter(last, "tx_frames") >= counter(&counters, "tx_frames"), "{mode}: {last}");
    }
}

/// 10,000 datagrams of random sizes (1 to 1472 bytes) to the guest's UDP
/// echo port, one at a time: every payload comes back intact, and the
/// device counted every frame.
#[test]
fn udp_echo_of_10000_datagrams_keeps_every_byte_in_every_memory_mode() {
    for mode in MODES {
        let Some(ns) = netns(&format!("udp-{mode}")) else { return };
        // The longest polling window, so that even a slow host (the nested
        // tier) sees the guest's next frame inside it.
        let mut vm = ping_guest_with(&ns, mode, &["--device-poll-us", "10000"]);
        let before = net_counters(&vm);
        let sent_bytes = ns
            .within(|| {
                let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
                socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                socket.connect((GUEST, 7)).unwrap();
                let mut seed = 0x9e37_79b9_7f4a_7c15u64;
                let (mut reply, mut bytes) = ([0u8; 2048], 0u64);
                let started = Instant::now();
                for i in 0..10_000u32 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let len = 1 + (seed % 1472) as usize;
                    let payload: Vec<u8> = (0..len).map(|j| (seed >> (j % 56)) as u8 ^ j as u8).collect();
                    socket.send(&payload).unwrap();
                    let got = socket.recv(&mut reply).unwrap_or_else(|e| panic!("datagram {i} ({len} bytes): {e}"));
                    assert_eq!(&reply[..got], &payload[..], "datagram {i} came back changed");
                    bytes += (14 + 20 + 8 + len) as u64;
                }
                eprintln!("10,000 UDP echoes in {:?}", started.elapsed());
                bytes
            })
            .unwrap();
        let after = net_counters(&vm);
        let delta = |key| counter(&after, key) - counter(&before, key);
        // Every datagram went in and came back out; ARP may add a frame or two.
        assert!((10_000..10_008).contains(&delta("rx_frames")), "{mode}: {before} -> {after}");
        assert!((10_000..10_004).contains(&delta("tx_frames")), "{mode}: {before} -> {after}");
        assert!(delta("rx_bytes") >= sent_bytes && delta("tx_bytes") >= sent_bytes, "{mode}: {after}");
        // Whoever watches the transmit queue after the guest sends (the
        // device where it maps guest RAM, the VMM in `rpc`) tells the driver
        // it needs no notifications meanwhile; `rpc-dma` never does (the few
        // it skips are EVENT_IDX's: two posts before the device looks notify
        // once). A device that walks its own rings and holds receive buffers
        // needs to hear of new ones only once it runs out (in `rpc` the VMM
        // cannot tell when).
        let console = vm.wait_console("echoed 10000 datagrams", LONG);
        let line = console.lines().rev().find(|l| l.contains("echoed 10000 datagrams")).unwrap_or_default();
        let (transmit, receive) = line.split_once("receive").unwrap_or_else(|| panic!("{mode}: {line}"));
        let field = |text: &str, name: &str| {
            text.split_whitespace().find_map(|f| f.strip_prefix(name)?.trim_end_matches(',').parse::<u64>().ok())
        };
        let skipped = |text: &str| field(text, "skipped=").unwrap_or_else(|| panic!("{mode}: {line}"));
        assert!(field(transmit, "sent=").is_some() && field(receive, "sent=").is_some(), "{mode}: {line}");
        match mode {
            "rpc-dma" => assert!(skipped(transmit) < 1_000, "{mode}: {line}"),
            _ => assert!(skipped(transmit) > 5_000, "{mode}: {line}"),
        }
        // (With EVENT_IDX, the guest's default, a driver that posts twice
        // before the VMM looks notifies once.)
        match mode {
            "rpc" => assert!(skipped(receive) < 1_000, "{mode}: {line}"),
            _ => assert!(skipped(receive) > 5_000, "{mode}: {line}"),
        }
        assert_eq!(vm.shutdown(), Some(0), "{mode}");
    }
}

/// A host stream 15 times the guest's receive ring (256 buffers), to a port
/// where the guest answers nothing: the device runs out of buffers again
/// and again, and as nothing the guest sends wakes it, it must each time
/// have asked the driver to notify it of new ones (it tells the driver not
/// to notify while it holds some). The device takes every frame.
#[test]
fn a_stream_larger_than_the_receive_ring_reaches_the_guest_in_every_memory_mode() {
    const DATAGRAMS: u64 = 4_000;
    for mode in MODES {
        let Some(ns) = netns(&format!("stream-{mode}")) else { return };
        let vm = ping_guest(&ns, mode);
        let before = counter(&net_counters(&vm), "rx_frames");
        ns.within(|| {
            let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
            socket.connect((GUEST, 5)).unwrap();
            // In bursts of 400: more than the ring holds, fewer than the
            // tap's queue (500), which the device empties between bursts.
            for _ in 0..DATAGRAMS / 400 {
                for _ in 0..400 {
                    socket.send(&[0x5a; 1400]).unwrap();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut taken = 0;
        while Instant::now() < deadline {
            taken = counter(&net_counters(&vm), "rx_frames") - before;
            if taken >= DATAGRAMS {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(taken >= DATAGRAMS, "{mode}: the device took {taken} of {DATAGRAMS} frames\n{}", vm.console());
        assert_eq!(vm.shutdown(), Some(0), "{mode}");
    }
}

/// A guest streaming 20,000 full-size datagrams to the host: every one
/// arrives, and the driver seldom has to notify, because whoever walks the
/// transmit ring (the device where it maps guest RAM, the VMM in `rpc`)
/// tells it not to while serving and polling (each notification is an
/// exit, and a device that served with notifications on had the guest
/// notify for every frame). `rpc-dma` never does, so with EVENT_IDX the
/// driver notifies each time the device has caught up.
#[test]
fn a_guest_streaming_to_the_host_seldom_notifies_in_every_memory_mode() {
    const DATAGRAMS: u32 = 20_000;
    for mode in MODES {
        let Some(ns) = netns(&format!("blast-{mode}")) else { return };
        let mut vm = ping_guest(&ns, mode);
        let received = ns
            .within(|| {
                let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
                common::force_receive_buffer(&socket, 64 << 20).expect("SO_RCVBUFFORCE");
                socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                socket.connect((GUEST, 10)).unwrap();
                let mut request = DATAGRAMS.to_le_bytes().to_vec();
                request.extend_from_slice(&1472u16.to_le_bytes());
                socket.send(&request).unwrap();
                let (mut buf, mut received) = ([0u8; 2048], 0u32);
                while let Ok(1472) = socket.recv(&mut buf) {
                    received += 1;
                    if buf[0] == 0xff {
                        break;
                    }
                }
                received
            })
            .unwrap();
        assert_eq!(received, DATAGRAMS, "{mode}: the host received {received} whole datagrams\n{}", vm.console());
        let console = vm.wait_console(&format!("blasted {DATAGRAMS} datagrams"), LONG);
        let line = console.lines().find(|l| l.contains("blasted")).unwrap_or_default();
        let field = |name: &str| line.split_whitespace().find_map(|f| f.strip_prefix(name)?.parse::<u32>().ok());
        let (sent, skipped) = (field("sent=").unwrap(), field("skipped=").unwrap());
        eprintln!("net: {mode}: {sent} of {DATAGRAMS} datagrams notified");
        assert_eq!(sent + skipped, DATAGRAMS, "{mode}: {line}");
        match mode {
            // With EVENT_IDX it wants one each time it has caught up.
            "rpc-dma" => assert!(sent > 0, "{mode}: {line}"),
            _ => assert!(sent * 4 < DATAGRAMS, "{mode}: {line}"),
        }
        assert_eq!(vm.shutdown(), Some(0), "{mode}");
    }
}

#[test]
fn the_net_device_is_confined_and_maps_no_guest_memory_in_rpc_mode() {
    let Some(ns) = netns("confined") else { return };
    let vm = ping_guest(&ns, "rpc");
    let (_, info) = vm.api("GET", "/vm", "");
    let pid = info["devices"][0]["pid"].as_u64().unwrap();
    // The MAC skvm made up for the tap is the one the guest reads, and `skvm ctl info` shows it.
    let mac = info["devices"][0]["mac"].as_str().unwrap().to_string();
    assert!(vm.console().contains(&format!("net: mac {mac} ")), "{mac}: {}", vm.console());
    let socket = vm.socket.to_str().unwrap().to_string();
    let ctl = common::run(&["ctl", "--api-socket", &socket, "info"]);
    assert!(ctl.stdout.contains(&format!("MAC {mac}")), "{}", ctl.stdout);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).map(|v| v.trim().to_string()).unwrap()
    };
    assert_eq!(field("Name"), "skvm-net0");
    assert_eq!(field("Seccomp"), "2");
    assert_eq!(field("CapEff"), "0000000000000000");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("skvm-guest-ram"), "the net device maps guest RAM:\n{maps}");
    let own = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let theirs = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(own, theirs, "the net device shares a network namespace");
    // The one network descriptor it holds is the tap.
    let tun = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == "/dev/net/tun"))
        .count();
    assert!((1..=2).contains(&tun), "{tun} tun descriptors");
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn bad_net_flags_and_missing_taps_are_clear_errors() {
    for (flag, why) in [
        ("tap=tap0,mac=zz:00:00:00:00:01", "not a MAC address"),
        ("tap=tap0,mac=01:00:00:00:00:01", "multicast"),
        ("mac=02:00:00:00:00:01", "needs tap=NAME"),
        ("tap=a-name-far-too-long-for-linux", "interface name"),
        ("tap=tap0,speed=10G", "not tap=NAME or mac=MAC"),
    ] {
        let outcome = run(&["run", "--net", flag]);
        outcome.assert_clean_error();
        assert_eq!(outcome.code(), Some(2), "{flag}: {}", outcome.stderr);
        assert!(outcome.stderr.contains(why), "{flag}: {}", outcome.stderr);
    }
    let outcome = run(&["run", "--net", "tap=skvm-no-tap"]);
    outcome.assert_clean_error();
    assert_eq!(outcome.code(), Some(1), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("no such network interface"), "{}", outcome.stderr);
    assert!(!std::path::Path::new("/sys/class/net/skvm-no-tap").exists(), "skvm created the tap");
    let Some(ns) = netns("busy") else { return };
    let _first = ping_guest(&ns, "rpc");
    let second = ns.exec(&[common::SKVM, "run", "--net", "tap=tap0"]).unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
}

/// The guest's `net-hostile`: malformed transmit chains, receive buffers
/// posted read-only or too small for a header, then small buffers frames
/// must span. Every case is dropped or given back and counted, the VMM and
/// the device stay up, and the device works afterwards. With `merge=0` (no
/// MRG_RXBUF) a frame larger than a buffer is dropped and counted.
#[test]
fn hostile_frames_and_buffers_are_dropped_and_counted_in_every_memory_mode() {
    for mode in MODES {
        for merge in ["1", "0"] {
            let Some(ns) = netns(&format!("hostile-{mode}-{merge}")) else { return };
            let cmdline = format!("scenario=net-hostile merge={merge}");
            let args = ["--memory-mode", mode, "--net", "tap=tap0", "--cmdline", &cmdline];
            let mut vm = LiveVm::start_in(Some(&ns.0), &format!("net-{}", ns.0), &args);
            let console = vm.wait_console("net: serving", LONG);
            assert_eq!(console.matches(": completed").count(), 7, "{mode}: {console}");
            assert!(console.contains("net-hostile: 0 transmit cases left stuck"), "{mode}: {console}");
            // The guest takes skvm's 256-entry rings and posts each buffer read-only, then too short.
            assert!(console.contains(" rings 256"), "{mode}: {console}");
            assert!(console.contains("net-hostile: 512 unusable receive buffers came back unused"), "{console}");
            assert!(console.contains("small receive buffers ok"), "{mode}: {console}");
            let counters = net_counters(&vm);
            assert_eq!(counter(&counters, "tx_dropped_malformed"), 6, "{mode}: {counters}");
            assert_eq!(counter(&counters, "tx_dropped_oversized"), 1, "{mode}: {counters}");
            assert_eq!(counter(&counters, "rx_bad_buffers"), 512, "{mode}: {counters}");
            if merge == "0" {
                // 1,400 bytes of UDP cannot fit a 128-byte buffer: dropped, not truncated.
                ns.within(|| {
                    let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
                    socket.send_to(&[0x5a; 1400], (GUEST, 9)).unwrap();
                })
                .unwrap();
                let deadline = Instant::now() + LONG;
                while counter(&net_counters(&vm), "rx_dropped_too_big") == 0 {
                    assert!(Instant::now() < deadline, "{mode}: the big frame was not dropped");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let ping = ns.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST]).unwrap();
            assert!(ping.status.success(), "{mode} merge={merge}: {}", String::from_utf8_lossy(&ping.stdout));
            let (_, info) = vm.api("GET", "/vm", "");
            assert_eq!(info["devices"][0]["healthy"], true, "{mode}: {info}");
            assert_eq!(vm.shutdown(), Some(0), "{mode}");
        }
    }
}

/// Frames sent to a guest that posts no receive buffers (its driver never
/// started) stay in the tap's own queue, which drops what does not fit: the
/// device does not read them, and neither it nor the VMM grows, in every
/// memory mode.
#[test]
fn frames_for_a_guest_without_receive_buffers_wait_in_the_taps_queue_in_every_memory_mode() {
    const FRAMES: u64 = 5_000;
    for mode in MODES {
        let Some(ns) = netns(&format!("norx-{mode}")) else { return };
        let args = ["--memory-mode", mode, "--net", "tap=tap0", "--cmdline", "scenario=spin"];
        let vm = LiveVm::start_in(Some(&ns.0), &format!("net-{}", ns.0), &args);
        let (_, info) = vm.api("GET", "/vm", "");
        // The device's own process, or skvm where the device is a thread.
        let server = info["devices"][0]["pid"].as_u64().map_or(vm.child.id(), |pid| pid as u32);
        let tap_dropped = || {
            let out = ns.exec(&["cat", "/sys/class/net/tap0/statistics/tx_dropped"]).unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap()
        };
        let (peak, dropped) = (common::status_kib(server, "VmHWM"), tap_dropped());
        ns.within(|| {
            let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
            // Broadcast: no neighbour to resolve, every datagram goes to the tap.
            socket.set_broadcast(true).unwrap();
            for _ in 0..FRAMES {
                socket.send_to(&[0x5a; 1400], ("10.0.0.255", 9)).unwrap();
            }
        })
        .unwrap();
        let dropped = tap_dropped() - dropped;
        // The tap queues its txqueuelen (1,000) and drops the rest; a device
        // that read the tap would leave it almost nothing to drop.
        assert!(dropped >= FRAMES / 2, "{mode}: the tap dropped only {dropped} of {FRAMES}: something read them");
        let grown = common::status_kib(server, "VmHWM").saturating_sub(peak);
        assert!(grown < 2048, "{mode}: the device's process grew by {grown} KiB");
        let counters = net_counters(&vm);
        assert_eq!(counter(&counters, "rx_frames"), 0, "{mode}: {counters}");
        let (_, info) = vm.api("GET", "/vm", "");
        assert_eq!(info["devices"][0]["healthy"], true, "{mode}: {info}");
        assert_eq!(vm.shutdown(), Some(0), "{mode}");
    }
}

/// With checksum offload negotiated (the tap takes it), the guest's
/// datagram with a partial checksum reaches a host socket, and the host's
/// datagrams reach the guest with their checksum left partial (the header
/// says where), in every memory mode.
#[test]
fn checksum_offload_works_both_ways_in_every_memory_mode() {
    for mode in MODES {
        let Some(ns) = netns(&format!("csum-{mode}")) else { return };
        let (bound, ready) = std::sync::mpsc::channel();
        let listener = ns.spawn_within(move || {
            let socket = UdpSocket::bind("10.0.0.1:5555").unwrap();
            socket.set_read_timeout(Some(LONG)).unwrap();
            bound.send(()).unwrap();
            let mut buf = [0u8; 2048];
            let (len, from) = socket.recv_from(&mut buf).expect("no datagram from the guest");
            (buf[..len].to_vec(), from)
        });
        ready.recv().unwrap();
        let args = ["--memory-mode", mode, "--net", "tap=tap0", "--cmdline", "scenario=net-ping pings=1 offload=1"];
        let mut vm = LiveVm::start_in(Some(&ns.0), &format!("net-{}", ns.0), &args);
        vm.wait_console("net: serving", LONG);
        let (data, from) = listener.join().unwrap().unwrap();
        assert_eq!(data, b"checksum left to the host", "{mode}");
        assert_eq!(from.to_string(), "10.0.0.2:4242", "{mode}");
        ns.within(|| {
            let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            socket.send_to(b"finish my checksum", (GUEST, 7)).unwrap();
            let mut buf = [0u8; 64];
            let len = socket.recv(&mut buf).expect("no echo");
            assert_eq!(&buf[..len], b"finish my checksum");
        })
        .unwrap();
        vm.wait_console("net: partial checksum from the host (start 34, offset 6)", LONG);
        let counters = net_counters(&vm);
        assert_eq!(counter(&counters, "tx_dropped_malformed"), 0, "{mode}: {counters}");
        assert_eq!(vm.shutdown(), Some(0), "{mode}");
    }
}

/// In `rpc` mode a net device whose process dies is replaced, and the VMM
/// posts the new one every receive buffer the old one held: the guest
/// notices nothing, and pings still get through.
#[test]
fn a_killed_rpc_net_device_is_replaced_and_the_guest_keeps_its_network() {
    let Some(ns) = netns("restart") else { return };
    let vm = ping_guest(&ns, "rpc");
    let (_, info) = vm.api("GET", "/vm", "");
    let pid = info["devices"][0]["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the device process this VM started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + LONG;
    loop {
        let (_, info) = vm.api("GET", "/vm", "");
        let device = &info["devices"][0];
        if device["restarts"].as_u64() == Some(1) && device["pid"].as_u64().is_some_and(|p| p as i32 != pid) {
            assert_eq!(device["healthy"], true, "{info}");
            break;
        }
        assert!(Instant::now() < deadline, "the net device was not replaced: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ping = ns.exec(&["ping", "-c", "5", "-i", "0.2", "-W", "5", GUEST]).unwrap();
    assert!(ping.status.success(), "{}\n{}", String::from_utf8_lossy(&ping.stdout), vm.console());
    assert!(!vm.console().contains("error:"), "{}", vm.console());
    assert_eq!(vm.shutdown(), Some(0));
}

/// `skvm bench --net --quick` measures every memory mode in namespaces of
/// its own, in rounds: each row has a round trip and traffic both ways in
/// every round, and the report gives the spread and compares each mode
/// with `shared` round by round.
#[test]
fn bench_net_measures_every_memory_mode() {
    if let Some(why) = Netns::unavailable() {
        eprintln!("SKIPPED: skvm bench --net: {why}");
        return;
    }
    let out = common::temp_path("bench-net");
    let bench =
        common::skvm(&["bench", "--net", "--quick", "--no-qemu", "--out", out.to_str().unwrap()]).spawn().unwrap();
    // Its namespaces are named after its process (others' may come and go meanwhile).
    let made_here = format!("skvm-{}-bench-", bench.id());
    let outcome = common::wait_with_deadline(bench, Duration::from_secs(600));
    assert_eq!(outcome.code(), Some(0), "{}", outcome.stderr);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("net.json")).unwrap()).unwrap();
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), MODES.len(), "{results}");
    for (row, mode) in rows.iter().zip(MODES) {
        assert_eq!(row["system"], mode, "{row}");
        assert!(row["error"].is_null(), "{row}");
        for figure in [
            "rtt_p50_us",
            "host_to_guest_64b_fps",
            "host_to_guest_1472b_mibs",
            "guest_to_host_64b_fps",
            "guest_to_host_1472b_mibs",
        ] {
            assert!(row[figure].as_f64().unwrap() > 0.0, "{figure}: {row}");
        }
        let rounds = row["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 2, "the quick preset's two rounds: {row}");
        assert_eq!(row["runs"], 2, "{row}");
        for round in rounds {
            let figures: Vec<f64> = round.as_array().unwrap().iter().map(|f| f.as_f64().unwrap()).collect();
            assert!(figures.len() == 6 && figures.iter().all(|&f| f > 0.0), "{row}");
        }
        // The host CPU its VMM spent per frame, each throughput phase, each round.
        let figures = |name: &str| -> Vec<f64> {
            row[name]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: {row}"))
                .iter()
                .map(|f| f.as_f64().unwrap())
                .collect()
        };
        let cpu = figures("cpu_us_per_frame");
        assert!(cpu.len() == 4 && cpu.iter().all(|&us| us > 0.0 && us < 1e4), "{row}");
        assert_eq!(row["cpu_rounds"].as_array().unwrap().len(), 2, "{row}");
        // Split by process: what its device processes took (none in
        // `inprocess`, whose devices are VMM threads), and the host's end.
        let (started, host_end) = (figures("started_cpu_us_per_frame"), figures("host_end_cpu_us_per_frame"));
        match mode {
            "inprocess" => assert!(started.iter().all(|&us| us == 0.0), "{row}"),
            _ => assert!(started.iter().all(|&us| us > 0.0), "{row}"),
        }
        assert!(started.iter().zip(&cpu).all(|(s, all)| s <= all), "{row}");
        assert!(host_end.len() == 4 && host_end.iter().all(|&us| us > 0.0 && us < 1e4), "{row}");
    }
    // Frames in `rpc` cross from the device process to the VMM's memory
    // service: more host CPU per frame than `shared`, whose device writes
    // them into guest RAM itself (README's "Host CPU per frame").
    let cpu = |mode: &str, phase: usize| {
        let row = rows.iter().find(|r| r["system"] == mode).unwrap();
        row["cpu_us_per_frame"][phase].as_f64().unwrap()
    };
    assert!(
        cpu("rpc", 1) > cpu("shared", 1),
        "host->guest 1472 B: rpc {} µs, shared {} µs",
        cpu("rpc", 1),
        cpu("shared", 1)
    );
    let report = std::fs::read_to_string(out.join("net.md")).unwrap();
    assert!(report.contains("## Each mode against `shared`"), "{report}");
    assert!(report.contains("| rpc | "), "{report}");
    assert!(report.contains("## Spread across the rounds"), "{report}");
    assert!(report.contains("## Host CPU per frame"), "{report}");
    assert!(report.contains("## Host CPU per frame, by process"), "{report}");
    assert!(report.lines().any(|l| l.starts_with("| rpc | ") && l.matches(" + ").count() == 4), "{report}");
    assert!(report.lines().any(|l| l.starts_with("| shared | ") && l.matches(" (").count() == 4), "{report}");
    // Each mode against `shared`, with the rounds it did better in.
    assert!(report.lines().any(|l| l.starts_with("| inprocess | ") && l.contains("/2)")), "{report}");
    // Nothing is left behind: every namespace the run made is gone.
    let namespaces = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(!namespaces.lines().any(|ns| ns.starts_with(&made_here)), "left behind: {namespaces}");
}
