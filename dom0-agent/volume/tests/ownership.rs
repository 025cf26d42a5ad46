//! Operator safety in the core: the owner record, disks that must all be present, disks whose
//! labels are both damaged, rollback lineage and version-1 metadata.

mod common;

use common::{POOL_ID, create, disks, pattern, read_block};
use volmgr::dev::BLOCK_SIZE;
use volmgr::format::{MD_MAGIC, Owner, PoolMeta, encode_record};
use volmgr::pool::{LayoutSpec, NamedDevice, OpenOptions, Pool, SnapshotKind};
use volmgr::testdev::SharedDisk;
use volmgr::{BlockDevice, Error};

fn owner(host: &str, pid: u32) -> Owner {
    Owner {
        pool_id: 0,
        pid,
        time: 1_700_000_000,
        host_id: host.into(),
        host_name: format!("name-of-{host}"),
        what: "test".into(),
    }
}

fn open(d: &[SharedDisk], opts: OpenOptions) -> Result<(Pool, volmgr::pool::OpenReport), Error> {
    let devs = d
        .iter()
        .enumerate()
        .map(|(i, d)| NamedDevice {
            dev: Box::new(d.clone()) as Box<dyn BlockDevice>,
            priority: 1,
            name: format!("/images/{i}.img"),
        })
        .collect();
    Pool::open_named(devs, opts)
}

fn writer(host: &str, pid: u32) -> OpenOptions {
    OpenOptions {
        owner: Some(owner(host, pid)),
        require_all_disks: true,
        ..OpenOptions::default()
    }
}

