//! The paravirtual timer a guest arms with the SET_TIMER hypercall: a periodic interrupt on a
//! vector of its choice, injected when the guest can take it (RFLAGS.IF set, no STI or MOV-SS
//! blocking; SDM Vol. 3C §26.3.1.5). Missed periods collapse into one interrupt, as a real
//! timer's do while its interrupt is still pending. Pure: time is passed in as TSC values.

/// Shortest period a guest may ask for, microseconds.
pub const MIN_PERIOD_US: u64 = 100;
/// Longest period, microseconds (10 s).
pub const MAX_PERIOD_US: u64 = 10_000_000;

/// One vCPU's timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtTimer {
    vector: u8,
    /// Period in TSC ticks; 0 when off.
    period: u64,
    deadline: u64,
    pending: bool,
    /// Interrupts delivered, and periods that collapsed into an already pending one.
    pub delivered: u64,
    pub missed: u64,
}

impl VirtTimer {
    /// Arms the timer: first interrupt one period from `now`.
    pub fn set(&mut self, vector: u8, period_tsc: u64, now: u64) {
        *self = VirtTimer {
            vector,
            period: period_tsc.max(1),
            deadline: now.saturating_add(period_tsc.max(1)),
            ..*self
        };
        self.pending = false;
    }

    pub fn off(&mut self) {
        self.period = 0;
        self.pending = false;
    }

    pub fn armed(&self) -> bool {
        self.period != 0
    }

    /// Neither armed nor pending: [`poll`](Self::poll) would return false whatever the time,
    /// so the exit path need not read the TSC.
    #[inline]
    pub fn idle(&self) -> bool {
        !self.armed() && !self.pending
    }

    /// Marks the interrupt pending if its deadline passed; returns whether one is pending.
    pub fn poll(&mut self, now: u64) -> bool {
        if self.armed() && now >= self.deadline {
            let periods = (now - self.deadline) / self.period + 1;
            if self.pending {
                self.missed += periods;
            } else {
                self.missed += periods - 1;
            }
            self.pending = true;
            self.deadline = self.deadline.saturating_add(periods * self.period);
        }
        self.pending
    }

    /// Whether an interrupt is pending (due, not yet injected).
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// The vector to inject now, if one is pending; the caller injects it.
    pub fn take(&mut self) -> Option<u8> {
        if self.pending {
            self.pending = false;
            self.delivered += 1;
            Some(self.vector)
        } else {
            None
        }
    }

    /// TSC ticks until the next deadline, when armed.
    pub fn until_due(&self, now: u64) -> Option<u64> {
        self.armed().then(|| self.deadline.saturating_sub(now))
    }

    /// The next deadline, when armed.
    pub fn deadline(&self) -> Option<u64> {
        self.armed().then_some(self.deadline)
    }
}

/// Whether an external interrupt can be injected: RFLAGS.IF set and no blocking by STI or
/// MOV SS (interruptibility-state bits 0 and 1).
pub fn can_inject(rflags: u64, interruptibility: u64) -> bool {
    rflags & (1 << 9) != 0 && interruptibility & 3 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_with_missed_periods_collapsed() {
        let mut t = VirtTimer::default();
        assert!(!t.poll(1_000_000));
        t.set(0x30, 100, 1000);
        assert!(!t.poll(1099));
        assert_eq!(t.until_due(1099), Some(1));
        assert!(t.poll(1100));
        assert_eq!(t.take(), Some(0x30));
        assert_eq!(t.take(), None);
        // Deadlines 1200, 1300, 1400 and 1500 passed: one interrupt, three missed.
        assert!(t.poll(1550));
        assert_eq!(t.missed, 3);
        assert_eq!(t.deadline(), Some(1600));
        // Still pending (not yet injected) when the next one falls due: counted as missed.
        assert!(t.poll(1600));
        assert_eq!(t.missed, 4);
        assert_eq!(t.take(), Some(0x30));
        assert_eq!(t.delivered, 2);
        t.off();
        assert!(!t.poll(10_000));
        assert_eq!(t.until_due(0), None);
    }

    #[test]
    fn injection_needs_if_and_no_blocking() {
        assert!(can_inject(0x202, 0));
        assert!(!can_inject(0x002, 0));
        assert!(!can_inject(0x202, 1));
        assert!(!can_inject(0x202, 2));
        assert!(
            can_inject(0x202, 8),
            "NMI blocking does not block external interrupts"
        );
    }
}
