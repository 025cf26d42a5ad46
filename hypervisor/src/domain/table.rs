//! The domain table: every domain, its shared state (what the console shows, its vCPUs' start
//! requests, its I/O buses) and its memory (RAM chunks and EPT, freed with the last vCPU).
//! Creating a domain allocates and loads; its vCPUs are made and run by `crate::vcpu::run`.
//!
//! Other CPUs only flip a domain's state (`destroy`) and read its counters; the CPU running a
//! vCPU notices at its next exit (the preemption timer bounds the wait) and tears it down.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use log::info;
use spin::Mutex;

use crate::arch::percpu::{self, CPUS};
use crate::domain::config::DomainConfig;
use crate::domain::loader::{self, BootState};
use crate::domain::memory::{CHUNK, GuestAddr, GuestMemory, Region, RegionRam};
use crate::io::DomainIo;
use crate::mm::PhysMem;
use crate::mm::frames::{FrameAllocator, FrameRun};
use crate::println;
use crate::vmx::caps::VmxCaps;
use crate::vmx::ept::{Ept, MemType, PageSizes, Perm, TableFrames};
use crate::vmx::exit::REASON_SLOTS;
use crate::vmx::hw::Vmcs;
use crate::vmx::iobitmap::{ALL_EXIT, IoBitmaps};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DomainState {
    Running = 0,
    /// The operator asked for it to stop; its CPU will tear it down.
    Destroying = 1,
    Stopped = 2,
    /// Held by the operator: its vCPUs do not run until `resume`.
    Paused = 3,
}

/// What the console shows of a domain; shared between CPUs.
pub struct Domain {
    pub id: u32,
    /// dom0 (`role=dom0`): it may make dom0's calls, and its end ends the block backend
    /// (`vcpu::dom0::gone`, called by the run loop).
    pub privileged: bool,
    pub name: String,
    pub mem_mib: u64,
    /// The CPU vCPU 0 started on (the scheduler may move it; `vcpu::queue::cpu_of`).
    pub cpu: usize,
    pub vcpus: u32,
    /// A full PC for an unmodified kernel (a Linux bzImage): ACPI tables, a local APIC per
    /// vCPU, an IOAPIC; `false` for the small Rust guests of this project's own entry ABI.
    pub pc: bool,
    /// Bit i set once vCPU i has been started (vCPU 0 from the beginning).
    pub(crate) started: AtomicU64,
    /// Start requests for vCPUs 1..: `(rip, rsp)`.
    /// Start requests for vCPUs 1..: `(rip, rsp, TSC of the request)`.
    pub(crate) starts: Vec<Mutex<Option<(u64, u64, u64)>>>,
    /// vCPUs not yet torn down.
    pub(crate) alive: AtomicU32,
    pub(crate) vmreads: AtomicU64,
    pub(crate) vmwrites: AtomicU64,
    /// TSC ticks the hypervisor spent handling this domain's exits, by reason (as `exits`).
    pub exit_ticks: [AtomicU64; REASON_SLOTS],
    /// Its I/O bitmaps when some ports reach the hardware directly (dom0's devices); `None`:
    /// every port exits ([`ALL_EXIT`]).
    io_bitmaps: Option<Box<IoBitmaps>>,
    pub(crate) state: AtomicU8,
    /// TSC of the operator's last destroy or pause request (0: none yet).
    pub(crate) request_tsc: AtomicU64,
    pub exits: [AtomicU64; REASON_SLOTS],
    /// Device interrupts raised for vCPU 0 (bit i: virtio device i), taken by its run loop
    /// before the next entry; a halted vCPU 0 wakes for them.
    pub(crate) irqs: AtomicU64,
    /// Its port and MMIO buses, shared by its vCPUs.
    pub(crate) io: Mutex<DomainIo>,
    /// Its memory while any vCPU holds it (for the EPT audit; the vCPUs own it).
    mem: Mutex<alloc::sync::Weak<DomainMem>>,
    /// Why it stopped (empty while running).
    pub stop_reason: Mutex<String>,
    /// The guest reset its machine (a PC's reset register or keyboard-controller pulse): once
    /// its last vCPU is gone, the domain starts again from its boot module ([`take_reboots`]).
    pub(crate) rebooting: core::sync::atomic::AtomicBool,
}

