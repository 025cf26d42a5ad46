//! dom0's uplink (bare metal): the bridge between the machine's NIC and a network's virtual
//! switch in the hypervisor.
//!
//! dom0 drives the NIC (an 8254x, "e1000", through `dom0-drivers`) in promiscuous mode and
//! attaches an uplink port to the switch of the network named by `uplink=NETWORK` on its
//! module line (`NET_UPLINK`: a trunk carrying every VLAN, VLAN 1 untagged). Each
//! [`Bridge::pump`] moves frames both ways, a bounded number per call: every frame the NIC
//! received goes into the switch (`NET_SEND`), which learns the senders beyond the wire on
//! the uplink and delivers to the guests the frames are for; every frame the switch queued
//! for the uplink (flooded, or for a station learned beyond the wire) goes out on the NIC
//! (`NET_RECV`, then the NIC's transmit ring). The NIC is polled: dom0's wait for guests'
//! requests is bounded ([`POLL_US`]) while a bridge runs, and frames the switch queues for the
//! uplink end the wait at once.
//!
//! The NIC's registers are its memory BAR, which the hypervisor maps uncached into dom0's
//! address space at its own address ([`Mmio`]); its descriptor rings and buffers are in
//! dom0's DMA area ([`crate::hw::DmaArea`]).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use dom0_drivers::e1000::{self, E1000, Regs};
use dom0_drivers::hw::PollClock;
use dom0_drivers::nic::MAX_FRAME;
use dom0_drivers::pci::{Mechanism1, PciAddr};
use pv_drivers::hypercall::{Hypercalls, Vmcall};

use crate::hw::{DmaArea, Ports};

/// How long dom0 waits for guests' requests, at most, while it bridges: the NIC's polling
/// period.
pub const POLL_US: u64 = 1000;

/// Frames moved each way by one [`Bridge::pump`], at most (the NIC's rings hold 32).
const BATCH: usize = 32;

/// The NIC's registers: its memory BAR, mapped uncached at its own address.
pub struct Mmio {
    base: u64,
    size: u64,
}

impl Regs for Mmio {
    fn read32(&mut self, offset: u32) -> u32 {
        let offset = u64::from(offset & !3);
        if offset + 4 > self.size {
            return u32::MAX;
        }
        // SAFETY: `base..base + size` is the NIC's register BAR, which the hypervisor maps
        // (uncached) into dom0's EPT at this address and dom0's page tables map 1:1; the
        // offset is inside it and dword-aligned; no Rust object lives there.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write32(&mut self, offset: u32, value: u32) {
        let offset = u64::from(offset & !3);
        if offset + 4 > self.size {
            return;
        }
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }
}

/// The NIC and the uplink it is bridged to.
pub struct Bridge {
    nic: E1000<Mmio, DmaArea>,
    handle: u64,
    /// Where frames pass through dom0 (the hypervisor reads and writes it by address).
    buf: Vec<u8>,
    /// Frames from the wire into the switch, and from the switch onto the wire.
    pub from_wire: u64,
    pub to_wire: u64,
    /// Frames for the wire dropped because the NIC's transmit ring was full.
    pub wire_full: u64,
}

/// The first 8254x on bus 0, enabled; `Ok(None)` if the machine has none.
fn find_nic() -> Result<Option<(PciAddr, e1000::probe::PciFunction)>, String> {
    let mut cfg = Mechanism1::new(Ports);
    let devices = crate::hw::bus0_devices();
    let Some(d) = e1000::probe::find(&devices).next() else {
        return Ok(None);
    };
    let f = e1000::probe::enable(&mut cfg, d).map_err(|e| format!("NIC {}: {e}", d.addr))?;
    Ok(Some((d.addr, f)))
}

impl Bridge {
    /// Starts the machine's NIC and attaches it to network `network` as its uplink; returns
    /// the bridge and a line for dom0's console. `Ok(None)` when the machine has no NIC.
    pub fn start(
        hc: &mut Hypercalls<Vmcall>,
        network: &str,
    ) -> Result<Option<(Bridge, String)>, String> {
        let Some((at, f)) = find_nic()? else {
            return Ok(None);
        };
        let regs = Mmio {
            base: f.mmio_base,
            size: f.mmio_size,
        };
        let mut nic =
            E1000::new(regs, DmaArea, PollClock::new(1)).map_err(|e| format!("NIC {at}: {e}"))?;
        let handle = hc
            .net_uplink(network.as_ptr() as u64, network.len() as u64)
            .map_err(|e| format!("NET_UPLINK {network} refused: {e:?}"))?;
        let [a, b, c, d, e, g] = nic.mac();
        let line = format!(
            "NIC {at} (8086:{:04x}, registers at {:#x}): MAC {a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}, link {}; bridged to network {network} (uplink {handle})",
            f.device,
            f.mmio_base,
            if nic.link_up() { "up" } else { "down" },
        );
        Ok(Some((
            Bridge {
                nic,
                handle,
                buf: alloc::vec![0; 2048],
                from_wire: 0,
                to_wire: 0,
                wire_full: 0,
            },
            line,
        )))
    }

    /// Moves what waits each way, at most [`BATCH`] frames each; returns how many moved.
    pub fn pump(&mut self, hc: &mut Hypercalls<Vmcall>) -> usize {
        let mut moved = 0;
        let at = self.buf.as_mut_ptr() as u64;
        for _ in 0..BATCH {
            let Some(n) = self.nic.recv(&mut self.buf) else {
                break;
            };
            // Refused frames (malformed, a forged source) are the switch's to count.
            let _ = hc.net_send(self.handle, at, n as u64);
            self.from_wire += 1;
            moved += 1;
        }
        for _ in 0..BATCH {
            let n = match hc.net_recv(self.handle, at, self.buf.len() as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => n as usize,
            };
            let frame = &self.buf[..n.min(MAX_FRAME)];
            match self.nic.send(frame) {
                Ok(()) => self.to_wire += 1,
                Err(_) => self.wire_full += 1,
            }
            moved += 1;
        }
        moved
    }
}
