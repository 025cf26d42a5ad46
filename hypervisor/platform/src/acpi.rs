//! The ACPI tables a domain's guest boots with: its whole platform description, generated from
//! the domain's configuration and copied into guest memory before the first instruction runs.
//!
//! The guest is an unmodified Linux (Debian 12's 6.1 `cloud-amd64` kernel), which learns about
//! this machine from nothing else: there is no MP table parser, no device tree and no virtio
//! command-line device in that kernel, so without a MADT it runs on one CPU without an IOAPIC,
//! and it finds virtio-mmio devices only as ACPI devices. The tables are those of QEMU's
//! `-M microvm,acpi=on`, which boots the same kernels:
//!
//! | table | what it says |
//! | --- | --- |
//! | RSDP (rev 2) | where the XSDT is; at `base`, 16-byte aligned: at [`ACPI_BASE`] Linux's scan of `0xE0000..0x100000` finds it |
//! | XSDT | the FADT and the MADT |
//! | FADT (rev 6, minor 5) | a *hardware-reduced* platform (below), its sleep and reset registers, the DSDT |
//! | MADT | one local APIC per vCPU, the IOAPIC, LINT1 as NMI; no 8259s |
//! | DSDT | `\_S5_`; under `\_SB_`: COM1, the virtio-mmio windows, the power button and its GED |
//!
//! Every pointer inside the blob (RSDP→XSDT, XSDT→FADT and MADT, FADT→DSDT) is a guest-physical
//! address inside `[base, base + len)`: the blob is position-dependent, built for one `base`.
//!
//! # Hardware-reduced ACPI
//!
//! `HW_REDUCED_ACPI` (ACPI 6.5 §4.1) drops the fixed hardware of a PC chipset: no PM1 event and
//! control blocks, no PM timer, no GPE blocks, no SCI, no FACS, no SMI command port and no
//! legacy ACPI-mode switch. What remains are two 8-bit registers in I/O space that the
//! hypervisor traps (ACPI 6.5 §4.8.3.7): the sleep control register at [`SLEEP_CONTROL_PORT`]
//! and the sleep status register at [`SLEEP_STATUS_PORT`], plus the reset register at
//! [`RESET_PORT`] (§4.8.3.6). Linux, seeing the flag, also drops the 8259 PIC and skips the
//! PIT/HPET timer set-up (`acpi_generic_reduced_hw_init`): its clock events come from the local
//! APIC timers. What the guest writes:
//!
//! - power off (S5): `0x80` (clear `WAK_STS`) to [`SLEEP_STATUS_PORT`], then
//!   `S5_SLP_TYP << 2 | 1 << 5` (`SLP_TYPx` and `SLP_EN`, i.e. `0x34`) to [`SLEEP_CONTROL_PORT`];
//! - reset: [`RESET_VALUE`] to [`RESET_PORT`] (Linux's `reboot=acpi`, the x86 default first try).
//!
//! # Devices
//!
//! - **virtio-mmio as `LNRO0005`.** Linux's `virtio_mmio` driver matches this `_HID` (the ID
//!   Linaro registered for it, the one QEMU's microvm and arm `virt` use) in its ACPI match table,
//!   and reads the register window and the interrupt from `_CRS`: a `Memory32Fixed` and one
//!   extended `Interrupt`. The interrupt is *level-triggered, active-high, exclusive*, as in QEMU's
//!   microvm (`hw/virtio/virtio-acpi.c`): the line stays asserted while the device's
//!   `InterruptStatus` is non-zero and drops on `InterruptACK`, so the IOAPIC must model
//!   level-triggered pins (Remote IRR, EOI). `_CCA` (cache-coherent DMA) is one, as in QEMU.
//! - **COM1** (`PNP0501`, ports `0x3f8..0x400`, ISA IRQ 4, edge, active high): the 16550 of
//!   [`crate::uart`], always present, so that Linux's 8250 driver binds it through PNP.
//! - **Panic notifier** (`QEMU0001`, port [`PVPANIC_PORT`]): QEMU's pvpanic device, which
//!   Linux's `pvpanic-mmio` module binds by this id; the guest's kernel writes
//!   [`PVPANIC_PANICKED`] there when it panics, so the host can stop the domain as crashed
//!   instead of letting it spin. A read returns the events offered (just that one).
//! - **Power button.** With no fixed power button (hardware-reduced), the button is a control
//!   method device (`PNP0C0C`) that Linux's `button` driver turns into `KEY_POWER` when it is
//!   notified with `0x80`. The notification comes from a Generic Event Device (`ACPI0013`, ACPI
//!   6.5 §5.6.9): an interrupt in its `_CRS` (edge, active high, exclusive, like QEMU's GED) on
//!   which Linux (`drivers/acpi/evged.c`) runs `_EVT(gsi)` (there is no `_Exx` method, which it
//!   would try first), and `_EVT` notifies the button. The
//!   GED has its own GSI, so unlike QEMU's it needs no event-selector register: the hypervisor
//!   just pulses [`Config::power_button_gsi`].
//!
//! Interrupts: the IOAPIC's GSIs `0..16` are the ISA IRQs (identity-mapped: the MADT has no
//! interrupt source override), so devices take GSIs `16..IOAPIC_PINS`, one each, which bounds the
//! platform to eight device interrupts: the virtio windows and the GED together.
//!
//! # Why `acpi_tables`
//!
//! The tables and the AML are built with rust-vmm's `acpi_tables` crate (0.2): `no_std` + `alloc`,
//! builds for `x86_64-unknown-none`, kept by the Cloud Hypervisor authors for exactly this job,
//! and it covers everything here — RSDP, XSDT, the full ACPI 6 FADT with public fields for the
//! hardware-reduced registers, MADT entries, and an AML builder with `Device`, `Name`, `Method`,
//! `Package`, resource templates (`Memory32Fixed`, `IO`, `Interrupt`) — with checksums kept by
//! the crate. It lacks two small things, added below: the MADT's Local APIC NMI structure and
//! the ASL `IRQNoFlags` descriptor. Its AML constructors assert that names are four characters;
//! every name passed here is a constant or built to that length, so no input reaches them.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use acpi_tables::Aml;
use acpi_tables::aml::{
    Arg, Device, EISAName, Equal, IO, If, Interrupt, Memory32Fixed, Method, Name, Notify, Package,
    Path, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADT, FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use zerocopy::{Immutable, IntoBytes};

/// Guest-physical address of every vCPU's local APIC page (the architectural default), written
/// to the MADT's Local Interrupt Controller Address.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Guest-physical address of the IOAPIC's register window (the conventional one).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Number of IOAPIC input pins; GSIs `0..IOAPIC_PINS` exist (GSI base 0).
pub const IOAPIC_PINS: u32 = 24;
/// I/O port of the hardware-reduced sleep control register (8-bit; FADT `SLEEP_CONTROL_REG`).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the panic notifier (QEMU's pvpanic, `QEMU0001`; the port QEMU uses).
pub const PVPANIC_PORT: u16 = 0x505;
/// The pvpanic event "the guest panicked" (bit 0), the only one offered.
pub const PVPANIC_PANICKED: u8 = 1;
/// I/O port of the hardware-reduced sleep status register (8-bit; FADT `SLEEP_STATUS_REG`).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// I/O port of the reset register (8-bit; FADT `RESET_REG`).
pub const RESET_PORT: u16 = 0x602;
/// What the guest writes to [`RESET_PORT`] to reset the machine (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x01;
/// The `SLP_TYP` value of S5 in the DSDT's `\_S5_` package. To power off, the guest writes
/// `S5_SLP_TYP << 2 | 1 << 5` (`SLP_TYPx` in bits 2..=4, `SLP_EN` in bit 5) to
/// [`SLEEP_CONTROL_PORT`]. The value itself is arbitrary (QEMU's GED uses 5 too).
pub const S5_SLP_TYP: u8 = 5;
/// Where the tables go in guest-physical memory. The RSDP is at the start; Linux takes its
/// address from the zero page (`acpi_rsdp_addr`) or finds it by scanning `0xE0000..0x100000`.
pub const ACPI_BASE: u64 = 0xe_0000;
/// The most bytes the tables may take: they end below the BIOS area's last page, which holds
/// the reset vector ([`crate::bootparams::RESET_VECTOR`]).
pub const ACPI_MAX: usize = 0x1_f000;
/// The most vCPUs: xAPIC ids are 8-bit and `0xff` is the broadcast id, so ids `0..=254`.
pub const MAX_VCPUS: u32 = 255;
/// The first GSI a device may use: `0..16` are the ISA IRQs (COM1 is IRQ 4).
pub const FIRST_DEVICE_GSI: u32 = 16;

/// OEM table id of every table (the OEM id comes from [`Config::oem_id`]).
const OEM_TABLE_ID: [u8; 8] = *b"HVPLATFM";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// DSDT revision 2: AML integers are 64-bit.
const DSDT_REVISION: u8 = 2;
/// Alignment of each table in the blob (the RSDP needs 16 for the BIOS-area scan).
const TABLE_ALIGN: usize = 16;
/// Size of a system description table header.
const SDT_HEADER_LEN: u32 = 36;
/// FADT `IAPC_BOOT_ARCH` (ACPI 6.5 table 5.11): bit 0 `LEGACY_DEVICES` clear (no ISA devices
/// but those in the DSDT), bit 1 `8042` clear (no keyboard controller), bit 2 `VGA Not Present`,
/// bit 5 `CMOS RTC Not Present`.
const IAPC_BOOT_ARCH: u16 = 1 << 2 | 1 << 5;
/// COM1's first I/O port, where the 16550 of [`crate::uart`] decodes.
const COM1_PORT: u16 = 0x3f8;
/// COM1's number of I/O ports (the 16550's eight registers).
const COM1_PORTS: u8 = 8;
/// COM1's ISA IRQ (GSI 4, edge, active high).
const COM1_IRQ: u8 = 4;
/// `_HID` of a virtio-mmio device.
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// `_HID` of the Generic Event Device.
const GED_HID: &str = "ACPI0013";
/// The notification value "status change" that makes a `PNP0C0C` button report a press.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;
/// The local APIC pin wired to NMI, for the MADT's Local APIC NMI entry.
const NMI_LINT: u8 = 1;
/// The size of the local APIC and IOAPIC pages no device window may overlap.
const APIC_PAGE: u64 = 0x1000;
/// Addresses above this cannot be given in a `Memory32Fixed` or the FADT's 32-bit `DSDT` field.
const LIMIT_4G: u64 = 1 << 32;

/// One virtio-mmio transport the guest should probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Guest-physical address of the register window; the window must end at or below 4 GiB.
    pub base: u64,
    /// Length of the window in bytes (the hypervisor uses 4 KiB), non-zero.
    pub size: u32,
    /// The IOAPIC input the device drives, in `FIRST_DEVICE_GSI..IOAPIC_PINS`, its own.
    pub gsi: u32,
}

