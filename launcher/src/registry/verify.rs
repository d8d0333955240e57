//! Digests and sizes of what a registry sends, checked while it streams.

use sha2::Digest as _;

use crate::reference::{Digest, DigestAlgorithm};
use crate::{Error, Result};

/// Counts and hashes a blob as it streams, so a blob is known good before anything uses it.
pub struct Verifier {
    hasher: Hasher,
    expected: Digest,
    size: u64,
    seen: u64,
    what: String,
}

enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Verifier {
    pub fn new(expected: &Digest, size: u64, what: String) -> Verifier {
        let hasher = match expected.algorithm() {
            DigestAlgorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestAlgorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        };
        Verifier {
            hasher,
            expected: expected.clone(),
            size,
            seen: 0,
            what,
        }
    }

    /// Feeds bytes; refuses as soon as the blob grows past its declared size.
    pub fn update(&mut self, bytes: &[u8]) -> Result<()> {
        self.seen += bytes.len() as u64;
        if self.seen > self.size {
            return Err(self.mismatch(format!("more than {} bytes", self.size)));
        }
        match &mut self.hasher {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        if self.seen != self.size {
            return Err(self.mismatch(format!("{} of {} bytes", self.seen, self.size)));
        }
        let hex = match &self.hasher {
            Hasher::Sha256(h) => hex::encode(h.clone().finalize()),
            Hasher::Sha512(h) => hex::encode(h.clone().finalize()),
        };
        if hex != self.expected.hex() {
            return Err(self.mismatch(format!("{}:{hex}", self.expected.algorithm().name())));
        }
        Ok(())
    }

    fn mismatch(&self, actual: String) -> Error {
        Error::DigestMismatch {
            what: self.what.clone(),
            expected: format!("{} ({} bytes)", self.expected, self.size),
            actual,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_checks_size_and_digest() {
        let d = Digest::compute(DigestAlgorithm::Sha256, b"hello");
        let mut v = Verifier::new(&d, 5, "blob x".into());
        v.update(b"hel").unwrap();
        v.update(b"lo").unwrap();
        v.finish().unwrap();

        let mut v = Verifier::new(&d, 5, "blob x".into());
        v.update(b"jello").unwrap();
        let err = v.finish().unwrap_err().to_string();
        assert!(
            err.contains("blob x") && err.contains("corrupt") && err.contains(&d.to_string()),
            "{err}"
        );

        let mut v = Verifier::new(&d, 5, "blob x".into());
        assert!(v.update(b"hello!").is_err());
        let v = Verifier::new(&d, 5, "blob x".into());
        assert!(v.finish().unwrap_err().to_string().contains("0 of 5 bytes"));
    }
}
