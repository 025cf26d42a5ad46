//! dom0's block backend: serves the hypervisor's block requests ([`BackendRing`]) from
//! volumes of the volume manager.
//!
//! Guests address 512-byte sectors; volumes have 4 KiB blocks. A request that covers whole
//! blocks goes straight to the pool; one that starts or ends inside a block reads the blocks
//! it touches, changes its part and writes them back (writes of one guest disk are served in
//! order, so nothing interleaves). A completed FLUSH means the pool's flush returned: every
//! write completed before it is durable on the physical disks.
//!
//! Every request is checked again here (the disk handle, the range against the volume's
//! size, the length against its slot) and answered with IOERR when it does not fit.

// Sizes here are bounded by one slot (128 KiB) and block offsets by a slot's blocks: the
// casts between u64, u32 and usize cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use hv_abi::ioring::{self, Request, op};
use pv_drivers::ioring::{BackendRing, RingMemory};
use volmgr::pool::Pool;

const BLOCK: u64 = 4096;
const SECTORS_PER_BLOCK: u64 = BLOCK / 512;

/// A volume served to guests.
#[derive(Clone, Debug)]
pub struct Served {
    /// `pool/volume`, as offered.
    pub name: String,
    /// The handle the hypervisor gave it (requests name it).
    pub handle: u32,
    /// The volume's id in the pool.
    pub id: u32,
    pub blocks: u64,
    pub read_only: bool,
}

/// Request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub other: u64,
    pub errors: u64,
    /// Reads and writes that did not cover whole blocks.
    pub partial: u64,
}

/// The backend: a pool and the volumes it serves.
pub struct Backend {
    pub pool: Pool,
    pub served: Vec<Served>,
    scratch: Vec<u8>,
    slot: Vec<u8>,
    pub stats: BackendStats,
}

impl Backend {
    pub fn new(pool: Pool) -> Self {
        Backend {
            pool,
            served: Vec::new(),
            scratch: Vec::new(),
            slot: vec![0; ioring::SLOT_BYTES as usize],
            stats: BackendStats::default(),
        }
    }

    /// Serves every request waiting in `ring` and publishes the responses; returns how many.
    pub fn serve<M: RingMemory>(&mut self, ring: &mut BackendRing<M>) -> usize {
        let mut n = 0;
        while let Some(req) = ring.take() {
            let (status, len) = self.one(&req, ring);
            if status != ioring::S_OK {
                self.stats.errors += 1;
            }
            ring.respond(req.tag, status, len);
            n += 1;
        }
        if n > 0 {
            ring.publish();
        }
        n
    }

    fn one<M: RingMemory>(&mut self, req: &Request, ring: &BackendRing<M>) -> (u32, u32) {
        let Some(vol) = self.served.iter().find(|s| s.handle == req.disk).cloned() else {
            return (ioring::S_IOERR, 0);
        };
        let in_range = |sector: u64, sectors: u32| {
            sector
                .checked_add(u64::from(sectors))
                .is_some_and(|end| end <= vol.blocks * SECTORS_PER_BLOCK)
        };
        match req.op {
            op::READ => {
                self.stats.reads += 1;
                let Some(bytes) = req.data_bytes() else {
                    return (ioring::S_IOERR, 0);
                };
                if !in_range(req.sector, req.sectors) {
                    return (ioring::S_IOERR, 0);
                }
                let (first, count, skip) = span(req.sector, req.sectors);
                if skip != 0 || u64::from(bytes) != count * BLOCK {
                    self.stats.partial += 1;
                }
                self.scratch.resize((count * BLOCK) as usize, 0);
                if self.pool.read(vol.id, first, &mut self.scratch).is_err() {
                    return (ioring::S_IOERR, 0);
                }
                ring.write_slot(req, &self.scratch[skip..skip + bytes as usize]);
                (ioring::S_OK, bytes)
            }
            op::WRITE => {
                self.stats.writes += 1;
                let Some(bytes) = req.data_bytes() else {
                    return (ioring::S_IOERR, 0);
                };
                if vol.read_only || !in_range(req.sector, req.sectors) {
                    return (ioring::S_IOERR, 0);
                }
                let data = &mut self.slot[..bytes as usize];
                ring.read_slot(req, data);
                let data = &self.slot[..bytes as usize];
                match write_sectors(&mut self.pool, &mut self.scratch, vol.id, req.sector, data) {
                    Ok(partial) => {
                        self.stats.partial += u64::from(partial);
                        (ioring::S_OK, 0)
                    }
                    Err(()) => (ioring::S_IOERR, 0),
                }
            }
            op::FLUSH => {
                self.stats.flushes += 1;
                match self.pool.flush() {
                    Ok(()) => (ioring::S_OK, 0),
                    Err(_) => (ioring::S_IOERR, 0),
                }
            }
            op::GET_ID => {
                self.stats.other += 1;
                let id = vol.name.as_bytes();
                let n = id.len().min(ioring::ID_BYTES as usize);
                ring.write_slot(req, &id[..n]);
                (ioring::S_OK, n as u32)
            }
            op::WRITE_ZEROES => {
                self.stats.other += 1;
                if vol.read_only || !in_range(req.sector, req.sectors) {
                    return (ioring::S_IOERR, 0);
                }
                let zeros = vec![0u8; ioring::SLOT_BYTES as usize];
                let mut sector = req.sector;
                let mut left = u64::from(req.sectors);
                while left > 0 {
                    let n = left.min(u64::from(ioring::SLOT_BYTES) / 512);
                    let r = write_sectors(
                        &mut self.pool,
                        &mut self.scratch,
                        vol.id,
                        sector,
                        &zeros[..(n * 512) as usize],
                    );
                    if r.is_err() {
                        return (ioring::S_IOERR, 0);
                    }
                    sector += n;
                    left -= n;
                }
                (ioring::S_OK, 0)
            }
            op::DISCARD => {
                self.stats.other += 1;
                if vol.read_only || !in_range(req.sector, req.sectors) {
                    return (ioring::S_IOERR, 0);
                }
                // Advisory: thin volumes give back the whole chunks inside the range.
                let r = self
                    .pool
                    .discard(vol.id, req.sector * 512, u64::from(req.sectors) * 512);
                match r {
                    Ok(_) => (ioring::S_OK, 0),
                    Err(_) => (ioring::S_IOERR, 0),
                }
            }
            _ => (ioring::S_UNSUPP, 0),
        }
    }
}

