//! Property tests of the split virtqueue: arbitrary descriptor tables never make the walk
//! misbehave, chains a correct driver builds come back exactly, and the event-index
//! arithmetic matches its definition.

// Indices and lengths in these tests are small by construction.
#![allow(clippy::cast_possible_truncation)]
use hv_virtio::mem::VecGuestMemory;
use hv_virtio::queue::{
    Chain, VIRTQ_DESC_F_INDIRECT as IND, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as W,
    need_event,
};
use hv_virtio::{GuestAddr, GuestMemory, QueueLayout, RingFeatures, SplitQueue};
use proptest::prelude::*;

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const INDIRECT: u64 = 0x3000;
const BUFS: u64 = 0x10000;
const MEM: usize = 0x40000;

fn queue(mem: &VecGuestMemory, size: u16, indirect: bool) -> SplitQueue {
    SplitQueue::new(
        mem,
        QueueLayout {
            size,
            desc: GuestAddr(DESC),
            avail: GuestAddr(AVAIL),
            used: GuestAddr(USED),
        },
        RingFeatures {
            indirect,
            event_idx: false,
        },
    )
    .unwrap()
}

fn put_desc(mem: &VecGuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    mem.write(GuestAddr(table + 16 * u64::from(i)), &d).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes in the descriptor table and the indirect area: the walk returns, and when it
    /// accepts a chain, the chain obeys every bound the device relies on.
    #[test]
    fn arbitrary_tables_walk_safely(
        table in proptest::collection::vec(any::<u8>(), 16 * 16),
        ind in proptest::collection::vec(any::<u8>(), 16 * 32),
        head in 0u16..20,
        indirect in any::<bool>(),
        steer in any::<bool>(),
    ) {
        let mem = VecGuestMemory::new(0, MEM);
        mem.write(GuestAddr(DESC), &table).unwrap();
        mem.write(GuestAddr(INDIRECT), &ind).unwrap();
        if steer {
            // Make indirect references point at the indirect area more often.
            let mut b = [0u8; 8];
            b.copy_from_slice(&INDIRECT.to_le_bytes());
            mem.write(GuestAddr(DESC + 16 * u64::from(head % 16)), &b).unwrap();
        }
        let q = queue(&mem, 16, indirect);
        let mut c = Chain::new();
        if q.walk(&mem, head, &mut c).is_ok() {
            prop_assert!(head < 16);
            prop_assert!(c.readable().len() + c.writable().len() <= 16);
            let mut total = 0u64;
            for s in c.readable().iter().chain(c.writable()) {
                prop_assert!(s.addr.raw().checked_add(u64::from(s.len)).is_some());
                prop_assert!(s.len > 0);
                total += u64::from(s.len);
            }
            prop_assert!(total <= u64::from(u32::MAX));
            prop_assert_eq!(total, u64::from(c.readable_len()) + u64::from(c.writable_len()));
        }
    }

    /// Chains built by a correct driver (direct or indirect) come back exactly, in order,
    /// and their used elements land where the driver looks.
    #[test]
    fn driver_chains_round_trip(
        chains in proptest::collection::vec(
            (proptest::collection::vec((1u32..3000, any::<bool>()), 1..5), any::<bool>()),
            1..8,
        ),
    ) {
        let mem = VecGuestMemory::new(0, MEM);
        let mut q = queue(&mem, 64, true);
        let mut next_desc = 0u16;
        let mut next_buf = BUFS;
        let mut expected = Vec::new();
        for (i, (bufs, use_indirect)) in chains.iter().enumerate() {
            let mut bufs = bufs.clone();
            bufs.sort_by_key(|&(_, w)| w); // readable first (virtio 1.2 §2.7.4.2)
            let (table, first) = if *use_indirect {
                (INDIRECT + 0x100 * i as u64, 0u16)
            } else {
                (DESC, next_desc)
            };
            let mut segs = Vec::new();
            for (j, &(len, w)) in bufs.iter().enumerate() {
                let idx = first + j as u16;
                let last = j + 1 == bufs.len();
                let flags = if w { W } else { 0 } | if last { 0 } else { NEXT };
                put_desc(&mem, table, idx, next_buf, len, flags, idx + 1);
                segs.push((next_buf, len, w));
                next_buf += u64::from(len);
            }
            let head = next_desc;
            if *use_indirect {
                put_desc(&mem, DESC, head, table, 16 * bufs.len() as u32, IND, 0);
                next_desc += 1;
            } else {
                next_desc += bufs.len() as u16;
            }
            mem.write_u16(GuestAddr(AVAIL + 4 + 2 * i as u64), head).unwrap();
            expected.push((head, segs));
        }
        mem.write_u16(GuestAddr(AVAIL + 2), chains.len() as u16).unwrap();

        let mut c = Chain::new();
        for (n, (head, segs)) in expected.iter().enumerate() {
            prop_assert!(q.pop(&mem, &mut c).unwrap());
            prop_assert_eq!(c.head(), *head);
            let got: Vec<(u64, u32, bool)> = c
                .readable()
                .iter()
                .map(|s| (s.addr.raw(), s.len, false))
                .chain(c.writable().iter().map(|s| (s.addr.raw(), s.len, true)))
                .collect();
            prop_assert_eq!(&got, segs);
            q.add_used(&mem, c.head(), c.writable_len()).unwrap();
            let elem = USED + 4 + 8 * n as u64;
            prop_assert_eq!(mem.read_u32(GuestAddr(elem)).unwrap(), u32::from(*head));
            prop_assert_eq!(mem.read_u32(GuestAddr(elem + 4)).unwrap(), c.writable_len());
        }
        prop_assert!(!q.pop(&mem, &mut c).unwrap());
        prop_assert_eq!(mem.read_u16(GuestAddr(USED + 2)).unwrap(), chains.len() as u16);
    }

    /// `need_event` is "event lies in [old, new)" on the 16-bit circle.
    #[test]
    fn need_event_is_crossing(event in any::<u16>(), old in any::<u16>(), step in 0u16..1000) {
        let new = old.wrapping_add(step);
        let crossed = (0..step).any(|k| old.wrapping_add(k) == event);
        prop_assert_eq!(need_event(event, new, old), crossed);
    }
}
