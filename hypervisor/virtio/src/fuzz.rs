//! The fuzz entry point for everything a driver can reach: MMIO register accesses, ring
//! contents (descriptor tables, available ring, indirect tables) and device events, for all
//! four device models. `cargo fuzz` (hypervisor/virtio/fuzz) and the plain `cargo test`
//! replay (tests/fuzz_replay.rs) call the same [`run`].
//!
//! Input layout: byte 0 picks the device, byte 1 the transport features, byte 2 the queue
//! size (1..=16); the next [`MEM_SIZE`] bytes are guest RAM (rings at fixed places, so the
//! fuzzer mutates descriptors directly); the rest is a list of 4-byte operations.
//! Invariants checked after every operation: nothing panicked, and a broken device stays
//! broken until reset.

// Values in this harness are small by construction (queue numbers, addresses under
// MEM_SIZE, 32-bit register reads): its casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use alloc::vec::Vec;

use crate::VirtioDevice;
use crate::devices::balloon::{BalloonDevice, BalloonLog};
use crate::devices::block::{BlockDevice, MemDisk};
use crate::devices::console::ConsoleDevice;
use crate::devices::net::{FrameSink, NetDevice};
use crate::devices::remote_block::{BlockPort, Busy, PortRequest, RemoteBlock, Token};
use crate::mem::{GuestAddr, GuestMemory, VecGuestMemory};
use crate::transport::{MmioTransport, TransportOptions, reg, status};

/// Guest RAM size in a fuzz case.
pub const MEM_SIZE: usize = 0x2000;
/// Bytes before the RAM image.
pub const HEADER: usize = 3;
/// Per-queue ring area: descriptor table at `q * QUEUE_STRIDE`, available ring at +0x100,
/// used ring at +0x200.
pub const QUEUE_STRIDE: u64 = 0x400;
/// Where buffers usually live.
pub const BUFFERS: u64 = 0x1000;

/// What a fuzz case ended with (for tests that want to look).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub broken: bool,
    pub status: u32,
    pub interrupts: u64,
}

/// Runs one fuzz case. Never panics for any input (that is the property being fuzzed).
pub fn run(data: &[u8]) -> Outcome {
    let kind = data.first().copied().unwrap_or(0) % 5;
    match kind {
        0 => drive(BlockDevice::new(MemDisk::new(64, false)), data),
        1 => drive(
            NetDevice::new(FrameSink::default(), [2, 0, 0, 0, 0, 1]),
            data,
        ),
        2 => drive(ConsoleDevice::new(Vec::new(), 80, 25), data),
        3 => drive(BalloonDevice::new(BalloonLog::default()), data),
        _ => drive(RemoteBlock::new(FuzzPort::default(), 64, false, 8192), data),
    }
}

/// The remote disk's backend in a fuzz case: keeps up to 8 requests, completed by events
/// (in order, with a status and a length the input chooses, right or wrong).
#[derive(Default)]
pub struct FuzzPort {
    pending: alloc::collections::VecDeque<Token>,
}

impl BlockPort for FuzzPort {
    fn submit(&mut self, req: PortRequest<'_>) -> Result<(), Busy> {
        if self.pending.len() >= 8 {
            return Err(Busy);
        }
        self.pending.push_back(req.token);
        Ok(())
    }
}

impl FuzzEvents for RemoteBlock<FuzzPort> {
    fn event<M: GuestMemory + ?Sized>(t: &mut MmioTransport<Self>, mem: &M, arg: u8) {
        let Some(token) = t.device_mut().port_mut().pending.pop_front() else {
            return;
        };
        // A stale or forged token now and then, a short or long read, any status.
        let token = if arg & 0xe0 == 0xe0 {
            Token {
                head: token.head.wrapping_add(1),
                ..token
            }
        } else {
            token
        };
        let data = alloc::vec![arg; usize::from(arg) * 32];
        t.with_device(mem, |d, qs, m| d.complete(token, arg % 4, &data, qs, m));
    }
}

/// Device-side events the fuzzer can trigger.
trait FuzzEvents {
    fn event<M: GuestMemory + ?Sized>(t: &mut MmioTransport<Self>, mem: &M, arg: u8)
    where
        Self: Sized;
}

impl FuzzEvents for BlockDevice<MemDisk> {
    fn event<M: GuestMemory + ?Sized>(_: &mut MmioTransport<Self>, _: &M, _: u8) {}
}

