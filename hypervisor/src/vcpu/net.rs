//! The net path between guests (bare metal): each guest NIC (`nic=NETWORK[,vlan=N][,trunk=..]
//! [,mac=MAC]` on its module line) is a virtio-net [`NetDevice`] at the guest's NIC window
//! (`hv_abi::devices::nic_window`: the first NIC at `VIRTIO_MMIO_BASE + VIRTIO_MMIO_STRIDE`),
//! plugged into an access (or trunk) port of its network's [`Switch`], bound to its MAC (a frame with another source
//! is dropped and counted as spoofed by the switch). Every network has a switch of its own,
//! made when the first NIC names it, so two networks never see each other's frames; VLANs
//! separate guests within one.
//!
//! A frame a guest transmits goes into the switch from inside its TX notification (the
//! device's [`NetBackend`]), which queues copies for the ports it goes to. The queued frames
//! move into the receivers' RX rings ([`GuestNic::pump`]) right after the transmitting
//! device's lock is released, and whenever a guest posts RX buffers (its RX notification). A
//! frame is taken from the switch only when a buffer waits for it: frames for a guest with no
//! buffer stay in the switch's bounded queue (its overflow is counted as `dropped`). Guests
//! poll their used rings (no virtio interrupt injection yet).
//!
//! Locks, always in this order and never the other way: the domain's I/O bus lock (held by the
//! exit path around a register access), then a NIC's device lock, then its network's lock
//! (the switch and its ports). Never two NICs' device locks at once: the TX path releases the
//! sender's before it delivers to the others. The registry's lock ([`NETWORKS`]) is held
//! alone.
//!
//! A domain that stopped loses its port the next time a frame is queued for it, a guest joins
//! the network, or the `net` command runs; its last counters are kept for the report (the
//! latest [`DEPARTED_KEPT`] per network). Its queued frames are freed with the port.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;

use hv_abi::Status;
use hv_virtio::devices::net::{NetBackend, NetDevice, RX_QUEUE, TX_QUEUE};
use hv_virtio::transport::reg::QUEUE_NOTIFY;
use hv_virtio::{DeviceError, GuestMemory, MmioTransport, QueueSet, TransportOptions};
use hv_vswitch::{MacAddr, PortConfig, PortId, PortStats, Switch, SwitchConfig, VlanId, VlanSet};
use log::info;
use spin::Mutex;

use crate::domain::config::{NicSpec, default_mac};
use crate::domain::table::{Domain, DomainState};
use crate::io::mmio::MmioDevice;

/// Stopped guests' last counters kept per network, for the report.
pub const DEPARTED_KEPT: usize = 16;

/// Each network's switch. Its queues live on the hypervisor's heap, so they are bounded to
/// what the heap can spare even when every guest stops reading while another floods
/// broadcasts: at most `max_ports * queue_bytes` = 2 MiB of frames per network.
const SWITCH: SwitchConfig = SwitchConfig {
    max_frame_len: 1514,
    mac_capacity: 1024,
    // 802.1Q's default aging time, 300 s, in the nanoseconds of `now_ns`.
    mac_age: 300_000_000_000,
    queue_frames: 128,
    queue_bytes: 64 * 1024,
    max_ports: 32,
};

/// Most frames one pump moves: twice a switch queue, so a guest that keeps posting buffers
/// while others keep sending cannot hold a CPU here.
const MAX_PER_PUMP: usize = 512;

/// Every network, by name; its lock is held alone.
static NETWORKS: Mutex<Vec<Arc<Network>>> = Mutex::new(Vec::new());

/// One network: a switch of its own.
struct Network {
    name: String,
    seg: Mutex<Segment>,
}

/// The switch and what the hypervisor knows of its ports.
struct Segment {
    switch: Switch,
    ports: Vec<Attached>,
    departed: VecDeque<Departed>,
}

/// A guest's port, or dom0's uplink (a trunk with no NIC of its own here: dom0 takes its
/// frames with NET_RECV).
struct Attached {
    id: PortId,
    nic: Weak<GuestNic>,
    uplink: bool,
    domain: Weak<Domain>,
    dom_id: u32,
    name: String,
    /// Its VLANs, for reports: `vlan N` (access) or `trunk N+N, native N` (trunk).
    vlans: String,
    mac: MacAddr,
}

/// A stopped guest's port, after its removal.
struct Departed {
    dom_id: u32,
    name: String,
    vlans: String,
    mac: MacAddr,
    stats: PortStats,
}

