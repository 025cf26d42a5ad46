//! The scheduling keys an operator writes, on a boot module's line (`weight=W cap=C reserve=R
//! pin=CPUS`) and in the console's `sched ID ...`: parsed into a [`Change`], one meaning for
//! both. Pure.

use super::policy::{MAX_CPUS, Params};

/// The keys this module knows.
pub const KEYS: [&str; 4] = ["weight", "cap", "reserve", "pin"];

/// What to change in a domain's scheduling; `None` fields stay as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub weight: Option<u32>,
    /// `Some(None)`: no cap (`cap=none`).
    pub cap: Option<Option<u32>>,
    pub reserve: Option<u32>,
    /// The CPUs every vCPU of the domain may run on.
    pub pin: Option<u64>,
}

/// Why a value was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyError(pub &'static str);

impl core::fmt::Display for KeyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.0)
    }
}

impl Change {
    pub fn is_empty(&self) -> bool {
        *self == Change::default()
    }

    /// Takes one `key=value`; `Ok(false)` when the key is not a scheduling key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, KeyError> {
        match key {
            "weight" => {
                let w = number(value).ok_or(KeyError("weight: not a number (1..65535)"))?;
                if !(1..=65535).contains(&w) {
                    return Err(KeyError("weight: must be 1..65535"));
                }
                self.weight = Some(w);
            }
            "cap" => {
                self.cap = Some(if value == "none" {
                    None
                } else {
                    let c = number(value)
                        .ok_or(KeyError("cap: not a percentage of one CPU, or 'none'"))?;
                    if c == 0 || c > 100 * MAX_CPUS as u32 {
                        return Err(KeyError(
                            "cap: must be 1..6400 (% of one CPU), or 'none' for no cap",
                        ));
                    }
                    Some(c)
                });
            }
            "reserve" => {
                let r = number(value).ok_or(KeyError("reserve: not a percentage of one CPU"))?;
                if r > 100 * MAX_CPUS as u32 {
                    return Err(KeyError("reserve: must be 0..6400 (% of one CPU)"));
                }
                self.reserve = Some(r);
            }
            "pin" => self.pin = Some(cpus(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `p` with this change applied.
    pub fn apply(&self, p: Params) -> Params {
        Params {
            weight: self.weight.unwrap_or(p.weight),
            cap_pct: self.cap.unwrap_or(p.cap_pct),
            reserve_pct: self.reserve.unwrap_or(p.reserve_pct),
        }
    }
}

fn number(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A CPU list: `all`, or numbers and ranges joined by commas (`1`, `0-3`, `0,2,4-5`).
pub fn cpus(text: &str) -> Result<u64, KeyError> {
    if text == "all" {
        return Ok(u64::MAX);
    }
    const BAD: KeyError = KeyError("pin: not a CPU list (e.g. 1, 0-3, 0,2 or all)");
    const RANGE: KeyError = KeyError("pin: CPU numbers are 0..63");
    let mut mask = 0u64;
    for part in text.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (number(a).ok_or(BAD)?, number(b).ok_or(BAD)?),
            None => {
                let n = number(part).ok_or(BAD)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(BAD);
        }
        if hi as usize >= MAX_CPUS {
            return Err(RANGE);
        }
        for c in lo..=hi {
            mask |= 1 << c;
        }
    }
    Ok(mask)
}

/// The CPUs in `mask`, as [`cpus`] reads them (ranges where they run on).
pub fn cpu_list(mask: u64, out: &mut impl core::fmt::Write) -> core::fmt::Result {
    let mut first = true;
    let mut c = 0;
    while c < MAX_CPUS {
        if mask & (1 << c) == 0 {
            c += 1;
            continue;
        }
        let start = c;
        while c + 1 < MAX_CPUS && mask & (1 << (c + 1)) != 0 {
            c += 1;
        }
        if !first {
            out.write_char(',')?;
        }
        first = false;
        if start == c {
            write!(out, "{start}")?;
        } else {
            write!(out, "{start}-{c}")?;
        }
        c += 1;
    }
    if first {
        out.write_char('-')?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn keys_parse_and_apply() {
        let mut c = Change::default();
        assert!(c.is_empty());
        assert_eq!(c.set("weight", "512"), Ok(true));
        assert_eq!(c.set("cap", "25"), Ok(true));
        assert_eq!(c.set("pin", "1"), Ok(true));
        assert_eq!(
            c.set("mem", "16"),
            Ok(false),
            "not ours: left to the caller"
        );
        let p = c.apply(Params::default());
        assert_eq!((p.weight, p.cap_pct, p.reserve_pct), (512, Some(25), 0));
        assert_eq!(c.pin, Some(0b10));
        c.set("cap", "none").unwrap();
        assert_eq!(c.apply(p).cap_pct, None);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let mut c = Change::default();
        for (k, v, why) in [
            ("weight", "0", "1..65535"),
            ("weight", "-3", "not a number"),
            ("weight", "99999999999", "not a number"),
            ("cap", "0", "'none' for no cap"),
            ("cap", "6401", "1..6400"),
            ("cap", "half", "not a percentage"),
            ("reserve", "7000", "0..6400"),
            ("pin", "", "not a CPU list"),
            ("pin", "3-1", "not a CPU list"),
            ("pin", "64", "0..63"),
            ("pin", "1,,2", "not a CPU list"),
        ] {
            let e = c.set(k, v).unwrap_err();
            assert!(e.0.contains(why), "{k}={v}: {e}");
        }
        assert!(c.is_empty(), "refused values change nothing");
    }

    #[test]
    fn cpu_lists_round_trip() {
        for (text, mask) in [
            ("0", 1u64),
            ("0-3", 0b1111),
            ("0,2,4-5", 0b110101),
            ("63", 1 << 63),
        ] {
            assert_eq!(cpus(text), Ok(mask));
            let mut s = String::new();
            cpu_list(mask, &mut s).unwrap();
            assert_eq!(s, text);
        }
        assert_eq!(cpus("all"), Ok(u64::MAX));
        let mut s = String::new();
        cpu_list(0, &mut s).unwrap();
        assert_eq!(s, "-");
    }
}
