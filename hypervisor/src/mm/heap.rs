//! The hypervisor's heap: `talc` over one contiguous run of frames taken from the frame
//! allocator at boot.
//!
//! `talc` keeps free chunks in size-class bins, so an allocation or a free costs about the
//! same however fragmented the heap is. The first-fit list it replaced
//! (`linked_list_allocator`) walked its free list on every allocation and free; on the disk
//! path, where each request allocates and frees a few small objects, that cost about 1,100
//! instructions per request (`cargo xtask bench io`).

use spin::Mutex;
use talc::{ErrOnOom, Span, Talc, Talck};

#[global_allocator]
static HEAP: Talck<Mutex<()>, ErrOnOom> = Talc::new(ErrOnOom).lock();

/// The heap's size, once given.
static SIZE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Hands `[start, start + size)` to the heap.
///
/// # Safety
/// The range must be identity-mapped, writable, owned by nobody else for the rest of the run,
/// and this must be called once.
pub unsafe fn init(start: u64, size: usize) {
    let span = Span::from_base_size(start as *mut u8, size);
    // SAFETY: forwarded from this function's contract: the span is ours alone, for good.
    let claimed = unsafe { HEAP.lock().claim(span) };
    if claimed.is_ok() {
        SIZE.store(size, core::sync::atomic::Ordering::Relaxed);
    }
}

/// `(bytes in use, heap size)`.
pub fn usage() -> (usize, usize) {
    let used = HEAP.lock().get_counters().allocated_bytes;
    (used, SIZE.load(core::sync::atomic::Ordering::Relaxed))
}
