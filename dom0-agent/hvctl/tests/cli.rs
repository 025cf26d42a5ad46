//! End-to-end tests of `hvctl volume ...` on image files, including an NBD session with a
//! small client written here (the qemu-io system test is `tests/nbd_system.sh`).
#![allow(clippy::cast_possible_truncation)] // Test sizes are small.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hvctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(args)
        .output()
        .expect("run hvctl")
}

fn ok(args: &[&str]) -> String {
    let o = hvctl(args);
    assert!(
        o.status.success(),
        "hvctl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(args: &[&str]) -> String {
    let o = hvctl(args);
    assert!(!o.status.success(), "hvctl {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Pool {
    dir: PathBuf,
    disks: Vec<String>,
}

impl Pool {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hvctl-cli-{tag}-{}", std::process::id()));
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
            "64M",
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

    fn args<'a>(&'a self, rest: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["volume"];
        for d in &self.disks {
            a.extend(["-d", d.as_str()]);
        }
        a.extend(rest);
        a
    }

    fn images(&self) -> Vec<Vec<u8>> {
        self.disks
            .iter()
            .map(|d| std::fs::read(d).unwrap())
            .collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn create_list_resize_snapshot_rollback_remove() {
    let p = Pool::new("life");
    ok(&p.args(&["create", "m", "8M", "--layout", "mirror"]));
    ok(&p.args(&[
        "create",
        "s",
        "8M",
        "--layout",
        "stripe",
        "--columns",
        "2",
        "--stripe-unit",
        "16K",
    ]));
    ok(&p.args(&["create-thin-pool", "tp", "16M"]));
    ok(&p.args(&["create", "t", "1G", "--thin-pool", "tp"]));
    ok(&p.args(&["snapshot", "t", "t-snap"]));
    ok(&p.args(&["snapshot", "s", "s-full", "--full"]));
    ok(&p.args(&["snapshot", "m", "m-so", "--thin-pool", "tp"]));
    ok(&p.args(&["resize", "m", "12M"]));
    ok(&p.args(&["relayout", "s", "--layout", "concat", "--tier", "slow"]));
    ok(&p.args(&["rollback", "s", "s-full"]));
    ok(&p.args(&["remove", "t-snap"]));
    let list = ok(&p.args(&["list"]));
    for want in [
        "mirror 2",
        "12M",
        "thin in tp",
        "s-full",
        "concat",
        "thin snapshot of m",
    ] {
        assert!(list.contains(want), "list lacks {want}:\n{list}");
    }
    assert!(!list.contains("t-snap"));
    ok(&p.args(&["check", "--deep"]));
    ok(&p.args(&["repair"]));
}

#[test]
fn bad_arguments_are_explained_and_change_nothing() {
    let p = Pool::new("bad");
    ok(&p.args(&["create", "v", "4M"]));
    let before = p.images();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", "v", "4M"], "already exists"),
        (vec!["create", "w", "1000"], "multiple of 4K"),
        (vec!["create", "w", "4Q"], "unknown unit"),
        (vec!["create", "w", "100G"], "not enough space"),
        (
            vec!["create", "w", "4M", "--layout", "mirror", "--legs", "5"],
            "2 or 3 legs",
        ),
        (
            vec![
                "create",
                "w",
                "4M",
                "--layout",
                "stripe-mirror",
                "--columns",
                "2",
                "--legs",
                "2",
            ],
            "not enough space",
        ),
        (vec!["create", "w", "4M", "--tier", "gold"], "tier 'gold'"),
        (vec!["resize", "nope", "4M"], "no volume named 'nope'"),
        (vec!["snapshot", "v", "vs"], "needs a thin pool"),
        (
            vec!["snapshot", "v", "vs", "--thin-pool", "nope"],
            "no volume named 'nope'",
        ),
        (vec!["rollback", "v", "v"], "itself"),
        (vec!["mirror-remove", "v", "0"], "legs"),
    ];
    for (args, want) in cases {
        let e = err(&p.args(&args));
        assert!(e.contains(want), "{args:?}: expected '{want}' in: {e}");
    }
    assert!(p.images() == before, "a refused command changed the disks");
    let e = err(&["volume", "list"]);
    assert!(e.contains("-d/--disk"), "{e}");
    let e = err(&["volume", "-d", "/nonexistent/x.img", "list"]);
    assert!(e.contains("/nonexistent/x.img"), "{e}");
}

#[test]
fn import_export_raw_and_qcow2_roundtrip() {
    let p = Pool::new("io");
    ok(&p.args(&["create", "v", "4M", "--layout", "mirror"]));
    let raw = p.dir.join("in.raw");
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 5000)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    ok(&p.args(&["import", "v", raw.to_str().unwrap()]));
    let out = p.dir.join("out.raw");
    ok(&p.args(&["export", "v", out.to_str().unwrap()]));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(&got[..data.len()], &data[..]);
    assert!(got[data.len()..].iter().all(|b| *b == 0));
    let q = p.dir.join("out.qcow2");
    ok(&p.args(&["export", "v", q.to_str().unwrap(), "--format", "qcow2"]));
    ok(&p.args(&["create-thin-pool", "tp", "8M"]));
    ok(&p.args(&["create", "t", "64M", "--thin-pool", "tp"]));
    ok(&p.args(&["import", "t", q.to_str().unwrap()]));
    let out2 = p.dir.join("out2.raw");
    ok(&p.args(&["export", "t", out2.to_str().unwrap()]));
    let got2 = std::fs::read(&out2).unwrap();
    assert_eq!(&got2[..data.len()], &data[..]);
    let big = p.dir.join("big.raw");
    std::fs::write(&big, vec![1u8; 5 << 20]).unwrap();
    let e = err(&p.args(&["import", "v", big.to_str().unwrap()]));
    assert!(e.contains("resize it first"), "{e}");
    let list = ok(&p.args(&["list"]));
    assert!(list.contains("thin in tp"));
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        let c = Command::new("qemu-img")
            .args(["check", q.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            c.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&c.stdout)
        );
        let conv = p.dir.join("conv.raw");
        let c = Command::new("qemu-img")
            .args([
                "convert",
                "-O",
                "raw",
                q.to_str().unwrap(),
                conv.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(c.success());
        assert_eq!(&std::fs::read(&conv).unwrap()[..data.len()], &data[..]);
    }
}

fn be32(s: &mut TcpStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

fn nbd_request(
    s: &mut TcpStream,
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) -> (u32, Vec<u8>) {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r).unwrap();
    if cmd == 2 {
        return (0, Vec::new());
    }
    assert_eq!(be32(s), 0x6744_6698);
    let err = be32(s);
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h), handle);
    let mut out = vec![
        0u8;
        if cmd == 0 && err == 0 {
            len as usize
        } else {
            0
        }
    ];
    s.read_exact(&mut out).unwrap();
    (err, out)
}

