//! Handing the FUSE connections this peer serves to the peer that follows
//! it, through a keeper (`shoal-keeper`; in Kubernetes, the CSI node
//! service).
//!
//! Every mount's `/dev/fuse` file is also held by the keeper, so the
//! kernel mount, and the pods' bind mounts of it, outlive this process.
//! A peer stopping on SIGTERM pauses its sessions (requests that arrive
//! from then on wait in the kernel), finishes the requests it had started,
//! commits everything, tells the keeper its connections are clean, and
//! exits without unmounting. The next peer takes the connections back,
//! serves them again, and has the kernel send the waiting requests again
//! (`FUSE_NOTIFY_RESEND`). A peer that was killed leaves its connections
//! dirty: what it had acknowledged but not committed is gone, and the
//! successor says so (EIO) on the first flush or fsync of each file
//! handle opened before, as a local filesystem reports a write-back error.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use shoal_keeper::{Client, Entry};
use tracing::{info, warn};

/// The notification that asks the kernel to send again the requests a
/// server read and did not answer (Linux 6.9; fuse_notify_code 7).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// This peer's side of the keeper, if it has one.
#[derive(Debug, Default)]
pub struct Handover {
    socket: Option<PathBuf>,
    client: Mutex<Option<Client>>,
}

impl Handover {
    /// Hands connections to the keeper at `socket`; `None`: no keeper, so
    /// mounts end with this process.
    pub fn new(socket: Option<PathBuf>) -> Self {
        Self {
            socket,
            client: Mutex::default(),
        }
    }

    /// Whether a keeper is configured.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Runs `call` on a connection to the keeper, connecting (once more
    /// after a failure) as needed.
    fn with_client<T>(
        &self,
        call: impl Fn(&Client) -> Result<T, shoal_keeper::Error>,
    ) -> Result<T, shoal_keeper::Error> {
        let Some(socket) = &self.socket else {
            return Err(shoal_keeper::Error::Refused("no keeper configured".into()));
        };
        let mut client = self.client.lock().expect("keeper client");
        for attempt in 0..2 {
            if client.is_none() {
                *client = Some(Client::connect(socket)?);
            }
            match call(client.as_ref().expect("just connected")) {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 => {
                    warn!("fuse keeper: {e}; reconnecting");
                    *client = None;
                }
                Err(e) => {
                    *client = None;
                    return Err(e);
                }
            }
        }
        unreachable!("two attempts return")
    }

    /// Whether the keeper answers on the connection this peer has: false
    /// when there was none or it broke (then it connects again), since a
    /// keeper that answers again after it was away has forgotten what it
    /// held.
    pub fn steady(&self) -> bool {
        let Some(socket) = &self.socket else {
            return true;
        };
        let mut client = self.client.lock().expect("keeper client");
        if client.as_ref().is_some_and(|c| c.clean(&[]).is_ok()) {
            return true;
        }
        *client = Client::connect(socket).ok();
        false
    }

    /// Has the keeper hold the connection `fd` of the mount at `target`.
    pub fn keep(&self, target: &Path, device: u64, fd: BorrowedFd<'_>) {
        if !self.enabled() {
            return;
        }
        if let Err(e) = self.with_client(|c| c.keep(&key(target), device, fd)) {
            warn!(
                "fuse keeper does not hold {}: {e}; the mount will not survive a restart of this peer",
                target.display()
            );
        }
    }

    /// The mount at `target` is gone: the keeper lets go of it.
    pub fn forget(&self, target: &Path) {
        if !self.enabled() {
            return;
        }
        if let Err(e) = self.with_client(|c| c.forget(&key(target))) {
            warn!("fuse keeper: forgetting {}: {e}", target.display());
        }
    }

    /// Everything acknowledged on the mounts at `targets` is committed.
    pub fn clean(&self, targets: &[PathBuf]) -> bool {
        let keys: Vec<String> = targets.iter().map(|t| key(t)).collect();
        match self.with_client(|c| c.clean(&keys)) {
            Ok(()) => true,
            Err(e) => {
                warn!("fuse keeper: marking handed-over mounts clean: {e}");
                false
            }
        }
    }

    /// Every connection the keeper holds, by mount point.
    pub fn take(&self) -> HashMap<PathBuf, (Entry, OwnedFd)> {
        if !self.enabled() {
            return HashMap::new();
        }
        match self.with_client(|c| c.list()) {
            Ok(list) => list
                .into_iter()
                .map(|(entry, fd)| (PathBuf::from(&entry.key), (entry, fd)))
                .collect(),
            Err(e) => {
                warn!("fuse keeper: {e}; no mount is taken over");
                HashMap::new()
            }
        }
    }
}

fn key(target: &Path) -> String {
    target.to_string_lossy().into_owned()
}

/// The device number of what is mounted at `target` (its `st_dev`), read
/// from the mount table: `stat` would wait forever on a mount whose
/// server is gone and whose connection a keeper holds.
pub fn mounted_device(target: &Path) -> Option<u64> {
    shoal_keeper::mountinfo::device_of(target)
}

/// Asks the kernel to send again, on the connection `fd` belongs to, every
/// request a server read and did not answer.
pub fn resend_unanswered(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique = 0 }
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    let written = nix::unistd::write(fd, &header)?;
    if written != header.len() {
        return Err(std::io::Error::other(
            "short write of the resend notification",
        ));
    }
    info!("asked the kernel to send unanswered requests again");
    Ok(())
}
