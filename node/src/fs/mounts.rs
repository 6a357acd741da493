//! The volumes this peer has mounted, by target directory.
//!
//! A mount made for the CSI driver is *published*: recorded in the peer's
//! data directory, so that a restarted peer mounts it again at the same
//! place (repairing the stale mount a killed peer leaves behind). The
//! record changes only through `mount` and `unmount`, never because the
//! peer stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{BackgroundSession, MountOption, SessionACL};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::chunk_cache::ChunkCache;
use super::filesystem::VolumeFs;
use super::fuse::ShoalFuse;
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
    ) -> Self {
        Self {
            volumes,
            blocks,
            chunk_cache,
            active: Mutex::default(),
            published,
            recording: tokio::sync::Mutex::new(()),
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

    /// Mounts again every published mount on record, in the background,
    /// retrying until the cluster can serve each volume. A volume that no
    /// longer exists is dropped from the record.
    pub fn restore(self: &Arc<Self>) {
        for (target, spec) in self.recorded() {
            let mounts = self.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + RESTORE_FOR;
                loop {
                    match mounts.mount(&target, spec.clone()).await {
                        Ok(_) => return,
                        // The volume, or the pod's directory, is gone.
                        Err(
                            e @ (MountError::Volume(VolumeError::NotFound(_))
                            | MountError::NoTarget(_)),
                        ) => {
                            warn!("not restoring {}: {e}; forgetting it", target.display());
                            let _ = mounts.record(&target, None).await;
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
    }

    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// Mounts a volume at `target` (idempotent for the same volume and
    /// settings).
    pub async fn mount(&self, target: &Path, spec: MountSpec) -> Result<PathBuf, MountError> {
        let (ro_option, extra) = parse_options(&spec.options).map_err(MountError::Options)?;
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
        let record = self.volumes.get(volume).await?;
        let fs = VolumeFs::new(
            record,
            self.volumes.clone(),
            self.blocks.clone(),
            self.chunk_cache.clone(),
            read_only,
        );
        fs.start().await.map_err(|e| {
            MountError::Io(target.clone(), format!("volume root unreadable: {e:?}"))
        })?;
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
        let mut config = fuser::Config::default();
        config.mount_options = options;
        config.acl = SessionACL::All;
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
        let fuse = ShoalFuse::new(fs.clone(), tokio::runtime::Handle::current());
        let notifier = fuse.notifier();
        let at = target.clone();
        let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fuse, &at, &config))
            .await
            .map_err(|e| MountError::Io(target.clone(), e.to_string()))?
            .map_err(|e| MountError::Io(target.clone(), e.to_string()))?;
        let _ = notifier.set(session.notifier());
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
        info!("mounted volume {volume} at {}", target.display());
        if spec.publish {
            self.record(&target, Some(&spec)).await?;
        }
        self.active.lock().expect("mounts").insert(
            target.clone(),
            Mounted {
                spec,
                fs,
                session,
                housekeeping,
            },
        );
        Ok(target)
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
        let result = tokio::task::spawn_blocking(move || mounted.session.umount_and_join()).await;
        if !matches!(result, Ok(Ok(()))) {
            // Busy (a process still has it open): detach; the kernel finishes
            // once the last user is gone.
            warn!("unmount of {} failed ({result:?}); detaching", at.display());
            let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
        }
        info!("unmounted {}", key.display());
    }

    /// Unmounts everything because the peer is stopping: published mounts
    /// stay on record and come back when it starts again.
    pub async fn unmount_all(&self) {
        let all: Vec<(PathBuf, Mounted)> = self.active.lock().expect("mounts").drain().collect();
        for (key, mounted) in all {
            self.stop(key, mounted).await;
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
