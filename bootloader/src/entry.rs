//! The first instructions: multiboot headers, the 32-bit entry, early page tables, the switch to
//! long mode, and the real-mode trampoline that application processors start in.
//!
//! Both loaders enter `_start` in 32-bit protected mode with paging off, `EAX` holding the
//! loader's magic and `EBX` the physical address of its information structure:
//! - GRUB (`multiboot2`, BIOS and UEFI) reads the multiboot2 header and loads the ELF segments;
//! - QEMU's `-kernel` reads the multiboot1 header, whose address fields (flag bit 16) let it load
//!   this ELF64 file as a flat image; QEMU refuses ELF64 files without them.
//!
//! The early page tables identity-map the first 4 GiB with 2 MiB pages (enough for the image,
//! the loader's structures, the local APIC and the ACPI tables); the hypervisor replaces them
//! with its own W^X tables as soon as it has a frame allocator.

use core::arch::global_asm;

/// Physical address the AP trampoline is copied to (page 8 below 1 MiB, vector 0x08 in SIPI).
pub const AP_TRAMPOLINE_PHYS: u64 = 0x8000;
/// Physical address of the parameter block the trampoline reads: CR3, stack top, CPU index,
/// 64-bit entry point, each a `u64`, in that order.
pub const AP_PARAMS_PHYS: u64 = 0x9000;

// The multiboot headers and the 32-bit entry. AT&T syntax: far jumps and absolute operands are
// spelled unambiguously there.
global_asm!(
    r#"
    .set MB1_MAGIC, 0x1BADB002
    .set MB1_FLAGS, (1 << 0) | (1 << 1) | (1 << 16)
    .set MB2_MAGIC, 0xE85250D6

    .section .multiboot_header, "a"
    .balign 8
mb1_header:
    .long MB1_MAGIC
    .long MB1_FLAGS
    .long 0x100000000 - (MB1_MAGIC + MB1_FLAGS)
    .long mb1_header
    .long __image_start
    .long __load_end
    .long __image_end
    .long _start

    .balign 8
mb2_header:
    .long MB2_MAGIC
    .long 0
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (MB2_MAGIC + (mb2_header_end - mb2_header))
    .balign 8
    .short 0, 0
    .long 8
mb2_header_end:

    .section .boot.text, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    movl $boot_stack_top, %esp
    movl %eax, boot_magic
    movl %ebx, boot_info_addr
    rdtsc
    movl %eax, boot_entry_tsc
    movl %edx, boot_entry_tsc + 4

    /* Long mode present? CPUID.80000001h:EDX[29]. */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 9f
    movl $0x80000001, %eax
    cpuid
    btl $29, %edx
    jnc 9f
    /* Remember whether NX exists (EDX[20]); EFER.NXE may only be set then. */
    xorl %eax, %eax
    btl $20, %edx
    jnc 1f
    movl $(1 << 11), %eax
1:  movl %eax, boot_efer_nxe

    /* 2048 PD entries of 2 MiB: 0..4 GiB, present | writable | huge. */
    movl $boot_pd, %edi
    movl $0x83, %eax
    xorl %edx, %edx
    movl $2048, %ecx
2:  movl %eax, (%edi)
    movl %edx, 4(%edi)
    addl $0x200000, %eax
    adcl $0, %edx
    addl $8, %edi
    loop 2b
    /* Four PDPT entries, one per PD page. */
    movl $boot_pdpt, %edi
    movl $boot_pd + 3, %eax
    movl $4, %ecx
3:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $4096, %eax
    addl $8, %edi
    loop 3b
    movl $boot_pdpt + 3, %eax
    movl %eax, boot_pml4

    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    orl boot_efer_nxe, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    movl $long_mode_entry, %eax
    pushl $0x08
    pushl %eax
    lret

    /* No long mode: say so on COM1 and stop. */
9:  movl $no_long_mode_msg, %esi
4:  movb (%esi), %al
    testb %al, %al
    jz 5f
    movw $0x3F8, %dx
    outb %al, %dx
    incl %esi
    jmp 4b
5:  hlt
    jmp 5b

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl boot_magic, %edi
    movl boot_info_addr, %esi
    call bootloader_rust_entry
6:  cli
    hlt
    jmp 6b

    .section .boot.data, "aw"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF
    .quad 0x00CF93000000FFFF
boot_gdt_ptr:
    .short boot_gdt_ptr - boot_gdt - 1
    .quad boot_gdt
    .balign 8
    .global boot_magic, boot_info_addr, boot_entry_tsc, boot_efer_nxe
boot_magic: .long 0
boot_info_addr: .long 0
boot_efer_nxe: .long 0
    .balign 8
boot_entry_tsc: .quad 0
no_long_mode_msg:
    .asciz "hypervisor: this CPU has no 64-bit long mode; cannot boot\r\n"

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd: .skip 4 * 4096
    .global boot_stack_guard
boot_stack_guard: .skip 4096
boot_stack: .skip 64 * 1024
    .global boot_stack_top
boot_stack_top:
"#,
    options(att_syntax)
);

