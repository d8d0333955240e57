//! The node image cache: registry images converted to SIF files, keyed by repository and
//! manifest digest.
//!
//! Layout under `[cache] dir` (`REPO` is the first 32 hex digits of the SHA-256 of
//! `registry/repository`):
//!
//! ```text
//! images/<manifest-hex>-<REPO>.sif  complete images only (0755 dir, 0644 files)
//! index/<index-hex>-<REPO>          symlink to the image this node runs for a multi-platform
//!                                   index digest (0755 dir)
//! locks/<manifest-hex>-<REPO>.lock  one build lock per image (0700; never deleted, see below)
//! tmp/<manifest-hex>-<REPO>/        staging for a build: verified blobs, rootfs, image.sif
//!                                   (0700)
//! ```
//!
//! - Written only by its owner, root or a service identity; berth refuses a cache directory,
//!   or any of the four above, owned by anyone else or writable by group/others.
//! - Keyed by repository as well as digest: a hit needs the repository the request names,
//!   which the policy has just approved, so `allowed/repo@sha256:D` never runs an image D
//!   that was pulled through another repository (one the policy may since have dropped).
//!   The same bytes pulled through two repositories are stored twice; that is rare.
//! - A reference pinned to an index digest (what `berth resolve` prints for multi-platform
//!   images) hits through `index/`, so `berth start` as the user needs no network either.
//! - An image appears by `rename` of a synced SIF from `tmp/` into `images/`, then the
//!   directory is synced, so a `kill -9` at any moment leaves either no entry or a complete
//!   one. Leftover staging dirs are removed by the next build that can take their lock, best
//!   effort: a leftover that cannot be removed is reported and never fails another build.
//! - Concurrent fetches of one image serialise on its lock: the first downloads and builds,
//!   the others wait and return the same path, so each blob is downloaded once per node.
//!   Lock files are never deleted: unlinking a lock file another process is waiting on would
//!   let two builders run at once.
//! - Blobs are not kept after conversion: the SIF holds the same data, so keeping them would
//!   double the disk used, while re-downloading shared layers on a tag update costs seconds
//!   next to the conversion (see docs in ARCHITECTURE's measurements: pull 1.1 s vs convert
//!   5-17 s for 300 MB). Staged blobs survive a crashed build of the same image, so a retry
//!   downloads only what is missing.
//! - What root builds is bounded (`[cache] max_image_size`, `max_entries`, path limits; see
//!   `unpack`), and a build starts only with room for it on the file system, evicting
//!   unused images first.
//! - Least recently used images are evicted above `max_size` after each build. A SIF's mtime
//!   is its last use (set on every fetch hit). Runners hold a shared `flock` on the SIF (see
//!   [`open_for_run`]); eviction takes idle images first and then, if the cache is still too
//!   big, images in use too. Any user can lock a 0644 SIF, so locks only order eviction and
//!   never stop it; unlinking an open SIF leaves it readable by the squashfuse holding it.

mod cgroup;
mod owner;
mod size;
pub mod store;

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use sha2::Digest as _;

use crate::config::{CacheConfig, Config, StoreConfig};
use crate::image_config::ImageConfig;
use crate::policy::FsUser;
use crate::policy::{ImageRequest, Policy, Verdict};
use crate::reference::{Digest, Reference};
use crate::registry::manifest::{parse_image_config, Descriptor};
use crate::registry::progress::{self, Progress};
use crate::registry::{
    access, mirrors, BlobJob, Client, ClientOptions, Endpoint, Logins, ResolvedImage,
};
use crate::unpack::{self, Budget, Compression, Limits};
use crate::{sif, squash, Error, Result};

pub use cgroup::BuildCgroup;
pub use owner::{doctor as doctor_owner, Owner, Sealed};
pub use size::{format_size, parse_size};

/// Free space a build needs, as a multiple of the image's compressed size: the staged
/// layers and the SIF (lz4 squashfs, typically 1-2 times the gzip size; nothing is unpacked
/// on disk; the spill files of layers read in parallel hold part of the SIF until it is
/// copied into it). An estimate: it refuses early what cannot fit, and a build that still
/// runs out fails cleanly.
const SPACE_FACTOR: u64 = 3;

/// How `fetch_with` reports, and for whom it fetches.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// No progress lines on stderr.
    pub quiet: bool,
    /// The job user root fetches for (`--as-user`); None: the caller. Their own login may
    /// pull what the site has no credentials for, and a cached image another user's login
    /// pulled is served to them only with the registry's word (`registry::access`).
    pub user: Option<FsUser>,
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
    // Read here, as the caller: the cache's service user could read neither the site's
    // credentials nor a job user's login.
    let logins = Logins::read(&config.registry, options.user.as_ref())?;
    let fetch = || fetch_approved(config, &policy, &reference, options, &logins);
    match service_owner(config)? {
        // Root with a service user: the registry and the image's bytes are the owner's to
        // handle (see `owner`).
        Some(owner) => owner::fetch_as(&owner, &config.cache, fetch),
        None => fetch(),
    }
}

/// The cache's service user where root hands it the registry and the image's bytes; `None`
/// where the caller does that itself (root owning the cache, or an ordinary user, whose node
/// or container need not know the service user).
fn service_owner(config: &Config) -> Result<Option<Owner>> {
    if berth_sys::identity::effective_uid() != 0 {
        return Ok(None);
    }
    let owner = Owner::of(&config.cache)?;
    Ok(Some(owner).filter(|o| !o.is_root()))
}

/// [`fetch_with`] of a reference the policy approved, as the caller.
fn fetch_approved(
    config: &Config,
    policy: &Policy,
    reference: &Reference,
    options: &FetchOptions,
    logins: &Logins,
) -> Result<PathBuf> {
    let cache = Cache::open(&config.cache)?.with_store(&config.store);
    let repo = RepoKey::of(reference);
    if let Some(digest) = &reference.digest {
        if let Some(path) = cache.hit(&repo, digest)? {
            check_access(
                config,
                policy,
                reference,
                (cache.dir(), &path),
                options,
                logins,
            )?;
            return Ok(path);
        }
    }
    // Resolved with the requester's credentials: a hit after it needs no other check.
    let (client, resolved) = connect(config, policy, reference, options, logins, |client| {
        client.resolve(reference)
    })?;
    let path = match cache.hit(&repo, &resolved.manifest_digest)? {
        Some(path) => path,
        None => {
            cache.require_writable(reference)?;
            let sif = cache.image_path(&repo, &resolved.manifest_digest);
            access::record(cache.dir(), &sif, client.puller())
                .and_then(|()| cache.build(&client, reference, &repo, &resolved, options))
                .map_err(|e| cache.read_only(e, reference))?
        }
    };
    cache.record_index(&repo, &resolved)?;
    Ok(path)
}

/// Resolves `image` to its digest-pinned reference (`host/repo@sha256:...`): the digest of
/// what the tag points to now, an image index for multi-platform images, so every node of
/// a job runs the same bytes for its own platform even if the tag moves meanwhile.
///
/// A reference that names a digest is its own pin: it is printed without asking the
/// registry, so a job can name a private image by digest where the submitting user has no
/// credentials (the nodes pull it with the site's and verify it against the digest).
pub fn resolve(config: &Config, image: &str) -> Result<Reference> {
    let policy = Policy::new(&config.policy);
    let reference = approved_reference(&policy, image)?;
    if reference.digest.is_some() {
        return Ok(Reference {
            tag: None,
            ..reference
        });
    }
    let logins = Logins::read(&config.registry, None)?;
    let Some(owner) = service_owner(config)? else {
        return resolve_approved(config, &policy, &reference, &logins);
    };
    // Root with a service user: the registry's answers are the owner's to parse.
    let pinned = owner::run_as(&owner, &config.cache, || {
        resolve_approved(config, &policy, &reference, &logins).map(|r| r.to_string())
    })?;
    Reference::parse(&pinned)
}

/// [`resolve`] of a reference the policy approved that names no digest, as the caller.
fn resolve_approved(
    config: &Config,
    policy: &Policy,
    reference: &Reference,
    logins: &Logins,
) -> Result<Reference> {
    let quiet = FetchOptions {
        quiet: true,
        user: None,
    };
    let (_, fetched) = connect(config, policy, reference, &quiet, logins, |client| {
        client.manifest(&reference.repository, reference)
    })?;
    Ok(Reference {
        tag: None,
        ..reference.clone().pinned(fetched.digest)
    })
}

