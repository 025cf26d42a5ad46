//! Bring-up order and the console task.
//!
//! `hypervisor_main` runs on the bootstrap processor: console, command line, frame allocator,
//! heap, GDT/TSS/IDT, ACPI topology, W^X page tables, local APIC and its timer, the VT-x probe,
//! the application processors, then the operator's shell on COM1. Each AP runs `ap_main`.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use bootloader::{BootError, BootInfo, MemoryKind};
use log::{error, info, warn};
use spin::Mutex;

use crate::arch::percpu::{self, CPUS, CpuState};
use crate::arch::{acpi, cpu, gdt, lapic, pic, pit, serial, smp, trap};
use crate::cmdline::{CommandLine, TestFault, parse_level};
use crate::mm::PhysMem;
use crate::mm::frames::{self, FrameAllocator};
use crate::mm::paging::{Access, PageTables};
use crate::mm::{FRAME_SIZE, heap};
use crate::shell::{self, Command, LineEditor, PROMPT};
use crate::vmx::caps::VmxStatus;
use crate::vmx::detect::{self, VMX_STATUS};
use crate::{print, println};

/// Bytes of heap taken at boot.
const HEAP_SIZE: u64 = 8 << 20;
/// Frames of each AP's stack (a guard page sits below it).
const AP_STACK_FRAMES: u64 = 16;
/// Timer interrupts per second on every CPU.
const TICK_HZ: u32 = 100;

/// Free physical memory, owned here and handed by reference to what takes frames after boot.
static FRAMES: PhysMem = PhysMem::new();
/// Every domain, owned here and handed by reference to the console and module loading.
static DOMAINS: crate::domain::table::DomainTable = crate::domain::table::DomainTable::new();
/// `hv.spec-ctrl=` from the command line (auto, on, off).
static SPEC_CHOICE: Mutex<crate::vmx::spec::Choice> = Mutex::new(crate::vmx::spec::Choice::Auto);
/// Local APIC timer count for one tick, measured on the BSP.
static TIMER_COUNT: AtomicU32 = AtomicU32::new(0);

/// What boot learned and the shell reports.
struct Machine {
    info: BootInfo,
    image: (u64, u64),
    cpus_in_madt: usize,
}

static MACHINE: Mutex<Option<Machine>> = Mutex::new(None);

unsafe extern "C" {
    static __image_start: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __image_end: u8;
}

fn sym(s: *const u8) -> u64 {
    s as u64
}

