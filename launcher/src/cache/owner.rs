//! Who writes the node cache: root (the default, as before) or a service user, `[cache]
//! owner = "berth"`.
//!
//! With a service user, a fetch that root starts (the SPANK plugin's `policy check --fetch`,
//! the job prolog's prefetch, an admin's `berth fetch`) is split in two:
//!
//! - root, in the process the caller waits on: reads the configuration and checks the policy,
//!   makes the cache's subdirectories the owner's (see [`prepare`], which every root
//!   `Cache::open` runs too, for root's own cache), moves the build out of
//!   the job's memory cgroup, then forks;
//! - the child becomes the owner for good (no groups, all uids and gids the owner's, no way
//!   back, see `berth_sys::identity::run_in_child_as`) before it opens a connection, and
//!   does the registry client, the tar parsing, the unpack and mksquashfs as the owner; it
//!   answers with the cached file's name only;
//! - root checks that name, *seals* the image ([`Sealed`]: owner root, mode 0644, one link,
//!   its embedded digest and repository those of its name), marks it used, and goes on with
//!   what only root may write (the audit file, the metrics textfile).
//!
//! The cache directory itself stays root's (0755); `images/`, `index/`, `locks/` and `tmp/`
//! are the owner's. A sealed image is root's file in the owner's directory: the owner can
//! delete it (eviction) or rename it, but not change its bytes, and every hit checks the
//! seal, so a compromised service user can make jobs miss an image, never run another one
//! under its name (see docs/SECURITY.md).

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{cache_error, digest_of_name, RepoKey, SUBDIRS};
use crate::config::{CacheConfig, Config};
use crate::doctor::Status;
use crate::reference::Reference;
use crate::{sif, Error, Result};

/// The cache's configured owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// `[cache] owner`, looked up in the user database.
    pub fn of(config: &CacheConfig) -> Result<Owner> {
        let (uid, gid) = berth_sys::identity::user_ids(&config.owner).ok_or_else(|| {
            cache_error(
                &config.dir,
                format!(
                    "[cache] owner = {:?} names no user of this node (fix: install the berth \
                     package, which creates the system user `berth`, or create it with \
                     `adduser --system --group --no-create-home berth`, or set owner = \"root\")",
                    config.owner
                ),
            )
        })?;
        Ok(Owner {
            name: config.owner.clone(),
            uid,
            gid,
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Root's part before the owner writes the cache at `dir`: the cache directory (root's,
/// 0755) and the owner's subdirectories. A subdirectory another uid owns is adopted: it was
/// root's before the site named a service user, or the reverse, and the other identity is
/// not trusted with what follows, so it loses the directory first and then what it could
/// have planted goes (see [`adopt`]).
pub fn prepare(dir: &Path, owner: &Owner) -> Result<()> {
    if !dir.exists() {
        super::make_dir(dir, 0o755)?;
    }
    for (name, mode) in SUBDIRS {
        let sub = dir.join(name);
        match fs::symlink_metadata(&sub) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                super::make_dir(&sub, mode)?;
                chown(&sub, owner)?;
            }
            Err(e) => return Err(Error::io(format!("reading {}", sub.display()), e)),
            // Anything else (a symlink, a file, a group-writable directory) is refused by
            // `Cache::open` with its fix.
            Ok(meta) if meta.is_dir() && meta.uid() != owner.uid => adopt(&sub, name, owner)?,
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Gives the subdirectory `sub` (one of `SUBDIRS`, `name`) to `owner`, then removes what
/// its previous owner could have planted: unsealed images, every staging tree and index
/// link (a cache only loses hits). Lock files are handed over, never deleted (see the
/// module doc of `cache`), and so are access records: a record only narrows who is served
/// an image, and one lost would serve a private image to everyone.
fn adopt(sub: &Path, name: &str, owner: &Owner) -> Result<()> {
    let fail = |e| Error::io(format!("handing {} to {}", sub.display(), owner.name), e);
    let dir = berth_sys::fs::Dir::open(sub).map_err(fail)?;
    // First the directory, so that its old owner can no longer add or rename anything.
    berth_sys::fs::fchown(&dir, owner.uid, owner.gid).map_err(fail)?;
    for entry in dir.entry_names().map_err(fail)? {
        let path = sub.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&entry));
        let keep = match name {
            // Only a plain lock file: a hard link to some other file must not be chowned.
            "locks" | "access" => {
                fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.nlink() == 1)
            }
            "images" => Sealed::check_path(&path).is_ok(),
            _ => false,
        };
        match (keep, name) {
            (true, "locks" | "access") => dir.lchown(&entry, owner.uid, owner.gid).map_err(fail)?,
            (true, _) => {}
            (false, _) => crate::unpack::remove_tree(&dir, &entry).map_err(fail)?,
        }
    }
    Ok(())
}

fn chown(path: &Path, owner: &Owner) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))
        .map_err(|e| Error::io(format!("giving {} to {}", path.display(), owner.name), e))
}

