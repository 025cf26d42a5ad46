//! Guest memory as the hypervisor reaches it: by copies through checked guest-physical
//! addresses, never through Rust references (the guest may change it at any moment).
//!
//! A domain's RAM is a list of 2 MiB host chunks mapped at guest-physical 0, in order.

use alloc::vec::Vec;

/// Size of one RAM chunk.
pub const CHUNK: u64 = 2 << 20;

/// A guest-physical address: an allegation until [`GuestMemory`] has checked it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuestPhysAddr(pub u64);

/// The guest named memory it does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadGpa(pub u64);

/// Byte access to guest RAM.
pub trait GuestMemory {
    /// Bytes of guest RAM (from guest-physical 0).
    fn size(&self) -> u64;
    fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), BadGpa>;
    fn write(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), BadGpa>;

    /// Checks that `[gpa, gpa + len)` is inside RAM.
    fn check(&self, gpa: GuestPhysAddr, len: u64) -> Result<(), BadGpa> {
        match gpa.0.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(BadGpa(gpa.0)),
        }
    }

    fn zero(&mut self, gpa: GuestPhysAddr, len: u64) -> Result<(), BadGpa> {
        self.check(gpa, len)?;
        let zeros = [0u8; 512];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(512);
            self.write(GuestPhysAddr(gpa.0 + done), &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// Splits `[gpa, gpa + len)` into pieces that each stay inside one chunk:
/// `(chunk index, offset in chunk, offset in buffer, length)`.
pub fn pieces(gpa: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize, usize)> {
    let mut done = 0usize;
    core::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = gpa + done as u64;
        let off = at % CHUNK;
        let n = ((CHUNK - off) as usize).min(len - done);
        let piece = ((at / CHUNK) as usize, off, done, n);
        done += n;
        Some(piece)
    })
}

/// Guest-virtual to guest-physical through the guest's own 4-level page tables at `cr3`
/// (SDM Vol. 3A §4.5), for reading the instruction behind an exit. Permissions are not checked
/// (the hypervisor only reads); 1 GiB and 2 MiB pages are followed. `None` when a level is not
/// present or a table lies outside the guest's RAM.
pub fn translate(mem: &impl GuestMemory, cr3: u64, gva: u64) -> Option<u64> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR;
    for level in (0..4u32).rev() {
        let index = (gva >> (12 + 9 * level)) & 511;
        let mut e = [0u8; 8];
        mem.read(GuestPhysAddr(table + index * 8), &mut e).ok()?;
        let e = u64::from_le_bytes(e);
        if e & 1 == 0 {
            return None;
        }
        if level == 0 || ((level == 1 || level == 2) && e & 0x80 != 0) {
            let size = 1u64 << (12 + 9 * level);
            return Some((e & ADDR & !(size - 1)) | (gva & (size - 1)));
        }
        table = e & ADDR;
    }
    None
}

/// Plain memory standing in for guest RAM in host tests.
#[derive(Clone, Debug)]
pub struct VecMemory(pub Vec<u8>);

impl GuestMemory for VecMemory {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), BadGpa> {
        self.check(gpa, buf.len() as u64)?;
        buf.copy_from_slice(&self.0[gpa.0 as usize..gpa.0 as usize + buf.len()]);
        Ok(())
    }
    fn write(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), BadGpa> {
        self.check(gpa, data.len() as u64)?;
        self.0[gpa.0 as usize..gpa.0 as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_refuse_overflow_and_out_of_range() {
        let m = VecMemory(vec![0; 4096]);
        assert!(m.check(GuestPhysAddr(0), 4096).is_ok());
        assert_eq!(m.check(GuestPhysAddr(1), 4096), Err(BadGpa(1)));
        assert_eq!(m.check(GuestPhysAddr(u64::MAX), 2), Err(BadGpa(u64::MAX)));
        let mut b = [0u8; 8];
        assert!(m.read(GuestPhysAddr(4090), &mut b).is_err());
    }

    #[test]
    fn guest_page_walk() {
        let mut m = VecMemory(vec![0; 1 << 20]);
        let put = |m: &mut VecMemory, at: u64, v: u64| {
            m.write(GuestPhysAddr(at), &v.to_le_bytes()).unwrap()
        };
        // PML4 at 0x1000 -> PDPT 0x2000: [0] -> PD 0x3000, [3] = 1 GiB page at 0xc000_0000.
        put(&mut m, 0x1000, 0x2000 | 3);
        put(&mut m, 0x2000, 0x3000 | 3);
        put(&mut m, 0x2000 + 3 * 8, 0xc000_0000 | 0x83);
        // PD[0] -> PT 0x4000; PD[1] = 2 MiB page at 0x60_0000.
        put(&mut m, 0x3000, 0x4000 | 3);
        put(&mut m, 0x3008, 0x60_0000 | 0x83);
        // PT[5] -> 0x9000.
        put(&mut m, 0x4000 + 5 * 8, 0x9000 | 3);
        assert_eq!(translate(&m, 0x1000, 0x5123), Some(0x9123));
        assert_eq!(translate(&m, 0x1000, 0x20_0042), Some(0x60_0042));
        assert_eq!(translate(&m, 0x1000, 0xfec0_0010), Some(0xfec0_0010));
        assert_eq!(translate(&m, 0x1000, 0x6000), None, "PT entry not present");
        assert_eq!(
            translate(&m, 0x1000, 0x8000_0000),
            None,
            "PDPT entry not present"
        );
        // A page-table pointer outside RAM is not followed.
        put(&mut m, 0x2000 + 8, 0xdead_b000 | 3);
        assert_eq!(translate(&m, 0x1000, 0x4000_0000), None);
    }

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let p: Vec<_> = pieces(CHUNK - 10, 30).collect();
        assert_eq!(p, vec![(0, CHUNK - 10, 0, 10), (1, 0, 10, 20)]);
        assert_eq!(pieces(5, 0).count(), 0);
    }
}
