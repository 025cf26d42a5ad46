//! `blkbench`: measures its virtio disk (served by dom0) for `cargo xtask bench io`: 4 KiB
//! random reads and writes at queue depth 1 and 32, and 1 MiB sequential reads and writes (in
//! 128 KiB requests, 8 in flight), in TSC ticks (instructions, in Bochs with `sync=none`).
//!
//! Arguments: `ops=N` (4 KiB requests per random test, default 256). Each test prints
//! `blkbench: NAME: R requests, B bytes, T ticks`.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![allow(clippy::cast_possible_truncation)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The most requests in flight at once in the current test.
static MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// `irq=1`: wait for completions in HLT (the disk's interrupt, with the paravirtual timer as
/// a backstop) instead of spinning on the used ring.
static WAIT_IN_HLT: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

#[cfg(target_os = "none")]
mod irq {
    /// Interrupts taken: the disk's, and the timer's.
    pub static mut DISK: u64 = 0;
    pub static mut TIMER: u64 = 0;

    #[unsafe(naked)]
    extern "C" fn disk_handler() {
        core::arch::naked_asm!("inc qword ptr [rip + {t}]", "iretq", t = sym DISK);
    }

    #[unsafe(naked)]
    extern "C" fn timer_handler() {
        core::arch::naked_asm!("inc qword ptr [rip + {t}]", "iretq", t = sym TIMER);
    }

    fn gate(h: u64) -> [u64; 2] {
        let low = (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((h >> 16) & 0xffff) << 48);
        [low, h >> 32]
    }

    /// The IDT with the disk's vector and the timer's (0x30, every 10 ms).
    pub fn install() {
        static mut IDT: [[u64; 2]; 96] = [[0; 2]; 96];
        #[repr(C, packed)]
        struct Dtr {
            limit: u16,
            base: u64,
        }
        let disk = usize::from(hv_abi::devices::VIRTIO_VECTOR_BASE);
        // SAFETY: single-threaded guest; the IDT is a static only this function writes.
        unsafe {
            let idt = &raw mut IDT;
            (*idt)[disk] = gate(disk_handler as *const () as u64);
            (*idt)[0x30] = gate(timer_handler as *const () as u64);
            let dtr = Dtr {
                limit: 96 * 16 - 1,
                base: idt as u64,
            };
            core::arch::asm!("lidt [{0}]", in(reg) &dtr);
        }
        test_guests::hypercall(hv_abi::hypercall::SET_TIMER, 0x30, 10_000, 0);
    }

    /// Waits in HLT for the next interrupt.
    pub fn wait() {
        // SAFETY: STI; HLT waits for the next interrupt (STI's shadow covers HLT).
        unsafe { core::arch::asm!("sti", "hlt", "cli") };
    }

    pub fn counts() -> (u64, u64) {
        // SAFETY: statics only the handlers write; read as aligned words.
        unsafe {
            (
                (&raw const DISK).read_volatile(),
                (&raw const TIMER).read_volatile(),
            )
        }
    }
}

use pv_drivers::devices::{BlkReq, BlkResp, Block};
use pv_drivers::hal::IdentityHal;
use pv_drivers::transport::{MmioBus, RegisterTransport};
use test_guests::println;

test_guests::guest_main!(run);

test_guests::guest_heap!(8 << 20);

type Disk = Block<IdentityHal, RegisterTransport<MmioBus>>;

/// A small deterministic generator for random sectors.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `count` requests of `len` bytes at depth `depth`, sectors from `sector(i)`; returns
/// the ticks taken.
fn batch(
    blk: &mut Disk,
    write: bool,
    depth: usize,
    len: usize,
    count: usize,
    mut sector: impl FnMut(usize) -> u64,
) -> u64 {
    let mut bufs: Vec<Vec<u8>> = (0..depth).map(|i| vec![i as u8; len]).collect();
    let mut reqs: Vec<BlkReq> = (0..depth).map(|_| BlkReq::default()).collect();
    let mut resps: Vec<BlkResp> = (0..depth).map(|_| BlkResp::default()).collect();
    let mut tokens: Vec<Option<u16>> = vec![None; depth];
    let start = test_guests::rdtsc();
    let (mut issued, mut done, mut in_flight) = (0, 0, 0usize);
    while done < count {
        for slot in 0..depth {
            if tokens[slot].is_none() && issued < count {
                let at = sector(issued) as usize;
                // SAFETY: the slot's buffers stay untouched until its request completes below.
                let t = unsafe {
                    if write {
                        blk.write_blocks_nb(at, &mut reqs[slot], &bufs[slot], &mut resps[slot])
                    } else {
                        blk.read_blocks_nb(at, &mut reqs[slot], &mut bufs[slot], &mut resps[slot])
                    }
                };
                match t {
                    Ok(t) => {
                        tokens[slot] = Some(t);
                        issued += 1;
                        in_flight += 1;
                        MAX_IN_FLIGHT.fetch_max(in_flight, Ordering::Relaxed);
                    }
                    // The driver's ring is full (virtio-drivers' queue has 16 entries): the
                    // depth reached is what it holds.
                    Err(pv_drivers::Error::QueueFull) => break,
                    Err(e) => {
                        println!("blkbench: FAILED: submit: {e:?}");
                        test_guests::exit(1);
                    }
                }
            }
        }
        let Some(t) = blk.peek_used() else {
            #[cfg(target_os = "none")]
            if WAIT_IN_HLT.load(Ordering::Relaxed) {
                irq::wait();
                continue;
            }
            core::hint::spin_loop();
            continue;
        };
        let Some(slot) = tokens.iter().position(|&x| x == Some(t)) else {
            println!("blkbench: FAILED: unknown token {t}");
            test_guests::exit(1);
        };
        // SAFETY: the same buffers as submitted for this token.
        let r = unsafe {
            if write {
                blk.complete_write_blocks(t, &reqs[slot], &bufs[slot], &mut resps[slot])
            } else {
                blk.complete_read_blocks(t, &reqs[slot], &mut bufs[slot], &mut resps[slot])
            }
        };
        if let Err(e) = r {
            println!("blkbench: FAILED: request: {e:?}");
            test_guests::exit(1);
        }
        tokens[slot] = None;
        done += 1;
        in_flight -= 1;
    }
    test_guests::rdtsc() - start
}

