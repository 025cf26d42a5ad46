//! The hypervisor's end of dom0's block request ring (`hv_abi::ioring` has the layout).
//!
//! [`RingHost`] publishes requests into dom0's ring page and takes its responses, over dom0's
//! RAM as a [`GuestMemory`]. Each request owns one of the [`SLOTS`] data slots until its
//! response is taken, so at most [`SLOTS`] are in flight and neither ring can overflow. dom0
//! is trusted with the disks, not with the hypervisor: every index and response it writes is
//! checked (a response index that runs past what was requested, a tag for no request in
//! flight, a length beyond the request's), and what fails the check is refused and counted,
//! never followed. Pure: the caller routes completions to the guests' devices.

use alloc::vec::Vec;

use hv_abi::ioring::{self, Request, Response, SLOT_BYTES, SLOTS, field, op};

use hv_guest_mem::{GuestAddr, GuestMemory};

/// A request waiting in dom0's ring, with the caller's route back to the guest.
struct Pending<T> {
    /// The tag written into the request (sequence number and slot).
    tag: u64,
    op: u8,
    /// Bytes the response may leave in the slot.
    max_len: u32,
    route: T,
}

/// A finished request: where it goes, its virtio status, and the data of a read.
#[derive(Debug, PartialEq, Eq)]
pub struct Done<T> {
    pub route: T,
    pub status: u8,
    pub data: Vec<u8>,
}

/// Why a submission was not published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is in use: try again after a completion.
    Full,
    /// The request is larger than a slot or otherwise malformed (a bug of the caller).
    TooLarge,
    /// dom0's ring is not in its RAM any more (it is being torn down).
    Memory,
}

/// What dom0 did wrong, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingFaults {
    /// `rsp_prod` ran more than a ring ahead of what we took.
    pub bad_index: u64,
    /// A response for no request in flight.
    pub bad_tag: u64,
    /// A response claiming more data than the request allows.
    pub bad_len: u64,
}

/// The hypervisor's end of the ring.
pub struct RingHost<T> {
    ring: u64,
    data: u64,
    req_prod: u32,
    rsp_cons: u32,
    seq: u64,
    slots: Vec<Option<Pending<T>>>,
    pub faults: RingFaults,
    /// Requests published and responses taken, in total.
    pub published: u64,
    pub completed: u64,
}

