//! The VMCS as plain data: field encodings typed by access (guest-state and control fields
//! are [`Field`]s, exit information is [`ExitInfo`]), the guest's saved registers, the CR0/CR4
//! fixed bits, VMX errors, and [`VmcsAccess`]: the current VMCS behind a trait that the real one
//! (`hw::ActiveVmcs`, bare metal) and [`FakeVmcs`] (host tests) implement. No instructions here,
//! so the exit dispatcher and its host tests use the same types as the hardware layer.

/// Why VMX could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    OutOfMemory,
    /// VMXON failed (another VMM, or FEATURE_CONTROL changed under us).
    VmxonFailed,
    /// A VMX instruction failed: VMfailInvalid (no current VMCS) or VMfailValid with the
    /// VM-instruction error number (SDM Vol. 3C §30.4).
    Instruction(u64),
    /// A value wider than the field it was meant for (a hypervisor bug, refused).
    TooWide {
        field: u32,
        value: u64,
    },
    /// A VMCS loaded on one CPU was used on another without `clear_for_move`.
    WrongCpu {
        loaded_on: usize,
        here: usize,
    },
}

impl core::fmt::Display for VmxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmxError::OutOfMemory => f.write_str("out of memory for a VMX region"),
            VmxError::VmxonFailed => f.write_str("VMXON failed"),
            VmxError::Instruction(0) => f.write_str("VMX instruction failed (VMfailInvalid)"),
            VmxError::Instruction(n) => {
                write!(f, "VMX instruction failed, VM-instruction error {n}")
            }
            VmxError::TooWide { field, value } => {
                write!(f, "value {value:#x} does not fit VMCS field {field:#x}")
            }
            VmxError::WrongCpu { loaded_on, here } => write!(
                f,
                "VMCS of CPU {loaded_on} used on CPU {here} without a VMCLEAR to move it"
            ),
        }
    }
}

/// The fixed-bit MSRs for CR0 and CR4 in VMX operation.
#[derive(Clone, Copy, Debug)]
pub struct FixedBits {
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

/// A guest-state or control field: readable and writable while the VMCS is current. Built
/// only by `Field::new`, which refuses (at compile time, for the constants below) encodings of
/// read-only or host-state fields; writes are checked against the field's width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field(u32);

impl Field {
    /// Access type is bits 11:10 of the encoding: 0 control, 1 read-only data, 2 guest state,
    /// 3 host state (SDM Vol. 3D Appendix B).
    const fn new(encoding: u32) -> Field {
        let kind = (encoding >> 10) & 3;
        assert!(kind == 0 || kind == 2, "not a control or guest-state field");
        assert!(
            !holds_host_address(encoding),
            "a field holding a host-physical address is written only from its owner's type"
        );
        Field(encoding)
    }

    /// The encoding VMREAD and VMWRITE take.
    pub const fn encoding(self) -> u32 {
        self.0
    }

    /// Width in bits from bits 14:13 of the encoding: 16, 64, 32 or natural (64 here).
    pub const fn width(self) -> u32 {
        match (self.0 >> 13) & 3 {
            0 => 16,
            2 => 32,
            _ => 64,
        }
    }
}

/// Whether a field holds a host-physical address (SDM Vol. 3D Appendix B.2.1 and B.2.2: the
/// I/O, MSR, VMREAD/VMWRITE bitmaps, the MSR load/store areas, the PML, virtual-APIC,
/// APIC-access and posted-interrupt pages, the EPT pointer and EPTP list, the #VE area, and the
/// VMCS link pointer). A bare `u64` written there could point the CPU at any host memory, so
/// such fields are not [`Field`]s: the hardware layer sets them only from the types that own
/// those frames (`vmx::ept::Eptp`) or to their "none" value.
pub const fn holds_host_address(encoding: u32) -> bool {
    matches!(
        encoding,
        0x2000..=0x200f | 0x2012..=0x2017 | 0x201a..=0x201b | 0x2024..=0x202b | 0x2800..=0x2801
    )
}

/// An exit-information field: read-only (SDM Vol. 3C §24.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo(u32);

impl ExitInfo {
    const fn new(encoding: u32) -> ExitInfo {
        assert!((encoding >> 10) & 3 == 1, "not a read-only data field");
        ExitInfo(encoding)
    }

    /// The encoding VMREAD takes.
    pub const fn encoding(self) -> u32 {
        self.0
    }
}

/// The fields this hypervisor uses.
pub mod fields {
    use super::{ExitInfo, Field};
    use x86::vmx::vmcs::{control as c, guest as g, ro};

