//! Frames through the 8254x driver and the software model of the NIC: both rings in both
//! directions and around many times, bursts, a full transmit ring, refused lengths, every kind
//! of hostile write-back (dropped, counted, survived), bounded work per call, memory outside
//! the driver left alone, and two cards bridged through the `Nic` trait.

// Ring sizes, frame numbers and lengths in these tests are small by construction.
#![allow(clippy::cast_possible_truncation)]

mod model;

use dom0_drivers::e1000::{BUF_SIZE, RX_SLOTS, Stats, TX_SLOTS};
use dom0_drivers::nic::{MAX_FRAME, Nic, NicError};
use model::e1000::rig::{Driver, MAC, device, frame, recv_vec, start, up};
use model::e1000::{E1000Model, RXD_EOP, RXE_CE, RXE_RXE, RxWrite, TDT};
use model::mem::Layout;

#[test]
fn frames_round_trip_many_times_around_both_rings() {
    let (nic, mut drv) = up();
    let lengths = [14usize, 60, 61, 64, 128, 511, 1000, 1514, 1517, 1518];
    let rounds = 10 * (RX_SLOTS + TX_SLOTS);
    let (mut tx_bytes, mut rx_bytes) = (0u64, 0u64);
    for n in 0..rounds {
        let len = lengths[n % lengths.len()];
        let out = frame(n as u32, len);
        drv.send(&out).unwrap();
        tx_bytes += len as u64;
        assert_eq!(
            nic.lock().sent.last(),
            Some(&out),
            "frame {n} sent as given"
        );

        let inbound = frame(0x8000 + n as u32, lengths[(n * 7) % lengths.len()]);
        assert!(nic.receive(&inbound));
        rx_bytes += inbound.len() as u64;
        assert_eq!(recv_vec(&mut drv), Some(inbound), "frame {n} received");
        assert_eq!(recv_vec(&mut drv), None);
    }
    assert_eq!(nic.lock().sent.len(), rounds);
    let s = drv.stats();
    assert_eq!((s.tx_frames, s.tx_bytes), (rounds as u64, tx_bytes));
    assert_eq!((s.rx_frames, s.rx_bytes), (rounds as u64, rx_bytes));
    assert_eq!(s.rx_dropped(), 0);
    assert_eq!(
        drv.tx_in_flight(),
        1,
        "the last frame, until the next send reclaims it"
    );
}

#[test]
fn a_burst_fills_the_receive_ring_then_flows_again() {
    let (nic, mut drv) = up();
    // All but one slot are the device's.
    for n in 0..RX_SLOTS as u32 - 1 {
        assert!(nic.receive(&frame(n, 100)), "frame {n}");
    }
    assert!(!nic.receive(&frame(999, 100)), "no room left");
    assert_eq!(nic.lock().missed, 1);
    for n in 0..RX_SLOTS as u32 - 1 {
        assert_eq!(recv_vec(&mut drv), Some(frame(n, 100)));
    }
    assert_eq!(recv_vec(&mut drv), None);
    for n in 0..3 * RX_SLOTS as u32 {
        assert!(nic.receive(&frame(n, 200)));
        assert_eq!(recv_vec(&mut drv), Some(frame(n, 200)));
    }
}

#[test]
fn a_full_transmit_ring_says_full_then_recovers_once_the_device_sends() {
    let (nic, mut drv) = up();
    nic.lock().tx_paused = true;
    for n in 0..TX_SLOTS as u32 - 1 {
        drv.send(&frame(n, 300)).unwrap();
    }
    assert_eq!(drv.send(&frame(99, 300)), Err(NicError::Full));
    assert_eq!(drv.send(&frame(99, 300)), Err(NicError::Full));
    assert_eq!(drv.stats().tx_full, 2);
    assert_eq!(drv.stats().tx_frames, TX_SLOTS as u64 - 1);
    assert!(nic.lock().sent.is_empty());

    nic.run_tx();
    let sent: Vec<Vec<u8>> = (0..TX_SLOTS as u32 - 1).map(|n| frame(n, 300)).collect();
    assert_eq!(nic.lock().sent, sent);
    // Every slot came back: another full ring's worth goes in.
    for n in 100..100 + TX_SLOTS as u32 - 1 {
        drv.send(&frame(n, 60)).unwrap();
    }
    assert_eq!(drv.send(&frame(7, 60)), Err(NicError::Full));
    nic.lock().tx_paused = false;
    nic.run_tx();
    drv.send(&frame(7, 60)).unwrap();
    assert_eq!(nic.lock().sent.len(), 2 * (TX_SLOTS - 1) + 1);
    assert_eq!(nic.lock().sent.last(), Some(&frame(7, 60)));
}

