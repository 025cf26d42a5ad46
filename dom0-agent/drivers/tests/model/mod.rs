//! A software model of one PCI IDE channel (two device positions, the taskfile with its
//! 48-bit "HOB" register pairs, PIO data blocks, soft reset and signatures) with its
//! bus-master engine (PRD walk, direction bit, active/error/interrupt status) and sparse
//! disks, reached through `PortIo` exactly as the driver reaches hardware.
//!
//! The model is strict: what the standards forbid a host to do (write the taskfile while BSY
//! or DRQ, touch the data port without DRQ, a PRD region crossing 64 KiB, a PRD table shorter
//! than the transfer, DMA outside the driver's buffers, a 48-bit command without each
//! register written twice, the wrong engine direction) panics, which fails the test.
//!
//! `e1000` is the model of the 8254x NIC, `mem` the fake physical memory both models do their
//! DMA in.

#![allow(dead_code)]
// each test binary uses a different part of the model
// Register fields and offsets in the model are small by construction, or are meant to keep
// only their low bits.
#![allow(clippy::cast_possible_truncation)]

pub mod e1000;
pub mod mem;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use dom0_drivers::hw::PortIo;
use mem::PhysMem;

pub const CMD: u16 = 0x1F0;
pub const CTRL: u16 = 0x3F6;
pub const BM: u16 = 0xC000;

const BSY: u8 = 0x80;
const DRDY: u8 = 0x40;
const DRQ: u8 = 0x08;
const ERR: u8 = 0x01;
const ABRT: u8 = 0x04;
const IDNF: u8 = 0x10;
const UNC: u8 = 0x40;

const BM_ACTIVE: u8 = 0x01;
const BM_ERROR: u8 = 0x02;
const BM_INT: u8 = 0x04;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ata,
    Atapi,
}

/// One disk: sparse 512-byte sectors (unwritten ones read as zero).
pub struct Disk {
    pub kind: Kind,
    pub sectors: u64,
    pub lba48: bool,
    pub dma: bool,
    pub model: String,
    pub serial: String,
    pub data: HashMap<u64, Vec<u8>>,
    /// Sectors that fail with an uncorrectable error.
    pub bad: HashSet<u64>,
    pub flushes: u32,
    /// An ATAPI device that sets DRDY (most leave it clear).
    pub atapi_drdy: bool,
}

impl Disk {
    pub fn ata(sectors: u64, lba48: bool) -> Self {
        Self {
            kind: Kind::Ata,
            sectors,
            lba48,
            dma: true,
            model: "BOCHS HARDDISK".into(),
            serial: "BXHD00011".into(),
            data: HashMap::new(),
            bad: HashSet::new(),
            flushes: 0,
            atapi_drdy: false,
        }
    }

    pub fn atapi() -> Self {
        Self {
            kind: Kind::Atapi,
            ..Self::ata(0, false)
        }
    }

    pub fn sector(&self, lba: u64) -> Vec<u8> {
        self.data.get(&lba).cloned().unwrap_or_else(|| vec![0; 512])
    }

