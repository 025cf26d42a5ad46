//! Declarative system tests: each `tests/scenarios/*.toml` names the emulator, how to boot,
//! CPUs, memory, the hypervisor's command line, the console input, the patterns that must
//! appear (in order), patterns that must not, and a timeout. The runner boots it, types the
//! input at each prompt, and judges the serial output.

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
    /// Lines typed at successive prompts; `@wait MS` pauses instead, and `@until REGEX` holds
    /// the next line until the output so far matches (neither consumes a prompt).
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
    let mut s: Scenario = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    s.name = path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if s.via_xtask_run() {
        if !s.modules.is_empty()
            || s.boot != "kernel"
            || s.firmware != "bios"
            || !s.append.is_empty()
        {
            return Err(format!(
                "{}: emulator 'xtask-run' runs `cargo xtask run` as a user would: no modules, boot, firmware or append",
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
    for r in s.expect.iter().chain(&s.reject).chain(&s.once) {
        Regex::new(r).map_err(|e| format!("{}: bad pattern '{r}': {e}", s.name))?;
    }
    if let Some(r) = &s.rates {
        Regex::new(&r.regex).map_err(|e| format!("{}: bad rates regex: {e}", s.name))?;
    }
    Ok(s)
}

impl Scenario {
    /// `emulator = "xtask-run"`: the scenario is `cargo xtask run` itself, on the machine it
    /// chooses, with the input lines on its stdin, judged on everything it prints.
    pub fn via_xtask_run(&self) -> bool {
        self.emulator == "xtask-run"
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
    let log = work.join("serial.log");
    let t0 = Instant::now();
    let result = run_inner(s, &work, &log, on);
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

fn run_inner(s: &Scenario, work: &Path, log: &Path, on: On) -> Result<String, String> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
    if s.via_xtask_run() {
        return run_xtask(s, log);
    }
    let emulator = match on {
        On::Named => s.emulator()?,
        On::Kvm => Emulator::Qemu,
    };
    let boot = if s.boot == "iso" {
        let modules = s
            .modules
            .iter()
            .map(|m| build::guest_module(m))
            .collect::<Result<Vec<_>, _>>()?;
        let o = ImageOptions {
            append: s.append.clone(),
            modules,
        };
        Boot::Iso(build::image_named(
            &o,
            &format!(
                "scenario-{}",
                work.file_name().unwrap_or_default().to_string_lossy()
            ),
        )?)
    } else {
        Boot::Kernel {
            elf: build::build_kernel()?,
            append: s.append.clone(),
        }
    };
    let m = Machine {
        emulator,
        cpus: s.cpus,
        mem_mib: s.memory_mib,
        boot,
        work_dir: work.to_path_buf(),
        deterministic: true,
        uefi: s.firmware == "uefi",
        kvm: on == On::Kvm,
    };
    let mut running = emu::start(&m)?;
    running
        .serial
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let expect = compile(&s.expect);
    let reject = compile(&s.reject);
    let once = compile(&s.once);
    let deadline = Instant::now() + Duration::from_secs(s.timeout_s);
    let mut raw = Vec::new();
    let mut next_expect = 0usize;
    let mut pos = 0usize;
    let mut sent = 0usize;
    let mut typed = 0usize;
    let mut paused_until: Option<Instant> = None;
    let mut done_at: Option<Instant> = None;
    let mut buf = [0u8; 8192];
    let verdict = loop {
        match read_serial(&mut running, &mut buf, &mut raw, log) {
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
        if s.unordered {
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
        if sent < s.input.len() && prompts > typed && !paused {
            let line = &s.input[sent];
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
            } else {
                use std::io::Write;
                running
                    .serial
                    .write_all(format!("{line}\r").as_bytes())
                    .map_err(|e| format!("serial write: {e}"))?;
                typed += 1;
                true
            };
            if advance {
                sent += 1;
            }
        }
        if next_expect == expect.len() && sent == s.input.len() && done_at.is_none() {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|t| t.elapsed() >= Duration::from_millis(s.settle_ms)) {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(match expect.get(next_expect) {
                Some(r) => format!(
                    "timed out after {} s waiting for /{r}/ (input sent: {sent} of {})",
                    s.timeout_s,
                    s.input.len()
                ),
                None => format!(
                    "timed out after {} s sending input ({sent} of {} sent)",
                    s.timeout_s,
                    s.input.len()
                ),
            });
        }
        if running.exited() && done_at.is_none() {
            break Err("the emulator exited".to_string());
        }
    };
    let mut rates_report = String::new();
    let verdict = match (verdict, &s.rates) {
        (Ok(()), Some(r)) => r
            .judge(&String::from_utf8_lossy(&raw))
            .map(|figures| rates_report = format!("; rates {figures}")),
        (v, _) => v,
    };
    // Every scenario that runs guests under VT-x ends with the EPT audit: each live domain's
    // EPT must map exactly its own RAM.
    let verdict = match verdict {
        Ok(()) if emulator == Emulator::Bochs || on == On::Kvm => {
            audit(&mut running, &mut raw, log, &reject)
        }
        other => other,
    };
    running.stop();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let _ = std::fs::write(log, &raw);
    match verdict {
        Ok(()) => Ok(format!(
            "{} patterns matched, {} lines typed, EPT audit clean{rates_report}",
            expect.len(),
            sent
        )),
        Err(why) => Err(format!(
            "{why}\n--- last serial output ---\n{}\n---",
            tail(&text, 25)
        )),
    }
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
