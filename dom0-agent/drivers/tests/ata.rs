//! The ATA driver against the software model of an IDE channel with its bus-master engine.

// Register fields, patterns and offsets in these tests are small by construction, or are
// meant to keep only their low bits.
#![allow(clippy::cast_possible_truncation)]

mod model;

use std::sync::{Arc, Mutex};

use dom0_drivers::ata::{
    AtaDisk, AtaError, ChannelPorts, Config, Drive, IdeChannel, Timeouts, TransferMode,
};
use dom0_drivers::dma::DmaError;
use dom0_drivers::hw::PollClock;
use model::mem::{FakeDma, Layout, PhysMem};
use model::{BM, CMD, CTRL, Disk, Ide};
use volmgr::dev::{BLOCK_SIZE, BlockDevice, DevError};

type Channel = IdeChannel<Ide, FakeDma, PollClock>;
type Ata = AtaDisk<Ide, FakeDma, PollClock>;

/// 4 TiB: LBA48 addresses above 2^32 sectors.
const BIG: u64 = 1 << 33;

struct Rig {
    ide: Ide,
    mem: Arc<Mutex<PhysMem>>,
    chan: Channel,
}

fn rig(disks: [Option<Disk>; 2], layout: Layout, bus_master: bool, bounce: usize) -> Rig {
    let mem = PhysMem::new(layout, 1024);
    let ide = Ide::new(disks, mem.clone(), bus_master);
    let ports = ChannelPorts {
        command: CMD,
        control: CTRL,
        bus_master: None,
    };
    let ports = if bus_master {
        ports.with_bus_master(BM)
    } else {
        ports
    };
    let config = Config {
        bounce_bytes: bounce,
        timeouts: Timeouts {
            reset_us: 20_000,
            command_us: 10_000,
        },
    };
    let chan = IdeChannel::new(
        ide.clone(),
        FakeDma::new(mem.clone()),
        PollClock::new(1),
        ports,
        config,
    );
    Rig { ide, mem, chan }
}

fn master(disk: Disk) -> [Option<Disk>; 2] {
    [Some(disk), None]
}

/// A probed channel with one disk at the master position, as a block device.
fn one_disk(disk: Disk, layout: Layout, bus_master: bool, bounce: usize) -> (Ide, Ata) {
    let mut r = rig(master(disk), layout, bus_master, bounce);
    let [m, _] = r.chan.probe();
    m.unwrap();
    let [d, _] = r.chan.into_disks();
    (r.ide, d.unwrap())
}

fn pattern(lba: u64, blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BLOCK_SIZE)
        .map(|i| {
            let x = lba.wrapping_mul(0x9E37_79B9) as usize ^ i.wrapping_mul(131);
            (x as u8).wrapping_add((i >> 9) as u8).wrapping_add(seed)
        })
        .collect()
}

fn on_disk(ide: &Ide, drive: usize, lba_block: u64, blocks: usize) -> Vec<u8> {
    let s = ide.lock();
    let disk = s.disks[drive].as_ref().unwrap();
    (lba_block * 8..(lba_block + blocks as u64) * 8)
        .flat_map(|sector| disk.sector(sector))
        .collect()
}

/// Writes a pattern, checks it landed on the model's disk, reads it back.
fn round_trip(ide: &Ide, disk: &mut Ata, lba: u64, blocks: usize, seed: u8) {
    let data = pattern(lba, blocks, seed);
    disk.write(lba, &data).unwrap();
    assert!(
        on_disk(ide, disk.drive().index(), lba, blocks) == data,
        "disk contents at {lba}"
    );
    let mut back = vec![0xAA; data.len()];
    disk.read(lba, &mut back).unwrap();
    assert!(back == data, "read back at {lba}");
}

fn commands(ide: &Ide) -> Vec<(u8, u64, u64)> {
    ide.lock()
        .commands
        .iter()
        .map(|c| (c.code, c.lba, c.count))
        .collect()
}

fn clear_log(ide: &Ide) {
    let mut s = ide.lock();
    s.commands.clear();
    s.prds.clear();
}

