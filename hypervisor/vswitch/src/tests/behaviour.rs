//! Forwarding, learning, VLANs and tags, anti-spoofing, validation.

use super::*;
use crate::{DropReason, PortKind, VlanSet};

#[test]
fn learning_sends_the_second_frame_to_one_port() {
    let mut sw = switch();
    let [a, b, c] = [(); 3].map(|()| access(&mut sw, 10));
    // B's address is unknown: flooded to B and C.
    assert_eq!(sw.send(a, &eth(mac(2), mac(1), b"1"), 0), accepted(2));
    assert_eq!(drain(&mut sw, b).len(), 1);
    assert_eq!(drain(&mut sw, c).len(), 1);
    // A was learned from that frame: B's reply goes to A only.
    assert_eq!(sw.send(b, &eth(mac(1), mac(2), b"2"), 1), accepted(1));
    assert_eq!(drain(&mut sw, a)[0].bytes(), eth(mac(1), mac(2), b"2"));
    assert!(drain(&mut sw, c).is_empty());
    // And B was learned from the reply.
    assert_eq!(sw.send(a, &eth(mac(2), mac(1), b"3"), 2), accepted(1));
    assert_eq!(drain(&mut sw, b).len(), 1);
    assert!(drain(&mut sw, c).is_empty());
    assert_eq!(sw.lookup(vid(10), mac(2), 2), Some(b));
    assert_eq!(sw.stats().mac_entries, 2);
}

#[test]
fn entries_age_out_and_the_frame_is_flooded_again() {
    let mut sw = Switch::new(SwitchConfig {
        mac_age: 1000,
        ..SwitchConfig::default()
    })
    .unwrap();
    let [a, b, c] = [(); 3].map(|()| access(&mut sw, 10));
    sw.send(b, &eth(MacAddr::BROADCAST, mac(2), b""), 0);
    assert_eq!(sw.send(a, &eth(mac(2), mac(1), b""), 999), accepted(1));
    // 1000 after B was last seen, even without `age`, the entry is not used.
    assert_eq!(sw.send(a, &eth(mac(2), mac(1), b""), 1000), accepted(2));
    assert_eq!(sw.lookup(vid(10), mac(2), 1000), None);
    // `age` frees expired entries only: A was seen at 1000.
    assert_eq!(sw.age(1999), 1);
    assert_eq!(sw.stats().mac_entries, 1);
    assert_eq!(sw.age(2000), 1);
    assert_eq!(sw.stats().mac_entries, 0);
    drain(&mut sw, a);
    drain(&mut sw, b);
    drain(&mut sw, c);
    // Re-learned from B's next frame.
    sw.send(b, &eth(mac(1), mac(2), b""), 3000);
    assert_eq!(sw.send(a, &eth(mac(2), mac(1), b""), 3001), accepted(1));
    assert_eq!(drain(&mut sw, b).len(), 1);
}

#[test]
fn a_station_that_moves_is_relearned() {
    let mut sw = switch();
    let [a, b, c] = [(); 3].map(|()| access(&mut sw, 10));
    sw.send(b, &eth(MacAddr::BROADCAST, mac(9), b""), 0);
    sw.send(a, &eth(mac(9), mac(1), b""), 1);
    assert_eq!(drain(&mut sw, b).len(), 1);
    assert_eq!(sw.lookup(vid(10), mac(9), 1), Some(b));
    // The station (no bound MAC) now speaks from C.
    sw.send(c, &eth(MacAddr::BROADCAST, mac(9), b""), 2);
    assert_eq!(sw.stats().mac_moves, 1);
    assert_eq!(sw.lookup(vid(10), mac(9), 2), Some(c));
    for p in [a, b, c] {
        drain(&mut sw, p);
    }
    assert_eq!(sw.send(a, &eth(mac(9), mac(1), b"x"), 3), accepted(1));
    assert_eq!(drain(&mut sw, c).len(), 1);
    assert!(drain(&mut sw, b).is_empty());
}

