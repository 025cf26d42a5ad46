//! Our drivers against our devices: pv-drivers' transport and drivers (block, net, console
//! from `virtio-drivers`, balloon ours) over the hypervisor's MMIO state machine and device
//! models, sharing one arena as DMA memory and guest RAM.

// Test patterns are built from small integers; truncation to a byte is intended.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::{ArenaHal, DeviceBus, GPA_BASE, arena, guest_memory};
use hv_virtio::devices::balloon::{BalloonDevice, BalloonLog, stat};
use hv_virtio::devices::block::{BlockDevice, MemDisk};
use hv_virtio::devices::console::ConsoleDevice;
use hv_virtio::devices::net::{FrameSink, NetDevice};
use hv_virtio::{GuestAddr, MmioTransport, TransportOptions, VirtioDevice};
use pv_drivers::devices::{Balloon, Block, Console, Net};
use pv_drivers::transport::RegisterTransport;

type Dev<D> = Rc<RefCell<MmioTransport<D>>>;

fn attach<D: VirtioDevice>(device: D) -> (Dev<D>, RegisterTransport<DeviceBus<D>>) {
    let dev = Rc::new(RefCell::new(MmioTransport::new(
        device,
        TransportOptions::default(),
    )));
    let bus = DeviceBus {
        dev: dev.clone(),
        mem: guest_memory(),
    };
    (dev, RegisterTransport::new(bus).expect("magic and version"))
}

#[test]
fn transport_refuses_a_window_without_the_magic() {
    struct Empty;
    impl pv_drivers::transport::RegisterBus for Empty {
        fn read(&self, _: u64, _: u8) -> u64 {
            0
        }
        fn write(&mut self, _: u64, _: u8, _: u64) {}
    }
    assert!(RegisterTransport::new(Empty).is_err());
}

#[test]
fn block_read_write_flush() {
    let (dev, t) = attach(BlockDevice::new(MemDisk::new(64, false)));
    let mut blk = Block::<ArenaHal, _>::new(t).unwrap();
    let data: Vec<u8> = (0..1024).map(|i| (i % 199) as u8).collect();
    blk.write_blocks(10, &data).unwrap();
    let mut back = vec![0u8; 1024];
    blk.read_blocks(10, &mut back).unwrap();
    assert_eq!(back, data);
    blk.flush().unwrap();
    assert_eq!(dev.borrow().device().stats().flushes, 1);
}

#[test]
fn net_round_trip() {
    let (dev, t) = attach(NetDevice::new(
        FrameSink {
            keep: true,
            ..FrameSink::default()
        },
        [2, 0, 0, 0, 0, 7],
    ));
    let mem = t.bus().mem.clone();
    let mut net = Net::<ArenaHal, _, 16>::new(t, 2048).unwrap();
    let mut tx = net.new_tx_buffer(60);
    tx.packet_mut().fill(0xee);
    net.send(tx).unwrap();
    assert_eq!(dev.borrow().device().backend().frames, vec![vec![0xee; 60]]);
    let frame = vec![0x11u8; 64];
    assert_eq!(
        dev.borrow_mut()
            .with_device(&*mem, |d, qs, m| d.receive(qs, m, &frame)),
        Some(true)
    );
    assert_eq!(net.receive().unwrap().packet(), &frame[..]);
}

#[test]
fn console_round_trip() {
    let (dev, t) = attach(ConsoleDevice::new(Vec::new(), 100, 40));
    let mem = t.bus().mem.clone();
    let mut con = Console::<ArenaHal, _>::new(t).unwrap();
    con.send_bytes(b"dom0 up\n").unwrap();
    assert_eq!(dev.borrow().device().backend(), b"dom0 up\n");
    dev.borrow_mut()
        .with_device(&*mem, |d, qs, m| d.input(qs, m, b"x"))
        .unwrap();
    assert_eq!(con.recv(true).unwrap(), Some(b'x'));
}

#[test]
fn balloon_inflate_deflate_stats_reporting() {
    let (dev, t) = attach(BalloonDevice::new(BalloonLog::default()));
    let mem = t.bus().mem.clone();
    let mut b = Balloon::<ArenaHal, _>::new(t).unwrap();

    // The host sets a target; the guest sees a configuration interrupt and the new value.
    dev.borrow_mut().device_mut().set_target(300);
    dev.borrow_mut().config_changed();
    assert!(b.ack_interrupt());
    assert_eq!(b.target_pages().unwrap(), 300);

    // Pages inside the arena, in 4 KiB frame numbers; 300 of them (two requests).
    let first = (GPA_BASE >> 12) as u32 + 512;
    let pfns: Vec<u32> = (first..first + 300).collect();
    b.inflate(&pfns).unwrap();
    b.set_actual_pages(300).unwrap();
    assert_eq!(dev.borrow().device().actual_pages(), 300);
    b.deflate(&pfns[..10]).unwrap();
    // A frame outside guest RAM is refused by the device, not passed on.
    b.inflate(&[1]).unwrap();
    {
        let d = dev.borrow();
        let log = d.device().backend();
        assert_eq!(log.inflated.len(), 300);
        assert_eq!(log.inflated[0], GuestAddr(u64::from(first) << 12));
        assert_eq!(log.deflated.len(), 10);
        assert_eq!(d.device().counters().bad_pfns, 1);
    }

    // Statistics: the host asks by returning the buffer; the guest answers.
    assert!(!b.update_stats(&[(stat::MEMFREE, 1)]).unwrap());
    let asked = dev
        .borrow_mut()
        .with_device(&*mem, |d, qs, m| d.request_stats(qs, m));
    assert_eq!(asked, Some(true));
    assert!(
        b.update_stats(&[(stat::MEMFREE, 123 << 20), (stat::MEMTOT, 1 << 30)])
            .unwrap()
    );
    assert_eq!(
        dev.borrow().device().guest_stats(),
        &[(stat::MEMFREE, 123 << 20), (stat::MEMTOT, 1 << 30)]
    );

    // Free page reporting: a 16 KiB free range. The arena Hal bounces it, so the device sees
    // the bounce copy's address: any range inside the arena.
    let mut free = vec![0u8; 16384];
    b.report_free(&mut free).unwrap();
    let reported = dev.borrow().device().backend().reported.clone();
    assert_eq!(reported.len(), 1);
    assert_eq!(reported[0].1, 16384);
    assert!(reported[0].0.raw() >= GPA_BASE);
    let _ = arena();
    assert!(!dev.borrow().needs_reset());
}
