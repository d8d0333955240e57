//! Removing an unpacked tree through directory fds.
//!
//! A layer can build paths far longer than PATH_MAX (the unpacker itself works through
//! fds), so anything that removes such a tree by path strings fails with ENAMETOOLONG and
//! leaves it behind. This walks with `openat`/`unlinkat` instead, iteratively (no recursion
//! to overflow the stack) and holding two descriptors at a time, going back up through
//! `..`. That is sound only for trees nobody else can rename meanwhile: an image's rootfs
//! while it is unpacked, and the cache's staging under its 0700 `tmp/`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use berth_sys::fs::{self as sysfs, Dir, EntryKind};

/// Removes `name` in `parent`, with everything below it when it is a directory; nothing
/// there is fine. Symlinks are removed, never followed. Directories an unprivileged owner
/// could not empty (an image's 0555 or 0000 ones) are opened up first.
pub fn remove_tree(parent: &Dir, name: &[u8]) -> io::Result<()> {
    match parent.kind(name)? {
        None => return Ok(()),
        Some(EntryKind::Other) => return parent.remove_file(name),
        Some(EntryKind::Directory) => {}
    }
    let mut dir = open_for_removal(parent, name)?;
    // Each directory on the way down, with the subdirectories it still holds.
    let mut stack = vec![(name.to_vec(), remove_files(&dir)?)];
    while let Some((done, pending)) = stack.last_mut() {
        if let Some(sub) = pending.pop() {
            dir = open_for_removal(&dir, &sub)?;
            let subdirs = remove_files(&dir)?;
            stack.push((sub, subdirs));
            continue;
        }
        let done = std::mem::take(done);
        stack.pop();
        if stack.is_empty() {
            return parent.remove_dir(&done);
        }
        dir = dir.open_child(b"..")?;
        dir.remove_dir(&done)?;
    }
    Ok(())
}

/// Removes every non-directory in `dir` and returns the names of its subdirectories.
fn remove_files(dir: &Dir) -> io::Result<Vec<Vec<u8>>> {
    let mut subdirs = Vec::new();
    for name in dir.entry_names()? {
        match dir.kind(&name)? {
            Some(EntryKind::Directory) => subdirs.push(name),
            Some(EntryKind::Other) => dir.remove_file(&name)?,
            None => {}
        }
    }
    Ok(subdirs)
}

/// Opens the directory `name` in `parent` and makes it writable by its owner, so its
/// entries can be removed. One the caller cannot even read (mode 0000, unprivileged) gets
/// its mode changed through the parent's descriptor first.
fn open_for_removal(parent: &Dir, name: &[u8]) -> io::Result<Dir> {
    let dir = match parent.open_child(name) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            // /proc/self/fd/N/NAME names the entry relative to the fd, at a bounded length.
            let path = PathBuf::from(format!("/proc/self/fd/{}", parent.as_fd().as_raw_fd()))
                .join(std::ffi::OsStr::from_bytes(name));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
            parent.open_child(name)?
        }
        other => other?,
    };
    sysfs::fchmod(&dir, 0o700)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_trees_deeper_than_path_max_and_read_only_directories() {
        let t = tempfile::tempdir().unwrap();
        let top = Dir::open(t.path()).unwrap();
        top.mkdir(b"tree", 0o755).unwrap();
        // 40 levels of 250-byte names: about 10 KB of path, past PATH_MAX (4096).
        let mut dir = top.open_child(b"tree").unwrap();
        let name = vec![b'd'; 250];
        for level in 0..40 {
            dir.create_file(b"f", 0o644).unwrap();
            dir.symlink(b"/", b"up").unwrap();
            dir.mkdir(&name, 0o755).unwrap();
            if level % 2 == 0 {
                dir.mkdir(b"side", 0o755).unwrap();
            }
            let next = dir.open_child(&name).unwrap();
            sysfs::fchmod(&dir, 0o555).unwrap();
            dir = next;
        }
        dir.mkdir(b"locked", 0o000).unwrap();
        remove_tree(&top, b"tree").unwrap();
        assert_eq!(top.kind(b"tree").unwrap(), None);
        // Files and nothing at all.
        top.create_file(b"plain", 0o644).unwrap();
        remove_tree(&top, b"plain").unwrap();
        remove_tree(&top, b"plain").unwrap();
        assert!(top.entry_names().unwrap().is_empty());
    }
}
