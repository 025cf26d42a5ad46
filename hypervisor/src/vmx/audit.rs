//! The EPT audit: checks that a domain's EPT maps exactly what it should — its own RAM chunks at
//! their guest-physical places, write-back, and the device windows it was given (dom0's
//! controllers' memory BARs: at their own addresses, uncached, never executable) — and nothing
//! else: no hypervisor memory, no other domain's frames, no page-table frame, nothing outside
//! RAM (other MMIO reaches devices through EPT violations). Pure over the leaves of
//! [`super::ept::Ept::leaves`]; the console's `audit` runs it over every live domain and every
//! Bochs scenario ends with it.

use alloc::vec::Vec;

use super::ept::Leaf;

/// What a domain owns: its RAM as host chunks of `chunk` bytes, chunk i at guest-physical
/// `i * chunk`, the frames of its EPT tables, and device register windows (base, length)
/// passed through to it.
pub struct Owned<'a> {
    pub chunk: u64,
    pub chunks: &'a [u64],
    pub tables: &'a [u64],
    pub devices: &'a [(u64, u64)],
}

/// Something the EPT maps that it should not, or does not map that it should.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A leaf whose host range is not the domain's chunk for that guest address.
    NotOwned { gpa: u64, hpa: u64, len: u64 },
    /// A leaf covering one of the domain's own EPT tables (it could rewrite its EPT).
    MapsTable { gpa: u64, table: u64 },
    /// RAM mapped with another memory type than write-back, or without ignore-PAT.
    CacheType { gpa: u64, mem_type: u8 },
    /// Guest RAM the EPT does not map (a hole in what the domain was given).
    Unmapped { gpa: u64 },
    /// A device window mapped elsewhere than its own address, cached, or executable.
    Device { gpa: u64 },
}

impl core::fmt::Display for Violation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Violation::NotOwned { gpa, hpa, len } => write!(
                f,
                "guest-physical {gpa:#x} maps host {hpa:#x}+{len:#x}, which is not this domain's RAM there"
            ),
            Violation::MapsTable { gpa, table } => {
                write!(
                    f,
                    "guest-physical {gpa:#x} maps its own EPT table {table:#x}"
                )
            }
            Violation::CacheType { gpa, mem_type } => {
                write!(
                    f,
                    "guest-physical {gpa:#x} has memory type {mem_type}, not write-back"
                )
            }
            Violation::Unmapped { gpa } => {
                write!(f, "RAM at guest-physical {gpa:#x} is not mapped")
            }
            Violation::Device { gpa } => write!(
                f,
                "device window at guest-physical {gpa:#x} is not an uncached, non-executable identity mapping"
            ),
        }
    }
}

