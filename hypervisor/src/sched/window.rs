//! Shares over the last whole second: for each key (a domain, a CPU), how much of the window
//! before its counter grew by, in tenths of a percent of the window. Fed with running totals
//! (CPU time used, time idle) whenever someone looks; pure, time passed in.

use alloc::collections::BTreeMap;

use super::policy::Ns;

/// One window's worth of bookkeeping.
#[derive(Debug)]
pub struct Window {
    len: Ns,
    start: Ns,
    at_start: BTreeMap<u32, Ns>,
    /// The last whole window: its length and each key's growth in it.
    last: Option<(Ns, BTreeMap<u32, Ns>)>,
}

impl Window {
    /// Windows of `len` nanoseconds, the first starting at `now`.
    pub fn new(len: Ns, now: Ns) -> Window {
        Window {
            len: len.max(1),
            start: now,
            at_start: BTreeMap::new(),
            last: None,
        }
    }

    /// Ends the window when `now` is past it, taking each key's total now from `totals`;
    /// returns whether it rolled. Keys new in this window count from zero.
    pub fn roll(&mut self, now: Ns, totals: impl Iterator<Item = (u32, Ns)>) -> bool {
        if now < self.start + self.len {
            return false;
        }
        let mut grew = BTreeMap::new();
        let mut next = BTreeMap::new();
        for (k, t) in totals {
            let before = self.at_start.get(&k).copied().unwrap_or(0);
            grew.insert(k, t.saturating_sub(before));
            next.insert(k, t);
        }
        self.last = Some((now - self.start, grew));
        self.at_start = next;
        self.start = now;
        true
    }

    /// How much `key` grew in the last whole window, in tenths of a percent of its length
    /// (1000 = all of one CPU); None before the first window ended or for an unknown key.
    pub fn permille(&self, key: u32) -> Option<u64> {
        let (len, grew) = self.last.as_ref()?;
        grew.get(&key)
            .map(|&g| (u128::from(g) * 1000 / u128::from((*len).max(1))) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_of_the_last_whole_window() {
        let mut w = Window::new(1000, 0);
        assert!(!w.roll(999, [(1, 500)].into_iter()));
        assert_eq!(w.permille(1), None, "no whole window yet");
        // Key 1 used 600 of the first 1000; key 2 appeared and used 250.
        assert!(w.roll(1000, [(1, 600), (2, 250)].into_iter()));
        assert_eq!(w.permille(1), Some(600));
        assert_eq!(w.permille(2), Some(250));
        assert_eq!(w.permille(3), None);
        // A late look: the window is as long as it really was (here 2000).
        assert!(w.roll(3000, [(1, 1600), (2, 250)].into_iter()));
        assert_eq!(w.permille(1), Some(500));
        assert_eq!(w.permille(2), Some(0));
        // A total that went back (a key reused) counts as no growth, not an overflow.
        assert!(w.roll(4000, [(1, 10)].into_iter()));
        assert_eq!(w.permille(1), Some(0));
        assert_eq!(w.permille(2), None, "gone keys are dropped");
    }
}
