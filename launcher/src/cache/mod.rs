//! The node image cache: registry images converted to SIF files, keyed by manifest digest.
//!
//! Layout under `[cache] dir`:
//!
//! ```text
//! images/<manifest-hex>.sif   complete images only (0755 dir, 0644 files)
//! locks/<manifest-hex>.lock   one build lock per image (0700; never deleted, see below)
//! tmp/<manifest-hex>/         staging for a build: verified blobs, rootfs, image.sif (0700)
//! ```
//!
//! - Written only by its owner, root or a service identity; berth refuses a cache directory
//!   owned by anyone else or writable by group/others.
//! - An image appears by `rename` of a synced SIF from `tmp/` into `images/`, then the
//!   directory is synced, so a `kill -9` at any moment leaves either no entry or a complete
//!   one. Leftover staging dirs are removed by the next fetch that can take their lock.
//! - Concurrent fetches of one image serialise on its lock: the first downloads and builds,
//!   the others wait and return the same path, so each blob is downloaded once per node.
//!   Lock files are never deleted: unlinking a lock file another process is waiting on would
//!   let two builders run at once.
//! - Blobs are not kept after conversion: the SIF holds the same data, so keeping them would
//!   double the disk used, while re-downloading shared layers on a tag update costs seconds
//!   next to the conversion (see docs in ARCHITECTURE's measurements: pull 1.1 s vs convert
//!   5-17 s for 300 MB). Staged blobs survive a crashed build of the same image, so a retry
//!   downloads only what is missing.
//! - Least recently used images are evicted above `max_size` after each build. A SIF's mtime
//!   is its last use (set on every fetch hit). Images in use are skipped: runners hold a
//!   shared `flock` on the SIF (see [`open_for_run`]) and eviction takes it exclusively
//!   without waiting.

mod size;

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{CacheConfig, Config};
use crate::policy::{ImageRequest, Policy, Verdict};
use crate::reference::{Digest, Reference};
use crate::registry::manifest::parse_image_config;
use crate::registry::progress::{self, Progress};
use crate::registry::{Client, ClientOptions, ResolvedImage};
use crate::unpack::{self, Compression};
use crate::{sif, Error, Result};

pub use size::{format_size, parse_size};

/// How `fetch_with` reports.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// No progress lines on stderr.
    pub quiet: bool,
}

/// Fetches `image` (a registry reference the site policy allows) into the node cache and
/// returns the path of its SIF. Progress goes to stderr. A digest-pinned reference that is
/// already cached needs no network at all.
pub fn fetch(config: &Config, image: &str) -> Result<PathBuf> {
    fetch_with(config, image, &FetchOptions::default())
}

pub fn fetch_with(config: &Config, image: &str, options: &FetchOptions) -> Result<PathBuf> {
    let policy = Policy::new(&config.policy);
    // The policy decides before anything touches the network or the cache.
    let reference = approved_reference(&policy, image)?;
    let cache = Cache::open(&config.cache)?;
    if let Some(digest) = &reference.digest {
        if let Some(path) = cache.hit(digest)? {
            return Ok(path);
        }
    }
    let redirect_allowed = |host: &str| policy.allows_host(host);
    let mut client = client_for(
        config,
        &policy,
        &reference,
        &redirect_allowed,
        options.quiet,
    )?;
    let resolved = client.resolve(&reference)?;
    if let Some(path) = cache.hit(&resolved.manifest_digest)? {
        return Ok(path);
    }
    cache.require_writable(&reference)?;
    cache.build(&mut client, &reference, &resolved, options)
}

/// Resolves `image` to its digest-pinned reference (`host/repo@sha256:...`): the digest of
/// what the tag points to now, an image index for multi-platform images, so every node of
/// a job runs the same bytes for its own platform even if the tag moves meanwhile.
pub fn resolve(config: &Config, image: &str) -> Result<Reference> {
    let policy = Policy::new(&config.policy);
    let reference = approved_reference(&policy, image)?;
    let redirect_allowed = |host: &str| policy.allows_host(host);
    let mut client = client_for(config, &policy, &reference, &redirect_allowed, true)?;
    let fetched = client.manifest(&reference.repository, &reference)?;
    Ok(Reference {
        tag: None,
        ..reference.pinned(fetched.digest)
    })
}

