//! `dom0-drivers`: dom0's drivers for the physical devices it owns.
//!
//! For now those are the disk and the NIC of the emulated machines (Bochs, QEMU `-M pc`): the
//! PCI bus ([`pci`]: enumeration, BAR sizing, command register), the i440FX/PIIX PCI IDE
//! controller with its bus-master DMA engine ([`ata`]), whose drives become
//! [`volmgr::dev::BlockDevice`]s of 4 KiB blocks for the volume manager, and the Intel 8254x
//! gigabit NIC ([`e1000`]), a [`nic::Nic`] whose frames dom0 bridges to its guests.
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
//! * [`nic`]: the [`nic::Nic`] trait every network driver implements (MAC, link, send and
//!   receive one frame, both polled).
//! * [`e1000`]: the 82540EM and its 82545/82546 siblings: [`e1000::probe`] finds and enables
//!   them, [`e1000::Regs`] is the register seam (dom0's MMIO, or [`e1000::IoWindow`] over the
//!   I/O BAR), [`e1000::E1000`] resets the card and runs one receive and one transmit ring.
//!
//! # What this crate trusts
//!
//! * **Nothing the device says is taken on faith.** IDENTIFY data is parsed defensively
//!   (integrity checksum when present, LBA support required, sizes bounded by the addressing
//!   mode), every wait on BSY, DRQ or the DMA engine is bounded by a [`hw::Clock`] deadline
//!   (a device that never answers costs a timeout and a channel reset, never a hang), and a
//!   status with ERR or DF fails the request without failing the driver. The NIC's
//!   written-back descriptors are copied out and judged before use (done, end of packet,
//!   error bits, a length within the frame, the buffer and the caller's slice); a bad one is
//!   dropped and counted, and one call looks at one ring's worth at most.
//! * **DMA only ever targets the driver's own buffers.** The PRD table is written by the
//!   driver and covers only its bounce buffer, whose bus addresses come from
//!   [`dma::Dma::translate`] and are checked (below 4 GiB, even, no region crossing a 64 KiB
//!   boundary). The NIC's rings and packet buffers likewise (each ring and each 2 KiB buffer
//!   contiguous, rings 16-byte aligned; 64-bit addresses), and every descriptor is rewritten
//!   from the driver's own record, never from what the device left there. Callers' buffers
//!   are copied in and out; no caller address reaches a device.
//! * **dom0's seams are trusted**: [`hw::PortIo`] and [`e1000::Regs`] reach the registers
//!   they are asked for, [`dma::Dma`] hands out memory that stays allocated and pinned at the
//!   translated bus addresses for as long as the driver holds it, and [`hw::Clock`] advances.
//!
//! There is no `unsafe` code in this crate: port instructions, MMIO and raw memory copies
//! live in dom0's implementations of the seams, where their preconditions are known. Every
//! other piece runs under host `cargo test` against software models of the IDE channel and
//! of the NIC (`tests/model/`).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod ata;
pub mod dma;
pub mod e1000;
pub mod hw;
pub mod nic;
pub mod pci;