impl FuzzEvents for NetDevice<FrameSink> {
    fn event<M: GuestMemory + ?Sized>(t: &mut MmioTransport<Self>, mem: &M, arg: u8) {
        if arg == 0xff {
            let up = !t.device().link_up();
            t.device_mut().set_link(up);
            t.config_changed();
            return;
        }
        let frame = alloc::vec![arg; usize::from(arg) * 8];
        t.with_device(mem, |d, qs, m| d.receive(qs, m, &frame));
    }
}

impl FuzzEvents for ConsoleDevice<Vec<u8>> {
    fn event<M: GuestMemory + ?Sized>(t: &mut MmioTransport<Self>, mem: &M, arg: u8) {
        let input = alloc::vec![b'a'; usize::from(arg)];
        t.with_device(mem, |d, qs, m| d.input(qs, m, &input));
    }
}

impl FuzzEvents for BalloonDevice<BalloonLog> {
    fn event<M: GuestMemory + ?Sized>(t: &mut MmioTransport<Self>, mem: &M, arg: u8) {
        if arg & 1 == 0 {
            t.with_device(mem, |d, qs, m| d.request_stats(qs, m));
        } else {
            t.device_mut().set_target(u32::from(arg));
            t.config_changed();
        }
    }
}

fn w32<D: VirtioDevice>(t: &mut MmioTransport<D>, mem: &VecGuestMemory, off: u64, v: u32) {
    t.write(mem, off, 4, u64::from(v));
}

