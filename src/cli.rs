//! Command-line interface: flag parsing, validation and exit statuses.
use crate::devices::blk::Aio;
use crate::devices::process::{DeviceKind, DeviceProcess, MemoryChannel, Misbehaviour, SharedRegion};
use crate::test_guest;
use crate::vmm::{
    self, BootProtocol, DiskConfig, HotplugConfig, KernelSource, MemoryMode, NetConfig, SerialOutput, VmConfig,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::error::Error;
use std::path::PathBuf;

/// skvm failed before or while running the guest (configuration, host or KVM error).
pub const EXIT_SKVM_ERROR: u8 = 1;

const RUN_HELP: &str = "\
Examples:
  skvm run                                        boot the built-in test guest
  skvm run --cpus 2 --cmdline 'scenario=hello exit=3'
  skvm run --kernel vmlinux --initrd initrd.img --memory 1G --cmdline 'console=ttyS0'
  skvm run --kernel vmlinux --serial file:/tmp/console.log
  skvm export-test-guest --output guest.elf       the same guest, for other VMMs

Exit status of `skvm run`:
  N        the guest wrote N to the debug-exit port (0xf4)
  0        the guest powered off (ACPI S5), or `skvm ctl ... shutdown`
  1        skvm failed (bad configuration, missing file, KVM error)
  2        invalid command line
  3        the guest asked for a reset (i8042, ACPI reset register); skvm does not reboot
  4        the guest crashed: triple fault, KVM internal error or failed VM entry
  130/143  skvm was interrupted by SIGINT/SIGTERM
A one-line reason is always printed on stderr.";

const BENCH_HELP: &str = "\
Examples:
  skvm bench --quick --out /tmp/study          a smoke run: one run per cell
  skvm bench --out study --peer firecracker=/usr/local/bin/firecracker
  skvm bench --quick --peer firecracker=FC --peer cloud-hypervisor=CH \
             --peer vhost-user-blk=vhost_user_block
                                               beside vhost-user-blk under both VMMs
  skvm bench --render study/results.json --out study    redraw the report and plots
  skvm bench --net --peer firecracker=FC --out net     virtio-net: round trips and UDP
                                               throughput per mode and peer (root)

The report format is described in docs/study.md.";

#[derive(Parser, Debug)]
#[command(
    name = "skvm",
    version,
    about = "A KVM hypervisor built for isolation",
    long_about = "skvm runs x86-64 guests on KVM. Its design goal is isolation: every virtio \
                  device runs in its own sandboxed process that never maps guest memory, and by \
                  default reaches only the buffers the guest posted to it.\n\n\
                  Quick start: `skvm run` boots the built-in test guest and exits with its status.",
    after_help = RUN_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// How much skvm itself logs on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogLevel::Warn)]
    pub log_level: LogLevel,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest and run it until it exits.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Talk to a running skvm through its control API (`skvm run --api-socket PATH`).
    Ctl {
        /// The socket given to `skvm run --api-socket`.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// Print the API's JSON instead of a summary.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: crate::ctl::CtlCommand,
    },
    /// A device process; the VMM starts these itself.
    #[command(hide = true)]
    Device(DeviceArgs),
    /// Measure the guest-memory RPC service between two processes (no VM): latency and
    /// throughput from 64 B to 1 MiB, 1 and 32 requests in flight.
    BenchMemoryRpc {
        /// Fewer iterations, for a quick look.
        #[arg(long)]
        quick: bool,
    },
    /// The isolation-cost study: every memory mode (and QEMU, Firecracker or Cloud
    /// Hypervisor where they run) on the same test guest and workloads, written up as
    /// results.json, results.csv, report.md and SVG plots. `--quick` takes under two minutes.
    #[command(after_help = BENCH_HELP)]
    Bench(crate::bench::BenchArgs),
    /// The client half of bench-memory-rpc.
    #[command(hide = true)]
    BenchMemoryRpcClient {
        #[arg(long, value_parser = inherited_fd)]
        fd: i32,
        #[arg(long)]
        quick: bool,
    },
    /// Write the built-in test guest (a PVH ELF) to a file, e.g. to boot it under another VMM.
    ExportTestGuest {
        /// Where to write the ELF image.
        #[arg(long, value_name = "PATH")]
        output: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest kernel: a PVH ELF, a Linux bzImage or an uncompressed vmlinux; the format is
    /// detected from the file. Without it skvm boots its built-in test guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk, handed to the guest as a PVH module or through Linux boot_params.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line. Default: "console=ttyS0 reboot=k panic=1" for kernels,
    /// "scenario=hello" for the built-in test guest.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Guest RAM, with a K, M, G or T suffix (powers of 1024); a bare number means MiB.
    /// Must be a multiple of 4 KiB, at least 8M, and no more than the host's RAM.
    /// `hotplug=MAX` adds a virtio-mem device and a region of MAX bytes above RAM that
    /// `skvm ctl resize` plugs and unplugs at run time, in blocks of `block=SIZE`
    /// (a power of two from 2M to 128M, default 2M; MAX must be a multiple of it).
    #[arg(
        long,
        value_name = "SIZE[,hotplug=MAX[,block=SIZE]]",
        default_value = "512M",
        value_parser = parse_memory
    )]
    pub memory: MemoryArg,

    /// Number of vCPUs (1 to 254), one host thread each.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub cpus: u8,

    /// Where the guest's COM1 goes: `stdio` (guest input comes from stdin when it is a
    /// terminal), `file:PATH` (created or truncated), or `none`.
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialOutput,

    /// Boot protocol. `auto` uses PVH when the ELF has a PVH entry note, the Linux 64-bit
    /// boot protocol otherwise. `linux` forces the 64-bit protocol on a vmlinux with a PVH note.
    #[arg(long, value_enum, default_value_t = BootProtocol::Auto)]
    pub boot_protocol: BootProtocol,
    /// A virtio-blk disk backed by a regular host file:
    /// `path=FILE[,readonly=on][,direct=on[,aio=io_uring|threads]]`.
    /// Repeat for more disks (up to 8). Each runs as its own device, in the memory mode below,
    /// and is locked against other VMs while this one runs. `direct=on` bypasses the host's
    /// page cache (O_DIRECT; the file's filesystem must support it) and keeps up to the
    /// queue's size of transfers in flight, on an io_uring locked to that one file
    /// (`aio=io_uring`; the default, falling back to threads with a warning where the kernel
    /// refuses a ring) or on 32 I/O threads (`aio=threads`). Flushes still reach the disk
    /// with fdatasync.
    #[arg(long, value_name = "path=FILE[,readonly=on][,direct=on[,aio=...]]", value_parser = parse_disk)]
    pub disk: Vec<DiskConfig>,

    /// A virtio-net device on an existing host tap: `tap=NAME[,mac=MAC]`. Repeat for more
    /// (8 devices at most, of all kinds). skvm attaches to the tap (which must exist and not
    /// be in use) and hands the device process only that descriptor. Without `mac=`, the MAC
    /// is derived from the tap's name (stable, locally administered); `skvm ctl info` shows it.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub net: Vec<NetConfig>,

    /// A virtio-console device (the guest's hvc0), sandboxed like the others: `stdio` (its
    /// output on stdout; stdin, when a terminal, pipe or socket, is its input, and COM1 then
    /// reads none), `file:PATH` (output only; created or truncated) or `none`.
    #[arg(long, value_name = "stdio|file:PATH|none", value_parser = parse_serial)]
    pub console: Option<SerialOutput>,

    /// How devices reach guest memory. `rpc`: a sandboxed process that never maps guest RAM;
    /// the VMM walks its queue and hands it only the buffers the guest posted, by grant.
    /// `rpc-dma`: a sandboxed process that walks its own queue and asks the VMM to read or
    /// write guest addresses (any RAM). `shared`: a sandboxed process that maps a memfd of
    /// guest RAM. `inprocess`: a thread of the VMM.
    #[arg(long, value_enum, default_value_t = MemoryMode::Rpc, conflicts_with = "rpc_memory")]
    pub memory_mode: MemoryMode,

    /// Add a virtio-rng device, filled from the host's getrandom(2) in its own process.
    #[arg(long)]
    pub rng: bool,

    /// Serve the control API (HTTP/1.1 + JSON, see docs/api.yaml) on this unix socket;
    /// `skvm ctl --api-socket PATH` talks to it.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Same as `--memory-mode rpc`.
    #[arg(long)]
    pub rpc_memory: bool,

    /// When the VM stops, write its counters here as JSON: vCPU I/O exits, the vCPU
    /// threads' CPU time, the hotplug region, and per device its requests, errors, memory calls and RPCs, bytes, time
    /// waiting on memory and serving queues, a memory-latency histogram and, in `rpc` mode, the
    /// batches posted to it.
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,

    /// How long a device that walks its own ring with guest RAM mapped (`shared`,
    /// `inprocess`), or the VMM for a device in `rpc` mode, keeps watching the
    /// rings after the last request before sleeping, in microseconds. A driver
    /// that posts again within it saves a cross-CPU wake-up (vhost-user backends
    /// poll the same way); while it serves and watches, the driver is told not to notify
    /// (each notification is an exit). A window that finds nothing stops the
    /// watching until a notification comes within a window of sleeping, so a
    /// driver that posts only now and then costs no CPU; a disk with transfers
    /// in flight on its ring (`direct=on`) is watched through them, as the
    /// driver answers their ends at once. Network and console devices watch
    /// only their transmit queue, after the guest sends. 0 turns it off.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub device_poll_us: u32,

    /// Test-only: make the first device process misbehave once the guest starts I/O.
    #[arg(long, value_enum, hide = true)]
    pub test_device_misbehave: Option<Misbehaviour>,

    /// Test-only: block devices read this guest address through their memory channel at
    /// every notification and report on stderr whether the VMM let them.
    #[arg(long, value_name = "ADDR", hide = true, value_parser = parse_address)]
    pub test_device_probe: Option<u64>,
}