impl<T> RingHost<T> {
    /// Checks dom0's registration (page-aligned, inside its RAM) and writes a fresh header.
    pub fn setup(mem: &impl GuestMemory, ring: u64, data: u64) -> Result<Self, &'static str> {
        if !ring.is_multiple_of(4096) || !data.is_multiple_of(4096) {
            return Err("ring and data area must be page-aligned");
        }
        mem.check(GuestAddr(ring), ioring::RING_BYTES)
            .map_err(|_| "the ring page is not in the caller's RAM")?;
        mem.check(GuestAddr(data), ioring::DATA_BYTES)
            .map_err(|_| "the data area is not in the caller's RAM")?;
        let overlap = ring < data.saturating_add(ioring::DATA_BYTES)
            && data < ring.saturating_add(ioring::RING_BYTES);
        if overlap {
            return Err("the ring page overlaps the data area");
        }
        mem.zero(GuestAddr(ring), ioring::RING_BYTES)
            .map_err(|_| "the ring page is not in the caller's RAM")?;
        let w = |off: u64, v: u32| mem.write_u32(GuestAddr(ring + off), v);
        w(field::MAGIC, ioring::MAGIC)
            .and_then(|()| w(field::VERSION, ioring::VERSION))
            .and_then(|()| w(field::SLOTS, SLOTS))
            .and_then(|()| w(field::SLOT_BYTES, SLOT_BYTES))
            .map_err(|_| "the ring page is not in the caller's RAM")?;
        Ok(RingHost {
            ring,
            data,
            req_prod: 0,
            rsp_cons: 0,
            seq: 0,
            slots: (0..SLOTS).map(|_| None).collect(),
            faults: RingFaults::default(),
            published: 0,
            completed: 0,
        })
    }

    /// Requests in flight (published, response not yet taken).
    pub fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Whether dom0 has requests it has not taken yet (it reads `req_cons` from its page).
    pub fn unread(&self, mem: &impl GuestMemory) -> bool {
        mem.read_u32(GuestAddr(self.ring + field::REQ_CONS))
            .is_ok_and(|c| c != self.req_prod)
    }

    /// Whether dom0 has responses waiting for [`RingHost::reap`].
    pub fn responses_waiting(&self, mem: &impl GuestMemory) -> bool {
        mem.read_u32(GuestAddr(self.ring + field::RSP_PROD))
            .is_ok_and(|p| p != self.rsp_cons)
    }

    /// Publishes a request: `data` (a write's bytes) goes into its slot first. `op` and the
    /// sizes were checked by the device model; they are checked again against the slot.
    pub fn submit(
        &mut self,
        mem: &impl GuestMemory,
        mut req: Request,
        data: &[u8],
        route: T,
    ) -> Result<(), SubmitError> {
        let max_len = match req.op {
            op::READ => req.data_bytes().ok_or(SubmitError::TooLarge)?,
            op::WRITE => {
                let n = req.data_bytes().ok_or(SubmitError::TooLarge)?;
                if n as usize != data.len() {
                    return Err(SubmitError::TooLarge);
                }
                0
            }
            op::GET_ID => ioring::ID_BYTES,
            _ => 0,
        };
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(SubmitError::Full)? as u32;
        if !data.is_empty() {
            mem.write(GuestAddr(self.data + ioring::slot_offset(slot)), data)
                .map_err(|_| SubmitError::Memory)?;
        }
        self.seq += 1;
        req.tag = (self.seq << 8) | u64::from(slot);
        req.slot = slot;
        mem.write(
            GuestAddr(self.ring + ioring::req_offset(self.req_prod)),
            &req.to_bytes(),
        )
        .map_err(|_| SubmitError::Memory)?;
        // The entry (and its data) before the index that publishes it.
        mem.fence_release();
        self.req_prod = self.req_prod.wrapping_add(1);
        mem.write_u32(GuestAddr(self.ring + field::REQ_PROD), self.req_prod)
            .map_err(|_| SubmitError::Memory)?;
        self.slots[slot as usize] = Some(Pending {
            tag: req.tag,
            op: req.op,
            max_len,
            route,
        });
        self.published += 1;
        Ok(())
    }

    /// Takes every response dom0 published, checks it, and returns the finished requests
    /// (their slots are free again).
    pub fn reap(&mut self, mem: &impl GuestMemory) -> Vec<Done<T>> {
        let mut out = Vec::new();
        let Ok(prod) = mem.read_u32(GuestAddr(self.ring + field::RSP_PROD)) else {
            return out;
        };
        // The index before the entries it covers.
        mem.fence_acquire();
        let ahead = prod.wrapping_sub(self.rsp_cons);
        if ahead > SLOTS {
            // dom0 claims more responses than the ring holds: take none of them.
            self.faults.bad_index += 1;
            return out;
        }
        for _ in 0..ahead {
            let mut b = [0u8; ioring::RSP_BYTES];
            if mem
                .read(
                    GuestAddr(self.ring + ioring::rsp_offset(self.rsp_cons)),
                    &mut b,
                )
                .is_err()
            {
                return out;
            }
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
            let rsp = Response::from_bytes(&b);
            let slot = (rsp.tag & 0xff) as usize;
            let matches = self
                .slots
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|p| p.tag == rsp.tag);
            if !matches {
                self.faults.bad_tag += 1;
                continue;
            }
            let Some(p) = self.slots[slot].take() else {
                continue;
            };
            self.completed += 1;
            let mut status = match rsp.status {
                ioring::S_OK => 0,
                ioring::S_UNSUPP => 2,
                _ => 1,
            };
            let mut data = Vec::new();
            if status == 0 && matches!(p.op, op::READ | op::GET_ID) {
                if rsp.len > p.max_len || (p.op == op::READ && rsp.len != p.max_len) {
                    self.faults.bad_len += 1;
                    status = 1;
                } else {
                    data.resize(rsp.len as usize, 0);
                    let at = GuestAddr(self.data + ioring::slot_offset(slot as u32));
                    if mem.read(at, &mut data).is_err() {
                        data.clear();
                        status = 1;
                    }
                }
            }
            out.push(Done {
                route: p.route,
                status,
                data,
            });
        }
        let _ = mem.write_u32(GuestAddr(self.ring + field::RSP_CONS), self.rsp_cons);
        out
    }

    /// dom0 is gone: every request in flight fails with an I/O error.
    pub fn fail_all(&mut self) -> Vec<Done<T>> {
        self.slots
            .iter_mut()
            .filter_map(Option::take)
            .map(|p| Done {
                route: p.route,
                status: 1,
                data: Vec::new(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hv_guest_mem::VecGuestMemory;

    const RING: u64 = 0x1000;
    const DATA: u64 = 0x10_0000;

    fn mem() -> VecGuestMemory {
        VecGuestMemory::new(0, 8 << 20)
    }

    /// dom0's side, as simply as the layout allows: take requests, answer with `f`.
    fn dom0_serve(m: &VecGuestMemory, mut f: impl FnMut(&Request, &VecGuestMemory) -> Response) {
        let prod = m.read_u32(GuestAddr(RING + field::REQ_PROD)).unwrap();
        let mut cons = m.read_u32(GuestAddr(RING + field::REQ_CONS)).unwrap();
        let mut rsp_prod = m.read_u32(GuestAddr(RING + field::RSP_PROD)).unwrap();
        while cons != prod {
            let mut b = [0u8; 32];
            m.read(GuestAddr(RING + ioring::req_offset(cons)), &mut b)
                .unwrap();
            let r = Request::from_bytes(&b);
            let rsp = f(&r, m);
            m.write(
                GuestAddr(RING + ioring::rsp_offset(rsp_prod)),
                &rsp.to_bytes(),
            )
            .unwrap();
            rsp_prod = rsp_prod.wrapping_add(1);
            cons = cons.wrapping_add(1);
        }
        m.write_u32(GuestAddr(RING + field::REQ_CONS), cons)
            .unwrap();
        m.write_u32(GuestAddr(RING + field::RSP_PROD), rsp_prod)
            .unwrap();
    }

    fn read_req(sectors: u32) -> Request {
        Request {
            op: op::READ,
            disk: 1,
            sector: 8,
            sectors,
            ..Request::default()
        }
    }

    #[test]
    fn setup_checks_the_registration() {
        let m = mem();
        assert!(RingHost::<u32>::setup(&m, RING + 1, DATA).is_err());
        assert!(
            RingHost::<u32>::setup(&m, RING, 8 << 20).is_err(),
            "data outside RAM"
        );
        assert!(RingHost::<u32>::setup(&m, (8 << 20) - 4096 + 4096, DATA).is_err());
        assert!(
            RingHost::<u32>::setup(&m, DATA + 4096, DATA).is_err(),
            "overlap"
        );
        let _h = RingHost::<u32>::setup(&m, RING, DATA).unwrap();
        assert_eq!(m.read_u32(GuestAddr(RING)).unwrap(), ioring::MAGIC);
        assert_eq!(m.read_u32(GuestAddr(RING + field::SLOTS)).unwrap(), SLOTS);
    }

    #[test]
    fn writes_and_reads_travel_through_their_slots() {
        let m = mem();
        let mut h = RingHost::setup(&m, RING, DATA).unwrap();
        let w = Request {
            op: op::WRITE,
            sectors: 8,
            ..read_req(8)
        };
        h.submit(&m, w, &[0xab; 4096], 10u32).unwrap();
        h.submit(&m, read_req(8), &[], 11u32).unwrap();
        assert!(h.unread(&m));
        let mut disk = vec![0u8; 4096];
        dom0_serve(&m, |r, m| {
            let at = GuestAddr(DATA + ioring::slot_offset(r.slot));
            let len = if r.op == op::WRITE {
                m.read(at, &mut disk).unwrap();
                0
            } else {
                m.write(at, &disk).unwrap();
                4096
            };
            Response {
                tag: r.tag,
                status: 0,
                len,
            }
        });
        assert!(!h.unread(&m));
        let done = h.reap(&m);
        assert_eq!(done.len(), 2);
        assert_eq!((done[0].route, done[0].status), (10, 0));
        assert_eq!(done[1].route, 11);
        assert_eq!(done[1].data, vec![0xab; 4096]);
        assert_eq!(h.in_flight(), 0);
        assert!(h.reap(&m).is_empty(), "each response taken once");
    }

    #[test]
    fn slots_bound_what_is_in_flight() {
        let m = mem();
        let mut h = RingHost::setup(&m, RING, DATA).unwrap();
        for i in 0..SLOTS {
            h.submit(&m, read_req(1), &[], i).unwrap();
        }
        assert_eq!(h.submit(&m, read_req(1), &[], 99), Err(SubmitError::Full));
        assert_eq!(
            h.submit(&m, read_req(257), &[], 99),
            Err(SubmitError::TooLarge)
        );
        let w = Request {
            op: op::WRITE,
            ..read_req(1)
        };
        assert_eq!(
            h.submit(&m, w, &[0; 100], 99),
            Err(SubmitError::TooLarge),
            "a write's data must be exactly its sectors"
        );
        assert_eq!(h.submit(&m, w, &[0; 512], 99), Err(SubmitError::Full));
        // Many rounds: the indices wrap cleanly.
        for round in 0..100u32 {
            dom0_serve(&m, |r, _| Response {
                tag: r.tag,
                status: 0,
                len: 512,
            });
            let done = h.reap(&m);
            assert_eq!(done.len(), SLOTS as usize, "round {round}");
            for i in 0..SLOTS {
                h.submit(&m, read_req(1), &[], i).unwrap();
            }
        }
        assert_eq!(h.faults, RingFaults::default());
    }

    #[test]
    fn a_lying_dom0_is_refused_and_counted() {
        let m = mem();
        let mut h = RingHost::setup(&m, RING, DATA).unwrap();
        h.submit(&m, read_req(8), &[], 1u32).unwrap();
        h.submit(&m, read_req(8), &[], 2u32).unwrap();
        // An index far ahead: nothing taken.
        m.write_u32(GuestAddr(RING + field::RSP_PROD), 1000)
            .unwrap();
        assert!(h.reap(&m).is_empty());
        assert_eq!(h.faults.bad_index, 1);
        m.write_u32(GuestAddr(RING + field::RSP_PROD), 0).unwrap();
        // A forged tag, a duplicate, and a read claiming more data than asked for.
        let mut b = [0u8; 32];
        m.read(GuestAddr(RING + ioring::req_offset(0)), &mut b)
            .unwrap();
        let first = Request::from_bytes(&b);
        m.read(GuestAddr(RING + ioring::req_offset(1)), &mut b)
            .unwrap();
        let second = Request::from_bytes(&b);
        let answers = [
            Response {
                tag: 0x00de_ad00,
                status: 0,
                len: 0,
            },
            Response {
                tag: first.tag,
                status: 0,
                len: 4096,
            },
            Response {
                tag: first.tag,
                status: 0,
                len: 4096,
            },
            Response {
                tag: second.tag,
                status: 0,
                len: 1 << 20,
            },
        ];
        for (i, a) in answers.iter().enumerate() {
            m.write(
                GuestAddr(RING + ioring::rsp_offset(i as u32)),
                &a.to_bytes(),
            )
            .unwrap();
        }
        m.write_u32(GuestAddr(RING + field::RSP_PROD), 4).unwrap();
        let done = h.reap(&m);
        assert_eq!(done.len(), 2);
        assert_eq!(
            (done[0].route, done[0].status, done[0].data.len()),
            (1, 0, 4096)
        );
        assert_eq!(
            (done[1].route, done[1].status),
            (2, 1),
            "over-long read fails"
        );
        assert_eq!(h.faults.bad_tag, 2);
        assert_eq!(h.faults.bad_len, 1);
    }

    #[test]
    fn when_dom0_goes_every_request_fails() {
        let m = mem();
        let mut h = RingHost::setup(&m, RING, DATA).unwrap();
        for i in 0..5u32 {
            h.submit(&m, read_req(1), &[], i).unwrap();
        }
        let done = h.fail_all();
        assert_eq!(done.len(), 5);
        assert!(done.iter().all(|d| d.status == 1));
        assert_eq!(h.in_flight(), 0);
        // A late response for them is refused.
        dom0_serve(&m, |r, _| Response {
            tag: r.tag,
            status: 0,
            len: 512,
        });
        assert!(h.reap(&m).is_empty());
        assert_eq!(h.faults.bad_tag, 5);
    }
}