/// The driver's side of initialisation (virtio 1.2 §3.1.1) with rings at fixed places.
fn init<D: VirtioDevice>(t: &mut MmioTransport<D>, mem: &VecGuestMemory, features: u8, qsize: u32) {
    w32(t, mem, reg::STATUS, 0);
    w32(t, mem, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(t, mem, reg::DEVICE_FEATURES_SEL, 0);
    let lo = t.read(reg::DEVICE_FEATURES, 4) as u32;
    w32(t, mem, reg::DEVICE_FEATURES_SEL, 1);
    let hi = t.read(reg::DEVICE_FEATURES, 4) as u32;
    // Bits 28/29 (indirect, event idx) follow the fuzz input; all else as offered.
    let lo = (lo & !(3 << 28)) | (u32::from(features) & 3) << 28;
    w32(t, mem, reg::DRIVER_FEATURES_SEL, 0);
    w32(t, mem, reg::DRIVER_FEATURES, lo);
    w32(t, mem, reg::DRIVER_FEATURES_SEL, 1);
    w32(t, mem, reg::DRIVER_FEATURES, hi);
    w32(
        t,
        mem,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    let n = t.device().num_queues();
    for q in 0..n {
        let base = q as u64 * QUEUE_STRIDE;
        w32(t, mem, reg::QUEUE_SEL, q as u32);
        w32(t, mem, reg::QUEUE_NUM, qsize);
        w32(t, mem, reg::QUEUE_DESC_LOW, base as u32);
        w32(t, mem, reg::QUEUE_DRIVER_LOW, (base + 0x100) as u32);
        w32(t, mem, reg::QUEUE_DEVICE_LOW, (base + 0x200) as u32);
        w32(t, mem, reg::QUEUE_READY, 1);
    }
    w32(
        t,
        mem,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

fn drive<D: VirtioDevice + FuzzEvents>(device: D, data: &[u8]) -> Outcome {
    let features = data.get(1).copied().unwrap_or(3);
    let qsize = 1u32 << (data.get(2).copied().unwrap_or(4) % 5);
    let mem = VecGuestMemory::new(0, MEM_SIZE);
    let image = data.get(HEADER..).unwrap_or(&[]);
    let image_len = image.len().min(MEM_SIZE);
    // Cannot fail: the range is inside RAM.
    let _ = mem.write(GuestAddr(0), &image[..image_len]);
    let ops = image.get(MEM_SIZE..).unwrap_or(&[]);

    let mut t = MmioTransport::new(
        device,
        TransportOptions {
            indirect: true,
            event_idx: true,
        },
    );
    init(&mut t, &mem, features, qsize);
    let nq = t.device().num_queues();
    for q in 0..nq {
        w32(&mut t, &mem, reg::QUEUE_NOTIFY, q as u32);
    }
    for op in ops.chunks_exact(4) {
        let was_broken = t.needs_reset();
        let (a, b, c) = (op[1], op[2], op[3]);
        match op[0] % 8 {
            0 => w32(&mut t, &mem, reg::QUEUE_NOTIFY, u32::from(a % 5)),
            1 => {
                let off = u64::from(a % 64) * 4;
                w32(&mut t, &mem, off, u32::from_le_bytes([b, c, 0, 0]));
            }
            2 => {
                let addr = u64::from(u16::from_le_bytes([a, b])) % MEM_SIZE as u64;
                let _ = mem.write(GuestAddr(addr), &[c]);
            }
            3 => {
                // Publish one more chain with head `c` on queue `a`.
                let q = u64::from(a) % nq as u64;
                let avail = q * QUEUE_STRIDE + 0x100;
                let idx = mem.read_u16(GuestAddr(avail + 2)).unwrap_or(0);
                let slot = u64::from(idx % qsize as u16);
                let _ = mem.write_u16(GuestAddr(avail + 4 + 2 * slot), u16::from(c));
                let _ = mem.write_u16(GuestAddr(avail + 2), idx.wrapping_add(1 + u16::from(b % 2)));
                w32(&mut t, &mem, reg::QUEUE_NOTIFY, q as u32);
            }
            4 => D::event(&mut t, &mem, a),
            5 => {
                let _ = t.read(u64::from(a) * 4, 4);
                let _ = t.read(reg::CONFIG + u64::from(b % 64), 1 << (c % 4));
            }
            6 => {
                let v = t.interrupt_status();
                w32(&mut t, &mem, reg::INTERRUPT_ACK, v);
            }
            _ => init(&mut t, &mem, features ^ a, 1 << (b % 5)),
        }
        // A broken device stays broken until the driver resets it (virtio 1.2 §2.1.2).
        if was_broken && op[0] % 8 != 7 && !(op[0] % 8 == 1 && a % 64 == 28) {
            assert!(
                t.needs_reset(),
                "device left DEVICE_NEEDS_RESET without a reset"
            );
        }
    }
    Outcome {
        broken: t.needs_reset(),
        status: t.status(),
        interrupts: t.stats().interrupts,
    }
}

/// Builds fuzz inputs by hand: a header, a RAM image with rings at the fixed places, ops.
pub struct SeedBuilder {
    bytes: Vec<u8>,
    ops: Vec<u8>,
    avail_idx: [u16; 4],
}

impl SeedBuilder {
    /// A seed for device `kind` (0 block, 1 net, 2 console, 3 balloon), ring `features`
    /// (bit 0 indirect, bit 1 event idx) and queue size `1 << size_log2`.
    pub fn new(kind: u8, features: u8, size_log2: u8) -> SeedBuilder {
        let mut bytes = alloc::vec![0u8; HEADER + MEM_SIZE];
        bytes[0] = kind;
        bytes[1] = features;
        bytes[2] = size_log2;
        SeedBuilder {
            bytes,
            ops: Vec::new(),
            avail_idx: [0; 4],
        }
    }

    /// Writes `data` at guest address `addr` of the image.
    pub fn mem(&mut self, addr: u64, data: &[u8]) -> &mut Self {
        let at = HEADER + addr as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn desc(
        &mut self,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem(table + 16 * u64::from(i), &d)
    }

    /// Descriptor table of queue `q`.
    pub fn table(q: u16) -> u64 {
        u64::from(q) * QUEUE_STRIDE
    }

    /// Makes chain `head` available on queue `q` in the image.
    pub fn publish(&mut self, q: u16, head: u16) -> &mut Self {
        let avail = Self::table(q) + 0x100;
        let i = usize::from(q);
        let size = 1u16 << (self.bytes[2] % 5);
        let slot = u64::from(self.avail_idx[i] % size);
        self.mem(avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx[i] = self.avail_idx[i].wrapping_add(1);
        let idx = self.avail_idx[i];
        self.mem(avail + 2, &idx.to_le_bytes())
    }

    /// Appends a raw 4-byte operation.
    pub fn op(&mut self, op: [u8; 4]) -> &mut Self {
        self.ops.extend_from_slice(&op);
        self
    }

    /// The finished input.
    pub fn build(&self) -> Vec<u8> {
        let mut v = self.bytes.clone();
        v.extend_from_slice(&self.ops);
        v
    }
}

/// Hand-made seeds covering every device's normal path and typical malformations.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::queue::{
        VIRTQ_DESC_F_INDIRECT as IND, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as W,
    };
    let mut out = Vec::new();
    let t0 = SeedBuilder::table(0);
    let t1 = SeedBuilder::table(1);

    // Block: a read, then a write through an indirect table, then get-id and discard.
    let mut s = SeedBuilder::new(0, 3, 4);
    let mut hdr = [0u8; 16];
    hdr[8] = 1;
    s.mem(0x1000, &hdr)
        .desc(t0, 0, 0x1000, 16, NEXT, 1)
        .desc(t0, 1, 0x1100, 512, NEXT | W, 2)
        .desc(t0, 2, 0x1300, 1, W, 0)
        .publish(0, 0);
    hdr[0] = 1;
    s.mem(0x1010, &hdr)
        .desc(t0, 3, 0x1800, 48, IND, 0)
        .desc(0x1800, 0, 0x1010, 16, NEXT, 1)
        .desc(0x1800, 1, 0x1400, 1024, NEXT, 2)
        .desc(0x1800, 2, 0x1301, 1, W, 0)
        .publish(0, 3);
    let mut id = [0u8; 16];
    id[0] = 8;
    s.mem(0x1020, &id)
        .desc(t0, 4, 0x1020, 16, NEXT, 5)
        .desc(t0, 5, 0x1900, 21, W, 0)
        .publish(0, 4);
    let mut disc = [0u8; 32];
    disc[0] = 11;
    disc[16] = 4; // sector 4
    disc[24] = 8; // 8 sectors
    s.mem(0x1a00, &disc)
        .desc(t0, 6, 0x1a00, 32, NEXT, 7)
        .desc(t0, 7, 0x1302, 1, W, 0)
        .publish(0, 6)
        .op([0, 0, 0, 0])
        .op([6, 0, 0, 0])
        .op([5, 4, 0, 2]);
    out.push(("block_read_write_id_discard", s.build()));

    // Block with a descriptor loop (must break the device, not hang).
    let mut s = SeedBuilder::new(0, 0, 3);
    s.desc(t0, 0, 0x1000, 16, NEXT, 1)
        .desc(t0, 1, 0x1100, 16, NEXT, 0)
        .publish(0, 0)
        .op([0, 0, 0, 0])
        .op([7, 0, 3, 0]);
    out.push(("block_loop_then_reset", s.build()));

    // Net: transmit one frame, post a receive buffer, receive, toggle link.
    let mut s = SeedBuilder::new(1, 2, 4);
    s.desc(t1, 0, 0x1000, 12, NEXT, 1)
        .desc(t1, 1, 0x1100, 64, 0, 0)
        .publish(1, 0)
        .desc(t0, 0, 0x1200, 1526, W, 0)
        .publish(0, 0)
        .op([0, 1, 0, 0])
        .op([0, 0, 0, 0])
        .op([4, 8, 0, 0])
        .op([4, 0xff, 0, 0])
        .op([6, 0, 0, 0]);
    out.push(("net_tx_rx_link", s.build()));

    // Console: output, an input buffer, input.
    let mut s = SeedBuilder::new(2, 1, 2);
    s.mem(0x1000, b"hello")
        .desc(t1, 0, 0x1000, 5, 0, 0)
        .publish(1, 0)
        .desc(t0, 0, 0x1100, 64, W, 0)
        .publish(0, 0)
        .op([0, 1, 0, 0])
        .op([4, 3, 0, 0])
        .op([0, 0, 0, 0]);
    out.push(("console_out_in", s.build()));

    // Balloon: inflate two frames, a statistics buffer, a reported range, a stats request.
    let mut s = SeedBuilder::new(3, 3, 3);
    let mut pfns = [0u8; 8];
    pfns[0] = 1;
    pfns[4] = 0x40;
    let t2 = SeedBuilder::table(2);
    let t3 = SeedBuilder::table(3);
    s.mem(0x1000, &pfns)
        .desc(t0, 0, 0x1000, 8, 0, 0)
        .publish(0, 0)
        .desc(t2, 0, 0x1100, 20, 0, 0)
        .publish(2, 0)
        .desc(t3, 0, 0x1000, 0x1000, W, 0)
        .publish(3, 0)
        .op([0, 0, 0, 0])
        .op([0, 2, 0, 0])
        .op([0, 3, 0, 0])
        .op([4, 0, 0, 0])
        .op([4, 1, 0, 0]);
    out.push(("balloon_all_queues", s.build()));

    // Transport abuse: avail index jump, register writes to read-only registers.
    let mut s = SeedBuilder::new(0, 3, 4);
    s.op([3, 0, 1, 200])
        .op([1, 0, 1, 0])
        .op([1, 28, 0, 0])
        .op([1, 17, 0x40, 0]);
    out.push(("transport_abuse", s.build()));
    out
}
