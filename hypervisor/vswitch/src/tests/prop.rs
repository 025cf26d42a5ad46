//! Random traffic among random ports, checked against a model of what the switch may do:
//! the accept/refuse decision of every frame, and for every delivery that it was accepted,
//! that it does not go back to its ingress port or cross VLANs, that it is tagged as the
//! receiving port requires, that its contents are intact, and that it arrives at most once per
//! port. Queues stay within their bounds and every port's counters add up.

use alloc::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::{DropReason, PortKind, VlanSet};

/// xorshift64*: deterministic, no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        // The remainder is below `n`, a `usize`.
        usize::try_from(self.next() % n as u64).unwrap()
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const MAX_FRAME: usize = 200;
const QUEUE_FRAMES: usize = 12;
const QUEUE_BYTES: usize = 1500;
/// Below the 24 (station, VLAN) pairs the traffic uses, so the table fills and evicts.
const MAC_CAPACITY: usize = 16;

fn set(vids: &[u16]) -> VlanSet {
    vids.iter().map(|&v| vid(v)).collect()
}

/// The port configurations the test draws from.
fn specs() -> Vec<PortConfig> {
    vec![
        PortConfig::access(vid(10)).with_mac(mac(1)),
        PortConfig::access(vid(10)),
        PortConfig::access(vid(20)).with_mac(mac(3)),
        PortConfig::access(vid(20)),
        PortConfig::access(vid(30)),
        // dom0's uplink.
        PortConfig::trunk(set(&[10, 20, 30]), Some(vid(10))),
        // A guest trunk, bound.
        PortConfig::trunk(set(&[20, 30]), None).with_mac(mac(6)),
        PortConfig::trunk(set(&[30]), Some(vid(30))),
    ]
}

/// What the model says the switch must decide for `frame` from a port configured `cfg`.
fn model_decision(cfg: &PortConfig, frame: &[u8]) -> Result<VlanId, DropReason> {
    if frame.len() < 14 {
        return Err(DropReason::Malformed);
    }
    let tagged = frame[12..14] == [0x81, 0x00];
    if tagged && frame.len() < 18 {
        return Err(DropReason::Malformed);
    }
    if frame.len() > MAX_FRAME + if tagged { 4 } else { 0 } {
        return Err(DropReason::Malformed);
    }
    let src = MacAddr(frame[6..12].try_into().unwrap());
    if src.0[0] & 1 == 1 || src.0 == [0; 6] || cfg.mac.is_some_and(|m| m != src) {
        return Err(DropReason::Spoofed);
    }
    let vid_in = if tagged {
        u16::from_be_bytes([frame[14], frame[15]]) & 0xfff
    } else {
        0
    };
    let stacked = if tagged {
        matches!(u16::from_be_bytes([frame[16], frame[17]]), 0x8100 | 0x88a8)
    } else {
        frame[12..14] == [0x88, 0xa8]
    };
    let vlan = match &cfg.kind {
        PortKind::Access(_) if stacked => None,
        PortKind::Access(v) if vid_in == 0 => Some(*v),
        PortKind::Access(_) => None,
        PortKind::Trunk { native, .. } if vid_in == 0 => *native,
        PortKind::Trunk { .. } => VlanId::new(vid_in),
    };
    vlan.filter(|&v| cfg.kind.carries(v))
        .ok_or(DropReason::VlanDenied)
}

/// A frame as (destination, source, EtherType and payload): its untagged form.
fn untagged(frame: &[u8]) -> Vec<u8> {
    if frame[12..14] == [0x81, 0x00] {
        [&frame[..12], &frame[16..]].concat()
    } else {
        frame.to_vec()
    }
}

struct Sent {
    ingress: PortId,
    vlan: VlanId,
    untagged: Vec<u8>,
}

struct World {
    sw: Switch,
    ports: Vec<(PortId, PortConfig)>,
    sent: BTreeMap<u32, Sent>,
    delivered: BTreeSet<(u32, PortId)>,
    offered: BTreeMap<PortId, u64>,
    tx: BTreeMap<PortId, u64>,
}

impl World {
    fn drain_and_check(&mut self, port: PortId) {
        let cfg = self
            .ports
            .iter()
            .find(|(p, _)| *p == port)
            .unwrap()
            .1
            .clone();
        while let Some(f) = self.sw.recv(port) {
            *self.tx.entry(port).or_default() += 1;
            let bytes = f.bytes();
            let plain = untagged(bytes);
            let seq = u32::from_be_bytes(plain[14..18].try_into().unwrap());
            let sent = self
                .sent
                .get(&seq)
                .expect("delivered a frame that was never accepted");
            assert_ne!(sent.ingress, port, "reflected to its ingress port");
            assert_eq!(f.source(), sent.ingress);
            assert_eq!(f.vlan(), sent.vlan);
            assert!(cfg.kind.carries(sent.vlan), "crossed VLANs");
            assert_eq!(plain, sent.untagged, "contents changed");
            let want_tag = match &cfg.kind {
                PortKind::Access(_) => None,
                PortKind::Trunk { native, .. } if *native == Some(sent.vlan) => None,
                PortKind::Trunk { .. } => Some(sent.vlan.get()),
            };
            let tag = (bytes[12..14] == [0x81, 0x00])
                .then(|| u16::from_be_bytes([bytes[14], bytes[15]]) & 0xfff);
            assert_eq!(tag, want_tag, "wrong tagging");
            assert!(self.delivered.insert((seq, port)), "delivered twice");
        }
    }