#[test]
fn frames_outside_14_to_1518_bytes_are_refused_unsent() {
    let (nic, mut drv) = up();
    for len in [0, 1, 13, 1519, 2048, 70_000] {
        let f = vec![0xAB; len];
        assert_eq!(drv.send(&f), Err(NicError::BadLength(len)));
    }
    assert_eq!(drv.stats().tx_bad_length, 6);
    assert!(nic.lock().sent.is_empty());
    assert_eq!(nic.reg(TDT), 0);
    drv.send(&frame(1, 14)).unwrap();
    drv.send(&frame(2, 1518)).unwrap();
    assert_eq!(nic.lock().sent.len(), 2);
}

/// After each hostile write-back, a good frame still comes through, from the next slot.
fn then_good(nic: &E1000Model, drv: &mut Driver, seq: u32) {
    let good = frame(seq, 90);
    assert!(nic.receive(&good));
    assert_eq!(recv_vec(drv), Some(good));
    assert_eq!(recv_vec(drv), None);
}

/// Which counter a case must raise.
type Counter = fn(&Stats) -> u64;

#[test]
fn hostile_write_backs_are_dropped_counted_and_survived() {
    let (nic, mut drv) = up();
    let big = vec![0x5A; BUF_SIZE];
    let cases: Vec<(&str, RxWrite, Counter)> = vec![
        (
            "length beyond the buffer",
            RxWrite {
                length: 4000,
                ..RxWrite::frame(&big)
            },
            |s| s.rx_bad_length,
        ),
        (
            "length beyond a frame, within the buffer",
            RxWrite {
                length: 2000,
                ..RxWrite::frame(&big)
            },
            |s| s.rx_bad_length,
        ),
        (
            "length 65535",
            RxWrite {
                length: u16::MAX,
                ..RxWrite::frame(&big)
            },
            |s| s.rx_bad_length,
        ),
        ("zero length", RxWrite::frame(&[]), |s| s.rx_bad_length),
        ("shorter than a header", RxWrite::frame(&[1; 13]), |s| {
            s.rx_bad_length
        }),
        (
            "CRC error",
            RxWrite {
                errors: RXE_CE,
                ..RxWrite::frame(&frame(1, 64))
            },
            |s| s.rx_errors,
        ),
        (
            "data error",
            RxWrite {
                errors: RXE_RXE,
                ..RxWrite::frame(&frame(1, 64))
            },
            |s| s.rx_errors,
        ),
        (
            "every error bit",
            RxWrite {
                errors: 0xFF,
                ..RxWrite::frame(&frame(1, 64))
            },
            |s| s.rx_errors,
        ),
    ];
    let mut seq = 100;
    for (what, w, counter) in cases {
        let before = drv.stats();
        assert!(nic.write_back(w));
        // The hostile descriptor is consumed; what follows is a good frame.
        let good = frame(seq, 90);
        assert!(nic.receive(&good));
        assert_eq!(recv_vec(&mut drv), Some(good), "{what}");
        assert_eq!(counter(&drv.stats()), counter(&before) + 1, "{what}");
        assert_eq!(drv.stats().rx_dropped(), before.rx_dropped() + 1, "{what}");
        seq += 1;
    }
    // Around the ring again: every slot was re-posted correctly.
    for _ in 0..2 * RX_SLOTS {
        then_good(&nic, &mut drv, seq);
        seq += 1;
    }
}

#[test]
fn a_frame_over_several_descriptors_is_dropped_with_all_its_pieces() {
    let (nic, mut drv) = up();
    // Three pieces: 2048 + 2048 + 904 bytes (as a device with long packets on would write).
    let long = frame(1, 5000);
    assert!(nic.receive(&long));
    let good = frame(2, 100);
    assert!(nic.receive(&good));
    assert_eq!(
        recv_vec(&mut drv),
        Some(good),
        "the next frame, not a piece"
    );
    let s = drv.stats();
    assert_eq!((s.rx_fragments, s.rx_dropped(), s.rx_frames), (1, 1, 1));
    // Pieces without EOP are one frame with the next descriptor that has EOP, however good
    // that one looks: all three go.
    for _ in 0..2 {
        assert!(nic.write_back(RxWrite {
            status: 0,
            ..RxWrite::frame(&frame(3, 1000))
        }));
    }
    assert!(nic.write_back(RxWrite::frame(&frame(4, 1000))));
    then_good(&nic, &mut drv, 5);
    assert_eq!(drv.stats().rx_fragments, 2);
    assert_eq!(drv.stats().rx_frames, 2);
}

#[test]
fn a_frame_longer_than_the_callers_buffer_is_dropped_not_truncated() {
    let (nic, mut drv) = up();
    assert!(nic.receive(&frame(1, 600)));
    let mut small = [0u8; 599];
    assert_eq!(drv.recv(&mut small), None);
    assert_eq!(drv.stats().rx_no_room, 1);
    assert!(small.iter().all(|&b| b == 0), "nothing copied");
    assert!(nic.receive(&frame(2, 599)));
    assert_eq!(drv.recv(&mut small), Some(599));
    assert_eq!(small.to_vec(), frame(2, 599));
}

