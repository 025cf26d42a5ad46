//! Finding and enabling 8254x functions on a fake configuration space: the 82540EM as Bochs
//! presents it (BAR0 128 KiB of memory, BAR1 64 ports), next to functions that must be left
//! alone (an 82574, another vendor's NIC, an IDE controller).

use std::collections::BTreeMap;

use dom0_drivers::e1000::probe::{self, DEVICE_IDS, MMIO_SIZE, PciFunction, ProbeError};
use dom0_drivers::pci::{self, PciAddr, PciConfig, reg};

/// One function: its header, and for each BAR the mask of address bits it implements
/// (0: no BAR) and its type bits.
#[derive(Clone)]
struct Func {
    regs: [u32; 64],
    bar_mask: [u32; 6],
    /// Command bits the function can hold (others read back 0).
    command_mask: u16,
}

impl Func {
    fn new(vendor: u16, device: u16, class: u32) -> Self {
        let mut regs = [0u32; 64];
        regs[0] = u32::from(device) << 16 | u32::from(vendor);
        regs[2] = class << 8;
        regs[15] = 0x0000_010B; // INTA#, line 11
        Self {
            regs,
            bar_mask: [0; 6],
            command_mask: 0x07,
        }
    }

    fn mem_bar(mut self, i: usize, addr: u32, size: u32) -> Self {
        self.bar_mask[i] = !(size - 1);
        self.regs[4 + i] = addr;
        self
    }

    fn io_bar(mut self, i: usize, port: u32, size: u32) -> Self {
        self.bar_mask[i] = !(size - 1) & 0xFFFF;
        self.regs[4 + i] = port | 1;
        self
    }

    fn command(&self) -> u16 {
        (self.regs[1] & 0xFFFF) as u16
    }
}

#[derive(Default)]
struct Space {
    funcs: BTreeMap<PciAddr, Func>,
    writes: Vec<(PciAddr, u8, u32)>,
}

impl PciConfig for Space {
    fn read32(&mut self, at: PciAddr, offset: u8) -> u32 {
        self.funcs
            .get(&at)
            .map_or(u32::MAX, |f| f.regs[usize::from(offset / 4)])
    }

    fn write32(&mut self, at: PciAddr, offset: u8, value: u32) {
        self.writes.push((at, offset, value));
        let Some(f) = self.funcs.get_mut(&at) else {
            return;
        };
        let i = usize::from(offset / 4);
        match i {
            1 => f.regs[1] = (f.regs[1] & 0xFFFF_0000) | (value & u32::from(f.command_mask)),
            4..=9 => {
                let b = i - 4;
                let type_bits = f.regs[i] & if f.regs[i] & 1 == 1 { 0x3 } else { 0xF };
                f.regs[i] = (value & f.bar_mask[b]) | type_bits;
                if f.bar_mask[b] == 0 {
                    f.regs[i] = 0;
                }
            }
            _ => {}
        }
    }
}

fn at(dev: u8) -> PciAddr {
    PciAddr::new(0, dev, 0).unwrap()
}

const NET: u32 = 0x02_00_00;

fn machine() -> Space {
    let mut s = Space::default();
    s.funcs.insert(at(1), Func::new(0x8086, 0x7010, 0x01_01_80));
    s.funcs.insert(
        at(2),
        Func::new(0x8086, 0x10D3, NET).mem_bar(0, 0xFEB0_0000, 0x2_0000),
    );
    s.funcs.insert(
        at(3),
        Func::new(0x10EC, 0x8139, NET).io_bar(0, 0xC100, 0x100),
    );
    s.funcs.insert(
        at(4),
        Func::new(0x8086, 0x100E, NET)
            .mem_bar(0, 0xFEBC_0000, 0x2_0000)
            .io_bar(1, 0xC040, 64),
    );
    s.funcs.insert(
        at(5),
        Func::new(0x8086, 0x100F, NET).mem_bar(0, 0xFEA0_0000, 0x2_0000),
    );
    s
}