impl Attached {
    /// Whether its domain stopped (or is gone).
    fn gone(&self) -> bool {
        self.domain
            .upgrade()
            .is_none_or(|d| d.state() == DomainState::Stopped)
    }
}

impl Segment {
    /// Removes port `id` (its domain stopped), keeping its last counters.
    fn depart(&mut self, id: PortId) {
        let Some(i) = self.ports.iter().position(|a| a.id == id) else {
            return;
        };
        let a = self.ports.swap_remove(i);
        let stats = self.switch.port_stats(id).unwrap_or_default();
        // The port exists: it is removed only here, with its entry.
        let _ = self.switch.remove_port(id);
        if self.departed.len() == DEPARTED_KEPT {
            self.departed.pop_front();
        }
        self.departed.push_back(Departed {
            dom_id: a.dom_id,
            name: a.name,
            vlans: a.vlans,
            mac: a.mac,
            stats,
        });
    }

    /// Whether `id` is the uplink of a dom0 that still runs.
    fn uplink_alive(&self, id: PortId) -> bool {
        self.ports
            .iter()
            .any(|a| a.id == id && a.uplink && !a.gone())
    }

    /// Removes the ports of every stopped domain.
    fn prune(&mut self) {
        let gone: Vec<PortId> = self
            .ports
            .iter()
            .filter(|a| a.gone())
            .map(|a| a.id)
            .collect();
        for id in gone {
            self.depart(id);
        }
    }
}

impl Network {
    /// Moves what the switch queued into the RX rings of the guests it is for; the ports of
    /// stopped guests among them are removed.
    fn deliver(&self) {
        let waiting: Vec<(PortId, Option<Arc<GuestNic>>)> = {
            let seg = self.seg.lock();
            seg.ports
                .iter()
                .filter(|a| seg.switch.queue_depth(a.id).is_some_and(|d| d.frames > 0))
                .map(|a| (a.id, a.nic.upgrade()))
                .collect()
        };
        for (id, nic) in waiting {
            match nic {
                Some(n) if n.pump() => {}
                // dom0's uplink: dom0 takes its frames, woken if it waits.
                None if self.seg.lock().uplink_alive(id) => super::dom0::frames_for_dom0(),
                _ => self.seg.lock().depart(id),
            }
        }
    }
}

/// The device's backend: its port on the switch.
pub struct SwitchPort {
    net: Arc<Network>,
    port: PortId,
}

impl NetBackend for SwitchPort {
    fn transmit(&mut self, frame: &[u8]) {
        let now = super::queue::now_ns();
        // What became of the frame is counted by the switch, on this port or the receivers'.
        let _ = self.net.seg.lock().switch.send(self.port, frame, now);
    }
}

/// A guest's virtio NIC, shared by its MMIO window and the deliveries of other guests' frames.
pub struct GuestNic {
    dev: Mutex<MmioTransport<NetDevice<SwitchPort>>>,
    domain: Weak<Domain>,
    net: Arc<Network>,
    port: PortId,
}

impl GuestNic {
    /// Moves frames queued for this NIC into its RX ring while it has buffers. False if its
    /// domain stopped (nothing was delivered).
    fn pump(&self) -> bool {
        let Some(domain) = self.domain.upgrade() else {
            return false;
        };
        if domain.state() == DomainState::Stopped {
            return false;
        }
        let Some(mem) = domain.memory() else {
            return false;
        };
        let mut dev = self.dev.lock();
        // `None`: the driver has not finished setting the device up (the frames wait), or it
        // broke a ring, which the transport answered with NEEDS_RESET.
        let _ = dev.with_device(mem.ram.mem(), |d, q, m| {
            fill_rx(d, q, m, &self.net, self.port)
        });
        true
    }
}

