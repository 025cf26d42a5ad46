//! `blkcheck`: drives its virtio disk (served by dom0 from a volume) with `pv-drivers`' block
//! driver: writes patterns of several sizes and alignments, flushes, reads them back and
//! checks every byte; then reads past the end of the disk, which must fail cleanly.
//!
//! Arguments: `seed=N` (the patterns' seed), `mode=write|verify|both` (default both: a later
//! boot on the same disk can verify what an earlier one wrote), `mode=rounds|checkrounds
//! rounds=N` (flushed rounds, for power cuts) and `mode=survive` (rounds while dom0 fails);
//! `windows=W+W...` runs the mode on each of those virtio windows in turn (a guest's disk k is
//! at window 2k), with the seed plus the window (default: window 0 alone).
#![cfg_attr(target_os = "none", no_std, no_main)]
// Sector numbers of a test disk fit usize on this 64-bit target.
#![allow(clippy::cast_possible_truncation)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use pv_drivers::devices::Block;
use pv_drivers::hal::IdentityHal;
use pv_drivers::transport::{MmioBus, RegisterTransport};
use test_guests::println;

test_guests::guest_main!(run);

test_guests::guest_heap!(4 << 20);

/// Where each pattern goes: (first sector, sectors).
const EXTENTS: &[(u64, usize)] = &[
    (0, 1),
    (1, 7),
    (8, 8),
    (100, 64),
    (1000, 256),
    (2048, 3),
    (4095, 1),
];

