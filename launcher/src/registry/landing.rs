//! A blob as it lands: the bytes its download has written to its staging file so far,
//! readable while the rest arrives, and how the download ended.
//!
//! The image build reads each layer from here instead of waiting for the whole blob, so
//! downloading, inflating and writing the squashfs overlap. The digest still guards every
//! byte: the build's SIF is published only once every download has verified its blob
//! (`cache`), and a reader that reads to the end gets its EOF only then (an error on a
//! mismatch). Until then the bytes only pass through the unpack rules and limits (which
//! hold for any input) into a staging SIF that nothing runs.
//!
//! The download never rewrites a byte it has shown: a resumed transfer appends after the
//! staged bytes, and one the server answers whole skips them (see `download`), so what a
//! reader has consumed is a prefix of what the verifier hashed.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The shared state of one blob's download.
#[derive(Default)]
pub struct Landing {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// The staging file, once the download has opened it.
    file: Option<Arc<File>>,
    /// How many of its bytes are written (and so readable).
    written: u64,
    end: Option<End>,
}

#[derive(Clone, Copy, PartialEq)]
enum End {
    Verified,
    Failed,
}

impl Landing {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    /// The download opened `file`, whose first `staged` bytes are already the blob's.
    pub(super) fn open(&self, file: &File, staged: u64) -> io::Result<()> {
        let file = Arc::new(file.try_clone()?);
        self.update(|s| {
            s.file = Some(file);
            s.written = staged;
        });
        Ok(())
    }

    /// The download has written the blob's first `written` bytes to the file.
    pub(super) fn wrote(&self, written: u64) {
        self.update(|s| s.written = written);
    }

    /// The bytes written are the whole blob, and its digest matches.
    pub(super) fn verified(&self) {
        self.update(|s| s.end = Some(End::Verified));
    }

    /// The download ended without a verified blob (it failed, or was never started because
    /// another failed). Readers get an error; a verified blob stays verified.
    pub(super) fn abandon(&self) {
        self.update(|s| {
            s.end.get_or_insert(End::Failed);
        });
    }

    /// The blob's bytes as they land, ending when the download has verified them.
    pub fn reader(&self) -> LandingReader<'_> {
        LandingReader {
            landing: self,
            pos: 0,
        }
    }
}

/// Reads a [`Landing`] from its start, waiting for bytes still to come.
pub struct LandingReader<'a> {
    landing: &'a Landing,
    pos: u64,
}

impl Read for LandingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut state = self.landing.lock();
        loop {
            if let (Some(file), true) = (&state.file, self.pos < state.written) {
                let file = Arc::clone(file);
                let available = usize::try_from(state.written - self.pos).unwrap_or(usize::MAX);
                drop(state);
                let want = buf.len().min(available);
                let n = file.read_at(&mut buf[..want], self.pos)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the staged blob is shorter than its download wrote (removed or \
                         truncated by something else)",
                    ));
                }
                self.pos += n as u64;
                return Ok(n);
            }
            match state.end {
                Some(End::Verified) => return Ok(0),
                Some(End::Failed) => return Err(io::Error::other("its download failed")),
                None => {
                    state = self
                        .landing
                        .changed
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    /// A staging file as the download opens it: for writing and reading.
    fn staging_file(dir: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("blob.partial"))
            .unwrap()
    }

    #[test]
    fn a_reader_gets_the_bytes_as_they_land_and_ends_only_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = staging_file(dir.path());
        let landing = Landing::default();
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut got = Vec::new();
                landing.reader().read_to_end(&mut got).map(|_| got)
            });
            landing.open(&file, 0).unwrap();
            for (i, part) in [b"first ".as_slice(), b"second ", b"third"]
                .iter()
                .enumerate()
            {
                file.write_all(part).unwrap();
                landing.wrote(file.metadata().unwrap().len());
                std::thread::sleep(Duration::from_millis(20 * i as u64));
            }
            // Every byte is written, but the stream is not over until the digest is checked.
            std::thread::sleep(Duration::from_millis(50));
            assert!(!reader.is_finished());
            landing.verified();
            assert_eq!(reader.join().unwrap().unwrap(), b"first second third");
        });
    }

    #[test]
    fn a_blob_that_fails_verification_ends_its_reader_in_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = staging_file(dir.path());
        file.write_all(b"staged bytes").unwrap();
        let landing = Landing::default();
        landing.open(&file, 12).unwrap();
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut got = Vec::new();
                landing.reader().read_to_end(&mut got)
            });
            std::thread::sleep(Duration::from_millis(30));
            landing.abandon();
            let err = reader.join().unwrap().unwrap_err();
            assert!(err.to_string().contains("download failed"), "{err}");
        });
        // A verified blob is not un-verified by the download's final sweep.
        let landing = Landing::default();
        landing.open(&file, 12).unwrap();
        landing.verified();
        landing.abandon();
        let mut got = String::new();
        landing.reader().read_to_string(&mut got).unwrap();
        assert_eq!(got, "staged bytes");
    }

    #[test]
    fn a_download_never_started_ends_its_reader() {
        let landing = Landing::default();
        landing.abandon();
        assert!(landing.reader().read(&mut [0u8; 8]).is_err());
    }
}
