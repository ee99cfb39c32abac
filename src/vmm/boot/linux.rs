//! The Linux 64-bit boot protocol: a zero page (`boot_params`) with the
//! setup header, e820 map, command line, initrd and RSDP.
use super::super::layout::{CMDLINE_START, ZERO_PAGE_START};
use super::super::memory::GuestMemory;
use super::super::{Error, Result};
use super::{e820, BootInfo};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const LOADFLAG_LOADED_HIGH: u8 = 0x01;

pub fn write_boot_params(mem: &GuestMemory, info: &BootInfo, header: Option<setup_header>) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    } else {
        // A vmlinux has no setup header; fill what the kernel reads.
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADFLAG_LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_size as u32;
    if let Some(initrd) = info.initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp;
    for (i, (addr, size, kind)) in e820(info).enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: kind };
        params.e820_entries = i as u8 + 1;
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START)).map_err(|e| Error::Boot(format!("writing boot_params: {e}")))
}
