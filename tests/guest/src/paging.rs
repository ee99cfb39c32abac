//! Maps device windows that lie above the identity-mapped low 4 GiB
//! (a VMM may put 64-bit PCI BARs anywhere). Ring 3 can do this itself:
//! boot.S's page tables are ordinary user-writable memory, and making a
//! not-present entry present needs no TLB flush.
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

const PRESENT_WRITABLE_USER: u64 = 0x7;
const HUGE: u64 = 0x80;
/// Device memory is not to be cached.
const CACHE_DISABLE: u64 = 0x10;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const HUGE_PAGE: u64 = 1 << 21;
const POOL_PAGES: usize = 8;

#[repr(C, align(4096))]
struct Table([u64; 512]);

/// Zeroed page tables (in .bss, so below 4 GiB and identity mapped).
static mut POOL: [Table; POOL_PAGES] = [const { Table([0; 512]) }; POOL_PAGES];
static mut POOL_USED: usize = 0;

extern "C" {
    /// boot.S's top-level table, which CR3 points at.
    static mut pml4: [u64; 512];
}

/// Identity-maps [addr, addr + len) with 2 MiB pages, uncached, where it is
/// not mapped yet.
pub fn map(addr: u64, len: u64) -> Result<(), &'static str> {
    let end = addr.checked_add(len).ok_or("window wraps around")?;
    if end > 1 << 48 {
        return Err("window beyond 48-bit addresses");
    }
    let mut page = addr & !(HUGE_PAGE - 1);
    while page < end {
        // SAFETY: walks and extends the live page tables, which only this
        // single-threaded ring-3 code changes.
        unsafe {
            let pdpt = next_level(addr_of_mut!(pml4) as *mut u64, page >> 39)?;
            let pd = next_level(pdpt, (page >> 30) & 511)?;
            let slot = pd.add(((page >> 21) & 511) as usize);
            if read_volatile(slot) & 1 == 0 {
                write_volatile(slot, page | PRESENT_WRITABLE_USER | HUGE | CACHE_DISABLE);
            }
        }
        page += HUGE_PAGE;
    }
    Ok(())
}

/// The table entry `index` of `table` points at, made from the pool when absent.
///
/// # Safety
/// `table` must be a live page table.
unsafe fn next_level(table: *mut u64, index: u64) -> Result<*mut u64, &'static str> {
    let entry = read_volatile(table.add(index as usize));
    if entry & 1 != 0 {
        return match entry & HUGE {
            0 => Ok((entry & ADDRESS_MASK) as *mut u64),
            _ => Err("a 1 GiB page is in the way"),
        };
    }
    let used = read_volatile(addr_of_mut!(POOL_USED));
    if used == POOL_PAGES {
        return Err("out of page tables for device windows");
    }
    write_volatile(addr_of_mut!(POOL_USED), used + 1);
    let fresh = addr_of_mut!(POOL[used]) as *mut u64;
    write_volatile(table.add(index as usize), fresh as u64 | PRESENT_WRITABLE_USER);
    Ok(fresh)
}
