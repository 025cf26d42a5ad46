//! Device models driven directly (queue built over a byte-vector guest memory by a tiny
//! in-test driver): the in-band answers (IOERR, UNSUPP), and the protocol violations that
//! must break the device instead.

// Indices and lengths in these tests are small by construction.
#![allow(clippy::cast_possible_truncation)]
use hv_virtio::devices::balloon::{BalloonDevice, BalloonLog};
use hv_virtio::devices::block::{self, BlockDevice, MemDisk, S_IOERR, S_OK, S_UNSUPP};
use hv_virtio::devices::console::{ConsoleDevice, INPUT_FIFO};
use hv_virtio::mem::VecGuestMemory;
use hv_virtio::queue::{VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as W};
use hv_virtio::{
    DeviceError, GuestAddr, GuestMemory, QueueLayout, QueueSet, RingFeatures, SplitQueue,
    VirtioDevice,
};

const SIZE: u16 = 16;

/// Queue `q` lives at `0x10000 * (q + 1)`; buffers below 0x10000.
struct Rig {
    mem: VecGuestMemory,
    queues: Vec<Option<SplitQueue>>,
    avail_idx: Vec<u16>,
}

impl Rig {
    fn new(nq: usize) -> Rig {
        let mem = VecGuestMemory::new(0, 0x10000 * (nq + 1));
        let queues = (0..nq)
            .map(|q| {
                let base = 0x10000 * (q as u64 + 1);
                Some(
                    SplitQueue::new(
                        &mem,
                        QueueLayout {
                            size: SIZE,
                            desc: GuestAddr(base),
                            avail: GuestAddr(base + 0x1000),
                            used: GuestAddr(base + 0x2000),
                        },
                        RingFeatures::default(),
                    )
                    .unwrap(),
                )
            })
            .collect();
        Rig {
            mem,
            queues,
            avail_idx: vec![0; nq],
        }
    }
    fn base(q: usize) -> u64 {
        0x10000 * (q as u64 + 1)
    }
    /// Publishes a chain of (addr, len, writable) buffers on queue `q` at descriptor `first`.
    fn chain(&mut self, q: usize, first: u16, bufs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = first + i as u16;
            let last = usize::from(i - first) + 1 == bufs.len();
            let flags = if w { W } else { 0 } | if last { 0 } else { NEXT };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&(i + 1).to_le_bytes());
            self.mem
                .write(GuestAddr(Self::base(q) + 16 * u64::from(i)), &d)
                .unwrap();
        }
        let avail = Self::base(q) + 0x1000;
        let slot = u64::from(self.avail_idx[q] % SIZE);
        self.mem
            .write_u16(GuestAddr(avail + 4 + 2 * slot), first)
            .unwrap();
        self.avail_idx[q] += 1;
        self.mem
            .write_u16(GuestAddr(avail + 2), self.avail_idx[q])
            .unwrap();
    }
    fn notify<D: VirtioDevice>(&mut self, d: &mut D, q: usize) -> Result<(), DeviceError> {
        d.queue_notify(q, &mut QueueSet::from_slice(&mut self.queues), &self.mem)
    }
    fn used_len(&self, q: usize, n: u16) -> u32 {
        self.mem
            .read_u32(GuestAddr(Self::base(q) + 0x2000 + 8 + 8 * u64::from(n)))
            .unwrap()
    }
    fn byte(&self, addr: u64) -> u8 {
        let mut b = [0u8];
        self.mem.read(GuestAddr(addr), &mut b).unwrap();
        b[0]
    }
}

fn blk_hdr(rig: &Rig, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    rig.mem.write(GuestAddr(at), &h).unwrap();
}

fn active_block() -> BlockDevice<MemDisk> {
    let mut d = BlockDevice::new(MemDisk::new(32, false));
    d.activate(block::feature::FLUSH | block::feature::DISCARD);
    d
}