    fn identify(&self) -> Vec<u8> {
        let mut w = [0u16; 256];
        w[0] = 0x0040;
        put_string(&mut w[10..20], &self.serial);
        put_string(&mut w[23..27], "1.0");
        put_string(&mut w[27..47], &self.model);
        w[49] = (1 << 9) | if self.dma { 1 << 8 } else { 0 };
        let s28 = self.sectors.min(0x0FFF_FFFF);
        w[60] = s28 as u16;
        w[61] = (s28 >> 16) as u16;
        if self.lba48 {
            w[83] = (1 << 14) | (1 << 10);
            w[86] = 1 << 10;
            for i in 0..4 {
                w[100 + i] = (self.sectors >> (16 * i)) as u16;
            }
        } else {
            w[83] = 1 << 14;
        }
        w[255] = 0xA5;
        let sum = w
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .fold(0u8, u8::wrapping_add);
        w[255] |= u16::from(0u8.wrapping_sub(sum)) << 8;
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

fn put_string(words: &mut [u16], s: &str) {
    let mut bytes = s.as_bytes().to_vec();
    bytes.resize(words.len() * 2, b' ');
    for (w, pair) in words.iter_mut().zip(bytes.chunks(2)) {
        *w = u16::from_be_bytes([pair[0], pair[1]]);
    }
}

enum Xfer {
    None,
    /// PIO data-in: `data`, read so far `pos`; at byte `fail_at` the command fails.
    In {
        data: Vec<u8>,
        pos: usize,
        fail_at: Option<usize>,
    },
    /// PIO data-out to `lba`, `count` sectors; `data` received so far.
    Out {
        lba: u64,
        count: u64,
        data: Vec<u8>,
    },
    /// A DMA command waiting for the engine.
    Dma {
        to_memory: bool,
        lba: u64,
        count: u64,
    },
}

/// One command as the model decoded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmd {
    pub code: u8,
    pub drive: usize,
    pub lba: u64,
    pub count: u64,
}

/// One PRD entry as the engine read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prd {
    pub addr: u32,
    pub bytes: u32,
    pub eot: bool,
}

pub struct State {
    pub disks: [Option<Disk>; 2],
    pub mem: Arc<Mutex<PhysMem>>,
    pub has_bm: bool,
    /// Status reads that show BSY after each command, data block, reset.
    pub busy_polls: u32,
    /// Every status read shows BSY, whatever happens.
    pub stuck_busy: bool,
    /// The next DMA command never completes (the engine stays active, the device busy).
    pub hang_next_dma: bool,
    /// The next command fails with this error register value.
    pub fail_next: Option<u8>,
    // Instrumentation.
    pub accesses: u64,
    pub commands: Vec<Cmd>,
    pub prds: Vec<Prd>,

    sel: usize,
    /// Count, LBA low, mid, high: [current, previous] (the previous is the "HOB" byte).
    tf: [[u8; 2]; 4],
    tf_writes: [u32; 4],
    device: u8,
    features: u8,
    error: u8,
    st: [u8; 2],
    busy: u32,
    signature: [bool; 2],
    srst: bool,
    xfer: Xfer,
    hung: bool,
    bm_cmd: u8,
    bm_status: u8,
    bm_prd: u32,
    /// Engine status reads before the completion in `bm_final` shows.
    bm_defer: u32,
    bm_final: u8,
}

#[derive(Clone)]
pub struct Ide(pub Arc<Mutex<State>>);