#[test]
fn nothing_is_reflected_to_the_ingress_port() {
    let mut sw = switch();
    let [a, b] = [(); 2].map(|()| access(&mut sw, 10));
    // Broadcast: every port but the sender.
    assert_eq!(
        sw.send(a, &eth(MacAddr::BROADCAST, mac(1), b""), 0),
        accepted(1)
    );
    assert!(drain(&mut sw, a).is_empty());
    // Two stations behind A (as behind a bridge): a frame between them stays off the switch.
    sw.send(a, &eth(MacAddr::BROADCAST, mac(3), b""), 1);
    drain(&mut sw, b);
    assert_eq!(sw.send(a, &eth(mac(3), mac(1), b""), 2), accepted(0));
    assert!(drain(&mut sw, a).is_empty() && drain(&mut sw, b).is_empty());
    // A lone port has nowhere to flood to.
    let mut sw = switch();
    let only = access(&mut sw, 10);
    assert_eq!(
        sw.send(only, &eth(MacAddr::BROADCAST, mac(1), b""), 0),
        accepted(0)
    );
    assert!(drain(&mut sw, only).is_empty());
}

#[test]
fn vlans_are_isolated() {
    let mut sw = switch();
    let [a, b] = [(); 2].map(|()| access(&mut sw, 10));
    let [c, d] = [(); 2].map(|()| access(&mut sw, 20));
    // C is learned on VLAN 20.
    sw.send(c, &eth(MacAddr::BROADCAST, mac(3), b""), 0);
    assert_eq!(drain(&mut sw, d).len(), 1);
    assert!(drain(&mut sw, a).is_empty() && drain(&mut sw, b).is_empty());
    // A's broadcast and A's unicast to C's address stay on VLAN 10.
    sw.send(a, &eth(MacAddr::BROADCAST, mac(1), b""), 1);
    sw.send(a, &eth(mac(3), mac(1), b""), 2);
    sw.send(a, &eth(MacAddr([0x01, 0, 0x5e, 0, 0, 1]), mac(1), b""), 3);
    assert_eq!(drain(&mut sw, b).len(), 3);
    assert!(drain(&mut sw, c).is_empty() && drain(&mut sw, d).is_empty());
    // C's unicast to A's (learned, VLAN 10) address is unknown on VLAN 20: flooded there only.
    assert_eq!(sw.send(c, &eth(mac(1), mac(3), b""), 4), accepted(1));
    assert_eq!(drain(&mut sw, d).len(), 1);
    assert!(drain(&mut sw, a).is_empty() && drain(&mut sw, b).is_empty());
    // The same address on two VLANs is two stations.
    sw.send(d, &eth(MacAddr::BROADCAST, mac(1), b""), 5);
    assert_eq!(sw.lookup(vid(10), mac(1), 5), Some(a));
    assert_eq!(sw.lookup(vid(20), mac(1), 5), Some(d));
}

#[test]
fn access_to_trunk_adds_the_tag_and_trunk_to_access_strips_it() {
    let mut sw = switch();
    let a = access(&mut sw, 10);
    let t = trunk(&mut sw, &[10, 20], None);
    let plain = eth(MacAddr::BROADCAST, mac(1), b"hello");
    sw.send(a, &plain, 0);
    let got = drain(&mut sw, t);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].bytes(),
        tagged(MacAddr::BROADCAST, mac(1), 10, b"hello")
    );
    assert_eq!(got[0].vlan(), vid(10));
    assert_eq!(got[0].source(), a);
    // The trunk answers tagged, with a priority: A gets it untagged.
    let reply = tagged(mac(1), mac(7), 0xa00a, b"world");
    assert_eq!(sw.send(t, &reply, 1), accepted(1));
    assert_eq!(drain(&mut sw, a)[0].bytes(), eth(mac(1), mac(7), b"world"));
    // Trunk to trunk keeps the tag, priority bits included.
    let t2 = trunk(&mut sw, &[20], None);
    let on20 = tagged(MacAddr::BROADCAST, mac(7), 0x6014, b"x");
    assert_eq!(sw.send(t, &on20, 2), accepted(1));
    assert_eq!(drain(&mut sw, t2)[0].bytes(), on20);
    // A priority-tagged frame from an access port is its VLAN's, tagged with its VID on a
    // trunk, and keeps its priority.
    sw.send(a, &tagged(MacAddr::BROADCAST, mac(1), 0xe000, b"p"), 3);
    assert_eq!(
        drain(&mut sw, t)[0].bytes(),
        tagged(MacAddr::BROADCAST, mac(1), 0xe00a, b"p")
    );
}

