//! Virtqueue benchmark: requests per second through one queue pair, our device side against
//! the rust-vmm `virtio-queue` device side as the peer, on the same guest memory, with the
//! same minimal driver and the same backends.
//!
//! Workloads: 4 KiB block requests (alternating reads and writes, RAM disk behind a bounce
//! buffer on both sides) at queue depth 1 and 64; 1500-byte frames transmitted (guest to
//! switch) and received (switch to guest) in bursts of 64. Each runs with VIRTIO_F_EVENT_IDX
//! on and off. The driver and device run in lockstep on one thread: the driver fills the ring
//! up to the depth, kicks only if the device asked for it (avail_event or NO_NOTIFY), the
//! device processes everything available and raises an interrupt only if the driver asked
//! for it (used_event or NO_INTERRUPT), then the driver reaps. "notif/req" counts both
//! directions (kicks + interrupts) per request.
//!
//! Run: `cargo run --release -p hv-virtio --example virtqueue_bench [-- --quick]`.

// Guest addresses here are below MEM_SIZE (32 MiB) and ring fields are 16-bit by layout:
// the casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::sync::atomic::{Ordering, fence};
use std::time::Instant;

use hv_virtio::devices::block::{BlockBackend, BlockDevice, MemDisk};
use hv_virtio::devices::net::{FrameSink, NetDevice};
use hv_virtio::mem::RawGuestMemory;
use hv_virtio::queue::need_event;
use hv_virtio::transport::{reg, status};
use hv_virtio::{MmioTransport, TransportOptions, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

const MEM_SIZE: usize = 32 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = DESC + 16 * QSIZE as u64;
const USED: u64 = 0x11_0000;
const DESC2: u64 = 0x12_0000;
const AVAIL2: u64 = DESC2 + 16 * QSIZE as u64;
const USED2: u64 = 0x13_0000;
const BUFS: u64 = 0x20_0000;
const DISK_SECTORS: u64 = 8 << 11; // 8 MiB
const FRAME: usize = 1500;
const NET_HDR: usize = 12;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// The driver: writes rings through the host mapping of guest memory (raw pointers, as a
/// guest would), one queue.
struct Driver {
    base: *mut u8,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    avail_idx: u16,
    last_used: u16,
    kicks: u64,
}

impl Driver {
    fn new(base: *mut u8, desc: u64, avail: u64, used: u64, event_idx: bool) -> Driver {
        Driver {
            base,
            desc,
            avail,
            used,
            event_idx,
            avail_idx: 0,
            last_used: 0,
            kicks: 0,
        }
    }
    fn w16(&self, gpa: u64, v: u16) {
        // SAFETY: every gpa used here is inside the MEM_SIZE mapping; no references exist.
        unsafe { (self.base.add(gpa as usize) as *mut u16).write_volatile(v.to_le()) }
    }
    fn r16(&self, gpa: u64) -> u16 {
        // SAFETY: as in `w16`.
        u16::from_le(unsafe { (self.base.add(gpa as usize) as *const u16).read_volatile() })
    }
    fn r32(&self, gpa: u64) -> u32 {
        // SAFETY: as in `w16`.
        u32::from_le(unsafe { (self.base.add(gpa as usize) as *const u32).read_volatile() })
    }
    fn bytes(&self, gpa: u64, data: &[u8]) {
        // SAFETY: as in `w16`; `data` is ours.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(gpa as usize), data.len())
        }
    }
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.bytes(self.desc + 16 * u64::from(i), &d);
    }
    /// Makes chain `head` available (not yet published).
    fn push(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.w16(self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }
    /// Publishes pushed chains; returns whether the device wants a kick.
    fn publish(&mut self, old: u16) -> bool {
        fence(Ordering::Release);
        self.w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let avail_event = self.r16(self.used + 4 + 8 * u64::from(QSIZE));
            need_event(avail_event, self.avail_idx, old)
        } else {
            self.r16(self.used) & 1 == 0
        };
        if kick {
            self.kicks += 1;
        }
        kick
    }
    /// Pops completions; calls `f(head, len)` for each. Re-arms the interrupt.
    fn reap(&mut self, mut f: impl FnMut(u16, u32)) -> u32 {
        let mut n = 0;
        loop {
            let idx = self.r16(self.used + 2);
            fence(Ordering::Acquire);
            while self.last_used != idx {
                let slot = u64::from(self.last_used % QSIZE);
                let head = self.r32(self.used + 4 + 8 * slot) as u16;
                let len = self.r32(self.used + 8 + 8 * slot);
                f(head, len);
                self.last_used = self.last_used.wrapping_add(1);
                n += 1;
            }
            // Ask for an interrupt on the next completion (used_event = last seen).
            if self.event_idx {
                self.w16(self.avail + 4 + 2 * u64::from(QSIZE), self.last_used);
            }
            fence(Ordering::SeqCst);
            if self.r16(self.used + 2) == self.last_used {
                return n;
            }
        }
    }
}