/// What the tables describe: everything about a domain's platform that is not fixed.
#[derive(Clone, Copy, Debug)]
pub struct Config<'a> {
    /// Number of vCPUs, `1..=MAX_VCPUS`; their local APIC ids are `0..vcpus` and the IOAPIC's
    /// id is `vcpus`.
    pub vcpus: u32,
    /// The virtio-mmio windows, in the order of their `_UID`s (`VR00`, `VR01`, ...).
    pub devices: &'a [VirtioMmio],
    /// GSI of the power-button event (a GED, `ACPI0013`, whose `_EVT` notifies a `PNP0C0C` power
    /// button with `0x80`), or `None` for a platform without a power button.
    pub power_button_gsi: Option<u32>,
    /// OEM id of the RSDP and of every table, e.g. `*b"HVRUST"`; printable ASCII.
    pub oem_id: [u8; 6],
}

/// The generated tables: `bytes` go at the `base` given to [`build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    /// The blob, to be copied to guest-physical `base`.
    pub bytes: Vec<u8>,
    /// GPA of the RSDP (the zero page's `acpi_rsdp_addr`).
    pub rsdp: u64,
}

/// Who uses an interrupt line, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineUser {
    /// The virtio-mmio device at this index of [`Config::devices`].
    Virtio(usize),
    /// The power button's GED.
    PowerButton,
}

impl fmt::Display for LineUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(index) => write!(f, "virtio-mmio device {index}"),
            Self::PowerButton => f.write_str("the power button"),
        }
    }
}

/// Why a configuration cannot be described. Every variant is a configuration error of the
/// caller (the domain's configuration or the hypervisor's platform layout), none a guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// `vcpus` is 0 or above [`MAX_VCPUS`].
    VcpuCount(u32),
    /// The OEM id has a byte that is not printable ASCII.
    OemId([u8; 6]),
    /// `base` is not 16-byte aligned (the RSDP must be).
    BaseMisaligned(u64),
    /// `[base, base + ACPI_MAX)` does not lie below 4 GiB (the FADT's `DSDT` field is 32-bit).
    TablesAbove4G(u64),
    /// The tables would be larger than [`ACPI_MAX`]. Not reachable with today's limits (255
    /// vCPUs and eight devices take under 3 KiB); kept so that a growing DSDT fails loudly.
    TooLarge(usize),
    /// A GSI is not an IOAPIC input.
    GsiOutOfRange {
        /// Who asked for it.
        user: LineUser,
        /// The GSI, `IOAPIC_PINS` or above.
        gsi: u32,
    },
    /// A GSI is one of the ISA IRQs `0..16`.
    GsiIsIsa {
        /// Who asked for it.
        user: LineUser,
        /// The GSI, below [`FIRST_DEVICE_GSI`].
        gsi: u32,
    },
    /// Two users on one GSI (the interrupts are exclusive).
    GsiShared {
        /// The later user in [`Config`] order.
        user: LineUser,
        /// The earlier user.
        other: LineUser,
        /// The GSI both ask for.
        gsi: u32,
    },
    /// A virtio-mmio window has size 0.
    WindowEmpty(usize),
    /// A virtio-mmio window does not end at or below 4 GiB.
    WindowAbove4G(usize),
    /// A virtio-mmio window overlaps another one.
    WindowsOverlap(usize, usize),
    /// A virtio-mmio window overlaps the local APIC or IOAPIC page.
    WindowOverlapsApic(usize),
    /// A virtio-mmio window overlaps the tables themselves.
    WindowOverlapsTables(usize),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::VcpuCount(n) => write!(f, "{n} vCPUs: the tables describe 1..={MAX_VCPUS}"),
            Self::OemId(id) => write!(f, "OEM id {id:02x?} is not printable ASCII"),
            Self::BaseMisaligned(base) => {
                write!(
                    f,
                    "ACPI tables at {base:#x}: the RSDP must be 16-byte aligned"
                )
            }
            Self::TablesAbove4G(base) => write!(
                f,
                "ACPI tables at {base:#x}: {base:#x} + {ACPI_MAX:#x} must not exceed 4 GiB"
            ),
            Self::TooLarge(len) => write!(f, "ACPI tables take {len} bytes, more than {ACPI_MAX}"),
            Self::GsiOutOfRange { user, gsi } => {
                write!(
                    f,
                    "{user}: GSI {gsi} is not an IOAPIC input (0..{IOAPIC_PINS})"
                )
            }
            Self::GsiIsIsa { user, gsi } => write!(
                f,
                "{user}: GSI {gsi} is an ISA IRQ; devices use {FIRST_DEVICE_GSI}..{IOAPIC_PINS}"
            ),
            Self::GsiShared { user, other, gsi } => {
                write!(f, "{user}: GSI {gsi} is already used by {other}")
            }
            Self::WindowEmpty(i) => write!(f, "virtio-mmio device {i}: window of size 0"),
            Self::WindowAbove4G(i) => {
                write!(f, "virtio-mmio device {i}: window does not end below 4 GiB")
            }
            Self::WindowsOverlap(i, j) => {
                write!(f, "virtio-mmio devices {i} and {j}: windows overlap")
            }
            Self::WindowOverlapsApic(i) => {
                write!(
                    f,
                    "virtio-mmio device {i}: window overlaps the LAPIC or IOAPIC page"
                )
            }
            Self::WindowOverlapsTables(i) => {
                write!(f, "virtio-mmio device {i}: window overlaps the ACPI tables")
            }
        }
    }
}

