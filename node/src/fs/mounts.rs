//! The volumes this peer has mounted, by target directory.

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
/// Threads reading requests from the FUSE device.
const FUSE_THREADS: usize = 4;

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
}

struct Mounted {
    volume: String,
    fs: Arc<VolumeFs>,
    session: BackgroundSession,
    usage: JoinHandle<()>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("volume", &self.volume)
            .finish()
    }
}

#[derive(Debug)]
pub struct Mounts {
    volumes: Volumes,
    blocks: Arc<Blocks>,
    chunk_cache: Arc<ChunkCache>,
    active: Mutex<HashMap<PathBuf, Mounted>>,
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
    pub fn new(volumes: Volumes, blocks: Arc<Blocks>, chunk_cache: Arc<ChunkCache>) -> Self {
        Self {
            volumes,
            blocks,
            chunk_cache,
            active: Mutex::default(),
        }
    }

    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// Mounts `volume` at `target` (idempotent for the same volume).
    pub async fn mount(
        &self,
        volume: &str,
        target: &Path,
        read_only: bool,
    ) -> Result<PathBuf, MountError> {
        clear_stale(target)?;
        let target = target
            .canonicalize()
            .map_err(|e| MountError::Io(target.into(), e.to_string()))?;
        if let Some(m) = self.active.lock().expect("mounts").get(&target) {
            return if m.volume == volume {
                Ok(target)
            } else {
                Err(MountError::Busy(target, m.volume.clone()))
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
        let mut config = fuser::Config::default();
        config.mount_options = options;
        config.acl = SessionACL::All;
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
        let fuse = ShoalFuse::new(fs.clone(), tokio::runtime::Handle::current());
        let at = target.clone();
        let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fuse, &at, &config))
            .await
            .map_err(|e| MountError::Io(target.clone(), e.to_string()))?
            .map_err(|e| MountError::Io(target.clone(), e.to_string()))?;
        let usage = {
            let fs = fs.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(USAGE_SYNC);
                loop {
                    tick.tick().await;
                    fs.sync_usage().await;
                }
            })
        };
        info!("mounted volume {volume} at {}", target.display());
        self.active.lock().expect("mounts").insert(
            target.clone(),
            Mounted {
                volume: volume.to_string(),
                fs,
                session,
                usage,
            },
        );
        Ok(target)
    }

    /// Commits open files and unmounts.
    pub async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let key = target
            .canonicalize()
            .unwrap_or_else(|_| target.to_path_buf());
        let mounted = self
            .active
            .lock()
            .expect("mounts")
            .remove(&key)
            .ok_or_else(|| MountError::NotMounted(target.into()))?;
        mounted.usage.abort();
        mounted.fs.commit_all().await;
        let at = key.clone();
        let result = tokio::task::spawn_blocking(move || mounted.session.umount_and_join()).await;
        if !matches!(result, Ok(Ok(()))) {
            // Busy (a process still has it open): detach; the kernel finishes
            // once the last user is gone.
            warn!("unmount of {} failed ({result:?}); detaching", at.display());
            let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
        }
        info!("unmounted {}", key.display());
        Ok(())
    }

    /// Unmounts everything (the peer is stopping).
    pub async fn unmount_all(&self) {
        let targets: Vec<PathBuf> = self
            .active
            .lock()
            .expect("mounts")
            .keys()
            .cloned()
            .collect();
        for t in targets {
            if let Err(e) = self.unmount(&t).await {
                warn!("{e}");
            }
        }
    }

    /// (volume, target) of every mount.
    pub fn list(&self) -> Vec<(String, PathBuf)> {
        self.active
            .lock()
            .expect("mounts")
            .iter()
            .map(|(t, m)| (m.volume.clone(), t.clone()))
            .collect()
    }
}