/// The hypervisor's entry point, called by the boot path on the BSP.
#[unsafe(no_mangle)]
pub fn hypervisor_main(boot: Result<BootInfo, BootError>) -> ! {
    cpu::set_current_cpu(0);
    serial::init();
    trap::init_idt();
    trap::load_idt();
    pic::disable();
    let info = match boot {
        Ok(info) => info,
        Err(e) => {
            println!("hypervisor {}: cannot boot: {e}", crate::VERSION);
            cpu::halt_forever();
        }
    };
    let cmdline_text: heapless::String<512> = info.command_line.clone();
    let cmdline = CommandLine::new(cmdline_text.as_str());
    let level = match cmdline.get("loglevel").map(parse_level) {
        None => log::LevelFilter::Info,
        Some(Ok(l)) => l,
        Some(Err(_)) => log::LevelFilter::Info,
    };
    crate::console::init_logger(level);
    let loader = if info.loader_name.is_empty() {
        "unknown loader"
    } else {
        info.loader_name.as_str()
    };
    println!(
        "hypervisor {} booting ({:?} from {loader}); command line: '{}'",
        crate::VERSION,
        info.protocol,
        info.command_line
    );
    if let Some(bad) = cmdline.get("loglevel").filter(|l| parse_level(l).is_err()) {
        warn!("loglevel={bad}: not a level; using info");
    }
    let spec = match crate::vmx::spec::Choice::parse(cmdline.get("hv.spec-ctrl")) {
        Ok(c) => c,
        Err(bad) => {
            warn!("hv.spec-ctrl={bad}: not auto, on or off; using auto");
            crate::vmx::spec::Choice::Auto
        }
    };
    if spec == crate::vmx::spec::Choice::Off {
        warn!(
            "hv.spec-ctrl=off: no speculative-execution mitigations; guests may read other domains' and the hypervisor's data on affected CPUs"
        );
    }
    *SPEC_CHOICE.lock() = spec;

    let (image_start, image_end) = (sym(&raw const __image_start), sym(&raw const __image_end));
    init_memory(&info, image_start, image_end);
    gdt::init_this_cpu();

    let topology = match acpi::cpu_topology(info.rsdp) {
        Ok(t) => t,
        Err(e) => {
            warn!("ACPI: no usable MADT ({e:?}); running on the boot CPU only");
            acpi::CpuTopology::default()
        }
    };
    if topology.dropped > 0 {
        warn!(
            "{} CPUs beyond the supported {} are left parked",
            topology.dropped,
            percpu::MAX_CPUS
        );
    }

    let bsp_apic = lapic::enable(trap::SPURIOUS_VECTOR);
    let ap_ids: Vec<u32> = topology
        .apic_ids
        .iter()
        .copied()
        .filter(|&id| id != bsp_apic)
        .collect();
    let (pt, ap_stacks) = build_page_tables(&info, image_start, &ap_ids);
    // SAFETY: the trampoline page is in the first MiB, reserved from the allocator, and the
    // boot page tables (still active) map it writable.
    unsafe { smp::install_trampoline() };
    // SAFETY: the new tables identity-map all RAM, the image (with its stack), the heap and the
    // local APIC, which is everything this CPU touches from here on.
    unsafe { pt.activate() };
    info!("paging: W^X identity map active (root {:#x})", pt.root());
    let (smep, smap) = cpu::harden();
    info!(
        "hardening: SMEP {}, SMAP {}, NX on data, stack guard pages",
        if smep { "on" } else { "not offered" },
        if smap { "on" } else { "not offered" }
    );

    CPUS[0].apic_id.store(bsp_apic, Ordering::Relaxed);
    CPUS[0].set_state(CpuState::Online);
    let tsc_per_10ms = {
        let t0 = cpu::rdtsc();
        let ticks = lapic::measure_timer(|| pit::wait_ms(10));
        let count = (ticks / (TICK_HZ / 100)).max(1000);
        TIMER_COUNT.store(count, Ordering::Relaxed);
        cpu::rdtsc() - t0
    };
    lapic::start_periodic_timer(trap::TIMER_VECTOR, TIMER_COUNT.load(Ordering::Relaxed));
    x86_64::instructions::interrupts::enable();
    info!(
        "timer: local APIC at {} Hz ({} ticks per period); TSC about {} MHz",
        TICK_HZ,
        TIMER_COUNT.load(Ordering::Relaxed),
        tsc_per_10ms / 10_000
    );

    enable_sse();
    crate::vcpu::queue::set_tsc_per_10ms(tsc_per_10ms);
    match crate::arch::cmos::init() {
        Some(secs) => {
            let c = hv_platform::rtc::civil_from_unix(secs);
            info!(
                "clock: {:04}-{:02}-{:02} {:02}:{:02}:{:02} (the CMOS clock, taken as UTC)",
                c.year, c.month, c.day, c.hour, c.minute, c.second
            );
        }
        None => warn!("clock: the CMOS clock reads as no valid date; guests' clocks start at 1970"),
    }
    let vmx = detect::probe_this_cpu();
    *VMX_STATUS[0].lock() = vmx;
    report_vmx_at_boot(&vmx);
    let run_loop = enter_vmx(0, &vmx);

    let total = 1 + ap_ids.len();
    percpu::set_cpu_count(total);
    *MACHINE.lock() = Some(Machine {
        info,
        image: (image_start, image_end),
        cpus_in_madt: topology.apic_ids.len(),
    });
    for (i, (&apic, &stack_top)) in ap_ids.iter().zip(ap_stacks.iter()).enumerate() {
        let index = i + 1;
        if !smp::start_ap(index, apic, pt.root(), stack_top, ap_main) {
            error!("CPU {index} (APIC id {apic}) did not answer INIT-SIPI-SIPI; left offline");
        }
    }
    // Give the last APs a moment to finish their own bring-up before reporting.
    for _ in 0..200 {
        if (1..total).all(|i| CPUS[i].state() != CpuState::Starting) {
            break;
        }
        pit::wait_ms(1);
    }
    let online = (0..total)
        .filter(|&i| CPUS[i].state() == CpuState::Online)
        .count();
    info!("CPUs: {online} of {total} online");

    if let Some(fault) = cmdline.get("hv.test-fault") {
        match TestFault::parse(fault) {
            Some(f) => trigger_test_fault(f),
            None => warn!("hv.test-fault={fault}: unknown kind (ud, pf, wx, de, stack); ignored"),
        }
    }
    info!(
        "boot: console ready at TSC {} (hypervisor entered at TSC {})",
        cpu::rdtsc(),
        with_info(|i| i.entry_tsc)
    );
    start_boot_domains(&vmx);
    console_task(run_loop)
}

/// Lets the guests' x87/SSE/AVX state be switched (FXSAVE, or XSAVE where the CPU has it).
/// The hypervisor itself is built without SIMD.
fn enable_sse() {
    crate::vmx::fpu::init_this_cpu();
}

/// VMXON on this CPU if VT-x is usable for the core; the run loop that will own its vCPUs.
fn enter_vmx(index: usize, status: &VmxStatus) -> Option<crate::vcpu::run::RunLoop> {
    let VmxStatus::Available { caps, .. } = status else {
        return None;
    };
    if let Some(missing) = caps.missing_required() {
        warn!("CPU {index}: VT-x lacks {missing}; no guests will run here");
        return None;
    }
    let mut guard = FRAMES.lock();
    let frames = guard.as_mut()?;
    match crate::vmx::hw::VmxCpu::enable(*caps, frames) {
        Ok(v) => {
            let spec = crate::vmx::spec::choose(crate::vmx::hw::cpu_bugs(), *SPEC_CHOICE.lock());
            Some(crate::vcpu::run::RunLoop::new(
                v,
                index,
                &FRAMES,
                spec.m,
                TIMER_COUNT.load(Ordering::Relaxed),
            ))
        }
        Err(e) => {
            error!("CPU {index}: cannot enter VMX operation: {e}");
            None
        }
    }
}