/// A registry client for `reference` under the site policy: plain HTTP only where the
/// policy allows it, redirects only to approved hosts.
fn client_for<'a>(
    config: &Config,
    policy: &Policy,
    reference: &Reference,
    redirect_allowed: &'a dyn Fn(&str) -> bool,
    quiet: bool,
) -> Result<Client<'a>> {
    Client::new(
        &config.registry,
        &reference.registry,
        ClientOptions {
            plain_http: policy.allows_plain_http(&reference.registry),
            redirect_allowed,
            quiet,
        },
    )
}

fn approved_reference(policy: &Policy, image: &str) -> Result<Reference> {
    let (request, verdict) = policy.check(image)?;
    if let Verdict::Deny { reason } = verdict {
        return Err(Error::FetchDenied { reason });
    }
    match request {
        ImageRequest::Registry(reference) => Ok(reference),
        ImageRequest::LocalFile(path) => Err(Error::FetchDenied {
            reason: format!(
                "{} is a local image file, not a registry reference; berth fetch only pulls \
                 from registries (run the file directly with `berth exec {}`)",
                path.display(),
                path.display()
            ),
        }),
    }
}

/// Opens a cached SIF for running and holds a shared lock on it for as long as the returned
/// `File` lives, so eviction leaves it alone.
pub fn open_for_run(path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    file.lock_shared()
        .map_err(|e| Error::io(format!("locking {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if meta.nlink() == 0 {
        return Err(cache_error(
            path,
            "the image was evicted while being opened; fetch it again".into(),
        ));
    }
    Ok(file)
}

/// An image ready for `berth exec` / `berth start`: a local file as given, or a registry
/// image fetched into the node cache and held under a shared lock (see [`open_for_run`]) for
/// as long as this value lives, so eviction never removes an image a container runs from.
pub struct RunnableImage {
    pub path: PathBuf,
    _lock: Option<File>,
}

/// Finds or fetches `image` for running. Local files are the caller's own business here: the
/// site policy on local files is enforced where jobs are launched (the SPANK plugin runs
/// `berth policy check` on the node), while registry references always pass the policy in
/// [`fetch`].
pub fn runnable(config: &Config, image: &str) -> Result<RunnableImage> {
    let local = crate::policy::local_path(image).map_err(|reason| Error::InvalidReference {
        image: crate::reference::shown(image),
        reason,
    })?;
    if let Some(path) = local {
        return Ok(RunnableImage {
            path: path.to_path_buf(),
            _lock: None,
        });
    }
    let path = fetch(config, image)?;
    let lock = open_for_run(&path)?;
    Ok(RunnableImage {
        path,
        _lock: Some(lock),
    })
}

/// One cached image, for `berth images`.
#[derive(Debug, Clone)]
pub struct CachedImage {
    pub digest: Digest,
    pub path: PathBuf,
    pub size: u64,
    pub last_used: SystemTime,
}

pub struct Cache {
    dir: PathBuf,
    max_size: u64,
    /// The caller owns the cache (root or the service identity) and may write it.
    writable: bool,
}

impl Cache {
    /// Opens the cache, creating it when the caller may. Refuses a directory that someone
    /// other than root or the caller owns, or that group or others can write: berth would
    /// otherwise run images a user planted.
    pub fn open(config: &CacheConfig) -> Result<Cache> {
        let max_size = parse_size(&config.max_size)?;
        let dir = config.dir.clone();
        let euid = berth_sys::identity::effective_uid();
        if !dir.exists() && euid == 0 {
            make_dir(&dir, 0o755)?;
        }
        let writable = match fs::symlink_metadata(&dir) {
            Ok(meta) => {
                if !meta.is_dir() {
                    return Err(cache_error(
                        &dir,
                        "not a directory (fix [cache] dir)".into(),
                    ));
                }
                if meta.uid() != 0 && meta.uid() != euid {
                    return Err(cache_error(
                        &dir,
                        format!(
                            "owned by uid {}; berth uses only a cache owned by root or the \
                             identity running it (fix: chown root:root, chmod 755)",
                            meta.uid()
                        ),
                    ));
                }
                if meta.mode() & 0o022 != 0 {
                    return Err(cache_error(
                        &dir,
                        format!(
                            "mode {:o} lets other users plant images (fix: chmod 755)",
                            meta.mode() & 0o7777
                        ),
                    ));
                }
                meta.uid() == euid
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        let cache = Cache {
            dir,
            max_size,
            writable,
        };
        if writable {
            make_dir(&cache.images_dir(), 0o755)?;
            make_dir(&cache.dir.join("locks"), 0o700)?;
            make_dir(&cache.dir.join("tmp"), 0o700)?;
        }
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    fn images_dir(&self) -> PathBuf {
        self.dir.join("images")
    }

    /// Where the image with this manifest digest lives (whether or not it is there).
    pub fn image_path(&self, digest: &Digest) -> PathBuf {
        self.images_dir().join(format!("{}.sif", digest.hex()))
    }

    /// The cached SIF for `digest`, marked as just used.
    pub fn hit(&self, digest: &Digest) -> Result<Option<PathBuf>> {
        let path = self.image_path(digest);
        match File::open(&path) {
            Ok(file) => {
                if self.writable {
                    file.set_modified(SystemTime::now())
                        .map_err(|e| Error::io(format!("marking {} used", path.display()), e))?;
                }
                Ok(Some(path))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
        }
    }

    fn require_writable(&self, reference: &Reference) -> Result<()> {
        if self.writable {
            return Ok(());
        }
        Err(cache_error(
            &self.dir,
            format!(
                "{reference} is not cached on this node, and berth fetch writes the node cache \
                 and runs as root (Slurm does this for jobs); run the image through a Slurm \
                 job, or ask an admin to run `berth fetch {reference}` on this node"
            ),
        ))
    }

    /// Downloads, verifies, unpacks and converts one image under its lock, then publishes it.
    fn build(
        &self,
        client: &mut Client<'_>,
        reference: &Reference,
        resolved: &ResolvedImage,
        options: &FetchOptions,
    ) -> Result<PathBuf> {
        let digest = &resolved.manifest_digest;
        let pinned = reference.pinned(digest.clone());
        let key = digest.hex();
        let _lock = self.lock_image(key, &pinned, options.quiet)?;
        // Another fetch may have built it while this one waited.
        if let Some(path) = self.hit(digest)? {
            return Ok(path);
        }
        self.clean_stale(key)?;

        let manifest = &resolved.manifest;
        let layers = manifest
            .layers
            .iter()
            .map(|l| {
                let compression =
                    Compression::from_media_type(&l.media_type).ok_or_else(|| Error::Manifest {
                        reference: pinned.to_string(),
                        message: format!(
                            "layer {} has media type {:?}, which berth cannot unpack",
                            l.digest, l.media_type
                        ),
                    })?;
                Ok((l, l.digest()?, compression))
            })
            .collect::<Result<Vec<_>>>()?;

        let staging = self.dir.join("tmp").join(key);
        let blobs = staging.join("blobs");
        let rootfs = staging.join("rootfs");
        make_dir(&staging, 0o700)?;
        make_dir(&blobs, 0o700)?;
        remove_tree(&rootfs)?;
        make_dir(&rootfs, 0o755)?;

        let config_bytes = client.small_blob(&reference.repository, &manifest.config)?;
        let mut image_config = parse_image_config(&pinned.to_string(), &config_bytes)?;
        image_config.manifest_digest = digest.to_string();
        image_config.source = reference.to_string();

        let total: u64 = layers.iter().map(|(l, _, _)| l.size).sum();
        let mut pull = Progress::new(format!("pulling {pinned}"), total, options.quiet);
        for (layer, layer_digest, _) in &layers {
            let dest = blobs.join(layer_digest.hex());
            if dest.exists() {
                pull.add(layer.size);
            } else {
                client.download_blob(&reference.repository, layer, &dest, &mut pull)?;
            }
        }
        pull.finish();

        let mut unpacking = Progress::new(format!("unpacking {pinned}"), total, options.quiet);
        for (_, layer_digest, compression) in &layers {
            let path = blobs.join(layer_digest.hex());
            let file = File::open(&path)
                .map_err(|e| Error::io(format!("opening blob {}", path.display()), e))?;
            let counted = Counted {
                inner: BufReader::with_capacity(256 << 10, file),
                progress: &mut unpacking,
            };
            unpack::apply_layer(&rootfs, counted, *compression, &layer_digest.to_string())?;
        }
        unpacking.finish();

        progress::note(options.quiet, &format!("building squashfs for {pinned}"));
        let staged_sif = staging.join("image.sif");
        sif::create_from_dir(&staged_sif, &rootfs, &image_config)?;
        let path = self.image_path(digest);
        fs::rename(&staged_sif, &path)
            .map_err(|e| Error::io(format!("publishing {}", path.display()), e))?;
        sync_dir(&self.images_dir())?;
        remove_tree(&staging)?;
        drop(_lock);

        self.evict_to(self.max_size, Some(digest))?;
        Ok(path)
    }

    /// Takes the image's build lock, saying so on stderr when another fetch holds it.
    fn lock_image(&self, key: &str, pinned: &Reference, quiet: bool) -> Result<File> {
        let path = self.dir.join("locks").join(format!("{key}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening lock {}", path.display()), e))?;
        if file.try_lock().is_err() {
            progress::note(
                quiet,
                &format!("waiting for another berth fetch of {pinned} on this node"),
            );
            file.lock()
                .map_err(|e| Error::io(format!("locking {}", path.display()), e))?;
        }
        Ok(file)
    }

    /// Removes staging left by killed fetches: any `tmp/` entry whose image lock is free.
    /// `own` is the image this process is building (its lock is held, its staging reused).
    fn clean_stale(&self, own: &str) -> Result<()> {
        let tmp = self.dir.join("tmp");
        let entries =
            fs::read_dir(&tmp).map_err(|e| Error::io(format!("listing {}", tmp.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", tmp.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == own {
                continue;
            }
            let lock = self.dir.join("locks").join(format!("{name}.lock"));
            let free = match File::open(&lock) {
                Ok(f) => f.try_lock().is_ok(),
                Err(_) => true,
            };
            if free {
                remove_tree(&entry.path())?;
            }
        }
        Ok(())
    }

    /// The complete images in the cache, least recently used first.
    pub fn list(&self) -> Result<Vec<CachedImage>> {
        let dir = self.images_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let mut images = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".sif") else {
                continue;
            };
            let algorithm = if hex.len() == 128 { "sha512" } else { "sha256" };
            let Ok(digest) = Digest::parse(&format!("{algorithm}:{hex}")) else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Evicted by another process while listing.
                Err(_) => continue,
            };
            images.push(CachedImage {
                digest,
                path: entry.path(),
                size: meta.len(),
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        images.sort_by_key(|i| i.last_used);
        Ok(images)
    }

    /// Evicts least recently used images until the total is at most `max`, never `keep` and
    /// never an image a runner holds open. Returns what was evicted.
    pub fn evict_to(&self, max: u64, keep: Option<&Digest>) -> Result<Vec<CachedImage>> {
        if !self.writable {
            return Err(cache_error(
                &self.dir,
                "evicting images needs the cache's owner (root); run berth prune as root".into(),
            ));
        }
        let images = self.list()?;
        let mut total: u64 = images.iter().map(|i| i.size).sum();
        let mut evicted = Vec::new();
        for image in images {
            if total <= max {
                break;
            }
            if Some(&image.digest) == keep {
                continue;
            }
            let Ok(file) = File::open(&image.path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue;
            }
            fs::remove_file(&image.path)
                .map_err(|e| Error::io(format!("evicting {}", image.path.display()), e))?;
            total -= image.size;
            evicted.push(image);
        }
        Ok(evicted)
    }
}

/// Counts the compressed bytes a layer reader consumes, for the unpack progress line.
struct Counted<'a, R> {
    inner: R,
    progress: &'a mut Progress,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(cache_error(
            path,
            "cannot create it: berth fetch writes the node cache and runs as root (Slurm \
             does this for jobs); run it as root or as the cache's service identity"
                .into(),
        )),
        Err(e) => Err(Error::io(format!("creating {}", path.display()), e)),
    }
}

/// Removes a staging tree. Image directories may be read-only (mode 0555), which stops an
/// unprivileged owner from deleting their contents, so directories are opened up first.
fn remove_tree(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
    };
    if meta.is_dir() {
        if meta.mode() & 0o700 != 0o700 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        }
        let entries =
            fs::read_dir(path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
            remove_tree(&entry.path())?;
        }
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    }
    .map_err(|e| Error::io(format!("removing {}", path.display()), e))
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
}

