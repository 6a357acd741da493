//! Keeps a storage peer's FUSE connections alive while the peer restarts.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` file:
//! when the last descriptor of it closes, the kernel aborts the connection
//! and every process using the mount, including the pods it is
//! bind-mounted into, gets ENOTCONN ("Transport endpoint is not
//! connected"). So the peer hands a descriptor of every connection it
//! serves to a *keeper*, a second long-lived process (in Kubernetes, the
//! CSI node service), and a restarted peer takes them back and serves them
//! again. Requests the old peer had read but not answered stay with the
//! file, not the process, and the new peer has the kernel send them again.
//!
//! The keeper also remembers whether the peer that held each connection
//! left it *clean* (everything it had acknowledged committed) or died: a
//! successor of a peer that died cannot know what was only in its memory.
//!
//! Wire: a `SOCK_SEQPACKET` unix socket, one JSON message a packet, a
//! descriptor as `SCM_RIGHTS` beside the message that names it. This crate
//! speaks no FUSE and holds no other state; the keeper's map lives in
//! memory, and a restarted keeper is refilled by the peer.

#![warn(missing_docs, unreachable_pub)]

pub mod mountinfo;

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketType,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// The largest message (a listing of many connections).
const MAX_MESSAGE: usize = 256 * 1024;
/// Descriptors sent with one message (the kernel allows 253).
const FDS_PER_MESSAGE: usize = 64;
/// How long a client waits for the keeper to answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What goes wrong talking to a keeper.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed.
    #[error("fuse keeper: {0}")]
    Io(#[from] std::io::Error),
    /// The other side sent something this side does not understand.
    #[error("fuse keeper: bad message: {0}")]
    Protocol(String),
    /// The keeper refused the request.
    #[error("fuse keeper refused: {0}")]
    Refused(String),
}

impl From<rustix::io::Errno> for Error {
    fn from(e: rustix::io::Errno) -> Self {
        Error::Io(e.into())
    }
}

/// One connection the keeper holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What the peer calls it (its mount point).
    pub key: String,
    /// The device number of the mount (`st_dev` of its root), so a
    /// successor can tell that the mount at `key` is still this one.
    pub device: u64,
    /// Whether the peer that held it committed everything it acknowledged
    /// before it let go (false while a peer serves it).
    pub clean: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// Hold the descriptor that comes with this message as `key`
    /// (replacing what `key` held); it is not clean.
    Keep { key: String, device: u64 },
    /// Close what `key` holds.
    Forget { key: String },
    /// The peer has committed everything of these connections.
    Clean { keys: Vec<String> },
    /// Send every held connection back (duplicates; the keeper keeps them).
    List,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum Reply {
    Ok,
    Refused {
        message: String,
    },
    /// Part of a listing: these entries, their descriptors beside them in
    /// order; `more` when another part follows.
    Entries {
        entries: Vec<Entry>,
        more: bool,
    },
}

fn send(
    socket: BorrowedFd<'_>,
    message: &impl Serialize,
    fds: &[BorrowedFd<'_>],
) -> Result<(), Error> {
    let bytes = serde_json::to_vec(message).map_err(|e| Error::Protocol(e.to_string()))?;
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::Protocol(format!(
            "{} descriptors in one message",
            fds.len()
        )));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        return Err(Error::Protocol(format!(
            "sent {sent} of {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// One message and the descriptors that came with it; `None` at the end
/// of the stream.
fn receive<T: for<'de> Deserialize<'de>>(
    socket: BorrowedFd<'_>,
) -> Result<Option<(T, Vec<OwnedFd>)>, Error> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.bytes == 0 {
        return Ok(None);
    }
    if got.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(Error::Protocol("message too long".into()));
    }
    let message =
        serde_json::from_slice(&buf[..got.bytes]).map_err(|e| Error::Protocol(e.to_string()))?;
    Ok(Some((message, fds)))
}

/// A connection held for a peer.
#[derive(Debug)]
struct Held {
    entry: Entry,
    fd: OwnedFd,
}

type Table = Arc<Mutex<HashMap<String, Held>>>;

/// The keeper: holds what peers hand it, on a socket at a path, until it
/// is dropped (then the descriptors close).
#[derive(Debug)]
pub struct Keeper {
    path: PathBuf,
    listener: Arc<OwnedFd>,
    held: Table,
}

impl Keeper {
    /// Serves at `path` (a socket file only its owner may use; one a
    /// previous keeper left is replaced) on a thread of its own.
    pub fn serve(path: &Path) -> Result<Self, Error> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?;
        // Only root (the peer) may hand over or take connections.
        let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = rustix::net::bind(&listener, &SocketAddrUnix::new(path)?);
        rustix::process::umask(umask);
        bound?;
        rustix::net::listen(&listener, 16)?;
        let listener = Arc::new(listener);
        let held: Table = Arc::default();
        {
            let (listener, held) = (listener.clone(), held.clone());
            std::thread::Builder::new()
                .name("fuse-keeper".into())
                .spawn(move || accept_loop(&listener, &held))?;
        }
        info!(path = %path.display(), "keeping FUSE connections");
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            held,
        })
    }

    /// What it holds now.
    pub fn held(&self) -> Vec<Entry> {
        let held = self.held.lock().expect("held");
        let mut entries: Vec<Entry> = held.values().map(|h| h.entry.clone()).collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // Wakes the accept loop, which then ends.
        let _ = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Both);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &OwnedFd, held: &Table) {
    loop {
        match rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC) {
            Ok(client) => {
                let held = held.clone();
                let spawned = std::thread::Builder::new()
                    .name("fuse-keeper-client".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(client.as_fd(), &held) {
                            warn!("{e}");
                        }
                    });
                if let Err(e) = spawned {
                    warn!("fuse keeper: cannot serve a client: {e}");
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            // Shut down (the keeper was dropped), or broken beyond use.
            Err(e) => {
                debug!("fuse keeper stops accepting: {e}");
                return;
            }
        }
    }
}