/// The parsed `--memory` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryArg {
    pub bytes: u64,
    pub hotplug: Option<HotplugConfig>,
}

#[derive(Args, Debug)]
pub struct DeviceArgs {
    #[arg(long)]
    name: String,
    #[arg(long, value_parser = inherited_fd)]
    control_fd: i32,
    /// The queue notifier of a device that walks its own ring (not `rpc`).
    #[arg(long, requires = "irq_fd", value_parser = inherited_fd)]
    notify_fd: Option<i32>,
    #[arg(long, requires = "notify_fd", value_parser = inherited_fd)]
    irq_fd: Option<i32>,
    #[arg(long, value_enum)]
    kind: DeviceKindArg,
    #[arg(long, required_if_eq("kind", "blk"), value_parser = inherited_fd)]
    disk_fd: Option<i32>,
    #[arg(long, conflicts_with = "memfd", value_parser = inherited_fd)]
    memory_fd: Option<i32>,
    /// `rpc`: the staging area for answers' bytes (rpc_schema::STAGING_BYTES).
    #[arg(long, requires = "memory_fd", requires = "posting_fd", value_parser = inherited_fd)]
    staging_fd: Option<i32>,
    /// `rpc`: the staging area for posted requests' bytes.
    #[arg(long, requires = "staging_fd", value_parser = inherited_fd)]
    posting_fd: Option<i32>,
    #[arg(long, requires = "region", value_parser = inherited_fd)]
    memfd: Option<i32>,
    /// GUEST_ADDR:SIZE:FILE_OFFSET of each piece of the memfd.
    #[arg(long, value_parser = parse_region)]
    region: Vec<SharedRegion>,
    #[arg(long)]
    readonly: bool,
    /// How a `direct=on` disk's transfers run (see `run --disk`).
    #[arg(long, value_enum, default_value_t = Aio::Auto)]
    aio: Aio,
    #[arg(long, value_enum)]
    misbehave: Option<Misbehaviour>,
    /// The virtio-mem device's channel to the VMM's hotplug service.
    #[arg(long, required_if_eq("kind", "mem"), value_parser = inherited_fd)]
    hotplug_fd: Option<i32>,
    #[arg(long, value_parser = parse_address)]
    probe: Option<u64>,
    /// Microseconds to watch a mapped ring after the last request (see `run --device-poll-us`).
    #[arg(long, default_value_t = 0)]
    poll_us: u32,
    /// A network device's tap, opened by the VMM.
    #[arg(long, required_if_eq("kind", "net"), value_parser = inherited_fd)]
    tap_fd: Option<i32>,
    /// A network device's MAC address.
    #[arg(long, required_if_eq("kind", "net"), value_parser = parse_mac_arg)]
    mac: Option<[u8; 6]>,
    /// The tap takes checksum and TSO offloads: offer them to the guest.
    #[arg(long)]
    offloads: bool,
    /// A console's output and input, opened by the VMM.
    #[arg(long, required_if_eq("kind", "console"), value_parser = inherited_fd)]
    output_fd: Option<i32>,
    #[arg(long, value_parser = inherited_fd)]
    input_fd: Option<i32>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum DeviceKindArg {
    Blk,
    Rng,
    Mem,
    Net,
    Console,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

pub fn init_logging(level: LogLevel) {
    use tracing_subscriber::filter::LevelFilter;
    let filter = match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    use std::io::IsTerminal;
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    // tarpc warns once per request when a device's channel breaks; skvm
    // reports the device's fate itself, once.
    let quiet_rpc = tracing_subscriber::filter::Targets::new()
        .with_default(filter)
        .with_target("tarpc", filter.min(LevelFilter::ERROR));
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    tracing_subscriber::registry().with(output.with_filter(quiet_rpc)).init();
}

pub fn dispatch(command: Command) -> Result<u8, Box<dyn Error>> {
    match command {
        Command::Run(args) => {
            let exit = vmm::run(args.into_config())?;
            eprintln!("skvm: {}", exit.describe());
            vmm::exit_now(exit.status())
        }
        Command::Device(args) => {
            let memory = match (args.memory_fd, args.memfd) {
                (Some(socket), None) => MemoryChannel::Rpc { socket, staging: args.staging_fd.zip(args.posting_fd) },
                (None, Some(memfd)) => MemoryChannel::Shared { memfd, regions: args.region },
                _ => return Err("a device needs exactly one of --memory-fd and --memfd".into()),
            };
            if args.notify_fd.is_none() && args.memfd.is_some() {
                return Err("a device that maps guest RAM walks its ring: it needs --notify-fd and --irq-fd".into());
            }
            let device = DeviceProcess {
                name: args.name.clone(),
                control: args.control_fd,
                memory,
                doorbell: args.notify_fd.zip(args.irq_fd),
                poll: std::time::Duration::from_micros(args.poll_us.into()),
                kind: match (args.kind, args.disk_fd) {
                    (DeviceKindArg::Blk, Some(disk)) => {
                        DeviceKind::Block { disk, readonly: args.readonly, aio: args.aio }
                    }
                    (DeviceKindArg::Blk, None) => return Err("a block device needs --disk-fd".into()),
                    (DeviceKindArg::Rng, _) => DeviceKind::Rng,
                    (DeviceKindArg::Mem, _) => match args.hotplug_fd {
                        Some(hotplug) => DeviceKind::Mem { hotplug },
                        None => return Err("a virtio-mem device needs --hotplug-fd".into()),
                    },
                    (DeviceKindArg::Net, _) => match (args.tap_fd, args.mac) {
                        (Some(tap), Some(mac)) => DeviceKind::Net { tap, mac, offloads: args.offloads },
                        _ => return Err("a virtio-net device needs --tap-fd and --mac".into()),
                    },
                    (DeviceKindArg::Console, _) => match args.output_fd {
                        Some(output) => DeviceKind::Console { output, input: args.input_fd },
                        None => return Err("a virtio-console device needs --output-fd".into()),
                    },
                },
                misbehave: args.misbehave,
                probe: args.probe,
            };
            device.run().map_err(|e| format!("device {}: {e}", args.name))?;
            Ok(0)
        }
        Command::Ctl { api_socket, json, command } => Ok(crate::ctl::run(&api_socket, command, json)?),
        Command::BenchMemoryRpc { quick } => Ok(crate::rpc_bench::run(quick)?),
        Command::Bench(args) => Ok(crate::bench::run(args)?),
        Command::BenchMemoryRpcClient { fd, quick } => Ok(crate::rpc_bench::client(fd, quick)?),
        Command::ExportTestGuest { output } => {
            std::fs::write(&output, test_guest::IMAGE)
                .map_err(|e| format!("cannot write {}: {e}", output.display()))?;
            Ok(0)
        }
    }
}

impl RunArgs {
    fn into_config(self) -> VmConfig {
        let (kernel, default_cmdline) = match self.kernel {
            Some(path) => (KernelSource::File(path), "console=ttyS0 reboot=k panic=1"),
            None => (KernelSource::Embedded(test_guest::IMAGE), test_guest::DEFAULT_CMDLINE),
        };
        VmConfig {
            kernel,
            initrd: self.initrd,
            cmdline: self.cmdline.unwrap_or_else(|| default_cmdline.to_string()),
            memory_bytes: self.memory.bytes,
            hotplug: self.memory.hotplug,
            vcpus: self.cpus,
            serial: self.serial,
            boot_protocol: self.boot_protocol,
            disks: self.disk,
            nets: self.net,
            console: self.console.filter(|c| *c != SerialOutput::None),
            rng: self.rng,
            api_socket: self.api_socket,
            stats_file: self.stats_file,
            memory_mode: if self.rpc_memory { MemoryMode::Rpc } else { self.memory_mode },
            device_poll_us: self.device_poll_us,
            test_misbehaviour: self.test_device_misbehave,
            test_probe: self.test_device_probe,
        }
    }
}

/// Joins an error with its sources into one line.
pub fn error_chain(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

const PAGE_SIZE: u64 = 4096;
/// A descriptor number this process inherited and holds open: the internal
/// sub-commands take ownership of theirs, which must never be a bad number.
fn inherited_fd(text: &str) -> Result<i32, String> {
    let fd: i32 = text.parse().map_err(|_| format!("`{text}` is not a descriptor number"))?;
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("descriptor {fd} is not open"));
    }
    Ok(fd)
}

const MIN_MEMORY: u64 = 8 << 20;

fn parse_memory_size(text: &str) -> Result<u64, String> {
    parse_size(text, MIN_MEMORY)
}

/// A size with a K, M, G or T suffix (a bare number means MiB), at least
/// `min` bytes, in whole pages.
fn parse_size(text: &str, min: u64) -> Result<u64, String> {
    let bytes = crate::size::parse(text, crate::size::BareUnit::Mebibytes)?;
    if bytes < min {
        return Err(format!("`{text}` is too small; the guest needs at least {}M", min >> 20));
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(format!("`{text}` is not a multiple of the 4 KiB page size"));
    }
    Ok(bytes)
}

const MIN_BLOCK: u64 = 2 << 20;
const MAX_BLOCK: u64 = 128 << 20;
const DEFAULT_BLOCK: u64 = 2 << 20;

/// `SIZE[,hotplug=MAX[,block=SIZE]]`.
fn parse_memory(text: &str) -> Result<MemoryArg, String> {
    let mut parts = text.split(',');
    let bytes = parse_memory_size(parts.next().unwrap_or_default())?;
    let (mut hotplug, mut block) = (None, None);
    for part in parts {
        match part.split_once('=') {
            Some(("hotplug", size)) => hotplug = Some(parse_size(size, 0)?),
            Some(("block", size)) => block = Some(parse_size(size, 0)?),
            _ => return Err(format!("`{part}` is not hotplug=SIZE or block=SIZE")),
        }
    }
    let hotplug = match (hotplug, block) {
        (None, None) => None,
        (None, Some(_)) => return Err("block= needs hotplug=SIZE".into()),
        (Some(0), _) => return Err("hotplug=0 makes no hotplug region; leave it out".into()),
        (Some(size), block) => {
            let block = block.unwrap_or(DEFAULT_BLOCK);
            if !block.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block) {
                return Err(format!("block={} MiB must be a power of two from 2M to 128M", block >> 20));
            }
            if size % block != 0 {
                return Err(format!("hotplug={} MiB is not a multiple of the {} MiB block", size >> 20, block >> 20));
            }
            if size / block > vmm::MAX_HOTPLUG_BLOCKS {
                return Err(format!(
                    "hotplug={} MiB is more than {} blocks of {} MiB; use a larger block=",
                    size >> 20,
                    vmm::MAX_HOTPLUG_BLOCKS,
                    block >> 20
                ));
            }
            Some(HotplugConfig { size, block })
        }
    };
    Ok(MemoryArg { bytes, hotplug })
}

