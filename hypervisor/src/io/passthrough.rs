//! Devices dom0 owns: port ranges passed through to the hardware, and PCI configuration space
//! filtered so that dom0 sees only its own devices.
//!
//! dom0 drives the physical disk and NIC controllers itself. Their I/O ports are forwarded
//! ([`PortPassthrough`]: each IN or OUT in a passed range is performed on the real port), and
//! configuration mechanism #1 (ports 0xCF8 and 0xCFC..0xCFF) goes through [`PciFilter`]: dom0
//! writes its own address register, and a data access reaches the real configuration space
//! only for a function [`owned`] by dom0 (mass storage or network controllers). For every
//! other function reads give all ones and writes are dropped, except that dom0 sees the
//! identity and header type of function 0 of a device with an owned function, so that it can
//! find the others (multifunction bit). COM2 goes to dom0 too (its management line). The
//! hypervisor keeps COM1, the PIT, the PICs, the LAPICs, the IOAPIC and every other device.
//!
//! The real accesses go through [`HostPorts`]: the port instructions on bare metal, a model in
//! host tests. The address register and the data port are one pair on the machine; a lock
//! around each configuration access (held by the caller's [`HostPorts`]) keeps them together.

use alloc::vec::Vec;

use super::IoEvent;
use super::ports::PortDevice;

/// The machine's ports, as the hypervisor reaches them.
pub trait HostPorts: Send {
    /// IN of `size` (1, 2 or 4) bytes.
    fn read(&mut self, port: u16, size: u8) -> u32;
    /// OUT of `size` bytes.
    fn write(&mut self, port: u16, size: u8, value: u32);
    /// One configuration-space dword access through 0xCF8/0xCFC, under the machine's lock
    /// for that pair: `address` is the CF8 value (enable bit set), `write` the value to store,
    /// and the dword read is returned (for a write, what was there before is not needed).
    fn config(&mut self, address: u32, offset: u8, size: u8, write: Option<u32>) -> u32;
}

/// A range of real ports forwarded as they are.
pub struct PortPassthrough<H> {
    base: u16,
    host: H,
}

impl<H: HostPorts> PortPassthrough<H> {
    pub fn new(base: u16, host: H) -> Self {
        PortPassthrough { base, host }
    }
}

impl<H: HostPorts> PortDevice for PortPassthrough<H> {
    fn read(&mut self, offset: u16, size: u8) -> u32 {
        self.host.read(self.base.wrapping_add(offset), size)
    }

    fn write(&mut self, offset: u16, size: u8, value: u32) -> IoEvent {
        self.host.write(self.base.wrapping_add(offset), size, value);
        IoEvent::None
    }
}

/// A function on the PCI bus: bus, device (0..32), function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    /// From a CF8 address register value (bits 23..16 bus, 15..11 device, 10..8 function).
    pub fn from_address(a: u32) -> Bdf {
        Bdf {
            bus: (a >> 16) as u8,
            dev: ((a >> 11) & 0x1f) as u8,
            func: ((a >> 8) & 7) as u8,
        }
    }

    pub fn address(self, reg: u8) -> u32 {
        (1 << 31)
            | (u32::from(self.bus) << 16)
            | (u32::from(self.dev) << 11)
            | (u32::from(self.func) << 8)
            | u32::from(reg & 0xfc)
    }
}

/// Whether dom0 owns a function of this class (its class register's top byte): mass storage
/// (0x01) and network (0x02) controllers.
pub fn owned(class_dword: u32) -> bool {
    matches!(class_dword >> 24, 0x01 | 0x02)
}

/// A function dom0 owns, as [`scan`] found it: where its registers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedFunction {
    pub bdf: Bdf,
    /// Vendor (low 16 bits) and device (high 16 bits).
    pub id: u32,
    /// The class register (class, subclass, prog-if, revision).
    pub class: u32,
    /// Port ranges (base, count): its I/O BARs, and the legacy ports of an IDE controller in
    /// compatibility mode.
    pub ports: Vec<(u16, u16)>,
    /// Memory BARs (base, size in bytes), as the firmware placed them; a BAR that is not
    /// placed (base 0) is left out.
    pub mmio: Vec<(u64, u64)>,
}

