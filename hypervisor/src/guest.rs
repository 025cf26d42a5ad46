//! Running domains on bare metal: the domain table, creation from boot modules, each CPU's
//! round-robin run loop over its vCPUs, and VM-exit handling.
//!
//! A domain has one or more vCPUs, each pinned to one CPU, which owns it (its `Vcpu` lives in
//! that CPU's run queue); the vCPUs share the domain's RAM and EPT (`DomainMem`), freed when the
//! last vCPU is gone. vCPU 0 starts at the kernel's entry; the others wait until a VCPU_START
//! hypercall. Other CPUs only flip the domain's state (`destroy`) and read its counters; each
//! owning CPU notices at its next exit (the preemption timer bounds the wait) and tears its vCPU
//! down. A domain that misbehaves (triple fault, access outside its memory, unhandled exit) is
//! stopped with a report; the host and the other domains keep running.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use log::info;
use spin::Mutex;

use crate::arch::cpu;
use crate::domain::config::DomainConfig;
use crate::domain::loader::{self, BootState};
use crate::domain::memory::{BadGpa, CHUNK, GuestMemory, GuestPhysAddr, pieces};
use crate::io::DomainIo;
use crate::mm::frames::FrameAllocator;
use crate::percpu::{self, CPUS, MAX_CPUS};
use crate::println;
use crate::vcpu::dispatch::{self, Action, Platform, VcpuCore};
use crate::vcpu::exit::Exit;
use crate::vmx::caps::VmxCaps;
use crate::vmx::ept::{Ept, MemType, PageSizes, Perm, TableFrames};
use crate::vmx::exit::{ExitReason, REASON_SLOTS};
use crate::vmx::fpu::{self, FpuArea};
use crate::vmx::hw::{ActiveVmcs, FixedBits, GuestRegs, Vmcs, VmxCpu, fields as f};
use crate::vmx::setup::{GuestSetup, setup_vmcs};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DomainState {
    Running = 0,
    /// The operator asked for it to stop; its CPU will tear it down.
    Destroying = 1,
    Stopped = 2,
}

/// What the console shows of a domain; shared between CPUs.
pub struct Domain {
    pub id: u32,
    pub name: String,
    pub mem_mib: u64,
    /// The CPU of vCPU 0.
    pub cpu: usize,
    pub vcpus: u32,
    /// Bit i set once vCPU i has been started (vCPU 0 from the beginning).
    started: AtomicU64,
    /// Start requests for vCPUs 1..: `(rip, rsp)`.
    starts: Vec<Mutex<Option<(u64, u64)>>>,
    /// vCPUs not yet torn down.
    alive: AtomicU32,
    vmreads: AtomicU64,
    vmwrites: AtomicU64,
    state: AtomicU8,
    pub exits: [AtomicU64; REASON_SLOTS],
    /// Its port and MMIO buses, shared by its vCPUs.
    io: Mutex<DomainIo>,
    /// Why it stopped (empty while running).
    pub stop_reason: Mutex<String>,
}

impl Domain {
    pub fn state(&self) -> DomainState {
        match self.state.load(Ordering::Acquire) {
            0 => DomainState::Running,
            1 => DomainState::Destroying,
            _ => DomainState::Stopped,
        }
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }

    /// Ends the domain with `why` unless it already ended; says so on the console once.
    fn finish(&self, why: String) {
        let prev = self
            .state
            .swap(DomainState::Stopped as u8, Ordering::AcqRel);
        if prev == DomainState::Stopped as u8 {
            return;
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
    }
}

static DOMAINS: Mutex<Vec<Arc<Domain>>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU32 = AtomicU32::new(1);
static NEXT_VPID: AtomicU16 = AtomicU16::new(1);
/// TSC ticks per VM time slice (10 ms), set at boot.
pub static SLICE_TSC: AtomicU64 = AtomicU64::new(10_000_000);

#[allow(clippy::declare_interior_mutable_const)] // only initialises the array below
const EMPTY_QUEUE: Mutex<VecDeque<Box<Vcpu>>> = Mutex::new(VecDeque::new());
/// Each CPU's vCPUs, in round-robin order.
static RUN_QUEUES: [Mutex<VecDeque<Box<Vcpu>>>; MAX_CPUS] = [EMPTY_QUEUE; MAX_CPUS];

/// A snapshot of every domain, for the console.
pub fn domains() -> Vec<Arc<Domain>> {
    DOMAINS.lock().clone()
}

/// Asks domain `id` to stop. Errors say why nothing happened.
pub fn destroy(id: u32) -> Result<(), String> {
    let d = DOMAINS.lock().iter().find(|d| d.id == id).cloned();
    let Some(d) = d else {
        return Err(alloc::format!("no domain {id}; 'domains' lists them"));
    };
    match d.state.compare_exchange(
        0,
        DomainState::Destroying as u8,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => Ok(()),
        Err(_) => Err(alloc::format!("domain {id} is not running")),
    }
}

/// RAM of a domain: 2 MiB host chunks at guest-physical 0, in order.
pub struct DomainRam {
    chunks: Vec<u64>,
}

impl GuestMemory for DomainRam {
    fn size(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK
    }

    fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), BadGpa> {
        self.check(gpa, buf.len() as u64)?;
        for (chunk, off, at, n) in pieces(gpa.0, buf.len()) {
            let src = (self.chunks[chunk] + off) as *const u8;
            // SAFETY: `check` proved the range is inside this domain's chunks, which it owns
            // and which are identity-mapped; the copy reads bytes only (the guest may change
            // them concurrently, which can only give it garbage back).
            unsafe { core::ptr::copy_nonoverlapping(src, buf[at..at + n].as_mut_ptr(), n) };
        }
        Ok(())
    }

    fn write(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), BadGpa> {
        self.check(gpa, data.len() as u64)?;
        for (chunk, off, at, n) in pieces(gpa.0, data.len()) {
            let dst = (self.chunks[chunk] + off) as *mut u8;
            // SAFETY: as in `read`; the destination is this domain's own RAM.
            unsafe { core::ptr::copy_nonoverlapping(data[at..at + n].as_ptr(), dst, n) };
        }
        Ok(())
    }
}

/// What a domain's vCPUs share: its RAM and its EPT. Dropped with the last vCPU, which gives
/// the frames back.
struct DomainMem {
    ram: DomainRam,
    ept: Ept,
}

impl Drop for DomainMem {
    fn drop(&mut self) {
        let mut guard = crate::kernel::FRAMES.lock();
        let Some(frames) = guard.as_mut() else { return };
        let tables = self.ept.tables(&mut Frames(frames));
        for t in tables {
            let _ = frames.free_addr(crate::mm::HostPhysAddr(t));
        }
        release_chunks(frames, &self.ram.chunks);
    }
}

/// EPT tables come from the frame allocator and are reached through the identity map.
struct Frames<'a>(&'a mut FrameAllocator<'static>);

impl TableFrames for Frames<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        let f = self.0.alloc_contiguous(1, 4096, u64::MAX)?.leak().0;
        // SAFETY: a fresh frame owned by the EPT, identity-mapped.
        unsafe { core::ptr::write_bytes(f as *mut u8, 0, 4096) };
        Some(f)
    }

    fn entries(&mut self, addr: u64) -> &mut [u64; 512] {
        // SAFETY: `addr` is a table frame this EPT allocated (the trait's contract), owned by
        // it, identity-mapped and 4 KiB aligned; the `&mut self` borrow keeps the reference
        // unique for its lifetime.
        unsafe { &mut *(addr as *mut [u64; 512]) }
    }
}