/// Names of domains that rebooted and whose memory is back, for the console task to start
/// again from their boot modules.
static REBOOTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Asks for domain `name` to be started again (its old instance is gone).
pub(crate) fn request_reboot(name: String) {
    REBOOTS.lock().push(name);
}

/// The domains waiting to be started again after a reboot.
pub fn take_reboots() -> Vec<String> {
    core::mem::take(&mut *REBOOTS.lock())
}

impl Domain {
    pub fn state(&self) -> DomainState {
        match self.state.load(Ordering::Acquire) {
            0 => DomainState::Running,
            1 => DomainState::Destroying,
            3 => DomainState::Paused,
            _ => DomainState::Stopped,
        }
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }

    /// Ends the domain with `why` unless it already ended; says so on the console once.
    /// Returns whether this call ended it.
    pub(crate) fn finish(&self, why: String) -> bool {
        let prev = self
            .state
            .swap(DomainState::Stopped as u8, Ordering::AcqRel);
        if prev == DomainState::Stopped as u8 {
            return false;
        }
        println!("[dom{}] stopped: {why}", self.id);
        info!(
            "domain {} ({}) stopped after {} exits ({} VMREADs, {} VMWRITEs): {why}",
            self.id,
            self.name,
            self.total_exits(),
            self.vmreads.load(Ordering::Relaxed),
            self.vmwrites.load(Ordering::Relaxed)
        );
        *self.stop_reason.lock() = why;
        true
    }
}

/// Every domain, and the next id to give. One exists, owned by the kernel (`kernel.rs`) and
/// reached through the references it hands out (the console task, boot-module loading).
pub struct DomainTable {
    domains: Mutex<Vec<Arc<Domain>>>,
    next_id: AtomicU32,
}

impl Default for DomainTable {
    fn default() -> Self {
        Self::new()
    }
}

impl DomainTable {
    pub const fn new() -> Self {
        DomainTable {
            domains: Mutex::new(Vec::new()),
            next_id: AtomicU32::new(1),
        }
    }

    /// A snapshot of every domain, for the console.
    pub fn list(&self) -> Vec<Arc<Domain>> {
        self.domains.lock().clone()
    }

    /// Domain `id` (the newest of that id), or an error that says there is none.
    pub fn find(&self, id: u32) -> Result<Arc<Domain>, String> {
        // The newest of that id (a restarted dom0 is domain 0 again).
        self.domains
            .lock()
            .iter()
            .rev()
            .find(|d| d.id == id)
            .cloned()
            .ok_or_else(|| alloc::format!("no domain {id}; 'domains' lists them"))
    }

    /// Asks domain `id` to stop; the CPUs running its vCPUs are kicked. Errors say why nothing
    /// happened.
    pub fn destroy(&self, id: u32) -> Result<(), String> {
        let d = self.find(id)?;
        d.request_tsc
            .store(crate::arch::cpu::rdtsc(), Ordering::Relaxed);
        // A running or a paused domain can be destroyed.
        for from in [DomainState::Running, DomainState::Paused] {
            if d.state
                .compare_exchange(
                    from as u8,
                    DomainState::Destroying as u8,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                kick_cpus_running(id);
                return Ok(());
            }
        }
        Err(alloc::format!("domain {id} is not running"))
    }

    /// Holds domain `id`: its vCPUs leave their CPUs (kicked) and are not run until
    /// [`DomainTable::resume`].
    pub fn pause(&self, id: u32) -> Result<(), String> {
        let d = self.find(id)?;
        d.request_tsc
            .store(crate::arch::cpu::rdtsc(), Ordering::Relaxed);
        match d.state.compare_exchange(
            DomainState::Running as u8,
            DomainState::Paused as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                kick_cpus_running(id);
                Ok(())
            }
            Err(s) if s == DomainState::Paused as u8 => {
                Err(alloc::format!("domain {id} is already paused"))
            }
            Err(_) => Err(alloc::format!("domain {id} is not running")),
        }
    }

    /// Lets a paused domain run again.
    pub fn resume(&self, id: u32) -> Result<(), String> {
        let d = self.find(id)?;
        d.state
            .compare_exchange(
                DomainState::Paused as u8,
                DomainState::Running as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .map(|_| ())
            .map_err(|_| alloc::format!("domain {id} is not paused"))
    }
}

