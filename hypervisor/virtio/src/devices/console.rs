//! virtio-console device model (virtio 1.2 §5.3), single port: receiveq 0 carries input
//! to the guest, transmitq 1 carries its output to a [`ConsoleBackend`].
//!
//! Input the guest has not posted buffers for waits in a bounded FIFO ([`INPUT_FIFO`]
//! bytes); beyond that, bytes are dropped and counted, so a host writer cannot make the
//! hypervisor allocate without bound. Output is forwarded in chunks of at most
//! [`OUTPUT_CHUNK`] bytes per buffer (longer buffers are truncated and counted).

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::device::{DeviceError, QueueSet, VirtioDevice, read_config_bytes};
use crate::mem::GuestMemory;
use crate::queue::Chain;

/// Device type of virtio-console (virtio 1.2 §5.3.1).
pub const DEVICE_ID_CONSOLE: u32 = 3;
/// receiveq(port0) (virtio 1.2 §5.3.2).
pub const RX_QUEUE: usize = 0;
/// transmitq(port0).
pub const TX_QUEUE: usize = 1;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 64;
/// Input bytes held while the guest has no receive buffer.
pub const INPUT_FIFO: usize = 4096;
/// Largest output buffer forwarded.
pub const OUTPUT_CHUNK: usize = 4096;

/// Feature bits (virtio 1.2 §5.3.3).
pub mod feature {
    pub const SIZE: u64 = 1;
}

/// Where guest console output goes (the hypervisor console, a log).
pub trait ConsoleBackend {
    /// Bytes the guest wrote.
    fn output(&mut self, bytes: &[u8]);
}

impl ConsoleBackend for Vec<u8> {
    fn output(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Per-device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    pub input_dropped: u64,
    pub output_truncated: u64,
}

/// The virtio-console device model.
pub struct ConsoleDevice<C> {
    backend: C,
    cols: u16,
    rows: u16,
    pending: VecDeque<u8>,
    chain: Chain,
    buf: Vec<u8>,
    stats: ConsoleStats,
}

impl<C: ConsoleBackend> ConsoleDevice<C> {
    /// A console of `cols` x `rows`.
    pub fn new(backend: C, cols: u16, rows: u16) -> Self {
        ConsoleDevice {
            backend,
            cols,
            rows,
            pending: VecDeque::new(),
            chain: Chain::new(),
            buf: Vec::new(),
            stats: ConsoleStats::default(),
        }
    }
    /// The backend.
    pub fn backend(&self) -> &C {
        &self.backend
    }
    /// Counters.
    pub fn stats(&self) -> ConsoleStats {
        self.stats
    }

    /// Queues input for the guest and delivers what fits in posted buffers.
    pub fn input<M: GuestMemory + ?Sized>(
        &mut self,
        queues: &mut QueueSet<'_>,
        mem: &M,
        bytes: &[u8],
    ) -> Result<(), DeviceError> {
        for &b in bytes {
            if self.pending.len() >= INPUT_FIFO {
                self.stats.input_dropped += 1;
            } else {
                self.pending.push_back(b);
            }
        }
        self.deliver(queues, mem)
    }

    fn deliver<M: GuestMemory + ?Sized>(
        &mut self,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        if self.pending.is_empty() || !queues.is_ready(RX_QUEUE) {
            return Ok(());
        }
        let q = queues.get(RX_QUEUE)?;
        while !self.pending.is_empty() && q.pop(mem, &mut self.chain)? {
            let room = self.chain.writable_len() as usize;
            let n = room.min(self.pending.len());
            self.buf.clear();
            self.buf.extend(self.pending.drain(..n));
            self.chain.write_at(mem, 0, &self.buf)?;
            // n <= writable_len, a u32.
            q.add_used(mem, self.chain.head(), u32::try_from(n).unwrap_or(0))?;
        }
        Ok(())
    }

    fn drain_output<M: GuestMemory + ?Sized>(
        &mut self,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        let q = queues.get(TX_QUEUE)?;
        while q.pop(mem, &mut self.chain)? {
            let len = self.chain.readable_len() as usize;
            let n = len.min(OUTPUT_CHUNK);
            if n < len {
                self.stats.output_truncated += 1;
            }
            self.buf.resize(n, 0);
            self.chain.read_at(mem, 0, &mut self.buf)?;
            self.backend.output(&self.buf);
            q.add_used(mem, self.chain.head(), 0)?;
        }
        Ok(())
    }
}

impl<C: ConsoleBackend> VirtioDevice for ConsoleDevice<C> {
    fn device_id(&self) -> u32 {
        DEVICE_ID_CONSOLE
    }
    fn device_features(&self) -> u64 {
        feature::SIZE
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn queue_max_size(&self, _index: usize) -> u16 {
        QUEUE_SIZE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio 1.2 §5.3.4: cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
        let mut c = [0u8; 12];
        c[0..2].copy_from_slice(&self.cols.to_le_bytes());
        c[2..4].copy_from_slice(&self.rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, which we do not offer.
        false
    }
    fn activate(&mut self, _features: u64) {}
    fn reset(&mut self) {
        self.pending.clear();
    }
    fn queue_notify<M: GuestMemory + ?Sized>(
        &mut self,
        queue: usize,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        match queue {
            RX_QUEUE => self.deliver(queues, mem),
            TX_QUEUE => self.drain_output(queues, mem),
            _ => Err(DeviceError::QueueNotReady(queue)),
        }
    }
}
