//! Starting a device process: `skvm device ...` with exactly its descriptors,
//! and a watcher that marks the device failed when the process ends. A
//! [`ProcessRecipe`] keeps what it takes to start the process again, which
//! shared mode does whenever the memory map changes.
use super::host::DeviceHealth;
use super::{Error, Result};
use crate::devices::blk::Aio;
use crate::devices::process::{Misbehaviour, SharedRegion};
use clap::ValueEnum;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Which device a process runs, with the backend the VMM opened for it.
pub enum ProcessKind {
    Block { disk: File, readonly: bool, aio: Aio },
    Rng,
    Mem { hotplug: UnixStream },
    Net { tap: File, mac: [u8; 6], offloads: bool },
    Console { output: File, input: Option<File> },
}

impl ProcessKind {
    /// The same backend, for another start of the device.
    pub fn try_clone(&self) -> std::io::Result<ProcessKind> {
        Ok(match self {
            ProcessKind::Block { disk, readonly, aio } => {
                ProcessKind::Block { disk: disk.try_clone()?, readonly: *readonly, aio: *aio }
            }
            ProcessKind::Rng => ProcessKind::Rng,
            ProcessKind::Mem { hotplug } => ProcessKind::Mem { hotplug: hotplug.try_clone()? },
            ProcessKind::Net { tap, mac, offloads } => {
                ProcessKind::Net { tap: tap.try_clone()?, mac: *mac, offloads: *offloads }
            }
            ProcessKind::Console { output, input } => ProcessKind::Console {
                output: output.try_clone()?,
                input: input.as_ref().map(File::try_clone).transpose()?,
            },
        })
    }
}

/// How a new device process reaches guest memory.
pub enum ProcessMemory<'a> {
    /// The device's end of its memory-service channel, and at request
    /// level its staging areas (answers, posts).
    Rpc(UnixStream, Option<(RawFd, RawFd)>),
    /// The RAM memfd and where each piece of it sits in the guest.
    Shared { memfd: RawFd, regions: &'a [SharedRegion] },
}

/// Everything needed to start one device's process, again if need be.
pub struct ProcessRecipe {
    pub name: String,
    pub kind: ProcessKind,
    /// The queue notifier and interrupt, for a device that walks its ring.
    pub doorbell: Option<(EventFd, EventFd)>,
    pub misbehave: Option<Misbehaviour>,
    pub probe: Option<u64>,
    /// µs a ring-walking device with guest RAM mapped polls after its last request.
    pub poll_us: u32,
    pub health: Arc<DeviceHealth>,
}

impl ProcessRecipe {
    /// Starts a process; returns its PID and the VMM's end of its control channel.
    pub fn spawn(&self, memory: ProcessMemory) -> Result<(u32, UnixStream)> {
        let (control_vmm, control_device) = UnixStream::pair()?;
        let mut child = DeviceCommand::new(&self.name, self.misbehave);
        child.fd("--control-fd", control_device.as_raw_fd());
        if let Some((notify, irq)) = &self.doorbell {
            child.fd("--notify-fd", notify.as_raw_fd());
            child.fd("--irq-fd", irq.as_raw_fd());
            child.arg(format!("--poll-us={}", self.poll_us));
        }
        match &self.kind {
            ProcessKind::Block { disk, readonly, aio } => {
                child.arg("--kind=blk".into());
                child.fd("--disk-fd", disk.as_raw_fd());
                if *readonly {
                    child.arg("--readonly".into());
                }
                if let Some(aio) = aio.to_possible_value() {
                    child.arg(format!("--aio={}", aio.get_name()));
                }
            }
            ProcessKind::Rng => child.arg("--kind=rng".into()),
            ProcessKind::Mem { hotplug } => {
                child.arg("--kind=mem".into());
                child.fd("--hotplug-fd", hotplug.as_raw_fd());
            }
            ProcessKind::Net { tap, mac, offloads } => {
                child.arg("--kind=net".into());
                child.fd("--tap-fd", tap.as_raw_fd());
                child.arg(format!("--mac={}", crate::devices::net::format_mac(mac)));
                if *offloads {
                    child.arg("--offloads".into());
                }
            }
            ProcessKind::Console { output, input } => {
                child.arg("--kind=console".into());
                child.fd("--output-fd", output.as_raw_fd());
                if let Some(input) = input {
                    child.fd("--input-fd", input.as_raw_fd());
                }
            }
        }
        if let (Some(addr), ProcessKind::Block { .. }) = (self.probe, &self.kind) {
            child.arg(format!("--probe={addr:#x}"));
        }
        // The child's end of the memory channel stays open until it is spawned.
        let _memory_end = match memory {
            ProcessMemory::Rpc(device_end, staging) => {
                child.fd("--memory-fd", device_end.as_raw_fd());
                if let Some((answers, posts)) = staging {
                    child.fd("--staging-fd", answers);
                    child.fd("--posting-fd", posts);
                }
                Some(device_end)
            }
            ProcessMemory::Shared { memfd, regions } => {
                child.fd("--memfd", memfd);
                for region in regions {
                    child.arg(format!("--region={}:{}:{}", region.guest_addr, region.size, region.file_offset));
                }
                None
            }
        };
        let pid = child.spawn(self.health.clone())?;
        Ok((pid, control_vmm))
    }
}

