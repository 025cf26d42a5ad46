//! Property tests: random operation sequences on every kind of volume, checked after every
//! step against a plain in-memory model (a byte vector per volume). Seeds are fixed so a
//! failure names its seed and replays exactly. The queued variant runs the same sequences on
//! disks whose requests complete in an order chosen by a seeded interleaving scheduler, with
//! batches of reads and writes in flight at once between the steps.
#![allow(clippy::cast_possible_truncation)] // Test sizes and tags are small; truncation cannot happen.

mod common;

use std::collections::BTreeMap;

use common::*;
use volmgr::dev::BLOCK_SIZE;
use volmgr::pool::{LayoutSpec, SnapshotKind};
use volmgr::testdev::{Interleave, Sched};
use volmgr::{Error, Pool};

struct World {
    disks: Vec<volmgr::testdev::SharedDisk>,
    pool: Pool,
    model: BTreeMap<String, Vec<u8>>,
    snaps: usize,
}

impl World {
    fn check_all(&mut self, seed: u64, step: usize) {
        for (name, data) in &self.model {
            let id = self.pool.volume_id(name).unwrap();
            let mut got = vec![0u8; data.len()];
            self.pool.read(id, 0, &mut got).unwrap();
            assert!(
                got == *data,
                "seed {seed} step {step}: volume {name} differs from the model"
            );
        }
        assert!(
            self.pool.check().is_empty(),
            "seed {seed} step {step}: {:?}",
            self.pool.check()
        );
    }
}

/// A batch of reads and writes in flight together (different block ranges of a volume), some
/// answers polled early, perhaps a flush among them; then every answer is checked: reads
/// against the model, writes applied to it.
fn batch(w: &mut World, rng: &mut Rng, seed: u64, step: usize) {
    let names: Vec<String> = w.model.keys().cloned().collect();
    // Writes that may fail for want of thin-pool space: to thin volumes, and to thick
    // volumes with space-optimised snapshots (their chunks are copied first).
    let mut may_fail: Vec<String> = Vec::new();
    for i in w.pool.list() {
        if let Some(rest) = i.layout.strip_prefix("thin snapshot of ") {
            may_fail.extend(rest.split(" in ").next().map(str::to_string));
        }
        if i.layout.starts_with("thin") {
            may_fail.push(i.name);
        }
    }
    let ids: Vec<u32> = names.iter().map(|n| w.pool.volume_id(n).unwrap()).collect();
    let mut busy: Vec<(usize, u64, u64)> = Vec::new();
    let mut reqs: BTreeMap<u64, (usize, u64, Option<Vec<u8>>)> = BTreeMap::new();
    let mut out = Vec::new();
    let mut q = w.pool.queue();
    for tag in 0..2 + rng.below(15) {
        let v = rng.below(names.len() as u64) as usize;
        let blocks = (w.model[&names[v]].len() / BLOCK_SIZE) as u64;
        let b = rng.below(blocks);
        let n = (1 + rng.below(8)).min(blocks - b);
        if busy
            .iter()
            .any(|&(bv, bb, bn)| bv == v && b < bb + bn && bb < b + n)
        {
            continue;
        }
        busy.push((v, b, n));
        if rng.below(3) == 0 {
            q.read(tag, ids[v], b, n).unwrap();
            reqs.insert(tag, (v, b, None));
        } else {
            let data: Vec<u8> = (0..n as usize * BLOCK_SIZE)
                .map(|_| rng.next() as u8)
                .collect();
            q.write(tag, ids[v], b, &data).unwrap();
            reqs.insert(tag, (v, b, Some(data)));
        }
        match rng.below(8) {
            0 => q.poll(&mut out, false),
            1 => q.poll(&mut out, true),
            2 => q.flush().unwrap(),
            _ => {}
        }
    }
    let sure = busy.iter().all(|(v, _, _)| !may_fail.contains(&names[*v]));
    if sure && rng.below(4) == 0 {
        // Handed back with requests in flight: the queue finishes them on drop (none of the
        // writes can fail here, so the model takes them all).
        drop(q);
        for (v, b, data) in reqs.values() {
            if let Some(d) = data {
                let off = *b as usize * BLOCK_SIZE;
                w.model.get_mut(&names[*v]).unwrap()[off..off + d.len()].copy_from_slice(d);
            }
        }
        return;
    }
    out.extend(q.finish());
    assert_eq!(
        out.len(),
        reqs.len(),
        "seed {seed} step {step}: every request answered once"
    );
    for c in out {
        let (v, b, data) = &reqs[&c.tag];
        let name = &names[*v];
        let off = *b as usize * BLOCK_SIZE;
        match (data, c.result) {
            (None, Ok(())) => assert!(
                c.data == w.model[name][off..off + c.data.len()],
                "seed {seed} step {step}: queued read of {name} at block {b}"
            ),
            (Some(d), Ok(())) => {
                w.model.get_mut(name).unwrap()[off..off + d.len()].copy_from_slice(d);
            }
            (Some(d), Err(Error::ThinPoolFull { .. })) => {
                // As for a synchronous write: its own range is unspecified.
                let mut now = vec![0u8; d.len()];
                w.pool.read(ids[*v], *b, &mut now).unwrap();
                w.model.get_mut(name).unwrap()[off..off + d.len()].copy_from_slice(&now);
            }
            (_, Err(e)) => panic!("seed {seed} step {step}: queued request on {name}: {e}"),
        }
    }
}

