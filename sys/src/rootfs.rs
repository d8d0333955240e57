//! Paths inside a container root, resolved through file descriptors.
//!
//! Every lookup below a container root uses openat2(2) with `RESOLVE_IN_ROOT`, so a symlink
//! in the image (`/data -> /etc`, `x -> ../../..`) is resolved as if the root were `/`: it
//! can never lead outside the root. Missing mountpoints are created one component at a time
//! relative to the already-resolved parent's fd, and mounts target `/proc/self/fd/N` of an
//! `O_PATH` fd resolved this way, never a path string that could be swapped between check
//! and use (runc CVE-2021-30465).

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;

use crate::{Error, Result};

/// What a mountpoint must be: a directory, or a file (for binds of files such as /etc/hosts
/// or device nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountpointKind {
    Dir,
    File,
}

/// `/proc/self/fd/N`: the path through which mount(2) and friends reach an fd's object.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens a directory (`O_PATH`) to serve as the root for in-root resolution.
pub fn open_dir(path: &Path) -> Result<OwnedFd> {
    openat2(None, path, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(Error::io_path("open", path))
}

/// Opens `path` inside `root` (symlinks resolved as if `root` were `/`; magic links refused).
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path, flags: i32) -> Result<OwnedFd> {
    let rel = relative(path)?;
    openat2(
        Some(root),
        &rel,
        flags,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(Error::io_path("open inside the container", path))
}

/// Resolves `path` inside `root`, creating what is missing (directories 0755 on the way, the
/// last component as `kind`), and returns an `O_PATH` fd of the result.
pub fn ensure_in_root(root: BorrowedFd<'_>, path: &Path, kind: MountpointKind) -> Result<OwnedFd> {
    let rel = relative(path)?;
    let names: Vec<&OsStr> = rel.iter().collect();
    let mut current = dup(root)?;
    let mut prefix = PathBuf::new();
    for (i, name) in names.iter().enumerate() {
        prefix.push(name);
        let resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        match openat2(Some(root), &prefix, libc::O_PATH, resolve) {
            Ok(fd) => current = fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let last = i + 1 == names.len();
                create(current.as_fd(), name, last && kind == MountpointKind::File).map_err(
                    |e| match e {
                        // The name exists but did not resolve: a dangling symlink. Creating
                        // its target would be creating a path the image chose; refuse.
                        Errno::EEXIST => Error::DanglingSymlink {
                            path: path.to_path_buf(),
                        },
                        e => Error::os_path("create mountpoint", path)(e),
                    },
                )?;
                // Just created by us in a directory only berth can reach: no symlink to follow.
                current = openat2(
                    Some(current.as_fd()),
                    Path::new(name),
                    libc::O_PATH,
                    libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH,
                )
                .map_err(Error::io_path("open new mountpoint", path))?;
            }
            Err(e) => return Err(Error::io_path("resolve inside the container", path)(e)),
        }
    }
    Ok(current)
}

/// `path` relative to the container root, refusing anything but normal components after the
/// leading `/`, so what we create is exactly what the spec names.
fn relative(path: &Path) -> Result<PathBuf> {
    let bad = || Error::BadContainerPath {
        path: path.to_path_buf(),
    };
    let mut comps = path.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(bad());
    }
    let mut rel = PathBuf::new();
    for c in comps {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::CurDir => {}
            _ => return Err(bad()),
        }
    }
    if rel.as_os_str().is_empty() {
        rel.push(".");
    }
    Ok(rel)
}

fn create(dir: BorrowedFd<'_>, name: &OsStr, file: bool) -> nix::Result<()> {
    if file {
        let flags = nix::fcntl::OFlag::O_CREAT
            | nix::fcntl::OFlag::O_EXCL
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_WRONLY
            | nix::fcntl::OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            flags,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )?;
        nix::unistd::close(fd)
    } else {
        nix::sys::stat::mkdirat(
            Some(dir.as_raw_fd()),
            name,
            nix::sys::stat::Mode::from_bits_truncate(0o755),
        )
    }
}

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned().map_err(|source| Error::Os {
        call: "dup",
        source,
    })
}

/// openat2(2), always with `O_CLOEXEC`, retried on `EAGAIN` (a concurrent rename elsewhere
/// in the kernel; the lookup is simply repeated).
pub(crate) fn openat2(
    dir: Option<BorrowedFd<'_>>,
    path: &Path,
    flags: i32,
    resolve: u64,
) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut how: libc::open_how = unsafe_zeroed_open_how();
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    loop {
        // SAFETY: `c` is a valid NUL-terminated string and `how` a properly sized open_how
        // that both outlive the call; the kernel only reads them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: openat2 returned a new fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
}

fn unsafe_zeroed_open_how() -> libc::open_how {
    // SAFETY: open_how is a plain C struct of integers; all-zero is its documented default.
    unsafe { std::mem::zeroed() }
}

