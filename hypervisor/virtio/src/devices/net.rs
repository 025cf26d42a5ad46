//! virtio-net device model (virtio 1.2 §5.1): one receive and one transmit queue, the
//! 12-byte `virtio_net_hdr`, a MAC address and link status in config space.
//!
//! Frames leave through a [`NetBackend`] (the virtual switch); frames arrive through
//! [`NetDevice::receive`], called by the switch inside
//! [`crate::transport::MmioTransport::with_device`]. No offloads are offered, so every
//! header the device writes is all zeros except `num_buffers = 1`, and transmit headers are
//! parsed only to be skipped. Frames longer than [`MAX_FRAME`] are dropped and counted.

use alloc::vec::Vec;

use crate::device::{DeviceError, QueueSet, VirtioDevice, read_config_bytes};
use crate::mem::GuestMemory;
use crate::queue::Chain;

/// Device type of virtio-net (virtio 1.2 §5.1.1).
pub const DEVICE_ID_NET: u32 = 1;
/// Receive queue index (virtio 1.2 §5.1.2).
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr` length with VIRTIO_F_VERSION_1 (virtio 1.2 §5.1.6: `num_buffers` is
/// always present).
pub const NET_HDR_LEN: u32 = 12;
/// Largest Ethernet frame (no FCS) we carry: 1500 bytes MTU + 14 header + 4 VLAN tag.
pub const MAX_FRAME: usize = 1518;

/// Feature bits (virtio 1.2 §5.1.3).
pub mod feature {
    pub const MAC: u64 = 1 << 5;
    pub const STATUS: u64 = 1 << 16;
}

/// `status` field: link up (virtio 1.2 §5.1.4).
pub const S_LINK_UP: u16 = 1;

/// Where transmitted frames go.
pub trait NetBackend {
    /// One Ethernet frame from the guest (without the virtio-net header).
    fn transmit(&mut self, frame: &[u8]);
}

/// A backend that keeps the frames (tests) or only counts them (benchmarks, `keep = false`).
#[derive(Default)]
pub struct FrameSink {
    pub keep: bool,
    pub frames: Vec<Vec<u8>>,
    pub count: u64,
}

impl NetBackend for FrameSink {
    fn transmit(&mut self, frame: &[u8]) {
        self.count += 1;
        if self.keep {
            self.frames.push(frame.to_vec());
        }
    }
}

/// Per-device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
}

/// The virtio-net device model.
pub struct NetDevice<N> {
    backend: N,
    mac: [u8; 6],
    link_up: bool,
    features: u64,
    chain: Chain,
    frame: Vec<u8>,
    stats: NetStats,
}

impl<N: NetBackend> NetDevice<N> {
    /// A NIC with address `mac`, link up.
    pub fn new(backend: N, mac: [u8; 6]) -> Self {
        NetDevice {
            backend,
            mac,
            link_up: true,
            features: 0,
            chain: Chain::new(),
            frame: Vec::with_capacity(MAX_FRAME),
            stats: NetStats::default(),
        }
    }
    /// The backend.
    pub fn backend(&self) -> &N {
        &self.backend
    }
    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut N {
        &mut self.backend
    }
    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }
    /// Sets the link state; the caller then calls `MmioTransport::config_changed`.
    pub fn set_link(&mut self, up: bool) {
        self.link_up = up;
    }
    /// Link state.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Delivers one frame into the next receive buffer. `Ok(false)` if it was dropped: the
    /// link is down, the frame is too big, or the driver has posted no buffer (the switch
    /// may retry later).
    pub fn receive<M: GuestMemory + ?Sized>(
        &mut self,
        queues: &mut QueueSet<'_>,
        mem: &M,
        frame: &[u8],
    ) -> Result<bool, DeviceError> {
        if !self.link_up || frame.len() > MAX_FRAME {
            self.stats.rx_dropped += 1;
            return Ok(false);
        }
        let q = queues.get(RX_QUEUE)?;
        if !q.pop(mem, &mut self.chain)? {
            self.stats.rx_dropped += 1;
            return Ok(false);
        }
        // The frame length is at most MAX_FRAME, so the conversion cannot fail.
        let need = NET_HDR_LEN + u32::try_from(frame.len()).unwrap_or(u32::MAX - NET_HDR_LEN);
        // virtio 1.2 §5.1.6.3.1: without MRG_RXBUF each buffer holds a whole packet; a
        // buffer too small for this one goes back to the ring for a smaller frame.
        if self.chain.writable_len() < need {
            q.undo_pop();
            self.stats.rx_dropped += 1;
            return Ok(false);
        }
        // virtio 1.2 §5.1.6.4: flags 0, gso_type NONE, num_buffers 1.
        let mut hdr = [0u8; NET_HDR_LEN as usize];
        hdr[10] = 1;
        self.chain.write_at(mem, 0, &hdr)?;
        self.chain.write_at(mem, NET_HDR_LEN, frame)?;
        q.add_used(mem, self.chain.head(), need)?;
        self.stats.rx_frames += 1;
        Ok(true)
    }

    fn transmit_all<M: GuestMemory + ?Sized>(
        &mut self,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        let q = queues.get(TX_QUEUE)?;
        loop {
            q.disable_notifications(mem)?;
            while q.pop(mem, &mut self.chain)? {
                // virtio 1.2 §5.1.6.2: each transmit chain is a header followed by the
                // packet, all device-readable.
                let total = self.chain.readable_len();
                if total < NET_HDR_LEN {
                    return Err(DeviceError::Malformed("virtio-net tx header (5.1.6.2)"));
                }
                let len = (total - NET_HDR_LEN) as usize;
                if len > MAX_FRAME || !self.link_up {
                    self.stats.tx_dropped += 1;
                } else {
                    // The header's offload fields are ignored: no offloads were offered
                    // (virtio 1.2 §5.1.6.2.2: the device ignores what it did not offer).
                    self.frame.resize(len, 0);
                    self.chain.read_at(mem, NET_HDR_LEN, &mut self.frame)?;
                    self.backend.transmit(&self.frame);
                    self.stats.tx_frames += 1;
                }
                // virtio 1.2 §2.7.8.1: nothing was written.
                q.add_used(mem, self.chain.head(), 0)?;
            }
            if !q.enable_notifications(mem)? {
                return Ok(());
            }
        }
    }
}

impl<N: NetBackend> VirtioDevice for NetDevice<N> {
    fn device_id(&self) -> u32 {
        DEVICE_ID_NET
    }
    fn device_features(&self) -> u64 {
        feature::MAC | feature::STATUS
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn queue_max_size(&self, _index: usize) -> u16 {
        QUEUE_SIZE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio 1.2 §5.1.4: mac[6], status u16, max_virtqueue_pairs u16.
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up { S_LINK_UP } else { 0 };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // virtio 1.2 §5.1.4.2: the driver MUST NOT write the config with VERSION_1.
        false
    }
    fn activate(&mut self, features: u64) {
        self.features = features;
    }
    fn reset(&mut self) {
        self.features = 0;
    }
    fn queue_notify<M: GuestMemory + ?Sized>(
        &mut self,
        queue: usize,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        match queue {
            // New receive buffers: nothing to do until a frame arrives.
            RX_QUEUE => Ok(()),
            TX_QUEUE => self.transmit_all(queues, mem),
            _ => Err(DeviceError::QueueNotReady(queue)),
        }
    }
}