impl core::error::Error for BuildError {}

/// Builds the tables for `cfg`, to be copied to guest-physical `base` (normally
/// [`ACPI_BASE`]). The RSDP is at `base`.
///
/// # Errors
///
/// A [`BuildError`] names what in `cfg` or `base` the tables cannot describe: a vCPU count
/// outside `1..=MAX_VCPUS`, a misplaced `base`, a GSI that is not a free device input, or a
/// virtio-mmio window that is empty, above 4 GiB or on top of something else.
pub fn build(cfg: &Config, base: u64) -> Result<Tables, BuildError> {
    check(cfg, base)?;

    // Lay out RSDP, DSDT, MADT, FADT, XSDT: each table is built once, after the tables it
    // points to have their addresses. The RSDP's place is reserved first and filled last.
    let mut blob = Vec::new();
    let rsdp_offset = append(&mut blob, &vec![0; Rsdp::len()]);
    let dsdt = gpa(base, append(&mut blob, dsdt(cfg).as_slice()));
    let madt = gpa(base, append(&mut blob, &to_bytes(&madt(cfg))));
    let fadt = gpa(base, append(&mut blob, &to_bytes(&fadt(cfg, dsdt))));
    let mut xsdt = XSDT::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = gpa(base, append(&mut blob, &to_bytes(&xsdt)));
    let rsdp = to_bytes(&Rsdp::new(cfg.oem_id, xsdt));
    blob[rsdp_offset..rsdp_offset + rsdp.len()].copy_from_slice(&rsdp);

    if blob.len() > ACPI_MAX {
        return Err(BuildError::TooLarge(blob.len()));
    }
    let end = gpa(base, blob.len());
    if let Some(i) = cfg.devices.iter().position(|d| overlaps(d, base, end)) {
        return Err(BuildError::WindowOverlapsTables(i));
    }
    Ok(Tables {
        bytes: blob,
        rsdp: gpa(base, rsdp_offset),
    })
}

/// Checks everything about `cfg` and `base` that does not depend on the tables' length.
fn check(cfg: &Config, base: u64) -> Result<(), BuildError> {
    if !(1..=MAX_VCPUS).contains(&cfg.vcpus) {
        return Err(BuildError::VcpuCount(cfg.vcpus));
    }
    if !cfg
        .oem_id
        .iter()
        .all(|b| b.is_ascii_graphic() || *b == b' ')
    {
        return Err(BuildError::OemId(cfg.oem_id));
    }
    if !base.is_multiple_of(TABLE_ALIGN as u64) {
        return Err(BuildError::BaseMisaligned(base));
    }
    // Checked here rather than once the length is known, so that every address computed on
    // the way, up to `base + ACPI_MAX`, fits 32 bits.
    if base
        .checked_add(ACPI_MAX as u64)
        .is_none_or(|end| end > LIMIT_4G)
    {
        return Err(BuildError::TablesAbove4G(base));
    }

    let lines = cfg
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| (LineUser::Virtio(i), d.gsi));
    let lines = lines.chain(cfg.power_button_gsi.map(|gsi| (LineUser::PowerButton, gsi)));
    let mut users: [Option<LineUser>; IOAPIC_PINS as usize] = [None; IOAPIC_PINS as usize];
    for (user, gsi) in lines {
        let Some(slot) = usize::try_from(gsi).ok().and_then(|pin| users.get_mut(pin)) else {
            return Err(BuildError::GsiOutOfRange { user, gsi });
        };
        if gsi < FIRST_DEVICE_GSI {
            return Err(BuildError::GsiIsIsa { user, gsi });
        }
        if let Some(other) = *slot {
            return Err(BuildError::GsiShared { user, other, gsi });
        }
        *slot = Some(user);
    }

    for (i, d) in cfg.devices.iter().enumerate() {
        if d.size == 0 {
            return Err(BuildError::WindowEmpty(i));
        }
        if d.base
            .checked_add(u64::from(d.size))
            .is_none_or(|end| end > LIMIT_4G)
        {
            return Err(BuildError::WindowAbove4G(i));
        }
        if overlaps(d, LAPIC_BASE, LAPIC_BASE + APIC_PAGE)
            || overlaps(d, IOAPIC_BASE, IOAPIC_BASE + APIC_PAGE)
        {
            return Err(BuildError::WindowOverlapsApic(i));
        }
        let end = d.base + u64::from(d.size);
        if let Some(j) = cfg.devices[..i]
            .iter()
            .position(|o| overlaps(o, d.base, end))
        {
            return Err(BuildError::WindowsOverlap(j, i));
        }
    }
    Ok(())
}

/// Whether `dev`'s window (checked to end at or below 4 GiB) meets `[start, end)`.
fn overlaps(dev: &VirtioMmio, start: u64, end: u64) -> bool {
    dev.base < end && start < dev.base + u64::from(dev.size)
}

/// Pads `blob` to [`TABLE_ALIGN`], appends `table` and returns its offset.
fn append(blob: &mut Vec<u8>, table: &[u8]) -> usize {
    blob.resize(blob.len().next_multiple_of(TABLE_ALIGN), 0);
    let offset = blob.len();
    blob.extend_from_slice(table);
    offset
}

/// The guest-physical address of `offset` in a blob at `base` (`check` has made sure that
/// `base + ACPI_MAX` is at most 4 GiB; `offset` is at most the blob's length).
fn gpa(base: u64, offset: usize) -> u64 {
    base + offset as u64
}

/// `addr` as the 32-bit address that it is.
#[expect(
    clippy::cast_possible_truncation,
    reason = "every caller passes an address checked to be below 4 GiB; the assertion says so"
)]
fn low32(addr: u64) -> u32 {
    debug_assert!(addr < LIMIT_4G, "{addr:#x} is above 4 GiB");
    addr as u32
}

