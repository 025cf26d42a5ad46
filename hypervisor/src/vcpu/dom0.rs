//! The link between guests' virtio disks and dom0's block backend (bare metal).
//!
//! dom0 registers its request ring (`IO_RING_SETUP`), offers its volumes by name
//! (`DISK_OFFER`) and says when it is ready (`IO_READY`); the console task then starts the
//! guests that were waiting for their disks. A guest's disk is a [`RemoteBlock`] on its MMIO
//! bus whose port publishes requests into dom0's ring ([`RingHost`]) and wakes dom0; dom0's
//! `IO_KICK` and `IO_WAIT` take its responses, and each goes back to the guest's device,
//! which writes the data and the status into the guest's buffers.
//!
//! Locks, always in this order and never the other way: a guest disk's device lock, then the
//! link's. Completions are collected under the link's lock and delivered after it is
//! dropped. When dom0 ends, every request in flight fails with IOERR and guests' new requests
//! wait in their rings until a dom0 registers again.
//!
//! What dom0 is trusted with: the physical disks and the data of guests' requests while they
//! are in its slots, nothing else; it never reaches guest memory, and what it writes in its
//! ring is checked ([`RingHost`]).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use hv_abi::ioring::{self, Request};
use hv_virtio::devices::remote_block::{BlockPort, Busy, Op, PortRequest, RemoteBlock, Token};
use hv_virtio::{MmioTransport, TransportOptions};
use spin::Mutex;

use super::dispatch::Dom0Reply;
use crate::domain::hypercall::Dom0Call;
use crate::domain::table::{Domain, DomainMem};
use crate::io::ioring::{Done, RingHost, SubmitError};
use crate::io::mmio::MmioDevice;
use crate::io::passthrough::{Bdf, HostPorts, OwnedFunction, PciFilter, PortPassthrough};
use crate::println;
use hv_guest_mem::GuestMemory;

/// Where a completion goes: the guest's disk and the request's token there.
struct Route {
    disk: Weak<GuestDisk>,
    token: Token,
}

/// The most volumes dom0 may offer.
const MAX_OFFERS: usize = 256;

/// A volume dom0 offered.
struct Offer {
    name: String,
    sectors: u64,
    read_only: bool,
}

/// dom0 while its ring is registered.
struct Dom0 {
    mem: Arc<DomainMem>,
    ring: RingHost<Route>,
    /// dom0 is in IO_WAIT: the next request wakes it.
    waiting: bool,
}

struct Link {
    dom0: Option<Dom0>,
    /// Requests refused because dom0 was away or its ring full (they wait in the guests'
    /// rings), and wake-ups sent to dom0.
    busy: u64,
    wakes: u64,
    offers: Vec<Offer>,
    /// Every guest disk, to start again what waited while dom0 was away.
    disks: Vec<Weak<GuestDisk>>,
}

static LINK: Mutex<Link> = Mutex::new(Link {
    dom0: None,
    busy: 0,
    wakes: 0,
    offers: Vec::new(),
    disks: Vec::new(),
});

/// A request arrived for dom0 while it waited, or a frame for one of its uplinks: its IO_WAIT ends (the run loop takes the flag
/// when it picks dom0's halted vCPU; a halt without a timer otherwise lasts).
static EVENT: AtomicBool = AtomicBool::new(false);

/// Whether `domain` is dom0 and an event ends its wait now (the flag is taken).
pub fn take_event(domain: &Domain) -> bool {
    domain.privileged && EVENT.swap(false, Ordering::AcqRel)
}

/// dom0 ended: the console task starts it again.
static RESTART: AtomicBool = AtomicBool::new(false);

/// Whether dom0 ended since the last call (the console task restarts it).
pub fn take_restart() -> bool {
    RESTART.swap(false, Ordering::AcqRel)
}

/// Bumped by each IO_READY: the console task starts the guests waiting for their disks.
static READY: AtomicU32 = AtomicU32::new(0);

/// How many times dom0 said it was ready.
pub fn ready_generation() -> u32 {
    READY.load(Ordering::Acquire)
}

