//! Ports: their ids, their kinds (access or trunk) and what each kind lets in and out, and
//! their counters.

use crate::frame::{MacAddr, tci_priority, tci_vid};
use crate::vlan::{VlanId, VlanSet};

/// A port's name while it is attached. Ids are never reused: a slot freed by
/// [`crate::Switch::remove_port`] comes back with a new generation, so a stale id names no
/// port (until the 32-bit generation of that one slot wraps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId {
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

/// What a port carries.
// One per attached port, built once and never moved on the frame path: an inline 512-byte
// VLAN bitmap costs a few hundred bytes per access port and saves a pointer chase per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// One VLAN, untagged both ways: frames from the port belong to the VLAN, frames to it
    /// leave without a tag. Tagged frames from it are refused (`vlan_denied`), except
    /// priority-tagged ones (VID 0), which belong to the VLAN like untagged ones.
    Access(VlanId),
    /// Several VLANs, 802.1Q-tagged: tagged frames belong to the VLAN their tag names and must
    /// be in `allowed`; untagged (and priority-tagged) frames belong to `native`, or are
    /// refused when there is none. Frames leave tagged, except on the native VLAN, which
    /// leaves untagged (802.1Q's untagged set). dom0's uplink is a trunk.
    Trunk {
        /// The VLANs the port carries. Must contain `native`.
        allowed: VlanSet,
        /// The VLAN of untagged frames.
        native: Option<VlanId>,
    },
}

impl PortKind {
    /// Whether frames of `vlan` may enter or leave through this port.
    pub fn carries(&self, vlan: VlanId) -> bool {
        match self {
            PortKind::Access(v) => *v == vlan,
            PortKind::Trunk { allowed, .. } => allowed.contains(vlan),
        }
    }

    /// The VLAN of a frame arriving with the 802.1Q TCI `tci` (`None`: untagged) and the
    /// priority bits it keeps, or `None` when the port refuses it.
    pub(crate) fn classify(&self, tci: Option<u16>) -> Option<(VlanId, u16)> {
        let priority = tci.map_or(0, tci_priority);
        let vid = tci.map_or(0, tci_vid);
        let vlan = match self {
            PortKind::Access(v) => (vid == 0).then_some(*v)?,
            PortKind::Trunk { allowed, native } => {
                let vlan = if vid == 0 {
                    (*native)?
                } else {
                    VlanId::new(vid)?
                };
                allowed.contains(vlan).then_some(vlan)?
            }
        };
        Some((vlan, priority))
    }

    /// The TCI a frame of `vlan` (with `priority` bits) leaves this port with, or `None` when
    /// it leaves untagged. Only asked for VLANs the port carries.
    pub(crate) fn egress_tci(&self, vlan: VlanId, priority: u16) -> Option<u16> {
        match self {
            PortKind::Access(_) => None,
            PortKind::Trunk { native, .. } if *native == Some(vlan) => None,
            PortKind::Trunk { .. } => Some(priority | vlan.get()),
        }
    }
}

/// How to attach a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Access or trunk, and its VLANs.
    pub kind: PortKind,
    /// The one source address the port may send from (a guest's virtio-net MAC); `None` for a
    /// port that carries many stations, such as dom0's uplink. Must be a station address.
    pub mac: Option<MacAddr>,
}

impl PortConfig {
    /// An access port on `vlan`, no bound MAC.
    pub fn access(vlan: VlanId) -> PortConfig {
        PortConfig {
            kind: PortKind::Access(vlan),
            mac: None,
        }
    }

    /// A trunk port carrying `allowed`, untagged frames on `native`; no bound MAC.
    pub fn trunk(allowed: VlanSet, native: Option<VlanId>) -> PortConfig {
        PortConfig {
            kind: PortKind::Trunk { allowed, native },
            mac: None,
        }
    }

    /// The same port, bound to source address `mac` (anti-spoofing).
    pub fn with_mac(mut self, mac: MacAddr) -> PortConfig {
        self.mac = Some(mac);
        self
    }
}

/// One port's counters. `rx` is what the switch accepted from the port, `tx` what the port
/// took with [`crate::Switch::recv`]; every frame offered by the port is counted exactly once,
/// in `rx_frames`, `malformed`, `spoofed` or `vlan_denied`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames accepted from the port.
    pub rx_frames: u64,
    /// Their bytes, as the port sent them.
    pub rx_bytes: u64,
    /// Frames delivered to the port.
    pub tx_frames: u64,
    /// Their bytes, as the port received them.
    pub tx_bytes: u64,
    /// Frames from the port with a source address it may not use: not its bound MAC, or a
    /// group or all-zero address (on any port).
    pub spoofed: u64,
    /// Frames from the port too short, too long, or with a cut-off tag.
    pub malformed: u64,
    /// Frames from the port on a VLAN it does not carry (or untagged on a trunk with no native
    /// VLAN, or tagged on an access port).
    pub vlan_denied: u64,
    /// Frames for the port lost because its egress queue was full: refused on arrival, or
    /// pushed out by a sender holding less of the queue (see the crate docs, "Fairness").
    pub dropped_full: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u16) -> VlanId {
        VlanId::new(n).unwrap()
    }

    #[test]
    fn access_classify() {
        let p = PortKind::Access(v(10));
        assert_eq!(p.classify(None), Some((v(10), 0)));
        assert_eq!(p.classify(Some(0xe000)), Some((v(10), 0xe000)));
        assert_eq!(p.classify(Some(10)), None);
        assert_eq!(p.egress_tci(v(10), 0xe000), None);
    }

    #[test]
    fn trunk_classify() {
        let allowed: VlanSet = [v(10), v(20)].into_iter().collect();
        let no_native = PortKind::Trunk {
            allowed: allowed.clone(),
            native: None,
        };
        assert_eq!(no_native.classify(None), None);
        assert_eq!(no_native.classify(Some(0x2000)), None);
        assert_eq!(no_native.classify(Some(0x2014)), Some((v(20), 0x2000)));
        assert_eq!(no_native.classify(Some(30)), None);
        assert_eq!(no_native.classify(Some(0x0fff)), None);
        assert_eq!(no_native.egress_tci(v(20), 0x2000), Some(0x2014));
        let native = PortKind::Trunk {
            allowed,
            native: Some(v(10)),
        };
        assert_eq!(native.classify(None), Some((v(10), 0)));
        assert_eq!(native.classify(Some(10)), Some((v(10), 0)));
        assert_eq!(native.egress_tci(v(10), 0), None);
        assert_eq!(native.egress_tci(v(20), 0), Some(20));
    }
}
