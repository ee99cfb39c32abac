//! CPUID: KVM's supported set, adjusted per vCPU for APIC id and topology.
//! (Some hosts, such as PVM, ignore KVM_SET_CPUID2; skvm sets it anyway and
//! never depends on the guest seeing it.)
use super::super::{Error, Result};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// Bits needed to number `count` cores.
fn id_bits(count: u8) -> u32 {
    u32::BITS - (count.max(1) as u32 - 1).leading_zeros()
}

/// The CPUID table for vCPU `index` of `count`: one socket, one thread per core.
pub fn for_vcpu(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = index as u32;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count as u32) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_TOPOLOGY => {
                // EAX[31:26]: cores per package - 1.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count as u32 - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = apic_id;
                let (shift, processors, level) = match entry.index {
                    0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                    1 => (id_bits(count), count as u32, TOPOLOGY_LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = processors;
                entry.ecx = (level << 8) | (entry.index & 0xff);
            }
            LEAF_HYPERVISOR => {
                // Keep KVM's signature ("KVMKVMKVM"): guests use it to find kvmclock.
                entry.eax = entry.eax.max(LEAF_HYPERVISOR + 1);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn table() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 { function: LEAF_FEATURES, ebx: 0xffff_0800, ..Default::default() },
            kvm_cpuid_entry2 { function: LEAF_EXT_TOPOLOGY, index: 1, ..Default::default() },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_id_and_topology_follow_the_vcpu() {
        let cpuid = for_vcpu(&table(), 2, 3);
        let leaf1 = cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 3);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        let leaf_b = cpuid.as_slice()[1];
        assert_eq!((leaf_b.edx, leaf_b.eax, leaf_b.ebx), (2, 2, 3));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