/// Boot modules waiting for dom0's volumes (their indices), and the capabilities to start
/// them with once dom0 is ready.
static WAITING: spin::Mutex<Vec<usize>> = spin::Mutex::new(Vec::new());
static CAPS: spin::Once<crate::vmx::caps::VmxCaps> = spin::Once::new();
/// dom0's boot module, to start it again when it ends.
static DOM0_MODULE: spin::Once<usize> = spin::Once::new();
/// dom0 restarts so far; after [`MAX_DOM0_RESTARTS`] it stays down (it keeps failing).
static DOM0_RESTARTS: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
const MAX_DOM0_RESTARTS: u32 = 5;
/// The last dom0 readiness the console task acted on.
static READY_SEEN: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Creates a domain for every boot module (`module2 FILE name=NAME mem=MIB cpu=N -- ARGS`):
/// dom0 (`role=dom0`) first; guests with a disk wait until dom0 offered its volumes.
fn start_boot_domains(vmx: &VmxStatus) {
    let modules = with_info(|i| i.modules.clone());
    if modules.is_empty() {
        return;
    }
    let VmxStatus::Available { caps, .. } = vmx else {
        warn!(
            "{} boot module(s) not started: VT-x is not available here",
            modules.len()
        );
        return;
    };
    CAPS.call_once(|| *caps);
    let role = |m: &bootloader::info::Module| {
        crate::domain::config::DomainConfig::parse(m.cmdline.as_str())
            .map(|c| (c.dom0, !c.disks.is_empty()))
            .unwrap_or((false, false))
    };
    let has_dom0 = modules.iter().any(|m| role(m).0);
    // Initrd modules are not domains; each must name a module's domain.
    fn initrd(m: &bootloader::info::Module) -> Result<Option<&str>, String> {
        crate::domain::config::initrd_for(m.cmdline.as_str())
    }
    for (i, m) in modules.iter().enumerate() {
        match initrd(m) {
            Ok(None) => {}
            Ok(Some(name)) => {
                let known = modules.iter().any(|k| {
                    crate::domain::config::DomainConfig::parse(k.cmdline.as_str())
                        .is_ok_and(|c| c.name == name)
                });
                if !known {
                    error!(
                        "module {i} ('{}'): no module is domain '{name}'; this initrd is not used",
                        m.cmdline
                    );
                }
            }
            Err(e) => error!("module {i} ('{}'): {e}; not used", m.cmdline),
        }
    }
    let is_domain = |i: &usize| !matches!(initrd(&modules[*i]), Ok(Some(_)) | Err(_));
    let order = (0..modules.len())
        .filter(|&i| role(&modules[i]).0)
        .chain((0..modules.len()).filter(|&i| !role(&modules[i]).0))
        .filter(is_domain);
    for i in order {
        let (_, wants_disk) = role(&modules[i]);
        if wants_disk && has_dom0 {
            info!("module {i}: waiting for dom0 to offer its volumes");
            WAITING.lock().push(i);
            continue;
        }
        if role(&modules[i]).0 {
            DOM0_MODULE.call_once(|| i);
        }
        start_module(i, &modules[i], caps, has_dom0);
    }
}

/// Starts dom0 again when it ended (it stopped or faulted: `vcpu::dom0::gone` asked), at most
/// [`MAX_DOM0_RESTARTS`] times. Its command line gets `restart=N`, so it knows. From the
/// console task.
fn restart_dom0() {
    if !crate::vcpu::dom0::take_restart() {
        return;
    }
    let (Some(&i), Some(caps)) = (DOM0_MODULE.get(), CAPS.get()) else {
        return;
    };
    let n = DOM0_RESTARTS.fetch_add(1, core::sync::atomic::Ordering::AcqRel) + 1;
    if n > MAX_DOM0_RESTARTS {
        error!(
            "dom0 ended {n} times; not restarted again (guests' disks fail until the machine restarts)"
        );
        return;
    }
    let modules = with_info(|info| info.modules.clone());
    let mut m = modules[i].clone();
    let line = if m.cmdline.split_ascii_whitespace().any(|w| w == "--") {
        alloc::format!("{} restart={n}", m.cmdline)
    } else {
        alloc::format!("{} -- restart={n}", m.cmdline)
    };
    m.cmdline.clear();
    if m.cmdline.push_str(&line).is_err() {
        error!("dom0's command line is too long to add restart={n}; not restarted");
        return;
    }
    warn!("restarting dom0 (restart {n} of at most {MAX_DOM0_RESTARTS})");
    start_module(i, &m, caps, true);
}

/// Starts again, from their boot modules (a fresh copy of the kernel and initrd), the domains
/// whose guests reset their machine (from the console task, once their memory is back).
fn restart_rebooted() {
    let names = crate::domain::table::take_reboots();
    if names.is_empty() {
        return;
    }
    let Some(caps) = CAPS.get() else { return };
    let modules = with_info(|i| i.modules.clone());
    for name in names {
        let found = modules.iter().position(|m| {
            let line = m.cmdline.as_str();
            crate::domain::config::initrd_for(line) == Ok(None)
                && crate::domain::config::DomainConfig::parse(line)
                    .is_ok_and(|c| c.name == name.as_str())
        });
        match found {
            Some(i) => {
                info!("domain {name} rebooted: starting it again from its boot module");
                start_module(i, &modules[i], caps, DOM0_MODULE.get().is_some());
            }
            None => error!("domain {name} rebooted, but no boot module names it; not restarted"),
        }
    }
}

