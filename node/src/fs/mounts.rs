//! The volumes this peer has mounted, by target directory.
//!
//! A mount made for the CSI driver is *published*: recorded in the peer's
//! data directory, so that a restarted peer serves it again at the same
//! place. With a keeper ([`Handover`]) the kernel mount outlives the peer
//! and the next peer takes its connection over; without one, it mounts
//! the volume again (repairing the stale mount a killed peer leaves
//! behind). The record changes only through `mount` and `unmount`, never
//! because the peer stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::os::fd::{AsFd, OwnedFd};

use fuser::{BackgroundSession, MountOption, Session, SessionACL, SessionPause};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::chunk_cache::ChunkCache;
use super::filesystem::{Predecessor, VolumeFs};
use super::fuse::ShoalFuse;
use super::handover::{self, Handover};
use super::volumes::{VolumeError, Volumes};
use crate::blocks::Blocks;

/// How often a mount adds its usage changes to the volume's counter.
const USAGE_SYNC: Duration = Duration::from_secs(1);
/// How often a mount frees the chunks its committed changes left unnamed.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);
/// Threads reading requests from the FUSE device.
const FUSE_THREADS: usize = 4;
/// How long a restarted peer keeps trying to restore a published mount
/// (the cluster may need a while to reach quorum).
const RESTORE_FOR: Duration = Duration::from_secs(600);
const RESTORE_EVERY: Duration = Duration::from_secs(1);
/// How long a handover waits for the requests in dispatch, and for those
/// answered by tasks.
const DISPATCH_DRAIN: Duration = Duration::from_secs(10);
const TASK_DRAIN: Duration = Duration::from_secs(30);
/// How often a peer checks that its keeper still holds its connections.
const KEEPER_CHECK: Duration = Duration::from_secs(5);

/// How to mount a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountSpec {
    pub volume: String,
    pub read_only: bool,
    /// Mount options as `mount -o` takes them (see [`parse_options`]).
    pub options: Vec<String>,
    /// Recorded and restored when the peer starts again.
    pub publish: bool,
}

/// The mount options Shoal accepts, as FUSE options. `ro`/`rw` go
/// through [`MountSpec::read_only`]; anything else is refused, so a
/// typo never silently mounts with weaker settings.
pub fn parse_options(options: &[String]) -> Result<(bool, Vec<MountOption>), String> {
    let mut read_only = false;
    let mut out = Vec::new();
    for option in options.iter().flat_map(|o| o.split(',')) {
        out.push(match option.trim() {
            "" | "rw" | "defaults" => continue,
            "ro" => {
                read_only = true;
                continue;
            }
            "noexec" => MountOption::NoExec,
            "exec" => MountOption::Exec,
            "nosuid" => MountOption::NoSuid,
            "suid" => MountOption::Suid,
            "nodev" => MountOption::NoDev,
            "noatime" | "relatime" | "nodiratime" => MountOption::NoAtime,
            "sync" => MountOption::Sync,
            "dirsync" => MountOption::DirSync,
            other => return Err(format!("unsupported mount option {other:?}")),
        });
    }
    Ok((read_only, out))
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {0} does not exist")]
    NoTarget(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotDirectory(PathBuf),
    #[error("{0} already has volume {1} mounted")]
    Busy(PathBuf, String),
    #[error("nothing is mounted at {0} by this peer")]
    NotMounted(PathBuf),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("cannot mount at {0}: {1}")]
    Io(PathBuf, String),
    #[error("{0}")]
    Options(String),
}

struct Mounted {
    spec: MountSpec,
    fs: Arc<VolumeFs>,
    session: BackgroundSession,
    /// Pauses the session for a handover.
    pause: SessionPause,
    /// The tasks answering the session's requests.
    tasks: TaskTracker,
    /// The mount's `/dev/fuse` file (another descriptor of it), which the
    /// keeper holds too.
    connection: OwnedFd,
    /// The mount's device number.
    device: u64,
    /// Taken over from an earlier peer: fuser did not mount it, so
    /// unmounting is ours.
    resumed: bool,
    /// Usage syncs and chunk reclaims, until unmount.
    housekeeping: JoinHandle<()>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("volume", &self.spec.volume)
            .finish()
    }
}

