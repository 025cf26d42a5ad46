//! Guest writes to CR0 and CR4 that reach the hypervisor: the bits it owns (those VMX forces,
//! set in the guest/host masks) exit; the guest sees its own values in the read shadows while
//! the real registers keep the forced bits. Pure: the caller passes the fixed-bit MSRs.
//! A value the CPU would refuse gets #GP, as on hardware (SDM Vol. 3A §2.5, §4.1.1;
//! Vol. 3C §25.3 "Changes to Instruction Behavior in VMX Non-Root Operation").

/// What a control-register exit was (exit qualification, SDM Vol. 3C Table 27-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrExit {
    /// MOV to CR`cr` from general register `gpr`.
    MovTo {
        cr: u8,
        gpr: u8,
    },
    /// MOV from CR`cr` to `gpr` (not used with these controls).
    MovFrom {
        cr: u8,
        gpr: u8,
    },
    Clts,
    /// LMSW with this 16-bit source.
    Lmsw(u16),
}

impl CrExit {
    pub fn decode(q: u64) -> CrExit {
        let cr = (q & 0xf) as u8;
        let gpr = ((q >> 8) & 0xf) as u8;
        match (q >> 4) & 3 {
            0 => CrExit::MovTo { cr, gpr },
            1 => CrExit::MovFrom { cr, gpr },
            2 => CrExit::Clts,
            _ => CrExit::Lmsw((q >> 16) as u16),
        }
    }
}

/// The write is one the CPU would refuse: the guest gets #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectGp;

/// A new CR value: what the register holds and what the guest reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrValue {
    pub actual: u64,
    pub shadow: u64,
}

const CR0_PE: u64 = 1;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;

/// MOV to CR0 of `value` by a guest in IA-32e mode (`long_mode`), with unrestricted guest
/// (PE and PG free of the fixed bits).
pub fn write_cr0(
    value: u64,
    fixed0: u64,
    fixed1: u64,
    long_mode: bool,
) -> Result<CrValue, InjectGp> {
    let reserved = value >> 32 != 0;
    let bad_combination = (value & CR0_PG != 0 && value & CR0_PE == 0)
        || (value & CR0_NW != 0 && value & CR0_CD == 0);
    if reserved || bad_combination || (long_mode && value & CR0_PG == 0) {
        return Err(InjectGp);
    }
    let forced = fixed0 & !(CR0_PE | CR0_PG);
    Ok(CrValue {
        actual: (value | forced) & fixed1,
        shadow: value,
    })
}

/// MOV to CR4 of `value`: bits the CPU does not support, VMXE (VMX is hidden from guests), and
/// clearing PAE in IA-32e mode get #GP.
pub fn write_cr4(
    value: u64,
    fixed0: u64,
    fixed1: u64,
    long_mode: bool,
) -> Result<CrValue, InjectGp> {
    if value & CR4_VMXE != 0
        || value & !(fixed1 | CR4_VMXE) != 0
        || (long_mode && value & CR4_PAE == 0)
    {
        return Err(InjectGp);
    }
    Ok(CrValue {
        actual: (value | fixed0) & fixed1,
        shadow: value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Typical fixed bits: CR0 must have PE, NE, PG; CR4 must have VMXE; CR4 may have bits 0..=24.
    const CR0_F0: u64 = 0x8000_0021;
    const CR0_F1: u64 = 0xffff_ffff;
    const CR4_F0: u64 = 0x2000;
    const CR4_F1: u64 = 0x1ff_ffff;

    #[test]
    fn qualification() {
        assert_eq!(CrExit::decode(0x0000_0304), CrExit::MovTo { cr: 4, gpr: 3 });
        assert_eq!(
            CrExit::decode(0x0000_0010),
            CrExit::MovFrom { cr: 0, gpr: 0 }
        );
        assert_eq!(CrExit::decode(0x20), CrExit::Clts);
        assert_eq!(CrExit::decode(0x0001_0030), CrExit::Lmsw(1));
    }

    #[test]
    fn cr0_keeps_forced_bits_and_shows_the_guest_its_own() {
        // The guest clears NE: it reads 0 back, the register keeps 1.
        let v = write_cr0(0x8000_0011, CR0_F0, CR0_F1, true).unwrap();
        assert_eq!(v.shadow, 0x8000_0011);
        assert_eq!(v.actual, 0x8000_0031);
        assert_eq!(
            write_cr0(0x0000_0011, CR0_F0, CR0_F1, true),
            Err(InjectGp),
            "paging off in long mode"
        );
        assert_eq!(
            write_cr0(0x8000_0000, CR0_F0, CR0_F1, false),
            Err(InjectGp),
            "PG without PE"
        );
        assert_eq!(
            write_cr0(0x2000_0001, CR0_F0, CR0_F1, false),
            Err(InjectGp),
            "NW without CD"
        );
        assert_eq!(
            write_cr0(1 << 40, CR0_F0, CR0_F1, false),
            Err(InjectGp),
            "reserved bits"
        );
        assert_eq!(
            write_cr0(0x11, CR0_F0, CR0_F1, false).unwrap().actual,
            0x31,
            "real mode: PE/PG free"
        );
    }

    #[test]
    fn cr4_refuses_vmxe_and_unsupported_bits() {
        let v = write_cr4(0x620, CR4_F0, CR4_F1, true).unwrap();
        assert_eq!((v.actual, v.shadow), (0x2620, 0x620));
        assert_eq!(
            write_cr4(0x2020, CR4_F0, CR4_F1, true),
            Err(InjectGp),
            "VMXE"
        );
        assert_eq!(
            write_cr4(0x20 | 1 << 30, CR4_F0, CR4_F1, true),
            Err(InjectGp),
            "unsupported bit"
        );
        assert_eq!(
            write_cr4(0x600, CR4_F0, CR4_F1, true),
            Err(InjectGp),
            "PAE off in long mode"
        );
    }
}
