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
    fn pieces_split_at_chunk_boundaries() {
        let p: Vec<_> = pieces(CHUNK - 10, 30).collect();
        assert_eq!(p, vec![(0, CHUNK - 10, 0, 10), (1, 0, 10, 20)]);
        assert_eq!(pieces(5, 0).count(), 0);
    }
}
