//! The IDT, the assembly entry stubs for every exception and interrupt the hypervisor takes,
//! and the Rust dispatcher behind them.
//!
//! Every CPU exception is fatal to the CPU that takes it: the report (vector, name, error
//! code, RIP, CR2, CR3 and all general registers) goes to the console and that CPU halts;
//! the other CPUs keep running. Double faults, NMIs and machine checks run on their own IST
//! stacks, so a stack overflow is still reported.

use core::arch::global_asm;
use core::sync::atomic::Ordering;

use crate::arch::percpu::{self, CpuState};
use crate::arch::{cpu, lapic, serial};

/// The local APIC timer's vector.
pub const TIMER_VECTOR: u8 = 0x40;
/// The kick IPI's vector: sent to a CPU so that the guest it runs exits at once (external
/// interrupts exit) and its run loop sees what changed (a destroy, new work).
pub const KICK_VECTOR: u8 = 0x41;
/// The local APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Registers saved by the entry stubs, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// Stubs: vectors with a CPU-pushed error code push only the vector; the others push a zero
// first so every frame has the same layout. `trap_common` saves the GPRs and calls
// `trap_dispatch(&mut TrapFrame)`. The stack is 16-byte aligned at the call: the CPU aligns
// RSP before pushing its 5-word frame, and 2 + 15 more words make 22 words in all.
global_asm!(
    r#"
    .macro TRAP_NOERR vec
    .balign 16
trap_stub_\vec:
    push 0
    push \vec
    jmp trap_common
    .endm
    .macro TRAP_ERR vec
    .balign 16
trap_stub_\vec:
    push \vec
    jmp trap_common
    .endm

    .section .text.trap, "ax"
    TRAP_NOERR 0
    TRAP_NOERR 1
    TRAP_NOERR 2
    TRAP_NOERR 3
    TRAP_NOERR 4
    TRAP_NOERR 5
    TRAP_NOERR 6
    TRAP_NOERR 7
    TRAP_ERR 8
    TRAP_NOERR 9
    TRAP_ERR 10
    TRAP_ERR 11
    TRAP_ERR 12
    TRAP_ERR 13
    TRAP_ERR 14
    TRAP_NOERR 15
    TRAP_NOERR 16
    TRAP_ERR 17
    TRAP_NOERR 18
    TRAP_NOERR 19
    TRAP_NOERR 20
    TRAP_ERR 21
    TRAP_NOERR 22
    TRAP_NOERR 23
    TRAP_NOERR 24
    TRAP_NOERR 25
    TRAP_NOERR 26
    TRAP_NOERR 27
    TRAP_NOERR 28
    TRAP_ERR 29
    TRAP_ERR 30
    TRAP_NOERR 31
    TRAP_NOERR 64
    TRAP_NOERR 65
    TRAP_NOERR 255

trap_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call {dispatch}
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .section .rodata.trap, "a"
    .balign 8
    .global trap_stub_table
trap_stub_table:
    .quad trap_stub_0, trap_stub_1, trap_stub_2, trap_stub_3
    .quad trap_stub_4, trap_stub_5, trap_stub_6, trap_stub_7
    .quad trap_stub_8, trap_stub_9, trap_stub_10, trap_stub_11
    .quad trap_stub_12, trap_stub_13, trap_stub_14, trap_stub_15
    .quad trap_stub_16, trap_stub_17, trap_stub_18, trap_stub_19
    .quad trap_stub_20, trap_stub_21, trap_stub_22, trap_stub_23
    .quad trap_stub_24, trap_stub_25, trap_stub_26, trap_stub_27
    .quad trap_stub_28, trap_stub_29, trap_stub_30, trap_stub_31
    .quad trap_stub_64, trap_stub_65, trap_stub_255
    .text
"#,
    dispatch = sym trap_dispatch,
);

unsafe extern "C" {
    static trap_stub_table: [u64; 35];
}

/// IST slot (1-based, as in the IDT entry) for double faults, NMIs and machine checks.
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

static mut IDT: Idt = Idt([[0; 2]; 256]);

