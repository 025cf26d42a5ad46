//! Hypercall wrappers over `hv-abi`: typed calls for dom0 and Rust guests.
//!
//! [`Hypercalls`] turns the raw convention (number in RAX, arguments in RDI, RSI, RDX,
//! status or result back in RAX; see `hv_abi::hypercall`) into typed results. The raw call
//! is behind the [`Hypervisor`] seam: [`Vmcall`] executes VMCALL and can only be built by
//! code that knows it runs under our hypervisor; the host tests (`tests/against_dispatcher.rs`)
//! answer calls with the hypervisor's real exit dispatcher.

use hv_abi::{Status, hypercall};

/// Why a hypercall failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallError {
    /// The hypervisor refused the call with this status.
    Status(Status),
    /// A negative value no hypervisor version returns.
    Unknown(i64),
}

/// The raw hypercall instruction.
pub trait Hypervisor {
    /// Performs call `nr` with three arguments; returns RAX.
    fn call(&mut self, nr: u64, a0: u64, a1: u64, a2: u64) -> i64;
}

/// VMCALL on this CPU.
pub struct Vmcall {
    _private: (),
}

impl Vmcall {
    /// The real instruction.
    ///
    /// # Safety
    ///
    /// The caller must run as a guest of this hypervisor (CPUID leaf 0x4000_0000 returns
    /// `hv_abi::CPUID_SIGNATURE`); elsewhere VMCALL faults or means something else.
    pub unsafe fn new() -> Vmcall {
        Vmcall { _private: () }
    }
}

impl Hypervisor for Vmcall {
    #[cfg(target_arch = "x86_64")]
    fn call(&mut self, nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
        let ret: u64;
        // SAFETY: `Vmcall::new`'s contract says we are a guest of our hypervisor, whose
        // VMCALL handler reads RAX, RDI, RSI, RDX, writes RAX and preserves everything else.
        unsafe {
            core::arch::asm!(
                "vmcall",
                inout("rax") nr => ret,
                in("rdi") a0,
                in("rsi") a1,
                in("rdx") a2,
                options(nostack),
            );
        }
        i64::from_ne_bytes(ret.to_ne_bytes())
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn call(&mut self, _nr: u64, _a0: u64, _a1: u64, _a2: u64) -> i64 {
        Status::UnknownCall as i64
    }
}

/// Typed hypercalls over a [`Hypervisor`].
pub struct Hypercalls<H> {
    hv: H,
}

fn check(raw: i64) -> Result<u64, HypercallError> {
    if raw >= 0 {
        return Ok(raw.unsigned_abs());
    }
    Err(match Status::from_raw(raw) {
        Some(s) => HypercallError::Status(s),
        None => HypercallError::Unknown(raw),
    })
}

impl<H: Hypervisor> Hypercalls<H> {
    /// Wraps a hypercall instruction.
    pub fn new(hv: H) -> Self {
        Hypercalls { hv }
    }

    /// The ABI version (major in the high 16 bits).
    pub fn version(&mut self) -> Result<u32, HypercallError> {
        let v = check(self.hv.call(hypercall::VERSION, 0, 0, 0))?;
        u32::try_from(v).map_err(|_| HypercallError::Unknown(-1))
    }

    /// Whether the hypervisor speaks the same major ABI version as this crate.
    pub fn compatible(&mut self) -> bool {
        self.version()
            .is_ok_and(|v| v >> 16 == hv_abi::ABI_VERSION >> 16)
    }

    /// Writes `len` bytes at guest-physical `gpa` to the domain console; returns the count.
    pub fn console_write_phys(&mut self, gpa: u64, len: u64) -> Result<u64, HypercallError> {
        if len > hypercall::CONSOLE_WRITE_MAX {
            return Err(HypercallError::Status(Status::InvalidArgument));
        }
        check(self.hv.call(hypercall::CONSOLE_WRITE, gpa, len, 0))
    }

    /// Gives up the rest of the time slice.
    pub fn yield_now(&mut self) -> Result<(), HypercallError> {
        check(self.hv.call(hypercall::YIELD, 0, 0, 0)).map(|_| ())
    }

    /// The cheapest round trip.
    pub fn nop(&mut self) -> Result<(), HypercallError> {
        check(self.hv.call(hypercall::NOP, 0, 0, 0)).map(|_| ())
    }

