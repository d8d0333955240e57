//! The shared image store (`[store] dir`, on NFS or a parallel file system): SIFs converted
//! by one node, published by digest, copied by every other node instead of pulling and
//! converting again.
//!
//! Layout under `[store] dir` (root's, written by root on each node):
//!
//! ```text
//! images/<KEY>.sif        a published SIF (KEY as in the node cache: digest and repository)
//! images/<KEY>.sha256     its SHA-256, written before the SIF appears
//! leases/<KEY>.lease      "<expiry unix seconds> <node> <pid>": who converts KEY now
//! ```
//!
//! - Files appear by `rename` of a complete temporary file, which NFS makes atomic.
//! - A node copies a published SIF to its own cache while hashing it, and uses it only if
//!   the hash matches `<KEY>.sha256`; a mismatch is reported and the node builds itself.
//! - One node converts each image: the first to create the lease file (`O_EXCL`, which NFS
//!   v3+ honours, unlike `flock`). It renews the lease while it works; the others wait
//!   for the SIF to appear. A holder that dies (SIGKILL, node crash) stops renewing, and
//!   once its lease has expired the next node takes it over: nobody waits for ever.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::Digest as _;

use crate::{Error, Result};

/// How often a waiting node first looks for the SIF or an expired lease; the pause then
/// grows to MAX_POLL, so that a job's thousand nodes waiting on one conversion ask the
/// store's file server a few hundred times a second, not thousands.
const POLL: Duration = Duration::from_millis(500);
const MAX_POLL: Duration = Duration::from_secs(2);

pub struct Store {
    dir: PathBuf,
    lease: Duration,
}

/// What [`Store::acquire`] found.
pub enum Acquired {
    /// The published SIF, copied to the destination and verified.
    Copied,
    /// This node converts the image; publish it with [`Lease::publish`].
    Lease(Lease),
}

