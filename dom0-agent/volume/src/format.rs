//! On-disk format: labels version 1, metadata records version 3 (thin mappings in B-trees,
//! [`crate::btree`]) for new pools, version 2 kept for pools not upgraded, version 1 read.
//!
//! Every pool disk starts with this fixed layout, in 4 KiB blocks:
//!
//! | blocks | content |
//! | --- | --- |
//! | 0, 1 | **label**, two identical copies, written once when the disk joins the pool |
//! | `2 .. 2+M` | metadata slot A (`M` = `md_blocks` from the label) |
//! | `2+M .. 2+2M` | metadata slot B |
//! | `2+2M .. 2+2M+D` | dirty-region-log slot A (`D` = `drl_blocks`) |
//! | `2+2M+D .. 2+2M+2D` | dirty-region-log slot B |
//! | `data_start ..` | data extents (`data_start` rounded up to a whole extent) |
//!
//! **Label** (first 64 bytes of blocks 0 and 1, little endian): magic `HVVOLLB1` (8), format
//! version u32, pool id u128, disk index u32, `md_blocks` u32, `drl_blocks` u32, `data_start`
//! u64, `extent_blocks` u32, 8 reserved bytes, CRC-32 of bytes 0..60 at 60..64.
//!
//! **Owner record** (bytes `1024..1024+OWNER_LEN` of block 0 only; zero when nobody owns the
//! pool): magic `HVVOLOW1` (8), pool id u128, pid u32, 4 reserved, time u64 (Unix seconds),
//! host id (32 bytes, NUL padded), host name (32), what (20: the command), CRC-32 of the bytes
//! before it. A process that opens the pool to change it writes its record on every disk
//! (flushed) before anything else and clears it when it is done; a record left by a crashed
//! process on this host is taken over, one from another host is refused unless forced (like a
//! disk-group import). Block 0 is rewritten with the label bytes unchanged, so a torn write
//! cannot damage label copy 0 on a device that writes sectors atomically, and copy 1 (block 1)
//! is never written after the disk joins. Version-1 pools have zeroes there: no owner.
//!
//! **Record** (metadata and dirty-region log share this framing): a 64-byte header, then the
//! payload, padded to whole blocks, inside one slot. Header: magic (`HVVOLMD1` or `HVVOLDR1`),
//! version u32 (metadata: 3, or 2 or 1 from older pools; log: 1), 4 reserved, sequence u64,
//! payload length u32, payload CRC-32, pool id u128,
//! 12 reserved, CRC-32 of header bytes 0..60. A record is valid when both CRCs match, the magic,
//! version and pool id are right and the length fits the slot. The newest valid record (highest
//! sequence) over every slot of every disk wins.
//!
//! **Metadata commit**: (version 3: the tree nodes changed since the last commit are written
//! first, into blocks no committed root reaches, and every disk flushed; see
//! [`crate::btree`]) sequence `n+1` is written to slot A of every disk, all disks are
//! flushed, then the same record to slot B, and all disks flushed again; a crash at any point
//! leaves at least one valid copy of `n` or `n+1` on every disk that was written.
//! **Dirty-region log**: records alternate between slots A and B by sequence parity.
//!
//! The metadata payload ([`PoolMeta`]) and the log payload ([`DrlRecord`]) are encoded
//! field by field, little endian, strings and vectors prefixed by a u32 length that is bounded
//! by the bytes remaining; decoding never trusts a length. Optional fields are a u8 flag (0/1)
//! followed by the value; enums are a u8 tag. Bitmaps are a u64 bit count then the u64 words.
//!
//! ```text
//! PoolMeta  := pool_id u128, seq u64, extent_blocks u32, md_blocks u32, drl_blocks u32,
//!              next_vol u32, disks [DiskMeta], volumes [VolMeta],
//!              lineage [(volume u32, snapshot of u32)]     (version 2 only)
//! DiskMeta  := name str, tier str, blocks u64, data_start u64,
//!              state (0 = active | 1 = missing, since u64)
//! VolMeta   := id u32, name str, size u64, tier ?str, region_blocks u32, internal u8,
//!              tracking ?(peer u32, changed Bitmap), kind VolKind
//! VolKind   := 0 thick: layout Layout, relayout ?(target Layout, done u64),
//!                       fill ?(origin u32, copied Bitmap)
//!            | 1 thin pool: data u32, chunk_blocks u32,
//!                         metadata volume u32                     (version 3 only)
//!            | 2 thin: pool u32, map, origin ?u32
//! map       := [(virtual chunk u64, pool chunk u32)]               (versions 1 and 2)
//!            | root u64 (0 = empty), count u64                     (version 3: a B-tree in
//!                                                                  the pool's metadata volume)
//! Layout    := stripe_unit u32, legs [[Column]]
//! Column    := segments [(disk u32, start u64, len u64)], state (0 in sync | 1 stale Bitmap)
//! DrlRecord := [(volume u32, dirty regions Bitmap)]
//! ```
//!
//! Decoded metadata is then validated as a whole (`pool::validate_meta`): segments inside
//! their disks and not overlapping, layouts rectangular, bitmaps of the right length,
//! references between volumes resolving, thin mappings inside their pools.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::bitmap::Bitmap;
use crate::dev::{BLOCK, BLOCK_SIZE, BlockDevice, DevError};
use crate::{u, us};

