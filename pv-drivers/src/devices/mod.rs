//! The four paravirtual device drivers. Block, net and console are the `virtio-drivers`
//! crate's (well kept, used by several Rust kernels), re-exported under our names so that
//! dom0 and guests depend on this crate only; balloon is ours ([`balloon`]), built on that
//! crate's `VirtQueue`.

pub mod balloon;

/// Block device driver (virtio 1.2 §5.2).
pub type Block<H, T> = virtio_drivers::device::blk::VirtIOBlk<H, T>;
/// Network device driver (virtio 1.2 §5.1), `N` buffers per queue.
pub type Net<H, T, const N: usize> = virtio_drivers::device::net::VirtIONet<H, T, N>;
/// Console driver (virtio 1.2 §5.3), single port.
pub type Console<H, T> = virtio_drivers::device::console::VirtIOConsole<H, T>;
pub use balloon::Balloon;
pub use virtio_drivers::device::blk::{BlkReq, BlkResp};
pub use virtio_drivers::device::net::{RxBuffer, TxBuffer};
