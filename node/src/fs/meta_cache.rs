//! A mount's copy of its volume's metadata blocks (inodes, directory
//! shards, usage): write-through while other mounts share the volume,
//! write-back while this mount has it alone.
//!
//! - Shared: every change goes to its block's quorum before it returns, and
//!   reads ask the quorum; conflicting changes are re-applied (see
//!   [`Meta::update`]).
//! - Alone (this mount's session is exclusive, see
//!   [`shoal_core::fs::session`]): no one else reads or writes the blocks,
//!   so the copy is the truth. Changes apply to it and return at once; a
//!   flusher commits the latest value of each changed block in batches, so
//!   many creates in one directory cost one write of its shard. fsync,
//!   unmount and snapshots wait for the flush ([`MetaCache::barrier`]).
//!
//! The holder polls the session table; when another mount joins, it
//! commits everything and turns shared before the newcomer goes on.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use shoal_core::fs::session::SESSION_LEASE_MS;
use shoal_core::fs::{Session, SessionTable};
use shoal_core::mutable::MutableBlock;
use tokio::sync::{Notify, RwLock};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::meta::{Change, Meta, MetaError, Sealed, VolumeKeys};
use crate::consensus::PutOutcome;

/// The volume's session table.
const SESSIONS: &[u8] = b"sessions";
/// How often a holder looks for newcomers.
const HOLDER_POLL: Duration = Duration::from_millis(250);
/// How often a sharing mount renews and looks whether it is alone.
const SHARED_POLL: Duration = Duration::from_secs(1);
/// A holder stops trusting its copy this long before its session expires
/// unless a renewal succeeds: room for clock skew between peers.
const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// A holder renews when less than this is left of its session.
const RENEW_BEFORE: Duration = Duration::from_secs(4);
/// How long a change waits for others to join its commit, like a local
/// filesystem's journal commit interval (ext4's is 5 s): the most a crash
/// of the mount loses of what was not fsynced. A directory's shard changed
/// by many creates is written once per commit, and a burst of changes is
/// answered at memory speed.
const FLUSH_DELAY: Duration = Duration::from_secs(5);
/// Blocks a flush writes in parallel.
const FLUSH_PARALLEL: usize = 64;
/// Changed blocks kept before further changes wait for the flusher.
const MAX_DIRTY: usize = 32_768;
/// How long a mount waits for another to commit and share the volume, as
/// long as that one keeps its session alive.
const HANDOVER_LIMIT: Duration = Duration::from_secs(180);
/// Blocks kept in the copy; beyond it, unchanged ones are dropped. An
/// inode holds up to 32 KiB of inline data, so the copy stays within about
/// 2 GiB even when every block it holds is such a file.
const MAX_SLOTS: usize = 65_536;
/// Flush rounds a barrier runs before it reports failure.
const BARRIER_ROUNDS: usize = 20;
/// Attempts at a change whose block the cache keeps dropping (it is full).
const ATTEMPTS: usize = 8;

type Value = Arc<dyn Any + Send + Sync>;

fn encode_as<T: Sealed + 'static>(value: &Value) -> Vec<u8> {
    value
        .downcast_ref::<T>()
        .expect("a block holds one type")
        .to_bytes()
}

fn typed<T: Send + Sync + 'static>(value: &Value) -> Arc<T> {
    Arc::downcast::<T>(value.clone()).unwrap_or_else(|_| unreachable!("a block holds one type"))
}