/// Version of the label and of the dirty-region log records.
pub const FORMAT_VERSION: u32 = 1;
/// Version of metadata records written by new pools: 3 keeps thin mappings in copy-on-write
/// B-trees in metadata volumes ([`crate::btree`]); 2 (adds snapshot lineage to 1) keeps them
/// in the record and is still written for pools that were not upgraded; 1 is still read.
pub const MD_VERSION: u32 = 3;
/// The newest record version with thin mappings inside the record.
pub const MD_VERSION_INLINE: u32 = 2;
/// Owner record magic.
pub const OWNER_MAGIC: [u8; 8] = *b"HVVOLOW1";
/// Byte offset of the owner record inside block 0.
pub const OWNER_OFFSET: usize = 1024;
/// Length of the owner record.
pub const OWNER_LEN: usize = 128;
/// Label magic.
pub const LABEL_MAGIC: [u8; 8] = *b"HVVOLLB1";
/// Metadata record magic.
pub const MD_MAGIC: [u8; 8] = *b"HVVOLMD1";
/// Dirty-region log record magic.
pub const DRL_MAGIC: [u8; 8] = *b"HVVOLDR1";
/// Blocks used by the label copies.
pub const LABEL_BLOCKS: u64 = 2;
const HEADER: usize = 64;
/// Longest name or tier tag.
pub const MAX_NAME: usize = 64;

/// The per-disk label: which pool, which disk, where the areas are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    pub pool_id: u128,
    pub disk_index: u32,
    pub md_blocks: u32,
    pub drl_blocks: u32,
    pub data_start: u64,
    pub extent_blocks: u32,
}

impl Label {
    /// First block of metadata slot `slot` (0 or 1).
    #[must_use]
    pub fn md_slot(&self, slot: u64) -> u64 {
        LABEL_BLOCKS + slot * u64::from(self.md_blocks)
    }

    /// First block of log slot `slot` (0 or 1).
    #[must_use]
    pub fn drl_slot(&self, slot: u64) -> u64 {
        LABEL_BLOCKS + 2 * u64::from(self.md_blocks) + slot * u64::from(self.drl_blocks)
    }

    /// Where data starts for these area sizes.
    #[must_use]
    pub fn data_start_for(md_blocks: u32, drl_blocks: u32, extent_blocks: u32) -> u64 {
        let raw = LABEL_BLOCKS + 2 * u64::from(md_blocks) + 2 * u64::from(drl_blocks);
        raw.div_ceil(u64::from(extent_blocks)) * u64::from(extent_blocks)
    }