/// The volume `name`'s size in sectors and whether it is read-only, if dom0 offered it; else
/// the names it did offer.
pub fn find_volume(name: &str) -> Result<(u32, u64, bool), Vec<String>> {
    let l = LINK.lock();
    match l.offers.iter().position(|o| o.name == name) {
        Some(i) => Ok((i as u32 + 1, l.offers[i].sectors, l.offers[i].read_only)),
        None => Err(l.offers.iter().map(|o| o.name.clone()).collect()),
    }
}

/// A guest's virtio disk, shared by its MMIO bus and the completions that come back.
pub struct GuestDisk {
    dev: Mutex<MmioTransport<RemoteBlock<Dom0Port>>>,
    domain: Mutex<Weak<Domain>>,
    /// Its virtio-mmio window (`hv_abi::devices::disk_window`), also its interrupt's index.
    window: u32,
}

/// The disk's port: publishes into dom0's ring.
pub struct Dom0Port {
    handle: u32,
    me: Weak<GuestDisk>,
}

impl BlockPort for Dom0Port {
    fn submit(&mut self, req: PortRequest<'_>) -> Result<(), Busy> {
        let op = match req.op {
            Op::Read => ioring::op::READ,
            Op::Write => ioring::op::WRITE,
            Op::Flush => ioring::op::FLUSH,
            Op::GetId => ioring::op::GET_ID,
            Op::Discard => ioring::op::DISCARD,
            Op::WriteZeroes => ioring::op::WRITE_ZEROES,
        };
        let r = Request {
            op,
            disk: self.handle,
            sector: req.sector,
            sectors: req.sectors,
            ..Request::default()
        };
        let route = Route {
            disk: self.me.clone(),
            token: req.token,
        };
        let wake = {
            let mut l = LINK.lock();
            let l = &mut *l;
            let Some(d) = l.dom0.as_mut() else {
                l.busy += 1;
                return Err(Busy);
            };
            match d.ring.submit(d.mem.ram.mem(), r, req.data, route) {
                Ok(()) => {
                    let wake = core::mem::replace(&mut d.waiting, false);
                    l.wakes += u64::from(wake);
                    wake
                }
                // Full, or dom0's memory is going; a size beyond the slot cannot come from
                // the model (it checked), but is refused the same way rather than trusted.
                Err(SubmitError::Full | SubmitError::Memory | SubmitError::TooLarge) => {
                    l.busy += 1;
                    return Err(Busy);
                }
            }
        };
        if wake {
            EVENT.store(true, Ordering::Release);
            super::queue::wake_vcpu(0, 0);
        }
        Ok(())
    }
}

/// Raises device `index`'s interrupt for `domain`'s vCPU 0 and makes sure it is seen: a halted
/// vCPU 0 is woken, one running on another CPU is kicked.
pub fn raise_irq(domain: &Domain, index: u32) {
    domain.irqs.fetch_or(1 << (index % 64), Ordering::AcqRel);
    super::queue::wake_vcpu(domain.id, 0);
    crate::domain::table::kick_cpus_running(domain.id);
}

impl GuestDisk {
    fn complete(&self, token: Token, status: u8, data: &[u8]) {
        let Some(domain) = self.domain.lock().upgrade() else {
            return;
        };
        let Some(mem) = domain.memory() else {
            return;
        };
        let raised = {
            let mut dev = self.dev.lock();
            let before = dev.stats().interrupts;
            dev.with_device(mem.ram.mem(), |d, q, m| {
                d.complete(token, status, data, q, m)
            });
            dev.stats().interrupts != before
        };
        if raised {
            raise_irq(&domain, self.window);
        }
    }

    /// Pops again what waited in the ring (dom0 was away).
    fn retry(&self) {
        let Some(domain) = self.domain.lock().upgrade() else {
            return;
        };
        let Some(mem) = domain.memory() else {
            return;
        };
        // A notification of queue 0, as the driver would write it.
        self.dev.lock().write(mem.ram.mem(), 0x50, 4, 0);
    }
}

/// The disk's window on the guest's MMIO bus.
struct DiskWindow(Arc<GuestDisk>);