/// Sends the kick IPI to `cpu` unless it is this one: a guest it runs exits, an idle CPU wakes
/// from HLT, and its run loop looks at its queue again.
pub fn kick_cpu(cpu: usize) {
    if cpu != crate::arch::cpu::current_cpu() && cpu < percpu::cpu_count() {
        crate::arch::lapic::send_fixed(
            CPUS[cpu].apic_id.load(Ordering::Relaxed),
            crate::arch::trap::KICK_VECTOR,
        );
    }
}

/// Sends the kick IPI to every other CPU that is running a vCPU of domain `id`, so that it
/// exits now and sees the change instead of at the end of its slice.
pub fn kick_cpus_running(id: u32) {
    for (i, c) in CPUS.iter().enumerate().take(percpu::cpu_count()) {
        if c.running_domain.load(Ordering::Acquire) == id {
            kick_cpu(i);
        }
    }
}

/// RAM of a domain: 2 MiB host chunks at guest-physical 0, in order, as the regions of one
/// [`RegionRam`] (the guest-memory layer every user of guest RAM goes through).
pub struct DomainRam {
    chunks: Vec<FrameRun>,
    ram: RegionRam,
}

impl DomainRam {
    /// RAM over `chunks` (identity-mapped, owned by this domain from now on); on a refusal the
    /// chunks come back with the reason.
    fn new(chunks: Vec<FrameRun>) -> Result<DomainRam, (String, Vec<FrameRun>)> {
        let regions = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| Region {
                gpa: i as u64 * CHUNK,
                host: c.addr().0 as *mut u8,
                len: c.bytes(),
            })
            .collect();
        // SAFETY: every chunk was just taken from the frame allocator for this domain alone, is
        // identity-mapped (host virtual = host physical, crate-level assumption) and stays
        // allocated while this value owns it (freed only when `DomainMem` drops, with the
        // RegionRam); the hypervisor holds no Rust reference into guest RAM.
        match unsafe { RegionRam::new(regions) } {
            Ok(ram) => Ok(DomainRam { chunks, ram }),
            Err(e) => Err((alloc::format!("RAM: {e:?}"), chunks)),
        }
    }

    /// The guest-memory view of this RAM.
    pub fn mem(&self) -> &RegionRam {
        &self.ram
    }
}

/// What a domain's vCPUs share: its RAM, its EPT and the frames of the EPT's tables. Dropped
/// with the last vCPU (or when a creation fails half-way), which gives every frame back.
pub struct DomainMem {
    /// Where its frames go back.
    phys: &'static PhysMem,
    pub(crate) ram: DomainRam,
    pub(crate) ept: Option<Ept>,
    /// The EPT's table frames, owned here (the EPT builder itself keeps plain addresses).
    tables: Vec<FrameRun>,
    /// Device register windows mapped at their own addresses (dom0's controllers).
    devices: Vec<(u64, u64)>,
}

impl Domain {
    /// The I/O bitmaps its vCPUs run with.
    pub(crate) fn io_bitmaps(&self) -> &IoBitmaps {
        self.io_bitmaps.as_deref().unwrap_or(&ALL_EXIT)
    }

    /// Its memory, while any vCPU holds it.
    pub(crate) fn memory(&self) -> Option<Arc<DomainMem>> {
        self.mem.lock().upgrade()
    }

    /// Audits this domain's EPT (see `vmx::audit`): the number of leaves and what is wrong.
    /// `None` once its memory is gone (all vCPUs retired).
    pub fn audit_ept(&self) -> Option<(usize, Vec<crate::vmx::audit::Violation>)> {
        let mem = self.mem.lock().upgrade()?;
        let ept = mem.ept.as_ref()?;
        let leaves = ept.leaves(&mut ReadTables);
        let chunks: Vec<u64> = mem.ram.chunks.iter().map(|c| c.addr().0).collect();
        let tables: Vec<u64> = mem.tables.iter().map(|t| t.addr().0).collect();
        let v = crate::vmx::audit::audit(
            &leaves,
            &crate::vmx::audit::Owned {
                chunk: CHUNK,
                chunks: &chunks,
                tables: &tables,
                devices: &mem.devices,
            },
        );
        Some((leaves.len(), v))
    }
}

