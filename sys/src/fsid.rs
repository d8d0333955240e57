//! File-system identity: looking at paths with a user's rights while root, and opening one
//! path component at a time without following symlinks.
//!
//! Root (the SPANK plugin's node-side launcher call) must not resolve a path a user wrote
//! with its own rights: that would tell the user whether files exist in directories only
//! root can read, and make root trigger automounts. [`as_user`] runs a closure with the
//! user's file-system uid, gid and groups instead, for the calling thread only (the raw
//! system calls act per thread; glibc's wrappers of setgroups would change every thread).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Whose rights a path lookup runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Runs `f` with `user`'s file-system identity on this thread, then restores the previous
/// one (also if `f` panics). Needs root (CAP_SETUID and CAP_SETGID). While `f` runs, the
/// kernel also clears root's file capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, ...),
/// so every lookup gets exactly the user's rights.
pub fn as_user<T>(user: &FsUser, f: impl FnOnce() -> T) -> io::Result<T> {
    let saved = Saved::take()?;
    set_groups(&user.groups)?;
    set_fsgid(user.gid)?;
    set_fsuid(user.uid)?;
    let result = f();
    drop(saved);
    Ok(result)
}

/// The identity to restore; restoring happens on drop.
struct Saved {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<u32>,
}

impl Saved {
    fn take() -> io::Result<Saved> {
        let groups = nix::unistd::getgroups()
            .map_err(io::Error::from)?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        // setfsuid(-1) fails and, like every call of it, returns the current value.
        let fsuid = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(u32::MAX)).as_raw();
        let fsgid = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(u32::MAX)).as_raw();
        Ok(Saved {
            fsuid,
            fsgid,
            groups,
        })
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        // The uid first: it gives back the capabilities the other two need. These cannot
        // fail for a process that could change them in the first place.
        let _ = set_fsuid(self.fsuid);
        let _ = set_fsgid(self.fsgid);
        let _ = set_groups(&self.groups);
    }
}

fn set_fsuid(uid: u32) -> io::Result<()> {
    set_checked(uid, |id| {
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(id)).as_raw()
    })
}

fn set_fsgid(gid: u32) -> io::Result<()> {
    set_checked(gid, |id| {
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(id)).as_raw()
    })
}

/// setfsuid(2) and setfsgid(2) report no error: they return the previous value either way,
/// so a second call tells whether the first took effect.
fn set_checked(id: u32, set: impl Fn(u32) -> u32) -> io::Result<()> {
    set(id);
    if set(id) == id {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// setgroups for this thread only (the raw system call; see the module comment).
fn set_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the kernel reads `groups.len()` gids from a valid slice.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens `name` (one path component, or `/` when `dir` is None) with `O_PATH | O_NOFOLLOW`:
/// a symlink is opened as itself, never followed, so its type shows in the returned fd's
/// metadata. Such an fd can be fstat'ed and used as the directory of the next lookup, and
/// needs no read permission on the file.
pub fn open_path_nofollow(dir: Option<BorrowedFd<'_>>, name: &OsStr) -> io::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(dir.map(|d| d.as_raw_fd()), name, flags, Mode::empty())?;
    // SAFETY: `fd` was returned by a successful openat just above and nothing else holds it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn lookups_get_the_users_rights_and_root_gets_its_own_back() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(private.join("f"), b"x").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = FsUser {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let seen = as_user(&nobody, || std::fs::metadata(private.join("f"))).unwrap();
        assert_eq!(
            seen.unwrap_err().kind(),
            io::ErrorKind::PermissionDenied,
            "root's rights leaked into the user's lookup"
        );
        // This thread gets root's rights back, and another one (started before: a new
        // thread copies its creator's identity) keeps them meanwhile.
        assert!(std::fs::metadata(private.join("f")).is_ok());
        let groups = nix::unistd::getgroups().unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn({
            let f = private.join("f");
            move || {
                wait.recv().unwrap();
                std::fs::metadata(f).is_ok()
            }
        });
        as_user(&nobody, || {
            go.send(()).unwrap();
            assert!(
                other.join().unwrap(),
                "the user's identity reached another thread"
            );
        })
        .unwrap();
        assert_eq!(nix::unistd::getgroups().unwrap(), groups);
    }

    #[test]
    fn a_symlink_is_opened_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        std::os::unix::fs::symlink("file", dir.path().join("link")).unwrap();
        let root = open_path_nofollow(None, OsStr::new("/")).unwrap();
        let mut at = root;
        for part in dir.path().components().skip(1) {
            at = open_path_nofollow(Some(at.as_fd()), part.as_os_str()).unwrap();
        }
        let link = open_path_nofollow(Some(at.as_fd()), OsStr::new("link")).unwrap();
        let meta = File::from(link).metadata().unwrap();
        assert!(meta.file_type().is_symlink());
        let file = open_path_nofollow(Some(at.as_fd()), OsStr::new("file")).unwrap();
        let meta = File::from(file).metadata().unwrap();
        assert!(meta.is_file());
        assert_eq!(
            meta.ino(),
            std::fs::metadata(dir.path().join("file")).unwrap().ino()
        );
    }
}
