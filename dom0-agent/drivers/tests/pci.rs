//! PCI enumeration, BAR sizing and the command register against a fake configuration space
//! shaped like the i440FX machine of Bochs and QEMU, plus a bridge and a second bus.

// Register fields, patterns and offsets in these tests are small by construction, or are
// meant to keep only their low bits.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;

use dom0_drivers::ata::{Channel, ChannelPorts};
use dom0_drivers::hw::PortIo;
use dom0_drivers::pci::{
    self, Bar, CONFIG_ADDRESS, CONFIG_DATA, Mechanism1, PciAddr, PciConfig, reg,
};

#[derive(Debug, Clone, Copy)]
enum Spec {
    None,
    Io { size: u32, decode16: bool },
    Mem32 { size: u32, prefetch: bool },
    Mem64 { size: u64, prefetch: bool },
    Mem64Hi { size: u64 },
}

#[derive(Debug, Clone)]
struct Func {
    regs: [u32; 64],
    specs: [Spec; 6],
    /// A BAR written with all ones while the function decoded its space.
    decode_violation: bool,
    /// Writes outside the command register and the BARs the header type has.
    stray_writes: Vec<u8>,
}

/// Status bits that are write-1-to-clear.
const RW1C: u32 = 0xF900_0000;

impl Func {
    fn new(id: u32, class: u32, header: u8) -> Self {
        let mut regs = [0u32; 64];
        regs[0] = id;
        regs[2] = class;
        regs[3] = u32::from(header) << 16;
        // Status: capabilities list, fast back-to-back, DEVSEL medium, and a received
        // master abort (write-1-to-clear) that nobody has cleared.
        regs[1] = 0x2290_0001;
        Self {
            regs,
            specs: [Spec::None; 6],
            decode_violation: false,
            stray_writes: Vec::new(),
        }
    }

    fn bar(mut self, i: usize, spec: Spec, value: u64) -> Self {
        self.specs[i] = spec;
        self.regs[4 + i] = value as u32;
        if let Spec::Mem64 { size, .. } = spec {
            self.specs[i + 1] = Spec::Mem64Hi { size };
            self.regs[5 + i] = (value >> 32) as u32;
        }
        self.regs[4 + i] = self.bar_value(i, self.regs[4 + i]);
        self
    }

    fn bar_count(&self) -> usize {
        match (self.regs[3] >> 16) & 0x7F {
            0 => 6,
            1 => 2,
            _ => 0,
        }
    }

    fn bar_value(&self, i: usize, v: u32) -> u32 {
        match self.specs[i] {
            Spec::None => 0,
            Spec::Io { size, decode16 } => {
                (v & !(size - 1) & if decode16 { 0xFFFF } else { !0 }) | 1
            }
            Spec::Mem32 { size, prefetch } => (v & !(size - 1)) | if prefetch { 8 } else { 0 },
            Spec::Mem64 { size, prefetch } => {
                (v & !((size - 1) as u32) & !0xF) | 4 | if prefetch { 8 } else { 0 }
            }
            Spec::Mem64Hi { size } => v & (!(size - 1) >> 32) as u32,
        }
    }

    fn read(&self, off: u8) -> u32 {
        self.regs[usize::from(off / 4)]
    }

    fn write(&mut self, off: u8, v: u32) {
        let i = usize::from(off / 4);
        if i == 1 {
            let status = (self.regs[1] & 0xFFFF_0000) & !(v & RW1C);
            self.regs[1] = status | (v & 0x0407);
        } else if (4..4 + self.bar_count()).contains(&i) {
            if v == u32::MAX && self.regs[1] & 3 != 0 {
                self.decode_violation = true;
            }
            self.regs[i] = self.bar_value(i - 4, v);
        } else {
            self.stray_writes.push(off);
        }
    }
}

#[derive(Clone)]
struct Bus(BTreeMap<(u8, u8, u8), Func>);

