//! The hardware seams every driver here reaches the machine through: port I/O and time.
//!
//! dom0 implements [`PortIo`] with `in`/`out` instructions (the hypervisor forwards the ports
//! of the devices dom0 owns) and [`Clock`] with its timer; host tests implement them with a
//! software model of the device and a [`PollClock`].

/// Port-mapped I/O, as dom0 reaches its devices' ports.
///
/// Every access may have side effects on the device (reading a status register clears an
/// interrupt, reading a data port advances a transfer), so all methods take `&mut self`.
pub trait PortIo {
    /// Reads one byte from `port`.
    fn inb(&mut self, port: u16) -> u8;
    /// Writes one byte to `port`.
    fn outb(&mut self, port: u16, value: u8);
    /// Reads 16 bits from `port`.
    fn inw(&mut self, port: u16) -> u16;
    /// Writes 16 bits to `port`.
    fn outw(&mut self, port: u16, value: u16);
    /// Reads 32 bits from `port`.
    fn inl(&mut self, port: u16) -> u32;
    /// Writes 32 bits to `port`.
    fn outl(&mut self, port: u16, value: u32);
}

impl<T: PortIo + ?Sized> PortIo for &mut T {
    fn inb(&mut self, port: u16) -> u8 {
        (**self).inb(port)
    }
    fn outb(&mut self, port: u16, value: u8) {
        (**self).outb(port, value);
    }
    fn inw(&mut self, port: u16) -> u16 {
        (**self).inw(port)
    }
    fn outw(&mut self, port: u16, value: u16) {
        (**self).outw(port, value);
    }
    fn inl(&mut self, port: u16) -> u32 {
        (**self).inl(port)
    }
    fn outl(&mut self, port: u16, value: u32) {
        (**self).outl(port, value);
    }
}

/// A monotonic time source in microseconds; every wait on a device is bounded by it.
///
/// It must advance while a driver polls (a clock that stands still turns a dead device into
/// a hang). [`PollClock`] is a clock that advances with each reading, for a dom0 without a
/// calibrated timer and for tests: its timeouts are poll counts.
pub trait Clock {
    /// Microseconds since an arbitrary origin; never decreases.
    fn now_us(&mut self) -> u64;
}

impl<T: Clock + ?Sized> Clock for &mut T {
    fn now_us(&mut self) -> u64 {
        (**self).now_us()
    }
}

/// A clock that advances by a fixed step at each reading: each poll of a device counts as
/// `step_us` microseconds, so a timeout of `t` µs allows about `t / step_us` polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollClock {
    now: u64,
    step_us: u64,
}

impl PollClock {
    /// A clock at 0 that advances `step_us` (at least 1) per reading.
    #[must_use]
    pub const fn new(step_us: u64) -> Self {
        Self {
            now: 0,
            step_us: if step_us == 0 { 1 } else { step_us },
        }
    }

    /// How many readings have been taken (the polls spent so far).
    #[must_use]
    pub const fn readings(&self) -> u64 {
        self.now / self.step_us
    }
}

impl Clock for PollClock {
    fn now_us(&mut self) -> u64 {
        self.now = self.now.saturating_add(self.step_us);
        self.now
    }
}

/// A point in time after which a wait gives up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    end: u64,
}

impl Deadline {
    /// `timeout_us` from now on `clock`.
    pub(crate) fn after<K: Clock + ?Sized>(clock: &mut K, timeout_us: u64) -> Self {
        Self {
            end: clock.now_us().saturating_add(timeout_us),
        }
    }

    /// Whether the deadline has passed.
    pub(crate) fn expired<K: Clock + ?Sized>(&self, clock: &mut K) -> bool {
        clock.now_us() >= self.end
    }
}

/// Busy-waits at least `us` microseconds on `clock`.
pub(crate) fn delay_us<K: Clock + ?Sized>(clock: &mut K, us: u64) {
    let deadline = Deadline::after(clock, us);
    while !deadline.expired(clock) {
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_clock_counts_polls_and_bounds_waits() {
        let mut clock = PollClock::new(10);
        let deadline = Deadline::after(&mut clock, 100);
        let mut polls = 0;
        while !deadline.expired(&mut clock) {
            polls += 1;
        }
        assert_eq!(polls, 9);
        assert_eq!(clock.readings(), 11);
        assert_eq!(PollClock::new(0).now_us(), 1, "a zero step still advances");
    }

    #[test]
    fn delay_waits_at_least_the_time_asked() {
        let mut clock = PollClock::new(1);
        delay_us(&mut clock, 50);
        assert!(clock.readings() >= 50);
    }
}