/// Every violation in `leaves` (empty: the EPT maps exactly the domain's RAM).
pub fn audit(leaves: &[Leaf], owned: &Owned<'_>) -> Vec<Violation> {
    let mut out = Vec::new();
    let ram_end = owned.chunks.len() as u64 * owned.chunk;
    let mut covered = 0u64;
    for l in leaves {
        let device = owned
            .devices
            .iter()
            .any(|&(b, n)| l.gpa >= b && l.gpa + l.len <= b + n);
        if device {
            let own = owned
                .chunks
                .iter()
                .any(|&c| l.hpa < c + owned.chunk && c < l.hpa + l.len)
                || owned
                    .tables
                    .iter()
                    .any(|&t| t >= l.hpa && t < l.hpa + l.len);
            if l.hpa != l.gpa || l.mem_type != 0 || !l.ignore_pat || l.perm.execute || own {
                out.push(Violation::Device { gpa: l.gpa });
            }
            continue;
        }
        let first = l.gpa / owned.chunk;
        let expected = owned
            .chunks
            .get(first as usize)
            .map(|c| c + l.gpa % owned.chunk);
        // A leaf may span several chunks (a 1 GiB page): each chunk must continue it.
        let mut ok = expected == Some(l.hpa) && l.gpa + l.len <= ram_end;
        let mut at = l.gpa;
        while ok && at < l.gpa + l.len {
            let i = (at / owned.chunk) as usize;
            let want = owned.chunks.get(i).map(|c| c + at % owned.chunk);
            ok = want == Some(l.hpa + (at - l.gpa));
            at = (at / owned.chunk + 1) * owned.chunk;
        }
        if !ok {
            out.push(Violation::NotOwned {
                gpa: l.gpa,
                hpa: l.hpa,
                len: l.len,
            });
        }
        for &t in owned.tables {
            if t >= l.hpa && t < l.hpa + l.len {
                out.push(Violation::MapsTable {
                    gpa: l.gpa,
                    table: t,
                });
            }
        }
        if l.mem_type != 6 || !l.ignore_pat {
            out.push(Violation::CacheType {
                gpa: l.gpa,
                mem_type: l.mem_type,
            });
        }
        if l.gpa == covered {
            covered = l.gpa + l.len;
        }
    }
    if covered < ram_end {
        out.push(Violation::Unmapped { gpa: covered });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::ept::tests::HeapTables;
    use crate::vmx::ept::{Ept, MemType, PageSizes, Perm};

    const MB2: u64 = 2 << 20;
    const SIZES: PageSizes = PageSizes {
        two_mib: true,
        one_gib: true,
    };

    fn domain(chunks: &[u64]) -> (HeapTables, Ept) {
        let mut f = HeapTables::default();
        let mut ept = Ept::new(&mut f, SIZES).unwrap();
        for (i, &c) in chunks.iter().enumerate() {
            ept.map(
                &mut f,
                i as u64 * MB2,
                c,
                MB2,
                Perm::RWX,
                MemType::WriteBack,
            )
            .unwrap();
        }
        (f, ept)
    }

    #[test]
    fn a_domain_mapping_its_own_chunks_passes() {
        let chunks = [0x1000_0000, 0x0800_0000, 0x3000_0000];
        let (mut f, ept) = domain(&chunks);
        let tables: Vec<u64> = f.tables.keys().copied().collect();
        let v = audit(
            &ept.leaves(&mut f),
            &Owned {
                chunk: MB2,
                chunks: &chunks,
                tables: &tables,
                devices: &[],
            },
        );
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn device_windows_pass_only_as_uncached_identity_maps() {
        let chunks = [0x1000_0000];
        let (mut f, mut ept) = domain(&chunks);
        // A NIC's 128 KiB BAR, as dom0 gets it; and a second window mapped wrongly: cached,
        // executable, and elsewhere than its own address.
        ept.map(
            &mut f,
            0xc000_0000,
            0xc000_0000,
            0x2_0000,
            Perm::RW,
            MemType::Uncached,
        )
        .unwrap();
        ept.map(
            &mut f,
            0xc010_0000,
            0xc010_0000,
            4096,
            Perm::RWX,
            MemType::Uncached,
        )
        .unwrap();
        ept.map(
            &mut f,
            0xc020_0000,
            0x1000_0000,
            4096,
            Perm::RW,
            MemType::Uncached,
        )
        .unwrap();
        let tables: Vec<u64> = f.tables.keys().copied().collect();
        let devices = [
            (0xc000_0000, 0x2_0000),
            (0xc010_0000, 0x1000),
            (0xc020_0000, 0x1000),
        ];
        let v = audit(
            &ept.leaves(&mut f),
            &Owned {
                chunk: MB2,
                chunks: &chunks,
                tables: &tables,
                devices: &devices,
            },
        );
        assert_eq!(
            v,
            vec![
                Violation::Device { gpa: 0xc010_0000 },
                Violation::Device { gpa: 0xc020_0000 }
            ]
        );
        // Without the windows declared, the BAR is a foreign, uncached mapping.
        let v = audit(
            &ept.leaves(&mut f),
            &Owned {
                chunk: MB2,
                chunks: &chunks,
                tables: &tables,
                devices: &[],
            },
        );
        assert!(v.contains(&Violation::CacheType {
            gpa: 0xc000_0000,
            mem_type: 0
        }));
    }

    #[test]
    fn foreign_frames_wrong_types_tables_and_holes_are_found() {
        let chunks = [0x1000_0000, 0x1020_0000];
        let (mut f, mut ept) = domain(&chunks);
        // Another domain's frame, mapped at the hole above RAM.
        ept.map(
            &mut f,
            0xc000_0000,
            0x5000_0000,
            4096,
            Perm::RW,
            MemType::WriteBack,
        )
        .unwrap();
        // Uncached RAM-looking mapping over one of its own EPT tables.
        let table = *f.tables.keys().next().unwrap();
        ept.map(
            &mut f,
            0xd000_0000,
            table,
            4096,
            Perm::RW,
            MemType::Uncached,
        )
        .unwrap();
        let tables: Vec<u64> = f.tables.keys().copied().collect();
        let leaves = ept.leaves(&mut f);
        let v = audit(
            &leaves,
            &Owned {
                chunk: MB2,
                chunks: &chunks,
                tables: &tables,
                devices: &[],
            },
        );
        assert!(
            v.contains(&Violation::NotOwned {
                gpa: 0xc000_0000,
                hpa: 0x5000_0000,
                len: 4096
            }),
            "{v:?}"
        );
        assert!(
            v.iter().any(|x| matches!(
                x,
                Violation::MapsTable {
                    gpa: 0xd000_0000,
                    ..
                }
            )),
            "{v:?}"
        );
        assert!(
            v.contains(&Violation::CacheType {
                gpa: 0xd000_0000,
                mem_type: 0
            }),
            "{v:?}"
        );
        // A domain given three chunks whose EPT maps two: a hole.
        let three = [0x1000_0000, 0x1020_0000, 0x1040_0000];
        let (mut f2, ept2) = domain(&chunks);
        let v = audit(
            &ept2.leaves(&mut f2),
            &Owned {
                chunk: MB2,
                chunks: &three,
                tables: &[],
                devices: &[],
            },
        );
        assert_eq!(v, vec![Violation::Unmapped { gpa: 2 * MB2 }]);
        // Chunks swapped: each maps someone else's place.
        let swapped = [0x1020_0000, 0x1000_0000];
        let v = audit(
            &ept2.leaves(&mut f2),
            &Owned {
                chunk: MB2,
                chunks: &swapped,
                tables: &[],
                devices: &[],
            },
        );
        assert_eq!(v.len(), 2, "{v:?}");
    }
}
