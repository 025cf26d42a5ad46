//! Concurrency: a pool served to several clients at once through [`SharedPool`].
//!
//! The deterministic tests drive several *logical* clients from one thread: a seeded scheduler
//! picks, step by step, which client submits its next request, polls the one it waits for,
//! takes or polls a group-commit ticket, or which step the disks take (their completion order
//! is drawn by a seeded [`Interleave`] too). So every interleaving a seed picks replays, and a
//! failure prints the seed that reproduces it. Checked:
//!
//! * the **model**: overlapping requests of one volume take effect in submission order (region
//!   locks) and others in any order, so every read returns the model as of its submission and
//!   the volumes end as the model that applies every request in submission order; with
//!   aligned and unaligned reads and writes, zeroing, discards and flushes on mirrored,
//!   striped, concatenated, thin and thin-snapshot volumes, and admin commands (a thin
//!   snapshot, a grow) in the middle, which must wait for every request submitted before them;
//! * **crashes** at every write boundary of a concurrent workload: no write acknowledged before
//!   a flush ticket that was then served is lost, and every survivor opens consistent with
//!   identical mirror legs;
//! * **faults** while many clients' requests are in flight: a failing leg, a vanishing disk,
//!   failing reads.
//!
//! A last test runs real threads against a pool whose disks complete requests on their own
//! threads and signal the waiting clients.
#![allow(clippy::cast_possible_truncation)] // Test sizes and tags are small; truncation cannot happen.

mod common;

use std::collections::{BTreeMap, VecDeque};

use common::*;
use volmgr::dev::{BLOCK_SIZE, Completion, DevError, Request, Waker, complete_now};
use volmgr::pool::shared::{FlushTicket, Op};
use volmgr::pool::{LayoutSpec, SnapshotKind};
use volmgr::testdev::{
    Clock, CrashClock, CrashDisk, CrashState, FaultHandle, FaultyDisk, Interleave, QueuedDisk,
    Sched, Shared, SharedDisk,
};
use volmgr::{BlockDevice, Pool, SharedPool};

const BS: u64 = BLOCK_SIZE as u64;

/// What a logical client is waiting for.
enum Pending {
    Req {
        ticket: u64,
        /// For a read, what it must return (the model at its submission).
        expect: Option<Vec<u8>>,
        what: String,
    },
    Flush(FlushTicket),
}

/// A request in a client's script.
#[derive(Clone)]
enum Step {
    Io(Op),
    Flush,
}

struct Client {
    script: VecDeque<Step>,
    /// Requests submitted and not yet answered (up to [`DEPTH`], like an NBD client's queue).
    pending: Vec<Pending>,
}

/// Requests a logical client keeps unfinished at most.
const DEPTH: usize = 3;

/// The serial model: bytes per volume id, and how each kind of request changes them.
struct Model {
    vols: BTreeMap<u32, Vec<u8>>,
    /// Thin volumes without an origin (discard releases their whole chunks) and their chunk
    /// size in bytes; other volumes ignore discards.
    thin: BTreeMap<u32, u64>,
}

