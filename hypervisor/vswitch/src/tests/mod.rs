//! Behaviour of the whole switch, through its public API only.

use alloc::vec::Vec;

use crate::{Frame, MacAddr, PortConfig, PortId, SendResult, Switch, SwitchConfig, VlanId};

mod behaviour;
mod limits;
mod prop;

/// A local experimental EtherType (IEEE 802 "local experimental 1").
const ETHERTYPE: u16 = 0x88b5;

fn vid(n: u16) -> VlanId {
    VlanId::new(n).unwrap()
}

/// A locally administered station address.
fn mac(n: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, n])
}

fn eth(dst: MacAddr, src: MacAddr, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn tagged(dst: MacAddr, src: MacAddr, tci: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&tci.to_be_bytes());
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn switch() -> Switch {
    Switch::new(SwitchConfig::default()).unwrap()
}

fn access(sw: &mut Switch, vlan: u16) -> PortId {
    sw.add_port(PortConfig::access(vid(vlan))).unwrap()
}

fn trunk(sw: &mut Switch, allowed: &[u16], native: Option<u16>) -> PortId {
    let allowed = allowed.iter().map(|&v| vid(v)).collect();
    sw.add_port(PortConfig::trunk(allowed, native.map(vid)))
        .unwrap()
}

fn drain(sw: &mut Switch, port: PortId) -> Vec<Frame> {
    core::iter::from_fn(|| sw.recv(port)).collect()
}

fn accepted(queued: usize) -> SendResult {
    SendResult::Accepted { queued, full: 0 }
}
