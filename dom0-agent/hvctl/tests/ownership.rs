//! One owner per pool and commands that cannot destroy by mistake, with real `hvctl`
//! processes on image files.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};

use common::{Pool, Server, err, fingerprint, hvctl, hvctl_env, ok};

#[test]
fn a_second_writer_is_refused_and_told_which_process_holds_the_pool() {
    let p = Pool::new("own-two");
    ok(&p.args(&["create", "v", "4M"]));
    // This test process holds one image as a writer would (no control socket to send to).
    let f = std::fs::File::open(&p.disks[1]).unwrap();
    f.try_lock().unwrap();
    let before = fingerprint(&p.dir);
    let e = err(&p.args(&["create", "w", "4M"]));
    let me = format!("process {}", std::process::id());
    assert!(
        e.contains("pool is in use") && e.contains(&me) && e.contains(&p.disks[1]),
        "{e}"
    );
    // Readers are refused too while a writer holds it (they would see it change).
    let e = err(&p.args(&["list"]));
    assert!(e.contains(&me), "{e}");
    assert_eq!(
        fingerprint(&p.dir),
        before,
        "refused commands changed nothing"
    );
    drop(f);
    // Two servers of one pool: the second is refused, naming the first.
    let mut s = Server::start(&p, &["v", "--clients", "1"], &[]);
    let o = hvctl(&p.args(&["serve", "v", "--port", "0"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "second serve started: {e}");
    assert!(
        e.contains(&format!("process {}", s.pid())) && e.contains("serve"),
        "{e}"
    );
    let mut c = common::nbd_connect(s.port);
    common::nbd_go(&mut c, "v").unwrap();
    common::nbd_request(&mut c, 2, 1, 0, 0, &[]).unwrap();
    assert!(s.child.wait().unwrap().success());
    // Shared locks: two readers at once are fine (the server is gone).
    let f = std::fs::File::open(&p.disks[0]).unwrap();
    f.try_lock_shared().unwrap();
    ok(&p.args(&["list"]));
    err(&p.args(&["create", "w", "4M"]));
}

#[test]
fn check_list_disks_and_export_work_on_read_only_images() {
    let p = Pool::new("own-ro");
    ok(&p.args(&["create", "v", "4M", "--layout", "mirror"]));
    for d in &p.disks {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o444)).unwrap();
        // Root opens mode-0444 files for writing anyway (CI runs as root): make them immutable
        // too, so that an open for writing fails for root as well and the test proves the
        // read-only commands open read-only.
        if is_root() {
            immutable(d, true);
        }
    }
    let before: Vec<Vec<u8>> = p.disks.iter().map(|d| std::fs::read(d).unwrap()).collect();
    ok(&p.args(&["check", "--deep"]));
    assert!(ok(&p.args(&["list"])).contains("mirror 2"));
    ok(&p.args(&["disks"]));
    let out = p.path("v.raw");
    ok(&p.args(&["export", "v", &out]));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 4 << 20);
    // A write command cannot, and says which file.
    let e = err(&p.args(&["create", "w", "4M"]));
    assert!(e.contains(&p.disks[0]), "{e}");
    let after: Vec<Vec<u8>> = p.disks.iter().map(|d| std::fs::read(d).unwrap()).collect();
    assert!(before == after, "read-only commands changed an image");
    for d in &p.disks {
        if is_root() {
            immutable(d, false);
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// `chattr +i` / `-i` (e2fsprogs): an immutable file cannot be opened for writing, by root
/// either.
fn immutable(path: &str, on: bool) {
    let st = std::process::Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .arg(path)
        .status()
        .expect("chattr (e2fsprogs) runs");
    assert!(
        st.success(),
        "chattr {} {path} failed: the test needs a filesystem with the immutable attribute (ext4, xfs, btrfs)",
        if on { "+i" } else { "-i" }
    );
}

fn is_root() -> bool {
    // Root opens read-only files for writing anyway.
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn a_disk_with_both_labels_damaged_is_missing_by_path_until_repair_relabels_it() {
    let p = Pool::new("own-labels");
    ok(&p.args(&["create", "m", "8M", "--layout", "mirror"]));
    let data = p.path("in.raw");
    std::fs::write(&data, vec![0x5au8; 8 << 20]).unwrap();
    ok(&p.args(&["import", "m", &data]));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p.disks[0])
        .unwrap();
    f.write_all_at(&[0xffu8; 8192], 0).unwrap();
    drop(f);
    // Read-only: opens degraded, naming the file as given.
    let o = hvctl(&p.args(&["list"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains(&format!(
            "{}: both label copies are damaged; treated as missing",
            p.disks[0]
        )),
        "{e}"
    );
    // A write command refuses to run without it, and says how to go on.
    let before = fingerprint(&p.dir);
    let e = err(&p.args(&["create", "w", "4M"]));
    assert!(
        e.contains(&p.disks[0]) && e.contains("--allow-degraded"),
        "{e}"
    );
    assert_eq!(fingerprint(&p.dir), before);
    // Repair rewrites its labels from the pool metadata.
    let o = hvctl(&p.args(&["repair"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("rewritten from the pool metadata"), "{e}");
    let o = hvctl(&p.args(&["check", "--deep"]));
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).is_empty());
    let out = p.path("out.raw");
    ok(&p.args(&["export", "m", &out]));
    assert!(std::fs::read(&out).unwrap().iter().all(|b| *b == 0x5a));
}

#[test]
fn a_write_command_without_every_disk_refuses_unless_allow_degraded() {
    let p = Pool::new("own-degraded");
    ok(&p.args(&["create", "m", "4M", "--layout", "mirror"]));
    let before = fingerprint(&p.dir);
    let two = ["volume", "-d", &p.disks[0], "-d", &p.disks[1]];
    let mut a = two.to_vec();
    a.extend(["create", "w", "4M"]);
    let e = err(&a);
    assert!(
        e.contains("disk 'c.img'") && e.contains("--allow-degraded"),
        "{e}"
    );
    assert_eq!(
        fingerprint(&p.dir),
        before,
        "refused without changing anything"
    );
    a.insert(1, "--allow-degraded");
    ok(&a);
    let o = hvctl(&p.args(&["list"]));
    assert!(o.status.success());
}

#[test]
fn rollback_to_a_volume_that_is_not_its_snapshot_is_refused() {
    let p = Pool::new("own-rollback");
    ok(&p.args(&["create-thin-pool", "tp", "16M"]));
    ok(&p.args(&["create", "a", "8M", "--thin-pool", "tp"]));
    ok(&p.args(&["create", "b", "8M", "--thin-pool", "tp"]));
    ok(&p.args(&["snapshot", "a", "a-snap"]));
    let before = fingerprint(&p.dir);
    let e = err(&p.args(&["rollback", "a", "b"]));
    assert!(e.contains("not a snapshot of 'a'"), "{e}");
    let e = err(&p.args(&["rollback", "b", "a-snap"]));
    assert!(e.contains("'a-snap' is a snapshot of 'a'"), "{e}");
    assert_eq!(fingerprint(&p.dir), before);
    ok(&p.args(&["rollback", "a", "a-snap"]));
}

#[test]
fn a_pool_owned_by_another_host_is_refused_unless_force_import() {
    let p = Pool::new("own-host");
    ok(&p.args(&["create", "v", "4M"]));
    // A server on "another host" dies without releasing the pool (SIGKILL).
    let mut s = Server::start(&p, &["v"], &[("HVCTL_HOST_ID", "far-away-host")]);
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let before = fingerprint(&p.dir);
    let e = err(&p.args(&["create", "w", "4M"]));
    assert!(
        e.contains("owned by process")
            && e.contains("far-away-host")
            && e.contains("--force-import"),
        "{e}"
    );
    assert_eq!(fingerprint(&p.dir), before);
    let o = hvctl(&p.args(&["list"]));
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("owned by process"));
    let mut a = p.args(&["create", "w", "4M"]);
    a.insert(1, "--force-import");
    ok(&a);
    // Released at the end: the next command needs no force.
    ok(&p.args(&["create", "x", "4M"]));
    // A crash on this host is taken over with a note.
    let mut s = Server::start(&p, &["v"], &[]);
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let o = hvctl_env(&p.args(&["create", "y", "4M"]), &[]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("taking it over"));
}

#[test]
fn failed_commands_leave_the_directory_as_it_was() {
    let p = Pool::sized("own-undo", "16M", "512K");
    ok(&p.args(&["create", "v", "4M", "--tier", "slow"]));
    ok(&p.args(&["create-thin-pool", "tp", "8M"]));
    ok(&p.args(&["create", "t", "8M", "--thin-pool", "tp"]));
    let small = p.path("small.img");
    std::fs::write(&small, vec![7u8; 4096]).unwrap();
    let new1 = p.path("new1.img");
    let new2 = p.path("new2.img");
    let colon = p.path("x.img:");
    let x = p.path("x.img");
    let out = p.path("out.raw");
    let missing = p.path("nonexistent.raw");
    let ab = ["-d", p.disks[0].as_str(), "-d", p.disks[1].as_str()];
    let with_ab = |rest: &[&'static str]| {
        let mut a = vec!["volume"];
        a.extend(ab);
        a.extend(rest);
        a.iter().map(ToString::to_string).collect::<Vec<String>>()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        // create-pool: files created then too small: removed.
        (
            owned(&[
                "volume",
                "create-pool",
                "--disk-size",
                "64K",
                "-d",
                &new1,
                "-d",
                &new2,
            ]),
            "blocks",
        ),
        // ... and an existing file it extended: truncated back.
        (
            owned(&[
                "volume",
                "create-pool",
                "--disk-size",
                "64K",
                "-d",
                &small,
                "-d",
                &new1,
            ]),
            "blocks",
        ),
        // A second member that cannot be made after the first was created.
        (
            owned(&[
                "volume",
                "create-pool",
                "--disk-size",
                "16M",
                "-d",
                &new1,
                "-d",
                "/nonexistent-dir/y.img",
            ]),
            "/nonexistent-dir/y.img",
        ),
        // An empty tier is an error, not a file named "x.img:".
        (
            owned(&p.args(&["add-disk", &colon, "--disk-size", "16M"])),
            "tier",
        ),
        (
            owned(&["volume", "create-pool", "--disk-size", "16M", "-d", &colon]),
            "tier",
        ),
        // add-disk of a file too small: the file it made is removed.
        (
            owned(&p.args(&["add-disk", &x, "--disk-size", "8K"])),
            "too small",
        ),
        // export whose reads fail half-way (its disk left off): no output left.
        (
            {
                let mut a = with_ab(&["export", "v"]);
                a.push(out.clone());
                a
            },
            "",
        ),
        // import --create from a missing file: no volume, no file.
        (
            owned(&p.args(&["import", "w", &missing, "--create"])),
            "nonexistent.raw",
        ),
        (owned(&p.args(&["rollback", "t", "v"])), "not a snapshot"),
        (with_ab(&["create", "w", "4M"]), "--allow-degraded"),
    ];
    for (args, want) in cases {
        let before = fingerprint(&p.dir);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = err(&refs);
        assert!(e.contains(want), "{args:?}: expected '{want}' in: {e}");
        assert_eq!(
            fingerprint(&p.dir),
            before,
            "{args:?} left the directory changed ({e})"
        );
    }
    let list = ok(&p.args(&["list"]));
    assert!(!list.lines().any(|l| l.starts_with("w ")), "{list}");
    ok(&p.args(&["check"]));
}

fn owned(a: &[&str]) -> Vec<String> {
    a.iter().map(ToString::to_string).collect()
}
