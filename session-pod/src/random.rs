//! Incompressible bytes for downloads and household traffic, made once at
//! startup and served as zero-copy slices.

use bytes::Bytes;

/// The size of the pool: large enough that no compressor with a usual window
/// sees a repeat.
pub const POOL_BYTES: usize = 8 * 1024 * 1024;

const HUGE_PAGE: usize = 2 * 1024 * 1024;

/// Asks the kernel to back `memory` (not yet touched) with huge pages; where
/// it will not, nothing changes.
#[cfg(target_os = "linux")]
fn advise_huge_pages(memory: &mut [u8]) {
    // SAFETY: madvise only advises on the range, which we own; MADV_HUGEPAGE
    // changes no contents. Failure is harmless and ignored.
    unsafe {
        libc::madvise(memory.as_mut_ptr().cast(), memory.len(), libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: &mut [u8]) {}

/// Random bytes, cheap to clone and slice.
#[derive(Clone, Debug)]
pub struct RandomPool {
    bytes: Bytes,
}

#[derive(Debug, thiserror::Error)]
#[error("no randomness from the operating system: {0}")]
pub struct NoRandomness(#[from] getrandom::Error);

impl RandomPool {
    /// A pool of `len` bytes from a fast generator seeded by the OS.
    pub fn new(len: usize) -> Result<Self, NoRandomness> {
        let len = len.max(1);
        let mut rng = fastrand::Rng::with_seed(getrandom::u64()?);
        // Room to start the pool on a huge-page boundary: streams copy from
        // all of it, and four huge pages cost the TLB less than 2,048 small
        // ones (about a tenth less CPU per Gbit/s on loopback).
        let mut bytes = vec![0u8; len + HUGE_PAGE];
        let start = bytes.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        let pool = &mut bytes[start..start + len];
        advise_huge_pages(pool);
        rng.fill(pool);
        Ok(Self { bytes: Bytes::from(bytes).slice(start..start + len) })
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// `len` bytes (at most the pool's size) starting at `offset` (wrapped),
    /// shared with the pool. The start moves back where the slice would run
    /// past the end.
    pub fn slice(&self, offset: usize, len: usize) -> Bytes {
        let len = len.min(self.bytes.len());
        let start = offset % (self.bytes.len() - len + 1);
        self.bytes.slice(start..start + len)
    }

    /// A random offset, for streams to start at different places.
    pub fn random_offset(&self) -> usize {
        fastrand::usize(..self.bytes.len())
    }
}

/// Hands out consecutive slices of a pool: each stream has its own.
#[derive(Debug)]
pub struct Chunks {
    pool: RandomPool,
    offset: usize,
    len: usize,
}

impl Chunks {
    pub fn new(pool: RandomPool, len: usize) -> Self {
        let offset = pool.random_offset();
        Self { pool, offset, len }
    }

    /// The next slice of `self.len` bytes.
    pub fn next_chunk(&mut self) -> Bytes {
        self.next_sized(self.len)
    }

    /// The next slice of `len` bytes.
    pub fn next_sized(&mut self, len: usize) -> Bytes {
        let chunk = self.pool.slice(self.offset, len);
        self.offset = (self.offset + len) % self.pool.len();
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_stay_inside_the_pool_and_share_its_memory() {
        let pool = RandomPool::new(1024).unwrap();
        for offset in [0, 100, 1000, 1023, 5000] {
            assert_eq!(pool.slice(offset, 256).len(), 256);
        }
        assert_eq!(pool.slice(0, 4096).len(), 1024);
        let a = pool.slice(10, 100);
        let b = pool.slice(10, 100);
        assert_eq!(a.as_ptr(), b.as_ptr());
    }

    #[test]
    fn chunks_move_through_the_pool() {
        let pool = RandomPool::new(4096).unwrap();
        let mut chunks = Chunks::new(pool, 1000);
        let first = chunks.next_chunk();
        let second = chunks.next_chunk();
        assert_eq!((first.len(), second.len()), (1000, 1000));
        assert_ne!(first, second);
    }

    #[test]
    fn the_pool_is_not_constant() {
        let pool = RandomPool::new(POOL_BYTES).unwrap();
        let mut seen = [false; 256];
        pool.slice(0, 4096).iter().for_each(|b| seen[usize::from(*b)] = true);
        assert!(seen.iter().filter(|s| **s).count() > 250);
    }
}
