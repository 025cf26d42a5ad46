//! Reading and writing qcow2 images (version 2 and 3) for import and export.
//!
//! Supported on import: uncompressed, unencrypted images without a backing file; zero
//! clusters (v3 flag) and unallocated clusters read as zeroes. Refused with a clear error:
//! backing files, encryption, compressed clusters, unknown incompatible features. Every
//! offset read from the file is checked against the file size before use.
//! Export writes a version 3 image with 64 KiB clusters and 16-bit refcounts, containing only
//! the clusters that are not all zero.

use std::fs::File;
use std::os::unix::fs::FileExt;

const MAGIC: u32 = 0x5146_49fb;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Why a qcow2 file was refused.
#[derive(Debug, thiserror::Error)]
pub enum QcowError {
    #[error("not a qcow2 image (bad magic)")]
    NotQcow2,
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(String),
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// An open qcow2 image for reading.
pub struct Qcow2Reader {
    file: File,
    file_len: u64,
    cluster: u64,
    size: u64,
    l1: Vec<u64>,
    v3: bool,
}

/// Whether `path` starts with the qcow2 magic.
pub fn is_qcow2(path: &std::path::Path) -> bool {
    let mut b = [0u8; 4];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut b, 0))
        .is_ok()
        && u32::from_be_bytes(b) == MAGIC
}