fn cache_error(path: &Path, message: String) -> Error {
    Error::Cache {
        path: path.to_path_buf(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max: &str) -> CacheConfig {
        CacheConfig {
            dir: dir.to_path_buf(),
            max_size: max.into(),
        }
    }

    fn digest(n: u8) -> Digest {
        Digest::compute(crate::reference::DigestAlgorithm::Sha256, &[n])
    }

    fn put(cache: &Cache, n: u8, size: usize, age_secs: u64) -> PathBuf {
        let path = cache.image_path(&digest(n));
        fs::write(&path, vec![0u8; size]).unwrap();
        let when = SystemTime::now() - std::time::Duration::from_secs(age_secs);
        File::open(&path).unwrap().set_modified(when).unwrap();
        path
    }

    #[test]
    fn evicts_least_recently_used_but_not_images_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(dir.path(), "10K")).unwrap();
        let oldest = put(&cache, 1, 4000, 300);
        let in_use = put(&cache, 2, 4000, 200);
        let newer = put(&cache, 3, 4000, 100);
        let newest = put(&cache, 4, 4000, 0);
        let _running = open_for_run(&in_use).unwrap();
        // A hit makes `oldest` the most recently used.
        assert_eq!(cache.hit(&digest(1)).unwrap(), Some(oldest.clone()));
        let evicted = cache.evict_to(cache.max_size(), Some(&digest(4))).unwrap();
        let evicted: Vec<_> = evicted.into_iter().map(|i| i.digest).collect();
        assert_eq!(evicted, vec![digest(3), digest(1)]);
        assert!(in_use.exists() && newest.exists() && !newer.exists() && !oldest.exists());
        assert_eq!(cache.list().unwrap().len(), 2);
    }

    #[test]
    fn refuses_a_cache_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = Cache::open(&config(dir.path(), "1G"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chmod 755"), "{err}");
    }

    #[test]
    fn cleans_stale_staging_whose_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(dir.path(), "1G")).unwrap();
        let stale = dir.path().join("tmp/aaaa/rootfs/ro");
        fs::create_dir_all(&stale).unwrap();
        fs::set_permissions(&stale, fs::Permissions::from_mode(0o555)).unwrap();
        let busy = dir.path().join("tmp/bbbb");
        fs::create_dir_all(&busy).unwrap();
        let reference = Reference::parse("localhost:5000/x:y").unwrap();
        let _held = cache.lock_image("bbbb", &reference, true).unwrap();
        cache.clean_stale("cccc").unwrap();
        assert!(!dir.path().join("tmp/aaaa").exists());
        assert!(busy.exists());
    }
}
