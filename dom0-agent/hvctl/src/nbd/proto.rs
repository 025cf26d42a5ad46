//! The NBD wire protocol's pure parts: a request header decoded and judged against the
//! export (what the server does with it), and the export name in an `NBD_OPT_INFO`/`GO`
//! payload. No I/O: `session.rs` reads the bytes and acts on the verdict, and the `nbd` fuzz
//! target (`hvctl/fuzz`) feeds these functions arbitrary bytes. Everything a client sends is
//! checked here before it reaches the pool: offsets and lengths against the export size,
//! lengths bounded to [`MAX_REQUEST`], unknown commands answered with `EINVAL`.

pub const REQUEST_MAGIC: u32 = 0x2560_9513;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1;

/// The largest read or write payload accepted (32 MiB).
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest option payload accepted in the handshake (64 KiB).
pub const MAX_OPTION: u32 = 64 << 10;

/// A request header: magic, flags, command, handle, offset, length (28 bytes, big-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// Decodes a request header; `Err` when the magic is wrong (the connection is closed).
pub fn header(b: &[u8; 28]) -> Result<Header, &'static str> {
    let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
    if be32(0) != REQUEST_MAGIC {
        return Err("bad request magic");
    }
    Ok(Header {
        flags: be16(4),
        cmd: be16(6),
        handle: be64(8),
        offset: be64(16),
        len: be32(24),
    })
}

/// What the server does with a request to an export of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Read {
        offset: u64,
        len: u32,
    },
    /// Read `len` payload bytes, then write them.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Read (and drop) `len` payload bytes, then answer `EINVAL`: the range is outside.
    WriteOutside {
        len: u32,
    },
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    /// The client says goodbye.
    Disconnect,
    /// Answer `EINVAL` (an unknown command, or a range outside the export).
    Invalid,
    /// Close the connection: the stream cannot be followed (a write payload too long).
    Close(&'static str),
}

/// Judges a request against the export's size.
pub fn judge(h: &Header, size: u64) -> Verdict {
    let (offset, len) = (h.offset, h.len);
    let fits = offset
        .checked_add(u64::from(len))
        .is_some_and(|e| e <= size);
    let in_range = len <= MAX_REQUEST && fits;
    let fua = h.flags & CMD_FLAG_FUA != 0;
    match h.cmd {
        CMD_READ if in_range => Verdict::Read { offset, len },
        CMD_WRITE if len > MAX_REQUEST => Verdict::Close("write too long"),
        CMD_WRITE if in_range => Verdict::Write { offset, len, fua },
        CMD_WRITE => Verdict::WriteOutside { len },
        // Zeroing and trimming carry no payload, so their length is bounded only by the
        // export.
        CMD_TRIM if fits => Verdict::Trim { offset, len, fua },
        CMD_WRITE_ZEROES if fits => Verdict::Zeroes { offset, len, fua },
        CMD_FLUSH => Verdict::Flush,
        CMD_DISC => Verdict::Disconnect,
        _ => Verdict::Invalid,
    }
}

/// The export name of an `NBD_OPT_INFO` / `NBD_OPT_GO` payload (a 32-bit length, the name,
/// then information requests, which are ignored); None when the length runs past the end.
pub fn info_name(data: &[u8]) -> Option<String> {
    let n = data
        .get(0..4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let n = usize::try_from(n).ok()?;
    let end = n.checked_add(4)?;
    data.get(4..end)
        .map(|b| String::from_utf8_lossy(b).into_owned())
}