impl MmioDevice for DiskWindow {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.0.dev.lock().read(offset, size)
    }

    fn write(&mut self, mem: &dyn GuestMemory, offset: u64, size: u8, value: u64) {
        let raised = {
            let mut dev = self.0.dev.lock();
            let before = dev.stats().interrupts;
            dev.write(mem, offset, size, value);
            dev.stats().interrupts != before
        };
        // Answered in-band during the guest's own exit: its run loop sees the bit before
        // the next entry.
        if raised && let Some(d) = self.0.domain.lock().upgrade() {
            d.irqs.fetch_or(1 << self.0.window, Ordering::AcqRel);
        }
    }
}

/// Gives `domain` a virtio disk on volume `handle` (from [`find_volume`]) at virtio-mmio
/// window `window`.
pub fn attach_disk(
    domain: &Arc<Domain>,
    handle: u32,
    sectors: u64,
    read_only: bool,
    window: u32,
) -> Result<(), String> {
    let disk = Arc::new_cyclic(|me| GuestDisk {
        dev: Mutex::new(MmioTransport::new(
            RemoteBlock::new(
                Dom0Port {
                    handle,
                    me: me.clone(),
                },
                sectors,
                read_only,
                ioring::SLOT_BYTES,
            ),
            TransportOptions::default(),
        )),
        domain: Mutex::new(Arc::downgrade(domain)),
        window,
    });
    let base =
        hv_abi::devices::VIRTIO_MMIO_BASE + u64::from(window) * hv_abi::devices::VIRTIO_MMIO_STRIDE;
    domain
        .io
        .lock()
        .mmio
        .register(
            base..base + crate::io::virtio::WINDOW,
            Box::new(DiskWindow(disk.clone())),
        )
        .map_err(|e| alloc::format!("virtio disk window: {e:?}"))?;
    let mut l = LINK.lock();
    l.disks.retain(|d| d.strong_count() > 0);
    l.disks.push(Arc::downgrade(&disk));
    Ok(())
}

fn deliver(done: Vec<Done<Route>>) {
    for d in done {
        if let Some(disk) = d.route.disk.upgrade() {
            disk.complete(d.route.token, d.status, &d.data);
        }
    }
}

/// Takes dom0's responses and completes them.
fn reap() {
    let done = {
        let mut l = LINK.lock();
        match l.dom0.as_mut() {
            Some(d) => d.ring.reap(d.mem.ram.mem()),
            None => Vec::new(),
        }
    };
    deliver(done);
}

/// The `disks` console command: the ring's state and each guest disk's.
pub fn report() -> Vec<String> {
    let mut out = Vec::new();
    let disks: Vec<Arc<GuestDisk>> = {
        let l = LINK.lock();
        match &l.dom0 {
            Some(d) => out.push(alloc::format!(
                "dom0 ring: {} published, {} completed, {} in flight, dom0 {}; {} busy, {} wake-ups; faults: {} bad index, {} bad tag, {} bad length",
                d.ring.published,
                d.ring.completed,
                d.ring.in_flight(),
                if d.waiting { "waiting" } else { "working" },
                l.busy,
                l.wakes,
                d.ring.faults.bad_index,
                d.ring.faults.bad_tag,
                d.ring.faults.bad_len
            )),
            None => out.push(String::from("dom0 ring: not registered (no dom0 running)")),
        }
        for o in &l.offers {
            out.push(alloc::format!(
                "volume {}: {} sectors{}",
                o.name,
                o.sectors,
                if o.read_only { ", read-only" } else { "" }
            ));
        }
        l.disks.iter().filter_map(Weak::upgrade).collect()
    };
    for disk in disks {
        let dom = disk
            .domain
            .lock()
            .upgrade()
            .map_or(String::from("?"), |d| alloc::format!("dom{}", d.id));
        let dev = disk.dev.lock();
        let s = dev.device().stats();
        let t = dev.stats();
        out.push(alloc::format!(
            "{dom} {}: {} submitted, {} completed, {} in flight, {} I/O errors, {} unsupported, {} busy, {} stale; {} notifies, {} interrupts{}",
            if disk.window == 0 {
                String::from("disk")
            } else {
                alloc::format!("disk at window {}", disk.window)
            },
            s.submitted,
            s.completed,
            dev.device().in_flight(),
            s.io_errors,
            s.unsupported,
            s.busy,
            s.stale,
            t.notifies,
            t.interrupts,
            if dev.needs_reset() { "; NEEDS_RESET" } else { "" }
        ));
    }
    out
}