#[derive(Debug)]
pub struct Mounts {
    volumes: Volumes,
    blocks: Arc<Blocks>,
    chunk_cache: Arc<ChunkCache>,
    active: Mutex<HashMap<PathBuf, Mounted>>,
    /// The file that records published mounts.
    published: PathBuf,
    /// Serialises changes to the published record.
    recording: tokio::sync::Mutex<()>,
    /// Where the mounts' connections are kept across restarts.
    handover: Arc<Handover>,
}

/// Clears a mount left by a process that died ("transport endpoint is not
/// connected"), so the directory can be mounted again.
fn clear_stale(target: &Path) -> Result<(), MountError> {
    match std::fs::metadata(target) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            warn!("{} holds a stale mount; detaching it", target.display());
            nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| MountError::Io(target.into(), format!("detaching stale mount: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(MountError::NoTarget(target.into()))
        }
        Err(e) => Err(MountError::Io(target.into(), e.to_string())),
        Ok(m) if !m.is_dir() => Err(MountError::NotDirectory(target.into())),
        Ok(_) => Ok(()),
    }
}

impl Mounts {
    /// Mounts of a peer whose published mounts are recorded in
    /// `published`.
    pub fn new(
        volumes: Volumes,
        blocks: Arc<Blocks>,
        chunk_cache: Arc<ChunkCache>,
        published: PathBuf,
        handover: Handover,
    ) -> Self {
        Self {
            volumes,
            blocks,
            chunk_cache,
            active: Mutex::default(),
            published,
            recording: tokio::sync::Mutex::new(()),
            handover: Arc::new(handover),
        }
    }

