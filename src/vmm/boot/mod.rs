//! Loading a guest: kernel, initrd, command line, platform tables, and the
//! register state the boot protocol asks for.
mod acpi;
mod cpu_state;
mod kernel;
mod linux;
mod pvh;

pub use cpu_state::BootEntry;

use super::config::{KernelSource, VmConfig};
use super::host_files;
use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, MMIO_HOLE_START};
use super::memory::{memory_map, GuestMemory, GuestRam};
use super::virtio::MmioSlot;
use super::{Error, Result};
use kernel::EntryPoint;
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress};

const PAGE_SIZE: u64 = 4096;

/// Where the initrd went.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Everything the boot-protocol writers need to describe to the guest.
pub struct BootInfo {
    pub memory_bytes: u64,
    pub cmdline_size: usize,
    pub initrd: Option<InitrdPlacement>,
    pub rsdp: u64,
}

/// The files a guest boots from, read (and the kernel's format and the
/// command line checked) before any KVM work, so that bad input fails fast.
pub struct BootImages {
    kernel_name: String,
    kernel: Vec<u8>,
    initrd: Option<(String, Vec<u8>)>,
}

impl BootImages {
    pub fn read(config: &VmConfig) -> Result<Self> {
        check_cmdline(&config.cmdline)?;
        let (kernel_name, kernel) = read_kernel(&config.kernel)?;
        kernel::detect(&kernel).map_err(|reason| Error::BadImage {
            what: "kernel",
            path: kernel_name.clone(),
            reason,
        })?;
        let initrd = match &config.initrd {
            Some(path) => {
                let bytes = host_files::read_image("initrd", path, config.memory_bytes)?;
                Some((path.display().to_string(), bytes))
            }
            None => None,
        };
        Ok(BootImages { kernel_name, kernel, initrd })
    }
}

/// Loads the guest; `devices` are the virtio-mmio slots to describe to it.
pub fn load(ram: &GuestRam, config: &VmConfig, images: BootImages, devices: &[MmioSlot]) -> Result<BootEntry> {
    let mem = ram.memory();
    let kernel = kernel::load(&mem, &images.kernel_name, &images.kernel, config.boot_protocol)?;
    let initrd = match &images.initrd {
        Some((name, bytes)) => Some(load_initrd(&mem, name, bytes, kernel.end, ram.size(), kernel.initrd_max())?),
        None => None,
    };
    let cmdline_size = write_cmdline(&mem, &with_devices(&config.cmdline, devices, config.hotplug.is_some())?)?;
    let rsdp = acpi::write_tables(&mem, config.vcpus, devices)?;
    let info = BootInfo { memory_bytes: ram.size(), cmdline_size, initrd, rsdp };

    match kernel.entry {
        EntryPoint::Pvh(entry) => {
            pvh::write_start_info(&mem, &info)?;
            let entry = BootEntry::pvh(entry);
            entry.write_gdt(&mem)?;
            Ok(entry)
        }
        EntryPoint::Linux64 { entry, setup_header } => {
            linux::write_boot_params(&mem, &info, setup_header)?;
            cpu_state::write_linux64_tables(&mem)?;
            let entry = BootEntry::linux64(entry);
            entry.write_gdt(&mem)?;
            Ok(entry)
        }
    }
}

/// Largest kernel file read. An ELF vmlinux may carry far more than it
/// loads (debug sections), so this is not the guest's RAM size.
const MAX_KERNEL_FILE: u64 = 2 << 30;

fn read_kernel(source: &KernelSource) -> Result<(String, Vec<u8>)> {
    match source {
        KernelSource::Embedded(image) => Ok(("built-in test guest".into(), image.to_vec())),
        KernelSource::File(path) => {
            let bytes = host_files::read_image("kernel", path, MAX_KERNEL_FILE)?;
            Ok((path.display().to_string(), bytes))
        }
    }
}

/// Puts the initrd as high as possible in low RAM, page-aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    name: &str,
    bytes: &[u8],
    kernel_end: u64,
    memory_bytes: u64,
    max_end: u64,
) -> Result<InitrdPlacement> {
    let size = bytes.len() as u64;
    let top = memory_bytes.min(MMIO_HOLE_START).min(max_end);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1)).filter(|&a| a >= kernel_end);
    let Some(addr) = addr else {
        return Err(Error::Boot(format!(
            "initrd {name} ({} MiB) does not fit in guest RAM above the kernel; give the guest more --memory",
            size >> 20
        )));
    };
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|e| Error::Boot(format!("writing the initrd: {e}")))?;
    Ok(InitrdPlacement { addr, size })
}

/// Writes the NUL-terminated command line; returns its size including the NUL.
fn write_cmdline(mem: &GuestMemory, text: &str) -> Result<usize> {
    let cmdline = Cmdline::try_from(text, CMDLINE_MAX_SIZE)
        .map_err(|e| Error::Boot(format!("invalid kernel command line: {e}")))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| Error::Boot(format!("writing the command line: {e}")))?;
    Ok(text.len() + 1)
}

/// Appends `virtio_mmio.device=` for each device, for kernels that find
/// virtio-mmio devices on the command line (Debian's find them through ACPI).
/// With a hotplug region, Linux must also online what virtio-mem plugs
/// (Debian's default leaves it offline), unless the user said otherwise.
fn with_devices(cmdline: &str, devices: &[MmioSlot], hotplug: bool) -> Result<String> {
    let mut full = cmdline.to_string();
    for slot in devices {
        full.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", slot.base, slot.gsi));
    }
    if hotplug && !cmdline.contains("memhp_default_state=") {
        full.push_str(" memhp_default_state=online_movable");
    }
    check_cmdline(&full)?;
    Ok(full)
}

/// Kernels parse the command line as printable ASCII in a fixed buffer.
fn check_cmdline(text: &str) -> Result<()> {
    if text.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::Boot(format!(
            "the kernel command line is {} bytes; at most {} fit",
            text.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if let Some(at) = text.bytes().position(|b| !(b' '..=b'~').contains(&b)) {
        return Err(Error::Boot(format!(
            "the kernel command line has a non-printable or non-ASCII byte at offset {at}"
        )));
    }
    Ok(())
}

/// The e820 view of RAM shared by both boot protocols.
fn e820(info: &BootInfo) -> impl Iterator<Item = (u64, u64, u32)> {
    memory_map(info.memory_bytes).into_iter().map(|e| (e.start, e.size, e.kind as u32))
}
