//! The remote virtio-blk model (requests served later, elsewhere) driven by the independent
//! `virtio-drivers` crate: requests in flight at once, completed out of order, a full port,
//! a reset with requests in flight, and hostile completions.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::{ArenaHal, RegTransport, guest_memory};
use hv_virtio::devices::remote_block::{BlockPort, Busy, Op, PortRequest, RemoteBlock, Token};
use hv_virtio::{MmioTransport, TransportOptions};
use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk};

/// A request as the port saw it.
#[derive(Clone, Debug)]
struct Seen {
    token: Token,
    op: Op,
    sector: u64,
    sectors: u32,
    data: Vec<u8>,
}

/// The test's stand-in for dom0: records requests, at most `room` in flight.
struct Port {
    seen: Rc<RefCell<Vec<Seen>>>,
    room: usize,
}

impl BlockPort for Port {
    fn submit(&mut self, req: PortRequest<'_>) -> Result<(), Busy> {
        let mut seen = self.seen.borrow_mut();
        if seen.len() >= self.room {
            return Err(Busy);
        }
        seen.push(Seen {
            token: req.token,
            op: req.op,
            sector: req.sector,
            sectors: req.sectors,
            data: req.data.to_vec(),
        });
        Ok(())
    }
}

type Dev = Rc<RefCell<MmioTransport<RemoteBlock<Port>>>>;
type Driver = VirtIOBlk<ArenaHal, RegTransport<RemoteBlock<Port>>>;
type SeenLog = Rc<RefCell<Vec<Seen>>>;

fn setup(room: usize) -> (Dev, Driver, SeenLog) {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let port = Port {
        seen: seen.clone(),
        room,
    };
    let dev = Rc::new(RefCell::new(MmioTransport::new(
        RemoteBlock::new(port, 4096, false, 128 << 10),
        TransportOptions::default(),
    )));
    let t = RegTransport::new(dev.clone(), guest_memory());
    let blk = VirtIOBlk::<ArenaHal, _>::new(t).expect("virtio-drivers accepted the device");
    (dev, blk, seen)
}

/// Completes `s` as dom0 would, with `disk` as the backing store.
fn serve(dev: &Dev, s: &Seen, disk: &mut [u8], status: u8) {
    let mem = guest_memory();
    let mut data = Vec::new();
    let range = s.sector as usize * 512..(s.sector as usize + s.sectors as usize) * 512;
    match s.op {
        Op::Read => data = disk[range].to_vec(),
        Op::Write => disk[range].copy_from_slice(&s.data),
        Op::GetId => data = b"vol-test".to_vec(),
        _ => {}
    }
    dev.borrow_mut()
        .with_device(&*mem, |d, q, m| d.complete(s.token, status, &data, q, m))
        .expect("device running");
}

#[test]
fn requests_complete_out_of_order_with_the_right_data() {
    let (dev, mut blk, seen) = setup(32);
    let mut disk = vec![0u8; 4096 * 512];
    let mut reqs: Vec<BlkReq> = (0..4).map(|_| BlkReq::default()).collect();
    let mut resps: Vec<BlkResp> = (0..4).map(|_| BlkResp::default()).collect();
    let bufs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 4096]).collect();
    let mut tokens = Vec::new();
    for i in 0..4 {
        // SAFETY: the buffers live until the requests complete below.
        let t =
            unsafe { blk.write_blocks_nb(i * 8, &mut reqs[i], &bufs[i], &mut resps[i]) }.unwrap();
        tokens.push(t);
    }
    // The first is forwarded at its notification; while it is in flight the driver was told
    // not to notify, so the other three wait in the ring: one exit for four requests.
    assert_eq!(seen.borrow().len(), 1);
    assert_eq!(
        dev.borrow().stats().notifies,
        1,
        "one notification for four requests"
    );
    assert!(blk.peek_used().is_none(), "nothing completes by itself");
    // Its completion takes the other three from the ring; they complete in reverse order.
    let first = seen.borrow_mut().remove(0);
    serve(&dev, &first, &mut disk, 0);
    assert_eq!(
        seen.borrow().len(),
        3,
        "the completion picked up the waiting three"
    );
    let rest = seen.borrow().clone();
    for s in rest.iter().rev() {
        assert_eq!(s.op, Op::Write);
        serve(&dev, s, &mut disk, 0);
    }
    assert_eq!(blk.peek_used(), Some(tokens[0]));
    // SAFETY: the same buffers as submitted.
    unsafe { blk.complete_write_blocks(tokens[0], &reqs[0], &bufs[0], &mut resps[0]) }.unwrap();
    for i in (1..4).rev() {
        assert_eq!(blk.peek_used(), Some(tokens[i]));
        // SAFETY: the same buffers as submitted.
        unsafe { blk.complete_write_blocks(tokens[i], &reqs[i], &bufs[i], &mut resps[i]) }.unwrap();
        assert_eq!(resps[i].status(), RespStatus::OK);
    }
    for i in 0..4 {
        assert!(
            disk[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1)
        );
    }
    seen.borrow_mut().clear();
    // A read comes back with dom0's bytes.
    let mut back = vec![0u8; 8192];
    let mut req = BlkReq::default();
    let mut resp = BlkResp::default();
    // SAFETY: as above.
    let t = unsafe { blk.read_blocks_nb(8, &mut req, &mut back, &mut resp) }.unwrap();
    let s = seen.borrow()[0].clone();
    assert_eq!((s.op, s.sector, s.sectors), (Op::Read, 8, 16));
    serve(&dev, &s, &mut disk, 0);
    assert_eq!(blk.peek_used(), Some(t));
    // SAFETY: as above.
    unsafe { blk.complete_read_blocks(t, &req, &mut back, &mut resp) }.unwrap();
    assert!(back[..4096].iter().all(|&b| b == 2) && back[4096..].iter().all(|&b| b == 3));
    assert_eq!(dev.borrow().device().in_flight(), 0);
    assert!(!dev.borrow().needs_reset());
}

