//! The control API and `skvm ctl`: what a user reads and what a client
//! cannot break.
mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

fn raw(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

fn start(socket: &Path, extra: &[&str]) -> std::process::Child {
    let socket_arg = socket.to_str().unwrap();
    let mut args = vec!["run", "--memory", "64M", "--api-socket", socket_arg, "--cmdline", "scenario=spin"];
    args.extend_from_slice(extra);
    let mut child = skvm(&args).spawn().unwrap();
    for _ in 0..250 {
        if UnixStream::connect(socket).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the API socket never came up");
}

#[test]
fn info_shows_devices_pids_and_health_then_shutdown_stops_the_vm() {
    let socket = temp_path("api-info.sock");
    let disk = temp_path("api-disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let vm = start(&socket, &["--disk", &disk_arg, "--rng"]);

    let info = run(&["ctl", "--api-socket", socket.to_str().unwrap(), "--json", "info"]);
    assert_eq!(info.code(), Some(0), "{}", info.stderr);
    let json: serde_json::Value = serde_json::from_str(info.stdout.trim()).unwrap();
    assert_eq!(json["state"], "running");
    assert_eq!(json["memory_bytes"], 64 << 20);
    assert_eq!(json["memory_mode"], "rpc");
    let devices = json["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!((devices[0]["name"].as_str(), devices[0]["kind"].as_str()), (Some("blk0"), Some("block")));
    assert_eq!(devices[1]["kind"], "rng");
    for device in devices {
        let pid = device["pid"].as_u64().expect("a device process");
        assert!(Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} is not running");
        assert_eq!(device["healthy"], true);
        // Request level: the VMM counts what it posted and what the device holds.
        assert!(device["batches"].is_u64() && device["grants_outstanding"] == 0, "{device}");
    }

    let summary = run(&["ctl", "--api-socket", socket.to_str().unwrap(), "info"]);
    assert!(
        summary.stdout.contains("memory mode: rpc") && summary.stdout.contains("device blk0"),
        "{}",
        summary.stdout
    );
    assert!(summary.stdout.contains("batches posted, 0 requests held"), "{}", summary.stdout);

    let stop = run(&["ctl", "--api-socket", socket.to_str().unwrap(), "shutdown"]);
    assert_eq!(stop.code(), Some(0), "{}", stop.stderr);
    let out = wait_with_deadline(vm, Duration::from_secs(30));
    assert_eq!(out.code(), Some(0));
    assert!(out.stderr.contains("skvm: shut down through the control API"), "{}", out.stderr);
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn bad_requests_get_4xx_json_and_change_nothing() {
    let socket = temp_path("api-bad.sock");
    let vm = start(&socket, &[]);
    let big = format!("PUT /vm/shutdown HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1 << 20);
    let cases: [(&[u8], &str); 6] = [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", "404"),
        (b"DELETE /vm HTTP/1.1\r\n\r\n", "405"),
        (b"GET /vm/shutdown HTTP/1.1\r\n\r\n", "405"),
        (b"this is not http\r\n\r\n", "400"),
        (b"PUT /vm/shutdown HTTP/1.1\r\nContent-Length: 5\r\n\r\nnope!", "400"),
        (big.as_bytes(), "413"),
    ];
    for (request, status) in cases {
        let reply = raw(&socket, request);
        assert!(reply.starts_with(&format!("HTTP/1.1 {status}")), "{reply}");
        let body = reply.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(json["error"].is_string(), "{body}");
    }
    // Still running and answering.
    let reply = raw(&socket, b"GET /vm HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200") && reply.contains("\"state\":\"running\""), "{reply}");
    let out = run(&["ctl", "--api-socket", socket.to_str().unwrap(), "shutdown"]);
    assert_eq!(out.code(), Some(0));
    assert_eq!(wait_with_deadline(vm, Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn ctl_without_a_vm_is_a_clear_error() {
    let out = run(&["ctl", "--api-socket", "/nonexistent/skvm.sock", "info"]);
    out.assert_clean_error();
    assert!(out.stderr.contains("cannot reach skvm's API at /nonexistent/skvm.sock"), "{}", out.stderr);
}

#[test]
fn api_socket_never_replaces_a_regular_file() {
    let path = temp_path("not-a-socket");
    std::fs::write(&path, b"keep me").unwrap();
    let out = run(&["run", "--memory", "64M", "--api-socket", path.to_str().unwrap()]);
    out.assert_clean_error();
    assert!(out.stderr.contains("exists and is not a socket"), "{}", out.stderr);
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn pause_stops_the_guest_until_resume() {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    let socket = temp_path("api-pause.sock");
    let socket_arg = socket.to_str().unwrap().to_string();
    let mut vm =
        skvm(&["run", "--memory", "64M", "--cpus", "2", "--api-socket", &socket_arg, "--cmdline", "scenario=ticker"])
            .spawn()
            .unwrap();
    let ticks = Arc::new(Mutex::new(0usize));
    let stdout = vm.stdout.take().unwrap();
    let counter = ticks.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("tick ") {
                *counter.lock().unwrap() += 1;
            }
        }
    });
    let count = || *ticks.lock().unwrap();
    let wait_for = |target: usize| {
        for _ in 0..500 {
            if count() >= target {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    assert!(wait_for(3), "the guest never ticked");

    let out = run(&["ctl", "--api-socket", &socket_arg, "pause"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let info = run(&["ctl", "--api-socket", &socket_arg, "--json", "info"]);
    assert!(info.stdout.contains("\"state\":\"paused\""), "{}", info.stdout);
    std::thread::sleep(Duration::from_millis(300)); // let the reader catch up
    let frozen = count();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(count(), frozen, "the guest ran while paused");

    let out = run(&["ctl", "--api-socket", &socket_arg, "resume"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(wait_for(frozen + 2), "the guest did not run again after resume");

    let out = run(&["ctl", "--api-socket", &socket_arg, "shutdown"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let status = vm.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The `required:` list of a schema in docs/api.yaml.
fn required_fields(spec: &str, schema: &str) -> Vec<String> {
    let header = format!("\n    {schema}:\n");
    let at = spec.find(&header).unwrap_or_else(|| panic!("no schema {schema} in docs/api.yaml"));
    let line = spec[at..].lines().find(|l| l.trim_start().starts_with("required: [")).unwrap();
    let list = line.split('[').nth(1).unwrap().trim_end_matches(']');
    let mut fields: Vec<String> = list.split(',').map(|f| f.trim().to_string()).collect();
    fields.sort();
    fields
}

fn keys(value: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn the_openapi_file_describes_what_the_api_serves() {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.yaml")).unwrap();
    let disk = temp_path("api-spec.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let vm =
        LiveVm::start("api-spec", &["--memory", "64M,hotplug=128M", "--disk", &disk_arg, "--cmdline", "scenario=spin"]);
    let (_, info) = vm.api("GET", "/vm", "");
    assert_eq!(keys(&info), required_fields(&spec, "VmInfo"));
    assert_eq!(keys(&info["devices"][0]), required_fields(&spec, "Device"));
    assert_eq!(keys(&info["devices"][0]["counters"]), required_fields(&spec, "DeviceCounters"));
    let (status, hotplug) = vm.api("PUT", "/vm/memory", "{\"requested_bytes\":0}");
    assert_eq!(status, 200);
    assert_eq!(keys(&hotplug), required_fields(&spec, "Hotplug"));
    assert_eq!(keys(&info["hotplug"]), required_fields(&spec, "Hotplug"));
    // Every path the file names exists (a wrong method gets 405, never 404).
    let paths: Vec<&str> =
        spec.lines().filter_map(|l| l.strip_prefix("  /")).map(|l| l.trim_end_matches(':')).collect();
    assert!(paths.len() >= 5, "{paths:?}");
    for path in paths {
        let (status, reply) = vm.api("DELETE", &format!("/{path}"), "");
        assert_eq!(status, 405, "/{path}: {reply}");
    }
    assert_eq!(vm.shutdown(), Some(0));
}

/// A socket someone still listens on is another VM's: refused, and left in
/// place. One nobody listens on is stale and replaced.
#[test]
fn a_live_api_socket_is_never_taken_over() {
    let vm = LiveVm::start("live-socket", &["--memory", "64M", "--cmdline", "scenario=spin"]);
    let socket = vm.socket.to_str().unwrap().to_string();
    let out = run(&["run", "--memory", "64M", "--api-socket", &socket, "--cmdline", "scenario=hello"]);
    out.assert_clean_error();
    assert!(out.stderr.contains("is in use by a running process"), "{}", out.stderr);
    assert_eq!(vm.api("GET", "/vm", "").0, 200, "the first VM lost its API");
    assert_eq!(vm.shutdown(), Some(0));

    let stale = temp_path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = run(&["run", "--memory", "64M", "--api-socket", stale.to_str().unwrap(), "--cmdline", "scenario=hello"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
}

/// The socket is the VMM's front door: owner-only whatever the umask, and
/// a client running as another user is refused even if the file's mode
/// would let it in.
#[test]
fn the_api_socket_is_owner_only_and_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let socket = temp_path("api-owner.sock");
    let mut command = std::process::Command::new(SKVM);
    command.args(["run", "--memory", "64M", "--api-socket", socket.to_str().unwrap(), "--cmdline", "scenario=spin"]);
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    // SAFETY: umask in the child before exec; no memory is touched.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    // Killed if the test fails before it stops the VM itself.
    struct Running(Option<std::process::Child>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(child) = self.0.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut running = Running(Some(command.spawn().unwrap()));
    let vm = running.0.as_mut().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() || UnixStream::connect(&socket).is_err() {
        assert!(std::time::Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o} under umask 000");

    // Opened up by hand, it still serves only skvm's own user.
    std::fs::set_permissions(socket.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
                  s.sendall(b'PUT /vm/shutdown HTTP/1.1\\r\\nHost: skvm\\r\\nContent-Length: 0\\r\\n\\r\\n'); \
                  print(s.recv(4096).decode())";
    let other =
        std::process::Command::new("python3").args(["-c", script, socket.to_str().unwrap()]).uid(65534).output();
    let other = other.unwrap();
    let reply = String::from_utf8_lossy(&other.stdout);
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply} {}", String::from_utf8_lossy(&other.stderr));
    assert!(vm.try_wait().unwrap().is_none(), "another user stopped the VM");

    // Ten idle connections do not keep skvm's own user out.
    let idle: Vec<UnixStream> = (0..10).map(|_| UnixStream::connect(&socket).unwrap()).collect();
    let info = run(&["ctl", "--api-socket", socket.to_str().unwrap(), "--json", "info"]);
    assert_eq!(info.code(), Some(0), "{}", info.stderr);
    drop(idle);
    let stop = run(&["ctl", "--api-socket", socket.to_str().unwrap(), "shutdown"]);
    assert_eq!(stop.code(), Some(0), "{}", stop.stderr);
    let vm = running.0.take().unwrap();
    assert_eq!(wait_with_deadline(vm, Duration::from_secs(30)).code(), Some(0));
}

/// Clients that connect and send nothing are served 16 at a time, each for
/// its 2 s at most: more of them make a real client wait its turn, never
/// lock it out, and never cost skvm more than 16 threads.
#[test]
fn idle_clients_are_served_16_at_a_time_and_only_delay_the_others() {
    const SERVED_AT_ONCE: usize = 16;
    let api_clients = |pid| thread_stats(pid, |comm| comm == "api-client").len();
    // Killed when dropped, should an assertion fail first.
    let vm = LiveVm::start("api-idle", &["--memory", "64M", "--cmdline", "scenario=spin"]);
    let socket = vm.socket.to_str().unwrap();
    let idle: Vec<UnixStream> = (0..SERVED_AT_ONCE + 8).map(|_| UnixStream::connect(socket).unwrap()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api_clients(vm.child.id()) < SERVED_AT_ONCE && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Sampled for 1 s, well before the first of them times out (2 s after
    // it was taken), when a thread on its way out and its successor may
    // briefly overlap.
    let until = std::time::Instant::now() + Duration::from_secs(1);
    let mut most = 0;
    while std::time::Instant::now() < until {
        most = most.max(api_clients(vm.child.id()));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(most, SERVED_AT_ONCE, "clients served at once");
    let info = run(&["ctl", "--api-socket", socket, "--json", "info"]);
    assert_eq!(info.code(), Some(0), "{}", info.stderr);
    drop(idle);
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn a_pause_that_times_out_leaves_the_vm_running() {
    // A device that takes 8 s to activate keeps the driver's vCPU inside its
    // MMIO write, so a pause cannot park it within its 2 s: the API says 409,
    // and a refused pause must change nothing (the guest then runs on).
    let socket = temp_path("api-pause-timeout.sock");
    let socket_arg = socket.to_str().unwrap().to_string();
    let disk = temp_path("api-pause-timeout.img");
    std::fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let args = [
        "run",
        "--memory",
        "64M",
        "--api-socket",
        &socket_arg,
        "--disk",
        &disk_arg,
        "--test-device-misbehave",
        "slow-activation",
        "--cmdline",
        "scenario=blk-pattern seed=3",
    ];
    // Killed if an assertion below fails, so no VM is left behind.
    struct Guard(Option<std::process::Child>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(mut vm) = self.0.take() {
                let _ = vm.kill();
                let _ = vm.wait();
            }
        }
    }
    let mut vm = Guard(Some(skvm(&args).spawn().unwrap()));
    let ctl = |command: &str| run(&["ctl", "--api-socket", &socket_arg, command]);
    let mut refused = None;
    for _ in 0..100 {
        let out = ctl("pause");
        if out.code() == Some(0) {
            // Too early (the guest had not reached activation yet): try again.
            assert_eq!(ctl("resume").code(), Some(0));
        } else if out.stderr.contains("409") || out.stderr.contains("stopped in time") {
            refused = Some(out.stderr);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = refused.expect("no pause was refused while the device activated");
    assert!(refused.contains("stopped in time"), "{refused}");
    // The API answers while the vCPU still holds the device's transport, and
    // says the driver has not brought the device up yet: it does not wait
    // for the activation (a reply after it would say driver_ok).
    let info = run(&["ctl", "--api-socket", &socket_arg, "--json", "info"]);
    let json: serde_json::Value = serde_json::from_str(info.stdout.trim()).unwrap();
    assert_eq!(json["state"], "running", "{json}");
    assert_eq!(json["devices"][0]["driver_ok"], false, "{json}");
    assert_eq!(json["devices"][0]["healthy"], true, "{json}");
    let summary = run(&["ctl", "--api-socket", &socket_arg, "info"]);
    assert!(summary.stdout.contains("not started by the driver yet"), "{}", summary.stdout);
    // The guest finishes its disk work once the activation ends.
    let out = wait_with_deadline(vm.0.take().unwrap(), Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "stdout {} stderr {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("blk0: read back 2048 sectors, all match"), "{}", out.stdout);
}