/// What the owner's child answers root with.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    /// What the work returned (a cached image's file name, a pinned reference).
    Done(String),
    /// Why it failed: the message as the user should read it, and the metrics cause.
    Failed { message: String, cause: String },
}

/// Runs `work` as `owner` in a child (see `berth_sys::identity::run_in_child_as`) and
/// returns its answer; root's side of the module doc. The answer is a plain string root
/// checks before it uses it.
pub fn run_as(
    owner: &Owner,
    config: &CacheConfig,
    work: impl FnOnce() -> Result<String>,
) -> Result<String> {
    let bytes = berth_sys::identity::run_in_child_as(
        &berth_sys::LinuxSyscall,
        owner.uid,
        owner.gid,
        || {
            let answer = match work() {
                Ok(text) => Answer::Done(text),
                Err(e) => Answer::Failed {
                    message: e.to_string(),
                    cause: crate::metrics::failure_cause(&e).to_owned(),
                },
            };
            serde_json::to_vec(&answer).expect("an answer serializes")
        },
    )
    .map_err(|e| Error::Sys {
        path: config.dir.clone(),
        source: e,
    })?;
    match serde_json::from_slice(&bytes) {
        Ok(Answer::Done(text)) => Ok(text),
        Ok(Answer::Failed { message, cause }) => Err(Error::AsCacheOwner { message, cause }),
        Err(e) => Err(cache_error(
            &config.dir,
            format!("the part running as {} answered nonsense: {e}", owner.name),
        )),
    }
}

/// Runs `fetch` (which returns a path in `dir`'s `images/`) as `owner`, then seals the
/// image it names, after [`prepare`] and the build cgroup move.
pub fn fetch_as(
    owner: &Owner,
    config: &CacheConfig,
    fetch: impl FnOnce() -> Result<PathBuf>,
) -> Result<PathBuf> {
    prepare(&config.dir, owner)?;
    super::leave_job_memory_cgroup(&config.build_cgroup);
    let name = run_as(owner, config, || {
        let path = fetch()?;
        Ok(path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default())
    })?;
    if digest_of_name(&name).is_none() || name.contains('/') {
        return Err(cache_error(
            &config.dir,
            format!(
                "the fetch running as {} named {name:?}, not a cached image",
                owner.name
            ),
        ));
    }
    let path = config.dir.join("images").join(&name);
    Sealed::seal(&path, owner)?;
    Ok(path)
}

/// An image file root sealed: see the module doc.
pub struct Sealed;

impl Sealed {
    /// Makes the owner's freshly built image root's (a hit is root's already), checks it
    /// and marks it used, all through one descriptor opened without following a symlink.
    fn seal(path: &Path, owner: &Owner) -> Result<()> {
        let file = open_nofollow(path)?;
        let meta = metadata(&file, path)?;
        if meta.uid() == owner.uid && meta.is_file() && meta.nlink() == 1 {
            berth_sys::fs::fchown(&file, 0, 0)
                .and_then(|()| berth_sys::fs::fchmod(&file, 0o644))
                .map_err(|e| Error::io(format!("sealing {}", path.display()), e))?;
        }
        Sealed::check(&file, path)?;
        super::mark_used(&file, path)
    }

    /// [`Sealed::check`] of the file at `path`.
    pub fn check_path(path: &Path) -> Result<File> {
        let file = open_nofollow(path)?;
        Sealed::check(&file, path)?;
        Ok(file)
    }

