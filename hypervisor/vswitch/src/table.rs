//! The MAC table: (VLAN, station address) → port, learned from accepted frames, aged, and
//! bounded.
//!
//! Entries live in a slab of at most `capacity` nodes, indexed by an ordered map (so lookups
//! are O(log n) whatever addresses a hostile sender picks: no hash to collide) and threaded on
//! a list from the most to the least recently seen. Learning moves an entry to the front, so
//! the back is the oldest: aging pops expired entries from there, and a full table evicts the
//! back entry to make room. `now` is the caller's clock (nanoseconds or ticks, the same unit
//! as `age`); if it ever went backwards, "oldest" would mean "least recently learned", and an
//! entry is expired only when `now - seen >= age`.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::frame::MacAddr;
use crate::port::PortId;
use crate::vlan::VlanId;

/// What the table is keyed by: the same address on two VLANs is two stations.
pub(crate) type Key = (VlanId, MacAddr);

const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Node {
    key: Key,
    port: PortId,
    seen: u64,
    /// Towards the front (more recently seen).
    newer: u32,
    /// Towards the back (less recently seen).
    older: u32,
}

/// What learning did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Learned {
    /// A new entry, nothing evicted.
    New,
    /// A new entry; the oldest entry was evicted to make room.
    Evicted,
    /// A known station seen again on the same port (or after its entry expired).
    Refreshed,
    /// A known, unexpired station seen on another port: the entry now names that port.
    Moved,
}

pub(crate) struct MacTable {
    index: BTreeMap<Key, u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    newest: u32,
    oldest: u32,
    capacity: usize,
    age: u64,
}

