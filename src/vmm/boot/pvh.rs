//! The PVH boot protocol: `hvm_start_info` with memory map, command line,
//! RSDP and the initrd as module 0.
use super::super::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};
use super::super::memory::GuestMemory;
use super::super::{Error, Result};
use super::{e820, BootInfo};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Version 1 carries the memory map.
const START_INFO_VERSION: u32 = 1;

pub fn write_start_info(mem: &GuestMemory, info: &BootInfo) -> Result<()> {
    let write_err = |e: vm_memory::GuestMemoryError| Error::Boot(format!("writing PVH start info: {e}"));
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    let mut entries = 0u32;
    for (i, (addr, size, kind)) in e820(info).enumerate() {
        let entry = hvm_memmap_table_entry { addr, size, type_: kind, reserved: 0 };
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP_START + i as u64 * entry_size)).map_err(write_err)?;
        entries += 1;
    }
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: info.rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: entries,
        ..Default::default()
    };
    if let Some(initrd) = info.initrd {
        let module = hvm_modlist_entry { paddr: initrd.addr, size: initrd.size, ..Default::default() };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START)).map_err(write_err)?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(start_info, GuestAddress(PVH_INFO_START)).map_err(write_err)
}