/// Starts the guests that waited for their disks, once dom0 says it is ready (from the
/// console task).
fn start_waiting_guests() {
    let generation = crate::vcpu::dom0::ready_generation();
    if READY_SEEN.swap(generation, core::sync::atomic::Ordering::AcqRel) == generation {
        return;
    }
    let waiting = core::mem::take(&mut *WAITING.lock());
    let Some(caps) = CAPS.get() else { return };
    let modules = with_info(|i| i.modules.clone());
    for i in waiting {
        start_module(i, &modules[i], caps, true);
    }
}

fn start_module(
    i: usize,
    m: &bootloader::info::Module,
    caps: &crate::vmx::caps::VmxCaps,
    has_dom0: bool,
) {
    let cfg = match crate::domain::config::DomainConfig::parse(m.cmdline.as_str()) {
        Ok(c) => c,
        Err(e) => {
            error!("module {i} ('{}'): {e}; not started", m.cmdline);
            return;
        }
    };
    // The disks' volumes, checked before anything is built.
    let mut disks = alloc::vec::Vec::new();
    for d in &cfg.disks {
        if !has_dom0 {
            error!(
                "module {i} ('{}'): disk={}: no dom0 (a module with role=dom0) serves disks; not started",
                cfg.name, d.volume
            );
            return;
        }
        match crate::vcpu::dom0::find_volume(d.volume) {
            Ok((handle, sectors, ro)) => disks.push((handle, sectors, ro || d.read_only)),
            Err(names) => {
                error!(
                    "module {i} ('{}'): disk={}: dom0 has no such volume (it offers: {}); not started",
                    cfg.name,
                    d.volume,
                    if names.is_empty() {
                        String::from("none")
                    } else {
                        names.join(", ")
                    }
                );
                return;
            }
        }
    }
    // SAFETY: the loader placed the module at [start, end), which is identity-mapped and
    // reserved from the frame allocator for the whole run; it is only read.
    let image =
        unsafe { core::slice::from_raw_parts(m.start as *const u8, (m.end - m.start) as usize) };
    // Its initrd: the module that says `role=initrd for=NAME` with this domain's name.
    let initrd = with_info(|info| {
        info.modules
            .iter()
            .find(|k| crate::domain::config::initrd_for(k.cmdline.as_str()) == Ok(Some(cfg.name)))
            .map(|k| (k.start, k.end))
    })
    .map(|(start, end)| {
        // SAFETY: as for the image: a boot module, identity-mapped, reserved and only read.
        unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) }
    });
    if let Err(e) = crate::vcpu::queue::admits(&cfg.sched, cfg.vcpus) {
        error!("module {i} ('{}'): {e}; not started", cfg.name);
        return;
    }
    // dom0's devices, found before its EPT is built: their memory BARs are mapped in it.
    let owned = if cfg.dom0 {
        crate::vcpu::dom0::scan_devices()
    } else {
        alloc::vec::Vec::new()
    };
    let mmio = crate::vcpu::dom0::mmio_windows(&owned, cfg.mem_mib);
    let direct = if cfg.dom0 {
        crate::vcpu::dom0::direct_ports(&owned)
    } else {
        alloc::vec::Vec::new()
    };
    match crate::domain::table::create(
        &DOMAINS,
        &FRAMES,
        (image, initrd),
        &cfg,
        caps,
        &mmio,
        &direct,
    ) {
        Ok(new) => {
            let d = new.domain.clone();
            if cfg.dom0 {
                match crate::vcpu::dom0::give_devices(&d, &owned) {
                    Ok(what) => {
                        for w in what {
                            info!("dom0 owns {w}");
                        }
                    }
                    Err(e) => {
                        error!("module {i} ('{}'): {e}; not started", cfg.name);
                        let _ = d.finish(e);
                        return;
                    }
                }
            }
            for (k, &(handle, sectors, ro)) in disks.iter().enumerate() {
                let window = hv_abi::devices::disk_window(k) as u32;
                if let Err(e) = crate::vcpu::dom0::attach_disk(&d, handle, sectors, ro, window) {
                    error!("module {i} ('{}'): {e}; not started", cfg.name);
                    let _ = d.finish(e);
                    return;
                }
            }
            for (k, nic) in cfg.nics.iter().enumerate() {
                let window = hv_abi::devices::nic_window(k) as u32;
                if let Err(e) = crate::vcpu::net::attach_nic(&d, nic, window) {
                    error!("module {i} ('{}'): {e}; not started", cfg.name);
                    let _ = d.finish(e);
                    return;
                }
            }
            match crate::vcpu::run::spawn(new) {
                Ok(()) => info!(
                    "domain {} ({}) created: {} MiB on CPU {}{}{}",
                    d.id,
                    d.name,
                    d.mem_mib,
                    d.cpu,
                    cfg.disks
                        .iter()
                        .map(|disk| alloc::format!(", disk {}", disk.volume))
                        .collect::<String>(),
                    cfg.nics
                        .iter()
                        .map(|nic| alloc::format!(", nic on network {}", nic.network))
                        .collect::<String>()
                ),
                Err(e) => {
                    // Checked just above; only a bug gets here. Its vCPUs were dropped.
                    error!("module {i} ('{}'): {e}; not started", cfg.name);
                    let _ = d.finish(e);
                }
            }
        }
        Err(e) => error!("module {i} ('{}'): {e}; not started", cfg.name),
    }
}

