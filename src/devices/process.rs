//! The device process: `skvm device ...`, started by the VMM re-executing
//! its own binary. It keeps only the descriptors it was given, confines
//! itself, then serves one device until the VMM closes the control channel.
use super::blk::Aio;
use super::blk::BlockDevice;
use super::mem::MemDevice;
use super::memory::{MappedMemory, RpcMemory};
use super::rng::RngDevice;
use super::runner::{serve, Doorbell, Hook, OnNotify, TestHooks};
use super::staging::StagingArea;
use super::Backend;
use crate::sandbox;
use rpc_schema::{GuestMemoryClient, Segment, PROTOCOL_VERSION};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How the process reaches guest memory.
#[derive(Debug, Clone)]
pub enum MemoryChannel {
    /// A socket to the VMM's memory service: by grant when the VMM posts
    /// requests (`rpc`), by address when the device walks its ring (`rpc-dma`).
    Rpc { socket: RawFd, staging: Option<(RawFd, RawFd)> },
    /// A memfd of guest RAM and where each piece of it sits in the guest.
    Shared { memfd: RawFd, regions: Vec<SharedRegion> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Test-only misbehaviour, to prove the VMM survives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Misbehaviour {
    /// Make a system call outside the allowlist once confined.
    ForbiddenSyscall,
    /// The same, at the 100th batch (or notification) it serves: a crash mid-I/O.
    ForbiddenSyscallMidIo,
    /// Send refused requests, then garbage bytes, on the memory channel.
    HostileRpc,
    /// Write the test guest's canary by guest address: `rpc` refuses (at the
    /// second batch), `rpc-dma` lets it through (at the first notification).
    AddressWrite,
    /// Read through a grant never issued.
    GrantUnknown,
    /// Read through a grant already completed.
    GrantCompleted,
    /// Read a buffer index past the chain.
    GrantBufferIndex,
    /// Read at an offset past the buffer's end.
    GrantOffset,
    /// Read with an offset+length that overflows.
    GrantOverflow,
    /// Write into a driver-readable buffer.
    GrantWriteReadable,
    /// Read a device-writable buffer.
    GrantReadWritable,
    /// Complete with an inline write longer than its buffer.
    GrantOversized,
    /// Complete a request it never got.
    GrantForeign,
    /// Complete a request twice.
    GrantDuplicate,
    /// Send a flood of calls through an unknown grant.
    GrantFlood,
    /// Answer with staged bytes that run past the end of the staging area.
    StagedOutside,
    /// Answer with staged bytes in a staging slot that does not exist.
    StagedSlot,
    /// Answer naming one slot with staged bytes in another.
    StagedElsewhere,
    /// Answer with one staged write repeated past a slot's worth of bytes.
    StagedRepeated,
    /// Complete a held request with staged bytes in a slot that does not exist.
    StagedHeld,
    /// Stay alive when the VMM closes the control channel (its request to exit).
    Linger,
    /// Write its disk past the disk's size, then try to grow it with fallocate.
    DiskAbuse,
    /// virtio-mem, request level: replay the guest's first plug and unplug
    /// thousands of times with 2 ms deadlines.
    HotplugFlood,
    /// Take 8 s to answer `activate`, keeping the driver's vCPU in its MMIO write.
    SlowActivation,
    /// `rpc-dma`: from its start, keep 64 reads of 1 MiB of guest RAM in
    /// flight, forever (a fair-share test for the VMM's memory service).
    MemoryFlood,
}

#[derive(Debug, Clone)]
pub struct DeviceProcess {
    pub name: String,
    pub control: RawFd,
    pub memory: MemoryChannel,
    /// The queue notifier and interrupt of a device that walks its own
    /// ring; None for a request-level device (the VMM owns both).
    pub doorbell: Option<(RawFd, RawFd)>,
    /// How long to watch a mapped ring after the last request.
    pub poll: std::time::Duration,
    pub kind: DeviceKind,
    pub misbehave: Option<Misbehaviour>,
    /// Test-only: read this address at every notification and report the outcome.
    pub probe: Option<u64>,
}

/// Which device the process runs, with what it needs for it.
#[derive(Debug, Clone, Copy)]
pub enum DeviceKind {
    Block {
        disk: RawFd,
        readonly: bool,
        /// How transfers run, if the disk is `direct=on`.
        aio: Aio,
    },
    Rng,
    /// virtio-mem, with its channel to the VMM's hotplug service.
    Mem {
        hotplug: RawFd,
    },
    /// virtio-net, with the tap the VMM opened.
    Net {
        tap: RawFd,
        mac: [u8; 6],
        offloads: bool,
    },
    /// virtio-console, with the output and input the VMM opened.
    Console {
        output: RawFd,
        input: Option<RawFd>,
    },
}

/// The channel on a socket descriptor the VMM handed over.
fn channel<Item, SinkItem>(fd: RawFd) -> std::io::Result<rpc_schema::Transport<Item, SinkItem>>
where
    Item: for<'de> serde::Deserialize<'de>,
    SinkItem: serde::Serialize,
{
    // SAFETY: the VMM handed us this descriptor to own.
    rpc_schema::transport(unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) })
}

