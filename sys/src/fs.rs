//! Directory-fd file operations for writing an image tree (the layer unpacker).
//!
//! Everything here works relative to an open directory and never follows a symlink in the
//! final component, so a caller that reaches each directory it writes through [`Dir`]
//! (never by a path string from the root) cannot be redirected outside its tree by a
//! symlink an image planted. Results are plain `std::io::Result`, like `std::fs`: callers
//! match on the errno (ENOENT, ELOOP, EEXIST) and attach their own context (layer, path).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use crate::rootfs::openat2;

/// What a directory entry is, as far as tree writers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    /// Anything else: a file, a symlink (never followed), a device node, ...
    Other,
}

/// An open directory (`O_RDONLY | O_DIRECTORY`), the anchor of every operation below.
#[derive(Debug)]
pub struct Dir(OwnedFd);

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

const DIR_FLAGS: i32 = libc::O_RDONLY | libc::O_DIRECTORY;

impl Dir {
    /// Opens the directory at `path` (a trusted path: symlinks in it are followed).
    pub fn open(path: &Path) -> io::Result<Dir> {
        openat2(None, path, DIR_FLAGS, 0).map(Dir)
    }

    /// Opens the directory `rel` (a relative path of plain components) below this one in a
    /// single lookup that fails with ELOOP on any symlink on the way, with EXDEV on an
    /// escape, with ENOENT/ENOTDIR when a component is missing or not a directory.
    pub fn open_beneath(&self, rel: &[u8]) -> io::Result<Dir> {
        openat2(
            Some(self.as_fd()),
            Path::new(OsStr::from_bytes(rel)),
            DIR_FLAGS,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        )
        .map(Dir)
    }

