//! A port's egress queue: bounded in frames and in bytes, shared fairly among the ports that
//! send to it by longest-queue push-out (see the crate docs, "Fairness").

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::frame::Frame;
use crate::port::PortId;

/// How much of a queue one sender holds.
#[derive(Clone, Copy, Debug)]
struct Share {
    source: PortId,
    bytes: usize,
}

/// What became of a frame offered to a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued, after pushing out this many frames of the sender holding the most.
    Queued { pushed_out: usize },
    /// The queue was full and the sender already held its share: the frame is dropped.
    Full,
}

pub(crate) struct EgressQueue {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// One entry per sender with frames in the queue (so at most `max_frames` entries).
    shares: Vec<Share>,
    max_frames: usize,
    max_bytes: usize,
}

impl EgressQueue {
    /// An empty queue holding at most `max_frames` frames and `max_bytes` bytes.
    pub(crate) fn new(max_frames: usize, max_bytes: usize) -> EgressQueue {
        EgressQueue {
            frames: VecDeque::new(),
            bytes: 0,
            shares: Vec::new(),
            max_frames,
            max_bytes,
        }
    }

    /// Frames and bytes queued.
    pub(crate) fn depth(&self) -> (usize, usize) {
        (self.frames.len(), self.bytes)
    }

    fn fits(&self, len: usize) -> bool {
        self.frames.len() < self.max_frames && self.bytes + len <= self.max_bytes
    }

    fn share_of(&self, source: PortId) -> usize {
        self.shares
            .iter()
            .find(|s| s.source == source)
            .map_or(0, |s| s.bytes)
    }

    /// Queues `frame`, pushing out frames of the sender that holds the most of the queue if
    /// that sender holds more than `frame`'s sender would once `frame` is in.
    pub(crate) fn offer(&mut self, frame: Frame) -> Offer {
        let len = frame.bytes.len();
        if len > self.max_bytes {
            return Offer::Full;
        }
        let mut pushed_out = 0;
        if !self.fits(len) {
            let mine = self.share_of(frame.source) + len;
            let Some(victim) = self
                .shares
                .iter()
                .filter(|s| s.source != frame.source)
                .max_by_key(|s| s.bytes)
                .copied()
            else {
                return Offer::Full;
            };
            if victim.bytes <= mine {
                return Offer::Full;
            }
            // The victim holds more than `len` bytes and at least one frame, so pushing out
            // its frames frees a slot and `len` bytes before it runs out.
            while !self.fits(len) && self.remove_newest_of(victim.source) {
                pushed_out += 1;
            }
            if !self.fits(len) {
                return Offer::Full;
            }
        }
        self.account(frame.source, len, true);
        self.frames.push_back(frame);
        Offer::Queued { pushed_out }
    }

    /// The oldest frame.
    pub(crate) fn pop(&mut self) -> Option<Frame> {
        let frame = self.frames.pop_front()?;
        self.account(frame.source, frame.bytes.len(), false);
        Some(frame)
    }

    fn remove_newest_of(&mut self, source: PortId) -> bool {
        let Some(i) = self.frames.iter().rposition(|f| f.source == source) else {
            return false;
        };
        let Some(frame) = self.frames.remove(i) else {
            return false;
        };
        self.account(source, frame.bytes.len(), false);
        true
    }

    fn account(&mut self, source: PortId, len: usize, add: bool) {
        let i = match self.shares.iter().position(|s| s.source == source) {
            Some(i) => i,
            None => {
                self.shares.push(Share { source, bytes: 0 });
                self.shares.len() - 1
            }
        };
        if add {
            self.bytes += len;
            self.shares[i].bytes += len;
        } else {
            self.bytes -= len;
            self.shares[i].bytes -= len;
            if self.shares[i].bytes == 0 {
                self.shares.swap_remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vlan::VlanId;

    fn port(n: u32) -> PortId {
        PortId {
            slot: n,
            generation: 0,
        }
    }

    fn frame(src: u32, len: usize) -> Frame {
        Frame {
            bytes: alloc::vec![0; len],
            vlan: VlanId::MIN,
            source: port(src),
        }
    }

    #[test]
    fn bounded_in_frames_and_bytes() {
        let mut q = EgressQueue::new(4, 1000);
        for _ in 0..4 {
            assert_eq!(q.offer(frame(1, 100)), Offer::Queued { pushed_out: 0 });
        }
        assert_eq!(q.offer(frame(1, 100)), Offer::Full);
        assert_eq!(q.depth(), (4, 400));
        let mut q = EgressQueue::new(100, 1000);
        for _ in 0..3 {
            q.offer(frame(1, 300));
        }
        assert_eq!(q.offer(frame(1, 300)), Offer::Full);
        assert_eq!(q.offer(frame(1, 100)), Offer::Queued { pushed_out: 0 });
        assert_eq!(q.offer(frame(2, 1001)), Offer::Full);
        assert_eq!(q.depth(), (4, 1000));
    }

    #[test]
    fn a_newcomer_pushes_out_the_largest_sender() {
        let mut q = EgressQueue::new(8, 10_000);
        for _ in 0..8 {
            q.offer(frame(1, 100));
        }
        assert_eq!(q.offer(frame(2, 100)), Offer::Queued { pushed_out: 1 });
        // The flooder cannot take its slot back: sender 2 holds less than it would.
        assert_eq!(q.offer(frame(1, 100)), Offer::Full);
        for _ in 0..3 {
            assert_eq!(q.offer(frame(2, 100)), Offer::Queued { pushed_out: 1 });
        }
        // 4 and 4: equal shares, neither can push the other out.
        assert_eq!(q.offer(frame(2, 100)), Offer::Full);
        assert_eq!(q.offer(frame(1, 100)), Offer::Full);
        let order: Vec<u32> = core::iter::from_fn(|| q.pop())
            .map(|f| f.source.slot)
            .collect();
        // The flooder's oldest frames were kept, its newest pushed out.
        assert_eq!(order, [1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(q.depth(), (0, 0));
        assert!(q.shares.is_empty());
    }

    #[test]
    fn byte_pressure_pushes_out_several_small_frames() {
        let mut q = EgressQueue::new(100, 1000);
        for _ in 0..10 {
            q.offer(frame(1, 100));
        }
        assert_eq!(q.offer(frame(2, 250)), Offer::Queued { pushed_out: 3 });
        assert_eq!(q.depth(), (8, 950));
    }
}
