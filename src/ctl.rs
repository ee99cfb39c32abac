//! `skvm ctl`: a client for the control API of a running skvm.
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(clap::Subcommand, Debug, Clone, Copy)]
pub enum CtlCommand {
    /// The VM's state, size, memory mode and devices with their PIDs, health and counters.
    Info,
    /// Stop the VM (skvm exits with status 0).
    Shutdown,
    /// Stop every vCPU until `resume`; devices stay up.
    Pause,
    /// Let the vCPUs run again.
    Resume,
}

/// Sends one request; returns the HTTP status and the JSON body.
fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, Value), String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("cannot reach skvm's API at {}: {e}", socket.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let head = format!("{method} {path} HTTP/1.1\r\nHost: skvm\r\nContent-Length: 0\r\n\r\n");
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
    let devices = info["devices"].as_array().cloned().unwrap_or_default();
    if devices.is_empty() {
        println!("devices:     none");
    }
    for d in devices {
        let pid = d["pid"].as_u64().map_or("in skvm".to_string(), |p| format!("pid {p}"));
        let health = match d["failure"].as_str() {
            Some(why) => format!("FAILED: {why}"),
            None => "healthy".into(),
        };
        let counters = match d["memory_rpcs"].as_u64() {
            Some(rpcs) => format!(", {rpcs} memory RPCs, {} bytes, {} refused", d["memory_bytes"], d["memory_refused"]),
            None => String::new(),
        };
        println!(
            "device {:<5} {:<6} {pid}, {health}{counters}",
            d["name"].as_str().unwrap_or("?"),
            d["kind"].as_str().unwrap_or("?")
        );
    }
}

pub fn run(socket: &Path, command: CtlCommand, json: bool) -> Result<u8, String> {
    let (method, path) = match command {
        CtlCommand::Info => ("GET", "/vm"),
        CtlCommand::Shutdown => ("PUT", "/vm/shutdown"),
        CtlCommand::Pause => ("PUT", "/vm/pause"),
        CtlCommand::Resume => ("PUT", "/vm/resume"),
    };
    let (status, body) = request(socket, method, path)?;
    if !(200..300).contains(&status) {
        return Err(format!("skvm refused ({status}): {}", body["error"].as_str().unwrap_or("no reason given")));
    }
    match (json, command) {
        (true, _) => println!("{body}"),
        (false, CtlCommand::Info) => print_info(&body),
        (false, CtlCommand::Shutdown) => println!("shutdown requested"),
        (false, CtlCommand::Pause) => println!("paused"),
        (false, CtlCommand::Resume) => println!("running"),
    }
    Ok(0)
}
