//! Bringing the device to a known state: global reset, interrupts masked, the MAC address,
//! the link, the multicast table (8254x SDM section 14.3, "General Configuration").
//!
//! Every wait is bounded by the caller's [`Clock`]; a device that never finishes its reset
//! or an EEPROM read costs an error, not a hang.

use super::E1000Error;
use super::regs::{RAH_AV, Regs, ctrl, eerd, reg};
use crate::hw::{Clock, Deadline, delay_us};

/// After setting CTRL.RST, wait this long before touching the device again (the manual asks
/// for at least 1 µs).
const RESET_SETTLE_US: u64 = 10;
/// How long CTRL.RST may take to clear.
pub(crate) const RESET_TIMEOUT_US: u64 = 100_000;
/// After the reset, the time the device takes to reload its settings (and RAL0/RAH0) from
/// the EEPROM.
const EEPROM_RELOAD_US: u64 = 5_000;
/// How long one EERD read may take.
pub(crate) const EEPROM_TIMEOUT_US: u64 = 10_000;

/// Resets the whole device and masks and clears its interrupts (dom0 polls).
///
/// # Errors
/// [`E1000Error::ResetTimeout`] if CTRL.RST is still set after [`RESET_TIMEOUT_US`] (a
/// device that is gone reads all ones, so it lands here too).
pub(crate) fn reset<R: Regs + ?Sized, K: Clock + ?Sized>(
    regs: &mut R,
    clock: &mut K,
) -> Result<(), E1000Error> {
    regs.write32(reg::IMC, u32::MAX);
    let value = regs.read32(reg::CTRL);
    regs.write32(reg::CTRL, value | ctrl::RST);
    delay_us(clock, RESET_SETTLE_US);
    let deadline = Deadline::after(clock, RESET_TIMEOUT_US);
    while regs.read32(reg::CTRL) & ctrl::RST != 0 {
        if deadline.expired(clock) {
            return Err(E1000Error::ResetTimeout);
        }
        core::hint::spin_loop();
    }
    delay_us(clock, EEPROM_RELOAD_US);
    // The reset unmasks nothing, but a previous owner may have left causes pending.
    regs.write32(reg::IMC, u32::MAX);
    let _ = regs.read32(reg::ICR);
    Ok(())
}

/// Whether `mac` can be a station's own address: not all zeros, and unicast (the I/G bit, bit
/// 0 of the first octet, clear; this also refuses all ones, what a missing EEPROM reads).
#[must_use]
pub(crate) fn valid_station_mac(mac: &[u8; 6]) -> bool {
    mac.iter().any(|&b| b != 0) && mac[0] & 1 == 0
}

/// The address in RAL0/RAH0 (low byte of RAL first), if RAH0's valid bit is set.
fn receive_address(ral: u32, rah: u32) -> Option<[u8; 6]> {
    if rah & RAH_AV == 0 {
        return None;
    }
    let [a, b, c, d] = ral.to_le_bytes();
    let [e, f, ..] = rah.to_le_bytes();
    Some([a, b, c, d, e, f])
}

/// Reads EEPROM word `word` through EERD.
///
/// # Errors
/// [`E1000Error::EepromTimeout`] if DONE, with the address asked for, does not show within
/// [`EEPROM_TIMEOUT_US`].
pub(crate) fn eeprom_word<R: Regs + ?Sized, K: Clock + ?Sized>(
    regs: &mut R,
    clock: &mut K,
    word: u8,
) -> Result<u16, E1000Error> {
    let addr = u32::from(word) << eerd::ADDR_SHIFT;
    regs.write32(reg::EERD, addr | eerd::START);
    let deadline = Deadline::after(clock, EEPROM_TIMEOUT_US);
    loop {
        let value = regs.read32(reg::EERD);
        // DONE for another word (a stale result) does not count.
        if value & eerd::DONE != 0 && value & (0xFF << eerd::ADDR_SHIFT) == addr {
            // A 32-bit value shifted right by 16 always fits.
            return Ok(u16::try_from(value >> eerd::DATA_SHIFT).unwrap_or(0));
        }
        if deadline.expired(clock) {
            return Err(E1000Error::EepromTimeout(word));
        }
        core::hint::spin_loop();
    }
}

/// The device's MAC address: RAL0/RAH0 when the device loaded a valid one there at reset,
/// else EEPROM words 0 to 2 (low byte first), which are then written to RAL0/RAH0 (Bochs
/// leaves RAL0/RAH0 zero after reset and offers the EEPROM through EERD only).
///
/// # Errors
/// [`E1000Error::EepromTimeout`] from the EEPROM; [`E1000Error::BadMac`] when neither place
/// holds a valid station address ([`valid_station_mac`]).
pub(crate) fn read_mac<R: Regs + ?Sized, K: Clock + ?Sized>(
    regs: &mut R,
    clock: &mut K,
) -> Result<[u8; 6], E1000Error> {
    let ral = regs.read32(reg::RAL0);
    let rah = regs.read32(reg::RAH0);
    if let Some(mac) = receive_address(ral, rah).filter(valid_station_mac) {
        return Ok(mac);
    }
    let mut mac = [0u8; 6];
    for (word, pair) in (0u8..).zip(mac.chunks_exact_mut(2)) {
        pair.copy_from_slice(&eeprom_word(regs, clock, word)?.to_le_bytes());
    }
    if !valid_station_mac(&mac) {
        return Err(E1000Error::BadMac(mac));
    }
    let [a, b, c, d, e, f] = mac;
    regs.write32(reg::RAL0, u32::from_le_bytes([a, b, c, d]));
    // Address select 00 (destination address), valid.
    regs.write32(reg::RAH0, u32::from_le_bytes([e, f, 0, 0]) | RAH_AV);
    Ok(mac)
}

/// Sets the link up with speed and duplex resolved by the PHY (SLU, ASDE), and clears what
/// would hold it down or change frames (link and PHY reset, inverted loss-of-signal, VLAN
/// mode); then clears the multicast table, whose contents are undefined after reset.
pub(crate) fn link_and_filters<R: Regs + ?Sized>(regs: &mut R) {
    let value = regs.read32(reg::CTRL);
    let clear = ctrl::LRST | ctrl::ILOS | ctrl::PHY_RST | ctrl::VME | ctrl::RST;
    regs.write32(reg::CTRL, (value & !clear) | ctrl::SLU | ctrl::ASDE);
    for i in 0..reg::MTA_DWORDS {
        regs.write32(reg::MTA + 4 * i, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn station_addresses() {
        assert!(valid_station_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(!valid_station_mac(&[0; 6]));
        assert!(!valid_station_mac(&[0xFF; 6]));
        assert!(!valid_station_mac(&[0x01, 0, 0x5E, 0, 0, 1]));
    }

    #[test]
    fn receive_address_byte_order_and_valid_bit() {
        assert_eq!(
            receive_address(0x1200_5452, 0x8000_5634),
            Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
        );
        assert_eq!(receive_address(0x1200_5452, 0x0000_5634), None);
    }
}
