//! VLAN ids and sets of them (IEEE 802.1Q).

use core::fmt;

/// A VLAN id, `1..=4094`. 802.1Q reserves 0 (a priority tag: "no VLAN") and 4095, so neither
/// can name a VLAN here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VlanId(u16);

impl VlanId {
    /// The lowest VLAN id.
    pub const MIN: VlanId = VlanId(1);
    /// The highest VLAN id.
    pub const MAX: VlanId = VlanId(4094);

    /// `vid` as a VLAN id, or `None` outside `1..=4094`.
    pub const fn new(vid: u16) -> Option<VlanId> {
        if matches!(vid, 1..=4094) {
            Some(VlanId(vid))
        } else {
            None
        }
    }

    /// The 12-bit id.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for VlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

const WORDS: usize = 4096 / 64;

/// A set of VLAN ids: a 4096-bit map (512 bytes), so membership is one load whatever the set.
#[derive(Clone, PartialEq, Eq)]
pub struct VlanSet {
    bits: [u64; WORDS],
}

impl VlanSet {
    /// No VLAN.
    pub const fn empty() -> VlanSet {
        VlanSet { bits: [0; WORDS] }
    }

    /// Every VLAN, `1..=4094`.
    pub fn all() -> VlanSet {
        (1..=4094).filter_map(VlanId::new).collect()
    }

    /// Adds `vlan`; true if it was not there.
    pub fn insert(&mut self, vlan: VlanId) -> bool {
        let (w, b) = Self::place(vlan);
        let was = self.bits[w] & b != 0;
        self.bits[w] |= b;
        !was
    }

    /// Removes `vlan`; true if it was there.
    pub fn remove(&mut self, vlan: VlanId) -> bool {
        let (w, b) = Self::place(vlan);
        let was = self.bits[w] & b != 0;
        self.bits[w] &= !b;
        was
    }

    /// Whether `vlan` is in the set.
    pub fn contains(&self, vlan: VlanId) -> bool {
        let (w, b) = Self::place(vlan);
        self.bits[w] & b != 0
    }

    /// How many VLANs the set holds.
    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set holds no VLAN.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// The VLANs in the set, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = VlanId> + '_ {
        (1..=4094)
            .filter_map(VlanId::new)
            .filter(|&v| self.contains(v))
    }

    fn place(vlan: VlanId) -> (usize, u64) {
        let v = usize::from(vlan.get());
        (v / 64, 1u64 << (v % 64))
    }
}

impl Default for VlanSet {
    fn default() -> Self {
        VlanSet::empty()
    }
}

impl FromIterator<VlanId> for VlanSet {
    fn from_iter<I: IntoIterator<Item = VlanId>>(iter: I) -> Self {
        let mut set = VlanSet::empty();
        for v in iter {
            set.insert(v);
        }
        set
    }
}

impl fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(VlanId::get)).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_1_to_4094() {
        assert_eq!(VlanId::new(0), None);
        assert_eq!(VlanId::new(4095), None);
        assert_eq!(VlanId::new(u16::MAX), None);
        assert_eq!(VlanId::new(1), Some(VlanId::MIN));
        assert_eq!(VlanId::new(4094), Some(VlanId::MAX));
    }

    #[test]
    fn set_membership() {
        let mut s = VlanSet::empty();
        assert!(s.is_empty());
        assert!(s.insert(VlanId::MIN));
        assert!(!s.insert(VlanId::MIN));
        assert!(s.insert(VlanId::MAX));
        assert!(s.contains(VlanId::MAX) && !s.contains(VlanId::new(2).unwrap()));
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.iter().collect::<alloc::vec::Vec<_>>(),
            [VlanId::MIN, VlanId::MAX]
        );
        assert!(s.remove(VlanId::MIN) && !s.remove(VlanId::MIN));
        assert_eq!(VlanSet::all().len(), 4094);
    }
}