impl Ide {
    pub fn new(disks: [Option<Disk>; 2], mem: Arc<Mutex<PhysMem>>, has_bm: bool) -> Self {
        let st = [0, 1].map(|i| match &disks[i] {
            Some(d) if d.kind == Kind::Ata || d.atapi_drdy => DRDY,
            _ => 0,
        });
        Self(Arc::new(Mutex::new(State {
            disks,
            mem,
            has_bm,
            busy_polls: 3,
            stuck_busy: false,
            hang_next_dma: false,
            fail_next: None,
            accesses: 0,
            commands: Vec::new(),
            prds: Vec::new(),
            sel: 0,
            tf: [[0; 2]; 4],
            tf_writes: [0; 4],
            device: 0,
            features: 0,
            error: 0,
            st,
            busy: 0,
            signature: [true; 2],
            srst: false,
            xfer: Xfer::None,
            hung: false,
            bm_cmd: 0,
            bm_status: 0x20,
            bm_prd: 0,
            bm_defer: 0,
            bm_final: 0,
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
}

impl State {
    fn empty(&self) -> bool {
        self.disks.iter().all(Option::is_none)
    }

    fn present(&self) -> bool {
        self.disks[self.sel].is_some()
    }

    fn status(&mut self) -> u8 {
        if self.empty() {
            return 0xFF;
        }
        if self.stuck_busy || self.hung || self.srst {
            return BSY;
        }
        if !self.present() {
            return 0;
        }
        if self.busy > 0 {
            self.busy -= 1;
            return BSY;
        }
        self.st[self.sel]
    }

    fn assert_idle(&self, what: &str) {
        let s = self.st[self.sel];
        assert!(
            self.busy == 0 && !self.hung && !self.stuck_busy && !self.srst && s & (BSY | DRQ) == 0
                || !self.present(),
            "{what} written while BSY or DRQ (status {s:#04x}, busy {})",
            self.busy
        );
    }

    fn abort(&mut self, error: u8) {
        self.st[self.sel] = DRDY | ERR;
        self.error = error;
        self.busy = self.busy_polls;
        self.xfer = Xfer::None;
        self.bm_status |= BM_INT;
    }

    fn finish(&mut self) {
        self.st[self.sel] = DRDY;
        self.busy = self.busy_polls;
        self.xfer = Xfer::None;
    }

    fn reset(&mut self) {
        self.xfer = Xfer::None;
        self.hung = false;
        self.sel = 0;
        self.tf = [[1, 0], [1, 0], [0, 0], [0, 0]];
        self.error = 1;
        for i in 0..2 {
            self.st[i] = match &self.disks[i] {
                Some(d) if d.kind == Kind::Ata || d.atapi_drdy => DRDY,
                _ => 0,
            };
        }
        self.signature = [true; 2];
        self.busy = self.busy_polls * 4;
    }

    fn signature_of(&self, drive: usize) -> (u8, u8) {
        match &self.disks[drive] {
            Some(d) if d.kind == Kind::Atapi => (0x14, 0xEB),
            _ => (0, 0),
        }
    }

    fn read_reg(&mut self, r: u16) -> u8 {
        if self.empty() {
            return 0xFF;
        }
        match r {
            1 => self.error,
            2..=5 => {
                let i = usize::from(r - 2);
                if self.signature[self.sel] && r >= 4 {
                    let (mid, high) = self.signature_of(self.sel);
                    return if r == 4 { mid } else { high };
                }
                self.tf[i][0]
            }
            6 => self.device,
            7 => self.status(),
            _ => panic!("byte read of data port"),
        }
    }

    fn write_reg(&mut self, r: u16, v: u8) {
        match r {
            1 => {
                self.assert_idle("features");
                self.features = v;
            }
            2..=5 => {
                self.assert_idle("taskfile");
                let i = usize::from(r - 2);
                self.tf[i][1] = self.tf[i][0];
                self.tf[i][0] = v;
                self.tf_writes[i] += 1;
                self.signature = [false; 2];
            }
            6 => {
                self.assert_idle("device register");
                self.device = v;
                self.sel = usize::from(v >> 4 & 1);
            }
            7 => self.command(v),
            _ => panic!("byte write of data port"),
        }
    }

    fn decode(&self, ext: bool) -> (u64, u64) {
        let [c, lo, mid, hi] = self.tf;
        if ext {
            let count = u64::from(c[1]) << 8 | u64::from(c[0]);
            let lba = u64::from(lo[0])
                | u64::from(mid[0]) << 8
                | u64::from(hi[0]) << 16
                | u64::from(lo[1]) << 24
                | u64::from(mid[1]) << 32
                | u64::from(hi[1]) << 40;
            (lba, if count == 0 { 65536 } else { count })
        } else {
            let count = u64::from(c[0]);
            let lba = u64::from(lo[0])
                | u64::from(mid[0]) << 8
                | u64::from(hi[0]) << 16
                | u64::from(self.device & 0xF) << 24;
            (lba, if count == 0 { 256 } else { count })
        }
    }

    fn command(&mut self, code: u8) {
        self.assert_idle("command");
        assert!(
            self.bm_cmd & 1 == 0,
            "command {code:#04x} issued while the engine still runs from the last one"
        );
        let writes = std::mem::take(&mut self.tf_writes);
        let Some(disk) = self.disks[self.sel].as_ref() else {
            return; // nobody there to answer
        };
        if self.stuck_busy {
            return;
        }
        let (kind, lba48, dma, sectors) = (disk.kind, disk.lba48, disk.dma, disk.sectors);
        let ext = matches!(code, 0x24 | 0x25 | 0x34 | 0x35);
        let rw = matches!(code, 0x20 | 0x24 | 0x25 | 0x30 | 0x34 | 0x35 | 0xC8 | 0xCA);
        let (lba, count) = if rw { self.decode(ext) } else { (0, 0) };
        self.commands.push(Cmd {
            code,
            drive: self.sel,
            lba,
            count,
        });
        if rw {
            let need = if ext { 2 } else { 1 };
            assert!(
                writes.iter().all(|&n| n >= need),
                "command {code:#04x}: taskfile registers written {writes:?} times, need {need} each"
            );
            assert!(self.device & 0x40 != 0, "LBA bit not set for {code:#04x}");
        }
        if let Some(error) = self.fail_next.take() {
            return self.abort(error);
        }
        if kind == Kind::Atapi {
            if code == 0xEC {
                self.signature[self.sel] = true;
            }
            return self.abort(ABRT);
        }
        if (ext || code == 0xEA) && !lba48 {
            return self.abort(ABRT);
        }
        if rw && lba + count > sectors {
            return self.abort(IDNF);
        }
        let first_bad =
            (lba..lba + count).find(|s| self.disks[self.sel].as_ref().unwrap().bad.contains(s));
        match code {
            0xEC => {
                let data = self.disks[self.sel].as_ref().unwrap().identify();
                self.start_in(data, None);
            }
            0x20 | 0x24 => {
                let disk = self.disks[self.sel].as_ref().unwrap();
                let data: Vec<u8> = (lba..lba + count).flat_map(|s| disk.sector(s)).collect();
                self.start_in(data, first_bad.map(|s| (s - lba) as usize * 512));
            }
            0x30 | 0x34 => {
                self.xfer = Xfer::Out {
                    lba,
                    count,
                    data: Vec::new(),
                };
                self.st[self.sel] = DRDY | DRQ;
                self.busy = self.busy_polls;
            }
            0x25 | 0xC8 | 0x35 | 0xCA if self.has_bm && dma => {
                self.xfer = Xfer::Dma {
                    to_memory: matches!(code, 0x25 | 0xC8),
                    lba,
                    count,
                };
                self.st[self.sel] = DRDY | BSY;
                if std::mem::take(&mut self.hang_next_dma) {
                    self.hung = true;
                    return;
                }
                self.try_dma();
            }
            0xE7 | 0xEA => {
                self.disks[self.sel].as_mut().unwrap().flushes += 1;
                self.finish();
            }
            _ => self.abort(ABRT),
        }
    }

    fn start_in(&mut self, data: Vec<u8>, fail_at: Option<usize>) {
        if fail_at == Some(0) {
            return self.abort(UNC);
        }
        self.xfer = Xfer::In {
            data,
            pos: 0,
            fail_at,
        };
        self.st[self.sel] = DRDY | DRQ;
        self.busy = self.busy_polls;
    }

    fn data_in(&mut self) -> u16 {
        assert!(self.busy == 0, "data port read while BSY");
        assert!(self.st[self.sel] & DRQ != 0, "data port read without DRQ");
        let Xfer::In { data, pos, fail_at } = &mut self.xfer else {
            panic!("data port read outside a data-in command");
        };
        let w = u16::from_le_bytes([data[*pos], data[*pos + 1]]);
        *pos += 2;
        let (pos, len, fail_at) = (*pos, data.len(), *fail_at);
        if pos % 512 == 0 {
            if pos == len {
                self.finish();
            } else if fail_at == Some(pos) {
                self.abort(UNC);
            } else {
                self.busy = self.busy_polls;
            }
        }
        w
    }

    fn data_out(&mut self, w: u16) {
        assert!(self.busy == 0, "data port written while BSY");
        assert!(
            self.st[self.sel] & DRQ != 0,
            "data port written without DRQ"
        );
        let sel = self.sel;
        let Xfer::Out { lba, count, data } = &mut self.xfer else {
            panic!("data port written outside a data-out command");
        };
        data.extend_from_slice(&w.to_le_bytes());
        if data.len() % 512 != 0 {
            return;
        }
        let (lba, count) = (*lba, *count);
        let n = data.len() / 512 - 1;
        let sector = data[n * 512..].to_vec();
        let at = lba + n as u64;
        let disk = self.disks[sel].as_mut().unwrap();
        if disk.bad.contains(&at) {
            return self.abort(UNC);
        }
        disk.data.insert(at, sector);
        if n as u64 + 1 == count {
            self.finish();
        } else {
            self.busy = self.busy_polls;
        }
    }

    fn control(&mut self, v: u8) {
        let srst = v & 0x04 != 0;
        if self.srst && !srst {
            self.reset();
        }
        if srst {
            self.xfer = Xfer::None;
        }
        self.srst = srst;
    }

    fn bm_command(&mut self, v: u8) {
        let was = self.bm_cmd;
        if was & 1 != 0 && v & 1 != 0 {
            assert_eq!(was & 8, v & 8, "engine direction changed while it runs");
        }
        self.bm_cmd = v & 0x09;
        if was & 1 == 0 && v & 1 != 0 {
            self.bm_status |= BM_ACTIVE;
            self.try_dma();
        } else if was & 1 != 0 && v & 1 == 0 {
            // Stopping the engine aborts whatever it was doing.
            self.bm_status &= !BM_ACTIVE;
            if self.bm_defer > 0 {
                self.bm_defer = 0;
                self.bm_status = self.bm_final & !BM_ACTIVE;
            }
        }
    }

    fn bm_status_read(&mut self) -> u8 {
        let s = self.bm_status;
        if self.bm_defer > 0 {
            self.bm_defer -= 1;
            if self.bm_defer == 0 {
                self.bm_status = self.bm_final;
            }
        }
        s
    }

    /// Runs the transfer of a pending DMA command once the engine is started: walks the PRD
    /// table, checking every rule of the Bus Master IDE specification.
    fn try_dma(&mut self) {
        let Xfer::Dma {
            to_memory,
            lba,
            count,
        } = self.xfer
        else {
            return;
        };
        if self.bm_cmd & 1 == 0 || self.hung {
            return;
        }
        assert_eq!(
            self.bm_cmd & 8 != 0,
            to_memory,
            "engine direction bit does not match the command (bit 3 set = disk read)"
        );
        let sel = self.sel;
        let total = count * 512;
        let table = u64::from(self.bm_prd);
        assert!(table % 4 == 0, "PRD table not dword aligned");
        let mut done = 0u64;
        let mut i = 0u64;
        let exact;
        let mem = self.mem.clone();
        let mut mem = mem.lock().unwrap();
        let first_bad = self.disks[sel]
            .as_ref()
            .unwrap()
            .bad
            .iter()
            .copied()
            .filter(|s| (lba..lba + count).contains(s))
            .min();
        loop {
            let at = table + i * 8;
            assert_eq!(
                at / 0x1_0000,
                table / 0x1_0000,
                "PRD table crosses a 64 KiB boundary"
            );
            let off = mem.dma_offset(at, 8);
            let e = &mem.bytes[off..off + 8];
            let addr = u32::from_le_bytes(e[0..4].try_into().unwrap());
            let raw = u32::from(u16::from_le_bytes([e[4], e[5]]));
            let eot = e[7] & 0x80 != 0;
            let bytes = if raw == 0 { 0x1_0000 } else { raw };
            self.prds.push(Prd { addr, bytes, eot });
            assert!(addr % 2 == 0, "PRD address {addr:#x} is odd");
            assert!(bytes % 2 == 0, "PRD byte count {bytes:#x} is odd");
            assert!(
                u64::from(addr & 0xFFFF) + u64::from(bytes) <= 0x1_0000,
                "PRD region {addr:#x}+{bytes:#x} crosses a 64 KiB boundary"
            );
            let take = u64::from(bytes).min(total - done);
            let off = mem.dma_offset(u64::from(addr), take);
            let disk = self.disks[sel].as_mut().unwrap();
            for k in 0..take {
                let byte = done + k;
                let sector = lba + byte / 512;
                if first_bad.is_some_and(|b| sector >= b) {
                    break;
                }
                if to_memory {
                    mem.bytes[off + k as usize] = disk.sector(sector)[(byte % 512) as usize];
                } else {
                    let s = disk.data.entry(sector).or_insert_with(|| vec![0; 512]);
                    s[(byte % 512) as usize] = mem.bytes[off + k as usize];
                }
            }
            done += take;
            if done == total {
                exact = eot && take == u64::from(bytes);
                break;
            }
            assert!(
                !eot,
                "PRD table ({done:#x} bytes) shorter than the transfer ({total:#x})"
            );
            i += 1;
            assert!(i < 8192, "PRD table without end");
        }
        drop(mem);
        if first_bad.is_some() {
            // The device stops at the bad sector: error, interrupt, the engine still active.
            self.abort(UNC);
            self.bm_final = self.bm_status | BM_INT | BM_ACTIVE;
            self.bm_status = (self.bm_status | BM_ACTIVE) & !BM_INT;
        } else {
            self.finish();
            self.bm_final = (self.bm_status | BM_INT) & if exact { !BM_ACTIVE } else { !0 };
        }
        self.bm_defer = self.busy_polls;
        if self.bm_defer == 0 {
            self.bm_status = self.bm_final;
        }
    }
}

impl PortIo for Ide {
    fn inb(&mut self, port: u16) -> u8 {
        let mut s = self.lock();
        s.accesses += 1;
        match port {
            CTRL => s.status(),
            p if (CMD + 1..=CMD + 7).contains(&p) => s.read_reg(p - CMD),
            p if s.has_bm && p == BM => s.bm_cmd,
            p if s.has_bm && p == BM + 2 => s.bm_status_read(),
            _ => panic!("inb({port:#x})"),
        }
    }

    fn outb(&mut self, port: u16, value: u8) {
        let mut s = self.lock();
        s.accesses += 1;
        match port {
            CTRL => s.control(value),
            p if (CMD + 1..=CMD + 7).contains(&p) => s.write_reg(p - CMD, value),
            p if s.has_bm && p == BM => s.bm_command(value),
            p if s.has_bm && p == BM + 2 => {
                s.bm_status =
                    (s.bm_status & !(value & (BM_ERROR | BM_INT)) & !0x60) | (value & 0x60);
            }
            _ => panic!("outb({port:#x}, {value:#x})"),
        }
    }

    fn inw(&mut self, port: u16) -> u16 {
        let mut s = self.lock();
        s.accesses += 1;
        assert_eq!(port, CMD, "inw({port:#x})");
        s.data_in()
    }

    fn outw(&mut self, port: u16, value: u16) {
        let mut s = self.lock();
        s.accesses += 1;
        assert_eq!(port, CMD, "outw({port:#x})");
        s.data_out(value);
    }

    fn inl(&mut self, port: u16) -> u32 {
        let mut s = self.lock();
        s.accesses += 1;
        assert!(s.has_bm && port == BM + 4, "inl({port:#x})");
        s.bm_prd
    }

    fn outl(&mut self, port: u16, value: u32) {
        let mut s = self.lock();
        s.accesses += 1;
        assert!(s.has_bm && port == BM + 4, "outl({port:#x})");
        assert!(
            s.bm_cmd & 1 == 0,
            "PRD address written while the engine runs"
        );
        s.bm_prd = value;
    }
}