/// Maps exactly `regions` of the RAM memfd, then closes the memfd: a device
/// keeps no descriptor through which it could reach the rest of it (the
/// unplugged part of the hotplug reservation).
fn map_shared(memfd: RawFd, regions: &[SharedRegion]) -> Result<GuestMemoryMmap, String> {
    // SAFETY: the VMM handed us this memfd to own; it is closed when `file` drops.
    let file = unsafe { File::from_raw_fd(memfd) };
    let (prot, flags) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_NORESERVE);
    let mapped = regions
        .iter()
        .map(|r| {
            // SAFETY: a new shared mapping of our memfd, which nothing else in this process uses.
            let addr = unsafe {
                libc::mmap(std::ptr::null_mut(), r.size as usize, prot, flags, file.as_raw_fd(), r.file_offset as i64)
            };
            if addr == libc::MAP_FAILED {
                return Err(format!("cannot map guest RAM: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: `addr` is the mapping of `size` bytes just made, kept for the process's life.
            let region = unsafe { vm_memory::MmapRegion::build_raw(addr as *mut u8, r.size as usize, prot, flags) };
            let region = region.map_err(|e| format!("cannot map guest RAM: {e}"))?;
            vm_memory::GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| "a guest RAM region overflows the address space".to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    drop(file);
    GuestMemoryMmap::from_regions(mapped).map_err(|e| format!("cannot map guest RAM: {e}"))
}

/// The test-only misbehaviour, to run when the guest first notifies the queue.
fn misbehaviour(
    which: Option<Misbehaviour>,
    client: Option<&GuestMemoryClient>,
    raw_memory_socket: RawFd,
    disk: RawFd,
) -> Option<OnNotify> {
    let forbidden = || -> Hook {
        Box::pin(async {
            // SAFETY: a harmless system call that the filter does not allow.
            unsafe { libc::syscall(libc::SYS_getppid) };
        })
    };
    let mut hook: Option<Hook> = match which? {
        Misbehaviour::ForbiddenSyscall => Some(forbidden()),
        Misbehaviour::ForbiddenSyscallMidIo => {
            let mut served = 0u32;
            return Some(Box::new(move || {
                served += 1;
                (served == 100).then(forbidden)
            }));
        }
        Misbehaviour::HostileRpc => {
            let client = client?.clone();
            Some(Box::pin(async move { super::hostile::probe(&client, raw_memory_socket).await }))
        }
        Misbehaviour::DiskAbuse => Some(Box::pin(async move { super::hostile::abuse_disk(disk) })),
        Misbehaviour::AddressWrite => {
            let client = client?.clone();
            Some(Box::pin(async move { super::hostile::smash_canary(&client).await }))
        }
        // Request-level attacks act on posted batches instead.
        _ => None,
    };
    Some(Box::new(move || hook.take()))
}

/// Test-only: at every notification, read `addr` through the memory channel
/// and say on stderr when the answer changes (`ok` or `refused: why`).
fn memory_probe(name: String, client: GuestMemoryClient, addr: u64) -> OnNotify {
    let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    Box::new(move || {
        let (client, last, name) = (client.clone(), last.clone(), name.clone());
        Some(Box::pin(async move {
            let reply = client.read(tarpc::context::current(), vec![Segment { addr, len: 8 }]).await;
            let outcome = match reply {
                Ok(Ok(_)) => "ok".to_string(),
                Ok(Err(refused)) => format!("refused: {refused}"),
                Err(e) => format!("channel error: {e}"),
            };
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if *last != outcome {
                eprintln!("skvm-test-probe {name} {addr:#x}: {outcome}");
                *last = outcome;
            }
        }))
    })
}

/// The size of the file behind `fd` (the disk), which it may not outgrow.
fn file_size(fd: RawFd) -> Result<u64, String> {
    // SAFETY: fstat into a zeroed stat buffer of ours, on a descriptor we hold.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(format!("disk: {}", std::io::Error::last_os_error()));
    }
    Ok(stat.st_size as u64)
}

/// Shows up as `skvm-blk0` (not `exe`) in ps, top and /proc/PID/comm.
fn name_process(device: &str) {
    let name = format!("skvm-{device}");
    if let Ok(name) = std::ffi::CString::new(&name.as_bytes()[..name.len().min(15)]) {
        // SAFETY: PR_SET_NAME copies at most 16 bytes from a NUL-terminated string.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
}

impl DeviceProcess {
    fn slow_activation(&self) -> Option<std::time::Duration> {
        (self.misbehave == Some(Misbehaviour::SlowActivation)).then(|| std::time::Duration::from_secs(8))
    }

    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![0, 1, 2, self.control];
        match self.memory {
            MemoryChannel::Rpc { socket, staging } => {
                fds.push(socket);
                fds.extend(staging.iter().flat_map(|&(answers, posts)| [answers, posts]));
            }
            MemoryChannel::Shared { memfd, .. } => fds.push(memfd),
        }
        fds.extend(self.doorbell.iter().flat_map(|&(notify, irq)| [notify, irq]));
        match self.kind {
            DeviceKind::Block { disk, .. } => fds.push(disk),
            DeviceKind::Mem { hotplug } => fds.push(hotplug),
            DeviceKind::Net { tap, .. } => fds.push(tap),
            DeviceKind::Console { output, input } => fds.extend(std::iter::once(output).chain(input)),
            DeviceKind::Rng => {}
        }
        fds.sort_unstable();
        fds.dedup();
        fds
    }

    /// Runs the device; returns when the VMM is done with it.
    pub fn run(self) -> Result<(), String> {
        name_process(&self.name);
        if let DeviceKind::Net { .. } = self.kind {
            // Before confinement, which forbids it (see `scheduling`).
            crate::scheduling::batch_this_thread(&format!("device {}", self.name));
        }
        let fds = self.fds();
        sandbox::close_other_fds(&fds).map_err(|e| e.to_string())?;
        // Mapping guest RAM (shared mode) needs mmap of a new file, which the
        // sandbox forbids: it happens first, and touches no guest data.
        let shared = match &self.memory {
            MemoryChannel::Shared { memfd, regions } => Some(map_shared(*memfd, regions)?),
            MemoryChannel::Rpc { .. } => None,
        };
        // So is mapping the staging areas, which hold nothing yet.
        let staging = match self.memory {
            MemoryChannel::Rpc { staging: Some((answers, posts)), .. } => Some(StagingArea::map(answers, posts)?),
            _ => None,
        };
        let (filter, max_file_size) = match self.kind {
            DeviceKind::Block { disk, .. } => (sandbox::DeviceFilter::Block { io_uring: false }, file_size(disk)?),
            // A console's output may be a file, which grows as the guest writes
            // (as the serial console's does); no other file is open to grow.
            DeviceKind::Console { .. } => (sandbox::DeviceFilter::NoDisk, libc::RLIM_INFINITY),
            DeviceKind::Net { .. } => (sandbox::DeviceFilter::Tap, 0),
            DeviceKind::Rng | DeviceKind::Mem { .. } => (sandbox::DeviceFilter::NoDisk, 0),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the event loop: {e}"))?;
        runtime.block_on(async move {
            let control = channel(self.control).map_err(|e| format!("control socket: {e}"))?;
            let memory_socket = match self.memory {
                MemoryChannel::Rpc { socket, .. } => Some(channel(socket).map_err(|e| format!("memory socket: {e}"))?),
                MemoryChannel::Shared { .. } => None,
            };
            let doorbell = match self.doorbell {
                // SAFETY: descriptors handed over by the VMM, owned from here on.
                Some((notify, irq)) => unsafe {
                    Doorbell::Ring {
                        notify: EventFd::from_raw_fd(notify),
                        irq: EventFd::from_raw_fd(irq),
                        poll: self.poll,
                    }
                },
                None => Doorbell::Requests { staging },
            };
            let mut backend = match self.kind {
                DeviceKind::Block { disk, readonly, .. } => {
                    // SAFETY: as above.
                    let disk = unsafe { File::from_raw_fd(disk) };
                    Backend::Block(BlockDevice::new(disk, readonly, &self.name).map_err(|e| format!("disk: {e}"))?)
                }
                DeviceKind::Rng => Backend::Rng(RngDevice),
                DeviceKind::Mem { hotplug } => {
                    // SAFETY: the VMM handed us this descriptor to own.
                    let socket = unsafe { std::os::unix::net::UnixStream::from_raw_fd(hotplug) };
                    Backend::Mem(MemDevice::connect(socket).await?)
                }
                DeviceKind::Net { tap, mac, offloads } => {
                    // SAFETY: the VMM handed us this descriptor to own.
                    let tap = unsafe { File::from_raw_fd(tap) };
                    Backend::Net(super::net::NetDevice::new(tap, mac, offloads).map_err(|e| format!("tap: {e}"))?)
                }
                DeviceKind::Console { output, input } => {
                    // SAFETY: descriptors the VMM handed us to own.
                    let (output, input) = unsafe { (File::from_raw_fd(output), input.map(|fd| File::from_raw_fd(fd))) };
                    Backend::Console(
                        super::console::ConsoleDevice::new(output, input).map_err(|e| format!("console: {e}"))?,
                    )
                }
            };
            let hotplug = match &backend {
                Backend::Mem(device) => Some(device.hotplug_client()),
                _ => None,
            };
            let disk_fd = match self.kind {
                DeviceKind::Block { disk, .. } => disk,
                _ => -1,
            };
            let raw_memory_socket = match (self.misbehave, &self.memory) {
                // SAFETY: duplicating a descriptor we own, for the hostile test path.
                (Some(Misbehaviour::HostileRpc), MemoryChannel::Rpc { socket, .. }) => unsafe { libc::dup(*socket) },
                _ => -1,
            };
            let highest_fd = *fds.last().unwrap() as u64 + 8;
            let aio = match self.kind {
                DeviceKind::Block { aio, .. } => aio,
                _ => Aio::Auto,
            };
            let (name, needs_io) = (self.name.clone(), backend.needs_io_threads());
            let filter = std::cell::Cell::new(filter);
            // A disk's io_uring (made here, before the filter) adds io_uring_enter to it.
            let mut start_io = || {
                let ring = backend.start_io(aio, &name, true)?;
                filter.set(sandbox::DeviceFilter::Block { io_uring: ring });
                Ok(())
            };
            let threads = needs_io.then_some(&mut start_io as &mut dyn FnMut() -> _);
            sandbox::confine(&|| sandbox::device_filter(filter.get()), highest_fd, max_file_size, threads)
                .map_err(|e| format!("sandbox: {e}"))?;
            let served = match (memory_socket, shared) {
                (Some(socket), _) => {
                    let client = GuestMemoryClient::new(Default::default(), socket).spawn();
                    // The hostile test device opens the session itself, after
                    // showing that requests before hello are refused.
                    if self.misbehave != Some(Misbehaviour::HostileRpc) {
                        let hello = client.hello(tarpc::context::current(), PROTOCOL_VERSION, self.name.clone()).await;
                        hello.map_err(|e| format!("memory hello: {e}"))?.map_err(|e| format!("memory hello: {e}"))?;
                    }
                    let on_notify = match self.probe {
                        Some(addr) => Some(memory_probe(self.name.clone(), client.clone(), addr)),
                        None => misbehaviour(self.misbehave, Some(&client), raw_memory_socket, disk_fd),
                    };
                    let tamper = self.misbehave.and_then(|m| super::hostile::grant_attack(m, &client, hotplug.clone()));
                    if self.misbehave == Some(Misbehaviour::MemoryFlood) {
                        tokio::spawn(super::hostile::flood_memory(client.clone()));
                    }
                    let tamper_answer = self.misbehave.and_then(super::hostile::staging_attack);
                    let hooks = TestHooks { on_notify, tamper, tamper_answer, slow_activation: self.slow_activation() };
                    serve(RpcMemory::new(client), backend, control, doorbell, hooks).await
                }
                (None, Some(mapped)) => {
                    let hooks = TestHooks {
                        on_notify: misbehaviour(self.misbehave, None, -1, disk_fd),
                        tamper: None,
                        tamper_answer: None,
                        slow_activation: self.slow_activation(),
                    };
                    serve(MappedMemory::new(GuestMemoryAtomic::new(mapped)), backend, control, doorbell, hooks).await
                }
                (None, None) => Err("no guest memory channel".into()),
            };
            if served.is_ok() && self.misbehave == Some(Misbehaviour::Linger) {
                // Test-only: ignore the VMM's request to exit (its closed channel).
                std::future::pending::<()>().await;
            }
            served
        })
    }
}