    /// One label block.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        b[0..8].copy_from_slice(&LABEL_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..28].copy_from_slice(&self.pool_id.to_le_bytes());
        b[28..32].copy_from_slice(&self.disk_index.to_le_bytes());
        b[32..36].copy_from_slice(&self.md_blocks.to_le_bytes());
        b[36..40].copy_from_slice(&self.drl_blocks.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_start.to_le_bytes());
        b[48..52].copy_from_slice(&self.extent_blocks.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a label block.
    #[must_use]
    pub fn decode(b: &[u8]) -> Option<Label> {
        if b.len() < 64 || b[0..8] != LABEL_MAGIC {
            return None;
        }
        if crc32fast::hash(&b[0..60]) != le32(&b[60..64]) || le32(&b[8..12]) != FORMAT_VERSION {
            return None;
        }
        let l = Label {
            pool_id: u128::from_le_bytes(b[12..28].try_into().ok()?),
            disk_index: le32(&b[28..32]),
            md_blocks: le32(&b[32..36]),
            drl_blocks: le32(&b[36..40]),
            data_start: le64(&b[40..48]),
            extent_blocks: le32(&b[48..52]),
        };
        let sane = l.md_blocks >= 1
            && l.drl_blocks >= 1
            && l.extent_blocks >= 1
            && l.md_blocks <= 1 << 20
            && l.drl_blocks <= 1 << 16
            && l.extent_blocks <= 1 << 20
            && l.data_start == Label::data_start_for(l.md_blocks, l.drl_blocks, l.extent_blocks);
        sane.then_some(l)
    }

    /// Reads the label of `dev`: copy 0, else copy 1.
    pub fn read(dev: &mut dyn BlockDevice) -> Result<Option<Label>, DevError> {
        let mut b = vec![0u8; 2 * BLOCK_SIZE];
        if dev.num_blocks() < LABEL_BLOCKS {
            return Ok(None);
        }
        dev.read(0, &mut b)?;
        Ok(Label::decode(&b[..BLOCK_SIZE]).or_else(|| Label::decode(&b[BLOCK_SIZE..])))
    }

    /// Writes both label copies (not flushed).
    pub fn write(&self, dev: &mut dyn BlockDevice) -> Result<(), DevError> {
        let one = self.encode();
        let mut b = one.clone();
        b.extend_from_slice(&one);
        dev.write(0, &b)
    }
}

/// Who has the pool open to change it (see the module doc for the bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pool_id: u128,
    /// Process id (or domain id in dom0) of the owner.
    pub pid: u32,
    /// When it took the pool, Unix seconds.
    pub time: u64,
    /// Stable identity of the host (e.g. `/etc/machine-id`); compared to detect another host.
    pub host_id: String,
    /// Human-readable host name.
    pub host_name: String,
    /// What the owner is doing (the command), for messages.
    pub what: String,
}