/// Starts `hvctl volume serve` on an ephemeral port; returns the child and the port it printed.
fn serve(p: &Pool, vol: &str, clients: &str) -> (std::process::Child, u16) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .args(p.args(&["serve", vol, "--port", "0", "--clients", clients]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(rest) = line.split("nbd://127.0.0.1:").nth(1) {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining the server's messages so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

fn nbd_session(port: u16, name: &str, f: impl FnOnce(&mut TcpStream, u64)) {
    let mut s = None;
    for _ in 0..200 {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", port)) {
            s = Some(c);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let mut s = s.expect("connect to hvctl serve");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    s.write_all(&opt).unwrap();
    let mut sz = [0u8; 10];
    s.read_exact(&mut sz).unwrap();
    let size = u64::from_be_bytes(sz[..8].try_into().unwrap());
    f(&mut s, size);
    nbd_request(&mut s, 2, 99, 0, 0, &[]);
}

#[test]
fn nbd_serves_reads_writes_and_flushes() {
    let p = Pool::new("nbd");
    ok(&p.args(&["create-thin-pool", "tp", "8M"]));
    ok(&p.args(&["create", "t", "32M", "--thin-pool", "tp"]));
    let (mut child, port) = serve(&p, "t", "2");
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    nbd_session(port, "t", |s, size| {
        assert_eq!(size, 32 << 20);
        assert_eq!(
            nbd_request(s, 1, 1, 12_345, payload.len() as u32, &payload).0,
            0
        );
        assert_eq!(nbd_request(s, 3, 2, 0, 0, &[]).0, 0);
        let (e, back) = nbd_request(s, 0, 3, 12_345, payload.len() as u32, &[]);
        assert_eq!(e, 0);
        assert_eq!(back, payload);
        // Out of range: EINVAL, and the session goes on.
        assert_eq!(nbd_request(s, 0, 4, size - 10, 4096, &[]).0, 22);
        // Thin pool full: ENOSPC, not corruption.
        let big = vec![7u8; 4 << 20];
        let (e1, _) = nbd_request(s, 1, 5, 8 << 20, big.len() as u32, &big);
        let (e2, _) = nbd_request(s, 1, 6, 16 << 20, big.len() as u32, &big);
        assert!(e1 == 28 || e2 == 28, "expected ENOSPC ({e1}, {e2})");
    });
    nbd_session(port, "t", |s, _| {
        let (e, back) = nbd_request(s, 0, 7, 12_345, payload.len() as u32, &[]);
        assert_eq!(e, 0);
        assert_eq!(back, payload);
        // Write zeroes over the first 4 MiB (releases whole chunks), trim the rest.
        assert_eq!(nbd_request(s, 6, 8, 0, 4 << 20, &[]).0, 0);
        assert_eq!(nbd_request(s, 4, 9, 4 << 20, 28 << 20, &[]).0, 0);
        assert_eq!(nbd_request(s, 3, 10, 0, 0, &[]).0, 0);
        let (e, back) = nbd_request(s, 0, 11, 12_345, payload.len() as u32, &[]);
        assert_eq!(e, 0);
        assert!(back.iter().all(|b| *b == 0));
    });
    assert!(child.wait().unwrap().success());
    let list = ok(&p.args(&["list"]));
    let used = list
        .lines()
        .find(|l| l.starts_with("t "))
        .unwrap()
        .to_string();
    assert!(used.contains(" 0K "), "all chunks released: {used}");
    ok(&p.args(&["check", "--deep"]));
    let _ = Path::new(&p.dir);
}

/// Runs `tests/nbd_system.sh` (qemu-io against `hvctl volume serve`, SIGKILL, reopen, verify)
/// when qemu-io is installed; the script itself says SKIP otherwise. `cargo xtask test`
/// installs qemu-io and sets `HV_REQUIRE_QEMU_IO=1`, so there a skip is a failure.
#[test]
fn nbd_system_script_with_qemu_io() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nbd_system.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_hvctl"))
        .output()
        .expect("run bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "nbd_system.sh failed:\n{text}");
    if std::env::var_os("HV_REQUIRE_QEMU_IO").is_some() {
        assert!(
            text.contains("PASS"),
            "the NBD system test must run here:\n{text}"
        );
    } else {
        assert!(text.contains("PASS") || text.contains("SKIP"), "{text}");
    }
}

#[test]
fn one_image_given_twice_is_one_disk_with_two_paths() {
    let p = Pool::new("mp");
    ok(&p.args(&["create", "v", "4M", "--layout", "mirror"]));
    let prio = format!("{}@5", p.disks[0]);
    let mut args = p.args(&[]);
    args.extend(["-d", prio.as_str(), "--path-policy", "priority", "list"]);
    let o = hvctl(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("2 paths"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("mirror 2"));
}

#[test]
fn check_reports_a_damaged_metadata_copy_and_repair_rewrites_it() {
    use std::os::unix::fs::FileExt;
    let p = Pool::new("repair");
    ok(&p.args(&["create", "v", "4M", "--layout", "mirror"]));
    // Damage slot A of disk b (metadata slot A starts at block 2).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p.disks[1])
        .unwrap();
    f.write_all_at(&[0xffu8; 512], 2 * 4096 + 100).unwrap();
    drop(f);
    let o = hvctl(&p.args(&["check"]));
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("damaged or old; needs rewriting"), "{err}");
    let before = std::fs::read(&p.disks[1]).unwrap();
    assert_eq!(
        before,
        std::fs::read(&p.disks[1]).unwrap(),
        "check is read-only"
    );
    ok(&p.args(&["repair"]));
    let o = hvctl(&p.args(&["check"]));
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("damaged"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("consistent"));
}

#[test]
fn relayout_progresses_online_while_serving_nbd() {
    let p = Pool::new("online");
    ok(&p.args(&["create", "v", "8M"]));
    let raw = p.dir.join("in.raw");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    ok(&p.args(&["import", "v", raw.to_str().unwrap()]));
    ok(&p.args(&["relayout", "v", "--layout", "mirror", "--no-wait"]));
    assert!(ok(&p.args(&["list"])).contains("relayout"));
    let (mut child, port) = serve(&p, "v", "1");
    nbd_session(port, "v", |s, _| {
        // Reads during the relayout see the data; idle time lets the relayout finish.
        let (e, back) = nbd_request(s, 0, 1, 1 << 20, 65536, &[]);
        assert_eq!(e, 0);
        assert_eq!(back, data[1 << 20..(1 << 20) + 65536]);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let payload = vec![0x5au8; 8192];
        assert_eq!(nbd_request(s, 1, 2, 4096, 8192, &payload).0, 0);
        assert_eq!(nbd_request(s, 3, 3, 0, 0, &[]).0, 0);
    });
    assert!(child.wait().unwrap().success());
    let list = ok(&p.args(&["list"]));
    assert!(
        list.contains("mirror 2") && !list.contains("relayout"),
        "{list}"
    );
    ok(&p.args(&["check", "--deep"]));
    let out = p.dir.join("out.raw");
    ok(&p.args(&["export", "v", out.to_str().unwrap()]));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(&got[4096..4096 + 8192], &[0x5au8; 8192][..]);
    assert_eq!(&got[..4096], &data[..4096]);
    assert_eq!(&got[12288..], &data[12288..]);
}