/// Reads an existing EPT's tables through the identity map (never allocates).
struct ReadTables;

impl TableFrames for ReadTables {
    fn alloc_table(&mut self) -> Option<u64> {
        None
    }

    fn entries(&mut self, addr: u64) -> &mut [u64; 512] {
        // SAFETY: `addr` is a table of an EPT that `DomainMem` owns (the trait's contract: the
        // walker only follows the EPT's own entries), identity-mapped and 4 KiB aligned. EPTs
        // are not changed after creation, so nothing writes the table while this reference
        // lives (the CPU's own walks are not Rust accesses); the walker only reads through it.
        unsafe { &mut *(addr as *mut [u64; 512]) }
    }
}

/// Bumped whenever a domain's EPT tables go back to the allocator. A CPU may still cache
/// translations of that EPT (its vCPUs ran there and moved on), and the root frame may become
/// another domain's: every CPU compares this with what it saw before each slice and drops its
/// cached EPT translations (INVEPT all-context) when it changed.
pub static EPT_GENERATION: AtomicU64 = AtomicU64::new(0);

impl Drop for DomainMem {
    fn drop(&mut self) {
        let mut guard = self.phys.lock();
        let Some(frames) = guard.as_mut() else { return };
        // Before any table frame can be handed out again (the allocator's lock is held).
        EPT_GENERATION.fetch_add(1, Ordering::AcqRel);
        for t in self.tables.drain(..) {
            crate::mm::give_back(frames, t);
        }
        for c in self.ram.chunks.drain(..) {
            crate::mm::give_back(frames, c);
        }
    }
}

/// EPT tables come from the frame allocator, are recorded in their owner's list and are
/// reached through the identity map.
struct Frames<'a, 'b> {
    alloc: &'a mut FrameAllocator<'static>,
    owned: &'b mut Vec<FrameRun>,
}

impl TableFrames for Frames<'_, '_> {
    fn alloc_table(&mut self) -> Option<u64> {
        let run = self.alloc.alloc()?;
        let f = run.addr().0;
        // SAFETY: a fresh frame owned by `run` (kept in the EPT owner's list), identity-mapped.
        unsafe { core::ptr::write_bytes(f as *mut u8, 0, 4096) };
        self.owned.push(run);
        Some(f)
    }

    fn entries(&mut self, addr: u64) -> &mut [u64; 512] {
        // SAFETY: `addr` is a table frame this EPT allocated (the trait's contract), owned by
        // it, identity-mapped and 4 KiB aligned; the `&mut self` borrow keeps the reference
        // unique for its lifetime.
        unsafe { &mut *(addr as *mut [u64; 512]) }
    }
}

/// A domain built and in the table, with what its vCPUs need to start
/// ([`crate::vcpu::run::spawn`] queues them).
pub struct NewDomain {
    pub domain: Arc<Domain>,
    pub mem: Arc<DomainMem>,
    pub boot: BootState,
    /// The EPT pointer for every vCPU's VMCS.
    pub eptp: crate::vmx::ept::Eptp,
    /// One VMCS per vCPU, and the CPU each vCPU starts on.
    pub vmcss: Vec<Vmcs>,
    pub placement: Vec<usize>,
    /// Whether each vCPU stays on its CPU (`cpu=N` on the module line).
    pub fixed_cpu: bool,
    /// Weight, cap, reservation and pinning from the module line.
    pub sched: crate::sched::keys::Change,
}