#[test]
fn block_in_band_errors() {
    let mut rig = Rig::new(1);
    let mut d = active_block();
    // Read past the end: IOERR, len 1 (status only).
    blk_hdr(&rig, 0x100, block::req::IN, 31);
    rig.chain(
        0,
        0,
        &[(0x100, 16, false), (0x1000, 1024, true), (0x200, 1, true)],
    );
    // Unaligned data length: IOERR.
    blk_hdr(&rig, 0x110, block::req::OUT, 0);
    rig.chain(
        0,
        3,
        &[(0x110, 16, false), (0x1000, 100, false), (0x201, 1, true)],
    );
    // Unknown request type: UNSUPP.
    blk_hdr(&rig, 0x120, 99, 0);
    rig.chain(0, 6, &[(0x120, 16, false), (0x202, 1, true)]);
    // Discard with the unmap flag: UNSUPP (virtio 1.2 §5.2.6.2).
    blk_hdr(&rig, 0x130, block::req::DISCARD, 0);
    let mut seg = [0u8; 16];
    seg[8] = 1;
    seg[12] = 1;
    rig.mem.write(GuestAddr(0x140), &seg).unwrap();
    rig.chain(0, 8, &[(0x130, 32, false), (0x203, 1, true)]);
    // A good discard.
    seg[12] = 0;
    rig.mem.write(GuestAddr(0x150), &seg).unwrap();
    blk_hdr(&rig, 0x160, block::req::DISCARD, 0);
    rig.chain(
        0,
        10,
        &[(0x160, 16, false), (0x150, 16, false), (0x204, 1, true)],
    );
    rig.notify(&mut d, 0).unwrap();
    assert_eq!(
        [
            rig.byte(0x200),
            rig.byte(0x201),
            rig.byte(0x202),
            rig.byte(0x203),
            rig.byte(0x204)
        ],
        [S_IOERR, S_IOERR, S_UNSUPP, S_UNSUPP, S_OK]
    );
    assert_eq!(rig.used_len(0, 0), 1);
    assert_eq!(d.backend().discards, 1);
    let s = d.stats();
    assert_eq!((s.io_errors, s.unsupported, s.discards), (2, 2, 1));
}

#[test]
fn block_flush_not_negotiated_is_unsupported() {
    let mut rig = Rig::new(1);
    let mut d = BlockDevice::new(MemDisk::new(8, false));
    d.activate(0);
    blk_hdr(&rig, 0x100, block::req::FLUSH, 0);
    rig.chain(0, 0, &[(0x100, 16, false), (0x200, 1, true)]);
    rig.notify(&mut d, 0).unwrap();
    assert_eq!(rig.byte(0x200), S_UNSUPP);
}

#[test]
fn block_framing_violations_break_the_device() {
    // No status byte.
    let mut rig = Rig::new(1);
    let mut d = active_block();
    blk_hdr(&rig, 0x100, block::req::IN, 0);
    rig.chain(0, 0, &[(0x100, 16, false)]);
    assert!(matches!(
        rig.notify(&mut d, 0),
        Err(DeviceError::Malformed(_))
    ));
    // Short header.
    let mut rig = Rig::new(1);
    rig.chain(0, 0, &[(0x100, 8, false), (0x200, 1, true)]);
    assert!(matches!(
        rig.notify(&mut d, 0),
        Err(DeviceError::Malformed(_))
    ));
    // Buffer outside guest RAM.
    let mut rig = Rig::new(1);
    blk_hdr(&rig, 0x100, block::req::IN, 0);
    rig.chain(
        0,
        0,
        &[
            (0x100, 16, false),
            (0xfff_0000, 512, true),
            (0x200, 1, true),
        ],
    );
    assert!(matches!(rig.notify(&mut d, 0), Err(DeviceError::Memory(_))));
}

#[test]
fn console_input_is_bounded() {
    let mut rig = Rig::new(2);
    let mut d = ConsoleDevice::new(Vec::new(), 80, 25);
    let big = vec![b'x'; INPUT_FIFO + 100];
    d.input(&mut QueueSet::from_slice(&mut rig.queues), &rig.mem, &big)
        .unwrap();
    assert_eq!(d.stats().input_dropped, 100);
    // One 64-byte receive buffer takes 64 bytes of the backlog.
    rig.chain(0, 0, &[(0x100, 64, true)]);
    rig.notify(&mut d, 0).unwrap();
    assert_eq!(rig.used_len(0, 0), 64);
}

#[test]
fn balloon_queue_roles_follow_negotiated_features() {
    let mut rig = Rig::new(4);
    let mut d = BalloonDevice::new(BalloonLog::default());
    // Only PAGE_REPORTING: it takes index 2 (Linux numbers present queues contiguously).
    d.activate(hv_virtio::devices::balloon::feature::PAGE_REPORTING);
    rig.chain(2, 0, &[(0x1000, 0x1000, true)]);
    rig.notify(&mut d, 2).unwrap();
    assert_eq!(d.backend().reported, vec![(GuestAddr(0x1000), 0x1000)]);
    assert!(matches!(
        rig.notify(&mut d, 3),
        Err(DeviceError::QueueNotReady(3))
    ));
    // A PFN array whose length is not a multiple of 4 is malformed.
    rig.chain(0, 0, &[(0x100, 6, false)]);
    assert!(matches!(
        rig.notify(&mut d, 0),
        Err(DeviceError::Malformed(_))
    ));
}