/// Drops the unchanged blocks of a full copy (they read again from their
/// quorum).
fn make_room(slots: &mut HashMap<Vec<u8>, Slot>) {
    if slots.len() >= MAX_SLOTS {
        slots.retain(|_, s| s.dirty.is_some());
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the mount knows of one block.
struct Slot {
    /// The version on the quorum, as last seen.
    committed: Option<MutableBlock>,
    /// While the mount holds the volume: the block's value (`None`: the
    /// block does not exist) and its version as this mount counts them.
    current: Option<(Option<Value>, u64)>,
    /// The change the flusher has yet to commit, by sequence number.
    dirty: Option<u64>,
    encode: fn(&Value) -> Vec<u8>,
    rank: u8,
    /// The value need not be written: nothing refers to the block.
    vanished: bool,
    /// Not written yet and named by a number drawn at random.
    unique: bool,
}

impl Slot {
    fn from_quorum(committed: Option<MutableBlock>, value: Option<Value>) -> Self {
        let version = committed.as_ref().map_or(0, |b| b.version);
        Self {
            committed,
            current: Some((value, version)),
            dirty: None,
            encode: |_| Vec::new(),
            rank: 0,
            vanished: false,
            unique: false,
        }
    }
}

#[derive(Debug)]
struct Mode {
    exclusive: bool,
    /// A holder trusts its copy until then, unless it renews.
    trusted_until: Instant,
}

/// Where a mount's changes stand: how many it has made, and in which
/// epoch (see [`MetaCache::unsettled_since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub seq: u64,
    pub epoch: u64,
}

/// One change waiting in a flush.
struct Pending {
    what: Vec<u8>,
    committed: Option<MutableBlock>,
    value: Value,
    encode: fn(&Value) -> Vec<u8>,
    rank: u8,
    unique: bool,
    seq: u64,
}

pub struct MetaCache {
    volume: String,
    meta: Meta<VolumeKeys>,
    session: Session,
    mode: RwLock<Mode>,
    slots: Mutex<HashMap<Vec<u8>, Slot>>,
    seq: AtomicU64,
    /// Bumped when the mount starts or stops holding the volume, and when
    /// another mount's version replaced one of its own.
    epoch: AtomicU64,
    dirty: AtomicUsize,
    wake: Notify,
    flushed: Notify,
    flush_lock: tokio::sync::Mutex<()>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for MetaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaCache")
            .field("session", &self.session.id)
            .field("dirty", &self.dirty.load(Ordering::Relaxed))
            .finish()
    }
}

impl MetaCache {
    /// The copy of a mount of `volume` hosted by peer `peer` (started
    /// as `boot`).
    pub fn new(volume: String, meta: Meta<VolumeKeys>, peer: [u8; 16], boot: u64) -> Arc<Self> {
        Arc::new(Self {
            volume,
            meta,
            session: Session {
                id: rand::random(),
                peer,
                boot,
                expires_ms: 0,
                exclusive: false,
            },
            mode: RwLock::new(Mode {
                exclusive: false,
                trusted_until: Instant::now(),
            }),
            slots: Mutex::default(),
            seq: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            dirty: AtomicUsize::new(0),
            wake: Notify::new(),
            flushed: Notify::new(),
            flush_lock: tokio::sync::Mutex::new(()),
            tasks: Mutex::default(),
        })
    }

    pub fn meta(&self) -> &Meta<VolumeKeys> {
        &self.meta
    }

    // ---- sessions ------------------------------------------------------------

    async fn change_sessions<O>(
        &self,
        change: impl Fn(&mut SessionTable, u64) -> O,
    ) -> Result<(O, SessionTable), MetaError> {
        let (out, now) = self
            .meta
            .update::<SessionTable, _>(SESSIONS, None, |cur: Option<&SessionTable>| {
                let mut table = cur.cloned().unwrap_or_default();
                let out = change(&mut table, now_ms());
                (Some(table), out)
            })
            .await?;
        Ok((out, now.map(|(t, _)| t).unwrap_or_default()))
    }

    fn me(&self, now_ms: u64) -> Session {
        Session {
            expires_ms: now_ms + SESSION_LEASE_MS,
            ..self.session
        }
    }