/// A virtual CPU, owned by the run queue of the CPU it is pinned to.
pub struct Vcpu {
    domain: Arc<Domain>,
    /// vCPU 0 from the start; the others once VCPU_START named them.
    started: bool,
    /// Registers, MSRs, timer and XCR0: what the exit dispatcher works on.
    core: VcpuCore,
    vmcs: Option<Vmcs>,
    setup: GuestSetup,
    mem: Arc<DomainMem>,
    /// Whether the VMCS has been filled.
    ready: bool,
    /// Halted until this CPU's tick count passes this value.
    halted_at_tick: Option<u64>,
    /// FXSAVE area of the guest's x87/SSE state, swapped when this CPU changes vCPU.
    fpu: Box<FpuArea>,
}

impl Vcpu {
    /// Whether the vCPU still waits in HLT: until its timer's deadline when armed, else until
    /// the next tick of its CPU.
    fn still_halted(&self, cpu: usize) -> bool {
        match (self.halted_at_tick, self.core.timer.deadline()) {
            (None, _) => false,
            (Some(_), Some(deadline)) => cpu::rdtsc() < deadline,
            (Some(t), None) => CPUS[cpu].ticks.load(Ordering::Relaxed) <= t,
        }
    }

    /// A key unique to this vCPU among all domains.
    fn key(&self) -> u64 {
        (u64::from(self.domain.id) << 32) | u64::from(self.core.index)
    }
}

/// Gives RAM chunks back (on a failed creation, before a `DomainMem` owns them).
fn release_chunks(frames: &mut FrameAllocator<'static>, chunks: &[u64]) {
    for &c in chunks {
        for i in 0..CHUNK / 4096 {
            let _ = frames.free_addr(crate::mm::HostPhysAddr(c + i * 4096));
        }
    }
}