    /// The published mounts on record, by target.
    fn recorded(&self) -> HashMap<PathBuf, MountSpec> {
        match std::fs::read(&self.published) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(
                    "{} is unreadable ({e}); ignoring it",
                    self.published.display()
                );
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        }
    }

    /// Adds or removes one published mount in the record (written to a
    /// temporary file, synced, then renamed over the old one).
    async fn record(&self, target: &Path, spec: Option<&MountSpec>) -> Result<(), MountError> {
        let _guard = self.recording.lock().await;
        let mut all = self.recorded();
        let changed = match spec {
            Some(spec) => all.insert(target.to_path_buf(), spec.clone()).as_ref() != Some(spec),
            None => all.remove(target).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let io =
            |e: std::io::Error| MountError::Io(target.into(), format!("recording the mount: {e}"));
        let tmp = self.published.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(&all).expect("mount records serialise");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.published).map_err(io)
    }

    /// Serves again every published mount on record, in the background,
    /// retrying until the cluster can serve each volume: a connection the
    /// keeper holds is taken over, anything else mounted again. A volume
    /// that no longer exists is dropped from the record; a connection the
    /// keeper holds for nothing on record is let go.
    pub async fn restore(self: &Arc<Self>) {
        let handover = self.handover.clone();
        let mut kept = tokio::task::spawn_blocking(move || handover.take())
            .await
            .unwrap_or_default();
        for (target, spec) in self.recorded() {
            let connection = kept
                .remove(&target)
                .filter(|(entry, _)| handover::mounted_device(&target) == Some(entry.device));
            let mounts = self.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + RESTORE_FOR;
                loop {
                    let result = match &connection {
                        Some((entry, fd)) => match fd.try_clone() {
                            Ok(fd) => {
                                let predecessor = if entry.clean {
                                    Predecessor::HandedOver
                                } else {
                                    Predecessor::Died
                                };
                                mounts.resume(&target, spec.clone(), fd, predecessor).await
                            }
                            Err(e) => Err(MountError::Io(target.clone(), e.to_string())),
                        },
                        None => mounts.mount(&target, spec.clone()).await.map(|_| ()),
                    };
                    match result {
                        Ok(()) => return,
                        // The volume, or the pod's directory, is gone.
                        Err(
                            e @ (MountError::Volume(VolumeError::NotFound(_))
                            | MountError::NoTarget(_)),
                        ) => {
                            warn!("not restoring {}: {e}; forgetting it", target.display());
                            let _ = mounts.record(&target, None).await;
                            if connection.is_some() {
                                mounts.detach(&target).await;
                            }
                            return;
                        }
                        Err(e) if tokio::time::Instant::now() >= deadline => {
                            warn!("giving up restoring {}: {e}", target.display());
                            return;
                        }
                        Err(e) => {
                            info!("restoring {} later: {e}", target.display());
                            tokio::time::sleep(RESTORE_EVERY).await;
                        }
                    }
                }
            });
        }
        for (target, _) in kept {
            warn!(
                "the keeper holds {} for no mount on record; letting it go",
                target.display()
            );
            self.detach(&target).await;
        }
        if self.handover.enabled() {
            tokio::spawn(self.clone().watch_keeper());
        }
    }

    /// Unmounts what is at `target` without a server (a connection taken
    /// back for a mount that is no longer wanted), and lets the keeper
    /// close it.
    async fn detach(&self, target: &Path) {
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
        let handover = self.handover.clone();
        let target = target.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || handover.forget(&target)).await;
    }

    /// Hands every connection to the keeper again whenever the keeper was
    /// away (it restarted and holds nothing).
    async fn watch_keeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(KEEPER_CHECK);
        loop {
            tick.tick().await;
            let handover = self.handover.clone();
            let steady = tokio::task::spawn_blocking(move || handover.steady())
                .await
                .unwrap_or(false);
            if steady {
                continue;
            }
            let all: Vec<(PathBuf, u64, OwnedFd)> = self
                .active
                .lock()
                .expect("mounts")
                .iter()
                .filter_map(|(t, m)| Some((t.clone(), m.device, m.connection.try_clone().ok()?)))
                .collect();
            let handover = self.handover.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for (target, device, fd) in all {
                    handover.keep(&target, device, fd.as_fd());
                }
            })
            .await;
        }
    }

    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// Mounts a volume at `target` (idempotent for the same volume and
    /// settings).
    pub async fn mount(&self, target: &Path, spec: MountSpec) -> Result<PathBuf, MountError> {
        let (ro_option, _) = parse_options(&spec.options).map_err(MountError::Options)?;
        let read_only = spec.read_only || ro_option;
        let volume = spec.volume.as_str();
        clear_stale(target)?;
        let target = target
            .canonicalize()
            .map_err(|e| MountError::Io(target.into(), e.to_string()))?;
        if let Some(m) = self.active.lock().expect("mounts").get(&target) {
            return if m.spec.volume == volume
                && m.spec.read_only == spec.read_only
                && m.spec.options == spec.options
            {
                Ok(target)
            } else {
                Err(MountError::Busy(target, m.spec.volume.clone()))
            };
        }
        let fs = self
            .start_volume(&target, volume, read_only, Predecessor::None)
            .await?;
        let at = target.clone();
        self.serve(&target, spec.clone(), fs, false, move |fuse, config| {
            Session::new(fuse, &at, &config)
        })
        .await?;
        info!("mounted volume {volume} at {}", target.display());
        if spec.publish {
            self.record(&target, Some(&spec)).await?;
        }
        Ok(target)
    }

    /// The filesystem of `volume`, joined to the volume's mounts.
    async fn start_volume(
        &self,
        target: &Path,
        volume: &str,
        read_only: bool,
        predecessor: Predecessor,
    ) -> Result<Arc<VolumeFs>, MountError> {
        let record = self.volumes.get(volume).await?;
        let fs = VolumeFs::new(
            record,
            self.volumes.clone(),
            self.blocks.clone(),
            self.chunk_cache.clone(),
            read_only,
            predecessor,
        );
        fs.start()
            .await
            .map_err(|e| MountError::Io(target.into(), format!("volume root unreadable: {e:?}")))?;
        Ok(fs)
    }

    /// Takes over the connection `fd` of the mount at `target`, which an
    /// earlier peer served, and serves it; the requests that peer left
    /// unanswered are sent again.
    async fn resume(
        &self,
        target: &Path,
        spec: MountSpec,
        fd: OwnedFd,
        predecessor: Predecessor,
    ) -> Result<(), MountError> {
        let (ro_option, _) = parse_options(&spec.options).map_err(MountError::Options)?;
        let read_only = spec.read_only || ro_option;
        let fs = self
            .start_volume(target, &spec.volume, read_only, predecessor)
            .await?;
        info!(
            ?predecessor,
            "taking over volume {} at {} from the previous peer",
            spec.volume,
            target.display()
        );
        self.serve(target, spec, fs, true, move |fuse, config| {
            Ok(Session::resume_fd(fuse, fd, SessionACL::All, config))
        })
        .await
    }

    /// Runs the session `open` makes of `fs` (mounting it, or taking a
    /// connection over), with its housekeeping; hands its connection to
    /// the keeper and adds it to the active mounts.
    async fn serve(
        &self,
        target: &Path,
        spec: MountSpec,
        fs: Arc<VolumeFs>,
        resumed: bool,
        open: impl FnOnce(ShoalFuse, fuser::Config) -> std::io::Result<Session<ShoalFuse>>
        + Send
        + 'static,
    ) -> Result<(), MountError> {
        let (ro_option, extra) = parse_options(&spec.options).map_err(MountError::Options)?;
        let read_only = spec.read_only || ro_option;
        let config = session_config(fuse_options(&spec.volume, read_only, extra));
        let fuse = ShoalFuse::new(fs.clone(), tokio::runtime::Handle::current());
        let (notifier, tasks) = (fuse.notifier(), fuse.tasks());
        let io = |e: std::io::Error| MountError::Io(target.into(), e.to_string());
        let session = tokio::task::spawn_blocking(move || open(fuse, config))
            .await
            .map_err(|e| MountError::Io(target.into(), e.to_string()))?
            .map_err(io)?;
        let connection = session.as_fd().try_clone_to_owned().map_err(io)?;
        let pause = session.pause_handle();
        let session = session.spawn().map_err(io)?;
        let _ = notifier.set(session.notifier());
        if resumed {
            handover::resend_unanswered(connection.as_fd()).map_err(io)?;
        }
        let device = handover::mounted_device(target).unwrap_or(0);
        let housekeeping = {
            let fs = fs.clone();
            tokio::spawn(async move {
                let mut usage = tokio::time::interval(USAGE_SYNC);
                let mut reclaim = tokio::time::interval(RECLAIM_EVERY);
                loop {
                    tokio::select! {
                        _ = usage.tick() => fs.sync_usage().await,
                        _ = reclaim.tick() => {
                            fs.reclaim().await;
                        }
                    }
                }
            })
        };
        let fd = connection.try_clone().map_err(io)?;
        let (handover, at) = (self.handover.clone(), target.to_path_buf());
        let _ = tokio::task::spawn_blocking(move || handover.keep(&at, device, fd.as_fd())).await;
        self.active.lock().expect("mounts").insert(
            target.to_path_buf(),
            Mounted {
                spec,
                fs,
                session,
                pause,
                tasks,
                connection,
                device,
                resumed,
                housekeeping,
            },
        );
        Ok(())
    }

    /// Commits open files and unmounts; a published mount leaves the
    /// record.
    pub async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let key = target
            .canonicalize()
            .unwrap_or_else(|_| target.to_path_buf());
        let mounted = self.active.lock().expect("mounts").remove(&key);
        if mounted.as_ref().is_none_or(|m| m.spec.publish) {
            self.record(&key, None).await?;
            self.record(target, None).await?;
        }
        let Some(mounted) = mounted else {
            // A mount a killed peer left behind is cleared, not reported.
            return match std::fs::metadata(target) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => clear_stale(target),
                _ => Err(MountError::NotMounted(target.into())),
            };
        };
        self.stop(key, mounted).await;
        Ok(())
    }

    /// Commits a mount's open files and ends its FUSE session.
    async fn stop(&self, key: PathBuf, mounted: Mounted) {
        mounted.housekeeping.abort();
        mounted.fs.stop().await;
        let at = key.clone();
        let handover = self.handover.clone();
        let result = tokio::task::spawn_blocking(move || {
            let result = if mounted.resumed {
                // fuser did not mount it: the session ends once it is gone.
                nix::mount::umount2(&at, nix::mount::MntFlags::empty())
                    .map_err(std::io::Error::from)
                    .and_then(|()| mounted.session.join())
            } else {
                mounted.session.umount_and_join()
            };
            handover.forget(&at);
            result
        })
        .await;
        if !matches!(result, Ok(Ok(()))) {
            // Busy (a process still has it open): detach; the kernel finishes
            // once the last user is gone.
            warn!(
                "unmount of {} failed ({result:?}); detaching",
                key.display()
            );
            let _ = nix::mount::umount2(&key, nix::mount::MntFlags::MNT_DETACH);
        }
        info!("unmounted {}", key.display());
    }

    /// The peer is stopping. With a keeper, every mount is handed over:
    /// its session paused, the requests it had started finished, everything
    /// committed, and the keeper told so; the kernel mounts stay for the
    /// next peer. Without one, everything is unmounted. Either way
    /// published mounts stay on record.
    pub async fn stop_all(&self) {
        let all: Vec<(PathBuf, Mounted)> = self.active.lock().expect("mounts").drain().collect();
        if !self.handover.enabled() {
            for (key, mounted) in all {
                self.stop(key, mounted).await;
            }
            return;
        }
        let handed = futures::future::join_all(all.into_iter().map(|(key, m)| async move {
            let clean = hand_over(&key, &m).await;
            // The session must not unmount as it goes: the process ends
            // with the mount alive, held by the keeper.
            std::mem::forget(m.session);
            (key, clean)
        }))
        .await;
        let clean: Vec<PathBuf> = handed
            .into_iter()
            .filter_map(|(key, clean)| clean.then_some(key))
            .collect();
        let handover = self.handover.clone();
        let marked =
            tokio::task::spawn_blocking(move || clean.is_empty() || handover.clean(&clean))
                .await
                .unwrap_or(false);
        if marked {
            info!("handed the mounts over to the keeper");
        }
    }

    /// Commits the open files of every mount of `volume` here and adds
    /// their usage to the volume's counter, so that a snapshot taken next
    /// sees everything this peer's writers have written.
    pub async fn sync(&self, volume: &str) {
        let fss: Vec<Arc<VolumeFs>> = self
            .active
            .lock()
            .expect("mounts")
            .values()
            .filter(|m| m.spec.volume == volume)
            .map(|m| m.fs.clone())
            .collect();
        for fs in fss {
            fs.commit_all().await;
            fs.sync_usage().await;
        }
    }

    /// Every mount: target and how it was made.
    pub fn list(&self) -> Vec<(PathBuf, MountSpec)> {
        self.active
            .lock()
            .expect("mounts")
            .iter()
            .map(|(t, m)| (t.clone(), m.spec.clone()))
            .collect()
    }
}

