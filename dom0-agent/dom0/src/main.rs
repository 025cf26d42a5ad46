//! dom0: the privileged domain. The hypervisor starts it first, as domain 0; it owns the
//! physical disks, runs the volume manager over them and serves guests' virtio disks from
//! volumes through the hypervisor's block ring ([`backend`]).
//!
//! Boot: heap, the ring registered with `IO_RING_SETUP`, the pool opened (or created on first
//! use) and its volumes offered with `DISK_OFFER`, then `IO_READY`; from then on a loop serves
//! what the ring holds and waits in `IO_WAIT` when it is empty. With `uplink=NETWORK`, dom0
//! also bridges the machine's NIC to that network's switch ([`net`]), polling the NIC between
//! waits of at most a millisecond. A line on COM2 (dom0's management port) says it is up.
//!
//! The pool lives on the machine's ATA disks (the PCI IDE controller, bus-master DMA; the
//! hypervisor passes the controller through and gives bus addresses with `DMA_MAP`): opened
//! with recovery when they hold it, created on first use when they carry no pool label. A
//! machine without disks gets a RAM disk in dom0's memory, which nothing outlives.
//!
//! Command line (after ` -- ` on its module line): `ramdisk=MIB` (the RAM disk's size when
//! the machine has no disk) and `volume=NAME:MIB[:mirror]`, once per volume to create in a
//! new pool (default `data:8`; `mirror` puts two copies on two disks). For tests,
//! `fault_after=N` makes dom0 fault after serving N requests, on its first boot only (the
//! hypervisor adds `restart=N` when it starts dom0 again).
#![cfg_attr(target_os = "none", no_std, no_main)]
// Register-width and size casts are deliberate in the runtime.
#![allow(clippy::cast_possible_truncation)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "dom0: build it for x86_64-unknown-none (cargo xtask build); `cargo test -p dom0` runs its backend's tests"
    );
}

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod hw;

#[cfg(target_os = "none")]
mod net;

#[cfg(target_os = "none")]
mod rt {
    use crate::hw;
    use alloc::boxed::Box;
    use alloc::format;
    use alloc::string::String;
    use alloc::vec::Vec;
    use core::fmt::Write;

    use linked_list_allocator::LockedHeap;
    use pv_drivers::hypercall::{Hypercalls, Vmcall};
    use pv_drivers::ioring::{BackendRing, RawRegion};
    use volmgr::dev::MemDisk;
    use volmgr::pool::{DiskSpec, LayoutSpec, Pool, PoolConfig};

    use dom0::backend::{Backend, Served};

    /// Page-aligned storage shared with the hypervisor or handed to the allocator.
    #[repr(C, align(4096))]
    struct Area<const N: usize>([u8; N]);

    const HEAP_BYTES: usize = 40 << 20;
    /// Looks at the request ring after serving, before waiting (a few microseconds on
    /// hardware).
    const SPIN_POLLS: u32 = 512;
    const DATA_BYTES: usize = hv_abi::ioring::DATA_BYTES as usize;

    static mut HEAP: Area<HEAP_BYTES> = Area([0; HEAP_BYTES]);
    static mut RING_PAGE: Area<4096> = Area([0; 4096]);
    static mut DATA_AREA: Area<DATA_BYTES> = Area([0; DATA_BYTES]);

    #[global_allocator]
    static ALLOCATOR: LockedHeap = LockedHeap::empty();

    /// The virtual 16550 on COM1; the hypervisor shows each line as `[dom0] ...`.
    struct Uart;

