//! Address ranges mapped to devices, kept sorted; registration refuses overlaps.

use alloc::vec::Vec;
use core::ops::Range;

/// A registration refused because its range overlaps one already on the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub new: Range<u64>,
    pub existing: Range<u64>,
}

impl core::fmt::Display for Overlap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "range {:#x}..{:#x} overlaps {:#x}..{:#x}, already registered",
            self.new.start, self.new.end, self.existing.start, self.existing.end
        )
    }
}

/// Devices by address range.
pub struct Bus<D> {
    /// Sorted by start, pairwise disjoint, none empty.
    entries: Vec<(Range<u64>, D)>,
}

impl<D> Default for Bus<D> {
    fn default() -> Self {
        Bus {
            entries: Vec::new(),
        }
    }
}

impl<D> Bus<D> {
    /// Adds `device` at `range`; refuses an empty range or one that overlaps another.
    pub fn register(&mut self, range: Range<u64>, device: D) -> Result<(), Overlap> {
        if range.is_empty() {
            return Err(Overlap {
                new: range.clone(),
                existing: range,
            });
        }
        let at = self.entries.partition_point(|(r, _)| r.start < range.start);
        for neighbour in [at.checked_sub(1), Some(at)].into_iter().flatten() {
            if let Some((r, _)) = self.entries.get(neighbour)
                && r.start < range.end
                && range.start < r.end
            {
                return Err(Overlap {
                    new: range,
                    existing: r.clone(),
                });
            }
        }
        self.entries.insert(at, (range, device));
        Ok(())
    }

    /// The device whose range holds all of `addr..addr + len`, and the offset of `addr` in it.
    pub fn find(&mut self, addr: u64, len: u64) -> Option<(&mut D, u64)> {
        let i = self.entries.partition_point(|(r, _)| r.start <= addr);
        let (r, d) = self.entries.get_mut(i.checked_sub(1)?)?;
        let end = addr.checked_add(len)?;
        (addr >= r.start && end <= r.end).then(|| (d, addr - r.start))
    }

    /// Whether any device's range touches `addr`.
    pub fn claims(&self, addr: u64) -> bool {
        let i = self.entries.partition_point(|(r, _)| r.start <= addr);
        i.checked_sub(1)
            .and_then(|i| self.entries.get(i))
            .is_some_and(|(r, _)| r.contains(&addr))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_refused_and_lookups_find_the_owner() {
        let mut b: Bus<&str> = Bus::default();
        b.register(0x10..0x20, "a").unwrap();
        b.register(0x30..0x40, "c").unwrap();
        b.register(0x20..0x30, "b").unwrap();
        assert_eq!(
            b.register(0x1f..0x21, "x"),
            Err(Overlap {
                new: 0x1f..0x21,
                existing: 0x10..0x20
            })
        );
        assert!(b.register(0x00..0x100, "x").is_err(), "covering range");
        assert!(b.register(0x38..0x39, "x").is_err(), "inside");
        assert!(b.register(0x40..0x40, "x").is_err(), "empty");
        assert_eq!(b.len(), 3);
        assert_eq!(b.find(0x10, 1).map(|(d, o)| (*d, o)), Some(("a", 0)));
        assert_eq!(b.find(0x2f, 1).map(|(d, o)| (*d, o)), Some(("b", 0xf)));
        // An access that runs past the device's end is not the device's.
        assert!(b.find(0x1e, 4).is_none());
        assert!(b.find(0x40, 1).is_none());
        assert!(b.find(0x0f, 1).is_none());
        assert!(b.find(u64::MAX, 2).is_none());
        assert!(b.claims(0x3f) && !b.claims(0x40));
    }
}
