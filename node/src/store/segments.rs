//! Segment files: where a peer keeps its large blocks (file data chunks).
//!
//! Blocks are appended to the open segment with direct I/O and synced; the
//! store's index then records where each one lies (an [`Extent`]). A
//! deleted block's range is punched out of its segment, which gives the
//! space back to the filesystem without rewriting anything.
//!
//! One file per block cost a new inode, a directory entry and a directory
//! sync for every MiB written; a block written through the page cache cost
//! fresh pages to fill, which on a machine shared by three replicas and a
//! mount took longer than the disk took to write the bytes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{FallocateFlags, fallocate};

/// A segment takes appends until it holds this many bytes.
const SEGMENT_BYTES: u64 = 256 << 20;
/// What direct I/O needs buffers, offsets and lengths aligned to.
const ALIGN: u64 = 4096;

thread_local! {
    /// A writer thread's staging buffer for direct I/O, kept between blocks
    /// so that no write faults in fresh pages.
    static STAGING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Where a block lies: `len` bytes at `offset` of segment `segment`; the
/// range it occupies is `len` rounded up to the alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub const ENCODED_LEN: usize = 24;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.segment.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let word = |i: usize| Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
        (bytes.len() == Self::ENCODED_LEN).then_some(())?;
        Some(Self {
            segment: word(0)?,
            offset: word(8)?,
            len: word(16)?,
        })
    }

    fn span(&self) -> u64 {
        self.len.div_ceil(ALIGN) * ALIGN
    }
}

/// The segment taking appends.
struct Open {
    id: u64,
    file: Arc<File>,
    next: u64,
}

/// Where appends go: the open segment, and the id of the next one.
struct Appender {
    open: Option<Open>,
    next_id: u64,
}

/// A peer's segment files, in one directory.
pub struct Segments {
    dir: PathBuf,
    appender: Mutex<Appender>,
    /// Segments opened for reads and punches, by id.
    handles: Mutex<HashMap<u64, Arc<File>>>,
}

impl Segments {
    /// The segments in `dir`; appends go to a new segment, after every
    /// existing one.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut last = 0;
        for entry in std::fs::read_dir(dir)? {
            if let Some(id) = entry?
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("seg-"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                last = last.max(id);
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            appender: Mutex::new(Appender {
                open: None,
                next_id: last + 1,
            }),
            handles: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id:08}"))
    }

    /// Appends `data`; returns where it lies once it is durable.
    pub fn append(&self, data: &[u8]) -> io::Result<Extent> {
        let len = data.len() as u64;
        let span = len.div_ceil(ALIGN) * ALIGN;
        let (id, file, offset) = {
            let mut appender = self.appender.lock().unwrap_or_else(|p| p.into_inner());
            let Appender { open, next_id } = &mut *appender;
            if open.as_ref().is_none_or(|o| o.next + span > SEGMENT_BYTES) {
                *open = Some(self.start_segment(*next_id)?);
                *next_id += 1;
            }
            let o = open.as_mut().expect("a segment is open");
            let offset = o.next;
            o.next += span;
            (o.id, o.file.clone(), offset)
        };
        write_aligned(&file, offset, data)?;
        file.sync_data()?;
        Ok(Extent {
            segment: id,
            offset,
            len,
        })
    }

    /// Creates the next segment, durably named in the directory.
    fn start_segment(&self, id: u64) -> io::Result<Open> {
        let file = open_direct(&self.path(id), |o| o.write(true).create_new(true))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(Open {
            id,
            file: Arc::new(file),
            next: 0,
        })
    }

    /// A segment opened for reads and punches.
    fn handle(&self, id: u64) -> io::Result<Arc<File>> {
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = handles.get(&id) {
            return Ok(file.clone());
        }
        let path = self.path(id);
        let file = Arc::new(open_direct(&path, |o| o.read(true).write(true))?);
        handles.insert(id, file.clone());
        Ok(file)
    }

    /// The bytes at `extent`, read past the page cache like they were
    /// written: the mount keeps the chunks it reads in caches of its own.
    pub fn read(&self, extent: &Extent) -> io::Result<Vec<u8>> {
        let file = self.handle(extent.segment)?;
        let span = extent.span() as usize;
        STAGING.with_borrow_mut(|buf| {
            let aligned = aligned(buf, span);
            let mut done = 0;
            while done < extent.len as usize {
                match file.read_at(&mut aligned[done..], extent.offset + done as u64)? {
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    n => done += n,
                }
            }
            Ok(aligned[..extent.len as usize].to_vec())
        })
    }

    /// Gives the range of `extent` back to the filesystem; it then reads as
    /// zeros.
    pub fn free(&self, extent: &Extent) -> io::Result<()> {
        let file = self.handle(extent.segment)?;
        fallocate(
            &*file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            extent.offset as i64,
            extent.span() as i64,
        )
        .map_err(io::Error::from)
    }

    /// Overwrites a stored range without any check: lets tests model a disk
    /// that flipped bits.
    #[cfg(test)]
    pub fn corrupt_for_test(&self, extent: &Extent, data: &[u8]) {
        write_aligned(&self.handle(extent.segment).unwrap(), extent.offset, data).unwrap();
    }
}

/// Opens `path` for direct I/O with `options`, or for buffered I/O on a
/// filesystem without direct I/O (tmpfs).
fn open_direct(
    path: &Path,
    options: impl Fn(&mut OpenOptions) -> &mut OpenOptions,
) -> io::Result<File> {
    match options(OpenOptions::new().custom_flags(libc::O_DIRECT)).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            options(&mut OpenOptions::new()).open(path)
        }
        opened => opened,
    }
}

/// The first `len` bytes at the alignment in `buf`, grown as needed.
fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + ALIGN as usize {
        buf.resize(len + ALIGN as usize, 0);
    }
    let start = buf.as_ptr().align_offset(ALIGN as usize);
    &mut buf[start..start + len]
}

/// Writes `data` at `offset` (aligned) of `file`, through an aligned copy
/// padded with zeros to the alignment, as direct I/O needs.
fn write_aligned(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let padded = (data.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize;
    STAGING.with_borrow_mut(|buf| {
        let aligned = aligned(buf, padded);
        aligned[..data.len()].copy_from_slice(data);
        aligned[data.len()..].fill(0);
        file.write_all_at(aligned, offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_read_back_survive_reopen_and_free_their_range() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        let a: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let b = vec![7u8; 5000];
        let (ea, eb) = (segments.append(&a).unwrap(), segments.append(&b).unwrap());
        assert_eq!(ea.segment, eb.segment);
        assert_eq!(eb.offset, ea.span());
        assert_eq!(Extent::decode(&ea.encode()), Some(ea));
        assert_eq!(Extent::decode(&ea.encode()[1..]), None);
        drop(segments);

        let segments = Segments::open(dir.path()).unwrap();
        assert_eq!(segments.read(&ea).unwrap(), a);
        assert_eq!(segments.read(&eb).unwrap(), b);
        // New appends go to a new segment, never over what is there.
        let ec = segments.append(&b).unwrap();
        assert!(ec.segment > ea.segment);
        segments.free(&ea).unwrap();
        assert_eq!(segments.read(&ea).unwrap(), vec![0; a.len()]);
        assert_eq!(segments.read(&eb).unwrap(), b);
    }
}
