//! Where a container's changes go: node-local disk, never memory. The image stays read-only
//! below an overlay; the overlay's upper layer (what the container writes) lives in a
//! directory of `[runtime] writable_dir`, so a job's writes are not charged to its memory
//! cgroup as a tmpfs's would be.
//!
//! Layout under `[runtime] writable_dir` (sticky and world-writable, like /var/tmp):
//!
//! ```text
//! <uid>/                    one per user, 0700, owned by the user (refused otherwise)
//! <uid>/tmp-XXXXXX/         a --writable container's changes, removed when it stops
//! <uid>/job-<J>/<NAME>/     the changes of container NAME of job J (`--container-name`),
//!                           kept across the job's steps; `berth named remove --job J`
//!                           removes them when the job ends
//!   upper/ work/            overlayfs's upper and work directories
//!   lock                    locked by the container writing them: one at a time
//! ```
//!
//! A named container has one writer. A step that starts it while another step runs it
//! (`--container-name=NAME:no_exec`, or two steps starting it at once; pyxis starts a
//! second copy on the same files there) gets a copy: its own temporary upper layer
//! (`tmp-XXXXXX/`) over the named container's, which is one of its lower layers. It sees
//! the container as the running step left it, and what it writes goes when it stops. Never
//! two overlays writing one upper layer, which the kernel leaves undefined; the running
//! step's later writes to a file the copy has not changed may or may not show in the copy
//! (overlayfs's rule for a lower layer that changes), so write shared results to a bound
//! directory.
//!
//! A container may write up to `[runtime] writable_max_size`: berth measures its upper
//! layer every second and, past the limit, turns the container's root read-only.

use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_sys::fs::Dir;
use berth_sys::{LinuxSyscall, Syscall};
use oci_spec::runtime::Spec;

use crate::cache::{format_size, parse_size};
use crate::config::RuntimeConfig;
use crate::unpack::remove_tree;
use crate::{Error, Result};

/// The annotation naming the directory whose `upper/` and `work/` the overlay uses; absent,
/// they are in the container's private tmpfs (a read-only container writes nothing there
/// but the mountpoints berth adds).
pub const ANN_CHANGES: &str = "org.berth.changes";

/// The annotation naming the changes directory (a named container's, see the module
/// comment) whose `upper/` lies below a copy's own upper layer.
pub const ANN_BELOW: &str = "org.berth.changes-below";

/// How often a container's writes are measured against the limit.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A named container's identity: its job and its name, `JOB/NAME` on `berth start --named`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedId {
    pub job: u32,
    pub name: String,
}

impl NamedId {
    /// Parses `JOB/NAME`. NAME is what `--container-name` allows: letters, digits, `.`, `_`
    /// and `-`, not starting with `.` or `-`, at most 128 bytes (it becomes a directory name).
    pub fn parse(text: &str) -> Result<NamedId> {
        let bad = |reason: &str| Error::NamedInvalid {
            value: text.into(),
            reason: reason.into(),
        };
        let (job, name) = text
            .split_once('/')
            .ok_or_else(|| bad("expected JOB/NAME"))?;
        let job = job.parse().map_err(|_| bad("the job id is not a number"))?;
        check_name(name).map_err(|reason| bad(&reason))?;
        Ok(NamedId {
            job,
            name: name.into(),
        })
    }
}

/// Checks a container name (see [`NamedId::parse`]); the reason says what to change.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let first_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok {
        return Err(format!(
            "the name '{name}' must start with a letter, a digit or '_'"
        ));
    }
    if name.len() > 128 {
        return Err(format!(
            "the name is {} bytes long; 128 at most",
            name.len()
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "the name '{name}' contains {c:?}; use letters, digits, '.', '_' and '-'"
        )),
        None => Ok(()),
    }
}

/// The directory a container writes its changes to, held for the container's life.
#[derive(Debug)]
pub struct Changes {
    /// Holds `upper/` and `work/`.
    path: PathBuf,
    /// Its parent and name, by which a temporary one is removed after pivot_root (when no
    /// path reaches it any more); None for a named container's, which stays.
    remove: Option<(Dir, Vec<u8>)>,
    /// A named container's lock, held while it runs.
    _lock: Option<File>,
    /// For a copy of a running named container: that container's directory, whose upper
    /// layer is a lower one of this.
    below: Option<PathBuf>,
    limit: u64,
}

