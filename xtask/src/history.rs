//! Benchmark history: every figure a `cargo xtask bench ...` measures is appended, with the
//! commit and the date, to `target/bench/results.jsonl` (one JSON object per line), and printed
//! beside the previous figure of the same benchmark on this machine and the ratio between them.
//! The file lives under `target/`, so "this machine" means this checkout's build folder.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::root;

/// Which way is better, for reading a ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// One measured figure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// The benchmark (`vmcall`, `boot`, `virtqueue`, `volume`).
    pub bench: String,
    /// What was measured, unique within the benchmark.
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub better: Better,
    /// The peer's figure for the same thing, measured in the same run where `peer_same_run`.
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(default)]
    pub peer_value: Option<f64>,
    #[serde(default)]
    pub peer_same_run: bool,
}

impl Figure {
    pub fn new(bench: &str, name: &str, value: f64, unit: &str, better: Better) -> Self {
        Figure {
            bench: bench.into(),
            name: name.into(),
            value,
            unit: unit.into(),
            better,
            peer: None,
            peer_value: None,
            peer_same_run: false,
        }
    }

    /// The peer's figure, measured in the same run.
    pub fn peer(mut self, who: &str, value: f64) -> Self {
        self.peer = Some(who.into());
        self.peer_value = Some(value);
        self.peer_same_run = true;
        self
    }

    /// A peer's figure measured earlier (documented), not in this run.
    pub fn peer_recorded(self, who: &str, value: f64) -> Self {
        self.peer(who, value).same_run(false)
    }

    fn same_run(mut self, yes: bool) -> Self {
        self.peer_same_run = yes;
        self
    }
}

/// One line of the results file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub commit: String,
    pub date: String,
    #[serde(flatten)]
    pub figure: Figure,
}

pub fn results_file() -> PathBuf {
    root().join("target").join("bench").join("results.jsonl")
}

/// The records in `text` (lines that do not parse are skipped: a file from an older xtask).
pub fn parse(text: &str) -> Vec<Record> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The most recent earlier figure for the same benchmark and name.
pub fn previous<'a>(history: &'a [Record], f: &Figure) -> Option<&'a Record> {
    history
        .iter()
        .rev()
        .find(|r| r.figure.bench == f.bench && r.figure.name == f.name && r.figure.unit == f.unit)
}

/// `value / base`, or None when the base is zero.
pub fn ratio(value: f64, base: f64) -> Option<f64> {
    (base != 0.0).then(|| value / base)
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// One printed line for `f`: value, peer and ratio, previous figure and ratio.
pub fn line(f: &Figure, prev: Option<&Record>) -> String {
    let mut s = format!("{:<44} {:>12} {:<12}", f.name, num(f.value), f.unit);
    match (&f.peer, f.peer_value) {
        (Some(who), Some(pv)) => {
            let r = ratio(f.value, pv).map_or("-".into(), |r| format!("{r:.2}"));
            let when = if f.peer_same_run { "" } else { ", recorded" };
            s.push_str(&format!(" | peer {who}{when}: {} (ratio {r})", num(pv)));
        }
        _ => s.push_str(" | no peer"),
    }
    match prev {
        Some(p) => {
            let r = ratio(f.value, p.figure.value).map_or("-".into(), |r| format!("{r:.2}"));
            s.push_str(&format!(
                " | previous {} ({} {}) ratio {r}",
                num(p.figure.value),
                p.commit,
                p.date.get(..10).unwrap_or(&p.date)
            ));
        }
        None => s.push_str(" | previous: none on this machine"),
    }
    s
}

/// Prints `figures` beside their previous figures, then appends them to the results file.
pub fn record(figures: &[Figure]) -> Result<(), String> {
    record_in(&results_file(), figures, &commit(), &now_utc())
}

pub fn record_in(path: &Path, figures: &[Figure], commit: &str, date: &str) -> Result<(), String> {
    let history = std::fs::read_to_string(path)
        .map(|t| parse(&t))
        .unwrap_or_default();
    for f in figures {
        println!("  {}", line(f, previous(&history, f)));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    for f in figures {
        let r = Record {
            commit: commit.into(),
            date: date.into(),
            figure: f.clone(),
        };
        let text = serde_json::to_string(&r).map_err(|e| e.to_string())?;
        writeln!(out, "{text}").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The short commit id, with `+dirty` when the tree has uncommitted changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let id = git(&["rev-parse", "--short=10", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{id}+dirty") } else { id }
}

/// The date and time now, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil(secs)
}

/// Seconds since the Unix epoch as a UTC date and time (proleptic Gregorian calendar).
pub fn civil(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The summary table of `bench all`: one line per figure.
pub fn summary(figures: &[Figure]) -> String {
    let mut s = String::from("summary (bench all)\n");
    let mut last = "";
    for f in figures {
        if f.bench != last {
            s.push_str(&format!("[{}]\n", f.bench));
            last = &f.bench;
        }
        s.push_str(&format!(
            "  {}\n",
            line(f, None).split(" | previous").next().unwrap_or("")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), "1970-01-01T00:00:00Z");
        assert_eq!(civil(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(civil(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn records_append_and_the_previous_figure_is_found() {
        let dir = std::env::temp_dir().join(format!("xtask-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("results.jsonl");
        let a = Figure::new("vmcall", "round trip", 263.0, "instructions", Better::Lower)
            .peer_recorded("Xen 4.17", 888.0);
        record_in(
            &path,
            std::slice::from_ref(&a),
            "aaaa",
            "2026-11-01T00:00:00Z",
        )
        .unwrap();
        let mut b = a.clone();
        b.value = 161.0;
        record_in(&path, &[b.clone()], "bbbb", "2026-12-01T00:00:00Z").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let h = parse(&text);
        assert_eq!(h.len(), 2);
        let p = previous(&h[..1], &b).unwrap();
        assert_eq!(p.commit, "aaaa");
        assert_eq!(p.figure.value, 263.0);
        let l = line(&b, Some(p));
        assert!(
            l.contains("previous 263 (aaaa 2026-11-01) ratio 0.61"),
            "{l}"
        );
        assert!(
            l.contains("peer Xen 4.17, recorded: 888 (ratio 0.18)"),
            "{l}"
        );
        // Another benchmark's figure of the same name is not "previous".
        let other = Figure::new("boot", "round trip", 1.0, "instructions", Better::Lower);
        assert!(previous(&h, &other).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let h = parse("not json\n{\"commit\":\"x\"}\n");
        assert!(h.is_empty());
    }
}
