//! Freeing the chunks no file refers to any more: those a commit replaced
//! or cut off, those of a file whose last link and last handle went, and
//! uploads a later write made useless.
//!
//! A chunk is released (its replicas drop the volume's claim and delete it)
//! only when nothing can still need it:
//! - the change that dropped it is on its quorum
//!   ([`MetaCache::committed_below`]);
//! - the mount has held the volume alone since before that change, and
//!   still does: no other mount reads an older version of the file, or
//!   writes one back (see [`MetaCache::unsettled_since`]);
//! - the volume's lineage has no other member: no snapshot or clone refers
//!   to the chunk. Chunks dropped while one exists are left to the lineage,
//!   whose last member's deletion frees every chunk it owns.
//!
//! A crash before the release leaves the chunks to the lineage as well: a
//! bounded leak, never a chunk deleted that a file still names.

use std::collections::VecDeque;

use shoal_core::Address;
use tracing::{debug, warn};

use super::VolumeFs;
use crate::fs::meta_cache::Mark;
#[cfg(doc)]
use crate::fs::meta_cache::MetaCache;

/// Chunks waiting to be released at most; beyond, the oldest are left to
/// the lineage (a mount that shares its volume for long keeps dropping).
const MAX_WAITING: usize = 1 << 20;

/// Chunks dropped by changes, each batch with where the mount's changes
/// stood right after it.
#[derive(Debug, Default)]
pub(super) struct Unreferenced {
    batches: VecDeque<(Mark, Vec<Address>)>,
    len: usize,
}

impl Unreferenced {
    pub(super) fn push(&mut self, mark: Mark, chunks: Vec<Address>) {
        if chunks.is_empty() {
            return;
        }
        self.len += chunks.len();
        self.batches.push_back((mark, chunks));
        while self.len > MAX_WAITING {
            let (_, dropped) = self.batches.pop_front().expect("over the limit");
            self.len -= dropped.len();
            warn!(
                "{} unreferenced chunks left to the volume's lineage: too many waiting",
                dropped.len()
            );
        }
    }

    /// The oldest batches whose changes `committed` says are on their
    /// quorum (marks only grow, so the rest are younger).
    fn take_committed(&mut self, committed: impl Fn(&Mark) -> bool) -> Vec<(Mark, Vec<Address>)> {
        let mut taken = Vec::new();
        while let Some((mark, _)) = self.batches.front() {
            if !committed(mark) {
                break;
            }
            let batch = self.batches.pop_front().expect("has a front");
            self.len -= batch.1.len();
            taken.push(batch);
        }
        taken
    }

    /// Batches taken too early, back in front, in their order.
    fn put_back(&mut self, batches: Vec<(Mark, Vec<Address>)>) {
        for batch in batches.into_iter().rev() {
            self.len += batch.1.len();
            self.batches.push_front(batch);
        }
    }
}

impl VolumeFs {
    /// Queues chunks that a change just made no longer names.
    pub(super) fn unreferenced(&self, chunks: Vec<Address>) {
        let mark = self.cache.mark();
        self.unreferenced
            .lock()
            .expect("unreferenced")
            .push(mark, chunks);
    }

    /// Releases the queued chunks that nothing can need any more (see the
    /// module's documentation); returns how many it released.
    pub async fn reclaim(&self) -> usize {
        let committed = self.cache.committed_below();
        let ready = self
            .unreferenced
            .lock()
            .expect("unreferenced")
            .take_committed(|mark| mark.seq <= committed);
        if ready.is_empty() {
            return 0;
        }
        let alone = self.cache.holds_alone().await;
        let (settled, unsettled): (Vec<_>, Vec<_>) = ready
            .into_iter()
            .partition(|(mark, _)| alone && !self.cache.unsettled_since(mark));
        if !unsettled.is_empty() {
            debug!(
                "{} batches of unreferenced chunks left to the lineage: other mounts may use them",
                unsettled.len()
            );
        }
        let chunks: Vec<Address> = settled
            .iter()
            .flat_map(|(_, c)| c.iter().copied())
            .collect();
        if chunks.is_empty() {
            return 0;
        }
        let record = self.record.lock().expect("record").clone();
        match self.volumes.alone_in_lineage(&record).await {
            Ok(true) => {
                let owner = self.meta.keys().data.writer();
                let (blocks, bytes) = self.blocks.release_owned(&owner, &chunks).await;
                debug!(
                    "volume {}: released {} chunks ({blocks} copies, {bytes} bytes)",
                    record.name,
                    chunks.len()
                );
                chunks.len()
            }
            Ok(false) => {
                debug!(
                    "volume {}: {} unreferenced chunks left to its lineage (a snapshot or clone may use them)",
                    record.name,
                    chunks.len()
                );
                0
            }
            Err(e) => {
                warn!(
                    "volume {}: lineage unreadable, release later: {e}",
                    record.name
                );
                self.unreferenced
                    .lock()
                    .expect("unreferenced")
                    .put_back(settled);
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(seq: u64) -> Mark {
        Mark { seq, epoch: 0 }
    }

    #[test]
    fn batches_leave_in_order_once_committed_and_come_back_in_front() {
        let mut q = Unreferenced::default();
        q.push(mark(1), vec![Address([1; 32])]);
        q.push(mark(2), vec![]);
        q.push(mark(3), vec![Address([3; 32]), Address([4; 32])]);
        q.push(mark(5), vec![Address([5; 32])]);
        assert!(q.take_committed(|_| false).is_empty());
        // Committed up to 3: the batch at 5 stays.
        let taken = q.take_committed(|m| m.seq <= 3);
        assert_eq!(taken.iter().map(|(m, _)| m.seq).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(q.len, 1);
        q.put_back(taken);
        assert_eq!(q.len, 4);
        let all = q.take_committed(|_| true);
        assert_eq!(
            all.iter().map(|(m, _)| m.seq).collect::<Vec<_>>(),
            [1, 3, 5]
        );
        assert_eq!(q.len, 0);
    }

    #[test]
    fn the_oldest_go_to_the_lineage_beyond_the_limit() {
        let mut q = Unreferenced::default();
        q.push(mark(1), vec![Address([1; 32]); MAX_WAITING]);
        q.push(mark(2), vec![Address([2; 32])]);
        assert_eq!(q.len, 1);
        assert_eq!(q.take_committed(|_| true)[0].0.seq, 2);
    }
}
