//! The block request ring between the hypervisor and dom0's block backend.
//!
//! Guests' virtio-blk requests reach dom0 here. dom0 owns the memory: one 4 KiB ring page
//! and a data area of [`SLOTS`] buffers of [`SLOT_BYTES`] each, registered with
//! `IO_RING_SETUP`. The hypervisor produces requests and consumes responses; dom0 consumes
//! requests and produces responses. A request's data travels only through its slot: the
//! hypervisor copies a guest's write data from the guest's descriptors into the slot before
//! publishing the request, and a read's data from the slot into the guest's descriptors when
//! the response comes; dom0 never reaches guest memory.
//!
//! # The ring page (little-endian)
//!
//! | offset | size | field | written by |
//! | --- | --- | --- | --- |
//! | 0 | 4 | magic [`MAGIC`] | hypervisor, at setup |
//! | 4 | 4 | version [`VERSION`] | hypervisor, at setup |
//! | 8 | 4 | slots ([`SLOTS`]) | hypervisor, at setup |
//! | 12 | 4 | slot bytes ([`SLOT_BYTES`]) | hypervisor, at setup |
//! | 16 | 4 | `req_prod`: requests published | hypervisor |
//! | 20 | 4 | `req_cons`: requests taken | dom0 |
//! | 24 | 4 | `rsp_prod`: responses published | dom0 |
//! | 28 | 4 | `rsp_cons`: responses taken | hypervisor |
//! | 64 | 32 × [`SLOTS`] | requests ([`Request`]) | hypervisor |
//! | [`RSP_OFFSET`] | 16 × [`SLOTS`] | responses ([`Response`]) | dom0 |
//!
//! The four indices run freely (wrapping `u32`); entry `i` lives at `i % SLOTS`. A producer
//! writes the entry, then its index (release); a consumer reads the index (acquire), then the
//! entry. The hypervisor has at most [`SLOTS`] requests in flight (one per slot), so neither
//! ring can overflow while dom0 answers each request once; a response for no request in
//! flight, or an index that runs past what was produced, is dom0's fault and is refused.
//!
//! # Requests
//!
//! `READ` and `WRITE` move `sectors` × 512 bytes (at most [`SLOT_BYTES`]) at `sector` through
//! the slot; `FLUSH` makes every write completed before it durable on the physical disk;
//! `DISCARD` and `WRITE_ZEROES` name `sectors` sectors at `sector` and carry no data;
//! `GET_ID` wants [`ID_BYTES`] of serial number in the slot. The response's `status` is
//! [`S_OK`], [`S_IOERR`] or [`S_UNSUPP`] (the virtio-blk values), and `len` the bytes of data
//! left in the slot (reads and `GET_ID`).

/// "HVIO", little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"HVIO");
/// Layout version of this page.
pub const VERSION: u32 = 1;
/// Ring entries, and requests in flight at most.
pub const SLOTS: u32 = 32;
/// Data bytes per slot: the largest read or write one request moves (128 KiB).
pub const SLOT_BYTES: u32 = 128 << 10;
/// The data area's size.
pub const DATA_BYTES: u64 = SLOTS as u64 * SLOT_BYTES as u64;
/// The ring page's size.
pub const RING_BYTES: u64 = 4096;
/// Longest volume name dom0 may offer.
pub const NAME_MAX: u64 = 64;
/// Length of a disk's serial number (virtio-blk's ID string).
pub const ID_BYTES: u32 = 20;

/// Offsets of the header fields.
pub mod field {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const SLOTS: u64 = 8;
    pub const SLOT_BYTES: u64 = 12;
    pub const REQ_PROD: u64 = 16;
    pub const REQ_CONS: u64 = 20;
    pub const RSP_PROD: u64 = 24;
    pub const RSP_CONS: u64 = 28;
}

/// Where request entries start.
pub const REQ_OFFSET: u64 = 64;
/// Bytes per request entry.
pub const REQ_BYTES: usize = 32;
/// Where response entries start.
pub const RSP_OFFSET: u64 = REQ_OFFSET + SLOTS as u64 * REQ_BYTES as u64;
/// Bytes per response entry.
pub const RSP_BYTES: usize = 16;

const _: () = assert!(RSP_OFFSET + SLOTS as u64 * RSP_BYTES as u64 <= RING_BYTES);
const _: () = assert!(SLOTS.is_power_of_two());
const _: () = assert!(SLOT_BYTES.is_multiple_of(4096));

/// Request operations (the virtio-blk request types where one exists).
pub mod op {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const FLUSH: u8 = 4;
    pub const GET_ID: u8 = 8;
    pub const DISCARD: u8 = 11;
    pub const WRITE_ZEROES: u8 = 13;
}

