//! Data staging: copies of a user's files on node-local storage (`berth stage in`), and
//! results copied back (`berth stage out`).
//!
//! Layout under `[stage] dir` (a sticky, world-writable directory such as /var/tmp):
//!
//! ```text
//! <uid>/                      one per user, 0700, owned by the user (refused otherwise)
//! <uid>/<KEY>/data            the staged copy of one source (a file or a tree)
//! <uid>/<KEY>/manifest.json   the source path and its entries (paths, kinds, modes, sizes,
//!                             mtimes) when it was copied
//! <uid>/.tmp-<KEY>-<pid>/     a copy in progress (private; removed on any failure)
//! ```
//!
//! `KEY` is the first 32 hex digits of the SHA-256 of the source's absolute path.
//!
//! - berth stages as the user who asks, never as root: what is copied is what the user can
//!   read, and a source they cannot read fails before anything is visible.
//! - Unchanged data is reused: the source is walked (metadata only) and its entries compared
//!   with the manifest; equal means no copy.
//! - A copy appears by `rename` of the complete temporary directory, so a failed copy (disk
//!   full, an unreadable file, a file changing underneath) leaves nothing partial visible.
//! - Limits are checked before copying: the user's staged data (`[stage] max_user`) and the
//!   free space of the file system less `[stage] reserve` (the total every user shares; give
//!   the stage area a file system of its own to bound it exactly).

mod copy;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::cache::{format_size, parse_size};
use crate::config::StageConfig;
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

/// One user's part of the stage area.
pub struct Area {
    dir: PathBuf,
    max_user: u64,
    reserve: u64,
    threads: usize,
    quiet: bool,
}

