//! The test guest's ring-0 code must avoid the instructions PVM hosts cannot
//! run at CPL0, and the ELF must satisfy every PVH loader we target.
mod common;

use common::TEST_GUEST;
use std::process::Command;

/// Mnemonics that end the VM when executed at CPL0 on PVM (or that touch
/// SSE/x87 state, which the ring-0 code has no business with).
const FORBIDDEN: &[&str] = &[
    "popcnt",
    "cmpxchg16b",
    "xsave",
    "xrstor",
    "fxsave",
    "fxrstor",
    "int3",
    "clac",
    "stac",
    "fwait",
    "wait",
    "ldmxcsr",
    "stmxcsr",
    "xmm",
    "ymm",
];

fn disassemble(section: &str) -> String {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-j", section, TEST_GUEST])
        .output()
        .expect("objdump (binutils) is needed; scripts/setup.sh installs it");
    assert!(out.status.success(), "objdump failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn ring0_code_uses_no_instruction_pvm_cannot_run() {
    for section in [".boot.text", ".boot.isr"] {
        let listing = disassemble(section);
        let instructions: Vec<&str> = listing.lines().filter(|l| l.contains(":\t")).collect();
        assert!(instructions.len() > 10, "{section} looks empty:\n{listing}");
        for line in instructions {
            let text = line.split(":\t").nth(1).unwrap_or("");
            let mnemonic = text.split_whitespace().next().unwrap_or("");
            for bad in FORBIDDEN {
                assert!(mnemonic != *bad && !text.contains(bad), "{section}: forbidden `{bad}` in `{line}`");
            }
        }
    }
}

#[test]
fn elf_is_a_pvh_kernel_loadable_by_other_vmms() {
    let elf = std::fs::read(TEST_GUEST).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELF64 (Firecracker's loader requires it)");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "x86-64");
    let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
    assert!(entry >= 0x10_0000, "entry {entry:#x} below 1 MiB");
    let needle = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    let at = elf.windows(needle.len()).position(|w| w == needle).expect("no XEN_ELFNOTE_PHYS32_ENTRY note");
    let pvh_entry = u32::from_le_bytes(elf[at + 16..at + 20].try_into().unwrap());
    assert!(pvh_entry >= 0x10_0000, "PVH entry {pvh_entry:#x} below 1 MiB");
}