/// `skvm device ...`: the command line of a device process.
struct DeviceCommand {
    command: Command,
    fds: Vec<RawFd>,
    name: String,
}

impl DeviceCommand {
    fn new(name: &str, misbehave: Option<Misbehaviour>) -> Self {
        let mut command = Command::new("/proc/self/exe");
        command.arg("device").arg("--name").arg(name);
        if let Some(m) = misbehave {
            use clap::ValueEnum;
            if let Some(value) = m.to_possible_value() {
                command.arg("--misbehave").arg(value.get_name());
            }
        }
        // Nothing of the user's environment reaches a device: it needs none.
        command.env_clear();
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        DeviceCommand { command, fds: Vec::new(), name: name.into() }
    }

    fn fd(&mut self, flag: &str, fd: RawFd) {
        self.command.arg(format!("{flag}={fd}"));
        self.fds.push(fd);
    }

    fn arg(&mut self, arg: String) {
        self.command.arg(arg);
    }

    /// Starts the process with exactly its descriptors inheritable, and a
    /// thread that marks the device failed when the process ends (unless a
    /// newer process has replaced it by then).
    fn spawn(mut self, health: Arc<DeviceHealth>) -> Result<u32> {
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
        let mut command = self.command;
        let mut child = on_spawner(move || command.spawn())
            .and_then(|spawned| spawned)
            .map_err(|e| Error::Host(format!("starting device process {}", self.name), e))?;
        let pid = child.id();
        health.set_current_process(pid);
        // SAFETY: pidfd_open on our own, not yet reaped, child.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd >= 0 {
            // SAFETY: a descriptor pidfd_open just gave us.
            health.add_process(pid, unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as RawFd) });
        }
        let name = self.name;
        if let Some(stderr) = child.stderr.take() {
            relay_log(&name, stderr)?;
        }
        std::thread::Builder::new()
            .name(format!("{name}-watch"))
            .spawn(move || {
                let reason = match child.wait() {
                    Ok(status) => describe_exit(status),
                    Err(e) => format!("cannot wait for it: {e}"),
                };
                health.process_reaped(pid);
                health.process_ended(&name, pid, format!("process {pid} {reason}"));
            })
            .map_err(|e| Error::Host("starting a device watcher".into(), e))?;
        Ok(pid)
    }
}

/// Runs `job` on the one thread that starts device processes, and waits for
/// it. A device process dies with the thread that started it
/// (`PR_SET_PDEATHSIG`), so that thread must live as long as skvm: not a
/// vCPU, a tokio blocking-pool worker (which exits after 10 s idle, as the
/// hotplug service's do) or a process watcher.
fn on_spawner<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    type Job = Box<dyn FnOnce() + Send>;
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> = std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        // If the thread cannot start, `queue` is dropped and every send fails.
        let _ =
            std::thread::Builder::new().name("spawner".into()).spawn(move || queue.into_iter().for_each(|job| job()));
        std::sync::Mutex::new(jobs)
    });
    let gone = || std::io::Error::other("the device spawner thread is gone");
    let (done, result) = std::sync::mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = done.send(job());
    });
    spawner.lock().unwrap_or_else(|e| e.into_inner()).send(job).map_err(|_| gone())?;
    result.recv().map_err(|_| gone())
}

/// Longest line of a device's stderr that reaches the VMM's.
const MAX_LOG_LINE: usize = 1000;

/// Passes a device's stderr on to skvm's, a line at a time, each marked
/// with the device's name and made printable: the device does not write to
/// skvm's stderr itself.
fn relay_log(name: &str, stderr: std::process::ChildStderr) -> Result<()> {
    use std::io::{BufRead, Read, Write};
    let prefix = name.to_string();
    std::thread::Builder::new()
        .name(format!("{name}-log"))
        .spawn(move || {
            let mut reader = std::io::BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                // A line longer than the cap is cut; the rest reads as the next lines.
                match reader.by_ref().take(4 * MAX_LOG_LINE as u64).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&line);
                let text = super::device_text::printable(text.trim_end_matches('\n'), MAX_LOG_LINE);
                let _ = std::io::stderr().write_all(format!("[{prefix}] {text}\n").as_bytes());
            }
        })
        .map_err(|e| Error::Host("starting a device log relay".into(), e))?;
    Ok(())
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
