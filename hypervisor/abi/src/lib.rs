//! `hv-abi`: the hypervisor's public interface, shared by the hypervisor, dom0 and guests.
//!
//! Everything here is plain data: the ABI version, status codes returned in RAX, and (as the
//! VT-x core lands) hypercall numbers and `#[repr(C)]` argument layouts with compile-time size
//! checks. No hardware code, no allocation.
#![no_std]

/// ABI version: major in the high 16 bits, minor in the low 16. A guest checks the major.
pub const ABI_VERSION: u32 = 0x0001_0000;

/// Signature returned in EBX, ECX, EDX by CPUID leaf 0x4000_0000.
pub const CPUID_SIGNATURE: [u8; 12] = *b"RustHvRustHv";

/// Status codes returned by every hypercall (in RAX). Zero is success; errors are small
/// negative numbers so they never collide with a successful result that is a count.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    /// No such hypercall number.
    UnknownCall = -1,
    /// An argument is out of range or malformed.
    InvalidArgument = -2,
    /// A guest address does not belong to the caller.
    BadAddress = -3,
    /// The caller lacks the right for this call (dom0-only calls).
    PermissionDenied = -4,
    /// Out of memory or another resource.
    NoResources = -5,
}

impl Status {
    /// Decodes a raw RAX value; `None` for values no hypervisor version returns.
    pub fn from_raw(raw: i64) -> Option<Status> {
        Some(match raw {
            0 => Status::Ok,
            -1 => Status::UnknownCall,
            -2 => Status::InvalidArgument,
            -3 => Status::BadAddress,
            -4 => Status::PermissionDenied,
            -5 => Status::NoResources,
            _ => return None,
        })
    }
}

/// Hypercall numbers. A guest executes VMCALL with the number in RAX and arguments in RDI,
/// RSI, RDX; the status (or a non-negative result) comes back in RAX.
pub mod hypercall {
    /// Returns [`crate::ABI_VERSION`].
    pub const VERSION: u64 = 0;
    /// `(gpa, len)`: writes `len` bytes (at most [`CONSOLE_WRITE_MAX`]) from guest-physical
    /// `gpa` to the domain's console. Returns the count written.
    pub const CONSOLE_WRITE: u64 = 1;
    /// `(code)`: the domain stops with this exit code; never returns.
    pub const EXIT: u64 = 2;
    /// Gives up the rest of the time slice.
    pub const YIELD: u64 = 3;
    /// Does nothing: the round-trip cost of a hypercall.
    pub const NOP: u64 = 4;
    /// `(index, rip, rsp)`: starts the domain's vCPU `index` (1..vCPUs) at `rip` with `rsp`
    /// and RDI = `index`. Each vCPU can be started once.
    pub const VCPU_START: u64 = 5;
    /// Stops the calling vCPU (the domain ends when its last vCPU does); never returns.
    pub const VCPU_OFF: u64 = 6;
    /// `(vector, period_us)`: a periodic interrupt on `vector` (32..=255) every `period_us`
    /// microseconds (100..=10_000_000), injected when the vCPU has interrupts enabled; a
    /// period of 0 switches it off. HLT then waits for it.
    pub const SET_TIMER: u64 = 7;
    /// Largest CONSOLE_WRITE.
    pub const CONSOLE_WRITE_MAX: u64 = 4096;

    // dom0's calls: any other domain gets [`crate::Status::PermissionDenied`].

