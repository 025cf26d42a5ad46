//! Address mapping for thick layouts: volume block → (column, column block) → disk block.
//!
//! A layout has `legs` (mirror copies) × `columns` (stripe columns); every column of every leg
//! has the same length. Volume block `b` with stripe unit `su` and `c` columns lies in column
//! `(b / su) % c` at column block `(b / su / c) * su + b % su`; with one column the stripe unit
//! plays no part (concatenation).

use crate::format::{Layout, Segment, SyncState};

impl Layout {
    /// Columns per leg.
    #[must_use]
    pub fn ncols(&self) -> usize {
        self.legs.first().map_or(0, |l| l.columns.len())
    }

    /// Length of one column in blocks.
    #[must_use]
    pub fn column_len(&self) -> u64 {
        self.legs
            .first()
            .and_then(|l| l.columns.first())
            .map_or(0, |c| c.segs.iter().map(|s| s.len).sum())
    }

    /// Blocks addressable through this layout.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        crate::u(self.ncols()) * self.column_len()
    }

    /// Maps volume block `vblock` to `(column, column block, run)`, `run ≤ max` blocks staying
    /// in that column contiguously.
    #[must_use]
    pub fn map(&self, vblock: u64, max: u64) -> (usize, u64, u64) {
        let c = crate::u(self.ncols());
        if c <= 1 {
            return (0, vblock, max);
        }
        let su = u64::from(self.stripe_unit.max(1));
        let stripe = vblock / su;
        let off = vblock % su;
        (
            crate::us(stripe % c),
            (stripe / c) * su + off,
            max.min(su - off),
        )
    }

    /// Whether any column state is stale.
    #[must_use]
    pub fn degraded(&self) -> bool {
        self.legs
            .iter()
            .flat_map(|l| &l.columns)
            .any(|c| matches!(c.state, SyncState::Stale(_)))
    }

    /// Every segment of every leg.
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.legs
            .iter()
            .flat_map(|l| &l.columns)
            .flat_map(|c| &c.segs)
    }
}

/// Finds `cblock` inside a column: `(disk, disk block, run ≤ max)`.
#[must_use]
pub fn seg_lookup(segs: &[Segment], cblock: u64, max: u64) -> Option<(u32, u64, u64)> {
    let mut base = 0u64;
    for s in segs {
        if cblock < base + s.len {
            let off = cblock - base;
            return Some((s.disk, s.start + off, max.min(s.len - off)));
        }
        base += s.len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Column, Leg};
    use alloc::vec;

    #[test]
    fn stripe_mapping_round_robins_units() {
        let col = |d| Column {
            segs: vec![Segment {
                disk: d,
                start: 100,
                len: 64,
            }],
            state: SyncState::InSync,
        };
        let l = Layout {
            stripe_unit: 4,
            legs: vec![Leg {
                columns: vec![col(0), col(1), col(2)],
            }],
        };
        assert_eq!(l.capacity(), 192);
        assert_eq!(l.map(0, 100), (0, 0, 4));
        assert_eq!(l.map(5, 100), (1, 1, 3));
        assert_eq!(l.map(12, 100), (0, 4, 4));
        assert_eq!(
            seg_lookup(&l.legs[0].columns[1].segs, 1, 3),
            Some((1, 101, 3))
        );
    }
}