#[test]
fn a_full_port_holds_requests_in_the_ring_until_a_completion() {
    let (dev, mut blk, seen) = setup(2);
    let mut disk = vec![0u8; 4096 * 512];
    let mut reqs: Vec<BlkReq> = (0..5).map(|_| BlkReq::default()).collect();
    let mut resps: Vec<BlkResp> = (0..5).map(|_| BlkResp::default()).collect();
    let bufs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i + 10; 512]).collect();
    let mut tokens = Vec::new();
    for i in 0..5 {
        // SAFETY: the buffers live until the requests complete below.
        tokens.push(
            unsafe { blk.write_blocks_nb(i, &mut reqs[i], &bufs[i], &mut resps[i]) }.unwrap(),
        );
    }
    // One forwarded at the notification; the others wait for its completion, which takes two
    // (the port's room) and finds the port full for the third.
    assert_eq!(seen.borrow().len(), 1);
    let s = seen.borrow_mut().remove(0);
    serve(&dev, &s, &mut disk, 0);
    assert_eq!(seen.borrow().len(), 2);
    assert!(dev.borrow().device().stats().busy >= 1);
    // Each completion lets the next waiting request through, in ring order.
    let mut done = 1;
    while done < 5 {
        let s = seen.borrow_mut().remove(0);
        serve(&dev, &s, &mut disk, 0);
        done += 1;
    }
    for i in 0..5 {
        assert_eq!(blk.peek_used(), Some(tokens[i]));
        // SAFETY: as above.
        unsafe { blk.complete_write_blocks(tokens[i], &reqs[i], &bufs[i], &mut resps[i]) }.unwrap();
        assert_eq!(resps[i].status(), RespStatus::OK);
        assert!(
            disk[i * 512..(i + 1) * 512]
                .iter()
                .all(|&b| b == i as u8 + 10)
        );
    }
}

#[test]
fn bad_requests_are_answered_at_once_and_errors_reach_the_guest() {
    let (dev, mut blk, seen) = setup(8);
    let mut buf = vec![0u8; 4096];
    // Beyond the end: IOERR without reaching the port.
    assert!(blk.read_blocks(4095, &mut buf).is_err());
    // Larger than one request may move (128 KiB).
    let mut big = vec![0u8; 256 << 10];
    assert!(blk.read_blocks(0, &mut big).is_err());
    assert!(seen.borrow().is_empty());
    // The backend's I/O error reaches the guest as IOERR.
    let mut req = BlkReq::default();
    let mut resp = BlkResp::default();
    // SAFETY: the buffers live until the request completes.
    let t = unsafe { blk.read_blocks_nb(0, &mut req, &mut buf, &mut resp) }.unwrap();
    let s = seen.borrow()[0].clone();
    let mut disk = vec![0u8; 4096 * 512];
    serve(&dev, &s, &mut disk, 1);
    assert_eq!(blk.peek_used(), Some(t));
    // SAFETY: as above.
    let r = unsafe { blk.complete_read_blocks(t, &req, &mut buf, &mut resp) };
    assert!(r.is_err());
    assert_eq!(resp.status(), RespStatus::IO_ERR);
    assert!(!dev.borrow().needs_reset());
    assert_eq!(dev.borrow().device().stats().io_errors, 3);
}