    pub const VPID: Field = Field::new(c::VPID);
    pub const PINBASED: Field = Field::new(c::PINBASED_EXEC_CONTROLS);
    pub const PROCBASED: Field = Field::new(c::PRIMARY_PROCBASED_EXEC_CONTROLS);
    pub const PROCBASED2: Field = Field::new(c::SECONDARY_PROCBASED_EXEC_CONTROLS);
    pub const EXIT_CONTROLS: Field = Field::new(c::VMEXIT_CONTROLS);
    pub const ENTRY_CONTROLS: Field = Field::new(c::VMENTRY_CONTROLS);
    pub const EXCEPTION_BITMAP: Field = Field::new(c::EXCEPTION_BITMAP);
    pub const CR0_MASK: Field = Field::new(c::CR0_GUEST_HOST_MASK);
    pub const CR4_MASK: Field = Field::new(c::CR4_GUEST_HOST_MASK);
    pub const CR0_SHADOW: Field = Field::new(c::CR0_READ_SHADOW);
    pub const CR4_SHADOW: Field = Field::new(c::CR4_READ_SHADOW);
    pub const ENTRY_INTERRUPTION: Field = Field::new(c::VMENTRY_INTERRUPTION_INFO_FIELD);
    pub const ENTRY_ERROR_CODE: Field = Field::new(c::VMENTRY_EXCEPTION_ERR_CODE);
    pub const ENTRY_INSTRUCTION_LEN: Field = Field::new(c::VMENTRY_INSTRUCTION_LEN);
    pub const GUEST_PAT: Field = Field::new(g::IA32_PAT_FULL);
    pub const GUEST_EFER: Field = Field::new(g::IA32_EFER_FULL);
    pub const GUEST_CR0: Field = Field::new(g::CR0);
    pub const GUEST_CR3: Field = Field::new(g::CR3);
    pub const GUEST_CR4: Field = Field::new(g::CR4);
    pub const GUEST_DR7: Field = Field::new(g::DR7);
    pub const GUEST_RSP: Field = Field::new(g::RSP);
    pub const GUEST_RIP: Field = Field::new(g::RIP);
    pub const GUEST_RFLAGS: Field = Field::new(g::RFLAGS);
    pub const GUEST_FS_BASE: Field = Field::new(g::FS_BASE);
    pub const GUEST_GS_BASE: Field = Field::new(g::GS_BASE);
    pub const GUEST_SYSENTER_CS: Field = Field::new(g::IA32_SYSENTER_CS);
    pub const GUEST_SYSENTER_ESP: Field = Field::new(g::IA32_SYSENTER_ESP);
    pub const GUEST_SYSENTER_EIP: Field = Field::new(g::IA32_SYSENTER_EIP);
    pub const GUEST_INTERRUPTIBILITY: Field = Field::new(g::INTERRUPTIBILITY_STATE);
    pub const GUEST_ACTIVITY: Field = Field::new(g::ACTIVITY_STATE);
    pub const PREEMPTION_TIMER: Field = Field::new(g::VMX_PREEMPTION_TIMER_VALUE);
    pub const PENDING_DEBUG: Field = Field::new(g::PENDING_DBG_EXCEPTIONS);
    pub const CR3_TARGET_COUNT: Field = Field::new(c::CR3_TARGET_COUNT);
    pub const EXIT_MSR_STORE_COUNT: Field = Field::new(c::VMEXIT_MSR_STORE_COUNT);
    pub const EXIT_MSR_LOAD_COUNT: Field = Field::new(c::VMEXIT_MSR_LOAD_COUNT);
    pub const ENTRY_MSR_LOAD_COUNT: Field = Field::new(c::VMENTRY_MSR_LOAD_COUNT);
    pub const PF_ERROR_MASK: Field = Field::new(c::PAGE_FAULT_ERR_CODE_MASK);
    pub const PF_ERROR_MATCH: Field = Field::new(c::PAGE_FAULT_ERR_CODE_MATCH);
    pub const TSC_OFFSET: Field = Field::new(c::TSC_OFFSET_FULL);
    pub const GUEST_GDTR_BASE: Field = Field::new(g::GDTR_BASE);
    pub const GUEST_GDTR_LIMIT: Field = Field::new(g::GDTR_LIMIT);
    pub const GUEST_IDTR_BASE: Field = Field::new(g::IDTR_BASE);
    pub const GUEST_IDTR_LIMIT: Field = Field::new(g::IDTR_LIMIT);

    /// One guest segment register's four fields.
    pub struct Segment {
        pub selector: Field,
        pub base: Field,
        pub limit: Field,
        pub access: Field,
    }