/// The FUSE options of a mount of `volume`.
fn fuse_options(volume: &str, read_only: bool, extra: Vec<MountOption>) -> Vec<MountOption> {
    let mut options = vec![
        MountOption::FSName(format!("shoal:{volume}")),
        MountOption::Subtype("shoal".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoDev,
    ];
    if read_only {
        options.push(MountOption::RO);
    }
    options.extend(extra);
    options
}

/// How a mount's session runs. Its threads share one `/dev/fuse` file (no
/// cloned descriptors): the kernel ends the requests that a closed clone
/// had read, whereas those read through a file that the keeper holds open
/// wait for the next peer.
fn session_config(options: Vec<MountOption>) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = SessionACL::All;
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = false;
    config
}

/// Pauses a mount's session, lets the requests it started finish and
/// commits everything; returns whether all of it is committed.
async fn hand_over(key: &Path, m: &Mounted) -> bool {
    m.housekeeping.abort();
    let pause = m.pause.clone();
    let quiet = tokio::task::spawn_blocking(move || pause.pause(DISPATCH_DRAIN))
        .await
        .unwrap_or(false);
    m.tasks.close();
    let drained = tokio::time::timeout(TASK_DRAIN, m.tasks.wait())
        .await
        .is_ok();
    let committed = m.fs.stop().await;
    let clean = quiet && drained && committed;
    if !clean {
        warn!(
            quiet,
            drained,
            committed,
            "{} is handed over unclean",
            key.display()
        );
    }
    clean
}