/// Response status: done.
pub const S_OK: u32 = 0;
/// Response status: the volume or the disk failed the request.
pub const S_IOERR: u32 = 1;
/// Response status: the operation is not offered.
pub const S_UNSUPP: u32 = 2;

/// Offset of request entry `index` (any free-running index) in the ring page.
pub fn req_offset(index: u32) -> u64 {
    REQ_OFFSET + u64::from(index % SLOTS) * REQ_BYTES as u64
}

/// Offset of response entry `index` in the ring page.
pub fn rsp_offset(index: u32) -> u64 {
    RSP_OFFSET + u64::from(index % SLOTS) * RSP_BYTES as u64
}

/// Offset of slot `slot`'s data in the data area.
pub fn slot_offset(slot: u32) -> u64 {
    u64::from(slot % SLOTS) * u64::from(SLOT_BYTES)
}

/// One request, as the hypervisor publishes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// The hypervisor's own reference; dom0 returns it in the response.
    pub tag: u64,
    pub op: u8,
    /// The disk's handle from `DISK_OFFER`.
    pub disk: u32,
    pub sector: u64,
    pub sectors: u32,
    /// The slot holding its data (`0..SLOTS`).
    pub slot: u32,
}

impl Request {
    pub fn to_bytes(&self) -> [u8; REQ_BYTES] {
        let mut b = [0u8; REQ_BYTES];
        b[0..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8] = self.op;
        b[12..16].copy_from_slice(&self.disk.to_le_bytes());
        b[16..24].copy_from_slice(&self.sector.to_le_bytes());
        b[24..28].copy_from_slice(&self.sectors.to_le_bytes());
        b[28..32].copy_from_slice(&self.slot.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; REQ_BYTES]) -> Request {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Request {
            tag: u64_at(0),
            op: b[8],
            disk: u32_at(12),
            sector: u64_at(16),
            sectors: u32_at(24),
            slot: u32_at(28),
        }
    }

    /// Data bytes a READ or WRITE moves, if within one slot.
    pub fn data_bytes(&self) -> Option<u32> {
        self.sectors.checked_mul(512).filter(|&n| n <= SLOT_BYTES)
    }
}

/// One response, as dom0 publishes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub tag: u64,
    pub status: u32,
    /// Bytes of data dom0 left in the request's slot.
    pub len: u32,
}

impl Response {
    pub fn to_bytes(&self) -> [u8; RSP_BYTES] {
        let mut b = [0u8; RSP_BYTES];
        b[0..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; RSP_BYTES]) -> Response {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Response {
            tag: u64::from(u32_at(0)) | (u64::from(u32_at(4)) << 32),
            status: u32_at(8),
            len: u32_at(12),
        }
    }
}

/// Read-only flag in `DISK_OFFER`'s third argument.
pub const OFFER_RO: u64 = 1 << 63;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_sit_where_the_table_says() {
        let r = Request {
            tag: 0x1122_3344_5566_7788,
            op: op::WRITE,
            disk: 7,
            sector: 0xdead_beef_0000_0001,
            sectors: 256,
            slot: 31,
        };
        assert_eq!(Request::from_bytes(&r.to_bytes()), r);
        assert_eq!(r.to_bytes()[0], 0x88, "little-endian tag");
        let s = Response {
            tag: u64::MAX - 1,
            status: S_IOERR,
            len: 4096,
        };
        assert_eq!(Response::from_bytes(&s.to_bytes()), s);
        assert_eq!(req_offset(0), 64);
        assert_eq!(req_offset(SLOTS), 64, "indices wrap onto the same entries");
        assert_eq!(req_offset(u32::MAX), 64 + 31 * 32);
        assert_eq!(rsp_offset(1), RSP_OFFSET + 16);
        assert_eq!(RSP_OFFSET, 64 + 32 * 32);
        assert_eq!(slot_offset(3), 3 * 128 * 1024);
        assert_eq!(DATA_BYTES, 4 << 20);
        assert_eq!(&MAGIC.to_le_bytes(), b"HVIO");
    }

    #[test]
    fn data_bytes_fit_one_slot() {
        let mut r = Request {
            sectors: 256,
            ..Request::default()
        };
        assert_eq!(r.data_bytes(), Some(SLOT_BYTES));
        r.sectors = 257;
        assert_eq!(r.data_bytes(), None);
        r.sectors = u32::MAX;
        assert_eq!(r.data_bytes(), None, "no overflow");
    }
}