fn with_info<R>(f: impl FnOnce(&BootInfo) -> R) -> R {
    f(&MACHINE
        .lock()
        .as_ref()
        .expect("machine recorded at boot")
        .info)
}

/// Builds the frame allocator and the heap from the memory map.
fn init_memory(info: &BootInfo, image_start: u64, image_end: u64) {
    let mut usable = heapless::Vec::<(u64, u64), { bootloader::info::MAX_REGIONS }>::new();
    for r in info.memory.iter().filter(|r| r.kind == MemoryKind::Usable) {
        let _ = usable.push((r.start, r.end()));
    }
    let mut reserved = heapless::Vec::<(u64, u64), 24>::new();
    let _ = reserved.push((0, 0x10_0000));
    let _ = reserved.push((image_start, image_end));
    let _ = reserved.push(info.info_range);
    for m in &info.modules {
        let _ = reserved.push((m.start, m.end));
    }
    let top = usable.iter().map(|r| r.1).max().unwrap_or(0);
    let bitmap_len = frames::bitmap_bytes(top);
    let Some(bitmap_at) = frames::place(&usable, &reserved, bitmap_len) else {
        println!("memory: no room for the frame bitmap ({bitmap_len} bytes); cannot boot");
        cpu::halt_forever();
    };
    // SAFETY: `place` found this range inside usable RAM, clear of the image, the modules and
    // the loader's structures; it is identity-mapped and becomes the bitmap's for good.
    let bits: &'static mut [u64] = unsafe {
        core::slice::from_raw_parts_mut(bitmap_at as *mut u64, (bitmap_len / 8) as usize)
    };
    let mut fa = FrameAllocator::new(bits, top);
    for &(s, e) in &usable {
        fa.add_free(s, e);
    }
    for &(s, e) in &reserved {
        fa.reserve(s, e);
    }
    fa.reserve(bitmap_at, bitmap_at + bitmap_len);
    let heap = fa
        .alloc_contiguous(HEAP_SIZE / FRAME_SIZE, 2 << 20, u64::MAX)
        .or_else(|| fa.alloc_contiguous(HEAP_SIZE / FRAME_SIZE, FRAME_SIZE, u64::MAX))
        .unwrap_or_else(|| {
            println!(
                "memory: no contiguous {} MiB for the heap; cannot boot",
                HEAP_SIZE >> 20
            );
            cpu::halt_forever()
        })
        .keep_forever();
    // SAFETY: frames just taken from the allocator for good, identity-mapped RAM.
    unsafe { heap::init(heap.0, HEAP_SIZE as usize) };
    let usable_mib = (fa.usable_frames() * FRAME_SIZE) >> 20;
    info!(
        "memory: {} MiB usable, {} MiB free after the image, modules, bitmap and {} MiB heap",
        usable_mib,
        (fa.free_frames() * FRAME_SIZE) >> 20,
        HEAP_SIZE >> 20
    );
    if info.memory_truncated {
        warn!(
            "memory map longer than {} entries; the rest is unused",
            bootloader::info::MAX_REGIONS
        );
    }
    FRAMES.install(fa);
}

/// Builds the W^X identity map and the AP stacks (with their guard pages). Returns the tables
/// and each AP's stack top.
fn build_page_tables(info: &BootInfo, image_start: u64, ap_ids: &[u32]) -> (PageTables, Vec<u64>) {
    let mut guard = FRAMES.lock();
    let fa = guard.as_mut().expect("frame allocator built");
    let ram: Vec<(u64, u64)> = info
        .memory
        .iter()
        .filter(|r| {
            matches!(
                r.kind,
                MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs
            )
        })
        .map(|r| (r.start, r.end()))
        .collect();
    let top = ram.iter().map(|r| r.1).max().unwrap_or(0);
    let nx = bootloader::entry::efer_extra_bits() != 0;
    let mut pt = PageTables::identity(fa, top, nx, |s, e| {
        ram.iter().any(|&(rs, re)| rs < e && s < re)
    });
    // Linker-script symbols: only their addresses are used.
    let (text, rodata, data) = (
        (sym(&raw const __text_start), sym(&raw const __text_end)),
        (sym(&raw const __rodata_start), sym(&raw const __rodata_end)),
        (sym(&raw const __data_start), sym(&raw const __image_end)),
    );
    debug_assert_eq!(text.0, image_start);
    pt.protect(fa, 0, 0x1000, Access::NotPresent);
    pt.protect(fa, 0x1000, 0x20_0000, Access::ReadWrite);
    let tramp = bootloader::entry::AP_TRAMPOLINE_PHYS;
    pt.protect(fa, tramp, tramp + 0x1000, Access::ReadExecute);
    pt.protect(fa, text.0, text.1, Access::ReadExecute);
    pt.protect(fa, rodata.0, rodata.1, Access::ReadOnly);
    pt.protect(fa, data.0, data.1, Access::ReadWrite);
    let g = bootloader::entry::boot_stack_guard_page();
    pt.protect(fa, g, g + 0x1000, Access::NotPresent);
    let mut stacks = Vec::new();
    for &id in ap_ids {
        let Some(run) = fa.alloc_contiguous(AP_STACK_FRAMES + 1, FRAME_SIZE, u64::MAX) else {
            warn!("no memory for the stack of the CPU with APIC id {id}");
            break;
        };
        let base = run.keep_forever().0;
        pt.protect(fa, base, base + FRAME_SIZE, Access::NotPresent);
        stacks.push(base + (AP_STACK_FRAMES + 1) * FRAME_SIZE);
    }
    (pt, stacks)
}

