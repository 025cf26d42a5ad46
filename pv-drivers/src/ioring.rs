//! dom0's end of the block request ring (`hv_abi::ioring` has the layout): take the
//! hypervisor's requests, move their data through their slots, publish responses.
//!
//! The ring page and the data area are dom0's own memory, shared with the hypervisor; they are
//! reached through [`RingMemory`] (volatile accesses to dom0's identity-mapped RAM in dom0,
//! plain memory in host tests). What the hypervisor writes is checked here too: a request's
//! slot and length must fit the data area, or the request is answered with an I/O error.

use hv_abi::ioring::{self, Request, Response, field};

/// Shared memory as bytes at offsets (the ring page, or the data area).
pub trait RingMemory {
    /// Copies `buf.len()` bytes from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]);
    /// Copies `buf` to `offset`.
    fn write(&self, offset: u64, buf: &[u8]);
    /// An ordering point: accesses before it are seen before accesses after it.
    fn fence(&self) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }
}

fn load_u32(m: &impl RingMemory, off: u64) -> u32 {
    let mut b = [0u8; 4];
    m.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn store_u32(m: &impl RingMemory, off: u64, v: u32) {
    m.write(off, &v.to_le_bytes());
}

/// Why a ring cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The page does not hold this layout (the hypervisor did not set it up, or another
    /// version did).
    BadHeader,
}

/// dom0's end of the ring.
pub struct BackendRing<M> {
    ring: M,
    data: M,
    req_cons: u32,
    rsp_prod: u32,
    /// Requests whose slot or size did not fit (answered with IOERR).
    pub bad_requests: u64,
}

impl<M: RingMemory> BackendRing<M> {
    /// Wraps a ring the hypervisor has set up (after `IO_RING_SETUP` returned).
    pub fn new(ring: M, data: M) -> Result<Self, RingError> {
        let ok = load_u32(&ring, field::MAGIC) == ioring::MAGIC
            && load_u32(&ring, field::VERSION) == ioring::VERSION
            && load_u32(&ring, field::SLOTS) == ioring::SLOTS
            && load_u32(&ring, field::SLOT_BYTES) == ioring::SLOT_BYTES;
        if !ok {
            return Err(RingError::BadHeader);
        }
        Ok(BackendRing {
            req_cons: load_u32(&ring, field::REQ_CONS),
            rsp_prod: load_u32(&ring, field::RSP_PROD),
            ring,
            data,
            bad_requests: 0,
        })
    }

    /// Whether the hypervisor published a request not taken yet (one load; for polling).
    pub fn pending(&self) -> bool {
        load_u32(&self.ring, field::REQ_PROD) != self.req_cons
    }

    /// The next request, if the hypervisor published one we have not taken. A request whose
    /// slot or length does not fit is answered with IOERR here and skipped.
    pub fn take(&mut self) -> Option<Request> {
        loop {
            let prod = load_u32(&self.ring, field::REQ_PROD);
            if prod == self.req_cons {
                return None;
            }
            // The index before the entry it covers.
            self.ring.fence();
            let mut b = [0u8; ioring::REQ_BYTES];
            self.ring.read(ioring::req_offset(self.req_cons), &mut b);
            self.req_cons = self.req_cons.wrapping_add(1);
            let r = Request::from_bytes(&b);
            let moves_data = matches!(r.op, ioring::op::READ | ioring::op::WRITE);
            if r.slot >= ioring::SLOTS || (moves_data && r.data_bytes().is_none()) {
                self.bad_requests += 1;
                self.respond(r.tag, ioring::S_IOERR, 0);
                continue;
            }
            return Some(r);
        }
    }

    /// Copies a write's data out of its slot (`buf` is the request's length or less).
    pub fn read_slot(&self, req: &Request, buf: &mut [u8]) {
        let n = buf.len().min(ioring::SLOT_BYTES as usize);
        self.data.read(ioring::slot_offset(req.slot), &mut buf[..n]);
    }

    /// Copies a read's data into its slot.
    pub fn write_slot(&self, req: &Request, buf: &[u8]) {
        let n = buf.len().min(ioring::SLOT_BYTES as usize);
        self.data.write(ioring::slot_offset(req.slot), &buf[..n]);
    }

    /// Answers request `tag` (the index is published by [`BackendRing::publish`]).
    pub fn respond(&mut self, tag: u64, status: u32, len: u32) {
        let rsp = Response { tag, status, len };
        self.ring
            .write(ioring::rsp_offset(self.rsp_prod), &rsp.to_bytes());
        self.rsp_prod = self.rsp_prod.wrapping_add(1);
    }

    /// Publishes what was taken and answered: the entries before the indices.
    pub fn publish(&mut self) {
        self.ring.fence();
        store_u32(&self.ring, field::REQ_CONS, self.req_cons);
        store_u32(&self.ring, field::RSP_PROD, self.rsp_prod);
    }
}

/// A region of dom0's own, identity-mapped RAM shared with the hypervisor.
pub struct RawRegion {
    base: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory reached only with volatile byte copies; the other side
// (the hypervisor) synchronises through the ring's indices, not through Rust references.
unsafe impl Send for RawRegion {}

impl RawRegion {
    /// # Safety
    /// `base..base + len` must be memory this program owns for as long as the region is used
    /// and touches only through this region (the hypervisor shares it; no Rust reference to it
    /// may exist).
    pub unsafe fn new(base: *mut u8, len: usize) -> RawRegion {
        RawRegion { base, len }
    }

    fn span(&self, offset: u64, n: usize) -> Option<usize> {
        let o = usize::try_from(offset).ok()?;
        (o.checked_add(n)? <= self.len).then_some(o)
    }
}

impl RingMemory for RawRegion {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        let Some(o) = self.span(offset, buf.len()) else {
            buf.fill(0);
            return;
        };
        if buf.len() == 4 && o % 4 == 0 {
            // An index the other side updates: one volatile load, never cached.
            // SAFETY: `o..o + 4` is inside the region (checked by `span`) and 4-aligned (the
            // region is page-aligned); the constructor's caller promised it is ours.
            let v = unsafe { self.base.add(o).cast::<u32>().read_volatile() };
            buf.copy_from_slice(&v.to_le_bytes());
            return;
        }
        // SAFETY: as above for `o..o + buf.len()`; `buf` is our own memory, so they do not
        // overlap. Entries and slot data are not written by the hypervisor while dom0 reads
        // them (the indices hand them over).
        unsafe { core::ptr::copy_nonoverlapping(self.base.add(o), buf.as_mut_ptr(), buf.len()) };
    }

    fn write(&self, offset: u64, buf: &[u8]) {
        let Some(o) = self.span(offset, buf.len()) else {
            return;
        };
        if buf.len() == 4 && o % 4 == 0 {
            let v = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            // SAFETY: as in `read`.
            unsafe { self.base.add(o).cast::<u32>().write_volatile(v) };
            return;
        }
        // SAFETY: as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), self.base.add(o), buf.len()) };
    }
}
