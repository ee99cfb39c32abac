//! What to run: the validated settings `skvm run` hands to the VMM.
use std::path::PathBuf;

#[derive(Debug)]
pub struct VmConfig {
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_bytes: u64,
    /// A hotplug region for virtio-mem, if any.
    pub hotplug: Option<HotplugConfig>,
    pub vcpus: u8,
    pub serial: SerialOutput,
    pub boot_protocol: BootProtocol,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// A virtio-console device (the guest's hvc0) and where it goes.
    pub console: Option<SerialOutput>,
    pub rng: bool,
    pub memory_mode: MemoryMode,
    /// Where to serve the control API, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Where to write the run's counters as JSON when the VM stops.
    pub stats_file: Option<PathBuf>,
    /// How long ring-walking devices with guest RAM mapped poll their rings
    /// after the last request, in µs (0: never).
    pub device_poll_us: u32,
    /// Test-only: make every device process misbehave this way.
    pub test_misbehaviour: Option<crate::devices::process::Misbehaviour>,
    /// Test-only: block devices read this guest address through their memory
    /// channel at every notification and report on stderr whether they could.
    pub test_probe: Option<u64>,
}

/// `--memory SIZE,hotplug=MAX[,block=SIZE]`: guest RAM that virtio-mem can
/// grow by up to `size` bytes, in blocks of `block` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugConfig {
    pub size: u64,
    pub block: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// How `direct` transfers run: io_uring or a thread pool.
    pub aio: crate::devices::blk::Aio,
}

/// `--net tap=NAME[,mac=MAC]`: a virtio-net device on an existing host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

/// How device code reaches guest memory.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryMode {
    /// A sandboxed process that serves requests the VMM posts: it reaches
    /// only the buffers the guest gave it, by grant.
    Rpc,
    /// A sandboxed process that walks its own ring and asks the VMM to read
    /// and write guest-physical ranges.
    RpcDma,
    /// A sandboxed process that maps a memfd of guest RAM.
    Shared,
    /// A thread of the VMM.
    Inprocess,
}

#[derive(Debug)]
pub enum KernelSource {
    File(PathBuf),
    /// An image compiled into skvm (the test guest).
    Embedded(&'static [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    Stdio,
    File(PathBuf),
    None,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    Auto,
    Pvh,
    Linux,
}
