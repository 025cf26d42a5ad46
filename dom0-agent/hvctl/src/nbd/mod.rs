//! The NBD server of `hvctl volume serve`: every volume of the pool (or a chosen list) as its
//! own export, to many clients at once, with admin commands from other `hvctl` processes run
//! through its control socket.
//!
//! Threads: one accepts TCP connections and starts a [`session`] thread per client; one
//! accepts control connections; the calling thread is the **pool thread**. The pool is a
//! [`SharedPool`]: every session thread sends its client's reads, writes, trims, zeroing and
//! flushes to it **directly and at the same time as the others** (and keeps up to 16 of its
//! own client's requests in flight, answered in order by a second thread of the session) (region locks order
//! overlapping requests to one volume, requests to other ranges and volumes run in parallel,
//! flushes and FUA writes share group commits; see `volmgr::pool::shared`). The pool thread
//! handles what changes the set of exports or the pool's configuration: it attaches sessions
//! to exports, runs admin commands from other `hvctl` processes, and runs background work
//! (resync, snapshot fill, relayout) in small steps while no message arrives; each of those
//! runs with the whole pool ([`SharedPool::with_pool`]: client requests already submitted
//! finish first, new ones wait until it is done).
//!
//! Rules the pool thread enforces: a session is attached to one export and its volume id
//! (ids are never reused, so a removed volume's late writes cannot land in another one);
//! removing, shrinking or rolling back a volume with attached sessions is refused unless
//! `--force`, which first disconnects them (their gate is closed before the command waits
//! for the requests in flight, so none of theirs lands after it); a session that ends gets
//! the pool flushed.

pub mod proto;
mod session;

use std::collections::BTreeMap;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Parser as _;
use volmgr::format::VolKind;
use volmgr::pool::shared::Op;
use volmgr::{Error, Pool, SharedPool};

use crate::{Cli, CliError, Top, VolOp, control, ops, size_blocks};

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// How to serve.
pub struct ServeConfig {
    /// Export only these volumes (default: every volume, as the pool has them now).
    pub exports: Option<Vec<String>>,
    /// Stop after this many connections have come and gone.
    pub max_clients: Option<usize>,
    /// A client that sends no request for this long is disconnected (`None`: never).
    pub idle: Option<Duration>,
    /// A client that has not chosen an export within this long is disconnected.
    pub handshake: Duration,
}

/// One request of a client, for the pool thread.
pub enum Io {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
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
}

/// What the pool thread is asked to do.
pub enum Msg {
    /// Names of the exports (`NBD_OPT_LIST`).
    List { reply: Sender<Vec<String>> },
    /// Size in bytes of an export, if it exists (`NBD_OPT_INFO`).
    Lookup {
        name: String,
        reply: Sender<Option<u64>>,
    },
    /// Attaches a session to an export; answers the export, or `None` for an unknown name.
    Attach {
        session: u64,
        name: String,
        stream: TcpStream,
        reply: Sender<Option<Export>>,
    },
    /// A connection ended (attached or not).
    Done { session: u64 },
    /// A command from another hvctl.
    Control(control::Request),
}

/// Whether a session may still send requests to its volume. A session holds it while it
/// checks and submits a request; the pool thread closes it (to disconnect the session) before
/// a forced command waits for the requests in flight.
pub type Gate = Arc<Mutex<bool>>;

/// What a session is attached to.
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// The volume's id.
    pub vol: u32,
    pub gate: Gate,
    pub pool: Arc<SharedPool>,
}

struct Attachment {
    export: String,
    gate: Gate,
    stream: TcpStream,
}

struct Server<'a> {
    pool: Arc<SharedPool>,
    cfg: &'a ServeConfig,
    sessions: BTreeMap<u64, Attachment>,
    finished: usize,
    background: bool,
}