    /// Joins the volume's sessions: holds the volume if no other mount is
    /// live, else waits until none holds it. Then starts the flusher and
    /// the session keeper.
    pub async fn start(self: &Arc<Self>) -> Result<(), MetaError> {
        let started = Instant::now();
        let id = self.session.id;
        let (exclusive, _) = self
            .change_sessions(|t, now| {
                t.join(self.me(now), now);
                t.set_exclusive(id, true, now)
            })
            .await?;
        if exclusive {
            self.hold(&mut *self.mode.write().await, started);
        } else {
            self.wait_for_holder().await?;
        }
        let keeper = {
            let this = self.clone();
            tokio::spawn(async move { this.keep().await })
        };
        let flusher = {
            let this = self.clone();
            tokio::spawn(async move { this.flush_loop().await })
        };
        self.tasks.lock().expect("tasks").extend([keeper, flusher]);
        Ok(())
    }

    /// Waits until no other mount holds the volume: it commits and lets go
    /// once it sees this session, or its session expires.
    async fn wait_for_holder(&self) -> Result<(), MetaError> {
        let deadline = Instant::now() + HANDOVER_LIMIT;
        while Instant::now() < deadline {
            let table = self
                .meta
                .read::<SessionTable>(SESSIONS)
                .await?
                .map(|(t, _)| t)
                .unwrap_or_default();
            if !table.held_by_other(self.session.id, now_ms()) {
                return Ok(());
            }
            tokio::time::sleep(HOLDER_POLL / 2).await;
        }
        Err(MetaError::Corrupt(format!(
            "another mount did not share the volume within {HANDOVER_LIMIT:?}"
        )))
    }

    fn hold(&self, mode: &mut Mode, renewed: Instant) {
        self.slots.lock().expect("slots").clear();
        self.epoch.fetch_add(1, Ordering::Relaxed);
        mode.exclusive = true;
        mode.trusted_until = renewed + Duration::from_millis(SESSION_LEASE_MS) - LEASE_MARGIN;
        info!(
            "volume {}: this mount is its only one; metadata is write-back",
            self.volume()
        );
    }

    fn volume(&self) -> &str {
        &self.volume
    }

    /// Renews this session while the mount lives; gives the volume up when
    /// another mount joins, takes it when the others are gone.
    async fn keep(self: Arc<Self>) {
        let id = self.session.id;
        loop {
            let exclusive = self.mode.read().await.exclusive;
            tokio::time::sleep(if exclusive { HOLDER_POLL } else { SHARED_POLL }).await;
            let started = Instant::now();
            if exclusive {
                let table = match self.meta.read::<SessionTable>(SESSIONS).await {
                    Ok(t) => t.map(|(t, _)| t).unwrap_or_default(),
                    Err(e) => {
                        warn!("volume {}: session table: {e}", self.volume());
                        continue;
                    }
                };
                let now = now_ms();
                let mine = table.sessions.iter().find(|s| s.id == id).copied();
                if table.others(id, now) || mine.is_none_or(|s| !s.exclusive) {
                    self.let_go("another mount joined").await;
                    continue;
                }
                let left = mine.map_or(0, |s| s.expires_ms.saturating_sub(now));
                if Duration::from_millis(left) > RENEW_BEFORE {
                    continue;
                }
                match self.change_sessions(|t, now| t.renew(id, now)).await {
                    Ok((true, _)) => {
                        self.mode.write().await.trusted_until =
                            started + Duration::from_millis(SESSION_LEASE_MS) - LEASE_MARGIN;
                    }
                    Ok((false, _)) => self.let_go("session expired").await,
                    Err(e) => warn!("volume {}: session renewal: {e}", self.volume()),
                }
            } else {
                let result = self
                    .change_sessions(|t, now| {
                        if !t.renew(id, now) {
                            t.join(self.me(now), now);
                        }
                        !t.others(id, now)
                    })
                    .await;
                match result {
                    Ok((true, _)) => self.take().await,
                    Ok((false, _)) => {}
                    Err(e) => warn!("volume {}: session renewal: {e}", self.volume()),
                }
            }
        }
    }