impl Changes {
    /// A fresh directory for a `--writable` container, removed by [`Changes::finish`].
    /// Without the configured area (a workstation without berth's package), a private one
    /// under `fallback` ($TMPDIR).
    pub fn temporary(runtime: &RuntimeConfig, fallback: &Path) -> Result<Changes> {
        let limit = parse_size(&runtime.writable_max_size)?;
        let parent = user_area(runtime)?.unwrap_or_else(|| fallback.to_owned());
        let (path, _) =
            berth_sys::rootfs::private_dir(&parent, "tmp-").map_err(|source| Error::Sys {
                path: parent.clone(),
                source,
            })?;
        let name = path
            .file_name()
            .expect("mkdtemp names a child")
            .as_bytes()
            .to_vec();
        let dir = Dir::open(&parent).map_err(|e| Error::io(parent.display().to_string(), e))?;
        let changes = Changes {
            path,
            remove: Some((dir, name)),
            _lock: None,
            below: None,
            limit,
        };
        changes.create_layers()?;
        Ok(changes)
    }

    /// The directory of named container `id` of the calling user, created on first use and
    /// locked for this container's life; or, where another container holds that lock, a
    /// temporary copy over it (see the module comment).
    pub fn named(runtime: &RuntimeConfig, id: &NamedId) -> Result<Changes> {
        let limit = parse_size(&runtime.writable_max_size)?;
        let area = user_area(runtime)?.ok_or_else(|| Error::WritableArea {
            path: runtime.writable_dir.clone(),
            reason: "it does not exist, and named containers keep their files there".into(),
        })?;
        let path = area.join(format!("job-{}", id.job)).join(&id.name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let lock_path = path.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(lock_path.display().to_string(), e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut copy = Changes::temporary(runtime, &area)?;
                copy.below = Some(path);
                return Ok(copy);
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::io(lock_path.display().to_string(), e))
            }
        }
        let changes = Changes {
            path,
            remove: None,
            _lock: Some(lock),
            below: None,
            limit,
        };
        changes.create_layers()?;
        Ok(changes)
    }

    fn create_layers(&self) -> Result<()> {
        for layer in ["upper", "work"] {
            let dir = self.path.join(layer);
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(Error::io(format!("creating {}", dir.display()), e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Points the spec's overlay at this directory (and, for a copy, at the named
    /// container's below it).
    pub fn annotate(&self, spec: &mut Spec) {
        annotate(spec, &self.path, self.below.as_deref());
    }

    /// Leaves a temporary container's changes in place when it stops (for `berth save`,
    /// which removes them).
    pub fn keep(&mut self) {
        self.remove = None;
    }

    /// Opens the upper layer for [`Watch`], before pivot_root hides its path.
    pub fn open_upper(&self) -> Result<Dir> {
        let upper = self.path.join("upper");
        Dir::open(&upper).map_err(|e| Error::io(upper.display().to_string(), e))
    }

    /// Starts the process that measures, every second, what the container wrote to
    /// `upper`; past the limit it turns the container's root (its `/`: call after
    /// pivot_root, with the capabilities of the container's user namespace, which owns the mount)
    /// read-only and ends. The kernel refuses that while a file is open for writing there
    /// (EBUSY), so it tries again every second until the writer has closed it. Returns its
    /// pid.
    pub fn start_watcher(&self, upper: Dir) -> Result<i32> {
        let limit = self.limit;
        berth_sys::process::fork_child(move || {
            // The path reaches the upper layer through the descriptor's magic link: the
            // container's /proc is the host's.
            let path = PathBuf::from(format!("/proc/self/fd/{}", upper.as_fd().as_raw_fd()));
            let mut told = false;
            loop {
                std::thread::sleep(WATCH_INTERVAL);
                let used = usage(&path);
                if used <= limit {
                    continue;
                }
                let done = LinuxSyscall.set_readonly(Path::new("/"));
                let busy = matches!(&done, Err(e) if e.raw_os_error() == Some(libc::EBUSY));
                if !told || !busy {
                    eprintln!(
                        "berth: the container wrote {} to its root file system, more than \
                         [runtime] writable_max_size ({}): {}; write large data to a bound \
                         directory (--container-mounts)",
                        format_size(used),
                        format_size(limit),
                        match &done {
                            Ok(()) => "it is read-only from now on".to_owned(),
                            Err(_) if busy => {
                                "it turns read-only once the file being written is closed"
                                    .to_owned()
                            }
                            Err(e) => format!("making it read-only failed: {e}"),
                        }
                    );
                    told = true;
                }
                if !busy {
                    return 0;
                }
            }
        })
        .map_err(|source| Error::Container {
            what: "starting the size watcher",
            source,
        })
    }

    /// Removes a temporary container's changes; a named container's stay.
    pub fn finish(self) -> Result<()> {
        match self.remove {
            Some((parent, name)) => remove_tree(&parent, &name)
                .map_err(|e| Error::io(format!("removing {}", self.path.display()), e)),
            None => Ok(()),
        }
    }
}

/// Points the spec's overlay at the changes directory `dir` (holding `upper/` and `work/`)
/// and, for a copy of a named container, at that container's directory `below` (whose
/// `upper/` is the overlay's top lower layer).
pub fn annotate(spec: &mut Spec, dir: &Path, below: Option<&Path>) {
    let mut annotations = spec.annotations().clone().unwrap_or_default();
    annotations.insert(ANN_CHANGES.into(), dir.display().to_string());
    if let Some(below) = below {
        annotations.insert(ANN_BELOW.into(), below.display().to_string());
    }
    spec.set_annotations(Some(annotations));
}

/// Removes a changes directory that `berth save` has used.
pub fn remove(dir: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Ok(());
    };
    let parent_dir = Dir::open(parent).map_err(|e| Error::io(parent.display().to_string(), e))?;
    remove_tree(&parent_dir, name.as_bytes())
        .map_err(|e| Error::io(format!("removing {}", dir.display()), e))
}

/// Removes the named containers of job `job` of the calling user (`berth named remove`); a
/// container still running keeps its files until it stops and is then refused, so this
/// runs once the job's steps are gone (the job epilog).
pub fn remove_job(runtime: &RuntimeConfig, job: u32) -> Result<()> {
    let Some(area) = user_area(runtime)? else {
        return Ok(());
    };
    let dir = Dir::open(&area).map_err(|e| Error::io(area.display().to_string(), e))?;
    let name = format!("job-{job}");
    remove_tree(&dir, name.as_bytes())
        .map_err(|e| Error::io(format!("removing {}", area.join(name).display()), e))
}

/// Bytes allocated below `dir`, symlinks not followed; what cannot be read is skipped (the
/// container can make a directory unreadable, which only hides it from the count).
fn usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            // DirEntry::metadata does not follow a symlink.
            let Ok(meta) = entry.metadata() else { continue };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}

/// The calling user's directory of the writable area, created (0700) if needed; None where
/// the area does not exist. Refuses an area others could tamper with.
fn user_area(runtime: &RuntimeConfig) -> Result<Option<PathBuf>> {
    let base = &runtime.writable_dir;
    let refuse = |reason: String| Error::WritableArea {
        path: base.clone(),
        reason,
    };
    let meta = match fs::metadata(base) {
        Ok(meta) if meta.is_dir() => meta,
        Ok(_) => return Err(refuse("it is not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(refuse(e.to_string())),
    };
    // Whoever owns it can remove everything in it, sticky or not.
    if meta.uid() != 0 || (meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0) {
        return Err(refuse(format!(
            "it is owned by uid {} with mode {:o}; it must be root's, and sticky if others \
             can write it (chown root:root, chmod 1777)",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let uid = berth_sys::identity::effective_uid();
    let dir = base.join(uid.to_string());
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(Error::io(format!("creating {}", dir.display()), e))
        }
        _ => {}
    }
    let own = fs::symlink_metadata(&dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    if !own.is_dir() || own.uid() != uid || own.mode() & 0o077 != 0 {
        return Err(refuse(format!(
            "{} must be a directory of uid {uid} with mode 0700 (it is uid {}, mode {:o}); \
             ask the admin to remove it",
            dir.display(),
            own.uid(),
            own.mode() & 0o7777
        )));
    }
    Ok(Some(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn runtime(dir: &Path) -> RuntimeConfig {
        RuntimeConfig {
            writable_dir: dir.into(),
            writable_max_size: "1M".into(),
            ..RuntimeConfig::default()
        }
    }

    #[test]
    fn names_are_plain_directory_names() {
        assert_eq!(
            NamedId::parse("12/my.env-2_x").unwrap(),
            NamedId {
                job: 12,
                name: "my.env-2_x".into()
            }
        );
        for bad in [
            "12", "x/a", "12/", "12/..", "12/.a", "12/a/b", "12/a b", "12/-a",
        ] {
            let err = NamedId::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert!(check_name(&"a".repeat(129)).is_err());
    }

    /// The area checks need root's ownership, which a unit test cannot give: the area is
    /// then "missing" for a fallback and refused when owned by someone else.
    #[test]
    fn an_area_owned_by_a_user_is_refused_and_a_missing_one_falls_back() {
        let tmp = tempfile::tempdir().unwrap();
        let area = tmp.path().join("area");
        std::fs::create_dir(&area).unwrap();
        std::fs::set_permissions(&area, std::fs::Permissions::from_mode(0o1777)).unwrap();
        if berth_sys::identity::effective_uid() != 0 {
            let err = user_area(&runtime(&area)).unwrap_err().to_string();
            assert!(err.contains("chown root:root"), "{err}");
            let err = Changes::named(&runtime(&area), &NamedId::parse("1/a").unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains("chown root:root"), "{err}");
        }
        let missing = runtime(&tmp.path().join("missing"));
        assert_eq!(user_area(&missing).unwrap(), None);
        let err = Changes::named(&missing, &NamedId::parse("1/a").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("named containers keep their files there"),
            "{err}"
        );
    }

    /// Needs an area owned by root, so it runs as root only (as `tests/run` does).
    #[test]
    fn a_named_container_in_use_is_started_as_a_copy_over_it() {
        if berth_sys::identity::effective_uid() != 0 {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let (runtime, id) = (runtime(tmp.path()), NamedId::parse("7/env").unwrap());
        let writer = Changes::named(&runtime, &id).unwrap();
        assert_eq!(writer.path, tmp.path().join("0/job-7/env"));
        assert!(writer.below.is_none() && writer.remove.is_none());
        // Its lock is held: the next one is a copy with the writer's files below its own.
        let copy = Changes::named(&runtime, &id).unwrap();
        assert_eq!(copy.below.as_deref(), Some(writer.path.as_path()));
        assert!(copy.path.starts_with(tmp.path().join("0")) && copy.path != writer.path);
        let mut spec = Spec::default();
        copy.annotate(&mut spec);
        let ann = spec.annotations().clone().unwrap();
        assert_eq!(ann[ANN_CHANGES], copy.path.display().to_string());
        assert_eq!(ann[ANN_BELOW], writer.path.display().to_string());
        // The copy's own changes go when it stops; the container's stay.
        let copy_path = copy.path.clone();
        copy.finish().unwrap();
        assert!(!copy_path.exists() && writer.path.join("upper").is_dir());
        // Once the writer stopped, the next start writes the container's files again.
        drop(writer);
        let again = Changes::named(&runtime, &id).unwrap();
        assert!(again.below.is_none());
    }

    #[test]
    fn a_temporary_directory_goes_when_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let changes =
            Changes::temporary(&runtime(&tmp.path().join("missing")), tmp.path()).unwrap();
        let path = changes.path.clone();
        assert!(path.join("upper").is_dir() && path.join("work").is_dir());
        assert!(path.starts_with(tmp.path()));
        // What overlayfs leaves: a directory nobody may enter.
        std::fs::create_dir(path.join("work/work")).unwrap();
        std::fs::write(path.join("upper/f"), b"x").unwrap();
        std::fs::set_permissions(
            path.join("work/work"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
        let mut spec = Spec::default();
        changes.annotate(&mut spec);
        assert_eq!(
            spec.annotations().as_ref().unwrap()[ANN_CHANGES],
            path.display().to_string()
        );
        changes.finish().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn usage_counts_allocated_bytes_below() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::fs::write(tmp.path().join("d/f"), vec![1u8; 256 * 1024]).unwrap();
        std::os::unix::fs::symlink("/usr", tmp.path().join("l")).unwrap();
        let used = usage(tmp.path());
        assert!((256 * 1024..1024 * 1024).contains(&used), "{used}");
    }
}
