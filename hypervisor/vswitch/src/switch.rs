//! The switch: its ports, its MAC table, and the path of one frame (`send`) and one delivery
//! (`recv`).

use alloc::vec::Vec;
use core::fmt;

use crate::frame::{self, ETH_HEADER_LEN, Frame, MacAddr, VLAN_TAG_LEN};
use crate::port::{PortConfig, PortId, PortKind, PortStats};
use crate::queue::{EgressQueue, Offer};
use crate::table::{Learned, MacTable};
use crate::vlan::VlanId;

/// How big everything is. Every bound of the switch is here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// The longest untagged frame, header included, no FCS (1514: a 1500-byte MTU); a tagged
    /// frame may be 4 bytes longer. Raise it for jumbo frames.
    pub max_frame_len: usize,
    /// The most MAC table entries; when full, learning a new station evicts the oldest.
    pub mac_capacity: usize,
    /// How long an entry lives after its station was last seen, in the unit of the `now`
    /// arguments (nanoseconds, or ticks).
    pub mac_age: u64,
    /// The most frames one port's egress queue holds.
    pub queue_frames: usize,
    /// The most bytes one port's egress queue holds (at least one largest tagged frame).
    pub queue_bytes: usize,
    /// The most ports attached at once.
    pub max_ports: usize,
}

impl Default for SwitchConfig {
    /// 1514-byte frames, 4096 MAC entries aging after 300 s (in nanoseconds, as 802.1Q's
    /// default), 256 frames or 256 KiB per egress queue, 256 ports.
    fn default() -> Self {
        SwitchConfig {
            max_frame_len: 1514,
            mac_capacity: 4096,
            mac_age: 300_000_000_000,
            queue_frames: 256,
            queue_bytes: 256 * 1024,
            max_ports: 256,
        }
    }
}

/// A [`SwitchConfig`] the switch cannot run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `max_frame_len` is below an Ethernet header (14 bytes).
    FrameLenTooSmall,
    /// `mac_capacity` is 0 or does not fit the table's 32-bit slots.
    MacCapacity,
    /// `queue_frames` is 0 or `queue_bytes` cannot hold one largest tagged frame.
    QueueTooSmall,
    /// `max_ports` is 0 or above 2^32.
    MaxPorts,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigError::FrameLenTooSmall => "largest frame shorter than an Ethernet header",
            ConfigError::MacCapacity => "MAC table capacity out of range",
            ConfigError::QueueTooSmall => "egress queue cannot hold one largest frame",
            ConfigError::MaxPorts => "port limit out of range",
        })
    }
}

/// Why a port could not be attached or removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortError {
    /// `max_ports` ports are attached.
    TooManyPorts,
    /// A trunk's native VLAN is not among its allowed VLANs.
    NativeNotAllowed,
    /// The bound MAC is a group or all-zero address, which no station sends from.
    BadMac,
    /// No port has this id (never attached, or already removed).
    UnknownPort,
}

impl fmt::Display for PortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortError::TooManyPorts => "too many ports",
            PortError::NativeNotAllowed => "native VLAN not allowed on the trunk",
            PortError::BadMac => "bound MAC is not a station address",
            PortError::UnknownPort => "no such port",
        })
    }
}

/// Why the switch refused a frame. Each reason but `UnknownPort` is counted on the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The port id names no attached port.
    UnknownPort,
    /// Too short, too long, or a cut-off 802.1Q tag (`malformed`).
    Malformed,
    /// A source address the port may not use (`spoofed`).
    Spoofed,
    /// A VLAN the port does not carry (`vlan_denied`).
    VlanDenied,
}

/// What became of a frame given to [`Switch::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendResult {
    /// Accepted and its source learned: a copy was queued for `queued` ports, and `full`
    /// ports had no room for it (counted in their `dropped_full`). Both are 0 when the
    /// destination is on the sending port or no other port carries the VLAN.
    Accepted { queued: usize, full: usize },
    /// Refused before learning; nothing was queued.
    Dropped(DropReason),
}

/// A snapshot of the switch's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchStats {
    /// Every attached port's counters, by slot order.
    pub ports: Vec<(PortId, PortStats)>,
    /// Entries in the MAC table (expired ones included until [`Switch::age`] drops them).
    pub mac_entries: usize,
    /// Entries evicted because the table was full.
    pub mac_evicted: u64,
    /// Stations re-learned on another port while their entry was fresh.
    pub mac_moves: u64,
}

/// How full a port's egress queue is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueDepth {
    pub frames: usize,
    pub bytes: usize,
}

struct Port {
    id: PortId,
    config: PortConfig,
    queue: EgressQueue,
    stats: PortStats,
}