#[test]
fn owner_record_is_claimed_refused_from_another_host_and_cleared_on_release() {
    let d = disks(2, 1024);
    drop(create(&d));
    let before: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    let (mut p, _) = open(&d, writer("host-a", 10)).unwrap();
    for disk in &d {
        let mut dev = disk.clone();
        let o = Owner::read(&mut dev)
            .unwrap()
            .expect("owner record written");
        assert_eq!(
            (o.pid, o.host_id.as_str(), o.pool_id),
            (10, "host-a", POOL_ID)
        );
    }
    p.release().unwrap();
    drop(p);
    let after: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    assert!(
        after == before,
        "a released pool is byte for byte as before"
    );

    // Host A opens and "crashes" (no release): another host is refused, nothing written.
    let (p, _) = open(&d, writer("host-a", 11)).unwrap();
    drop(p);
    let held: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    let e = open(&d, writer("host-b", 20)).err().unwrap();
    let Error::OwnedElsewhere(msg) = &e else {
        panic!("{e}")
    };
    assert!(
        msg.contains("process 11")
            && msg.contains("name-of-host-a")
            && msg.contains("/images/0.img"),
        "{msg}"
    );
    assert!(d.iter().map(SharedDisk::snapshot).collect::<Vec<_>>() == held);
    // Reading is fine, and says who owns it.
    let (_, rep) = open(
        &d,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(
        rep.notes.iter().any(|n| n.contains("owned by process 11")),
        "{:?}",
        rep.notes
    );
    // The same host takes over from its crashed process, with a note.
    let (mut p, rep) = open(&d, writer("host-a", 12)).unwrap();
    assert!(
        rep.notes.iter().any(|n| n.contains("taking it over")),
        "{:?}",
        rep.notes
    );
    drop(p.release());
    // Another host with force takes over.
    let (p, _) = open(&d, writer("host-a", 13)).unwrap();
    drop(p);
    let (mut p, _) = open(
        &d,
        OpenOptions {
            force: true,
            ..writer("host-b", 21)
        },
    )
    .unwrap();
    assert_eq!(p.owner().map(|o| o.pid), Some(21));
    p.release().unwrap();
}

#[test]
fn a_write_open_without_every_disk_is_refused_unless_allowed() {
    let d = disks(3, 1024);
    let mut p = create(&d);
    p.create_volume("m", 64, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    drop(p);
    let before: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    let two = &d[..2];
    let e = open(two, writer("h", 1)).err().unwrap();
    let Error::Degraded(msg) = &e else {
        panic!("{e}")
    };
    assert!(
        msg.contains("disk 'd2'") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert!(d.iter().map(SharedDisk::snapshot).collect::<Vec<_>>() == before);
    // Read-only opens still work degraded; an allowed write open records the disk missing.
    open(
        two,
        OpenOptions {
            read_only: true,
            require_all_disks: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let (mut p, rep) = open(
        two,
        OpenOptions {
            require_all_disks: false,
            ..writer("h", 1)
        },
    )
    .unwrap();
    assert!(
        rep.notes.iter().any(|n| n.contains("is missing")),
        "{:?}",
        rep.notes
    );
    p.release().unwrap();
}

#[test]
fn a_disk_with_both_labels_damaged_opens_as_missing_and_repair_relabels_it() {
    let d = disks(2, 1024);
    let mut p = create(&d);
    let m = p
        .create_volume("m", 64, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in 0..64 {
        p.write(m, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    drop(p);
    {
        let mut dev = d[0].clone();
        dev.write(0, &vec![0xee; 2 * BLOCK_SIZE]).unwrap();
    }
    // Read-only: opens degraded, names the file, serves the data from the other leg.
    let (mut p, rep) = open(
        &d,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let note = rep.notes.join("\n");
    assert!(
        note.contains("/images/0.img: both label copies are damaged; treated as missing"),
        "{note}"
    );
    assert_eq!(read_block(&mut p, m, 7), pattern(7));
    drop(p);
    // A write open is refused (a disk is absent) unless degraded operation is allowed.
    let e = open(&d, writer("h", 1)).err().unwrap();
    assert!(
        matches!(&e, Error::Degraded(m) if m.contains("/images/0.img")),
        "{e}"
    );
    // Repair identifies it from the metadata it carries and rewrites its labels.
    let (mut p, rep) = open(
        &d,
        OpenOptions {
            relabel: true,
            ..writer("h", 1)
        },
    )
    .unwrap();
    assert!(
        rep.notes
            .iter()
            .any(|n| n.contains("rewritten from the pool metadata")),
        "{:?}",
        rep.notes
    );
    assert!(p.check().is_empty());
    p.release().unwrap();
    drop(p);
    let (mut p, rep) = open(&d, writer("h", 1)).unwrap();
    assert!(rep.notes.is_empty(), "{:?}", rep.notes);
    assert_eq!(p.list()[0].state, "ok");
    assert_eq!(read_block(&mut p, m, 63), pattern(63));
    p.release().unwrap();
    // A device with neither label nor metadata of the pool is an error naming it.
    let stranger = SharedDisk::new(1024);
    let e = open(
        &[d[0].clone(), d[1].clone(), stranger],
        OpenOptions::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e, Error::NotAPoolDisk("/images/2.img".into()));
}

#[test]
fn rollback_only_to_a_snapshot_of_that_volume() {
    let d = disks(2, 4096);
    let mut p = create(&d);
    p.create_thin_pool("tp", 512, LayoutSpec::Concat, None, 16)
        .unwrap();
    let a = p.create_thin("a", "tp", 256).unwrap();
    let b = p.create_thin("b", "tp", 256).unwrap();
    p.write(a, 0, &pattern(1)).unwrap();
    p.write(b, 0, &pattern(2)).unwrap();
    p.snapshot(
        "a",
        "a-snap",
        SnapshotKind::SpaceOptimized,
        LayoutSpec::Concat,
        None,
    )
    .unwrap();
    p.snapshot(
        "a-snap",
        "a-snap2",
        SnapshotKind::SpaceOptimized,
        LayoutSpec::Concat,
        None,
    )
    .unwrap();
    p.write(a, 0, &pattern(3)).unwrap();
    p.flush().unwrap();
    // Same size, same thin pool, not a snapshot of 'a': refused, 'a' unchanged.
    let e = p.rollback("a", "b", |_, _| {}).unwrap_err();
    assert!(
        e.to_string()
            .contains("'b' is not a snapshot, not a snapshot of 'a'"),
        "{e}"
    );
    let e = p.rollback("b", "a-snap", |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("a snapshot of 'a'"), "{e}");
    assert_eq!(read_block(&mut p, a, 0), pattern(3));
    // A snapshot of a snapshot of 'a' is in its lineage.
    p.rollback("a", "a-snap2", |_, _| {}).unwrap();
    assert_eq!(read_block(&mut p, a, 0), pattern(1));
    // Lineage survives a reopen and the removal of a middle link.
    p.remove("a-snap").unwrap();
    drop(p);
    let mut p = common::reopen(&d);
    p.write(a, 0, &pattern(4)).unwrap();
    p.rollback("a", "a-snap2", |_, _| {}).unwrap();
    assert_eq!(read_block(&mut p, a, 0), pattern(1));
    // Thick full snapshot, resized after: refused without the old "resize first" advice.
    let t = p.create_volume("t", 64, LayoutSpec::Concat, None).unwrap();
    p.snapshot("t", "t-full", SnapshotKind::Full, LayoutSpec::Concat, None)
        .unwrap();
    p.settle(|_, _| {}).unwrap();
    p.resize("t", 128).unwrap();
    let e = p.rollback("t", "t-full", |_, _| {}).unwrap_err();
    assert!(
        e.to_string().contains("differ") || e.to_string().contains("resized"),
        "{e}"
    );
    assert!(!e.to_string().contains("resize first"), "{e}");
    let _ = t;
}

#[test]
fn version_1_metadata_still_opens_with_lineage_inferred() {
    let d = disks(1, 2048);
    // Version 1 is version 2 without the lineage: start from a version-2 pool (new pools
    // are version 3, whose thin maps are not in the record).
    let mut p = common::create_version(&d, volmgr::format::MD_VERSION_INLINE);
    p.create_volume("t", 64, LayoutSpec::Concat, None).unwrap();
    p.create_thin_pool("tp", 256, LayoutSpec::Concat, None, 16)
        .unwrap();
    p.snapshot_in_pool("t", "t-so", "tp").unwrap();
    let meta = p.meta().clone();
    drop(p);
    // Rewrite both metadata slots as a version-1 record: the payload without the lineage
    // section (its count is the last 4 bytes when written by version 2).
    let mut payload = meta.encode();
    let n = payload.len();
    let lineage = 4 + 8; // one entry: t-so is a snapshot of t
    assert_eq!(&payload[n - lineage..n - 8], &1u32.to_le_bytes());
    payload.truncate(n - lineage);
    let mut rec = encode_record(MD_MAGIC, POOL_ID, meta.seq, &payload);
    rec[8..12].copy_from_slice(&1u32.to_le_bytes());
    let hcrc = crc32fast_hash(&rec[0..60]);
    rec[60..64].copy_from_slice(&hcrc.to_le_bytes());
    let mut dev = d[0].clone();
    for slot in 0..2u64 {
        dev.write(2 + slot * 16, &rec).unwrap();
    }
    let decoded = PoolMeta::decode(&payload).unwrap();
    assert_eq!(decoded.volumes.len(), meta.volumes.len());
    let mut p = common::reopen(&d);
    let t = p.volume_id("t").unwrap();
    let so = p.volume_id("t-so").unwrap();
    assert!(
        p.is_snapshot_of(so, t),
        "lineage inferred from the thin origin"
    );
    p.write(t, 0, &pattern(9)).unwrap();
    p.rollback("t", "t-so", |_, _| {}).unwrap();
    assert_eq!(read_block(&mut p, t, 0), vec![0u8; BLOCK_SIZE]);
}

/// CRC-32 (IEEE), as the record header uses, without a dev-dependency.
fn crc32fast_hash(b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
