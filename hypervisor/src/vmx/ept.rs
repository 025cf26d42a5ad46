//! Extended page tables (SDM Vol. 3C §28.3): a domain's guest-physical to host-physical map.
//!
//! The builder works over a [`TableFrames`] source so it runs on the host with tables in plain
//! memory and on bare metal with frames from the allocator. Mappings use 1 GiB and 2 MiB pages
//! wherever both addresses and the remaining length allow, else 4 KiB pages. Invariants: every
//! present non-leaf entry points at a table this builder allocated; a range is never mapped
//! twice (remapping is refused, not silently overwritten).

/// Where page-table frames come from.
pub trait TableFrames {
    /// A zeroed 4 KiB table; its host-physical address.
    fn alloc_table(&mut self) -> Option<u64>;
    /// The 512 entries of the table at `addr` (an address `alloc_table` returned).
    fn entries(&mut self, addr: u64) -> &mut [u64; 512];
}

/// EPT memory type of a leaf (SDM Vol. 3C §28.3.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemType {
    Uncached = 0,
    WriteBack = 6,
}

/// Access rights of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perm {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

impl Perm {
    pub const RWX: Perm = Perm {
        read: true,
        write: true,
        execute: true,
    };
    pub const RW: Perm = Perm {
        read: true,
        write: true,
        execute: false,
    };
    pub const RX: Perm = Perm {
        read: true,
        write: false,
        execute: true,
    };

    fn bits(self) -> u64 {
        u64::from(self.read) | u64::from(self.write) << 1 | u64::from(self.execute) << 2
    }

    fn from_bits(b: u64) -> Perm {
        Perm {
            read: b & 1 != 0,
            write: b & 2 != 0,
            execute: b & 4 != 0,
        }
    }
}

/// Why a mapping was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    /// Addresses or length not 4 KiB aligned.
    Unaligned,
    /// Beyond the 48-bit guest-physical space of a 4-level EPT.
    OutOfRange,
    /// Part of the range is already mapped.
    AlreadyMapped(u64),
    /// No frame for a table.
    OutOfMemory,
}

const ADDR: u64 = 0x000f_ffff_ffff_f000;
const LARGE: u64 = 1 << 7;
const IGNORE_PAT: u64 = 1 << 6;
const KIB4: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB1: u64 = 1 << 30;
const GPA_LIMIT: u64 = 1 << 48;

/// One leaf of an EPT: guest-physical `gpa..gpa + len` maps host-physical `hpa..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub gpa: u64,
    pub hpa: u64,
    pub len: u64,
    pub perm: Perm,
    /// EPT memory type (bits 5:3 of the entry; 6 is write-back).
    pub mem_type: u8,
    pub ignore_pat: bool,
}

/// Which large pages the CPU offers (from `VmxCaps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSizes {
    pub two_mib: bool,
    pub one_gib: bool,
}

/// An EPT pointer (SDM Vol. 3C §25.6.11): made only by [`Ept::eptp`], from the EPT that owns
/// the root table, so the VMCS never receives a host address from anywhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eptp(u64);

impl Eptp {
    /// The value the VMCS field takes.
    pub fn value(self) -> u64 {
        self.0
    }
}

/// One domain's EPT.
#[derive(Debug)]
pub struct Ept {
    root: u64,
    sizes: PageSizes,
    tables: usize,
}

fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * level)) & 511) as usize
}

impl Ept {
    pub fn new(frames: &mut impl TableFrames, sizes: PageSizes) -> Result<Ept, EptError> {
        let root = frames.alloc_table().ok_or(EptError::OutOfMemory)?;
        Ok(Ept {
            root,
            sizes,
            tables: 1,
        })
    }

    /// Host-physical address of the PML4 table.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Tables allocated so far (root included).
    pub fn table_count(&self) -> usize {
        self.tables
    }

    /// The EPT pointer for the VMCS: WB paging structures, 4-level walk, A/D flags if asked
    /// (SDM Vol. 3C §24.6.11).
    pub fn eptp(&self, accessed_dirty: bool) -> Eptp {
        Eptp(self.root | 6 | (3 << 3) | u64::from(accessed_dirty) << 6)
    }

