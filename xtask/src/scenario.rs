//! Declarative system tests: each `tests/scenarios/*.toml` names the emulator, how to boot,
//! CPUs, memory, the hypervisor's command line, the console input, the patterns that must
//! appear (in order), patterns that must not, and a timeout. The runner boots it, types the
//! input at each prompt, and judges the serial output.
//!
//! Keys (see [`Scenario`] for each one's details):
//!
//! * `description`, `emulator` (`qemu`, `bochs` or `xtask-run`), `boot` (`kernel` or `iso`),
//!   `cpus`, `memory_mib`, `append`, `firmware` (`bios` or `uefi`), `modules` (ISO only);
//! * `input`, `expect`, `unordered`, `reject`, `once`, `settle_ms`, `timeout_s`, `rates`:
//!   the console lines typed and how the output is judged;
//! * `kill_on = 'REGEX'`: cut the power (kill the emulator) as soon as the output matches;
//!   the boot then passes if every `expect` matched in the output up to that match. A boot
//!   with `kill_on` ends only that way (a timeout otherwise), and has no EPT audit.
//! * `disks = [{ name = "d0", mib = 64 }, ...]`: at most three hard disks, fresh sparse raw
//!   images `target/scenarios/NAME/disks/DISK.img` made when the scenario starts, attached
//!   (ISO boot, BIOS firmware) to the i440FX's PIIX3 IDE controller (bus-master DMA) in this
//!   order: ata0-slave (ports 0x1f0/0x3f6, IRQ 14; the boot CD-ROM is ata0-master),
//!   ata1-master and ata1-slave (ports 0x170/0x376, IRQ 15). Each image is the smallest
//!   whole number of 16-head, 63-sector cylinders (516,096 bytes) not below `mib` MiB, given
//!   to Bochs as `mode=flat` with that geometry; QEMU (also the `--kvm` reruns) gets the
//!   same positions (`-drive if=ide,index=1..3`, the CD-ROM at index 0, `-nodefaults`).
//!   Bochs' INFO and ERROR messages go to `bochs.log` then (they are off without disks).
//! * `[[boots]]`: later boots, in order, after the first (the top-level keys): the emulator
//!   starts again on the same images, not recreated. Each takes `modules` (replacing the
//!   scenario's for that boot; default: the same), `input`, `expect`, `unordered`,
//!   `kill_on`, `settle_ms`, `timeout_s` (default: the scenario's) and `detach = ["d1"]`
//!   (boot without those disks; the others keep their positions). `reject` and `once` apply
//!   to every boot, `rates` to the first only. Boot N's serial output is `serial.log` (N = 1)
//!   or `serial.N.log`, Bochs' files `bochsrc.N`, `bochs.N.log`, `emulator.N.out`. A failing
//!   boot fails the scenario, naming the boot.
//! * `nic = true`: the machine gets an e1000 NIC (PCI; dom0's physical NIC) on a user-mode
//!   (slirp) network restricted to this machine: the network's host 10.0.2.2 answers ARP
//!   and ICMP echo, nothing leaves the machine, and Bochs logs every frame on the wire to
//!   `slirp.log` (`slirp.N.log` for boot N).
//! * `com2_expect = ['...']`: the machine gets a second serial port (COM2, 0x2f8, passed to
//!   dom0), written to `com2.log` (`com2.N.log`); once a boot has passed, every regex must
//!   match that file's text, in order.
//! * `after = [{ hvctl = ["volume", "-d", "{d0}", "check"], expect = ['...'] }]`: once every
//!   boot passed, the project's `hvctl` (built on demand) runs with each `{DISK}` replaced by
//!   that disk image's path; it must exit with status 0 and every regex must match its
//!   stdout and stderr (kept in `after.N.out`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use regex::Regex;
use serde::Deserialize;

use crate::build::{self, ImageOptions};
use crate::emu::{self, Boot, Emulator, Machine, PROMPT};
use crate::root;

/// A fault report or panic from the hypervisor: fails every scenario that does not expect one.
const DEFAULT_REJECT: &str = r"\*\*\* CPU \d+: (EXCEPTION|PANIC)";
/// The boot banner: seeing it twice means the machine reset.
const DEFAULT_ONCE: &str = r"hypervisor \S+ booting";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(skip)]
    pub name: String,
    pub description: String,
    pub emulator: String,
    /// `kernel` (QEMU `-kernel`, multiboot1) or `iso` (GRUB, multiboot2).
    #[serde(default = "default_boot")]
    pub boot: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_mem")]
    pub memory_mib: u32,
    #[serde(default)]
    pub append: String,
    /// `bios` (default) or `uefi` (QEMU with OVMF; ISO boot only).
    #[serde(default = "default_firmware")]
    pub firmware: String,
    /// Boot modules (ISO only): `GUEST[:MODULE LINE]`, a test guest's name or an ELF path.
    #[serde(default)]
    pub modules: Vec<String>,
    pub timeout_s: u64,
    /// Lines typed at successive prompts; `@wait MS` pauses instead, `@until REGEX` holds
    /// the next line until the output so far matches (neither consumes a prompt), and
    /// `@raw TEXT` types TEXT as it is, at once (no Enter added: a guest's attached console;
    /// after it, `@wait` and `@until` no longer wait for a shell prompt either, until the next
    /// shell line).
    #[serde(default)]
    pub input: Vec<String>,
    /// Regexes that must all appear, in this order (any order with `unordered = true`, for
    /// output of several domains that interleaves).
    pub expect: Vec<String>,
    #[serde(default)]
    pub unordered: bool,
    /// Regexes that fail the scenario if they appear (default: any fault report).
    #[serde(default = "default_reject")]
    pub reject: Vec<String>,
    /// Regexes that may appear at most once (default: the boot banner, so a reset fails).
    #[serde(default = "default_once")]
    pub once: Vec<String>,
    /// Keep watching this long after success, for late rejects (e.g. a reset after a fault).
    #[serde(default)]
    pub settle_ms: u64,
    /// Rates read from the output and compared once every pattern matched (CPU shares).
    #[serde(default)]
    pub rates: Option<Rates>,
    /// Cut the power as soon as the output matches: the boot passes if every `expect` matched
    /// in the output up to that match (it ends only this way).
    #[serde(default)]
    pub kill_on: Option<String>,
    /// Hard disks: fresh raw images at the free ATA positions, in order (ISO boot only).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Later boots on the same disks, after the first (which is this table's own keys).
    #[serde(default)]
    pub boots: Vec<LaterBoot>,
    /// `hvctl` runs on the images after the last boot.
    #[serde(default)]
    pub after: Vec<AfterCheck>,
    /// An e1000 NIC on a user-mode network of this machine only.
    #[serde(default)]
    pub nic: bool,
    /// A second serial port, and what each boot must have written to it (in order).
    #[serde(default)]
    pub com2_expect: Vec<String>,
}

/// The most disks a scenario has: the ATA positions beside the boot CD-ROM.
pub const MAX_DISKS: usize = emu::DISK_POSITIONS.len();
/// The largest disk: what a CHS geometry of 16383 cylinders holds.
pub const MAX_DISK_MIB: u64 = (emu::MAX_CYLINDERS * emu::CYLINDER_BYTES) >> 20;