impl MacTable {
    /// An empty table of at most `capacity` entries (at least 1, below `u32::MAX`) that expire
    /// `age` after they were last seen.
    pub(crate) fn new(capacity: usize, age: u64) -> MacTable {
        debug_assert!(capacity >= 1 && u32::try_from(capacity).is_ok_and(|c| c < NIL));
        MacTable {
            index: BTreeMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
            capacity,
            age,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    fn expired(&self, seen: u64, now: u64) -> bool {
        now.saturating_sub(seen) >= self.age
    }

    /// The port `key` was last seen on, unless that has expired.
    pub(crate) fn lookup(&self, key: Key, now: u64) -> Option<PortId> {
        let node = &self.nodes[*self.index.get(&key)? as usize];
        (!self.expired(node.seen, now)).then_some(node.port)
    }

    /// Records that `key` sent from `port` at `now`.
    pub(crate) fn learn(&mut self, key: Key, port: PortId, now: u64) -> Learned {
        if let Some(&i) = self.index.get(&key) {
            let node = &self.nodes[i as usize];
            let moved = node.port != port && !self.expired(node.seen, now);
            let node = &mut self.nodes[i as usize];
            node.port = port;
            node.seen = now;
            self.unlink(i);
            self.push_front(i);
            return if moved {
                Learned::Moved
            } else {
                Learned::Refreshed
            };
        }
        let evicted = self.len() >= self.capacity;
        if evicted {
            self.remove(self.oldest);
        }
        let node = Node {
            key,
            port,
            seen: now,
            newer: NIL,
            older: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                // Below `capacity`, which `new` checked is below `NIL`.
                let i = u32::try_from(self.nodes.len()).unwrap_or(NIL);
                self.nodes.push(node);
                i
            }
        };
        self.index.insert(key, i);
        self.push_front(i);
        if evicted {
            Learned::Evicted
        } else {
            Learned::New
        }
    }

    /// Drops the entries expired at `now`; returns how many.
    pub(crate) fn age(&mut self, now: u64) -> usize {
        let mut n = 0;
        while self.oldest != NIL && self.expired(self.nodes[self.oldest as usize].seen, now) {
            self.remove(self.oldest);
            n += 1;
        }
        n
    }

    /// Drops every entry naming `port`; returns how many.
    pub(crate) fn forget_port(&mut self, port: PortId) -> usize {
        let doomed: Vec<u32> = self
            .index
            .values()
            .copied()
            .filter(|&i| self.nodes[i as usize].port == port)
            .collect();
        for &i in &doomed {
            self.remove(i);
        }
        doomed.len()
    }

    fn remove(&mut self, i: u32) {
        self.unlink(i);
        self.index.remove(&self.nodes[i as usize].key);
        self.free.push(i);
    }

    fn unlink(&mut self, i: u32) {
        let (newer, older) = {
            let n = &self.nodes[i as usize];
            (n.newer, n.older)
        };
        match newer {
            NIL => self.newest = older,
            j => self.nodes[j as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            j => self.nodes[j as usize].newer = newer,
        }
        let n = &mut self.nodes[i as usize];
        n.newer = NIL;
        n.older = NIL;
    }

    fn push_front(&mut self, i: u32) {
        let old_front = self.newest;
        {
            let n = &mut self.nodes[i as usize];
            n.newer = NIL;
            n.older = old_front;
        }
        match old_front {
            NIL => self.oldest = i,
            j => self.nodes[j as usize].newer = i,
        }
        self.newest = i;
    }

    /// The entries from the most to the least recently seen (tests check the list against the
    /// index).
    #[cfg(test)]
    fn order(&self) -> Vec<Key> {
        let mut out = Vec::new();
        let mut i = self.newest;
        while i != NIL {
            out.push(self.nodes[i as usize].key);
            i = self.nodes[i as usize].older;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        (VlanId::MIN, MacAddr([2, 0, 0, 0, 0, n]))
    }
    const P: PortId = PortId {
        slot: 0,
        generation: 0,
    };
    const Q: PortId = PortId {
        slot: 1,
        generation: 0,
    };

    #[test]
    fn learn_refresh_move_expire() {
        let mut t = MacTable::new(8, 100);
        assert_eq!(t.learn(key(1), P, 0), Learned::New);
        assert_eq!(t.lookup(key(1), 99), Some(P));
        assert_eq!(t.lookup(key(1), 100), None);
        assert_eq!(t.learn(key(1), P, 50), Learned::Refreshed);
        assert_eq!(t.lookup(key(1), 149), Some(P));
        assert_eq!(t.learn(key(1), Q, 60), Learned::Moved);
        assert_eq!(t.lookup(key(1), 61), Some(Q));
        // Expired, then seen elsewhere: a fresh learn, not a move.
        assert_eq!(t.learn(key(1), P, 500), Learned::Refreshed);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn evicts_the_oldest_and_reuses_slots() {
        let mut t = MacTable::new(3, 1000);
        for n in 1..=3 {
            t.learn(key(n), P, u64::from(n));
        }
        t.learn(key(1), P, 10);
        assert_eq!(t.order(), [key(1), key(3), key(2)]);
        assert_eq!(t.learn(key(4), P, 11), Learned::Evicted);
        assert_eq!(t.lookup(key(2), 11), None);
        assert_eq!(t.order(), [key(4), key(1), key(3)]);
        assert_eq!((t.len(), t.nodes.len()), (3, 3));
    }

    #[test]
    fn age_and_forget() {
        let mut t = MacTable::new(16, 100);
        for n in 0..10 {
            t.learn(key(n), if n % 2 == 0 { P } else { Q }, u64::from(n) * 10);
        }
        assert_eq!(t.age(139), 4);
        assert_eq!(t.len(), 6);
        assert_eq!(t.forget_port(Q), 3);
        assert_eq!(t.order(), [key(8), key(6), key(4)]);
        assert_eq!(t.age(u64::MAX), 3);
        assert_eq!((t.len(), t.order().len()), (0, 0));
        assert_eq!(t.learn(key(1), P, 0), Learned::New);
        assert_eq!(t.nodes.len(), 10);
    }
}
