//! What the 8254x test binaries share: a device on fake memory, the driver brought up on it,
//! and recognisable frames.

use std::sync::{Arc, Mutex};

use dom0_drivers::e1000::{E1000, E1000Error};
use dom0_drivers::hw::PollClock;
use dom0_drivers::nic::MAX_FRAME;

use super::E1000Model;
use crate::model::mem::{FakeDma, Layout, PhysMem};

pub type Driver = E1000<E1000Model, FakeDma>;

/// The address in the model's EEPROM.
pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The other end of the wire.
pub const PEER: [u8; 6] = [0x02, 0x00, 0x00, 0xAA, 0xBB, 0xCC];

/// Pages of fake memory: 4 for "the rest of dom0", 2 rings, 2 x 16 pages of buffers, spare.
pub const PAGES: usize = 64;

/// A powered-on device on fresh fake memory laid out as `layout`.
pub fn device(layout: Layout) -> (Arc<Mutex<PhysMem>>, E1000Model) {
    let mem = PhysMem::new(layout, PAGES);
    let nic = E1000Model::new(mem.clone(), MAC);
    (mem, nic)
}

/// The driver brought up on `nic`, with DMA memory from `mem`.
pub fn start(nic: &E1000Model, mem: &Arc<Mutex<PhysMem>>) -> Result<Driver, E1000Error> {
    E1000::new(nic.clone(), FakeDma::new(mem.clone()), PollClock::new(1))
}

/// A device and a driver brought up on contiguous memory, as Bochs is (RAL0 empty).
pub fn up() -> (E1000Model, Driver) {
    let (mem, nic) = device(Layout::Contiguous);
    let drv = start(&nic, &mem).unwrap();
    (nic, drv)
}

/// Frame `seq` of `len` bytes: destination, source, a local EtherType, then a pattern.
pub fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&PEER);
    f.extend_from_slice(&[0x88, 0xB5]);
    f.extend(
        (0..len.saturating_sub(14)).map(|i| (i as u32 ^ seq.wrapping_mul(0x9E37)).to_le_bytes()[0]),
    );
    f.truncate(len);
    f
}

/// The next frame the driver hands back, into a buffer of `MAX_FRAME` bytes.
pub fn recv_vec(drv: &mut Driver) -> Option<Vec<u8>> {
    let mut out = [0u8; MAX_FRAME];
    drv.recv(&mut out).map(|n| out[..n].to_vec())
}