/// A guest-physical address, in hex (0x...) or decimal.
fn parse_address(text: &str) -> Result<u64, String> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|_| format!("`{text}` is not an address"))
}

fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let (mut readonly, mut direct, mut aio) = (false, false, None);
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
            Some(("readonly", "on" | "true")) => readonly = true,
            Some(("readonly", "off" | "false")) => readonly = false,
            Some(("direct", "on" | "true")) => direct = true,
            Some(("direct", "off" | "false")) => direct = false,
            Some(("aio", "io_uring")) => aio = Some(Aio::IoUring),
            Some(("aio", "threads")) => aio = Some(Aio::Threads),
            _ => {
                return Err(format!(
                    "`{part}` is not path=FILE, readonly=on|off, direct=on|off or aio=io_uring|threads"
                ))
            }
        }
    }
    let path = path.ok_or("a disk needs path=FILE")?;
    if aio.is_some() && !direct {
        return Err("aio= chooses how direct=on transfers run: give direct=on with it".into());
    }
    Ok(DiskConfig { path, readonly, direct, aio: aio.unwrap_or_default() })
}

fn parse_net(text: &str) -> Result<NetConfig, String> {
    let (mut tap, mut mac) = (None, None);
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() && name.len() < libc::IFNAMSIZ && !name.contains('/') => {
                tap = Some(name.to_string())
            }
            Some(("tap", name)) => return Err(format!("`{name}` is not an interface name (1 to 15 characters)")),
            Some(("mac", text)) => {
                let parsed = crate::devices::net::parse_mac(text)
                    .ok_or_else(|| format!("`{text}` is not a MAC address (xx:xx:xx:xx:xx:xx)"))?;
                if parsed[0] & 1 != 0 {
                    return Err(format!("`{text}` is a multicast address; a NIC needs a unicast one"));
                }
                mac = Some(parsed);
            }
            _ => return Err(format!("`{part}` is not tap=NAME or mac=MAC")),
        }
    }
    let tap = tap.ok_or("a network device needs tap=NAME")?;
    let mac = mac.unwrap_or_else(|| crate::devices::net::default_mac(&tap));
    Ok(NetConfig { tap, mac })
}

