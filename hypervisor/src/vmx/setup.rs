//! Filling a VMCS for a 64-bit guest: controls computed from the capability MSRs (refusing
//! clearly what the CPU cannot do), the guest-state area from the loader's [`GuestEntry`],
//! and the host-state area of this CPU.

use super::caps::{Controls, VmxCaps};
use super::ept::Eptp;
use super::hw::{ActiveVmcs, FixedBits, HostState, VmxError, fields as f};

/// Why a VMCS could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// The CPU cannot provide these bits of this control field.
    Unsupported {
        field: &'static str,
        missing: u32,
    },
    Vmx(VmxError),
}

impl From<VmxError> for SetupError {
    fn from(e: VmxError) -> Self {
        SetupError::Vmx(e)
    }
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, fm: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SetupError::Unsupported { field, missing } => {
                write!(fm, "the CPU cannot set {field} bits {missing:#x}")
            }
            SetupError::Vmx(e) => write!(fm, "{e}"),
        }
    }
}

fn need(c: &Controls, field: &'static str, wanted: u32) -> Result<u32, SetupError> {
    c.compute(wanted)
        .map_err(|missing| SetupError::Unsupported { field, missing })
}

fn optional(c: &Controls, bit: u32) -> u32 {
    if c.allows(bit) { 1 << bit } else { 0 }
}

/// Where a vCPU starts: 64-bit mode at `rip` with `rsp`, the loader's page tables in `cr3` and
/// its GDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestEntry {
    pub rip: u64,
    pub rsp: u64,
    pub cr3: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    /// Code and data selectors (their descriptors are in the GDT; the VMCS caches them).
    pub cs: u16,
    pub ds: u16,
}

/// Everything the VMCS needs beyond the CPU's own state.
pub struct GuestSetup {
    pub boot: GuestEntry,
    pub eptp: Eptp,
    /// Fill the return-stack buffer on every VM exit (this CPU's mitigation choice).
    pub rsb_fill: bool,
    pub vpid: u16,
}