fn run(args: &str, _ram: u64) {
    heap::init();
    let ops: usize = args
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("ops=")?.parse().ok())
        .unwrap_or(256);
    let base = hv_abi::devices::VIRTIO_MMIO_BASE as *mut u8;
    // SAFETY: this domain's first virtio device is at VIRTIO_MMIO_BASE (identity-mapped).
    let bus = unsafe { MmioBus::new(NonNull::new(base).expect("not null"), 0x200) };
    let Ok(t) = RegisterTransport::new(bus) else {
        println!("blkbench: FAILED: no virtio disk");
        test_guests::exit(1);
    };
    let Ok(mut blk) = Block::<IdentityHal, _>::new(t) else {
        println!("blkbench: FAILED: the disk did not initialise");
        test_guests::exit(1);
    };
    let blocks = blk.capacity() / 8;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Fill the area first, so reads hit written blocks.
    let seq_mib = ((blocks * 4096) >> 20).min(4);
    batch(&mut blk, true, 8, 128 << 10, (seq_mib * 8) as usize, |i| {
        i as u64 * 256
    });
    // `only=qd32`: just the depth-32 tests (the harness differences two such runs to count
    // the exits per request without the start-up's).
    let only_qd32 = args.split_ascii_whitespace().any(|w| w == "only=qd32");
    if args.split_ascii_whitespace().any(|w| w == "irq=1") {
        #[cfg(target_os = "none")]
        irq::install();
        WAIT_IN_HLT.store(true, Ordering::Relaxed);
    }
    let tests = [
        ("randread-4k-qd1", false, 1, 4096, ops),
        ("randwrite-4k-qd1", true, 1, 4096, ops),
        ("randread-4k-qd32", false, 32, 4096, ops),
        ("randwrite-4k-qd32", true, 32, 4096, ops),
    ];
    for (name, write, depth, len, count) in tests {
        if only_qd32 && depth != 32 {
            continue;
        }
        let span = blocks.min(seq_mib * 256).max(1);
        let sectors: Vec<u64> = (0..count).map(|_| (rng.next() % span) * 8).collect();
        MAX_IN_FLIGHT.store(0, Ordering::Relaxed);
        let ticks = batch(&mut blk, write, depth, len, count, |i| sectors[i]);
        println!(
            "blkbench: {name}: {count} requests, {} bytes, {ticks} ticks, depth reached {}",
            count * len,
            MAX_IN_FLIGHT.load(Ordering::Relaxed)
        );
    }
    for (name, write) in [("seqread-1m", false), ("seqwrite-1m", true)] {
        if only_qd32 {
            continue;
        }
        let count = (seq_mib * 8) as usize;
        MAX_IN_FLIGHT.store(0, Ordering::Relaxed);
        let ticks = batch(&mut blk, write, 8, 128 << 10, count, |i| i as u64 * 256);
        println!(
            "blkbench: {name}: {count} requests, {} bytes, {ticks} ticks, depth reached {}",
            count * (128 << 10),
            MAX_IN_FLIGHT.load(Ordering::Relaxed)
        );
    }
    if blk.flush().is_err() {
        println!("blkbench: FAILED: flush");
        test_guests::exit(1);
    }
    #[cfg(target_os = "none")]
    if WAIT_IN_HLT.load(Ordering::Relaxed) {
        let (disk, timer) = irq::counts();
        println!("blkbench: waited in HLT: {disk} disk interrupts, {timer} timer interrupts");
    }
    println!("blkbench: done");
}
