//! Data staging: copies of a user's files on node-local storage (`berth stage in`), and
//! results copied back (`berth stage out`).
//!
//! Layout under `[stage] dir` (a sticky, world-writable directory such as /var/tmp):
//!
//! ```text
//! <uid>/                      one per user, 0700, owned by the user (refused otherwise)
//! <uid>/<KEY>/data            a kept copy of one source (a file or a tree)
//! <uid>/<KEY>/manifest.json   the source path and its entries (paths, kinds, modes, sizes,
//!                             mtimes) when it was copied
//! <uid>/job-<N>/              job N's own part, removed when the job ends (job epilog):
//!   .tmp-<KEY>-<pid>/         a copy in progress (private; removed on any failure)
//!   <KEY>/                    with `after_job = "remove"`: the job's copies
//!   uses/<KEY>                with `after_job = "keep"`: the kept copies job N binds, which
//!                             no other stage may evict while the job runs
//! <uid>/.tmp-<KEY>-<pid>/     a copy in progress outside a job
//! .usage-<uid>                (in the area itself) the bytes the user has staged, for the
//!                             total limit: one user cannot read another's directory
//! ```
//!
//! `KEY` is the first 32 hex digits of the SHA-256 of the source's absolute path.
//!
//! - berth stages as the user who asks, never as root: what is copied is what the user can
//!   read, and a source they cannot read fails before anything is visible. The job epilog
//!   removes a job's part as the job's user too, so no link a user planted can make root
//!   remove anything.
//! - Unchanged data is reused: the source is walked (metadata only) and its entries compared
//!   with the manifest; equal means no copy.
//! - A copy appears by `rename` of the complete temporary directory, so a failed copy (disk
//!   full, an unreadable file, a file changing underneath) leaves nothing partial visible.
//! - Limits are checked before copying: the user's staged data (`[stage] max_user`), all
//!   users' (`[stage] max_total`, from the users' `.usage-<uid>` records) and the free space
//!   of the file system less `[stage] reserve`. Kept copies no running job binds make room,
//!   least recently used first; a stage that still does not fit is refused, evicting nothing.

mod copy;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::cache::{format_size, parse_size};
use crate::config::{AfterJob, StageConfig};
use crate::registry::progress::Progress;
use crate::{Error, Result};

pub use copy::{stage_error, Entry};

