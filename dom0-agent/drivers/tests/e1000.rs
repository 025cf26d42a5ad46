//! The 8254x driver against the software model of the NIC: bring-up (reset, interrupts,
//! link, filters, both rings), the MAC address both ways, timeouts, the link bit, the I/O
//! window, DMA memory laid out every way the fake memory can, and stopping on drop. Traffic
//! is in `e1000_traffic.rs`.

// Ring sizes, frame numbers and lengths in these tests are small by construction.
#![allow(clippy::cast_possible_truncation)]

mod model;

use dom0_drivers::dma::Dma;
use dom0_drivers::e1000::{BUF_SIZE, E1000, E1000Error, IoWindow, RX_SLOTS, Regs, Stats, TX_SLOTS};
use dom0_drivers::hw::PollClock;
use dom0_drivers::nic::{MAX_FRAME, Nic};
use model::e1000::rig::{MAC, device, frame, recv_vec, start, up};
use model::e1000::{
    CTRL, CTRL_ASDE, CTRL_ILOS, CTRL_LRST, CTRL_PHY_RST, CTRL_RST, CTRL_SLU, CTRL_VME, E1000Model,
    ICR, IMS, IO_BASE, MTA, RAH_AV, RAH0, RAL0, RCTL, RCTL_BAM, RCTL_EN, RCTL_MPE, RCTL_SECRC,
    RCTL_UPE, RDBAH, RDBAL, RDH, RDLEN, RDT, TCTL, TCTL_EN, TCTL_PSP, TDBAH, TDBAL, TDH, TDLEN,
    TDT, TIPG,
};
use model::mem::{FakeDma, Layout, PhysMem};

#[test]
fn bring_up_resets_then_programs_link_filters_and_both_rings() {
    let (nic, drv) = up();
    let st = nic.lock();
    let writes = st.writes.clone();
    drop(st);
    let pos = |f: &dyn Fn(&(u32, u32)) -> bool| writes.iter().position(f).unwrap();
    let reset = pos(&|&(o, v)| o == CTRL && v & CTRL_RST != 0);
    assert_eq!(writes[0], (0x00D8, u32::MAX), "interrupts masked first");
    assert_eq!(nic.lock().resets, 1);
    for reg in [RCTL, TCTL, RDBAL, TDBAL, RDT, TDT] {
        assert!(
            pos(&|&(o, _)| o == reg) > reset,
            "{reg:#x} written before the reset"
        );
    }
    // The rings are complete before each direction is enabled.
    assert!(pos(&|&(o, _)| o == RCTL) > pos(&|&(o, _)| o == RDT));
    assert!(pos(&|&(o, _)| o == TCTL) > pos(&|&(o, _)| o == TDT));

    assert_eq!(nic.reg(IMS), 0, "all interrupts masked");
    assert_eq!(nic.reg(ICR), 0, "pending causes read away");
    let ctrl = nic.reg(CTRL);
    assert_eq!(ctrl & (CTRL_SLU | CTRL_ASDE), CTRL_SLU | CTRL_ASDE);
    assert_eq!(
        ctrl & (CTRL_LRST | CTRL_ILOS | CTRL_PHY_RST | CTRL_RST | CTRL_VME),
        0
    );
    for i in 0..128 {
        assert_eq!(nic.reg(MTA + 4 * i), 0, "MTA[{i}]");
    }

    assert_eq!(
        nic.reg(RCTL),
        RCTL_EN | RCTL_UPE | RCTL_MPE | RCTL_BAM | RCTL_SECRC,
        "promiscuous, broadcast, 2048-byte buffers, CRC stripped, nothing else"
    );
    assert_eq!(nic.reg(RCTL), 0x0400_801A);
    assert_eq!(nic.reg(TCTL), TCTL_EN | TCTL_PSP | 0x10 << 4 | 0x40 << 12);
    assert_eq!(nic.reg(TCTL), 0x0004_010A);
    assert_eq!(nic.reg(TIPG), 10 | 8 << 10 | 6 << 20);

    assert_eq!(nic.reg(RDLEN) as usize, RX_SLOTS * 16);
    assert_eq!(nic.reg(TDLEN) as usize, TX_SLOTS * 16);
    assert_eq!((nic.reg(RDH), nic.reg(RDT)), (0, RX_SLOTS as u32 - 1));
    assert_eq!((nic.reg(TDH), nic.reg(TDT)), (0, 0));
    assert_eq!((nic.reg(RDBAH), nic.reg(TDBAH)), (0, 0));
    assert_eq!(nic.reg(RDBAL) % 16, 0);
    assert_eq!(nic.reg(TDBAL) % 16, 0);
    assert_ne!(nic.reg(RDBAL), nic.reg(TDBAL));

    // Every receive slot is posted with its own whole buffer, status clear (the model checks
    // that each address lies in the driver's memory when it reads the descriptor).
    let mut bufs: Vec<u64> = (0..RX_SLOTS as u32)
        .map(|i| {
            let (addr, len, status) = nic.rx_desc(i);
            assert_eq!((len, status), (0, 0), "slot {i}");
            addr
        })
        .collect();
    bufs.sort_unstable();
    for pair in bufs.windows(2) {
        assert!(pair[1] - pair[0] >= BUF_SIZE as u64, "buffers overlap");
    }
    assert_eq!(drv.mac(), MAC);
    assert_eq!(drv.stats(), Stats::default());
}

