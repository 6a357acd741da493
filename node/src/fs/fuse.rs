//! The FUSE shell over [`VolumeFs`]: a request that memory can answer is
//! answered on the FUSE thread; one that waits (for the network, a lock)
//! becomes a task on the peer's runtime and is answered when it is done, so
//! a slow fetch never holds up unrelated requests.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use shoal_core::fs::inode::NAME_MAX;
use shoal_core::fs::{Inode, Kind, Timestamp};
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

use super::filesystem::{ATTR_TTL, VolumeFs};

/// The largest read or write the kernel sends in one request.
pub const MAX_IO: u32 = 1024 * 1024;

pub struct ShoalFuse {
    fs: Arc<VolumeFs>,
    rt: Handle,
    /// The requests answered by tasks, until they are answered.
    tasks: TaskTracker,
    /// Tells the kernel of changes it did not ask for; set once mounted.
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

impl std::fmt::Debug for ShoalFuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShoalFuse").field("fs", &self.fs).finish()
    }
}

impl ShoalFuse {
    pub fn new(fs: Arc<VolumeFs>, rt: Handle) -> Self {
        Self {
            fs,
            rt,
            tasks: TaskTracker::new(),
            notifier: Arc::default(),
        }
    }

    /// The tasks answering requests: a handover waits for them.
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Where the mounted session's notifier goes.
    pub fn notifier(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Runs `op` and gives its result to `reply`: on the spot if it
    /// finishes without waiting (a mount holding its volume alone changes
    /// its own copy), else as a task that finishes it, so that what waits
    /// for the network holds up no other request. Done on the spot, a
    /// request neither waits for a runtime thread busy with commits nor
    /// pays for the hand-over.
    fn spawn<T, F>(
        &self,
        op: impl FnOnce(Arc<VolumeFs>) -> F + Send + 'static,
        reply: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) where
        F: std::future::Future<Output = Result<T, Errno>> + Send + 'static,
        T: Send + 'static,
    {
        let _runtime = self.rt.enter();
        let mut op = Box::pin(op(self.fs.clone()));
        // Polled again by its task, which then registers to be woken.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match op.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(result) => reply(result),
            std::task::Poll::Pending => {
                self.tasks
                    .spawn_on(async move { reply(op.await) }, &self.rt);
            }
        }
    }
}

impl ShoalFuse {
    /// mknod and mkdir: a new inode of `kind` named `n` in `parent`.
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        kind: Kind,
        mode: u32,
        reply: ReplyEntry,
    ) {
        let (n, uid, gid) = (name(n), req.uid(), req.gid());
        self.spawn(
            move |fs| async move {
                let inode = Inode::new(super::new_ino(), kind, mode, uid, gid, super::now());
                fs.make(parent.0, &n, inode).await
            },
            entry(reply),
        );
    }
}

fn to_system(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nanos))
    }
}

fn from_system(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (secs, nanos) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timestamp { secs, nanos }
        }
    }
}

