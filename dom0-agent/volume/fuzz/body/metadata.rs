//! The body of the `metadata` fuzz target: what a damaged or hostile disk hands the volume
//! manager's decoders. The first byte picks the decoder (label, owner record, pool metadata
//! of record version 1, 2 or 3, dirty-region log, B-tree node); the rest is the bytes read
//! from disk. Node blocks get a valid checksum first (otherwise almost every input would stop
//! at the checksum), so the fuzzer reaches the node parser itself. Whatever decodes must
//! encode to what decodes again; and the same, when it is valid: pool metadata is decoded for
//! structure only, and what `validate_meta` refuses (a pool never opens with it: two volumes
//! with one id, say) need not survive a round trip unchanged. Shared by the cargo-fuzz target
//! (`fuzz_targets/metadata.rs`) and the replay test (`tests/fuzz_replay.rs`).

use volmgr::btree::Node;
use volmgr::format::{DrlRecord, Label, Owner, PoolMeta};

pub fn metadata(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    match pick % 7 {
        0 => {
            if let Some(l) = Label::decode(rest) {
                assert_eq!(Label::decode(&l.encode()), Some(l));
            }
        }
        1 => {
            if let Some(o) = Owner::decode(rest) {
                assert_eq!(Owner::decode(&o.encode()).as_ref(), Some(&o));
            }
        }
        v @ 2..=4 => {
            let version = u32::from(v - 1);
            if let Ok(m) = PoolMeta::decode_version(rest, version) {
                let again = PoolMeta::decode_version(&m.encode(), m.version)
                    .expect("what decoded encodes to what decodes");
                if volmgr::pool::validate_meta(&m).is_ok() {
                    assert_eq!(again, m);
                }
            }
        }
        5 => {
            if let Ok(d) = DrlRecord::decode(rest) {
                assert_eq!(DrlRecord::decode(&d.encode()).as_ref(), Ok(&d));
            }
        }
        _ => {
            let mut b = vec![0u8; volmgr::BLOCK_SIZE];
            let n = rest.len().min(b.len());
            b[..n].copy_from_slice(&rest[..n]);
            b[0..8].copy_from_slice(&volmgr::btree::NODE_MAGIC);
            let pool_id = u128::from_le_bytes(b[8..24].try_into().expect("16 bytes"));
            let blk = u64::from_le_bytes(b[24..32].try_into().expect("8 bytes"));
            b[60..64].fill(0);
            let crc = crc32fast::hash(&b);
            b[60..64].copy_from_slice(&crc.to_le_bytes());
            if let Ok(node) = Node::decode(&b, pool_id, blk) {
                let again = Node::decode(&node.encode(pool_id, blk, 1), pool_id, blk)
                    .expect("what decoded encodes to what decodes");
                assert_eq!(again, node);
            }
        }
    }
}