#[test]
fn mac_from_the_receive_address_when_the_device_loaded_it() {
    let (mem, nic) = device(Layout::Contiguous);
    nic.lock().ral_from_eeprom = true;
    let drv = start(&nic, &mem).unwrap();
    assert_eq!(drv.mac(), MAC);
    assert_eq!(nic.lock().eeprom_reads, 0, "no EEPROM read needed");
}

#[test]
fn mac_from_the_eeprom_when_the_receive_address_is_empty_as_in_bochs() {
    let (nic, drv) = up();
    assert_eq!(drv.mac(), MAC);
    assert_eq!(nic.lock().eeprom_reads, 3);
    // And the filter's first entry now holds it, marked valid.
    assert_eq!(nic.reg(RAL0), 0x1200_5452);
    assert_eq!(nic.reg(RAH0), 0x5634 | RAH_AV);
}

#[test]
fn a_stale_eeprom_result_is_not_taken_for_the_next_word() {
    let (mem, nic) = device(Layout::Contiguous);
    nic.lock().eerd_stale = 3;
    let drv = start(&nic, &mem).unwrap();
    assert_eq!(drv.mac(), MAC);
}

#[test]
fn garbage_in_the_receive_address_falls_back_to_the_eeprom() {
    for garbage in [
        (0xFFFF_FFFF, 0xFFFF_FFFF), // all ones, valid bit set: broadcast
        (0x0000_5E01, 0x8000_0100), // a multicast address
        (0, RAH_AV),                // all zeros, "valid"
        (0x1200_5452, 0x0000_5634), // right address, valid bit clear
    ] {
        let (mem, nic) = device(Layout::Contiguous);
        nic.lock().ral_override = Some(garbage);
        let drv = start(&nic, &mem).unwrap();
        assert_eq!(drv.mac(), MAC, "{garbage:x?}");
        assert_eq!(nic.reg(RAH0), 0x5634 | RAH_AV);
    }
}

#[test]
fn no_valid_mac_anywhere_is_an_error() {
    let (mem, nic) = device(Layout::Contiguous);
    nic.lock().eeprom[..3].fill(0xFFFF);
    assert_eq!(start(&nic, &mem).err(), Some(E1000Error::BadMac([0xFF; 6])));
    let (mem, nic) = device(Layout::Contiguous);
    nic.lock().eeprom[..3].copy_from_slice(&[0x0001, 0x0000, 0x0000]);
    assert_eq!(
        start(&nic, &mem).err(),
        Some(E1000Error::BadMac([1, 0, 0, 0, 0, 0]))
    );
}

#[test]
fn a_reset_that_never_completes_is_a_timeout_not_a_hang() {
    let (mem, nic) = device(Layout::Contiguous);
    nic.lock().reset_stuck = true;
    let mut clock = PollClock::new(1);
    let got = E1000::new(nic.clone(), FakeDma::new(mem), &mut clock);
    assert_eq!(got.err(), Some(E1000Error::ResetTimeout));
    // 100 ms of 1 µs polls, and not much more.
    assert!(clock.readings() < 250_000, "{} polls", clock.readings());
    // Nothing but CTRL was touched after the reset began (the model panics otherwise).
    assert_eq!(nic.reg(RCTL), 0);
}

#[test]
fn an_eeprom_that_never_answers_is_a_timeout() {
    let (mem, nic) = device(Layout::Contiguous);
    nic.lock().eerd_never_done = true;
    assert_eq!(start(&nic, &mem).err(), Some(E1000Error::EepromTimeout(0)));
    assert_eq!(nic.reg(RCTL) & RCTL_EN, 0, "receiver left off");
}

#[test]
fn link_follows_status_lu() {
    let (nic, mut drv) = up();
    assert!(drv.link_up());
    nic.lock().link = false;
    assert!(!drv.link_up());
    nic.lock().link = true;
    assert!(Nic::link_up(&mut drv));
}