#[test]
fn the_native_vlan_is_untagged_both_ways() {
    let mut sw = switch();
    let a = access(&mut sw, 10);
    let b = access(&mut sw, 20);
    let up = trunk(&mut sw, &[10, 20], Some(10));
    let plain = eth(MacAddr::BROADCAST, mac(5), b"n");
    assert_eq!(sw.send(up, &plain, 0), accepted(1));
    assert_eq!(drain(&mut sw, a)[0].bytes(), plain);
    assert!(drain(&mut sw, b).is_empty());
    // A tagged frame naming the native VLAN is on it too.
    assert_eq!(
        sw.send(up, &tagged(mac(1), mac(5), 10, b"t"), 1),
        accepted(1)
    );
    assert_eq!(drain(&mut sw, a)[0].bytes(), eth(mac(1), mac(5), b"t"));
    // Native VLAN frames leave untagged, others tagged.
    sw.send(a, &eth(mac(5), mac(1), b"u"), 2);
    assert_eq!(drain(&mut sw, up)[0].bytes(), eth(mac(5), mac(1), b"u"));
    sw.send(b, &eth(MacAddr::BROADCAST, mac(2), b"v"), 3);
    assert_eq!(
        drain(&mut sw, up)[0].bytes(),
        tagged(MacAddr::BROADCAST, mac(2), 20, b"v")
    );
    // Without a native VLAN, untagged frames from a trunk are refused.
    let bare = trunk(&mut sw, &[10], None);
    assert_eq!(
        sw.send(bare, &plain, 4),
        SendResult::Dropped(DropReason::VlanDenied)
    );
    assert_eq!(sw.port_stats(bare).unwrap().vlan_denied, 1);
    assert!(drain(&mut sw, a).is_empty());
}

#[test]
fn a_disallowed_vlan_neither_enters_nor_leaves_a_trunk() {
    let mut sw = switch();
    let t = trunk(&mut sw, &[10], None);
    let a10 = access(&mut sw, 10);
    let a20 = access(&mut sw, 20);
    let other20 = access(&mut sw, 20);
    for vid in [20, 4095, 30] {
        let f = tagged(MacAddr::BROADCAST, mac(5), vid, b"");
        assert_eq!(
            sw.send(t, &f, 0),
            SendResult::Dropped(DropReason::VlanDenied)
        );
    }
    assert_eq!(sw.port_stats(t).unwrap().vlan_denied, 3);
    assert_eq!(sw.port_stats(t).unwrap().rx_frames, 0);
    assert!(drain(&mut sw, a20).is_empty() && drain(&mut sw, a10).is_empty());
    // Nothing was learned from the refused frames.
    assert_eq!(sw.stats().mac_entries, 0);
    sw.send(a20, &eth(MacAddr::BROADCAST, mac(2), b""), 1);
    assert!(drain(&mut sw, t).is_empty());
    assert_eq!(drain(&mut sw, other20).len(), 1);
}

#[test]
fn an_access_port_refuses_tagged_frames() {
    let mut sw = switch();
    let a = access(&mut sw, 10);
    let b = access(&mut sw, 20);
    let hop = tagged(MacAddr::BROADCAST, mac(1), 20, b"");
    assert_eq!(
        sw.send(a, &hop, 0),
        SendResult::Dropped(DropReason::VlanDenied)
    );
    let same = tagged(MacAddr::BROADCAST, mac(1), 10, b"");
    assert_eq!(
        sw.send(a, &same, 0),
        SendResult::Dropped(DropReason::VlanDenied)
    );
    assert!(drain(&mut sw, b).is_empty());
    assert_eq!(sw.port_stats(a).unwrap().vlan_denied, 2);
}

