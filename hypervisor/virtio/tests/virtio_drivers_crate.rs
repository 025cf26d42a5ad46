//! Our device side driven by an independent driver: the `virtio-drivers` crate's block, net
//! and console drivers, over our MMIO register state machine, with a shared arena as both
//! the drivers' DMA memory and the devices' guest RAM.

// Test patterns are built from small integers; truncation to a byte is intended.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::{ArenaHal, RegTransport, guest_memory};
use hv_virtio::devices::block::{BlockDevice, MemDisk};
use hv_virtio::devices::console::ConsoleDevice;
use hv_virtio::devices::net::{FrameSink, NetDevice};
use hv_virtio::transport::INT_CONFIG_CHANGE;
use hv_virtio::{GuestAddr, GuestMemory, MmioTransport, TransportOptions, VirtioDevice};
use virtio_drivers::Error;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::net::VirtIONet;

fn attach<D: VirtioDevice>(
    device: D,
    options: TransportOptions,
) -> (Rc<RefCell<MmioTransport<D>>>, RegTransport<D>) {
    let dev = Rc::new(RefCell::new(MmioTransport::new(device, options)));
    let t = RegTransport::new(dev.clone(), guest_memory());
    (dev, t)
}

fn block_round_trip(options: TransportOptions) {
    let (dev, t) = attach(BlockDevice::new(MemDisk::new(2048, false)), options);
    let mut blk = VirtIOBlk::<ArenaHal, _>::new(t).expect("virtio-drivers accepted our device");
    assert_eq!(blk.capacity(), 2048);
    assert!(!blk.readonly());

    let mut data = vec![0u8; 4096];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    blk.write_blocks(100, &data).unwrap();
    let mut back = vec![0u8; 4096];
    blk.read_blocks(100, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        &dev.borrow().device().backend().bytes()[100 * 512..108 * 512],
        &data[..]
    );
    blk.flush().unwrap();
    assert_eq!(dev.borrow().device().backend().flushes, 1);

    let mut id = [0u8; 20];
    let n = blk.device_id(&mut id).unwrap();
    assert_eq!(&id[..n], b"hv-memdisk");

    // Beyond the end of the disk: IOERR in-band, device still healthy.
    assert_eq!(blk.read_blocks(2047, &mut back), Err(Error::IoError));
    assert!(!dev.borrow().needs_reset());
    let stats = dev.borrow().device().stats();
    assert_eq!((stats.reads, stats.writes, stats.io_errors), (1, 1, 1));
}

#[test]
fn block_with_indirect_and_event_idx() {
    block_round_trip(TransportOptions {
        indirect: true,
        event_idx: true,
    });
}

#[test]
fn block_without_ring_features() {
    block_round_trip(TransportOptions {
        indirect: false,
        event_idx: false,
    });
}

#[test]
fn block_many_requests_wrap_the_ring() {
    let (dev, t) = attach(
        BlockDevice::new(MemDisk::new(256, false)),
        TransportOptions::default(),
    );
    let mut blk = VirtIOBlk::<ArenaHal, _>::new(t).unwrap();
    let mut buf = [0u8; 512];
    for i in 0..100u8 {
        buf.fill(i);
        blk.write_blocks(usize::from(i), &buf).unwrap();
    }
    for i in 0..100u8 {
        blk.read_blocks(usize::from(i), &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == i));
    }
    assert!(!dev.borrow().needs_reset());
}

#[test]
fn read_only_disk_refuses_writes() {
    let (_dev, t) = attach(
        BlockDevice::new(MemDisk::new(16, true)),
        TransportOptions::default(),
    );
    let mut blk = VirtIOBlk::<ArenaHal, _>::new(t).unwrap();
    assert!(blk.readonly());
    assert_eq!(blk.write_blocks(0, &[1u8; 512]), Err(Error::IoError));
}

