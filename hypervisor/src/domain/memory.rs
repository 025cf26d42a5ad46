//! Guest memory as the hypervisor reaches it: the `hv-guest-mem` layer (checked guest-physical
//! addresses, copies, never Rust references; RAM as host regions), shared with the loader and
//! the virtio device models, plus the guest page walk the exit dispatcher needs.
//!
//! A domain's RAM is a list of 2 MiB host chunks mapped at guest-physical 0, in order, each a
//! [`Region`] of its [`RegionRam`].

/// Size of one RAM chunk.
pub const CHUNK: u64 = 2 << 20;

pub use hv_guest_mem::{GuestAddr, GuestMemory, MemError, Region, RegionRam, VecGuestMemory};

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
        mem.read(GuestAddr(table + index * 8), &mut e).ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_refuse_overflow_and_out_of_range() {
        let m = VecGuestMemory::new(0, 4096);
        assert!(m.check(GuestAddr(0), 4096).is_ok());
        assert!(m.check(GuestAddr(1), 4096).is_err());
        assert!(m.check(GuestAddr(u64::MAX), 2).is_err());
        let mut b = [0u8; 8];
        assert!(m.read(GuestAddr(4090), &mut b).is_err());
    }

    #[test]
    fn guest_page_walk() {
        let m = VecGuestMemory::new(0, 1 << 20);
        let put =
            |m: &VecGuestMemory, at: u64, v: u64| m.write(GuestAddr(at), &v.to_le_bytes()).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000: [0] -> PD 0x3000, [3] = 1 GiB page at 0xc000_0000.
        put(&m, 0x1000, 0x2000 | 3);
        put(&m, 0x2000, 0x3000 | 3);
        put(&m, 0x2000 + 3 * 8, 0xc000_0000 | 0x83);
        // PD[0] -> PT 0x4000; PD[1] = 2 MiB page at 0x60_0000.
        put(&m, 0x3000, 0x4000 | 3);
        put(&m, 0x3008, 0x60_0000 | 0x83);
        // PT[5] -> 0x9000.
        put(&m, 0x4000 + 5 * 8, 0x9000 | 3);
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
        put(&m, 0x2000 + 8, 0xdead_b000 | 3);
        assert_eq!(translate(&m, 0x1000, 0x4000_0000), None);
    }
}
