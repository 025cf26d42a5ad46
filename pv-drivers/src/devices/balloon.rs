//! virtio-balloon driver (virtio 1.2 §5.5): inflate, deflate, memory statistics and free
//! page reporting, on the `virtio-drivers` crate's `VirtQueue`.
//!
//! The driver owns its queues and the statistics buffer, which stays lent to the device
//! between updates (virtio 1.2 §5.5.6.3: the device holds it until it wants new figures).
//! Queue indices follow the negotiated features contiguously (inflateq 0, deflateq 1, then
//! statsq, then reporting_vq), as Linux does. Inflate and deflate buffers carry at most
//! [`PFNS_PER_REQUEST`] page numbers; longer lists are sent in several requests.

use alloc::boxed::Box;
use alloc::vec::Vec;

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::{Error, Hal};

/// Feature bits (virtio 1.2 §5.5.3).
pub mod feature {
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const PAGE_REPORTING: u64 = 1 << 5;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Queue size used for every balloon queue.
pub const QUEUE_SIZE: usize = 16;
/// Page numbers per inflate or deflate request (Linux uses 256).
pub const PFNS_PER_REQUEST: usize = 256;
/// Statistics entries per update.
pub const MAX_STATS: usize = 10;
const STAT_BYTES: usize = 10;

/// The virtio-balloon driver.
pub struct Balloon<H: Hal, T: Transport> {
    transport: T,
    features: u64,
    inflateq: VirtQueue<H, QUEUE_SIZE>,
    deflateq: VirtQueue<H, QUEUE_SIZE>,
    statsq: Option<(u16, VirtQueue<H, QUEUE_SIZE>)>,
    reportq: Option<(u16, VirtQueue<H, QUEUE_SIZE>)>,
    stats_buf: Box<[u8; MAX_STATS * STAT_BYTES]>,
    stats_len: usize,
    stats_token: Option<u16>,
}

impl<H: Hal, T: Transport> Balloon<H, T> {
    /// Initialises the device (virtio 1.2 §3.1.1) and posts the first statistics buffer.
    pub fn new(mut transport: T) -> Result<Self, Error> {
        // `begin_init` negotiates through a bitflags type; do it by hand with raw bits.
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        let wanted = feature::STATS_VQ
            | feature::DEFLATE_ON_OOM
            | feature::PAGE_REPORTING
            | feature::INDIRECT_DESC
            | feature::EVENT_IDX
            | feature::VERSION_1;
        let features = offered & wanted;
        transport.write_driver_features(features);
        transport.set_status(
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK,
        );
        // virtio 1.2 §3.1.1 step 6: re-read status to check FEATURES_OK stuck.
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            transport.set_status(DeviceStatus::FAILED);
            return Err(Error::Unsupported);
        }
        let indirect = features & feature::INDIRECT_DESC != 0;
        let event_idx = features & feature::EVENT_IDX != 0;
        let inflateq = VirtQueue::new(&mut transport, 0, indirect, event_idx)?;
        let deflateq = VirtQueue::new(&mut transport, 1, indirect, event_idx)?;
        let mut next = 2;
        let statsq = if features & feature::STATS_VQ != 0 {
            let q = VirtQueue::new(&mut transport, next, indirect, event_idx)?;
            next += 1;
            Some((next - 1, q))
        } else {
            None
        };
        let reportq = if features & feature::PAGE_REPORTING != 0 {
            Some((
                next,
                VirtQueue::new(&mut transport, next, indirect, event_idx)?,
            ))
        } else {
            None
        };
        transport.finish_init();
        let mut b = Balloon {
            transport,
            features,
            inflateq,
            deflateq,
            statsq,
            reportq,
            stats_buf: Box::new([0; MAX_STATS * STAT_BYTES]),
            stats_len: 0,
            stats_token: None,
        };
        // virtio 1.2 §5.5.6.3: the driver supplies a first statistics buffer at start-up.
        b.post_stats(&[])?;
        Ok(b)
    }

    /// Negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The host's target size in 4 KiB pages (`num_pages`).
    pub fn target_pages(&self) -> Result<u32, Error> {
        self.transport.read_config_space::<u32>(0)
    }

    /// Tells the host how many pages the balloon holds (`actual`).
    pub fn set_actual_pages(&mut self, pages: u32) -> Result<(), Error> {
        self.transport.write_config_space::<u32>(4, pages)
    }

