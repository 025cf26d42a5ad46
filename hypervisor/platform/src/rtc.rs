//! A CMOS real-time clock (MC146818) for a PC guest: the date and time the host gives it, read
//! through the index and data ports as on a PC, in BCD and 24-hour mode, never in an update
//! (UIP clear), so Linux reads its wall clock at once instead of polling a missing chip (Debian's
//! 6.1 kernel read port 0x71 ten thousand times and gave up, "Unable to read current time from
//! RTC", before this model). Writes to the clock and alarm registers are ignored: a guest cannot
//! set the host's clock. No alarm, periodic or update interrupts (Linux's `rtc_cmos` binds only
//! where the ACPI tables describe the device, and they do not).
//!
//! Also the calendar arithmetic both sides need: the hypervisor turns the host's own CMOS clock
//! into seconds since 1970 once at boot ([`unix_from_civil`]), and the model turns seconds back
//! into a date ([`civil_from_unix`]).

// Every narrowing cast below is of a value the calendar bounds (a day up to 31, a month up to
// 12, an hour under 24, BCD digits of a value under 100).
#![allow(clippy::cast_possible_truncation)]

/// The index port (bit 7 of a write is the NMI mask, which this model ignores).
pub const INDEX_PORT: u16 = 0x70;
/// The data port: the register the index selected.
pub const DATA_PORT: u16 = 0x71;

/// Register A: divider 32.768 kHz, rate 1024 Hz, no update in progress.
const REG_A: u8 = 0x26;
/// Register B: 24-hour, BCD, no interrupts, no daylight saving.
const REG_B: u8 = 0x02;
/// Register D: the battery is good (valid RAM and time).
const REG_D: u8 = 0x80;

/// A date and time of day (proleptic Gregorian calendar, UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: u32,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 0 = Sunday .. 6 = Saturday.
    pub weekday: u8,
}

/// Seconds since 1970-01-01 00:00:00 UTC as a date (years up to 584 billion; no leap seconds).
pub fn civil_from_unix(secs: u64) -> Civil {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Days since 0000-03-01 in 400-year eras of 146,097 days (March-based years put the leap
    // day last).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + u64::from(month <= 2);
    Civil {
        year: u32::try_from(year).unwrap_or(u32::MAX),
        month,
        day,
        hour: (rest / 3_600) as u8,
        minute: (rest / 60 % 60) as u8,
        second: (rest % 60) as u8,
        // 1970-01-01 was a Thursday.
        weekday: ((days + 4) % 7) as u8,
    }
}

/// A date and time as seconds since 1970 (the inverse of [`civil_from_unix`]); `None` before
/// 1970 or for a field out of range.
pub fn unix_from_civil(c: &Civil) -> Option<u64> {
    if !(1..=12).contains(&c.month) || !(1..=31).contains(&c.day) {
        return None;
    }
    if c.hour > 23 || c.minute > 59 || c.second > 59 || c.year < 1970 {
        return None;
    }
    let (m, d) = (u64::from(c.month), u64::from(c.day));
    let y = u64::from(c.year) - u64::from(m <= 2);
    let era = y / 400;
    let yoe = y % 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + u64::from(c.hour) * 3_600 + u64::from(c.minute) * 60 + u64::from(c.second))
}

fn bcd(v: u32) -> u8 {
    let v = v % 100;
    ((v / 10) << 4 | (v % 10)) as u8
}

/// The clock of one domain: which register the guest selected.
#[derive(Clone, Debug, Default)]
pub struct Rtc {
    index: u8,
}

impl Rtc {
    /// A write to [`INDEX_PORT`] selects a register.
    pub fn select(&mut self, value: u8) {
        self.index = value & 0x7f;
    }

    /// A read of [`DATA_PORT`] at `now` (seconds since 1970): the selected register.
    pub fn read(&self, now: u64) -> u8 {
        let c = civil_from_unix(now);
        match self.index {
            0x00 => bcd(c.second.into()),
            0x02 => bcd(c.minute.into()),
            0x04 => bcd(c.hour.into()),
            0x06 => c.weekday + 1,
            0x07 => bcd(c.day.into()),
            0x08 => bcd(c.month.into()),
            0x09 => bcd(c.year),
            0x32 => bcd(c.year / 100),
            0x0a => REG_A,
            0x0b => REG_B,
            0x0d => REG_D,
            // Alarms, register C (no interrupt flags) and the CMOS RAM: zero.
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_seconds_convert_both_ways() {
        let epoch = civil_from_unix(0);
        assert_eq!(
            (epoch.year, epoch.month, epoch.day, epoch.weekday),
            (1970, 1, 1, 4)
        );
        // 2026-12-03 13:20:02 UTC, a Thursday.
        let t = 1_796_304_002;
        let c = civil_from_unix(t);
        assert_eq!((c.year, c.month, c.day), (2026, 12, 3));
        assert_eq!((c.hour, c.minute, c.second, c.weekday), (13, 20, 2, 4));
        assert_eq!(unix_from_civil(&c), Some(t));
        // Leap days, century rules.
        for (y, m, d) in [(2000, 2, 29), (2024, 2, 29), (2100, 3, 1), (1999, 12, 31)] {
            let c = Civil {
                year: y,
                month: m,
                day: d,
                hour: 23,
                minute: 59,
                second: 59,
                weekday: 0,
            };
            let back = civil_from_unix(unix_from_civil(&c).unwrap());
            assert_eq!((back.year, back.month, back.day), (y, m, d));
        }
        let next = civil_from_unix(
            unix_from_civil(&Civil {
                year: 2023,
                month: 2,
                day: 28,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 0,
            })
            .unwrap()
                + 86_400,
        );
        assert_eq!((next.month, next.day), (3, 1));
        let bad = Civil {
            year: 1969,
            month: 12,
            day: 31,
            hour: 0,
            minute: 0,
            second: 0,
            weekday: 0,
        };
        assert_eq!(unix_from_civil(&bad), None);
        assert_eq!(unix_from_civil(&Civil { month: 13, ..c }), None);
    }

    #[test]
    fn registers_read_in_bcd_and_never_in_an_update() {
        let mut r = Rtc::default();
        let t = 1_796_304_002; // 2026-12-03 13:20:02, Thursday
        let read = |r: &mut Rtc, reg: u8| {
            r.select(reg | 0x80); // with the NMI mask bit, as Linux writes it
            r.read(t)
        };
        assert_eq!(read(&mut r, 0x0a) & 0x80, 0, "UIP clear");
        assert_eq!(read(&mut r, 0x0b), 0x02, "24-hour, BCD");
        assert_eq!(read(&mut r, 0x0d), 0x80, "valid time");
        let got: [u8; 8] =
            [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|i| read(&mut r, i));
        assert_eq!(got, [0x02, 0x20, 0x13, 5, 0x03, 0x12, 0x26, 0x20]);
        assert_eq!(read(&mut r, 0x0c), 0);
        assert_eq!(read(&mut r, 0x7f), 0);
    }
}