    /// Maps `[gpa, gpa + len)` to `[hpa, hpa + len)`.
    pub fn map(
        &mut self,
        frames: &mut impl TableFrames,
        gpa: u64,
        hpa: u64,
        len: u64,
        perm: Perm,
        mem: MemType,
    ) -> Result<(), EptError> {
        if !(gpa | hpa | len).is_multiple_of(KIB4) {
            return Err(EptError::Unaligned);
        }
        let end = gpa
            .checked_add(len)
            .filter(|&e| e <= GPA_LIMIT)
            .ok_or(EptError::OutOfRange)?;
        // Refuse overlaps before changing anything, so a refused map leaves the tables as they were.
        let mut probe = gpa;
        while probe < end {
            match self.unmapped_span(frames, probe) {
                None => return Err(EptError::AlreadyMapped(probe)),
                // Skip to the end of the empty entry that covers `probe`.
                Some(span) => probe = (probe & !(span - 1)) + span,
            }
        }
        let leaf = perm.bits() | (mem as u64) << 3 | IGNORE_PAT;
        let (mut g, mut h) = (gpa, hpa);
        while g < end {
            let left = end - g;
            let fits = |size: u64| g % size == 0 && h % size == 0 && left >= size;
            let (level, size) = if self.sizes.one_gib && fits(GIB1) {
                (2, GIB1)
            } else if self.sizes.two_mib && fits(MIB2) {
                (1, MIB2)
            } else {
                (0, KIB4)
            };
            let table = self.walk_create(frames, g, level)?;
            let e = &mut frames.entries(table)[index(g, level)];
            *e = h | leaf | if level > 0 { LARGE } else { 0 };
            g += size;
            h += size;
        }
        Ok(())
    }

    /// The table at `level` (0 = page table) covering `gpa`, creating tables on the way.
    fn walk_create(
        &mut self,
        frames: &mut impl TableFrames,
        gpa: u64,
        level: u32,
    ) -> Result<u64, EptError> {
        let mut table = self.root;
        for l in (level + 1..=3).rev() {
            let i = index(gpa, l);
            let e = frames.entries(table)[i];
            table = if e & 7 != 0 {
                debug_assert!(
                    e & LARGE == 0,
                    "walk through a large page (overlap check missed)"
                );
                e & ADDR
            } else {
                let t = frames.alloc_table().ok_or(EptError::OutOfMemory)?;
                self.tables += 1;
                frames.entries(table)[i] = t | 7;
                t
            };
        }
        Ok(table)
    }

    /// `None` if `gpa` is mapped, else the size of the empty entry covering it.
    fn unmapped_span(&self, frames: &mut impl TableFrames, gpa: u64) -> Option<u64> {
        let mut table = self.root;
        for level in (0..=3).rev() {
            let e = frames.entries(table)[index(gpa, level)];
            if e & 7 == 0 {
                return Some(1u64 << (12 + 9 * level));
            }
            if level == 0 || e & LARGE != 0 {
                return None;
            }
            table = e & ADDR;
        }
        None
    }

    fn lookup(&self, frames: &mut impl TableFrames, gpa: u64) -> Option<(u64, u64)> {
        let mut table = self.root;
        for level in (0..=3).rev() {
            let e = frames.entries(table)[index(gpa, level)];
            if e & 7 == 0 {
                return None;
            }
            if level == 0 || e & LARGE != 0 {
                let size = 1u64 << (12 + 9 * level);
                return Some(((e & ADDR & !(size - 1)) + (gpa & (size - 1)), e));
            }
            table = e & ADDR;
        }
        None
    }