struct Slot {
    generation: u32,
    port: Option<Port>,
}

/// The virtual Ethernet switch. Not internally locked: the hypervisor holds one lock around
/// it. See the crate docs for the model.
pub struct Switch {
    config: SwitchConfig,
    slots: Vec<Slot>,
    table: MacTable,
    mac_evicted: u64,
    mac_moves: u64,
}

impl Switch {
    /// A switch with no ports and an empty MAC table.
    pub fn new(config: SwitchConfig) -> Result<Switch, ConfigError> {
        if config.max_frame_len < ETH_HEADER_LEN {
            return Err(ConfigError::FrameLenTooSmall);
        }
        if config.mac_capacity == 0 || u32::try_from(config.mac_capacity).is_err() {
            return Err(ConfigError::MacCapacity);
        }
        let largest = config.max_frame_len.saturating_add(VLAN_TAG_LEN);
        if config.queue_frames == 0 || config.queue_bytes < largest {
            return Err(ConfigError::QueueTooSmall);
        }
        if config.max_ports == 0 || u32::try_from(config.max_ports).is_err() {
            return Err(ConfigError::MaxPorts);
        }
        Ok(Switch {
            config,
            slots: Vec::new(),
            table: MacTable::new(config.mac_capacity, config.mac_age),
            mac_evicted: 0,
            mac_moves: 0,
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SwitchConfig {
        &self.config
    }

    /// Attaches a port, with an empty queue and zero counters.
    pub fn add_port(&mut self, config: PortConfig) -> Result<PortId, PortError> {
        if let PortKind::Trunk {
            allowed,
            native: Some(native),
        } = &config.kind
            && !allowed.contains(*native)
        {
            return Err(PortError::NativeNotAllowed);
        }
        if config.mac.is_some_and(|m| !m.is_station()) {
            return Err(PortError::BadMac);
        }
        let free = self.slots.iter().position(|s| s.port.is_none());
        let slot = match free {
            Some(i) => i,
            None if self.slots.len() < self.config.max_ports => {
                self.slots.push(Slot {
                    generation: 0,
                    port: None,
                });
                self.slots.len() - 1
            }
            None => return Err(PortError::TooManyPorts),
        };
        let id = PortId {
            // Below `max_ports`, which `new` checked fits in 32 bits.
            slot: u32::try_from(slot).map_err(|_| PortError::TooManyPorts)?,
            generation: self.slots[slot].generation,
        };
        self.slots[slot].port = Some(Port {
            id,
            config,
            queue: EgressQueue::new(self.config.queue_frames, self.config.queue_bytes),
            stats: PortStats::default(),
        });
        Ok(id)
    }

    /// Detaches a port: its queued frames are freed and the MAC table forgets its stations.
    /// Frames it sent that wait in other ports' queues are still delivered.
    pub fn remove_port(&mut self, id: PortId) -> Result<(), PortError> {
        self.index(id).ok_or(PortError::UnknownPort)?;
        let slot = &mut self.slots[id.slot as usize];
        slot.port = None;
        slot.generation = slot.generation.wrapping_add(1);
        self.table.forget_port(id);
        Ok(())
    }

    /// The port `id` names, if attached.
    pub fn port_config(&self, id: PortId) -> Option<&PortConfig> {
        self.port(id).map(|p| &p.config)
    }

    /// The ports attached, by slot order.
    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.port.as_ref().map(|p| p.id))
    }

    fn index(&self, id: PortId) -> Option<usize> {
        let i = id.slot as usize;
        let slot = self.slots.get(i)?;
        (slot.generation == id.generation && slot.port.is_some()).then_some(i)
    }

    fn port(&self, id: PortId) -> Option<&Port> {
        self.slots.get(self.index(id)?)?.port.as_ref()
    }

    fn port_mut(&mut self, id: PortId) -> Option<&mut Port> {
        let i = self.index(id)?;
        self.slots[i].port.as_mut()
    }

    /// One frame from port `from` at time `now`: checked, classified to a VLAN, its source
    /// learned, and a copy queued for each port it goes to, tagged or untagged as that port
    /// takes it. `frame` is only read, and only after its length is checked.
    pub fn send(&mut self, from: PortId, frame: &[u8], now: u64) -> SendResult {
        let max = self.config.max_frame_len;
        let Some(port) = self.port_mut(from) else {
            return SendResult::Dropped(DropReason::UnknownPort);
        };
        let header = match frame::parse(frame, max) {
            Ok(h) => h,
            Err(_) => {
                port.stats.malformed += 1;
                return SendResult::Dropped(DropReason::Malformed);
            }
        };
        if !header.src.is_station() || port.config.mac.is_some_and(|m| m != header.src) {
            port.stats.spoofed += 1;
            return SendResult::Dropped(DropReason::Spoofed);
        }
        // An access port's frames belong to its VLAN alone: stacked tags behind a priority
        // tag (or an 802.1ad tag) would name another VLAN to the switches beyond a trunk.
        let stacked = header.stacked && matches!(port.config.kind, PortKind::Access(_));
        let Some((vlan, priority)) = port.config.kind.classify(header.tci).filter(|_| !stacked)
        else {
            port.stats.vlan_denied += 1;
            return SendResult::Dropped(DropReason::VlanDenied);
        };
        port.stats.rx_frames += 1;
        port.stats.rx_bytes += frame.len() as u64;

        match self.table.learn((vlan, header.src), from, now) {
            Learned::Evicted => self.mac_evicted += 1,
            Learned::Moved => self.mac_moves += 1,
            Learned::New | Learned::Refreshed => {}
        }

        let out = Outgoing {
            frame,
            tagged_in: header.tci.is_some(),
            vlan,
            priority,
            source: from,
        };
        let known = if header.dst.is_multicast() {
            None
        } else {
            self.table
                .lookup((vlan, header.dst), now)
                .filter(|&p| self.port(p).is_some_and(|p| p.config.kind.carries(vlan)))
        };
        let mut tally = Tally::default();
        match known {
            // The station is on the sending port: the frame needs no switching.
            Some(to) if to == from => {}
            Some(to) => {
                if let Some(port) = self.port_mut(to) {
                    tally.add(deliver(port, &out));
                }
            }
            None => {
                for port in self.slots.iter_mut().filter_map(|s| s.port.as_mut()) {
                    if port.id != from && port.config.kind.carries(vlan) {
                        tally.add(deliver(port, &out));
                    }
                }
            }
        }
        SendResult::Accepted {
            queued: tally.queued,
            full: tally.full,
        }
    }

    /// The next frame for port `to`, oldest first, already tagged or untagged for it.
    pub fn recv(&mut self, to: PortId) -> Option<Frame> {
        let port = self.port_mut(to)?;
        let frame = port.queue.pop()?;
        port.stats.tx_frames += 1;
        port.stats.tx_bytes += frame.bytes.len() as u64;
        Some(frame)
    }

    /// How full port `id`'s egress queue is.
    pub fn queue_depth(&self, id: PortId) -> Option<QueueDepth> {
        let (frames, bytes) = self.port(id)?.queue.depth();
        Some(QueueDepth { frames, bytes })
    }

    /// Drops the MAC entries expired at `now`; returns how many. Lookups ignore expired
    /// entries anyway, so this only frees their room; call it now and then (every second).
    pub fn age(&mut self, now: u64) -> usize {
        self.table.age(now)
    }

    /// Where the switch would send a unicast frame for `mac` on `vlan` at `now`, if it knows.
    pub fn lookup(&self, vlan: VlanId, mac: MacAddr, now: u64) -> Option<PortId> {
        self.table.lookup((vlan, mac), now)
    }

    /// Port `id`'s counters.
    pub fn port_stats(&self, id: PortId) -> Option<PortStats> {
        self.port(id).map(|p| p.stats)
    }

    /// Every counter, at once.
    pub fn stats(&self) -> SwitchStats {
        SwitchStats {
            ports: self
                .slots
                .iter()
                .filter_map(|s| s.port.as_ref().map(|p| (p.id, p.stats)))
                .collect(),
            mac_entries: self.table.len(),
            mac_evicted: self.mac_evicted,
            mac_moves: self.mac_moves,
        }
    }
}

/// An accepted frame on its way out.
struct Outgoing<'a> {
    frame: &'a [u8],
    tagged_in: bool,
    vlan: VlanId,
    priority: u16,
    source: PortId,
}

#[derive(Default)]
struct Tally {
    queued: usize,
    full: usize,
}

impl Tally {
    fn add(&mut self, queued: bool) {
        if queued {
            self.queued += 1;
        } else {
            self.full += 1;
        }
    }
}

/// Queues `out`'s copy for `port`; false if the queue had no room for it.
fn deliver(port: &mut Port, out: &Outgoing<'_>) -> bool {
    let tci = port.config.kind.egress_tci(out.vlan, out.priority);
    let copy = Frame {
        bytes: frame::egress_copy(out.frame, out.tagged_in, tci),
        vlan: out.vlan,
        source: out.source,
    };
    match port.queue.offer(copy) {
        Offer::Queued { pushed_out } => {
            port.stats.dropped_full += pushed_out as u64;
            true
        }
        Offer::Full => {
            port.stats.dropped_full += 1;
            false
        }
    }
}
