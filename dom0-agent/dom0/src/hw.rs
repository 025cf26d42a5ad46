//! dom0's side of its hardware seams (bare metal): port instructions for the drivers' `PortIo`
//! (the hypervisor performs them on the devices dom0 owns), and DMA memory with bus addresses
//! from the `DMA_MAP` hypercall (dom0 has no IOMMU: the hypervisor tells it where its buffers
//! are in host memory).
//!
//! DMA buffers come from one 2 MiB area aligned to 2 MiB: one chunk of dom0's RAM, so
//! host-contiguous, translated once at start. Buffers are handed out once (the channels keep
//! theirs for dom0's life) and never freed.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dom0_drivers::dma::{Dma, DmaBuf};
use dom0_drivers::hw::PortIo;

/// The machine's ports, as dom0 reaches them (each access exits to the hypervisor, which
/// forwards it to a device dom0 owns or answers like an empty bus).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ports;

macro_rules! port_in {
    ($port:expr, $reg:tt, $t:ty) => {{
        let v: $t;
        // SAFETY: a port access in a guest only exits to the hypervisor; it touches no memory.
        unsafe {
            core::arch::asm!(concat!("in ", $reg, ", dx"), out($reg) v, in("dx") $port, options(nomem, nostack))
        };
        v
    }};
}

macro_rules! port_out {
    ($port:expr, $reg:tt, $v:expr) => {{
        // SAFETY: as for `port_in`.
        unsafe {
            core::arch::asm!(concat!("out dx, ", $reg), in("dx") $port, in($reg) $v, options(nomem, nostack))
        };
    }};
}

impl PortIo for Ports {
    fn inb(&mut self, port: u16) -> u8 {
        port_in!(port, "al", u8)
    }
    fn outb(&mut self, port: u16, value: u8) {
        port_out!(port, "al", value)
    }
    fn inw(&mut self, port: u16) -> u16 {
        port_in!(port, "ax", u16)
    }
    fn outw(&mut self, port: u16, value: u16) {
        port_out!(port, "ax", value)
    }
    fn inl(&mut self, port: u16) -> u32 {
        port_in!(port, "eax", u32)
    }
    fn outl(&mut self, port: u16, value: u32) {
        port_out!(port, "eax", value)
    }
}

const AREA_BYTES: usize = 2 << 20;

#[repr(C, align(2097152))]
struct Area([u8; AREA_BYTES]);

static mut AREA: Area = Area([0; AREA_BYTES]);
/// Bytes of the area handed out.
static USED: AtomicUsize = AtomicUsize::new(0);
/// The area's host-physical address (0 until [`init`]).
static BUS_BASE: AtomicU64 = AtomicU64::new(0);

fn area_base() -> u64 {
    (&raw mut AREA) as u64
}

/// Asks the hypervisor where the DMA area is in host memory; `translate` answers from it.
pub fn init(
    hc: &mut pv_drivers::hypercall::Hypercalls<pv_drivers::hypercall::Vmcall>,
) -> Result<u64, pv_drivers::hypercall::HypercallError> {
    let bus = hc.dma_map(area_base(), AREA_BYTES as u64)?;
    BUS_BASE.store(bus, Ordering::Release);
    Ok(bus)
}

/// A handle on the DMA area.
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaArea;

/// A buffer in the DMA area.
#[derive(Debug)]
pub struct Buf {
    addr: u64,
    size: usize,
}

impl DmaBuf for Buf {
    fn addr(&self) -> u64 {
        self.addr
    }
    fn size(&self) -> usize {
        self.size
    }
    fn read(&self, offset: usize, out: &mut [u8]) {
        let n = out.len().min(self.size.saturating_sub(offset));
        // SAFETY: `addr + offset .. + n` is inside this buffer (clamped above), part of the
        // static DMA area that only these buffers reach, through raw pointers.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (self.addr as usize + offset) as *const u8,
                out.as_mut_ptr(),
                n,
            )
        };
    }
    fn write(&mut self, offset: usize, data: &[u8]) {
        let n = data.len().min(self.size.saturating_sub(offset));
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr as usize + offset) as *mut u8,
                n,
            )
        };
    }
}

impl Dma for DmaArea {
    type Buf = Buf;

    fn alloc(&mut self, bytes: usize, align: usize) -> Option<Buf> {
        let align = align.max(1);
        let mut start = 0;
        USED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            start = used.checked_next_multiple_of(align)?;
            let end = start.checked_add(bytes)?;
            (end <= AREA_BYTES).then_some(end)
        })
        .ok()?;
        Some(Buf {
            addr: area_base() + start as u64,
            size: bytes,
        })
    }

    fn translate(&self, addr: u64, len: usize) -> Option<u64> {
        let bus = BUS_BASE.load(Ordering::Acquire);
        let off = addr.checked_sub(area_base())?;
        (bus != 0 && off.checked_add(len as u64)? <= AREA_BYTES as u64).then(|| bus + off)
    }
}

/// COM2, the machine's second 16550 (0x2f8, passed through to dom0): dom0's management port.
/// Output only for now; each byte waits (a bounded number of polls) for the transmitter.
pub struct Com2;

impl Com2 {
    const BASE: u16 = 0x2f8;

    /// Programs 115200 baud, 8N1, FIFOs on, interrupts off.
    pub fn init() -> Com2 {
        let mut p = Ports;
        p.outb(Self::BASE + 1, 0x00);
        p.outb(Self::BASE + 3, 0x80);
        p.outb(Self::BASE, 0x01);
        p.outb(Self::BASE + 1, 0x00);
        p.outb(Self::BASE + 3, 0x03);
        p.outb(Self::BASE + 2, 0xc7);
        p.outb(Self::BASE + 4, 0x03);
        Com2
    }
}

impl core::fmt::Write for Com2 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let mut p = Ports;
        for b in s.bytes() {
            // Transmit holding register empty (LSR bit 5); a port with no UART reads 0xff.
            for _ in 0..100_000 {
                if p.inb(Self::BASE + 5) & 0x20 != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
            p.outb(Self::BASE, b);
        }
        Ok(())
    }
}

/// Every function on PCI bus 0, as dom0 sees it (the hypervisor shows it only its own and
/// their parents' function 0): functions 1-7 only of a multifunction device.
pub fn bus0_devices() -> alloc::vec::Vec<dom0_drivers::pci::PciDevice> {
    use dom0_drivers::pci::{self, Mechanism1, PciAddr};
    let mut cfg = Mechanism1::new(Ports);
    let mut found = alloc::vec::Vec::new();
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let Some(at) = PciAddr::new(0, dev, func) else {
                continue;
            };
            let Some(d) = pci::read_device(&mut cfg, at) else {
                if func == 0 {
                    break;
                }
                continue;
            };
            let multi = d.multifunction;
            found.push(d);
            if func == 0 && !multi {
                break;
            }
        }
    }
    found
}