#[test]
fn stacked_tags_from_an_access_port_are_refused() {
    // A priority tag (VID 0) hiding a tag for VLAN 20, and an 802.1ad service tag: both would
    // reach VLAN 20 beyond the next switch once the trunk's tag is stripped there.
    let mut sw = switch();
    let a = access(&mut sw, 10);
    let up = trunk(&mut sw, &[10, 20], None);
    let mut hidden = tagged(MacAddr::BROADCAST, mac(1), 0, b"");
    hidden.splice(16..18, [0x81, 0x00, 0x00, 20]);
    assert_eq!(
        sw.send(a, &hidden, 0),
        SendResult::Dropped(DropReason::VlanDenied)
    );
    let mut service = eth(MacAddr::BROADCAST, mac(1), &[0x00, 20, 0x08, 0x00]);
    service[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
    assert_eq!(
        sw.send(a, &service, 0),
        SendResult::Dropped(DropReason::VlanDenied)
    );
    assert!(drain(&mut sw, up).is_empty());
    assert_eq!(sw.port_stats(a).unwrap().vlan_denied, 2);
    // A plain priority-tagged frame is still the port's own VLAN's.
    let plain = tagged(MacAddr::BROADCAST, mac(1), 0, b"");
    assert_eq!(sw.send(a, &plain, 0), accepted(1));
    // The trunk (dom0's uplink) may carry stacked tags.
    let mut double = tagged(MacAddr::BROADCAST, mac(2), 10, b"");
    double.splice(16..18, [0x81, 0x00, 0x00, 20]);
    assert!(matches!(
        sw.send(up, &double, 0),
        SendResult::Accepted { .. }
    ));
}

#[test]
fn forged_and_group_sources_are_dropped_and_counted() {
    let mut sw = switch();
    let a = sw
        .add_port(PortConfig::access(vid(10)).with_mac(mac(1)))
        .unwrap();
    let b = access(&mut sw, 10);
    let up = trunk(&mut sw, &[10], Some(10));
    let forged = eth(MacAddr::BROADCAST, mac(66), b"");
    assert_eq!(
        sw.send(a, &forged, 0),
        SendResult::Dropped(DropReason::Spoofed)
    );
    assert!(drain(&mut sw, b).is_empty() && drain(&mut sw, up).is_empty());
    assert_eq!(sw.lookup(vid(10), mac(66), 0), None);
    // The real address passes.
    assert_eq!(
        sw.send(a, &eth(MacAddr::BROADCAST, mac(1), b""), 0),
        accepted(2)
    );
    // Group and zero sources, from any port, the uplink included.
    for src in [
        MacAddr::BROADCAST,
        MacAddr([0x01, 0, 0x5e, 0, 0, 1]),
        MacAddr([0; 6]),
    ] {
        for p in [b, up] {
            let f = eth(mac(1), src, b"");
            assert_eq!(sw.send(p, &f, 1), SendResult::Dropped(DropReason::Spoofed));
        }
    }
    assert_eq!(sw.port_stats(a).unwrap().spoofed, 1);
    assert_eq!(sw.port_stats(b).unwrap().spoofed, 3);
    assert_eq!(sw.port_stats(up).unwrap().spoofed, 3);
    assert_eq!(sw.port_stats(a).unwrap().rx_frames, 1);
    assert_eq!(drain(&mut sw, b).len() + drain(&mut sw, up).len(), 2);
    assert!(drain(&mut sw, a).is_empty());
    assert_eq!(sw.stats().mac_entries, 1);
}

#[test]
fn malformed_frames_are_dropped_and_counted() {
    let mut sw = switch();
    let up = trunk(&mut sw, &[10], Some(10));
    let b = access(&mut sw, 10);
    let short = &eth(MacAddr::BROADCAST, mac(1), b"")[..13];
    let cut_tag = &tagged(MacAddr::BROADCAST, mac(1), 10, b"")[..17];
    let mut long = eth(MacAddr::BROADCAST, mac(1), b"");
    long.resize(1515, 0);
    let mut long_tagged = tagged(MacAddr::BROADCAST, mac(1), 10, b"");
    long_tagged.resize(1519, 0);
    for f in [&[][..], short, cut_tag, &long, &long_tagged] {
        assert_eq!(
            sw.send(up, f, 0),
            SendResult::Dropped(DropReason::Malformed)
        );
    }
    assert_eq!(sw.port_stats(up).unwrap().malformed, 5);
    assert!(drain(&mut sw, b).is_empty());
    assert_eq!(sw.stats().mac_entries, 0);
    // The largest frames pass; the tagged one leaves the access port untagged at 1514.
    long.truncate(1514);
    long_tagged.truncate(1518);
    assert_eq!(sw.send(up, &long, 0), accepted(1));
    assert_eq!(sw.send(up, &long_tagged, 0), accepted(1));
    let got = drain(&mut sw, b);
    assert_eq!(
        got.iter().map(|f| f.bytes().len()).collect::<Vec<_>>(),
        [1514, 1514]
    );
    // A bare 14-byte header is a frame.
    let header = eth(MacAddr::BROADCAST, mac(1), b"");
    assert_eq!(sw.send(up, &header, 0), accepted(1));
    // An unknown port is refused before any parse.
    sw.remove_port(b).unwrap();
    assert_eq!(
        sw.send(b, &header, 0),
        SendResult::Dropped(DropReason::UnknownPort)
    );
}

#[test]
fn removing_a_port_forgets_its_stations() {
    let mut sw = switch();
    let a = access(&mut sw, 10);
    let b = access(&mut sw, 10);
    sw.send(b, &eth(MacAddr::BROADCAST, mac(2), b""), 0);
    sw.send(b, &eth(MacAddr::BROADCAST, mac(3), b""), 0);
    sw.send(a, &eth(MacAddr::BROADCAST, mac(1), b""), 0);
    assert_eq!(sw.stats().mac_entries, 3);
    sw.remove_port(b).unwrap();
    assert_eq!(sw.stats().mac_entries, 1);
    assert_eq!(sw.lookup(vid(10), mac(2), 1), None);
    assert_eq!(sw.remove_port(b), Err(crate::PortError::UnknownPort));
    assert_eq!(sw.recv(b), None);
    assert_eq!(sw.port_stats(b), None);
    // The slot comes back under a new id; the old id still names nothing.
    let c = access(&mut sw, 10);
    assert_ne!(b, c);
    assert_eq!(sw.recv(b), None);
    assert_eq!(sw.send(a, &eth(mac(2), mac(1), b""), 1), accepted(1));
    assert_eq!(drain(&mut sw, c).len(), 1);
    assert_eq!(sw.ports().collect::<Vec<_>>(), [a, c]);
}

#[test]
fn configs_are_checked() {
    assert!(Switch::new(SwitchConfig::default()).is_ok());
    let bad = [
        (
            SwitchConfig {
                max_frame_len: 13,
                ..SwitchConfig::default()
            },
            crate::ConfigError::FrameLenTooSmall,
        ),
        (
            SwitchConfig {
                mac_capacity: 0,
                ..SwitchConfig::default()
            },
            crate::ConfigError::MacCapacity,
        ),
        (
            SwitchConfig {
                queue_bytes: 1517,
                ..SwitchConfig::default()
            },
            crate::ConfigError::QueueTooSmall,
        ),
        (
            SwitchConfig {
                queue_frames: 0,
                ..SwitchConfig::default()
            },
            crate::ConfigError::QueueTooSmall,
        ),
        (
            SwitchConfig {
                max_ports: 0,
                ..SwitchConfig::default()
            },
            crate::ConfigError::MaxPorts,
        ),
    ];
    for (config, err) in bad {
        assert_eq!(Switch::new(config).err(), Some(err));
    }
    let mut sw = switch();
    let allowed: VlanSet = [vid(10)].into_iter().collect();
    let native_elsewhere = PortConfig::trunk(allowed, Some(vid(20)));
    assert_eq!(
        sw.add_port(native_elsewhere),
        Err(crate::PortError::NativeNotAllowed)
    );
    let group = PortConfig::access(vid(1)).with_mac(MacAddr::BROADCAST);
    assert_eq!(sw.add_port(group), Err(crate::PortError::BadMac));
    let cfg = PortConfig::access(vid(1)).with_mac(mac(1));
    let p = sw.add_port(cfg.clone()).unwrap();
    assert_eq!(sw.port_config(p), Some(&cfg));
    assert!(matches!(cfg.kind, PortKind::Access(v) if v == vid(1)));
}