impl PciConfig for Bus {
    fn read32(&mut self, at: PciAddr, offset: u8) -> u32 {
        self.0
            .get(&(at.bus(), at.dev(), at.func()))
            .map_or(u32::MAX, |f| f.read(offset))
    }

    fn write32(&mut self, at: PciAddr, offset: u8, value: u32) {
        if let Some(f) = self.0.get_mut(&(at.bus(), at.dev(), at.func())) {
            f.write(offset, value);
        }
    }
}

/// The same space behind configuration mechanism #1.
struct Ports {
    bus: Bus,
    address: u32,
}

impl Ports {
    fn target(&self) -> Option<(PciAddr, u8)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let at = PciAddr::new(
            (a >> 16) as u8,
            ((a >> 11) & 0x1F) as u8,
            ((a >> 8) & 7) as u8,
        )?;
        Some((at, (a & 0xFC) as u8))
    }
}

impl PortIo for Ports {
    fn inb(&mut self, port: u16) -> u8 {
        panic!("inb({port:#x})")
    }
    fn outb(&mut self, port: u16, _: u8) {
        panic!("outb({port:#x})")
    }
    fn inw(&mut self, port: u16) -> u16 {
        panic!("inw({port:#x})")
    }
    fn outw(&mut self, port: u16, _: u16) {
        panic!("outw({port:#x})")
    }
    fn inl(&mut self, port: u16) -> u32 {
        assert_eq!(port, CONFIG_DATA);
        match self.target() {
            Some((at, off)) => self.bus.read32(at, off),
            None => u32::MAX,
        }
    }
    fn outl(&mut self, port: u16, value: u32) {
        match port {
            CONFIG_ADDRESS => self.address = value,
            CONFIG_DATA => {
                if let Some((at, off)) = self.target() {
                    self.bus.write32(at, off, value);
                }
            }
            _ => panic!("outl({port:#x})"),
        }
    }
}

fn machine() -> Bus {
    let mut m = BTreeMap::new();
    m.insert((0, 0, 0), Func::new(0x1237_8086, 0x0600_0002, 0x00));
    m.insert((0, 1, 0), Func::new(0x7000_8086, 0x0601_0000, 0x80));
    m.insert(
        (0, 1, 1),
        Func::new(0x7010_8086, 0x0101_8000, 0x00).bar(
            4,
            Spec::Io {
                size: 16,
                decode16: true,
            },
            0xC000,
        ),
    );
    m.insert((0, 1, 3), Func::new(0x7113_8086, 0x0680_0003, 0x00));
    m.insert(
        (0, 2, 0),
        Func::new(0x1111_1234, 0x0300_0002, 0x00)
            .bar(
                0,
                Spec::Mem32 {
                    size: 16 << 20,
                    prefetch: true,
                },
                0xE000_0000,
            )
            .bar(
                2,
                Spec::Mem32 {
                    size: 4096,
                    prefetch: false,
                },
                0xFEBF_0000,
            ),
    );
    m.insert(
        (0, 3, 0),
        Func::new(0x100E_8086, 0x0200_0003, 0x00)
            .bar(
                0,
                Spec::Mem64 {
                    size: 128 << 10,
                    prefetch: false,
                },
                0x1_2340_0000,
            )
            .bar(
                2,
                Spec::Io {
                    size: 64,
                    decode16: true,
                },
                0xC040,
            ),
    );
    // A single-function device whose other function numbers must not be looked at.
    m.insert((0, 4, 0), Func::new(0x0001_1AF4, 0x0200_0000, 0x00));
    m.insert((0, 4, 1), Func::new(0xDEAD_BEEF, 0x0200_0000, 0x00));
    // A PCI-to-PCI bridge to bus 2: two BARs, then its bus numbers at 0x18.
    let mut bridge = Func::new(0x0001_1B36, 0x0604_0000, 0x01).bar(
        0,
        Spec::Mem32 {
            size: 4096,
            prefetch: false,
        },
        0xFEB0_0000,
    );
    bridge.regs[6] = 0x0002_0200;
    m.insert((0, 5, 0), bridge);
    m.insert(
        (0, 6, 0),
        Func::new(0x0002_1AF4, 0x0180_0000, 0x00).bar(
            2,
            Spec::Mem64 {
                size: 8 << 30,
                prefetch: true,
            },
            0x8_0000_0000,
        ),
    );
    m.insert(
        (2, 0, 0),
        Func::new(0x1001_1AF4, 0x0100_0000, 0x00).bar(
            0,
            Spec::Io {
                size: 64,
                decode16: false,
            },
            0xD000,
        ),
    );
    m.insert((255, 31, 0), Func::new(0x0003_1AF4, 0x0880_0000, 0x00));
    Bus(m)
}

