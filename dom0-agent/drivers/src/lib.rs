//! `dom0-drivers`: dom0's drivers for the physical devices it owns.
//!
//! For now that is the disk of the emulated machines (Bochs, QEMU `-M pc`): the PCI bus
//! ([`pci`]: enumeration, BAR sizing, command register) and the i440FX/PIIX PCI IDE
//! controller with its bus-master DMA engine ([`ata`]), whose drives become
//! [`volmgr::dev::BlockDevice`]s of 4 KiB blocks for the volume manager.
//!
//! # Map
//!
//! * [`hw`]: the hardware seams: [`hw::PortIo`] (dom0's port accesses, which the hypervisor
//!   forwards to the device), [`hw::Clock`] (bounds every wait), [`hw::PollClock`].
//! * [`dma`]: the [`dma::Dma`] seam (DMA-able buffers and their bus addresses; dom0 has no
//!   IOMMU) and the split of a buffer into PRD-ready physical segments.
//! * [`pci`]: configuration space ([`pci::PciConfig`], mechanism #1 over any `PortIo`),
//!   enumeration of every bus, BARs, enabling decode and bus mastering.
//! * [`ata`]: one IDE channel (master and slave): reset, IDENTIFY, READ/WRITE DMA EXT through
//!   the bus-master engine, PIO when there is no engine, FLUSH CACHE; [`ata::AtaDisk`].
//!
//! # What this crate trusts
//!
//! * **Nothing the device says is taken on faith.** IDENTIFY data is parsed defensively
//!   (integrity checksum when present, LBA support required, sizes bounded by the addressing
//!   mode), every wait on BSY, DRQ or the DMA engine is bounded by a [`hw::Clock`] deadline
//!   (a device that never answers costs a timeout and a channel reset, never a hang), and a
//!   status with ERR or DF fails the request without failing the driver.
//! * **DMA only ever targets the driver's own buffers.** The PRD table is written by the
//!   driver and covers only its bounce buffer, whose bus addresses come from
//!   [`dma::Dma::translate`] and are checked (below 4 GiB, even, no region crossing a 64 KiB
//!   boundary). Callers' buffers are copied in and out; no caller address reaches the device.
//! * **dom0's seams are trusted**: [`hw::PortIo`] reaches the ports it is asked for,
//!   [`dma::Dma`] hands out memory that stays allocated and pinned at the translated bus
//!   addresses for as long as the driver holds it, and [`hw::Clock`] advances.
//!
//! There is no `unsafe` code in this crate: port instructions and raw memory copies live in
//! dom0's implementations of the seams, where their preconditions are known. Every other
//! piece runs under host `cargo test` against a software model of the IDE channel.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod ata;
pub mod dma;
pub mod hw;
pub mod pci;