fn time_or_now(t: TimeOrNow) -> Timestamp {
    match t {
        TimeOrNow::SpecificTime(t) => from_system(t),
        TimeOrNow::Now => super::now(),
    }
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

pub fn attr(i: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(i.ino),
        size: i.size,
        blocks: i.stored_bytes().div_ceil(512),
        atime: to_system(i.atime),
        mtime: to_system(i.mtime),
        ctime: to_system(i.ctime),
        crtime: to_system(i.ctime),
        kind: kind(i.kind),
        perm: i.mode as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

// Directory offsets: 1 and 2 are "." and "..", entry k of the listing is
// k + 3; a reply continues after the offset the kernel gives.

/// Entries of the listing before `offset`.
fn listing_skip(offset: u64) -> usize {
    (offset as usize).saturating_sub(2)
}

/// "." and ".." if they come after `offset`.
fn dots_after(offset: u64) -> impl Iterator<Item = (u64, &'static str)> {
    [(1, "."), (2, "..")]
        .into_iter()
        .filter(move |(o, _)| *o > offset)
}

/// The offset of entry `k` of a page that starts after `offset`.
fn entry_offset(offset: u64, k: usize) -> u64 {
    offset.max(2) + k as u64 + 1
}

fn name(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

fn entry(reply: ReplyEntry) -> impl FnOnce(Result<Inode, Errno>) {
    move |r| match r {
        Ok(i) => reply.entry(&ATTR_TTL, &attr(&i), Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty) -> impl FnOnce(Result<(), Errno>) {
    move |r| match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn attr_reply(reply: ReplyAttr) -> impl FnOnce(Result<Inode, Errno>) {
    move |r| match r {
        Ok(i) => reply.attr(&ATTR_TTL, &attr(&i)),
        Err(e) => reply.error(e),
    }
}

impl fuser::Filesystem for ShoalFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Shoal drops setuid, setgid and capabilities on writes itself, so
        // the kernel does not ask for the capabilities before each write.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        let n = name(n);
        // What memory answers is answered on the spot: no task, no hand-over.
        if let Some(r) = self.fs.lookup_held(parent.0, &n) {
            return entry(reply)(r);
        }
        self.spawn(
            move |fs| async move { fs.lookup(parent.0, &n).await },
            entry(reply),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(r) = self.fs.inode_held(ino.0) {
            return attr_reply(reply)(r);
        }
        self.spawn(
            move |fs| async move { fs.inode(ino.0).await },
            attr_reply(reply),
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let caller = req.uid();
        self.spawn(
            move |fs| async move {
                if let Some(size) = size {
                    fs.truncate(ino.0, size).await?;
                    if caller != 0 {
                        fs.drop_privileges(ino.0).await?;
                    }
                }
                if mode.is_none()
                    && uid.is_none()
                    && gid.is_none()
                    && atime.is_none()
                    && mtime.is_none()
                {
                    return fs.inode(ino.0).await;
                }
                fs.setattr(ino.0, move |i| {
                    if let Some(mode) = mode {
                        i.mode = mode & 0o7777;
                    }
                    if let Some(uid) = uid {
                        i.uid = uid;
                    }
                    if let Some(gid) = gid {
                        i.gid = gid;
                    }
                    // A chown by anyone but root clears setuid and setgid.
                    if (uid.is_some() || gid.is_some()) && caller != 0 && i.kind == Kind::File {
                        i.mode &= !0o6000;
                    }
                    if let Some(t) = atime {
                        i.atime = time_or_now(t);
                    }
                    if let Some(t) = mtime {
                        i.mtime = time_or_now(t);
                    }
                    Ok(())
                })
                .await
            },
            attr_reply(reply),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(
            move |fs| async move { fs.readlink(ino.0).await },
            move |r| match r {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(e),
            },
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        self.make(req, parent, n, Kind::File, mode & !umask, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, n, Kind::Dir, mode & !umask, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let n = name(n);
        self.spawn(
            move |fs| async move { fs.unlink(parent.0, &n).await },
            empty(reply),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let n = name(n);
        self.spawn(
            move |fs| async move { fs.rmdir(parent.0, &n).await },
            empty(reply),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (n, uid, gid) = (name(link), req.uid(), req.gid());
        let target = target.as_os_str().as_bytes().to_vec();
        self.spawn(
            move |fs| async move {
                let inode = Inode::symlink(super::new_ino(), target, uid, gid, super::now());
                fs.make(parent.0, &n, inode).await
            },
            entry(reply),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (n, new_name) = (name(n), name(new_name));
        self.spawn(
            move |fs| async move {
                fs.rename(parent.0, &n, new_parent.0, &new_name, no_replace)
                    .await
            },
            empty(reply),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        new_parent: INodeNo,
        new_name: &OsStr,
        reply: ReplyEntry,
    ) {
        let new_name = name(new_name);
        self.spawn(
            move |fs| async move { fs.link(ino.0, new_parent.0, &new_name).await },
            entry(reply),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        self.spawn(
            move |fs| async move { fs.open(ino.0, write).await },
            move |r| match r {
                Ok((fh, keep)) => {
                    let flags = if keep {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.opened(FileHandle(fh), flags)
                }
                Err(e) => reply.error(e),
            },
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (n, uid, gid) = (name(n), req.uid(), req.gid());
        self.spawn(
            move |fs| async move {
                let exclusive = flags & libc::O_EXCL != 0;
                let truncate = flags & libc::O_TRUNC != 0;
                fs.create(parent.0, &n, mode & !umask, uid, gid, exclusive, truncate)
                    .await
            },
            move |r| match r {
                Ok((inode, fh)) => reply.created(
                    &ATTR_TTL,
                    &attr(&inode),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(e),
            },
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Data in memory is answered on the spot: no task, no hand-over.
        if let Some(data) = self.fs.read_held(fh.0, offset, size) {
            reply.data(&data);
            return;
        }
        self.spawn(
            move |fs| async move { fs.read(ino.0, fh.0, offset, size).await },
            move |r| match r {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(e),
            },
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        let unprivileged = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let notifier = self.notifier.clone();
        self.spawn(
            move |fs| async move {
                let written = fs.write(ino.0, fh.0, offset, data).await?;
                let dropped = unprivileged && fs.drop_privileges(ino.0).await?;
                Ok((written, dropped))
            },
            move |r| match r {
                Ok((n, dropped)) => {
                    reply.written(n);
                    // The mode the kernel keeps is no longer the file's.
                    if dropped && let Some(notifier) = notifier.get() {
                        let _ = notifier.inval_inode(ino, -1, 0);
                    }
                }
                Err(e) => reply.error(e),
            },
        );
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn(
            move |fs| async move { fs.commit(ino.0, fh.0).await },
            empty(reply),
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(
            move |fs| async move { fs.release(ino.0, fh.0).await },
            empty(reply),
        );
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(
            move |fs| async move { fs.fsync(ino.0, fh.0).await },
            empty(reply),
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(
            move |fs| async move { fs.opendir(ino.0).await },
            move |r| match r {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(e),
            },
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn(
            move |fs| async move {
                let skip = listing_skip(offset);
                Ok((offset, fs.readdir(ino.0, fh.0, skip, 4096, false).await?))
            },
            move |r: Result<_, Errno>| match r {
                Ok((offset, entries)) => {
                    for (off, n) in dots_after(offset) {
                        if reply.add(ino, off, FileType::Directory, n) {
                            return reply.ok();
                        }
                    }
                    for (k, (n, e, _)) in entries.iter().enumerate() {
                        if reply.add(
                            INodeNo(e.ino),
                            entry_offset(offset, k),
                            kind(e.kind),
                            OsStr::from_bytes(n),
                        ) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(e),
            },
        );
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.spawn(
            move |fs| async move {
                let skip = listing_skip(offset);
                let dir = fs.inode(ino.0).await?;
                Ok((offset, dir, fs.readdir(ino.0, fh.0, skip, 512, true).await?))
            },
            move |r: Result<_, Errno>| match r {
                Ok((offset, dir, entries)) => {
                    for (off, n) in dots_after(offset) {
                        // The kernel does not look "." and ".." up: no TTL.
                        if reply.add(ino, off, n, &Duration::ZERO, &attr(&dir), Generation(0)) {
                            return reply.ok();
                        }
                    }
                    for (k, (n, _, inode)) in entries.iter().enumerate() {
                        // Entries whose inode is not committed yet are skipped.
                        let Some(inode) = inode else { continue };
                        if reply.add(
                            INodeNo(inode.ino),
                            entry_offset(offset, k),
                            OsStr::from_bytes(n),
                            &ATTR_TTL,
                            &attr(inode),
                            Generation(0),
                        ) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(e),
            },
        );
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move { fs.barrier().await }, empty(reply));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BSIZE: u64 = 4096;
        let (size, used, files) = self.fs.statfs();
        let blocks = size / BSIZE;
        let free = size.saturating_sub(used) / BSIZE;
        let ffree = u64::from(u32::MAX).saturating_sub(files);
        reply.statfs(
            blocks,
            free,
            free,
            files + ffree,
            ffree,
            BSIZE as u32,
            NAME_MAX as u32,
            BSIZE as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (n, value) = (name(n), value.to_vec());
        self.spawn(
            move |fs| async move {
                fs.setattr(ino.0, move |i| {
                    let exists = i.xattrs.contains_key(&n);
                    if flags & libc::XATTR_CREATE != 0 && exists {
                        return Err(Errno::EEXIST);
                    }
                    if flags & libc::XATTR_REPLACE != 0 && !exists {
                        return Err(Errno::NO_XATTR);
                    }
                    i.xattrs.insert(n.clone(), value.clone());
                    Ok(())
                })
                .await
                .map(|_| ())
            },
            empty(reply),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        let n = name(n);
        if let Some(r) = self.fs.inode_held(ino.0) {
            let value = r.and_then(|mut i| i.xattrs.remove(&n).ok_or(Errno::NO_XATTR));
            return xattr_reply(reply, size, value);
        }
        self.spawn(
            move |fs| async move {
                fs.inode(ino.0)
                    .await?
                    .xattrs
                    .remove(&n)
                    .ok_or(Errno::NO_XATTR)
            },
            move |r| xattr_reply(reply, size, r),
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(
            move |fs| async move {
                let mut out = Vec::new();
                for k in fs.inode(ino.0).await?.xattrs.keys() {
                    out.extend_from_slice(k);
                    out.push(0);
                }
                Ok(out)
            },
            move |r| xattr_reply(reply, size, r),
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let n = name(n);
        self.spawn(
            move |fs| async move {
                fs.setattr(ino.0, move |i| {
                    i.xattrs.remove(&n).map(|_| ()).ok_or(Errno::NO_XATTR)
                })
                .await
                .map(|_| ())
            },
            empty(reply),
        );
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, Errno>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(e),
    }
}