fn put_field(b: &mut [u8], s: &str) {
    let mut n = s.len().min(b.len());
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn get_field(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl Owner {
    /// The record's bytes (`OWNER_LEN`).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; OWNER_LEN];
        b[0..8].copy_from_slice(&OWNER_MAGIC);
        b[8..24].copy_from_slice(&self.pool_id.to_le_bytes());
        b[24..28].copy_from_slice(&self.pid.to_le_bytes());
        b[32..40].copy_from_slice(&self.time.to_le_bytes());
        put_field(&mut b[40..72], &self.host_id);
        put_field(&mut b[72..104], &self.host_name);
        put_field(&mut b[104..124], &self.what);
        let crc = crc32fast::hash(&b[0..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a record; `None` when there is none (zeroes) or it is damaged.
    #[must_use]
    pub fn decode(b: &[u8]) -> Option<Owner> {
        if b.len() < OWNER_LEN
            || b[0..8] != OWNER_MAGIC
            || crc32fast::hash(&b[0..124]) != le32(&b[124..128])
        {
            return None;
        }
        Some(Owner {
            pool_id: u128::from_le_bytes(b[8..24].try_into().ok()?),
            pid: le32(&b[24..28]),
            time: le64(&b[32..40]),
            host_id: get_field(&b[40..72]),
            host_name: get_field(&b[72..104]),
            what: get_field(&b[104..124]),
        })
    }

    /// Reads the owner record of `dev`.
    pub fn read(dev: &mut dyn BlockDevice) -> Result<Option<Owner>, DevError> {
        if dev.num_blocks() < LABEL_BLOCKS {
            return Ok(None);
        }
        let mut b = vec![0u8; BLOCK_SIZE];
        dev.read(0, &mut b)?;
        Ok(Owner::decode(&b[OWNER_OFFSET..OWNER_OFFSET + OWNER_LEN]))
    }

    /// Writes `owner` (or zeroes, for `None`) into block 0 of `dev`, keeping the rest of the
    /// block, and flushes.
    pub fn write(dev: &mut dyn BlockDevice, owner: Option<&Owner>) -> Result<(), DevError> {
        let mut b = vec![0u8; BLOCK_SIZE];
        dev.read(0, &mut b)?;
        let rec = owner.map_or_else(|| vec![0u8; OWNER_LEN], Owner::encode);
        if b[OWNER_OFFSET..OWNER_OFFSET + OWNER_LEN] == rec[..] {
            return Ok(());
        }
        b[OWNER_OFFSET..OWNER_OFFSET + OWNER_LEN].copy_from_slice(&rec);
        dev.write(0, &b)?;
        dev.flush()
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Frames `payload` as a record padded to whole blocks.
#[must_use]
pub fn encode_record(magic: [u8; 8], pool_id: u128, seq: u64, payload: &[u8]) -> Vec<u8> {
    encode_record_version(magic, record_version(magic), pool_id, seq, payload)
}

/// [`encode_record`] with an explicit record version (metadata records of a pool that was
/// not upgraded stay version 2).
#[must_use]
pub fn encode_record_version(
    magic: [u8; 8],
    version: u32,
    pool_id: u128,
    seq: u64,
    payload: &[u8],
) -> Vec<u8> {
    let total = (HEADER + payload.len()).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let mut b = vec![0u8; total];
    b[0..8].copy_from_slice(&magic);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    b[24..28].copy_from_slice(&len.to_le_bytes());
    b[28..32].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    b[32..48].copy_from_slice(&pool_id.to_le_bytes());
    let hcrc = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&hcrc.to_le_bytes());
    b[HEADER..HEADER + payload.len()].copy_from_slice(payload);
    b
}

/// The version a record of kind `magic` is written with.
fn record_version(magic: [u8; 8]) -> u32 {
    if magic == MD_MAGIC {
        MD_VERSION
    } else {
        FORMAT_VERSION
    }
}

/// Largest payload a slot of `slot_blocks` blocks holds.
#[must_use]
pub fn slot_capacity(slot_blocks: u32) -> usize {
    us(u64::from(slot_blocks)) * BLOCK_SIZE - HEADER
}

/// Reads the record in the slot starting at `start`; `Ok(None)` when it is missing or invalid.
pub fn read_record(
    dev: &mut dyn BlockDevice,
    start: u64,
    slot_blocks: u32,
    magic: [u8; 8],
    pool_id: u128,
) -> Result<Option<(u64, Vec<u8>)>, DevError> {
    Ok(read_record_version(dev, start, slot_blocks, magic, pool_id)?.map(|(s, _, p)| (s, p)))
}

/// [`read_record`] that also returns the record's version: `(sequence, version, payload)`.
pub fn read_record_version(
    dev: &mut dyn BlockDevice,
    start: u64,
    slot_blocks: u32,
    magic: [u8; 8],
    pool_id: u128,
) -> Result<Option<(u64, u32, Vec<u8>)>, DevError> {
    if start + u64::from(slot_blocks) > dev.num_blocks() {
        return Ok(None);
    }
    let mut first = vec![0u8; BLOCK_SIZE];
    dev.read(start, &mut first)?;
    let h = &first[..HEADER];
    if h[0..8] != magic
        || crc32fast::hash(&h[0..60]) != le32(&h[60..64])
        || !(FORMAT_VERSION..=record_version(magic)).contains(&le32(&h[8..12]))
        || u128::from_le_bytes(h[32..48].try_into().unwrap_or([0; 16])) != pool_id
    {
        return Ok(None);
    }
    let seq = le64(&h[16..24]);
    let version = le32(&h[8..12]);
    let len = us(u64::from(le32(&h[24..28])));
    if len > slot_capacity(slot_blocks) {
        return Ok(None);
    }
    let total = (HEADER + len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let mut b = vec![0u8; total];
    b[..BLOCK_SIZE].copy_from_slice(&first);
    if total > BLOCK_SIZE {
        dev.read(start + 1, &mut b[BLOCK_SIZE..])?;
    }
    let payload = b[HEADER..HEADER + len].to_vec();
    if crc32fast::hash(&payload) != le32(&h[28..32]) {
        return Ok(None);
    }
    Ok(Some((seq, version, payload)))
}

// ---------------------------------------------------------------------------------------------
// Metadata model.

/// Whether a disk of the pool is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    /// Present and in use.
    Active,
    /// Declared missing by the commit with sequence `since`; its columns are stale.
    Missing { since: u64 },
}

/// One disk of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMeta {
    pub name: String,
    pub tier: String,
    /// Device size in blocks when it joined.
    pub blocks: u64,
    pub data_start: u64,
    pub state: DiskState,
}

/// A run of blocks on one disk (absolute block numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub disk: u32,
    pub start: u64,
    pub len: u64,
}

/// Whether one column of one mirror leg holds current data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncState {
    /// Identical to the other in-sync legs.
    InSync,
    /// Regions (set bits, in volume regions) that must be copied before it is in sync again.
    Stale(Bitmap),
}

/// One stripe column of one leg: a concatenation of segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub segs: Vec<Segment>,
    pub state: SyncState,
}

/// One mirror leg (plex): `columns` striped with the layout's stripe unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    pub columns: Vec<Column>,
}