/// Builds a domain from an ELF image: RAM from `phys`, the image loaded into it, its EPT and one
/// VMCS per vCPU; adds it to `table`. Takes the frame allocator's lock itself (never call it
/// with the lock held). `mmio` are device register windows (base, length; 4 KiB-aligned)
/// mapped at their own addresses, uncached: dom0's controllers, empty for every other domain;
/// `direct_ports` are port ranges its accesses reach without an exit (dom0's devices' ports).
pub fn create(
    table: &DomainTable,
    phys: &'static PhysMem,
    (image, initrd): (&[u8], Option<&[u8]>),
    cfg: &DomainConfig,
    caps: &VmxCaps,
    mmio: &[(u64, u64)],
    direct_ports: &[(u16, u16)],
) -> Result<NewDomain, String> {
    let pc = hv_platform::bootparams::is_bzimage(image);
    if initrd.is_some() && !pc {
        return Err(String::from(
            "an initrd (role=initrd for= this domain) was given, but the image is not a Linux bzImage",
        ));
    }
    if pc && cfg.dom0 {
        return Err(String::from(
            "role=dom0 with a Linux kernel: dom0 is this project's own image (dom0-agent)",
        ));
    }
    // A PC's ACPI tables describe its CPUs and virtio windows (disk k at window 2k, NIC k
    // at 2k+1, each on IOAPIC pin 16 + window).
    let tables = if pc {
        let windows: Vec<hv_platform::acpi::VirtioMmio> = (0..cfg.disks.len())
            .map(hv_abi::devices::disk_window)
            .chain((0..cfg.nics.len()).map(hv_abi::devices::nic_window))
            .map(|w| hv_platform::acpi::VirtioMmio {
                base: hv_abi::devices::VIRTIO_MMIO_BASE
                    + w as u64 * hv_abi::devices::VIRTIO_MMIO_STRIDE,
                size: hv_abi::devices::VIRTIO_MMIO_STRIDE as u32,
                gsi: crate::io::pc::virtio_gsi(w),
            })
            .collect();
        let built = hv_platform::acpi::build(
            &hv_platform::acpi::Config {
                vcpus: cfg.vcpus,
                devices: &windows,
                power_button_gsi: None,
                oem_id: *b"HVRUST",
            },
            hv_platform::acpi::ACPI_BASE,
        )
        .map_err(|e| alloc::format!("ACPI tables: {e}"))?;
        Some(built)
    } else {
        None
    };
    let online: Vec<usize> = (0..percpu::cpu_count())
        .filter(|&i| CPUS[i].state() == percpu::CpuState::Online)
        .collect();
    if online.is_empty() {
        return Err(String::from("no CPU online"));
    }
    let id = if cfg.dom0 {
        let running = table
            .list()
            .iter()
            .any(|d| d.privileged && d.state() != DomainState::Stopped);
        if running {
            return Err(String::from("role=dom0: dom0 is already running"));
        }
        0
    } else {
        table.next_id.fetch_add(1, Ordering::Relaxed)
    };
    let first = match cfg.cpu {
        Some(c) => online
            .iter()
            .position(|&o| o == c)
            .ok_or_else(|| alloc::format!("cpu={c}: no such CPU online"))?,
        None => (id as usize).saturating_sub(1) % online.len(),
    };
    let placement: Vec<usize> = (0..cfg.vcpus as usize)
        .map(|i| online[(first + i) % online.len()])
        .collect();

    // RAM, then the image into it (no lock needed for the copy).
    let mut chunks = Vec::new();
    {
        let mut guard = phys.lock();
        let frames = guard.as_mut().ok_or("no frame allocator")?;
        for _ in 0..cfg.mem_mib / 2 {
            match frames.alloc_contiguous(CHUNK / 4096, CHUNK, u64::MAX) {
                Some(f) => chunks.push(f),
                None => {
                    for c in chunks {
                        crate::mm::give_back(frames, c);
                    }
                    return Err(alloc::format!(
                        "not enough free memory for {} MiB",
                        cfg.mem_mib
                    ));
                }
            }
        }
    }
    let ram = match DomainRam::new(chunks) {
        Ok(r) => r,
        Err((e, chunks)) => {
            if let Some(frames) = phys.lock().as_mut() {
                for c in chunks {
                    crate::mm::give_back(frames, c);
                }
            }
            return Err(e);
        }
    };
    // From here `mem` owns every frame: any early return gives them back (its Drop takes the
    // allocator's lock, so the lock is never held across a return).
    let mut mem = DomainMem {
        phys,
        ram,
        ept: None,
        tables: Vec::new(),
        devices: mmio.to_vec(),
    };
    let boot: BootState = mem
        .ram
        .mem()
        .zero(GuestAddr(0), mem.ram.mem().end())
        .map_err(loader::LoadError::Memory)
        .and_then(|()| match &tables {
            Some(t) => loader::load_linux(
                image,
                initrd,
                (hv_platform::acpi::ACPI_BASE, &t.bytes, t.rsdp),
                mem.ram.mem(),
                cfg.guest_cmdline,
            ),
            None => loader::load(image, mem.ram.mem(), cfg.guest_cmdline),
        })
        .map_err(|e| alloc::format!("cannot load the image: {e}"))?;
    let chunk_addrs: Vec<u64> = mem.ram.chunks.iter().map(|c| c.addr().0).collect();
    let sizes = PageSizes {
        two_mib: caps.ept_2m(),
        one_gib: caps.ept_1g(),
    };
    let mut guard = phys.lock();
    let frames = guard.as_mut().ok_or("no frame allocator")?;
    let built = {
        let mut tf = Frames {
            alloc: frames,
            owned: &mut mem.tables,
        };
        Ept::new(&mut tf, sizes).and_then(|mut ept| {
            for (i, &c) in chunk_addrs.iter().enumerate() {
                ept.map(
                    &mut tf,
                    i as u64 * CHUNK,
                    c,
                    CHUNK,
                    Perm::RWX,
                    MemType::WriteBack,
                )?;
            }
            // Device registers passed through (dom0's controllers): at their own addresses,
            // uncached, never executable.
            for &(base, len) in mmio {
                ept.map(&mut tf, base, base, len, Perm::RW, MemType::Uncached)?;
            }
            Ok(ept)
        })
    };
    let eptp = match built {
        Ok(ept) => {
            let eptp = ept.eptp(caps.ept_ad());
            mem.ept = Some(ept);
            eptp
        }
        Err(e) => {
            drop(guard);
            return Err(alloc::format!("EPT: {e:?}"));
        }
    };
    let mut vmcss = Vec::new();
    for _ in 0..cfg.vcpus {
        match Vmcs::new(caps, frames) {
            Ok(v) => vmcss.push(v),
            Err(e) => {
                for v in vmcss {
                    crate::mm::give_back(frames, v.release());
                }
                drop(guard);
                return Err(alloc::format!("VMCS: {e}"));
            }
        }
    }
    drop(guard);

    let domain = Arc::new(Domain {
        id,
        privileged: cfg.dom0,
        name: String::from(cfg.name),
        mem_mib: cfg.mem_mib,
        cpu: placement[0],
        vcpus: cfg.vcpus,
        pc,
        started: AtomicU64::new(1),
        starts: (0..cfg.vcpus).map(|_| Mutex::new(None)).collect(),
        alive: AtomicU32::new(cfg.vcpus),
        vmreads: AtomicU64::new(0),
        vmwrites: AtomicU64::new(0),
        exit_ticks: Default::default(),
        io_bitmaps: (!direct_ports.is_empty()).then(|| {
            let mut b = Box::new(IoBitmaps::ALL_EXIT);
            for &(base, count) in direct_ports {
                b.pass(base, count);
            }
            b
        }),
        state: AtomicU8::new(DomainState::Running as u8),
        request_tsc: AtomicU64::new(0),
        exits: Default::default(),
        irqs: AtomicU64::new(0),
        io: Mutex::new(if pc {
            DomainIo::pc(cfg.vcpus)
        } else {
            DomainIo::standard()
        }),
        mem: Mutex::new(alloc::sync::Weak::new()),
        stop_reason: Mutex::new(String::new()),
        rebooting: core::sync::atomic::AtomicBool::new(false),
    });
    let mem = Arc::new(mem);
    *domain.mem.lock() = Arc::downgrade(&mem);
    table.domains.lock().push(domain.clone());
    Ok(NewDomain {
        domain,
        mem,
        boot,
        eptp,
        vmcss,
        placement,
        fixed_cpu: cfg.cpu.is_some(),
        sched: cfg.sched,
    })
}