/// Serves `pool` on `listener` (and commands on `ctl`) until `cfg.max_clients` connections
/// have come and gone, or forever. At the end (or on an error) the pool is flushed and its
/// owner record cleared.
pub fn serve(
    pool: Pool,
    cfg: &ServeConfig,
    listener: &TcpListener,
    ctl: Option<control::Listener>,
    bind: &str,
) -> io::Result<()> {
    let pool = Arc::new(SharedPool::new(pool));
    let r = serve_shared(&pool, cfg, listener, ctl, bind);
    let end = pool.with_pool(|p| p.flush().and_then(|()| p.release()));
    r.and(end.map_err(io::Error::other))
}

fn serve_shared(
    pool: &Arc<SharedPool>,
    cfg: &ServeConfig,
    listener: &TcpListener,
    ctl: Option<control::Listener>,
    bind: &str,
) -> io::Result<()> {
    if let Some(names) = &cfg.exports {
        for n in names {
            pool.peek(|p| p.volume_id(n).map(|_| ()))
                .map_err(io::Error::other)?;
        }
    }
    let (tx, rx) = channel();
    let port = listener.local_addr()?.port();
    let mut server = Server {
        pool: pool.clone(),
        cfg,
        sessions: BTreeMap::new(),
        finished: 0,
        background: true,
    };
    let names = server.exports();
    for n in &names {
        eprintln!("hvctl: serving {n} on nbd://{bind}:{port}/{n}");
    }
    if names.is_empty() {
        eprintln!("hvctl: serving no volumes yet on nbd://{bind}:{port}/");
    }
    if let Some(c) = &ctl {
        eprintln!("hvctl: control socket {}", c.path.display());
        let l = c.listener.try_clone()?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let tx = tx.clone();
                std::thread::spawn(move || match control::Request::read(conn) {
                    Ok(req) => {
                        let _ = tx.send(Msg::Control(req));
                    }
                    Err(e) => eprintln!("hvctl: control: bad request: {e}"),
                });
            }
        });
    }
    let l = listener.try_clone()?;
    let (handshake, idle) = (cfg.handshake, cfg.idle);
    let atx = tx.clone();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().enumerate() {
            let Ok(mut s) = conn else { continue };
            let tx = atx.clone();
            let session = n as u64;
            std::thread::spawn(move || {
                match session::run(&mut s, session, &tx, handshake, idle) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
                    Err(e) => eprintln!("nbd: client error: {e}"),
                }
                let _ = tx.send(Msg::Done { session });
            });
        }
    });
    drop(tx);
    server.run(&rx)?;
    drop(ctl);
    Ok(())
}

/// The NBD error number for a volume manager error.
fn errno(e: &Error) -> u32 {
    match e {
        Error::ThinPoolFull { .. } | Error::NoSpace(_) => ENOSPC,
        Error::OutOfRange(_) | Error::Misaligned | Error::InvalidArgument(_) => EINVAL,
        _ => EIO,
    }
}

/// A request of a session, started ([`start`]) and not yet answered ([`finish`]).
pub enum Started {
    /// In the pool under this ticket.
    Ticket {
        ticket: u64,
        fua: bool,
        what: &'static str,
        at: u64,
    },
    /// A flush: performed when it is answered, after every earlier request of the session.
    Flush,
    /// Refused at once with this NBD error number.
    Failed(u32),
}

