//! One server for a whole pool: every volume its own NBD export, many clients at once, idle
//! and handshake timeouts, and admin commands from other `hvctl` processes applied through
//! the running server (its control socket).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Pool, Server, err, hvctl, nbd_connect, nbd_go, nbd_list, nbd_request, ok};

#[test]
fn admin_commands_during_serve_run_through_the_server_and_clients_see_them() {
    let p = Pool::new("srv-admin");
    ok(&p.args(&["create-thin-pool", "tp", "16M"]));
    ok(&p.args(&["create", "t", "8M", "--thin-pool", "tp"]));
    let mut s = Server::start(&p, &["--clients", "7"], &[]);
    assert_eq!(nbd_list(s.port), ["t"], "thin pools are not exports");
    // A second hvctl creates a volume: run by the server, not behind its back.
    let o = hvctl(&p.args(&["create", "w", "4M", "--layout", "mirror"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains(&format!(
            "run by the server holding the pool (process {})",
            s.pid()
        )),
        "{e}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("created w"));
    assert_eq!(nbd_list(s.port), ["t", "w"]);
    // A client of the new export writes; a client of the other one at the same time.
    let mut cw = nbd_connect(s.port);
    assert_eq!(nbd_go(&mut cw, "w"), Some(4 << 20));
    let mut ct = nbd_connect(s.port);
    assert_eq!(nbd_go(&mut ct, "t"), Some(8 << 20));
    let pat = vec![0xc3u8; 65536];
    assert_eq!(nbd_request(&mut cw, 1, 1, 4096, 65536, &pat).unwrap().0, 0);
    assert_eq!(
        nbd_request(&mut ct, 1, 2, 0, 65536, &[0x3cu8; 65536])
            .unwrap()
            .0,
        0
    );
    assert_eq!(nbd_request(&mut cw, 3, 3, 0, 0, &[]).unwrap().0, 0);
    let (e0, back) = nbd_request(&mut cw, 0, 4, 4096, 65536, &[]).unwrap();
    assert_eq!((e0, back), (0, pat.clone()));
    // Listing and checking go through the server too, and see the new volume.
    assert!(ok(&p.args(&["list"])).contains("mirror 2"));
    ok(&p.args(&["check"]));
    // Removing, shrinking or rolling back a volume with clients is refused ...
    let e = err(&p.args(&["remove", "w"]));
    assert!(e.contains("has 1 NBD client"), "{e}");
    let e = err(&p.args(&["resize", "w", "2M"]));
    assert!(e.contains("refusing to shrink"), "{e}");
    ok(&p.args(&["snapshot", "t", "t-snap"]));
    let e = err(&p.args(&["rollback", "t", "t-snap"]));
    assert!(e.contains("refusing to roll back"), "{e}");
    // ... growing is not, and other volumes' clients do not matter.
    ok(&p.args(&["resize", "w", "8M"]));
    ok(&p.args(&["remove", "t-snap"]));
    // Forced removal disconnects the client first.
    ok(&p.args(&["remove", "w", "--force"]));
    let gone = nbd_request(&mut cw, 0, 5, 0, 4096, &[]);
    assert!(
        gone.is_err(),
        "the removed volume's client was disconnected"
    );
    assert_eq!(nbd_list(s.port), ["t"]);
    let mut c = nbd_connect(s.port);
    assert_eq!(nbd_go(&mut c, "w"), None, "a removed export is refused");
    assert_eq!(nbd_go(&mut c, "nope"), None, "an unknown export is refused");
    drop(c);
    nbd_request(&mut ct, 2, 6, 0, 0, &[]).unwrap();
    // The four list connections, the refused ones and the clients: stop when done.
    let start = Instant::now();
    while matches!(s.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10) {
        // Connections that end at once count as clients; the server may be gone meanwhile.
        if std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.child.wait().unwrap().success(), "{}", s.log());
    // After the server: its changes are on disk, the pool is consistent, no socket is left.
    let list = ok(&p.args(&["list"]));
    assert!(!list.lines().any(|l| l.starts_with("w ")), "{list}");
    ok(&p.args(&["check", "--deep"]));
    assert!(
        std::fs::read_dir(&p.dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".sock")),
        "control socket removed"
    );
}

#[test]
fn many_qemu_io_clients_on_several_exports_while_idle_clients_time_out() {
    common::require_qemu_io();
    let p = Pool::new("srv-many");
    ok(&p.args(&["create", "m", "16M", "--layout", "mirror"]));
    ok(&p.args(&["create", "s", "16M", "--layout", "stripe"]));
    ok(&p.args(&["create-thin-pool", "tp", "32M"]));
    ok(&p.args(&["create", "t", "64M", "--thin-pool", "tp"]));
    let s = Server::start(
        &p,
        &[
            "m",
            "s",
            "t",
            "--idle-timeout",
            "1",
            "--handshake-timeout",
            "1",
        ],
        &[],
    );
    assert_eq!(nbd_list(s.port), ["m", "s", "t"]);
    // One connection that never finishes the handshake, one attached and silent.
    let mut stuck = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let mut quiet = nbd_connect(s.port);
    assert!(nbd_go(&mut quiet, "m").is_some());
    let t0 = Instant::now();
    // Nine qemu-io clients at once, three per export, each on its own 1 MiB.
    let url = |v: &str| format!("nbd://127.0.0.1:{}/{v}", s.port);
    let mut kids = Vec::new();
    for v in ["m", "s", "t"] {
        for k in 0..3u32 {
            let off = format!("{}M", 1 + 2 * k);
            let pat = format!("0x{:x}", 0x11 * (k + 1) + if v == "s" { 1 } else { 0 });
            let child = Command::new("qemu-io")
                .args(["-f", "raw", &url(v)])
                .args(["-c", &format!("write -P {pat} {off} 1M")])
                .args(["-c", "flush"])
                .args(["-c", &format!("read -P {pat} {off} 1M")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start qemu-io");
            kids.push((v, k, child));
        }
    }
    for (v, k, child) in kids {
        let o = child.wait_with_output().expect("run qemu-io");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && !text.to_lowercase().contains("fail"),
            "{v}/{k}: {text}"
        );
    }
    // Idle clients did not block anyone, and were disconnected after their timeouts.
    let mut b = [0u8; 1];
    use std::io::Read;
    stuck
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut greeting = [0u8; 18];
    stuck.read_exact(&mut greeting).unwrap();
    assert_eq!(
        stuck.read(&mut b).unwrap_or(0),
        0,
        "handshake timeout closes"
    );
    quiet
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(quiet.read(&mut b).unwrap_or(0), 0, "idle timeout closes");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The server says why (its stderr is read by another thread: give it a moment).
    let said = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        s.log().contains("idle for 1.0s")
    });
    assert!(said, "{}", s.log());
    // An unknown export name is refused to qemu-io.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", &url("nope"), "-c", "read 0 4k"])
        .output()
        .unwrap();
    assert!(
        !o.status.success() || String::from_utf8_lossy(&o.stderr).contains("export"),
        "unknown export accepted"
    );
    drop(s);
    ok(&p.args(&["check", "--deep"]));
    let out = p.path("t.raw");
    ok(&p.args(&["export", "t", &out]));
    let t = std::fs::read(&out).unwrap();
    for (k, want) in [0x11u8, 0x22, 0x33].into_iter().enumerate() {
        let at = (1 + 2 * k) << 20;
        assert!(t[at..at + (1 << 20)].iter().all(|b| *b == want));
    }
}

/// Two qemu-io processes at the same time, on a mirrored and a thin volume: each writes 24
/// MiB in 1 MiB requests (some with FUA), flushes, and reads every pattern back with
/// `read -P`. The server reports that requests of both were in the pool at once (it serves
/// sessions in parallel, not one request after the other); the pool checks clean and the
/// exported images hold the patterns.
#[test]
fn two_qemu_io_clients_on_two_volumes_at_once() {
    common::require_qemu_io();
    let p = Pool::new("srv-two");
    ok(&p.args(&["create", "m", "32M", "--layout", "mirror"]));
    ok(&p.args(&["create-thin-pool", "tp", "48M"]));
    ok(&p.args(&["create", "t", "64M", "--thin-pool", "tp"]));
    // Image files in RAM answer in microseconds: 3 ms per device request, like a disk, so
    // that each request stays in the pool long enough for the other client's to meet it.
    let s = Server::start(&p, &["m", "t"], &[("HVCTL_DISK_DELAY_US", "3000")]);
    let url = |v: &str| format!("nbd://127.0.0.1:{}/{v}", s.port);
    let pat = |v: &str, k: u32| 0x10 + k + if v == "t" { 0x80 } else { 0 };
    let start = Instant::now();
    let kids: Vec<_> = ["m", "t"]
        .into_iter()
        .map(|v| {
            let mut c = Command::new("qemu-io");
            // Write-back: qemu-io sends no flush after each write (its default mode does).
            c.args(["-f", "raw", "-t", "writeback", &url(v)]);
            for k in 0..24u32 {
                let fua = if k % 8 == 7 { " -f" } else { "" };
                c.args(["-c", &format!("write{fua} -P 0x{:x} {k}M 1M", pat(v, k))]);
            }
            c.args(["-c", "flush"]);
            for k in 0..24u32 {
                c.args(["-c", &format!("read -P 0x{:x} {k}M 1M", pat(v, k))]);
            }
            let child = c
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start qemu-io");
            (v, child)
        })
        .collect();
    for (v, child) in kids {
        let o = child.wait_with_output().expect("run qemu-io");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && !text.to_lowercase().contains("fail"),
            "{v}: {text}"
        );
        assert_eq!(
            text.matches("read 1048576/1048576 bytes").count(),
            24,
            "{v}: every pattern read back: {text}"
        );
    }
    let took = start.elapsed();
    // Both sessions ended: the server's figures say whether they overlapped in the pool.
    let line = (0..500)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            let log = s.log();
            (log.matches("nbd: client done").count() >= 2).then(|| {
                log.lines()
                    .rfind(|l| l.contains("nbd: client done"))
                    .unwrap_or_default()
                    .to_string()
            })
        })
        .unwrap_or_else(|| panic!("no figures from the server: {}", s.log()));
    let most: usize = line
        .split("at most ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    println!("two clients at once: {took:?}; {line}");
    assert!(
        most >= 2,
        "the two clients' requests were never in the pool at once: {line}"
    );
    drop(s);
    ok(&p.args(&["check", "--deep"]));
    for v in ["m", "t"] {
        let out = p.path(&format!("{v}.raw"));
        ok(&p.args(&["export", v, &out]));
        let img = std::fs::read(&out).unwrap();
        for k in 0..24u32 {
            let at = (k as usize) << 20;
            let want = u8::try_from(pat(v, k)).unwrap();
            assert!(
                img[at..at + (1 << 20)].iter().all(|b| *b == want),
                "{v}: MiB {k} of the exported image"
            );
        }
    }
}

