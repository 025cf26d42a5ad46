//! Durability: metadata commits (two copies per disk), the dirty-region log, flush, and
//! taking failed disks out of service.

use super::*;
use crate::dev::{Request, WriteData};

impl Pool {
    // ---------------------------------------------------------------------------------------
    // Commit, log, flush.

    pub(super) fn present_active(&self) -> Vec<usize> {
        (0..self.devs.len())
            .filter(|&i| self.devs[i].is_some() && self.meta.disks[i].state == DiskState::Active)
            .collect()
    }

    pub(super) fn commit(&mut self) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::InvalidArgument("pool is open read-only".into()));
        }
        // Version 3: the changed tree nodes first, in blocks no committed root reaches, made
        // durable before the record that points at them.
        if self.forest.changed() {
            let seq = self.meta.seq + 1;
            self.write_nodes(seq)?;
            self.flush_disks()?;
        }
        for _ in 0..=self.devs.len() {
            let targets = self.present_active();
            if targets.is_empty() {
                return Err(Error::NoValidMetadata);
            }
            self.meta.seq += 1;
            let payload = self.meta.encode();
            let cap = slot_capacity(self.meta.md_blocks);
            if payload.len() > cap {
                self.meta.seq -= 1;
                return Err(Error::MetadataFull {
                    needed: payload.len(),
                    capacity: cap,
                });
            }
            let rec = encode_record_version(
                MD_MAGIC,
                self.meta.version,
                self.meta.pool_id,
                self.meta.seq,
                &payload,
            );
            // Each phase goes to every disk at once; copy 1 only after copy 0 is durable
            // everywhere, so one copy is always whole.
            let mut failed = None;
            let data = WriteData::new(&rec);
            'phases: for slot in 0..2u64 {
                let lba = LABEL_BLOCKS + slot * u64::from(self.meta.md_blocks);
                let write = Request::Write {
                    lba,
                    data: data.clone(),
                };
                for req in [write, Request::Flush] {
                    let res = self.each_disk(&targets, &req);
                    if let Some(k) = res.iter().position(Result::is_err) {
                        failed = Some(targets[k]);
                        break 'phases;
                    }
                }
            }
            if let Some(i) = failed {
                self.mark_disk_missing(u32::try_from(i).unwrap_or(u32::MAX));
                continue;
            }
            self.committed = self.meta.clone();
            self.dirty = false;
            self.recompute_dependents();
            for rt in self.thin.values_mut() {
                rt.commit();
            }
            self.forest.committed();
            return Ok(());
        }
        Err(Error::NoValidMetadata)
    }

    pub(super) fn drl_write(&mut self, flush: bool) -> Result<(), Error> {
        if self.read_only {
            return Ok(());
        }
        for _ in 0..=self.devs.len() {
            let targets = self.present_active();
            if targets.is_empty() {
                return Err(Error::NoValidMetadata);
            }
            self.drl_seq += 1;
            let rec = DrlRecord {
                entries: self.drl.iter().map(|(k, b)| (*k, b.clone())).collect(),
            };
            let payload = rec.encode();
            let cap = slot_capacity(self.meta.drl_blocks);
            if payload.len() > cap {
                return Err(Error::MetadataFull {
                    needed: payload.len(),
                    capacity: cap,
                });
            }
            let bytes = encode_record(DRL_MAGIC, self.meta.pool_id, self.drl_seq, &payload);
            let start = LABEL_BLOCKS
                + 2 * u64::from(self.meta.md_blocks)
                + (self.drl_seq % 2) * u64::from(self.meta.drl_blocks);
            // Every disk at once: the record, then (when asked) the flush.
            let mut failed = None;
            let write = Request::Write {
                lba: start,
                data: WriteData::new(&bytes),
            };
            let reqs: &[Request] = if flush {
                &[write, Request::Flush]
            } else {
                &[write]
            };
            for req in reqs {
                let res = self.each_disk(&targets, req);
                if let Some(k) = res.iter().position(Result::is_err) {
                    failed = Some(targets[k]);
                    break;
                }
            }
            match failed {
                Some(i) => self.mark_disk_missing(u32::try_from(i).unwrap_or(u32::MAX)),
                None => {
                    self.drl_bits = !self.drl.is_empty();
                    return Ok(());
                }
            }
        }
        Err(Error::NoValidMetadata)
    }

    /// Logs regions `[r0, r1)` of `vid` as dirty (durably) unless they already are.
    pub(super) fn drl_mark(
        &mut self,
        vid: u32,
        nregions: u64,
        r0: u64,
        r1: u64,
    ) -> Result<(), Error> {
        let bm = self.drl.entry(vid).or_insert_with(|| Bitmap::new(nregions));
        if bm.len() < nregions {
            bm.resize(nregions, false);
        }
        // Bits set for queued writes still waiting on the log are not durable yet.
        if bm.all_set(r0, r1) && self.aio.drl_waiting() == 0 {
            return Ok(());
        }
        bm.set_range(r0, r1);
        self.drl_write(true)
    }

    /// Makes every acknowledged write durable and commits changed metadata. Pieces of queued
    /// requests still in flight are waited for first (their requests are answered by the
    /// queue), so the dirty-region log is never cleared under a mirrored write in flight.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.read_only {
            return Ok(());
        }
        self.aio_quiesce();
        self.flush_disks()?;
        if self.dirty {
            self.commit()?;
        }
        if self.drl_bits || !self.drl.is_empty() {
            self.drl.clear();
            self.drl_write(false)?;
        }
        self.recompute_fast();
        Ok(())
    }

    pub(super) fn flush_disks(&mut self) -> Result<(), Error> {
        let mut any = false;
        for i in 0..self.devs.len() {
            let Some(d) = self.devs[i].as_mut() else {
                continue;
            };
            match d.flush() {
                Ok(()) => any = true,
                Err(_) => self.mark_disk_missing(u32::try_from(i).unwrap_or(u32::MAX)),
            }
        }
        if any {
            Ok(())
        } else {
            Err(Error::NoValidMetadata)
        }
    }

    /// Takes a disk out of service: every column on it becomes stale (covering everything
    /// written since the last flush), and the disk is marked missing from the next commit on.
    pub(super) fn mark_disk_missing(&mut self, disk: u32) {
        let i = us(u64::from(disk));
        if i >= self.devs.len() {
            return;
        }
        self.devs[i] = None;
        self.fast.clear();
        if self.meta.disks[i].state == DiskState::Active {
            self.meta.disks[i].state = DiskState::Missing {
                since: self.meta.seq + 1,
            };
            let label = self.disk_label(i);
            self.events
                .push(format!("{label} failed or vanished; taken out of service"));
        }
        let drl = self.drl.clone();
        for v in &mut self.meta.volumes {
            let rg = Regions::of(v);
            let logged = drl.get(&v.id);
            for l in layouts_mut(v) {
                for g in &mut l.legs {
                    for c in &mut g.columns {
                        if c.segs.iter().any(|s| s.disk == disk) {
                            if c.state == SyncState::InSync {
                                c.state = SyncState::Stale(Bitmap::new(rg.n));
                            }
                            if let (SyncState::Stale(b), Some(lg)) = (&mut c.state, logged) {
                                b.union_with(lg);
                            }
                        }
                    }
                }
            }
        }
        self.dirty = true;
    }

    /// Records what an I/O found out; a lost disk or detached leg is committed at once so that
    /// the metadata on the remaining disks says so before anything else happens.
    pub(super) fn after_io(&mut self, out: IoOutcome) -> Result<(), Error> {
        let lost = !out.gone.is_empty();
        for d in out.gone {
            self.mark_disk_missing(d);
        }
        if out.changed {
            self.dirty = true;
        }
        if out.detached {
            self.events
                .push("a mirror leg returned errors and was detached".into());
        }
        if out.detached || lost {
            self.flush()?;
        }
        Ok(())
    }
}
