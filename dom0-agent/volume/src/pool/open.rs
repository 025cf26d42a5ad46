//! Creating a pool and opening one: labels, newest valid metadata, split brain, missing,
//! returning and stale disks, dirty-region-log replay.

use super::*;

/// One device with its path priority.
type PrioritizedPath = (Box<dyn BlockDevice>, u32);

struct DiskFound {
    label: Label,
    dev: Box<dyn BlockDevice>,
    /// Newest valid record: sequence, payload CRC, payload, record version.
    best: Option<(u64, u32, Vec<u8>, u32)>,
    copies_at_best: usize,
}

/// A device to open with the name the operator knows it by and its path priority.
pub struct NamedDevice {
    pub dev: Box<dyn BlockDevice>,
    pub priority: u32,
    /// What messages call it (e.g. the image path given on the command line).
    pub name: String,
}

/// Reads both metadata slots of `f.dev`, keeping the newest valid copy and how many slots
/// hold it.
fn read_best_metadata(f: &mut DiskFound, pool_id: u128, name: &str) -> Result<(), Error> {
    let label = f.label;
    for slot in 0..2 {
        let rec = read_record_version(
            &mut *f.dev,
            label.md_slot(slot),
            label.md_blocks,
            MD_MAGIC,
            pool_id,
        )
        .map_err(|err| Error::Device {
            disk: name.to_string(),
            err,
        })?;
        let Some((seq, version, payload)) = rec else {
            continue;
        };
        let Ok(m) = PoolMeta::decode_version(&payload, version) else {
            continue;
        };
        if m.seq != seq || validate_meta(&m).is_err() {
            continue;
        }
        let crc = crc32fast::hash(&payload);
        match &f.best {
            Some((s, ..)) if *s > seq => {}
            Some((s, ..)) if *s == seq => f.copies_at_best += 1,
            _ => {
                f.best = Some((seq, crc, payload, version));
                f.copies_at_best = 1;
            }
        }
    }
    Ok(())
}

impl Pool {
    // ---------------------------------------------------------------------------------------
    // Creation and opening.