/// Builds a domain from an ELF image and queues its vCPUs on CPUs. Takes the frame allocator's
/// lock itself (never call it with the lock held).
pub fn create(image: &[u8], cfg: &DomainConfig, caps: &VmxCaps) -> Result<Arc<Domain>, String> {
    let online: Vec<usize> = (0..percpu::cpu_count())
        .filter(|&i| CPUS[i].state() == percpu::CpuState::Online)
        .collect();
    if online.is_empty() {
        return Err(String::from("no CPU online"));
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let first = match cfg.cpu {
        Some(c) => online
            .iter()
            .position(|&o| o == c)
            .ok_or_else(|| alloc::format!("cpu={c}: no such CPU online"))?,
        None => (id as usize - 1) % online.len(),
    };
    let placement: Vec<usize> = (0..cfg.vcpus as usize)
        .map(|i| online[(first + i) % online.len()])
        .collect();

    // RAM, then the image into it (no lock needed for the copy).
    let mut chunks = Vec::new();
    {
        let mut guard = crate::kernel::FRAMES.lock();
        let frames = guard.as_mut().ok_or("no frame allocator")?;
        for _ in 0..cfg.mem_mib / 2 {
            match frames.alloc_contiguous(CHUNK / 4096, CHUNK, u64::MAX) {
                Some(f) => chunks.push(f.leak().0),
                None => {
                    release_chunks(frames, &chunks);
                    return Err(alloc::format!(
                        "not enough free memory for {} MiB",
                        cfg.mem_mib
                    ));
                }
            }
        }
    }
    let mut ram = DomainRam { chunks };
    let loaded = ram
        .zero(GuestPhysAddr(0), ram.size())
        .map_err(|_| loader::LoadError::Memory(BadGpa(0)))
        .and_then(|()| loader::load(image, &mut ram, cfg.guest_cmdline));
    let mut guard = crate::kernel::FRAMES.lock();
    let frames = guard.as_mut().ok_or("no frame allocator")?;
    let boot: BootState = match loaded {
        Ok(b) => b,
        Err(e) => {
            release_chunks(frames, &ram.chunks);
            return Err(alloc::format!("cannot load the image: {e}"));
        }
    };
    let sizes = PageSizes {
        two_mib: caps.ept_2m(),
        one_gib: caps.ept_1g(),
    };
    let mut ept = match Ept::new(&mut Frames(frames), sizes) {
        Ok(e) => e,
        Err(e) => {
            release_chunks(frames, &ram.chunks);
            return Err(alloc::format!("EPT: {e:?}"));
        }
    };
    let mut mapped = Ok(());
    for (i, &c) in ram.chunks.iter().enumerate() {
        mapped = mapped.and_then(|()| {
            ept.map(
                &mut Frames(frames),
                i as u64 * CHUNK,
                c,
                CHUNK,
                Perm::RWX,
                MemType::WriteBack,
            )
        });
    }
    let mut vmcss = Vec::new();
    let mut vmcs_error = None;
    if mapped.is_ok() {
        for _ in 0..cfg.vcpus {
            match Vmcs::new(caps, frames) {
                Ok(v) => vmcss.push(v),
                Err(e) => {
                    vmcs_error = Some(e);
                    break;
                }
            }
        }
    }
    let mem = DomainMem { ram, ept };
    if mapped.is_err() || vmcs_error.is_some() {
        for v in vmcss {
            let _ = frames.free_addr(crate::mm::HostPhysAddr(v.release()));
        }
        // `mem` frees the RAM and the tables in its Drop, which takes the lock: release it first.
        drop(guard);
        drop(mem);
        return Err(match vmcs_error {
            Some(e) => alloc::format!("VMCS: {e}"),
            None => alloc::format!("EPT: {:?}", mapped.err()),
        });
    }
    drop(guard);

    let domain = Arc::new(Domain {
        id,
        name: String::from(cfg.name),
        mem_mib: cfg.mem_mib,
        cpu: placement[0],
        vcpus: cfg.vcpus,
        started: AtomicU64::new(1),
        starts: (0..cfg.vcpus).map(|_| Mutex::new(None)).collect(),
        alive: AtomicU32::new(cfg.vcpus),
        vmreads: AtomicU64::new(0),
        vmwrites: AtomicU64::new(0),
        state: AtomicU8::new(DomainState::Running as u8),
        exits: Default::default(),
        io: Mutex::new(DomainIo::standard()),
        stop_reason: Mutex::new(String::new()),
    });
    let eptp = mem.ept.eptp(caps.ept_ad());
    let mem = Arc::new(mem);
    DOMAINS.lock().push(domain.clone());
    for (index, vmcs) in vmcss.into_iter().enumerate() {
        let vpid = match NEXT_VPID.fetch_add(1, Ordering::Relaxed) {
            0 => NEXT_VPID.fetch_add(1, Ordering::Relaxed),
            v => v,
        };
        let regs = if index == 0 {
            GuestRegs {
                rdi: boot.rdi,
                rsi: boot.rsi,
                rdx: boot.rdx,
                ..Default::default()
            }
        } else {
            GuestRegs {
                rdi: index as u64,
                ..Default::default()
            }
        };
        let vcpu = Box::new(Vcpu {
            domain: domain.clone(),
            started: index == 0,
            core: VcpuCore::new(index as u32, regs, fpu::XCR0_RESET),
            vmcs: Some(vmcs),
            setup: GuestSetup { boot, eptp, vpid },
            mem: mem.clone(),
            ready: false,
            halted_at_tick: None,
            fpu: FpuArea::initial(),
        });
        RUN_QUEUES[placement[index]].lock().push_back(vcpu);
    }
    Ok(domain)
}

/// The dispatcher's view of this machine and of the vCPU's domain.
struct HwPlatform<'a> {
    cpu: usize,
    domain: &'a Domain,
}

