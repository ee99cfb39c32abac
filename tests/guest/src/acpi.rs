//! Just enough ACPI to count the processors the VMM describes in the MADT.
use core::ptr::read_unaligned;

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: callers pass addresses inside ACPI tables in identity-mapped memory.
    unsafe { read_unaligned(addr as *const T) }
}

fn signature(addr: u64) -> [u8; 4] {
    read(addr)
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(read::<u8>(addr + i))) == 0
}

/// Finds a table by signature through the RSDP's XSDT.
fn find_table(rsdp: u64, wanted: &[u8; 4]) -> Option<u64> {
    if &read::<[u8; 8]>(rsdp) != b"RSD PTR " || read::<u8>(rsdp + 15) < 2 || !checksum_ok(rsdp, 20) {
        return None;
    }
    let xsdt: u64 = read(rsdp + 24);
    if xsdt == 0 || xsdt >= 1 << 32 || &signature(xsdt) != b"XSDT" {
        return None;
    }
    let len = read::<u32>(xsdt + 4) as u64;
    if !(36..=1 << 16).contains(&len) || !checksum_ok(xsdt, len) {
        return None;
    }
    (36..len)
        .step_by(8)
        .map(|off| read::<u64>(xsdt + off))
        .find(|&table| table != 0 && table < 1 << 32 && &signature(table) == wanted)
}

/// Number of enabled local APICs in the MADT.
pub fn cpu_count(rsdp: u64) -> Option<u32> {
    let madt = find_table(rsdp, b"APIC")?;
    let len = read::<u32>(madt + 4) as u64;
    if !(44..=1 << 16).contains(&len) || !checksum_ok(madt, len) {
        return None;
    }
    let (mut off, mut cpus) = (44u64, 0u32);
    while off + 2 <= len {
        let (kind, entry_len) = (read::<u8>(madt + off), read::<u8>(madt + off + 1) as u64);
        if entry_len < 2 {
            return None;
        }
        if kind == 0 && read::<u32>(madt + off + 4) & 1 != 0 {
            cpus += 1;
        }
        off += entry_len;
    }
    Some(cpus)
}
