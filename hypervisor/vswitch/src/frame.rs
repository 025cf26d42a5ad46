//! Ethernet frames as the switch reads and writes them: MAC addresses, the header parse (the
//! only place that reads a sender's bytes) and the egress copy that adds or strips the 802.1Q
//! tag.
//!
//! A frame here is the bytes a virtio-net device or dom0's NIC carries: destination, source,
//! EtherType (or the 802.1Q tag then the EtherType), payload; no preamble, no FCS.

use alloc::vec::Vec;
use core::fmt;

use crate::port::PortId;
use crate::vlan::VlanId;

/// Length of an untagged Ethernet header: destination, source, EtherType.
pub const ETH_HEADER_LEN: usize = 14;
/// Length of an 802.1Q tag: TPID and TCI.
pub const VLAN_TAG_LEN: usize = 4;
/// The 802.1Q tag protocol identifier (IEEE 802.1Q §9.5, the C-VLAN tag).
pub const TPID_8021Q: u16 = 0x8100;
/// The 802.1ad service tag's TPID (the outer tag of stacked "QinQ" tags).
pub const TPID_8021AD: u16 = 0x88a8;
/// The TCI's VLAN id bits (the low 12); the top 4 are the priority (PCP) and DEI.
const TCI_VID_MASK: u16 = 0x0fff;

/// Offset of the EtherType (or TPID) field.
const TYPE_OFFSET: usize = 12;

/// A 48-bit MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// A group address (multicast or broadcast): the I/G bit, bit 0 of the first octet.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The broadcast address.
    pub fn is_broadcast(self) -> bool {
        self == MacAddr::BROADCAST
    }

    /// All zeros: no station has it.
    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }

    /// An address a single station may send from: neither a group address nor all zeros.
    pub fn is_station(self) -> bool {
        !self.is_multicast() && !self.is_zero()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the switch takes from a frame's header. Only lengths have been checked: every value
/// is the sender's allegation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub dst: MacAddr,
    pub src: MacAddr,
    /// The 802.1Q TCI, if the frame is tagged (TPID 0x8100 at offset 12).
    pub tci: Option<u16>,
    /// A second VLAN tag follows the first, or the frame's first tag is an 802.1ad service
    /// tag: stacked tags, with which a sender could reach another VLAN beyond the next switch.
    pub stacked: bool,
}

/// Why a frame's bytes cannot be an Ethernet frame here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// Shorter than an untagged header (14 bytes).
    TooShort,
    /// The TPID says tagged but the tag or the EtherType after it is cut off (under 18 bytes).
    TruncatedTag,
    /// Longer than the switch's largest frame (plus 4 bytes when tagged).
    TooLong,
}

/// Reads the header of `frame`, whose untagged form may be at most `max_untagged` bytes.
pub(crate) fn parse(frame: &[u8], max_untagged: usize) -> Result<Header, Malformed> {
    let Some(head) = frame.first_chunk::<ETH_HEADER_LEN>() else {
        return Err(Malformed::TooShort);
    };
    let tagged = u16::from_be_bytes([head[TYPE_OFFSET], head[TYPE_OFFSET + 1]]) == TPID_8021Q;
    let first = u16::from_be_bytes([head[TYPE_OFFSET], head[TYPE_OFFSET + 1]]);
    let (tci, stacked) = if tagged {
        let Some(tag) = frame.get(ETH_HEADER_LEN..ETH_HEADER_LEN + VLAN_TAG_LEN) else {
            return Err(Malformed::TruncatedTag);
        };
        let inner = u16::from_be_bytes([tag[2], tag[3]]);
        (
            Some(u16::from_be_bytes([tag[0], tag[1]])),
            matches!(inner, TPID_8021Q | TPID_8021AD),
        )
    } else {
        (None, first == TPID_8021AD)
    };
    let max = if tagged {
        max_untagged.saturating_add(VLAN_TAG_LEN)
    } else {
        max_untagged
    };
    if frame.len() > max {
        return Err(Malformed::TooLong);
    }
    let mut dst = [0; 6];
    let mut src = [0; 6];
    dst.copy_from_slice(&head[0..6]);
    src.copy_from_slice(&head[6..12]);
    Ok(Header {
        dst: MacAddr(dst),
        src: MacAddr(src),
        tci,
        stacked,
    })
}