/// Largest I/O BAR passed through (a PC's devices have at most 256 ports per BAR).
const MAX_IO_BAR: u32 = 256;

/// Finds every function of bus 0 dom0 owns ([`owned`]) and sizes its BARs (each BAR is
/// sized with decode switched off in the command register, then restored, so a device never
/// decodes at the all-ones address meanwhile). Run once, before dom0 starts, while nothing
/// drives these devices.
pub fn scan(host: &mut impl HostPorts) -> Vec<OwnedFunction> {
    let mut found = Vec::new();
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let f = Bdf { bus: 0, dev, func };
            let id = host.config(f.address(0), 0, 4, None);
            if id == u32::MAX || id == 0 {
                if func == 0 {
                    break;
                }
                continue;
            }
            let class = host.config(f.address(0x08), 0, 4, None);
            let header = host.config(f.address(0x0c), 0, 4, None);
            // Only ordinary functions (header type 0) have six BARs; bridges are never owned.
            if owned(class) && (header >> 16) & 0x7f == 0 {
                found.push(size_bars(host, f, id, class));
            }
            if func == 0 && header & (1 << 23) == 0 {
                break;
            }
        }
    }
    found
}

/// The BARs of one function (header type 0).
fn size_bars(host: &mut impl HostPorts, f: Bdf, id: u32, class: u32) -> OwnedFunction {
    let mut ports = Vec::new();
    if class >> 16 == 0x0101 {
        // Compatibility mode (prog-if bits 0 and 2 clear): the legacy ports.
        if class & (1 << 8) == 0 {
            ports.extend([(0x1f0, 8), (0x3f6, 1)]);
        }
        if class & (1 << 10) == 0 {
            ports.extend([(0x170, 8), (0x376, 1)]);
        }
    }
    let mut mmio = Vec::new();
    let cmd = host.config(f.address(0x04), 0, 2, None);
    host.config(f.address(0x04), 0, 2, Some(cmd & !0b11));
    let mut bar = 0u8;
    while bar < 6 {
        let reg = 0x10 + bar * 4;
        let v = host.config(f.address(reg), 0, 4, None);
        host.config(f.address(reg), 0, 4, Some(u32::MAX));
        let mask = host.config(f.address(reg), 0, 4, None);
        host.config(f.address(reg), 0, 4, Some(v));
        bar += 1;
        if v & 1 == 1 {
            let size = (!(mask & 0xffff_fffc)).wrapping_add(1) & 0xffff;
            let base = v & 0xfffc;
            if base != 0 && size != 0 && size <= MAX_IO_BAR {
                ports.push((base as u16, size as u16));
            }
            continue;
        }
        let wide = (v >> 1) & 3 == 2;
        let (mut base, mut lanes) = (u64::from(v & !0xf), u64::from(mask & !0xf));
        if wide && bar < 6 {
            let hreg = 0x10 + bar * 4;
            let hv = host.config(f.address(hreg), 0, 4, None);
            host.config(f.address(hreg), 0, 4, Some(u32::MAX));
            let hmask = host.config(f.address(hreg), 0, 4, None);
            host.config(f.address(hreg), 0, 4, Some(hv));
            bar += 1;
            base |= u64::from(hv) << 32;
            lanes |= u64::from(hmask) << 32;
        } else {
            // A 32-bit BAR decodes nothing above 4 GiB.
            lanes |= 0xffff_ffff_0000_0000;
        }
        let size = (!lanes).wrapping_add(1);
        if base != 0 && lanes != 0 && size != 0 && size.is_power_of_two() {
            mmio.push((base, size));
        }
    }
    host.config(f.address(0x04), 0, 2, Some(cmd));
    OwnedFunction {
        bdf: f,
        id,
        class,
        ports,
        mmio,
    }
}