/// Delivers frames from `port`'s switch queue into the RX ring: one frame per buffer the
/// driver made available, none taken without a buffer for it. When buffers run out, asks the
/// driver to notify when it adds one (virtio 1.2 §2.7.10.2), so frames left waiting move then.
/// Returns how many were delivered.
fn fill_rx<B: NetBackend, M: GuestMemory + ?Sized>(
    dev: &mut NetDevice<B>,
    queues: &mut QueueSet<'_>,
    mem: &M,
    net: &Network,
    port: PortId,
) -> Result<usize, DeviceError> {
    if !queues.is_ready(RX_QUEUE) {
        return Ok(0);
    }
    let mut moved = 0;
    while moved < MAX_PER_PUMP {
        while moved < MAX_PER_PUMP && queues.get(RX_QUEUE)?.has_pending(mem)? {
            let Some(frame) = net.seg.lock().switch.recv(port) else {
                return Ok(moved);
            };
            // Dropped by the device (a buffer too small for it, counted there): stop, so a
            // guest posting tiny buffers does not drain its whole queue here.
            if !dev.receive(queues, mem, frame.bytes())? {
                return Ok(moved);
            }
            moved += 1;
        }
        // Buffers that arrived meanwhile: keep going (the re-check after the store).
        if !queues.get(RX_QUEUE)?.enable_notifications(mem)? {
            break;
        }
    }
    Ok(moved)
}

/// The NIC's window on the guest's MMIO bus.
struct NicWindow(Arc<GuestNic>);

impl MmioDevice for NicWindow {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.0.dev.lock().read(offset, size)
    }

    fn write(&mut self, mem: &dyn GuestMemory, offset: u64, size: u8, value: u64) {
        self.0.dev.lock().write(mem, offset, size, value);
        // The device's lock is released: deliver.
        if offset == QUEUE_NOTIFY && size == 4 {
            match usize::try_from(value) {
                Ok(TX_QUEUE) => self.0.net.deliver(),
                Ok(RX_QUEUE) => {
                    self.0.pump();
                }
                _ => {}
            }
        }
    }
}

/// The network `name`, made on first use.
fn network(name: &str) -> Result<Arc<Network>, String> {
    let mut all = NETWORKS.lock();
    if let Some(n) = all.iter().find(|n| n.name == name) {
        return Ok(n.clone());
    }
    let switch = Switch::new(SWITCH).map_err(|e| alloc::format!("network {name}: switch: {e}"))?;
    let n = Arc::new(Network {
        name: String::from(name),
        seg: Mutex::new(Segment {
            switch,
            ports: Vec::new(),
            departed: VecDeque::new(),
        }),
    });
    all.push(n.clone());
    Ok(n)
}

/// The switch port `spec` asks for: access, or a trunk of its VLANs.
fn port_config(spec: &NicSpec<'_>) -> Result<PortConfig, String> {
    Ok(match spec.trunk {
        None => PortConfig::access(spec.vlan),
        Some(t) => {
            let allowed = crate::domain::config::trunk_vlans(t)
                .map_err(|e| alloc::format!("nic={}: trunk={t}: {e}", spec.network))?;
            PortConfig::trunk(allowed, spec.native.then_some(spec.vlan))
        }
    })
}

/// `spec`'s VLANs, as reports show them.
fn vlans_label(spec: &NicSpec<'_>) -> String {
    match spec.trunk {
        None => alloc::format!("vlan {}", spec.vlan),
        Some(t) if spec.native => alloc::format!("trunk {t}, native {}", spec.vlan),
        Some(t) => alloc::format!("trunk {t}, untagged refused"),
    }
}

/// Gives `domain` a virtio NIC on `spec`'s network at virtio-mmio window `window`. Its MAC
/// must be unique on the network.
pub fn attach_nic(domain: &Arc<Domain>, spec: &NicSpec<'_>, window: u32) -> Result<(), String> {
    let net = network(spec.network)?;
    let mac = spec.mac.unwrap_or_else(|| default_mac(domain.id));
    let nic = {
        let mut seg = net.seg.lock();
        seg.prune();
        seg.switch.age(super::queue::now_ns());
        if let Some(a) = seg.ports.iter().find(|a| a.mac == mac) {
            return Err(alloc::format!(
                "nic={}: MAC {mac} is already dom{}'s on network {}",
                spec.network,
                a.dom_id,
                net.name
            ));
        }
        let port = seg
            .switch
            .add_port(port_config(spec)?.with_mac(mac))
            .map_err(|e| alloc::format!("nic={}: switch port: {e}", spec.network))?;
        let nic = Arc::new(GuestNic {
            dev: Mutex::new(MmioTransport::new(
                NetDevice::new(
                    SwitchPort {
                        net: net.clone(),
                        port,
                    },
                    mac.0,
                ),
                TransportOptions::default(),
            )),
            domain: Arc::downgrade(domain),
            net: net.clone(),
            port,
        });
        seg.ports.push(Attached {
            id: port,
            nic: Arc::downgrade(&nic),
            uplink: false,
            domain: Arc::downgrade(domain),
            dom_id: domain.id,
            name: domain.name.clone(),
            vlans: vlans_label(spec),
            mac,
        });
        nic
    };
    let base =
        hv_abi::devices::VIRTIO_MMIO_BASE + u64::from(window) * hv_abi::devices::VIRTIO_MMIO_STRIDE;
    let registered = domain.io.lock().mmio.register(
        base..base + crate::io::virtio::WINDOW,
        Box::new(NicWindow(nic.clone())),
    );
    if let Err(e) = registered {
        net.seg.lock().depart(nic.port);
        return Err(alloc::format!("virtio NIC window: {e:?}"));
    }
    info!(
        "domain {} ({}): NIC {mac} on network {}, {}",
        domain.id,
        domain.name,
        net.name,
        match spec.trunk {
            None => alloc::format!("VLAN {}", spec.vlan),
            Some(_) => vlans_label(spec),
        }
    );
    Ok(())
}