/// Where a thick volume's blocks live: legs × columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Stripe unit in blocks (meaningful with more than one column).
    pub stripe_unit: u32,
    pub legs: Vec<Leg>,
}

/// An online relayout in progress: blocks below `done` live in `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayout {
    pub target: Layout,
    pub done: u64,
}

/// A full snapshot being filled from its origin; set bits are copied regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    pub origin: u32,
    pub copied: Bitmap,
}

/// Change tracking between a volume and a leg split off from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracking {
    pub peer: u32,
    pub changed: Bitmap,
}

/// What a volume is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolKind {
    /// Fully allocated volume over extents.
    Thick {
        layout: Layout,
        relayout: Option<Relayout>,
        fill: Option<Fill>,
    },
    /// A thin pool: chunks of the internal thick volume `data`; in version-3 pools, the
    /// mapping trees of its thin volumes live in the internal thick volume `md`.
    ThinPool {
        data: u32,
        chunk_blocks: u32,
        md: Option<u32>,
    },
    /// A thin volume: virtual chunk → pool chunk. With an `origin` (a space-optimised
    /// snapshot of a thick volume), unmapped chunks read from the origin instead of zeroes.
    Thin {
        pool: u32,
        map: ThinMap,
        origin: Option<u32>,
    },
}

/// Where a thin volume's mappings are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThinMap {
    /// In the record itself (versions 1 and 2).
    Inline(BTreeMap<u64, u32>),
    /// In a B-tree of the pool's metadata volume (version 3): its root block (0 = empty) and
    /// how many mappings it holds.
    Tree { root: u64, count: u64 },
}

impl ThinMap {
    /// Number of mapped chunks.
    #[must_use]
    pub fn len(&self) -> u64 {
        match self {
            ThinMap::Inline(m) => u(m.len()),
            ThinMap::Tree { count, .. } => *count,
        }
    }

    /// Whether nothing is mapped.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolMeta {
    pub id: u32,
    pub name: String,
    /// Size in blocks.
    pub size: u64,
    pub tier: Option<String>,
    /// Region size (blocks) of the dirty-region log and change bitmaps.
    pub region_blocks: u32,
    /// Internal volumes (thin-pool data) are not listed as volumes.
    pub internal: bool,
    pub tracking: Option<Tracking>,
    pub kind: VolKind,
    /// The volume this one is a snapshot of (its lineage; version-2 records only, inferred
    /// from `fill` and thin `origin` for older pools).
    pub snapshot_of: Option<u32>,
}

impl VolMeta {
    /// Regions covering the volume.
    #[must_use]
    pub fn nregions(&self) -> u64 {
        self.size.div_ceil(u64::from(self.region_blocks.max(1)))
    }
}

/// The whole pool configuration; one record of it is the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMeta {
    /// Record version this pool is written with: [`MD_VERSION`], or [`MD_VERSION_INLINE`] for
    /// a pool made before version 3 and not upgraded (version-1 pools are written as 2).
    pub version: u32,
    pub pool_id: u128,
    pub seq: u64,
    pub extent_blocks: u32,
    pub md_blocks: u32,
    pub drl_blocks: u32,
    pub next_vol: u32,
    pub disks: Vec<DiskMeta>,
    pub volumes: Vec<VolMeta>,
}

/// The dirty-region log: regions of volumes that may differ between mirror legs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DrlRecord {
    pub entries: Vec<(u32, Bitmap)>,
}

// ---------------------------------------------------------------------------------------------
// Codec.

