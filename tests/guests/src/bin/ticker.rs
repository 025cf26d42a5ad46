//! `ticker`: arms the paravirtual timer (SET_TIMER, vector 0x30, 10 ms), sleeps in HLT until
//! 20 interrupts arrived, and checks that an interrupt falling due while interrupts are
//! disabled is held and delivered right after STI. With the argument `stay` it then keeps the
//! timer at 1 s and stays up, halted between interrupts (a domain that keeps running, for
//! `cargo xtask run`), saying once a minute how long it has been up.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
use test_guests::{hv_abi, hypercall, println, rdtsc};

test_guests::guest_main!(run);

#[cfg(target_os = "none")]
static mut TICKS: u64 = 0;

#[cfg(target_os = "none")]
#[unsafe(naked)]
extern "C" fn tick_handler() {
    core::arch::naked_asm!("inc qword ptr [rip + {t}]", "iretq", t = sym TICKS);
}

#[cfg(target_os = "none")]
fn ticks() -> u64 {
    // SAFETY: a static only the interrupt handler writes; read as one aligned word.
    unsafe { (&raw const TICKS).read_volatile() }
}

#[cfg(target_os = "none")]
fn install_idt() {
    static mut IDT: [[u64; 2]; 64] = [[0; 2]; 64];
    #[repr(C, packed)]
    struct Dtr {
        limit: u16,
        base: u64,
    }
    let h = tick_handler as *const () as u64;
    let low = (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((h >> 16) & 0xffff) << 48);
    // SAFETY: single-threaded guest; the IDT is a static only this function writes.
    unsafe {
        let idt = &raw mut IDT;
        (*idt)[0x30] = [low, h >> 32];
        let dtr = Dtr {
            limit: 64 * 16 - 1,
            base: idt as u64,
        };
        core::arch::asm!("lidt [{0}]", in(reg) &dtr);
    }
}

#[cfg(target_os = "none")]
fn run(args: &str, _ram: u64) {
    use hv_abi::hypercall as nr;
    install_idt();
    let bad = hypercall(nr::SET_TIMER, 3, 10_000, 0);
    println!("ticker: a timer on vector 3 is refused: {bad}");
    let tsc_khz = u64::from(core::arch::x86_64::__cpuid(0x4000_0001).edx.max(1));
    let period = 10 * tsc_khz;
    // The hypervisor arms the timer a little after t0: deadlines are t0 + k × period plus
    // that entry cost, so lateness below is an upper bound.
    let t0 = rdtsc();
    let r = hypercall(nr::SET_TIMER, 0x30, 10_000, 0);
    let armed_in = rdtsc() - t0;
    // `warmup=N`: let N interrupts pass first (other domains starting up print to the
    // console, which is synchronous and stalls the CPUs that print).
    let warmup: u64 = args
        .split_whitespace()
        .find_map(|w| w.strip_prefix("warmup=")?.parse().ok())
        .unwrap_or(0);
    while ticks() < warmup {
        // SAFETY: STI; HLT waits for the next (timer) interrupt.
        unsafe { core::arch::asm!("sti", "hlt", "cli") };
    }
    // Deadlines stay t0 + k × period (the timer is periodic): lateness is still taken
    // against them.
    let base = ticks();
    // Lateness: how long after its deadline each interrupt got this vCPU running again (the
    // time since the last deadline: a missed period, collapsed into one interrupt, is counted
    // apart, so it does not shift the lateness of all later ones).
    let (mut worst, mut sum, mut missed) = (0u64, 0u64, 0u64);
    let t1 = rdtsc();
    while ticks() < base + 20 {
        // SAFETY: STI; HLT waits for the next (timer) interrupt.
        unsafe { core::arch::asm!("sti", "hlt", "cli") };
        let since = rdtsc() - t0;
        let late = since % period;
        worst = worst.max(late);
        sum += late;
        missed = (since / period).saturating_sub(ticks());
    }
    let dt = rdtsc() - t1;
    // Printed only now: console output is slow and would make the first deadline late.
    println!(
        "ticker: timer armed: {r} (the hypercall took {} us)",
        armed_in * 1000 / tsc_khz
    );
    println!(
        "ticker: 20 timer interrupts in HLT, {} TSC ticks apart on average",
        dt / 20
    );
    println!(
        "ticker: lateness max {} us, mean {} us, {missed} periods missed",
        worst * 1000 / tsc_khz,
        sum * 1000 / tsc_khz / 20
    );
    // With interrupts off, an interrupt that falls due is held...
    let before = ticks();
    let t1 = rdtsc();
    while rdtsc() - t1 < 3 * dt / 20 {
        hypercall(nr::NOP, 0, 0, 0);
    }
    let held = ticks() == before;
    // ...and arrives as soon as they are on again.
    // SAFETY: enables interrupts for one instruction window, then disables them.
    unsafe { core::arch::asm!("sti", "nop", "nop", "cli") };
    let delivered = ticks() > before;
    println!("ticker: held while IF=0: {held}; delivered right after STI: {delivered}");
    if args.split_whitespace().any(|a| a == "stay") {
        let r = hypercall(nr::SET_TIMER, 0x30, 1_000_000, 0);
        println!("ticker: staying up, 1 s timer: {r}");
        let base = ticks();
        loop {
            // SAFETY: as above: wait in HLT for the next timer interrupt.
            unsafe { core::arch::asm!("sti", "hlt", "cli") };
            let up = ticks() - base;
            if up > 0 && up.is_multiple_of(60) {
                println!("ticker: up {} min", up / 60);
            }
        }
    }
    hypercall(nr::SET_TIMER, 0x30, 0, 0);
}

#[cfg(not(target_os = "none"))]
fn run(_args: &str, _ram: u64) {}
