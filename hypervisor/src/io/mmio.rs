//! The MMIO bus: device ranges inside a hole of guest-physical space that is not RAM. Accesses
//! reach it through EPT violations, decoded by the exit dispatcher.

use alloc::boxed::Box;
use core::ops::Range;

use super::bus::{Bus, Overlap};
use hv_guest_mem::GuestMemory;

/// Guest-physical 3–4 GiB: never RAM (domains' RAM sits below it), where MMIO devices go, as on
/// a PC (the local APIC at 0xfee0_0000, the IOAPIC at 0xfec0_0000).
pub const DEVICE_HOLE: Range<u64> = 0xc000_0000..0x1_0000_0000;

/// A device on the MMIO bus.
pub trait MmioDevice: Send {
    /// A load of `size` (1, 2, 4 or 8) bytes at `offset` in the device's range.
    fn read(&mut self, offset: u64, size: u8) -> u64;
    /// A store of `size` bytes (`value` holds only those bytes). `mem` is the domain's RAM,
    /// for devices that act on guest memory when a register is written (a virtio queue
    /// notification).
    fn write(&mut self, mem: &dyn GuestMemory, offset: u64, size: u8, value: u64);
}

/// An access outside every device and outside the hole: not I/O at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotMmio;

pub struct MmioBus {
    bus: Bus<Box<dyn MmioDevice>>,
    hole: Range<u64>,
}

fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

impl MmioBus {
    /// A bus whose unclaimed addresses inside `hole` answer like an empty bus.
    pub fn new(hole: Range<u64>) -> Self {
        MmioBus {
            bus: Bus::default(),
            hole,
        }
    }

    /// Puts `device` at `range`, which must lie inside the hole and overlap no other device.
    pub fn register(
        &mut self,
        range: Range<u64>,
        device: Box<dyn MmioDevice>,
    ) -> Result<(), Overlap> {
        if range.start < self.hole.start || range.end > self.hole.end {
            return Err(Overlap {
                new: range,
                existing: self.hole.clone(),
            });
        }
        self.bus.register(range, device)
    }

    /// Whether `gpa` is MMIO (a device's, or unclaimed inside the hole).
    pub fn handles(&self, gpa: u64) -> bool {
        self.hole.contains(&gpa) || self.bus.claims(gpa)
    }

    pub fn read(&mut self, gpa: u64, size: u8) -> Result<u64, NotMmio> {
        match self.bus.find(gpa, u64::from(size)) {
            Some((d, offset)) => Ok(d.read(offset, size) & mask(size)),
            None if self.hole.contains(&gpa) => Ok(mask(size)),
            None => Err(NotMmio),
        }
    }

    pub fn write(
        &mut self,
        mem: &dyn GuestMemory,
        gpa: u64,
        size: u8,
        value: u64,
    ) -> Result<(), NotMmio> {
        match self.bus.find(gpa, u64::from(size)) {
            Some((d, offset)) => {
                d.write(mem, offset, size, value & mask(size));
                Ok(())
            }
            None if self.hole.contains(&gpa) => Ok(()),
            None => Err(NotMmio),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::sync::Arc;
    use core::sync::atomic::{AtomicU64, Ordering};

    /// A 16-byte register file that records the last store.
    struct Regs(Arc<AtomicU64>);

    impl MmioDevice for Regs {
        fn read(&mut self, offset: u64, _size: u8) -> u64 {
            0x1122_3344_5566_7788 >> (offset * 8)
        }
        fn write(&mut self, _mem: &dyn GuestMemory, offset: u64, size: u8, value: u64) {
            self.0.store(
                (offset << 56) | (u64::from(size) << 48) | value,
                Ordering::Relaxed,
            );
        }
    }

    #[test]
    fn devices_the_hole_and_outside() {
        let last = Arc::new(AtomicU64::new(0));
        let mut m = MmioBus::new(0xc000_0000..0x1_0000_0000);
        m.register(0xd000_0000..0xd000_0010, Box::new(Regs(last.clone())))
            .unwrap();
        assert!(
            m.register(0xd000_0008..0xd000_1000, Box::new(Regs(last.clone())))
                .is_err()
        );
        assert!(
            m.register(0x8000_0000..0x8000_1000, Box::new(Regs(last.clone())))
                .is_err(),
            "outside the hole"
        );
        assert_eq!(m.read(0xd000_0000, 4), Ok(0x5566_7788));
        assert_eq!(m.read(0xd000_0002, 2), Ok(0x5566));
        let ram = hv_guest_mem::VecGuestMemory::new(0, 4096);
        m.write(&ram, 0xd000_0004, 1, 0x1ff).unwrap();
        assert_eq!(last.load(Ordering::Relaxed), (4 << 56) | (1 << 48) | 0xff);
        // Unclaimed inside the hole: all ones, stores dropped.
        assert_eq!(m.read(0xfee0_0000, 4), Ok(0xffff_ffff));
        assert_eq!(m.write(&ram, 0xfee0_0000, 8, 1), Ok(()));
        // Outside the hole and every device: not MMIO.
        assert_eq!(m.read(0x2000_0000, 4), Err(NotMmio));
        assert!(!m.handles(0x2000_0000) && m.handles(0xc000_0000));
    }
}