/// dom0 ended: every request in flight fails; guests' new requests wait for the next dom0.
pub fn gone(why: &str) {
    let (done, in_flight) = {
        let mut l = LINK.lock();
        match l.dom0.take() {
            Some(mut d) => {
                let done = d.ring.fail_all();
                let n = done.len();
                (done, n)
            }
            None => (Vec::new(), 0),
        }
    };
    println!(
        "dom0 stopped ({why}): {in_flight} guest disk request(s) in flight failed with I/O errors; new ones wait for dom0's restart"
    );
    quiesce();
    deliver(done);
    RESTART.store(true, Ordering::Release);
}

/// The functions dom0 was given, to stop when it ends.
static OWNED: Mutex<Vec<Bdf>> = Mutex::new(Vec::new());

/// dom0 ended: bus mastering goes off on every function it owned, so no DMA it programmed
/// (a NIC's receive ring keeps filling) lands in its memory once that memory goes back to the
/// frame allocator. Its next start enables it again.
fn quiesce() {
    let owned = core::mem::take(&mut *OWNED.lock());
    let mut m = MachinePorts;
    let mut names = Vec::new();
    for f in owned {
        let cmd = m.config(f.address(0x04), 0, 2, None);
        m.config(f.address(0x04), 0, 2, Some(cmd & !(1 << 2)));
        names.push(alloc::format!("{:02x}:{:02x}.{}", f.bus, f.dev, f.func));
    }
    if !names.is_empty() {
        println!(
            "dom0's devices stopped: bus mastering off on {}",
            names.join(", ")
        );
    }
}

/// The machine's ports, for what dom0 owns. Configuration accesses hold [`PCI_LOCK`] so
/// that the address and data ports stay one pair.
#[derive(Clone, Copy)]
struct MachinePorts;

static PCI_LOCK: Mutex<()> = Mutex::new(());

impl HostPorts for MachinePorts {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        // SAFETY: only ports the hypervisor passed through to dom0 (its disk and NIC
        // controllers) get here; reading them has no effect on the hypervisor's own devices.
        unsafe {
            match size {
                1 => u32::from(x86_64::instructions::port::Port::<u8>::new(port).read()),
                2 => u32::from(x86_64::instructions::port::Port::<u16>::new(port).read()),
                _ => x86_64::instructions::port::Port::<u32>::new(port).read(),
            }
        }
    }

    fn write(&mut self, port: u16, size: u8, value: u32) {
        // SAFETY: as in `read`: a port of a controller dom0 owns.
        unsafe {
            match size {
                1 => x86_64::instructions::port::Port::<u8>::new(port).write(value as u8),
                2 => x86_64::instructions::port::Port::<u16>::new(port).write(value as u16),
                _ => x86_64::instructions::port::Port::<u32>::new(port).write(value),
            }
        }
    }

    fn config(&mut self, address: u32, offset: u8, size: u8, write: Option<u32>) -> u32 {
        let _pair = PCI_LOCK.lock();
        let data = 0xcfc + u16::from(offset & 3);
        self.write(0xcf8, 4, address);
        match write {
            Some(v) => {
                self.write(data, size, v);
                0
            }
            None => self.read(data, size),
        }
    }
}

/// The functions of bus 0 dom0 owns, with their BARs sized (run before dom0 starts, while
/// nothing drives them).
pub fn scan_devices() -> Vec<OwnedFunction> {
    crate::io::passthrough::scan(&mut MachinePorts)
}

/// Guest-physical addresses dom0's EPT never maps devices at: its RAM (below `mem_mib`), the
/// virtio windows, and the IOAPIC and LAPIC page range the hypervisor keeps.
fn reserved(base: u64, end: u64, mem_mib: u64) -> bool {
    let virtio = hv_abi::devices::VIRTIO_MMIO_BASE;
    let overlaps = |lo: u64, hi: u64| base < hi && lo < end;
    overlaps(0, mem_mib << 20)
        || overlaps(virtio, virtio + 0x10_0000)
        || overlaps(0xfec0_0000, 0xff00_0000)
        || end > 1 << 39
}