/// The bytes of a table built by `acpi_tables`.
fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The FADT: revision 6 (minor 5), hardware-reduced, with the sleep and reset registers as
/// 8-bit System I/O registers, the DSDT in both its 32- and 64-bit fields, no FACS, and the
/// OEM id as hypervisor vendor identity. `PWR_BUTTON` and `SLP_BUTTON` say there is no fixed
/// power or sleep button (the power button, if any, is the DSDT's `PNP0C0C`), so Linux does not
/// create phantom fixed-button input devices. Everything else (SCI, PM blocks, C-states,
/// century) is zero, as hardware-reduced ACPI wants.
fn fadt(cfg: &Config, dsdt: u64) -> FADT {
    let io8 = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut vendor = [0; 8];
    vendor[..cfg.oem_id.len()].copy_from_slice(&cfg.oem_id);

    let mut fadt = FADTBuilder::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.dsdt = low32(dsdt).into();
    fadt.x_dsdt = dsdt.into();
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io8(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io8(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io8(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(vendor).into();
    fadt.finalize()
}

/// The MADT's Local APIC NMI structure (ACPI 6.5 §5.2.12.7, type 4), which `acpi_tables` lacks.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    /// ACPI processor UID, `0xff` for all processors.
    processor_uid: u8,
    /// MPS INTI flags: 0, "conforms to the bus" (edge, active high for an NMI).
    flags: zerocopy::little_endian::U16,
    /// The LINTn input the NMI arrives on.
    lint: u8,
}

const LOCAL_APIC_NMI_LEN: u8 = 6;
const _: () = assert!(size_of::<LocalApicNmi>() == LOCAL_APIC_NMI_LEN as usize);

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The MADT (revision 1, as QEMU's): the local APIC address [`LAPIC_BASE`], flags 0 (no
/// `PCAT_COMPAT`: no 8259s to mask), one enabled Processor Local APIC per vCPU (UID and APIC id
/// both the vCPU index), the IOAPIC (id `vcpus`, clear of every APIC id, at [`IOAPIC_BASE`],
/// GSI base 0) and LINT1 of every processor as NMI. No interrupt source overrides: ISA IRQs map
/// one to one to GSIs `0..16`, edge, active high.
fn madt(cfg: &Config) -> MADT {
    let lapic = LocalInterruptController::Address(low32(LAPIC_BASE));
    let mut madt = MADT::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION, lapic);
    // `check` bounds `vcpus` to 1..=MAX_VCPUS, so ids and UIDs fit a byte.
    let vcpus = u8::try_from(cfg.vcpus).unwrap_or(u8::MAX);
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, low32(IOAPIC_BASE), 0));
    madt.add_structure(LocalApicNmi {
        kind: 4,
        length: LOCAL_APIC_NMI_LEN,
        processor_uid: 0xff,
        flags: 0.into(),
        lint: NMI_LINT,
    });
    madt
}

/// ASL `IRQNoFlags () {irq}`: the small IRQ descriptor without its flags byte (ACPI 6.5
/// §6.4.2.1), meaning edge, active high, exclusive — the ISA convention COM1 follows.
/// `acpi_tables` has only the extended `Interrupt` descriptor.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.byte(0x22); // small item, type 4 (IRQ), length 2
        sink.word(1 << self.0);
    }
}

/// The DSDT: a header and AML, laid out as
///
/// ```text
/// Name (_S5, Package () { S5_SLP_TYP, S5_SLP_TYP, 0, 0 })
/// Scope (\_SB) {
///     Device (COM1) { _HID PNP0501, _UID 1, _CRS { IO (0x3f8, len 8), IRQNoFlags {4} } }
///     Device (VRnn) { _HID "LNRO0005", _UID nn, _CCA 1,
///                     _CRS { Memory32Fixed (ReadWrite, base, size),
///                            Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) {gsi} } }
///     Device (PWRB) { _HID PNP0C0C, _UID 0 }                      // with a power button
///     Device (GED0) { _HID "ACPI0013", _UID 0,
///                     _CRS { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi} },
///                     Method (_EVT, 1, Serialized) { If (Arg0 == gsi) { Notify (PWRB, 0x80) } } }
/// }
/// ```
///
/// `\_S5_`'s first two elements are `SLP_TYPa` and `SLP_TYPb` (ACPI 6.5 §7.4.2; ACPICA's
/// `acpi_get_sleep_type_data` reads both); a hardware-reduced OS writes only `SLP_TYPa`, to the
/// sleep control register, and there is no PM1b register, so both carry [`S5_SLP_TYP`]. The
/// other two are reserved.
fn dsdt(cfg: &Config) -> Sdt {
    let mut aml = Vec::new();
    let s5 = S5_SLP_TYP;
    Name::new(Path::new("_S5_"), &Package::new(vec![&s5, &s5, &0u8, &0u8])).to_aml_bytes(&mut aml);

    let mut sb = Vec::new();
    com1(&mut sb);
    pvpanic(&mut sb);
    for (index, dev) in cfg.devices.iter().enumerate() {
        virtio_mmio(index, dev, &mut sb);
    }
    if let Some(gsi) = cfg.power_button_gsi {
        power_button(gsi, &mut sb);
    }
    aml.extend_from_slice(&Scope::raw(Path::new("\\_SB_"), sb));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        cfg.oem_id,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    dsdt
}

/// `\_SB_.COM1`: the 16550 at `0x3f8`, ISA IRQ 4.
fn com1(sink: &mut Vec<u8>) {
    let io = IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORTS);
    let crs = ResourceTemplate::new(vec![&io, &IrqNoFlags(COM1_IRQ)]);
    Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &1u8),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// `\_SB_.PEVT`: the panic notifier at [`PVPANIC_PORT`] (as QEMU's pvpanic ISA device).