    /// dom0 only. `(ring_gpa, data_gpa)`: registers the block request ring (one 4 KiB page at
    /// `ring_gpa`, laid out as [`crate::ioring`] says) and its data area
    /// ([`crate::ioring::DATA_BYTES`] at `data_gpa`), both in dom0's RAM and page-aligned.
    /// Registering again (dom0 restarted) fails every request still in flight with an I/O
    /// error and starts the ring afresh.
    pub const IO_RING_SETUP: u64 = 16;
    /// dom0 only. `(name_gpa, name_len, sectors | ro << 63)`: offers a volume, named
    /// `pool/volume` (at most [`crate::ioring::NAME_MAX`] bytes), of `sectors` 512-byte
    /// sectors to guests; read-only when bit 63 is set. Returns the disk's handle, which
    /// requests name. Offering a name again updates its size.
    pub const DISK_OFFER: u64 = 17;
    /// dom0 only. Every volume is offered: the hypervisor starts the guests waiting for
    /// their disks (or refuses those that name a volume dom0 does not have).
    pub const IO_READY: u64 = 18;
    /// dom0 only. Responses were added to the ring: the hypervisor completes them.
    pub const IO_KICK: u64 = 19;
    /// dom0 only. `(timeout_us)`: completes what the ring holds, then waits until a request
    /// arrives or a frame waits on one of its uplinks (or returns at once if one already
    /// does), or `timeout_us` microseconds pass (0: no bound; dom0 polls its NICs between
    /// waits with a bound). Returns 0.
    pub const IO_WAIT: u64 = 20;
    /// dom0 only. `(gpa, len)`: the host-physical (bus) address of dom0's buffer
    /// `gpa..gpa + len`, which must lie in one host-contiguous piece of its RAM (an aligned
    /// 2 MiB chunk); dom0 programs its devices' DMA with it. dom0's RAM stays where it is for
    /// dom0's life (never moved, ballooned or shared), so the address stays valid.
    pub const DMA_MAP: u64 = 21;
    /// dom0 only. `(name_gpa, name_len)`: attaches dom0's uplink (the bridge to a physical
    /// NIC) to the network named there (`[a-z0-9_-]`, 1..=32 bytes; made if no guest named it
    /// yet): a trunk port of its switch carrying every VLAN tagged, and untagged frames on
    /// VLAN 1 (the guests' default). Returns the uplink's handle (1 or more). Attaching again
    /// (dom0 restarted) replaces the old port.
    pub const NET_UPLINK: u64 = 22;
    /// dom0 only. `(handle, gpa, len)`: a frame that arrived on the physical NIC goes into the
    /// switch through the uplink (14..=1518 bytes, with its VLAN tag if it has one). Returns 0
    /// whether the switch delivered it or counted it as refused.
    pub const NET_SEND: u64 = 23;
    /// dom0 only. `(handle, gpa, cap)`: takes the next frame the switch queued for the
    /// uplink into dom0's buffer (`cap` at least [`NET_FRAME_MAX`]). Returns its length, or 0
    /// when none waits.
    pub const NET_RECV: u64 = 24;
    /// Largest frame through an uplink: 1514 bytes and an 802.1Q tag.
    pub const NET_FRAME_MAX: u64 = 1518;
}

pub mod ioring;

/// Where a guest's virtio-mmio devices sit in its MMIO hole (3–4 GiB guest-physical).
///
/// Each device has a fixed window: the k-th disk (`disk=` on its module line, in order) at
/// window `2k`, the k-th NIC (`nic=`) at window `2k + 1`, whatever else the guest has: the
/// first disk at `VIRTIO_MMIO_BASE`, the first NIC at `VIRTIO_MMIO_BASE +
/// VIRTIO_MMIO_STRIDE`. A window with no device answers like an empty bus (all ones; no
/// virtio magic).
pub mod devices {
    /// Most disks, and most NICs, a guest has.
    pub const MAX_PER_KIND: usize = 4;

    /// The window of a guest's disk `k` (0-based).
    pub const fn disk_window(k: usize) -> usize {
        2 * k
    }

    /// The window of a guest's NIC `k` (0-based).
    pub const fn nic_window(k: usize) -> usize {
        2 * k + 1
    }

    /// The first device's register window; device `i` is at `VIRTIO_MMIO_BASE + i * STRIDE`.
    pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
    /// Distance between two devices' windows.
    pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
    /// Device `i`'s used-buffer interrupt arrives on vCPU 0 as vector `VIRTIO_VECTOR_BASE + i`
    /// (a paravirtual interrupt, injected when the vCPU has interrupts enabled, like the
    /// timer's; the device's InterruptStatus says why, and the driver acknowledges it there).
    pub const VIRTIO_VECTOR_BASE: u8 = 0x50;
}

/// I/O ports every domain has.
pub mod ports {
    /// A 16550-compatible UART; output appears on the host console as `[domN] ...`.
    pub const UART: u16 = 0x3f8;
    /// The test exit port: a 1-byte OUT of `v` stops the domain with exit code `v`.
    pub const TEST_EXIT: u16 = 0xf4;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        for s in [
            Status::Ok,
            Status::UnknownCall,
            Status::InvalidArgument,
            Status::BadAddress,
            Status::PermissionDenied,
            Status::NoResources,
        ] {
            assert_eq!(Status::from_raw(s as i64), Some(s));
        }
        assert_eq!(Status::from_raw(7), None);
    }
}