    /// Gives pages (4 KiB page frame numbers) to the host.
    pub fn inflate(&mut self, pfns: &[u32]) -> Result<(), Error> {
        Self::send_pfns(&mut self.inflateq, &mut self.transport, pfns)
    }

    /// Takes pages back from the host.
    pub fn deflate(&mut self, pfns: &[u32]) -> Result<(), Error> {
        Self::send_pfns(&mut self.deflateq, &mut self.transport, pfns)
    }

    fn send_pfns(
        q: &mut VirtQueue<H, QUEUE_SIZE>,
        transport: &mut T,
        pfns: &[u32],
    ) -> Result<(), Error> {
        let mut bytes = Vec::with_capacity(PFNS_PER_REQUEST * 4);
        for chunk in pfns.chunks(PFNS_PER_REQUEST) {
            bytes.clear();
            for pfn in chunk {
                bytes.extend_from_slice(&pfn.to_le_bytes());
            }
            q.add_notify_wait_pop(&[&bytes], &mut [], transport)?;
        }
        Ok(())
    }

    /// Whether the host has asked for fresh statistics (returned our buffer).
    pub fn stats_requested(&self) -> bool {
        matches!((&self.statsq, self.stats_token), (Some((_, q)), Some(t)) if q.peek_used() == Some(t))
    }

    /// Sends `stats` as (tag, value) pairs (at most [`MAX_STATS`]) if the host asked for
    /// them; returns whether it did.
    pub fn update_stats(&mut self, stats: &[(u16, u64)]) -> Result<bool, Error> {
        if !self.stats_requested() {
            return Ok(false);
        }
        let Some((_, q)) = self.statsq.as_mut() else {
            return Ok(false);
        };
        let Some(token) = self.stats_token.take() else {
            return Ok(false);
        };
        let inputs = [&self.stats_buf[..self.stats_len]];
        // SAFETY: these are the buffers given to `add` with this token in `post_stats`; the
        // box has not moved or been touched since.
        unsafe { q.pop_used(token, &inputs, &mut [])? };
        self.post_stats(stats)?;
        Ok(true)
    }

    fn post_stats(&mut self, stats: &[(u16, u64)]) -> Result<(), Error> {
        let Some((idx, q)) = self.statsq.as_mut() else {
            return Ok(());
        };
        let n = stats.len().min(MAX_STATS);
        for (i, (tag, val)) in stats.iter().take(n).enumerate() {
            let e = &mut self.stats_buf[i * STAT_BYTES..(i + 1) * STAT_BYTES];
            e[..2].copy_from_slice(&tag.to_le_bytes());
            e[2..].copy_from_slice(&val.to_le_bytes());
        }
        // An empty first buffer is not allowed by `VirtQueue::add`; send one zero entry.
        self.stats_len = (n * STAT_BYTES).max(STAT_BYTES);
        let inputs = [&self.stats_buf[..self.stats_len]];
        // SAFETY: the buffer lives in a Box owned by `self`, which is not written again until
        // `update_stats` pops this token (or `self` is dropped, which resets the device
        // first, so the device no longer reads it).
        let token = unsafe { q.add(&inputs, &mut [])? };
        self.stats_token = Some(token);
        if q.should_notify() {
            self.transport.notify(*idx);
        }
        Ok(())
    }

    /// Reports a free range to the host (page reporting); the range is handed to the device
    /// as a device-writable buffer and comes back once the host has taken note.
    pub fn report_free(&mut self, range: &mut [u8]) -> Result<(), Error> {
        let Some((_, q)) = self.reportq.as_mut() else {
            return Err(Error::Unsupported);
        };
        q.add_notify_wait_pop(&[], &mut [range], &mut self.transport)?;
        Ok(())
    }

    /// Acknowledges the interrupt; returns whether the configuration (target) changed.
    pub fn ack_interrupt(&mut self) -> bool {
        self.transport
            .ack_interrupt()
            .contains(virtio_drivers::transport::InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT)
    }
}

impl<H: Hal, T: Transport> Drop for Balloon<H, T> {
    fn drop(&mut self) {
        // Reset first so the device lets go of the statistics buffer, then release queues.
        self.transport.set_status(DeviceStatus::empty());
        for q in 0..4 {
            self.transport.queue_unset(q);
        }
    }
}