/// A device side under test.
trait Peer {
    /// The driver kicked queue `q`: process it; returns interrupts raised.
    fn kick(&mut self, q: usize) -> u64;
    /// The switch delivers `frames` frames of FRAME bytes; returns interrupts raised.
    fn deliver(&mut self, frames: usize, frame: &[u8]) -> u64;
    /// Requests the device side completed with data moved (a check that the figures are
    /// honest: every request really went through the backend).
    fn served(&self) -> u64;
}

// ---------------------------------------------------------------- ours

struct Ours<D: VirtioDevice> {
    t: MmioTransport<D>,
    mem: RawGuestMemory,
}

impl<D: VirtioDevice> Ours<D> {
    fn new(device: D, base: *mut u8, event_idx: bool, queues: &[(u64, u64, u64)]) -> Self {
        // SAFETY: the mapping is MEM_SIZE bytes, lives for the whole run (the GuestMemoryMmap
        // outlives every peer), and is only ever accessed through raw pointers.
        let mem = unsafe { RawGuestMemory::new(0, base, MEM_SIZE) };
        let mut t = MmioTransport::new(
            device,
            TransportOptions {
                indirect: true,
                event_idx,
            },
        );
        let w = |t: &mut MmioTransport<D>, off: u64, v: u64| t.write(&mem, off, 4, v);
        w(&mut t, reg::STATUS, 0);
        w(
            &mut t,
            reg::STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        t.write(&mem, reg::DEVICE_FEATURES_SEL, 4, 0);
        let lo = t.read(reg::DEVICE_FEATURES, 4);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, lo);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1); // VERSION_1
        w(
            &mut t,
            reg::STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        for (i, &(d, a, u)) in queues.iter().enumerate() {
            w(&mut t, reg::QUEUE_SEL, i as u64);
            w(&mut t, reg::QUEUE_NUM, u64::from(QSIZE));
            w(&mut t, reg::QUEUE_DESC_LOW, d);
            w(&mut t, reg::QUEUE_DRIVER_LOW, a);
            w(&mut t, reg::QUEUE_DEVICE_LOW, u);
            w(&mut t, reg::QUEUE_READY, 1);
        }
        w(
            &mut t,
            reg::STATUS,
            u64::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
        );
        assert_eq!(t.status() & status::DRIVER_OK, status::DRIVER_OK);
        Ours { t, mem }
    }
}

impl<B: BlockBackend> Peer for Ours<BlockDevice<B>> {
    fn kick(&mut self, q: usize) -> u64 {
        let before = self.t.stats().interrupts;
        self.t.write(&self.mem, reg::QUEUE_NOTIFY, 4, q as u64);
        assert!(!self.t.needs_reset(), "{:?}", self.t.last_error());
        self.t.write(&self.mem, reg::INTERRUPT_ACK, 4, 1);
        self.t.stats().interrupts - before
    }
    fn deliver(&mut self, _: usize, _: &[u8]) -> u64 {
        unreachable!()
    }
    fn served(&self) -> u64 {
        let s = self.t.device().stats();
        s.reads + s.writes
    }
}