/// Ports the hypervisor keeps whatever a BAR says: the first 256 (PICs, PIT, keyboard
/// controller, CMOS), COM1, and PCI configuration (always through [`PciFilter`]).
const KEPT_PORTS: [(u32, u32); 3] = [(0, 0x100), (0x3f8, 0x400), (0xcf8, 0xd00)];

/// The port ranges of `owned` and `extra` that may reach the hardware without an exit: each
/// range overlapping [`KEPT_PORTS`] is left out (it keeps exiting), so a firmware's odd BAR
/// never hands dom0 the hypervisor's own devices.
pub fn direct_ports(owned: &[OwnedFunction], extra: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = owned
        .iter()
        .flat_map(|o| o.ports.iter().copied())
        .chain(extra.iter().copied())
        .collect();
    out.retain(|&(b, n)| {
        let (lo, hi) = (u32::from(b), u32::from(b) + u32::from(n));
        KEPT_PORTS.iter().all(|&(klo, khi)| hi <= klo || lo >= khi)
    });
    out
}

/// Functions whose ownership [`PciFilter`] remembers.
const MAX_CACHED: usize = 256;

/// dom0's view of configuration mechanism #1, on ports 0xCF8..0xCFF (register it there with
/// 8 ports).
pub struct PciFilter<H> {
    host: H,
    /// dom0's address register (only dword writes to 0xCF8 set it, as on the chipset).
    address: u32,
    /// Functions dom0 owns, found when first asked (class read from the real space).
    owned: Vec<(Bdf, bool)>,
    /// Accesses refused (a function dom0 does not own).
    pub hidden: u64,
}

impl<H: HostPorts> PciFilter<H> {
    pub fn new(host: H) -> Self {
        PciFilter {
            host,
            address: 0,
            owned: Vec::new(),
            hidden: 0,
        }
    }

    fn is_owned(&mut self, f: Bdf) -> bool {
        if let Some(&(_, o)) = self.owned.iter().find(|(b, _)| *b == f) {
            return o;
        }
        let class = self.host.config(f.address(0x08), 0, 4, None);
        // An absent function reads all ones (class 0xff): not owned.
        let o = class != u32::MAX && owned(class);
        // The cache is bounded (dom0 may probe every function of every bus); beyond it the
        // class is read again each time, which costs a configuration access, not memory.
        if self.owned.len() < MAX_CACHED {
            self.owned.push((f, o));
        }
        o
    }

    /// Whether `f` is function 0 of a device with a function dom0 owns.
    fn is_parent(&mut self, f: Bdf) -> bool {
        if f.func != 0 {
            return false;
        }
        // Only look further when function 0 says multifunction (header type bit 7).
        let header = self.host.config(f.address(0x0c), 0, 4, None);
        header != u32::MAX
            && header & (1 << 23) != 0
            && (1..8).any(|func| self.is_owned(Bdf { func, ..f }))
    }

    fn data(&mut self, offset: u16, size: u8, write: Option<u32>) -> u32 {
        let a = self.address;
        if a & (1 << 31) == 0 {
            return u32::MAX;
        }
        let f = Bdf::from_address(a);
        let reg = (a & 0xfc) as u8;
        let lane = (offset & 3) as u8;
        if self.is_owned(f) {
            return self.host.config(f.address(reg), lane, size, write);
        }
        // Function 0 of a device dom0 has a function of: identity and header type, read-only.
        if write.is_none() && matches!(reg, 0x00 | 0x0c) && self.is_parent(f) {
            return self.host.config(f.address(reg), lane, size, None);
        }
        self.hidden += 1;
        u32::MAX
    }
}

impl<H: HostPorts> PortDevice for PciFilter<H> {
    fn read(&mut self, offset: u16, size: u8) -> u32 {
        match offset {
            0..=3 if size == 4 && offset == 0 => self.address,
            0..=3 => u32::MAX,
            _ => self.data(offset - 4, size, None),
        }
    }

