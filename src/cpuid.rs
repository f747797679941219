//! The CPUID each vCPU sees: KVM's supported set with the usual fixups (APIC IDs,
//! topology, hypervisor leaves, TSC frequency) and the features the user (or the
//! host check) hides.

use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Features that can be hidden with `--cpu-features -name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Cx16,
    Xsave,
    Avx,
    Avx2,
    X2apic,
    TscDeadline,
    Pdpe1gb,
    Rdrand,
    Rdseed,
    Popcnt,
}

pub const KNOWN_FEATURES: &str =
    "cx16, xsave, avx, avx2, x2apic, tsc-deadline, pdpe1gb, rdrand, rdseed, popcnt";

impl FromStr for Feature {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "cx16" => Feature::Cx16,
            "xsave" => Feature::Xsave,
            "avx" => Feature::Avx,
            "avx2" => Feature::Avx2,
            "x2apic" => Feature::X2apic,
            "tsc-deadline" => Feature::TscDeadline,
            "pdpe1gb" => Feature::Pdpe1gb,
            "rdrand" => Feature::Rdrand,
            "rdseed" => Feature::Rdseed,
            "popcnt" => Feature::Popcnt,
            _ => return Err(()),
        })
    }
}

/// Where a feature bit lives: (leaf, subleaf, register, bit).
#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

fn bits(f: Feature) -> &'static [(u32, u32, Reg, u32)] {
    use Reg::*;
    match f {
        Feature::Cx16 => &[(1, 0, Ecx, 13)],
        // XSAVE's dependents go with it: OSXSAVE, AVX, FMA, F16C, AVX2 and AVX-512.
        Feature::Xsave => &[
            (1, 0, Ecx, 26),
            (1, 0, Ecx, 27),
            (1, 0, Ecx, 28),
            (1, 0, Ecx, 12),
            (1, 0, Ecx, 29),
            (7, 0, Ebx, 5),
            (7, 0, Ebx, 16),
            (7, 0, Ebx, 17),
            (7, 0, Ebx, 28),
            (7, 0, Ebx, 30),
            (7, 0, Ebx, 31),
        ],
        Feature::Avx => &[
            (1, 0, Ecx, 28),
            (1, 0, Ecx, 12),
            (1, 0, Ecx, 29),
            (7, 0, Ebx, 5),
        ],
        Feature::Avx2 => &[(7, 0, Ebx, 5)],
        Feature::X2apic => &[(1, 0, Ecx, 21)],
        Feature::TscDeadline => &[(1, 0, Ecx, 24)],
        Feature::Pdpe1gb => &[(0x8000_0001, 0, Edx, 26)],
        Feature::Rdrand => &[(1, 0, Ecx, 30)],
        Feature::Rdseed => &[(7, 0, Ebx, 18)],
        Feature::Popcnt => &[(1, 0, Ecx, 23)],
    }
}

/// Everything the per-vCPU fixups need to know.
#[derive(Debug, Clone)]
pub struct CpuidParams {
    pub vcpu_id: u32,
    pub vcpu_count: u32,
    /// TSC frequency in kHz, when KVM reports it (advertised in leaf 0x4000_0010).
    pub tsc_khz: Option<u32>,
    pub tsc_deadline: bool,
    pub hidden: Vec<Feature>,
}

fn find(cpuid: &mut CpuId, function: u32, index: u32) -> Option<&mut kvm_cpuid_entry2> {
    cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
}

/// Apply the fixups to a copy of KVM's supported CPUID.
pub fn fixup(cpuid: &mut CpuId, p: &CpuidParams) {
    let count = p.vcpu_count.max(1);
    let pow2 = count.next_power_of_two();
    let topo_bits = pow2.trailing_zeros();
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (p.vcpu_id << 24) | (pow2.min(255) << 16);
                e.ebx = (e.ebx & !0xff00) | (8 << 8); // CLFLUSH line size in 8-byte units
                e.ecx |= 1 << 31; // running under a hypervisor
                e.ecx &= !(1 << 15); // PDCM: no perf capabilities MSR
                e.ecx &= !(1 << 5); // VMX: no nested virtualisation
                if p.tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // One core per vCPU in one package; caches private except the last level.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | ((pow2 - 1).min(0x3f) << 26);
            }
            6 => {
                e.eax &= !(1 << 1); // turbo
                e.ecx &= !(1 << 3); // energy-performance bias
            }
            0xa => {
                // No PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = p.vcpu_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = topo_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(khz) = p.tsc_khz.filter(|k| *k > 0) {
        if let Some(e) = find(cpuid, 0x4000_0000, 0) {
            e.eax = e.eax.max(0x4000_0010);
            match find(cpuid, 0x4000_0010, 0) {
                Some(e) => {
                    e.eax = khz;
                    e.ebx = 1_000_000;
                }
                None => {
                    let _ = cpuid.push(kvm_cpuid_entry2 {
                        function: 0x4000_0010,
                        eax: khz,
                        // KVM's LAPIC timer runs at 1 GHz.
                        ebx: 1_000_000,
                        ..Default::default()
                    });
                }
            }
        }
    }
    for f in &p.hidden {
        hide(cpuid, *f);
    }
}

/// Clear a feature's bits (never sets one KVM did not report).
pub fn hide(cpuid: &mut CpuId, f: Feature) {
    for &(leaf, sub, reg, bit) in bits(f) {
        if let Some(e) = find(cpuid, leaf, sub) {
            let r = match reg {
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *r &= !(1u32 << bit);
        }
    }
    if f == Feature::Xsave {
        // No XSAVE state components at all.
        for e in cpuid
            .as_mut_slice()
            .iter_mut()
            .filter(|e| e.function == 0xd)
        {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
    }
}

/// Is this host's KVM the nested, paravirtual kind (PVM)? Measured there with the
/// testguest's `cpuid` word: guest CPUID is answered by the outer hypervisor, not
/// from the table KVM_SET_CPUID2 installs, so hiding features has no effect.
pub fn pvm_host() -> bool {
    // Asked once: vCPU threads ask again under a seccomp filter that allows no file lookups.
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ecx: (1 << 13) | (1 << 26) | (1 << 28) | (1 << 5),
                edx: 1 << 28,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                index: 0,
                eax: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_ids_topology_and_tsc_leaf() {
        let mut c = sample();
        fixup(
            &mut c,
            &CpuidParams {
                vcpu_id: 3,
                vcpu_count: 4,
                tsc_khz: Some(2_000_000),
                tsc_deadline: true,
                hidden: vec![],
            },
        );
        let l1 = *find(&mut c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_ne!(l1.ecx & (1 << 24), 0);
        assert_eq!(l1.ecx & (1 << 5), 0);
        assert_ne!(l1.edx & (1 << 28), 0);
        let b1 = *find(&mut c, 0xb, 1).unwrap();
        assert_eq!((b1.eax, b1.ebx, b1.edx), (2, 4, 3));
        assert_eq!(find(&mut c, 0xb, 0).unwrap().edx, 3);
        assert_eq!(find(&mut c, 0x4000_0000, 0).unwrap().eax, 0x4000_0010);
        assert_eq!(find(&mut c, 0x4000_0010, 0).unwrap().eax, 2_000_000);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = sample();
        fixup(
            &mut c,
            &CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                tsc_khz: None,
                tsc_deadline: false,
                hidden: vec![],
            },
        );
        assert_eq!(find(&mut c, 1, 0).unwrap().edx & (1 << 28), 0);
        assert!(find(&mut c, 0x4000_0010, 0).is_none());
    }

    #[test]
    fn hiding_xsave_takes_dependents_and_leaf_d() {
        let mut c = sample();
        fixup(
            &mut c,
            &CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                tsc_khz: None,
                tsc_deadline: false,
                hidden: vec![Feature::Xsave, Feature::Cx16],
            },
        );
        let l1 = *find(&mut c, 1, 0).unwrap();
        assert_eq!(l1.ecx & ((1 << 26) | (1 << 28) | (1 << 13)), 0);
        assert_eq!(find(&mut c, 0xd, 0).unwrap().eax, 0);
    }
}
