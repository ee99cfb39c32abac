//! `skvm ctl`: a client for the control API of a running skvm.
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(clap::Subcommand, Debug, Clone, Copy)]
pub enum CtlCommand {
    /// Ask the guest to have SIZE of hotplug memory plugged (virtio-mem), e.g. `resize 256M`
    /// or `resize 0`. Returns at once; `info` shows when the guest has followed.
    Resize {
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// The VM's state, size, memory mode and devices with their PIDs, health and counters.
    Info,
    /// Stop the VM (skvm exits with status 0).
    Shutdown,
    /// Stop every vCPU until `resume`; devices stay up.
    Pause,
    /// Let the vCPUs run again.
    Resume,
}

/// A size with a K, M, G or T suffix; a bare number here means bytes, as in
/// the API's `requested_bytes`.
fn parse_size(text: &str) -> Result<u64, String> {
    crate::size::parse(text, crate::size::BareUnit::Bytes)
}

/// Sends one request; returns the HTTP status and the JSON body.
fn request(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, Value), String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("cannot reach skvm's API at {}: {e}", socket.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let head = format!("{method} {path} HTTP/1.1\r\nHost: skvm\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(head.as_bytes()).map_err(|e| format!("sending the request: {e}"))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(|e| format!("reading the reply: {e}"))?;
    let (head, body) = reply.split_once("\r\n\r\n").ok_or("malformed reply from skvm")?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("malformed status line from skvm")?;
    let body = serde_json::from_str(body).map_err(|e| format!("reply is not JSON: {e}"))?;
    Ok((status, body))
}

fn print_info(info: &Value) {
    let mib = info["memory_bytes"].as_u64().unwrap_or(0) >> 20;
    println!(
        "state:       {} (up {:.1} s)",
        info["state"].as_str().unwrap_or("?"),
        info["uptime_ms"].as_f64().unwrap_or(0.0) / 1e3
    );
    println!("vCPUs:       {}", info["vcpus"]);
    println!("memory:      {mib} MiB");
    println!("memory mode: {}", info["memory_mode"].as_str().unwrap_or("?"));
    if info["hotplug"].is_object() {
        print_hotplug(&info["hotplug"]);
    }
    let devices = info["devices"].as_array().cloned().unwrap_or_default();
    if devices.is_empty() {
        println!("devices:     none");
    }
    for d in devices {
        let pid = d["pid"].as_u64().map_or("in skvm".to_string(), |p| format!("pid {p}"));
        let health = match (d["failure"].as_str(), d["driver_ok"].as_bool()) {
            (Some(why), _) => format!("FAILED: {why}"),
            (None, Some(false)) => "healthy, not started by the driver yet".into(),
            (None, _) => "healthy".into(),
        };
        let requests = match d["counters"]["requests"].as_u64() {
            Some(n) => format!(", {n} requests ({} errors)", d["counters"]["errors"]),
            None => String::new(),
        };
        let counters = match d["memory_rpcs"].as_u64() {
            Some(rpcs) => format!(", {rpcs} memory RPCs, {} bytes, {} refused", d["memory_bytes"], d["memory_refused"]),
            None => String::new(),
        };
        let posted = match d["batches"].as_u64() {
            Some(batches) => format!(", {batches} batches posted, {} requests held", d["grants_outstanding"]),
            None => String::new(),
        };
        let traffic = match (d["mac"].as_str(), &d["counters"]["net"]) {
            (Some(mac), net) if net.is_object() => format!(
                ", MAC {mac}, {} frames out, {} in, {} dropped",
                net["tx_frames"],
                net["rx_frames"],
                ["tx_dropped_malformed", "tx_dropped_oversized", "tx_dropped_refused", "rx_dropped_too_big"]
                    .iter()
                    .map(|k| net[*k].as_u64().unwrap_or(0))
                    .sum::<u64>()
            ),
            (Some(mac), _) => format!(", MAC {mac}"),
            _ => String::new(),
        };
        let restarts = match (d["restarts"].as_u64(), d["last_failure"].as_str()) {
            (Some(n), Some(why)) if n > 0 => format!(", restarted {n} times (last: {why})"),
            _ => String::new(),
        };
        println!(
            "device {:<5} {:<6} {pid}, {health}{traffic}{requests}{counters}{posted}{restarts}",
            d["name"].as_str().unwrap_or("?"),
            d["kind"].as_str().unwrap_or("?")
        );
    }
}

fn print_hotplug(h: &Value) {
    let mib = |key: &str| h[key].as_u64().unwrap_or(0) >> 20;
    println!(
        "hotplug:     {} MiB plugged of {} MiB requested; region {} MiB at {:#x}, {} MiB blocks",
        mib("plugged_bytes"),
        mib("requested_bytes"),
        mib("region_bytes"),
        h["region_start"].as_u64().unwrap_or(0),
        mib("block_bytes")
    );
    println!("             {} plugs, {} unplugs", h["plugs"], h["unplugs"]);
    for (what, key) in [("last plug", "last_plug"), ("last unplug", "last_unplug")] {
        let t = &h[key];
        if t.is_object() {
            println!(
                "             {what}: {} blocks, {} us total ({} us until devices see it, {} us KVM, {} us device rebuilds)",
                t["blocks"], t["total_us"], t["device_visible_us"], t["kvm_us"], t["rebuild_us"]
            );
        }
    }
}

pub fn run(socket: &Path, command: CtlCommand, json: bool) -> Result<u8, String> {
    let body = match command {
        CtlCommand::Resize { size } => format!("{{\"requested_bytes\":{size}}}"),
        _ => String::new(),
    };
    let (method, path) = match command {
        CtlCommand::Info => ("GET", "/vm"),
        CtlCommand::Shutdown => ("PUT", "/vm/shutdown"),
        CtlCommand::Pause => ("PUT", "/vm/pause"),
        CtlCommand::Resume => ("PUT", "/vm/resume"),
        CtlCommand::Resize { .. } => ("PUT", "/vm/memory"),
    };
    let (status, body) = request(socket, method, path, &body)?;
    if !(200..300).contains(&status) {
        return Err(format!("skvm refused ({status}): {}", body["error"].as_str().unwrap_or("no reason given")));
    }
    match (json, command) {
        (true, _) => println!("{body}"),
        (false, CtlCommand::Info) => print_info(&body),
        (false, CtlCommand::Shutdown) => println!("shutdown requested"),
        (false, CtlCommand::Pause) => println!("paused"),
        (false, CtlCommand::Resume) => println!("running"),
        (false, CtlCommand::Resize { size }) => println!("requested {} MiB of hotplug memory", size >> 20),
    }
    Ok(0)
}