/// This node's claim to convert one image, renewed by a thread until dropped.
pub struct Lease {
    path: PathBuf,
    key: String,
    images: PathBuf,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Store {
    pub fn new(dir: &Path, lease: Duration) -> Result<Store> {
        for sub in ["images", "leases"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path)
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            lease,
        })
    }

    /// Copies the published SIF of `key` to `dest` (verified), or takes the lease to
    /// convert it; waits while another live node holds the lease.
    pub fn acquire(&self, key: &str, dest: &Path, mut note: impl FnMut(&str)) -> Result<Acquired> {
        let mut waited = false;
        let mut pauses = pauses(random_u64());
        loop {
            if self.copy_published(key, dest)? {
                return Ok(Acquired::Copied);
            }
            if let Some(lease) = self.try_lease(key)? {
                return Ok(Acquired::Lease(lease));
            }
            if !waited {
                note(&format!(
                    "another node is converting this image for the shared store; waiting for \
                     it (at most its lease of {} s once it stops renewing)",
                    self.lease.as_secs()
                ));
                waited = true;
            }
            std::thread::sleep(pauses.next().unwrap_or(MAX_POLL));
        }
    }

    fn sif(&self, key: &str) -> PathBuf {
        self.dir.join("images").join(format!("{key}.sif"))
    }

    /// Copies the published SIF to `dest` while hashing it; false when none is published,
    /// and when the copy does not match its recorded hash (reported).
    fn copy_published(&self, key: &str, dest: &Path) -> Result<bool> {
        let sif = self.sif(key);
        let Ok(mut input) = File::open(&sif) else {
            return Ok(false);
        };
        let hash_path = sif.with_extension("sha256");
        let want = fs::read_to_string(&hash_path)
            .map_err(|e| Error::io(format!("reading {}", hash_path.display()), e))?;
        let mut output =
            File::create(dest).map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
        let got = copy_hashing(&mut input, &mut output).map_err(|e| {
            Error::io(
                format!("copying {} to {}", sif.display(), dest.display()),
                e,
            )
        })?;
        if got != want.trim() {
            let _ = fs::remove_file(dest);
            super::warn(&format!(
                "{} does not match its hash in {} (sha256 {got}); building this image here \
                 instead: remove both files from the store",
                sif.display(),
                hash_path.display()
            ));
            return Ok(false);
        }
        output
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", dest.display()), e))?;
        Ok(true)
    }

    /// Takes the lease of `key` when nobody holds it or its holder's has expired.
    fn try_lease(&self, key: &str) -> Result<Option<Lease>> {
        let path = self.dir.join("leases").join(format!("{key}.lease"));
        let io = |e| Error::io(format!("taking the store lease {}", path.display()), e);
        match File::options().write(true).create_new(true).open(&path) {
            Ok(mut file) => {
                file.write_all(self.lease_text().as_bytes()).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let expiry = fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok());
                // No expiry yet: the holder created the file and has not written it (seen
                // with 64 nodes at once: the next reader took it for dead, and two nodes
                // converted). Such a file is live for one lease from its creation.
                let expired = match expiry {
                    Some(expiry) => expiry < now(),
                    None => fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .map_or(true, |written| {
                            written.elapsed().unwrap_or_default() > self.lease
                        }),
                };
                if !expired {
                    return Ok(None);
                }
                // A dead holder's lease: replace it by rename, then check that this node's
                // is the one that stuck (two nodes may replace it at once; one wins).
                let mine = self.lease_text();
                write_atomically(&path, mine.as_bytes()).map_err(io)?;
                std::thread::sleep(POLL / 5);
                if fs::read_to_string(&path).ok().as_deref() != Some(mine.as_str()) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(io(e)),
        }
        let stop = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (path, stop, lease) = (path.clone(), stop.clone(), self.lease);
            std::thread::spawn(move || {
                let step = (lease / 3).max(Duration::from_millis(100));
                let mut slept = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    slept += Duration::from_millis(50);
                    if slept >= step {
                        slept = Duration::ZERO;
                        let _ = write_atomically(&path, lease_text(lease).as_bytes());
                    }
                }
            })
        };
        Ok(Some(Lease {
            path,
            key: key.to_owned(),
            images: self.dir.join("images"),
            stop,
            renewer: Some(renewer),
        }))
    }

    fn lease_text(&self) -> String {
        lease_text(self.lease)
    }
}

impl Lease {
    /// Publishes the node's converted `sif`: its hash first, then the SIF, each by rename.
    pub fn publish(self, sif: &Path) -> Result<()> {
        let dest = self.images.join(format!("{}.sif", self.key));
        let tmp = self.images.join(format!(
            ".{}.{}-{}",
            self.key,
            crate::slurm::node_name(),
            std::process::id()
        ));
        let io = |e| Error::io(format!("publishing {} to the store", dest.display()), e);
        let hash = (|| {
            let mut input = File::open(sif)?;
            let mut output = File::create(&tmp)?;
            let hash = copy_hashing(&mut input, &mut output)?;
            output.sync_all()?;
            Ok(hash)
        })();
        let hash = match hash {
            Ok(hash) => hash,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io(e));
            }
        };
        write_atomically(&dest.with_extension("sha256"), hash.as_bytes()).map_err(io)?;
        fs::rename(&tmp, &dest).map_err(io)?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

fn copy_hashing(input: &mut File, output: &mut File) -> std::io::Result<String> {
    let mut hasher = sha2::Sha256::new();
    crate::pieces::for_each(input, |piece| {
        hasher.update(piece);
        output.write_all(piece)
    })?;
    Ok(hex::encode(hasher.finalize()))
}

/// The pauses of a waiting node: from POLL growing by half each time to MAX_POLL, each
/// shortened by up to a fifth (from `seed`), so nodes that started waiting together do not
/// ask together.
fn pauses(mut seed: u64) -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(POLL), |p| Some((*p * 3 / 2).min(MAX_POLL))).map(move |p| {
        // xorshift: cheap, and any spread will do.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        p - p / 5 * (seed % 1000) as u32 / 1000
    })
}

/// A random number from the standard library's per-process hash keys.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.finish() | 1
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.{}-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        crate::slurm::node_name(),
        std::process::id()
    ));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