fn serve_client(client: BorrowedFd<'_>, held: &Table) -> Result<(), Error> {
    while let Some((request, mut fds)) = receive::<Request>(client)? {
        match request {
            Request::Keep { key, device } => {
                let (Some(fd), true) = (fds.pop(), fds.is_empty()) else {
                    send(
                        client,
                        &Reply::Refused {
                            message: "keep needs exactly one descriptor".into(),
                        },
                        &[],
                    )?;
                    continue;
                };
                debug!(key, device, "keeping");
                let entry = Entry {
                    key: key.clone(),
                    device,
                    clean: false,
                };
                held.lock().expect("held").insert(key, Held { entry, fd });
                send(client, &Reply::Ok, &[])?;
            }
            Request::Forget { key } => {
                debug!(key, "forgetting");
                held.lock().expect("held").remove(&key);
                send(client, &Reply::Ok, &[])?;
            }
            Request::Clean { keys } => {
                let mut held = held.lock().expect("held");
                for key in &keys {
                    if let Some(h) = held.get_mut(key) {
                        h.entry.clean = true;
                    }
                }
                drop(held);
                info!(?keys, "handed over clean");
                send(client, &Reply::Ok, &[])?;
            }
            Request::List => {
                let copies: Vec<(Entry, OwnedFd)> = {
                    let held = held.lock().expect("held");
                    held.values()
                        .map(|h| Ok((h.entry.clone(), h.fd.try_clone()?)))
                        .collect::<Result<_, std::io::Error>>()?
                };
                let mut parts = copies.chunks(FDS_PER_MESSAGE).peekable();
                if parts.peek().is_none() {
                    send(
                        client,
                        &Reply::Entries {
                            entries: vec![],
                            more: false,
                        },
                        &[],
                    )?;
                }
                while let Some(part) = parts.next() {
                    let entries = part.iter().map(|(e, _)| e.clone()).collect();
                    let fds: Vec<BorrowedFd<'_>> = part.iter().map(|(_, fd)| fd.as_fd()).collect();
                    send(
                        client,
                        &Reply::Entries {
                            entries,
                            more: parts.peek().is_some(),
                        },
                        &fds,
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// A peer's side: hands connections to the keeper and takes them back.
/// Calls block (at most a few seconds each).
#[derive(Debug)]
pub struct Client {
    socket: OwnedFd,
}

impl Client {
    /// Connects to the keeper at `path`.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(CLIENT_TIMEOUT),
        )?;
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Send,
            Some(CLIENT_TIMEOUT),
        )?;
        rustix::net::connect(&socket, &SocketAddrUnix::new(path)?)?;
        Ok(Self { socket })
    }

    fn call(
        &self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Reply, Vec<OwnedFd>), Error> {
        send(self.socket.as_fd(), request, fds)?;
        receive::<Reply>(self.socket.as_fd())?
            .ok_or_else(|| Error::Protocol("the keeper closed the connection".into()))
    }

    fn expect_ok(&self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        match self.call(request, fds)?.0 {
            Reply::Ok => Ok(()),
            Reply::Refused { message } => Err(Error::Refused(message)),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Has the keeper hold `fd`, the connection of the mount `key` whose
    /// device is `device`.
    pub fn keep(&self, key: &str, device: u64, fd: BorrowedFd<'_>) -> Result<(), Error> {
        self.expect_ok(
            &Request::Keep {
                key: key.into(),
                device,
            },
            &[fd],
        )
    }

    /// Has the keeper close what it holds for `key` (the mount is gone).
    pub fn forget(&self, key: &str) -> Result<(), Error> {
        self.expect_ok(&Request::Forget { key: key.into() }, &[])
    }

    /// Tells the keeper that everything acknowledged on these connections
    /// is committed: the peer is handing them over.
    pub fn clean(&self, keys: &[String]) -> Result<(), Error> {
        self.expect_ok(
            &Request::Clean {
                keys: keys.to_vec(),
            },
            &[],
        )
    }

    /// Every connection the keeper holds, with a descriptor of each.
    pub fn list(&self) -> Result<Vec<(Entry, OwnedFd)>, Error> {
        send(self.socket.as_fd(), &Request::List, &[])?;
        let mut out = Vec::new();
        loop {
            let (reply, fds) = receive::<Reply>(self.socket.as_fd())?
                .ok_or_else(|| Error::Protocol("the keeper closed the connection".into()))?;
            let Reply::Entries { entries, more } = reply else {
                return Err(Error::Protocol(format!("unexpected reply {reply:?}")));
            };
            if entries.len() != fds.len() {
                return Err(Error::Protocol(format!(
                    "{} entries came with {} descriptors",
                    entries.len(),
                    fds.len()
                )));
            }
            out.extend(entries.into_iter().zip(fds));
            if !more {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    /// A file standing in for a FUSE connection: what matters is that the
    /// same open file comes back.
    fn open_file(dir: &Path, name: &str, content: &[u8]) -> std::fs::File {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap();
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn connections_outlive_the_client_that_handed_them_over() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = Keeper::serve(&dir.path().join("keeper.sock")).unwrap();
        {
            let client = Client::connect(&dir.path().join("keeper.sock")).unwrap();
            let a = open_file(dir.path(), "a", b"first");
            let b = open_file(dir.path(), "b", b"second");
            client.keep("/mnt/a", 41, a.as_fd()).unwrap();
            client.keep("/mnt/b", 42, b.as_fd()).unwrap();
            client.clean(&["/mnt/a".into()]).unwrap();
            // The client's own descriptors close here; the keeper's stay.
        }
        std::fs::remove_file(dir.path().join("a")).unwrap();
        let client = Client::connect(&dir.path().join("keeper.sock")).unwrap();
        let mut list = client.list().unwrap();
        list.sort_by(|x, y| x.0.key.cmp(&y.0.key));
        let keys: Vec<(&str, u64, bool)> = list
            .iter()
            .map(|(e, _)| (e.key.as_str(), e.device, e.clean))
            .collect();
        assert_eq!(keys, [("/mnt/a", 41, true), ("/mnt/b", 42, false)]);
        // The open file itself came back, though its name is gone.
        let mut a = std::fs::File::from(list.remove(0).1);
        a.rewind().unwrap();
        let mut content = String::new();
        a.read_to_string(&mut content).unwrap();
        assert_eq!(content, "first");

        // Keeping again replaces and makes it dirty; forgetting drops it.
        let again = open_file(dir.path(), "c", b"third");
        client.keep("/mnt/a", 43, again.as_fd()).unwrap();
        client.forget("/mnt/b").unwrap();
        assert_eq!(
            keeper.held(),
            [Entry {
                key: "/mnt/a".into(),
                device: 43,
                clean: false
            }]
        );
    }

    #[test]
    fn a_keep_without_a_descriptor_is_refused_and_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = Keeper::serve(&dir.path().join("k.sock")).unwrap();
        let client = Client::connect(&dir.path().join("k.sock")).unwrap();
        let err = client
            .expect_ok(
                &Request::Keep {
                    key: "/x".into(),
                    device: 1,
                },
                &[],
            )
            .unwrap_err();
        assert!(matches!(err, Error::Refused(_)), "{err}");
        assert!(keeper.held().is_empty());
        assert!(client.list().unwrap().is_empty());
    }

    #[test]
    fn listings_larger_than_one_message_arrive_whole() {
        let dir = tempfile::tempdir().unwrap();
        let _keeper = Keeper::serve(&dir.path().join("k.sock")).unwrap();
        let client = Client::connect(&dir.path().join("k.sock")).unwrap();
        let file = open_file(dir.path(), "f", b"x");
        for i in 0..FDS_PER_MESSAGE * 2 + 3 {
            client
                .keep(&format!("/mnt/{i}"), i as u64, file.as_fd())
                .unwrap();
        }
        assert_eq!(client.list().unwrap().len(), FDS_PER_MESSAGE * 2 + 3);
    }

    #[test]
    fn the_socket_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sock");
        let _keeper = Keeper::serve(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