#[test]
fn completions_from_before_a_reset_or_for_no_request_are_dropped() {
    let (dev, mut blk, seen) = setup(8);
    let mut buf = vec![0u8; 4096];
    let mut req = BlkReq::default();
    let mut resp = BlkResp::default();
    // SAFETY: the buffers outlive the device's use of them (the reset below drops it).
    unsafe { blk.read_blocks_nb(0, &mut req, &mut buf, &mut resp) }.unwrap();
    let old = seen.borrow()[0].clone();
    drop(blk);
    // A new driver resets the device and starts again: the old completion must not land in
    // the new request's buffers.
    let t = RegTransport::new(dev.clone(), guest_memory());
    let mut blk = VirtIOBlk::<ArenaHal, _>::new(t).unwrap();
    assert_eq!(dev.borrow().device().in_flight(), 0);
    let mut buf2 = vec![0u8; 4096];
    let mut req2 = BlkReq::default();
    let mut resp2 = BlkResp::default();
    // SAFETY: as above.
    let t2 = unsafe { blk.read_blocks_nb(0, &mut req2, &mut buf2, &mut resp2) }.unwrap();
    let mut disk = vec![0xeeu8; 4096 * 512];
    serve(&dev, &old, &mut disk, 0);
    assert!(
        blk.peek_used().is_none(),
        "the stale completion was dropped"
    );
    // A forged token: no such head.
    let forged = Token {
        head: 200,
        ..seen.borrow()[1].token
    };
    let mem = guest_memory();
    dev.borrow_mut()
        .with_device(&*mem, |d, q, m| d.complete(forged, 0, &[0; 4096], q, m))
        .unwrap();
    assert_eq!(dev.borrow().device().stats().stale, 2);
    // The real one still completes; a short read from the backend is an I/O error.
    let real = seen.borrow()[1].clone();
    dev.borrow_mut()
        .with_device(&*mem, |d, q, m| d.complete(real.token, 0, &[1; 100], q, m))
        .unwrap();
    assert_eq!(blk.peek_used(), Some(t2));
    // SAFETY: as above.
    let r = unsafe { blk.complete_read_blocks(t2, &req2, &mut buf2, &mut resp2) };
    assert!(r.is_err());
    assert!(
        buf2.iter().all(|&b| b == 0),
        "no partial data reached the guest"
    );
}

#[test]
fn the_drivers_blocking_calls_complete_when_the_backend_answers() {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let port = Port {
        seen: seen.clone(),
        room: 32,
    };
    let dev: Dev = Rc::new(RefCell::new(MmioTransport::new(
        RemoteBlock::new(port, 4096, false, 128 << 10),
        TransportOptions::default(),
    )));
    let disk = Rc::new(RefCell::new(vec![0u8; 4096 * 512]));
    let mut t = RegTransport::new(dev.clone(), guest_memory());
    let (d2, s2, k2) = (dev.clone(), seen.clone(), disk.clone());
    t.after_notify = Some(Rc::new(move || {
        let all: Vec<Seen> = s2.borrow_mut().drain(..).collect();
        for s in &all {
            serve(&d2, s, &mut k2.borrow_mut(), 0);
        }
    }));
    let mut blk = VirtIOBlk::<ArenaHal, _>::new(t).unwrap();
    let mut id = [0u8; 20];
    assert_eq!(blk.device_id(&mut id).unwrap(), 8);
    for (sector, n) in [(0usize, 1usize), (1, 7), (8, 8), (100, 64), (1000, 256)] {
        let data: Vec<u8> = (0..n * 512).map(|i| (i + sector) as u8).collect();
        blk.write_blocks(sector, &data).unwrap();
        let mut back = vec![0u8; n * 512];
        blk.read_blocks(sector, &mut back).unwrap();
        assert_eq!(back, data, "{n} sector(s) at {sector}");
    }
    blk.flush().unwrap();
    assert!(blk.read_blocks(4096, &mut [0u8; 512]).is_err());
    assert!(!dev.borrow().needs_reset());
}
