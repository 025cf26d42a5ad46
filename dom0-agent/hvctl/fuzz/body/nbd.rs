//! The body of the `nbd` fuzz target: the NBD server's request and option parsing
//! (`src/nbd/proto.rs`) on arbitrary bytes. The first 8 bytes are the export's size; the rest
//! are 28-byte request headers (the magic made valid for headers whose first byte is even,
//! so the judging is reached), and the tail an `NBD_OPT_INFO` payload. Each verdict is
//! checked against a reference written apart in 128-bit arithmetic: a request the server
//! passes on is inside the export and within the length limit, and nothing else is. Shared by
//! the cargo-fuzz target (`fuzz_targets/nbd.rs`) and the replay test (`tests/fuzz_replay.rs`).

use super::proto::{
    self, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, MAX_REQUEST,
    REQUEST_MAGIC, Verdict,
};

pub fn nbd(data: &[u8]) {
    let mut size = [0u8; 8];
    let n = data.len().min(8);
    size[..n].copy_from_slice(&data[..n]);
    let size = u64::from_le_bytes(size);
    let rest = data.get(8..).unwrap_or(&[]);
    let mut chunks = rest.chunks_exact(28);
    for c in &mut chunks {
        let mut b: [u8; 28] = c.try_into().expect("28 bytes");
        if b[0] & 1 == 0 {
            b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        let Ok(h) = proto::header(&b) else {
            assert_ne!(b[..4], REQUEST_MAGIC.to_be_bytes());
            continue;
        };
        assert_eq!(h.offset.to_be_bytes(), b[16..24]);
        assert_eq!(h.len.to_be_bytes(), b[24..28]);
        let end = u128::from(h.offset) + u128::from(h.len);
        let inside = end <= u128::from(size);
        let short = h.len <= MAX_REQUEST;
        let fua = h.flags & 1 != 0;
        let (offset, len) = (h.offset, h.len);
        let want = match h.cmd {
            CMD_READ if inside && short => Verdict::Read { offset, len },
            CMD_WRITE if !short => Verdict::Close("write too long"),
            CMD_WRITE if inside => Verdict::Write { offset, len, fua },
            CMD_WRITE => Verdict::WriteOutside { len },
            CMD_TRIM if inside => Verdict::Trim { offset, len, fua },
            CMD_WRITE_ZEROES if inside => Verdict::Zeroes { offset, len, fua },
            CMD_FLUSH => Verdict::Flush,
            CMD_DISC => Verdict::Disconnect,
            _ => Verdict::Invalid,
        };
        assert_eq!(
            proto::judge(&h, size),
            want,
            "{h:?} on an export of {size} bytes"
        );
    }
    let tail = chunks.remainder();
    if let Some(name) = proto::info_name(tail) {
        let declared = u32::from_be_bytes(tail[..4].try_into().expect("4 bytes"));
        assert!(declared as usize + 4 <= tail.len());
        assert_eq!(
            name,
            String::from_utf8_lossy(&tail[4..4 + declared as usize])
        );
    } else {
        assert!(
            tail.len() < 4
                || u32::from_be_bytes(tail[..4].try_into().expect("4 bytes")) as usize + 4
                    > tail.len()
        );
    }
}