#[test]
fn a_buffer_address_the_device_overwrites_is_not_believed() {
    let (nic, mut drv) = up();
    // Each slot, once, comes back with its buffer address replaced (by one outside the
    // driver's memory, which the model would refuse to DMA to if the driver reposted it).
    for n in 0..RX_SLOTS as u32 {
        assert!(nic.write_back(RxWrite {
            addr: Some(0xDEAD_0000 + u64::from(n) * 0x1000),
            ..RxWrite::frame(&frame(n, 200))
        }));
        assert_eq!(recv_vec(&mut drv), Some(frame(n, 200)));
    }
    for n in 0..2 * RX_SLOTS as u32 {
        then_good(&nic, &mut drv, 1000 + n);
    }
    for i in 0..RX_SLOTS as u32 {
        assert!(
            nic.rx_desc(i).0 < 0xDEAD_0000,
            "slot {i} reposted from the driver's record"
        );
    }
}

#[test]
fn one_recv_looks_at_no_more_than_one_ring_even_if_the_device_never_stops() {
    let (nic, mut drv) = up();
    // A device that writes a bad frame into every slot as soon as it is given one.
    nic.lock().flood = Some(RxWrite {
        errors: RXE_CE,
        ..RxWrite::frame(&frame(0, 64))
    });
    assert!(nic.write_back(RxWrite {
        errors: RXE_CE,
        ..RxWrite::frame(&frame(0, 64))
    }));
    let mut out = [0u8; MAX_FRAME];
    assert_eq!(drv.recv(&mut out), None);
    assert_eq!(drv.stats().rx_errors, RX_SLOTS as u64);
    assert_eq!(drv.recv(&mut out), None);
    assert_eq!(drv.stats().rx_errors, 2 * RX_SLOTS as u64);
    // Once the device behaves, the ring works: the flood's leftovers first, then frames.
    nic.lock().flood = None;
    while drv.recv(&mut out).is_some() {}
    for n in 0..RX_SLOTS as u32 {
        then_good(&nic, &mut drv, n);
    }
}

#[test]
fn stale_status_bits_do_not_survive_reposting() {
    // The model ORs status into what a descriptor holds, as Bochs does: if the driver
    // reposted without clearing status, the next frame in a slot would look like a piece
    // of a multi-descriptor frame or be done before it was written.
    let (nic, mut drv) = up();
    for n in 0..3 * RX_SLOTS as u32 {
        assert!(nic.receive(&frame(n, 64 + n as usize)));
        assert_eq!(recv_vec(&mut drv), Some(frame(n, 64 + n as usize)));
        let slot = (n + 1) % RX_SLOTS as u32;
        assert_eq!(nic.rx_desc(slot).2 & RXD_EOP, 0);
    }
}

#[test]
fn memory_outside_the_driver_is_never_written() {
    // The first 4 pages of the fake memory are "the rest of dom0": after heavy traffic with
    // hostile write-backs they still hold their fill byte.
    let (mem, nic) = device(Layout::Contiguous);
    let mut drv = start(&nic, &mem).unwrap();
    for n in 0..4 * RX_SLOTS as u32 {
        assert!(nic.write_back(RxWrite {
            length: 0xFFFF,
            ..RxWrite::frame(&vec![0x77; 4096])
        }));
        assert_eq!(recv_vec(&mut drv), None);
        drv.send(&frame(n, 1518)).unwrap();
    }
    let m = mem.lock().unwrap();
    assert!(m.bytes[..4 * 4096].iter().all(|&b| b == 0xEE));
}

/// dom0's bridge loop, written against the trait only.
fn forward_all(from: &mut dyn Nic, to: &mut dyn Nic) -> usize {
    let mut buf = [0u8; MAX_FRAME];
    let mut n = 0;
    while let Some(len) = from.recv(&mut buf) {
        to.send(&buf[..len]).unwrap();
        n += 1;
    }
    n
}

#[test]
fn two_cards_bridge_through_the_nic_trait() {
    let (nic_a, mut a) = up();
    let (nic_b, mut b) = up();
    assert_eq!(Nic::mac(&a), MAC);
    for n in 0..10 {
        assert!(nic_a.receive(&frame(n, 100 + n as usize)));
    }
    assert_eq!(forward_all(&mut a, &mut b), 10);
    let sent: Vec<Vec<u8>> = (0..10).map(|n| frame(n, 100 + n as usize)).collect();
    assert_eq!(nic_b.lock().sent, sent);
    let mut short = [0u8; 5];
    assert_eq!(Nic::send(&mut b, &short), Err(NicError::BadLength(5)));
    assert_eq!(Nic::recv(&mut b, &mut short), None);
}