fn run(seed: u64, steps: usize) {
    run_on(seed, steps, None);
}

fn run_on(seed: u64, steps: usize, sched: Option<Sched>) {
    let mut rng = Rng(seed | 1);
    let disks = disks(4, 2048);
    let mut pool = create_on(&disks, sched.as_ref());
    let mut model = BTreeMap::new();
    let specs = [
        ("lin", LayoutSpec::Concat),
        (
            "str",
            LayoutSpec::Stripe {
                columns: 3,
                unit: 2,
            },
        ),
        ("mir", LayoutSpec::Mirror { legs: 2 }),
        (
            "r10",
            LayoutSpec::StripeMirror {
                columns: 2,
                legs: 2,
                unit: 4,
            },
        ),
    ];
    for (name, spec) in specs {
        let size = 40 + rng.below(60);
        pool.create_volume(name, size, spec, None).unwrap();
        model.insert(name.to_string(), vec![0u8; size as usize * BLOCK_SIZE]);
    }
    pool.create_thin_pool("tp", 256, LayoutSpec::Mirror { legs: 2 }, None, 4)
        .unwrap();
    pool.create_thin("thin", "tp", 200).unwrap();
    model.insert("thin".into(), vec![0u8; 200 * BLOCK_SIZE]);
    let mut w = World {
        disks,
        pool,
        model,
        snaps: 0,
    };
    for step in 0..steps {
        if sched.is_some() && rng.below(3) == 0 {
            batch(&mut w, &mut rng, seed, step);
        }
        let names: Vec<String> = w.model.keys().cloned().collect();
        let name = names[rng.below(names.len() as u64) as usize].clone();
        let id = w.pool.volume_id(&name).unwrap();
        let size = w.model[&name].len() as u64;
        match rng.below(100) {
            0..=49 => {
                // Write at a random byte offset (unaligned writes exercise read-merge-write).
                let off = rng.below(size);
                let len = (1 + rng.below(3 * BLOCK_SIZE as u64)).min(size - off);
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                match w.pool.write_bytes(id, off, &data) {
                    Ok(()) => w.model.get_mut(&name).unwrap()[off as usize..(off + len) as usize]
                        .copy_from_slice(&data),
                    Err(Error::ThinPoolFull { .. }) => {}
                    Err(e) => panic!("seed {seed} step {step}: write {name}: {e}"),
                }
            }
            50..=53 => {
                // Write zeroes over a random range (releases whole thin chunks).
                let off = rng.below(size);
                let len = (1 + rng.below(40 * BLOCK_SIZE as u64)).min(size - off);
                match w.pool.write_zeroes(id, off, len) {
                    Ok(()) => {
                        w.model.get_mut(&name).unwrap()[off as usize..(off + len) as usize].fill(0)
                    }
                    Err(Error::ThinPoolFull { .. }) => {
                        // A failed write leaves its own range unspecified (and only that range:
                        // the next full check compares everything else).
                        let mut now = vec![0u8; len as usize];
                        w.pool.read_bytes(id, off, &mut now).unwrap();
                        w.model.get_mut(&name).unwrap()[off as usize..(off + len) as usize]
                            .copy_from_slice(&now);
                    }
                    Err(e) => panic!("seed {seed} step {step}: write_zeroes {name}: {e}"),
                }
            }
            54..=64 => {
                let off = rng.below(size);
                let len = (1 + rng.below(5 * BLOCK_SIZE as u64)).min(size - off);
                let mut got = vec![0u8; len as usize];
                w.pool.read_bytes(id, off, &mut got).unwrap();
                assert_eq!(
                    got,
                    w.model[&name][off as usize..(off + len) as usize],
                    "seed {seed} step {step}: read {name}"
                );
            }
            65..=71 => w.pool.flush().unwrap(),
            72..=75 => {
                // Reopen from the disks, as after a clean shutdown.
                w.pool.flush().unwrap();
                w.pool = reopen_on(&w.disks, sched.as_ref());
            }
            76..=79 if w.snaps < 6 => {
                let snap = format!("snap{step}");
                let kind = if name == "thin"
                    || w.pool
                        .list()
                        .iter()
                        .any(|i| i.name == name && i.layout.starts_with("thin"))
                {
                    SnapshotKind::SpaceOptimized
                } else {
                    SnapshotKind::Full
                };
                let made = if kind == SnapshotKind::Full && rng.below(2) == 0 {
                    w.pool.snapshot_in_pool(&name, &snap, "tp")
                } else {
                    w.pool
                        .snapshot(&name, &snap, kind, LayoutSpec::Concat, None)
                };
                match made {
                    Ok(_) => {
                        let copy = w.model[&name].clone();
                        w.model.insert(snap, copy);
                        w.snaps += 1;
                    }
                    Err(Error::NoSpace(_) | Error::Busy(_)) => {}
                    Err(e) => panic!("seed {seed} step {step}: snapshot {name}: {e}"),
                }
            }
            80..=83 => {
                let new = 16 + rng.below(2 * size / BLOCK_SIZE as u64 + 16);
                match w.pool.resize(&name, new) {
                    Ok(()) => {
                        let m = w.model.get_mut(&name).unwrap();
                        let old = m.len();
                        m.resize(new as usize * BLOCK_SIZE, 0);
                        // Grown thick space is not zeroed: write zeroes so the model holds.
                        let thin = w
                            .pool
                            .list()
                            .iter()
                            .any(|i| i.name == name && i.layout.starts_with("thin"));
                        if m.len() > old && !thin {
                            let zero = vec![0u8; m.len() - old];
                            w.pool.write_bytes(id, old as u64, &zero).unwrap();
                        }
                    }
                    Err(Error::NoSpace(_) | Error::Busy(_) | Error::ThinPoolFull { .. }) => {}
                    Err(e) => panic!("seed {seed} step {step}: resize {name}: {e}"),
                }
            }
            84..=87 => {
                let spec = [
                    LayoutSpec::Concat,
                    LayoutSpec::Stripe {
                        columns: 2,
                        unit: 4,
                    },
                    LayoutSpec::Mirror { legs: 2 },
                ][rng.below(3) as usize];
                match w.pool.start_relayout(&name, spec, None) {
                    Ok(())
                    | Err(Error::NoSpace(_) | Error::Busy(_) | Error::InvalidArgument(_)) => {}
                    Err(e) => panic!("seed {seed} step {step}: relayout {name}: {e}"),
                }
            }
            88..=93 => {
                w.pool.relayout_step(1 + rng.below(40)).unwrap();
                w.pool.fill_step(1 + rng.below(3)).unwrap();
                w.pool.resync_step(1 + rng.below(3)).unwrap();
            }
            94..=96 => match w.pool.add_mirror_leg(&name) {
                Ok(()) | Err(Error::NoSpace(_) | Error::Busy(_) | Error::InvalidArgument(_)) => {}
                Err(e) => panic!("seed {seed} step {step}: add leg {name}: {e}"),
            },
            _ => match w.pool.remove_mirror_leg(&name, rng.below(3) as usize) {
                Ok(()) | Err(Error::Busy(_) | Error::InvalidArgument(_)) => {}
                Err(e) => panic!("seed {seed} step {step}: remove leg {name}: {e}"),
            },
        }
        if step % 10 == 9 {
            w.check_all(seed, step);
        }
    }
    w.pool.settle(|_, _| {}).unwrap();
    assert!(w.pool.verify_mirrors().unwrap().is_empty(), "seed {seed}");
    w.check_all(seed, steps);
}

#[test]
fn random_operation_sequences_match_the_model() {
    // VOLMGR_MODEL_SEEDS raises the number of sequences for a longer soak.
    let seeds: u64 = std::env::var("VOLMGR_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let steps = 200;
    for seed in 1..=seeds {
        run(seed * 0x9e37_79b9, steps);
    }
    println!("model test: {seeds} random sequences of {steps} operations matched the model");
}

#[test]
fn queued_requests_in_flight_match_the_model() {
    let seeds: u64 = std::env::var("VOLMGR_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let steps = 200;
    let mut deepest = 0;
    for seed in 1..=seeds {
        let sched: Sched = volmgr::testdev::Shared::new(Interleave::new(seed));
        run_on(seed * 0x9e37_79b9 + 7, steps, Some(sched.clone()));
        deepest = deepest.max(sched.borrow().max_depth);
    }
    assert!(
        deepest >= 8,
        "too few requests in flight on one disk: {deepest}"
    );
    println!(
        "queued model test: {seeds} random sequences of {steps} operations with batches in flight (up to {deepest} on one disk) matched the model"
    );
}