fn gate(handler: u64, ist: u8) -> [u64; 2] {
    // 64-bit interrupt gate, present, DPL 0, selector 0x08 (kernel code in both the boot GDT
    // and every per-CPU GDT) (SDM Vol. 3A §6.14.1).
    let low = (handler & 0xffff)
        | (0x08 << 16)
        | (u64::from(ist & 7) << 32)
        | (0x8e << 40)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// Fills the IDT (once, on the BSP, before any other CPU runs).
pub fn init_idt() {
    // SAFETY: the table is emitted above with 35 entries and never written.
    let stubs = unsafe { &trap_stub_table };
    let mut idt = Idt([[0; 2]; 256]);
    for (vector, &stub) in stubs[..32].iter().enumerate() {
        let ist = match vector {
            2 => IST_NMI,
            8 => IST_DOUBLE_FAULT,
            18 => IST_MACHINE_CHECK,
            _ => 0,
        };
        idt.0[vector] = gate(stub, ist);
    }
    idt.0[usize::from(TIMER_VECTOR)] = gate(stubs[32], 0);
    idt.0[usize::from(KICK_VECTOR)] = gate(stubs[33], 0);
    idt.0[usize::from(SPURIOUS_VECTOR)] = gate(stubs[34], 0);
    // SAFETY: runs once on the BSP before interrupts are enabled and before any AP starts, so
    // nothing else reads or writes the IDT concurrently.
    unsafe { (&raw mut IDT).write(idt) };
}

/// Loads the IDT on this CPU.
pub fn load_idt() {
    let ptr = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: x86_64::VirtAddr::new(&raw const IDT as u64),
    };
    // SAFETY: IDT is a static, fully initialised by `init_idt` before any CPU loads it, and
    // every present gate points at a stub above.
    unsafe { x86_64::instructions::tables::lidt(&ptr) };
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 floating-point error",
    "alignment check",
    "machine check",
    "SIMD floating-point",
    "virtualization exception",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security exception",
    "reserved",
];

const MNEMONICS: [&str; 32] = [
    "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "CSO", "TS", "NP", "SS", "GP", "PF",
    "15", "MF", "AC", "MC", "XM", "VE", "CP", "22", "23", "24", "25", "26", "27", "HV", "VC", "SX",
    "31",
];

extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    match frame.vector {
        v if v == u64::from(TIMER_VECTOR) => {
            let me = percpu::this_cpu();
            me.ticks.fetch_add(1, Ordering::Relaxed);
            let due = me.timer_due.swap(0, Ordering::Relaxed);
            if due != 0 {
                let late = crate::arch::cpu::rdtsc().saturating_sub(due);
                me.timer_late_max.fetch_max(late, Ordering::Relaxed);
                me.timer_late_sum.fetch_add(late, Ordering::Relaxed);
                me.timer_fired.fetch_add(1, Ordering::Relaxed);
            }
            me.attention.fetch_or(percpu::ATTN_TIMER, Ordering::Relaxed);
            lapic::eoi();
        }
        // The kick only needed the exit it caused; the run loop does the rest.
        v if v == u64::from(KICK_VECTOR) => lapic::eoi(),
        v if v == u64::from(SPURIOUS_VECTOR) => {}
        v if v < 32 => report_exception(frame),
        _ => {}
    }
}

struct ReportWriter;

impl core::fmt::Write for ReportWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        serial::write_for_report(s.as_bytes());
        Ok(())
    }
}

fn report_exception(f: &TrapFrame) -> ! {
    use core::fmt::Write;
    let cpu = cpu::current_cpu();
    let v = f.vector as usize;
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let (cr3, _) = x86_64::registers::control::Cr3::read_raw();
    let mut w = ReportWriter;
    let _ = write!(
        w,
        "\n*** CPU {cpu}: EXCEPTION #{} {} (vector {v}), error code {:#x}\n",
        MNEMONICS[v], NAMES[v], f.error_code
    );
    if v == 14 {
        let e = f.error_code;
        let _ = writeln!(
            w,
            "    page fault: {} {} access, {} mode{}",
            if e & 1 != 0 {
                "protection violation on"
            } else {
                "not-present page on"
            },
            if e & 16 != 0 {
                "instruction-fetch"
            } else if e & 2 != 0 {
                "write"
            } else {
                "read"
            },
            if e & 4 != 0 { "user" } else { "supervisor" },
            if e & 8 != 0 { ", reserved bit set" } else { "" },
        );
    }
    let _ = write!(
        w,
        "    RIP={:#018x} CS={:#06x} RFLAGS={:#010x}\n    RSP={:#018x} SS={:#06x}\n    \
         CR2={:#018x} CR3={:#018x}\n",
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        cr2,
        cr3.start_address().as_u64()
    );
    let _ = write!(
        w,
        "    RAX={:#018x} RBX={:#018x} RCX={:#018x} RDX={:#018x}\n    \
         RSI={:#018x} RDI={:#018x} RBP={:#018x}\n    \
         R8 ={:#018x} R9 ={:#018x} R10={:#018x} R11={:#018x}\n    \
         R12={:#018x} R13={:#018x} R14={:#018x} R15={:#018x}\n",
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15
    );
    let _ = writeln!(w, "*** CPU {cpu} halted; the other CPUs keep running");
    percpu::this_cpu().set_state(CpuState::Halted);
    cpu::halt_forever()
}

/// Reports a Rust panic like an exception: where, why, and this CPU halts.
pub fn report_panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let cpu = cpu::current_cpu();
    let _ = write!(
        ReportWriter,
        "\n*** CPU {cpu}: PANIC: {info}\n*** CPU {cpu} halted\n"
    );
    percpu::this_cpu().set_state(CpuState::Halted);
    cpu::halt_forever()
}
