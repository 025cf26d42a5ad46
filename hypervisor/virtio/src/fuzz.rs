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
    let kind = data.first().copied().unwrap_or(0) % 4;
    match kind {
        0 => drive(BlockDevice::new(MemDisk::new(64, false)), data),
        1 => drive(
            NetDevice::new(FrameSink::default(), [2, 0, 0, 0, 0, 1]),
            data,
        ),
        2 => drive(ConsoleDevice::new(Vec::new(), 80, 25), data),
        _ => drive(BalloonDevice::new(BalloonLog::default()), data),
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