    impl Write for Uart {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for b in s.bytes() {
                // SAFETY: port I/O from a guest exits to the hypervisor, which emulates the UART.
                unsafe {
                    core::arch::asm!("out dx, al", in("dx") hv_abi::ports::UART, in("al") b, options(nomem, nostack));
                }
            }
            Ok(())
        }
    }

    macro_rules! say {
        ($($arg:tt)*) => {{
            let _ = writeln!(Uart, $($arg)*);
        }};
    }

    fn hypercalls() -> Hypercalls<Vmcall> {
        // SAFETY: dom0 only ever runs as domain 0 of this hypervisor (its module line says
        // role=dom0; the hypervisor loads it).
        Hypercalls::new(unsafe { Vmcall::new() })
    }

    fn stop(code: u64) -> ! {
        let _ = hypercalls().exit(code);
        loop {
            core::hint::spin_loop();
        }
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        say!("dom0 panic: {info}");
        stop(101)
    }

    #[unsafe(no_mangle)]
    extern "C" fn _start(cmdline: *const u8, len: usize, ram: u64) -> ! {
        // SAFETY: the loader copied the command line here (at most 4 KiB), and nothing else uses
        // the heap area.
        let args = unsafe {
            ALLOCATOR
                .lock()
                .init((&raw mut HEAP).cast::<u8>(), HEAP_BYTES);
            let bytes = core::slice::from_raw_parts(cmdline, len.min(4095));
            core::str::from_utf8(bytes).unwrap_or("")
        };
        match run(args, ram) {
            Ok(()) => stop(0),
            Err(e) => {
                say!("dom0: {e}; stopping");
                stop(1)
            }
        }
    }

    fn arg<'a>(args: &'a str, key: &str) -> Option<&'a str> {
        args.split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    fn mib(args: &str, key: &str, default: u64) -> Result<u64, String> {
        match arg(args, key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{key}={v}: not a number of MiB")),
        }
    }

    /// A volume to create in a new pool: `volume=NAME:MIB[:mirror]`.
    struct NewVolume<'a> {
        name: &'a str,
        mib: u64,
        mirror: bool,
    }

    /// The volumes to create in a new pool: every `volume=NAME:MIB[:mirror]` (default
    /// `data:8`).
    fn volume_args(args: &str) -> Result<Vec<NewVolume<'_>>, String> {
        let mut out = Vec::new();
        for v in args
            .split_ascii_whitespace()
            .filter_map(|w| w.strip_prefix("volume="))
        {
            let mut parts = v.split(':');
            let name = parts.next().unwrap_or("");
            let m = parts
                .next()
                .ok_or_else(|| format!("volume={v}: want NAME:MIB[:mirror]"))?;
            let mib: u64 = m
                .parse()
                .map_err(|_| format!("volume={v}: {m} is not a number of MiB"))?;
            let mirror = match parts.next() {
                None => false,
                Some("mirror") => true,
                Some(o) => return Err(format!("volume={v}: unknown layout '{o}' (mirror)")),
            };
            out.push(NewVolume { name, mib, mirror });
        }
        if out.is_empty() {
            out.push(NewVolume {
                name: "data",
                mib: 8,
                mirror: false,
            });
        }
        Ok(out)
    }

    /// Creates `vols` in a new pool and says so.
    fn create_volumes(pool: &mut Pool, vols: &[NewVolume<'_>], on: &str) -> Result<(), String> {
        for v in vols {
            let layout = if v.mirror {
                LayoutSpec::Mirror { legs: 2 }
            } else {
                LayoutSpec::Concat
            };
            pool.create_volume(v.name, v.mib * 256, layout, None)
                .map_err(|e| format!("cannot create volume {}: {e}", v.name))?;
            say!(
                "pool 'pool' created on {on}; volume {}: {} MiB{}",
                v.name,
                v.mib,
                if v.mirror { ", mirrored" } else { "" }
            );
        }
        Ok(())
    }

    /// The ATA disks on the machine's PCI IDE controller (bus 0), master and slave of both
    /// channels, with a name each (`ata0s` = first channel's slave).
    fn ata_disks() -> Vec<(String, Box<dyn volmgr::dev::BlockDevice>)> {
        use dom0_drivers::ata::{Channel, ChannelPorts, Config, IdeChannel};
        use dom0_drivers::hw::PollClock;
        use dom0_drivers::pci::{self, Mechanism1};
        let mut cfg = Mechanism1::new(hw::Ports);
        let mut found = Vec::new();
        let ide = hw::bus0_devices()
            .into_iter()
            .find(|d| d.class == 0x01 && d.subclass == 0x01);
        let Some(ide) = ide else {
            say!("no PCI IDE controller");
            return found;
        };
        pci::enable(
            &mut cfg,
            ide.addr,
            pci::reg::CMD_IO | pci::reg::CMD_BUS_MASTER,
        );
        for (n, channel) in [(0, Channel::Primary), (1, Channel::Secondary)] {
            let Some(ports) = ChannelPorts::from_pci(&ide, channel) else {
                continue;
            };
            let mut ch = IdeChannel::new(
                hw::Ports,
                hw::DmaArea,
                PollClock::new(1),
                ports,
                Config::default(),
            );
            let probed = ch.probe();
            for (pos, r) in probed.iter().enumerate() {
                if let Ok(info) = r {
                    say!(
                        "ata{n}{}: {} sectors, '{}' serial '{}', {}",
                        if pos == 0 { "m" } else { "s" },
                        info.sectors,
                        info.model,
                        info.serial,
                        if ch.dma_unavailable().is_some() {
                            "PIO"
                        } else {
                            "bus-master DMA"
                        }
                    );
                }
            }
            for (pos, d) in ch.into_disks().into_iter().enumerate() {
                if let Some(d) = d {
                    let name = format!("ata{n}{}", if pos == 0 { "m" } else { "s" });
                    found.push((name, Box::new(d) as Box<dyn volmgr::dev::BlockDevice>));
                }
            }
        }
        found
    }

    /// The raw disk's own figures for `cargo xtask bench io` (`rawbench=DISK`, a disk kept
    /// out of the pool): the guest's tests, issued by dom0 straight to the ATA driver (which
    /// has one command in flight: depth 32 is depth 1 here).
    fn rawbench(name: &str, d: &mut dyn volmgr::dev::BlockDevice) {
        let tsc = || {
            // SAFETY: RDTSC only reads a counter.
            unsafe { core::arch::x86_64::_rdtsc() }
        };
        let ops = 256u64;
        let span = d.num_blocks().clamp(1, 1024);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % span
        };
        let mut buf = alloc::vec![0x5au8; 128 << 10];
        for i in 0..32 {
            let _ = d.write(i * 32, &buf);
        }
        for (test, write, len, count) in [
            ("randread-4k", false, 4096usize, ops),
            ("randwrite-4k", true, 4096, ops),
            ("seqread-1m", false, 128 << 10, 32),
            ("seqwrite-1m", true, 128 << 10, 32),
        ] {
            let start = tsc();
            let mut errors = 0;
            for i in 0..count {
                let lba = if len == 4096 { rnd() } else { i * 32 };
                let r = if write {
                    d.write(lba, &buf[..len])
                } else {
                    d.read(lba, &mut buf[..len])
                };
                errors += u64::from(r.is_err());
            }
            let ticks = tsc() - start;
            say!(
                "rawbench {name}: {test}: {count} requests, {} bytes, {ticks} ticks, {errors} errors",
                count * len as u64
            );
        }
        let _ = d.flush();
    }

    /// Opens the pool on the machine's disks, or creates it there on first use (disks without
    /// a pool label); with no disk, a RAM disk (`ramdisk=MIB`, nothing survives).
    fn open_pool(args: &str, hc: &mut Hypercalls<Vmcall>) -> Result<Pool, String> {
        let vols = volume_args(args)?;
        let bus = hw::init(hc).map_err(|e| format!("DMA_MAP refused: {e:?}"))?;
        say!("DMA area at bus address {bus:#x}");
        let raw = arg(args, "rawbench");
        let mut disks = ata_disks();
        if let Some(name) = raw {
            match disks.iter().position(|(n, _)| n == name) {
                Some(i) => {
                    let (_, mut d) = disks.remove(i);
                    rawbench(name, d.as_mut());
                }
                None => say!("rawbench={name}: no such disk"),
            }
        }
        if disks.is_empty() {
            let disk_mib = mib(args, "ramdisk", 16)?;
            let disk = MemDisk::new(disk_mib * 256);
            let mut pool = Pool::create(
                alloc::vec![(
                    Box::new(disk) as Box<dyn volmgr::dev::BlockDevice>,
                    DiskSpec::new("ram0", "fast")
                )],
                PoolConfig::small(0x0d0_0001),
            )
            .map_err(|e| format!("cannot create the pool: {e}"))?;
            create_volumes(&mut pool, &vols, &format!("a {disk_mib} MiB RAM disk"))?;
            return Ok(pool);
        }
        let names: Vec<String> = disks.iter().map(|(n, _)| n.clone()).collect();
        let devs: Vec<Box<dyn volmgr::dev::BlockDevice>> =
            disks.into_iter().map(|(_, d)| d).collect();
        // Recovery of an existing pool runs in `open` (dirty-region log, stale copies).
        match Pool::open(devs, volmgr::pool::OpenOptions::default()) {
            Ok((pool, report)) => {
                say!(
                    "pool opened on {}: metadata sequence {}, {} mirror region(s) resynchronised",
                    names.join(", "),
                    report.seq,
                    report.drl_regions_recovered
                );
                for n in report.notes {
                    say!("pool: {n}");
                }
                Ok(pool)
            }
            Err(volmgr::Error::NotAPoolDisk(what)) => {
                say!("no pool on the disks ({what}): creating one");
                // `open` consumed the devices: probe them again.
                let specs = ata_disks()
                    .into_iter()
                    .filter(|(n, _)| Some(n.as_str()) != raw)
                    .map(|(n, d)| (d, DiskSpec::new(&n, "slow")))
                    .collect();
                let mut pool = Pool::create(specs, PoolConfig::new(0x0d0_0001))
                    .map_err(|e| format!("cannot create the pool: {e}"))?;
                create_volumes(&mut pool, &vols, &names.join(", "))?;
                Ok(pool)
            }
            Err(e) => Err(format!("cannot open the pool on {}: {e}", names.join(", "))),
        }
    }

    fn run(args: &str, ram: u64) -> Result<(), String> {
        let mut hc = hypercalls();
        if !hc.compatible() {
            return Err(String::from("the hypervisor speaks another ABI version"));
        }
        say!("dom0 starting: {} MiB of RAM, args '{args}'", ram >> 20);
        let _ = writeln!(
            hw::Com2::init(),
            "dom0 {}: management port up ({} MiB of RAM)\r",
            env!("CARGO_PKG_VERSION"),
            ram >> 20
        );

        // The ring first: the hypervisor writes its header.
        let ring_gpa = (&raw mut RING_PAGE) as u64;
        let data_gpa = (&raw mut DATA_AREA) as u64;
        hc.io_ring_setup(ring_gpa, data_gpa)
            .map_err(|e| format!("IO_RING_SETUP refused: {e:?}"))?;
        // SAFETY: both areas are ours for the whole run and only reached through these regions
        // (the hypervisor shares them through the ring protocol).
        let (ring_mem, data_mem) = unsafe {
            (
                RawRegion::new(ring_gpa as *mut u8, 4096),
                RawRegion::new(data_gpa as *mut u8, DATA_BYTES),
            )
        };
        let mut ring = BackendRing::new(ring_mem, data_mem)
            .map_err(|e| format!("the ring page is not set up: {e:?}"))?;

        let pool = open_pool(args, &mut hc)?;

        for v in pool.list() {
            say!(
                "volume {}: {}, {} MiB, {}",
                v.name,
                v.layout,
                v.size_blocks / 256,
                v.state
            );
        }
        let stale = pool.stale_regions();
        if stale > 0 {
            say!("resync: {stale} stale mirror region(s) to copy, while serving");
        }
        let mut backend = Backend::new(pool);
        let mut offered = Vec::new();
        for v in backend.pool.list() {
            let name = format!("pool/{}", v.name);
            let sectors = v.size_blocks * 8;
            let handle = hc
                .disk_offer(name.as_ptr() as u64, name.len() as u64, sectors, false)
                .map_err(|e| format!("DISK_OFFER {name} refused: {e:?}"))?;
            offered.push(name.clone());
            backend.served.push(Served {
                name,
                handle,
                id: v.id,
                blocks: v.size_blocks,
                read_only: false,
            });
        }
        hc.io_ready()
            .map_err(|e| format!("IO_READY refused: {e:?}"))?;
        say!("ready: serving {}", offered.join(", "));

        // The uplink: the machine's NIC bridged to a network's switch (`uplink=NETWORK`).
        let mut bridge = match arg(args, "uplink") {
            None => None,
            Some(network) => match crate::net::Bridge::start(&mut hc, network) {
                Ok(Some((b, line))) => {
                    say!("{line}");
                    Some(b)
                }
                Ok(None) => {
                    say!("uplink={network}: the machine has no NIC dom0 drives; not bridged");
                    None
                }
                Err(e) => {
                    say!("uplink={network}: {e}; not bridged");
                    None
                }
            },
        };
        // While bridging, waits are bounded: the NIC is polled.
        let wait_us = if bridge.is_some() {
            crate::net::POLL_US
        } else {
            0
        };

        // Fault injection for tests of dom0's restart: after serving this many requests, dom0
        // writes outside its RAM (the hypervisor stops it). Only on its first boot.
        let restart = arg(args, "restart");
        let fault_after: Option<u64> = match (restart, arg(args, "fault_after")) {
            (None, Some(n)) => Some(
                n.parse()
                    .map_err(|_| format!("fault_after={n}: not a number"))?,
            ),
            _ => None,
        };
        if let Some(n) = restart {
            say!("restarted by the hypervisor ({n})");
        }
        let mut served = 0u64;
        let mut stalled = false;
        loop {
            let now_served = backend.serve(&mut ring) as u64;
            served += now_served;
            if let Some(b) = bridge.as_mut()
                && b.pump(&mut hc) > 0
            {
                // Frames moved: publish completions and look again without waiting.
                let _ = hc.io_kick();
                continue;
            }
            if fault_after.is_some_and(|f| served >= f) {
                say!("fault injection: writing outside my RAM after {served} requests");
                // SAFETY: the write never completes: the address is past the end of dom0's
                // RAM, which its EPT does not map, so the hypervisor stops dom0 at this
                // instruction; no Rust object lives there.
                unsafe { (ram as *mut u64).write_volatile(0xdead) };
            }
            // Resync, snapshot fill and relayout progress between requests; while there is
            // some, dom0 publishes its completions without waiting.
            if backend.pool.stale_regions() > 0 && !stalled {
                match backend.pool.background_step(64) {
                    Ok(_) if backend.pool.stale_regions() == 0 => {
                        say!("resync done: every mirror leg in sync");
                    }
                    Ok(true) => {}
                    // No progress (a leg's disk is away): wait for requests instead.
                    Ok(false) => stalled = true,
                    Err(e) => {
                        say!("resync stopped: {e}");
                        stalled = true;
                    }
                }
                if !stalled {
                    let _ = hc.io_kick();
                    continue;
                }
            }
            // Requests were served: their completions go out now, and dom0 looks at its ring
            // a little longer before it waits. At low depth the guest's next request comes
            // right after its completion; finding it here saves the halt and the wake-up.
            if now_served > 0 {
                let _ = hc.io_kick();
                if (0..SPIN_POLLS).any(|_| {
                    core::hint::spin_loop();
                    ring.pending()
                }) {
                    continue;
                }
            }
            // Completes what we published, then waits for the next request (or frame).
            let _ = hc.io_wait_bounded(wait_us);
        }
    }
}
