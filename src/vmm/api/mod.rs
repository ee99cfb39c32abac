//! The control API: HTTP/1.1 with JSON bodies on a unix socket
//! (`--api-socket PATH`), described in docs/api.yaml. `skvm ctl` is its
//! client. One request per connection, served on a thread of its own.
mod http;

use super::config::MemoryMode;
use super::control::VmControl;
use super::exit::VmExit;
use super::io::IoBus;
use super::{Error, Result};
use http::{read_request, write_response, Connection, Request, Response};
use serde::Serialize;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Serialize)]
struct VmInfo {
    state: &'static str,
    uptime_ms: u64,
    vcpus: u8,
    memory_bytes: u64,
    memory_mode: &'static str,
    /// The virtio-mem hotplug region, when the VM has one.
    hotplug: Option<super::hotplug::HotplugStatus>,
    devices: Vec<super::virtio::DeviceStatus>,
}

/// The body of `PUT /vm/memory`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    requested_bytes: u64,
}

pub struct Api {
    pub control: Arc<VmControl>,
    pub io: Arc<IoBus>,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub memory_mode: MemoryMode,
    pub hotplug: Option<Arc<super::hotplug::HotplugRegion>>,
    pub started: Instant,
}

fn mode_name(mode: MemoryMode) -> &'static str {
    match mode {
        MemoryMode::Rpc => "rpc",
        MemoryMode::RpcDma => "rpc-dma",
        MemoryMode::Shared => "shared",
        MemoryMode::Inprocess => "inprocess",
    }
}

impl Api {
    fn info(&self) -> VmInfo {
        let devices = super::virtio::status(&self.io.virtio);
        VmInfo {
            state: if self.control.is_stopping() {
                "stopping"
            } else if self.control.is_paused() {
                "paused"
            } else {
                "running"
            },
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            memory_mode: mode_name(self.memory_mode),
            hotplug: self.hotplug.as_ref().map(|h| h.status()),
            devices,
        }
    }

    /// Asks the guest to grow or shrink its hotplugged memory. The reply
    /// comes at once; the guest plugs or unplugs in its own time, which
    /// `GET /vm` shows as `plugged_bytes`.
    fn resize(&self, body: &[u8]) -> Response {
        let Some(region) = &self.hotplug else {
            return Response::error(409, "this VM has no hotplug region (start it with --memory SIZE,hotplug=MAX)");
        };
        let resize: Resize = match serde_json::from_slice(body) {
            Ok(resize) => resize,
            Err(e) => return Response::error(400, format!("expected {{\"requested_bytes\": N}}: {e}")),
        };
        match region.request(resize.requested_bytes) {
            Ok(()) => Response::json(200, &region.status()),
            Err(why) => Response::error(400, why),
        }
    }

    /// Answers one request; the bool says whether to shut down once it is sent.
    fn route(&self, request: &Request) -> (Response, bool) {
        if !request.body.is_empty() && serde_json::from_slice::<serde_json::Value>(&request.body).is_err() {
            return (Response::error(400, "the body is not JSON"), false);
        }
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/vm") => (Response::json(200, &self.info()), false),
            ("PUT", "/vm/shutdown") => (Response::json(200, &serde_json::json!({ "state": "stopping" })), true),
            ("PUT", "/vm/pause") => match self.control.pause() {
                Ok(()) => (Response::json(200, &serde_json::json!({ "state": "paused" })), false),
                Err(why) => (Response::error(409, why), false),
            },
            ("PUT", "/vm/resume") => {
                self.control.resume();
                (Response::json(200, &serde_json::json!({ "state": "running" })), false)
            }
            ("PUT", "/vm/memory") => (self.resize(&request.body), false),
            (_, "/vm" | "/vm/shutdown" | "/vm/pause" | "/vm/resume" | "/vm/memory") => {
                (Response::error(405, format!("{} is not allowed here", request.method)), false)
            }
            (_, path) => (Response::error(404, format!("no such resource: {path}")), false),
        }
    }
}

/// The bound socket, made before the VM so that a bad path fails fast.
pub struct ApiSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

/// Binds `path`, replacing a stale socket and never anything else.
pub fn bind(path: &Path) -> Result<ApiSocket> {
    let fail = |what: &str, e: std::io::Error| Error::Host(format!("API socket {}: {what}", path.display()), e);
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            // Someone answers there: another VM's API, not a stale socket.
            Ok(_) => {
                return Err(Error::Device(format!("API socket {} is in use by a running process", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| fail("removing a stale socket", e))?
            }
            Err(e) => return Err(fail("checking whether the existing socket is stale", e)),
        },
        Ok(_) => return Err(Error::Device(format!("API socket {} exists and is not a socket", path.display()))),
        Err(_) => {}
    }
    // Owner-only from the moment it exists, whatever the caller's umask
    // (skvm is still one thread here, so the umask change is not racy).
    // SAFETY: umask only swaps the process's file-creation mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the caller's mask.
    unsafe { libc::umask(previous) };
    let listener = bound.map_err(|e| fail("bind", e))?;
    Ok(ApiSocket { path: path.to_path_buf(), listener: Some(listener) })
}

/// Connections served at once; more wait for the listener's backlog.
const MAX_CONNECTIONS: usize = 16;

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &std::os::unix::net::UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size we pass.
    let got = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (got == 0).then_some(cred.uid)
}

/// Serves the API until skvm exits: each connection on a thread of its
/// own, at most [`MAX_CONNECTIONS`] at once (a slow client cannot hold the
/// API), and only for clients running as skvm's own user.
pub fn serve(socket: &mut ApiSocket, api: Api) -> Result<()> {
    let Some(listener) = socket.listener.take() else { return Ok(()) };
    let api = Arc::new(api);
    let slots = Arc::new(std::sync::Mutex::new(0usize));
    let freed = Arc::new(std::sync::Condvar::new());
    // SAFETY: geteuid has no failure mode.
    let owner = unsafe { libc::geteuid() };
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                {
                    let mut busy = super::lock(&slots);
                    while *busy >= MAX_CONNECTIONS {
                        busy = freed.wait(busy).unwrap_or_else(|e| e.into_inner());
                    }
                    *busy += 1;
                }
                let (api, taken, freed) = (api.clone(), slots.clone(), freed.clone());
                let served = std::thread::Builder::new().name("api-client".into()).spawn(move || {
                    serve_one(&api, stream, owner);
                    *super::lock(&taken) -= 1;
                    freed.notify_one();
                });
                if served.is_err() {
                    *super::lock(&slots) -= 1;
                }
            }
        })
        .map_err(|e| Error::Host("starting the API thread".into(), e))?;
    Ok(())
}

fn serve_one(api: &Api, stream: std::os::unix::net::UnixStream, owner: u32) {
    let allowed = peer_uid(&stream).is_some_and(|uid| uid == owner);
    let mut stream = Connection::new(stream);
    let (response, shutdown) = match read_request(&mut stream) {
        Ok(_) if !allowed => (Response::error(403, "only skvm's own user may use its API"), false),
        Ok(request) => api.route(&request),
        Err(refusal) => (refusal, false),
    };
    let _ = write_response(&mut stream, &response);
    drop(stream);
    if shutdown {
        api.control.request_exit(VmExit::ApiShutdown);
    }
}

/// Removes the socket file when skvm is done with it.
impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