fn lease_text(lease: Duration) -> String {
    format!(
        "{} {} {}",
        now() + lease.as_secs().max(1),
        crate::slurm::node_name(),
        std::process::id()
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn waiting_nodes_back_off_to_two_seconds_and_spread_out() {
        let a: Vec<Duration> = pauses(1).take(12).collect();
        let b: Vec<Duration> = pauses(random_u64()).take(12).collect();
        let nominal = [500, 750, 1125, 1688, 2000, 2000];
        for (i, ms) in nominal.iter().enumerate() {
            let ms = Duration::from_millis(*ms);
            assert!(a[i] <= ms && a[i] >= ms - ms / 5, "{i}: {:?}", a[i]);
        }
        assert!(a
            .iter()
            .chain(&b)
            .all(|p| *p <= MAX_POLL && *p >= POLL * 4 / 5));
        assert_ne!(a, b, "two nodes wait in step");
    }

    #[test]
    fn a_lease_being_written_is_not_taken_for_a_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("store"), Duration::from_secs(30)).unwrap();
        // The holder has created its lease file but not written its expiry yet.
        fs::write(dir.path().join("store/leases/k.lease"), b"").unwrap();
        assert!(store.try_lease("k").unwrap().is_none());
        // One that stayed empty for a whole lease is a dead holder's.
        let short = Store::new(&dir.path().join("store"), Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(short.try_lease("k").unwrap().is_some());
    }

    #[test]
    fn the_first_node_converts_and_publishes_the_second_copies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("store"), Duration::from_secs(30)).unwrap();
        let (node_a, node_b) = (dir.path().join("a.sif"), dir.path().join("b.sif"));
        let Acquired::Lease(lease) = store.acquire("k", &node_a, |_| {}).unwrap() else {
            panic!("the first node should convert");
        };
        fs::write(&node_a, b"sif bytes").unwrap();
        lease.publish(&node_a).unwrap();
        assert!(matches!(
            store.acquire("k", &node_b, |_| {}).unwrap(),
            Acquired::Copied
        ));
        assert_eq!(fs::read(&node_b).unwrap(), b"sif bytes");
        // The lease is gone with its holder.
        assert!(!dir.path().join("store/leases/k.lease").exists());
    }

    #[test]
    fn a_corrupt_published_sif_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Duration::from_secs(30)).unwrap();
        fs::write(dir.path().join("images/k.sif"), b"tampered").unwrap();
        fs::write(dir.path().join("images/k.sha256"), "00").unwrap();
        let dest = dir.path().join("copy.sif");
        assert!(matches!(
            store.acquire("k", &dest, |_| {}).unwrap(),
            Acquired::Lease(_)
        ));
        assert!(!dest.exists());
    }

    #[test]
    fn a_dead_holder_blocks_no_longer_than_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let lease = Duration::from_secs(2);
        let store = Store::new(dir.path(), lease).unwrap();
        // The lease of a holder killed right after taking it: nothing renews it.
        fs::write(
            dir.path().join("leases/k.lease"),
            format!("{} deadnode 1", now() + lease.as_secs()),
        )
        .unwrap();
        let started = Instant::now();
        let mut notes = Vec::new();
        let got = store
            .acquire("k", &dir.path().join("x.sif"), |n| notes.push(n.to_owned()))
            .unwrap();
        assert!(matches!(got, Acquired::Lease(_)));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(1), "{waited:?}");
        assert!(waited < lease + Duration::from_secs(3), "{waited:?}");
        assert!(notes[0].contains("waiting"), "{notes:?}");
    }

    #[test]
    fn a_live_holder_renews_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Duration::from_secs(1)).unwrap();
        let Some(lease) = store.try_lease("k").unwrap() else {
            panic!("free lease not taken")
        };
        std::thread::sleep(Duration::from_millis(2500));
        // Past the first expiry, still held: renewed.
        assert!(store.try_lease("k").unwrap().is_none());
        drop(lease);
        assert!(store.try_lease("k").unwrap().is_some());
    }
}