#[test]
fn the_io_window_reaches_the_same_registers() {
    let (mem, nic) = device(Layout::Contiguous);
    let regs = IoWindow::new(nic.clone(), IO_BASE).unwrap();
    assert_eq!(regs.base(), IO_BASE);
    let mut drv = E1000::new(regs, FakeDma::new(mem), PollClock::new(1)).unwrap();
    assert_eq!(drv.mac(), MAC);
    assert!(
        nic.lock().io_accesses > 2 * 128,
        "everything went through the ports"
    );
    drv.send(&frame(1, 100)).unwrap();
    assert_eq!(nic.lock().sent, vec![frame(1, 100)]);
    assert!(nic.receive(&frame(2, 100)));
    let mut out = [0u8; MAX_FRAME];
    assert_eq!(drv.recv(&mut out), Some(100));
    assert_eq!(out[..100].to_vec(), frame(2, 100));

    // IOADDR then IODATA, for reads and writes alike.
    let mut win = IoWindow::new(nic.clone(), IO_BASE).unwrap();
    win.write32(MTA + 4, 0x1234_5678);
    assert_eq!(nic.reg(MTA + 4), 0x1234_5678);
    assert_eq!(win.read32(MTA + 4), 0x1234_5678);

    assert!(IoWindow::new(nic.clone(), 0).is_none());
    assert!(IoWindow::new(nic.clone(), 0xFFF9).is_none());
    assert!(IoWindow::new(nic, 0xFFF8).is_some());
}

#[test]
fn a_stub_io_window_as_in_bochs_fails_cleanly() {
    let (mem, nic) = device(Layout::Contiguous);
    nic.lock().io_stub = true;
    let regs = IoWindow::new(nic.clone(), IO_BASE).unwrap();
    let got = E1000::new(regs, FakeDma::new(mem), PollClock::new(1));
    assert_eq!(got.err(), Some(E1000Error::EepromTimeout(0)));
}

#[test]
fn rings_above_4_gib_use_the_high_address_halves() {
    let (mem, nic) = device(Layout::High);
    let mut drv = start(&nic, &mem).unwrap();
    assert_eq!((nic.reg(RDBAH), nic.reg(TDBAH)), (1, 1));
    assert!(nic.rx_desc(0).0 > 1 << 32);
    for n in 0..2 * RX_SLOTS as u32 {
        drv.send(&frame(n, 1518)).unwrap();
        assert!(nic.receive(&frame(n, 1518)));
        assert_eq!(recv_vec(&mut drv), Some(frame(n, 1518)));
    }
    assert_eq!(nic.lock().sent.len(), 2 * RX_SLOTS);
}

#[test]
fn buffers_need_only_be_contiguous_slot_by_slot() {
    // Pages swapped in pairs: the buffer area is not contiguous, each 2 KiB slot is.
    let (mem, nic) = device(Layout::PairSwapped);
    let mut drv = start(&nic, &mem).unwrap();
    for n in 0..2 * RX_SLOTS as u32 {
        drv.send(&frame(n, 1500)).unwrap();
        assert_eq!(nic.lock().sent.last(), Some(&frame(n, 1500)));
        assert!(nic.receive(&frame(n, 1500)));
        assert_eq!(recv_vec(&mut drv), Some(frame(n, 1500)));
    }
}

#[test]
fn unusable_dma_memory_is_refused_before_the_device_is_touched() {
    let (mem, nic) = device(Layout::Untranslatable);
    assert_eq!(start(&nic, &mem).err(), Some(E1000Error::Untranslated));
    assert!(nic.lock().writes.is_empty());

    let mem = PhysMem::new(Layout::Contiguous, 12);
    let nic = E1000Model::new(mem.clone(), MAC);
    assert_eq!(start(&nic, &mem).err(), Some(E1000Error::NoDmaMemory));
    assert!(nic.lock().writes.is_empty());

    let (mem, nic) = device(Layout::Contiguous);
    let skewed = Skewed(FakeDma::new(mem));
    let got = E1000::new(nic.clone(), skewed, PollClock::new(1));
    assert!(
        matches!(got.err(), Some(E1000Error::MisalignedRing(bus)) if bus % 16 == 8),
        "ring at an odd 8 bytes"
    );
    assert!(nic.lock().writes.is_empty());
}

/// A `Dma` whose bus addresses are 8 bytes off (a broken dom0 mapping).
struct Skewed(FakeDma);

impl Dma for Skewed {
    type Buf = <FakeDma as Dma>::Buf;
    fn alloc(&mut self, bytes: usize, align: usize) -> Option<Self::Buf> {
        self.0.alloc(bytes, align)
    }
    fn translate(&self, addr: u64, len: usize) -> Option<u64> {
        Some(self.0.translate(addr, len)? + 8)
    }
}

#[test]
fn dropping_the_driver_stops_the_device_first() {
    let (nic, mut drv) = up();
    drv.send(&frame(1, 100)).unwrap();
    let before = nic.lock().writes.len();
    drop(drv);
    // Receiver and transmitter off, then the reset.
    let writes = nic.lock().writes[before..].to_vec();
    assert_eq!(writes.len(), 3, "{writes:x?}");
    assert_eq!(writes[0], (RCTL, 0));
    assert_eq!(writes[1], (TCTL, 0));
    assert_eq!((writes[2].0, writes[2].1 & CTRL_RST), (CTRL, CTRL_RST));
    assert_eq!(nic.reg(RCTL) & RCTL_EN, 0);
    assert_eq!(nic.reg(TCTL) & TCTL_EN, 0);
    assert_eq!(nic.lock().resets, 2);
    // Nothing arrives in memory that is no longer the driver's.
    assert!(!nic.receive(&frame(2, 100)));
}