/// Where every application processor starts in Rust.
extern "C" fn ap_main(index: u64) -> ! {
    let index = index as usize;
    cpu::set_current_cpu(index);
    smp::AP_ALIVE.fetch_add(1, Ordering::AcqRel);
    trap::load_idt();
    gdt::init_this_cpu();
    let _ = cpu::harden();
    let id = lapic::enable(trap::SPURIOUS_VECTOR);
    CPUS[index].apic_id.store(id, Ordering::Relaxed);
    lapic::start_periodic_timer(trap::TIMER_VECTOR, TIMER_COUNT.load(Ordering::Relaxed));
    enable_sse();
    let vmx = detect::probe_this_cpu();
    *VMX_STATUS[index].lock() = vmx;
    let mut run_loop = enter_vmx(index, &vmx);
    // Said before the state changes, so the boot CPU's "CPUs: N of M online", which waits for
    // this state, always comes after every AP's own line.
    info!("CPU {index} online (APIC id {id}); VT-x {}", vmx.summary());
    CPUS[index].set_state(CpuState::Online);
    loop {
        match run_loop.as_mut() {
            // Halts when idle, until a kick or its first sleeper's deadline.
            Some(r) => r.step(None),
            None => cpu::wait_for_interrupt(),
        }
    }
}

fn report_vmx_at_boot(status: &VmxStatus) {
    match status {
        VmxStatus::Available {
            caps,
            enabled_by_us,
        } => {
            info!(
                "VT-x: available on CPU 0 (IA32_FEATURE_CONTROL {})",
                if *enabled_by_us {
                    "enabled and locked by the hypervisor"
                } else {
                    "locked on by firmware"
                }
            );
            println!("{}", caps.report());
        }
        other => warn!("VT-x: {}", other.summary()),
    }
}

#[inline(never)]
#[allow(unconditional_recursion)] // the point: it ends in the stack guard page
fn overflow_stack(depth: u64) -> u64 {
    let pad = core::hint::black_box([depth; 64]);
    overflow_stack(pad[7] + 1) + pad[3]
}

fn trigger_test_fault(kind: TestFault) {
    warn!("hv.test-fault: raising {kind:?} on purpose");
    // Every arm faults on purpose, requested only by a test command line; the exception handler
    // reports it and halts this CPU.
    match kind {
        // SAFETY: UD2 raises #UD, which is the point (see above).
        TestFault::InvalidOpcode => unsafe { core::arch::asm!("ud2") },
        TestFault::PageFault => {
            let p = core::hint::black_box(0x3ead_beef_0000u64) as *const u64;
            // SAFETY: a read outside the identity map raises #PF, the point (see above).
            let _ = unsafe { p.read_volatile() };
        }
        TestFault::WriteText => {
            let p = core::hint::black_box(trigger_test_fault as *const () as usize) as *mut u8;
            // SAFETY: the text is mapped read-only, so this raises #PF before any write.
            unsafe { p.write_volatile(0xcc) };
        }
        TestFault::DivideError => {
            let zero = core::hint::black_box(0u64);
            // SAFETY: DIV by zero raises #DE before changing anything (see above).
            unsafe {
                core::arch::asm!("xor edx, edx", "div {0}", in(reg) zero, inout("rax") 1u64 => _, out("rdx") _)
            };
        }
        TestFault::StackOverflow => {
            core::hint::black_box(overflow_stack(0));
        }
    }
}

/// The operator's shell on COM1, between slices of the vCPUs this CPU runs. Polls the UART;
/// sleeps until the next timer tick when idle.
fn console_task(mut run_loop: Option<crate::vcpu::run::RunLoop>) -> ! {
    let mut editor = LineEditor::new();
    let mut echo = Vec::new();
    print!("{PROMPT}");
    let mut was_attached = false;
    loop {
        start_waiting_guests();
        restart_dom0();
        restart_rebooted();
        // Detached (Ctrl-], or the domain ended): the shell's prompt again.
        let attached = crate::vcpu::attach::attached().is_some();
        if was_attached && !attached {
            print!("{PROMPT}");
        }
        was_attached = attached;
        while let Some(byte) = serial::try_read() {
            if let Some(id) = crate::vcpu::attach::attached() {
                console_attached(id, byte);
                continue;
            }
            let line = editor.feed(byte, &mut echo);
            if !echo.is_empty() {
                serial::write_verbatim(&echo);
                echo.clear();
            }
            if let Some(line) = line {
                run_command(&line);
                // An attached console shows the guest's prompt instead.
                if crate::vcpu::attach::attached().is_none() {
                    print!("{PROMPT}");
                }
            }
        }
        match run_loop.as_mut() {
            // Idle, it still wakes every 10 ms to poll the UART.
            Some(r) => r.step(Some(crate::vcpu::queue::ns_to_tsc(10_000_000))),
            None => cpu::wait_for_interrupt(),
        }
    }
}