impl Platform for HwPlatform<'_> {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
        cpu::cpuid(leaf, subleaf)
    }

    #[inline]
    fn rdtsc(&self) -> u64 {
        cpu::rdtsc()
    }

    fn fixed_bits(&self) -> FixedBits {
        FixedBits::read()
    }

    fn xcr0_supported(&self) -> u64 {
        fpu::allowed()
    }

    fn load_xcr0(&mut self, value: u64) {
        fpu::set_xcr0(self.cpu, value);
    }

    fn console_window(&self) -> u64 {
        CPUS[self.cpu].ticks.load(Ordering::Relaxed) / 100
    }

    fn console_line(&mut self, line: &str) {
        println!("[dom{}] {line}", self.domain.id);
    }

    #[inline]
    fn vcpus(&self) -> u32 {
        self.domain.vcpus
    }

    #[inline]
    fn vcpus_started(&self) -> u64 {
        self.domain.started.load(Ordering::Acquire)
    }

    fn start_vcpu(&mut self, index: u32, rip: u64, rsp: u64) -> bool {
        let bit = 1u64 << index;
        if self.domain.started.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return false;
        }
        *self.domain.starts[index as usize].lock() = Some((rip, rsp));
        true
    }

    fn tsc_per_us(&self) -> u64 {
        (SLICE_TSC.load(Ordering::Relaxed) / 10_000).max(1)
    }

    fn with_io<R>(&mut self, f: impl FnOnce(&mut DomainIo) -> R) -> R {
        f(&mut self.domain.io.lock())
    }
}

/// How a slice of guest execution ended.
enum SliceEnd {
    /// Put the vCPU back in the queue.
    Requeue,
    /// Retire this vCPU only (VCPU_OFF, or its domain already ended).
    Retire,
    /// Stop the domain: why, and whether to dump its registers.
    Stop { why: String, dump: bool },
}

/// The per-CPU state of the run loop.
pub struct RunLoop {
    vmx: VmxCpu,
    cpu: usize,
    /// The vCPU (`Vcpu::key`) whose FPU state is in this CPU's registers.
    fpu_owner: u64,
}

impl RunLoop {
    pub fn new(vmx: VmxCpu, cpu: usize) -> RunLoop {
        RunLoop {
            vmx,
            cpu,
            fpu_owner: 0,
        }
    }

    /// Runs one vCPU for one slice if any is runnable. Returns whether one ran (when not,
    /// every vCPU here is halted or there is none: the caller may sleep until the next tick).
    pub fn run_once(&mut self) -> bool {
        let queued = RUN_QUEUES[self.cpu].lock().len();
        for _ in 0..queued {
            let Some(mut v) = RUN_QUEUES[self.cpu].lock().pop_front() else {
                return false;
            };
            match v.domain.state() {
                DomainState::Destroying => {
                    v.domain.finish(String::from("destroyed by the operator"));
                    self.teardown(v);
                    return true;
                }
                DomainState::Stopped => {
                    self.teardown(v);
                    return true;
                }
                DomainState::Running => {}
            }
            if !v.started {
                let request = v.domain.starts[v.core.index as usize].lock().take();
                match request {
                    Some((rip, rsp)) => {
                        v.setup.boot.rip = rip;
                        v.setup.boot.rsp = rsp;
                        v.started = true;
                    }
                    None => {
                        RUN_QUEUES[self.cpu].lock().push_back(v);
                        continue;
                    }
                }
            }
            if v.still_halted(self.cpu) {
                RUN_QUEUES[self.cpu].lock().push_back(v);
                continue;
            }
            self.run(v);
            return true;
        }
        false
    }

    fn run(&mut self, mut v: Box<Vcpu>) {
        v.halted_at_tick = None;
        match self.run_slice(&mut v) {
            SliceEnd::Requeue => RUN_QUEUES[self.cpu].lock().push_back(v),
            SliceEnd::Retire => self.teardown(v),
            SliceEnd::Stop { why, dump } => {
                if dump {
                    self.dump(&mut v, &why);
                }
                v.domain.finish(why);
                self.teardown(v);
            }
        }
    }

    /// Loads `v`'s x87/SSE/AVX state unless it is already in this CPU's registers (the
    /// previous owner's was saved when its slice ended).
    fn swap_fpu(cpu: usize, fpu_owner: &mut u64, v: &mut Vcpu) {
        if *fpu_owner == v.key() {
            return;
        }
        fpu::restore(&v.fpu, v.core.xcr0, cpu);
        *fpu_owner = v.key();
    }

