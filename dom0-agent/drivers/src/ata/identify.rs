//! IDENTIFY DEVICE data: what a drive says about itself, checked before use.
//!
//! Word numbers follow ATA/ATAPI-7 volume 1, IDENTIFY DEVICE. The data comes from the
//! device, so each value this driver relies on is bounded: the capacity by the addressing
//! mode (at most 2^28 - 1 sectors for LBA28, 2^48 for LBA48, and not 0), the validity bits of
//! word 83 before its feature bits, and the integrity word 255 when the device provides it.

use alloc::string::String;

use super::{AtaError, Drive};

/// Largest sector count LBA28 can address (words 60-61 hold at most this).
pub const LBA28_MAX_SECTORS: u64 = 0x0FFF_FFFF;
/// Largest sector count LBA48 can address.
pub const LBA48_MAX_SECTORS: u64 = 1 << 48;

/// An ATA disk as IDENTIFY DEVICE describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveInfo {
    /// Its position on the channel.
    pub drive: Drive,
    /// Addressable sectors of 512 bytes.
    pub sectors: u64,
    /// Whether the 48-bit commands are supported (word 83 bit 10).
    pub lba48: bool,
    /// Whether the drive does DMA (word 49 bit 8).
    pub dma: bool,
    /// Model number (words 27-46), trailing spaces removed.
    pub model: String,
    /// Serial number (words 10-19), surrounding spaces removed.
    pub serial: String,
    /// Firmware revision (words 23-26), surrounding spaces removed.
    pub firmware: String,
}

/// Parses the 256 words of IDENTIFY DEVICE data of the drive at `drive`.
///
/// # Errors
/// [`AtaError::NotAta`] when word 0 says the device is not an ATA device;
/// [`AtaError::BadIdentify`] when the integrity checksum fails, LBA is not supported, or the
/// capacity is 0 or beyond what the addressing mode reaches.
pub fn identify(words: &[u16; 256], drive: Drive) -> Result<DriveInfo, AtaError> {
    if words[0] & 0x8000 != 0 {
        return Err(AtaError::NotAta);
    }
    // Word 255: signature 0xA5 in the low byte, then the two's complement of the sum of the
    // other 511 bytes, so that all 512 sum to 0 (word 255, integrity word).
    if words[255] & 0xFF == 0xA5 {
        let sum = words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .fold(0u8, u8::wrapping_add);
        if sum != 0 {
            return Err(AtaError::BadIdentify("integrity checksum"));
        }
    }
    if words[49] & (1 << 9) == 0 {
        return Err(AtaError::BadIdentify("no LBA support"));
    }
    let sectors28 = u64::from(words[60]) | u64::from(words[61]) << 16;
    if sectors28 > LBA28_MAX_SECTORS {
        return Err(AtaError::BadIdentify("LBA28 capacity too large"));
    }
    // Word 83 is valid only with bit 14 set and bit 15 clear.
    let w83_valid = words[83] & 0xC000 == 0x4000;
    let lba48 = w83_valid && words[83] & (1 << 10) != 0;
    let sectors = if lba48 {
        let s48 = (100..104)
            .rev()
            .fold(0u64, |acc, i| acc << 16 | u64::from(words[i]));
        if s48 > LBA48_MAX_SECTORS {
            return Err(AtaError::BadIdentify("LBA48 capacity too large"));
        }
        if s48 == 0 { sectors28 } else { s48 }
    } else {
        sectors28
    };
    if sectors == 0 {
        return Err(AtaError::BadIdentify("zero capacity"));
    }
    Ok(DriveInfo {
        drive,
        sectors,
        lba48,
        dma: words[49] & (1 << 8) != 0,
        model: ata_string(&words[27..47]),
        serial: ata_string(&words[10..20]),
        firmware: ata_string(&words[23..27]),
    })
}

