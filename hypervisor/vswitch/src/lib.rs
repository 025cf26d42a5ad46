//! `hv-vswitch`: the hypervisor's virtual Ethernet switch. Guests' virtio-net devices and
//! dom0's uplink (the path to the physical NIC) attach to it as ports; it moves frames between
//! them. Pure logic: no clock, no lock, no hardware; the hypervisor calls it under one lock
//! from many vCPUs and passes the time in.
//!
//! # The model
//!
//! - **Ports** ([`PortConfig`]) are attached and removed at run time ([`Switch::add_port`],
//!   [`Switch::remove_port`]) and named by a [`PortId`] that is never reused. An **access**
//!   port is on one VLAN and untagged both ways. A **trunk** port carries a set of VLANs,
//!   802.1Q-tagged (TPID 0x8100, VID in the TCI's low 12 bits), and optionally a native VLAN
//!   whose frames are untagged both ways; without one, untagged frames are refused. A frame on
//!   a VLAN a port does not carry neither enters nor leaves through it. dom0's uplink is a
//!   trunk.
//! - **Sending** ([`Switch::send`]): the frame is validated (at least 14 bytes, 18 when the
//!   TPID says tagged; at most [`SwitchConfig::max_frame_len`], plus 4 when tagged), its
//!   source checked (a station address, and the port's bound MAC if it has one), and its VLAN
//!   found from the port's kind and the tag. A refused frame is counted once on its port and
//!   goes nowhere: it is not learned. An accepted one teaches the MAC table that its (VLAN,
//!   source) is on that port, then goes to the port its (VLAN, destination) was learned on, or
//!   is flooded, when the destination is unknown, multicast or broadcast, to every other port
//!   carrying the VLAN. It never goes back to the port it came from: a destination learned on
//!   the sending port means the frame is not switched at all.
//! - **Delivery** ([`Switch::recv`]): each port has an egress queue of owned copies, already
//!   in the port's form: a tag is added with the frame's VID (and its priority bits, if it came
//!   tagged) when a trunk takes the VLAN tagged, and removed for an access port or a trunk's
//!   native VLAN. Priority tags (VID 0) count as untagged.
//! - **Learning and aging**: entries age out [`SwitchConfig::mac_age`] after their station
//!   was last seen; an expired entry is never used, and [`Switch::age`] frees them. A station
//!   seen on another port is re-learned there at once (`mac_moves`). Removing a port forgets
//!   every entry naming it. `now` is the caller's monotonic clock, in the unit of `mac_age`.
//!
//! # Anti-spoofing
//!
//! A guest's port is bound to its MAC ([`PortConfig::with_mac`]); frames from it with any
//! other source are dropped and counted (`spoofed`). Frames with a group (multicast or
//! broadcast) or all-zero source are dropped on every port, the uplink included. A tagged
//! frame from an access port is refused (`vlan_denied`), so a guest cannot hop VLANs.
//! Learning trusts the uplink: a frame from it may move any unbound station's entry.
//!
//! # What is bounded
//!
//! - Ports: at most [`SwitchConfig::max_ports`].
//! - The MAC table: at most [`SwitchConfig::mac_capacity`] entries. When it is full,
//!   learning a new station evicts the least recently seen entry (`mac_evicted`), so a sender
//!   of random source addresses churns the table (its victims' frames are flooded within
//!   their VLAN until re-learned) but cannot grow it. Lookups are O(log n) in an ordered map,
//!   so no choice of addresses makes them slow.
//! - Each egress queue: at most [`SwitchConfig::queue_frames`] frames and
//!   [`SwitchConfig::queue_bytes`] bytes (each frame an exactly sized copy). A frame that does
//!   not fit is dropped and counted on the receiving port (`dropped_full`). Queued frame
//!   bytes are thus at most `max_ports * queue_bytes`, and the table at most `mac_capacity`
//!   entries (a few dozen bytes each).
//! - Work per `send`: one parse, two O(log n) table lookups, one pass over the ports when
//!   flooding, one copy of the frame per receiving port, and, only when a receiving queue is
//!   full, scans of that queue (at most `queue_frames` long) to push frames out.
//!
//! # Fairness
//!
//! Senders share a receiving port's queue by **longest-queue push-out**, measured in bytes.
//! A frame arriving at a full queue pushes out the newest frames of the *other* sender that
//! holds the most bytes of that queue, if that sender holds more than the arriving sender
//! will once its frame is in; otherwise the arriving frame is dropped. Pushed-out frames
//! count in `dropped_full` like refused ones. So a lone sender may fill a queue, but as soon
//! as a second one sends, its frames displace the first's until both hold about the same: a
//! port flooding at full rate keeps at most an equal share (about `1/n` of the queue with `n`
//! active senders) and can never stop another port's frames from being queued and delivered.
//! Within a queue delivery is first in, first out, and a sender's surviving frames keep their
//! order.
//!
//! # What is counted
//!
//! Per port ([`PortStats`], all from [`Switch::stats`] or [`Switch::port_stats`]): frames and
//! bytes accepted (`rx_*`) and delivered (`tx_*`), and every refusal: `malformed`, `spoofed`,
//! `vlan_denied` (each frame offered counts in exactly one of `rx_frames` and these), and
//! `dropped_full`. Per switch ([`SwitchStats`]): table entries, evictions, station moves.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod frame;
mod port;
mod queue;
mod switch;
mod table;
mod vlan;

#[cfg(test)]
mod tests;

pub use frame::{ETH_HEADER_LEN, Frame, MacAddr, TPID_8021Q, VLAN_TAG_LEN};
pub use port::{PortConfig, PortId, PortKind, PortStats};
pub use switch::{
    ConfigError, DropReason, PortError, QueueDepth, SendResult, Switch, SwitchConfig, SwitchStats,
};
pub use vlan::{VlanId, VlanSet};