#[test]
fn identify_reads_size_model_and_serial() {
    let mut r = rig(
        master(Disk::ata(BIG, true)),
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    let [m, s] = r.chan.probe();
    let info = m.unwrap();
    assert_eq!(s, Err(AtaError::NoDrive));
    assert_eq!(info.drive, Drive::Master);
    assert_eq!(info.sectors, BIG);
    assert!(info.lba48 && info.dma);
    assert_eq!(info.model, "BOCHS HARDDISK");
    assert_eq!(info.serial, "BXHD00011");
    assert_eq!(info.firmware, "1.0");
    assert_eq!(r.chan.transfer_mode(Drive::Master), Some(TransferMode::Dma));
    assert_eq!(r.chan.transfer_mode(Drive::Slave), None);
    assert_eq!(r.chan.dma_unavailable(), None);
    assert!(r.ide.lock().commands.iter().any(|c| c.code == 0xEC));
    let [d, none] = r.chan.into_disks();
    assert!(none.is_none());
    let d = d.unwrap();
    assert_eq!(d.num_blocks(), BIG / 8);
    assert!(d.waits_on_medium());
}

#[test]
fn a_trailing_part_block_is_not_used() {
    let (_, d) = one_disk(
        Disk::ata(8 * 100 + 5, true),
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    assert_eq!(d.num_blocks(), 100);
}

#[test]
fn dma_round_trips_across_chunks_and_at_the_ends_of_the_disk() {
    // A 32 KiB bounce buffer: 8 blocks per command.
    let (ide, mut d) = one_disk(Disk::ata(BIG, true), Layout::Contiguous, true, 32 * 1024);
    let last = d.num_blocks() - 1;
    clear_log(&ide);
    round_trip(&ide, &mut d, 0, 1, 1);
    assert_eq!(commands(&ide), [(0x35, 0, 8), (0x25, 0, 8)]);

    clear_log(&ide);
    round_trip(&ide, &mut d, 5, 16, 2);
    assert_eq!(
        commands(&ide),
        [
            (0x35, 40, 64),
            (0x35, 104, 64),
            (0x25, 40, 64),
            (0x25, 104, 64)
        ]
    );

    round_trip(&ide, &mut d, last, 1, 3);
    // Sector 2^32 + 24: every byte of the 48-bit address and the HOB registers matter.
    clear_log(&ide);
    round_trip(&ide, &mut d, (1 << 29) + 3, 3, 4);
    assert_eq!(commands(&ide)[0], (0x35, (1 << 32) + 24, 24));
    round_trip(&ide, &mut d, 0x3A5A_5A5B, 2, 5);

    // Earlier data is intact, and what was never written reads as zeros.
    let mut back = vec![0xAA; BLOCK_SIZE];
    d.read(5, &mut back).unwrap();
    assert_eq!(back, pattern(5, 16, 2)[..BLOCK_SIZE]);
    d.read(1000, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));

    let stats = d.stats();
    assert_eq!(stats.pio_commands, 0);
    assert!(stats.dma_commands >= 8);
    assert_eq!(stats.errors, 0);
    assert_eq!(
        stats.bytes_written,
        (1 + 16 + 1 + 3 + 2) * BLOCK_SIZE as u64
    );
}

#[test]
fn dma_works_however_long_the_device_stays_busy() {
    for polls in [0, 1, 40] {
        let (ide, mut d) = one_disk(
            Disk::ata(1 << 20, true),
            Layout::Contiguous,
            true,
            64 * 1024,
        );
        ide.lock().busy_polls = polls;
        round_trip(&ide, &mut d, 7, 20, polls as u8);
        d.flush().unwrap();
    }
}

#[test]
fn prd_regions_are_cut_at_64k_boundaries() {
    // The bounce buffer starts 4 KiB below a 64 KiB boundary.
    let (ide, mut d) = one_disk(
        Disk::ata(1 << 20, true),
        Layout::Contiguous,
        true,
        128 * 1024,
    );
    clear_log(&ide);
    round_trip(&ide, &mut d, 0, 32, 9);
    let prds = ide.lock().prds.clone();
    let sizes: Vec<(u32, bool)> = prds.iter().map(|p| (p.bytes, p.eot)).collect();
    let table = [(0x1000, false), (0x1_0000, false), (0xF000, true)];
    assert_eq!(
        sizes,
        [table, table].concat(),
        "one table for the write, one for the read"
    );
    assert_eq!(prds[0].addr % 0x1_0000, 0xF000);
    assert_eq!(
        prds[1].addr % 0x1_0000,
        0,
        "the 64 KiB region (byte count 0) is aligned"
    );
    for p in &prds {
        assert!(u64::from(p.addr % 0x1_0000) + u64::from(p.bytes) <= 0x1_0000);
    }
}

#[test]
fn scattered_dma_memory_gets_one_prd_per_page() {
    let (ide, mut d) = one_disk(
        Disk::ata(1 << 20, true),
        Layout::PairSwapped,
        true,
        128 * 1024,
    );
    clear_log(&ide);
    round_trip(&ide, &mut d, 3, 64, 7);
    assert_eq!(
        commands(&ide),
        [
            (0x35, 24, 256),
            (0x35, 280, 256),
            (0x25, 24, 256),
            (0x25, 280, 256)
        ]
    );
    let prds = ide.lock().prds.clone();
    assert_eq!(prds.len(), 4 * 32);
    assert!(prds.iter().all(|p| p.bytes == 4096));
    assert_eq!(prds.iter().filter(|p| p.eot).count(), 4);
}

#[test]
fn dma_never_touches_memory_outside_the_drivers_buffers() {
    // The model refuses any DMA outside the pages the driver allocated; the pages before
    // them (the rest of dom0) keep their bytes.
    let mut r = rig(
        master(Disk::ata(1 << 20, true)),
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    r.chan.probe()[0].clone().unwrap();
    let mut buf = pattern(0, 40, 1);
    r.chan.write(Drive::Master, 0, &buf).unwrap();
    r.chan.read(Drive::Master, 0, &mut buf).unwrap();
    let mem = r.mem.lock().unwrap();
    assert!(mem.bytes[..4 * 4096].iter().all(|&b| b == 0xEE));
    assert!(!mem.owned.contains(&0));
}

#[test]
fn lba28_disk_uses_28_bit_commands_and_256_sector_chunks() {
    let mut r = rig(
        master(Disk::ata(100_000, false)),
        Layout::Contiguous,
        true,
        256 * 1024,
    );
    let info = r.chan.probe()[0].clone().unwrap();
    assert!(!info.lba48);
    assert_eq!(info.sectors, 100_000);
    let [d, _] = r.chan.into_disks();
    let mut d = d.unwrap();
    clear_log(&r.ide);
    round_trip(&r.ide, &mut d, 3, 80, 3);
    assert_eq!(
        commands(&r.ide),
        [
            (0xCA, 24, 256),
            (0xCA, 280, 256),
            (0xCA, 536, 128),
            (0xC8, 24, 256),
            (0xC8, 280, 256),
            (0xC8, 536, 128)
        ]
    );
    let last = d.num_blocks() - 1;
    round_trip(&r.ide, &mut d, last, 1, 4);
    clear_log(&r.ide);
    d.flush().unwrap();
    assert_eq!(commands(&r.ide), [(0xE7, 0, 0)]);
}

#[test]
fn refused_requests_never_reach_the_device() {
    let mut r = rig(
        master(Disk::ata(8 * 64, true)),
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    r.chan.probe()[0].clone().unwrap();
    let before = r.ide.lock().accesses;
    let mut sector = [0u8; 512];
    assert_eq!(
        r.chan.read(Drive::Master, 8 * 64, &mut sector),
        Err(AtaError::OutOfRange)
    );
    assert_eq!(
        r.chan.read(Drive::Master, u64::MAX, &mut sector),
        Err(AtaError::OutOfRange)
    );
    assert_eq!(
        r.chan.write(Drive::Master, 0, &[0; 100]),
        Err(AtaError::Misaligned)
    );
    assert_eq!(
        r.chan.read(Drive::Slave, 0, &mut sector),
        Err(AtaError::NoDrive)
    );
    assert_eq!(r.chan.flush(Drive::Slave), Err(AtaError::NoDrive));
    assert_eq!(r.ide.lock().accesses, before);

    let [d, _] = r.chan.into_disks();
    let mut d = d.unwrap();
    let mut block = vec![0u8; 2 * BLOCK_SIZE];
    assert_eq!(
        d.read(64, &mut block[..BLOCK_SIZE]),
        Err(DevError::OutOfRange)
    );
    assert_eq!(d.read(63, &mut block), Err(DevError::OutOfRange));
    assert_eq!(d.write(u64::MAX, &block), Err(DevError::OutOfRange));
    assert_eq!(d.write(0, &block[..512]), Err(DevError::Misaligned));
    assert_eq!(
        d.read(0, &mut block[..BLOCK_SIZE + 1]),
        Err(DevError::Misaligned)
    );
    assert_eq!(r.ide.lock().accesses, before);
    assert_eq!(d.stats().errors, 0);
    // Empty requests are fine and cost nothing.
    d.read(64, &mut []).unwrap();
    assert_eq!(r.ide.lock().accesses, before);
}

#[test]
fn flush_issues_flush_cache_ext() {
    let (ide, mut d) = one_disk(Disk::ata(BIG, true), Layout::Contiguous, true, 64 * 1024);
    clear_log(&ide);
    d.flush().unwrap();
    assert_eq!(commands(&ide), [(0xEA, 0, 0)]);
    assert_eq!(ide.lock().disks[0].as_ref().unwrap().flushes, 1);
    assert_eq!(d.stats().flushes, 1);
    ide.lock().fail_next = Some(0x04);
    assert_eq!(d.flush(), Err(DevError::Io));
    d.flush().unwrap();
    assert_eq!(ide.lock().disks[0].as_ref().unwrap().flushes, 2);
}

fn device_errors_fail_one_request_only(bus_master: bool) {
    let mut disk = Disk::ata(1 << 16, true);
    disk.bad.insert(10 * 8 + 3);
    let (ide, mut d) = one_disk(disk, Layout::Contiguous, bus_master, 64 * 1024);
    let mut buf = vec![0u8; 4 * BLOCK_SIZE];
    assert_eq!(d.read(9, &mut buf), Err(DevError::Io));
    assert_eq!(d.stats().errors, 1);
    assert_eq!(d.stats().timeouts, 0);
    round_trip(&ide, &mut d, 11, 4, 1);
    assert_eq!(d.write(10, &buf[..BLOCK_SIZE]), Err(DevError::Io));
    round_trip(&ide, &mut d, 0, 4, 2);
    ide.lock().fail_next = Some(0x40);
    assert_eq!(d.write(20, &buf), Err(DevError::Io));
    round_trip(&ide, &mut d, 20, 4, 3);
    let stats = d.stats();
    assert_eq!((stats.errors, stats.timeouts), (3, 0));
    assert_eq!(stats.resets, 1, "device errors need no reset");
}

#[test]
fn device_errors_fail_one_dma_request_only() {
    device_errors_fail_one_request_only(true);
}

#[test]
fn device_errors_fail_one_pio_request_only() {
    device_errors_fail_one_request_only(false);
}

#[test]
fn a_device_that_stays_busy_times_out_within_the_bound() {
    let mut r = rig(
        master(Disk::ata(1 << 16, true)),
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    r.chan.probe()[0].clone().unwrap();
    r.ide.lock().stuck_busy = true;
    let before = r.ide.lock().accesses;
    let mut buf = vec![0u8; BLOCK_SIZE];
    assert!(matches!(
        r.chan.read(Drive::Master, 0, &mut buf),
        Err(AtaError::Timeout { status: 0x80 })
    ));
    let spent = r.ide.lock().accesses - before;
    // One command wait (10,000 polls) and the reset (2,000 + 20,000), no more.
    assert!(spent < 33_000, "{spent} port accesses");
    let stats = r.chan.stats();
    assert_eq!((stats.timeouts, stats.errors, stats.resets), (1, 1, 2));

    assert!(matches!(
        r.chan.flush(Drive::Master),
        Err(AtaError::Timeout { .. })
    ));
    let [a, b] = r.chan.probe();
    assert!(matches!(a, Err(AtaError::Timeout { .. })) && a == b);

    r.ide.lock().stuck_busy = false;
    r.chan.probe()[0].clone().unwrap();
    let [d, _] = r.chan.into_disks();
    let mut d = d.unwrap();
    round_trip(&r.ide, &mut d, 0, 2, 1);
    r.ide.lock().stuck_busy = true;
    assert_eq!(d.write(0, &buf), Err(DevError::Io));
}

#[test]
fn a_dma_that_never_completes_times_out_and_the_channel_recovers() {
    let (ide, mut d) = one_disk(
        Disk::ata(1 << 16, true),
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    ide.lock().hang_next_dma = true;
    let before = ide.lock().accesses;
    let mut buf = vec![0u8; 2 * BLOCK_SIZE];
    assert_eq!(d.read(0, &mut buf), Err(DevError::Io));
    assert!(ide.lock().accesses - before < 33_000);
    let stats = d.stats();
    assert_eq!((stats.timeouts, stats.resets), (1, 2));
    round_trip(&ide, &mut d, 0, 2, 1);
}

#[test]
fn no_drive_is_detected() {
    // Nothing on the channel: every register floats.
    let mut r = rig([None, None], Layout::Contiguous, true, 64 * 1024);
    assert_eq!(
        r.chan.probe(),
        [Err(AtaError::NoDrive), Err(AtaError::NoDrive)]
    );
    assert_eq!(r.chan.stats().resets, 0);
    let [a, b] = r.chan.into_disks();
    assert!(a.is_none() && b.is_none());

    // An ATAPI master (a CD-ROM) and a disk as slave.
    let mut r = rig(
        [Some(Disk::atapi()), Some(Disk::ata(1 << 16, true))],
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    let [m, s] = r.chan.probe();
    assert_eq!(m, Err(AtaError::NotAta));
    assert_eq!(s.unwrap().drive, Drive::Slave);
    assert_eq!(r.chan.stats().errors, 0);

    // A slave alone.
    let mut r = rig(
        [None, Some(Disk::ata(1 << 16, false))],
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    let [m, s] = r.chan.probe();
    assert_eq!(m, Err(AtaError::NoDrive));
    let [none, d] = r.chan.into_disks();
    assert!(none.is_none());
    let mut d = d.unwrap();
    assert_eq!(d.drive(), Drive::Slave);
    assert_eq!(s.unwrap().sectors, 1 << 16);
    round_trip(&r.ide, &mut d, 5, 3, 1);
}

#[test]
fn an_atapi_device_that_aborts_identify_is_not_a_disk() {
    let mut atapi = Disk::atapi();
    atapi.atapi_drdy = true;
    let mut r = rig([Some(atapi), None], Layout::Contiguous, true, 64 * 1024);
    assert_eq!(
        r.chan.probe(),
        [Err(AtaError::NotAta), Err(AtaError::NoDrive)]
    );
    assert_eq!(
        r.ide.lock().commands[0].code,
        0xEC,
        "identified, then refused"
    );
    assert_eq!(r.chan.stats().errors, 0);
}

#[test]
fn identify_after_io_is_not_fooled_by_stale_registers() {
    // The last transfer leaves LBA mid/high = 0x14/0xEB: the ATAPI signature's values.
    let mut r = rig(
        master(Disk::ata(BIG, true)),
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    r.chan.probe()[0].clone().unwrap();
    let mut sector = [0u8; 512];
    r.chan
        .read(Drive::Master, 0x00EB_1400, &mut sector)
        .unwrap();
    assert_eq!(r.chan.identify(Drive::Master).unwrap().sectors, BIG);
}

#[test]
fn master_and_slave_share_the_channel() {
    let mut r = rig(
        [
            Some(Disk::ata(1 << 16, true)),
            Some(Disk::ata(1 << 18, false)),
        ],
        Layout::Contiguous,
        true,
        64 * 1024,
    );
    let [m, s] = r.chan.probe();
    assert!(m.unwrap().lba48 && !s.unwrap().lba48);
    let [a, b] = r.chan.into_disks();
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    let (pa, pb) = (pattern(4, 20, 1), pattern(4, 20, 2));
    a.write(4, &pa).unwrap();
    b.write(4, &pb).unwrap();
    let (mut ra, mut rb) = (vec![0; pa.len()], vec![0; pb.len()]);
    b.read(4, &mut rb).unwrap();
    a.read(4, &mut ra).unwrap();
    assert!(ra == pa && rb == pb);
    assert!(on_disk(&r.ide, 0, 4, 20) == pa && on_disk(&r.ide, 1, 4, 20) == pb);
    let s = r.ide.lock();
    let codes: Vec<(u8, usize)> = s
        .commands
        .iter()
        .skip(2)
        .map(|c| (c.code, c.drive))
        .collect();
    assert_eq!(codes[0], (0x35, 0));
    assert!(codes.contains(&(0xCA, 1)) && codes.contains(&(0xC8, 1)));
    drop(s);
    // Both disks count into the channel's statistics.
    assert_eq!(a.stats(), b.stats());
    assert_eq!(
        a.with_channel(|c| c.drive(Drive::Slave).map(|i| i.sectors)),
        Some(1 << 18)
    );
}

#[test]
fn pio_without_a_bus_master_block() {
    for lba48 in [true, false] {
        let mut r = rig(
            master(Disk::ata(1 << 20, lba48)),
            Layout::Contiguous,
            false,
            64 * 1024,
        );
        r.chan.probe()[0].clone().unwrap();
        assert_eq!(r.chan.transfer_mode(Drive::Master), Some(TransferMode::Pio));
        assert_eq!(r.chan.dma_unavailable(), None);
        let [d, _] = r.chan.into_disks();
        let mut d = d.unwrap();
        clear_log(&r.ide);
        round_trip(&r.ide, &mut d, 2, 40, 5);
        let (w, rd) = if lba48 { (0x34, 0x24) } else { (0x30, 0x20) };
        assert_eq!(
            commands(&r.ide),
            [(w, 16, 256), (w, 272, 64), (rd, 16, 256), (rd, 272, 64)]
        );
        let last = d.num_blocks() - 1;
        round_trip(&r.ide, &mut d, last, 1, 6);
        let stats = d.stats();
        assert_eq!(stats.dma_commands, 0);
        assert!(stats.pio_commands >= 6);
        clear_log(&r.ide);
        d.flush().unwrap();
        assert_eq!(commands(&r.ide)[0].0, if lba48 { 0xEA } else { 0xE7 });
    }
}

#[test]
fn unusable_dma_memory_or_a_drive_without_dma_falls_back_to_pio() {
    for (layout, why) in [
        (Layout::High, DmaError::AboveLimit),
        (Layout::Untranslatable, DmaError::Untranslated),
    ] {
        let mut r = rig(master(Disk::ata(1 << 16, true)), layout, true, 64 * 1024);
        assert_eq!(r.chan.dma_unavailable(), Some(why));
        r.chan.probe()[0].clone().unwrap();
        assert_eq!(r.chan.transfer_mode(Drive::Master), Some(TransferMode::Pio));
        let [d, _] = r.chan.into_disks();
        let mut d = d.unwrap();
        round_trip(&r.ide, &mut d, 1, 3, 1);
        assert_eq!(d.stats().dma_commands, 0);
    }
    let mut disk = Disk::ata(1 << 16, true);
    disk.dma = false;
    let mut r = rig(master(disk), Layout::Contiguous, true, 64 * 1024);
    r.chan.probe()[0].clone().unwrap();
    assert_eq!(r.chan.transfer_mode(Drive::Master), Some(TransferMode::Pio));
    let [d, _] = r.chan.into_disks();
    let mut d = d.unwrap();
    round_trip(&r.ide, &mut d, 1, 3, 1);
    assert_eq!(d.stats().dma_commands, 0);
}

#[test]
fn too_little_dma_memory_falls_back_to_pio() {
    // 16 pages of fake memory, 4 of them reserved: a 128 KiB bounce buffer does not fit.
    let mem = PhysMem::new(Layout::Contiguous, 16);
    let ide = Ide::new(master(Disk::ata(1 << 16, true)), mem.clone(), true);
    let ports = ChannelPorts {
        command: CMD,
        control: CTRL,
        bus_master: Some(BM),
    };
    let mut chan = IdeChannel::new(
        ide.clone(),
        FakeDma::new(mem),
        PollClock::new(1),
        ports,
        Config::default(),
    );
    assert_eq!(chan.dma_unavailable(), Some(DmaError::NoMemory));
    chan.probe()[0].clone().unwrap();
    let mut buf = pattern(0, 2, 1);
    chan.write(Drive::Master, 0, &buf).unwrap();
    chan.read(Drive::Master, 0, &mut buf).unwrap();
    assert_eq!(buf, pattern(0, 2, 1));
}
