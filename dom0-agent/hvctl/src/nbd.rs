//! A minimal NBD server (fixed newstyle handshake, simple replies) serving one volume, so
//! qemu-img, qemu-io or the kernel client can read and write it. One client at a time.
//!
//! Protocol reference: the NBD protocol document (`doc/proto.md` of the nbd project). Every
//! request field is checked before use: offsets and lengths against the volume size, lengths
//! bounded to 32 MiB, unknown commands answered with `EINVAL`. While the client is idle the
//! pool's background work (resync, snapshot fill, relayout) progresses, in small steps.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use volmgr::{Error, Pool};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const INFO_EXPORT: u16 = 0;

const TF_HAS_FLAGS: u16 = 1;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const MAX_REQUEST: u32 = 32 << 20;
const MAX_OPTION: u32 = 64 << 10;

fn rd_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn rd_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn rd_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn opt_reply(s: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Serves volume `name` of `pool` on `listener` until `max_clients` clients have come and gone
/// (forever with `None`).
pub fn serve(
    pool: &mut Pool,
    name: &str,
    listener: &TcpListener,
    max_clients: Option<usize>,
) -> io::Result<()> {
    let id = pool.volume_id(name).map_err(io::Error::other)?;
    for (served, conn) in listener.incoming().enumerate() {
        let mut s = conn?;
        s.set_nodelay(true)?;
        match session(pool, id, name, &mut s) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => eprintln!("nbd: client error: {e}"),
        }
        // A client that goes away without flushing gets its writes flushed anyway.
        pool.flush().map_err(io::Error::other)?;
        if max_clients.is_some_and(|m| served + 1 >= m) {
            break;
        }
    }
    Ok(())
}

fn session(pool: &mut Pool, id: u32, name: &str, s: &mut TcpStream) -> io::Result<()> {
    let size = pool.volume_size(id).map_err(io::Error::other)? * 4096;
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = rd_u32(s)?;
    let tflags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    // Option haggling.
    loop {
        if rd_u64(s)? != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad option magic",
            ));
        }
        let opt = rd_u32(s)?;
        let len = rd_u32(s)?;
        if len > MAX_OPTION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "option too long",
            ));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let mut b = Vec::new();
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&tflags.to_be_bytes());
                if client_flags & CLIENT_NO_ZEROES == 0 {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                break;
            }
            OPT_ABORT => {
                opt_reply(s, opt, REP_ACK, &[])?;
                return Ok(());
            }
            OPT_LIST => {
                let mut b = u32::try_from(name.len())
                    .unwrap_or(0)
                    .to_be_bytes()
                    .to_vec();
                b.extend_from_slice(name.as_bytes());
                opt_reply(s, opt, REP_SERVER, &b)?;
                opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let nlen = data
                    .get(0..4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    as usize;
                let want = data
                    .get(4..4 + nlen)
                    .map(|b| String::from_utf8_lossy(b).into_owned());
                if want.as_deref().is_some_and(|w| !w.is_empty() && w != name) {
                    opt_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info)?;
                opt_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break;
                }
            }
            _ => opt_reply(s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
    // Transmission. While the client is idle, background work (resync, snapshot fill,
    // relayout) makes progress, so those run online with the volume in use.
    let mut buf = Vec::new();
    let mut background = true;
    loop {
        if background {
            s.set_read_timeout(Some(Duration::from_millis(20)))?;
            let mut probe = [0u8; 1];
            match s.peek(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    background = match pool.background_step(16) {
                        Ok(more) => more,
                        Err(e) => {
                            // Background work failing must not cost the client its session.
                            eprintln!("nbd: background work stopped: {e}");
                            false
                        }
                    };
                    if !background {
                        s.set_read_timeout(None)?;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            s.set_read_timeout(None)?;
        }
        if rd_u32(s)? != REQUEST_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request magic",
            ));
        }
        let flags = rd_u16(s)?;
        let cmd = rd_u16(s)?;
        let handle = rd_u64(s)?;
        let offset = rd_u64(s)?;
        let len = rd_u32(s)?;
        let in_range = len <= MAX_REQUEST
            && offset
                .checked_add(u64::from(len))
                .is_some_and(|e| e <= size);
        let reply = |s: &mut TcpStream, err: u32, data: &[u8]| -> io::Result<()> {
            let mut b = Vec::with_capacity(16 + data.len());
            b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&err.to_be_bytes());
            b.extend_from_slice(&handle.to_be_bytes());
            b.extend_from_slice(data);
            s.write_all(&b)
        };
        let errno = |e: &Error| match e {
            Error::ThinPoolFull { .. } | Error::NoSpace(_) => ENOSPC,
            Error::OutOfRange(_) | Error::Misaligned | Error::InvalidArgument(_) => EINVAL,
            _ => EIO,
        };
        match cmd {
            CMD_READ => {
                if !in_range {
                    reply(s, EINVAL, &[])?;
                    continue;
                }
                buf.resize(len as usize, 0);
                match pool.read_bytes(id, offset, &mut buf) {
                    Ok(()) => reply(s, 0, &buf)?,
                    Err(e) => {
                        eprintln!("nbd: read at {offset}: {e}");
                        reply(s, errno(&e), &[])?;
                    }
                }
            }
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
                if cmd == CMD_WRITE {
                    if len > MAX_REQUEST {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "write too long"));
                    }
                    buf.resize(len as usize, 0);
                    s.read_exact(&mut buf)?;
                }
                // Zeroing and trimming carry no payload, so their length is not bounded by
                // the request buffer, only by the volume.
                let in_range = if cmd == CMD_WRITE {
                    in_range
                } else {
                    offset
                        .checked_add(u64::from(len))
                        .is_some_and(|e| e <= size)
                };
                if !in_range {
                    reply(s, EINVAL, &[])?;
                    continue;
                }
                let mut r = match cmd {
                    CMD_WRITE => pool.write_bytes(id, offset, &buf),
                    CMD_TRIM => pool.discard(id, offset, u64::from(len)).map(|_| ()),
                    _ => pool.write_zeroes(id, offset, u64::from(len)),
                };
                if r.is_ok() && flags & CMD_FLAG_FUA != 0 {
                    r = pool.flush();
                }
                match r {
                    Ok(()) => reply(s, 0, &[])?,
                    Err(e) => {
                        eprintln!("nbd: write at {offset}: {e}");
                        reply(s, errno(&e), &[])?;
                    }
                }
            }
            CMD_FLUSH => match pool.flush() {
                Ok(()) => reply(s, 0, &[])?,
                Err(e) => reply(s, errno(&e), &[])?,
            },
            CMD_DISC => return Ok(()),
            _ => reply(s, EINVAL, &[])?,
        }
    }
}
