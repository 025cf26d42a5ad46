//! Memory: host-physical address types and the frame allocator (pure, host-tested), and on bare
//! metal the hypervisor's own page tables and heap.

pub mod frames;

#[cfg(target_os = "none")]
pub mod heap;
#[cfg(target_os = "none")]
pub mod paging;

/// Free physical memory: the frame allocator, once built at boot. There is one, owned by the
/// kernel's bring-up (`kernel.rs`) and handed by reference to what takes frames after boot
/// (domain creation, the run loops); nothing else reaches it. Everything that takes frames
/// (domain RAM, EPT tables, VMCS regions, AP stacks) takes them here and gives them back here.
#[cfg(target_os = "none")]
pub struct PhysMem(spin::Mutex<Option<frames::FrameAllocator<'static>>>);

#[cfg(target_os = "none")]
impl Default for PhysMem {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "none")]
impl PhysMem {
    pub const fn new() -> Self {
        PhysMem(spin::Mutex::new(None))
    }

    /// Puts the allocator in place (once, at boot).
    pub fn install(&self, fa: frames::FrameAllocator<'static>) {
        *self.0.lock() = Some(fa);
    }

    /// The allocator, locked (`None` before boot built it).
    pub fn lock(&self) -> spin::MutexGuard<'_, Option<frames::FrameAllocator<'static>>> {
        self.0.lock()
    }
}

/// Gives `run` back to the allocator `frames` (whose lock the caller holds). A refusal (a
/// double free) is a hypervisor bug: reported on the console, never silently dropped.
#[cfg(target_os = "none")]
pub fn give_back(frames: &mut frames::FrameAllocator<'_>, run: frames::FrameRun) {
    let at = run.addr();
    if let Err(e) = frames.free(run) {
        log::error!("internal: freeing frames at {at}: {e}");
    }
}

/// Size of one frame (a 4 KiB page of host-physical memory).
pub const FRAME_SIZE: u64 = 4096;

/// A host-physical address. Guest addresses have their own types; this one is never built from
/// a guest value without a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPhysAddr(pub u64);

impl HostPhysAddr {
    pub fn is_frame_aligned(self) -> bool {
        self.0.is_multiple_of(FRAME_SIZE)
    }
}

impl core::fmt::Display for HostPhysAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