/// A hard disk of a scenario: `disks/NAME.img` in its work folder, made fresh and sparse when
/// the scenario starts, at least `mib` MiB (rounded up to whole cylinders).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: String,
    pub mib: u64,
}

/// A later boot: the emulator restarted on the scenario's disks as they are.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LaterBoot {
    /// Replaces the scenario's modules for this boot (default: the same modules).
    #[serde(default)]
    pub modules: Option<Vec<String>>,
    #[serde(default)]
    pub input: Vec<String>,
    pub expect: Vec<String>,
    #[serde(default)]
    pub unordered: bool,
    #[serde(default)]
    pub kill_on: Option<String>,
    /// Disks left off this boot (as if removed); the others keep their positions.
    #[serde(default)]
    pub detach: Vec<String>,
    #[serde(default)]
    pub settle_ms: u64,
    /// Default: the scenario's `timeout_s`.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// `hvctl` with these arguments (`{DISK}` is that disk image's path) after the last boot:
/// status 0 and every regex matching its output (stdout and stderr), in any order.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AfterCheck {
    pub hvctl: Vec<String>,
    #[serde(default)]
    pub expect: Vec<String>,
}

/// One boot as it runs: the first from the scenario's top-level keys, the others from
/// `boots`.
#[derive(Debug, Clone, Copy)]
pub struct BootPlan<'a> {
    /// 1 for the first boot.
    pub number: usize,
    pub modules: &'a [String],
    pub input: &'a [String],
    pub expect: &'a [String],
    pub unordered: bool,
    pub kill_on: Option<&'a str>,
    pub detach: &'a [String],
    pub settle_ms: u64,
    pub timeout_s: u64,
    pub rates: Option<&'a Rates>,
}

impl BootPlan<'_> {
    /// Its serial log's file name: `serial.log`, then `serial.2.log`, ...
    pub fn serial_log(&self) -> String {
        format!("serial{}.log", self.tag())
    }

    /// What goes into the names of its emulator files: "" for the first boot, else ".N".
    pub fn tag(&self) -> String {
        if self.number == 1 {
            String::new()
        } else {
            format!(".{}", self.number)
        }
    }
}

/// A disk's image in a scenario's work folder.
pub fn disk_path(work: &Path, name: &str) -> PathBuf {
    work.join("disks").join(format!("{name}.img"))
}