#[test]
fn only_supported_8254x_functions_are_found() {
    let mut s = machine();
    let devices = pci::enumerate(&mut s);
    assert_eq!(devices.len(), 5);
    let found: Vec<(PciAddr, u16)> = probe::find(&devices).map(|d| (d.addr, d.device)).collect();
    assert_eq!(found, vec![(at(4), 0x100E), (at(5), 0x100F)]);
    assert!(probe::is_supported(0x8086, 0x100E));
    for excluded in [0x10D3, 0x1004, 0x1076, 0x1019, 0x100C, 0x1000] {
        assert!(!probe::is_supported(0x8086, excluded), "{excluded:#06x}");
    }
    assert!(!probe::is_supported(0x10EC, 0x100E));
    let mut ids: Vec<u16> = DEVICE_IDS.iter().map(|&(id, _)| id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), DEVICE_IDS.len(), "no ID listed twice");
}

#[test]
fn enabling_the_82540em_gives_its_windows_and_turns_on_decode_and_mastering() {
    let mut s = machine();
    let devices = pci::enumerate(&mut s);
    let dev = probe::find(&devices).next().unwrap().clone();
    let f = probe::enable(&mut s, &dev).unwrap();
    assert_eq!(
        f,
        PciFunction {
            addr: at(4),
            device: 0x100E,
            mmio_base: 0xFEBC_0000,
            mmio_size: MMIO_SIZE,
            io_base: Some(0xC040),
            interrupt: (11, 1),
        }
    );
    assert_eq!(
        s.funcs[&at(4)].command(),
        reg::CMD_IO | reg::CMD_MEMORY | reg::CMD_BUS_MASTER
    );
    // BARs as they were.
    assert_eq!(s.funcs[&at(4)].regs[4], 0xFEBC_0000);
    assert_eq!(s.funcs[&at(4)].regs[5], 0xC041);
}

#[test]
fn without_an_io_bar_io_decode_stays_off() {
    let mut s = machine();
    let devices = pci::enumerate(&mut s);
    let dev = devices.iter().find(|d| d.addr == at(5)).unwrap();
    let f = probe::enable(&mut s, dev).unwrap();
    assert_eq!(f.io_base, None);
    assert_eq!(
        s.funcs[&at(5)].command(),
        reg::CMD_MEMORY | reg::CMD_BUS_MASTER
    );
}

#[test]
fn unusable_functions_are_refused_and_left_untouched() {
    let mut s = machine();
    // BAR0 unassigned, and a function whose BAR0 is too small.
    s.funcs.insert(
        at(6),
        Func::new(0x8086, 0x100E, NET).mem_bar(0, 0, 0x2_0000),
    );
    s.funcs.insert(
        at(7),
        Func::new(0x8086, 0x100E, NET).mem_bar(0, 0xFE00_0000, 0x1000),
    );
    // Registers fine, but bus mastering will not stick.
    let mut stubborn = Func::new(0x8086, 0x100E, NET).mem_bar(0, 0xFD00_0000, 0x2_0000);
    stubborn.command_mask = 0x03;
    s.funcs.insert(at(8), stubborn);
    let devices = pci::enumerate(&mut s);
    let get = |dev: u8| devices.iter().find(|d| d.addr == at(dev)).unwrap().clone();

    s.writes.clear();
    assert_eq!(
        probe::enable(&mut s, &get(2)),
        Err(ProbeError::Unsupported {
            vendor: 0x8086,
            device: 0x10D3
        })
    );
    assert_eq!(probe::enable(&mut s, &get(6)), Err(ProbeError::NoRegisters));
    assert_eq!(probe::enable(&mut s, &get(7)), Err(ProbeError::NoRegisters));
    assert!(s.writes.is_empty(), "nothing written to refused functions");
    assert_eq!(
        probe::enable(&mut s, &get(8)),
        Err(ProbeError::NotEnabled(reg::CMD_MEMORY))
    );
}