/// A registry client for `reference` from the first of its endpoints (mirrors, then the
/// registry where allowed) for which `first` succeeds, with `first`'s answer. The policy has
/// judged the reference as written; plain HTTP is used only to hosts the policy approves.
fn connect<T>(
    config: &Config,
    policy: &Policy,
    reference: &Reference,
    fetch: &FetchOptions,
    logins: &Logins,
    first: impl FnMut(&Client) -> Result<T>,
) -> Result<(Client, T)> {
    let options = |endpoint: &Endpoint| ClientOptions {
        plain_http: policy.allows_plain_http(&endpoint.host),
        quiet: fetch.quiet,
        logins: logins.clone(),
    };
    mirrors::first_answering(&config.registry, &reference.registry, options, first)
}

/// Serves the cached `sif` of `reference` (named by digest) to the requester only where the
/// site's credentials or the requester's own login pulled it, or the registry confirms the
/// requester's access: the manifest by digest, asked with their credentials.
fn check_access(
    config: &Config,
    policy: &Policy,
    reference: &Reference,
    (cache_dir, sif): (&Path, &Path),
    options: &FetchOptions,
    logins: &Logins,
) -> Result<()> {
    let requester = options
        .user
        .as_ref()
        .map_or_else(berth_sys::identity::effective_uid, |u| u.uid);
    if access::served_without_asking(access::puller(cache_dir, sif)?, requester) {
        return Ok(());
    }
    match connect(config, policy, reference, options, logins, |client| {
        client.manifest(&reference.repository, reference)
    }) {
        Ok(_) => Ok(()),
        Err(e @ (Error::Unauthorized { .. } | Error::ImageNotFound { .. })) => {
            Err(Error::NoAccess {
                reference: reference.to_string(),
                detail: e.to_string(),
            })
        }
        Err(e) => Err(e),
    }
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
/// `File` lives, so eviction takes other images first.
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
/// as long as this value lives, so eviction prefers other images.
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
    if !Owner::of(&config.cache)?.is_root() {
        // Checked again on what is now open: the owner could have swapped the name since.
        Sealed::check(&lock, &path)?;
    }
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

/// The repository part of cache names: 32 hex digits of the SHA-256 of
/// `registry/repository`, so names stay short and need no escaping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoKey(String);

impl RepoKey {
    pub fn of(reference: &Reference) -> RepoKey {
        let full = format!("{}/{}", reference.registry, reference.repository);
        RepoKey(hex::encode(sha2::Sha256::digest(full.as_bytes()))[..32].to_string())
    }

    /// The cache name of `digest` in this repository: `<hex>-<repo key>`.
    fn name(&self, digest: &Digest) -> String {
        format!("{}-{}", digest.hex(), self.0)
    }
}

/// The manifest digest a cached image's file is named by: `<hex>-<repo key>.sif`, or
/// `<hex>.sif` as older berth versions wrote it; None for any other file.
pub fn digest_of_name(file_name: &str) -> Option<Digest> {
    let stem = file_name.strip_suffix(".sif")?;
    let hex = stem.split_once('-').map_or(stem, |(hex, _)| hex);
    let algorithm = if hex.len() == 128 { "sha512" } else { "sha256" };
    Digest::parse(&format!("{algorithm}:{hex}")).ok()
}

/// The subdirectories of the cache, with the mode berth creates them with.
const SUBDIRS: [(&str, u32); 5] = [
    ("images", 0o755),
    ("index", 0o755),
    ("locks", 0o700),
    ("tmp", 0o700),
    // Who may be served an image a user's own login pulled (`registry::access`).
    ("access", 0o755),
];

pub struct Cache {
    dir: PathBuf,
    build_cgroup: BuildCgroup,
    /// `[store]`; opened only when an image must be built.
    store: StoreConfig,
    max_size: u64,
    limits: Limits,
    /// The caller owns the cache (root or the service identity) and may write it.
    writable: bool,
    /// `[cache] owner` is a service user: images are used only sealed by root (see `owner`).
    sealed: bool,
}

impl Cache {
    /// Opens the cache, creating it when the caller may. Refuses a directory (the cache or
    /// one of its subdirectories) that someone other than root or the caller owns, or that
    /// group or others can write: berth would otherwise run images a user planted.
    pub fn open(config: &CacheConfig) -> Result<Cache> {
        let max_size = parse_size(&config.max_size)?;
        let limits = Limits::from_config(config)?;
        let dir = config.dir.clone();
        let euid = berth_sys::identity::effective_uid();
        let owner = Owner::of(config)?;
        if euid == 0 {
            // Whoever had the subdirectories before (the site changed `owner`) loses them.
            owner::prepare(&dir, &owner)?;
        }
        let service = Some(owner).filter(|o| !o.is_root());
        let owner = match fs::symlink_metadata(&dir) {
            Ok(meta) => {
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
                check_dir(&dir, &meta, meta.uid(), 0o755)?;
                // The subdirectories are the service user's, the directory root's.
                Some(service.as_ref().map_or(meta.uid(), |s| s.uid))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        // Root may evict and mark images used in a service user's cache too; it never builds
        // there (`fetch_with` hands that to the owner).
        let writable = owner == Some(euid) || (euid == 0 && service.is_some());
        if let Some(owner) = owner {
            for (name, mode) in SUBDIRS {
                let sub = dir.join(name);
                if writable {
                    make_dir(&sub, mode)?;
                }
                match fs::symlink_metadata(&sub) {
                    Ok(meta) => check_dir(&sub, &meta, owner, mode)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("reading {}", sub.display()), e)),
                }
            }
        }
        Ok(Cache {
            dir,
            build_cgroup: config.build_cgroup.clone(),
            store: StoreConfig::default(),
            max_size,
            limits,
            writable,
            sealed: service.is_some(),
        })
    }

    /// The cache with the shared store `[store]` behind it.
    pub fn with_store(self, store: &StoreConfig) -> Cache {
        Cache {
            store: store.clone(),
            ..self
        }
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

    /// Where the image with this manifest digest, pulled through `repo`, lives (whether or
    /// not it is there).
    pub fn image_path(&self, repo: &RepoKey, digest: &Digest) -> PathBuf {
        self.images_dir().join(format!("{}.sif", repo.name(digest)))
    }

    /// The cached SIF for `digest` (a manifest digest, or an index digest this node has
    /// resolved before) pulled through `repo`, marked as just used.
    pub fn hit(&self, repo: &RepoKey, digest: &Digest) -> Result<Option<PathBuf>> {
        if let Some(path) = self.hit_image(&self.image_path(repo, digest))? {
            return Ok(Some(path));
        }
        let link = self.dir.join("index").join(repo.name(digest));
        let target = match fs::read_link(&link) {
            Ok(target) => target,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", link.display()), e)),
        };
        // Only the file name counts, and only an image of the same repository.
        let image = target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".sif"))
            .filter(|n| n.ends_with(&format!("-{}", repo.0)));
        match image {
            Some(name) => self.hit_image(&self.images_dir().join(format!("{name}.sif"))),
            None => Err(cache_error(
                &link,
                format!(
                    "points to {}, not an image of the same repository; remove it",
                    target.display()
                ),
            )),
        }
    }

    fn hit_image(&self, path: &Path) -> Result<Option<PathBuf>> {
        let opened = if self.sealed {
            self.open_sealed(path)
        } else {
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
        };
        match opened {
            Ok(file) => {
                // A sealed image is root's: root marks it used (the owner's fetch hands a hit
                // back to root, which does).
                if self.writable && (!self.sealed || berth_sys::identity::effective_uid() == 0) {
                    mark_used(&file, path)?;
                }
                Ok(Some(path.to_path_buf()))
            }
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a cached image of a service user's cache if root sealed it (see `owner`), or
    /// if it is the caller's own fresh build: the owner's fetch that finds another fetch's
    /// image still unsealed hands it to its root parent, which seals it.
    fn open_sealed(&self, path: &Path) -> Result<File> {
        let file = owner::open_nofollow(path)?;
        let euid = berth_sys::identity::effective_uid();
        let fresh = self.writable
            && euid != 0
            && file
                .metadata()
                .is_ok_and(|m| m.uid() == euid && m.is_file());
        if !fresh {
            Sealed::check(&file, path)?;
        }
        Ok(file)
    }

    /// Records which image an index digest resolved to on this node, so that the same
    /// pinned reference hits without the registry (as the user, too). The mapping never
    /// changes for a node: an index digest names fixed bytes, and the platform is the node's.
    fn record_index(&self, repo: &RepoKey, resolved: &ResolvedImage) -> Result<()> {
        if !self.writable || resolved.target == resolved.manifest_digest {
            return Ok(());
        }
        let link = self.dir.join("index").join(repo.name(&resolved.target));
        let target =
            Path::new("../images").join(format!("{}.sif", repo.name(&resolved.manifest_digest)));
        match std::os::unix::fs::symlink(&target, &link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io(format!("recording {}", link.display()), e)),
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
        client: &Client,
        reference: &Reference,
        repo: &RepoKey,
        resolved: &ResolvedImage,
        options: &FetchOptions,
    ) -> Result<PathBuf> {
        let digest = &resolved.manifest_digest;
        let pinned = reference.pinned(digest.clone());
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
        let total = layers
            .iter()
            .fold(0u64, |sum, (l, _, _)| sum.saturating_add(l.size));
        // Before anything is downloaded: the blobs are verified against these sizes.
        self.limits.check_download(&pinned.to_string(), total)?;

        let key = repo.name(digest);
        let _lock = self.lock_image(&key, &pinned, options.quiet)?;
        // Another fetch may have built it while this one waited.
        if let Some(path) = self.hit(repo, digest)? {
            return Ok(path);
        }
        self.leave_job_memory_cgroup(&pinned, options.quiet);
        self.clean_stale(&key);
        self.ensure_space(total.saturating_mul(SPACE_FACTOR), total, &pinned)?;

        let staging = self.dir.join("tmp").join(&key);
        let blobs = staging.join("blobs");
        make_dir(&staging, 0o700)?;
        make_dir(&blobs, 0o700)?;

        // A node that finds the image in the shared store copies it instead of pulling; the
        // first to need it converts and publishes it, holding the store's lease meanwhile.
        let lease = match self.open_store()? {
            None => None,
            Some(store) => {
                match store.acquire(&key, &staging.join("image.sif"), |n| {
                    progress::note(options.quiet, n)
                })? {
                    store::Acquired::Copied => {
                        progress::note(
                            options.quiet,
                            &format!("copied {pinned} from the shared image store"),
                        );
                        return self.install(repo, digest, &staging, _lock);
                    }
                    store::Acquired::Lease(lease) => Some(lease),
                }
            }
        };

        let config_bytes = client.small_blob(&reference.repository, &manifest.config)?;
        let mut image_config = parse_image_config(&pinned.to_string(), &config_bytes)?;
        image_config.manifest_digest = digest.to_string();
        image_config.source = reference.to_string();

        // Named once, on the pull's own line, when a mirror serves it.
        let pull = match client.mirror() {
            None => format!("pulling {pinned}"),
            Some(mirror) => format!("pulling {pinned} from {mirror}"),
        };
        let pull = Progress::new(pull, total, options.quiet);
        let mut missing = Vec::new();
        for (layer, layer_digest, _) in &layers {
            let dest = blobs.join(layer_digest.hex());
            // A layer listed twice is downloaded once (two transfers would share a file).
            if dest.exists() || missing.iter().any(|job: &BlobJob| job.dest == dest) {
                pull.add(layer.size);
            } else {
                missing.push(BlobJob::new(layer, dest));
            }
        }
        // The build reads each layer as its blob lands, while it and the later layers
        // download (see `Landing`); only the downloads' verdict lets its SIF go further
        // (below). An image
        // refused or failed while it was built leaves nothing on the node, not its SIF
        // being written nor its blobs: a hostile image would be refused again, and a full
        // disk needs the room now. A failed download is the error reported, the build's
        // being only its echo; a build that fails on its own stops the downloads, whose
        // bytes are not wanted. A registry that goes away mid-pull (or a fetch killed
        // midway) leaves the blobs downloaded so far, verified or partial, for the next
        // fetch of the image to resume from: a 20 GB pull cut at 90% need not start again.
        let stop = AtomicBool::new(false);
        let build_failed_first = AtomicBool::new(false);
        let (downloaded, converted) = std::thread::scope(|scope| {
            let download = scope.spawn(|| {
                let done = client.download_blobs(&reference.repository, &missing, &pull, &stop);
                if done.is_ok() && !stop.load(Ordering::Relaxed) {
                    // The pull's last line when it ends, not when the build does.
                    pull.finish();
                }
                done
            });
            let converted = self
                .convert(&layers, &missing, &staging, &image_config, &pinned, options)
                .map_err(|e| {
                    if !stop.swap(true, Ordering::Relaxed) {
                        build_failed_first.store(true, Ordering::Relaxed);
                    }
                    self.out_of_space(e, &pinned)
                });
            (download.join().expect("downloads do not panic"), converted)
        });
        // The build may end before its blobs are verified (a tar ends at its end-of-archive
        // blocks, before the bytes after them), so only the download's verdict lets its
        // SIF go further.
        if downloaded.is_err() || converted.is_err() {
            let resumable = matches!(downloaded, Err(Error::RegistryDown { .. }))
                && !build_failed_first.load(Ordering::Relaxed);
            self.leave_staging(&staging, resumable, &pinned, options.quiet);
        }
        downloaded?;
        converted?;
        if let Some(lease) = lease {
            // The node has its image either way; the others will convert it themselves.
            if let Err(e) = lease.publish(&staging.join("image.sif")) {
                warn(&format!(
                    "{e}; other nodes will convert {pinned} themselves (fix: make [store] dir \
                     writable by root on this node)"
                ));
            }
        }
        self.install(repo, digest, &staging, _lock)
    }

    /// After a failed build: removes `staging`, or, where the registry went away and the
    /// blobs are `resumable`, everything but them (the SIF half written).
    fn leave_staging(&self, staging: &Path, resumable: bool, pinned: &Reference, quiet: bool) {
        let removed = if resumable {
            fs::read_dir(staging)
                .map_err(|e| Error::io(format!("reading {}", staging.display()), e))
                .and_then(|entries| {
                    entries
                        .flatten()
                        .filter(|entry| entry.file_name() != "blobs")
                        .try_for_each(|entry| remove_tree(&entry.path()))
                })
        } else {
            remove_tree(staging)
        };
        match removed {
            Err(e) => warn(&format!("could not remove {}: {e}", staging.display())),
            Ok(()) if resumable => progress::note(
                quiet,
                &format!(
                    "kept what was downloaded of {pinned}: the next fetch of it on this node \
                     resumes from there"
                ),
            ),
            Ok(()) => {}
        }
    }

    /// Puts the SIF built (or copied) in `staging` into the cache, gives up the image's lock
    /// and evicts what the cache no longer has room for.
    fn install(
        &self,
        repo: &RepoKey,
        digest: &Digest,
        staging: &Path,
        lock: File,
    ) -> Result<PathBuf> {
        let path = self.image_path(repo, digest);
        fs::rename(staging.join("image.sif"), &path)
            .map_err(|e| Error::io(format!("publishing {}", path.display()), e))?;
        sync_dir(&self.images_dir())?;
        remove_tree(staging)?;
        drop(lock);

        self.evict_to(self.max_size, Some(&path))?;
        Ok(path)
    }

    fn open_store(&self) -> Result<Option<store::Store>> {
        if self.store.dir.as_os_str().is_empty() {
            return Ok(None);
        }
        store::Store::new(
            &self.store.dir,
            std::time::Duration::from_secs(self.store.lease_secs),
        )
        .map(Some)
    }

    /// Streams the layers into the squashfs of `staging/image.sif`, within the image
    /// limits: no unpacked tree on disk (see `squash`). A layer still `downloading` is read
    /// as it lands, one already in `staging/blobs` from its file; several layers are read
    /// at once (see `unpack::apply_layers`), since one layer's inflate is a single thread.
    fn convert(
        &self,
        layers: &[(&Descriptor, Digest, Compression)],
        downloading: &[BlobJob<'_>],
        staging: &Path,
        image_config: &ImageConfig,
        pinned: &Reference,
        options: &FetchOptions,
    ) -> Result<()> {
        let total = layers.iter().map(|(l, _, _)| l.size).sum();
        let blobs = staging.join("blobs");
        let mut budget = Budget::new(self.limits.clone());
        let building = Progress::new(format!("building {pinned}"), total, options.quiet);
        let mut built = squash::Stats::default();
        let squash_options = squash::Options {
            block_memory: self.limits.build_memory,
            spill_dir: staging.to_path_buf(),
            ..Default::default()
        };
        let workers = unpack::layer_workers(squash_options.threads);
        sif::create_with(&staging.join("image.sif"), image_config, |file, offset| {
            built = squash::build(file, offset, &squash_options, |data| {
                let mut tree = squash::Tree::new();
                let sources = layers
                    .iter()
                    .map(|(_, layer_digest, compression)| {
                        let path = blobs.join(layer_digest.hex());
                        let landing = downloading
                            .iter()
                            .find(|job| job.dest == path)
                            .map(|job| &job.landing);
                        let building = &building;
                        unpack::Source {
                            layer: layer_digest.to_string(),
                            compression: *compression,
                            open: Box::new(move || {
                                let blob: Box<dyn Read + Send> = match landing {
                                    Some(landing) => Box::new(landing.reader()),
                                    None => Box::new(File::open(&path).map_err(|e| {
                                        Error::io(format!("opening blob {}", path.display()), e)
                                    })?),
                                };
                                Ok(Box::new(Counted {
                                    inner: BufReader::with_capacity(256 << 10, blob),
                                    progress: building,
                                }) as Box<dyn Read + Send>)
                            }),
                        }
                    })
                    .collect();
                unpack::apply_layers(&mut tree, data, sources, &mut budget, workers)?;
                Ok(tree)
            })?;
            Ok(sif::Built {
                len: built.bytes,
                sha256_superblock_last: built.sha256_superblock_last.clone(),
            })
        })?;
        building.finish();
        progress::note(
            options.quiet,
            &format!(
                "built {pinned}: {} squashfs, {} inodes, {} data blocks",
                format_size(built.bytes),
                built.inodes,
                built.blocks
            ),
        );
        Ok(())
    }

    /// `e`, or, where it is the cache's file system filling up during the build (the
    /// estimate before it was not enough, or other builds took the room), the cache error
    /// that says so and how to make room.
    fn out_of_space(&self, e: Error, image: &Reference) -> Error {
        let full = match &e {
            Error::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            Error::Mksquashfs { stderr, .. } => stderr.contains("No space left"),
            _ => false,
        };
        if !full {
            return e;
        }
        cache_error(
            &self.dir,
            format!(
                "the file system filled up while {image} was built ({e}); nothing of it was \
                 kept. Free space there (`berth prune`), \
                 or move [cache] dir to a bigger file system"
            ),
        )
    }

    /// `e`, or, where it is the cache's file system refusing writes, the cache error that
    /// says cached images still run and how to let new ones in.
    fn read_only(&self, e: Error, image: &Reference) -> Error {
        match &e {
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::EROFS) => cache_error(
                &self.dir,
                format!(
                    "{image} is not cached and the cache's file system is read-only ({e}); \
                     cached images still run. Remount it read-write (check the kernel log: a \
                     file system goes read-only after errors), or move [cache] dir"
                ),
            ),
            _ => e,
        }
    }

    /// Makes sure the cache's file system has `needed` bytes free for a build, evicting
    /// unused images (least recently used first) when it has not.
    fn ensure_space(&self, needed: u64, compressed: u64, image: &Reference) -> Result<()> {
        let free = || {
            berth_sys::statfs::available_bytes(&self.dir)
                .map_err(|e| Error::io(format!("checking free space in {}", self.dir.display()), e))
        };
        let available = free()?;
        if available >= needed {
            return Ok(());
        }
        let cached: u64 = self.list()?.iter().map(|i| i.size).sum();
        // Images in use free nothing when unlinked, so only idle ones go.
        self.evict(cached.saturating_sub(needed - available), None, false)?;
        let available = free()?;
        if available >= needed {
            return Ok(());
        }
        Err(cache_error(
            &self.dir,
            format!(
                "not enough free space to build {image}: it needs about {} ({SPACE_FACTOR} × its \
                 {} of compressed layers: the layers and the SIF) and {} is \
                 free after evicting unused images; free space on this file system, or move \
                 [cache] dir to a bigger one",
                format_size(needed),
                format_size(compressed),
                format_size(available)
            ),
        ))
    }

    /// Moves a root build out of the job's memory cgroup (see `cgroup`), before it downloads
    /// or unpacks anything. A move that fails costs only the protection: the build goes on
    /// where it was, with a warning naming the cause.
    fn leave_job_memory_cgroup(&self, pinned: &Reference, quiet: bool) {
        if berth_sys::identity::effective_uid() != 0 {
            return;
        }
        if let Some(now) = leave_job_memory_cgroup(&self.build_cgroup) {
            progress::note(
                quiet,
                &format!("building {pinned} in memory cgroup {now}, outside the job's limits"),
            );
        }
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
    /// Best effort: another image's leftovers must never fail this build, so what cannot be
    /// removed is reported on stderr and left for an admin.
    fn clean_stale(&self, own: &str) {
        let tmp = self.dir.join("tmp");
        let entries = match fs::read_dir(&tmp) {
            Ok(entries) => entries,
            Err(e) => return warn(&format!("cannot list {}: {e}", tmp.display())),
        };
        for entry in entries.flatten() {
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
                if let Err(e) = remove_tree(&entry.path()) {
                    warn(&format!(
                        "cannot remove the leftover staging {}: {e}; remove it by hand",
                        entry.path().display()
                    ));
                }
            }
        }
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
            let Some(digest) = digest_of_name(&name) else {
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

    /// Checks every complete image: a service user's cache seals them (see `owner`), and
    /// each root partition must match the hash recorded when it was written
    /// (`sif::Sif::verify`). One result per image, least recently used first.
    pub fn verify(&self) -> Result<Vec<(CachedImage, Result<sif::Verified>)>> {
        let check = |image: &CachedImage| {
            let file = owner::open_nofollow(&image.path)?;
            if self.sealed {
                Sealed::check(&file, &image.path)?;
            }
            sif::Sif::from_file(file, &image.path)?.verify()
        };
        Ok(self
            .list()?
            .into_iter()
            .map(|image| {
                let verdict = check(&image);
                (image, verdict)
            })
            .collect())
    }

    /// Evicts least recently used images until the total is at most `max`, never `keep`.
    /// Idle images go first, then images in use (see the module doc). Returns what was
    /// evicted.
    pub fn evict_to(&self, max: u64, keep: Option<&Path>) -> Result<Vec<CachedImage>> {
        self.evict(max, keep, true)
    }

    fn evict(&self, max: u64, keep: Option<&Path>, in_use_too: bool) -> Result<Vec<CachedImage>> {
        if !self.writable {
            return Err(cache_error(
                &self.dir,
                "evicting images needs the cache's owner (root); run berth prune as root".into(),
            ));
        }
        let images = self.list()?;
        let mut total: u64 = images.iter().map(|i| i.size).sum();
        let mut evicted = Vec::new();
        let mut in_use = Vec::new();
        for image in images {
            if total <= max {
                break;
            }
            if Some(image.path.as_path()) == keep {
                continue;
            }
            let Ok(file) = File::open(&image.path) else {
                continue;
            };
            // Held while unlinking, so a runner that locks it next sees it gone (nlink 0).
            if file.try_lock().is_err() {
                in_use.push(image);
                continue;
            }
            total -= self.unlink(image, &mut evicted)?;
        }
        if in_use_too {
            for image in in_use {
                if total <= max {
                    break;
                }
                total -= self.unlink(image, &mut evicted)?;
            }
        }
        if !evicted.is_empty() {
            self.sweep_index();
        }
        Ok(evicted)
    }

    /// Removes one image; returns the bytes it freed from the cache's total.
    fn unlink(&self, image: CachedImage, evicted: &mut Vec<CachedImage>) -> Result<u64> {
        match fs::remove_file(&image.path) {
            Ok(()) => {}
            // Another prune got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("evicting {}", image.path.display()), e)),
        }
        let size = image.size;
        evicted.push(image);
        Ok(size)
    }

    /// Removes `index/` entries whose image is gone. Best effort: a stale entry is only a
    /// miss.
    fn sweep_index(&self) {
        let index = self.dir.join("index");
        let Ok(entries) = fs::read_dir(&index) else {
            return;
        };
        for entry in entries.flatten() {
            // `metadata` follows the link: NotFound means its image was evicted.
            if entry.path().metadata().is_err() {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Marks a cached image used now (its mtime orders eviction). On a cache the site made
/// read-only (a pre-filled cache, or a file system remounted read-only after an error) the
/// order cannot change and nothing is evicted, so the image still serves.
fn mark_used(file: &File, path: &Path) -> Result<()> {
    match file.set_modified(SystemTime::now()) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(()),
        marked => marked.map_err(|e| Error::io(format!("marking {} used", path.display()), e)),
    }
}

/// Moves root's process out of the job's memory cgroup (see `cgroup`) and returns the cgroup
/// it is in now, if it moved. A move that fails costs only the protection: the build goes on
/// where it was, with a warning naming the cause.
fn leave_job_memory_cgroup(build_cgroup: &BuildCgroup) -> Option<String> {
    match cgroup::leave_job_memory_cgroup(Path::new(cgroup::CGROUP_ROOT), build_cgroup) {
        Ok(now) => now,
        Err(e) => {
            warn(&format!(
                "building inside the caller's memory cgroup: {e}; a small --mem job may be \
                 killed while its image is converted (fix: check [cache] build_cgroup and that \
                 cgroups are mounted under {})",
                cgroup::CGROUP_ROOT
            ));
            None
        }
    }
}

/// Counts the compressed bytes a layer reader consumes, for the build's progress line.
struct Counted<'a, R> {
    inner: R,
    progress: &'a Progress,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

/// Refuses a cache directory that is not a plain directory (a symlink included), is owned
/// by another uid than `owner`, or is writable by group or others.
fn check_dir(path: &Path, meta: &fs::Metadata, owner: u32, mode: u32) -> Result<()> {
    let fix = format!("chown {owner} {0} && chmod {mode:o} {0}", path.display());
    if !meta.is_dir() {
        return Err(cache_error(
            path,
            "not a directory (a symlink?); berth trusts only a real one (fix: remove it and \
             let berth create it, or set [cache] dir)"
                .into(),
        ));
    }
    if meta.uid() != owner {
        return Err(cache_error(
            path,
            format!(
                "owned by uid {}, not by the cache's owner (uid {owner}); other users could \
                 plant or swap images (fix: {fix})",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(cache_error(
            path,
            format!(
                "mode {:o} lets other users plant or swap images (fix: {fix})",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
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

/// Removes a staging tree through directory fds (see `unpack::remove_tree`), so that no
/// depth or path length an image built can stop it.
fn remove_tree(path: &Path) -> Result<()> {
    let io_error = |e| Error::io(format!("removing {}", path.display()), e);
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io_error(std::io::Error::from(
            std::io::ErrorKind::InvalidInput,
        )));
    };
    let parent = berth_sys::fs::Dir::open(parent).map_err(io_error)?;
    unpack::remove_tree(&parent, std::os::unix::ffi::OsStrExt::as_bytes(name)).map_err(io_error)
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
}

/// A problem berth works around, on stderr even when quiet: an admin should hear of it.
fn warn(message: &str) {
    eprintln!("berth: warning: {message}");
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
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    fn config(dir: &Path, max: &str) -> CacheConfig {
        CacheConfig {
            dir: dir.to_path_buf(),
            max_size: max.into(),
            ..CacheConfig::default()
        }
    }

    fn digest(n: u8) -> Digest {
        Digest::compute(crate::reference::DigestAlgorithm::Sha256, &[n])
    }

    fn repo() -> RepoKey {
        RepoKey::of(&Reference::parse("localhost:5000/x/y").unwrap())
    }

    fn put(cache: &Cache, n: u8, size: usize, age_secs: u64) -> PathBuf {
        let path = cache.image_path(&repo(), &digest(n));
        fs::write(&path, vec![0u8; size]).unwrap();
        let when = SystemTime::now() - std::time::Duration::from_secs(age_secs);
        File::open(&path).unwrap().set_modified(when).unwrap();
        path
    }

    /// `berth images --verify`: a whole image passes; one cut short (a build killed while
    /// it wrote, had it been published) and one with a changed byte are named.
    #[test]
    fn verify_names_each_damaged_image() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(&dir.path().join("cache"), "10G")).unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("f"), vec![3u8; 300_000]).unwrap();
        let image = |n| {
            let path = cache.image_path(&repo(), &digest(n));
            sif::create_from_dir(&path, &root, &ImageConfig::default()).unwrap();
            path
        };
        let (whole, cut, changed) = (image(1), image(2), image(3));
        let len = fs::metadata(&cut).unwrap().len();
        File::options()
            .write(true)
            .open(&cut)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let file = File::options().write(true).open(&changed).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"!", sif::PARTITION_OFFSET + 100).unwrap();

        let verdicts: HashMap<PathBuf, Result<sif::Verified>> = cache
            .verify()
            .unwrap()
            .into_iter()
            .map(|(image, verdict)| (image.path, verdict))
            .collect();
        assert_eq!(verdicts.len(), 3);
        assert!(matches!(verdicts[&whole], Ok(sif::Verified::Hash)));
        let cut_err = verdicts[&cut].as_ref().unwrap_err().to_string();
        assert!(cut_err.contains(&cut.display().to_string()), "{cut_err}");
        let changed_err = verdicts[&changed].as_ref().unwrap_err().to_string();
        assert!(changed_err.contains("does not match"), "{changed_err}");
    }

    /// A build that fills the cache's file system says so and how to make room; other
    /// failures pass through as they are.
    #[test]
    fn a_build_that_fills_the_disk_names_the_cache_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(dir.path(), "10G")).unwrap();
        let image = Reference::parse("localhost:5000/x/y:1").unwrap();
        let full = Error::io(
            "layer sha256:ab: writing file zeros",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        let msg = cache.out_of_space(full, &image).to_string();
        for needle in [
            "filled up",
            "localhost:5000/x/y:1",
            "writing file zeros",
            "[cache] dir",
        ] {
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
        let other = Error::io("x", std::io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(
            cache.out_of_space(other, &image),
            Error::Io { .. }
        ));
    }

    /// A miss on a read-only cache says what still works and what to do.
    #[test]
    fn a_miss_on_a_read_only_cache_names_it_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(dir.path(), "10G")).unwrap();
        let image = Reference::parse("localhost:5000/x/y:1").unwrap();
        let ro = Error::io("removing x", std::io::Error::from_raw_os_error(libc::EROFS));
        let msg = cache.read_only(ro, &image).to_string();
        for needle in ["read-only", "localhost:5000/x/y:1", "Remount", "still run"] {
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
        let other = Error::io("x", std::io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(cache.read_only(other, &image), Error::Io { .. }));
    }

    /// A cached image on a file system remounted read-only still serves: marking it used
    /// is skipped, not an error.
    #[test]
    fn a_hit_on_a_read_only_cache_is_served() {
        if berth_sys::identity::effective_uid() != 0 {
            eprintln!("skipped: needs root (mounts a read-only tmpfs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mount = |args: &[&str]| {
            let ok = std::process::Command::new("mount")
                .args(args)
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount {args:?}");
        };
        mount(&["-t", "tmpfs", "-o", "size=1M,mode=0755", "berth-unit-ro"]);
        // Unmounted however the test ends.
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(dir.path());
        let cache = Cache::open(&config(dir.path(), "10G")).unwrap();
        let path = put(&cache, 1, 100, 60);
        mount(&["-o", "remount,ro"]);
        assert_eq!(cache.hit(&repo(), &digest(1)).unwrap(), Some(path));
    }

    #[test]
    fn evicts_least_recently_used_idle_images_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(dir.path(), "10K")).unwrap();
        let oldest = put(&cache, 1, 4000, 300);
        let in_use = put(&cache, 2, 4000, 200);
        let newer = put(&cache, 3, 4000, 100);
        let newest = put(&cache, 4, 4000, 0);
        let _running = open_for_run(&in_use).unwrap();
        // A hit makes `oldest` the most recently used.
        assert_eq!(
            cache.hit(&repo(), &digest(1)).unwrap(),
            Some(oldest.clone())
        );
        let evicted = cache.evict_to(cache.max_size(), Some(&newest)).unwrap();
        let evicted: Vec<_> = evicted.into_iter().map(|i| i.digest).collect();
        assert_eq!(evicted, vec![digest(3), digest(1)]);
        assert!(in_use.exists() && newest.exists() && !newer.exists() && !oldest.exists());
        assert_eq!(cache.list().unwrap().len(), 2);
    }

    #[test]
    fn a_users_lock_on_a_cached_image_does_not_stop_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(dir.path(), "1M")).unwrap();
        let locked = put(&cache, 1, 5000, 300);
        let idle = put(&cache, 2, 5000, 200);
        // What `flock -s SIF sleep 1000` by any user does: SIFs are world-readable.
        let user = std::process::Command::new("flock")
            .arg("-s")
            .arg(&locked)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let mut user = scopeguard(user);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            File::open(&locked).unwrap().try_lock().is_err(),
            "not locked"
        );
        let evicted = cache.evict_to(0, None).unwrap();
        // Idle images go first, and the locked one still goes.
        let evicted: Vec<_> = evicted.into_iter().map(|i| i.digest).collect();
        assert_eq!(evicted, vec![digest(2), digest(1)]);
        assert!(!locked.exists() && !idle.exists());
        user.0.kill().unwrap();
    }

    /// Kills and reaps a child when the test ends, failed or not.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn scopeguard(child: std::process::Child) -> Reaped {
        Reaped(child)
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
    fn refuses_cache_subdirectories_others_can_write_or_that_are_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        Cache::open(&config(dir.path(), "1G")).unwrap();
        for (sub, fix) in [
            ("images", "chmod 755"),
            ("index", "chmod 755"),
            ("locks", "chmod 700"),
            ("tmp", "chmod 700"),
        ] {
            let path = dir.path().join(sub);
            for mode in [0o777, 0o775, 0o757] {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                let err = Cache::open(&config(dir.path(), "1G"))
                    .err()
                    .unwrap()
                    .to_string();
                assert!(
                    err.contains(&path.display().to_string()) && err.contains(fix),
                    "{sub} {mode:o}: {err}"
                );
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        }
        Cache::open(&config(dir.path(), "1G")).unwrap();
        // A symlink to a directory elsewhere is not the cache's own directory.
        let elsewhere = tempfile::tempdir().unwrap();
        fs::remove_dir(dir.path().join("images")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("images")).unwrap();
        let err = Cache::open(&config(dir.path(), "1G"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
        if berth_sys::identity::effective_uid() == 0 {
            // Owned by another user (a service user the site no longer names, say): root
            // takes it back first, then drops what that user could have planted.
            let images = dir.path().join("images");
            fs::remove_file(&images).unwrap();
            fs::create_dir(&images).unwrap();
            fs::write(
                images.join(format!("{}-{}.sif", digest(1).hex(), repo().0)),
                "x",
            )
            .unwrap();
            std::os::unix::fs::chown(&images, Some(65534), None).unwrap();
            let cache = Cache::open(&config(dir.path(), "1G")).unwrap();
            assert_eq!(fs::metadata(&images).unwrap().uid(), 0);
            assert!(cache.list().unwrap().is_empty());
            // A user cannot do the same: for them it stays refused.
            std::os::unix::fs::chown(&images, Some(65534), None).unwrap();
            let as_user =
                berth_sys::identity::run_in_child_as(&berth_sys::LinuxSyscall, 1234, 1234, || {
                    match Cache::open(&config(dir.path(), "1G")) {
                        Ok(_) => b"opened".to_vec(),
                        Err(e) => e.to_string().into_bytes(),
                    }
                })
                .unwrap();
            let err = String::from_utf8(as_user).unwrap();
            assert!(err.contains("owned by uid 65534"), "{err}");
        }
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
        cache.clean_stale("cccc");
        assert!(!dir.path().join("tmp/aaaa").exists());
        assert!(busy.exists());
    }

    /// What a test registry serves: request path -> (content type, body).
    type Documents = HashMap<String, (String, Vec<u8>)>;

    /// A registry of one repository on loopback, plain HTTP: serves `documents` by request
    /// path (manifests by tag or digest, blobs by digest) and records the paths asked for.
    struct Registry {
        host: String,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl Registry {
        fn start(documents: Documents) -> Registry {
            Registry::serve("127.0.0.1:0", documents, None)
        }

        /// Serves `documents` on `address` until it is asked for the path of `cut`, of whose
        /// body it sends only the first `cut.1` bytes before it closes the connection and
        /// its port: a registry that goes away in the middle of a blob.
        fn serve(address: &str, documents: Documents, cut: Option<(String, usize)>) -> Registry {
            use std::io::{BufRead, Write};
            let listener = std::net::TcpListener::bind(address).unwrap();
            let host = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = Arc::clone(&seen);
            // Ends with the test process (or at the cut); each test has its own.
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let mut reader = std::io::BufReader::new(&stream);
                    let mut line = String::new();
                    let _ = reader.read_line(&mut line);
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                            break;
                        }
                    }
                    log.lock().unwrap().push(path.clone());
                    let (status, kind, body) = match documents.get(&path) {
                        Some((kind, body)) => ("200 OK", kind.as_str(), body.as_slice()),
                        None => ("404 Not Found", "text/plain", &b"no"[..]),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = (&stream).write_all(head.as_bytes());
                    match &cut {
                        Some((at, len)) if *at == path => {
                            let _ = (&stream).write_all(&body[..*len]);
                            return;
                        }
                        _ => {
                            let _ = (&stream).write_all(body);
                        }
                    }
                }
            });
            Registry { host, seen }
        }

        fn requests(&self) -> usize {
            self.seen.lock().unwrap().len()
        }
    }

    /// One image in repository `repo`: a one-layer manifest, and an index over it when
    /// `index` is set. Returns the documents to serve and (manifest digest, index digest).
    fn image(repo: &str, marker: &str, index: bool) -> (Documents, Digest, Option<Digest>) {
        let sha = |b: &[u8]| Digest::compute(crate::reference::DigestAlgorithm::Sha256, b);
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(marker.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, "marker", marker.as_bytes())
            .unwrap();
        let layer = tar.into_inner().unwrap();
        let config =
            br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/marker"]}}"#.to_vec();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
            sha(&config), config.len(), sha(&layer), layer.len()
        ).into_bytes();
        let manifest_digest = sha(&manifest);
        let oci = |t: &str| format!("application/vnd.oci.image.{t}.v1+json");
        let mut docs = HashMap::new();
        docs.insert(
            format!("/v2/{repo}/blobs/{}", sha(&config)),
            ("application/octet-stream".into(), config.clone()),
        );
        docs.insert(
            format!("/v2/{repo}/blobs/{}", sha(&layer)),
            ("application/octet-stream".into(), layer.clone()),
        );
        docs.insert(
            format!("/v2/{repo}/manifests/{manifest_digest}"),
            (oci("manifest"), manifest.clone()),
        );
        let top = if index {
            let platform = crate::registry::manifest::host_platform();
            let variant = platform
                .variant
                .map(|v| format!(r#","variant":"{v}""#))
                .unwrap_or_default();
            let index = format!(
                r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{manifest_digest}","size":{},"platform":{{"architecture":"{}","os":"linux"{variant}}}}}]}}"#,
                oci("index"), oci("manifest"), manifest.len(), platform.architecture
            ).into_bytes();
            let index_digest = sha(&index);
            docs.insert(
                format!("/v2/{repo}/manifests/{index_digest}"),
                (oci("index"), index.clone()),
            );
            docs.insert(
                format!("/v2/{repo}/manifests/latest"),
                (oci("index"), index),
            );
            Some(index_digest)
        } else {
            docs.insert(
                format!("/v2/{repo}/manifests/latest"),
                (oci("manifest"), manifest),
            );
            None
        };
        (docs, manifest_digest, top)
    }

    /// A configuration allowing `allowed` on `registry` (plain HTTP), with its cache in `dir`.
    fn site(dir: &Path, registry: &str, allowed: &[&str]) -> Config {
        let allowed: Vec<String> = allowed
            .iter()
            .map(|a| format!("\"{registry}/{a}\""))
            .collect();
        let text = format!(
            "[policy]\nallowed = [{}]\nplain_http = [\"{registry}\"]\n[cache]\ndir = \"{}\"\n\
             [registry]\nretries = 1\ntimeout_secs = 5\nauth_file = \"{}\"\n",
            allowed.join(", "),
            dir.join("cache").display(),
            dir.join("no-auth.json").display(),
        );
        Config::from_toml(Path::new("test.toml"), &text).unwrap()
    }

    fn quiet(config: &Config, image: &str) -> Result<PathBuf> {
        let options = FetchOptions {
            quiet: true,
            user: None,
        };
        fetch_with(config, image, &options)
    }

    #[test]
    fn a_refused_image_leaves_no_staging() {
        let (docs, _, _) = image("lab/refused", "refused", false);
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let mut config = site(dir.path(), &registry.host, &["lab/*"]);
        // The layer's one entry is over the limit: refused while it is unpacked.
        config.cache.max_entries = 0;
        let image = format!("{}/lab/refused:latest", registry.host);
        let err = quiet(&config, &image).unwrap_err().to_string();
        assert!(err.contains("max_entries"), "{err}");
        for sub in ["tmp", "images"] {
            let left: Vec<_> = fs::read_dir(dir.path().join("cache").join(sub))
                .unwrap()
                .collect();
            assert!(left.is_empty(), "{sub}: {left:?}");
        }
    }

    #[test]
    fn a_registry_gone_mid_blob_leaves_the_bytes_for_the_next_fetch_to_resume_from() {
        let (docs, _, _) = image("lab/cut", "cut", false);
        let layer_path = docs
            .keys()
            .find(|path| path.contains("/blobs/") && docs[*path].1.len() > 1000)
            .unwrap()
            .clone();
        let gone = Registry::serve(
            "127.0.0.1:0",
            docs.clone(),
            Some((layer_path.clone(), 1000)),
        );
        let dir = tempfile::tempdir().unwrap();
        let config = site(dir.path(), &gone.host, &["lab/*"]);
        let image = format!("{}/lab/cut:latest", gone.host);
        let err = quiet(&config, &image).unwrap_err();
        assert!(matches!(err, Error::RegistryDown { .. }), "{err}");
        // The SIF being written is gone; the blob's first 1000 bytes wait in the staging.
        let staging: Vec<PathBuf> = fs::read_dir(dir.path().join("cache/tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(staging.len(), 1, "{staging:?}");
        let left: Vec<String> = fs::read_dir(&staging[0])
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["blobs"]);
        let hex = layer_path.rsplit(':').next().unwrap();
        let partial = staging[0].join(format!("blobs/{hex}.partial"));
        assert_eq!(fs::metadata(&partial).unwrap().len(), 1000);
        assert!(fs::read_dir(dir.path().join("cache/images"))
            .unwrap()
            .next()
            .is_none());

        // The registry is back on the same port: the fetch completes and cleans up.
        let back = Registry::serve(&gone.host, docs, None);
        let sif = quiet(&config, &image).unwrap();
        assert!(sif.is_file());
        assert!(back.seen.lock().unwrap().contains(&layer_path));
        assert!(fs::read_dir(dir.path().join("cache/tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn a_layer_that_fails_its_digest_mid_build_reports_the_digest_and_publishes_nothing() {
        // The build reads the layer as it lands and, the flipped byte being in the tar's
        // end blocks, finishes before the digest is checked: nothing is published, and
        // the error the user sees is the download's.
        let (mut docs, _, _) = image("lab/tampered", "tampered", false);
        let layer = docs
            .iter_mut()
            .find(|(path, (_, body))| path.contains("/blobs/") && body.len() > 1000)
            .unwrap()
            .1;
        let last = layer.1.len() - 1;
        layer.1[last] ^= 0xff;
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let config = site(dir.path(), &registry.host, &["lab/*"]);
        let image = format!("{}/lab/tampered:latest", registry.host);
        let err = quiet(&config, &image).unwrap_err().to_string();
        assert!(err.contains("corrupt data"), "{err}");
        let images: Vec<_> = fs::read_dir(dir.path().join("cache/images"))
            .unwrap()
            .collect();
        assert!(images.is_empty(), "{images:?}");
        let staging: Vec<_> = fs::read_dir(dir.path().join("cache/tmp"))
            .unwrap()
            .collect();
        assert!(staging.is_empty(), "{staging:?}");
    }

    #[test]
    fn two_nodes_with_a_shared_store_convert_an_image_once() {
        let (docs, _, _) = image("lab/shared", "shared", false);
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let node = |name: &str| {
            fs::create_dir(dir.path().join(name)).unwrap();
            let mut config = site(&dir.path().join(name), &registry.host, &["lab/*"]);
            config.store.dir = store.clone();
            config
        };
        let (a, b) = (node("a"), node("b"));
        let image = format!("{}/lab/shared:latest", registry.host);
        let first = quiet(&a, &image).unwrap();
        let blobs_seen = |registry: &Registry| {
            registry
                .seen
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.contains("/blobs/"))
                .count()
        };
        let pulled = blobs_seen(&registry);
        let second = quiet(&b, &image).unwrap();
        assert_ne!(first.parent(), second.parent(), "two caches");
        assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap());
        assert_eq!(blobs_seen(&registry), pulled, "node b pulled layers");
        assert_eq!(fs::read_dir(store.join("leases")).unwrap().count(), 0);
    }

    #[test]
    fn a_deep_leftover_staging_tree_does_not_stop_the_next_build() {
        let (docs, manifest, _) = image("lab/good", "good", false);
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let config = site(dir.path(), &registry.host, &["lab/*"]);
        let cache = Cache::open(&config.cache).unwrap();
        // The review's demo: a build of an older berth (which unpacked layers on disk) that
        // was refused after a path deeper than PATH_MAX left its staging behind.
        let rootfs = dir.path().join("cache/tmp/aaaa/rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        let mut parent = berth_sys::fs::Dir::open(&rootfs).unwrap();
        let name = "d".repeat(250);
        for _ in 0..40 {
            parent.mkdir(name.as_bytes(), 0o755).unwrap();
            parent = parent.open_child(name.as_bytes()).unwrap();
        }
        parent.create_file(b"f", 0o644).unwrap();
        drop(cache);

        let path = quiet(&config, &format!("{}/lab/good:latest", registry.host)).unwrap();
        assert_eq!(
            path,
            Cache::open(&config.cache).unwrap().image_path(
                &RepoKey::of(&Reference::parse(&format!("{}/lab/good", registry.host)).unwrap()),
                &manifest
            )
        );
        assert_eq!(
            fs::read_dir(dir.path().join("cache/tmp")).unwrap().count(),
            0
        );
    }

    /// `[cache] owner`: root's fetch builds as the service user (who owns the cache's
    /// subdirectories and its build's staging) and seals the image; an image swapped under
    /// another's name, or not sealed, is never used.
    #[test]
    fn a_service_users_cache_is_built_by_it_and_sealed_by_root() {
        if berth_sys::identity::effective_uid() != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let (mut docs, a_digest, _) = image("lab/a", "a", false);
        docs.extend(image("lab/b", "b", false).0);
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let mut config = site(dir.path(), &registry.host, &["lab/*"]);
        config.cache.owner = "nobody".into();
        let nobody = Owner::of(&config.cache).unwrap();
        let a = quiet(&config, &format!("{}/lab/a:latest", registry.host)).unwrap();
        let b = quiet(&config, &format!("{}/lab/b:latest", registry.host)).unwrap();
        let cache = dir.path().join("cache");
        assert_eq!(fs::metadata(&cache).unwrap().uid(), 0);
        for (sub, _) in SUBDIRS {
            assert_eq!(
                fs::metadata(cache.join(sub)).unwrap().uid(),
                nobody.uid,
                "{sub}"
            );
        }
        for sif in [&a, &b] {
            let meta = fs::metadata(sif).unwrap();
            assert_eq!(
                (meta.uid(), meta.mode() & 0o7777),
                (0, 0o644),
                "{}",
                sif.display()
            );
        }
        // The SIF's root is root's, as a root build makes it, not the builder's.
        let opened = sif::open_image(&a).unwrap();
        assert_eq!(opened.config.manifest_digest, a_digest.to_string());

        // A hit by digest needs no registry and is checked.
        let pinned_a = format!("{}/lab/a@{a_digest}", registry.host);
        assert_eq!(quiet(&config, &pinned_a).unwrap(), a);
        // The service user cannot change a sealed file, but it can rename one: b's image
        // under a's name is refused, not run.
        fs::rename(&b, &a).unwrap();
        let err = quiet(&config, &pinned_a).unwrap_err().to_string();
        assert!(err.contains("not what its name says"), "{err}");
        // Nor is a file the service user owns, for anyone but that user's own fetch.
        fs::remove_file(&a).unwrap();
        let a = quiet(&config, &pinned_a).unwrap();
        std::os::unix::fs::chown(&a, Some(nobody.uid), None).unwrap();
        let err = Sealed::check_path(&a).unwrap_err().to_string();
        assert!(err.contains("not sealed by root"), "{err}");
        // As a fetch killed before root sealed leaves it: the next fetch seals it.
        assert!(
            err.contains("the next fetch of the image checks and seals it"),
            "{err}"
        );
        assert_eq!(quiet(&config, &pinned_a).unwrap(), a);
        assert_eq!(fs::metadata(&a).unwrap().uid(), 0);
    }

    /// A cache root wrote before the site named a service user is handed over: the
    /// subdirectories and lock files become the owner's, root's sealed images stay, and
    /// staging root left goes.
    #[test]
    fn root_hands_its_old_cache_to_the_service_user() {
        if berth_sys::identity::effective_uid() != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&dir.path().join("cache"), "1G");
        let cache = Cache::open(&config).unwrap();
        fs::write(cache.dir().join("locks/x.lock"), "").unwrap();
        fs::create_dir_all(cache.dir().join("tmp/x/rootfs/deep")).unwrap();
        config.owner = "nobody".into();
        let nobody = Owner::of(&config).unwrap();
        owner::prepare(&config.dir, &nobody).unwrap();
        let uid = |p: &str| fs::symlink_metadata(config.dir.join(p)).unwrap().uid();
        assert_eq!(uid("."), 0);
        for p in ["images", "index", "locks", "tmp", "locks/x.lock"] {
            assert_eq!(uid(p), nobody.uid, "{p}");
        }
        assert!(!config.dir.join("tmp/x").exists());
        // And the cache opens for the service user as its own.
        assert!(Cache::open(&config).is_ok());
    }

    #[test]
    fn a_digest_cached_through_one_repository_is_not_served_for_another() {
        let (mut docs, manifest, _) = image("lab/old", "old", false);
        // The same image is also in lab/new, which the policy still allows.
        let copies: Vec<_> = docs
            .iter()
            .map(|(k, v)| (k.replace("/lab/old/", "/lab/new/"), v.clone()))
            .collect();
        docs.extend(copies);
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let before = site(dir.path(), &registry.host, &["lab/old", "lab/new"]);
        let old = quiet(&before, &format!("{}/lab/old:latest", registry.host)).unwrap();
        // The site drops lab/old. lab/new@D must not be lab/old's cached file: it is
        // pulled through lab/new itself (from the registry) and cached apart.
        let after = site(dir.path(), &registry.host, &["lab/new"]);
        let seen = registry.requests();
        let new = quiet(&after, &format!("{}/lab/new@{manifest}", registry.host)).unwrap();
        assert_ne!(new, old);
        assert!(
            registry.requests() > seen,
            "served from lab/old's cache entry"
        );
        let err = quiet(&after, &format!("{}/lab/old@{manifest}", registry.host)).unwrap_err();
        assert!(matches!(err, Error::FetchDenied { .. }), "{err}");
    }

    #[test]
    fn an_image_pinned_to_its_index_digest_hits_the_cache_without_the_registry() {
        let (docs, manifest, index) = image("lab/multi", "multi", true);
        let index = index.unwrap();
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let config = site(dir.path(), &registry.host, &["lab/*"]);
        let pinned = format!("{}/lab/multi@{index}", registry.host);
        let path = quiet(&config, &pinned).unwrap();
        assert!(
            path.to_string_lossy().contains(manifest.hex()),
            "{}",
            path.display()
        );
        let seen = registry.requests();
        assert_eq!(quiet(&config, &pinned).unwrap(), path);
        assert_eq!(
            registry.requests(),
            seen,
            "the second fetch asked the registry"
        );
        // The mapping goes with its image.
        let cache = Cache::open(&config.cache).unwrap();
        cache.evict_to(0, None).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join("cache/index"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn an_image_another_users_login_pulled_is_served_only_with_the_registrys_word() {
        let (docs, manifest, _) = image("lab/private", "private", false);
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let config = site(dir.path(), &registry.host, &["lab/*"]);
        let pinned = format!("{}/lab/private@{manifest}", registry.host);
        let path = quiet(&config, &pinned).unwrap();
        // As if user 4242's own login had pulled it.
        access::record(&dir.path().join("cache"), &path, access::Puller::User(4242)).unwrap();
        let as_user = |uid| FetchOptions {
            quiet: true,
            user: Some(FsUser {
                uid,
                gid: uid,
                groups: Vec::new(),
            }),
        };
        let seen = registry.requests();
        assert_eq!(fetch_with(&config, &pinned, &as_user(4242)).unwrap(), path);
        assert_eq!(
            registry.requests(),
            seen,
            "its puller is served without asking"
        );
        // Another user: the registry is asked (and here serves anyone).
        assert_eq!(fetch_with(&config, &pinned, &as_user(4243)).unwrap(), path);
        assert!(
            registry.requests() > seen,
            "another user was served unasked"
        );
        // (A registry refusing that user: tests/e2e/registries.rs, with two real users.)
    }

    #[test]
    fn a_mirror_serves_another_registrys_name_with_the_upstream_unreachable() {
        // The upstream: a loopback port nothing listens on.
        let upstream = {
            let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("127.0.0.1:{}", gone.local_addr().unwrap().port())
        };
        let (docs, manifest, _) = image("proxy/library/tool", "mirrored", false);
        let mirror = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let with_rule = |fallback: bool, mirrors: &str| {
            let text = format!(
                "[policy]\nallowed = [\"{upstream}/library/*\"]\n\
                 plain_http = [\"{upstream}\", \"{}\"]\n[cache]\ndir = \"{}\"\n\
                 [registry]\nretries = 1\ntimeout_secs = 5\nauth_file = \"{}\"\n\
                 [[registry.mirrors]]\nregistry = \"{upstream}\"\nmirrors = [{mirrors}]\n\
                 fallback = {fallback}\n",
                mirror.host,
                dir.path().join("cache").display(),
                dir.path().join("no-auth.json").display(),
            );
            Config::from_toml(Path::new("test.toml"), &text).unwrap()
        };
        let config = with_rule(false, &format!("\"{}/proxy\"", mirror.host));
        // Judged on the name written; the bytes come from the mirror's project and are
        // verified against the manifest's digests.
        let path = quiet(&config, &format!("{upstream}/library/tool:latest")).unwrap();
        assert!(path.to_string_lossy().contains(manifest.hex()));
        let seen = mirror.seen.lock().unwrap().clone();
        assert!(
            seen.iter()
                .all(|p| p.starts_with("/v2/proxy/library/tool/")),
            "{seen:?}"
        );
        // The mirror's own name is not approved by the rule.
        let err = quiet(
            &config,
            &format!("{}/proxy/library/tool:latest", mirror.host),
        );
        assert!(matches!(err, Err(Error::FetchDenied { .. })), "{err:?}");
        // A mirror without the image, no fallback: the pull fails with the mirror's answer
        // (with a fallback, the last error would be the unreachable upstream's).
        let empty = format!("\"{}/nothing\"", mirror.host);
        let err = quiet(
            &with_rule(false, &empty),
            &format!("{upstream}/library/tool:1"),
        );
        assert!(matches!(err, Err(Error::ImageNotFound { .. })), "{err:?}");
        let err = quiet(
            &with_rule(true, &empty),
            &format!("{upstream}/library/tool:1"),
        );
        assert!(matches!(err, Err(Error::RegistryDown { .. })), "{err:?}");
    }

    #[test]
    fn a_digest_reference_resolves_to_itself_without_the_registry() {
        // Nothing listens there: a request would fail.
        let gone = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
        };
        let dir = tempfile::tempdir().unwrap();
        let config = site(dir.path(), &gone, &["lab/*"]);
        let digest = format!("sha256:{}", "ab".repeat(32));
        let pinned = resolve(&config, &format!("{gone}/lab/private:v1@{digest}")).unwrap();
        assert_eq!(pinned.to_string(), format!("{gone}/lab/private@{digest}"));
        // Still the policy's call first.
        let err = resolve(&config, &format!("{gone}/other/x@{digest}")).unwrap_err();
        assert!(matches!(err, Error::FetchDenied { .. }), "{err}");
        // A tag needs the registry.
        assert!(resolve(&config, &format!("{gone}/lab/private:v1")).is_err());
    }

    #[test]
    fn an_image_over_the_size_limit_is_refused_before_download() {
        let (docs, _, _) = image("lab/big", "big", false);
        let registry = Registry::start(docs);
        let dir = tempfile::tempdir().unwrap();
        let mut config = site(dir.path(), &registry.host, &["lab/*"]);
        config.cache.max_image_size = "100".into();
        let err = quiet(&config, &format!("{}/lab/big:latest", registry.host)).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::ImageLimit {
                    key: "max_image_size",
                    ..
                }
            ),
            "{err}"
        );
        let seen = registry.seen.lock().unwrap().clone();
        assert!(seen.iter().all(|p| !p.contains("/blobs/")), "{seen:?}");
    }

    #[test]
    fn a_build_that_cannot_fit_evicts_idle_images_and_then_refuses_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(dir.path(), "1G")).unwrap();
        let idle = put(&cache, 1, 1000, 10);
        let image = Reference::parse("localhost:5000/x/y:z").unwrap();
        cache.ensure_space(1000, 250, &image).unwrap();
        assert!(idle.exists(), "evicted with room to spare");
        let err = cache
            .ensure_space(u64::MAX / 2, 1, &image)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not enough free space") && err.contains("[cache] dir"),
            "{err}"
        );
        assert!(!idle.exists(), "idle images are evicted first");
    }
}