/// The blocks `sectors` sectors at `sector` touch: the first, how many, and the byte offset
/// of the first sector in the first block.
fn span(sector: u64, sectors: u32) -> (u64, u64, usize) {
    let first = sector / SECTORS_PER_BLOCK;
    let end = (sector + u64::from(sectors)).div_ceil(SECTORS_PER_BLOCK);
    let skip = ((sector % SECTORS_PER_BLOCK) * 512) as usize;
    (first, end - first, skip)
}

/// Writes `data` (whole sectors) at `sector` of volume `id`, reading and rewriting the blocks
/// it covers only in part. Returns whether it was partial.
fn write_sectors(
    pool: &mut Pool,
    scratch: &mut Vec<u8>,
    id: u32,
    sector: u64,
    data: &[u8],
) -> Result<bool, ()> {
    let sectors = (data.len() / 512) as u32;
    let (first, count, skip) = span(sector, sectors);
    if skip == 0 && data.len() as u64 == count * BLOCK {
        return pool.write(id, first, data).map(|()| false).map_err(|_| ());
    }
    scratch.resize((count * BLOCK) as usize, 0);
    pool.read(id, first, scratch).map_err(|_| ())?;
    scratch[skip..skip + data.len()].copy_from_slice(data);
    pool.write(id, first, scratch).map_err(|_| ())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    use alloc::boxed::Box;
    use hv_abi::ioring::{Response, field};
    use volmgr::dev::MemDisk;
    use volmgr::pool::{DiskSpec, LayoutSpec, PoolConfig};

    /// The ring page and data area as one plain buffer; the test plays the hypervisor.
    #[derive(Clone)]
    struct Shared(Rc<RefCell<Vec<u8>>>, u64);

    impl RingMemory for Shared {
        fn read(&self, offset: u64, buf: &mut [u8]) {
            let o = (self.1 + offset) as usize;
            buf.copy_from_slice(&self.0.borrow()[o..o + buf.len()]);
        }
        fn write(&self, offset: u64, buf: &[u8]) {
            let o = (self.1 + offset) as usize;
            self.0.borrow_mut()[o..o + buf.len()].copy_from_slice(buf);
        }
    }

    const DATA: u64 = 4096;

    fn setup() -> (Backend, BackendRing<Shared>, Shared) {
        let mem = Rc::new(RefCell::new(vec![0u8; 4096 + ioring::DATA_BYTES as usize]));
        let ring = Shared(mem.clone(), 0);
        for (off, v) in [
            (field::MAGIC, ioring::MAGIC),
            (field::VERSION, ioring::VERSION),
            (field::SLOTS, ioring::SLOTS),
            (field::SLOT_BYTES, ioring::SLOT_BYTES),
        ] {
            ring.write(off, &v.to_le_bytes());
        }
        let data = Shared(mem, DATA);
        let br = BackendRing::new(ring.clone(), data).unwrap();
        let disk = MemDisk::new(4096);
        let mut pool = Pool::create(
            vec![(Box::new(disk), DiskSpec::new("d0", "fast"))],
            PoolConfig::small(7),
        )
        .unwrap();
        let id = pool
            .create_volume("data", 256, LayoutSpec::Concat, None)
            .unwrap();
        let mut b = Backend::new(pool);
        b.served.push(Served {
            name: "pool/data".into(),
            handle: 1,
            id,
            blocks: 256,
            read_only: false,
        });
        (b, br, ring)
    }

    /// Publishes `reqs` as the hypervisor would (data already in their slots).
    fn publish(ring: &Shared, reqs: &[Request]) {
        let mut b = [0u8; 4];
        ring.read(field::REQ_PROD, &mut b);
        let mut prod = u32::from_le_bytes(b);
        for r in reqs {
            ring.write(ioring::req_offset(prod), &r.to_bytes());
            prod = prod.wrapping_add(1);
        }
        ring.write(field::REQ_PROD, &prod.to_le_bytes());
    }

    fn responses(ring: &Shared, n: u32) -> Vec<Response> {
        (0..n)
            .map(|i| {
                let mut b = [0u8; 16];
                ring.read(ioring::rsp_offset(i), &mut b);
                Response::from_bytes(&b)
            })
            .collect()
    }

    fn req(op: u8, sector: u64, sectors: u32, slot: u32) -> Request {
        Request {
            tag: u64::from(slot) + 100,
            op,
            disk: 1,
            sector,
            sectors,
            slot,
        }
    }

    #[test]
    fn whole_and_partial_blocks_read_back_what_was_written() {
        let (mut b, mut ring, shared) = setup();
        let data = Shared(shared.0.clone(), DATA);
        // Slot 0: 8 KiB at sector 8 (whole blocks); slot 1: 3 sectors at sector 13 (partial).
        let a: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        data.write(ioring::slot_offset(0), &a);
        data.write(ioring::slot_offset(1), &[0x5a; 1536]);
        publish(
            &shared,
            &[
                req(op::WRITE, 8, 16, 0),
                req(op::WRITE, 13, 3, 1),
                req(op::READ, 8, 16, 2),
                req(op::FLUSH, 0, 0, 3),
                req(op::GET_ID, 0, 0, 4),
            ],
        );
        assert_eq!(b.serve(&mut ring), 5);
        let r = responses(&shared, 5);
        assert!(r.iter().all(|r| r.status == ioring::S_OK), "{r:?}");
        assert_eq!(r[2].len, 8192);
        let mut back = vec![0u8; 8192];
        data.read(ioring::slot_offset(2), &mut back);
        let mut want = a.clone();
        want[5 * 512..8 * 512].fill(0x5a);
        assert_eq!(back, want);
        assert_eq!(r[4].len, 9);
        let mut id = [0u8; 9];
        data.read(ioring::slot_offset(4), &mut id);
        assert_eq!(&id, b"pool/data");
        assert_eq!(b.stats.partial, 1);
        assert_eq!(b.stats.flushes, 1);
    }

    #[test]
    fn requests_that_do_not_fit_fail_without_touching_the_volume() {
        let (mut b, mut ring, shared) = setup();
        publish(
            &shared,
            &[
                req(op::READ, 256 * 8 - 1, 2, 0),
                Request {
                    disk: 9,
                    ..req(op::READ, 0, 1, 1)
                },
                req(op::WRITE, u64::MAX - 1, 8, 2),
                req(42, 0, 0, 3),
            ],
        );
        assert_eq!(b.serve(&mut ring), 4);
        let r = responses(&shared, 4);
        let s: Vec<u32> = r.iter().map(|r| r.status).collect();
        assert_eq!(
            s,
            vec![
                ioring::S_IOERR,
                ioring::S_IOERR,
                ioring::S_IOERR,
                ioring::S_UNSUPP
            ]
        );
        assert_eq!(b.stats.writes, 1);
    }

    #[test]
    fn write_zeroes_clears_the_range() {
        let (mut b, mut ring, shared) = setup();
        let data = Shared(shared.0.clone(), DATA);
        data.write(ioring::slot_offset(0), &[0xff; 4096 * 4]);
        publish(
            &shared,
            &[
                req(op::WRITE, 0, 32, 0),
                req(op::WRITE_ZEROES, 3, 20, 1),
                req(op::READ, 0, 32, 2),
            ],
        );
        b.serve(&mut ring);
        let mut back = vec![0u8; 4096 * 4];
        data.read(ioring::slot_offset(2), &mut back);
        assert!(back[..3 * 512].iter().all(|&x| x == 0xff));
        assert!(back[3 * 512..23 * 512].iter().all(|&x| x == 0));
        assert!(back[23 * 512..].iter().all(|&x| x == 0xff));
    }
}