    /// Writes labels and a first metadata record on `disks`, making a new pool.
    pub fn create(
        disks: Vec<(Box<dyn BlockDevice>, DiskSpec)>,
        cfg: PoolConfig,
    ) -> Result<Pool, Error> {
        if disks.is_empty() {
            return Err(Error::InvalidArgument(
                "a pool needs at least one disk".into(),
            ));
        }
        if cfg.extent_blocks == 0 || cfg.md_blocks < 2 || cfg.drl_blocks == 0 {
            return Err(Error::InvalidArgument(
                "extent, metadata and log sizes must be positive".into(),
            ));
        }
        let data_start = Label::data_start_for(cfg.md_blocks, cfg.drl_blocks, cfg.extent_blocks);
        let mut names = BTreeSet::new();
        for (d, spec) in &disks {
            check_name(&spec.name)?;
            check_name(&spec.tier)?;
            if !names.insert(spec.name.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "disk name '{}' given twice",
                    spec.name
                )));
            }
            if d.num_blocks() < data_start + u64::from(cfg.extent_blocks) {
                return Err(Error::InvalidArgument(format!(
                    "disk '{}' has {} blocks; at least {} are needed",
                    spec.name,
                    d.num_blocks(),
                    data_start + u64::from(cfg.extent_blocks)
                )));
            }
        }
        if !(crate::format::MD_VERSION_INLINE..=crate::format::MD_VERSION).contains(&cfg.md_version)
        {
            return Err(Error::InvalidArgument(format!(
                "metadata version {} cannot be created",
                cfg.md_version
            )));
        }
        let mut meta = PoolMeta {
            version: cfg.md_version,
            pool_id: cfg.pool_id,
            seq: 0,
            extent_blocks: cfg.extent_blocks,
            md_blocks: cfg.md_blocks,
            drl_blocks: cfg.drl_blocks,
            next_vol: 1,
            disks: Vec::new(),
            volumes: Vec::new(),
        };
        let mut devs = Vec::new();
        for (i, (mut d, spec)) in disks.into_iter().enumerate() {
            let label = Label {
                pool_id: cfg.pool_id,
                disk_index: u32::try_from(i).unwrap_or(u32::MAX),
                md_blocks: cfg.md_blocks,
                drl_blocks: cfg.drl_blocks,
                data_start,
                extent_blocks: cfg.extent_blocks,
            };
            label.write(&mut *d).map_err(|err| Error::Device {
                disk: spec.name.clone(),
                err,
            })?;
            meta.disks.push(DiskMeta {
                name: spec.name,
                tier: spec.tier,
                blocks: d.num_blocks(),
                data_start,
                state: DiskState::Active,
            });
            devs.push(Some(d));
        }
        let mut pool = Pool::assemble(meta.clone(), meta, devs, false);
        pool.commit()?;
        pool.drl_write(true)?;
        Ok(pool)
    }

    pub(super) fn assemble(
        meta: PoolMeta,
        committed: PoolMeta,
        devs: Vec<Option<Box<dyn BlockDevice>>>,
        read_only: bool,
    ) -> Pool {
        let names = vec![None; devs.len()];
        let mut p = Pool {
            meta,
            committed,
            devs,
            names,
            owner: None,
            dirty: false,
            drl_seq: 0,
            drl: BTreeMap::new(),
            drl_bits: false,
            thin: BTreeMap::new(),
            dependents: BTreeSet::new(),
            fast: Vec::new(),
            aio: aio::Aio::default(),
            read_only,
            events: Vec::new(),
            forest: crate::btree::Forest::new(0),
            cache_nodes: crate::btree::DEFAULT_CACHE_NODES,
            md_commit_soon: false,
        };
        p.forest = crate::btree::Forest::new(p.meta.pool_id);
        p.recompute_dependents();
        p
    }

    pub(super) fn recompute_dependents(&mut self) {
        self.recompute_fast();
        self.dependents.clear();
        for v in &self.meta.volumes {
            match &v.kind {
                VolKind::Thick { fill: Some(f), .. } => {
                    self.dependents.insert(f.origin);
                    self.dependents.insert(v.id);
                }
                VolKind::Thin {
                    origin: Some(o), ..
                } => {
                    self.dependents.insert(*o);
                }
                _ => {}
            }
        }
    }

    /// Rebuilds the direct mappings; called whenever layouts, states or dependents may change.
    pub(super) fn recompute_fast(&mut self) {
        self.fast.clear();
        let mut deps = BTreeSet::new();
        for v in &self.meta.volumes {
            match &v.kind {
                VolKind::Thick { fill: Some(f), .. } => {
                    deps.insert(f.origin);
                }
                VolKind::Thin {
                    origin: Some(o), ..
                } => {
                    deps.insert(*o);
                }
                _ => {}
            }
        }
        for v in &self.meta.volumes {
            let VolKind::Thick {
                layout,
                relayout: None,
                fill: None,
            } = &v.kind
            else {
                continue;
            };
            if v.tracking.is_some() || deps.contains(&v.id) || layout.legs.len() != 1 {
                continue;
            }
            let [col] = layout.legs[0].columns.as_slice() else {
                continue;
            };
            let [seg] = col.segs.as_slice() else { continue };
            if col.state != SyncState::InSync || seg.len < v.size {
                continue;
            }
            let id = us(u64::from(v.id));
            if self.fast.len() <= id {
                self.fast.resize(id + 1, None);
            }
            self.fast[id] = Some(FastMap {
                disk: us(u64::from(seg.disk)),
                start: seg.start,
                size: v.size,
            });
        }
    }

    /// Opens a pool from its devices (any order; several paths to one disk are grouped),
    /// picks the newest valid metadata, refuses split brain, marks missing disks, takes back
    /// returning ones, replays the dirty-region log and repairs stale metadata copies.
    pub fn open(
        devs: Vec<Box<dyn BlockDevice>>,
        opts: OpenOptions,
    ) -> Result<(Pool, OpenReport), Error> {
        Self::open_paths(devs.into_iter().map(|d| (d, 1)).collect(), opts)
    }

    /// [`Pool::open`] with a priority per device, used by the priority path policy when
    /// several devices are paths to one disk (higher is preferred).
    pub fn open_paths(
        devs: Vec<(Box<dyn BlockDevice>, u32)>,
        opts: OpenOptions,
    ) -> Result<(Pool, OpenReport), Error> {
        Self::open_named(
            devs.into_iter()
                .enumerate()
                .map(|(i, (dev, priority))| NamedDevice {
                    dev,
                    priority,
                    name: format!("device #{i}"),
                })
                .collect(),
            opts,
        )
    }

    /// [`Pool::open_paths`] with the name the operator knows each device by (its path), used
    /// in every message about that disk instead of the name recorded at creation.
    pub fn open_named(
        devs: Vec<NamedDevice>,
        opts: OpenOptions,
    ) -> Result<(Pool, OpenReport), Error> {
        let mut report = OpenReport::default();
        let mut by_index: BTreeMap<u32, (Label, Vec<PrioritizedPath>, String)> = BTreeMap::new();
        let mut pool_id = None;
        let mut unlabelled: Vec<NamedDevice> = Vec::new();
        for mut nd in devs {
            let label = Label::read(&mut *nd.dev).map_err(|err| Error::Device {
                disk: nd.name.clone(),
                err,
            })?;
            let Some(label) = label else {
                unlabelled.push(nd);
                continue;
            };
            match pool_id {
                None => pool_id = Some(label.pool_id),
                Some(p) if p != label.pool_id => return Err(Error::MixedPools(p, label.pool_id)),
                Some(_) => {}
            }
            let e = by_index
                .entry(label.disk_index)
                .or_insert_with(|| (label, Vec::new(), nd.name.clone()));
            if e.0 != label {
                return Err(Error::Corrupt(format!(
                    "{} and {} both claim disk #{} with different labels",
                    e.2, nd.name, label.disk_index
                )));
            }
            e.1.push((nd.dev, nd.priority));
        }
        let (Some(pool_id), Some(template)) = (pool_id, by_index.values().next().map(|e| e.0))
        else {
            return Err(match unlabelled.first() {
                Some(nd) => Error::NotAPoolDisk(nd.name.clone()),
                None => Error::InvalidArgument("no devices given".into()),
            });
        };
        // A device without a valid label copy that still carries this pool's metadata is a
        // disk of the pool whose labels were damaged: it is set aside (the pool opens without
        // it) unless `relabel` asks to rewrite its labels once it is identified.
        let mut orphans: Vec<(String, DiskFound)> = Vec::new();
        for nd in unlabelled {
            let mut f = DiskFound {
                label: template,
                dev: nd.dev,
                best: None,
                copies_at_best: 0,
            };
            read_best_metadata(&mut f, pool_id, &nd.name)?;
            if f.best.is_none() {
                return Err(Error::NotAPoolDisk(nd.name));
            }
            orphans.push((nd.name, f));
        }
        // Ownership: a pool that another host holds is not touched unless forced.
        let mut previous_owner = None;
        if !opts.read_only
            && let Some(me) = &opts.owner
        {
            for (label, paths, name) in by_index.values_mut() {
                let Some((dev, _)) = paths.first_mut() else {
                    continue;
                };
                let owner = Owner::read(&mut **dev).map_err(|err| Error::Device {
                    disk: name.clone(),
                    err,
                })?;
                let Some(o) = owner.filter(|o| o.pool_id == label.pool_id) else {
                    continue;
                };
                if o.host_id != me.host_id && !opts.force {
                    return Err(Error::OwnedElsewhere(format!(
                        "{name}: the pool is owned by process {} ({}) on host '{}' ({}) since \
                         Unix time {}; it may be in use there over shared storage. Only if that \
                         host is down or no longer uses the pool, force the takeover",
                        o.pid, o.what, o.host_name, o.host_id, o.time
                    )));
                }
                if o.host_id == me.host_id && o.pid == me.pid {
                    continue;
                }
                previous_owner.get_or_insert(o);
            }
        }
        if let Some(o) = &previous_owner {
            report.notes.push(format!(
                "the pool was last owned by process {} ({}) on host '{}', which ended without \
                 releasing it (crash or kill?); taking it over",
                o.pid, o.what, o.host_name
            ));
        } else if opts.read_only {
            for (label, paths, name) in by_index.values_mut() {
                if let Some((dev, _)) = paths.first_mut()
                    && let Ok(Some(o)) = Owner::read(&mut **dev)
                    && o.pool_id == label.pool_id
                {
                    report.notes.push(format!(
                        "{name}: the pool is owned by process {} ({}) on host '{}'; what is shown \
                         may be changing",
                        o.pid, o.what, o.host_name
                    ));
                    break;
                }
            }
        }
        let mut found: BTreeMap<u32, DiskFound> = BTreeMap::new();
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        for (idx, (label, mut paths, name)) in by_index {
            let dev: Box<dyn BlockDevice> = if paths.len() == 1 {
                paths.pop().ok_or(Error::NoValidMetadata)?.0
            } else {
                report.notes.push(format!(
                    "{name}: {} paths to one disk, policy {:?}",
                    paths.len(),
                    opts.path_policy
                ));
                Box::new(MultipathDisk::new(paths, opts.path_policy))
            };
            let mut f = DiskFound {
                label,
                dev,
                best: None,
                copies_at_best: 0,
            };
            read_best_metadata(&mut f, pool_id, &name)?;
            found.insert(idx, f);
            names.insert(idx, name);
        }
        let (widx, (wseq, wcrc, wpayload, wversion)) = found
            .iter()
            .filter_map(|(i, f)| f.best.as_ref().map(|b| (*i, b.clone())))
            .max_by_key(|(_, b)| b.0)
            .ok_or(Error::NoValidMetadata)?;
        let mut meta = PoolMeta::decode_version(&wpayload, wversion)?;
        // Identify the disks whose labels are damaged: by elimination among the disks of the
        // metadata that no labelled device stands for, and by size.
        for (name, mut f) in orphans {
            let candidates: Vec<u32> = (0..meta.disks.len())
                .filter_map(|i| u32::try_from(i).ok())
                .filter(|i| !found.contains_key(i))
                .filter(|i| {
                    let d = &meta.disks[us(u64::from(*i))];
                    d.blocks == f.dev.num_blocks() && d.data_start == template.data_start
                })
                .collect();
            let newer = f.best.as_ref().is_some_and(|b| b.0 > wseq);
            match candidates.as_slice() {
                [i] if !newer => {
                    let recorded = meta.disks[us(u64::from(*i))].name.clone();
                    if opts.relabel && !opts.read_only {
                        f.label = Label {
                            disk_index: *i,
                            ..template
                        };
                        f.label
                            .write(&mut *f.dev)
                            .and_then(|()| f.dev.flush())
                            .map_err(|err| Error::Device {
                                disk: name.clone(),
                                err,
                            })?;
                        report.notes.push(format!(
                            "{name}: both label copies were damaged; rewritten from the pool \
                             metadata (disk #{i}, recorded as '{recorded}')"
                        ));
                        found.insert(*i, f);
                        names.insert(*i, name);
                    } else {
                        report.notes.push(format!(
                            "{name}: both label copies are damaged; treated as missing (it holds \
                             this pool's metadata and looks like disk #{i}, recorded as \
                             '{recorded}'); `repair` rewrites its labels"
                        ));
                        names.insert(*i, name);
                    }
                }
                _ => report.notes.push(format!(
                    "{name}: both label copies are damaged and it cannot be told which disk of \
                     the pool it is; treated as missing"
                )),
            }
        }
        for (i, f) in &found {
            let Some((seq, crc, ..)) = &f.best else {
                continue;
            };
            let (wname, iname) = (&names[&widx], &names[i]);
            if *seq == wseq && *crc != wcrc {
                return Err(Error::SplitBrain(format!(
                    "{wname} and {iname} both carry metadata sequence {wseq} with different contents; \
                     the pool was changed in two halves. Open each half alone and keep one."
                )));
            }
            if let Some(DiskState::Missing { since }) =
                meta.disks.get(us(u64::from(*i))).map(|d| d.state)
                && *seq >= since
            {
                return Err(Error::SplitBrain(format!(
                    "{iname} was declared missing at metadata sequence {since}, but carries sequence {seq} \
                     written while apart from {wname}; the pool was changed in two halves. \
                     Open each half alone and keep one."
                )));
            }
        }
        let mut devs: Vec<Option<Box<dyn BlockDevice>>> =
            (0..meta.disks.len()).map(|_| None).collect();
        let mut stale_images = Vec::new();
        let commit_complete = found
            .values()
            .any(|f| f.copies_at_best >= 2 && f.best.as_ref().is_some_and(|b| b.0 == wseq));
        let mut repair = false;
        for (i, f) in found {
            let name = names.get(&i).cloned().unwrap_or_default();
            let Some(slot) = devs.get_mut(us(u64::from(i))) else {
                report.notes.push(format!(
                    "ignored {name}: labelled as disk #{i} of this pool but not in its metadata"
                ));
                continue;
            };
            let dm = &meta.disks[us(u64::from(i))];
            if dm.data_start != f.label.data_start
                || meta.md_blocks != f.label.md_blocks
                || meta.drl_blocks != f.label.drl_blocks
                || meta.extent_blocks != f.label.extent_blocks
            {
                return Err(Error::Corrupt(format!(
                    "{name}: label and metadata disagree on the on-disk areas"
                )));
            }
            if f.dev.num_blocks() < dm.blocks {
                return Err(Error::Corrupt(format!(
                    "{name} has {} blocks but the pool recorded {}; was the image truncated?",
                    f.dev.num_blocks(),
                    dm.blocks
                )));
            }
            let seq = f.best.as_ref().map(|b| b.0);
            // A disk that missed a commit it should have seen, without being declared missing,
            // is an old image of itself and its data is stale too. A crash can leave a disk one
            // commit behind only while the newest commit is in its first phase (slot A), that
            // is while no disk holds it in both slots.
            if seq.is_none_or(|s| s + 1 < wseq || (commit_complete && s < wseq))
                && meta.disks[us(u64::from(i))].state == DiskState::Active
            {
                stale_images.push(i);
            }
            if seq != Some(wseq) || f.copies_at_best < 2 {
                repair = true;
                let verb = if opts.read_only {
                    "needs rewriting"
                } else {
                    "rewritten"
                };
                if seq != Some(wseq) {
                    report.notes.push(format!(
                        "{name}: stale metadata (sequence {}) {verb} with sequence {wseq}",
                        seq.map_or_else(|| "none".to_string(), |s| s.to_string())
                    ));
                } else {
                    report.notes.push(format!(
                        "{name}: one of its two metadata copies is damaged or old; {verb}"
                    ));
                }
            }
            *slot = Some(f.dev);
        }
        meta.seq = wseq;
        let committed = meta.clone();
        let mut pool = Pool::assemble(meta, committed, devs, opts.read_only);
        // Reference counts, and for version 3 every mapping tree walked and checked.
        pool.rebuild_thin()?;
        for (i, n) in names {
            if let Some(slot) = pool.names.get_mut(us(u64::from(i))) {
                *slot = Some(n);
            }
        }
        // Disks that went or came back.
        let mut absent = Vec::new();
        for i in 0..pool.meta.disks.len() {
            let present = pool.devs[i].is_some();
            match (present, pool.meta.disks[i].state) {
                (true, DiskState::Missing { .. }) => {
                    pool.meta.disks[i].state = DiskState::Active;
                    report.notes.push(format!(
                        "{} returned; only regions changed while it was away will be resynchronised",
                        pool.disk_label(i)
                    ));
                    repair = true;
                }
                (false, DiskState::Active) => absent.push(i),
                _ => {}
            }
        }
        if !absent.is_empty() && opts.require_all_disks && !opts.read_only {
            let list: Vec<String> = absent.iter().map(|&i| pool.disk_label(i)).collect();
            return Err(Error::Degraded(format!(
                "the pool has {} disks but {} not given or not usable: {}; a command that \
                 changes the pool without them would detach their mirror legs, so it is refused \
                 (nothing was changed)",
                pool.meta.disks.len(),
                if absent.len() == 1 {
                    "this one is"
                } else {
                    "these are"
                },
                list.join(", ")
            )));
        }
        // From here on the pool is written: claim it first.
        if let Some(me) = opts.owner.as_ref().filter(|_| !opts.read_only) {
            pool.claim(me.clone())?;
        }
        match pool.finish_open(absent, stale_images, repair, pool_id, &opts, &mut report) {
            Ok(()) => Ok((pool, report)),
            Err(e) => {
                let _ = pool.release();
                Err(e)
            }
        }
    }

    /// Writes `owner` as the pool's owner record on every present disk (flushed).
    pub fn claim(&mut self, owner: Owner) -> Result<(), Error> {
        self.writable()?;
        let owner = Owner {
            pool_id: self.meta.pool_id,
            ..owner
        };
        for i in 0..self.devs.len() {
            if let Some(d) = self.devs[i].as_mut() {
                Owner::write(&mut **d, Some(&owner)).map_err(|err| Error::Device {
                    disk: self.disk_label(i),
                    err,
                })?;
            }
        }
        self.owner = Some(owner);
        Ok(())
    }

    /// Clears the owner record this pool wrote, on every present disk (flushed). Call it when
    /// done with the pool; a pool dropped without it looks like one whose owner crashed.
    pub fn release(&mut self) -> Result<(), Error> {
        if self.owner.take().is_none() {
            return Ok(());
        }
        let mut first_err = None;
        for i in 0..self.devs.len() {
            if let Some(d) = self.devs[i].as_mut()
                && let Err(err) = Owner::write(&mut **d, None)
            {
                first_err.get_or_insert(Error::Device {
                    disk: self.disk_label(i),
                    err,
                });
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The owner record this pool holds, if it claimed one.
    #[must_use]
    pub fn owner(&self) -> Option<&Owner> {
        self.owner.as_ref()
    }

    /// The rest of opening once the pool is assembled: missing disks, stale images, columns
    /// without an in-sync copy, the dirty-region log and repair commits.
    fn finish_open(
        &mut self,
        absent: Vec<usize>,
        stale_images: Vec<u32>,
        mut repair: bool,
        pool_id: u128,
        opts: &OpenOptions,
        report: &mut OpenReport,
    ) -> Result<(), Error> {
        let pool = self;
        for i in absent {
            report.notes.push(format!(
                "{} is missing; its mirror legs are detached",
                pool.disk_label(i)
            ));
            pool.mark_disk_missing(u32::try_from(i).unwrap_or(u32::MAX));
            repair = true;
        }
        for i in stale_images {
            report.notes.push(format!(
                "{} carries an old image of itself (metadata behind by more than one commit); \
                 its mirror legs are resynchronised in full",
                pool.disk_label(us(u64::from(i)))
            ));
            for v in &mut pool.meta.volumes {
                let n = v.nregions();
                for l in layouts_mut(v) {
                    for g in &mut l.legs {
                        for c in &mut g.columns {
                            if c.segs.iter().any(|s| s.disk == i) {
                                c.state = SyncState::Stale(Bitmap::full(n));
                            }
                        }
                    }
                }
            }
            repair = true;
        }
        // A column with no in-sync copy left takes the best it has: a present leg's data.
        for v in &mut pool.meta.volumes {
            let vname = v.name.clone();
            for l in layouts_mut(v) {
                for c in 0..l.ncols() {
                    if l.legs
                        .iter()
                        .any(|g| g.columns[c].state == SyncState::InSync)
                    {
                        continue;
                    }
                    // The present copy with the fewest stale regions is the best one left.
                    let stale = |g: &Leg| match &g.columns[c].state {
                        SyncState::Stale(b) => b.count(),
                        SyncState::InSync => 0,
                    };
                    if let Some(g) = l
                        .legs
                        .iter_mut()
                        .filter(|g| col_present(&pool.devs, &g.columns[c].segs))
                        .min_by_key(|g| stale(g))
                    {
                        g.columns[c].state = SyncState::InSync;
                        report.notes.push(format!(
                            "volume {vname}: column {c} had no in-sync copy; serving the returned disk's data"
                        ));
                        repair = true;
                    }
                }
            }
        }
        // The dirty-region log.
        let mut best: Option<(u64, Vec<u8>)> = None;
        for (i, d) in pool.devs.iter_mut().enumerate() {
            let Some(dev) = d else { continue };
            let start = Label::data_start_for(
                pool.meta.md_blocks,
                pool.meta.drl_blocks,
                pool.meta.extent_blocks,
            );
            let _ = start;
            let label = Label {
                pool_id,
                disk_index: u32::try_from(i).unwrap_or(0),
                md_blocks: pool.meta.md_blocks,
                drl_blocks: pool.meta.drl_blocks,
                data_start: 0,
                extent_blocks: pool.meta.extent_blocks,
            };
            for slot in 0..2 {
                if let Ok(Some((seq, payload))) = read_record(
                    &mut **dev,
                    label.drl_slot(slot),
                    pool.meta.drl_blocks,
                    DRL_MAGIC,
                    pool_id,
                ) && best.as_ref().is_none_or(|b| b.0 < seq)
                {
                    best = Some((seq, payload));
                }
            }
        }
        let mut dirty: Vec<(u32, Bitmap)> = Vec::new();
        let best_missing = best.is_none();
        match best.as_ref().map(|(s, p)| (s, DrlRecord::decode(p))) {
            Some((seq, Ok(rec))) => {
                pool.drl_seq = *seq;
                dirty = rec.entries;
            }
            _ => {
                report.notes.push(
                    "no valid dirty-region log: every mirror is resynchronised in full".into(),
                );
                pool.drl_seq = best.map_or(0, |b| b.0);
                for v in pool.meta.volumes.iter().filter(|v| needs_drl(v)) {
                    dirty.push((v.id, Bitmap::full(v.nregions())));
                }
            }
        }
        if !opts.read_only {
            let had_bits = dirty.iter().any(|(_, b)| !b.is_clear());
            for (vid, bm) in dirty {
                let n = pool.recover_regions(vid, &bm)?;
                report.drl_regions_recovered += n;
            }
            if repair || pool.dirty {
                pool.commit()?;
            }
            if had_bits || best_missing {
                // Resynchronised data first, then the cleared log.
                pool.flush_disks()?;
                pool.drl_write(false)?;
            }
        } else {
            report.drl_regions_recovered = dirty.iter().map(|(_, b)| b.count()).sum();
        }
        report.seq = pool.meta.seq;
        Ok(())
    }

    /// Resynchronises logged regions of volume `vid` after a crash.
    pub(super) fn recover_regions(&mut self, vid: u32, bm: &Bitmap) -> Result<u64, Error> {
        let Some(vi) = self.meta.volumes.iter().position(|v| v.id == vid) else {
            return Ok(0);
        };
        let disks_meta = self.name_meta();
        let Pool { meta, devs, .. } = self;
        let v = &mut meta.volumes[vi];
        let rg = Regions::of(v);
        let size = v.size;
        let mut n = 0;
        for r in bm.ones().filter(|&r| r < rg.n) {
            n += 1;
            let (s, e) = (r * rg.rb, ((r + 1) * rg.rb).min(size));
            if let Some(t) = &mut v.tracking {
                t.changed.set(r);
            }
            for l in layouts_mut(v) {
                for g in &mut l.legs {
                    for c in &mut g.columns {
                        if let SyncState::Stale(b) = &mut c.state {
                            b.set(r);
                        }
                    }
                }
                layout_sync_range(l, devs, s, e)
                    .map_err(|(d, err)| dev_err(&disks_meta, d, err))?;
            }
        }
        if n > 0 {
            self.dirty = true;
        }
        Ok(n)
    }
}
