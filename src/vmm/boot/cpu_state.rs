//! The boot vCPU's registers for each protocol, and the GDT and page tables
//! the Linux 64-bit protocol needs in guest memory. Both protocols start in
//! protected or long mode: real mode is unreliable on some hosts (PVM).
use super::super::layout::{BOOT_STACK_TOP, GDT_START, PDPT_START, PD_START, PML4_START, ZERO_PAGE_START};
use super::super::memory::GuestMemory;
use super::super::{Error, Result};
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

const SEG_TYPE_CODE: u8 = 0xb; // execute/read, accessed
const SEG_TYPE_DATA: u8 = 0x3; // read/write, accessed
const SEG_TYPE_TSS_BUSY: u8 = 0xb;

/// Four page directories of 2 MiB pages: the low 4 GiB, identity mapped.
const IDENTITY_MAPPED_GIB: u64 = 4;
const PTE_PRESENT_WRITABLE: u64 = 0x3;
const PDE_LARGE_PAGE: u64 = 0x80;

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// PVH: 32-bit protected mode, paging off.
    Protected32,
    /// Linux 64-bit protocol: long mode on the identity map.
    Long64,
}

/// Register state for the boot vCPU.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    mode: Mode,
    rip: u64,
}

/// Flat segments with the selectors each protocol's GDT uses.
struct Selectors {
    code: u16,
    data: u16,
    tss: u16,
}

const PVH_SELECTORS: Selectors = Selectors { code: 0x08, data: 0x10, tss: 0x18 };
/// The Linux boot protocol asks for __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const LINUX_SELECTORS: Selectors = Selectors { code: 0x10, data: 0x18, tss: 0x20 };

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: (!long) as u8,
        s: 1,
        l: long as u8,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn tss_segment(selector: u16) -> kvm_segment {
    kvm_segment { limit: 0x67, g: 0, s: 0, db: 0, l: 0, type_: SEG_TYPE_TSS_BUSY, ..segment(selector, 0, false) }
}

/// Encodes a segment as a GDT descriptor.
fn descriptor(seg: &kvm_segment) -> u64 {
    let limit = if seg.g == 1 { seg.limit >> 12 } else { seg.limit } as u64;
    let base = seg.base;
    let access = seg.type_ as u64 | (seg.s as u64) << 4 | (seg.dpl as u64) << 5 | (seg.present as u64) << 7;
    let flags = (seg.avl as u64) | (seg.l as u64) << 1 | (seg.db as u64) << 2 | (seg.g as u64) << 3;
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | access << 40
        | ((limit >> 16) & 0xf) << 48
        | flags << 52
        | ((base >> 24) & 0xff) << 56
}

impl std::fmt::Display for BootEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mode {
            Mode::Protected32 => write!(f, "PVH entry (32-bit protected mode) at {:#x}", self.rip),
            Mode::Long64 => write!(f, "Linux 64-bit entry (long mode) at {:#x}", self.rip),
        }
    }
}

impl BootEntry {
    pub fn pvh(entry: GuestAddress) -> Self {
        BootEntry { mode: Mode::Protected32, rip: entry.0 }
    }

    pub fn linux64(entry: GuestAddress) -> Self {
        BootEntry { mode: Mode::Long64, rip: entry.0 }
    }

    fn selectors(&self) -> &'static Selectors {
        match self.mode {
            Mode::Protected32 => &PVH_SELECTORS,
            Mode::Long64 => &LINUX_SELECTORS,
        }
    }

    fn segments(&self) -> (kvm_segment, kvm_segment, kvm_segment) {
        let sel = self.selectors();
        let long = matches!(self.mode, Mode::Long64);
        (segment(sel.code, SEG_TYPE_CODE, long), segment(sel.data, SEG_TYPE_DATA, false), tss_segment(sel.tss))
    }

    /// The GDT matching `segments`, as the guest would find it at GDT_START.
    fn gdt(&self) -> Vec<u64> {
        let (code, data, tss) = self.segments();
        let mut gdt = vec![0u64; (self.selectors().tss / 8) as usize + 1];
        gdt[(code.selector / 8) as usize] = descriptor(&code);
        gdt[(data.selector / 8) as usize] = descriptor(&data);
        gdt[(tss.selector / 8) as usize] = descriptor(&tss);
        gdt
    }

    /// Loads the registers into the boot vCPU and its GDT into guest memory.
    pub fn apply(&self, fd: &VcpuFd) -> Result<()> {
        let mut sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let (code, data, tss) = self.segments();
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = tss;
        sregs.gdt.base = GDT_START;
        sregs.gdt.limit = (self.gdt().len() * 8 - 1) as u16;
        let mut regs = kvm_regs { rip: self.rip, rflags: RFLAGS_RESERVED, ..Default::default() };
        match self.mode {
            Mode::Protected32 => {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rbx = super::super::layout::PVH_INFO_START;
            }
            Mode::Long64 => {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
                sregs.cr3 = PML4_START;
                sregs.cr4 = X86_CR4_PAE;
                sregs.efer = EFER_LME | EFER_LMA;
                regs.rsi = ZERO_PAGE_START;
                regs.rsp = BOOT_STACK_TOP;
                regs.rbp = BOOT_STACK_TOP;
            }
        }
        fd.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
    }

    /// Writes this entry's GDT to guest memory.
    pub fn write_gdt(&self, mem: &GuestMemory) -> Result<()> {
        for (i, entry) in self.gdt().iter().enumerate() {
            mem.write_obj(*entry, GuestAddress(GDT_START + i as u64 * 8))
                .map_err(|e| Error::Boot(format!("writing the boot GDT: {e}")))?;
        }
        Ok(())
    }
}

/// Identity-maps the low 4 GiB with 2 MiB pages for the Linux 64-bit entry.
pub fn write_linux64_tables(mem: &GuestMemory) -> Result<()> {
    let err = |e: vm_memory::GuestMemoryError| Error::Boot(format!("writing boot page tables: {e}"));
    mem.write_obj(PDPT_START | PTE_PRESENT_WRITABLE, GuestAddress(PML4_START)).map_err(err)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_START + gib * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_WRITABLE, GuestAddress(PDPT_START + gib * 8)).map_err(err)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | PTE_PRESENT_WRITABLE | PDE_LARGE_PAGE, GuestAddress(pd + i * 8)).map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_classic_encodings() {
        assert_eq!(descriptor(&segment(0x10, SEG_TYPE_CODE, true)), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(&segment(0x18, SEG_TYPE_DATA, false)), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(&segment(0x08, SEG_TYPE_CODE, false)), 0x00cf_9b00_0000_ffff);
        assert_eq!(descriptor(&tss_segment(0x20)), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn gdt_places_each_selector() {
        let gdt = BootEntry::linux64(GuestAddress(0x100_0000)).gdt();
        assert_eq!(gdt.len(), 5);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
    }
}