impl Area {
    /// Opens (creating if needed) the calling user's area. Refuses an area owned by anyone
    /// else or open to others: staged data is private to its user.
    pub fn open(config: &StageConfig, quiet: bool) -> Result<Area> {
        let uid = berth_sys::identity::effective_uid();
        let base = &config.dir;
        if !base.is_dir() {
            return Err(stage_error(format!(
                "the stage area {} does not exist; ask the admin to create it (mode 1777, like \
                 /var/tmp) or set [stage] dir",
                base.display()
            )));
        }
        // Whoever owns the area's directory can remove everything in it, sticky bit or not:
        // only root (or the caller, for a private area) may.
        let base_meta =
            fs::metadata(base).map_err(|e| Error::io(format!("reading {}", base.display()), e))?;
        let open_to_others = base_meta.mode() & 0o022 != 0;
        if (base_meta.uid() != 0 && base_meta.uid() != uid)
            || (open_to_others && base_meta.mode() & 0o1000 == 0)
        {
            return Err(stage_error(format!(
                "the stage area {} is owned by uid {} with mode {:o}; it must be root's, and \
                 sticky if others can write it (fix: chown root:root, chmod 1777)",
                base.display(),
                base_meta.uid(),
                base_meta.mode() & 0o7777
            )));
        }
        let dir = base.join(uid.to_string());
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
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
        Ok(Area {
            dir,
            max_user: parse_size(&config.max_user)?,
            reserve: parse_size(&config.reserve)?,
            threads: config.threads.max(1),
            quiet,
        })
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
        let entry = self.dir.join(&key);
        let manifest = Manifest {
            source: src.to_path_buf(),
            entries: copy::walk(src)?,
        };
        let bytes = copy::data_size(&manifest.entries);
        let data = entry.join("data");
        if read_manifest(&entry).as_ref() == Some(&manifest) && copy_intact(&data, &manifest) {
            // Marks it used, for least-recently-used clean-up.
            let _ = fs::File::open(&entry).and_then(|d| d.set_modified(SystemTime::now()));
            progress_note(self.quiet, &format!("{}: unchanged, reused", src.display()));
            return Ok(Staged {
                path: data,
                reused: true,
                bytes,
            });
        }
        self.check_room(bytes, &key, src)?;
        let tmp = self.dir.join(format!(".tmp-{key}-{}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let done = self
            .copy_into(src, &tmp.join("data"), &manifest.entries)
            .and_then(|()| write_manifest(&tmp, &manifest))
            .and_then(|()| publish(&tmp, &entry));
        if done.is_err() {
            let _ = remove(&tmp);
        }
        done?;
        Ok(Staged {
            path: data,
            reused: false,
            bytes,
        })
    }

    fn copy_into(&self, src: &Path, dst: &Path, entries: &[Entry]) -> Result<()> {
        let progress = Mutex::new(Progress::new(
            format!("staging {}", src.display()),
            copy::data_size(entries),
            self.quiet,
        ));
        copy::copy(src, dst, entries, self.threads, &progress)?;
        progress
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .finish();
        Ok(())
    }

    /// Refuses a stage of `bytes` that would take the user over `[stage] max_user`, or the
    /// file system below `[stage] reserve`, before anything is copied.
    fn check_room(&self, bytes: u64, key: &str, src: &Path) -> Result<()> {
        let used: u64 = fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?
            .flatten()
            .filter(|e| e.file_name().to_str() != Some(key))
            .filter_map(|e| read_manifest(&e.path()))
            .map(|m| copy::data_size(&m.entries))
            .sum();
        if used.saturating_add(bytes) > self.max_user {
            return Err(stage_error(format!(
                "staging {} ({}) would take your staged data on this node to {}, over the \
                 limit of {} ([stage] max_user); remove what you no longer need with \
                 `berth stage clean`, or stage less",
                src.display(),
                format_size(bytes),
                format_size(used.saturating_add(bytes)),
                format_size(self.max_user)
            )));
        }
        let free = berth_sys::statfs::available_bytes(&self.dir)
            .map_err(|e| Error::io(format!("checking free space in {}", self.dir.display()), e))?;
        if bytes.saturating_add(self.reserve) > free {
            return Err(stage_error(format!(
                "staging {} ({}) does not fit in the stage area: {} free, of which {} is kept \
                 free ([stage] reserve); stage less, or ask the admin for room",
                src.display(),
                format_size(bytes),
                format_size(free),
                format_size(self.reserve)
            )));
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
        Ok(())
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(format!("replacing {}", dst.display()), e)),
    };
    fs::rename(tmp, dst).map_err(|e| Error::io(format!("publishing {}", dst.display()), e))?;
    if had_old {
        remove(&old)?;
    }
    Ok(())
}

/// The copy still lists as the manifest says (links' own times aside, which copies do not
/// keep): a copy changed on the node since is copied again, not reused.
fn copy_intact(data: &Path, manifest: &Manifest) -> bool {
    let Ok(found) = copy::walk(data) else {
        return false;
    };
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
fn remove(path: &Path) -> Result<()> {
    let io = |e| Error::io(format!("removing {}", path.display()), e);
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return fs::remove_file(path).map_err(io);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io)?;
    for child in fs::read_dir(path).map_err(io)?.flatten() {
        remove(&child.path())?;
    }
    fs::remove_dir(path).map_err(io)
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
            reserve: "0".into(),
            threads: 4,
        }
    }

    fn source(root: &Path) -> PathBuf {
        let src = root.join("src");
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
        let area = Area::open(&config(&area_dir, "1M"), true).unwrap();
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
    fn over_the_user_limit_is_refused_before_copying() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let area = Area::open(&config(dir.path(), "10K"), true).unwrap();
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
        let area = Area::open(&config(dir.path(), "1M"), true).unwrap();
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

    #[test]
    fn a_relative_source_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let area = Area::open(&config(dir.path(), "1M"), true).unwrap();
        let msg = area.stage_in(Path::new("data")).unwrap_err().to_string();
        assert!(msg.contains("$PWD/data"), "{msg}");
    }

    #[test]
    fn a_world_writable_area_without_the_sticky_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let msg = Area::open(&config(dir.path(), "1M"), true)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("chmod 1777"), "{msg}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(Area::open(&config(dir.path(), "1M"), true).is_ok());
    }

    #[test]
    fn an_area_open_to_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir
            .path()
            .join(berth_sys::identity::effective_uid().to_string());
        fs::create_dir(&mine).unwrap();
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o755)).unwrap();
        let msg = Area::open(&config(dir.path(), "1M"), true)
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
}
