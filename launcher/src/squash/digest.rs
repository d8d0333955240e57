//! The SHA-256 berth records for a squashfs it writes (`RootfsSha256SuperblockLast` in the
//! SIF's config): of its bytes after the superblock, in order, then of the superblock.
//!
//! Everything after the superblock is written once and in order at the image's tail (the
//! compressor options, the data blocks, the spills copied after them, the tables, the
//! padding), and the superblock, which comes first, last. Hashed in that order, each byte
//! is hashed as it is written (every write after the superblock goes through
//! [`TailHash::write`]): nothing is read back after the build, which
//! for a 16 GB image is about 11 s of one thread on the critical path. The plain SHA-256
//! of the partition cannot be had that way, its first bytes being known last.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};

use super::format::SUPERBLOCK_LEN;

/// Hashes a squashfs's bytes after the superblock as they are written.
pub struct TailHash {
    hasher: Sha256,
    /// Where the next byte must be written (in the output file).
    next: u64,
}

impl TailHash {
    /// For a squashfs at `base` in its file.
    pub fn new(base: u64) -> TailHash {
        TailHash {
            hasher: Sha256::new(),
            next: base + SUPERBLOCK_LEN as u64,
        }
    }

    /// Writes `bytes` at `at` in `out` and hashes them. `at` must follow what was hashed
    /// before: a byte written out of order would make the recorded hash wrong, so it fails
    /// the build, before anything is written.
    pub fn write(&mut self, out: &File, at: u64, bytes: &[u8]) -> io::Result<()> {
        self.check(at)?;
        out.write_all_at(bytes, at)?;
        self.update(bytes);
        Ok(())
    }

    fn check(&self, at: u64) -> io::Result<()> {
        if at != self.next {
            return Err(io::Error::other(format!(
                "squashfs bytes written at {at} where {} was next (a bug in berth's writer)",
                self.next
            )));
        }
        Ok(())
    }

    fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.next += bytes.len() as u64;
    }

    /// The `len` bytes at `at` in `out`, written there without passing through the writer
    /// (an in-kernel copy), read back to be hashed.
    pub fn copied(&mut self, out: &File, at: u64, len: u64) -> io::Result<()> {
        self.check(at)?;
        crate::pieces::for_each(crate::pieces::at(out, at, len), |piece| {
            self.update(piece);
            Ok(())
        })
    }

    /// The hash, once the rest is written and `superblock` last (hex).
    pub fn finish(mut self, superblock: &[u8]) -> String {
        self.hasher.update(superblock);
        hex::encode(self.hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_out_of_order_are_refused_before_they_are_written() {
        let out = tempfile::tempfile().unwrap();
        let mut hash = TailHash::new(1000);
        hash.write(&out, 1000 + SUPERBLOCK_LEN as u64, b"abc")
            .unwrap();
        let err = hash.write(&out, 2000, b"def").unwrap_err().to_string();
        assert!(err.contains("where 1099 was next"), "{err}");
        assert_eq!(out.metadata().unwrap().len(), 1099);
    }
}
