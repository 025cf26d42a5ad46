//! Helpers for the CLI tests that run real `hvctl` processes: pools of image files, running
//! commands, `serve` on an ephemeral port, a small NBD client, and directory fingerprints.
#![allow(dead_code)]
#![allow(clippy::cast_possible_truncation)] // Test sizes are small.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

pub fn hvctl_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hvctl"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run hvctl")
}

pub fn hvctl(args: &[&str]) -> Output {
    hvctl_env(args, &[])
}

pub fn ok(args: &[&str]) -> String {
    let o = hvctl(args);
    assert!(
        o.status.success(),
        "hvctl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr.
pub fn err(args: &[&str]) -> String {
    let o = hvctl(args);
    assert!(
        !o.status.success(),
        "hvctl {args:?} should fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A pool of three 64 MiB image files (a, b: tier fast; c: tier slow) in its own directory.
pub struct Pool {
    pub dir: PathBuf,
    pub disks: Vec<String>,
}

impl Pool {
    /// Three 64 MiB images with the default 8 MiB metadata copies.
    pub fn new(tag: &str) -> Self {
        Self::sized(tag, "64M", "8M")
    }

    /// Three images of `disk_size` with metadata copies of `metadata_size`.
    pub fn sized(tag: &str, disk_size: &str, metadata_size: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hvctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disks: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|n| dir.join(format!("{n}.img")).to_string_lossy().into_owned())
            .collect();
        let mut args = vec![
            "volume",
            "create-pool",
            "--disk-size",
            disk_size,
            "--metadata-size",
            metadata_size,
            "--extent",
            "256K",
        ];
        let with_tier: Vec<String> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| format!("{d}:{}", if i == 2 { "slow" } else { "fast" }))
            .collect();
        for d in &with_tier {
            args.extend(["-d", d.as_str()]);
        }
        ok(&args);
        Self { dir, disks }
    }

    pub fn args<'a>(&'a self, rest: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["volume"];
        for d in &self.disks {
            a.extend(["-d", d.as_str()]);
        }
        a.extend(rest);
        a
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every file of `dir` (including hidden ones) and its bytes.
pub fn fingerprint(dir: &Path) -> Snapshot {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let bytes = std::fs::read(e.path()).unwrap_or_default();
        m.insert(e.file_name().to_string_lossy().into_owned(), bytes);
    }
    Snapshot(m)
}

/// What [`fingerprint`] saw; compares by names and bytes, shows only names and sizes.
#[derive(PartialEq, Eq)]
pub struct Snapshot(BTreeMap<String, Vec<u8>>);

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, v.len())))
            .finish()
    }
}

/// A running `hvctl volume serve`: its process, port, and what it printed on stderr so far.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `hvctl volume -d ... serve ARGS --port 0` and waits for its address.
    pub fn start(p: &Pool, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut a = p.args(&["serve", "--port", "0"]);
        a.extend(args);
        let mut c = Command::new(env!("CARGO_BIN_EXE_hvctl"));
        c.args(&a).stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let port = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("serve ended: {}", log.lock().unwrap()))
                .unwrap();
            log.lock().unwrap().push_str(&line);
            log.lock().unwrap().push('\n');
            if let Some(rest) = line.split("nbd://127.0.0.1:").nth(1) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
        };
        // Wait until the control socket line (printed after the exports) is seen, then keep
        // draining so the server never blocks on a full pipe.
        let l2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut g = l2.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let s = Server { child, port, log };
        for _ in 0..200 {
            if s.log().contains("control socket") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        s
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A test that failed half-way must not leave its server running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connects and reads the server's greeting.
pub fn nbd_connect(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to hvctl serve");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// One option reply: (type, data).
fn read_opt_reply(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (kind, d)
}

/// `NBD_OPT_LIST` on a fresh connection: the export names.
pub fn nbd_list(port: u16) -> Vec<String> {
    let mut s = nbd_connect(port);
    send_opt(&mut s, 3, &[]);
    let mut names = Vec::new();
    loop {
        let (kind, d) = read_opt_reply(&mut s);
        if kind == 1 {
            break;
        }
        assert_eq!(kind, 2, "REP_SERVER");
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8_lossy(&d[4..4 + n]).into_owned());
    }
    send_opt(&mut s, 2, &[]);
    let _ = read_opt_reply(&mut s);
    names
}

/// `NBD_OPT_GO` for `name`: the export size, or `None` if the server refused the name.
pub fn nbd_go(s: &mut TcpStream, name: &str) -> Option<u64> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_opt(s, 7, &d);
    let mut size = None;
    loop {
        let (kind, d) = read_opt_reply(s);
        match kind {
            1 => return size,
            3 => size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap())),
            k if k & 0x8000_0000 != 0 => return None,
            k => panic!("unexpected option reply {k:#x}"),
        }
    }
}

/// One request; returns (error, data read).
pub fn nbd_request(
    s: &mut TcpStream,
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) -> std::io::Result<(u32, Vec<u8>)> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r)?;
    if cmd == 2 {
        return Ok((0, Vec::new()));
    }
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
    let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), handle);
    let mut out = vec![
        0u8;
        if cmd == 0 && err == 0 {
            len as usize
        } else {
            0
        }
    ];
    s.read_exact(&mut out)?;
    Ok((err, out))
}

/// qemu-io must be installed here: a test that needs it fails (not skips) without it.
pub fn require_qemu_io() {
    let found = Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "qemu-io is required (Debian package qemu-utils; cargo xtask test installs it)"
    );
}
