//! Chunks cached on the mounting peer's disk, shared by its mounts. Chunks
//! never change, so an entry is never stale; it is kept sealed (as stored
//! in the cluster), so the cache holds only ciphertext, and it is checked
//! against its address on every read, so a damaged file is a miss, never
//! wrong data.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use shoal_core::Address;
use shoal_core::block;
use tracing::warn;

#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    capacity: u64,
    used: AtomicU64,
}

impl ChunkCache {
    /// Opens (or creates) the cache in `dir`, holding up to `capacity`
    /// bytes.
    pub fn open(dir: &Path, capacity: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut used = 0;
        for entry in std::fs::read_dir(dir)? {
            used += entry?.metadata()?.len();
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            capacity,
            used: AtomicU64::new(used),
        })
    }

    fn path(&self, address: &Address) -> PathBuf {
        self.dir.join(address.to_string())
    }

    /// The sealed chunk at `address`, if cached and intact.
    pub fn get(&self, address: &Address) -> Option<Vec<u8>> {
        let path = self.path(address);
        let data = std::fs::read(&path).ok()?;
        if block::verify(address, &data).is_err() {
            warn!("chunk cache: {} is damaged; dropping it", path.display());
            self.remove(&path);
            return None;
        }
        Some(data)
    }

    /// Caches a sealed chunk (already verified against its address).
    pub fn put(&self, address: &Address, sealed: &[u8]) {
        let path = self.path(address);
        if path.exists() {
            return;
        }
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, sealed).and_then(|()| std::fs::rename(&tmp, &path)) {
            warn!("chunk cache: cannot write {}: {e}", path.display());
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let used =
            self.used.fetch_add(sealed.len() as u64, Ordering::Relaxed) + sealed.len() as u64;
        if used > self.capacity {
            self.evict();
        }
    }

    fn remove(&self, path: &Path) {
        if let Ok(md) = std::fs::metadata(path)
            && std::fs::remove_file(path).is_ok()
        {
            self.used.fetch_sub(md.len(), Ordering::Relaxed);
        }
    }

    /// Drops the oldest entries until the cache is at 90% of its capacity.
    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                Some((e.metadata().ok()?.modified().ok()?, e.path()))
            })
            .collect();
        files.sort();
        let target = self.capacity / 10 * 9;
        for (_, path) in files {
            if self.used.load(Ordering::Relaxed) <= target {
                break;
            }
            self.remove(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_verifies_and_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 2500).unwrap();
        let blocks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
        let addresses: Vec<Address> = blocks.iter().map(|b| Address::of(b)).collect();
        cache.put(&addresses[0], &blocks[0]);
        assert_eq!(cache.get(&addresses[0]).as_deref(), Some(&blocks[0][..]));
        // A damaged entry is a miss, and goes.
        std::fs::write(cache.path(&addresses[0]), [0xff; 1000]).unwrap();
        assert_eq!(cache.get(&addresses[0]), None);
        assert!(!cache.path(&addresses[0]).exists());
        // Past capacity, the oldest entries go.
        for (a, b) in addresses.iter().zip(&blocks) {
            std::thread::sleep(std::time::Duration::from_millis(20));
            cache.put(a, b);
        }
        assert!(cache.used.load(Ordering::Relaxed) <= 2500);
        assert_eq!(cache.get(&addresses[2]).as_deref(), Some(&blocks[2][..]));
        // Reopening counts what is there.
        let again = ChunkCache::open(dir.path(), 2500).unwrap();
        assert_eq!(
            again.used.load(Ordering::Relaxed),
            cache.used.load(Ordering::Relaxed)
        );
    }
}