/// An ATA string: two characters per word, the first in the high byte; spaces (and NUL
/// padding) around it removed, anything else but printable ASCII shown as `?`.
fn ata_string(words: &[u16]) -> String {
    let s: String = words
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .map(|b| match b {
            0 => ' ',
            b if b.is_ascii_graphic() || b == b' ' => char::from(b),
            _ => '?',
        })
        .collect();
    String::from(s.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_string(words: &mut [u16], s: &str) {
        let mut bytes = s.as_bytes().to_vec();
        bytes.resize(words.len() * 2, b' ');
        for (w, pair) in words.iter_mut().zip(bytes.chunks(2)) {
            *w = u16::from_be_bytes([pair[0], pair[1]]);
        }
    }

    fn base() -> [u16; 256] {
        let mut w = [0u16; 256];
        w[49] = (1 << 9) | (1 << 8);
        w[60] = 0x5678;
        w[61] = 0x0034;
        put_string(&mut w[27..47], "BXHD00011");
        put_string(&mut w[10..20], "  SN123");
        put_string(&mut w[23..27], "1.0");
        w
    }

    fn seal(w: &mut [u16; 256]) {
        w[255] = 0xA5;
        let sum = w
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .fold(0u8, u8::wrapping_add);
        w[255] |= u16::from(0u8.wrapping_sub(sum)) << 8;
    }

    #[test]
    fn lba28_drive() {
        let info = identify(&base(), Drive::Master).unwrap();
        assert_eq!(info.sectors, 0x34_5678);
        assert!(!info.lba48);
        assert!(info.dma);
        assert_eq!(info.model, "BXHD00011");
        assert_eq!(info.serial, "SN123");
        assert_eq!(info.firmware, "1.0");
    }

    #[test]
    fn lba48_drive_with_checksum() {
        let mut w = base();
        w[83] = (1 << 14) | (1 << 10);
        w[100] = 0x0000;
        w[101] = 0x0000;
        w[102] = 0x0002; // 2^33 sectors: 4 TiB
        seal(&mut w);
        let info = identify(&w, Drive::Slave).unwrap();
        assert!(info.lba48);
        assert_eq!(info.sectors, 1 << 33);
        assert_eq!(info.drive, Drive::Slave);
        w[200] ^= 1;
        assert_eq!(
            identify(&w, Drive::Slave),
            Err(AtaError::BadIdentify("integrity checksum"))
        );
    }

    #[test]
    fn word_83_without_its_validity_bits_is_ignored() {
        let mut w = base();
        w[83] = 0xFFFF;
        w[100] = 0xFFFF;
        let info = identify(&w, Drive::Master).unwrap();
        assert!(!info.lba48);
        assert_eq!(info.sectors, 0x34_5678);
    }

    #[test]
    fn implausible_data_is_refused() {
        let mut w = base();
        w[0] = 0x8580; // ATAPI
        assert_eq!(identify(&w, Drive::Master), Err(AtaError::NotAta));
        let mut w = base();
        w[49] = 0;
        assert!(matches!(
            identify(&w, Drive::Master),
            Err(AtaError::BadIdentify(_))
        ));
        let mut w = base();
        w[60] = 0;
        w[61] = 0;
        assert!(matches!(
            identify(&w, Drive::Master),
            Err(AtaError::BadIdentify(_))
        ));
        let mut w = base();
        w[61] = 0x1000;
        assert!(matches!(
            identify(&w, Drive::Master),
            Err(AtaError::BadIdentify(_))
        ));
        let mut w = base();
        w[83] = (1 << 14) | (1 << 10);
        w[103] = 0x0002;
        assert!(matches!(
            identify(&w, Drive::Master),
            Err(AtaError::BadIdentify(_))
        ));
    }

    #[test]
    fn strings_are_printable() {
        let mut w = [0u16; 4];
        w[0] = u16::from_be_bytes([b'A', 0x07]);
        w[1] = u16::from_be_bytes([b'B', b' ']);
        w[2] = u16::from_be_bytes([b' ', b' ']);
        assert_eq!(ata_string(&w), "A?B");
    }
}