/// Most networks dom0 may attach uplinks to (each may make a network).
pub const MAX_UPLINKS: usize = 16;

/// dom0's uplinks, by handle (index + 1); the lock is held alone.
static UPLINKS: Mutex<Vec<Uplink>> = Mutex::new(Vec::new());

/// One uplink: a trunk port on a network's switch.
struct Uplink {
    net: Arc<Network>,
    port: PortId,
}

/// The uplink `handle` of `domain` (dom0).
fn uplink(handle: u64) -> Result<(Arc<Network>, PortId), Status> {
    let all = UPLINKS.lock();
    let i = usize::try_from(handle)
        .ok()
        .and_then(|h| h.checked_sub(1))
        .ok_or(Status::InvalidArgument)?;
    all.get(i)
        .map(|u| (u.net.clone(), u.port))
        .ok_or(Status::InvalidArgument)
}

/// NET_UPLINK: dom0's uplink on network `name`, a trunk carrying every VLAN (tagged) and
/// VLAN 1 untagged; an uplink dom0 had there before (it restarted) is replaced. Returns the
/// handle.
pub fn attach_uplink(domain: &Arc<Domain>, name: &str) -> Result<u64, Status> {
    let mut all = UPLINKS.lock();
    let known = all.iter().position(|u| u.net.name == name);
    if known.is_none() && all.len() == MAX_UPLINKS {
        log::warn!(
            "dom{} NET_UPLINK {name}: at most {MAX_UPLINKS} uplinks",
            domain.id
        );
        return Err(Status::NoResources);
    }
    let net = network(name).map_err(|e| {
        log::warn!("dom{} NET_UPLINK refused: {e}", domain.id);
        Status::NoResources
    })?;
    let port = {
        let mut seg = net.seg.lock();
        seg.prune();
        let old: Vec<PortId> = seg
            .ports
            .iter()
            .filter(|a| a.uplink)
            .map(|a| a.id)
            .collect();
        for id in old {
            seg.depart(id);
        }
        let port = seg
            .switch
            .add_port(PortConfig::trunk(VlanSet::all(), Some(VlanId::MIN)))
            .map_err(|e| {
                log::warn!("dom{} NET_UPLINK {name}: switch port: {e}", domain.id);
                Status::NoResources
            })?;
        seg.ports.push(Attached {
            id: port,
            nic: Weak::new(),
            uplink: true,
            domain: Arc::downgrade(domain),
            dom_id: domain.id,
            name: domain.name.clone(),
            vlans: String::from("trunk of every VLAN, VLAN 1 untagged"),
            mac: MacAddr([0; 6]),
        });
        port
    };
    let handle = match known {
        Some(i) => {
            all[i].port = port;
            i + 1
        }
        None => {
            all.push(Uplink {
                net: net.clone(),
                port,
            });
            all.len()
        }
    };
    info!("dom0's uplink {handle}: network {name}, trunk of every VLAN (VLAN 1 untagged)");
    Ok(handle as u64)
}

/// NET_SEND: a frame from the physical NIC, `len` bytes (checked: 14..=1518) at dom0's `gpa`,
/// into the switch through uplink `handle`; then delivered to the guests it is for.
pub fn uplink_send(domain: &Domain, handle: u64, gpa: u64, len: u64) -> Result<(), Status> {
    let (net, port) = uplink(handle)?;
    let mem = domain.memory().ok_or(Status::NoResources)?;
    let mut buf = [0u8; hv_abi::hypercall::NET_FRAME_MAX as usize];
    let frame = buf.get_mut(..len as usize).ok_or(Status::InvalidArgument)?;
    mem.ram
        .mem()
        .read(hv_virtio::GuestAddr(gpa), frame)
        .map_err(|_| Status::BadAddress)?;
    // Refused frames are counted on the uplink's port by the switch.
    let _ = net
        .seg
        .lock()
        .switch
        .send(port, frame, super::queue::now_ns());
    net.deliver();
    Ok(())
}