/// The memory BARs of `owned` as 4 KiB-aligned windows to map in dom0's EPT, without those
/// that are empty, overlap one another or land on [`reserved`] addresses (each left out is
/// logged: dom0 then cannot reach that BAR).
pub fn mmio_windows(owned: &[OwnedFunction], mem_mib: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for o in owned {
        for &(base, size) in &o.mmio {
            let lo = base & !0xfff;
            let Some(hi) = base
                .checked_add(size)
                .and_then(|e| e.checked_next_multiple_of(4096))
            else {
                continue;
            };
            if reserved(lo, hi, mem_mib) || out.iter().any(|&(b, l)| lo < b + l && b < hi) {
                log::warn!(
                    "PCI {:02x}:{:02x}.{}: memory BAR {base:#x}+{size:#x} not passed to dom0 (overlaps its RAM, another BAR or the hypervisor's devices)",
                    o.bdf.bus,
                    o.bdf.dev,
                    o.bdf.func
                );
                continue;
            }
            out.push((lo, hi - lo));
        }
    }
    out
}

/// Gives dom0 the machine's disk and network controllers `owned` ([`scan_devices`]): PCI
/// configuration through the filter, the I/O ports of every function (its I/O BARs, and
/// the legacy IDE ports of an IDE controller in compatibility mode), and COM2; their memory BARs are
/// already in its EPT ([`mmio_windows`]). Returns what it got, for the log. The BARs keep the
/// firmware's assignment: dom0 is trusted not to move them (a moved BAR is no longer
/// reachable through its EPT, and its I/O ports no longer passed).
pub fn give_devices(domain: &Domain, owned: &[OwnedFunction]) -> Result<Vec<String>, String> {
    let mut io = domain.io.lock();
    let mut what = Vec::new();
    io.ports
        .register(0xcf8, 8, Box::new(PciFilter::new(MachinePorts)))
        .map_err(|e| alloc::format!("PCI configuration ports: {e:?}"))?;
    *OWNED.lock() = owned.iter().map(|o| o.bdf).collect();
    for o in owned {
        let mut parts: Vec<String> = o
            .ports
            .iter()
            .map(|&(b, n)| alloc::format!("ports {:#x}-{:#x}", b, u32::from(b) + u32::from(n) - 1))
            .collect();
        parts.extend(
            o.mmio
                .iter()
                .map(|&(b, n)| alloc::format!("memory {:#x}-{:#x}", b, b + n - 1)),
        );
        what.push(alloc::format!(
            "PCI {:02x}:{:02x}.{} ({:04x}:{:04x}, class {:06x}): {}",
            o.bdf.bus,
            o.bdf.dev,
            o.bdf.func,
            o.id & 0xffff,
            o.id >> 16,
            o.class >> 8,
            if parts.is_empty() {
                String::from("nothing")
            } else {
                parts.join(", ")
            }
        ));
        for &(base, count) in &o.ports {
            io.ports
                .register(
                    base,
                    count,
                    Box::new(PortPassthrough::new(base, MachinePorts)),
                )
                .map_err(|e| alloc::format!("ports {base:#x}+{count}: {e:?}"))?;
        }
    }
    // The second serial port: dom0's out-of-band management line (the hypervisor keeps COM1).
    io.ports
        .register(COM2, 8, Box::new(PortPassthrough::new(COM2, MachinePorts)))
        .map_err(|e| alloc::format!("COM2 ports: {e:?}"))?;
    what.push(String::from("COM2: ports 0x2f8-0x2ff"));
    Ok(what)
}

/// The second serial port's I/O base.
const COM2: u16 = 0x2f8;

/// The port ranges dom0's accesses reach without an exit (its I/O bitmaps): every port of
/// the functions it owns ([`give_devices`] registers the same ranges on its port bus too) and
/// COM2, less any the hypervisor keeps ([`crate::io::passthrough::direct_ports`]).
pub fn direct_ports(owned: &[OwnedFunction]) -> Vec<(u16, u16)> {
    crate::io::passthrough::direct_ports(owned, &[(COM2, 8)])
}