fn byte(seed: u64, sector: u64, i: usize) -> u8 {
    let x = (sector * 512 + i as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(seed.wrapping_mul(0x632b_e59b_d9b4_e019));
    (x >> 56) as u8
}

fn pattern(seed: u64, sector: u64, sectors: usize) -> Vec<u8> {
    (0..sectors * 512).map(|i| byte(seed, sector, i)).collect()
}

/// `mode=survive`: rounds of write, flush and read-back while dom0 fails and comes back; a
/// round may fail with I/O errors (dom0 went away with requests in flight) and ends at its
/// first error, but never returns wrong data (what a completed flush covered survives dom0's
/// restart on a real disk), and rounds after dom0's return succeed.
fn survive<T: pv_drivers::transport::RegisterBus>(
    blk: &mut Block<IdentityHal, RegisterTransport<T>>,
    seed: u64,
    capacity: u64,
) {
    const ROUNDS: u64 = 12;
    let (mut failed, mut wrong, mut last_ok) = (0, 0, 0);
    for round in 0..ROUNDS {
        let s = seed + round;
        let mut ok = true;
        for &(sector, sectors) in EXTENTS {
            if sector + sectors as u64 > capacity {
                continue;
            }
            ok = blk
                .write_blocks(sector as usize, &pattern(s, sector, sectors))
                .is_ok();
            if !ok {
                break;
            }
        }
        ok = ok && blk.flush().is_ok();
        if ok {
            for &(sector, sectors) in EXTENTS {
                if sector + sectors as u64 > capacity {
                    continue;
                }
                let mut back = vec![0u8; sectors * 512];
                match blk.read_blocks(sector as usize, &mut back) {
                    Ok(()) if back == pattern(s, sector, sectors) => {}
                    Ok(()) => wrong += 1,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
        }
        if ok {
            last_ok = round + 1;
        } else {
            failed += 1;
            println!("blkcheck: survive: round {round} failed with I/O errors");
        }
    }
    println!(
        "blkcheck: survive: {ROUNDS} rounds, {failed} failed with I/O errors, {wrong} wrong reads, last good round {last_ok}"
    );
    if wrong != 0 || last_ok != ROUNDS {
        println!("blkcheck: FAILED: survive");
        test_guests::exit(1);
    }
}

/// `mode=rounds rounds=N`: round r writes 64 sectors at sector 64·r with seed + r, flushes,
/// and says so; the harness may cut the power at any point. `mode=checkrounds rounds=N`: a
/// later boot checks that rounds 0..N read back intact (every one of them was flushed).
fn rounds<T: pv_drivers::transport::RegisterBus>(
    blk: &mut Block<IdentityHal, RegisterTransport<T>>,
    seed: u64,
    n: u64,
    check: bool,
) {
    for r in 0..n {
        let sector = 64 * r;
        if check {
            let mut back = vec![0u8; 64 * 512];
            if blk.read_blocks(sector as usize, &mut back).is_err()
                || back != pattern(seed + r, sector, 64)
            {
                println!(
                    "blkcheck: FAILED: round {r} (flushed before the power cut) is not intact"
                );
                test_guests::exit(1);
            }
        } else {
            if blk
                .write_blocks(sector as usize, &pattern(seed + r, sector, 64))
                .is_err()
                || blk.flush().is_err()
            {
                println!("blkcheck: FAILED: round {r}: I/O error");
                test_guests::exit(1);
            }
            println!("blkcheck: round {r} flushed");
        }
    }
    if check {
        println!("blkcheck: rounds 0..{n} intact (seed {seed})");
    } else {
        println!("blkcheck: {n} rounds written and flushed (seed {seed})");
    }
}

fn run(args: &str, _ram: u64) {
    heap::init();
    let arg = |k: &str| {
        args.split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    let seed: u64 = arg("seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    let mode = arg("mode").unwrap_or("both");
    // `windows=0+2`: each disk window in turn (the guest's first disk is window 0, its second
    // window 2), with seed + window; default the first disk alone.
    let windows: Vec<u64> = arg("windows")
        .map(|w| w.split('+').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![0]);
    for &w in &windows {
        check(arg, seed + w, mode, w);
    }
}

/// Runs `mode` on the virtio disk at window `window`.
fn check<'a>(arg: impl Fn(&str) -> Option<&'a str>, seed: u64, mode: &str, window: u64) {
    let base = (hv_abi::devices::VIRTIO_MMIO_BASE + window * hv_abi::devices::VIRTIO_MMIO_STRIDE)
        as *mut u8;
    // SAFETY: the hypervisor puts this domain's virtio devices at their windows from
    // VIRTIO_MMIO_BASE; the page is identity-mapped by the loader, and nothing else in this
    // guest touches it.
    let bus = unsafe { MmioBus::new(NonNull::new(base).expect("not null"), 0x200) };
    let transport = match RegisterTransport::new(bus) {
        Ok(t) => t,
        Err(e) => {
            println!("blkcheck: FAILED: no virtio device at {base:p}: {e:?}");
            test_guests::exit(1);
        }
    };
    let mut blk = match Block::<IdentityHal, _>::new(transport) {
        Ok(b) => b,
        Err(e) => {
            println!("blkcheck: FAILED: the disk did not initialise: {e:?}");
            test_guests::exit(1);
        }
    };
    let capacity = blk.capacity();
    let mut id = [0u8; 20];
    let n = blk.device_id(&mut id).unwrap_or(0);
    println!(
        "blkcheck: disk '{}' at window {window}, {capacity} sectors, read-only: {}",
        core::str::from_utf8(&id[..n]).unwrap_or("?"),
        blk.readonly()
    );
    let mut requests = 0u64;
    if mode == "survive" {
        survive(&mut blk, seed, capacity);
        return;
    }
    if mode == "rounds" || mode == "checkrounds" {
        let n: u64 = arg("rounds").and_then(|s| s.parse().ok()).unwrap_or(8);
        rounds(&mut blk, seed, n, mode == "checkrounds");
        return;
    }
    if mode == "write" || mode == "both" {
        for &(sector, sectors) in EXTENTS {
            if sector + sectors as u64 > capacity {
                continue;
            }
            if let Err(e) = blk.write_blocks(sector as usize, &pattern(seed, sector, sectors)) {
                println!("blkcheck: FAILED: write of {sectors} sector(s) at {sector}: {e:?}");
                test_guests::exit(1);
            }
            requests += 1;
        }
        if let Err(e) = blk.flush() {
            println!("blkcheck: FAILED: flush: {e:?}");
            test_guests::exit(1);
        }
        requests += 1;
        println!(
            "blkcheck: {} patterns written and flushed (seed {seed})",
            EXTENTS.len()
        );
    }
    if mode == "verify" || mode == "both" {
        let mut bad = 0;
        for &(sector, sectors) in EXTENTS {
            if sector + sectors as u64 > capacity {
                continue;
            }
            let mut back = vec![0u8; sectors * 512];
            if let Err(e) = blk.read_blocks(sector as usize, &mut back) {
                println!("blkcheck: FAILED: read of {sectors} sector(s) at {sector}: {e:?}");
                test_guests::exit(1);
            }
            requests += 1;
            if back != pattern(seed, sector, sectors) {
                println!("blkcheck: FAILED: {sectors} sector(s) at {sector} differ");
                bad += 1;
            }
        }
        if bad != 0 {
            test_guests::exit(1);
        }
        println!("blkcheck: every pattern read back intact (seed {seed})");
    }
    // Past the end: the device answers IOERR; the guest carries on.
    let mut one = [0u8; 512];
    match blk.read_blocks(capacity as usize, &mut one) {
        Err(_) => println!("blkcheck: a read past the end failed cleanly"),
        Ok(()) => {
            println!("blkcheck: FAILED: a read past the end succeeded");
            test_guests::exit(1);
        }
    }
    println!("blkcheck: done after {requests} requests");
}