/// NET_RECV: the next frame queued for uplink `handle`, into `cap` (at least 1518) bytes at
/// dom0's `gpa`. Returns its length, 0 if none waits. A frame dom0's buffer cannot take (an
/// address outside its RAM) is lost, and the call says `BadAddress`.
pub fn uplink_recv(domain: &Domain, handle: u64, gpa: u64, cap: u64) -> Result<u64, Status> {
    let (net, port) = uplink(handle)?;
    let mem = domain.memory().ok_or(Status::NoResources)?;
    let Some(frame) = net.seg.lock().switch.recv(port) else {
        return Ok(0);
    };
    let bytes = frame.bytes();
    if bytes.len() as u64 > cap {
        return Err(Status::InvalidArgument);
    }
    mem.ram
        .mem()
        .write(hv_virtio::GuestAddr(gpa), bytes)
        .map_err(|_| Status::BadAddress)?;
    Ok(bytes.len() as u64)
}

/// Whether a frame waits on any of dom0's uplinks.
pub fn uplink_pending() -> bool {
    let ups: Vec<(Arc<Network>, PortId)> = UPLINKS
        .lock()
        .iter()
        .map(|u| (u.net.clone(), u.port))
        .collect();
    ups.iter().any(|(net, port)| {
        net.seg
            .lock()
            .switch
            .queue_depth(*port)
            .is_some_and(|d| d.frames > 0)
    })
}

fn port_line(
    dom_id: u32,
    name: &str,
    state: &str,
    vlans: &str,
    mac: MacAddr,
    s: &PortStats,
) -> String {
    alloc::format!(
        "  dom{dom_id} {name}{state}: {vlans}, mac {mac}, rx {} tx {} frames, spoofed {}, dropped {}, vlan_denied {}, malformed {}",
        s.tx_frames,
        s.rx_frames,
        s.spoofed,
        s.dropped_full,
        s.vlan_denied,
        s.malformed
    )
}

/// The `net` console command: every network and each of its ports, from the guest's side
/// (`rx`: frames delivered to it, `tx`: frames it sent that the switch accepted; `spoofed`,
/// `vlan_denied`, `malformed`: frames it sent that were refused; `dropped`: frames for it lost
/// because its queue was full).
pub fn report() -> Vec<String> {
    let nets: Vec<Arc<Network>> = NETWORKS.lock().clone();
    if nets.is_empty() {
        return alloc::vec![String::from("no networks (no guest has nic=)")];
    }
    let mut out = Vec::new();
    for net in nets {
        let mut seg = net.seg.lock();
        seg.prune();
        seg.switch.age(super::queue::now_ns());
        let st = seg.switch.stats();
        out.push(alloc::format!(
            "network {}: {} ports, {} stopped; {} MAC entries, {} evicted, {} moves",
            net.name,
            seg.ports.len(),
            seg.departed.len(),
            st.mac_entries,
            st.mac_evicted,
            st.mac_moves
        ));
        for a in &seg.ports {
            let s = seg.switch.port_stats(a.id).unwrap_or_default();
            let queued = seg.switch.queue_depth(a.id).map_or(0, |d| d.frames);
            let mut line = if a.uplink {
                alloc::format!(
                    "  dom{} {} uplink: trunk (every VLAN, VLAN 1 untagged), to the NIC {} frames, from it {}, malformed {}, dropped {}",
                    a.dom_id,
                    a.name,
                    s.tx_frames,
                    s.rx_frames,
                    s.malformed,
                    s.dropped_full
                )
            } else {
                port_line(a.dom_id, &a.name, "", &a.vlans, a.mac, &s)
            };
            if queued != 0 {
                line.push_str(&alloc::format!(", {queued} queued"));
            }
            out.push(line);
        }
        for d in &seg.departed {
            out.push(port_line(
                d.dom_id,
                &d.name,
                " (stopped)",
                &d.vlans,
                d.mac,
                &d.stats,
            ));
        }
    }
    out
}