/// Writes controls, guest state and host state into the current VMCS.
pub fn setup_vmcs(
    v: &mut ActiveVmcs,
    caps: &VmxCaps,
    g: &GuestSetup,
    io: &super::iobitmap::IoBitmaps,
) -> Result<(), SetupError> {
    // Pin-based: external interrupts and NMIs exit (the host keeps its timer); the
    // preemption timer bounds every slice (SDM Vol. 3C §24.6.1).
    let pin = need(
        &caps.pinbased,
        "pin-based controls",
        (1 << 0) | (1 << 3) | (1 << 6),
    )?;
    // Primary: HLT exits, port I/O exits as the I/O bitmaps say (every port but dom0's
    // devices'), all MSR accesses exit (no MSR bitmaps), secondary on.
    let proc = need(
        &caps.procbased,
        "processor-based controls",
        (1 << 7) | (1 << 25) | (1 << 31),
    )?;
    let p2 = caps.procbased2.unwrap_or_default();
    let proc2 = need(&p2, "secondary controls", (1 << 1) | (1 << 5) | (1 << 7))?
        | optional(&p2, 3)   // RDTSCP
        | optional(&p2, 12); // INVPCID
    // Exit: 64-bit host, save/load EFER and PAT, keep the preemption timer's remainder.
    let exit = need(
        &caps.exit,
        "exit controls",
        (1 << 9) | (1 << 18) | (1 << 19) | (1 << 20) | (1 << 21),
    )? | optional(&caps.exit, 22);
    // Entry: IA-32e mode guest, load EFER and PAT.
    let entry = need(
        &caps.entry,
        "entry controls",
        (1 << 9) | (1 << 14) | (1 << 15),
    )?;

    v.set(f::PINBASED, u64::from(pin))?;
    v.set(f::PROCBASED, u64::from(proc))?;
    v.set(f::PROCBASED2, u64::from(proc2))?;
    v.set(f::EXIT_CONTROLS, u64::from(exit))?;
    v.set(f::ENTRY_CONTROLS, u64::from(entry))?;
    v.set(f::EXCEPTION_BITMAP, 0)?;
    v.set(f::PF_ERROR_MASK, 0)?;
    v.set(f::PF_ERROR_MATCH, 0)?;
    v.set(f::CR3_TARGET_COUNT, 0)?;
    v.set(f::EXIT_MSR_STORE_COUNT, 0)?;
    v.set(f::EXIT_MSR_LOAD_COUNT, 0)?;
    v.set(f::ENTRY_MSR_LOAD_COUNT, 0)?;
    v.set(f::ENTRY_INTERRUPTION, 0)?;
    v.set(f::TSC_OFFSET, 0)?;
    v.set(f::VPID, u64::from(g.vpid))?;
    v.set_eptp(g.eptp)?;
    v.set_io_bitmaps(io)?;
    v.set_no_vmcs_link()?;

    // Control registers: what the guest asked for, adjusted by the fixed bits; bits the
    // hypervisor forces are owned by it (mask) and the guest reads its own view (shadow).
    let fixed = FixedBits::read();
    let unrestricted_free = (1u64 << 0) | (1 << 31); // PE, PG (SDM Vol. 3C §26.3.1.1)
    let cr0_wanted: u64 = 0x8000_0031; // PG | NE | ET | PE
    let cr0 = (cr0_wanted | fixed.cr0_fixed0) & fixed.cr0_fixed1;
    let cr0_owned = ((fixed.cr0_fixed0 & !unrestricted_free) | !fixed.cr0_fixed1) & 0xffff_ffff;
    let cr4_wanted: u64 = 1 << 5; // PAE
    let cr4 = (cr4_wanted | fixed.cr4_fixed0) & fixed.cr4_fixed1;
    let cr4_owned = (fixed.cr4_fixed0 | !fixed.cr4_fixed1) & 0xffff_ffff;
    v.set(f::GUEST_CR0, cr0)?;
    v.set(f::CR0_MASK, cr0_owned)?;
    v.set(f::CR0_SHADOW, cr0_wanted)?;
    v.set(f::GUEST_CR4, cr4)?;
    v.set(f::CR4_MASK, cr4_owned)?;
    v.set(f::CR4_SHADOW, cr4_wanted)?;
    v.set(f::GUEST_CR3, g.boot.cr3)?;
    v.set(f::GUEST_DR7, 0x400)?;
    v.set(f::GUEST_EFER, 0x500)?; // LME | LMA
    v.set(f::GUEST_PAT, 0x0007_0406_0007_0406)?;
    v.set(f::GUEST_RSP, g.boot.rsp)?;
    v.set(f::GUEST_RIP, g.boot.rip)?;
    v.set(f::GUEST_RFLAGS, 0x2)?;
    v.set(f::GUEST_SYSENTER_CS, 0)?;
    v.set(f::GUEST_SYSENTER_ESP, 0)?;
    v.set(f::GUEST_SYSENTER_EIP, 0)?;
    v.set(f::GUEST_INTERRUPTIBILITY, 0)?;
    v.set(f::GUEST_ACTIVITY, 0)?;
    v.set(f::PENDING_DEBUG, 0)?;
    // Segments: flat 64-bit code, flat data, a busy 64-bit TSS, no LDT (SDM Vol. 3C §26.3.1.2).
    let seg = |v: &mut ActiveVmcs,
               s: &f::Segment,
               sel: u64,
               limit: u64,
               ar: u64|
     -> Result<(), VmxError> {
        v.set(s.selector, sel)?;
        v.set(s.base, 0)?;
        v.set(s.limit, limit)?;
        v.set(s.access, ar)
    };
    seg(v, &f::CS, u64::from(g.boot.cs), 0xffff_ffff, 0xa09b)?;
    for s in [&f::SS, &f::DS, &f::ES, &f::FS, &f::GS] {
        seg(v, s, u64::from(g.boot.ds), 0xffff_ffff, 0xc093)?;
    }
    seg(v, &f::TR, 0, 0x67, 0x8b)?;
    seg(v, &f::LDTR, 0, 0, 0x1_0000)?;
    v.set(f::GUEST_GDTR_BASE, g.boot.gdt_base)?;
    v.set(f::GUEST_GDTR_LIMIT, u64::from(g.boot.gdt_limit))?;
    v.set(f::GUEST_IDTR_BASE, 0)?;
    v.set(f::GUEST_IDTR_LIMIT, 0)?;
    v.set_host_state(&HostState::capture(), g.rsb_fill)?;
    Ok(())
}