#[test]
fn corrupted_ring_breaks_the_device_not_the_host() {
    let (dev, t) = attach(
        BlockDevice::new(MemDisk::new(16, false)),
        TransportOptions::default(),
    );
    let mem = t.mem.clone();
    let mut blk = VirtIOBlk::<ArenaHal, _>::new(t).unwrap();
    let mut buf = [0u8; 512];
    blk.read_blocks(0, &mut buf).unwrap();
    // Find the available ring through the register file, and make the driver "publish" 40
    // buffers on a 16-entry queue.
    let avail = {
        let mut d = dev.borrow_mut();
        d.write(&*mem, hv_virtio::transport::reg::QUEUE_SEL, 4, 0);
        d.read(hv_virtio::transport::reg::QUEUE_DRIVER_LOW, 4)
            | d.read(hv_virtio::transport::reg::QUEUE_DRIVER_HIGH, 4) << 32
    };
    let idx = mem.read_u16(GuestAddr(avail + 2)).unwrap();
    mem.write_u16(GuestAddr(avail + 2), idx.wrapping_add(40))
        .unwrap();
    dev.borrow_mut()
        .write(&*mem, hv_virtio::transport::reg::QUEUE_NOTIFY, 4, 0);
    let d = dev.borrow();
    assert!(d.needs_reset());
    assert_ne!(d.interrupt_status() & INT_CONFIG_CHANGE, 0);
    assert!(matches!(
        d.last_error(),
        Some(hv_virtio::DeviceError::Queue(
            hv_virtio::queue::QueueError::AvailIdxJump { .. }
        ))
    ));
    drop(d);
    std::mem::forget(blk); // its Drop would reset through the broken ring; not under test
}

#[test]
fn net_transmit_and_receive() {
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let (dev, t) = attach(
        NetDevice::new(
            FrameSink {
                keep: true,
                ..FrameSink::default()
            },
            mac,
        ),
        TransportOptions::default(),
    );
    let mem = t.mem.clone();
    let mut net = VirtIONet::<ArenaHal, _, 16>::new(t, 2048).unwrap();
    assert_eq!(net.mac_address(), mac);

    let frame: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
    let mut tx = net.new_tx_buffer(frame.len());
    tx.packet_mut().copy_from_slice(&frame);
    net.send(tx).unwrap();
    assert_eq!(dev.borrow().device().backend().frames, vec![frame.clone()]);

    // A frame arrives from the switch.
    let incoming: Vec<u8> = (0..1500u32).map(|i| (i % 13) as u8).collect();
    let delivered = dev
        .borrow_mut()
        .with_device(&*mem, |d, qs, m| d.receive(qs, m, &incoming));
    assert_eq!(delivered, Some(true));
    let rx = net.receive().unwrap();
    assert_eq!(rx.packet(), &incoming[..]);
    net.recycle_rx_buffer(rx).unwrap();

    // Oversized frames are dropped and counted, the device stays healthy.
    let big = vec![0u8; 4000];
    let delivered = dev
        .borrow_mut()
        .with_device(&*mem, |d, qs, m| d.receive(qs, m, &big));
    assert_eq!(delivered, Some(false));
    assert!(!dev.borrow().needs_reset());
    assert_eq!(dev.borrow().device().stats().rx_dropped, 1);
}

#[test]
fn net_link_status_change_raises_config_interrupt() {
    let (dev, t) = attach(
        NetDevice::new(FrameSink::default(), [2, 0, 0, 0, 0, 9]),
        TransportOptions::default(),
    );
    let mut net = VirtIONet::<ArenaHal, _, 16>::new(t, 2048).unwrap();
    dev.borrow_mut().device_mut().set_link(false);
    dev.borrow_mut().config_changed();
    assert_ne!(dev.borrow().interrupt_status() & INT_CONFIG_CHANGE, 0);
    let _ = net.ack_interrupt();
    assert_eq!(dev.borrow().interrupt_status(), 0);
}

#[test]
fn console_output_and_input() {
    let (dev, t) = attach(
        ConsoleDevice::new(Vec::new(), 80, 25),
        TransportOptions::default(),
    );
    let mem = t.mem.clone();
    let mut con = VirtIOConsole::<ArenaHal, _>::new(t).unwrap();
    let size = con.size().unwrap().unwrap();
    assert_eq!((size.columns, size.rows), (80, 25));
    con.send_bytes(b"hello from the guest\n").unwrap();
    con.send(b'!').unwrap();
    assert_eq!(dev.borrow().device().backend(), b"hello from the guest\n!");

    dev.borrow_mut()
        .with_device(&*mem, |d, qs, m| d.input(qs, m, b"ls\n"))
        .unwrap();
    let mut got = Vec::new();
    while let Some(c) = con.recv(true).unwrap() {
        got.push(c);
    }
    assert_eq!(got, b"ls\n");
}