    fn run_slice(&mut self, v: &mut Vcpu) -> SliceEnd {
        let caps = *self.vmx.caps();
        let mut vmcs = v.vmcs.take().expect("a queued vCPU has its VMCS");
        let end = {
            let RunLoop {
                vmx,
                cpu,
                fpu_owner,
            } = self;
            let mut active = match vmx.load(&mut vmcs) {
                Ok(a) => a,
                Err(e) => {
                    v.vmcs = Some(vmcs);
                    return SliceEnd::Stop {
                        why: alloc::format!("VMPTRLD failed: {e}"),
                        dump: false,
                    };
                }
            };
            Self::slice_inner(*cpu, fpu_owner, &mut active, &caps, v)
        };
        v.vmcs = Some(vmcs);
        end
    }

    fn slice_inner(
        cpu: usize,
        fpu_owner: &mut u64,
        a: &mut ActiveVmcs,
        caps: &VmxCaps,
        v: &mut Vcpu,
    ) -> SliceEnd {
        if !v.ready {
            // First entry: fill the VMCS on the CPU it will run on (vCPUs never move).
            if let Err(e) = setup_vmcs(a, caps, &v.setup) {
                return SliceEnd::Stop {
                    why: alloc::format!("cannot set up the VMCS: {e}"),
                    dump: false,
                };
            }
            v.ready = true;
        }
        Self::swap_fpu(cpu, fpu_owner, v);
        let slice = SLICE_TSC.load(Ordering::Relaxed);
        let start = cpu::rdtsc();
        // Bring the guest's timer up to date first, so its next deadline is in the future.
        v.core.timer.poll(start);
        let budget = v
            .core
            .timer
            .until_due(start)
            .map_or(slice, |due| due.clamp(1, slice));
        let timer = (budget >> caps.preemption_timer_rate()).min(u64::from(u32::MAX));
        let _ = a.set(f::PREEMPTION_TIMER, timer);
        let end = loop {
            if !v.core.timer.idle()
                && v.core.timer.poll(cpu::rdtsc())
                && let Err(e) = dispatch::deliver_timer(&mut v.core, a)
            {
                break SliceEnd::Stop {
                    why: String::from(e.message()),
                    dump: true,
                };
            }
            x86_64::instructions::interrupts::disable();
            let entered = a.run(&mut v.core.regs);
            // Let the host take the interrupt that caused an exit, if any.
            x86_64::instructions::interrupts::enable();
            if let Err(e) = entered {
                break SliceEnd::Stop {
                    why: alloc::format!("VM entry failed: {e}"),
                    dump: true,
                };
            }
            let exit = Exit::capture(a);
            v.domain.exits[exit.reason.slot()].fetch_add(1, Ordering::Relaxed);
            if exit.entry_failed() {
                let q = a.info(f::EXIT_QUALIFICATION);
                break SliceEnd::Stop {
                    why: alloc::format!(
                        "VM entry failed: {} (exit reason {:#x}, qualification {q})",
                        exit.reason.name(),
                        exit.raw,
                    ),
                    dump: true,
                };
            }
            let action = {
                let mut p = HwPlatform {
                    cpu,
                    domain: &v.domain,
                };
                dispatch::handle(&exit, &mut v.core, a, &v.mem.ram, &mut p)
            };
            match action {
                Ok(Action::Resume) if exit.reason == ExitReason::PreemptionTimer => {
                    // Woken for the guest's timer: run on until the slice ends or it is due again.
                    let now = cpu::rdtsc();
                    let left = slice.saturating_sub(now.wrapping_sub(start)).max(1);
                    let budget = v
                        .core
                        .timer
                        .until_due(now)
                        .map_or(left, |due| due.clamp(1, left));
                    let value = (budget >> caps.preemption_timer_rate()).min(u64::from(u32::MAX));
                    let _ = a.set(f::PREEMPTION_TIMER, value);
                }
                Ok(Action::Resume) => {}
                Ok(Action::Requeue) => break SliceEnd::Requeue,
                Ok(Action::Halt) => {
                    v.halted_at_tick = Some(CPUS[cpu].ticks.load(Ordering::Relaxed));
                    break SliceEnd::Requeue;
                }
                Ok(Action::Retire) => break SliceEnd::Retire,
                Ok(Action::Exit(code)) => {
                    break SliceEnd::Stop {
                        why: alloc::format!("exited with code {code}"),
                        dump: false,
                    };
                }
                Err(e) => {
                    break SliceEnd::Stop {
                        why: String::from(e.message()),
                        dump: true,
                    };
                }
            }
            // One load on the fast path; the match only once something changed.
            if v.domain.state.load(Ordering::Acquire) != DomainState::Running as u8 {
                match v.domain.state() {
                    DomainState::Running => {}
                    DomainState::Destroying => {
                        break SliceEnd::Stop {
                            why: String::from("destroyed by the operator"),
                            dump: false,
                        };
                    }
                    DomainState::Stopped => break SliceEnd::Retire,
                }
            }
            if cpu::rdtsc().wrapping_sub(start) > slice {
                break SliceEnd::Requeue;
            }
        };
        fpu::save(&mut v.fpu);
        let (reads, writes) = (
            core::mem::take(&mut a.reads),
            core::mem::take(&mut a.writes),
        );
        v.domain
            .vmreads
            .fetch_add(u64::from(reads), Ordering::Relaxed);
        v.domain
            .vmwrites
            .fetch_add(u64::from(writes), Ordering::Relaxed);
        end
    }