/// What a stage produced.
#[derive(Debug)]
pub struct Staged {
    /// The node-local copy.
    pub path: PathBuf,
    /// The copy was already there and unchanged: nothing was copied.
    pub reused: bool,
    pub bytes: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Manifest {
    source: PathBuf,
    entries: Vec<Entry>,
}

/// One copy in the user's part of the area, as the limits see it.
#[derive(Debug)]
struct Held {
    path: PathBuf,
    key: String,
    bytes: u64,
    last_used: SystemTime,
    /// A kept copy no running job binds: it may be evicted to make room.
    evictable: bool,
}

/// One user's part of the stage area.
pub struct Area {
    base: PathBuf,
    dir: PathBuf,
    uid: u32,
    job: Option<u32>,
    after_job: AfterJob,
    max_user: u64,
    max_total: Option<u64>,
    reserve: u64,
    threads: usize,
    quiet: bool,
}

impl Area {
    /// Opens (creating if needed) the calling user's area; `job`: the Slurm job the stage is
    /// for, whose part the job epilog removes. Refuses an area owned by anyone else or open
    /// to others: staged data is private to its user.
    pub fn open(config: &StageConfig, job: Option<u32>, quiet: bool) -> Result<Area> {
        let uid = berth_sys::identity::effective_uid();
        let base = &config.dir;
        check_base(base, uid)?;
        let dir = base.join(uid.to_string());
        make_private_dir(&dir)?;
        let meta = fs::symlink_metadata(&dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            return Err(stage_error(format!(
                "{} must be a directory of uid {uid} with mode 0700 (it is uid {}, mode {:o}); \
                 berth keeps staged data private: ask the admin to remove it",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        let max_total = match config.max_total.trim() {
            "" => None,
            text => Some(parse_size(text)?),
        };
        Ok(Area {
            base: base.clone(),
            dir,
            uid,
            job,
            after_job: config.after_job,
            max_user: parse_size(&config.max_user)?,
            max_total,
            reserve: parse_size(&config.reserve)?,
            threads: config.threads.max(1),
            quiet,
        })
    }

    /// Job N's part of the user's directory.
    fn job_dir(&self) -> Option<PathBuf> {
        self.job.map(|job| self.dir.join(format!("job-{job}")))
    }

    /// Where the copy of the source `key` lives: the job's part when the job's data is
    /// removed at its end, else the user's directory, kept for later jobs.
    fn entry_path(&self, key: &str) -> PathBuf {
        match (self.after_job, self.job_dir()) {
            (AfterJob::Remove, Some(job_dir)) => job_dir.join(key),
            _ => self.dir.join(key),
        }
    }

    /// Stages `src` (absolute) on this node, or reuses an unchanged earlier copy.
    pub fn stage_in(&self, src: &Path) -> Result<Staged> {
        if !src.is_absolute() {
            return Err(stage_error(format!(
                "the source {} is relative; give an absolute path such as $PWD/{}",
                src.display(),
                src.display()
            )));
        }
        let key =
            hex::encode(sha2::Sha256::digest(src.as_os_str().as_encoded_bytes()))[..32].to_owned();
        let entry = self.entry_path(&key);
        let data = entry.join("data");
        // The earlier copy (its manifest and what it lists now) is read while the source is
        // walked: on shared storage the source's walk is the slow part.
        let (walked, earlier) = std::thread::scope(|scope| {
            let earlier = scope.spawn(|| (read_manifest(&entry), copy::walk(&data)));
            (copy::walk(src), earlier.join())
        });
        let manifest = Manifest {
            source: src.to_path_buf(),
            entries: walked?,
        };
        let bytes = copy::data_size(&manifest.entries);
        let scratch = match self.job_dir() {
            Some(job_dir) => {
                make_private_dir(&job_dir)?;
                job_dir
            }
            None => self.dir.clone(),
        };
        let unchanged = match earlier {
            Ok((Some(earlier), Ok(found))) => earlier == manifest && copy_intact(&found, &manifest),
            _ => false,
        };
        if unchanged {
            self.mark_in_use(&key)?;
            // Marks it used, for least-recently-used eviction.
            let _ = fs::File::open(&entry).and_then(|d| d.set_modified(SystemTime::now()));
            progress_note(self.quiet, &format!("{}: unchanged, reused", src.display()));
            return Ok(Staged {
                path: data,
                reused: true,
                bytes,
            });
        }
        // A stage killed outside a job (SIGKILL, a node crash) leaves its temporary copy in
        // the user's directory, where no epilog removes it.
        remove_leftovers(&self.dir);
        self.make_room(bytes, &key, src)?;
        let tmp = scratch.join(format!(".tmp-{key}-{}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        // Held until the copy is published and the old one removed (the lock moves with the
        // directory when it is renamed into place): a copy in progress is locked, a
        // leftover is not.
        let _in_progress = lock_dir(&tmp)?;
        let done = self
            .copy_into(src, &tmp.join("data"), &manifest.entries)
            .and_then(|()| write_manifest(&tmp, &manifest))
            .and_then(|()| self.mark_in_use(&key))
            .and_then(|()| publish(&tmp, &entry));
        if done.is_err() {
            let _ = remove(&tmp);
        }
        let recorded = self.record_usage();
        done?;
        recorded?;
        Ok(Staged {
            path: data,
            reused: false,
            bytes,
        })
    }

    /// Records that the job binds the kept copy `key`, so no other stage evicts it while
    /// the job runs (the job epilog removes the record with the job's part).
    fn mark_in_use(&self, key: &str) -> Result<()> {
        let (AfterJob::Keep, Some(job_dir)) = (self.after_job, self.job_dir()) else {
            return Ok(());
        };
        let uses = job_dir.join("uses");
        make_private_dir(&uses)?;
        let mark = uses.join(key);
        fs::write(&mark, b"").map_err(|e| Error::io(format!("writing {}", mark.display()), e))
    }

    fn copy_into(&self, src: &Path, dst: &Path, entries: &[Entry]) -> Result<()> {
        let progress = Mutex::new(Progress::new(
            format!("staging {}", src.display()),
            copy::data_size(entries),
            self.quiet,
        ));
        copy::copy(src, dst, entries, self.threads, &progress).map_err(|e| match e {
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                stage_error(format!(
                    "the stage area {} filled up while {} was copied (other stages, or more \
                     files or inodes than the sizes showed); nothing was kept. Stage again \
                     later or stage less, or ask the admin for room ([stage] reserve)",
                    self.base.display(),
                    src.display()
                ))
            }
            e => e,
        })?;
        progress
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .finish();
        Ok(())
    }

    /// The copies the user holds on this node (kept and the running jobs' own).
    fn holdings(&self) -> Result<Vec<Held>> {
        let mut in_use = std::collections::HashSet::new();
        let mut held = Vec::new();
        let scan = |dir: &Path, kept: bool, held: &mut Vec<Held>| {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Copies in progress are not held yet.
                if name.starts_with('.') {
                    continue;
                }
                if let Some(manifest) = read_manifest(&e.path()) {
                    held.push(Held {
                        path: e.path(),
                        bytes: copy::data_size(&manifest.entries),
                        last_used: e
                            .metadata()
                            .and_then(|m| m.modified())
                            .unwrap_or(SystemTime::UNIX_EPOCH),
                        evictable: kept,
                        key: name,
                    });
                }
            }
        };
        scan(&self.dir, true, &mut held);
        for e in fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("job-") {
                scan(&e.path(), false, &mut held);
                for mark in fs::read_dir(e.path().join("uses"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    in_use.insert(mark.file_name().to_string_lossy().into_owned());
                }
            }
        }
        for h in &mut held {
            h.evictable &= !in_use.contains(&h.key);
        }
        Ok(held)
    }

    /// Bytes the other users have staged on this node, from their `.usage-<uid>` records:
    /// each believed only from a regular file its uid owns, opened without following a link
    /// and without blocking (another user's FIFO must not hang the stage), read up to 32
    /// bytes.
    fn others_usage(&self) -> u64 {
        let record = |e: fs::DirEntry| -> Option<u64> {
            let name = e.file_name();
            let uid: u32 = name.to_str()?.strip_prefix(".usage-")?.parse().ok()?;
            if uid == self.uid {
                return None;
            }
            let file = fs::File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(e.path())
                .ok()?;
            let meta = file.metadata().ok()?;
            if meta.uid() != uid || !meta.is_file() {
                return None;
            }
            let mut text = String::new();
            file.take(32).read_to_string(&mut text).ok()?;
            text.trim().parse().ok()
        };
        fs::read_dir(&self.base)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(record)
            .sum()
    }

    /// Writes the user's `.usage-<uid>` record (complete, by rename). Where it cannot (say,
    /// another user took the name first) the stage goes on, saying so: the record only
    /// informs other users' total check.
    fn record_usage(&self) -> Result<()> {
        let used: u64 = self.holdings()?.iter().map(|h| h.bytes).sum();
        let record = self.base.join(format!(".usage-{}", self.uid));
        let tmp = self
            .base
            .join(format!(".usage-{}.{}", self.uid, std::process::id()));
        // A new file (O_EXCL), so a link another user planted under the name is not followed.
        let written = fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .and_then(|mut f| f.write_all(used.to_string().as_bytes()))
            .and_then(|()| fs::rename(&tmp, &record));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            progress_note(
                self.quiet,
                &format!(
                    "warning: could not record your staged total in {}: {e}; ask the admin \
                     to remove it if another user made it",
                    record.display()
                ),
            );
        }
        Ok(())
    }

    /// Makes room for a stage of `bytes` (the source `src`, key `key`): refuses one that
    /// does not fit under `[stage] max_user`, `max_total` and the free space less `reserve`
    /// even with every evictable copy gone, before anything is copied or evicted; else
    /// evicts the least recently used kept copies until it fits.
    fn make_room(&self, bytes: u64, key: &str, src: &Path) -> Result<()> {
        let target = self.entry_path(key);
        // The earlier copy of the same source is replaced: it does not count.
        let mut held: Vec<Held> = self
            .holdings()?
            .into_iter()
            .filter(|h| h.path != target)
            .collect();
        let used: u64 = held.iter().map(|h| h.bytes).sum();
        let evictable: u64 = held.iter().filter(|h| h.evictable).map(|h| h.bytes).sum();
        let others = self.max_total.map(|_| self.others_usage()).unwrap_or(0);
        let free = berth_sys::statfs::available_bytes(&self.dir)
            .map_err(|e| Error::io(format!("checking free space in {}", self.dir.display()), e))?;
        let what = format!("staging {} ({})", src.display(), format_size(bytes));
        let over_user = (used + bytes).saturating_sub(self.max_user);
        if over_user > evictable {
            return Err(stage_error(format!(
                "{what} would take your staged data on this node to {}, over the limit of {} \
                 ([stage] max_user){}; remove what you no longer need with `berth stage \
                 clean`, or stage less",
                format_size(used + bytes),
                format_size(self.max_user),
                in_use_note(used, evictable),
            )));
        }
        let over_total = self
            .max_total
            .map_or(0, |max| (others + used + bytes).saturating_sub(max));
        if over_total > evictable {
            return Err(stage_error(format!(
                "{what} would take all users' staged data on this node to {} ({} of it other \
                 users'), over the limit of {} ([stage] max_total){}; stage less, wait for \
                 other jobs to end, or ask the admin for room",
                format_size(others + used + bytes),
                format_size(others),
                format_size(self.max_total.unwrap_or_default()),
                in_use_note(used, evictable),
            )));
        }
        let short = (bytes + self.reserve).saturating_sub(free);
        if short > evictable {
            return Err(stage_error(format!(
                "{what} does not fit in the stage area: {} free, of which {} is kept free \
                 ([stage] reserve){}; stage less, or ask the admin for room",
                format_size(free),
                format_size(self.reserve),
                in_use_note(used, evictable),
            )));
        }
        let mut need = over_user.max(over_total).max(short);
        held.retain(|h| h.evictable);
        held.sort_by_key(|h| h.last_used);
        for h in held {
            if need == 0 {
                break;
            }
            progress_note(
                self.quiet,
                &format!(
                    "evicting {} ({}), least recently used, to make room",
                    h.path.display(),
                    format_size(h.bytes)
                ),
            );
            remove(&h.path)?;
            need = need.saturating_sub(h.bytes);
        }
        Ok(())
    }

    /// Removes everything the user has staged on this node.
    pub fn clean(&self) -> Result<()> {
        for entry in fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?
            .flatten()
        {
            remove(&entry.path())?;
        }
        self.record_usage()
    }
}

/// Removes job `job`'s part of the calling user's stage area (the job epilog, as the job's
/// user): copies in progress, its copies with `after_job = "remove"`, its in-use records.
/// Nothing to do where the user never staged.
pub fn clean_job(config: &StageConfig, job: u32) -> Result<()> {
    let uid = berth_sys::identity::effective_uid();
    let job_dir = config.dir.join(uid.to_string()).join(format!("job-{job}"));
    if fs::symlink_metadata(&job_dir).is_err() {
        return Ok(());
    }
    let area = Area::open(config, Some(job), true)?;
    remove(&job_dir)?;
    area.record_usage()
}

/// The area itself: root's, and sticky where others can write it.
fn check_base(base: &Path, uid: u32) -> Result<()> {
    if !base.is_dir() {
        return Err(stage_error(format!(
            "the stage area {} does not exist; ask the admin to create it (mode 1777, like \
             /var/tmp) or set [stage] dir",
            base.display()
        )));
    }
    // Whoever owns the area's directory can remove everything in it, sticky bit or not:
    // only root (or the caller, for a private area) may.
    let meta =
        fs::metadata(base).map_err(|e| Error::io(format!("reading {}", base.display()), e))?;
    let open_to_others = meta.mode() & 0o022 != 0;
    if (meta.uid() != 0 && meta.uid() != uid) || (open_to_others && meta.mode() & 0o1000 == 0) {
        return Err(stage_error(format!(
            "the stage area {} is owned by uid {} with mode {:o}; it must be root's, and \
             sticky if others can write it (fix: chown root:root, chmod 1777)",
            base.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Creates `dir` (0700) unless it is there.
fn make_private_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => {
            Err(Error::io(format!("creating {}", dir.display()), e))
        }
        _ => Ok(()),
    }
}

/// The part of a refusal that says how much of the user's data running jobs hold.
fn in_use_note(used: u64, evictable: u64) -> String {
    if used > evictable {
        format!(
            " ({} of yours is bound by running jobs and cannot be evicted)",
            format_size(used - evictable)
        )
    } else {
        String::new()
    }
}

/// Copies `src` (node-local results) to `dst`, replacing what is there only once the copy
/// is complete: a failed copy leaves `dst` as it was.
pub fn stage_out(src: &Path, dst: &Path, threads: usize, quiet: bool) -> Result<u64> {
    let entries = copy::walk(src)?;
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dst.file_name().ok_or_else(|| {
        stage_error(format!(
            "the destination {} names no file or directory",
            dst.display()
        ))
    })?;
    let tmp = parent.join(format!(
        ".{}.berth-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let progress = Mutex::new(Progress::new(
        format!("staging out {} to {}", src.display(), dst.display()),
        copy::data_size(&entries),
        quiet,
    ));
    let done = copy::copy(src, &tmp, &entries, threads.max(1), &progress)
        .and_then(|()| publish(&tmp, dst));
    if done.is_err() {
        let _ = remove(&tmp);
    }
    done?;
    progress
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .finish();
    Ok(copy::data_size(&entries))
}

/// Takes an exclusive `flock` on the directory `dir`, for as long as the returned file lives.
fn lock_dir(dir: &Path) -> Result<fs::File> {
    let file =
        fs::File::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
    file.lock()
        .map_err(|e| Error::io(format!("locking {}", dir.display()), e))?;
    Ok(file)
}

/// True when `path` exists and a live stage holds its lock (see [`lock_dir`]).
fn locked(path: &Path) -> bool {
    fs::File::open(path).is_ok_and(|f| f.try_lock().is_err())
}

/// Removes what killed stages left in `dir`: temporary copies (`.tmp-KEY-PID`) no stage
/// holds, and earlier copies moved aside by [`publish`] (`.KEY.old-PID`) whose stage is gone:
/// its temporary copy, or the entry it became, unlocked. Best effort: a leftover that cannot
/// be removed costs disk, never this stage.
fn remove_leftovers(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = if name.starts_with(".tmp-") {
            !locked(&entry.path())
        } else if let Some((key, pid)) = name
            .strip_prefix('.')
            .and_then(|rest| rest.rsplit_once(".old-"))
        {
            let tmp = dir.join(format!(".tmp-{key}-{pid}"));
            let owner = if tmp.exists() { tmp } else { dir.join(key) };
            !locked(&owner)
        } else {
            false
        };
        if stale {
            if let Err(e) = remove(&entry.path()) {
                progress_note(false, &format!("warning: {e}; remove it by hand"));
            }
        }
    }
}

/// Puts the complete `tmp` at `dst` by rename; an older `dst` is moved aside first and
/// removed after, so `dst` is at every moment either the old or the new copy, or absent.
fn publish(tmp: &Path, dst: &Path) -> Result<()> {
    let old = dst.with_file_name(format!(
        ".{}.old-{}",
        dst.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let had_old = match fs::rename(dst, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(format!("replacing {}", dst.display()), e)),
    };
    fs::rename(tmp, dst).map_err(|e| Error::io(format!("publishing {}", dst.display()), e))?;
    if had_old {
        remove(&old)?;
    }
    Ok(())
}

/// The copy (`found`, its listing now) still lists as the manifest says (links' own times
/// aside, which copies do not keep): a copy changed on the node since is copied again, not
/// reused.
fn copy_intact(found: &[Entry], manifest: &Manifest) -> bool {
    found.len() == manifest.entries.len()
        && found.iter().zip(&manifest.entries).all(|(a, b)| {
            a.path == b.path
                && a.kind == b.kind
                && a.size == b.size
                && (matches!(a.kind, copy::Kind::Symlink { .. })
                    || (a.mode, a.mtime, a.mtime_nsec) == (b.mode, b.mtime, b.mtime_nsec))
        })
}

fn read_manifest(entry: &Path) -> Option<Manifest> {
    let text = fs::read(entry.join("manifest.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = dir.join("manifest.json");
    let text = serde_json::to_vec(manifest).map_err(|e| stage_error(e.to_string()))?;
    fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Removes a file or tree this user staged, making read-only directories writable first.
/// What is already gone, or goes meanwhile (another job's epilog or `berth stage clean`
/// removing the same), counts as removed.
fn remove(path: &Path) -> Result<()> {
    let io = |e| Error::io(format!("removing {}", path.display()), e);
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let gone = |result: std::io::Result<()>| match result {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other.map_err(io),
    };
    if !meta.is_dir() {
        return gone(fs::remove_file(path));
    }
    gone(fs::set_permissions(path, fs::Permissions::from_mode(0o700)))?;
    let children = match fs::read_dir(path) {
        Ok(children) => children,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    for child in children.flatten() {
        remove(&child.path())?;
    }
    gone(fs::remove_dir(path))
}

fn progress_note(quiet: bool, message: &str) {
    crate::registry::progress::note(quiet, message);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max_user: &str) -> StageConfig {
        StageConfig {
            dir: dir.to_path_buf(),
            max_user: max_user.into(),
            max_total: String::new(),
            reserve: "0".into(),
            threads: 4,
            after_job: AfterJob::Keep,
        }
    }

    fn source(root: &Path) -> PathBuf {
        source_named(root, "src")
    }

    /// A tree of 50 files of 1000 bytes (50,000 bytes of data).
    fn source_named(root: &Path, name: &str) -> PathBuf {
        let src = root.join(name);
        fs::create_dir_all(src.join("d")).unwrap();
        for i in 0..50 {
            fs::write(src.join(format!("d/{i}")), vec![i as u8; 1000]).unwrap();
        }
        src
    }

    #[test]
    fn stages_privately_then_reuses_until_the_source_changes() {
        let dir = tempfile::tempdir().unwrap();
        let area_dir = dir.path().join("area");
        fs::create_dir(&area_dir).unwrap();
        let src = source(dir.path());
        let area = Area::open(&config(&area_dir, "1M"), None, true).unwrap();
        let first = area.stage_in(&src).unwrap();
        assert!(!first.reused);
        assert_eq!(first.bytes, 50_000);
        assert_eq!(fs::read(first.path.join("d/7")).unwrap(), vec![7u8; 1000]);
        let user_dir = first.path.parent().unwrap().parent().unwrap();
        assert_eq!(fs::metadata(user_dir).unwrap().mode() & 0o777, 0o700);

        let second = area.stage_in(&src).unwrap();
        assert!(second.reused);
        assert_eq!(second.path, first.path);

        fs::write(src.join("d/new"), b"more").unwrap();
        let third = area.stage_in(&src).unwrap();
        assert!(!third.reused);
        assert_eq!(fs::read(third.path.join("d/new")).unwrap(), b"more");

        // A copy changed on the node is not reused either.
        fs::write(third.path.join("d/7"), b"changed").unwrap();
        let fourth = area.stage_in(&src).unwrap();
        assert!(!fourth.reused);
        assert_eq!(fs::read(fourth.path.join("d/7")).unwrap(), vec![7u8; 1000]);
        // Nothing temporary or old is left beside the entry.
        let names: Vec<_> = fs::read_dir(user_dir).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn the_least_recently_used_kept_copy_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            source_named(dir.path(), "a"),
            source_named(dir.path(), "b"),
            source_named(dir.path(), "c"),
        );
        let area_dir = dir.path().join("area");
        fs::create_dir(&area_dir).unwrap();
        let area = Area::open(&config(&area_dir, "120K"), None, true).unwrap();
        let a_copy = area.stage_in(&a).unwrap().path;
        let b_copy = area.stage_in(&b).unwrap().path;
        // a is used again, so b is now the least recently used.
        assert!(area.stage_in(&a).unwrap().reused);
        assert!(!area.stage_in(&c).unwrap().reused);
        assert!(a_copy.exists());
        assert!(!b_copy.exists());
        let usage = area_dir.join(format!(".usage-{}", area.uid));
        assert_eq!(fs::read_to_string(usage).unwrap(), "100000");
    }

    #[test]
    fn a_copy_a_running_job_binds_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (source_named(dir.path(), "a"), source_named(dir.path(), "b"));
        let conf = config(dir.path(), "80K");
        let job1 = Area::open(&conf, Some(1), true).unwrap();
        let a_copy = job1.stage_in(&a).unwrap().path;
        let job2 = Area::open(&conf, Some(2), true).unwrap();
        let msg = job2.stage_in(&b).unwrap_err().to_string();
        assert!(msg.contains("bound by running jobs"), "{msg}");
        assert!(a_copy.exists());
        // Job 1 ends: its copy stays for reuse, but may now make room.
        clean_job(&conf, 1).unwrap();
        assert!(a_copy.exists());
        assert!(!job2.stage_in(&b).unwrap().reused);
        assert!(!a_copy.exists());
    }

    #[test]
    fn with_after_job_remove_a_jobs_copies_go_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let conf = StageConfig {
            after_job: AfterJob::Remove,
            ..config(dir.path(), "1M")
        };
        let area = Area::open(&conf, Some(7), true).unwrap();
        let staged = area.stage_in(&src).unwrap();
        assert!(staged.path.starts_with(area.dir.join("job-7")));
        // Another step of the same job reuses it.
        assert!(area.stage_in(&src).unwrap().reused);
        clean_job(&conf, 7).unwrap();
        assert_eq!(fs::read_dir(&area.dir).unwrap().count(), 0);
        // A job that never staged: nothing to do.
        clean_job(&conf, 8).unwrap();
    }

    #[test]
    fn over_the_total_limit_is_refused_before_copying() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let conf = StageConfig {
            max_total: "100K".into(),
            ..config(dir.path(), "1M")
        };
        // Another user's record, believed only from a file that user owns.
        let other = dir.path().join(".usage-4242");
        fs::write(&other, "80000").unwrap();
        // A FIFO under a record's name is skipped, not waited on.
        let fifo = dir.path().join(".usage-4243");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let area = Area::open(&conf, None, true).unwrap();
        if area.uid == 0 {
            std::os::unix::fs::chown(&other, Some(4242), None).unwrap();
            std::os::unix::fs::chown(&fifo, Some(4243), None).unwrap();
            let msg = area.stage_in(&src).unwrap_err().to_string();
            assert!(msg.contains("[stage] max_total"), "{msg}");
            assert_eq!(fs::read_dir(&area.dir).unwrap().count(), 0);
        }
        // A record its uid does not own counts for nothing.
        std::os::unix::fs::chown(&other, Some(area.uid), None).unwrap();
        assert!(area.stage_in(&src).is_ok());
    }

    #[test]
    fn over_the_user_limit_is_refused_before_copying() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let area = Area::open(&config(dir.path(), "10K"), None, true).unwrap();
        let msg = area.stage_in(&src).unwrap_err().to_string();
        assert!(msg.contains("[stage] max_user"), "{msg}");
        let user_dir = dir
            .path()
            .join(berth_sys::identity::effective_uid().to_string());
        assert_eq!(fs::read_dir(user_dir).unwrap().count(), 0);
    }

    #[test]
    fn a_failed_copy_leaves_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let area = Area::open(&config(dir.path(), "1M"), None, true).unwrap();
        // A FIFO cannot be staged: refused while listing, before any copy.
        let status = std::process::Command::new("mkfifo")
            .arg(src.join("d/pipe"))
            .status()
            .unwrap();
        assert!(status.success());
        assert!(area.stage_in(&src).is_err());
        let user_dir = dir
            .path()
            .join(berth_sys::identity::effective_uid().to_string());
        assert_eq!(fs::read_dir(user_dir).unwrap().count(), 0);
    }

    /// A stage killed while copying leaves its temporary copy, and one killed between
    /// publish's two renames the earlier copy moved aside: the next stage removes both, and
    /// leaves a copy another stage is making alone.
    #[test]
    fn a_killed_stages_leftovers_go_with_the_next_stage() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let area = Area::open(&config(dir.path(), "1M"), None, true).unwrap();
        let user_dir = dir
            .path()
            .join(berth_sys::identity::effective_uid().to_string());
        let leftover = |name: &str| {
            let path = user_dir.join(name);
            fs::create_dir_all(path.join("data/d")).unwrap();
            fs::write(path.join("data/d/f"), b"partial").unwrap();
            path
        };
        let killed_copying = leftover(".tmp-aaaa-4000001");
        let killed_publishing = leftover(".tmp-bbbb-4000002");
        let moved_aside = leftover(".bbbb.old-4000002");
        let live = leftover(".tmp-cccc-4000003");
        let _live_lock = lock_dir(&live).unwrap();

        let staged = area.stage_in(&src).unwrap();
        assert!(!staged.reused);
        for gone in [&killed_copying, &killed_publishing, &moved_aside] {
            assert!(!gone.exists(), "{} left", gone.display());
        }
        assert!(live.exists(), "a copy in progress was removed");
    }

    #[test]
    fn a_relative_source_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let area = Area::open(&config(dir.path(), "1M"), None, true).unwrap();
        let msg = area.stage_in(Path::new("data")).unwrap_err().to_string();
        assert!(msg.contains("$PWD/data"), "{msg}");
    }

    #[test]
    fn a_world_writable_area_without_the_sticky_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let msg = Area::open(&config(dir.path(), "1M"), None, true)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("chmod 1777"), "{msg}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(Area::open(&config(dir.path(), "1M"), None, true).is_ok());
    }

