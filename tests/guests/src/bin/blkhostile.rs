//! `blkhostile`: attacks its own virtio disk with corrupt rings, by hand (no driver), and
//! checks that each attack only breaks its own device (DEVICE_NEEDS_RESET), that a reset
//! brings the device back, and that a valid request still works afterwards. The host, dom0
//! and the other guests must not notice (the scenario checks them).
//!
//! Cases: a descriptor loop, an address outside RAM, a huge length, an available index far
//! ahead of the ring, a head index beyond the queue, and a storm of notifications with nothing
//! available (which must change nothing).
#![cfg_attr(target_os = "none", no_std, no_main)]
// Register values and ring fields are narrow by definition.
#![allow(clippy::cast_possible_truncation)]

use test_guests::println;

test_guests::guest_main!(run);

const BASE: u64 = hv_abi::devices::VIRTIO_MMIO_BASE;
const QSIZE: u16 = 8;

/// virtio-mmio registers (virtio 1.2 §4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const DESC: u64 = 0x080;
    pub const DRIVER: u64 = 0x090;
    pub const DEVICE: u64 = 0x0a0;
}

const NEEDS_RESET: u32 = 0x40;

#[repr(C, align(4096))]
struct Rings([u8; 5 * 4096]);

static mut RINGS: Rings = Rings([0; 5 * 4096]);

fn base() -> u64 {
    (&raw mut RINGS) as u64
}
fn desc() -> u64 {
    base()
}
fn avail() -> u64 {
    base() + 4096
}
fn used() -> u64 {
    base() + 8192
}
fn hdr() -> u64 {
    base() + 12288
}
fn data() -> u64 {
    base() + 16384
}

fn r32(off: u64) -> u32 {
    // SAFETY: the device window at BASE is identity-mapped; an access exits to the hypervisor.
    unsafe { ((BASE + off) as *const u32).read_volatile() }
}
fn w32(off: u64, v: u32) {
    // SAFETY: as in `r32`.
    unsafe { ((BASE + off) as *mut u32).write_volatile(v) }
}
fn put<T>(addr: u64, v: T) {
    // SAFETY: `addr` is inside RINGS (this guest's own memory, only reached this way).
    unsafe { (addr as *mut T).write_volatile(v) }
}
fn get<T: Copy>(addr: u64) -> T {
    // SAFETY: as in `put`.
    unsafe { (addr as *const T).read_volatile() }
}

/// Resets and initialises the device with one queue of QSIZE entries; rings zeroed.
fn init() -> bool {
    w32(reg::STATUS, 0);
    for i in 0..(5 * 4096) {
        put::<u8>(base() + i, 0);
    }
    w32(reg::STATUS, 1 | 2);
    w32(reg::DRIVER_FEATURES_SEL, 1);
    w32(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w32(reg::DRIVER_FEATURES_SEL, 0);
    w32(reg::DRIVER_FEATURES, 0);
    w32(reg::STATUS, 1 | 2 | 8);
    if r32(reg::STATUS) & 8 == 0 {
        return false;
    }
    w32(reg::QUEUE_SEL, 0);
    w32(reg::QUEUE_NUM, u32::from(QSIZE));
    for (r, a) in [
        (reg::DESC, desc()),
        (reg::DRIVER, avail()),
        (reg::DEVICE, used()),
    ] {
        w32(r, a as u32);
        w32(r + 4, (a >> 32) as u32);
    }
    w32(reg::QUEUE_READY, 1);
    w32(reg::STATUS, 1 | 2 | 8 | 4);
    r32(reg::STATUS) & NEEDS_RESET == 0
}

/// Descriptor `i`: address, length, flags, next.
fn set_desc(i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = desc() + u64::from(i) * 16;
    put(d, addr);
    put(d + 8, len);
    put(d + 12, flags);
    put(d + 14, next);
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Makes head `head` available as entry `idx` and publishes `idx + 1`.
fn offer(idx: u16, head: u16) {
    put(avail() + 4 + 2 * u64::from(idx % QSIZE), head);
    put(avail() + 2, idx.wrapping_add(1));
    w32(reg::QUEUE_NOTIFY, 0);
}

/// A valid read of sector 0 through descriptors 0..3 (header, 512 bytes, status).
fn valid_read(idx: u16) {
    put::<u32>(hdr(), 0); // VIRTIO_BLK_T_IN
    put::<u64>(hdr() + 8, 0);
    put::<u8>(hdr() + 32, 0xff);
    set_desc(0, hdr(), 16, F_NEXT, 1);
    set_desc(1, data(), 512, F_NEXT | F_WRITE, 2);
    set_desc(2, hdr() + 32, 1, F_WRITE, 0);
    offer(idx, 0);
}

fn run(_args: &str, _ram: u64) {
    if r32(reg::MAGIC) != 0x7472_6976 || r32(reg::DEVICE_ID) != 2 {
        println!("blkhostile: FAILED: no virtio disk at {BASE:#x}");
        test_guests::exit(1);
    }
    let mut unexpected = 0;
    let cases: [(&str, fn()); 5] = [
        ("descriptor loop", || {
            set_desc(0, hdr(), 16, F_NEXT, 1);
            set_desc(1, data(), 512, F_NEXT, 0);
            offer(0, 0);
        }),
        ("address outside RAM", || {
            set_desc(0, 0xffff_f000_0000, 16, F_NEXT, 1);
            set_desc(1, hdr() + 32, 1, F_WRITE, 0);
            offer(0, 0);
        }),
        ("huge length", || {
            set_desc(0, hdr(), u32::MAX, F_NEXT, 1);
            set_desc(1, hdr() + 32, 1, F_WRITE, 0);
            offer(0, 0);
        }),
        ("available index far ahead", || {
            valid_read(0);
            put(avail() + 2, 1000u16);
            w32(reg::QUEUE_NOTIFY, 0);
        }),
        ("head beyond the queue", || {
            offer(0, 200);
        }),
    ];
    for (name, attack) in cases {
        if !init() {
            println!("blkhostile: UNEXPECTED: init before '{name}' failed");
            unexpected += 1;
            continue;
        }
        attack();
        let s = r32(reg::STATUS);
        if s & NEEDS_RESET != 0 {
            println!("blkhostile: {name}: NEEDS_RESET, as expected");
        } else {
            println!("blkhostile: UNEXPECTED: {name}: status {s:#x}, device not broken");
            unexpected += 1;
        }
    }
    // A storm of notifications with nothing new: nothing happens, the device stays healthy.
    if init() {
        for _ in 0..2000 {
            w32(reg::QUEUE_NOTIFY, 0);
        }
        if r32(reg::STATUS) & NEEDS_RESET == 0 && get::<u16>(used() + 2) == 0 {
            println!("blkhostile: notification storm: ignored, device healthy");
        } else {
            println!("blkhostile: UNEXPECTED: notification storm broke the device");
            unexpected += 1;
        }
    }
    // After all that, a reset device serves a valid request.
    if init() {
        valid_read(0);
        let mut spins = 0u64;
        while get::<u16>(used() + 2) == 0 && spins < 50_000_000 {
            core::hint::spin_loop();
            spins += 1;
        }
        let status: u8 = get(hdr() + 32);
        if get::<u16>(used() + 2) == 1 && status == 0 {
            println!("blkhostile: after a reset a valid read completes (status 0)");
        } else {
            println!("blkhostile: UNEXPECTED: the valid read gave status {status}");
            unexpected += 1;
        }
    }
    println!("blkhostile: {unexpected} unexpected");
    if unexpected != 0 {
        test_guests::exit(1);
    }
}
