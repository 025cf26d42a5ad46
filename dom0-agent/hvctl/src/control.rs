//! The control socket of a running `hvctl volume serve`: other `hvctl volume` commands on the
//! served pool are sent here and run by the server on the pool it has open, instead of
//! opening the images behind its back.
//!
//! The socket is `.<image file name>.hvctl.sock` next to the first image given to `serve`; a
//! client whose images are locked by another process looks for it next to each of its own
//! images. One connection carries one command. Request: a u32 count of strings, then each
//! string as a u32 length and its bytes (little endian): the client's working directory,
//! then its whole command line. Reply: the exit status (u8), then stdout and stderr, each as
//! a u32 length and bytes. Counts and lengths are bounded before anything is allocated.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::CliError;

const MAX_STRINGS: u32 = 256;
const MAX_STRING: u32 = 64 << 10;
const MAX_REPLY: u32 = 64 << 20;

/// Where the control socket of a server whose first image is `image` lives.
pub fn socket_path(image: &Path) -> PathBuf {
    let name = image.file_name().unwrap_or_default().to_string_lossy();
    image.with_file_name(format!(".{name}.hvctl.sock"))
}

/// The server's end: a listening socket, removed when dropped.
pub struct Listener {
    pub listener: UnixListener,
    pub path: PathBuf,
}

impl Listener {
    /// Binds the control socket for a server whose first image is `first`. A socket left by
    /// a server that died is replaced; on failure the server runs without one (said on
    /// stderr), and other commands are then refused while it runs.
    pub fn bind(first: &Path) -> Option<Listener> {
        let path = socket_path(first);
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                eprintln!(
                    "hvctl: {} is answered by another server; serving without a control socket",
                    path.display()
                );
                return None;
            }
            let _ = std::fs::remove_file(&path);
        }
        match UnixListener::bind(&path) {
            Ok(listener) => Some(Listener { listener, path }),
            Err(e) => {
                eprintln!(
                    "hvctl: no control socket ({}: {e}); other hvctl commands on this pool are \
                     refused while it is served",
                    path.display()
                );
                None
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A command received on the control socket.
pub struct Request {
    pub cwd: PathBuf,
    pub args: Vec<String>,
    conn: UnixStream,
}

fn rd_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn rd_bytes(s: &mut impl Read, max: u32) -> io::Result<Vec<u8>> {
    let n = rd_u32(s)?;
    if n > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "string too long",
        ));
    }
    let mut b = vec![0u8; n as usize];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    b.extend_from_slice(s);
}

impl Request {
    /// Reads one request from a new connection.
    pub fn read(mut conn: UnixStream) -> io::Result<Request> {
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let n = rd_u32(&mut conn)?;
        if n == 0 || n > MAX_STRINGS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad string count",
            ));
        }
        let mut strings = Vec::new();
        for _ in 0..n {
            let b = rd_bytes(&mut conn, MAX_STRING)?;
            strings.push(String::from_utf8(b).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "argument is not UTF-8")
            })?);
        }
        let cwd = PathBuf::from(strings.remove(0));
        conn.set_read_timeout(None)?;
        Ok(Request {
            cwd,
            args: strings,
            conn,
        })
    }

    /// Sends the command's exit status and output back.
    pub fn reply(mut self, code: u8, out: &[u8], err: &[u8]) {
        let mut b = vec![code];
        put_bytes(&mut b, out);
        put_bytes(&mut b, err);
        if let Err(e) = self.conn.write_all(&b) {
            eprintln!("hvctl: control: could not answer: {e}");
        }
    }
}

/// Connects to the control socket of a server holding the pool of `images`, if one answers.
pub fn connect(images: &[PathBuf]) -> Option<UnixStream> {
    images
        .iter()
        .find_map(|i| UnixStream::connect(socket_path(i)).ok())
}

/// Sends the command `args` (run in `cwd`) to the server, prints what it printed, and
/// returns its exit status.
pub fn forward(mut conn: UnixStream, cwd: &Path, args: &[String]) -> Result<u8, CliError> {
    let mut b = Vec::new();
    b.extend_from_slice(
        &u32::try_from(args.len() + 1)
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    put_bytes(&mut b, cwd.to_string_lossy().as_bytes());
    for a in args {
        put_bytes(&mut b, a.as_bytes());
    }
    conn.write_all(&b)?;
    let mut code = [0u8; 1];
    conn.read_exact(&mut code)
        .map_err(|e| CliError::Usage(format!("the server holding the pool did not answer: {e}")))?;
    let out = rd_bytes(&mut conn, MAX_REPLY)?;
    let err = rd_bytes(&mut conn, MAX_REPLY)?;
    std::io::stdout().write_all(&out)?;
    std::io::stderr().write_all(&err)?;
    Ok(code[0])
}