fn at(bus: u8, dev: u8, func: u8) -> PciAddr {
    PciAddr::new(bus, dev, func).unwrap()
}

#[test]
fn enumeration_finds_every_function_on_every_bus() {
    let mut bus = machine();
    let found = pci::enumerate(&mut bus);
    let ids: Vec<(PciAddr, u16, u16)> =
        found.iter().map(|d| (d.addr, d.vendor, d.device)).collect();
    assert_eq!(
        ids,
        [
            (at(0, 0, 0), 0x8086, 0x1237),
            (at(0, 1, 0), 0x8086, 0x7000),
            (at(0, 1, 1), 0x8086, 0x7010),
            (at(0, 1, 3), 0x8086, 0x7113),
            (at(0, 2, 0), 0x1234, 0x1111),
            (at(0, 3, 0), 0x8086, 0x100E),
            (at(0, 4, 0), 0x1AF4, 0x0001),
            (at(0, 5, 0), 0x1B36, 0x0001),
            (at(0, 6, 0), 0x1AF4, 0x0002),
            (at(2, 0, 0), 0x1AF4, 0x1001),
            (at(255, 31, 0), 0x1AF4, 0x0003),
        ]
    );
    let ide = &found[2];
    assert_eq!(
        (ide.class, ide.subclass, ide.prog_if, ide.revision),
        (1, 1, 0x80, 0)
    );
    assert!(found[1].multifunction && !ide.multifunction);
    assert_eq!(found[7].header_type, 1);
}

#[test]
fn bars_are_sized_and_left_as_they_were() {
    let before = machine();
    let mut bus = machine();
    let found = pci::enumerate(&mut bus);
    let by = |a: PciAddr| found.iter().find(|d| d.addr == a).unwrap();

    assert_eq!(
        by(at(0, 1, 1)).bars[4],
        Bar::Io {
            port: 0xC000,
            size: 16
        }
    );
    assert_eq!(by(at(0, 1, 1)).bars[..4], [Bar::None; 4]);
    let vga = by(at(0, 2, 0));
    assert_eq!(
        vga.bars[0],
        Bar::Memory {
            addr: 0xE000_0000,
            size: 16 << 20,
            prefetchable: true,
            wide: false
        }
    );
    assert_eq!(
        vga.bars[2],
        Bar::Memory {
            addr: 0xFEBF_0000,
            size: 4096,
            prefetchable: false,
            wide: false
        }
    );
    let nic = by(at(0, 3, 0));
    assert_eq!(
        nic.bars[0],
        Bar::Memory {
            addr: 0x1_2340_0000,
            size: 128 << 10,
            prefetchable: false,
            wide: true
        }
    );
    assert_eq!(nic.bars[1], Bar::None, "the upper half of the 64-bit BAR");
    assert_eq!(
        nic.bars[2],
        Bar::Io {
            port: 0xC040,
            size: 64
        }
    );
    assert_eq!(
        by(at(0, 6, 0)).bars[2],
        Bar::Memory {
            addr: 0x8_0000_0000,
            size: 8 << 30,
            prefetchable: true,
            wide: true
        }
    );
    assert_eq!(
        by(at(2, 0, 0)).bars[0],
        Bar::Io {
            port: 0xD000,
            size: 64
        }
    );
    let bridge = by(at(0, 5, 0));
    assert_eq!(
        bridge.bars[0],
        Bar::Memory {
            addr: 0xFEB0_0000,
            size: 4096,
            prefetchable: false,
            wide: false
        }
    );

    for (key, f) in &bus.0 {
        let old = &before.0[key];
        assert_eq!(f.regs, old.regs, "{key:?}: registers restored");
        assert!(!f.decode_violation, "{key:?}: BAR sized while decoding");
        assert!(
            f.stray_writes.is_empty(),
            "{key:?}: wrote {:x?}",
            f.stray_writes
        );
    }
}

