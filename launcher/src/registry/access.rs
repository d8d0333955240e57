//! Who may be served a cached image: an image a user's own login pulled is served to another
//! user only once the registry confirms that user's access.
//!
//! A node pulls with the site's credentials (`[registry] auth_file`). Where the site has none
//! for a registry and allows users' own (`[registry] user_credentials`), root fetching for a
//! job step pulls with the job user's login instead (their podman/docker login file, read
//! with their rights). Such an entry gets a record, `access/<entry>` in the cache, written
//! before the image is built: `user UID`. A hit on it by anyone but that user asks the
//! registry first, with the requesting user's credentials (the site's where it now has
//! some, else their own login, else none), for the manifest by digest; only an answer with
//! the manifest serves the image. Entries pulled with the site's credentials or
//! anonymously have no record: anyone the policy allows may run them, as before.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Whose credentials pulled an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Puller {
    /// The site's (`auth_file`), or none at all: anyone the policy allows may run it.
    Site,
    /// This user's own login.
    User(u32),
}

/// The directory of records, in the cache.
fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("access")
}

/// The record of the cache entry `sif` (its file name without `.sif`).
fn record_path(cache_dir: &Path, sif: &Path) -> PathBuf {
    let name = sif.file_stem().unwrap_or_default();
    dir(cache_dir).join(name)
}

/// Records who pulls the entry `sif` is about to become (before it is built, so it never
/// exists without its record). A site pull removes an earlier user record: the entry is
/// now what the site's credentials read.
pub fn record(cache_dir: &Path, sif: &Path, puller: Puller) -> Result<()> {
    let path = record_path(cache_dir, sif);
    let uid = match puller {
        Puller::Site => {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", path.display()), e))
                }
                _ => Ok(()),
            }
        }
        Puller::User(uid) => uid,
    };
    let records = dir(cache_dir);
    match fs::create_dir(&records) {
        Ok(()) => fs::set_permissions(&records, fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(format!("chmod {}", records.display()), e))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", records.display()), e)),
    }
    check_dir(cache_dir, &records)?;
    let tmp = records.join(format!(".{}.tmp", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    file.write_all(format!("user {uid}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Who pulled the entry `sif`: its record, or the site where it has none.
pub fn puller(cache_dir: &Path, sif: &Path) -> Result<Puller> {
    let path = record_path(cache_dir, sif);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Puller::Site),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    check_dir(cache_dir, &dir(cache_dir))?;
    text.trim()
        .strip_prefix("user ")
        .and_then(|uid| uid.parse().ok())
        .map(Puller::User)
        .ok_or_else(|| Error::Cache {
            message: format!("unreadable record {text:?}; remove it"),
            path,
        })
}

/// Whether `requester` may be served the entry without asking the registry.
pub fn served_without_asking(puller: Puller, requester: u32) -> bool {
    match puller {
        Puller::Site => true,
        // Root asks for itself (an admin's `berth fetch`), or the user whose login pulled it.
        Puller::User(uid) => requester == 0 || requester == uid,
    }
}

/// The records are the cache's writer's alone, like its images (root, or the cache's service
/// user): a record another user could write or remove would decide who runs a private image.
fn check_dir(cache_dir: &Path, records: &Path) -> Result<()> {
    let images = cache_dir.join("images");
    let owner = fs::symlink_metadata(&images)
        .map_err(|e| Error::io(format!("reading {}", images.display()), e))?
        .uid();
    let meta = fs::symlink_metadata(records)
        .map_err(|e| Error::io(format!("reading {}", records.display()), e))?;
    if !meta.is_dir() || meta.uid() != owner || meta.mode() & 0o022 != 0 {
        return Err(Error::Cache {
            path: records.to_path_buf(),
            message: format!(
                "must be a directory owned by the cache's owner (uid {owner}) and writable by \
                 it alone (fix: chown {owner} and chmod 755 it, or remove it)"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_pull_is_recorded_and_a_site_pull_clears_it() {
        let cache = tempfile::tempdir().unwrap();
        fs::set_permissions(cache.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(cache.path().join("images")).unwrap();
        let sif = cache.path().join("images/abc-def.sif");
        assert_eq!(puller(cache.path(), &sif).unwrap(), Puller::Site);
        record(cache.path(), &sif, Puller::User(1100)).unwrap();
        assert_eq!(puller(cache.path(), &sif).unwrap(), Puller::User(1100));
        let mode = fs::metadata(cache.path().join("access/abc-def"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        record(cache.path(), &sif, Puller::Site).unwrap();
        assert_eq!(puller(cache.path(), &sif).unwrap(), Puller::Site);
    }

    #[test]
    fn only_the_puller_and_root_are_served_without_asking() {
        assert!(served_without_asking(Puller::Site, 1101));
        assert!(served_without_asking(Puller::User(1100), 1100));
        assert!(served_without_asking(Puller::User(1100), 0));
        assert!(!served_without_asking(Puller::User(1100), 1101));
    }

    #[test]
    fn records_others_can_write_are_refused() {
        let cache = tempfile::tempdir().unwrap();
        fs::set_permissions(cache.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(cache.path().join("images")).unwrap();
        let sif = cache.path().join("images/abc-def.sif");
        record(cache.path(), &sif, Puller::User(1100)).unwrap();
        let records = cache.path().join("access");
        fs::set_permissions(&records, fs::Permissions::from_mode(0o777)).unwrap();
        let err = puller(cache.path(), &sif).unwrap_err().to_string();
        assert!(err.contains("writable by it alone"), "{err}");
        fs::write(records.join("abc-def"), "bogus").unwrap();
        fs::set_permissions(&records, fs::Permissions::from_mode(0o755)).unwrap();
        let err = puller(cache.path(), &sif).unwrap_err().to_string();
        assert!(err.contains("unreadable record"), "{err}");
    }
}
