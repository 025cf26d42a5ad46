//! `fpu SEED`: enables SSE and, where offered, AVX (CR4, XSETBV), checks that bad XCR0 values
//! are refused with #GP, loads a pattern derived from SEED into YMM0-3 (XMM0-3 without AVX),
//! and yields many times: run beside another `fpu` on the same CPU, each must find its own
//! registers intact after every switch.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![allow(clippy::cast_possible_truncation)] // EDX:EAX halves

#[cfg(target_os = "none")]
use test_guests::{hv_abi, hypercall, println};

test_guests::guest_main!(run);

#[cfg(target_os = "none")]
static mut GP_COUNT: u64 = 0;

/// #GP handler: counts and skips the 3-byte XSETBV that faulted.
#[cfg(target_os = "none")]
#[unsafe(naked)]
extern "C" fn gp_handler() {
    core::arch::naked_asm!(
        "add qword ptr [rsp + 8], 3",
        "add rsp, 8",
        "inc qword ptr [rip + {count}]",
        "iretq",
        count = sym GP_COUNT,
    );
}

#[cfg(target_os = "none")]
fn install_idt() {
    static mut IDT: [[u64; 2]; 32] = [[0; 2]; 32];
    #[repr(C, packed)]
    struct Dtr {
        limit: u16,
        base: u64,
    }
    let h = gp_handler as *const () as u64;
    let low = (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((h >> 16) & 0xffff) << 48);
    // SAFETY: single-threaded guest; the IDT is a static only this function writes.
    unsafe {
        let idt = &raw mut IDT;
        (*idt)[13] = [low, h >> 32];
        let dtr = Dtr {
            limit: 32 * 16 - 1,
            base: idt as u64,
        };
        core::arch::asm!("lidt [{0}]", in(reg) &dtr);
    }
}

#[cfg(target_os = "none")]
fn xsetbv(value: u64) {
    // SAFETY: the hypervisor either accepts the value or injects #GP, which `gp_handler` skips.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32);
    }
}

/// Loads 4 vector registers from `buf` (YMM with AVX, else XMM); encoded as bytes because the
/// guest is built without SIMD target features.
#[cfg(target_os = "none")]
fn load(buf: &[u8; 128], avx: bool) {
    // SAFETY: reads 128 bytes from `buf`; writes only vector registers this program never uses
    // otherwise (it is built soft-float).
    unsafe {
        if avx {
            core::arch::asm!(
                ".byte 0xc5, 0xfe, 0x6f, 0x40, 0x00", // vmovdqu ymm0, [rax]
                ".byte 0xc5, 0xfe, 0x6f, 0x48, 0x20", // vmovdqu ymm1, [rax+32]
                ".byte 0xc5, 0xfe, 0x6f, 0x50, 0x40", // vmovdqu ymm2, [rax+64]
                ".byte 0xc5, 0xfe, 0x6f, 0x58, 0x60", // vmovdqu ymm3, [rax+96]
                in("rax") buf.as_ptr(),
            );
        } else {
            core::arch::asm!(
                ".byte 0xf3, 0x0f, 0x6f, 0x40, 0x00", // movdqu xmm0, [rax]
                ".byte 0xf3, 0x0f, 0x6f, 0x48, 0x20", // movdqu xmm1, [rax+32]
                ".byte 0xf3, 0x0f, 0x6f, 0x50, 0x40", // movdqu xmm2, [rax+64]
                ".byte 0xf3, 0x0f, 0x6f, 0x58, 0x60", // movdqu xmm3, [rax+96]
                in("rax") buf.as_ptr(),
            );
        }
    }
}

/// Stores the 4 vector registers into `buf`.
#[cfg(target_os = "none")]
fn store(buf: &mut [u8; 128], avx: bool) {
    // SAFETY: writes 128 bytes into `buf`; reads vector registers only.
    unsafe {
        if avx {
            core::arch::asm!(
                ".byte 0xc5, 0xfe, 0x7f, 0x40, 0x00",
                ".byte 0xc5, 0xfe, 0x7f, 0x48, 0x20",
                ".byte 0xc5, 0xfe, 0x7f, 0x50, 0x40",
                ".byte 0xc5, 0xfe, 0x7f, 0x58, 0x60",
                in("rax") buf.as_mut_ptr(),
            );
        } else {
            core::arch::asm!(
                ".byte 0xf3, 0x0f, 0x7f, 0x40, 0x00",
                ".byte 0xf3, 0x0f, 0x7f, 0x48, 0x20",
                ".byte 0xf3, 0x0f, 0x7f, 0x50, 0x40",
                ".byte 0xf3, 0x0f, 0x7f, 0x58, 0x60",
                in("rax") buf.as_mut_ptr(),
            );
        }
    }
}

#[cfg(target_os = "none")]
fn run(args: &str, _ram: u64) {
    let seed: u64 = args
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let ecx = core::arch::x86_64::__cpuid(1).ecx;
    let (xsave, avx_offered) = (ecx & (1 << 26) != 0, ecx & (1 << 28) != 0);
    // CR4: OSFXSR (9), OSXMMEXCPT (10), OSXSAVE (18) where offered.
    // SAFETY: the guest's own CR4; these bits only enable SSE/XSAVE for itself.
    unsafe {
        let mut cr4: u64;
        core::arch::asm!("mov {0}, cr4", out(reg) cr4);
        cr4 |= (1 << 9) | (1 << 10) | if xsave { 1 << 18 } else { 0 };
        core::arch::asm!("mov cr4, {0}", in(reg) cr4);
    }
    let osxsave_seen = core::arch::x86_64::__cpuid(1).ecx & (1 << 27) != 0;
    let mut avx = false;
    if xsave {
        install_idt();
        xsetbv(0); // x87 off: refused
        xsetbv(0b101); // AVX without SSE: refused
        xsetbv(1 << 9 | 0b111); // PKRU: never offered
        // SAFETY: reads a static the handler updates; single-threaded.
        let gps = unsafe { (&raw const GP_COUNT).read_volatile() };
        avx = avx_offered;
        xsetbv(if avx { 0b111 } else { 0b011 });
        // SAFETY: as above.
        let after = unsafe { (&raw const GP_COUNT).read_volatile() };
        println!(
            "fpu[{seed}]: OSXSAVE visible: {osxsave_seen}; bad XCR0 values refused: {gps} of 3; good one accepted: {}",
            after == gps
        );
    }
    let mut pattern = [0u8; 128];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (seed as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    load(&pattern, avx);
    let mut bad = 0;
    let rounds = 200;
    for _ in 0..rounds {
        hypercall(hv_abi::hypercall::YIELD, 0, 0, 0);
        let mut now = [0u8; 128];
        store(&mut now, avx);
        if now != pattern {
            bad += 1;
        }
    }
    println!(
        "fpu[{seed}]: {} registers intact across {rounds} switches: {} bad",
        if avx { "YMM" } else { "XMM" },
        bad
    );
}

#[cfg(not(target_os = "none"))]
fn run(_args: &str, _ram: u64) {}