impl Peer for Ours<NetDevice<FrameSink>> {
    fn kick(&mut self, q: usize) -> u64 {
        let before = self.t.stats().interrupts;
        self.t.write(&self.mem, reg::QUEUE_NOTIFY, 4, q as u64);
        assert!(!self.t.needs_reset(), "{:?}", self.t.last_error());
        self.t.write(&self.mem, reg::INTERRUPT_ACK, 4, 1);
        self.t.stats().interrupts - before
    }
    fn deliver(&mut self, frames: usize, frame: &[u8]) -> u64 {
        let before = self.t.stats().interrupts;
        let mem = &self.mem;
        let n = self.t.with_device(mem, |d, qs, m| {
            let mut n = 0;
            for _ in 0..frames {
                n += usize::from(d.receive(qs, m, frame)?);
            }
            Ok(n)
        });
        assert_eq!(n, Some(frames));
        self.t.write(&self.mem, reg::INTERRUPT_ACK, 4, 1);
        self.t.stats().interrupts - before
    }
    fn served(&self) -> u64 {
        let s = self.t.device().stats();
        s.tx_frames + s.rx_frames
    }
}

// ---------------------------------------------------------------- rust-vmm peer

struct Vmm<'m> {
    mem: &'m GuestMemoryMmap,
    queues: Vec<Queue>,
    disk: MemDisk,
    bounce: Vec<u8>,
    sink: FrameSink,
    served: u64,
}

impl<'m> Vmm<'m> {
    fn new(mem: &'m GuestMemoryMmap, event_idx: bool, queues: &[(u64, u64, u64)]) -> Self {
        let queues = queues
            .iter()
            .map(|&(d, a, u)| {
                let mut q = Queue::new(QSIZE).unwrap();
                q.set_size(QSIZE);
                q.set_desc_table_address(Some(d as u32), Some(0));
                q.set_avail_ring_address(Some(a as u32), Some(0));
                q.set_used_ring_address(Some(u as u32), Some(0));
                q.set_event_idx(event_idx);
                q.set_ready(true);
                assert!(q.is_valid(mem));
                q
            })
            .collect();
        Vmm {
            mem,
            queues,
            disk: MemDisk::new(DISK_SECTORS, false),
            bounce: Vec::new(),
            sink: FrameSink::default(),
            served: 0,
        }
    }

    fn block(&mut self) {
        let mem = self.mem;
        let q = &mut self.queues[0];
        loop {
            q.disable_notification(mem).unwrap();
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                let mut hdr = [0u8; 16];
                mem.read_slice(&mut hdr, descs[0].addr()).unwrap();
                let kind = u32::from_le_bytes(hdr[..4].try_into().unwrap());
                let sector = u64::from_le_bytes(hdr[8..].try_into().unwrap());
                let data = descs[1];
                let status = descs[descs.len() - 1];
                self.bounce.resize(data.len() as usize, 0);
                let len = if kind == 0 {
                    self.disk.read(sector, &mut self.bounce).unwrap();
                    mem.write_slice(&self.bounce, data.addr()).unwrap();
                    data.len() + 1
                } else {
                    mem.read_slice(&mut self.bounce, data.addr()).unwrap();
                    self.disk.write(sector, &self.bounce).unwrap();
                    1
                };
                mem.write_obj(0u8, status.addr()).unwrap();
                q.add_used(mem, head, len).unwrap();
                self.served += 1;
            }
            if !q.enable_notification(mem).unwrap() {
                break;
            }
        }
    }

    fn tx(&mut self) {
        let mem = self.mem;
        let q = &mut self.queues[1];
        loop {
            q.disable_notification(mem).unwrap();
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                self.bounce.clear();
                for d in chain {
                    let at = self.bounce.len();
                    self.bounce.resize(at + d.len() as usize, 0);
                    mem.read_slice(&mut self.bounce[at..], d.addr()).unwrap();
                }
                use hv_virtio::devices::net::NetBackend;
                self.sink.transmit(&self.bounce[NET_HDR..]);
                q.add_used(mem, head, 0).unwrap();
                self.served += 1;
            }
            if !q.enable_notification(mem).unwrap() {
                break;
            }
        }
    }
}