fn pvpanic(sink: &mut Vec<u8>) {
    let io = IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let crs = ResourceTemplate::new(vec![&io]);
    Device::new(
        Path::new("PEVT"),
        vec![
            &Name::new(Path::new("_HID"), &"QEMU0001"),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// `\_SB_.VRnn` (`nn` the index in hex): virtio-mmio window `index`. `check` has bounded the
/// device count (one GSI each) and the window to 32 bits.
fn virtio_mmio(index: usize, dev: &VirtioMmio, sink: &mut Vec<u8>) {
    let name = format!("VR{:02X}", index & 0xff);
    let uid = index as u64;
    let mem = Memory32Fixed::new(true, low32(dev.base), dev.size);
    let irq = Interrupt::new(true, false, false, false, dev.gsi);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    Device::new(
        Path::new(&name),
        vec![
            &Name::new(Path::new("_HID"), &VIRTIO_MMIO_HID),
            &Name::new(Path::new("_UID"), &uid),
            &Name::new(Path::new("_CCA"), &1u8),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// `\_SB_.PWRB`, the power button, and `\_SB_.GED0`, the event device that presses it when
/// the hypervisor pulses `gsi`. Linux calls `_EVT` with the GSI as `Arg0`.
fn power_button(gsi: u32, sink: &mut Vec<u8>) {
    Device::new(
        Path::new("PWRB"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C")),
            &Name::new(Path::new("_UID"), &0u8),
        ],
    )
    .to_aml_bytes(sink);

    let irq = Interrupt::new(true, true, false, false, gsi);
    let crs = ResourceTemplate::new(vec![&irq]);
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &NOTIFY_BUTTON_PRESSED);
    let is_ours = Equal::new(&Arg(0), &gsi);
    let press = If::new(&is_ours, vec![&notify]);
    let evt = Method::new(Path::new("_EVT"), 1, true, vec![&press]);
    Device::new(
        Path::new("GED0"),
        vec![
            &Name::new(Path::new("_HID"), &GED_HID),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), &crs),
            &evt,
        ],
    )
    .to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    //! The tables are read back as a guest reads them: the `acpi` crate parses the blob as
    //! "physical memory" at `base`, and a small AML decoder (below) walks the DSDT, so that a
    //! wrong length or nesting fails as it would in ACPICA, not only a wrong byte.

    use super::*;
    use acpi::fadt::Fadt;
    use acpi::madt::{Madt, MadtEntry};
    use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
    use alloc::string::String;
    use core::ptr::NonNull;

    const OEM: [u8; 6] = *b"HVRUST";

    fn window(i: u32) -> VirtioMmio {
        VirtioMmio {
            base: 0xd000_0000 + u64::from(i) * 0x1000,
            size: 0x1000,
            gsi: 16 + i,
        }
    }

    fn config(vcpus: u32, devices: &[VirtioMmio], power_button_gsi: Option<u32>) -> Config<'_> {
        Config {
            vcpus,
            devices,
            power_button_gsi,
            oem_id: OEM,
        }
    }

    fn built(cfg: &Config) -> Tables {
        build(cfg, ACPI_BASE).expect("a valid configuration")
    }

    /// The blob as guest memory at `base`, 8-byte aligned like real memory.
    struct Memory {
        base: usize,
        len: usize,
        words: Vec<u64>,
    }

    impl Memory {
        fn new(tables: &Tables, base: u64) -> Self {
            let len = tables.bytes.len();
            let mut words = vec![0u64; len.div_ceil(8)];
            words.as_mut_bytes()[..len].copy_from_slice(&tables.bytes);
            Self {
                base: usize::try_from(base).unwrap(),
                len,
                words,
            }
        }

        fn bytes(&self) -> &[u8] {
            &self.words.as_bytes()[..self.len]
        }

        fn tables(&self) -> AcpiTables<Handler<'_>> {
            let handler = Handler(self);
            // SAFETY: every mapping the crate asks for is checked to lie inside the blob.
            unsafe { AcpiTables::from_rsdp(handler, self.base) }.expect("RSDP and XSDT parse")
        }
    }

    /// An `AcpiHandler` whose physical memory is the blob: a mapping outside it fails the test.
    #[derive(Clone, Copy)]
    struct Handler<'a>(&'a Memory);

    impl AcpiHandler for Handler<'_> {
        unsafe fn map_physical_region<T>(
            &self,
            addr: usize,
            size: usize,
        ) -> PhysicalMapping<Self, T> {
            let mem = self.0;
            let offset = addr
                .checked_sub(mem.base)
                .expect("mapping below the tables");
            assert!(
                offset + size <= mem.len,
                "mapping {addr:#x}+{size:#x} past the tables"
            );
            let start = NonNull::from(&mem.bytes()[offset]).cast::<T>();
            // SAFETY: `[offset, offset + size)` is inside the blob, which the handler borrows and
            // so outlives every mapping; the crate only reads through it.
            unsafe { PhysicalMapping::new(addr, start, size, size, *self) }
        }

        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    fn byte(n: u32) -> u8 {
        u8::try_from(n).unwrap()
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    /// The table at `gpa`, checked to lie inside the blob and to checksum to zero.
    fn table<'b>(tables: &'b Tables, base: u64, gpa: u64, signature: &[u8; 4]) -> &'b [u8] {
        let offset =
            usize::try_from(gpa.checked_sub(base).expect("pointer below the blob")).unwrap();
        let b = &tables.bytes;
        assert!(offset + 36 <= b.len(), "{signature:?} header past the blob");
        assert_eq!(&b[offset..offset + 4], signature);
        let len = usize::try_from(le32(b, offset + 4)).unwrap();
        assert!(offset + len <= b.len(), "{signature:?} past the blob");
        let t = &b[offset..offset + len];
        assert_eq!(sum(t), 0, "{signature:?} checksum");
        assert_eq!(&t[10..16], &OEM);
        t
    }

    /// Follows every pointer from the RSDP; returns (FADT, MADT, DSDT).
    fn walk(tables: &Tables, base: u64) -> (&[u8], &[u8], &[u8]) {
        let b = &tables.bytes;
        assert_eq!(tables.rsdp, base);
        let rsdp = &b[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(le32(rsdp, 20), 36, "RSDP length");
        let xsdt = table(tables, base, le64(rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16, "XSDT lists FADT and MADT");
        let fadt = table(tables, base, le64(xsdt, 36), b"FACP");
        let madt = table(tables, base, le64(xsdt, 44), b"APIC");
        let x_dsdt = le64(fadt, 140);
        assert_eq!(u64::from(le32(fadt, 40)), x_dsdt, "DSDT and X_DSDT agree");
        let dsdt = table(tables, base, x_dsdt, b"DSDT");
        (fadt, madt, dsdt)
    }

    #[test]
    fn acpi_crate_parses_the_tables() {
        let devices = [window(0), window(1)];
        let tables = built(&config(4, &devices, Some(23)));
        let mem = Memory::new(&tables, ACPI_BASE);
        let acpi = mem.tables();
        assert_eq!(acpi.revision(), 2);
        let signatures: Vec<_> = acpi.headers().map(|h| h.signature).collect();
        assert_eq!(signatures.len(), 2);
        assert!(acpi.find_table::<Fadt>().is_ok());
        assert!(acpi.find_table::<Madt>().is_ok());
        let dsdt = acpi.dsdt().expect("the FADT points at a DSDT");
        let (_, _, raw) = walk(&tables, ACPI_BASE);
        assert_eq!(
            dsdt.address,
            usize::try_from(ACPI_BASE).unwrap() + table_offset(&tables, raw) + 36
        );
        assert_eq!(usize::try_from(dsdt.length).unwrap(), raw.len() - 36);
    }

    fn table_offset(tables: &Tables, t: &[u8]) -> usize {
        t.as_ptr() as usize - tables.bytes.as_ptr() as usize
    }

    #[test]
    fn checksums_and_pointers_hold_at_any_base() {
        let devices: Vec<_> = (0..8).map(window).collect();
        for base in [
            ACPI_BASE,
            0xf_0000,
            0x10,
            0x7fff_0000,
            (1 << 32) - ACPI_MAX as u64,
        ] {
            for (vcpus, devices, button) in [
                (1, &devices[..0], None),
                (16, &devices[..], None),
                (255, &devices[..7], Some(23)),
            ] {
                let tables = build(&config(vcpus, devices, button), base).unwrap();
                let (fadt, madt, dsdt) = walk(&tables, base);
                assert!(tables.bytes.len() <= ACPI_MAX);
                // Nothing in the blob but the five tables and their alignment padding.
                let used = 36 + 52 + fadt.len() + madt.len() + dsdt.len();
                assert!(tables.bytes.len() - used < 5 * TABLE_ALIGN);
            }
        }
    }

    #[test]
    fn fadt_is_hardware_reduced() {
        let tables = built(&config(1, &[], None));
        let mem = Memory::new(&tables, ACPI_BASE);
        let fadt = mem.tables().find_table::<Fadt>().unwrap();
        let (raw, _, _) = walk(&tables, ACPI_BASE);
        assert_eq!(
            (raw.len(), raw[8], raw[131]),
            (276, 6, 5),
            "FADT 6.5, full length"
        );

        let flags = { fadt.flags };
        assert!(flags.system_is_hw_reduced_acpi());
        assert!(flags.supports_system_reset_via_fadt());
        assert!(flags.power_button_is_control_method());
        assert!(flags.sleep_button_is_control_method());
        assert_eq!(le32(raw, 112), 1 << 20 | 1 << 10 | 1 << 5 | 1 << 4);

        let boot = { fadt.iapc_boot_arch };
        assert!(!boot.legacy_devices_are_accessible());
        assert!(!boot.motherboard_implements_8042());
        assert!(boot.dont_probe_vga());
        assert!(boot.use_time_and_alarm_namespace_for_rtc(), "no CMOS RTC");
        assert!(!boot.dont_enable_msi());

        let io8 = |port: u16| acpi::address::GenericAddress {
            address_space: acpi::address::AddressSpace::SystemIo,
            bit_width: 8,
            bit_offset: 0,
            access_size: acpi::address::AccessSize::ByteAccess,
            address: port.into(),
        };
        assert_eq!(fadt.reset_register().unwrap(), io8(RESET_PORT));
        assert_eq!({ fadt.reset_value }, RESET_VALUE);
        assert_eq!(
            fadt.sleep_control_register().unwrap(),
            Some(io8(SLEEP_CONTROL_PORT))
        );
        assert_eq!(
            fadt.sleep_status_register().unwrap(),
            Some(io8(SLEEP_STATUS_PORT))
        );
        assert!(fadt.facs_address().is_err(), "no FACS");
        assert_eq!({ fadt.sci_interrupt }, 0);
        assert_eq!(&raw[268..276], b"HVRUST\0\0", "hypervisor vendor identity");
        // The fixed-hardware blocks, 32- and 64-bit, are all absent.
        assert!(
            raw[56..88].iter().all(|b| *b == 0),
            "PM1/PM2/PM_TMR/GPE blocks"
        );
        assert!(
            raw[148..244].iter().all(|b| *b == 0),
            "X_PM1a_EVT_BLK..X_GPE1_BLK"
        );
    }

    /// The MADT's entries: (local APICs as (uid, id, flags), IOAPICs as (id, address, base),
    /// LAPIC NMIs as (uid, flags, lint), anything else).
    type MadtSummary = (
        Vec<(u8, u8, u32)>,
        Vec<(u8, u32, u32)>,
        Vec<(u8, u16, u8)>,
        usize,
    );

    fn madt_summary(tables: &Tables) -> (u32, u32, MadtSummary) {
        let mem = Memory::new(tables, ACPI_BASE);
        let madt = mem.tables().find_table::<Madt>().unwrap();
        let mut summary: MadtSummary = Default::default();
        for entry in madt.get().entries() {
            match entry {
                MadtEntry::LocalApic(e) => summary.0.push((e.processor_id, e.apic_id, { e.flags })),
                MadtEntry::IoApic(e) => summary.1.push((e.io_apic_id, { e.io_apic_address }, {
                    e.global_system_interrupt_base
                })),
                MadtEntry::LocalApicNmi(e) => {
                    summary.2.push((e.processor_id, { e.flags }, e.nmi_line))
                }
                _ => summary.3 += 1,
            }
        }
        let madt = madt.get();
        ({ madt.local_apic_address }, { madt.flags }, summary)
    }

    #[test]
    fn madt_lists_the_vcpus_and_the_ioapic() {
        for vcpus in [1, 16, 255] {
            let (lapic, flags, (cpus, ioapics, nmis, others)) =
                madt_summary(&built(&config(vcpus, &[], None)));
            assert_eq!(u64::from(lapic), LAPIC_BASE);
            assert_eq!(flags, 0, "no PCAT_COMPAT: no 8259s");
            let want: Vec<_> = (0..vcpus).map(|i| (byte(i), byte(i), 1)).collect();
            assert_eq!(cpus, want, "{vcpus} enabled local APICs, uid = id = index");
            assert_eq!(ioapics, [(byte(vcpus), low32(IOAPIC_BASE), 0)]);
            assert_eq!(nmis, [(0xff, 0, 1)], "LINT1 of all processors is NMI");
            assert_eq!(others, 0, "no interrupt source overrides");
        }
    }

    // --- A decoder for the AML this module writes (ACPI 6.5 §20.2), strict about lengths. ---

    #[derive(Clone, Debug, PartialEq)]
    enum Value {
        Int(u64),
        Str(String),
        Buffer(Vec<u8>),
        Package(Vec<Value>),
    }

    #[derive(Debug)]
    enum Term {
        Scope(String, Vec<Term>),
        Device(String, Vec<Term>),
        Name(String, Value),
        Method {
            name: String,
            flags: u8,
            body: Vec<u8>,
        },
    }

    struct Reader<'a> {
        b: &'a [u8],
        pos: usize,
    }

    impl<'a> Reader<'a> {
        fn done(&self) -> bool {
            self.pos == self.b.len()
        }

        fn take(&mut self, n: usize) -> &'a [u8] {
            assert!(
                self.pos + n <= self.b.len(),
                "AML runs past its package at {}",
                self.pos
            );
            let s = &self.b[self.pos..self.pos + n];
            self.pos += n;
            s
        }

        fn byte(&mut self) -> u8 {
            self.take(1)[0]
        }

        /// A PkgLength and the package it spans, which `self` skips.
        fn package(&mut self) -> Reader<'a> {
            let start = self.pos;
            let lead = self.byte();
            let follow = usize::from(lead >> 6);
            let mut len = usize::from(lead & if follow == 0 { 0x3f } else { 0x0f });
            for (i, b) in self.take(follow).iter().enumerate() {
                len |= usize::from(*b) << (4 + 8 * i);
            }
            assert!(follow == 0 || lead & 0x30 == 0, "reserved PkgLength bits");
            let end = start + len;
            assert!(
                end <= self.b.len(),
                "package at {start} runs past its parent"
            );
            let inner = Reader {
                b: &self.b[..end],
                pos: self.pos,
            };
            self.pos = end;
            inner
        }

        fn seg(&mut self) -> String {
            let seg = self.take(4);
            assert!(
                seg[0].is_ascii_uppercase() || seg[0] == b'_',
                "NameSeg {seg:?}"
            );
            assert!(
                seg.iter()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
            );
            String::from_utf8(seg.to_vec()).unwrap()
        }

        fn name(&mut self) -> String {
            let mut name = String::new();
            if self.b[self.pos] == b'\\' {
                self.pos += 1;
                name.push('\\');
            }
            let segs = match self.b[self.pos] {
                0x2e => {
                    self.pos += 1;
                    2
                }
                0x2f => {
                    self.pos += 1;
                    usize::from(self.byte())
                }
                _ => 1,
            };
            let segs: Vec<_> = (0..segs).map(|_| self.seg()).collect();
            name + &segs.join(".")
        }

        fn value(&mut self) -> Value {
            match self.byte() {
                0x00 => Value::Int(0),
                0x01 => Value::Int(1),
                0xff => Value::Int(u64::MAX),
                0x0a => Value::Int(self.byte().into()),
                0x0b => Value::Int(u16::from_le_bytes(self.take(2).try_into().unwrap()).into()),
                0x0c => Value::Int(u32::from_le_bytes(self.take(4).try_into().unwrap()).into()),
                0x0e => Value::Int(u64::from_le_bytes(self.take(8).try_into().unwrap())),
                0x0d => {
                    let len = self.b[self.pos..]
                        .iter()
                        .position(|c| *c == 0)
                        .expect("NUL");
                    let s = String::from_utf8(self.take(len).to_vec()).unwrap();
                    self.pos += 1;
                    Value::Str(s)
                }
                0x11 => {
                    let mut p = self.package();
                    let Value::Int(size) = p.value() else {
                        panic!("BufferSize")
                    };
                    let data = p.take(p.b.len() - p.pos).to_vec();
                    assert_eq!(data.len() as u64, size, "BufferSize");
                    Value::Buffer(data)
                }
                0x12 => {
                    let mut p = self.package();
                    let n = p.byte();
                    let elements = (0..n).map(|_| p.value()).collect();
                    assert!(p.done(), "Package longer than its elements");
                    Value::Package(elements)
                }
                op => panic!("unexpected data opcode {op:#x} at {}", self.pos - 1),
            }
        }

        fn terms(&mut self) -> Vec<Term> {
            let mut terms = Vec::new();
            while !self.done() {
                let term = match self.byte() {
                    0x10 => {
                        let mut p = self.package();
                        Term::Scope(p.name(), p.terms())
                    }
                    0x5b => {
                        assert_eq!(self.byte(), 0x82, "only DeviceOp is written");
                        let mut p = self.package();
                        Term::Device(p.name(), p.terms())
                    }
                    0x08 => Term::Name(self.name(), self.value()),
                    0x14 => {
                        let mut p = self.package();
                        let name = p.name();
                        let flags = p.byte();
                        Term::Method {
                            name,
                            flags,
                            body: p.take(p.b.len() - p.pos).to_vec(),
                        }
                    }
                    op => panic!("unexpected opcode {op:#x} at {}", self.pos - 1),
                };
                terms.push(term);
            }
            terms
        }
    }

    fn decode(dsdt: &[u8]) -> Vec<Term> {
        assert_eq!(dsdt[8], 2, "DSDT revision 2: 64-bit integers");
        Reader {
            b: &dsdt[36..],
            pos: 0,
        }
        .terms()
    }

    fn dsdt_of(cfg: &Config) -> Vec<Term> {
        let tables = built(cfg);
        decode(walk(&tables, ACPI_BASE).2)
    }

    /// The devices under `\_SB_`, by name.
    fn devices(root: &[Term]) -> Vec<(&str, &[Term])> {
        let sb: Vec<_> = root
            .iter()
            .filter_map(|t| match t {
                Term::Scope(name, children) if name == "\\_SB_" => Some(children),
                _ => None,
            })
            .collect();
        assert_eq!(sb.len(), 1, "one \\_SB_ scope");
        sb[0]
            .iter()
            .map(|t| match t {
                Term::Device(name, children) => (name.as_str(), children.as_slice()),
                other => panic!("not a device under \\_SB_: {other:?}"),
            })
            .collect()
    }

    fn named<'t>(children: &'t [Term], name: &str) -> &'t Value {
        children
            .iter()
            .find_map(|t| match t {
                Term::Name(n, v) if n == name => Some(v),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no {name}"))
    }

    /// EISAID("PNP0501") and EISAID("PNP0C0C"), as ACPICA's compressed ids.
    const EISA_PNP0501: u64 = 0x0105_d041;
    const EISA_PNP0C0C: u64 = 0x0c0c_d041;

    /// `_CRS` of a virtio-mmio window: Memory32Fixed (ReadWrite, base, size) and the extended
    /// interrupt descriptor with flags 0b0001 (consumer, level, active high, exclusive).
    fn virtio_crs(d: &VirtioMmio) -> Vec<u8> {
        let mut crs = vec![0x86, 9, 0, 1];
        crs.extend_from_slice(&low32(d.base).to_le_bytes());
        crs.extend_from_slice(&d.size.to_le_bytes());
        crs.extend_from_slice(&[0x89, 6, 0, 0b0001, 1]);
        crs.extend_from_slice(&d.gsi.to_le_bytes());
        crs.extend_from_slice(&[0x79, 0]);
        crs
    }

    #[test]
    fn dsdt_has_s5_and_com1_without_devices() {
        let root = dsdt_of(&config(1, &[], None));
        assert_eq!(root.len(), 2, "\\_S5_ and \\_SB_");
        let s5 = S5_SLP_TYP.into();
        let Term::Name(name, value) = &root[0] else {
            panic!("{:?}", root[0])
        };
        assert_eq!(name, "_S5_");
        assert_eq!(
            *value,
            Value::Package(vec![
                Value::Int(s5),
                Value::Int(s5),
                Value::Int(0),
                Value::Int(0)
            ])
        );

        let devs = devices(&root);
        assert_eq!(
            devs.iter().map(|d| d.0).collect::<Vec<_>>(),
            ["COM1", "PEVT"]
        );
        let pevt = devs[1].1;
        assert_eq!(*named(pevt, "_HID"), Value::Str("QEMU0001".into()));
        // IO (Decode16, 0x505, 0x505, 1, 1), EndTag.
        let crs = [0x47, 1, 0x05, 5, 0x05, 5, 1, 1, 0x79, 0];
        assert_eq!(*named(pevt, "_CRS"), Value::Buffer(crs.to_vec()));
        let com1 = devs[0].1;
        assert_eq!(*named(com1, "_HID"), Value::Int(EISA_PNP0501));
        assert_eq!(*named(com1, "_UID"), Value::Int(1));
        // IO (Decode16, 0x3f8, 0x3f8, 1, 8), IRQNoFlags () {4}, EndTag.
        let crs = [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8, 0x22, 0x10, 0, 0x79, 0];
        assert_eq!(*named(com1, "_CRS"), Value::Buffer(crs.to_vec()));
    }

    #[test]
    fn dsdt_describes_eight_virtio_windows() {
        let windows: Vec<_> = (0..8).map(window).collect();
        let root = dsdt_of(&config(2, &windows, None));
        let devs = devices(&root);
        let names: Vec<_> = devs.iter().map(|d| d.0).collect();
        assert_eq!(
            names,
            [
                "COM1", "PEVT", "VR00", "VR01", "VR02", "VR03", "VR04", "VR05", "VR06", "VR07"
            ]
        );
        for (i, (w, (_, dev))) in windows.iter().zip(&devs[2..]).enumerate() {
            assert_eq!(*named(dev, "_HID"), Value::Str("LNRO0005".into()));
            assert_eq!(*named(dev, "_UID"), Value::Int(i as u64), "distinct _UIDs");
            assert_eq!(*named(dev, "_CCA"), Value::Int(1));
            assert_eq!(*named(dev, "_CRS"), Value::Buffer(virtio_crs(w)));
        }
    }

    #[test]
    fn dsdt_window_bytes_are_exact() {
        // An odd base, size and GSI so that every byte of the descriptors is seen.
        let w = VirtioMmio {
            base: 0xfe12_3400,
            size: 0x200,
            gsi: 21,
        };
        let tables = built(&config(1, &[w], None));
        let dsdt = walk(&tables, ACPI_BASE).2;
        let string_hid = b"\x08_HID\x0dLNRO0005\x00";
        assert!(dsdt.windows(string_hid.len()).any(|s| s == string_hid));
        let crs = [
            0x86, 0x09, 0x00, 0x01, 0x00, 0x34, 0x12, 0xfe, 0x00, 0x02, 0x00,
            0x00, // Memory32Fixed
            0x89, 0x06, 0x00, 0x01, 0x01, 0x15, 0x00, 0x00, 0x00, // Interrupt (Level) {21}
            0x79, 0x00,
        ];
        assert_eq!(virtio_crs(&w), crs);
        // Name (_CRS, Buffer (PkgLength, BufferSize 23) {...}): the PkgLength counts itself,
        // the BufferSize and the data.
        let mut name = b"\x08_CRS\x11".to_vec();
        name.extend_from_slice(&[1 + 2 + 23, 0x0a, 23]);
        name.extend_from_slice(&crs);
        assert!(dsdt.windows(name.len()).any(|s| s == name));
    }

    #[test]
    fn dsdt_power_button_and_ged() {
        let root = dsdt_of(&config(1, &[window(0)], Some(23)));
        let devs = devices(&root);
        assert_eq!(
            devs.iter().map(|d| d.0).collect::<Vec<_>>(),
            ["COM1", "PEVT", "VR00", "PWRB", "GED0"]
        );
        let pwrb = devs[3].1;
        assert_eq!(*named(pwrb, "_HID"), Value::Int(EISA_PNP0C0C));
        let ged = devs[4].1;
        assert_eq!(*named(ged, "_HID"), Value::Str("ACPI0013".into()));
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {23}.
        let crs = [0x89, 6, 0, 0b0011, 1, 23, 0, 0, 0, 0x79, 0];
        assert_eq!(*named(ged, "_CRS"), Value::Buffer(crs.to_vec()));
        let evt: Vec<_> = ged
            .iter()
            .filter_map(|t| match t {
                Term::Method { name, flags, body } if name == "_EVT" => Some((*flags, body)),
                _ => None,
            })
            .collect();
        // One argument, serialized: If (LEqual (Arg0, 23)) { Notify (\_SB_.PWRB, 0x80) }.
        let mut body = vec![0xa0, 18, 0x93, 0x68, 0x0a, 23, 0x86];
        body.extend_from_slice(b"\\\x2e_SB_PWRB");
        body.extend_from_slice(&[0x0a, 0x80]);
        assert_eq!(evt, [(0b1001, &body)]);
    }

    #[test]
    fn no_power_button_without_its_gsi() {
        let tables = built(&config(1, &[window(0)], None));
        let dsdt = walk(&tables, ACPI_BASE).2;
        for absent in [&b"ACPI0013"[..], b"PWRB", b"GED0", b"_EVT"] {
            assert!(!dsdt.windows(absent.len()).any(|s| s == absent));
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        use BuildError as E;
        let w = window;
        let err = |cfg: Config, base| build(&cfg, base).unwrap_err();
        assert_eq!(err(config(0, &[], None), ACPI_BASE), E::VcpuCount(0));
        assert_eq!(err(config(256, &[], None), ACPI_BASE), E::VcpuCount(256));
        let bad_oem = Config {
            oem_id: *b"HV\0RST",
            ..config(1, &[], None)
        };
        assert_eq!(err(bad_oem, ACPI_BASE), E::OemId(*b"HV\0RST"));
        assert_eq!(
            err(config(1, &[], None), ACPI_BASE + 8),
            E::BaseMisaligned(ACPI_BASE + 8)
        );
        assert_eq!(
            err(config(1, &[], None), 1 << 32),
            E::TablesAbove4G(1 << 32)
        );
        assert_eq!(
            err(config(1, &[], None), 0xffff_0000),
            E::TablesAbove4G(0xffff_0000)
        );
        assert_eq!(
            err(config(1, &[], None), u64::MAX - 15),
            E::TablesAbove4G(u64::MAX - 15)
        );

        let user = LineUser::Virtio(1);
        let high = VirtioMmio { gsi: 24, ..w(1) };
        assert_eq!(
            err(config(1, &[w(0), high], None), ACPI_BASE),
            E::GsiOutOfRange { user, gsi: 24 }
        );
        let huge = VirtioMmio {
            gsi: u32::MAX,
            ..w(1)
        };
        let gsi = u32::MAX;
        assert_eq!(
            err(config(1, &[w(0), huge], None), ACPI_BASE),
            E::GsiOutOfRange { user, gsi }
        );
        let isa = VirtioMmio { gsi: 4, ..w(1) };
        assert_eq!(
            err(config(1, &[w(0), isa], None), ACPI_BASE),
            E::GsiIsIsa { user, gsi: 4 }
        );
        let user = LineUser::PowerButton;
        assert_eq!(
            err(config(1, &[], Some(15)), ACPI_BASE),
            E::GsiIsIsa { user, gsi: 15 }
        );
        let shared = E::GsiShared {
            user,
            other: LineUser::Virtio(0),
            gsi: 16,
        };
        assert_eq!(err(config(1, &[w(0)], Some(16)), ACPI_BASE), shared);
        let twice = VirtioMmio { gsi: 16, ..w(1) };
        let shared = E::GsiShared {
            user: LineUser::Virtio(1),
            other: LineUser::Virtio(0),
            gsi: 16,
        };
        assert_eq!(err(config(1, &[w(0), twice], None), ACPI_BASE), shared);
        let nine: Vec<_> = (0..9).map(w).collect();
        let ninth = LineUser::Virtio(8);
        assert_eq!(
            err(config(1, &nine, None), ACPI_BASE),
            E::GsiOutOfRange {
                user: ninth,
                gsi: 24
            }
        );

        let empty = VirtioMmio { size: 0, ..w(0) };
        assert_eq!(err(config(1, &[empty], None), ACPI_BASE), E::WindowEmpty(0));
        let above = VirtioMmio {
            base: 0xffff_f800,
            ..w(0)
        };
        assert_eq!(
            err(config(1, &[above], None), ACPI_BASE),
            E::WindowAbove4G(0)
        );
        let wrap = VirtioMmio {
            base: u64::MAX - 0xfff,
            ..w(0)
        };
        assert_eq!(
            err(config(1, &[wrap], None), ACPI_BASE),
            E::WindowAbove4G(0)
        );
        let overlap = VirtioMmio {
            base: w(0).base + 0xfff,
            ..w(1)
        };
        assert_eq!(
            err(config(1, &[w(0), overlap], None), ACPI_BASE),
            E::WindowsOverlap(0, 1)
        );
        for base in [LAPIC_BASE, IOAPIC_BASE - 0x800, IOAPIC_BASE + 0xfff] {
            let apic = VirtioMmio { base, ..w(0) };
            assert_eq!(
                err(config(1, &[apic], None), ACPI_BASE),
                E::WindowOverlapsApic(0)
            );
        }
        let on_tables = VirtioMmio {
            base: ACPI_BASE + 0x100,
            ..w(0)
        };
        assert_eq!(
            err(config(1, &[on_tables], None), ACPI_BASE),
            E::WindowOverlapsTables(0)
        );
        let after_tables = VirtioMmio {
            base: ACPI_BASE + 0x1_0000,
            ..w(0)
        };
        assert!(build(&config(1, &[after_tables], None), ACPI_BASE).is_ok());
    }

    #[test]
    fn errors_say_who_is_to_blame() {
        let e = BuildError::GsiShared {
            user: LineUser::PowerButton,
            other: LineUser::Virtio(3),
            gsi: 19,
        };
        assert_eq!(
            format!("{e}"),
            "the power button: GSI 19 is already used by virtio-mmio device 3"
        );
        let e = BuildError::GsiIsIsa {
            user: LineUser::Virtio(0),
            gsi: 4,
        };
        assert_eq!(
            format!("{e}"),
            "virtio-mmio device 0: GSI 4 is an ISA IRQ; devices use 16..24"
        );
        assert_eq!(
            format!("{}", BuildError::VcpuCount(0)),
            "0 vCPUs: the tables describe 1..=255"
        );
    }

    #[test]
    fn building_is_deterministic() {
        let windows: Vec<_> = (0..3).map(window).collect();
        let cfg = config(3, &windows, Some(20));
        assert_eq!(built(&cfg), built(&cfg));
    }
}