    /// dom0: registers the block ring page and data area (guest-physical, page-aligned).
    pub fn io_ring_setup(&mut self, ring_gpa: u64, data_gpa: u64) -> Result<(), HypercallError> {
        check(
            self.hv
                .call(hypercall::IO_RING_SETUP, ring_gpa, data_gpa, 0),
        )
        .map(|_| ())
    }

    /// dom0: offers volume `name` (`pool/volume`, its bytes at guest-physical `name_gpa`) of
    /// `sectors` sectors to guests; returns its handle.
    pub fn disk_offer(
        &mut self,
        name_gpa: u64,
        name_len: u64,
        sectors: u64,
        read_only: bool,
    ) -> Result<u32, HypercallError> {
        let ro = if read_only {
            hv_abi::ioring::OFFER_RO
        } else {
            0
        };
        let h = check(
            self.hv
                .call(hypercall::DISK_OFFER, name_gpa, name_len, sectors | ro),
        )?;
        u32::try_from(h).map_err(|_| HypercallError::Unknown(-1))
    }

    /// dom0: every volume is offered.
    pub fn io_ready(&mut self) -> Result<(), HypercallError> {
        check(self.hv.call(hypercall::IO_READY, 0, 0, 0)).map(|_| ())
    }

    /// dom0: responses were published.
    pub fn io_kick(&mut self) -> Result<(), HypercallError> {
        check(self.hv.call(hypercall::IO_KICK, 0, 0, 0)).map(|_| ())
    }

    /// dom0: completes published responses, then waits for the next request.
    pub fn io_wait(&mut self) -> Result<(), HypercallError> {
        check(self.hv.call(hypercall::IO_WAIT, 0, 0, 0)).map(|_| ())
    }

    /// dom0: as [`Self::io_wait`], but returns after at most `timeout_us` microseconds
    /// (0: no bound), or as soon as a frame waits on one of its uplinks.
    pub fn io_wait_bounded(&mut self, timeout_us: u64) -> Result<(), HypercallError> {
        check(self.hv.call(hypercall::IO_WAIT, timeout_us, 0, 0)).map(|_| ())
    }

    /// dom0: attaches its uplink to the network whose name is at guest-physical `name_gpa`
    /// (`name_len` bytes); returns the uplink's handle.
    pub fn net_uplink(&mut self, name_gpa: u64, name_len: u64) -> Result<u64, HypercallError> {
        check(self.hv.call(hypercall::NET_UPLINK, name_gpa, name_len, 0))
    }

    /// dom0: a frame from the physical NIC (`len` bytes at `gpa`) into uplink `handle`.
    pub fn net_send(&mut self, handle: u64, gpa: u64, len: u64) -> Result<(), HypercallError> {
        check(self.hv.call(hypercall::NET_SEND, handle, gpa, len)).map(|_| ())
    }

    /// dom0: the next frame for uplink `handle` into `cap` bytes at `gpa`; its length, 0 if
    /// none waits.
    pub fn net_recv(&mut self, handle: u64, gpa: u64, cap: u64) -> Result<u64, HypercallError> {
        check(self.hv.call(hypercall::NET_RECV, handle, gpa, cap))
    }

    /// dom0: the host-physical (bus) address of its buffer `gpa..gpa + len` (one
    /// host-contiguous piece of its RAM), for its devices' DMA.
    pub fn dma_map(&mut self, gpa: u64, len: u64) -> Result<u64, HypercallError> {
        check(self.hv.call(hypercall::DMA_MAP, gpa, len, 0))
    }

    /// Stops the domain with `code` (returns only if the hypervisor refused).
    pub fn exit(&mut self, code: u64) -> HypercallError {
        match check(self.hv.call(hypercall::EXIT, code, 0, 0)) {
            Ok(_) => HypercallError::Unknown(0),
            Err(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_negative_values_are_not_statuses() {
        assert_eq!(check(-99), Err(HypercallError::Unknown(-99)));
        assert_eq!(check(7), Ok(7));
        assert_eq!(
            check(Status::InvalidArgument as i64),
            Err(HypercallError::Status(Status::InvalidArgument))
        );
    }
}
