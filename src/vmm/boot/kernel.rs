//! Recognising and loading kernel images: PVH ELF, vmlinux ELF, bzImage.
use super::super::config::BootProtocol;
use super::super::layout::HIMEM_START;
use super::super::memory::GuestMemory;
use super::super::{Error, Result};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::io::Cursor;
use vm_memory::GuestAddress;

const ELF_MAGIC: &[u8] = b"\x7fELF";
const ELF_CLASS_64: u8 = 2;
const EM_X86_64: u16 = 62;
const ELF64_HEADER_SIZE: usize = 64;
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BOOT_FLAG_OFFSET: usize = 0x1fe;
/// bzImage xloadflags bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Initrd limit for kernels that do not state one (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Elf,
    BzImage,
}

pub enum EntryPoint {
    Pvh(GuestAddress),
    Linux64 { entry: GuestAddress, setup_header: Option<setup_header> },
}

pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// First guest address past the kernel image.
    pub end: u64,
}

impl LoadedKernel {
    /// The end of the highest range the kernel accepts an initrd in.
    pub fn initrd_max(&self) -> u64 {
        match &self.entry {
            EntryPoint::Linux64 { setup_header: Some(hdr), .. } if hdr.initrd_addr_max != 0 => {
                hdr.initrd_addr_max as u64 + 1
            }
            EntryPoint::Linux64 { setup_header: Some(_), .. } => DEFAULT_INITRD_ADDR_MAX + 1,
            _ => u64::MAX,
        }
    }
}

/// Names the format of a kernel image, or says in words why it is none we boot.
pub fn detect(bytes: &[u8]) -> std::result::Result<Format, String> {
    if bytes.starts_with(ELF_MAGIC) {
        if bytes.len() < ELF64_HEADER_SIZE {
            return Err("a truncated ELF file".into());
        }
        if bytes[4] != ELF_CLASS_64 {
            return Err("a 32-bit ELF file; skvm boots 64-bit x86 kernels".into());
        }
        let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
        if machine != EM_X86_64 {
            return Err(format!("an ELF file for another architecture (e_machine {machine})"));
        }
        return Ok(Format::Elf);
    }
    let is_bzimage = bytes.len() > BZIMAGE_MAGIC_OFFSET + 4
        && bytes[BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2] == [0x55, 0xaa]
        && &bytes[BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4] == b"HdrS";
    if is_bzimage {
        return Ok(Format::BzImage);
    }
    if bytes.starts_with(&[0x1f, 0x8b])
        || bytes.starts_with(&[0xfd, b'7', b'z', b'X', b'Z'])
        || bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
    {
        return Err("a compressed file; decompress it to a vmlinux ELF first".into());
    }
    Err("not a kernel skvm can boot (expected a PVH ELF, a vmlinux ELF or a bzImage)".into())
}

pub fn load(mem: &GuestMemory, name: &str, bytes: &[u8], protocol: BootProtocol) -> Result<LoadedKernel> {
    let bad = |reason: String| Error::BadImage { what: "kernel", path: name.into(), reason };
    let format = detect(bytes).map_err(bad)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let mut image = Cursor::new(bytes);
    match format {
        Format::Elf => {
            let result = Elf::load(mem, None, &mut image, himem).map_err(|e| bad(format!("not loadable: {e}")))?;
            let entry = match (result.pvh_boot_cap, protocol) {
                (PvhBootCapability::PvhEntryPresent(entry), BootProtocol::Auto | BootProtocol::Pvh) => {
                    EntryPoint::Pvh(entry)
                }
                (_, BootProtocol::Pvh) => {
                    return Err(bad("an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)".into()))
                }
                _ => EntryPoint::Linux64 { entry: result.kernel_load, setup_header: None },
            };
            Ok(LoadedKernel { entry, end: result.kernel_end })
        }
        Format::BzImage => {
            if protocol == BootProtocol::Pvh {
                return Err(bad("a bzImage, which has no PVH entry; use --boot-protocol linux or auto".into()));
            }
            let result = BzImage::load(mem, None, &mut image, himem).map_err(|e| bad(format!("not loadable: {e}")))?;
            let header = result.setup_header.ok_or_else(|| bad("a bzImage without a setup header".into()))?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(bad("a bzImage without a 64-bit entry point (xloadflags)".into()));
            }
            let entry = GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET);
            Ok(LoadedKernel {
                entry: EntryPoint::Linux64 { entry, setup_header: Some(header) },
                end: result.kernel_end,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_formats_and_explains_the_rest() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = ELF_CLASS_64;
        elf[18] = EM_X86_64 as u8;
        assert_eq!(detect(&elf), Ok(Format::Elf));
        assert!(detect(&elf[..20]).unwrap_err().contains("truncated"));
        elf[18] = 183; // aarch64
        assert!(detect(&elf).unwrap_err().contains("another architecture"));

        let mut bz = vec![0u8; 0x300];
        bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(&bz), Ok(Format::BzImage));

        assert!(detect(&[0x1f, 0x8b, 8, 0]).unwrap_err().contains("compressed"));
        assert!(detect(b"hello world").unwrap_err().contains("not a kernel"));
        assert!(detect(&[]).is_err());
    }
}