    /// Refuses an image that is not a plain root-owned 0644 file with one link, or whose
    /// embedded manifest digest and repository are not those its name says.
    pub fn check(file: &File, path: &Path) -> Result<()> {
        let meta = metadata(file, path)?;
        let refuse = |why: String| {
            cache_error(
                path,
                format!(
                    "{why}; the cache's service user may have been subverted, so berth does not \
                     run it (fix: remove it, `berth prune --all` or rm, and fetch again; check \
                     the node)"
                ),
            )
        };
        let plain = meta.is_file() && meta.mode() & 0o7777 == 0o644 && meta.nlink() == 1;
        if plain && meta.uid() != 0 {
            // What a fetch killed after the service user published and before root sealed
            // leaves: not run, and not yet a reason to suspect the service user.
            return Err(cache_error(
                path,
                format!(
                    "not sealed by root yet (owner uid {}): the fetch that built it was \
                     interrupted before root sealed it, or the cache's service user put it \
                     there; berth does not run it (the next fetch of the image checks and \
                     seals it)",
                    meta.uid()
                ),
            ));
        }
        if !plain || meta.uid() != 0 {
            return Err(refuse(format!(
                "not sealed by root (owner uid {}, mode {:o}, {} links)",
                meta.uid(),
                meta.mode() & 0o7777,
                meta.nlink()
            )));
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let copy = file
            .try_clone()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let config = sif::Sif::from_file(copy, path)?
            .config()?
            .unwrap_or_default();
        let repo = Reference::parse(&config.source).map(|r| RepoKey::of(&r));
        let expected = digest_of_name(name).map(|d| d.to_string());
        let stem = name.strip_suffix(".sif").unwrap_or(name);
        match (expected, repo) {
            (Some(digest), Ok(repo))
                if digest == config.manifest_digest && stem.ends_with(&format!("-{}", repo.0)) =>
            {
                Ok(())
            }
            _ => Err(refuse(format!(
                "its contents say {} from {:?}, not what its name says",
                config.manifest_digest, config.source
            ))),
        }
    }
}

pub(super) fn open_nofollow(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

fn metadata(file: &File, path: &Path) -> Result<fs::Metadata> {
    file.metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

/// `berth doctor`'s check of who owns the cache and whether its directories say so, with
/// the commands that fix what does not.
pub fn doctor(config: &Config) -> Status {
    let dir = &config.cache.dir;
    let owner = match Owner::of(&config.cache) {
        Ok(owner) => owner,
        Err(e) => {
            return Status::Fail {
                problem: e.to_string(),
                fix: "adduser --system --group --no-create-home berth (the berth package does \
                      this), or set [cache] owner = \"root\""
                    .into(),
            }
        }
    };
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    let mut handed_over = false;
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() && meta.uid() == 0 && meta.mode() & 0o022 == 0 => {}
        Ok(meta) => {
            problems.push(format!(
                "{} is owned by uid {} with mode {:o}",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
            fixes.push(format!(
                "chown root:root {0} && chmod 755 {0}",
                dir.display()
            ));
        }
        // The first fetch creates it.
        Err(_) => return Status::Ok(format!("{} writes the cache; not created yet", owner.name)),
    }
    for (name, mode) in SUBDIRS {
        let sub = dir.join(name);
        match fs::symlink_metadata(&sub) {
            Err(_) => {}
            Ok(meta) if !meta.is_dir() => {
                problems.push(format!("{} is not a directory", sub.display()));
                fixes.push(format!("rm {}", sub.display()));
            }
            // Root's cache from before the service user: the next fetch hands it over.
            Ok(meta) if meta.uid() == 0 && !owner.is_root() => handed_over = true,
            Ok(meta) if meta.uid() != owner.uid || meta.mode() & 0o7777 != mode => {
                problems.push(format!(
                    "{} is owned by uid {} with mode {:o}, not {}'s with mode {mode:o}",
                    sub.display(),
                    meta.uid(),
                    meta.mode() & 0o7777,
                    owner.name
                ));
                fixes.push(format!(
                    "chown {1}: {0} && chmod {mode:o} {0}",
                    sub.display(),
                    owner.name
                ));
            }
            Ok(_) => {}
        }
    }
    if !problems.is_empty() {
        return Status::Fail {
            problem: format!("{}; berth refuses such a cache", problems.join("; ")),
            fix: fixes.join("; "),
        };
    }
    if owner.is_root() {
        return Status::Ok(
            "root writes the cache ([cache] owner = \"root\"; owner = \"berth\" keeps the \
             registry client and the unpacking of images away from root)"
                .into(),
        );
    }
    Status::Ok(format!(
        "{} (uid {}) writes the cache; root seals what it builds{}",
        owner.name,
        owner.uid,
        if handed_over {
            "; root's older subdirectories are handed over at the next fetch"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// doctor names the owner, and for a subdirectory someone else holds, the fix.
    #[test]
    fn doctor_checks_the_owner_and_the_directories() {
        if berth_sys::identity::effective_uid() != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.cache.dir = dir.path().join("cache");
        config.cache.owner = "nobody".into();
        let owner = Owner::of(&config.cache).unwrap();
        prepare(&config.cache.dir, &owner).unwrap();
        let status = doctor(&config);
        assert!(
            matches!(&status, Status::Ok(m) if m.contains("nobody (uid 65534)")),
            "{status:?}"
        );

        let locks = config.cache.dir.join("locks");
        std::os::unix::fs::chown(&locks, Some(1234), None).unwrap();
        match doctor(&config) {
            Status::Fail { problem, fix } => {
                assert!(problem.contains("owned by uid 1234"), "{problem}");
                assert_eq!(
                    fix,
                    format!("chown nobody: {0} && chmod 700 {0}", locks.display())
                );
            }
            other => panic!("{other:?}"),
        }

        config.cache.owner = "no such user".into();
        assert!(matches!(doctor(&config), Status::Fail { fix, .. } if fix.contains("adduser")));
    }
}
