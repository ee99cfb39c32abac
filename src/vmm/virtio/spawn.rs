//! Starting a device process: `skvm device ...` with exactly its descriptors,
//! and a watcher that marks the device failed when the process ends.
use super::host::DeviceHealth;
use super::{Error, Result};
use crate::devices::process::Misbehaviour;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

/// `skvm device ...`: the command line of a device process.
pub struct DeviceCommand {
    command: Command,
    fds: Vec<RawFd>,
    name: String,
}

impl DeviceCommand {
    pub fn new(name: &str, misbehave: Option<Misbehaviour>) -> Self {
        let mut command = Command::new("/proc/self/exe");
        command.arg("device").arg("--name").arg(name);
        if let Some(m) = misbehave {
            command.arg("--misbehave").arg(match m {
                Misbehaviour::ForbiddenSyscall => "forbidden-syscall",
                Misbehaviour::HostileRpc => "hostile-rpc",
            });
        }
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
        DeviceCommand { command, fds: Vec::new(), name: name.into() }
    }

    pub fn fd(&mut self, flag: &str, fd: RawFd) {
        self.command.arg(format!("{flag}={fd}"));
        self.fds.push(fd);
    }

    pub fn arg(&mut self, arg: String) {
        self.command.arg(arg);
    }

    /// Starts the process with exactly its descriptors inheritable, and a
    /// thread that marks the device failed when the process ends.
    pub fn spawn(mut self, health: Arc<DeviceHealth>) -> Result<u32> {
        let fds = self.fds.clone();
        // SAFETY: the closure only calls fcntl, which is async-signal-safe.
        unsafe {
            self.command.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child =
            self.command.spawn().map_err(|e| Error::Host(format!("starting device process {}", self.name), e))?;
        let pid = child.id();
        let name = self.name;
        std::thread::Builder::new()
            .name(format!("{name}-watch"))
            .spawn(move || {
                let reason = match child.wait() {
                    Ok(status) => describe_exit(status),
                    Err(e) => format!("cannot wait for it: {e}"),
                };
                health.fail(&name, format!("process {pid} {reason}"));
                health.mark_ended();
            })
            .map_err(|e| Error::Host("starting a device watcher".into(), e))?;
        Ok(pid)
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(libc::SIGSYS)) => "was killed by SIGSYS (a system call outside its seccomp allowlist)".into(),
        (_, Some(signal)) => format!("was killed by signal {signal}"),
        (Some(code), _) => format!("exited with status {code}"),
        _ => "ended".into(),
    }
}