/// One qemu-io client with asynchronous writes (16 x 64 KiB `aio_write`, then `aio_flush`):
/// its session submits each request as it arrives and answers them in order, so several are
/// in the pool at once; every pattern reads back with `read -P`.
#[test]
fn one_qemu_io_client_keeps_requests_in_flight() {
    common::require_qemu_io();
    let p = Pool::new("srv-aio");
    ok(&p.args(&["create", "m", "8M", "--layout", "mirror"]));
    let s = Server::start(
        &p,
        &["m", "--clients", "1"],
        &[("HVCTL_DISK_DELAY_US", "3000")],
    );
    let mut c = Command::new("qemu-io");
    c.args([
        "-f",
        "raw",
        "-t",
        "writeback",
        &format!("nbd://127.0.0.1:{}/m", s.port),
    ]);
    for k in 0..16u32 {
        c.args([
            "-c",
            &format!("aio_write -P 0x{:x} {}k 64k", 0x40 + k, 64 * k),
        ]);
    }
    c.args(["-c", "aio_flush"]);
    for k in 0..16u32 {
        c.args(["-c", &format!("read -P 0x{:x} {}k 64k", 0x40 + k, 64 * k)]);
    }
    let o = c.output().expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && !text.to_lowercase().contains("fail"),
        "{text}"
    );
    assert_eq!(text.matches("read 65536/65536 bytes").count(), 16, "{text}");
    let line = (0..500)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            s.log()
                .lines()
                .find(|l| l.contains("nbd: client done"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no figures from the server: {}", s.log()));
    let most: usize = line
        .split("at most ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    println!("one client, aio_write: {line}");
    assert!(
        most >= 4,
        "one client's requests were not in flight together: {line}"
    );
    drop(s);
    ok(&p.args(&["check", "--deep"]));
}