/// Why a payload failed to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl From<DecodeError> for crate::Error {
    fn from(e: DecodeError) -> Self {
        crate::Error::Corrupt(e.0.to_string())
    }
}

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn bitmap(&mut self, b: &Bitmap) {
        self.u64(b.len());
        for w in b.words() {
            self.u64(*w);
        }
    }
}

struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() - self.pos < n {
            return Err(DecodeError("record ends early"));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(le32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(le64(self.take(8)?))
    }
    /// A count of elements each at least `min_size` bytes long, bounded by what remains.
    fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = us(u64::from(self.u32()?));
        if n.saturating_mul(min_size.max(1)) > self.b.len() - self.pos {
            return Err(DecodeError("length prefix larger than the record"));
        }
        Ok(n)
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.count(1)?;
        if n > MAX_NAME {
            return Err(DecodeError("name too long"));
        }
        let s = self.take(n)?;
        core::str::from_utf8(s)
            .map(ToString::to_string)
            .map_err(|_| DecodeError("name is not UTF-8"))
    }
    fn bitmap(&mut self) -> Result<Bitmap, DecodeError> {
        let len = self.u64()?;
        let words = len.div_ceil(64);
        if words > u(self.b.len() - self.pos) / 8 {
            return Err(DecodeError("bitmap larger than the record"));
        }
        let mut v = Vec::with_capacity(us(words));
        for _ in 0..words {
            v.push(self.u64()?);
        }
        Bitmap::from_words(len, v).ok_or(DecodeError("bitmap length"))
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(DecodeError("trailing bytes"))
        }
    }
}

fn enc_layout(e: &mut Enc, l: &Layout) {
    e.u32(l.stripe_unit);
    e.len(l.legs.len());
    for leg in &l.legs {
        e.len(leg.columns.len());
        for c in &leg.columns {
            e.len(c.segs.len());
            for s in &c.segs {
                e.u32(s.disk);
                e.u64(s.start);
                e.u64(s.len);
            }
            match &c.state {
                SyncState::InSync => e.u8(0),
                SyncState::Stale(b) => {
                    e.u8(1);
                    e.bitmap(b);
                }
            }
        }
    }
}

fn dec_layout(d: &mut Dec<'_>) -> Result<Layout, DecodeError> {
    let stripe_unit = d.u32()?;
    let nlegs = d.count(4)?;
    let mut legs = Vec::with_capacity(nlegs);
    for _ in 0..nlegs {
        let ncols = d.count(5)?;
        let mut columns = Vec::with_capacity(ncols);
        for _ in 0..ncols {
            let nsegs = d.count(20)?;
            let mut segs = Vec::with_capacity(nsegs);
            for _ in 0..nsegs {
                segs.push(Segment {
                    disk: d.u32()?,
                    start: d.u64()?,
                    len: d.u64()?,
                });
            }
            let state = match d.u8()? {
                0 => SyncState::InSync,
                1 => SyncState::Stale(d.bitmap()?),
                _ => return Err(DecodeError("unknown sync state")),
            };
            columns.push(Column { segs, state });
        }
        legs.push(Leg { columns });
    }
    Ok(Layout { stripe_unit, legs })
}