impl Qcow2Reader {
    /// Opens and checks the header and L1 table.
    pub fn open(path: &std::path::Path) -> Result<Self, QcowError> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut h = [0u8; 104];
        if file_len < 72 {
            return Err(QcowError::NotQcow2);
        }
        file.read_exact_at(&mut h[..72.min(file_len as usize)], 0)?;
        if be32(&h, 0) != MAGIC {
            return Err(QcowError::NotQcow2);
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(QcowError::Unsupported(format!("version {version}")));
        }
        if version == 3 {
            file.read_exact_at(&mut h, 0)?;
            let incompat = be64(&h, 72);
            // Bit 0 (dirty refcounts) does not matter for reading; anything else does.
            if incompat & !1 != 0 {
                return Err(QcowError::Unsupported(format!(
                    "incompatible features {incompat:#x}"
                )));
            }
        }
        if be64(&h, 8) != 0 {
            return Err(QcowError::Unsupported(
                "backing file (convert it to a standalone image first)".into(),
            ));
        }
        if be32(&h, 32) != 0 {
            return Err(QcowError::Unsupported("encryption".into()));
        }
        let bits = be32(&h, 20);
        if !(9..=21).contains(&bits) {
            return Err(QcowError::Corrupt(format!("cluster bits {bits}")));
        }
        let cluster = 1u64 << bits;
        let size = be64(&h, 24);
        let l1_size = u64::from(be32(&h, 36));
        let l1_off = be64(&h, 40);
        let need = size.div_ceil(cluster).div_ceil(cluster / 8);
        if l1_size < need
            || l1_size > (32 << 20)
            || l1_off.checked_add(l1_size * 8).is_none_or(|e| e > file_len)
        {
            return Err(QcowError::Corrupt(
                "L1 table outside the file or too small".into(),
            ));
        }
        let mut raw = vec![0u8; (l1_size * 8) as usize];
        file.read_exact_at(&mut raw, l1_off)?;
        let l1 = raw.chunks(8).map(|c| be64(c, 0)).collect();
        Ok(Self {
            file,
            file_len,
            cluster,
            size,
            l1,
            v3: version == 3,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Reads guest cluster `index` into `buf` (one cluster); returns false when it is
    /// unallocated or a zero cluster (buf is zeroed).
    pub fn read_cluster(
        &self,
        index: u64,
        buf: &mut [u8],
        l2_cache: &mut Option<(u64, Vec<u64>)>,
    ) -> Result<bool, QcowError> {
        buf.fill(0);
        let per_l2 = self.cluster / 8;
        let l1e = *self
            .l1
            .get((index / per_l2) as usize)
            .ok_or_else(|| QcowError::Corrupt("index past L1".into()))?;
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(false);
        }
        if l2_cache.as_ref().is_none_or(|(o, _)| *o != l2_off) {
            if l2_off
                .checked_add(self.cluster)
                .is_none_or(|e| e > self.file_len)
            {
                return Err(QcowError::Corrupt("L2 table outside the file".into()));
            }
            let mut raw = vec![0u8; self.cluster as usize];
            self.file.read_exact_at(&mut raw, l2_off)?;
            *l2_cache = Some((l2_off, raw.chunks(8).map(|c| be64(c, 0)).collect()));
        }
        let l2 = &l2_cache
            .as_ref()
            .map(|c| &c.1)
            .ok_or_else(|| QcowError::Corrupt("L2".into()))?;
        let e = l2[(index % per_l2) as usize];
        if e & (1 << 62) != 0 {
            return Err(QcowError::Unsupported(
                "compressed clusters (convert without compression first)".into(),
            ));
        }
        if self.v3 && e & 1 != 0 {
            return Ok(false);
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(false);
        }
        let avail = self.file_len.saturating_sub(off).min(self.cluster);
        if avail == 0 {
            return Err(QcowError::Corrupt("data cluster outside the file".into()));
        }
        self.file.read_exact_at(&mut buf[..avail as usize], off)?;
        Ok(true)
    }
}

/// Writes a qcow2 v3 image of `size` bytes at `path`. `read(index, buf)` fills guest cluster
/// `index` (64 KiB) and is called twice per cluster (a scan, then the copy).
pub fn write_qcow2(
    path: &std::path::Path,
    size: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), QcowError> {
    const BITS: u32 = 16;
    const CL: u64 = 1 << BITS;
    let nclusters = size.div_ceil(CL);
    let per_l2 = CL / 8;
    let l1_size = nclusters.div_ceil(per_l2).max(1);
    let mut buf = vec![0u8; CL as usize];
    // Pass 1: which clusters hold data.
    let mut nonzero = vec![false; nclusters as usize];
    for (i, nz) in nonzero.iter_mut().enumerate() {
        read(i as u64, &mut buf)?;
        *nz = buf.iter().any(|b| *b != 0);
        progress(i as u64 + 1, 2 * nclusters);
    }
    let n_data = nonzero.iter().filter(|x| **x).count() as u64;
    let n_l2 = (0..l1_size)
        .filter(|l| {
            nonzero[(l * per_l2) as usize..(((l + 1) * per_l2).min(nclusters)) as usize]
                .iter()
                .any(|x| *x)
        })
        .count() as u64;
    let l1c = (l1_size * 8).div_ceil(CL);
    let per_rb = CL / 2;
    let (mut rbc, mut rtc) = (1u64, 1u64);
    loop {
        let total = 1 + l1c + rtc + rbc + n_l2 + n_data;
        let (nrb, nrt) = (
            total.div_ceil(per_rb),
            total.div_ceil(per_rb).mul_add_ceil(),
        );
        if nrb == rbc && nrt == rtc {
            break;
        }
        (rbc, rtc) = (nrb, nrt);
    }
    let total = 1 + l1c + rtc + rbc + n_l2 + n_data;
    let l1_off = CL;
    let rt_off = l1_off + l1c * CL;
    let rb_off = rt_off + rtc * CL;
    let l2_base = rb_off + rbc * CL;
    let data_base = l2_base + n_l2 * CL;
    let file = File::create(path)?;
    file.set_len(total * CL)?;
    // Header.
    let mut h = vec![0u8; 112];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&BITS.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(
        &u32::try_from(l1_size)
            .map_err(|_| QcowError::Unsupported("too large".into()))?
            .to_be_bytes(),
    );
    h[40..48].copy_from_slice(&l1_off.to_be_bytes());
    h[48..56].copy_from_slice(&rt_off.to_be_bytes());
    h[56..60].copy_from_slice(&u32::try_from(rtc).unwrap_or(u32::MAX).to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&104u32.to_be_bytes());
    file.write_all_at(&h, 0)?;
    // Refcount table and blocks: every cluster of the file is used once.
    let mut rt = vec![0u8; (rtc * CL) as usize];
    for i in 0..rbc {
        rt[(i * 8) as usize..(i * 8 + 8) as usize]
            .copy_from_slice(&(rb_off + i * CL).to_be_bytes());
    }
    file.write_all_at(&rt, rt_off)?;
    let mut rb = vec![0u8; (rbc * CL) as usize];
    for c in 0..total {
        rb[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
    }
    file.write_all_at(&rb, rb_off)?;
    // L1, L2 and data.
    let copied = 1u64 << 63;
    let mut l1 = vec![0u8; (l1c * CL) as usize];
    let mut next_l2 = l2_base;
    let mut next_data = data_base;
    for l in 0..l1_size {
        let range = (l * per_l2)..((l + 1) * per_l2).min(nclusters);
        if !range.clone().any(|i| nonzero[i as usize]) {
            continue;
        }
        let mut l2 = vec![0u8; CL as usize];
        for i in range {
            if !nonzero[i as usize] {
                continue;
            }
            read(i, &mut buf)?;
            file.write_all_at(&buf, next_data)?;
            let j = ((i % per_l2) * 8) as usize;
            l2[j..j + 8].copy_from_slice(&(next_data | copied).to_be_bytes());
            next_data += CL;
            progress(nclusters + i + 1, 2 * nclusters);
        }
        file.write_all_at(&l2, next_l2)?;
        l1[(l * 8) as usize..(l * 8 + 8) as usize]
            .copy_from_slice(&(next_l2 | copied).to_be_bytes());
        next_l2 += CL;
    }
    file.write_all_at(&l1, l1_off)?;
    file.sync_all()?;
    Ok(())
}

trait CeilTable {
    fn mul_add_ceil(self) -> u64;
}

impl CeilTable for u64 {
    /// Refcount-table clusters needed for `self` refcount blocks.
    fn mul_add_ceil(self) -> u64 {
        (self * 8).div_ceil(1 << 16).max(1)
    }
}
