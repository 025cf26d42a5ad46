//! What dom0 needs of a network card, whatever its model: the [`Nic`] trait.
//!
//! dom0 bridges Ethernet frames between the wire and its guests, so a card is four things: its
//! MAC address, whether the link is up, "put this frame on the wire" and "give me the next
//! frame from the wire". Frames are whole Ethernet frames from the destination address to the
//! end of the payload, without the frame check sequence (the card appends it on transmit and
//! strips it on receive). Both directions poll: [`Nic::send`] never waits for room and
//! [`Nic::recv`] never waits for a frame, so one dom0 loop can serve every card and ring.
//!
//! Drivers: [`crate::e1000`] (Intel 8254x). Others (virtio-net, ...) implement the same trait.

/// The shortest frame a driver accepts: the 14-byte Ethernet header (destination, source,
/// type). The card pads shorter frames to the 60-byte minimum on the wire.
pub const MIN_FRAME: usize = 14;

/// The longest frame a driver sends or hands back: 1500 bytes of payload, the 14-byte header
/// and one 802.1Q tag (4 bytes), as guests on trunk ports send them; the frame check sequence
/// is not counted. A buffer of this size holds any frame [`Nic::recv`] returns.
pub const MAX_FRAME: usize = 1518;

/// Why a frame was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NicError {
    /// The frame is shorter than [`MIN_FRAME`] or longer than [`MAX_FRAME`] (its length).
    #[error("frame of {0} bytes is not between 14 and 1518 bytes")]
    BadLength(usize),
    /// The transmit ring has no free slot; try again once the card has sent some.
    #[error("transmit ring full")]
    Full,
}

/// A network card as dom0 drives it.
pub trait Nic {
    /// The card's own MAC address.
    fn mac(&self) -> [u8; 6];

    /// Whether the card reports a link (reads the card; no waiting).
    fn link_up(&mut self) -> bool;

    /// Queues `frame` (see the module docs for what a frame is) for transmission.
    ///
    /// # Errors
    /// [`NicError::BadLength`] for a frame outside `MIN_FRAME..=MAX_FRAME`;
    /// [`NicError::Full`] when the transmit ring is full (nothing is queued; no waiting).
    fn send(&mut self, frame: &[u8]) -> Result<(), NicError>;

    /// Copies the next received frame into `out` and returns its length, or `None` when no
    /// frame is waiting. Frames the card marks as bad, and frames longer than `out`, are
    /// dropped (and counted by the driver); `out` of [`MAX_FRAME`] bytes loses none.
    fn recv(&mut self, out: &mut [u8]) -> Option<usize>;
}

impl<T: Nic + ?Sized> Nic for &mut T {
    fn mac(&self) -> [u8; 6] {
        (**self).mac()
    }
    fn link_up(&mut self) -> bool {
        (**self).link_up()
    }
    fn send(&mut self, frame: &[u8]) -> Result<(), NicError> {
        (**self).send(frame)
    }
    fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        (**self).recv(out)
    }
}

/// Whether `len` is a frame length drivers accept ([`MIN_FRAME`]`..=`[`MAX_FRAME`]).
#[must_use]
pub const fn frame_len_ok(len: usize) -> bool {
    len >= MIN_FRAME && len <= MAX_FRAME
}