    macro_rules! seg {
        ($name:ident, $sel:ident, $base:ident, $lim:ident, $ar:ident) => {
            pub const $name: Segment = Segment {
                selector: Field::new(g::$sel),
                base: Field::new(g::$base),
                limit: Field::new(g::$lim),
                access: Field::new(g::$ar),
            };
        };
    }
    seg!(CS, CS_SELECTOR, CS_BASE, CS_LIMIT, CS_ACCESS_RIGHTS);
    seg!(SS, SS_SELECTOR, SS_BASE, SS_LIMIT, SS_ACCESS_RIGHTS);
    seg!(DS, DS_SELECTOR, DS_BASE, DS_LIMIT, DS_ACCESS_RIGHTS);
    seg!(ES, ES_SELECTOR, ES_BASE, ES_LIMIT, ES_ACCESS_RIGHTS);
    seg!(FS, FS_SELECTOR, FS_BASE, FS_LIMIT, FS_ACCESS_RIGHTS);
    seg!(GS, GS_SELECTOR, GS_BASE, GS_LIMIT, GS_ACCESS_RIGHTS);
    seg!(TR, TR_SELECTOR, TR_BASE, TR_LIMIT, TR_ACCESS_RIGHTS);
    seg!(
        LDTR,
        LDTR_SELECTOR,
        LDTR_BASE,
        LDTR_LIMIT,
        LDTR_ACCESS_RIGHTS
    );

    pub const EXIT_REASON: ExitInfo = ExitInfo::new(ro::EXIT_REASON);
    pub const EXIT_QUALIFICATION: ExitInfo = ExitInfo::new(ro::EXIT_QUALIFICATION);
    pub const EXIT_INSTRUCTION_LEN: ExitInfo = ExitInfo::new(ro::VMEXIT_INSTRUCTION_LEN);
    pub const GUEST_PHYSICAL_ADDRESS: ExitInfo = ExitInfo::new(ro::GUEST_PHYSICAL_ADDR_FULL);
    pub const INSTRUCTION_ERROR: ExitInfo = ExitInfo::new(ro::VM_INSTRUCTION_ERROR);
}

/// The guest's general registers, saved and restored around every VM entry (RSP and RIP live
/// in the VMCS). CR2 is switched here too: the VMCS does not hold it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub cr2: u64,
}

/// Reads and writes of the current VMCS's guest-state, control and exit-information fields.
pub trait VmcsAccess {
    fn get(&mut self, f: Field) -> u64;
    fn set(&mut self, f: Field, value: u64) -> Result<(), VmxError>;
    fn info(&mut self, f: ExitInfo) -> u64;
}

/// A VMCS in memory, for host tests (here and in the crates that test against the real exit
/// dispatcher, such as `pv-drivers`): fields read as 0 until set; every write is recorded.
#[derive(Default, Debug)]
pub struct FakeVmcs {
    pub fields: alloc::collections::BTreeMap<u32, u64>,
    pub exit_info: alloc::collections::BTreeMap<u32, u64>,
    pub writes: alloc::vec::Vec<(u32, u64)>,
    pub reads: u32,
}

impl FakeVmcs {
    /// Sets a field without recording it as a write (the state before the exit).
    pub fn with(mut self, f: Field, value: u64) -> Self {
        self.fields.insert(f.encoding(), value);
        self
    }

    pub fn with_info(mut self, f: ExitInfo, value: u64) -> Self {
        self.exit_info.insert(f.encoding(), value);
        self
    }

    pub fn field(&self, f: Field) -> u64 {
        self.fields.get(&f.encoding()).copied().unwrap_or(0)
    }
}

impl VmcsAccess for FakeVmcs {
    fn get(&mut self, f: Field) -> u64 {
        self.reads += 1;
        self.field(f)
    }

    fn set(&mut self, f: Field, value: u64) -> Result<(), VmxError> {
        if f.width() < 64 && value >> f.width() != 0 {
            return Err(VmxError::TooWide {
                field: f.encoding(),
                value,
            });
        }
        self.writes.push((f.encoding(), value));
        self.fields.insert(f.encoding(), value);
        Ok(())
    }

    fn info(&mut self, f: ExitInfo) -> u64 {
        self.reads += 1;
        self.exit_info.get(&f.encoding()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_address_fields_are_recognised() {
        use x86::vmx::vmcs::{control as c, guest as g};
        for enc in [
            c::EPTP_FULL,
            c::MSR_BITMAPS_ADDR_FULL,
            c::IO_BITMAP_A_ADDR_FULL,
            c::VIRT_APIC_ADDR_FULL,
            c::APIC_ACCESS_ADDR_FULL,
            c::PML_ADDR_FULL,
            g::LINK_PTR_FULL,
        ] {
            assert!(holds_host_address(enc), "{enc:#x}");
        }
        for enc in [c::TSC_OFFSET_FULL, g::RIP, g::IA32_EFER_FULL, c::VPID] {
            assert!(!holds_host_address(enc), "{enc:#x}");
        }
    }
}