/// A byte typed while the console is attached to domain `id`: Ctrl-] detaches, anything else
/// goes to the domain's UART. A domain that ended meanwhile detaches the console.
fn console_attached(id: u32, byte: u8) {
    use crate::vcpu::attach;
    let domain = DOMAINS.find(id).ok().filter(|d| {
        matches!(
            d.state(),
            crate::domain::table::DomainState::Running | crate::domain::table::DomainState::Paused
        )
    });
    match domain {
        Some(d) if byte != attach::DETACH => {
            attach::type_into(&d, &[byte]);
        }
        Some(d) => {
            attach::detach();
            println!("\nconsole: detached from domain {id}");
            let dropped = d.io.lock().pc.as_ref().map_or(0, |pc| pc.input_dropped);
            if dropped > 0 {
                println!("console: {dropped} typed bytes were dropped (the guest read too slowly)");
            }
        }
        None => {
            attach::detach();
            println!("\nconsole: domain {id} has ended; detached");
        }
    }
}

fn run_command(line: &str) {
    match shell::parse(line) {
        Err(e) => println!("{e}"),
        Ok(Command::Empty) => {}
        Ok(Command::Help) => {
            println!("commands:");
            for (name, help) in shell::COMMANDS {
                println!("  {name:<8} {help}");
            }
        }
        Ok(Command::Cpus) => cmd_cpus(),
        Ok(Command::Mem) => cmd_mem(),
        Ok(Command::Vmx) => cmd_vmx(),
        Ok(Command::Log(None)) => println!("log level: {}", log::max_level()),
        Ok(Command::Log(Some(level))) => {
            log::set_max_level(level);
            println!("log level set to {level}");
        }
        Ok(Command::Domains) => cmd_domains(),
        Ok(Command::Disks) => {
            for line in crate::vcpu::dom0::report() {
                println!("{line}");
            }
        }
        Ok(Command::Net) => {
            for line in crate::vcpu::net::report() {
                println!("{line}");
            }
        }
        Ok(Command::Destroy(id)) => match DOMAINS.destroy(id) {
            Ok(()) => {
                // Halted and paused vCPUs too must look again, to stop.
                crate::vcpu::queue::wake_domain(id);
                println!("domain {id}: stopping")
            }
            Err(e) => println!("error: destroy: {e}"),
        },
        Ok(Command::Pause(id)) => match DOMAINS.pause(id) {
            Ok(()) => println!("domain {id}: paused"),
            Err(e) => println!("error: pause: {e}"),
        },
        Ok(Command::Console(id)) => {
            match DOMAINS
                .find(id)
                .and_then(|d| crate::vcpu::attach::attach(&d).map(|()| d))
            {
                Ok(d) => println!(
                    "console: attached to domain {id} ({}); Ctrl-] detaches",
                    d.name
                ),
                Err(e) => println!("error: console: {e}"),
            }
        }
        Ok(Command::Resume(id)) => match DOMAINS.resume(id) {
            Ok(()) => {
                crate::vcpu::queue::wake_domain(id);
                println!("domain {id}: running")
            }
            Err(e) => println!("error: resume: {e}"),
        },
        Ok(Command::Sched(None)) => {
            for line in crate::vcpu::queue::report() {
                println!("{line}");
            }
        }
        Ok(Command::Sched(Some((id, change)))) => match crate::vcpu::queue::set(id, &change) {
            Ok(()) => println!("domain {id}: scheduling changed"),
            Err(e) => println!("error: sched: domain {id}: {e}; nothing changed"),
        },
        Ok(Command::Audit) => cmd_audit(),
        Ok(Command::Reboot) => {
            println!("rebooting");
            cpu::reboot();
        }
    }
}

/// `audit`: every live domain's EPT against what the domain owns (`vmx::audit`).
fn cmd_audit() {
    let (mut domains, mut leaves, mut bad) = (0usize, 0usize, 0usize);
    for d in DOMAINS.list() {
        let Some((n, violations)) = d.audit_ept() else {
            continue;
        };
        domains += 1;
        leaves += n;
        bad += violations.len();
        for v in &violations {
            println!("EPT audit: domain {} ({}): {v}", d.id, d.name);
        }
    }
    println!("EPT audit: {domains} domains, {leaves} leaves, {bad} violations");
}

fn vmx_short(s: &VmxStatus) -> &'static str {
    match s {
        VmxStatus::Available { .. } => "available",
        VmxStatus::NoCpuSupport => "no (CPUID)",
        VmxStatus::DisabledByFirmware => "disabled by firmware",
        VmxStatus::Unknown => "-",
    }
}

fn cmd_cpus() {
    let n = percpu::cpu_count();
    let madt = MACHINE.lock().as_ref().map_or(n, |m| m.cpus_in_madt);
    let online = (0..n)
        .filter(|&i| CPUS[i].state() == CpuState::Online)
        .count();
    println!("{online} of {n} CPUs online ({madt} in the ACPI MADT)");
    println!("CPU  APIC  STATE        TICKS  HALTS   IDLE  VT-X");
    let now = cpu::rdtsc().max(1);
    for (i, c) in CPUS.iter().enumerate().take(n) {
        // Idle share since boot: TSC ticks spent halted with nothing to run.
        let idle = c.idle_until(now) * 100 / now;
        println!(
            "{i:<4} {:<5} {:<12} {:<6} {:<7} {:>3}%  {}",
            c.apic_id.load(Ordering::Relaxed),
            c.state().name(),
            c.ticks.load(Ordering::Relaxed),
            c.halts.load(Ordering::Relaxed),
            idle,
            vmx_short(&VMX_STATUS[i].lock())
        );
    }
}

