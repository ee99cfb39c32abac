//! A network namespace holding `tap0` (up, 10.0.0.1/24, IPv6 off so no
//! router solicitations reach the frame counts), deleted on drop.
//! `skvm bench --net` runs each system inside one; the net tests include
//! this file by path and do the same.
use std::process::Command;

/// Gives `socket` a receive buffer of `bytes` (root may exceed rmem_max),
/// so that a stream is not dropped while it is read.
pub fn force_receive_buffer(socket: &std::net::UdpSocket, bytes: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: setsockopt with an int of the size we pass.
    let done = unsafe {
        let at = &bytes as *const i32 as *const libc::c_void;
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, at, len)
    };
    match done {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

pub struct Netns(pub String);

impl Netns {
    /// Why this host cannot make one with a tap and ping it, if it cannot.
    pub fn unavailable() -> Option<String> {
        if let Some(path) = ["/dev/net/tun", "/usr/bin/ping"].into_iter().find(|p| !std::path::Path::new(p).exists()) {
            return Some(format!("{path} is missing (scripts/setup.sh installs what the network needs)"));
        }
        let iproute2 = Command::new("ip").arg("-V").output().is_ok_and(|o| o.stdout.starts_with(b"ip utility"));
        (!iproute2).then(|| "`ip` is not iproute2's (no network namespaces); scripts/setup.sh installs it".into())
    }

    /// Makes the namespace `skvm-PID-name` with its tap, after deleting
    /// those of processes that are gone.
    pub fn create(name: &str) -> Result<Netns, String> {
        remove_stale();
        let ns = Netns(format!("skvm-{}-{name}", std::process::id()));
        let steps: [&[&str]; 6] = [
            &["netns", "add", &ns.0],
            &["netns", "exec", &ns.0, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
            &["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"],
            &["-n", &ns.0, "addr", "add", "10.0.0.1/24", "dev", "tap0"],
            &["-n", &ns.0, "link", "set", "tap0", "up"],
            &["-n", &ns.0, "link", "set", "lo", "up"],
        ];
        for step in steps {
            let output = Command::new("ip").args(step).output().map_err(|e| format!("cannot run ip: {e}"))?;
            if !output.status.success() {
                let why = String::from_utf8_lossy(&output.stderr);
                return Err(format!("`ip {}` failed: {}", step.join(" "), why.trim()));
            }
        }
        Ok(ns)
    }

    /// Runs `command` inside the namespace and collects its output (the net
    /// tests, which include this file, ping with it).
    #[allow(dead_code)]
    pub fn exec(&self, command: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("ip").args(["netns", "exec", &self.0]).args(command).output()
    }

    /// Starts `work` on a thread that has entered the namespace (a network
    /// namespace belongs to a thread, not the process).
    pub fn spawn_within<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T, String>> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
            // SAFETY: setns on a descriptor we hold, for this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("cannot enter {path}: {}", std::io::Error::last_os_error()));
            }
            Ok(work())
        })
    }

    /// Runs `work` inside the namespace and returns what it returns.
    pub fn within<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        self.spawn_within(work).join().map_err(|_| "the namespace's thread panicked".to_string())?
    }
}

/// Deletes the namespaces of processes that were killed before they could
/// delete theirs, so that they do not pile up.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for name in entries.flatten().filter_map(|entry| entry.file_name().into_string().ok()) {
        let owner = name.strip_prefix("skvm-").and_then(|rest| rest.split('-').next()?.parse::<u32>().ok());
        if owner.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
