//! The legacy 8259 PIC pair: remapped away from the exception vectors (to 0x20..0x2F) and fully
//! masked. The hypervisor takes interrupts through the local APIC only; without this, the
//! firmware's PIT interrupt would arrive on vector 8 and look like a double fault.

use x86_64::instructions::port::Port;

/// Remaps and masks both PICs.
pub fn disable() {
    let mut m_cmd: Port<u8> = Port::new(0x20);
    let mut m_data: Port<u8> = Port::new(0x21);
    let mut s_cmd: Port<u8> = Port::new(0xa0);
    let mut s_data: Port<u8> = Port::new(0xa1);
    // SAFETY: ports 0x20/0x21/0xA0/0xA1 are the 8259 pair on PC-compatible machines, owned by
    // the hypervisor; the ICW1..ICW4 sequence is the documented initialisation, and the final
    // mask of 0xFF stops every legacy interrupt.
    unsafe {
        m_cmd.write(0x11);
        s_cmd.write(0x11);
        m_data.write(0x20);
        s_data.write(0x28);
        m_data.write(4);
        s_data.write(2);
        m_data.write(1);
        s_data.write(1);
        m_data.write(0xff);
        s_data.write(0xff);
    }
}