/// Starts one request of a session attached to `ex`, from the session's thread, beside every
/// other session's: submitted to the shared pool, not waited for.
pub fn start(ex: &Export, io: Io) -> Started {
    let vol = ex.vol;
    let (op, fua, what, at) = match io {
        Io::Read { offset, len } => (
            Op::Read {
                vol,
                offset,
                len: u64::from(len),
            },
            false,
            "read",
            offset,
        ),
        Io::Write { offset, data, fua } => (Op::Write { vol, offset, data }, fua, "write", offset),
        Io::Trim { offset, len, fua } => (
            Op::Discard {
                vol,
                offset,
                len: u64::from(len),
            },
            fua,
            "trim",
            offset,
        ),
        Io::Zeroes { offset, len, fua } => (
            Op::Zeroes {
                vol,
                offset,
                len: u64::from(len),
            },
            fua,
            "write zeroes",
            offset,
        ),
        Io::Flush => return Started::Flush,
    };
    // Checked and submitted under the gate, so a session disconnected by a forced command
    // either got its request in before that command waited for the requests in flight, or
    // does not reach the pool at all.
    loop {
        let open = ex.gate.lock().unwrap_or_else(PoisonError::into_inner);
        if !*open {
            // Disconnected by an admin command: nothing more reaches the pool.
            return Started::Failed(EIO);
        }
        match ex.pool.submit(op.clone()) {
            Ok(ticket) => {
                return Started::Ticket {
                    ticket,
                    fua,
                    what,
                    at,
                };
            }
            // An admin command has the pool: try again once it is done.
            Err(_) => {
                drop(open);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Waits for a started request (a flush is performed now: it covers every write answered
/// before it): data read, or an NBD error number.
pub fn finish(ex: &Export, st: Started) -> Result<Vec<u8>, u32> {
    let (ticket, fua, what, at) = match st {
        Started::Failed(e) => return Err(e),
        Started::Flush => {
            return ex.pool.flush().map(|()| Vec::new()).map_err(|e| {
                eprintln!("nbd: flush: {e}");
                errno(&e)
            });
        }
        Started::Ticket {
            ticket,
            fua,
            what,
            at,
        } => (ticket, fua, what, at),
    };
    let r = match ex.pool.wait(ticket) {
        Ok(data) if fua => ex.pool.flush().map(|()| data),
        r => r,
    };
    r.map_err(|e| {
        eprintln!("nbd: {what} at {at}: {e}");
        errno(&e)
    })
}

impl Server<'_> {
    /// The export names, in the pool's order.
    fn exports(&self) -> Vec<String> {
        self.pool.peek(|p| {
            p.meta()
                .volumes
                .iter()
                .filter(|v| !v.internal && !matches!(v.kind, VolKind::ThinPool { .. }))
                .filter(|v| {
                    self.cfg
                        .exports
                        .as_ref()
                        .is_none_or(|l| l.contains(&v.name))
                })
                .map(|v| v.name.clone())
                .collect()
        })
    }

    /// The export `name` refers to ("" = the only one), as (name, volume id, size in bytes).
    fn lookup(&self, name: &str) -> Option<(String, u32, u64)> {
        let names = self.exports();
        let name = match (name, names.as_slice()) {
            ("", [only]) => only.clone(),
            ("", _) => return None,
            (n, _) => names.iter().find(|e| *e == n)?.clone(),
        };
        let (id, size) = self.pool.peek(|p| {
            let id = p.volume_id(&name).ok()?;
            Some((id, p.volume_size(id).ok()? * 4096))
        })?;
        Some((name, id, size))
    }

    fn run(&mut self, rx: &Receiver<Msg>) -> io::Result<()> {
        loop {
            let wait = if self.background {
                Duration::from_millis(20)
            } else {
                Duration::from_secs(3600)
            };
            let msg = match rx.recv_timeout(wait) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.background = match self.pool.with_pool(|p| p.background_step(16)) {
                        Ok(more) => more,
                        Err(e) => {
                            // Background work failing must not cost the clients their sessions.
                            eprintln!("nbd: background work stopped: {e}");
                            false
                        }
                    };
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match msg {
                Msg::List { reply } => {
                    let _ = reply.send(self.exports());
                }
                Msg::Lookup { name, reply } => {
                    let _ = reply.send(self.lookup(&name).map(|e| e.2));
                }
                Msg::Attach {
                    session,
                    name,
                    stream,
                    reply,
                } => {
                    let found = self.lookup(&name).map(|(export, vol, size)| {
                        let gate: Gate = Arc::new(Mutex::new(true));
                        self.sessions.insert(
                            session,
                            Attachment {
                                export,
                                gate: gate.clone(),
                                stream,
                            },
                        );
                        Export {
                            size,
                            vol,
                            gate,
                            pool: self.pool.clone(),
                        }
                    });
                    let _ = reply.send(found);
                }
                Msg::Done { session } => {
                    let attached = self.sessions.remove(&session).is_some();
                    // A client that goes away without flushing gets its writes flushed anyway.
                    self.pool.flush().map_err(io::Error::other)?;
                    if attached {
                        let st = self.pool.stats();
                        eprintln!(
                            "nbd: client done; pool so far: {} requests, at most {} in the pool \
                             at once, {} waited for an overlapping one, {} commits for {} \
                             flush tickets",
                            st.requests,
                            st.max_unfinished,
                            st.range_waits,
                            st.commits,
                            st.flush_tickets
                        );
                    }
                    self.finished += 1;
                    self.background = true;
                    if self.cfg.max_clients.is_some_and(|m| self.finished >= m) {
                        break;
                    }
                }
                Msg::Control(req) => {
                    self.control(req);
                    self.background = true;
                }
            }
        }
        self.pool.flush().map_err(io::Error::other)
    }

    /// Runs a command sent by another hvctl and answers it.
    fn control(&mut self, req: control::Request) {
        let (code, out, err) = self.control_inner(&req);
        let note = format!(
            "hvctl: run by the server holding the pool (process {})\n",
            std::process::id()
        );
        req.reply(code, &out, format!("{note}{err}").as_bytes());
    }

    fn control_inner(&mut self, req: &control::Request) -> (u8, Vec<u8>, String) {
        let cli = match Cli::try_parse_from(&req.args) {
            Ok(c) => c,
            Err(e) => return (2, Vec::new(), e.render().to_string()),
        };
        let Top::Volume(cmd) = cli.cmd;
        let fail = |e: CliError| {
            let hint = e
                .hint()
                .map(|h| format!("hvctl: {h}\n"))
                .unwrap_or_default();
            (1, format!("hvctl: error: {e}\n{hint}"))
        };
        let forced = match self.check_clients(&cmd.op) {
            Ok(f) => f,
            Err(e) => {
                let (c, m) = fail(e);
                return (c, Vec::new(), m);
            }
        };
        let mut out = Vec::new();
        // With the whole pool: client requests already submitted finish first.
        let r = self.pool.with_pool(|pool| {
            if forced {
                pool.flush()?;
            }
            ops::run_op(&cmd.op, pool, &mut out, &req.cwd)
        });
        match r {
            Ok(()) => (0, out, String::new()),
            Err(e) => {
                let (c, m) = fail(e);
                (c, out, m)
            }
        }
    }

    /// Refuses commands that would pull a volume from under its clients, unless forced; when
    /// forced, disconnects those clients first (whether it did).
    fn check_clients(&mut self, op: &VolOp) -> Result<bool, CliError> {
        let (name, force, what) = match op {
            VolOp::Serve { .. }
            | VolOp::CreatePool { .. }
            | VolOp::AddDisk { .. }
            | VolOp::Upgrade
            | VolOp::Bench { .. } => {
                return Err(CliError::Usage(
                    "the pool is being served by this process; stop the server for this command"
                        .into(),
                ));
            }
            VolOp::Remove { name, force } => (name, *force, "remove"),
            VolOp::Rollback { name, force, .. } => (name, *force, "roll back"),
            VolOp::Resize { name, size, force } => {
                let now = self
                    .pool
                    .peek(|p| p.volume_id(name).and_then(|id| p.volume_size(id)))?;
                if size_blocks(size)? >= now {
                    return Ok(false);
                }
                (name, *force, "shrink")
            }
            _ => return Ok(false),
        };
        let users: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, a)| a.export == *name)
            .map(|(s, _)| *s)
            .collect();
        if users.is_empty() {
            return Ok(false);
        }
        if !force {
            return Err(CliError::Usage(format!(
                "volume '{name}' has {} NBD client{} connected; refusing to {what} it under \
                 them (--force disconnects them first)",
                users.len(),
                if users.len() == 1 { "" } else { "s" }
            )));
        }
        for s in users {
            if let Some(a) = self.sessions.remove(&s) {
                // Closed before the command waits for the requests in flight: whatever the
                // session submits from now on is refused.
                *a.gate.lock().unwrap_or_else(PoisonError::into_inner) = false;
                let _ = a.stream.shutdown(Shutdown::Both);
                eprintln!("nbd: disconnected a client of '{name}' to {what} it (--force)");
            }
        }
        Ok(true)
    }
}