fn kind_name(k: MemoryKind) -> &'static str {
    match k {
        MemoryKind::Usable => "usable",
        MemoryKind::Reserved => "reserved",
        MemoryKind::AcpiReclaimable => "ACPI",
        MemoryKind::AcpiNvs => "ACPI NVS",
        MemoryKind::Defective => "defective",
    }
}

fn size_text(bytes: u64) -> String {
    if bytes >= 10 << 20 {
        alloc::format!("{} MiB", bytes >> 20)
    } else {
        alloc::format!("{} KiB", bytes >> 10)
    }
}

fn cmd_mem() {
    let m = MACHINE.lock();
    let Some(m) = m.as_ref() else { return };
    println!("physical memory map ({:?}):", m.info.protocol);
    for r in &m.info.memory {
        println!(
            "  {:#014x}-{:#014x}  {:<9} {}",
            r.start,
            r.end(),
            kind_name(r.kind),
            size_text(r.len)
        );
    }
    println!(
        "hypervisor image: {:#x}-{:#x} ({})",
        m.image.0,
        m.image.1,
        size_text(m.image.1 - m.image.0)
    );
    for (i, md) in m.info.modules.iter().enumerate() {
        println!("module {i}: {:#x}-{:#x} '{}'", md.start, md.end, md.cmdline);
    }
    if let Some(fa) = FRAMES.lock().as_ref() {
        println!(
            "frames: {} usable ({}), {} free ({})",
            fa.usable_frames(),
            size_text(fa.usable_frames() * FRAME_SIZE),
            fa.free_frames(),
            size_text(fa.free_frames() * FRAME_SIZE)
        );
    }
    let (used, size) = heap::usage();
    println!(
        "heap: {} used of {}",
        size_text(used as u64),
        size_text(size as u64)
    );
}

fn cmd_vmx() {
    let n = percpu::cpu_count();
    let statuses: Vec<VmxStatus> = (0..n).map(|i| *VMX_STATUS[i].lock()).collect();
    let first = statuses[0];
    let same = statuses
        .iter()
        .all(|s| *s == first || matches!(s, VmxStatus::Unknown));
    let available = statuses
        .iter()
        .filter(|s| matches!(s, VmxStatus::Available { .. }))
        .count();
    println!("VT-x: {available} of {n} CPUs ready for VMX");
    for (i, s) in statuses.iter().enumerate() {
        if i == 0 || !same {
            println!("CPU {i}: {}", s.summary());
            if let VmxStatus::Available { caps, .. } = s {
                println!("{}", caps.report());
            }
        }
    }
    match (same, n) {
        (true, 2) => println!("CPU 1: same as CPU 0"),
        (true, n) if n > 2 => println!("CPUs 1..{}: same as CPU 0", n - 1),
        _ => {}
    }
    let choice = *SPEC_CHOICE.lock();
    let d = crate::vmx::spec::choose(crate::vmx::hw::cpu_bugs(), choice);
    println!("speculative-execution mitigations (this CPU; hv.spec-ctrl={choice:?}):");
    for (name, on, why) in crate::vmx::spec::report(&d) {
        println!("  {name:<26} {:<4} {why}", if on { "on" } else { "off" });
    }
}

fn cmd_domains() {
    use crate::vmx::exit::{ExitReason, REASON_SLOTS};
    let all = DOMAINS.list();
    if all.is_empty() {
        println!(
            "no domains (boot modules become domains: module2 FILE name=NAME mem=MIB -- ARGS)"
        );
        return;
    }
    println!("ID  NAME          STATE       MEM   VCPUS CPU  EXITS");
    for d in &all {
        let state = match d.state() {
            crate::domain::table::DomainState::Running => "running",
            crate::domain::table::DomainState::Destroying => "destroying",
            crate::domain::table::DomainState::Stopped => "stopped",
            crate::domain::table::DomainState::Paused => "paused",
        };
        let mut by_reason = String::new();
        for i in 0..REASON_SLOTS {
            let n = d.exits[i].load(Ordering::Relaxed);
            if n > 0 {
                by_reason.push_str(&alloc::format!(" {}={n}", ExitReason::slot_name(i)));
            }
        }
        println!(
            "{:<3} {:<13} {:<11} {:>3}M  {:<5} {:<4} {}{}",
            d.id,
            d.name,
            state,
            d.mem_mib,
            d.vcpus,
            crate::vcpu::queue::cpu_of(d.id).unwrap_or(d.cpu),
            d.total_exits(),
            by_reason
        );
        let mut handling = 0u64;
        let mut ticks_by = String::new();
        for i in 0..REASON_SLOTS {
            let t = d.exit_ticks[i].load(Ordering::Relaxed);
            if t > 0 {
                handling += t;
                ticks_by.push_str(&alloc::format!(" {}={t}", ExitReason::slot_name(i)));
            }
        }
        println!(
            "    time: {} ticks running, {handling} of them handling its exits:{ticks_by}",
            crate::vcpu::queue::domain_ticks(d.id),
        );
        let why = d.stop_reason.lock();
        if !why.is_empty() {
            println!("    stopped: {why}");
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    trap::report_panic(info)
}
