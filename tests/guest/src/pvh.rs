//! The PVH boot protocol's `hvm_start_info` and what it points to.
use core::ptr::read_unaligned;

const MAGIC: u32 = 0x336e_c578;
/// Everything we dereference must lie in the identity-mapped low 4 GiB.
const MAPPED_LIMIT: u64 = 1 << 32;
pub const E820_RAM: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct RawStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Module {
    pub paddr: u64,
    pub size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

impl Module {
    /// The module's first byte, or 0 when it is empty or not mapped.
    pub fn first_byte(&self) -> u8 {
        if self.size == 0 || !mapped(self.paddr, 1) {
            return 0;
        }
        // SAFETY: mapped, and inside the module.
        unsafe { read_unaligned(self.paddr as *const u8) }
    }
}

pub struct StartInfo {
    raw: RawStartInfo,
}

fn mapped(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= MAPPED_LIMIT)
}

impl StartInfo {
    pub fn at(addr: u64) -> Option<StartInfo> {
        if !mapped(addr, core::mem::size_of::<RawStartInfo>() as u64) {
            return None;
        }
        // SAFETY: in mapped memory; unaligned read of a plain-data struct.
        let raw = unsafe { read_unaligned(addr as *const RawStartInfo) };
        (raw.magic == MAGIC).then_some(StartInfo { raw })
    }

    pub fn version(&self) -> u32 {
        self.raw.version
    }

    pub fn module_count(&self) -> u32 {
        self.raw.nr_modules
    }

    /// The command line, or "" when there is none or it is not UTF-8.
    pub fn cmdline(&self) -> &'static str {
        let addr = self.raw.cmdline_paddr;
        if !mapped(addr, 1) {
            return "";
        }
        let mut len = 0usize;
        // SAFETY: bounded scan of mapped memory for the terminating NUL.
        while len < 4096 && unsafe { read_unaligned((addr + len as u64) as *const u8) } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes were just read from mapped memory.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
        core::str::from_utf8(bytes).unwrap_or("")
    }

    pub fn first_module(&self) -> Option<Module> {
        let addr = self.raw.modlist_paddr;
        let valid = self.raw.nr_modules > 0 && mapped(addr, core::mem::size_of::<Module>() as u64);
        // SAFETY: the entry lies in mapped memory (checked).
        valid.then(|| unsafe { read_unaligned(addr as *const Module) })
    }

    pub fn rsdp(&self) -> Option<u64> {
        mapped(self.raw.rsdp_paddr, 36).then_some(self.raw.rsdp_paddr)
    }

    pub fn memmap(&self) -> impl Iterator<Item = MemmapEntry> {
        let base = self.raw.memmap_paddr;
        let size = core::mem::size_of::<MemmapEntry>() as u64;
        let count =
            if mapped(base, size * self.raw.memmap_entries as u64) { self.raw.memmap_entries as u64 } else { 0 };
        // SAFETY: every entry lies in mapped memory (checked above).
        (0..count).map(move |i| unsafe { read_unaligned((base + i * size) as *const MemmapEntry) })
    }
}
