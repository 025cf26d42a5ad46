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
use crate::domain::console::DomainConsole;
use crate::domain::hypercall::{self, Outcome};
use crate::domain::loader::{self, BootState};
use crate::domain::memory::{
    BadGpa, CHUNK, GuestMemory, GuestPhysAddr, UNASSIGNED_MMIO, pieces, translate,
};
use crate::domain::ports::{self, PortAction};
use crate::domain::vtimer::{self, VirtTimer};
use crate::mm::frames::FrameAllocator;
use crate::percpu::{self, CPUS, MAX_CPUS};
use crate::println;
use crate::vmx::caps::VmxCaps;
use crate::vmx::cr::{self, CrExit};
use crate::vmx::decode;
use crate::vmx::ept::{Ept, MemType, PageSizes, Perm, TableFrames};
use crate::vmx::exit::{EptViolationExit, ExitReason, IoExit, REASON_SLOTS};
use crate::vmx::fpu::{self, FpuArea};
use crate::vmx::hw::{ActiveVmcs, FixedBits, GuestRegs, Vmcs, VmxCpu, fields as f};
use crate::vmx::policy::{self, MsrRule, StoredMsrs};
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
    index: u32,
    /// vCPU 0 from the start; the others once VCPU_START named them.
    started: bool,
    regs: GuestRegs,
    vmcs: Option<Vmcs>,
    setup: GuestSetup,
    mem: Arc<DomainMem>,
    console: DomainConsole,
    msrs: StoredMsrs,
    /// Whether the VMCS has been filled.
    ready: bool,
    /// Halted until this CPU's tick count passes this value.
    halted_at_tick: Option<u64>,
    /// The paravirtual timer (SET_TIMER).
    timer: VirtTimer,
    /// Whether interrupt-window exiting is on (a timer interrupt waits for RFLAGS.IF).
    window_exiting: bool,
    /// FXSAVE area of the guest's x87/SSE state, swapped when this CPU changes vCPU.
    fpu: Box<FpuArea>,
    /// The guest's XCR0 (loaded while it runs, when XSAVE is in use).
    xcr0: u64,
}

impl Vcpu {
    /// Whether the vCPU still waits in HLT: until its timer's deadline when armed, else until
    /// the next tick of its CPU.
    fn still_halted(&self, cpu: usize) -> bool {
        match (self.halted_at_tick, self.timer.deadline()) {
            (None, _) => false,
            (Some(_), Some(deadline)) => cpu::rdtsc() < deadline,
            (Some(t), None) => CPUS[cpu].ticks.load(Ordering::Relaxed) <= t,
        }
    }