impl PoolMeta {
    /// Encodes the metadata payload.
    #[must_use]
    ///
    /// A version-3 record holds each thin pool's metadata volume and each thin volume's tree
    /// root and count; the caller keeps maps inline exactly when the version is below 3
    /// (`validate_meta` checks it).
    pub fn encode(&self) -> Vec<u8> {
        let tree = self.version >= 3;
        let mut e = Enc::default();
        e.0.extend_from_slice(&self.pool_id.to_le_bytes());
        e.u64(self.seq);
        e.u32(self.extent_blocks);
        e.u32(self.md_blocks);
        e.u32(self.drl_blocks);
        e.u32(self.next_vol);
        e.len(self.disks.len());
        for d in &self.disks {
            e.str(&d.name);
            e.str(&d.tier);
            e.u64(d.blocks);
            e.u64(d.data_start);
            match d.state {
                DiskState::Active => e.u8(0),
                DiskState::Missing { since } => {
                    e.u8(1);
                    e.u64(since);
                }
            }
        }
        e.len(self.volumes.len());
        for v in &self.volumes {
            e.u32(v.id);
            e.str(&v.name);
            e.u64(v.size);
            match &v.tier {
                None => e.u8(0),
                Some(t) => {
                    e.u8(1);
                    e.str(t);
                }
            }
            e.u32(v.region_blocks);
            e.u8(u8::from(v.internal));
            match &v.tracking {
                None => e.u8(0),
                Some(t) => {
                    e.u8(1);
                    e.u32(t.peer);
                    e.bitmap(&t.changed);
                }
            }
            match &v.kind {
                VolKind::Thick {
                    layout,
                    relayout,
                    fill,
                } => {
                    e.u8(0);
                    enc_layout(&mut e, layout);
                    match relayout {
                        None => e.u8(0),
                        Some(r) => {
                            e.u8(1);
                            enc_layout(&mut e, &r.target);
                            e.u64(r.done);
                        }
                    }
                    match fill {
                        None => e.u8(0),
                        Some(f) => {
                            e.u8(1);
                            e.u32(f.origin);
                            e.bitmap(&f.copied);
                        }
                    }
                }
                VolKind::ThinPool {
                    data,
                    chunk_blocks,
                    md,
                } => {
                    e.u8(1);
                    e.u32(*data);
                    e.u32(*chunk_blocks);
                    if tree {
                        e.u32(md.unwrap_or(u32::MAX));
                    }
                }
                VolKind::Thin { pool, map, origin } => {
                    e.u8(2);
                    e.u32(*pool);
                    match map {
                        ThinMap::Inline(map) => {
                            e.len(map.len());
                            for (k, p) in map {
                                e.u64(*k);
                                e.u32(*p);
                            }
                        }
                        ThinMap::Tree { root, count } => {
                            e.u64(*root);
                            e.u64(*count);
                        }
                    }
                    match origin {
                        None => e.u8(0),
                        Some(o) => {
                            e.u8(1);
                            e.u32(*o);
                        }
                    }
                }
            }
        }
        let lineage: Vec<(u32, u32)> = self
            .volumes
            .iter()
            .filter_map(|v| v.snapshot_of.map(|p| (v.id, p)))
            .collect();
        e.len(lineage.len());
        for (v, p) in lineage {
            e.u32(v);
            e.u32(p);
        }
        e.0
    }

    /// Decodes a version 1 or 2 metadata payload (structure only; see `Pool` for semantic
    /// validation).
    pub fn decode(b: &[u8]) -> Result<PoolMeta, DecodeError> {
        Self::decode_version(b, MD_VERSION_INLINE)
    }

