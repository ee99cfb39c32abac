//! ACPI tables: RSDP -> XSDT -> FADT (-> DSDT) and MADT.
//!
//! The platform is "hardware-reduced" ACPI: no PM1 blocks or SCI, just a
//! sleep control register for S5 and a reset register (both on port 0x600).
//! The DSDT describes COM1 and the S5 sleep state; later, virtio-mmio devices
//! (`LNRO0005`), which Debian's kernel finds only through ACPI.
use super::super::layout::{ACPI_TABLES_END, ACPI_TABLES_START, IOAPIC_ADDR, LAPIC_ADDR};
use super::super::legacy::{ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, COM1_BASE, COM1_GSI};
use super::super::memory::GuestMemory;
use super::super::virtio::MmioSlot;
use super::super::{Error, Result};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

const OEM_ID: [u8; 6] = *b"SKVM  ";
const OEM_REVISION: u32 = 1;
const DSDT_REVISION: u8 = 6;
const TABLE_ALIGN: u64 = 16;

const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;

/// MADT Interrupt Source Override: ISA IRQ 0 (the PIT) arrives on GSI 2,
/// the way KVM's in-kernel IOAPIC routes it.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

const PIT_OVERRIDE: InterruptSourceOverride =
    InterruptSourceOverride { kind: 2, length: 10, bus: 0, source: 0, gsi: U32::new(2), flags: U16::new(0) };

/// `Device (VRnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed, Interrupt } }`
struct VirtioMmioAml {
    name: String,
    index: u32,
    slot: MmioSlot,
}

impl VirtioMmioAml {
    fn new(index: usize, slot: &MmioSlot) -> Self {
        VirtioMmioAml { name: format!("VR{index:02X}"), index: index as u32, slot: *slot }
    }
}

impl Aml for VirtioMmioAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let window = aml::Memory32Fixed::new(true, self.slot.base as u32, super::super::virtio::mmio::MMIO_SIZE as u32);
        let irq = aml::Interrupt::new(true, true, false, false, self.slot.gsi);
        let resources = aml::ResourceTemplate::new(vec![&window, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &self.index);
        let crs = aml::Name::new("_CRS".into(), &resources);
        aml::Device::new(self.name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt(devices: &[MmioSlot]) -> Vec<u8> {
    let com1_ports = aml::IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_resources = aml::ResourceTemplate::new(vec![&com1_ports, &com1_irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &0u8);
    let crs = aml::Name::new("_CRS".into(), &com1_resources);
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    // virtio-mmio devices as Linux's ACPI probe expects them (LNRO0005).
    let virtio: Vec<VirtioMmioAml> = devices.iter().enumerate().map(|(i, slot)| VirtioMmioAml::new(i, slot)).collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(virtio.iter().map(|d| d as &dyn Aml));
    let system_bus = aml::Scope::new("\\_SB_".into(), children);
    // \_S5: SLP_TYP 5 for both PM1 registers; the hardware-reduced path writes it to 0x600.
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8, &5u8, &0u8, &0u8]));

    let mut dsdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, *b"SKVMDSDT", OEM_REVISION);
    dsdt.append_slice(&bytes_of(&system_bus));
    dsdt.append_slice(&bytes_of(&s5));
    dsdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port as u64);
    let mut fadt = FADTBuilder::new(OEM_ID, *b"SKVMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.reset_reg = io_byte(ACPI_SLEEP_CONTROL_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_byte(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte(ACPI_SLEEP_STATUS_PORT);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED).into();
    bytes_of(&fadt.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(OEM_ID, *b"SKVMMADT", OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    madt.add_structure(PIT_OVERRIDE);
    bytes_of(&madt)
}

/// Appends tables one after another in the reserved area below 1 MiB.
struct TableWriter<'a> {
    mem: &'a GuestMemory,
    next: u64,
}

impl TableWriter<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<u64> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr + bytes.len() as u64;
        if end > ACPI_TABLES_END {
            return Err(Error::Boot("ACPI tables do not fit below 1 MiB".into()));
        }
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Boot(format!("writing ACPI tables: {e}")))?;
        self.next = end;
        Ok(addr)
    }
}

/// Writes all tables and returns the RSDP's address.
pub fn write_tables(mem: &GuestMemory, vcpus: u8, devices: &[MmioSlot]) -> Result<u64> {
    let rsdp_addr = ACPI_TABLES_START;
    let mut out = TableWriter { mem, next: rsdp_addr + Rsdp::len() as u64 };
    let dsdt_addr = out.put(&dsdt(devices))?;
    let fadt_addr = out.put(&fadt(dsdt_addr))?;
    let madt_addr = out.put(&madt(vcpus))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"SKVMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = out.put(&bytes_of(&xsdt))?;
    mem.write_slice(&bytes_of(&Rsdp::new(OEM_ID, xsdt_addr)), GuestAddress(rsdp_addr))
        .map_err(|e| Error::Boot(format!("writing the RSDP: {e}")))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_and_describe_every_cpu() {
        for table in [dsdt(&[]), fadt(0x1000), madt(3)] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(checksum(&table), 0);
        }
        let madt = madt(3);
        let mut off = 44;
        let mut cpus = 0;
        while off < madt.len() {
            if madt[off] == 0 {
                cpus += 1;
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(cpus, 3);
    }

    #[test]
    fn dsdt_names_com1_and_s5() {
        let dsdt = dsdt(&[MmioSlot { base: 0xd000_0000, gsi: 16 }]);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"COM1"));
        assert!(has(b"_S5_"));
        assert!(has(b"_CRS"));
        assert!(has(b"VR00") && has(b"LNRO0005"));
    }
}

#[cfg(test)]
mod iasl_tests {
    use super::*;

    /// Runs ACPICA's disassembler over `table`; returns its ASL text.
    fn disassemble(name: &str, table: &[u8]) -> String {
        let dir = std::env::temp_dir().join(format!("skvm-acpi-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join(format!("{name}.aml"));
        std::fs::write(&aml, table).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .current_dir(&dir)
            .output()
            .expect("iasl (acpica-tools) is needed; scripts/setup.sh installs it");
        assert!(out.status.success(), "iasl failed on {name}: {}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        text
    }

    #[test]
    fn acpica_reads_our_tables() {
        let dsdt = disassemble(
            "dsdt",
            &dsdt(&[MmioSlot { base: 0xd000_0000, gsi: 16 }, MmioSlot { base: 0xd000_1000, gsi: 17 }]),
        );
        for needle in ["PNP0501", "LNRO0005", "0xD0000000", "0xD0001000", "0x00000011", "_S5_", "0x03F8"] {
            assert!(dsdt.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
        }
        let madt = disassemble("apic", &madt(2));
        assert!(madt.matches("Processor Local APIC").count() == 2, "{madt}");
        assert!(madt.contains("Interrupt Source Override") && madt.contains("Interrupt : 00000002"), "{madt}");
        let fadt = disassemble("facp", &fadt(0x1000));
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
        assert!(fadt.contains("Sleep Control Register") && fadt.contains("0000000000000600"), "{fadt}");
    }
}