/// The VLAN id bits of a TCI (0: a priority tag, 4095: reserved).
pub(crate) fn tci_vid(tci: u16) -> u16 {
    tci & TCI_VID_MASK
}

/// The priority and DEI bits of a TCI, in place (the top 4 bits).
pub(crate) fn tci_priority(tci: u16) -> u16 {
    tci & !TCI_VID_MASK
}

/// The copy of `frame` (as parsed, `tagged_in` if it carried a tag) that leaves through a
/// port: untagged when `out_tci` is `None`, else with an 802.1Q tag carrying `out_tci`.
/// The header has been parsed, so `frame` holds the fields this slices.
pub(crate) fn egress_copy(frame: &[u8], tagged_in: bool, out_tci: Option<u16>) -> Vec<u8> {
    let rest = if tagged_in {
        TYPE_OFFSET + VLAN_TAG_LEN
    } else {
        TYPE_OFFSET
    };
    let (addrs, body) = (&frame[..TYPE_OFFSET], &frame[rest..]);
    let tag_len = if out_tci.is_some() { VLAN_TAG_LEN } else { 0 };
    let mut out = Vec::with_capacity(addrs.len() + tag_len + body.len());
    out.extend_from_slice(addrs);
    if let Some(tci) = out_tci {
        out.extend_from_slice(&TPID_8021Q.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
    }
    out.extend_from_slice(body);
    out
}

/// A frame queued for, or delivered to, one port: its bytes already in the form that port
/// takes (tagged or not), the VLAN it travelled on and the port it came from.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub(crate) bytes: Vec<u8>,
    pub(crate) vlan: VlanId,
    pub(crate) source: PortId,
}

impl Frame {
    /// The frame's bytes, as the receiving port is to see them.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The frame's bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The VLAN the frame travelled on.
    pub fn vlan(&self) -> VlanId {
        self.vlan
    }

    /// The port the frame entered the switch through.
    pub fn source(&self) -> PortId {
        self.source
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("len", &self.bytes.len())
            .field("vlan", &self.vlan)
            .field("source", &self.source)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        let mut f = alloc::vec![0u8; 14];
        assert_eq!(parse(&f[..13], 1514), Err(Malformed::TooShort));
        assert_eq!(parse(&[], 1514), Err(Malformed::TooShort));
        assert!(parse(&f, 1514).is_ok());
        f[12] = 0x81;
        f[13] = 0x00;
        assert_eq!(parse(&f, 1514), Err(Malformed::TruncatedTag));
        f.extend_from_slice(&[0x20, 0x0a, 0x08]);
        assert_eq!(parse(&f, 1514), Err(Malformed::TruncatedTag));
        f.push(0x00);
        assert_eq!(parse(&f, 1514).unwrap().tci, Some(0x200a));
        f.resize(1518, 0);
        assert!(parse(&f, 1514).is_ok());
        f.push(0);
        assert_eq!(parse(&f, 1514), Err(Malformed::TooLong));
        let g = alloc::vec![0u8; 1515];
        assert_eq!(parse(&g, 1514), Err(Malformed::TooLong));
    }

    #[test]
    fn tag_insert_and_strip() {
        let untagged = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x08, 0x00, 0xaa, 0xbb];
        let tagged = egress_copy(&untagged, false, Some(0xa00c));
        assert_eq!(
            tagged,
            [
                1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x81, 0x00, 0xa0, 0x0c, 0x08, 0x00, 0xaa, 0xbb
            ]
        );
        assert_eq!(egress_copy(&tagged, true, None), untagged);
        assert_eq!(
            egress_copy(&tagged, true, Some(0x0014))[14..16],
            [0x00, 0x14]
        );
        assert_eq!((tci_vid(0xa00c), tci_priority(0xa00c)), (12, 0xa000));
    }

    #[test]
    fn addresses() {
        assert!(MacAddr::BROADCAST.is_multicast() && MacAddr::BROADCAST.is_broadcast());
        assert!(MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(!MacAddr([0; 6]).is_station());
        assert!(MacAddr([0x02, 0, 0, 0, 0, 1]).is_station());
        assert_eq!(
            alloc::format!("{}", MacAddr([0x02, 0xab, 0, 0, 0, 1])),
            "02:ab:00:00:00:01"
        );
    }
}
