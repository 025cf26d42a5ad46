//! dom0's end of the block ring (`pv_drivers::ioring`) against the hypervisor's own end
//! (`hypervisor::io::ioring::RingHost`) over one shared memory: if the two disagree on the
//! layout, these fail.

// Test sizes and patterns are small integers; the casts are intended.
#![allow(clippy::cast_possible_truncation)]

use std::rc::Rc;

use hv_abi::ioring::{self, Request, op};
use hypervisor::domain::memory::{GuestAddr, GuestMemory, VecGuestMemory};
use hypervisor::io::ioring::RingHost;
use pv_drivers::ioring::{BackendRing, RingError, RingMemory};

const RING: u64 = 0x1000;
const DATA: u64 = 0x10_0000;

/// A window of the shared memory, as dom0 sees it.
struct Window {
    mem: Rc<VecGuestMemory>,
    base: u64,
}

impl RingMemory for Window {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.mem.read(GuestAddr(self.base + offset), buf).unwrap();
    }
    fn write(&self, offset: u64, buf: &[u8]) {
        self.mem.write(GuestAddr(self.base + offset), buf).unwrap();
    }
}

fn pair() -> (Rc<VecGuestMemory>, RingHost<u32>, BackendRing<Window>) {
    let mem = Rc::new(VecGuestMemory::new(0, 8 << 20));
    let host = RingHost::setup(&*mem, RING, DATA).unwrap();
    let ring = BackendRing::new(
        Window {
            mem: mem.clone(),
            base: RING,
        },
        Window {
            mem: mem.clone(),
            base: DATA,
        },
    )
    .unwrap();
    (mem, host, ring)
}

#[test]
fn a_ring_that_was_not_set_up_is_refused() {
    let mem = Rc::new(VecGuestMemory::new(0, 1 << 20));
    let r = BackendRing::new(
        Window {
            mem: mem.clone(),
            base: 0,
        },
        Window { mem, base: 4096 },
    );
    assert!(matches!(r, Err(RingError::BadHeader)));
}

#[test]
fn requests_and_data_cross_in_both_directions() {
    let (mem, mut host, mut ring) = pair();
    let mut disk = vec![0u8; 1 << 20];
    let write = Request {
        op: op::WRITE,
        disk: 1,
        sector: 16,
        sectors: 16,
        ..Request::default()
    };
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 251) as u8).collect();
    host.submit(&*mem, write, &pattern, 1).unwrap();
    host.submit(
        &*mem,
        Request {
            op: op::READ,
            ..write
        },
        &[],
        2,
    )
    .unwrap();
    host.submit(
        &*mem,
        Request {
            op: op::FLUSH,
            sectors: 0,
            ..write
        },
        &[],
        3,
    )
    .unwrap();
    // dom0 sees them waiting without taking any, then serves all three in order.
    assert!(ring.pending());
    assert!(ring.pending(), "looking takes nothing");
    let mut served = 0;
    while let Some(r) = ring.take() {
        let range = r.sector as usize * 512..(r.sector + u64::from(r.sectors)) as usize * 512;
        match r.op {
            op::WRITE => {
                let mut buf = vec![0u8; range.len()];
                ring.read_slot(&r, &mut buf);
                disk[range].copy_from_slice(&buf);
                ring.respond(r.tag, ioring::S_OK, 0);
            }
            op::READ => {
                let n = range.len() as u32;
                ring.write_slot(&r, &disk[range]);
                ring.respond(r.tag, ioring::S_OK, n);
            }
            _ => ring.respond(r.tag, ioring::S_OK, 0),
        }
        served += 1;
    }
    ring.publish();
    assert_eq!(served, 3);
    assert!(!host.unread(&*mem));
    let done = host.reap(&*mem);
    let routes: Vec<u32> = done.iter().map(|d| d.route).collect();
    assert_eq!(routes, vec![1, 2, 3]);
    assert!(done.iter().all(|d| d.status == 0));
    assert_eq!(
        done[1].data, pattern,
        "the read returns what the write wrote"
    );
    assert_eq!(host.faults, Default::default());
}

#[test]
fn many_rounds_wrap_the_indices() {
    let (mem, mut host, mut ring) = pair();
    let mut total = 0;
    for round in 0..50u32 {
        for i in 0..ioring::SLOTS {
            let r = Request {
                op: op::READ,
                sector: u64::from(i),
                sectors: 1,
                ..Request::default()
            };
            host.submit(&*mem, r, &[], round * 100 + i).unwrap();
        }
        while let Some(r) = ring.take() {
            ring.write_slot(&r, &[r.sector as u8; 512]);
            ring.respond(r.tag, ioring::S_OK, 512);
        }
        ring.publish();
        let done = host.reap(&*mem);
        assert_eq!(done.len(), ioring::SLOTS as usize);
        for d in &done {
            assert_eq!(d.data, vec![(d.route % 100) as u8; 512]);
        }
        total += done.len();
    }
    assert_eq!(total, 50 * 32);
}

#[test]
fn a_request_that_does_not_fit_is_answered_with_an_error() {
    let (mem, mut host, mut ring) = pair();
    host.submit(
        &*mem,
        Request {
            op: op::READ,
            sectors: 1,
            ..Request::default()
        },
        &[],
        7,
    )
    .unwrap();
    // Corrupt the published entry's length as a confused hypervisor might.
    let at = RING + ioring::req_offset(0);
    let mut b = [0u8; 32];
    mem.read(GuestAddr(at), &mut b).unwrap();
    let mut r = Request::from_bytes(&b);
    r.sectors = 1 << 20;
    mem.write(GuestAddr(at), &r.to_bytes()).unwrap();
    assert!(ring.pending());
    assert!(ring.take().is_none());
    assert!(!ring.pending(), "the bad entry was consumed");
    assert_eq!(ring.bad_requests, 1);
    ring.publish();
    let done = host.reap(&*mem);
    assert_eq!((done[0].route, done[0].status), (7, 1));
}