/// `{NAME}` in `arg` replaced by `paths[NAME]`; a `{...}` that names no disk is an error.
pub fn substitute(
    arg: &str,
    paths: &std::collections::BTreeMap<String, PathBuf>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let inner = &rest[i + 1..];
        let Some(j) = inner.find('}') else {
            return Err(format!("'{arg}': '{{' without its '}}'"));
        };
        let name = &inner[..j];
        match paths.get(name) {
            Some(p) => out.push_str(&p.display().to_string()),
            None => {
                let known: Vec<&str> = paths.keys().map(String::as_str).collect();
                return Err(format!(
                    "'{arg}': no disk named '{name}' (disks: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ));
            }
        }
        rest = &inner[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How many of `expect` matched in `text`: in order (each after the previous match), or any
/// order with `unordered`.
fn matched(expect: &[Regex], text: &str, unordered: bool) -> usize {
    if unordered {
        return expect.iter().take_while(|r| r.is_match(text)).count();
    }
    let mut pos = 0;
    let mut n = 0;
    for r in expect {
        match r.find(&text[pos..]) {
            Some(m) => {
                pos += m.end();
                n += 1;
            }
            None => break,
        }
    }
    n
}

/// The verdict of a boot whose `kill` pattern appeared in `text`: every `expect` must have
/// matched in the output up to the end of that match. None while it has not appeared.
fn killed_verdict(
    kill: &Regex,
    expect: &[Regex],
    text: &str,
    unordered: bool,
) -> Option<Result<(), String>> {
    let k = kill.find(text)?;
    let n = matched(expect, &text[..k.end()], unordered);
    Some(match expect.get(n) {
        None => Ok(()),
        Some(r) => Err(format!(
            "power cut at /{kill}/ before /{r}/ appeared ({n} of {} patterns matched)",
            expect.len()
        )),
    })
}

/// Key → value.
pub type BTreeMapF = std::collections::BTreeMap<String, f64>;

/// Rates in the serial output, compared with what they should be: `regex` captures a key, a
/// window number, an amount and a time (in that order). The windows every key reported are
/// taken in order, the first `skip` left out (start-up), the next `count` used; each key's rate
/// over them is amount / time, taken as a share of the sum over all keys, or as a ratio to
/// `reference`'s rate when given.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    pub regex: String,
    #[serde(default)]
    pub skip: usize,
    pub count: usize,
    #[serde(default)]
    pub reference: Option<String>,
    /// Key → expected share (or ratio), within `tolerance` (relative) either way.
    #[serde(default)]
    pub expect: std::collections::BTreeMap<String, f64>,
    pub tolerance: f64,
    /// Key → the most it may be (plus 1 % for measurement), whatever `expect` says.
    #[serde(default)]
    pub at_most: std::collections::BTreeMap<String, f64>,
}

impl Rates {
    /// Each window's shares (or ratios), for the windows judged.
    pub fn per_window(&self, text: &str) -> Result<Vec<BTreeMapF>, String> {
        let (seen, windows) = self.windows(text)?;
        let mut out = Vec::new();
        for w in windows {
            let rate = |k: &String| {
                let (a, t) = seen[k][&w];
                if t > 0.0 { a / t } else { 0.0 }
            };
            let base = match &self.reference {
                Some(r) => rate(r),
                None => seen.keys().map(rate).sum(),
            };
            if base <= 0.0 {
                return Err(format!("rates: nothing measured in window {w}"));
            }
            out.push(seen.keys().map(|k| (k.clone(), rate(k) / base)).collect());
        }
        Ok(out)
    }

    /// The reports: key -> window -> (amount, time), and the windows judged.
    #[allow(clippy::type_complexity)]
    fn windows(
        &self,
        text: &str,
    ) -> Result<
        (
            std::collections::BTreeMap<String, std::collections::BTreeMap<u64, (f64, f64)>>,
            Vec<u64>,
        ),
        String,
    > {
        use std::collections::{BTreeMap, BTreeSet};
        let re = Regex::new(&self.regex).map_err(|e| format!("rates: bad regex: {e}"))?;
        // key -> window -> (amount, time)
        let mut seen: BTreeMap<String, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
        for c in re.captures_iter(text) {
            let (Some(k), Some(w), Some(a), Some(t)) = (c.get(1), c.get(2), c.get(3), c.get(4))
            else {
                return Err("rates: the regex must capture key, window, amount, time".into());
            };
            let w: u64 = w
                .as_str()
                .parse()
                .map_err(|_| "rates: window not a number")?;
            let a: f64 = a
                .as_str()
                .parse()
                .map_err(|_| "rates: amount not a number")?;
            let t: f64 = t.as_str().parse().map_err(|_| "rates: time not a number")?;
            seen.entry(k.as_str().to_string())
                .or_default()
                .insert(w, (a, t));
        }
        let wanted: BTreeSet<&String> = self
            .expect
            .keys()
            .chain(self.at_most.keys())
            .chain(self.reference.iter())
            .collect();
        for k in &wanted {
            if !seen.contains_key(*k) {
                return Err(format!("rates: no figure for key {k}"));
            }
        }
        let mut common: Option<BTreeSet<u64>> = None;
        for ws in seen.values() {
            let here: BTreeSet<u64> = ws.keys().copied().collect();
            common = Some(match common {
                None => here,
                Some(c) => c.intersection(&here).copied().collect(),
            });
        }
        let windows: Vec<u64> = common
            .unwrap_or_default()
            .into_iter()
            .skip(self.skip)
            .take(self.count)
            .collect();
        if windows.len() < self.count {
            return Err(format!(
                "rates: {} windows reported by every key after skipping {}, {} needed",
                windows.len(),
                self.skip,
                self.count
            ));
        }
        Ok((seen, windows))
    }

    /// Judges `text`: every key measured in every window, each within bounds. Returns the
    /// figures either way (for the report).
    pub fn judge(&self, text: &str) -> Result<String, String> {
        use std::collections::BTreeMap;
        let (seen, windows) = self.windows(text)?;
        let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for (k, ws) in &seen {
            let e = sums.entry(k.clone()).or_default();
            for w in &windows {
                let (a, t) = ws[w];
                e.0 += a;
                e.1 += t;
            }
        }
        let rate = |k: &str| {
            sums.get(k)
                .map_or(0.0, |&(a, t)| if t > 0.0 { a / t } else { 0.0 })
        };
        let base = match &self.reference {
            Some(r) => rate(r),
            None => sums.keys().map(|k| rate(k)).sum(),
        };
        if base <= 0.0 {
            return Err("rates: nothing measured".into());
        }
        let mut report = Vec::new();
        let mut bad = Vec::new();
        for k in sums.keys() {
            let v = rate(k) / base;
            let mut line = format!("{k}: {v:.4}");
            if let Some(&e) = self.expect.get(k) {
                let err = (v - e) / e;
                line += &format!(" (expected {e:.4}, {:+.1} %)", err * 100.0);
                if err.abs() > self.tolerance {
                    bad.push(format!(
                        "{k} is {v:.4}, not within {:.0} % of {e:.4}",
                        self.tolerance * 100.0
                    ));
                }
            }
            if let Some(&m) = self.at_most.get(k)
                && v > m * 1.01
            {
                bad.push(format!("{k} is {v:.4}, more than {m:.4}"));
            }
            report.push(line);
        }
        let report = format!(
            "{} over windows {}..={}",
            report.join(", "),
            windows[0],
            windows[windows.len() - 1]
        );
        if bad.is_empty() {
            Ok(report)
        } else {
            Err(format!("rates: {}; measured {report}", bad.join("; ")))
        }
    }
}

fn default_boot() -> String {
    "kernel".into()
}
fn default_firmware() -> String {
    "bios".into()
}
fn default_cpus() -> u32 {
    1
}
fn default_mem() -> u32 {
    128
}
fn default_reject() -> Vec<String> {
    vec![DEFAULT_REJECT.into()]
}
fn default_once() -> Vec<String> {
    vec![DEFAULT_ONCE.into()]
}

/// Loads every scenario, sorted by name.
pub fn load_all() -> Result<Vec<Scenario>, String> {
    let dir = root().join("tests").join("scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files.iter().map(|f| load(f)).collect()
}

pub fn load(path: &Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(
        &path.file_stem().unwrap_or_default().to_string_lossy(),
        &text,
    )
}

/// A scenario from its TOML text, checked; `name` is its file's stem.
pub fn parse(name: &str, text: &str) -> Result<Scenario, String> {
    let mut s: Scenario = toml::from_str(text).map_err(|e| format!("{name}.toml: {e}"))?;
    s.name = name.to_string();
    if s.via_xtask_run() {
        if !s.modules.is_empty()
            || s.boot != "kernel"
            || s.firmware != "bios"
            || !s.append.is_empty()
            || !s.disks.is_empty()
            || !s.boots.is_empty()
            || !s.after.is_empty()
            || s.kill_on.is_some()
            || s.nic
            || !s.com2_expect.is_empty()
        {
            return Err(format!(
                "{}: emulator 'xtask-run' runs `cargo xtask run` as a user would: no modules, boot, firmware, append, disks, boots, after, kill_on, nic or com2_expect",
                s.name
            ));
        }
        for r in s.expect.iter().chain(&s.reject) {
            Regex::new(r).map_err(|e| format!("{}: bad pattern '{r}': {e}", s.name))?;
        }
        return Ok(s);
    }
    s.emulator()?;
    if !matches!(s.boot.as_str(), "kernel" | "iso") {
        return Err(format!("{}: boot must be 'kernel' or 'iso'", s.name));
    }
    match (s.firmware.as_str(), s.boot.as_str(), s.emulator()?) {
        ("bios", _, _) | ("uefi", "iso", Emulator::Qemu) => {}
        ("uefi", _, _) => {
            return Err(format!(
                "{}: firmware 'uefi' needs QEMU and boot = 'iso'",
                s.name
            ));
        }
        (other, _, _) => {
            return Err(format!(
                "{}: firmware must be 'bios' or 'uefi', not '{other}'",
                s.name
            ));
        }
    }
    if s.boot == "kernel" && !s.modules.is_empty() {
        return Err(format!("{}: modules need boot = 'iso'", s.name));
    }
    if s.boot == "kernel" && s.emulator()? == Emulator::Bochs {
        return Err(format!("{}: Bochs boots only 'iso'", s.name));
    }
    for r in s
        .expect
        .iter()
        .chain(&s.reject)
        .chain(&s.once)
        .chain(&s.com2_expect)
    {
        Regex::new(r).map_err(|e| format!("{}: bad pattern '{r}': {e}", s.name))?;
    }
    if (s.nic || !s.com2_expect.is_empty()) && s.boot != "iso" {
        return Err(format!(
            "{}: nic and com2_expect need boot = 'iso' (the machine of the ISO boot)",
            s.name
        ));
    }
    if let Some(r) = &s.rates {
        Regex::new(&r.regex).map_err(|e| format!("{}: bad rates regex: {e}", s.name))?;
    }
    check_disks_and_boots(&s).map_err(|e| format!("{}: {e}", s.name))?;
    Ok(s)
}

/// The checks of `disks`, `boots`, `kill_on` and `after`.
fn check_disks_and_boots(s: &Scenario) -> Result<(), String> {
    let bad = |what: &str, r: &str| {
        Regex::new(r)
            .map(|_| ())
            .map_err(|e| format!("bad {what} '{r}': {e}"))
    };
    if !s.disks.is_empty() {
        if s.boot != "iso" {
            return Err("disks need boot = 'iso' (they sit beside its CD-ROM)".into());
        }
        if s.firmware != "bios" {
            return Err(
                "disks need firmware = 'bios' (the i440FX machine with PIIX3 IDE; UEFI's q35 has AHCI)".into(),
            );
        }
    }
    if s.disks.len() > MAX_DISKS {
        return Err(format!(
            "{} disks, at most {MAX_DISKS} (ata0-slave, ata1-master, ata1-slave; the CD-ROM is ata0-master)",
            s.disks.len()
        ));
    }
    for (i, d) in s.disks.iter().enumerate() {
        let valid = !d.name.is_empty()
            && d.name.len() <= 32
            && d.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if !valid {
            return Err(format!(
                "disk name '{}': 1 to 32 letters, digits, '-' or '_'",
                d.name
            ));
        }
        if s.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(format!("disk '{}' is listed twice", d.name));
        }
        if !(1..=MAX_DISK_MIB).contains(&d.mib) {
            return Err(format!(
                "disk '{}': mib = {} must be 1..={MAX_DISK_MIB}",
                d.name, d.mib
            ));
        }
    }
    if let Some(k) = &s.kill_on {
        bad("kill_on", k)?;
    }
    for (i, b) in s.boots.iter().enumerate() {
        let n = i + 2;
        if b.modules.as_ref().is_some_and(|m| !m.is_empty()) && s.boot != "iso" {
            return Err(format!("boot {n}: modules need boot = 'iso'"));
        }
        for r in &b.expect {
            bad(&format!("boot {n} pattern"), r)?;
        }
        if let Some(k) = &b.kill_on {
            bad(&format!("boot {n} kill_on"), k)?;
        }
        for (j, d) in b.detach.iter().enumerate() {
            if !s.disks.iter().any(|x| &x.name == d) {
                return Err(format!(
                    "boot {n}: detach names '{d}', which is not one of the disks"
                ));
            }
            if b.detach[..j].contains(d) {
                return Err(format!("boot {n}: detach names '{d}' twice"));
            }
        }
        if b.timeout_s == Some(0) {
            return Err(format!("boot {n}: timeout_s must be positive"));
        }
    }
    let names: std::collections::BTreeMap<String, PathBuf> = s
        .disks
        .iter()
        .map(|d| (d.name.clone(), PathBuf::from(&d.name)))
        .collect();
    for (i, a) in s.after.iter().enumerate() {
        let n = i + 1;
        if a.hvctl.is_empty() {
            return Err(format!("after check {n}: hvctl needs its arguments"));
        }
        for arg in &a.hvctl {
            substitute(arg, &names).map_err(|e| format!("after check {n}: {e}"))?;
        }
        for r in &a.expect {
            bad(&format!("after check {n} pattern"), r)?;
        }
    }
    Ok(())
}

impl Scenario {
    /// `emulator = "xtask-run"`: the scenario is `cargo xtask run` itself, on the machine it
    /// chooses, with the input lines on its stdin, judged on everything it prints.
    pub fn via_xtask_run(&self) -> bool {
        self.emulator == "xtask-run"
    }

    /// Every boot, in order: the first from the top-level keys, then `boots`.
    pub fn boot_plans(&self) -> Vec<BootPlan<'_>> {
        let mut plans = vec![BootPlan {
            number: 1,
            modules: &self.modules,
            input: &self.input,
            expect: &self.expect,
            unordered: self.unordered,
            kill_on: self.kill_on.as_deref(),
            detach: &[],
            settle_ms: self.settle_ms,
            timeout_s: self.timeout_s,
            rates: self.rates.as_ref(),
        }];
        for (i, b) in self.boots.iter().enumerate() {
            plans.push(BootPlan {
                number: i + 2,
                modules: b.modules.as_deref().unwrap_or(&self.modules),
                input: &b.input,
                expect: &b.expect,
                unordered: b.unordered,
                kill_on: b.kill_on.as_deref(),
                detach: &b.detach,
                settle_ms: b.settle_ms,
                timeout_s: b.timeout_s.unwrap_or(self.timeout_s),
                rates: None,
            });
        }
        plans
    }

    /// The disks a boot attaches: every disk at the position its place in `disks` gives it,
    /// less the detached ones (the others keep their positions).
    pub fn machine_disks(&self, work: &Path, detach: &[String]) -> Vec<emu::Disk> {
        self.disks
            .iter()
            .zip(emu::DISK_POSITIONS)
            .filter(|(d, _)| !detach.contains(&d.name))
            .map(|(d, position)| emu::Disk {
                path: disk_path(work, &d.name),
                position,
                cylinders: emu::disk_cylinders(d.mib),
            })
            .collect()
    }

    pub fn emulator(&self) -> Result<Emulator, String> {
        match self.emulator.as_str() {
            "qemu" => Ok(Emulator::Qemu),
            "bochs" => Ok(Emulator::Bochs),
            other => Err(format!(
                "{}: unknown emulator '{other}' (qemu, bochs or xtask-run)",
                self.name
            )),
        }
    }
}

/// How a scenario ended.
pub struct Outcome {
    pub passed: bool,
    pub detail: String,
    pub seconds: f64,
    pub log: PathBuf,
}

/// Where a scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    /// The emulator the scenario names.
    Named,
    /// QEMU with KVM and `-cpu host` instead (real VT-x, nested), for Bochs scenarios.
    Kvm,
}

/// Boots and judges one scenario on `on`.
pub fn run_on(s: &Scenario, on: On) -> Outcome {
    let dir = match on {
        On::Named => s.name.clone(),
        On::Kvm => format!("kvm-{}", s.name),
    };
    let work = root().join("target").join("scenarios").join(dir);
    let mut log = work.join("serial.log");
    let t0 = Instant::now();
    let result = run_inner(s, &work, on, &mut log);
    let seconds = t0.elapsed().as_secs_f64();
    match result {
        Ok(detail) => Outcome {
            passed: true,
            detail,
            seconds,
            log,
        },
        Err(detail) => Outcome {
            passed: false,
            detail,
            seconds,
            log,
        },
    }
}

fn compile(patterns: &[String]) -> Vec<Regex> {
    patterns
        .iter()
        .map(|p| Regex::new(p).expect("checked at load"))
        .collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Makes the disks, runs every boot in order on them, then the `after` checks. `log` is left
/// at the serial log of the boot that ran last.
fn run_inner(s: &Scenario, work: &Path, on: On, log: &mut PathBuf) -> Result<String, String> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
    if s.via_xtask_run() {
        return run_xtask(s, log);
    }
    let emulator = match on {
        On::Named => s.emulator()?,
        On::Kvm => Emulator::Qemu,
    };
    for d in &s.disks {
        emu::create_disk_image(&disk_path(work, &d.name), emu::disk_cylinders(d.mib))?;
    }
    let plans = s.boot_plans();
    let many = plans.len() > 1;
    let work_name = work.file_name().unwrap_or_default().to_string_lossy();
    // Each distinct module list gets one ISO: the first boot's is `scenario-NAME`.
    let mut isos: Vec<(&[String], PathBuf)> = Vec::new();
    let mut details = Vec::new();
    for plan in &plans {
        *log = work.join(plan.serial_log());
        let which = |e: String| {
            if many {
                format!("boot {} of {}: {e}", plan.number, plans.len())
            } else {
                e
            }
        };
        let m = Machine {
            emulator,
            cpus: s.cpus,
            mem_mib: s.memory_mib,
            boot: boot_for(s, plan, &mut isos, &work_name).map_err(which)?,
            work_dir: work.to_path_buf(),
            deterministic: true,
            uefi: s.firmware == "uefi",
            kvm: on == On::Kvm,
            disks: s.machine_disks(work, plan.detach),
            nic: s.nic.then(|| emu::Nic {
                mac: emu::NIC_MAC.into(),
            }),
            com2: !s.com2_expect.is_empty(),
            tag: plan.tag(),
        };
        let detail = run_boot(s, plan, &m, log, on).map_err(which)?;
        details.push(if many {
            format!("boot {}: {detail}", plan.number)
        } else {
            detail
        });
    }
    if !s.after.is_empty() {
        details.push(run_after(s, work)?);
    }
    Ok(details.join("; "))
}

/// What a boot loads: the kernel, or the ISO with its modules, made once for each distinct
/// module list (the first boot's is `scenario-NAME.iso`, later ones `scenario-NAME-bootN.iso`).
fn boot_for<'a>(
    s: &Scenario,
    plan: &BootPlan<'a>,
    isos: &mut Vec<(&'a [String], PathBuf)>,
    work_name: &str,
) -> Result<Boot, String> {
    if s.boot != "iso" {
        return Ok(Boot::Kernel {
            elf: build::build_kernel()?,
            append: s.append.clone(),
        });
    }
    if let Some((_, iso)) = isos.iter().find(|(m, _)| *m == plan.modules) {
        return Ok(Boot::Iso(iso.clone()));
    }
    let modules = plan
        .modules
        .iter()
        .map(|m| build::guest_module(m))
        .collect::<Result<Vec<_>, _>>()?;
    let o = ImageOptions {
        append: s.append.clone(),
        modules,
    };
    let name = if isos.is_empty() {
        format!("scenario-{work_name}")
    } else {
        format!("scenario-{work_name}-boot{}", plan.number)
    };
    let iso = build::image_named(&o, &name)?;
    isos.push((plan.modules, iso.clone()));
    Ok(Boot::Iso(iso))
}

/// Runs one boot on `m` and judges its serial output (kept in `log`).
fn run_boot(
    s: &Scenario,
    plan: &BootPlan,
    m: &Machine,
    log: &Path,
    on: On,
) -> Result<String, String> {
    let mut running = emu::start(m)?;
    let result = judge_boot(s, plan, m, &mut running, log, on);
    running.stop();
    for d in &m.disks {
        // The emulator was killed: Bochs' lock files stay behind.
        let _ = std::fs::remove_file(d.bochs_lock());
    }
    let detail = result?;
    if m.com2 {
        let path = m.file("com2", ".log");
        let text = std::fs::read(&path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| format!("COM2 {}: {e}", path.display()))?;
        check_in_order(&s.com2_expect, &text)
            .map_err(|e| format!("COM2 ({}): {e}", path.display()))?;
    }
    Ok(detail)
}

/// Every regex of `patterns` matches `text`, each after the previous one's match.
fn check_in_order(patterns: &[String], text: &str) -> Result<(), String> {
    let mut at = 0;
    for p in patterns {
        let r = Regex::new(p).map_err(|e| format!("/{p}/: {e}"))?;
        match r.find(&text[at..]) {
            Some(m) => at += m.end(),
            None => return Err(format!("/{p}/ did not appear (in order)")),
        }
    }
    Ok(())
}

fn judge_boot(
    s: &Scenario,
    plan: &BootPlan,
    m: &Machine,
    running: &mut emu::Running,
    log: &Path,
    on: On,
) -> Result<String, String> {
    running
        .serial
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let expect = compile(plan.expect);
    let reject = compile(&s.reject);
    let once = compile(&s.once);
    let kill = plan
        .kill_on
        .map(|k| Regex::new(k).expect("checked at load"));
    let deadline = Instant::now() + Duration::from_secs(plan.timeout_s);
    let mut raw = Vec::new();
    let mut next_expect = 0usize;
    let mut pos = 0usize;
    let mut sent = 0usize;
    let mut typed = 0usize;
    // Since the last `@raw` (see `Scenario::input`).
    let mut raw_mode = false;
    let mut paused_until: Option<Instant> = None;
    let mut done_at: Option<Instant> = None;
    let mut killed = false;
    let mut buf = [0u8; 8192];
    let verdict = loop {
        match read_serial(running, &mut buf, &mut raw, log) {
            Ok(true) => {}
            Ok(false) => {
                if done_at.is_none() {
                    break Err("the emulator closed the serial port".to_string());
                }
                break Ok(());
            }
            Err(e) => break Err(e),
        }
        let text = String::from_utf8_lossy(&raw);
        if let Some(r) = reject.iter().find(|r| r.is_match(&text)) {
            break Err(format!("rejected pattern /{r}/ appeared"));
        }
        if let Some(r) = once.iter().find(|r| r.find_iter(&text).count() > 1) {
            break Err(format!(
                "/{r}/ appeared more than once (did the machine reset?)"
            ));
        }
        if let Some(k) = &kill
            && let Some(v) = killed_verdict(k, &expect, &text, plan.unordered)
        {
            // The power cut: nothing more reaches the disks.
            running.stop();
            killed = true;
            break v;
        }
        if plan.unordered {
            next_expect = expect
                .iter()
                .position(|r| !r.is_match(&text))
                .unwrap_or(expect.len());
        } else {
            while next_expect < expect.len() {
                match expect[next_expect].find(&text[pos..]) {
                    Some(m) => {
                        pos += m.end();
                        next_expect += 1;
                    }
                    None => break,
                }
            }
        }
        let prompts = text.matches(PROMPT).count();
        let paused = paused_until.is_some_and(|t| Instant::now() < t);
        // A line for the shell waits for the next prompt, and so do `@wait` and `@until`,
        // except after `@raw` (typing into an attached guest console, which prints no shell
        // prompt) until the next shell line; `@raw` itself never waits.
        let at_prompt = |line: &str| {
            line.starts_with("@raw ") || (raw_mode && line.starts_with('@')) || prompts > typed
        };
        if sent < plan.input.len() && at_prompt(&plan.input[sent]) && !paused {
            let line = &plan.input[sent];
            let advance = if let Some(ms) = line.strip_prefix("@wait ") {
                let ms: u64 = ms
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad input line '{line}'"))?;
                paused_until = Some(Instant::now() + Duration::from_millis(ms));
                true
            } else if let Some(re) = line.strip_prefix("@until ") {
                // Holds the next input until the output so far matches (e.g. until guests
                // have reported enough windows that a command's output cannot fall in them).
                regex::Regex::new(re)
                    .map_err(|e| format!("bad input line '{line}': {e}"))?
                    .is_match(&text)
            } else if let Some(bytes) = line.strip_prefix("@raw ") {
                // Typed as it is, with no prompt to wait for and no Enter added: for a guest's
                // console attached with `console ID` (its own prompt; Ctrl-] is "\u001d").
                use std::io::Write;
                running
                    .serial
                    .write_all(bytes.as_bytes())
                    .map_err(|e| format!("serial write: {e}"))?;
                raw_mode = true;
                true
            } else {
                use std::io::Write;
                running
                    .serial
                    .write_all(format!("{line}\r").as_bytes())
                    .map_err(|e| format!("serial write: {e}"))?;
                typed += 1;
                raw_mode = false;
                true
            };
            if advance {
                sent += 1;
            }
        }
        // A boot with `kill_on` ends only at the power cut.
        if kill.is_none()
            && next_expect == expect.len()
            && sent == plan.input.len()
            && done_at.is_none()
        {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|t| t.elapsed() >= Duration::from_millis(plan.settle_ms)) {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(match (expect.get(next_expect), &kill) {
                (Some(r), _) => format!(
                    "timed out after {} s waiting for /{r}/ (input sent: {sent} of {})",
                    plan.timeout_s,
                    plan.input.len()
                ),
                (None, Some(k)) => format!(
                    "timed out after {} s waiting for /{k}/ to cut the power (input sent: {sent} of {})",
                    plan.timeout_s,
                    plan.input.len()
                ),
                (None, None) => format!(
                    "timed out after {} s sending input ({sent} of {} sent)",
                    plan.timeout_s,
                    plan.input.len()
                ),
            });
        }
        if running.exited() && done_at.is_none() {
            break Err("the emulator exited".to_string());
        }
    };
    let mut rates_report = String::new();
    let verdict = match (verdict, plan.rates) {
        (Ok(()), Some(r)) => r
            .judge(&String::from_utf8_lossy(&raw))
            .map(|figures| rates_report = format!("; rates {figures}")),
        (v, _) => v,
    };
    // Every boot that runs guests under VT-x ends with the EPT audit (unless its power was
    // cut): each live domain's EPT must map exactly its own RAM.
    let verdict = match verdict {
        Ok(()) if !killed && (m.emulator == Emulator::Bochs || on == On::Kvm) => {
            audit(running, &mut raw, log, &reject)
        }
        other => other,
    };
    let text = String::from_utf8_lossy(&raw).into_owned();
    let _ = std::fs::write(log, &raw);
    let ending = if killed {
        format!(
            "power cut at /{}/",
            kill.as_ref().map(|k| k.as_str()).unwrap_or_default()
        )
    } else if m.emulator == Emulator::Bochs || on == On::Kvm {
        "EPT audit clean".to_string()
    } else {
        "no EPT audit (no VT-x)".to_string()
    };
    match verdict {
        Ok(()) => Ok(format!(
            "{} patterns matched, {} lines typed, {ending}{rates_report}",
            expect.len(),
            sent
        )),
        Err(why) => Err(format!(
            "{why}\n--- last serial output ({}) ---\n{}\n---",
            log.display(),
            tail(&text, 25)
        )),
    }
}

/// Builds `hvctl` and runs each `after` check on the disk images: status 0 and every pattern
/// in its output (kept in `after.N.out`), within 300 s.
fn run_after(s: &Scenario, work: &Path) -> Result<String, String> {
    use std::process::{Command, Stdio};
    let hvctl = build::build_hvctl()?;
    let paths: std::collections::BTreeMap<String, PathBuf> = s
        .disks
        .iter()
        .map(|d| (d.name.clone(), disk_path(work, &d.name)))
        .collect();
    for (i, check) in s.after.iter().enumerate() {
        let n = i + 1;
        let args = check
            .hvctl
            .iter()
            .map(|a| substitute(a, &paths))
            .collect::<Result<Vec<_>, _>>()?;
        let shown = format!("hvctl {}", args.join(" "));
        let out_path = work.join(format!("after.{n}.out"));
        let out =
            std::fs::File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new(&hvctl)
            .args(&args)
            .current_dir(work)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("after check {n}: cannot start {}: {e}", hvctl.display()))?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let fail = |why: String| {
            Err(format!(
                "after check {n} ({shown}): {why}\n--- its output ({}) ---\n{}\n---",
                out_path.display(),
                tail(&text, 25)
            ))
        };
        match status {
            None => return fail("still running after 300 s".into()),
            Some(st) if !st.success() => return fail(format!("failed: {st}")),
            Some(_) => {}
        }
        if let Some(r) = compile(&check.expect).iter().find(|r| !r.is_match(&text)) {
            return fail(format!("/{r}/ is not in its output"));
        }
    }
    Ok(format!("{} hvctl checks passed", s.after.len()))
}