    /// Opens the child directory `name`; a symlink there fails with ELOOP or ENOTDIR.
    pub fn open_child(&self, name: &[u8]) -> io::Result<Dir> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        nix::fcntl::openat(self.raw(), name_of(name), flags, Mode::empty())
            .map(|fd| Dir(owned(fd)))
            .map_err(io::Error::from)
    }

    /// Creates the directory `name` with `mode` (less the umask).
    pub fn mkdir(&self, name: &[u8], mode: u32) -> io::Result<()> {
        nix::sys::stat::mkdirat(self.raw(), name_of(name), mode_of(mode)).map_err(io::Error::from)
    }

    /// Creates the regular file `name` for writing; fails with EEXIST if anything (a
    /// symlink included) is already there.
    pub fn create_file(&self, name: &[u8], mode: u32) -> io::Result<File> {
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        nix::fcntl::openat(self.raw(), name_of(name), flags, mode_of(mode))
            .map(|fd| File::from(owned(fd)))
            .map_err(io::Error::from)
    }

    /// Creates the symlink `name` pointing at `target` (stored as given, never resolved).
    pub fn symlink(&self, target: &[u8], name: &[u8]) -> io::Result<()> {
        nix::unistd::symlinkat(name_of(target), self.raw(), name_of(name)).map_err(io::Error::from)
    }

    /// Creates `name` here as a hard link to `source_name` in `source_dir` (a symlink there
    /// is linked itself, not followed).
    pub fn hard_link(&self, source_dir: &Dir, source_name: &[u8], name: &[u8]) -> io::Result<()> {
        nix::unistd::linkat(
            source_dir.raw(),
            name_of(source_name),
            self.raw(),
            name_of(name),
            AtFlags::empty(),
        )
        .map_err(io::Error::from)
    }

    /// Removes the non-directory `name`.
    pub fn remove_file(&self, name: &[u8]) -> io::Result<()> {
        nix::unistd::unlinkat(self.raw(), name_of(name), UnlinkatFlags::NoRemoveDir)
            .map_err(io::Error::from)
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: &[u8]) -> io::Result<()> {
        nix::unistd::unlinkat(self.raw(), name_of(name), UnlinkatFlags::RemoveDir)
            .map_err(io::Error::from)
    }

    /// What `name` is, without following a symlink; `None` when nothing is there.
    pub fn kind(&self, name: &[u8]) -> io::Result<Option<EntryKind>> {
        match nix::sys::stat::fstatat(self.raw(), name_of(name), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
                Ok(Some(EntryKind::Directory))
            }
            Ok(_) => Ok(Some(EntryKind::Other)),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The names in this directory, `.` and `..` left out.
    pub fn entry_names(&self) -> io::Result<Vec<Vec<u8>>> {
        // nix's Dir takes ownership of the fd it reads, so give it a duplicate.
        let mut dir = nix::dir::Dir::from_fd(self.0.try_clone()?.into_raw_fd())?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Sets the owner of the symlink (or other entry) `name` itself.
    pub fn lchown(&self, name: &[u8], uid: u32, gid: u32) -> io::Result<()> {
        nix::unistd::fchownat(
            self.raw(),
            name_of(name),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)
    }

    /// Sets atime and mtime of the symlink (or other entry) `name` itself to `secs`.
    pub fn lset_mtime(&self, name: &[u8], secs: i64) -> io::Result<()> {
        let t = TimeSpec::new(secs, 0);
        nix::sys::stat::utimensat(
            self.raw(),
            name_of(name),
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(io::Error::from)
    }

    fn raw(&self) -> Option<i32> {
        Some(self.0.as_raw_fd())
    }
}

/// Sets the owner of an open file or directory.
pub fn fchown(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    nix::unistd::fchown(
        fd.as_fd().as_raw_fd(),
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
    )
    .map_err(io::Error::from)
}

/// Sets the permission bits (set-id and sticky included) of an open file or directory.
pub fn fchmod(fd: impl AsFd, mode: u32) -> io::Result<()> {
    nix::sys::stat::fchmod(fd.as_fd().as_raw_fd(), mode_of(mode)).map_err(io::Error::from)
}

/// Sets atime and mtime of an open file or directory to `secs`.
pub fn set_mtime(fd: impl AsFd, secs: i64) -> io::Result<()> {
    let t = TimeSpec::new(secs, 0);
    nix::sys::stat::futimens(fd.as_fd().as_raw_fd(), &t, &t).map_err(io::Error::from)
}

/// Takes ownership of an fd nix just opened.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was returned by a successful open call a line earlier and nothing else
    // holds it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn name_of(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

fn mode_of(mode: u32) -> Mode {
    Mode::from_bits_truncate(mode as libc::mode_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_follows_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let root = Dir::open(t.path()).unwrap();
        root.mkdir(b"d", 0o755).unwrap();
        root.symlink(b"d", b"link").unwrap();
        let d = root.open_beneath(b"d").unwrap();
        d.create_file(b"f", 0o644).unwrap();
        assert_eq!(d.entry_names().unwrap(), vec![b"f".to_vec()]);
        let err = root.open_beneath(b"link").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert!(root.open_child(b"link").is_err());
        let err = root.create_file(b"link", 0o644).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(root.kind(b"link").unwrap(), Some(EntryKind::Other));
        assert_eq!(root.kind(b"d").unwrap(), Some(EntryKind::Directory));
        assert_eq!(root.kind(b"none").unwrap(), None);
        // Removing the link leaves its target alone.
        root.remove_file(b"link").unwrap();
        assert!(t.path().join("d/f").is_file());
    }

    #[test]
    fn sets_modes_times_and_links() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let root = Dir::open(t.path()).unwrap();
        let f = root.create_file(b"f", 0o600).unwrap();
        fchmod(&f, 0o4755).unwrap();
        set_mtime(&f, 1_700_000_000).unwrap();
        root.hard_link(&root, b"f", b"g").unwrap();
        root.symlink(b"f", b"s").unwrap();
        root.lset_mtime(b"s", 1_600_000_000).unwrap();
        let meta = std::fs::metadata(t.path().join("g")).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.mtime(), meta.nlink()),
            (0o4755, 1_700_000_000, 2)
        );
        let link = std::fs::symlink_metadata(t.path().join("s")).unwrap();
        assert_eq!(link.mtime(), 1_600_000_000);
        root.mkdir(b"d", 0o755).unwrap();
        root.remove_dir(b"d").unwrap();
        assert_eq!(root.kind(b"d").unwrap(), None);
    }
}