impl Peer for Vmm<'_> {
    fn kick(&mut self, q: usize) -> u64 {
        if q == 0 && self.queues.len() == 1 {
            self.block();
        } else {
            self.tx();
        }
        u64::from(self.queues[q].needs_notification(self.mem).unwrap())
    }
    fn deliver(&mut self, frames: usize, frame: &[u8]) -> u64 {
        let mem = self.mem;
        let q = &mut self.queues[0];
        let mut hdr = [0u8; NET_HDR];
        hdr[10] = 1;
        for _ in 0..frames {
            let chain = q.pop_descriptor_chain(mem).expect("rx buffer");
            let head = chain.head_index();
            let d = chain.into_iter().next().unwrap();
            assert!(d.is_write_only() && d.len() as usize >= NET_HDR + frame.len());
            mem.write_slice(&hdr, d.addr()).unwrap();
            mem.write_slice(frame, d.addr().unchecked_add(NET_HDR as u64))
                .unwrap();
            q.add_used(mem, head, (NET_HDR + frame.len()) as u32)
                .unwrap();
            self.served += 1;
        }
        u64::from(q.needs_notification(mem).unwrap())
    }
    fn served(&self) -> u64 {
        self.served
    }
}

// ---------------------------------------------------------------- workloads

struct Figures {
    rps: f64,
    notif_per_req: f64,
    kicks: u64,
    interrupts: u64,
}

fn block_run(peer: &mut dyn Peer, drv: &mut Driver, depth: u16, total: u64) -> Figures {
    // Request slot s uses descriptors 3s..3s+2 and a 4 KiB buffer.
    let hdr_at = |s: u16| BUFS + u64::from(s) * 0x2000;
    let data_at = |s: u16| BUFS + u64::from(s) * 0x2000 + 0x1000;
    let mut free: Vec<u16> = (0..depth).rev().collect();
    let (mut submitted, mut completed, mut interrupts) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while completed < total {
        let old = drv.avail_idx;
        while let Some(s) = free.pop() {
            if submitted == total {
                free.push(s);
                break;
            }
            let write = submitted % 2 == 1;
            let mut hdr = [0u8; 16];
            hdr[0] = u8::from(write);
            let sector = (submitted * 8) % (DISK_SECTORS - 8);
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            drv.bytes(hdr_at(s), &hdr);
            let h = 3 * s;
            drv.desc(h, hdr_at(s), 16, F_NEXT, h + 1);
            let dflags = if write { F_NEXT } else { F_NEXT | F_WRITE };
            drv.desc(h + 1, data_at(s), 4096, dflags, h + 2);
            drv.desc(h + 2, hdr_at(s) + 16, 1, F_WRITE, 0);
            drv.push(h);
            submitted += 1;
        }
        if drv.publish(old) {
            interrupts += peer.kick(0);
        }
        completed += u64::from(drv.reap(|head, _len| {
            let s = head / 3;
            debug_assert_eq!(drv_status(drv_base(), hdr_at(s) + 16), 0);
            free.push(s);
        }));
    }
    let secs = start.elapsed().as_secs_f64();
    black_box(&free);
    assert_eq!(
        peer.served(),
        total,
        "every request went through the backend"
    );
    Figures {
        rps: total as f64 / secs,
        notif_per_req: (drv.kicks + interrupts) as f64 / total as f64,
        kicks: drv.kicks,
        interrupts,
    }
}