/// A call's result: a value (0 or more) or a status.
fn ret_value(r: Result<u64, hv_abi::Status>) -> Dom0Reply {
    Dom0Reply::Return(match r {
        Ok(v) => v as i64,
        Err(s) => s as i64,
    })
}

/// Frames wait for dom0 on an uplink: its IO_WAIT ends (or returns at once).
pub fn frames_for_dom0() {
    // One wake-up per wait: the flag stays set until dom0's halted vCPU takes it.
    if !EVENT.swap(true, Ordering::AcqRel) {
        super::queue::wake_vcpu(0, 0);
    }
}

/// One of dom0's calls, made by `domain` (privileged: the dispatcher checked).
pub fn call(domain: &Arc<Domain>, call: Dom0Call) -> Dom0Reply {
    use hv_abi::Status;
    let ret = |s: Status| Dom0Reply::Return(s as i64);
    match call {
        Dom0Call::RingSetup { ring, data } => {
            let Some(mem) = domain.memory() else {
                return ret(Status::NoResources);
            };
            let host = match RingHost::setup(mem.ram.mem(), ring, data) {
                Ok(h) => h,
                Err(e) => {
                    println!("[dom{}] IO_RING_SETUP refused: {e}", domain.id);
                    return ret(Status::BadAddress);
                }
            };
            let (old, disks) = {
                let mut l = LINK.lock();
                let old = l.dom0.replace(Dom0 {
                    mem,
                    ring: host,
                    waiting: false,
                });
                let disks: Vec<Arc<GuestDisk>> = l.disks.iter().filter_map(Weak::upgrade).collect();
                (old, disks)
            };
            if let Some(mut old) = old {
                deliver(old.ring.fail_all());
            }
            for d in disks {
                d.retry();
            }
            ret(Status::Ok)
        }
        Dom0Call::DiskOffer {
            name,
            sectors,
            read_only,
        } => {
            let mut l = LINK.lock();
            let handle = match l.offers.iter().position(|o| o.name == name) {
                Some(i) => {
                    l.offers[i].sectors = sectors;
                    l.offers[i].read_only = read_only;
                    i + 1
                }
                // Bounded: the hypervisor's heap is not dom0's to fill.
                None if l.offers.len() >= MAX_OFFERS => return ret(Status::NoResources),
                None => {
                    l.offers.push(Offer {
                        name,
                        sectors,
                        read_only,
                    });
                    l.offers.len()
                }
            };
            Dom0Reply::Return(handle as i64)
        }
        Dom0Call::DmaMap { gpa, len } => {
            let Some(mem) = domain.memory() else {
                return ret(Status::NoResources);
            };
            match mem
                .ram
                .mem()
                .host_contiguous(hv_guest_mem::GuestAddr(gpa), len)
            {
                Some(hpa) => Dom0Reply::Return(hpa as i64),
                None => ret(Status::BadAddress),
            }
        }
        Dom0Call::Ready => {
            READY.fetch_add(1, Ordering::AcqRel);
            ret(Status::Ok)
        }
        Dom0Call::Kick => {
            reap();
            ret(Status::Ok)
        }
        Dom0Call::Uplink { network } => ret_value(super::net::attach_uplink(domain, &network)),
        Dom0Call::NetSend { handle, gpa, len } => {
            ret_value(super::net::uplink_send(domain, handle, gpa, len).map(|()| 0))
        }
        Dom0Call::NetRecv { handle, gpa, cap } => {
            ret_value(super::net::uplink_recv(domain, handle, gpa, cap))
        }
        Dom0Call::Wait { .. } => {
            reap();
            // Before the link's lock: the networks' locks are never taken under it.
            let frames = super::net::uplink_pending();
            let mut l = LINK.lock();
            match l.dom0.as_mut() {
                Some(d)
                    if !frames
                        && !d.ring.unread(d.mem.ram.mem())
                        && !d.ring.responses_waiting(d.mem.ram.mem()) =>
                {
                    d.waiting = true;
                    Dom0Reply::Wait
                }
                Some(_) => ret(Status::Ok),
                None => ret(Status::InvalidArgument),
            }
        }
    }
}