impl Model {
    fn apply(&mut self, op: &Op) -> Option<Vec<u8>> {
        match op {
            Op::Read { vol, offset, len } => {
                let v = &self.vols[vol];
                Some(v[*offset as usize..(*offset + *len) as usize].to_vec())
            }
            Op::Write { vol, offset, data } => {
                let v = self.vols.get_mut(vol).unwrap();
                v[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                None
            }
            Op::Zeroes { vol, offset, len } => {
                let v = self.vols.get_mut(vol).unwrap();
                v[*offset as usize..(*offset + *len) as usize].fill(0);
                None
            }
            Op::Discard { vol, offset, len } => {
                if let Some(cb) = self.thin.get(vol) {
                    let (first, last) = (offset.div_ceil(*cb), (offset + len) / cb);
                    let v = self.vols.get_mut(vol).unwrap();
                    for c in first..last {
                        v[(c * cb) as usize..((c + 1) * cb) as usize].fill(0);
                    }
                }
                None
            }
        }
    }
}

/// A random request on one of `vols` (id, size in blocks): mostly aligned block runs in a
/// small hot window (so clients overlap), some unaligned byte ranges, zeroing and discards.
fn random_step(rng: &mut Rng, vols: &[(u32, u64, bool)]) -> Step {
    let (vol, blocks, discardable) = vols[rng.below(vols.len() as u64) as usize];
    let size = blocks * BS;
    let hot = rng.below(2) == 0;
    let block = if hot {
        rng.below(6)
    } else {
        rng.below(blocks - 1)
    };
    let n = (1 + rng.below(4)).min(blocks - block);
    let data =
        |rng: &mut Rng, len: usize| -> Vec<u8> { (0..len).map(|_| rng.next() as u8).collect() };
    match rng.below(20) {
        0..=7 => {
            let d = data(rng, (n * BS) as usize);
            Step::Io(Op::Write {
                vol,
                offset: block * BS,
                data: d,
            })
        }
        8..=11 => Step::Io(Op::Read {
            vol,
            offset: block * BS,
            len: n * BS,
        }),
        12 | 13 => {
            let offset = block * BS + rng.below(BS);
            let len = (1 + rng.below(6000)).min(size - offset);
            let d = data(rng, len as usize);
            Step::Io(Op::Write {
                vol,
                offset,
                data: d,
            })
        }
        14 => {
            let offset = block * BS + rng.below(BS);
            let len = (1 + rng.below(6000)).min(size - offset);
            Step::Io(Op::Read { vol, offset, len })
        }
        15 => {
            let offset = block * BS + rng.below(BS);
            let len = (1 + rng.below(40_000)).min(size - offset);
            Step::Io(Op::Zeroes { vol, offset, len })
        }
        16 if discardable => {
            let offset = block * BS;
            let len = (rng.below(12) * BS).min(size - offset);
            Step::Io(Op::Discard { vol, offset, len })
        }
        19 => Step::Flush,
        _ => {
            let d = data(rng, BLOCK_SIZE);
            Step::Io(Op::Write {
                vol,
                offset: block * BS,
                data: d,
            })
        }
    }
}

fn describe(op: &Op) -> String {
    match op {
        Op::Read { vol, offset, len } => format!("read vol {vol} at {offset} len {len}"),
        Op::Write { vol, offset, data } => {
            format!("write vol {vol} at {offset} len {}", data.len())
        }
        Op::Zeroes { vol, offset, len } => format!("zeroes vol {vol} at {offset} len {len}"),
        Op::Discard { vol, offset, len } => format!("discard vol {vol} at {offset} len {len}"),
    }
}

/// Drives `clients` on `sp` until every script is done, in an order drawn from `seed`:
/// requests are applied to `model` when submitted, reads checked when answered.
fn drive(sp: &SharedPool, clients: &mut [Client], model: &mut Model, seed: u64) {
    drive_with(sp, clients, model, seed, &mut |_, _, _| {});
}

/// [`drive`], calling `admin` before every step (it may run an admin command, which waits
/// for every request submitted so far).
fn drive_with(
    sp: &SharedPool,
    clients: &mut [Client],
    model: &mut Model,
    seed: u64,
    admin: &mut dyn FnMut(u64, &SharedPool, &mut Model),
) {
    let mut rng = Rng(seed ^ 0x00c1_1e47);
    let n = clients.len() as u64;
    for step in 0..200_000u64 {
        if clients
            .iter()
            .all(|c| c.script.is_empty() && c.pending.is_empty())
        {
            return;
        }
        admin(step, sp, model);
        // The disks take a step now and then; otherwise a client does.
        if rng.below(12) == 0 {
            sp.step();
            continue;
        }
        let pick = rng.below(n);
        let c = &mut clients[pick as usize];
        let submit = !c.script.is_empty()
            && (c.pending.is_empty() || (c.pending.len() < DEPTH && rng.below(2) == 0));
        if submit {
            match c.script.pop_front() {
                None => {}
                Some(Step::Flush) => c.pending.push(Pending::Flush(sp.flush_begin())),
                Some(Step::Io(op)) => {
                    let what = describe(&op);
                    let expect = model.apply(&op);
                    let ticket = sp.submit(op).expect("submit");
                    c.pending.push(Pending::Req {
                        ticket,
                        expect,
                        what,
                    });
                }
            }
            continue;
        }
        if c.pending.is_empty() {
            continue;
        }
        let k = rng.below(c.pending.len() as u64) as usize;
        let done = match &c.pending[k] {
            Pending::Flush(t) => match sp.flush_poll(*t) {
                Some(r) => {
                    r.unwrap_or_else(|e| panic!("seed {seed:#x}: flush: {e}"));
                    true
                }
                None => false,
            },
            Pending::Req {
                ticket,
                expect,
                what,
            } => match sp.poll(*ticket) {
                Some(r) => {
                    let data = r.unwrap_or_else(|e| panic!("seed {seed:#x}: {what}: {e}"));
                    if let Some(want) = expect {
                        assert!(
                            data == *want,
                            "seed {seed:#x} step {step}: client {pick}: {what} returned data \
                             that is not the model's as of its submission"
                        );
                    }
                    true
                }
                None => false,
            },
        };
        if done {
            c.pending.swap_remove(k);
        }
    }
    panic!("seed {seed:#x}: the clients did not finish (deadlock?)");
}

/// The volumes of the model test: (name, size in blocks).
fn model_pool(d: &[SharedDisk], sched: &Sched) -> Pool {
    let mut p = create_on(d, Some(sched));
    p.create_volume("m", 48, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    p.create_volume(
        "s",
        48,
        LayoutSpec::Stripe {
            columns: 2,
            unit: 2,
        },
        None,
    )
    .unwrap();
    p.create_volume("c", 40, LayoutSpec::Concat, None).unwrap();
    p.create_thin_pool("tp", 512, LayoutSpec::Mirror { legs: 2 }, None, 4)
        .unwrap();
    p.create_thin("t", "tp", 64).unwrap();
    p.create_thin("u", "tp", 64).unwrap();
    p.flush().unwrap();
    p
}

fn read_all(p: &mut Pool, id: u32) -> Vec<u8> {
    let mut buf = vec![0u8; (p.volume_size(id).unwrap() * BS) as usize];
    p.read(id, 0, &mut buf).unwrap();
    buf
}

/// One seed of the model test; returns the shared pool's figures.
fn model_run(seed: u64, clients: usize, ops: usize) -> volmgr::pool::shared::SharedStats {
    let d = disks(3, 2048);
    let sched: Sched = Shared::new(Interleave::new(seed));
    let mut p = model_pool(&d, &sched);
    // Device requests wait for the scheduler, and stay in flight for a while.
    sched.borrow_mut().immediate_in_8 = 0;
    sched.borrow_mut().idle_reap_in_8 = 6;
    let mut rng = Rng(seed);
    // Content before the clients start, and a thin snapshot sharing it.
    let t = p.volume_id("t").unwrap();
    for b in 0..16 {
        p.write(t, b, &pattern(b + 1)).unwrap();
    }
    p.snapshot(
        "t",
        "ts",
        SnapshotKind::SpaceOptimized,
        LayoutSpec::Concat,
        None,
    )
    .unwrap();
    p.flush().unwrap();
    let mut model = Model {
        vols: BTreeMap::new(),
        thin: BTreeMap::new(),
    };
    let mut vols = Vec::new();
    for name in ["m", "s", "c", "t", "u", "ts"] {
        let id = p.volume_id(name).unwrap();
        model.vols.insert(id, read_all(&mut p, id));
        let blocks = p.volume_size(id).unwrap();
        let discardable = name != "ts";
        if name == "t" || name == "u" {
            model.thin.insert(id, 4 * BS);
        }
        vols.push((id, blocks, discardable));
    }
    let mut cl: Vec<Client> = (0..clients)
        .map(|_| Client {
            script: (0..ops).map(|_| random_step(&mut rng, &vols)).collect(),
            pending: Vec::new(),
        })
        .collect();
    let sp = SharedPool::new(p);
    // Admin commands in the middle, with clients' requests in flight: each waits for every
    // request submitted before it (the model has applied them all), then runs alone. A thin
    // snapshot of u, and c grown (zeroes beyond its old end).
    let u = sp.peek(|p| p.volume_id("u")).unwrap();
    let c = sp.peek(|p| p.volume_id("c")).unwrap();
    let at = 100 + rng.below(300);
    let mut ran = false;
    drive_with(&sp, &mut cl, &mut model, seed, &mut |step, sp, model| {
        if step != at {
            return;
        }
        ran = true;
        let (us, in_flight) = sp.with_pool(|p| {
            let busy = p.queue().in_flight();
            p.snapshot(
                "u",
                "us",
                SnapshotKind::SpaceOptimized,
                LayoutSpec::Concat,
                None,
            )
            .unwrap();
            p.resize("c", 48).unwrap();
            (p.volume_id("us").unwrap(), busy)
        });
        assert_eq!(
            in_flight, 0,
            "seed {seed:#x}: admin ran beside requests in flight"
        );
        let copy = model.vols[&u].clone();
        model.vols.insert(us, copy);
        model.vols.get_mut(&c).unwrap().resize(48 * BLOCK_SIZE, 0);
    });
    assert!(
        ran,
        "seed {seed:#x}: the clients finished before the admin commands"
    );
    sp.flush().unwrap();
    let stats = sp.stats();
    let mut p = sp.into_pool();
    for (id, want) in &model.vols {
        assert!(
            read_all(&mut p, *id) == *want,
            "seed {seed:#x}: volume {id} differs from the serial model"
        );
    }
    assert!(p.check().is_empty(), "seed {seed:#x}: {:?}", p.check());
    assert!(
        p.verify_mirrors().unwrap().is_empty(),
        "seed {seed:#x}: mirror legs differ"
    );
    drop(p);
    // Durable: the disks reopened say the same.
    let mut p = reopen(&d);
    for (id, want) in &model.vols {
        assert!(
            read_all(&mut p, *id) == *want,
            "seed {seed:#x}: volume {id} after reopen differs from the serial model"
        );
    }
    stats
}

#[test]
fn concurrent_clients_match_the_serial_model() {
    let mut waits = 0;
    let mut batched = 0;
    let mut most = 0;
    for k in 0..24u64 {
        let seed = 0x5eed_0000 + k * 0x9e37;
        let s = model_run(seed, 4, 50);
        waits += s.range_waits;
        most = most.max(s.max_unfinished);
        if s.max_batch > 1 {
            batched += 1;
        }
        assert!(s.commits <= s.flush_tickets + 1, "seed {seed:#x}: {s:?}");
    }
    // The interleavings did what they are for: overlapping requests waited for each other,
    // several clients had requests unfinished at once, and commits served several tickets.
    assert!(waits > 50, "only {waits} range waits");
    assert!(most >= 6, "at most {most} requests unfinished at once");
    assert!(
        batched >= 6,
        "group commit served several tickets in only {batched} seeds"
    );
}

// ---------------------------------------------------------------------------------------
// Crashes.

const CRASH_DISK_BLOCKS: u64 = 512;

fn crash_base() -> Vec<Vec<u8>> {
    let d = disks(3, CRASH_DISK_BLOCKS);
    let mut p = create(&d);
    p.create_volume("m", 32, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    p.create_volume("c", 24, LayoutSpec::Concat, None).unwrap();
    p.create_thin_pool("tp", 96, LayoutSpec::Concat, None, 4)
        .unwrap();
    p.create_thin("t", "tp", 64).unwrap();
    p.flush().unwrap();
    d.iter().map(SharedDisk::snapshot).collect()
}

/// One write of the crash workload: where, which tag, when acknowledged (scheduler step).
struct Wrote {
    vol: &'static str,
    block: u64,
    tag: u64,
    acked: Option<u64>,
}

struct CrashRun {
    states: Vec<Shared<CrashState>>,
    writes: Vec<Wrote>,
    /// When the last flush ticket that was served before the crash had been taken.
    durable_from: Option<u64>,
    boundaries: u64,
    completed: bool,
}

/// Three clients write single blocks (tags 1..) to a mirror, a concatenated and a thin
/// volume, hot blocks shared, with flush tickets among them, interleaved by `seed`, the power
/// cut at boundary `crash_at`.
fn crash_workload(base: &[Vec<u8>], crash_at: Option<u64>, seed: u64) -> CrashRun {
    let clock: Clock = Shared::new(CrashClock {
        ops: 0,
        crash_at,
        crashed: false,
    });
    let sched: Sched = Shared::new(Interleave::new(seed ^ 0x77));
    let mut states = Vec::new();
    let devs: Vec<Box<dyn BlockDevice>> = base
        .iter()
        .map(|img| {
            let (d, st) = CrashDisk::new(img.clone(), clock.clone());
            states.push(st);
            Box::new(QueuedDisk::new(Box::new(d), sched.clone())) as Box<dyn BlockDevice>
        })
        .collect();
    let (p, _) = Pool::open(devs, volmgr::OpenOptions::default()).unwrap();
    let vols: Vec<(&'static str, u32, u64)> = [("m", 32), ("c", 24), ("t", 64)]
        .into_iter()
        .map(|(n, s)| (n, p.volume_id(n).unwrap(), s))
        .collect();
    let sp = SharedPool::new(p);
    let mut rng = Rng(seed);
    let mut writes: Vec<Wrote> = Vec::new();
    // Per client: its script (None = flush), and what it waits for.
    let mut scripts: Vec<VecDeque<Option<(usize, u64)>>> = (0..3)
        .map(|_| {
            (0..14)
                .map(|k| {
                    if k % 5 == 4 {
                        None
                    } else {
                        let v = rng.below(3) as usize;
                        let b = if rng.below(2) == 0 {
                            rng.below(3)
                        } else {
                            rng.below(vols[v].2)
                        };
                        Some((v, b))
                    }
                })
                .collect()
        })
        .collect();
    enum Wait {
        W(u64, usize),
        F(FlushTicket, u64),
    }
    let mut waiting: Vec<Option<Wait>> = (0..3).map(|_| None).collect();
    let mut durable_from = None;
    let mut step = 0u64;
    let completed = loop {
        step += 1;
        if clock.borrow().crashed {
            break false;
        }
        if scripts.iter().all(VecDeque::is_empty) && waiting.iter().all(Option::is_none) {
            break true;
        }
        assert!(step < 100_000, "seed {seed:#x}: no progress");
        let pick = rng.below(4) as usize;
        if pick == 3 {
            sp.step();
            continue;
        }
        match waiting[pick].take() {
            None => match scripts[pick].pop_front() {
                None => {}
                Some(None) => waiting[pick] = Some(Wait::F(sp.flush_begin(), step)),
                Some(Some((v, b))) => {
                    let tag = writes.len() as u64 + 1;
                    writes.push(Wrote {
                        vol: vols[v].0,
                        block: b,
                        tag,
                        acked: None,
                    });
                    let t = sp
                        .submit(Op::Write {
                            vol: vols[v].1,
                            offset: b * BS,
                            data: pattern(tag),
                        })
                        .unwrap();
                    waiting[pick] = Some(Wait::W(t, writes.len() - 1));
                }
            },
            Some(Wait::W(t, i)) => match sp.poll(t) {
                Some(Ok(_)) if !clock.borrow().crashed => writes[i].acked = Some(step),
                Some(_) => break false,
                None => waiting[pick] = Some(Wait::W(t, i)),
            },
            Some(Wait::F(t, taken)) => match sp.flush_poll(t) {
                Some(Ok(())) if !clock.borrow().crashed => {
                    durable_from = durable_from.max(Some(taken));
                }
                Some(_) => break false,
                None => waiting[pick] = Some(Wait::F(t, taken)),
            },
        }
    };
    let boundaries = clock.borrow().ops;
    // The pool (and the requests still queued on the disks) go without a flush.
    drop(sp);
    CrashRun {
        states,
        writes,
        durable_from,
        boundaries,
        completed,
    }
}

fn is_tag(got: &[u8], t: u64) -> bool {
    if t == 0 {
        got.iter().all(|b| *b == 0)
    } else {
        got == pattern(t)
    }
}

/// Every block written: the tags it may hold after the crash. A write acknowledged before a
/// served flush ticket was taken is durable, so the block holds the last such write or one
/// submitted after it (writes to one block run in submission order); otherwise its first
/// value (zeroes) or any write.
fn allowed(run: &CrashRun) -> BTreeMap<(&'static str, u64), Vec<u64>> {
    let mut per: BTreeMap<(&'static str, u64), Vec<&Wrote>> = BTreeMap::new();
    for w in &run.writes {
        per.entry((w.vol, w.block)).or_default().push(w);
    }
    per.into_iter()
        .map(|(k, ws)| {
            let floor = run
                .durable_from
                .and_then(|f| ws.iter().rposition(|w| w.acked.is_some_and(|a| a < f)));
            let tags = match floor {
                Some(i) => ws[i..].iter().map(|w| w.tag).collect(),
                None => std::iter::once(0).chain(ws.iter().map(|w| w.tag)).collect(),
            };
            (k, tags)
        })
        .collect()
}

fn verify_crash(images: Vec<Vec<u8>>, allow: &BTreeMap<(&'static str, u64), Vec<u64>>, what: &str) {
    let (mut p, _) = open_images(images).unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    assert!(p.check().is_empty(), "{what}: {:?}", p.check());
    assert!(
        p.verify_mirrors().unwrap().is_empty(),
        "{what}: mirror legs differ after recovery"
    );
    for ((vol, b), tags) in allow {
        let id = p.volume_id(vol).unwrap();
        let got = read_block(&mut p, id, *b);
        let found = (0..500u64).find(|t| is_tag(&got, *t));
        assert!(
            tags.iter().any(|t| is_tag(&got, *t)),
            "{what}: volume {vol} block {b}: expected one of tags {tags:?}, found {found:?} \
             (an acknowledged write lost?)"
        );
    }
}

#[test]
fn concurrent_crash_at_every_write_boundary() {
    let base = crash_base();
    let mut total = 0;
    for seed in [
        0x0c0f_fee1_u64,
        0x0bad_cafe,
        0x5eed_0003,
        0x5eed_0004,
        0x5eed_0005,
    ] {
        let full = crash_workload(&base, None, seed);
        assert!(
            full.completed,
            "seed {seed:#x}: the workload fails without a crash"
        );
        assert!(full.durable_from.is_some());
        let mut keep = Rng(seed ^ 0xabcd);
        for at in 0..full.boundaries {
            let run = crash_workload(&base, Some(at), seed);
            assert!(
                !run.completed,
                "seed {seed:#x}: crash at {at} did not happen"
            );
            let allow = allowed(&run);
            for variant in 0..3 {
                let images: Vec<Vec<u8>> = run
                    .states
                    .iter()
                    .map(|st| {
                        st.borrow().image_after_crash(|_| match variant {
                            0 => true,
                            1 => false,
                            _ => keep.below(2) == 0,
                        })
                    })
                    .collect();
                verify_crash(
                    images,
                    &allow,
                    &format!("seed {seed:#x}: crash at boundary {at}, survivors {variant}"),
                );
                total += 1;
            }
        }
    }
    println!("{total} crash images checked");
    assert!(total > 300, "only {total} crash images checked");
}

// ---------------------------------------------------------------------------------------
// Faults.

/// A shared pool on faulty queued disks, its fault handles, the model and the volumes.
type Faulty = (
    Vec<SharedDisk>,
    Vec<FaultHandle>,
    SharedPool,
    Model,
    Vec<(u32, u64, bool)>,
);

fn faulty_shared(seed: u64) -> Faulty {
    let d = disks(4, 2048);
    let sched: Sched = Shared::new(Interleave::new(seed));
    let mut handles = Vec::new();
    let devs: Vec<Box<dyn BlockDevice>> = d
        .iter()
        .map(|s| {
            let (f, h) = FaultyDisk::new(Box::new(s.clone()));
            handles.push(h);
            Box::new(QueuedDisk::new(Box::new(f), sched.clone())) as Box<dyn BlockDevice>
        })
        .collect();
    let devs = devs
        .into_iter()
        .enumerate()
        .map(|(i, dv)| (dv, volmgr::pool::DiskSpec::new(&format!("d{i}"), "fast")))
        .collect();
    let mut p = Pool::create(devs, volmgr::PoolConfig::small(POOL_ID)).unwrap();
    p.create_volume("m", 48, LayoutSpec::Mirror { legs: 3 }, None)
        .unwrap();
    p.create_volume(
        "s",
        48,
        LayoutSpec::StripeMirror {
            columns: 2,
            legs: 2,
            unit: 2,
        },
        None,
    )
    .unwrap();
    p.flush().unwrap();
    let mut model = Model {
        vols: BTreeMap::new(),
        thin: BTreeMap::new(),
    };
    let mut vols = Vec::new();
    for n in ["m", "s"] {
        let id = p.volume_id(n).unwrap();
        model.vols.insert(id, vec![0u8; 48 * BLOCK_SIZE]);
        vols.push((id, 48, false));
    }
    (d, handles, SharedPool::new(p), model, vols)
}

fn scripts(rng: &mut Rng, vols: &[(u32, u64, bool)], clients: usize, ops: usize) -> Vec<Client> {
    (0..clients)
        .map(|_| Client {
            script: (0..ops)
                .map(|_| random_step(rng, vols))
                .filter(|s| !matches!(s, Step::Io(Op::Discard { .. })))
                .collect(),
            pending: Vec::new(),
        })
        .collect()
}

fn check_model(sp: SharedPool, model: &Model, seed: u64, what: &str) -> Pool {
    let mut p = sp.into_pool();
    for (id, want) in &model.vols {
        assert!(
            read_all(&mut p, *id) == *want,
            "seed {seed:#x}: {what}: volume {id} differs from the serial model"
        );
    }
    assert!(
        p.check().is_empty(),
        "seed {seed:#x}: {what}: {:?}",
        p.check()
    );
    p
}

#[test]
fn faults_under_concurrent_clients() {
    for k in 0..4u64 {
        let seed = 0xfa17_0000 + k;
        // A leg whose writes fail once the clients are under way: detached, nothing lost.
        let (_d, h, sp, mut model, vols) = faulty_shared(seed);
        let mut rng = Rng(seed);
        let mut cl = scripts(&mut rng, &vols, 3, 12);
        drive(&sp, &mut cl, &mut model, seed);
        h[1].borrow_mut().fail_all_writes = true;
        let mut cl = scripts(&mut rng, &vols, 3, 16);
        drive(&sp, &mut cl, &mut model, seed ^ 1);
        let mut p = check_model(sp, &model, seed, "failing leg");
        assert!(
            p.list().iter().any(|v| v.state.contains("degraded")),
            "seed {seed:#x}: the failing leg was not detached: {:?}",
            p.list().iter().map(|v| &v.state).collect::<Vec<_>>()
        );
        assert!(p.verify_mirrors().is_ok());
        drop(p);

        // A disk that vanishes with requests in flight.
        let (_d, h, sp, mut model, vols) = faulty_shared(seed ^ 0x100);
        let mut cl = scripts(&mut rng, &vols, 3, 10);
        drive(&sp, &mut cl, &mut model, seed ^ 2);
        h[2].borrow_mut().gone = true;
        let mut cl = scripts(&mut rng, &vols, 4, 14);
        drive(&sp, &mut cl, &mut model, seed ^ 3);
        let p = check_model(sp, &model, seed, "vanished disk");
        assert!(
            p.disks().iter().any(|d| d.state.contains("missing")),
            "seed {seed:#x}: the vanished disk is not out of service"
        );
        drop(p);

        // Reads failing on one disk: answered from the other legs.
        let (_d, h, sp, mut model, vols) = faulty_shared(seed ^ 0x200);
        let mut cl = scripts(&mut rng, &vols, 3, 10);
        drive(&sp, &mut cl, &mut model, seed ^ 4);
        h[0].borrow_mut().bad_read_blocks = (0..4096).collect();
        let mut cl = scripts(&mut rng, &vols, 4, 14);
        drive(&sp, &mut cl, &mut model, seed ^ 5);
        assert!(h[0].borrow().failures > 0, "seed {seed:#x}: no read failed");
        h[0].borrow_mut().bad_read_blocks.clear();
        drop(check_model(sp, &model, seed, "failing reads"));
    }
}

// ---------------------------------------------------------------------------------------
// Real threads.

/// A disk that performs submitted requests on its own thread after a short random delay and
/// signals the waker, as a disk-image file's worker threads do.
struct ThreadDisk {
    disk: SharedDisk,
    work: Option<std::sync::mpsc::Sender<(u64, Request)>>,
    done: std::sync::mpsc::Receiver<Completion>,
    waker: std::sync::Arc<std::sync::Mutex<Option<Waker>>>,
    in_flight: usize,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl ThreadDisk {
    fn new(disk: SharedDisk, seed: u64) -> Self {
        let (work, jobs) = std::sync::mpsc::channel::<(u64, Request)>();
        let (tx, done) = std::sync::mpsc::channel();
        let waker: std::sync::Arc<std::sync::Mutex<Option<Waker>>> = Default::default();
        let (mut d, w) = (disk.clone(), waker.clone());
        let worker = std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            for (tag, req) in jobs {
                if rng.below(4) == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(rng.below(300)));
                }
                let c = complete_now(&mut d, tag, req);
                if tx.send(c).is_err() {
                    break;
                }
                if let Some(w) = w.lock().unwrap().as_ref() {
                    w();
                }
            }
        });
        Self {
            disk,
            work: Some(work),
            done,
            waker,
            in_flight: 0,
            worker: Some(worker),
        }
    }
}

impl Drop for ThreadDisk {
    fn drop(&mut self) {
        self.work = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl BlockDevice for ThreadDisk {
    fn num_blocks(&self) -> u64 {
        self.disk.num_blocks()
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.disk.read(lba, buf)
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        self.disk.write(lba, buf)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        Ok(())
    }
    fn queue_depth(&self) -> usize {
        self.in_flight
    }
    fn submit(&mut self, tag: u64, req: Request) -> Option<Completion> {
        match self.work.as_ref().map(|w| w.send((tag, req))) {
            Some(Ok(())) => {
                self.in_flight += 1;
                None
            }
            _ => Some(Completion {
                tag,
                result: Err(DevError::Gone),
                data: Vec::new(),
            }),
        }
    }
    fn reap(&mut self, out: &mut Vec<Completion>, wait: bool) {
        let before = out.len();
        while let Ok(c) = self.done.try_recv() {
            self.in_flight -= 1;
            out.push(c);
        }
        if wait
            && out.len() == before
            && self.in_flight > 0
            && let Ok(c) = self.done.recv()
        {
            self.in_flight -= 1;
            out.push(c);
        }
    }
    fn set_waker(&mut self, waker: Waker) -> bool {
        *self.waker.lock().unwrap() = Some(waker);
        true
    }
}

#[test]
fn threads_share_a_pool() {
    let d = disks(3, 4096);
    let devs: Vec<Box<dyn BlockDevice>> = d
        .iter()
        .enumerate()
        .map(|(i, s)| Box::new(ThreadDisk::new(s.clone(), 77 + i as u64)) as Box<dyn BlockDevice>)
        .collect();
    let devs = devs
        .into_iter()
        .enumerate()
        .map(|(i, dv)| (dv, volmgr::pool::DiskSpec::new(&format!("d{i}"), "fast")))
        .collect();
    let mut p = Pool::create(devs, volmgr::PoolConfig::small(POOL_ID)).unwrap();
    p.create_volume("m", 256, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    p.create_thin_pool("tp", 1024, LayoutSpec::Concat, None, 4)
        .unwrap();
    p.create_thin("t", "tp", 512).unwrap();
    let ids = [p.volume_id("m").unwrap(), p.volume_id("t").unwrap()];
    let sp = SharedPool::new(p);
    assert!(sp.disks_signal());
    const THREADS: u64 = 6;
    const ROUNDS: u64 = 60;
    std::thread::scope(|s| {
        for th in 0..THREADS {
            let sp = &sp;
            s.spawn(move || {
                let mut rng = Rng(0x7417 + th);
                let vol = ids[(th % 2) as usize];
                // Each thread owns blocks th*32..th*32+32 of its volume, and shares blocks
                // 250..256 (written, never checked) with the others.
                let mine = th / 2 * 32;
                let mut last: BTreeMap<u64, u64> = BTreeMap::new();
                for r in 0..ROUNDS {
                    let b = mine + rng.below(32);
                    let tag = th * 1000 + r + 1;
                    sp.write(vol, b * BS, &pattern(tag), r % 10 == 9).unwrap();
                    last.insert(b, tag);
                    let shared = 250 + rng.below(6);
                    sp.write(vol, shared * BS + 100, &[th as u8; 300], false)
                        .unwrap();
                    let (&cb, &ct) = last
                        .iter()
                        .nth(rng.below(last.len() as u64) as usize)
                        .unwrap();
                    let mut buf = vec![0u8; BLOCK_SIZE];
                    sp.read(vol, cb * BS, &mut buf).unwrap();
                    assert!(buf == pattern(ct), "thread {th}: block {cb} lost tag {ct}");
                    if r % 7 == 0 {
                        sp.flush().unwrap();
                    }
                }
            });
        }
    });
    let stats = sp.stats();
    assert_eq!(sp.unfinished(), 0);
    sp.flush().unwrap();
    let mut p = sp.into_pool();
    assert!(p.check().is_empty(), "{:?}", p.check());
    assert!(p.verify_mirrors().unwrap().is_empty());
    assert_eq!(stats.requests, THREADS * ROUNDS * 3);
    assert!(stats.commits <= stats.flush_tickets, "{stats:?}");
}
