//! ACPI, through the `acpi` crate (no AML): finds the RSDP (from the loader, else by the BIOS
//! search) and reads the MADT's list of local APICs, which is the list of CPUs.

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use heapless::Vec;

use crate::arch::percpu::MAX_CPUS;

/// ACPI tables are reached through the identity map.
#[derive(Clone, Copy, Debug)]
struct IdentityMapped;

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        // SAFETY: physical memory is identity-mapped (crate-level assumptions), so the physical
        // address is the virtual one; the crate only asks for table ranges it validated.
        unsafe {
            PhysicalMapping::new(
                phys,
                NonNull::new(phys as *mut T).expect("ACPI table at physical 0"),
                size,
                size,
                *self,
            )
        }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// What the MADT says about the machine's CPUs.
#[derive(Debug, Default)]
pub struct CpuTopology {
    /// APIC ids of enabled (or online-capable) CPUs, in MADT order.
    pub apic_ids: Vec<u32, MAX_CPUS>,
    /// CPUs listed beyond [`MAX_CPUS`].
    pub dropped: usize,
    pub lapic_address: u64,
}

/// Reads the MADT. `rsdp` is the loader's copy, if it gave one.
pub fn cpu_topology(rsdp: Option<u64>) -> Result<CpuTopology, acpi::AcpiError> {
    // SAFETY: the RSDP address comes from the loader's boot information, or the BIOS areas are
    // searched; both are identity-mapped and the crate validates checksums before use.
    let tables = unsafe {
        match rsdp {
            Some(addr) => AcpiTables::from_rsdp(IdentityMapped, addr as usize),
            None => AcpiTables::search_for_rsdp_bios(IdentityMapped),
        }
    }?;
    let madt = tables.find_table::<Madt>()?;
    let mut topo = CpuTopology {
        lapic_address: u64::from(madt.get().local_apic_address),
        ..Default::default()
    };
    for entry in madt.get().entries() {
        let (id, flags) = match entry {
            MadtEntry::LocalApic(e) => (u32::from(e.apic_id), e.flags),
            MadtEntry::LocalX2Apic(e) => (e.x2apic_id, e.flags),
            _ => continue,
        };
        // Bit 0: enabled; bit 1: online capable (ACPI 6.5 §5.2.12.2).
        if flags & 0b11 == 0 || topo.apic_ids.contains(&id) {
            continue;
        }
        if topo.apic_ids.push(id).is_err() {
            topo.dropped += 1;
        }
    }
    Ok(topo)
}