    #[test]
    fn an_area_open_to_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir
            .path()
            .join(berth_sys::identity::effective_uid().to_string());
        fs::create_dir(&mine).unwrap();
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o755)).unwrap();
        let msg = Area::open(&config(dir.path(), "1M"), None, true)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("mode 0700"), "{msg}");
    }

    #[test]
    fn stage_out_replaces_the_destination_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let dst = dir.path().join("results");
        fs::create_dir(&dst).unwrap();
        fs::write(dst.join("old"), b"old").unwrap();
        assert_eq!(stage_out(&src, &dst, 4, true).unwrap(), 50_000);
        assert!(!dst.join("old").exists());
        assert_eq!(fs::read(dst.join("d/3")).unwrap(), vec![3u8; 1000]);
        // A failing copy (a FIFO in the results) keeps the earlier results.
        let status = std::process::Command::new("mkfifo")
            .arg(src.join("pipe"))
            .status()
            .unwrap();
        assert!(status.success());
        assert!(stage_out(&src, &dst, 4, true).is_err());
        assert_eq!(fs::read(dst.join("d/3")).unwrap(), vec![3u8; 1000]);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn two_removals_of_one_tree_at_once_both_succeed() {
        // Two epilogs (or an epilog and `berth stage clean`) emptying the same directory:
        // whichever removes an entry first, the other must not fail on it.
        for round in 0..5 {
            let tmp = tempfile::tempdir().unwrap();
            let tree = tmp.path().join("tree");
            for d in 0..20 {
                let dir = tree.join(format!("d{d}"));
                fs::create_dir_all(&dir).unwrap();
                for f in 0..50 {
                    fs::write(dir.join(format!("f{f}")), b"x").unwrap();
                }
            }
            let results: Vec<Result<()>> = std::thread::scope(|s| {
                let both = [s.spawn(|| remove(&tree)), s.spawn(|| remove(&tree))];
                both.map(|h| h.join().unwrap()).into()
            });
            for r in results {
                assert!(r.is_ok(), "round {round}: {}", r.unwrap_err());
            }
            assert!(!tree.exists());
        }
    }
}