    /// Where `gpa` lands in host memory, with the mapping's rights.
    pub fn translate(&self, frames: &mut impl TableFrames, gpa: u64) -> Option<(u64, Perm)> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        self.lookup(frames, gpa)
            .map(|(hpa, e)| (hpa, Perm::from_bits(e & 7)))
    }

    /// Every leaf mapping, in guest-physical order: what the EPT really maps (for the audit).
    pub fn leaves(&self, frames: &mut impl TableFrames) -> alloc::vec::Vec<Leaf> {
        let mut out = alloc::vec::Vec::new();
        self.leaves_in(frames, self.root, 3, 0, &mut out);
        out
    }

    fn leaves_in(
        &self,
        frames: &mut impl TableFrames,
        table: u64,
        level: u32,
        base: u64,
        out: &mut alloc::vec::Vec<Leaf>,
    ) {
        let entries = *frames.entries(table);
        for (i, &e) in entries.iter().enumerate() {
            if e & 7 == 0 {
                continue;
            }
            let size = 1u64 << (12 + 9 * level);
            let gpa = base + i as u64 * size;
            if level == 0 || e & LARGE != 0 {
                out.push(Leaf {
                    gpa,
                    hpa: e & ADDR & !(size - 1),
                    len: size,
                    perm: Perm::from_bits(e & 7),
                    mem_type: ((e >> 3) & 7) as u8,
                    ignore_pat: e & IGNORE_PAT != 0,
                });
            } else {
                self.leaves_in(frames, e & ADDR, level - 1, gpa, out);
            }
        }
    }

    /// Every table frame, for freeing the EPT (the root last).
    pub fn tables(&self, frames: &mut impl TableFrames) -> alloc::vec::Vec<u64> {
        let mut out = alloc::vec::Vec::new();
        let mut stack = alloc::vec![(self.root, 3u32)];
        while let Some((t, level)) = stack.pop() {
            if level > 0 {
                for &e in frames.entries(t).iter() {
                    if e & 7 != 0 && e & LARGE == 0 {
                        stack.push((e & ADDR, level - 1));
                    }
                }
            }
            out.push(t);
        }
        out.reverse();
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Tables in a map keyed by fake host-physical addresses.
    #[derive(Default)]
    pub(crate) struct HeapTables {
        pub tables: HashMap<u64, Box<[u64; 512]>>,
        next: u64,
    }

    impl TableFrames for HeapTables {
        fn alloc_table(&mut self) -> Option<u64> {
            self.next += 4096;
            let a = 0x7000_0000_0000 + self.next;
            self.tables.insert(a, Box::new([0; 512]));
            Some(a)
        }
        fn entries(&mut self, addr: u64) -> &mut [u64; 512] {
            self.tables.get_mut(&addr).expect("table exists")
        }
    }

    const ALL: PageSizes = PageSizes {
        two_mib: true,
        one_gib: true,
    };

    #[test]
    fn large_pages_where_alignment_allows() {
        let mut f = HeapTables::default();
        let mut ept = Ept::new(&mut f, ALL).unwrap();
        // 2 GiB + 2 MiB + 8 KiB: two 1 GiB pages, one 2 MiB page, two 4 KiB pages.
        let len = 2 * GIB1 + MIB2 + 2 * KIB4;
        ept.map(&mut f, 0, 0x1_0000_0000, len, Perm::RWX, MemType::WriteBack)
            .unwrap();
        // root + PDPT + PD (for the 2 MiB and the PT) + PT
        assert_eq!(ept.table_count(), 4);
        assert_eq!(ept.translate(&mut f, 0x1234).unwrap().0, 0x1_0000_1234);
        assert_eq!(ept.translate(&mut f, GIB1 + 5).unwrap().0, 0x1_4000_0005);
        assert_eq!(
            ept.translate(&mut f, 2 * GIB1 + MIB2 + 4096 + 8).unwrap().0,
            0x1_8020_1008
        );
        assert_eq!(ept.translate(&mut f, len), None);
        let (_, perm) = ept.translate(&mut f, 0).unwrap();
        assert_eq!(perm, Perm::RWX);
        // Leaf memory type WB (6 << 3), ignore-PAT, large page bit on the 1 GiB entry.
        let pdpt = f.entries(ept.root())[0] & ADDR;
        let e = f.entries(pdpt)[0];
        assert_eq!(e & 0x3f, 7 | 6 << 3);
        assert!(e & LARGE != 0 && e & IGNORE_PAT != 0);
    }

    #[test]
    fn misaligned_host_address_falls_back_to_small_pages() {
        let mut f = HeapTables::default();
        let mut ept = Ept::new(&mut f, ALL).unwrap();
        ept.map(&mut f, 0, 0x20_1000, MIB2, Perm::RW, MemType::WriteBack)
            .unwrap();
        assert_eq!(
            ept.table_count(),
            4,
            "root, PDPT, PD and one PT of 4 KiB pages"
        );
        assert_eq!(ept.translate(&mut f, 0x1f_f000).unwrap().0, 0x40_0000);
    }

    #[test]
    fn without_large_page_support_only_4k() {
        let mut f = HeapTables::default();
        let mut ept = Ept::new(
            &mut f,
            PageSizes {
                two_mib: false,
                one_gib: false,
            },
        )
        .unwrap();
        ept.map(&mut f, 0, 0, 4 * MIB2, Perm::RWX, MemType::WriteBack)
            .unwrap();
        assert_eq!(ept.table_count(), 3 + 4);
    }

    #[test]
    fn overlap_and_bad_ranges_are_refused_without_change() {
        let mut f = HeapTables::default();
        let mut ept = Ept::new(&mut f, ALL).unwrap();
        ept.map(&mut f, MIB2, 0, MIB2, Perm::RWX, MemType::WriteBack)
            .unwrap();
        let before = ept.table_count();
        assert_eq!(
            ept.map(
                &mut f,
                0,
                0x4000_0000,
                3 * MIB2,
                Perm::RWX,
                MemType::WriteBack
            ),
            Err(EptError::AlreadyMapped(MIB2))
        );
        assert_eq!(ept.table_count(), before);
        assert_eq!(
            ept.translate(&mut f, 0),
            None,
            "nothing of the refused map was written"
        );
        assert_eq!(
            ept.map(&mut f, 1, 0, 4096, Perm::RWX, MemType::WriteBack),
            Err(EptError::Unaligned)
        );
        assert_eq!(
            ept.map(
                &mut f,
                (1 << 48) - 4096,
                0,
                8192,
                Perm::RWX,
                MemType::WriteBack
            ),
            Err(EptError::OutOfRange)
        );
        assert_eq!(ept.translate(&mut f, !0xfff), None);
    }

    #[test]
    fn leaves_list_what_is_mapped() {
        let mut f = HeapTables::default();
        let mut ept = Ept::new(&mut f, ALL).unwrap();
        ept.map(
            &mut f,
            0,
            0x4000_0000,
            2 * MIB2,
            Perm::RWX,
            MemType::WriteBack,
        )
        .unwrap();
        ept.map(
            &mut f,
            0xfee0_0000,
            0x9000,
            KIB4,
            Perm::RW,
            MemType::Uncached,
        )
        .unwrap();
        let l = ept.leaves(&mut f);
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!((l[0].gpa, l[0].hpa, l[0].len), (0, 0x4000_0000, MIB2));
        assert_eq!((l[1].gpa, l[1].hpa), (MIB2, 0x4000_0000 + MIB2));
        assert_eq!((l[2].gpa, l[2].hpa, l[2].len), (0xfee0_0000, 0x9000, KIB4));
        assert_eq!((l[0].mem_type, l[2].mem_type), (6, 0));
        assert!(l[0].perm.execute && !l[2].perm.execute && l[0].ignore_pat);
    }

    #[test]
    fn eptp_and_table_list() {
        let mut f = HeapTables::default();
        let mut ept = Ept::new(&mut f, ALL).unwrap();
        ept.map(&mut f, 0, 0, 4096, Perm::RWX, MemType::Uncached)
            .unwrap();
        assert_eq!(ept.eptp(true).value(), ept.root() | 0x5e);
        assert_eq!(ept.eptp(false).value(), ept.root() | 0x1e);
        let tables = ept.tables(&mut f);
        assert_eq!(tables.len(), 4);
        assert_eq!(*tables.last().unwrap(), ept.root());
    }
}
