//! Sleepers: blocked vCPUs with a deadline (their paravirtual timer's next interrupt), one set
//! per CPU ordered by deadline, so a CPU arms its one-shot timer for the first one and wakes
//! every sleeper due when it fires. A vCPU sleeps on at most one CPU at a time. Pure: deadlines
//! are TSC values passed in.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use super::policy::{CpuId, VcpuId};

/// Every CPU's sleepers.
#[derive(Debug)]
pub struct Sleepers {
    by_cpu: Vec<BTreeSet<(u64, VcpuId)>>,
    /// Where each sleeper is, and until when.
    of: BTreeMap<VcpuId, (CpuId, u64)>,
}

impl Sleepers {
    pub fn new(cpus: usize) -> Sleepers {
        Sleepers {
            by_cpu: (0..cpus).map(|_| BTreeSet::new()).collect(),
            of: BTreeMap::new(),
        }
    }

    /// `v` sleeps on `cpu` until `deadline` (replacing any earlier sleep of it).
    pub fn add(&mut self, v: VcpuId, cpu: CpuId, deadline: u64) {
        self.remove(v);
        if let Some(set) = self.by_cpu.get_mut(cpu) {
            set.insert((deadline, v));
            self.of.insert(v, (cpu, deadline));
        }
    }

    /// Forgets `v`'s sleep (it woke for another reason, or went away); whether it slept.
    pub fn remove(&mut self, v: VcpuId) -> bool {
        match self.of.remove(&v) {
            Some((cpu, deadline)) => self.by_cpu[cpu].remove(&(deadline, v)),
            None => false,
        }
    }

    /// Takes `cpu`'s sleepers due at `now`, earliest first, with their deadlines.
    pub fn take_due(&mut self, cpu: CpuId, now: u64) -> Vec<(u64, VcpuId)> {
        let mut due = Vec::new();
        let Some(set) = self.by_cpu.get_mut(cpu) else {
            return due;
        };
        while let Some(&(d, v)) = set.first() {
            if d > now {
                break;
            }
            set.pop_first();
            self.of.remove(&v);
            due.push((d, v));
        }
        due
    }

    /// `cpu`'s first deadline.
    pub fn next(&self, cpu: CpuId) -> Option<u64> {
        self.by_cpu.get(cpu)?.first().map(|&(d, _)| d)
    }

    /// How many sleep on `cpu`.
    pub fn count(&self, cpu: CpuId) -> usize {
        self.by_cpu.get(cpu).map_or(0, BTreeSet::len)
    }
}

/// Wake-to-run latencies: how long after its deadline (or the event that woke it) a vCPU got
/// a CPU. Power-of-two buckets of microseconds, so percentiles are upper bounds within 2×.
#[derive(Debug, Default, Clone)]
pub struct Latency {
    buckets: [u64; 32],
    pub count: u64,
    pub sum_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn record(&mut self, us: u64) {
        let b = (64 - us.leading_zeros() as usize).min(31);
        self.buckets[b] += 1;
        self.count += 1;
        self.sum_us += us;
        self.max_us = self.max_us.max(us);
    }

    pub fn mean_us(&self) -> u64 {
        self.sum_us / self.count.max(1)
    }

    /// The upper bound of the bucket holding the `pct`th percentile (0 when empty).
    pub fn percentile_us(&self, pct: u64) -> u64 {
        let want = (self.count * pct).div_ceil(100);
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if n > 0 && seen >= want {
                return if b == 0 { 0 } else { (1u64 << b) - 1 }.min(self.max_us);
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_each_vcpu_once() {
        let mut s = Sleepers::new(2);
        s.add(7, 0, 300);
        s.add(8, 0, 100);
        s.add(9, 1, 50);
        assert_eq!(s.next(0), Some(100));
        assert_eq!(s.next(1), Some(50));
        // Re-arming moves the sleep; it never sleeps twice.
        s.add(7, 1, 60);
        assert_eq!((s.count(0), s.count(1)), (1, 2));
        assert_eq!(s.take_due(1, 59), [(50, 9)]);
        assert_eq!(s.take_due(1, 59), []);
        assert_eq!(s.take_due(1, 1000), [(60, 7)]);
        assert!(s.remove(8), "woken early");
        assert!(!s.remove(8));
        assert_eq!(s.next(0), None);
        assert_eq!(s.take_due(5, 1000), [], "no such CPU: nothing");
        s.add(1, 5, 10);
        assert!(!s.remove(1), "a sleep on no CPU is not kept");
    }

    #[test]
    fn latency_percentiles_are_bucket_bounds() {
        let mut l = Latency::default();
        assert_eq!((l.percentile_us(99), l.mean_us()), (0, 0));
        for _ in 0..98 {
            l.record(10);
        }
        l.record(900);
        l.record(5000);
        assert_eq!(l.count, 100);
        assert_eq!(l.percentile_us(50), 15, "10 us falls in 8..15");
        assert_eq!(
            l.percentile_us(99),
            1023,
            "the 99th is the 900 us one: 512..1023"
        );
        assert_eq!(l.percentile_us(100), 5000, "never above the maximum");
        assert_eq!(l.max_us, 5000);
        assert_eq!(l.mean_us(), (98 * 10 + 900 + 5000) / 100);
    }
}
