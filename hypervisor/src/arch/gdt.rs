//! Per-CPU GDT and TSS. The TSS carries the IST stacks for double faults, NMIs and machine
//! checks (see `trap`), so those are handled even when the normal stack is gone.
//!
//! Selectors match the boot GDT and the IDT gates: 0x08 kernel code, 0x10 kernel data, then
//! the TSS.

use alloc::boxed::Box;
use alloc::vec;

use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;

use super::trap::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI};

const IST_STACK: usize = 16 * 1024;

fn stack_top() -> VirtAddr {
    // Leaked on purpose: a CPU's IST stacks live as long as the CPU.
    let stack = vec![0u8; IST_STACK].leak();
    VirtAddr::from_ptr(stack.as_ptr_range().end).align_down(16u64)
}

/// Builds and loads this CPU's GDT and TSS (needs the heap).
pub fn init_this_cpu() {
    let tss = Box::leak(Box::new(TaskStateSegment::new()));
    tss.interrupt_stack_table[usize::from(IST_DOUBLE_FAULT - 1)] = stack_top();
    tss.interrupt_stack_table[usize::from(IST_NMI - 1)] = stack_top();
    tss.interrupt_stack_table[usize::from(IST_MACHINE_CHECK - 1)] = stack_top();
    let gdt = Box::leak(Box::new(GlobalDescriptorTable::new()));
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss));
    debug_assert_eq!((code.0, data.0), (0x08, 0x10));
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, which is leaked and so lives forever;
    // the code and data descriptors are flat 64-bit kernel segments, as the boot GDT's were.
    unsafe {
        CS::set_reg(code);
        SS::set_reg(data);
        DS::set_reg(data);
        ES::set_reg(data);
        load_tss(tss_sel);
    }
}
