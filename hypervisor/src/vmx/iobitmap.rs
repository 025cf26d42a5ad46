//! VMX I/O bitmaps (SDM Vol. 3C §25.6.4): one bit per port, bitmap A for ports 0x0000-0x7fff
//! and bitmap B for 0x8000-0xffff, in two consecutive 4 KiB pages; a set bit makes an IN or
//! OUT of that port exit, and an access exits when any port it covers has its bit set (or it
//! wraps past 0xffff). Every domain's accesses exit ([`IoBitmaps::ALL_EXIT`]) except dom0's
//! to the ports of the devices it owns, which reach the hardware directly: each such access
//! would otherwise be an exit the hypervisor answers by doing the same access itself.
//!
//! The CPU reads the pages by physical address while the guest runs; the hypervisor's memory
//! is identity-mapped, so a bitmap's address is its physical address. Pure: host-tested.

/// The two pages, A then B.
#[repr(C, align(4096))]
#[derive(Clone)]
pub struct IoBitmaps {
    bits: [u8; 8192],
}

impl IoBitmaps {
    /// Every port exits.
    pub const ALL_EXIT: IoBitmaps = IoBitmaps { bits: [0xff; 8192] };

    /// Lets the guest reach `[base, base + count)` directly (ports past 0xffff are ignored).
    pub fn pass(&mut self, base: u16, count: u16) {
        for p in u32::from(base)..(u32::from(base) + u32::from(count)).min(0x1_0000) {
            self.bits[(p / 8) as usize] &= !(1 << (p % 8));
        }
    }

    /// Whether an access of `size` bytes at `port` exits.
    pub fn exits(&self, port: u16, size: u8) -> bool {
        let end = u32::from(port) + u32::from(size.max(1));
        end > 0x1_0000
            || (u32::from(port)..end).any(|p| self.bits[(p / 8) as usize] & (1 << (p % 8)) != 0)
    }

    /// Bitmap A's address (B follows it).
    pub fn address(&self) -> u64 {
        self.bits.as_ptr() as u64
    }
}

/// The bitmaps of every domain without direct ports.
pub static ALL_EXIT: IoBitmaps = IoBitmaps::ALL_EXIT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_ranges_and_nothing_else_reach_the_hardware() {
        let mut b = IoBitmaps::ALL_EXIT;
        assert!(b.exits(0x1f0, 1) && b.exits(0xffff, 1));
        b.pass(0x1f0, 8);
        b.pass(0xc040, 0x40);
        b.pass(0xfffe, 8);
        for p in 0x1f0..0x1f8 {
            assert!(!b.exits(p, 1), "{p:#x}");
        }
        assert!(b.exits(0x1ef, 1) && b.exits(0x1f8, 1));
        assert!(!b.exits(0x1f0, 4) && !b.exits(0x1f4, 4));
        // A dword straddling the end of the range exits.
        assert!(b.exits(0x1f6, 4));
        // Bitmap B.
        assert!(!b.exits(0xc040, 4) && !b.exits(0xc07c, 4));
        assert!(b.exits(0xc03f, 1) && b.exits(0xc080, 1));
        // Ports past 0xffff are not passed, and an access wrapping there exits.
        assert!(!b.exits(0xfffe, 2));
        assert!(b.exits(0xffff, 2));
        // The page layout: bit 0x1f0 of A, bit 0x4040 of B.
        assert_eq!(b.bits[0x1f0 / 8], 0);
        assert_eq!(b.bits[4096 + 0x4040 / 8], 0);
        assert_eq!(b.address() % 4096, 0);
    }
}