    /// Takes the volume, if this mount is still alone.
    async fn take(&self) {
        let mut mode = self.mode.write().await;
        let started = Instant::now();
        let id = self.session.id;
        match self
            .change_sessions(|t, now| t.set_exclusive(id, true, now))
            .await
        {
            Ok((true, _)) => self.hold(&mut mode, started),
            Ok((false, _)) => {}
            Err(e) => warn!("volume {}: session: {e}", self.volume()),
        }
    }

    /// Commits everything and turns shared.
    async fn let_go(&self, why: &str) {
        let mut mode = self.mode.write().await;
        if !mode.exclusive {
            return;
        }
        let id = self.session.id;
        if let Err(e) = self.commit_renewing().await {
            warn!(
                "volume {}: commit before sharing it failed: {e}",
                self.volume()
            );
        }
        mode.exclusive = false;
        self.epoch.fetch_add(1, Ordering::Relaxed);
        let lost = {
            let mut slots = self.slots.lock().expect("slots");
            let lost = slots.values().filter(|s| s.dirty.is_some()).count();
            slots.clear();
            lost
        };
        self.dirty.store(0, Ordering::Relaxed);
        if lost > 0 {
            warn!(
                "volume {}: {lost} metadata changes could not be committed and are lost",
                self.volume()
            );
        }
        if let Err(e) = self
            .change_sessions(|t, now| t.set_exclusive(id, false, now))
            .await
        {
            warn!("volume {}: session: {e}", self.volume());
        }
        info!("volume {}: {why}; metadata is write-through", self.volume());
    }

    /// Commits everything, keeping the session alive meanwhile so that a
    /// mount waiting for the commit does not take this one for dead.
    async fn commit_renewing(&self) -> Result<(), MetaError> {
        let id = self.session.id;
        let commit = self.barrier();
        tokio::pin!(commit);
        loop {
            tokio::select! {
                result = &mut commit => return result,
                _ = tokio::time::sleep(SHARED_POLL) => {
                    if let Err(e) = self.change_sessions(|t, now| t.renew(id, now)).await {
                        warn!("volume {}: session renewal: {e}", self.volume());
                    }
                }
            }
        }
    }

    /// Commits everything and leaves the session table (unmount); returns
    /// whether everything is committed.
    pub async fn stop(&self) -> bool {
        for task in self.tasks.lock().expect("tasks").drain(..) {
            task.abort();
        }
        let mode = self.mode.write().await;
        let mut committed = true;
        if mode.exclusive
            && let Err(e) = self.commit_renewing().await
        {
            warn!("volume {}: commit at unmount failed: {e}", self.volume());
            committed = false;
        }
        let id = self.session.id;
        if let Err(e) = self.change_sessions(|t, _| t.leave(id)).await {
            warn!("volume {}: leaving the session table: {e}", self.volume());
        }
        committed
    }

