//! What is bounded: egress queues, their sharing among senders, the MAC table.

use super::*;

fn small_queues(frames: usize, bytes: usize) -> Switch {
    Switch::new(SwitchConfig {
        queue_frames: frames,
        queue_bytes: bytes,
        ..SwitchConfig::default()
    })
    .unwrap()
}

#[test]
fn full_queues_drop_and_count() {
    let mut sw = small_queues(8, 4096);
    let [a, r] = [(); 2].map(|()| access(&mut sw, 10));
    let f = eth(MacAddr::BROADCAST, mac(1), &[0; 86]);
    for i in 0..100 {
        let want = if i < 8 {
            accepted(1)
        } else {
            SendResult::Accepted { queued: 0, full: 1 }
        };
        assert_eq!(sw.send(a, &f, i), want);
        let depth = sw.queue_depth(r).unwrap();
        assert!(depth.frames <= 8 && depth.bytes <= 4096);
    }
    assert_eq!(sw.port_stats(r).unwrap().dropped_full, 92);
    assert_eq!(sw.port_stats(a).unwrap().rx_frames, 100);
    assert_eq!(drain(&mut sw, r).len(), 8);
    // The byte bound: two 1514-byte frames fit in 4096 bytes, a third does not.
    let big = eth(MacAddr::BROADCAST, mac(1), &[0; 1500]);
    for _ in 0..5 {
        sw.send(a, &big, 200);
    }
    assert_eq!(sw.queue_depth(r).unwrap().bytes, 3028);
    assert_eq!(sw.port_stats(r).unwrap().dropped_full, 95);
    // Once drained, there is room again.
    assert_eq!(drain(&mut sw, r).len(), 2);
    assert_eq!(sw.send(a, &big, 300), accepted(1));
    let s = sw.port_stats(r).unwrap();
    assert_eq!((s.tx_frames, s.tx_bytes), (10, 8 * 100 + 2 * 1514));
}

#[test]
fn a_flooder_does_not_stop_another_senders_frames() {
    let mut sw = small_queues(32, 64 * 1024);
    let flooder = access(&mut sw, 10);
    let sender = access(&mut sw, 10);
    let r = access(&mut sw, 10);
    let r_mac = mac(3);
    sw.send(r, &eth(MacAddr::BROADCAST, r_mac, b""), 0);
    drain(&mut sw, flooder);
    drain(&mut sw, sender);
    // The flooder fills R's queue while R is not looking...
    let flood = eth(MacAddr::BROADCAST, mac(1), &[0xf1; 200]);
    for t in 0..1000 {
        sw.send(flooder, &flood, t);
    }
    assert_eq!(sw.queue_depth(r).unwrap().frames, 32);
    // ...and the other sender's frame still gets in, displacing one of the flooder's.
    let mine = |n: u8| eth(r_mac, mac(2), &[n; 200]);
    assert_eq!(sw.send(sender, &mine(0), 1000), accepted(1));
    let got = drain(&mut sw, r);
    assert_eq!(got.len(), 32);
    assert_eq!(got.iter().filter(|f| f.source() == sender).count(), 1);

    // Steady state: the flooder sends 50 frames for each of the sender's, R takes 4 per round
    // (far below the flooder's rate). Every one of the sender's frames is delivered, in order.
    let mut from_sender = Vec::new();
    let mut t = 2000;
    for round in 0..500u32 {
        for _ in 0..50 {
            sw.send(flooder, &flood, t);
            t += 1;
        }
        let n = u8::try_from(round % 256).unwrap();
        assert_eq!(sw.send(sender, &mine(n), t), accepted(1));
        for _ in 0..4 {
            let f = sw.recv(r).unwrap();
            if f.source() == sender {
                from_sender.push(f.bytes()[14]);
            }
        }
    }
    from_sender.extend(
        drain(&mut sw, r)
            .iter()
            .filter(|f| f.source() == sender)
            .map(|f| f.bytes()[14]),
    );
    let want: Vec<u8> = (0..500u32)
        .map(|r| u8::try_from(r % 256).unwrap())
        .collect();
    assert_eq!(from_sender, want);
    assert!(sw.port_stats(r).unwrap().dropped_full > 20_000);
}

#[test]
fn two_flooders_end_with_equal_shares() {
    let mut sw = small_queues(32, 64 * 1024);
    let [f, g, r] = [(); 3].map(|()| access(&mut sw, 10));
    let from = |n: u8| eth(MacAddr::BROADCAST, mac(n), &[0; 100]);
    for burst in 0..20 {
        let (p, n) = if burst % 2 == 0 { (f, 1) } else { (g, 2) };
        for _ in 0..100 {
            sw.send(p, &from(n), 0);
        }
    }
    let got = drain(&mut sw, r);
    assert_eq!(got.len(), 32);
    let by_f = got.iter().filter(|x| x.source() == f).count();
    assert_eq!((by_f, got.len() - by_f), (16, 16));
}

#[test]
fn a_full_table_evicts_the_oldest_entry() {
    let mut sw = Switch::new(SwitchConfig {
        mac_capacity: 4,
        ..SwitchConfig::default()
    })
    .unwrap();
    let [a, b, c] = [(); 3].map(|()| access(&mut sw, 10));
    for (t, n) in (10..14).enumerate() {
        sw.send(b, &eth(MacAddr::BROADCAST, mac(n), b""), t as u64);
    }
    // mac(10) is seen again, so mac(11) is now the oldest.
    sw.send(b, &eth(MacAddr::BROADCAST, mac(10), b""), 4);
    assert_eq!(sw.stats().mac_evicted, 0);
    sw.send(a, &eth(MacAddr::BROADCAST, mac(1), b""), 5);
    let stats = sw.stats();
    assert_eq!((stats.mac_entries, stats.mac_evicted), (4, 1));
    assert_eq!(sw.lookup(vid(10), mac(11), 5), None);
    for p in [a, b, c] {
        drain(&mut sw, p);
    }
    // The evicted station is flooded to; the others are still known.
    assert_eq!(sw.send(a, &eth(mac(11), mac(1), b""), 6), accepted(2));
    assert_eq!(sw.send(a, &eth(mac(10), mac(1), b""), 7), accepted(1));
    assert_eq!(sw.send(a, &eth(mac(13), mac(1), b""), 8), accepted(1));
    // A sender of ever-new source addresses churns the table but never grows it.
    let up = trunk(&mut sw, &[10], Some(10));
    for i in 0..10_000u32 {
        let [_, _, x, y] = i.to_be_bytes();
        let src = MacAddr([0x02, 0xee, 0, 0, x, y]);
        sw.send(up, &eth(MacAddr::BROADCAST, src, b""), 100);
    }
    let stats = sw.stats();
    assert_eq!((stats.mac_entries, stats.mac_evicted), (4, 10_001));
}
