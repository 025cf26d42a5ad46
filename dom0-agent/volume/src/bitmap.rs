//! A growable bitmap of regions (dirty-region log, change tracking, copy progress).

use alloc::vec;
use alloc::vec::Vec;

use crate::{u, us};

/// A fixed-length set of region numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// All-clear bitmap of `len` bits.
    #[must_use]
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; us(len.div_ceil(64))],
            len,
        }
    }

    /// All-set bitmap of `len` bits.
    #[must_use]
    pub fn full(len: u64) -> Self {
        let mut b = Self::new(len);
        b.set_range(0, len);
        b
    }

    /// Number of bits.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all (zero length).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw words (for encoding).
    #[must_use]
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Builds from raw words; returns `None` when the word count does not match `len`.
    #[must_use]
    pub fn from_words(len: u64, words: Vec<u64>) -> Option<Self> {
        if u(words.len()) != len.div_ceil(64) {
            return None;
        }
        let mut b = Self { words, len };
        b.mask_tail();
        Some(b)
    }

    fn mask_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    /// Whether bit `i` is set (false beyond the end).
    #[must_use]
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[us(i / 64)] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns true when it was clear. Ignored beyond the end.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[us(i / 64)];
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        !was
    }

    /// Clears bit `i`.
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[us(i / 64)] &= !(1 << (i % 64));
        }
    }

    /// Sets bits `[start, end)`; returns true when any was clear.
    pub fn set_range(&mut self, start: u64, end: u64) -> bool {
        let mut any = false;
        for i in start..end.min(self.len) {
            any |= self.set(i);
        }
        any
    }

    /// Whether every bit in `[start, end)` is set.
    #[must_use]
    pub fn all_set(&self, start: u64, end: u64) -> bool {
        (start..end.min(self.len)).all(|i| self.get(i))
    }

    /// Number of set bits.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no bit is set.
    #[must_use]
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// The set bits in increasing order.
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len).filter(move |&i| self.get(i))
    }

    /// First set bit at or after `from`.
    #[must_use]
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = self.words[us(i / 64)] >> (i % 64);
            if w != 0 {
                return Some(i + u64::from(w.trailing_zeros()));
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// First clear bit at or after `from`.
    #[must_use]
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = !self.words[us(i / 64)] >> (i % 64);
            if w != 0 {
                let j = i + u64::from(w.trailing_zeros());
                return (j < self.len).then_some(j);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// Sets every bit set in `other` (up to this bitmap's length).
    pub fn union_with(&mut self, other: &Bitmap) {
        for i in other.ones() {
            self.set(i);
        }
    }

    /// Changes the length; new bits are `fill`.
    pub fn resize(&mut self, len: u64, fill: bool) {
        let old = self.len;
        self.words.resize(us(len.div_ceil(64)), 0);
        self.len = len;
        self.mask_tail();
        if fill && len > old {
            self.set_range(old, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_next_resize() {
        let mut b = Bitmap::new(130);
        assert!(b.set(3));
        assert!(!b.set(3));
        b.set(129);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(129));
        assert_eq!(b.count(), 2);
        assert_eq!(b.next_clear(3), Some(4));
        assert_eq!(b.next_clear(129), None);
        b.resize(64, false);
        assert_eq!(b.count(), 1);
        b.resize(200, true);
        assert_eq!(b.count(), 1 + 136);
        assert!(Bitmap::from_words(10, vec![u64::MAX]).unwrap().count() == 10);
        assert!(Bitmap::from_words(100, vec![0]).is_none());
    }
}
