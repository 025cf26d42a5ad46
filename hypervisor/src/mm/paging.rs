//! The hypervisor's own page tables: an identity map of physical memory with W^X permissions.
//!
//! Everything is mapped writable and non-executable with 2 MiB pages, write-back where the
//! firmware reports RAM and uncached elsewhere (device MMIO such as the local APIC), except:
//! the image's text is read-only and executable, its rodata read-only, its data and bss
//! writable; the AP trampoline page is read-only and executable; page 0 and every stack guard
//! page are not present. No page is both writable and executable.

use super::frames::FrameAllocator;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// Permissions of one 4 KiB page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    NotPresent,
    ReadExecute,
    ReadOnly,
    ReadWrite,
}

/// A set of page tables under construction or in use.
pub struct PageTables {
    pml4: u64,
    /// `NO_EXECUTE` when EFER.NXE is on, else 0 (the bit is reserved without NX).
    nx: u64,
}

fn table(addr: u64) -> *mut u64 {
    addr as *mut u64
}

fn new_table(frames: &mut FrameAllocator) -> u64 {
    // Below 4 GiB: APs load CR3 in 32-bit mode.
    let f = frames
        .alloc_contiguous(1, 4096, 4 * GIB)
        .expect("out of memory below 4 GiB for page tables")
        .keep_forever()
        .0;
    // SAFETY: a fresh frame owned by these page tables, identity-mapped (crate assumptions).
    unsafe { core::ptr::write_bytes(table(f), 0, 512) };
    f
}

fn entry(t: u64, index: usize) -> *mut u64 {
    // SAFETY (of the arithmetic): `index` < 512 and `t` is a table frame's address.
    table(t).wrapping_add(index)
}

impl PageTables {
    /// Identity-maps `[0, top)` (rounded up to 1 GiB, at least 4 GiB) with 2 MiB pages,
    /// cacheable where `is_ram(2 MiB chunk)` says so.
    pub fn identity(
        frames: &mut FrameAllocator,
        top: u64,
        nx_enabled: bool,
        is_ram: impl Fn(u64, u64) -> bool,
    ) -> PageTables {
        let nx = if nx_enabled { NO_EXECUTE } else { 0 };
        let pml4 = new_table(frames);
        let top = top.max(4 * GIB).next_multiple_of(GIB);
        for gib in 0..top / GIB {
            let (l4, l3) = ((gib / 512) as usize, (gib % 512) as usize);
            // SAFETY: `pml4` and the tables below are frames owned by this structure.
            unsafe {
                let e4 = entry(pml4, l4);
                if *e4 & PRESENT == 0 {
                    *e4 = new_table(frames) | PRESENT | WRITABLE;
                }
                let pdpt = *e4 & ADDR_MASK;
                let pd = new_table(frames);
                *entry(pdpt, l3) = pd | PRESENT | WRITABLE;
                for i in 0..512u64 {
                    let base = gib * GIB + i * MIB2;
                    let cache = if is_ram(base, base + MIB2) {
                        0
                    } else {
                        CACHE_DISABLE | WRITE_THROUGH
                    };
                    *entry(pd, i as usize) = base | PRESENT | WRITABLE | HUGE | nx | cache;
                }
            }
        }
        PageTables { pml4, nx }
    }

    /// Sets the permissions of the 4 KiB pages covering `[start, end)`, splitting 2 MiB pages.
    pub fn protect(&mut self, frames: &mut FrameAllocator, start: u64, end: u64, access: Access) {
        let mut page = start & !0xfff;
        while page < end {
            let pte = self.pte(frames, page);
            // SAFETY: `pte` points into a table frame owned by this structure.
            unsafe {
                let keep = *pte & (CACHE_DISABLE | WRITE_THROUGH);
                *pte = match access {
                    Access::NotPresent => 0,
                    Access::ReadExecute => page | PRESENT | keep,
                    Access::ReadOnly => page | PRESENT | self.nx | keep,
                    Access::ReadWrite => page | PRESENT | WRITABLE | self.nx | keep,
                };
            }
            page += 4096;
        }
    }

    /// The 4 KiB entry for `addr`, splitting its 2 MiB page first if needed.
    fn pte(&mut self, frames: &mut FrameAllocator, addr: u64) -> *mut u64 {
        let idx = |shift: u32| ((addr >> shift) & 511) as usize;
        // SAFETY: walks tables owned by this structure; every level below 4 GiB..top exists
        // because `identity` built it, and `addr` is inside the mapped range.
        unsafe {
            let pdpt = *entry(self.pml4, idx(39)) & ADDR_MASK;
            let pd = *entry(pdpt, idx(30)) & ADDR_MASK;
            let pde = entry(pd, idx(21));
            if *pde & HUGE != 0 {
                let flags = *pde & !(ADDR_MASK | HUGE);
                let base = *pde & ADDR_MASK;
                let pt = new_table(frames);
                for i in 0..512u64 {
                    *entry(pt, i as usize) = (base + i * 4096) | flags;
                }
                *pde = pt | PRESENT | WRITABLE;
            }
            let pt = *pde & ADDR_MASK;
            entry(pt, idx(12))
        }
    }

    /// Physical address of the top-level table (what CR3 holds).
    pub fn root(&self) -> u64 {
        self.pml4
    }

    /// Switches this CPU to these tables.
    ///
    /// # Safety
    /// The tables must map everything this CPU touches from now on (its stack, code, data,
    /// the heap, devices) as it expects: this replaces the whole address space.
    pub unsafe fn activate(&self) {
        // SAFETY: forwarded from this function's contract; PCID is not used, so the flags are 0.
        unsafe {
            core::arch::asm!("mov cr3, {}", in(reg) self.pml4, options(nostack, preserves_flags));
        }
    }
}