#[test]
fn the_ide_controller_is_found_and_its_channels_located() {
    let mut bus = machine();
    let found = pci::enumerate(&mut bus);
    let ide = pci::find(&found, pci::CLASS_STORAGE, pci::SUBCLASS_IDE).unwrap();
    assert_eq!(ide.addr, at(0, 1, 1));
    assert!(pci::find(&found, 0x01, 0x06).is_none());
    assert_eq!(
        ChannelPorts::from_pci(ide, Channel::Primary),
        Some(ChannelPorts::PRIMARY.with_bus_master(0xC000))
    );
    assert_eq!(
        ChannelPorts::from_pci(ide, Channel::Secondary),
        Some(ChannelPorts::SECONDARY.with_bus_master(0xC008))
    );
    // Not an IDE controller.
    assert_eq!(ChannelPorts::from_pci(&found[0], Channel::Primary), None);

    // Native mode: the ports come from BAR0-3; without prog-if bit 7 no bus master.
    let mut native = ide.clone();
    native.prog_if = 0x05;
    native.bars[0] = Bar::Io {
        port: 0xC100,
        size: 8,
    };
    native.bars[1] = Bar::Io {
        port: 0xC108,
        size: 4,
    };
    assert_eq!(
        ChannelPorts::from_pci(&native, Channel::Primary),
        Some(ChannelPorts {
            command: 0xC100,
            control: 0xC10A,
            bus_master: None
        })
    );
    assert_eq!(
        ChannelPorts::from_pci(&native, Channel::Secondary),
        None,
        "BAR2/3 missing"
    );
    // A bus-master BAR firmware never assigned is not used.
    let mut unassigned = ide.clone();
    unassigned.bars[4] = Bar::Io { port: 0, size: 16 };
    assert_eq!(
        ChannelPorts::from_pci(&unassigned, Channel::Primary),
        Some(ChannelPorts::PRIMARY)
    );
}

#[test]
fn enabling_bus_mastering_keeps_the_rest_of_the_command_and_status() {
    let mut bus = machine();
    let ide = at(0, 1, 1);
    let command = pci::enable(&mut bus, ide, reg::CMD_IO | reg::CMD_BUS_MASTER);
    assert_eq!(command, 0x0005);
    let regs = bus.0[&(0, 1, 1)].regs[1];
    assert_eq!(
        regs, 0x2290_0005,
        "the write-1-to-clear status bit survives"
    );
    assert_eq!(pci::enable(&mut bus, ide, reg::CMD_MEMORY), 0x0007);
}

#[test]
fn mechanism1_reaches_the_same_space_through_ports() {
    let mut direct = machine();
    let expected = pci::enumerate(&mut direct);
    let mut cfg = Mechanism1::new(Ports {
        bus: machine(),
        address: 0,
    });
    assert_eq!(pci::enumerate(&mut cfg), expected);
    assert_eq!(cfg.read16(at(0, 1, 1), reg::ID + 2), 0x7010);
    assert_eq!(cfg.read8(at(0, 1, 1), reg::CLASS + 3), 0x01);
    let ide = at(0, 1, 1);
    assert_eq!(pci::enable(&mut cfg, ide, reg::CMD_BUS_MASTER), 0x0005);
    let ports = cfg.into_inner();
    assert_eq!(ports.bus.0[&(0, 1, 1)].regs, {
        let mut r = machine().0[&(0, 1, 1)].regs;
        r[1] |= 4;
        r
    });
}
