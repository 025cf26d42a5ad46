//! The legacy receive and transmit descriptors, as bytes in DMA memory.
//!
//! Both are 16 bytes, little-endian (8254x SDM section 3.2.3, "Receive Descriptor Format", and
//! section 3.3.3, "Legacy Transmit Descriptor Format"). The driver never forms a reference
//! into a ring: it copies a descriptor out with [`crate::dma::DmaBuf::read`] and decodes the
//! copy, or encodes one and copies it in, so a device that rewrites a descriptor meanwhile
//! changes nothing the driver relies on.

/// Bytes of one descriptor, of either kind.
pub(crate) const DESC_BYTES: usize = 16;

/// Offset of the status byte in both kinds of descriptor.
pub(crate) const STATUS_OFFSET: usize = 12;

/// Receive descriptor status bits (8254x SDM section 3.2.3.1).
pub(crate) mod rx_status {
    /// Descriptor done: the device has written it back.
    pub const DD: u8 = 1 << 0;
    /// End of packet: the last descriptor of a frame.
    pub const EOP: u8 = 1 << 1;
}

/// Receive descriptor error bits that mean the frame itself is bad (8254x SDM table 3-3):
/// CRC or alignment (CE), symbol (SE), sequence (SEQ), carrier extension (CXE) and data (RXE)
/// errors. The checksum-offload results (IPE, TCPE) are not among them: they say nothing of
/// the Ethernet frame, which dom0 forwards unchanged for the guest's stack to judge.
pub(crate) const RX_FRAME_ERRORS: u8 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 4) | (1 << 7);

/// Transmit descriptor command bits (8254x SDM section 3.3.3.1).
pub(crate) mod tx_cmd {
    /// End of packet.
    pub const EOP: u8 = 1 << 0;
    /// Insert the frame check sequence.
    pub const IFCS: u8 = 1 << 1;
    /// Report status: write DD back when done.
    pub const RS: u8 = 1 << 3;
}

/// Transmit descriptor status bits (8254x SDM section 3.3.3.2).
pub(crate) mod tx_status {
    /// Descriptor done.
    pub const DD: u8 = 1 << 0;
}

/// A receive descriptor: written by the driver with only `addr`, written back by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RxDesc {
    pub addr: u64,
    pub length: u16,
    pub checksum: u16,
    pub status: u8,
    pub errors: u8,
    pub special: u16,
}

impl RxDesc {
    /// A descriptor handed to the device: the buffer at `addr`, everything else zero (the
    /// device ORs status bits in on some implementations, so status must start clear).
    pub fn posted(addr: u64) -> Self {
        Self {
            addr,
            ..Self::default()
        }
    }

    pub fn encode(&self) -> [u8; DESC_BYTES] {
        let mut b = [0u8; DESC_BYTES];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..10].copy_from_slice(&self.length.to_le_bytes());
        b[10..12].copy_from_slice(&self.checksum.to_le_bytes());
        b[12] = self.status;
        b[13] = self.errors;
        b[14..16].copy_from_slice(&self.special.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; DESC_BYTES]) -> Self {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            l0,
            l1,
            c0,
            c1,
            status,
            errors,
            s0,
            s1,
        ] = *b;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            length: u16::from_le_bytes([l0, l1]),
            checksum: u16::from_le_bytes([c0, c1]),
            status,
            errors,
            special: u16::from_le_bytes([s0, s1]),
        }
    }
}

/// A legacy transmit descriptor (DEXT clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct TxDesc {
    pub addr: u64,
    pub length: u16,
    pub cso: u8,
    pub cmd: u8,
    pub status: u8,
    pub css: u8,
    pub special: u16,
}

impl TxDesc {
    /// One whole frame of `length` bytes at `addr`: end of packet, insert the FCS, report
    /// status; no checksum offload, no VLAN insertion.
    pub fn frame(addr: u64, length: u16) -> Self {
        Self {
            addr,
            length,
            cmd: tx_cmd::EOP | tx_cmd::IFCS | tx_cmd::RS,
            ..Self::default()
        }
    }

    pub fn encode(&self) -> [u8; DESC_BYTES] {
        let mut b = [0u8; DESC_BYTES];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..10].copy_from_slice(&self.length.to_le_bytes());
        b[10] = self.cso;
        b[11] = self.cmd;
        b[12] = self.status;
        b[13] = self.css;
        b[14..16].copy_from_slice(&self.special.to_le_bytes());
        b
    }

    #[cfg(test)]
    pub fn decode(b: &[u8; DESC_BYTES]) -> Self {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            l0,
            l1,
            cso,
            cmd,
            status,
            css,
            s0,
            s1,
        ] = *b;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            length: u16::from_le_bytes([l0, l1]),
            cso,
            cmd,
            status,
            css,
            special: u16::from_le_bytes([s0, s1]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_layout_matches_the_manual() {
        let d = RxDesc {
            addr: 0x1122_3344_5566_7788,
            length: 0x05EA,
            checksum: 0xBEEF,
            status: rx_status::DD | rx_status::EOP,
            errors: 0x80,
            special: 0x0123,
        };
        let b = d.encode();
        assert_eq!(
            b,
            [
                0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xEA, 0x05, 0xEF, 0xBE, 0x03, 0x80,
                0x23, 0x01
            ]
        );
        assert_eq!(RxDesc::decode(&b), d);
        assert_eq!(b[STATUS_OFFSET], 0x03);
        assert_eq!(RxDesc::posted(0x1000).encode()[8..], [0; 8]);
    }

    #[test]
    fn tx_frame_descriptor_is_legacy_eop_ifcs_rs() {
        let d = TxDesc::frame(0xFFFF_F800, 60);
        let b = d.encode();
        assert_eq!(
            b,
            [
                0x00, 0xF8, 0xFF, 0xFF, 0, 0, 0, 0, 60, 0, 0, 0x0B, 0, 0, 0, 0
            ]
        );
        // DEXT (bit 5 of CMD) is clear: a legacy descriptor.
        assert_eq!(b[11] & 0x20, 0);
        assert_eq!(TxDesc::decode(&b), d);
    }

    #[test]
    fn frame_errors_leave_out_checksum_results() {
        assert_eq!(RX_FRAME_ERRORS, 0x97);
        assert_eq!(
            RX_FRAME_ERRORS & 0x60,
            0,
            "IPE and TCPE do not drop a frame"
        );
    }
}
