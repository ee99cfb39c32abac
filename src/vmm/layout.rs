//! Guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT for the boot protocols that need one
//! 0x0000_6000  PVH hvm_start_info, memory map, module list
//! 0x0000_7000  Linux boot_params (zero page)
//! 0x0000_9000  boot page tables (PML4, PDPT, 4 PDs: low 4 GiB identity mapped)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  reserved: EBDA and BIOS area, holds the ACPI tables at 0xe_0000
//! 0x0010_0000  RAM for kernel, initrd and the guest (up to 3 GiB)
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio devices at 0xd000_0000,
//!              IOAPIC, LAPIC, KVM's TSS
//! 0x1_0000_0000 RAM above 4 GiB, when there is more than 3 GiB
//! ```

pub const GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MODLIST_START: u64 = 0x6800;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's x86 COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_TABLES_START: u64 = 0xe0000;
pub const ACPI_TABLES_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// virtio-mmio devices, 4 KiB apart, from the bottom of the MMIO hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Their interrupts: IOAPIC pins 16 and up (one each, edge-triggered).
pub const VIRTIO_GSI_BASE: u32 = 16;
pub const MAX_VIRTIO_DEVICES: usize = 8;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