fn parse_region(text: &str) -> Result<SharedRegion, String> {
    let parts: Vec<u64> =
        text.split(':').map(|p| p.parse::<u64>()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    match parts[..] {
        [guest_addr, size, file_offset] => Ok(SharedRegion { guest_addr, size, file_offset }),
        _ => Err(format!("`{text}` is not GUEST_ADDR:SIZE:FILE_OFFSET")),
    }
}

fn parse_serial(text: &str) -> Result<SerialOutput, String> {
    match text {
        "stdio" => Ok(SerialOutput::Stdio),
        "none" => Ok(SerialOutput::None),
        _ => match text.strip_prefix("file:") {
            Some("") => Err("`file:` needs a path, e.g. file:/tmp/console.log".into()),
            Some(path) => Ok(SerialOutput::File(PathBuf::from(path))),
            None => Err(format!("`{text}` is not one of stdio, file:PATH, none")),
        },
    }
}

fn parse_mac_arg(text: &str) -> Result<[u8; 6], String> {
    crate::devices::net::parse_mac(text).ok_or_else(|| format!("{text:?} is not a MAC address (xx:xx:xx:xx:xx:xx)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_with_hotplug() {
        let plain = parse_memory("512M").unwrap();
        assert_eq!(plain, MemoryArg { bytes: 512 << 20, hotplug: None });
        let hot = parse_memory("512M,hotplug=1G").unwrap();
        assert_eq!(hot.hotplug, Some(HotplugConfig { size: 1 << 30, block: 2 << 20 }));
        let big = parse_memory("1G,hotplug=1G,block=128M").unwrap();
        assert_eq!(big.hotplug, Some(HotplugConfig { size: 1 << 30, block: 128 << 20 }));
        for bad in
            ["512M,hotplug=1G,block=3M", "512M,hotplug=130M,block=4M", "512M,block=2M", "512M,hot=1G", "512M,hotplug=x"]
        {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("512M"), Ok(512 << 20));
        assert_eq!(parse_memory_size("512"), Ok(512 << 20));
        assert_eq!(parse_memory_size("2G"), Ok(2 << 30));
        assert_eq!(parse_memory_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_memory_size("16384k"), Ok(16 << 20));
        assert!(parse_memory_size("0").is_err());
        assert!(parse_memory_size("1K").is_err());
        assert!(parse_memory_size("12345679K").is_err());
        assert!(parse_memory_size("99999999999999T").is_err());
        assert!(parse_memory_size("lots").is_err());
        assert!(parse_memory_size("5X").is_err());
    }

    #[test]
    fn disk_specs() {
        let disk = parse_disk("path=/tmp/d.img,readonly=on").unwrap();
        assert_eq!(disk, DiskConfig { path: "/tmp/d.img".into(), readonly: true, direct: false, aio: Aio::Auto });
        assert!(parse_disk("path=/tmp/d.img,direct=on").unwrap().direct);
        assert!(parse_disk("path=/tmp/d.img,direct=maybe").is_err());
        assert_eq!(parse_disk("path=/tmp/d.img,direct=on,aio=threads").unwrap().aio, Aio::Threads);
        assert_eq!(parse_disk("path=/tmp/d.img,aio=io_uring,direct=on").unwrap().aio, Aio::IoUring);
        assert!(parse_disk("path=/tmp/d.img,aio=threads").unwrap_err().contains("direct=on"));
        assert!(parse_disk("path=/tmp/d.img,direct=on,aio=native").is_err());
        assert!(!parse_disk("path=/tmp/d.img").unwrap().readonly);
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=").is_err());
        assert!(parse_disk("file=/x").is_err());
    }

    #[test]
    fn serial_specs() {
        assert!(matches!(parse_serial("stdio"), Ok(SerialOutput::Stdio)));
        assert!(matches!(parse_serial("none"), Ok(SerialOutput::None)));
        assert!(
            matches!(parse_serial("file:/tmp/x"), Ok(SerialOutput::File(p)) if p == std::path::Path::new("/tmp/x"))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }
}