    fn write(&mut self, offset: u16, size: u8, value: u32) -> IoEvent {
        match offset {
            0 if size == 4 => self.address = value & 0x80ff_fffc,
            0..=3 => {}
            _ => {
                self.data(offset - 4, size, Some(value));
            }
        }
        IoEvent::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::PortBus;
    use alloc::boxed::Box;
    use alloc::collections::BTreeMap;
    use alloc::sync::Arc;
    use spin::Mutex;

    /// A machine: a few PCI functions' config dwords and a port log.
    #[derive(Default)]
    struct Machine {
        config: BTreeMap<(Bdf, u8), u32>,
        /// BAR registers with writable address bits (this mask); the other bits keep their
        /// value (the type bits, and the zeros that give the size).
        bar_masks: BTreeMap<(Bdf, u8), u32>,
        ports: Vec<(u16, u8, Option<u32>)>,
    }

    #[derive(Clone, Default)]
    struct Host(Arc<Mutex<Machine>>);

    impl HostPorts for Host {
        fn read(&mut self, port: u16, size: u8) -> u32 {
            self.0.lock().ports.push((port, size, None));
            0x5a
        }
        fn write(&mut self, port: u16, size: u8, value: u32) {
            self.0.lock().ports.push((port, size, Some(value)));
        }
        fn config(&mut self, address: u32, offset: u8, size: u8, write: Option<u32>) -> u32 {
            let f = Bdf::from_address(address);
            let reg = (address & 0xfc) as u8;
            let mut m = self.0.lock();
            let d = m.config.get(&(f, reg)).copied().unwrap_or(u32::MAX);
            if let Some(v) = write {
                let shift = u32::from(offset) * 8;
                let mask = match size {
                    1 => 0xff,
                    2 => 0xffff,
                    _ => u32::MAX,
                } << shift;
                let mut stored = (d & !mask) | ((v << shift) & mask);
                if let Some(&writable) = m.bar_masks.get(&(f, reg)) {
                    stored = (stored & writable) | (d & !writable);
                }
                m.config.insert((f, reg), stored);
                return 0;
            }
            let v = d >> (u32::from(offset) * 8);
            match size {
                1 => v & 0xff,
                2 => v & 0xffff,
                _ => v,
            }
        }
    }

    const HOST_BRIDGE: Bdf = Bdf {
        bus: 0,
        dev: 0,
        func: 0,
    };
    const ISA: Bdf = Bdf {
        bus: 0,
        dev: 1,
        func: 0,
    };
    const IDE: Bdf = Bdf {
        bus: 0,
        dev: 1,
        func: 1,
    };
    const NIC: Bdf = Bdf {
        bus: 0,
        dev: 3,
        func: 0,
    };

    fn machine() -> Host {
        let h = Host::default();
        let mut m = h.0.lock();
        for (f, id, class, header) in [
            (HOST_BRIDGE, 0x1237_8086, 0x0600_0002, 0),
            (ISA, 0x7000_8086, 0x0601_0000, 0x0080_0000),
            (IDE, 0x7010_8086, 0x0101_8000, 0),
            (NIC, 0x100e_8086, 0x0200_0003, 0),
        ] {
            m.config.insert((f, 0x00), id);
            m.config.insert((f, 0x08), class);
            m.config.insert((f, 0x0c), header);
            m.config.insert((f, 0x04), 0);
            for bar in 0..6 {
                m.config.insert((f, 0x10 + bar * 4), 0);
            }
            m.config.insert((f, 0x20), 0xc001);
        }
        drop(m);
        h
    }

    fn bus(h: &Host) -> PortBus {
        let mut b = PortBus::default();
        b.register(0xcf8, 8, Box::new(PciFilter::new(h.clone())))
            .unwrap();
        b.register(0x1f0, 8, Box::new(PortPassthrough::new(0x1f0, h.clone())))
            .unwrap();
        b
    }

    fn cfg_read(b: &mut PortBus, f: Bdf, reg: u8) -> u32 {
        b.access(0xcf8, 4, false, f.address(reg));
        match b.access(0xcfc, 4, true, 0) {
            crate::io::PortAction::Read(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dom0_sees_its_controllers_and_nothing_else() {
        let h = machine();
        let mut b = bus(&h);
        assert_eq!(cfg_read(&mut b, IDE, 0), 0x7010_8086);
        assert_eq!(cfg_read(&mut b, IDE, 0x20), 0xc001);
        assert_eq!(cfg_read(&mut b, NIC, 0x08), 0x0200_0003);
        assert_eq!(
            cfg_read(&mut b, HOST_BRIDGE, 0),
            u32::MAX,
            "host bridge hidden"
        );
        assert_eq!(cfg_read(&mut b, HOST_BRIDGE, 0x08), u32::MAX);
        // The ISA bridge (function 0 of the IDE's device): identity and header type only.
        assert_eq!(cfg_read(&mut b, ISA, 0), 0x7000_8086);
        assert_eq!(cfg_read(&mut b, ISA, 0x0c), 0x0080_0000);
        assert_eq!(
            cfg_read(&mut b, ISA, 0x08),
            u32::MAX,
            "its class stays hidden"
        );
        assert_eq!(cfg_read(&mut b, ISA, 0x20), u32::MAX);
    }

    #[test]
    fn writes_reach_only_owned_functions() {
        let h = machine();
        let mut b = bus(&h);
        // Bus mastering on the IDE controller (a 16-bit write to the command register).
        b.access(0xcf8, 4, false, IDE.address(0x04));
        b.access(0xcfc, 2, false, 0x0005);
        assert_eq!(h.0.lock().config.get(&(IDE, 0x04)), Some(&0x0005));
        // A write to the ISA bridge (even its identity) and to the host bridge is dropped.
        for f in [ISA, HOST_BRIDGE] {
            b.access(0xcf8, 4, false, f.address(0x00));
            b.access(0xcfc, 4, false, 0);
            b.access(0xcf8, 4, false, f.address(0x40));
            b.access(0xcfe, 1, false, 0xff);
        }
        assert_eq!(h.0.lock().config.get(&(ISA, 0x00)), Some(&0x7000_8086));
        assert_eq!(h.0.lock().config.get(&(HOST_BRIDGE, 0x40)), None);
    }

    #[test]
    fn the_address_register_is_dom0s_own() {
        let h = machine();
        let mut b = bus(&h);
        // Byte writes to 0xCF8 do not set the address (as on the chipset); reads give it back.
        b.access(0xcf8, 4, false, IDE.address(0x08) | 3);
        assert_eq!(
            b.access(0xcf8, 4, true, 0),
            crate::io::PortAction::Read(IDE.address(0x08))
        );
        b.access(0xcf9, 1, false, 0x06);
        assert_eq!(
            b.access(0xcf8, 4, true, 0),
            crate::io::PortAction::Read(IDE.address(0x08))
        );
        // Disabled address: no access at all.
        b.access(0xcf8, 4, false, 0x0000_0800);
        assert_eq!(
            b.access(0xcfc, 4, true, 0),
            crate::io::PortAction::Read(u32::MAX)
        );
        // A byte read at 0xCFE takes the third byte of the dword.
        b.access(0xcf8, 4, false, IDE.address(0x08));
        assert_eq!(
            b.access(0xcfe, 1, true, 0),
            crate::io::PortAction::Read(0x01)
        );
        assert_eq!(
            b.access(0xcfd, 2, true, 0),
            crate::io::PortAction::Read(0x0180)
        );
    }

    #[test]
    fn scan_finds_owned_functions_and_sizes_their_bars() {
        let h = machine();
        {
            let mut m = h.0.lock();
            // The NIC: a 128 KiB memory BAR and a 64-port I/O BAR, decoding on.
            m.config.insert((NIC, 0x04), 0x0007);
            m.config.insert((NIC, 0x10), 0xfebc_0000);
            m.bar_masks.insert((NIC, 0x10), !(0x2_0000 - 1));
            m.config.insert((NIC, 0x14), 0xc041);
            m.bar_masks.insert((NIC, 0x14), !(0x40 - 1));
            m.config.insert((NIC, 0x20), 0);
            // The IDE controller: its bus-master BAR (16 ports) at BAR 4.
            m.bar_masks.insert((IDE, 0x20), !(0x10 - 1));
            m.config.insert((IDE, 0x20), 0xc001);
        }
        let found = scan(&mut h.clone());
        let bdfs: Vec<Bdf> = found.iter().map(|o| o.bdf).collect();
        assert_eq!(bdfs, vec![IDE, NIC], "bridges are not owned");
        assert_eq!(
            found[0].ports,
            vec![
                (0x1f0, 8),
                (0x3f6, 1),
                (0x170, 8),
                (0x376, 1),
                (0xc000, 0x10)
            ]
        );
        assert!(found[0].mmio.is_empty());
        assert_eq!(found[1].ports, vec![(0xc040, 0x40)]);
        assert_eq!(found[1].mmio, vec![(0xfebc_0000, 0x2_0000)]);
        assert_eq!(found[1].id, 0x100e_8086);
        // Sizing left every BAR and the command register as they were.
        let m = h.0.lock();
        assert_eq!(m.config.get(&(NIC, 0x10)), Some(&0xfebc_0000));
        assert_eq!(m.config.get(&(NIC, 0x14)), Some(&0xc041));
        assert_eq!(m.config.get(&(NIC, 0x04)), Some(&0x0007));
    }

    #[test]
    fn scan_reads_64_bit_bars_as_one() {
        let h = machine();
        {
            let mut m = h.0.lock();
            m.config.insert((NIC, 0x20), 0);
            // A 64-bit prefetchable BAR of 16 KiB at 0x1_8000_0000, in BARs 0 and 1.
            m.config.insert((NIC, 0x10), 0x8000_000c);
            m.config.insert((NIC, 0x14), 0x1);
            m.bar_masks.insert((NIC, 0x10), !(0x4000 - 1));
            m.bar_masks.insert((NIC, 0x14), u32::MAX);
            // An unplaced 32-bit BAR (base 0) is left out.
            m.config.insert((NIC, 0x18), 0);
            m.bar_masks.insert((NIC, 0x18), !(0x1000 - 1));
        }
        let found = scan(&mut h.clone());
        let nic = found.iter().find(|o| o.bdf == NIC).expect("the NIC");
        assert_eq!(nic.mmio, vec![(0x1_8000_0000, 0x4000)]);
        assert!(nic.ports.is_empty());
    }

    #[test]
    fn direct_ports_never_include_the_hypervisors_own() {
        let f = |ports: Vec<(u16, u16)>| OwnedFunction {
            bdf: NIC,
            id: 0,
            class: 0x0200_0000,
            ports,
            mmio: Vec::new(),
        };
        let owned = [
            f(vec![(0x1f0, 8), (0x3f6, 1), (0xc000, 0x40)]),
            // Odd BARs: over COM1, over PCI configuration, over the PIT.
            f(vec![(0x3f0, 0x10), (0xcf0, 0x10), (0x40, 4)]),
        ];
        assert_eq!(
            direct_ports(&owned, &[(0x2f8, 8)]),
            vec![(0x1f0, 8), (0x3f6, 1), (0xc000, 0x40), (0x2f8, 8)]
        );
    }

    #[test]
    fn passed_ports_reach_the_hardware() {
        let h = machine();
        let mut b = bus(&h);
        assert_eq!(
            b.access(0x1f7, 1, true, 0),
            crate::io::PortAction::Read(0x5a)
        );
        b.access(0x1f6, 1, false, 0xe0);
        b.access(0x1f0, 2, false, 0xbeef);
        let log = h.0.lock().ports.clone();
        assert_eq!(
            log,
            vec![
                (0x1f7, 1, None),
                (0x1f6, 1, Some(0xe0)),
                (0x1f0, 2, Some(0xbeef))
            ]
        );
        // A port outside every passed range never reaches the hardware.
        b.access(0x1f8, 1, false, 1);
        assert_eq!(h.0.lock().ports.len(), 3);
    }
}
