//! The hypervisor's heap: a linked-list allocator (`linked_list_allocator`) over one contiguous
//! run of frames taken from the frame allocator at boot.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Hands `[start, start + size)` to the heap.
///
/// # Safety
/// The range must be identity-mapped, writable, owned by nobody else for the rest of the run,
/// and this must be called once.
pub unsafe fn init(start: u64, size: usize) {
    // SAFETY: forwarded from this function's contract.
    unsafe { HEAP.lock().init(start as *mut u8, size) }
}

/// `(bytes in use, heap size)`.
pub fn usage() -> (usize, usize) {
    let h = HEAP.lock();
    (h.used(), h.size())
}