    /// A key unique to this vCPU among all domains.
    fn key(&self) -> u64 {
        (u64::from(self.domain.id) << 32) | u64::from(self.index)
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
            index: index as u32,
            started: index == 0,
            regs,
            vmcs: Some(vmcs),
            setup: GuestSetup { boot, eptp, vpid },
            mem: mem.clone(),
            console: DomainConsole::default(),
            msrs: StoredMsrs::default(),
            ready: false,
            halted_at_tick: None,
            timer: VirtTimer::default(),
            window_exiting: false,
            fpu: FpuArea::initial(),
            xcr0: fpu::XCR0_RESET,
        });
        RUN_QUEUES[placement[index]].lock().push_back(vcpu);
    }
    Ok(domain)
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
                let request = v.domain.starts[v.index as usize].lock().take();
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
        fpu::restore(&v.fpu, v.xcr0, cpu);
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
        v.timer.poll(start);
        let budget = v
            .timer
            .until_due(start)
            .map_or(slice, |due| due.clamp(1, slice));
        let timer = (budget >> caps.preemption_timer_rate()).min(u64::from(u32::MAX));
        let _ = a.set(f::PREEMPTION_TIMER, timer);
        let end = loop {
            if !v.timer.idle()
                && v.timer.poll(cpu::rdtsc())
                && let Err(e) = Self::deliver_timer(a, v)
            {
                break SliceEnd::Stop { why: e, dump: true };
            }
            x86_64::instructions::interrupts::disable();
            let entered = a.run(&mut v.regs);
            // Let the host take the interrupt that caused an exit, if any.
            x86_64::instructions::interrupts::enable();
            if let Err(e) = entered {
                break SliceEnd::Stop {
                    why: alloc::format!("VM entry failed: {e}"),
                    dump: true,
                };
            }
            let raw = a.info(f::EXIT_REASON) as u32;
            let reason = ExitReason::from_raw(raw);
            v.domain.exits[reason.slot()].fetch_add(1, Ordering::Relaxed);
            if ExitReason::entry_failed(raw) {
                let q = a.info(f::EXIT_QUALIFICATION);
                break SliceEnd::Stop {
                    why: alloc::format!(
                        "VM entry failed: {} (exit reason {raw:#x}, qualification {q})",
                        reason.name()
                    ),
                    dump: true,
                };
            }
            match Self::handle_exit(cpu, a, v, reason) {
                Ok(Some(end)) => break end,
                Ok(None) if reason == ExitReason::PreemptionTimer => {
                    // Woken for the guest's timer: run on until the slice ends or it is due again.
                    let now = cpu::rdtsc();
                    let left = slice.saturating_sub(now.wrapping_sub(start)).max(1);
                    let budget = v
                        .timer
                        .until_due(now)
                        .map_or(left, |due| due.clamp(1, left));
                    let value = (budget >> caps.preemption_timer_rate()).min(u64::from(u32::MAX));
                    let _ = a.set(f::PREEMPTION_TIMER, value);
                }
                Ok(None) => {}
                Err(why) => break SliceEnd::Stop { why, dump: true },
            }
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

    fn skip(a: &mut ActiveVmcs) -> Result<(), String> {
        let len = a.info(f::EXIT_INSTRUCTION_LEN);
        let rip = a.get(f::GUEST_RIP);
        a.set(f::GUEST_RIP, rip.wrapping_add(len))
            .map_err(|e| alloc::format!("{e}"))
    }

    /// Injects the pending timer interrupt if the guest can take it now, else asks for an exit
    /// as soon as it can (interrupt-window exiting, SDM Vol. 3C §25.2).
    fn deliver_timer(a: &mut ActiveVmcs, v: &mut Vcpu) -> Result<(), String> {
        let err = |e| alloc::format!("{e}");
        if a.get(f::ENTRY_INTERRUPTION) & (1 << 31) != 0 {
            return Ok(()); // another event (an exception) goes first
        }
        let ready = vtimer::can_inject(a.get(f::GUEST_RFLAGS), a.get(f::GUEST_INTERRUPTIBILITY));
        if ready && let Some(vector) = v.timer.take() {
            // External interrupt, vector as asked (SDM Vol. 3C §24.8.3).
            a.set(f::ENTRY_INTERRUPTION, u64::from(vector) | (1 << 31))
                .map_err(err)?;
        }
        if ready == v.window_exiting {
            let procbased = a.get(f::PROCBASED);
            let want = if ready {
                procbased & !(1 << 2)
            } else {
                procbased | (1 << 2)
            };
            a.set(f::PROCBASED, want).map_err(err)?;
            v.window_exiting = !ready;
        }
        Ok(())
    }

    /// Completes a guest load or store to unassigned MMIO: a load gets all ones, a store is
    /// dropped; the instruction is read through the guest's page tables and decoded (only
    /// plain moves; anything else stops the domain).
    fn emulate_unassigned_mmio(a: &mut ActiveVmcs, v: &mut Vcpu, gpa: u64) -> Result<(), String> {
        let rip = a.get(f::GUEST_RIP);
        let cr3 = a.get(f::GUEST_CR3);
        let mut bytes = [0u8; decode::MAX_LEN];
        let mut n = 0;
        while n < bytes.len() {
            let Some(pa) = translate(&v.mem.ram, cr3, rip.wrapping_add(n as u64)) else {
                break;
            };
            if v.mem
                .ram
                .read(GuestPhysAddr(pa), &mut bytes[n..n + 1])
                .is_err()
            {
                break;
            }
            n += 1;
        }
        let d = decode::decode(&bytes[..n]).map_err(|e| {
            alloc::format!(
                "MMIO access to guest-physical {gpa:#x} by an instruction not emulated ({e:?}; bytes {:02x?})",
                &bytes[..n.min(8)]
            )
        })?;
        if let decode::Access::Load { reg, .. } = d.access {
            let old = Self::gpr(a, v, reg);
            Self::set_gpr(a, v, reg, decode::apply_load(old, d.access, u64::MAX))?;
        }
        a.set(f::GUEST_RIP, rip.wrapping_add(d.len as u64))
            .map_err(|e| alloc::format!("{e}"))
    }

    /// General register `n` (0 = RAX .. 15 = R15; RSP lives in the VMCS).
    fn gpr(a: &mut ActiveVmcs, v: &Vcpu, n: u8) -> u64 {
        let r = &v.regs;
        match n {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => a.get(f::GUEST_RSP),
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        }
    }

    fn set_gpr(a: &mut ActiveVmcs, v: &mut Vcpu, n: u8, value: u64) -> Result<(), String> {
        let r = &mut v.regs;
        let slot = match n {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            4 => {
                return a
                    .set(f::GUEST_RSP, value)
                    .map_err(|e| alloc::format!("{e}"));
            }
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        };
        *slot = value;
        Ok(())
    }

    fn inject_gp(a: &mut ActiveVmcs) -> Result<(), String> {
        // Hardware exception 13 with an error code of 0 (SDM Vol. 3C §24.8.3).
        let info = 13 | (3 << 8) | (1 << 11) | (1 << 31);
        a.set(f::ENTRY_INTERRUPTION, info)
            .map_err(|e| alloc::format!("{e}"))?;
        a.set(f::ENTRY_ERROR_CODE, 0)
            .map_err(|e| alloc::format!("{e}"))
    }

    fn print_console(cpu: usize, v: &mut Vcpu, bytes: &[u8]) {
        let window = CPUS[cpu].ticks.load(Ordering::Relaxed) / 100;
        for line in v.console.feed(bytes, window) {
            println!("[dom{}] {line}", v.domain.id);
        }
    }

    /// `Ok(None)`: resume the guest; `Ok(Some(end))`: end the slice; `Err`: stop the domain.
    fn handle_exit(
        cpu: usize,
        a: &mut ActiveVmcs,
        v: &mut Vcpu,
        reason: ExitReason,
    ) -> Result<Option<SliceEnd>, String> {
        match reason {
            ExitReason::ExternalInterrupt => Ok(None),
            ExitReason::PreemptionTimer => {
                // The guest's timer fell due: deliver it in this slice; else the slice is over.
                let due = v.timer.until_due(cpu::rdtsc()) == Some(0);
                if due && v.timer.poll(cpu::rdtsc()) {
                    Ok(None)
                } else {
                    Ok(Some(SliceEnd::Requeue))
                }
            }
            ExitReason::InterruptWindow => Ok(None),
            ExitReason::Cpuid => {
                let native = cpu::cpuid(v.regs.rax as u32, v.regs.rcx as u32);
                let p = policy::CpuidPolicy {
                    vcpus: v.domain.vcpus,
                    index: v.index,
                    xcr0_allowed: fpu::allowed(),
                    guest_osxsave: a.get(f::GUEST_CR4) & (1 << 18) != 0,
                };
                let r = policy::cpuid(v.regs.rax as u32, v.regs.rcx as u32, native, p);
                v.regs.rax = u64::from(r.eax);
                v.regs.rbx = u64::from(r.ebx);
                v.regs.rcx = u64::from(r.ecx);
                v.regs.rdx = u64::from(r.edx);
                Self::skip(a).map(|_| None)
            }
            ExitReason::Hlt => {
                Self::skip(a)?;
                // HLT right after STI (the usual way to wait) ran in the STI shadow; since we
                // completed it, the shadow must end here, or the wake-up interrupt could not be
                // injected before the next instruction (SDM Vol. 3C §25.4, "Blocking by STI").
                let intr = a.get(f::GUEST_INTERRUPTIBILITY);
                if intr & 1 != 0 {
                    a.set(f::GUEST_INTERRUPTIBILITY, intr & !1)
                        .map_err(|e| alloc::format!("{e}"))?;
                }
                v.halted_at_tick = Some(CPUS[cpu].ticks.load(Ordering::Relaxed));
                Ok(Some(SliceEnd::Requeue))
            }
            ExitReason::Rdmsr | ExitReason::Wrmsr => {
                let msr = v.regs.rcx as u32;
                let write = reason == ExitReason::Wrmsr;
                let value = (v.regs.rdx << 32) | (v.regs.rax & 0xffff_ffff);
                let field = match msr {
                    0x174 => Some(f::GUEST_SYSENTER_CS),
                    0x175 => Some(f::GUEST_SYSENTER_ESP),
                    0x176 => Some(f::GUEST_SYSENTER_EIP),
                    0x277 => Some(f::GUEST_PAT),
                    0xc000_0080 => Some(f::GUEST_EFER),
                    0xc000_0100 => Some(f::GUEST_FS_BASE),
                    0xc000_0101 => Some(f::GUEST_GS_BASE),
                    _ => None,
                };
                let result = match (policy::msr_rule(msr), write) {
                    (None, _) => None,
                    (Some(_), true) if !policy::msr_write_valid(msr, value) => None,
                    (Some(MsrRule::Fixed(x)), false) => Some(x),
                    (Some(MsrRule::Fixed(_)), true) => Some(0),
                    (Some(MsrRule::Stored), false) => Some(v.msrs.get(msr)),
                    (Some(MsrRule::Stored), true) => {
                        v.msrs.set(msr, value);
                        Some(0)
                    }
                    (Some(MsrRule::Tsc), false) => Some(cpu::rdtsc()),
                    (Some(MsrRule::Tsc), true) => Some(0),
                    (Some(MsrRule::VmcsField), false) => field.map(|fl| a.get(fl)),
                    // EFER: LMA is the processor's to set; the guest may change NXE and SCE only.
                    (Some(MsrRule::VmcsField), true) if msr == 0xc000_0080 => {
                        let keep = a.get(f::GUEST_EFER) & !((1 << 11) | 1);
                        a.set(f::GUEST_EFER, keep | (value & ((1 << 11) | 1)))
                            .map_err(|e| alloc::format!("{e}"))?;
                        Some(0)
                    }
                    (Some(MsrRule::VmcsField), true) => {
                        let fl = field.ok_or_else(|| String::from("internal: MSR field"))?;
                        a.set(fl, value).map_err(|e| alloc::format!("{e}"))?;
                        Some(0)
                    }
                };
                match result {
                    Some(x) => {
                        if !write {
                            v.regs.rax = x & 0xffff_ffff;
                            v.regs.rdx = x >> 32;
                        }
                        Self::skip(a).map(|_| None)
                    }
                    None => Self::inject_gp(a).map(|_| None),
                }
            }
            ExitReason::IoInstruction => {
                let io = IoExit::decode(a.info(f::EXIT_QUALIFICATION));
                if io.string {
                    return Err(alloc::format!(
                        "string I/O (INS/OUTS) to port {:#x} is not supported",
                        io.port
                    ));
                }
                match ports::access(io.port, io.size, io.input, v.regs.rax as u32) {
                    PortAction::Read(x) => {
                        let mask = match io.size {
                            1 => 0xff,
                            2 => 0xffff,
                            _ => 0xffff_ffff,
                        };
                        v.regs.rax = (v.regs.rax & !mask) | (u64::from(x) & mask);
                    }
                    PortAction::ConsoleByte(b) => Self::print_console(cpu, v, &[b]),
                    PortAction::Exit(code) => {
                        return Ok(Some(SliceEnd::Stop {
                            why: alloc::format!("exited with code {code}"),
                            dump: false,
                        }));
                    }
                    PortAction::Ignore => {}
                }
                Self::skip(a).map(|_| None)
            }
            ExitReason::Vmcall => {
                let args = [v.regs.rdi, v.regs.rsi, v.regs.rdx];
                let caller = hypercall::Caller {
                    vcpus: v.domain.vcpus,
                    started: v.domain.started.load(Ordering::Acquire),
                };
                match hypercall::dispatch(v.regs.rax, args, &v.mem.ram, caller) {
                    Outcome::Return(x) => v.regs.rax = x as u64,
                    Outcome::Console(bytes) => {
                        Self::print_console(cpu, v, &bytes);
                        v.regs.rax = bytes.len() as u64;
                    }
                    Outcome::Exit(code) => {
                        return Ok(Some(SliceEnd::Stop {
                            why: alloc::format!("exited with code {code}"),
                            dump: false,
                        }));
                    }
                    Outcome::Yield => {
                        v.regs.rax = 0;
                        Self::skip(a)?;
                        return Ok(Some(SliceEnd::Requeue));
                    }
                    Outcome::StartVcpu { index, rip, rsp } => {
                        let bit = 1u64 << index;
                        if v.domain.started.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
                            v.regs.rax = hv_abi::Status::InvalidArgument as i64 as u64;
                        } else {
                            *v.domain.starts[index as usize].lock() = Some((rip, rsp));
                            v.regs.rax = 0;
                        }
                    }
                    Outcome::VcpuOff => return Ok(Some(SliceEnd::Retire)),
                    Outcome::SetTimer { vector, period_us } => {
                        if period_us == 0 {
                            v.timer.off();
                        } else {
                            let per_us = (SLICE_TSC.load(Ordering::Relaxed) / 10_000).max(1);
                            v.timer.set(vector, period_us * per_us, cpu::rdtsc());
                        }
                        v.regs.rax = 0;
                    }
                }
                Self::skip(a).map(|_| None)
            }
            ExitReason::EptViolation => {
                let gpa = a.info(f::GUEST_PHYSICAL_ADDRESS);
                let q = EptViolationExit::decode(a.info(f::EXIT_QUALIFICATION));
                // The MMIO dispatch point. No device models are registered yet: the unassigned
                // MMIO hole answers like an empty bus; anything else outside RAM stops the domain.
                if UNASSIGNED_MMIO.contains(&gpa) && !q.fetch {
                    return Self::emulate_unassigned_mmio(a, v, gpa).map(|()| None);
                }
                Err(alloc::format!(
                    "EPT violation: {} of guest-physical {gpa:#x}, which is not its memory",
                    q.access()
                ))
            }
            ExitReason::TripleFault => Err(String::from("triple fault")),
            ExitReason::CrAccess => {
                let exit = CrExit::decode(a.info(f::EXIT_QUALIFICATION));
                let fixed = FixedBits::read();
                let long_mode = a.get(f::GUEST_EFER) & (1 << 10) != 0;
                let cr0 =
                    |value| cr::write_cr0(value, fixed.cr0_fixed0, fixed.cr0_fixed1, long_mode);
                let result = match exit {
                    CrExit::MovTo { cr: 0, gpr } => cr0(Self::gpr(a, v, gpr)).map(|c| (0, c)),
                    CrExit::MovTo { cr: 4, gpr } => cr::write_cr4(
                        Self::gpr(a, v, gpr),
                        fixed.cr4_fixed0,
                        fixed.cr4_fixed1,
                        long_mode,
                    )
                    .map(|c| (4, c)),
                    // CLTS clears CR0.TS; LMSW loads CR0[3:0] but cannot clear PE.
                    CrExit::Clts => cr0(a.get(f::CR0_SHADOW) & !8).map(|c| (0, c)),
                    CrExit::Lmsw(src) => {
                        let old = a.get(f::CR0_SHADOW);
                        cr0((old & !0xe) | (u64::from(src) & 0xf) | (old & 1)).map(|c| (0, c))
                    }
                    other => {
                        return Err(alloc::format!(
                            "unhandled control-register access {other:?}"
                        ));
                    }
                };
                match result {
                    Ok((reg, c)) => {
                        let (actual, shadow) = if reg == 0 {
                            (f::GUEST_CR0, f::CR0_SHADOW)
                        } else {
                            (f::GUEST_CR4, f::CR4_SHADOW)
                        };
                        a.set(actual, c.actual).map_err(|e| alloc::format!("{e}"))?;
                        a.set(shadow, c.shadow).map_err(|e| alloc::format!("{e}"))?;
                        Self::skip(a).map(|_| None)
                    }
                    Err(cr::InjectGp) => Self::inject_gp(a).map(|_| None),
                }
            }
            ExitReason::Xsetbv => {
                // XSETBV exits before its own checks only where CR4.OSXSAVE is set and CPL is 0
                // (else the CPU raised #UD/#GP itself); the value is ours to check.
                let value = (v.regs.rdx << 32) | (v.regs.rax & 0xffff_ffff);
                if v.regs.rcx as u32 == 0 && policy::xcr0_allowed(value, fpu::allowed()) {
                    v.xcr0 = value;
                    fpu::set_xcr0(cpu, value);
                    Self::skip(a).map(|_| None)
                } else {
                    Self::inject_gp(a).map(|_| None)
                }
            }
            ExitReason::VmxInstruction(_) | ExitReason::Invlpg | ExitReason::Rdtsc => {
                // VMX instructions are not available to guests: #UD would be exact,
                // #GP is what the allow-list gives for everything it does not offer.
                Self::inject_gp(a).map(|_| None)
            }
            other => Err(alloc::format!(
                "unhandled VM exit: {} ({:?})",
                other.name(),
                other
            )),
        }
    }

    fn dump(&mut self, v: &mut Vcpu, why: &str) {
        let Some(mut vmcs) = v.vmcs.take() else {
            return;
        };
        if let Ok(mut a) = self.vmx.load(&mut vmcs) {
            let r = &v.regs;
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
        if let Some(rest) = v.console.take_partial() {
            println!("[dom{}] {rest}", v.domain.id);
        }
        if v.console.dropped > 0 {
            println!(
                "[dom{}] ({} console lines dropped by the rate limit)",
                v.domain.id, v.console.dropped
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