// The application-processor trampoline. It is position dependent on AP_TRAMPOLINE_PHYS: the
// hypervisor copies the bytes between the two labels there and starts each AP with a SIPI whose
// vector is AP_TRAMPOLINE_PHYS >> 12. The AP reads its parameters from AP_PARAMS_PHYS.
global_asm!(
    r#"
    .set TRAMP, 0x8000
    .set PARAMS, 0x9000
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    .code16
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl TRAMP + (ap_gdt_ptr - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    .byte 0x66, 0xEA
    .long TRAMP + (ap_prot - ap_trampoline_start)
    .short 0x08
    .code32
ap_prot:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl PARAMS, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    orl PARAMS + 32, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0
    .byte 0xEA
    .long TRAMP + (ap_long - ap_trampoline_start)
    .short 0x18
    .code64
ap_long:
    movq PARAMS + 8, %rsp
    movq PARAMS + 16, %rdi
    movq PARAMS + 24, %rax
    xorl %ebp, %ebp
    call *%rax
7:  cli
    hlt
    jmp 7b
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF
    .quad 0x00CF93000000FFFF
    .quad 0x00AF9B000000FFFF
ap_gdt_ptr:
    .short ap_gdt_ptr - ap_gdt - 1
    .long TRAMP + (ap_gdt - ap_trampoline_start)
ap_trampoline_end:
    .text
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static boot_entry_tsc: u64;
    static boot_efer_nxe: u32;
    static boot_stack_guard: u8;
}

/// The page below the boot stack; the hypervisor maps it not-present to catch overflows.
pub fn boot_stack_guard_page() -> u64 {
    &raw const boot_stack_guard as u64
}

/// The AP trampoline's machine code, to be copied to [`AP_TRAMPOLINE_PHYS`].
pub fn ap_trampoline() -> &'static [u8] {
    // SAFETY: both symbols are labels in one read-only section emitted above, start before end;
    // the bytes between them are immutable data for the whole run.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let end = &raw const ap_trampoline_end;
        let len = (end as usize).wrapping_sub(start as usize);
        core::slice::from_raw_parts(start, len)
    }
}

/// EFER bits beyond LME that the entry code set (NXE where the CPU has NX); APs set the same.
pub fn efer_extra_bits() -> u64 {
    // SAFETY: written once by the 32-bit entry code before any Rust ran; read-only afterwards.
    u64::from(unsafe { core::ptr::read_volatile(&raw const boot_efer_nxe) })
}

#[unsafe(no_mangle)]
extern "C" fn bootloader_rust_entry(magic: u32, info_addr: u32) -> ! {
    // SAFETY: written once by the entry code before this function was called.
    let entry_tsc = unsafe { core::ptr::read_volatile(&raw const boot_entry_tsc) };
    // SAFETY: the loader passed `info_addr` with `magic`; the early page tables identity-map it
    // and nothing has reused that memory yet.
    let info = unsafe { crate::info::parse(magic, u64::from(info_addr)) };
    let info = info.map(|mut i| {
        i.entry_tsc = entry_tsc;
        i
    });
    unsafe extern "Rust" {
        /// Defined by the kernel that links this crate.
        fn hypervisor_main(info: Result<crate::BootInfo, crate::BootError>) -> !;
    }
    // SAFETY: the kernel defines this symbol with exactly this signature.
    unsafe { hypervisor_main(info) }
}