    fn random_frame(&mut self, rng: &mut Rng, seq: u32) -> Vec<u8> {
        let stations: Vec<MacAddr> = (1..=8).map(mac).collect();
        let mut dsts = stations.clone();
        dsts.extend([MacAddr::BROADCAST, MacAddr([0x01, 0, 0x5e, 0, 0, 7])]);
        let src = if rng.chance(5) {
            rng.pick(&[
                MacAddr::BROADCAST,
                MacAddr([0x33, 0x33, 0, 0, 0, 1]),
                MacAddr([0; 6]),
            ])
        } else {
            rng.pick(&stations)
        };
        let dst = rng.pick(&dsts);
        let payload_len = 4 + rng.below(MAX_FRAME - 14);
        let mut payload: Vec<u8> = (0..payload_len)
            .map(|_| rng.next().to_le_bytes()[0])
            .collect();
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        let mut frame = if rng.chance(50) {
            eth(dst, src, &payload)
        } else {
            let vid = rng.pick(&[0, 10, 20, 30, 40, 4095]);
            let priority = rng.pick(&[0u16, 0x2000, 0xe000]);
            tagged(dst, src, priority | vid, &payload)
        };
        if rng.chance(3) {
            // Cut into the header or the tag (a valid frame keeps its sequence number).
            let header = if frame[12..14] == [0x81, 0x00] {
                18
            } else {
                14
            };
            frame.truncate(rng.below(header));
        }
        frame
    }

    fn check_bounds_and_counters(&self) {
        for &(p, _) in &self.ports {
            let d = self.sw.queue_depth(p).unwrap();
            assert!(d.frames <= QUEUE_FRAMES && d.bytes <= QUEUE_BYTES);
            let s = self.sw.port_stats(p).unwrap();
            let counted = s.rx_frames + s.malformed + s.spoofed + s.vlan_denied;
            assert_eq!(counted, self.offered.get(&p).copied().unwrap_or(0));
            assert_eq!(s.tx_frames, self.tx.get(&p).copied().unwrap_or(0));
        }
        assert!(self.sw.stats().mac_entries <= MAC_CAPACITY);
    }
}

fn run(seed: u64, steps: u32) {
    let mut rng = Rng(seed);
    let sw = Switch::new(SwitchConfig {
        max_frame_len: MAX_FRAME,
        mac_capacity: MAC_CAPACITY,
        mac_age: 400,
        queue_frames: QUEUE_FRAMES,
        queue_bytes: QUEUE_BYTES,
        max_ports: 16,
    })
    .unwrap();
    let mut w = World {
        sw,
        ports: Vec::new(),
        sent: BTreeMap::new(),
        delivered: BTreeSet::new(),
        offered: BTreeMap::new(),
        tx: BTreeMap::new(),
    };
    for cfg in specs() {
        let id = w.sw.add_port(cfg.clone()).unwrap();
        w.ports.push((id, cfg));
    }
    let mut now = 0u64;
    let mut accepted = 0;
    let mut refused: BTreeMap<DropReason, u32> = BTreeMap::new();
    let mut full_total = 0;
    for seq in 0..steps {
        now += rng.below(20) as u64;
        let i = rng.below(w.ports.len());
        let (from, cfg) = w.ports[i].clone();
        let frame = w.random_frame(&mut rng, seq);
        *w.offered.entry(from).or_default() += 1;
        let result = w.sw.send(from, &frame, now);
        match (result, model_decision(&cfg, &frame)) {
            (SendResult::Accepted { queued, full }, Ok(vlan)) => {
                let reach = w
                    .ports
                    .iter()
                    .filter(|(p, c)| *p != from && c.kind.carries(vlan))
                    .count();
                assert!(queued + full <= reach);
                let sent = Sent {
                    ingress: from,
                    vlan,
                    untagged: untagged(&frame),
                };
                w.sent.insert(seq, sent);
                accepted += 1;
                full_total += full;
            }
            (SendResult::Dropped(why), Err(want)) => {
                assert_eq!(why, want, "frame {frame:x?}");
                *refused.entry(why).or_default() += 1;
            }
            (got, want) => panic!("switch {got:?}, model {want:?}, frame {frame:x?}"),
        }
        if rng.chance(30) {
            let (p, _) = w.ports[rng.below(w.ports.len())];
            w.drain_and_check(p);
        }
        if rng.chance(1) {
            // Replace a port: its stations are forgotten, its id retired.
            let (old, cfg) = w.ports.swap_remove(rng.below(w.ports.len()));
            w.sw.remove_port(old).unwrap();
            assert!(w.sw.recv(old).is_none());
            let id = w.sw.add_port(cfg.clone()).unwrap();
            w.ports.push((id, cfg));
        }
        if rng.chance(5) {
            w.sw.age(now);
        }
        w.check_bounds_and_counters();
    }
    for (p, _) in w.ports.clone() {
        w.drain_and_check(p);
    }
    w.check_bounds_and_counters();
    // The mix exercised every path.
    assert!(accepted > steps as usize / 5, "only {accepted} accepted");
    assert!(!w.delivered.is_empty());
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(full_total > 0);
    assert!(w.sw.stats().mac_evicted > 0);
}

#[test]
fn random_traffic_keeps_the_invariants() {
    for seed in [1, 0x5eed, 0xdead_beef, 42, 7_777_777] {
        run(seed, 4000);
    }
}
