//! One NBD client connection, on its own thread: the fixed newstyle handshake (exports
//! listed with `NBD_OPT_LIST`, unknown export names refused) and the transmission phase
//! (simple replies). The pool itself is never touched here: every request goes to the pool
//! thread as a [`Msg`] and waits for its answer.
//!
//! Protocol reference: the NBD protocol document (`doc/proto.md` of the nbd project). Every
//! request field is checked before use: offsets and lengths against the export size, lengths
//! bounded to 32 MiB, unknown commands answered with `EINVAL`. A client that has not chosen
//! an export within the handshake timeout, or sends no request for the idle timeout, is
//! disconnected.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, Instant};

use super::proto::{self, MAX_OPTION, Verdict};
use super::{Export, Io, Msg};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
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

const EINVAL: u32 = 22;

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

/// What a session was told about its export when it attached.
pub struct Attached {
    pub export: Export,
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Asks the pool thread and waits for the answer (the pool thread outlives every session).
fn ask<T>(tx: &Sender<Msg>, make: impl FnOnce(Sender<T>) -> Msg) -> io::Result<T> {
    let (rtx, rrx) = channel();
    tx.send(make(rtx))
        .map_err(|_| io::Error::other("server is stopping"))?;
    rrx.recv()
        .map_err(|_| io::Error::other("server is stopping"))
}

/// Runs one client connection to its end.
pub fn run(
    s: &mut TcpStream,
    session: u64,
    tx: &Sender<Msg>,
    handshake: Duration,
    idle: Option<Duration>,
) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(idle.unwrap_or(handshake).max(handshake)))?;
    let Some(att) = handshake_phase(s, session, tx, handshake)? else {
        return Ok(());
    };
    s.set_read_timeout(idle)?;
    s.set_write_timeout(idle)?;
    transmission(s, &att.export, idle)
}

fn handshake_phase(
    s: &mut TcpStream,
    session: u64,
    tx: &Sender<Msg>,
    timeout: Duration,
) -> io::Result<Option<Attached>> {
    let deadline = Instant::now() + timeout;
    let arm = |s: &TcpStream| -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no export chosen within the handshake timeout",
            ));
        }
        s.set_read_timeout(Some(left))
    };
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    arm(s)?;
    let client_flags = rd_u32(s)?;
    let tflags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    let attach = |name: String, stream: &TcpStream| -> io::Result<Option<Export>> {
        let stream = stream.try_clone()?;
        ask(tx, |reply| Msg::Attach {
            session,
            name,
            stream,
            reply,
        })
    };
    // Option haggling.
    loop {
        arm(s)?;
        if rd_u64(s)? != IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let opt = rd_u32(s)?;
        let len = rd_u32(s)?;
        if len > MAX_OPTION {
            return Err(invalid("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No error reply exists for this option: an unknown name closes the connection.
                let Some(export) = attach(name.clone(), s)? else {
                    eprintln!("nbd: client asked for unknown export '{name}'; closed");
                    return Ok(None);
                };
                let size = export.size;
                let mut b = Vec::new();
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&tflags.to_be_bytes());
                if client_flags & CLIENT_NO_ZEROES == 0 {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(Some(Attached { export }));
            }
            OPT_ABORT => {
                opt_reply(s, opt, REP_ACK, &[])?;
                return Ok(None);
            }
            OPT_LIST => {
                for name in ask(tx, |reply| Msg::List { reply })? {
                    let mut b = u32::try_from(name.len())
                        .unwrap_or(0)
                        .to_be_bytes()
                        .to_vec();
                    b.extend_from_slice(name.as_bytes());
                    opt_reply(s, opt, REP_SERVER, &b)?;
                }
                opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some(want) = proto::info_name(&data) else {
                    opt_reply(s, opt, REP_ERR_UNKNOWN, b"malformed option")?;
                    continue;
                };
                let (size, export) = if opt == OPT_GO {
                    let e = attach(want.clone(), s)?;
                    (e.as_ref().map(|e| e.size), e)
                } else {
                    let size = ask(tx, |reply| Msg::Lookup {
                        name: want.clone(),
                        reply,
                    })?;
                    (size, None)
                };
                let Some(size) = size else {
                    opt_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info)?;
                opt_reply(s, opt, REP_ACK, &[])?;
                if let Some(export) = export {
                    return Ok(Some(Attached { export }));
                }
            }
            _ => opt_reply(s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// Requests of one client in flight at once: its reader submits them to the pool as they
/// arrive, its replier answers them in order.
const DEPTH: usize = 16;

/// An answer the replier sends, in the order the requests came.
enum Answer {
    Now(u32),
    Started(super::Started),
}

fn send_reply(s: &mut TcpStream, handle: u64, err: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&err.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// The transmission phase: this thread reads requests and submits them to the shared pool at
/// once (up to [`DEPTH`] in flight), a second thread waits for each in turn and replies in
/// the order they came. A flush is performed when its turn to be answered comes, so it
/// covers every write answered before it (NBD's rule).
fn transmission(s: &mut TcpStream, export: &Export, idle: Option<Duration>) -> io::Result<()> {
    let mut out = s.try_clone()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Answer)>(DEPTH);
    std::thread::scope(|sc| {
        let replier = sc.spawn(move || -> io::Result<()> {
            for (handle, a) in rx {
                let r = match a {
                    Answer::Now(e) => Err(e),
                    Answer::Started(st) => super::finish(export, st),
                };
                let sent = match r {
                    Ok(data) => send_reply(&mut out, handle, 0, &data),
                    Err(errno) => send_reply(&mut out, handle, errno, &[]),
                };
                if let Err(e) = sent {
                    // The reader is then told by its socket.
                    let _ = out.shutdown(std::net::Shutdown::Both);
                    return Err(e);
                }
            }
            Ok(())
        });
        let r = read_requests(s, export, idle, &tx);
        drop(tx);
        let w = replier
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("replier panicked")));
        r.and(w)
    })
}

fn read_requests(
    s: &mut TcpStream,
    export: &Export,
    idle: Option<Duration>,
    tx: &std::sync::mpsc::SyncSender<(u64, Answer)>,
) -> io::Result<()> {
    let size = export.size;
    let answer = |handle: u64, a: Answer| {
        tx.send((handle, a))
            .map_err(|_| io::Error::other("the replier stopped"))
    };
    loop {
        let magic = match rd_u32(s) {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                eprintln!(
                    "nbd: client idle for {:.1}s; disconnected",
                    idle.unwrap_or_default().as_secs_f64()
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&magic.to_be_bytes());
        s.read_exact(&mut b[4..])?;
        let h = proto::header(&b).map_err(invalid)?;
        let handle = h.handle;
        let io = match proto::judge(&h, size) {
            Verdict::Read { offset, len } => Io::Read { offset, len },
            Verdict::Write { offset, len, fua } => {
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data)?;
                Io::Write { offset, data, fua }
            }
            Verdict::WriteOutside { len } => {
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data)?;
                answer(handle, Answer::Now(EINVAL))?;
                continue;
            }
            Verdict::Trim { offset, len, fua } => Io::Trim { offset, len, fua },
            Verdict::Zeroes { offset, len, fua } => Io::Zeroes { offset, len, fua },
            Verdict::Flush => Io::Flush,
            Verdict::Disconnect => return Ok(()),
            Verdict::Close(why) => return Err(invalid(why)),
            Verdict::Invalid => {
                answer(handle, Answer::Now(EINVAL))?;
                continue;
            }
        };
        // Straight to the shared pool, from this thread, beside every other session; the
        // replier waits for it.
        answer(handle, Answer::Started(super::start(export, io)))?;
    }
}