    /// The mode for one operation; a holder whose session may have expired
    /// turns shared first.
    async fn mode(&self) -> tokio::sync::RwLockReadGuard<'_, Mode> {
        let mode = self.mode.read().await;
        if !mode.exclusive || Instant::now() < mode.trusted_until {
            return mode;
        }
        drop(mode);
        self.let_go("session renewals failing").await;
        self.mode.read().await
    }

    // ---- blocks --------------------------------------------------------------

    /// The copy's value of a block, loaded from the quorum on first use.
    async fn load<T: Sealed + Send + Sync + 'static>(&self, what: &[u8]) -> Result<(), MetaError> {
        if self
            .slots
            .lock()
            .expect("slots")
            .get(what)
            .is_some_and(|s| s.current.is_some())
        {
            return Ok(());
        }
        let (value, committed) = match self.meta.read::<T>(what).await? {
            Some((v, b)) => (Some(Arc::new(v) as Value), Some(b)),
            None => (None, None),
        };
        let mut slots = self.slots.lock().expect("slots");
        make_room(&mut slots);
        match slots.get_mut(what) {
            // A change made meanwhile is newer than what was read.
            Some(slot) if slot.current.is_some() => {}
            Some(slot) => *slot = Slot::from_quorum(committed, value),
            None => {
                slots.insert(what.to_vec(), Slot::from_quorum(committed, value));
            }
        }
        Ok(())
    }

    fn remember(&self, what: &[u8], block: &MutableBlock) {
        let mut slots = self.slots.lock().expect("slots");
        make_room(&mut slots);
        let slot = slots
            .entry(what.to_vec())
            .or_insert_with(|| Slot::from_quorum(None, None));
        slot.committed = Some(block.clone());
        slot.current = None;
    }

    fn known(&self, what: &[u8]) -> Option<MutableBlock> {
        self.slots
            .lock()
            .expect("slots")
            .get(what)
            .and_then(|s| s.committed.clone())
    }

    /// A block's value and version if the copy holds it now (the mount
    /// holds the volume), without waiting for anything: `Some(None)` if the
    /// block does not exist.
    pub fn held<T: Send + Sync + 'static>(&self, what: &[u8]) -> Option<Option<(Arc<T>, u64)>> {
        let mode = self.mode.try_read().ok()?;
        if !mode.exclusive || Instant::now() >= mode.trusted_until {
            return None;
        }
        let slots = self.slots.lock().expect("slots");
        let (value, version) = slots.get(what)?.current.as_ref()?;
        Some(value.as_ref().map(|v| (typed::<T>(v), *version)))
    }

    /// A block's value and version.
    pub async fn read<T: Sealed + Send + Sync + 'static>(
        &self,
        what: &[u8],
    ) -> Result<Option<(Arc<T>, u64)>, MetaError> {
        let mode = self.mode().await;
        if !mode.exclusive {
            let read = self.meta.read::<T>(what).await?;
            if let Some((_, block)) = &read {
                self.remember(what, block);
            }
            return Ok(read.map(|(v, b)| (Arc::new(v), b.version)));
        }
        for _ in 0..ATTEMPTS {
            self.load::<T>(what).await?;
            let slots = self.slots.lock().expect("slots");
            if let Some((value, version)) = slots.get(what).and_then(|s| s.current.as_ref()) {
                return Ok(value.as_ref().map(|v| (typed::<T>(v), *version)));
            }
        }
        Err(self.overflowing())
    }

    fn overflowing(&self) -> MetaError {
        MetaError::Corrupt(format!(
            "volume {}: the metadata cache keeps dropping a block",
            self.volume()
        ))
    }

    /// Applies `change` to a block: to the copy while the mount holds the
    /// volume, else on the quorum. Returns the output and the value now
    /// current, with its version.
    pub async fn update<T: Sealed + Send + Sync + 'static, C: Change<T>>(
        &self,
        what: &[u8],
        mut change: C,
    ) -> Result<(C::Output, Option<(Arc<T>, u64)>), MetaError> {
        let mode = self.mode().await;
        if !mode.exclusive {
            let (out, now) = self.meta.update(what, self.known(what), change).await?;
            if let Some((_, block)) = &now {
                self.remember(what, block);
            }
            return Ok((out, now.map(|(v, b)| (Arc::new(v), b.version))));
        }
        self.wait_for_room().await;
        for _ in 0..ATTEMPTS {
            self.load::<T>(what).await?;
            let mut slots = self.slots.lock().expect("slots");
            let Some(slot) = slots.get_mut(what) else {
                continue;
            };
            let Some((value, version)) = &slot.current else {
                continue;
            };
            let cur = value.as_ref().map(typed::<T>);
            let (new, out) = change.apply(cur.as_deref());
            let Some(new) = new else {
                return Ok((out, cur.map(|c| (c, *version))));
            };
            let version = version + 1;
            let new = Arc::new(new);
            self.set(slot, new.clone(), version, false);
            return Ok((out, Some((new, version))));
        }
        Err(self.overflowing())
    }

    /// Records a change in the copy for the flusher.
    fn set<T: Sealed + Send + Sync + 'static>(
        &self,
        slot: &mut Slot,
        value: Arc<T>,
        version: u64,
        unique: bool,
    ) {
        slot.rank = value.rank();
        slot.vanished = value.vanished();
        slot.current = Some((Some(value), version));
        slot.encode = encode_as::<T>;
        slot.unique |= unique;
        if slot.dirty.is_none() {
            self.dirty.fetch_add(1, Ordering::Relaxed);
        }
        slot.dirty = Some(self.seq.fetch_add(1, Ordering::Relaxed));
        self.wake.notify_one();
    }

    /// Creates a block whose name holds a number this node just drew at
    /// random; its version, or `None` if it exists.
    pub async fn create_unique<T: Sealed + Clone + Send + Sync + 'static>(
        &self,
        what: &[u8],
        value: &T,
    ) -> Result<Option<u64>, MetaError> {
        self.create_as(what, value, true).await
    }

    /// Creates a block; its version, or `None` if it exists.
    pub async fn create<T: Sealed + Clone + Send + Sync + 'static>(
        &self,
        what: &[u8],
        value: &T,
    ) -> Result<Option<u64>, MetaError> {
        self.create_as(what, value, false).await
    }

    async fn create_as<T: Sealed + Clone + Send + Sync + 'static>(
        &self,
        what: &[u8],
        value: &T,
        unique: bool,
    ) -> Result<Option<u64>, MetaError> {
        let mode = self.mode().await;
        if !mode.exclusive {
            let block = if unique {
                self.meta.create_unique(what, value).await?
            } else {
                self.meta.create(what, value).await?
            };
            if let Some(block) = &block {
                self.remember(what, block);
            }
            return Ok(block.map(|b| b.version));
        }
        self.wait_for_room().await;
        for _ in 0..ATTEMPTS {
            // A unique name cannot exist yet: no need to ask its quorum.
            if !unique {
                self.load::<T>(what).await?;
            }
            let mut slots = self.slots.lock().expect("slots");
            let slot = match (slots.get_mut(what), unique) {
                (Some(slot), _) => slot,
                (None, true) => slots
                    .entry(what.to_vec())
                    .or_insert_with(|| Slot::from_quorum(None, None)),
                (None, false) => continue,
            };
            match &slot.current {
                // Known to the quorum only, after a conflict: it exists.
                None if unique => return Ok(None),
                None => continue,
                Some((Some(_), _)) => return Ok(None),
                Some((None, version)) => {
                    let version = version + 1;
                    self.set(slot, Arc::new(value.clone()), version, unique);
                    return Ok(Some(version));
                }
            }
        }
        Err(self.overflowing())
    }

    // ---- flushing -------------------------------------------------------------

    /// Holds a change back while too many wait for the flusher.
    async fn wait_for_room(&self) {
        for _ in 0..1000 {
            if self.dirty.load(Ordering::Relaxed) < MAX_DIRTY {
                return;
            }
            let flushed = self.flushed.notified();
            self.wake.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(100), flushed).await;
        }
    }

    async fn flush_loop(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(FLUSH_DELAY).await;
            for _ in 0..BARRIER_ROUNDS {
                if self.dirty.load(Ordering::Relaxed) == 0 {
                    break;
                }
                if let Err(e) = self.flush().await {
                    warn!("volume {}: metadata commit: {e}", self.volume());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Where the changes stand now: after every change made so far.
    pub fn mark(&self) -> Mark {
        Mark {
            seq: self.seq.load(Ordering::Relaxed),
            epoch: self.epoch.load(Ordering::Relaxed),
        }
    }

    /// Every change numbered below this is on its quorum: a mark at or
    /// below it is committed.
    pub fn committed_below(&self) -> u64 {
        let next = self.seq.load(Ordering::Relaxed);
        let slots = self.slots.lock().expect("slots");
        slots.values().filter_map(|s| s.dirty).min().unwrap_or(next)
    }

    /// Whether other mounts may have seen, or written over, the changes
    /// before `mark` in ways this mount does not know: since then it began
    /// or stopped holding the volume, or lost a conflict.
    pub fn unsettled_since(&self, mark: &Mark) -> bool {
        self.epoch.load(Ordering::Relaxed) != mark.epoch
    }

    /// Whether this mount holds the volume alone (no other mount reads or
    /// writes its blocks), and trusts that it does.
    pub async fn holds_alone(&self) -> bool {
        let mode = self.mode.read().await;
        mode.exclusive && Instant::now() < mode.trusted_until
    }

    /// Commits every change made before it was called.
    pub async fn barrier(&self) -> Result<(), MetaError> {
        let target = self.seq.load(Ordering::Relaxed);
        for _ in 0..BARRIER_ROUNDS {
            if self.committed_below() >= target {
                return Ok(());
            }
            self.flush().await?;
        }
        Err(MetaError::Corrupt(
            "metadata changes keep failing to commit".into(),
        ))
    }

    /// Writes every changed block, lower ranks first.
    async fn flush(&self) -> Result<(), MetaError> {
        let _one = self.flush_lock.lock().await;
        let mut pending: Vec<Pending> = {
            let mut slots = self.slots.lock().expect("slots");
            // Gone: nothing refers to the block any more, so its quorum
            // need not learn it. One never written is forgotten; one
            // written keeps there the last version anything named.
            slots.retain(|_, s| {
                if !(s.vanished && s.dirty.is_some()) {
                    return true;
                }
                self.dirty.fetch_sub(1, Ordering::Relaxed);
                s.dirty = None;
                !s.unique
            });
            slots
                .iter()
                .filter_map(|(what, s)| {
                    let seq = s.dirty?;
                    let (Some(value), _) = s.current.as_ref()? else {
                        return None;
                    };
                    Some(Pending {
                        what: what.clone(),
                        committed: s.committed.clone(),
                        value: value.clone(),
                        encode: s.encode,
                        rank: s.rank,
                        unique: s.unique,
                        seq,
                    })
                })
                .collect()
        };
        pending.sort_by_key(|p| p.rank);
        let mut failure = None;
        while !pending.is_empty() {
            let rank = pending[0].rank;
            let split = pending.partition_point(|p| p.rank == rank);
            let batch: Vec<Pending> = pending.drain(..split).collect();
            let results: Vec<_> = futures::stream::iter(batch)
                .map(|p| async move {
                    let body = (p.encode)(&p.value);
                    let result = self
                        .meta
                        .put_body(&p.what, p.committed.as_ref(), body, p.unique)
                        .await;
                    (p, result)
                })
                .buffer_unordered(FLUSH_PARALLEL)
                .collect()
                .await;
            for (p, result) in results {
                if let Err(e) = self.landed(p, result) {
                    failure = Some(e);
                }
            }
            if failure.is_some() {
                // Higher ranks point at what did not land: keep them back.
                break;
            }
        }
        self.flushed.notify_waiters();
        failure.map_or(Ok(()), Err)
    }

    /// Records the outcome of one block's commit.
    fn landed(&self, p: Pending, result: Result<PutOutcome, MetaError>) -> Result<(), MetaError> {
        let mut slots = self.slots.lock().expect("slots");
        let Some(slot) = slots.get_mut(&p.what) else {
            return Ok(());
        };
        match result? {
            PutOutcome::Written(block) => {
                slot.committed = Some(block);
                slot.unique = false;
                if slot.dirty == Some(p.seq) {
                    slot.dirty = None;
                    self.dirty.fetch_sub(1, Ordering::Relaxed);
                }
            }
            PutOutcome::Conflict(current) => {
                // Only a mount that lost its session can meet another
                // writer here: the other's version stands.
                warn!(
                    "volume {}: block {} was changed by another mount while this one held the volume; keeping the other's version",
                    self.volume(),
                    current.address
                );
                self.epoch.fetch_add(1, Ordering::Relaxed);
                slot.committed = Some(current);
                slot.current = None;
                slot.unique = false;
                if slot.dirty.take().is_some() {
                    self.dirty.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}