    /// Decodes a metadata payload of record version `version` (1 and 2 are told apart by the
    /// lineage at the end).
    pub fn decode_version(b: &[u8], version: u32) -> Result<PoolMeta, DecodeError> {
        let tree = match version {
            1 | 2 => false,
            3 => true,
            _ => return Err(DecodeError("unknown record version")),
        };
        let mut d = Dec { b, pos: 0 };
        let pool_id = u128::from_le_bytes(d.take(16)?.try_into().map_err(|_| DecodeError("id"))?);
        let seq = d.u64()?;
        let extent_blocks = d.u32()?;
        let md_blocks = d.u32()?;
        let drl_blocks = d.u32()?;
        let next_vol = d.u32()?;
        let ndisks = d.count(25)?;
        let mut disks = Vec::with_capacity(ndisks);
        for _ in 0..ndisks {
            let name = d.str()?;
            let tier = d.str()?;
            let blocks = d.u64()?;
            let data_start = d.u64()?;
            let state = match d.u8()? {
                0 => DiskState::Active,
                1 => DiskState::Missing { since: d.u64()? },
                _ => return Err(DecodeError("unknown disk state")),
            };
            disks.push(DiskMeta {
                name,
                tier,
                blocks,
                data_start,
                state,
            });
        }
        let nvols = d.count(20)?;
        let mut volumes = Vec::with_capacity(nvols);
        for _ in 0..nvols {
            let id = d.u32()?;
            let name = d.str()?;
            let size = d.u64()?;
            let tier = match d.u8()? {
                0 => None,
                1 => Some(d.str()?),
                _ => return Err(DecodeError("tier flag")),
            };
            let region_blocks = d.u32()?;
            let internal = d.u8()? != 0;
            let tracking = match d.u8()? {
                0 => None,
                1 => Some(Tracking {
                    peer: d.u32()?,
                    changed: d.bitmap()?,
                }),
                _ => return Err(DecodeError("tracking flag")),
            };
            let kind = match d.u8()? {
                0 => {
                    let layout = dec_layout(&mut d)?;
                    let relayout = match d.u8()? {
                        0 => None,
                        1 => Some(Relayout {
                            target: dec_layout(&mut d)?,
                            done: d.u64()?,
                        }),
                        _ => return Err(DecodeError("relayout flag")),
                    };
                    let fill = match d.u8()? {
                        0 => None,
                        1 => Some(Fill {
                            origin: d.u32()?,
                            copied: d.bitmap()?,
                        }),
                        _ => return Err(DecodeError("fill flag")),
                    };
                    VolKind::Thick {
                        layout,
                        relayout,
                        fill,
                    }
                }
                1 => VolKind::ThinPool {
                    data: d.u32()?,
                    chunk_blocks: d.u32()?,
                    md: if tree { Some(d.u32()?) } else { None },
                },
                2 => {
                    let pool = d.u32()?;
                    let map = if tree {
                        ThinMap::Tree {
                            root: d.u64()?,
                            count: d.u64()?,
                        }
                    } else {
                        let n = d.count(12)?;
                        let mut map = BTreeMap::new();
                        for _ in 0..n {
                            let k = d.u64()?;
                            map.insert(k, d.u32()?);
                        }
                        ThinMap::Inline(map)
                    };
                    let origin = match d.u8()? {
                        0 => None,
                        1 => Some(d.u32()?),
                        _ => return Err(DecodeError("origin flag")),
                    };
                    VolKind::Thin { pool, map, origin }
                }
                _ => return Err(DecodeError("unknown volume kind")),
            };
            volumes.push(VolMeta {
                id,
                name,
                size,
                tier,
                region_blocks,
                internal,
                tracking,
                kind,
                snapshot_of: None,
            });
        }
        if d.pos == d.b.len() && !tree {
            // A version-1 record: lineage is what the configuration still shows.
            for v in &mut volumes {
                v.snapshot_of = match &v.kind {
                    VolKind::Thick { fill: Some(f), .. } => Some(f.origin),
                    VolKind::Thin { origin, .. } => *origin,
                    _ => None,
                };
            }
        } else {
            let n = d.count(8)?;
            for _ in 0..n {
                let (id, parent) = (d.u32()?, d.u32()?);
                let v = volumes
                    .iter_mut()
                    .find(|v| v.id == id)
                    .ok_or(DecodeError("lineage of an unknown volume"))?;
                v.snapshot_of = Some(parent);
            }
        }
        d.end()?;
        Ok(PoolMeta {
            version: if tree { MD_VERSION } else { MD_VERSION_INLINE },
            pool_id,
            seq,
            extent_blocks,
            md_blocks,
            drl_blocks,
            next_vol,
            disks,
            volumes,
        })
    }
}

impl DrlRecord {
    /// Encodes the log payload.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.len(self.entries.len());
        for (v, b) in &self.entries {
            e.u32(*v);
            e.bitmap(b);
        }
        e.0
    }

    /// Decodes a log payload.
    pub fn decode(b: &[u8]) -> Result<DrlRecord, DecodeError> {
        let mut d = Dec { b, pos: 0 };
        let n = d.count(12)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push((d.u32()?, d.bitmap()?));
        }
        d.end()?;
        Ok(DrlRecord { entries })
    }
}

/// Blocks needed for `bytes` bytes.
#[must_use]
pub fn blocks_for(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_roundtrip_and_corruption() {
        let l = Label {
            pool_id: 7,
            disk_index: 2,
            md_blocks: 8,
            drl_blocks: 2,
            data_start: 32,
            extent_blocks: 16,
        };
        let mut b = l.encode();
        assert_eq!(Label::decode(&b), Some(l));
        b[30] ^= 1;
        assert_eq!(Label::decode(&b), None);
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in 0..400 {
            let mut buf = vec![0u8; len];
            for byte in &mut buf {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = (x & 0xff) as u8;
            }
            let _ = PoolMeta::decode(&buf);
            let _ = PoolMeta::decode_version(&buf, 3);
            let _ = DrlRecord::decode(&buf);
        }
    }
}