/// The kernel's `struct mount_attr` (include/uapi/linux/mount.h), for mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// Makes the mount at `fd` read-only, and with `recursive` every mount below it too. Unlike a
/// `MS_REMOUNT|MS_BIND|MS_RDONLY` remount this needs no knowledge of the locked flags
/// (nosuid, nodev, ...) that a user namespace must otherwise repeat.
pub fn set_readonly_fd(fd: BorrowedFd<'_>, recursive: bool, path: &Path) -> Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: the empty path is a static NUL-terminated string, `attr` is a properly sized
    // mount_attr living across the call; the kernel only reads both.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(Error::OsPath {
            call: "mount_setattr(read-only)",
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Makes the directory `root` the root of this mount namespace and lazily detaches the old
/// root, so nothing of the host stays reachable through `/` or `..`; cwd ends at the new `/`.
pub fn pivot_root(root: &Path) -> Result<()> {
    let fd = open_dir(root)?;
    nix::unistd::fchdir(fd.as_raw_fd()).map_err(Error::os_path("fchdir", root))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then
    // removes exactly the old root (the trick runc and crun use, no put_old dir needed).
    nix::unistd::pivot_root(".", ".").map_err(Error::os_path("pivot_root", root))?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
        .map_err(Error::os_path("umount old root", root))?;
    nix::unistd::chdir("/").map_err(Error::os_path("chdir", Path::new("/")))
}

/// A new private (0700) directory under `parent`, and an fd of `parent` by which
/// [`remove_dir_at`] removes it later, even once `parent` is no longer reachable by path
/// (after pivot_root).
pub fn private_dir(parent: &Path, prefix: &str) -> Result<(PathBuf, OwnedFd)> {
    let dir = nix::unistd::mkdtemp(&parent.join(format!("{prefix}XXXXXX")))
        .map_err(Error::os_path("mkdtemp", parent))?;
    Ok((dir, open_dir(parent)?))
}

/// Removes the empty directory `name` of `parent`.
pub fn remove_dir_at(parent: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    nix::unistd::unlinkat(
        Some(parent.as_raw_fd()),
        name,
        nix::unistd::UnlinkatFlags::RemoveDir,
    )
    .map_err(Error::os_path("rmdir", Path::new(name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        let fd = open_dir(dir.path()).unwrap();
        (dir, fd)
    }

    #[test]
    fn creates_missing_directories_and_files() {
        let (dir, fd) = root();
        ensure_in_root(fd.as_fd(), Path::new("/a/b/c"), MountpointKind::Dir).unwrap();
        assert!(dir.path().join("a/b/c").is_dir());
        ensure_in_root(fd.as_fd(), Path::new("/etc/hosts"), MountpointKind::File).unwrap();
        assert!(dir.path().join("etc/hosts").is_file());
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let (dir, fd) = root();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        symlink("/etc", dir.path().join("data")).unwrap();
        ensure_in_root(fd.as_fd(), Path::new("/data/new"), MountpointKind::Dir).unwrap();
        assert!(
            dir.path().join("etc/new").is_dir(),
            "landed inside the root"
        );
        assert!(!Path::new("/etc/new").exists());
    }

    #[test]
    fn dotdot_symlinks_stay_inside_the_root() {
        let (dir, fd) = root();
        symlink("../../../../..", dir.path().join("up")).unwrap();
        ensure_in_root(fd.as_fd(), Path::new("/up/escaped"), MountpointKind::Dir).unwrap();
        assert!(dir.path().join("escaped").is_dir());
    }

    #[test]
    fn dangling_symlinks_are_refused() {
        let (dir, fd) = root();
        symlink("/nowhere/at/all", dir.path().join("dangling")).unwrap();
        let err =
            ensure_in_root(fd.as_fd(), Path::new("/dangling"), MountpointKind::Dir).unwrap_err();
        assert!(matches!(err, Error::DanglingSymlink { .. }), "{err}");
    }

    #[test]
    fn relative_and_dotdot_paths_are_refused() {
        let (_dir, fd) = root();
        for p in ["relative", "/a/../b"] {
            let err = ensure_in_root(fd.as_fd(), Path::new(p), MountpointKind::Dir).unwrap_err();
            assert!(matches!(err, Error::BadContainerPath { .. }), "{p}: {err}");
        }
    }

    #[test]
    fn magic_links_are_refused() {
        let (dir, fd) = root();
        symlink("/proc/self/root", dir.path().join("magic")).unwrap();
        std::fs::create_dir(dir.path().join("proc")).unwrap();
        // Inside the root /proc is an empty dir, so the lookup fails instead of following
        // the host's magic link out of the root.
        assert!(open_in_root(fd.as_fd(), Path::new("/magic/etc"), libc::O_PATH).is_err());
    }
}