/// Runs `cargo xtask run --smp N --mem M` (this xtask binary) with the scenario's input lines on
/// stdin, bounded by its timeout, and judges its whole output (stdout and stderr).
fn run_xtask(s: &Scenario, log: &Path) -> Result<String, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .current_dir(root())
        .args([
            "run",
            "--smp",
            &s.cpus.to_string(),
            "--mem",
            &s.memory_mib.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start xtask run: {e}"))?;
    let mut input = String::new();
    for line in &s.input {
        input.push_str(line);
        input.push('\n');
    }
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("xtask run stdin: {e}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(s.timeout_s);
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let fail = |why: String| {
        Err(format!(
            "{why}\n--- last output of xtask run ---\n{}\n---",
            tail(&text, 25)
        ))
    };
    match status {
        None => return fail(format!("xtask run still running after {} s", s.timeout_s)),
        Some(st) if !st.success() => return fail(format!("xtask run failed: {st}")),
        Some(_) => {}
    }
    if let Some(r) = compile(&s.reject).iter().find(|r| r.is_match(&text)) {
        return fail(format!("rejected pattern /{r}/ appeared"));
    }
    let expect = compile(&s.expect);
    let mut pos = 0;
    for r in &expect {
        let hay = if s.unordered { &text[..] } else { &text[pos..] };
        match r.find(hay) {
            Some(m) if !s.unordered => pos += m.end(),
            Some(_) => {}
            None => return fail(format!("/{r}/ never appeared")),
        }
    }
    Ok(format!(
        "{} patterns matched in the output of xtask run",
        expect.len()
    ))
}

/// Types `audit` at the console and waits (30 s at most) for its summary; any violation, a
/// rejected pattern or no summary fails the scenario.
fn audit(
    running: &mut emu::Running,
    raw: &mut Vec<u8>,
    log: &Path,
    reject: &[Regex],
) -> Result<(), String> {
    use std::io::Write;
    let summary =
        Regex::new(r"EPT audit: (\d+) domains, (\d+) leaves, (\d+) violations").expect("valid");
    let start = raw.len();
    running
        .serial
        .write_all(b"audit\r")
        .map_err(|e| format!("serial write: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 8192];
    loop {
        if !read_serial(running, &mut buf, raw, log)? {
            return Err("the emulator closed the serial port during the EPT audit".into());
        }
        let text = String::from_utf8_lossy(&raw[start..]);
        if let Some(r) = reject.iter().find(|r| r.is_match(&text)) {
            return Err(format!(
                "rejected pattern /{r}/ appeared during the EPT audit"
            ));
        }
        if let Some(c) = summary.captures(&text) {
            return if &c[3] == "0" {
                Ok(())
            } else {
                Err(format!("EPT audit: {}", tail(&text, 10)))
            };
        }
        if Instant::now() > deadline {
            return Err("no EPT audit summary within 30 s".into());
        }
    }
}

/// Reads what the serial port has (waiting at most its read timeout), appends it to `raw` and
/// the log. `Ok(false)` when the emulator closed the port.
fn read_serial(
    running: &mut emu::Running,
    buf: &mut [u8],
    raw: &mut Vec<u8>,
    log: &Path,
) -> Result<bool, String> {
    match running.serial.read(buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            raw.extend_from_slice(&buf[..n]);
            let _ = std::fs::write(log, &*raw);
            Ok(true)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(true)
        }
        Err(e) => Err(format!("serial: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ISO scenario on Bochs with `extra` keys (top-level keys first, then tables).
    fn iso(extra: &str) -> Result<Scenario, String> {
        parse(
            "t",
            &format!(
                "description = 't'\nemulator = 'bochs'\nboot = 'iso'\ntimeout_s = 60\n\
                 modules = ['hello']\nexpect = ['hello']\n{extra}"
            ),
        )
    }

    const THREE: &str = "disks = [{ name = 'd0', mib = 64 }, { name = 'd1', mib = 8 }, \
                         { name = 'd2', mib = 1 }]\n";

    fn positions(disks: &[emu::Disk]) -> Vec<(String, String, u64)> {
        disks
            .iter()
            .map(|d| {
                (
                    d.position.bochs_name(),
                    d.path.file_name().unwrap().to_string_lossy().into_owned(),
                    d.cylinders,
                )
            })
            .collect()
    }

    #[test]
    fn disks_take_the_free_ata_positions_and_detach_keeps_the_others_in_place() {
        let s = iso(THREE).unwrap();
        let work = Path::new("/w");
        let all = s.machine_disks(work, &[]);
        assert_eq!(all[0].path, Path::new("/w/disks/d0.img"));
        assert_eq!(
            positions(&all),
            [
                ("ata0-slave".into(), "d0.img".into(), 131),
                ("ata1-master".into(), "d1.img".into(), 17),
                ("ata1-slave".into(), "d2.img".into(), 3),
            ]
        );
        let less = s.machine_disks(work, &["d1".into()]);
        assert_eq!(
            positions(&less),
            [
                ("ata0-slave".into(), "d0.img".into(), 131),
                ("ata1-slave".into(), "d2.img".into(), 3),
            ]
        );
        assert!(
            s.machine_disks(work, &["d0".into(), "d1".into(), "d2".into()])
                .is_empty()
        );
    }

    #[test]
    fn later_boots_inherit_or_replace_the_first_boots_keys() {
        let s = iso(&format!(
            "{THREE}kill_on = 'written'\nunordered = true\n\
             [[boots]]\nmodules = ['dom0:name=dom0 role=dom0']\nexpect = ['again']\n\
             detach = ['d1']\ntimeout_s = 300\nkill_on = 'cut'\n\
             [[boots]]\ninput = ['domains']\nexpect = ['third']\nunordered = true\n"
        ))
        .unwrap();
        let plans = s.boot_plans();
        assert_eq!(plans.len(), 3);
        let (one, two, three) = (&plans[0], &plans[1], &plans[2]);
        assert_eq!(
            (one.number, one.kill_on, one.unordered),
            (1, Some("written"), true)
        );
        assert_eq!(one.modules, ["hello"]);
        assert!(one.detach.is_empty());
        assert_eq!(two.modules, ["dom0:name=dom0 role=dom0"]);
        assert_eq!(
            (two.timeout_s, two.kill_on, two.unordered),
            (300, Some("cut"), false)
        );
        assert_eq!(two.detach, ["d1"]);
        assert_eq!(two.expect, ["again"]);
        // No modules: the scenario's; no timeout: the scenario's.
        assert_eq!(three.modules, ["hello"]);
        assert_eq!((three.timeout_s, three.kill_on), (60, None));
        assert_eq!(three.input, ["domains"]);
        let names: Vec<(String, String)> =
            plans.iter().map(|p| (p.serial_log(), p.tag())).collect();
        assert_eq!(
            names,
            [
                ("serial.log".into(), "".into()),
                ("serial.2.log".into(), ".2".into()),
                ("serial.3.log".into(), ".3".into()),
            ]
        );
    }

    #[test]
    fn disk_and_boot_mistakes_are_refused_at_load() {
        let err = |extra: &str| iso(extra).unwrap_err();
        let e = err(&format!("{THREE}[[boots]]\nexpect = []\ndetach = ['d3']\n"));
        assert!(
            e.contains("boot 2: detach names 'd3', which is not one of the disks"),
            "{e}"
        );
        let e = err(&format!(
            "{THREE}[[boots]]\nexpect = []\ndetach = ['d0', 'd0']\n"
        ));
        assert!(e.contains("twice"), "{e}");
        let e = err(&format!(
            "{THREE}after = [{{ hvctl = ['volume', '-d', '{{d0}}', '-d', '{{d9}}', 'check'] }}]\n"
        ));
        assert!(
            e.contains("after check 1: '{d9}': no disk named 'd9' (disks: d0, d1, d2)"),
            "{e}"
        );
        let e = err("after = [{ hvctl = ['volume', '-d', '{d0'] }]\n");
        assert!(e.contains("without its"), "{e}");
        let e = err("after = [{ hvctl = [] }]\n");
        assert!(e.contains("hvctl needs its arguments"), "{e}");
        let e = err(
            "disks = [{ name = 'a', mib = 1 }, { name = 'b', mib = 1 }, { name = 'c', mib = 1 }, \
             { name = 'd', mib = 1 }]\n",
        );
        assert!(e.contains("4 disks, at most 3"), "{e}");
        let e = err("disks = [{ name = 'a', mib = 1 }, { name = 'a', mib = 2 }]\n");
        assert!(e.contains("disk 'a' is listed twice"), "{e}");
        let e = err("disks = [{ name = 'a/b', mib = 1 }]\n");
        assert!(e.contains("disk name 'a/b'"), "{e}");
        let e = err("disks = [{ name = 'a', mib = 0 }]\n");
        assert!(e.contains("mib = 0 must be 1..=8063"), "{e}");
        assert!(err("disks = [{ name = 'a', mib = 8064 }]\n").contains("mib = 8064"));
        assert!(iso("disks = [{ name = 'a', mib = 8063 }]\n").is_ok());
        let e = err("disks = [{ name = 'a', mib = 1, size = 2 }]\n");
        assert!(e.contains("unknown field `size`"), "{e}");
        let e = err("kill_on = '('\n");
        assert!(e.contains("bad kill_on '('"), "{e}");
        let e = err("[[boots]]\nexpect = ['(']\n");
        assert!(e.contains("bad boot 2 pattern '('"), "{e}");
        let e = err("[[boots]]\nexpect = []\nreject = []\n");
        assert!(e.contains("unknown field `reject`"), "{e}");
        let e = err("[[boots]]\nexpect = []\ntimeout_s = 0\n");
        assert!(e.contains("boot 2: timeout_s must be positive"), "{e}");
        // Disks sit beside the ISO's CD-ROM, on the BIOS machine.
        let kernel = "description = 't'\nemulator = 'qemu'\ntimeout_s = 9\nexpect = []\n\
                      disks = [{ name = 'a', mib = 1 }]\n";
        let e = parse("k", kernel).unwrap_err();
        assert_eq!(e, "k: disks need boot = 'iso' (they sit beside its CD-ROM)");
        let uefi = "description = 't'\nemulator = 'qemu'\nboot = 'iso'\nfirmware = 'uefi'\n\
                    timeout_s = 9\nexpect = []\ndisks = [{ name = 'a', mib = 1 }]\n";
        assert!(parse("u", uefi).unwrap_err().contains("firmware = 'bios'"));
        let kernel_boots = "description = 't'\nemulator = 'qemu'\ntimeout_s = 9\nexpect = []\n\
                            [[boots]]\nmodules = ['hello']\nexpect = []\n";
        assert!(
            parse("k", kernel_boots)
                .unwrap_err()
                .contains("boot 2: modules need boot = 'iso'")
        );
        let run = "description = 't'\nemulator = 'xtask-run'\ntimeout_s = 9\nexpect = []\n\
                   [[boots]]\nexpect = []\n";
        assert!(
            parse("r", run)
                .unwrap_err()
                .contains("no modules, boot, firmware, append, disks")
        );
    }

    #[test]
    fn disk_names_in_hvctl_arguments_become_image_paths() {
        let paths: std::collections::BTreeMap<String, PathBuf> = [
            ("d0".to_string(), PathBuf::from("/w/disks/d0.img")),
            ("d1".to_string(), PathBuf::from("/w/disks/d1.img")),
        ]
        .into();
        assert_eq!(substitute("{d0}", &paths).unwrap(), "/w/disks/d0.img");
        assert_eq!(
            substitute("--disk={d1}@2,{d0}", &paths).unwrap(),
            "--disk=/w/disks/d1.img@2,/w/disks/d0.img"
        );
        assert_eq!(substitute("check", &paths).unwrap(), "check");
        let e = substitute("{D0}", &paths).unwrap_err();
        assert!(e.contains("no disk named 'D0' (disks: d0, d1)"), "{e}");
        let e = substitute("{d0}", &Default::default()).unwrap_err();
        assert!(e.contains("(disks: none)"), "{e}");
    }

    #[test]
    fn a_power_cut_passes_only_if_every_pattern_came_before_it() {
        let re = |p: &str| Regex::new(p).unwrap();
        let expect = [re("one"), re("two")];
        let kill = re("cut");
        assert!(killed_verdict(&kill, &expect, "one two", false).is_none());
        assert_eq!(
            killed_verdict(&kill, &expect, "one two cut three", false),
            Some(Ok(()))
        );
        // A pattern seen only after the cut does not count, in order or not.
        let e = killed_verdict(&kill, &expect, "one cut two", false)
            .unwrap()
            .unwrap_err();
        assert!(
            e.contains("power cut at /cut/ before /two/ appeared (1 of 2 patterns matched)"),
            "{e}"
        );
        assert!(matches!(
            killed_verdict(&kill, &expect, "one cut two", true),
            Some(Err(_))
        ));
        // Out of order: fails in order, passes unordered.
        assert!(matches!(
            killed_verdict(&kill, &expect, "two one cut", false),
            Some(Err(_))
        ));
        assert_eq!(
            killed_verdict(&kill, &expect, "two one cut", true),
            Some(Ok(()))
        );
        // The output counts up to the end of the cut's match, which may itself be expected.
        let expect = [re("one"), re("cut")];
        assert_eq!(
            killed_verdict(&kill, &expect, "one cut here", false),
            Some(Ok(()))
        );
        let expect = [re("one"), re("cut here")];
        assert!(matches!(
            killed_verdict(&kill, &expect, "one cut here", false),
            Some(Err(_))
        ));
    }

    #[test]
    fn every_scenario_file_loads() {
        let all = load_all().unwrap();
        assert!(all.len() > 10, "{} scenarios", all.len());
    }

    fn rates(reference: Option<&str>, expect: &[(&str, f64)], at_most: &[(&str, f64)]) -> Rates {
        Rates {
            regex: r"\[dom(\d+)\] worker: window (\d+): (\d+) units in (\d+) us".into(),
            skip: 1,
            count: 2,
            reference: reference.map(String::from),
            expect: expect.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            tolerance: 0.05,
            at_most: at_most.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
        }
    }

    const OUT: &str = "[dom1] worker: window 2: 999 units in 1000 us
[dom2] worker: window 2: 1 units in 1000 us
[dom3] worker: window 2: 1 units in 1000 us
[dom1] worker: window 3: 100 units in 1000 us
[dom2] worker: window 3: 200 units in 1000 us
[dom3] worker: window 3: 400 units in 1000 us
[dom1] worker: window 4: 100 units in 1000 us
[dom2] worker: window 4: 200 units in 1000 us
[dom3] worker: window 4: 410 units in 1000 us
";

    #[test]
    fn shares_within_tolerance_pass_and_outside_fail() {
        let r = rates(
            None,
            &[("1", 1.0 / 7.0), ("2", 2.0 / 7.0), ("3", 4.0 / 7.0)],
            &[],
        );
        let ok = r.judge(OUT).unwrap();
        assert!(ok.contains("1: 0.14"), "{ok}");
        // Window 2 (skipped) does not count: with it key 1 would be far off.
        let r = rates(None, &[("1", 0.25)], &[]);
        let e = r.judge(OUT).unwrap_err();
        assert!(e.contains("1 is 0.1418, not within 5 % of 0.2500"), "{e}");
    }

    #[test]
    fn ratio_to_a_reference_with_a_ceiling() {
        let r = rates(Some("3"), &[("1", 0.25)], &[("1", 0.25)]);
        assert!(r.judge(OUT).is_ok());
        let r = rates(Some("3"), &[], &[("2", 0.25)]);
        let e = r.judge(OUT).unwrap_err();
        assert!(e.contains("2 is 0.4938, more than 0.2500"), "{e}");
    }

    #[test]
    fn missing_windows_or_keys_fail() {
        let r = rates(None, &[("4", 0.1)], &[]);
        assert!(r.judge(OUT).unwrap_err().contains("no figure for key 4"));
        let partial = OUT.replace("[dom2] worker: window 4: 200 units in 1000 us\n", "");
        let r = rates(None, &[("2", 0.28)], &[]);
        let e = r.judge(&partial).unwrap_err();
        assert!(
            e.contains("1 windows reported by every key after skipping 1, 2 needed"),
            "{e}"
        );
    }
}