    fn dump(&mut self, v: &mut Vcpu, why: &str) {
        let Some(mut vmcs) = v.vmcs.take() else {
            return;
        };
        if let Ok(mut a) = self.vmx.load(&mut vmcs) {
            let r = &v.core.regs;
            println!(
                "[dom{}] {why}: RIP={:#x} RSP={:#x} RFLAGS={:#x} CR0={:#x} CR3={:#x} CR4={:#x}",
                v.domain.id,
                a.get(f::GUEST_RIP),
                a.get(f::GUEST_RSP),
                a.get(f::GUEST_RFLAGS),
                a.get(f::GUEST_CR0),
                a.get(f::GUEST_CR3),
                a.get(f::GUEST_CR4)
            );
            println!(
                "[dom{}]   RAX={:#x} RBX={:#x} RCX={:#x} RDX={:#x} RSI={:#x} RDI={:#x} RBP={:#x}",
                v.domain.id, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
            );
            println!(
                "[dom{}]   R8={:#x} R9={:#x} R10={:#x} R11={:#x} R12={:#x} R13={:#x} R14={:#x} R15={:#x}",
                v.domain.id, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            );
        }
        v.vmcs = Some(vmcs);
    }

    /// Retires a vCPU: flushes its console, gives its VMCS back; the domain's memory goes with
    /// the last vCPU (its `Arc<DomainMem>`). If it was the last one alive, the domain ends.
    fn teardown(&mut self, mut v: Box<Vcpu>) {
        if let Some(rest) = v.core.console.take_partial() {
            println!("[dom{}] {rest}", v.domain.id);
        }
        if v.core.console.dropped > 0 {
            println!(
                "[dom{}] ({} console lines dropped by the rate limit)",
                v.domain.id, v.core.console.dropped
            );
        }
        if self.fpu_owner == v.key() {
            self.fpu_owner = 0;
        }
        {
            let mut guard = crate::kernel::FRAMES.lock();
            if let (Some(frames), Some(vmcs)) = (guard.as_mut(), v.vmcs.take()) {
                let _ = frames.free_addr(crate::mm::HostPhysAddr(vmcs.release()));
            }
        }
        // Drop this CPU's cached translations of the domain's EPT before its tables can be
        // reused; every CPU that ran one of its vCPUs does the same in its own teardown.
        crate::vmx::hw::invept_all();
        if v.domain.alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            v.domain.finish(String::from("all vCPUs are off"));
        }
    }
}