static mut BASE: *mut u8 = std::ptr::null_mut();
fn drv_base() -> *mut u8 {
    // SAFETY: written once in main before any workload runs; single-threaded.
    unsafe { BASE }
}
fn drv_status(base: *mut u8, gpa: u64) -> u8 {
    // SAFETY: gpa is inside the mapping.
    unsafe { base.add(gpa as usize).read_volatile() }
}

fn tx_run(peer: &mut dyn Peer, drv: &mut Driver, depth: u16, total: u64) -> Figures {
    let frame = vec![0x5au8; FRAME];
    let buf_at = |s: u16| BUFS + u64::from(s) * 0x800;
    for s in 0..depth {
        drv.bytes(buf_at(s) + NET_HDR as u64, &frame);
    }
    let mut free: Vec<u16> = (0..depth).rev().collect();
    let (mut submitted, mut completed, mut interrupts) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while completed < total {
        let old = drv.avail_idx;
        while let Some(s) = free.pop() {
            if submitted == total {
                free.push(s);
                break;
            }
            drv.bytes(buf_at(s), &[0u8; NET_HDR]);
            drv.desc(2 * s, buf_at(s), NET_HDR as u32, F_NEXT, 2 * s + 1);
            drv.desc(2 * s + 1, buf_at(s) + NET_HDR as u64, FRAME as u32, 0, 0);
            drv.push(2 * s);
            submitted += 1;
        }
        if drv.publish(old) {
            interrupts += peer.kick(1);
        }
        completed += u64::from(drv.reap(|head, _| free.push(head / 2)));
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(peer.served(), total, "every frame went through the backend");
    Figures {
        rps: total as f64 / secs,
        notif_per_req: (drv.kicks + interrupts) as f64 / total as f64,
        kicks: drv.kicks,
        interrupts,
    }
}

fn rx_run(peer: &mut dyn Peer, drv: &mut Driver, burst: u16, total: u64) -> Figures {
    let frame = vec![0xa5u8; FRAME];
    let buf_at = |s: u16| BUFS + 0x40_0000 + u64::from(s) * 0x800;
    // Post every buffer once, kick once (as a driver does at start-up).
    let old = drv.avail_idx;
    for s in 0..QSIZE {
        drv.desc(s, buf_at(s), (NET_HDR + 1514) as u32, F_WRITE, 0);
        drv.push(s);
    }
    if drv.publish(old) {
        peer.kick(0);
    }
    drv.kicks = 0;
    let (mut completed, mut interrupts) = (0u64, 0u64);
    let mut repost = Vec::with_capacity(QSIZE as usize);
    let start = Instant::now();
    while completed < total {
        let n = u64::from(burst).min(total - completed) as usize;
        interrupts += peer.deliver(n, &frame);
        completed += u64::from(drv.reap(|head, len| {
            debug_assert_eq!(len as usize, NET_HDR + FRAME);
            repost.push(head);
        }));
        let old = drv.avail_idx;
        for s in repost.drain(..) {
            drv.push(s);
        }
        // New receive buffers: the device is not waiting for them (it polls the ring when a
        // frame arrives), yet a driver kicks if the device asked to be told.
        if drv.publish(old) {
            peer.kick(0);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(peer.served(), total, "every frame was delivered");
    Figures {
        rps: total as f64 / secs,
        notif_per_req: (drv.kicks + interrupts) as f64 / total as f64,
        kicks: drv.kicks,
        interrupts,
    }
}

fn clear(base: *mut u8) {
    // SAFETY: the ring area [DESC, BUFS) is inside the mapping; zeroing resets all rings.
    unsafe { std::ptr::write_bytes(base.add(DESC as usize), 0, (BUFS - DESC) as usize) };
}

#[derive(Clone, Copy)]
enum Work {
    Block(u16),
    Tx,
    Rx,
}

fn run_one(
    gm: &GuestMemoryMmap,
    base: *mut u8,
    work: Work,
    event_idx: bool,
    ours: bool,
    total: u64,
) -> Figures {
    clear(base);
    let q0 = (DESC, AVAIL, USED);
    let q1 = (DESC2, AVAIL2, USED2);
    match work {
        Work::Block(depth) => {
            let mut drv = Driver::new(base, DESC, AVAIL, USED, event_idx);
            if ours {
                let dev = BlockDevice::new(MemDisk::new(DISK_SECTORS, false));
                let mut p = Ours::new(dev, base, event_idx, &[q0]);
                block_run(&mut p, &mut drv, depth, total)
            } else {
                let mut p = Vmm::new(gm, event_idx, &[q0]);
                block_run(&mut p, &mut drv, depth, total)
            }
        }
        Work::Tx | Work::Rx => {
            let (d, a, u) = if matches!(work, Work::Tx) { q1 } else { q0 };
            let mut drv = Driver::new(base, d, a, u, event_idx);
            let mut p: Box<dyn Peer + '_> = if ours {
                let dev = NetDevice::new(FrameSink::default(), [2, 0, 0, 0, 0, 1]);
                Box::new(Ours::new(dev, base, event_idx, &[q0, q1]))
            } else {
                Box::new(Vmm::new(gm, event_idx, &[q0, q1]))
            };
            if matches!(work, Work::Tx) {
                tx_run(p.as_mut(), &mut drv, 64, total)
            } else {
                rx_run(p.as_mut(), &mut drv, 64, total)
            }
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let gm: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let region = gm.find_region(GuestAddress(0)).unwrap();
    let base = region.get_host_address(MemoryRegionAddress(0)).unwrap();
    // SAFETY: single-threaded; set before any workload reads it.
    unsafe { BASE = base };

    let scale = if quick { 20 } else { 1 };
    let cases: [(&str, Work, u64); 4] = [
        ("block 4KiB qd1 ", Work::Block(1), 1_000_000 / scale),
        ("block 4KiB qd64", Work::Block(64), 2_000_000 / scale),
        ("net tx 1500B   ", Work::Tx, 3_000_000 / scale),
        ("net rx 1500B   ", Work::Rx, 3_000_000 / scale),
    ];
    println!("virtqueue_bench: queue size {QSIZE}, lockstep driver/device, one thread");
    let mut worst_ratio = f64::INFINITY;
    let mut qd64_eventidx_notif = 0.0;
    for (name, work, total) in cases {
        for event_idx in [true, false] {
            // Warm-up, then the measured runs.
            run_one(&gm, base, work, event_idx, true, total / 10);
            run_one(&gm, base, work, event_idx, false, total / 10);
            let o = run_one(&gm, base, work, event_idx, true, total);
            let p = run_one(&gm, base, work, event_idx, false, total);
            let ratio = o.rps / p.rps;
            worst_ratio = worst_ratio.min(ratio);
            if matches!(work, Work::Block(64)) && event_idx {
                qd64_eventidx_notif = o.notif_per_req;
            }
            println!(
                "{name} event_idx={:<5} hv-virtio {:>10.0} req/s  virtio-queue {:>10.0} req/s  ratio {:>5.2}  notif/req hv-virtio {:.4} (kicks {} irqs {}) virtio-queue {:.4}",
                event_idx,
                o.rps,
                p.rps,
                ratio,
                o.notif_per_req,
                o.kicks,
                o.interrupts,
                p.notif_per_req,
            );
        }
    }
    println!(
        "summary: worst throughput ratio hv-virtio/virtio-queue {worst_ratio:.2} (target >= 1.00); notif/req at qd64 with event_idx {qd64_eventidx_notif:.4} (target <= 0.1)"
    );
}
