//! Safe application of OCI layer tarballs onto a root directory.
//!
//! Layers come from registries, so every entry is hostile until proven otherwise. Entries are
//! applied one by one with fd-relative syscalls instead of the `tar` crate's `unpack_in`:
//!
//! - paths are normalised from the raw header bytes; absolute paths and `..` are refused, and
//!   an entry that names the root itself (`.`) is refused unless it is a plain directory
//!   (GNU `tar -C dir .` writes one; it carries nothing but the root's own mode, ignored);
//! - parents are walked one component at a time with `O_NOFOLLOW | O_DIRECTORY`, so a
//!   symlink planted by this or an earlier layer is never followed: writing through one is
//!   refused (umoci CVE-2021-29136 and friends);
//! - hard links must name an entry that already exists inside the root, reached the same way;
//! - device nodes and fifos are skipped (an unprivileged container cannot use them, and a
//!   root-built cache must not hold device files users could reach);
//! - OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are applied, not copied;
//! - a file entry shorter than its header size (a truncated layer) is an error.
//!
//! Modes are preserved. Ownership from the headers is applied only when berth runs as root
//! (the cache writer in production); an unprivileged writer keeps its own uid, which is what
//! an unprivileged container maps to anyway. Extended attributes are not applied.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use tar::EntryType;

use crate::{Error, Result};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Maps OCI and Docker layer media types; `None` for types berth cannot apply (e.g.
    /// foreign/non-distributable layers or encrypted ones).
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }
}

/// What applying one layer did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub bytes: u64,
    /// Device nodes and fifos left out.
    pub skipped_special: u64,
}

/// Applies one layer, decompressing it as `compression` says, onto the directory `root`.
/// `layer` names the layer in error messages (e.g. its digest).
pub fn apply_layer(
    root: &Path,
    reader: impl Read,
    compression: Compression,
    layer: &str,
) -> Result<LayerStats> {
    let root_fd = rfs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(format!("opening unpack root {}", root.display()), e.into()))?;
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(reader)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(reader)
                .map_err(|e| Error::io(format!("starting zstd decoder for layer {layer}"), e))?,
        ),
    };
    let mut applier = Applier {
        root: root_fd,
        as_root: rustix::process::geteuid().is_root(),
        layer,
        created: HashSet::new(),
        dirs: Vec::new(),
        stats: LayerStats::default(),
    };
    applier.run(reader)?;
    Ok(applier.stats)
}

struct Applier<'a> {
    root: OwnedFd,
    as_root: bool,
    layer: &'a str,
    /// Paths this layer created: an opaque whiteout hides only what lower layers left.
    created: HashSet<Vec<u8>>,
    /// Directory metadata, applied after the layer so that a read-only directory mode does
    /// not stop its own children from being written.
    dirs: Vec<(Vec<u8>, tar::Header)>,
    stats: LayerStats,
}

impl Applier<'_> {
    fn run(&mut self, reader: impl Read) -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|e| self.bad(format!("not a tar archive: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.bad(format!("corrupt tar stream: {e}")))?;
            self.stats.entries += 1;
            self.apply(entry)?;
        }
        // Deepest first, so a parent's final (maybe read-only) mode is set last.
        let dirs = std::mem::take(&mut self.dirs);
        for (path, header) in dirs.iter().rev() {
            let (parent, name) = self.open_parent(path)?;
            // A later entry of this layer may have removed or replaced the directory.
            match stat_nofollow(&parent, name) {
                Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                _ => continue,
            }
            let fd = self.open_child_dir(&parent, name, path)?;
            self.set_metadata(&fd, path, header)?;
        }
        Ok(())
    }

    fn apply<R: Read>(&mut self, mut entry: tar::Entry<R>) -> Result<()> {
        let raw_path = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        let Some(path) = normalise(&raw_path).map_err(|why| self.refuse(&raw_path, why))? else {
            return if kind == EntryType::Directory {
                Ok(())
            } else {
                Err(self.refuse(&raw_path, "it would replace the image root"))
            };
        };
        let (parent, name) = self.open_parent(&path)?;

        if name == OPAQUE_WHITEOUT {
            // `parent` is the directory the marker sits in, the one to make opaque.
            return self.clear_dir(&parent, parent_of(&path));
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(self.refuse(&raw_path, "malformed whiteout"));
            }
            return self.remove(&parent, hidden, &path);
        }

        match kind {
            EntryType::Directory => {
                match stat_nofollow(&parent, name) {
                    Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Some(_) => {
                        self.remove(&parent, name, &path)?;
                        self.mkdir(&parent, name, &path)?;
                    }
                    None => self.mkdir(&parent, name, &path)?,
                }
                self.dirs.push((path.clone(), entry.header().clone()));
            }
            EntryType::Regular | EntryType::Continuous => {
                self.remove(&parent, name, &path)?;
                let file = rfs::openat(
                    &parent,
                    OsStr::from_bytes(name),
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.io(&path, "creating file", e))?;
                let expected = entry.size();
                let mut out = std::fs::File::from(file);
                let copied = io::copy(&mut entry, &mut out)
                    .map_err(|e| self.bad(format!("reading {}: {e}", show(&path))))?;
                if copied != expected {
                    return Err(self.bad(format!(
                        "{} is truncated: {copied} of {expected} bytes",
                        show(&path)
                    )));
                }
                self.stats.bytes += copied;
                self.set_metadata(&out, &path, entry.header())?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.refuse(&raw_path, "symlink without a target"))?
                    .into_owned();
                self.remove(&parent, name, &path)?;
                rfs::symlinkat(OsStr::from_bytes(&target), &parent, OsStr::from_bytes(name))
                    .map_err(|e| self.io(&path, "creating symlink", e))?;
                self.set_link_metadata(&parent, name, &path, entry.header())?;
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.refuse(&raw_path, "hard link without a target"))?
                    .into_owned();
                let target = normalise(&raw_target)
                    .map_err(|why| self.refuse(&raw_path, &format!("hard link target {why}")))?
                    .ok_or_else(|| self.refuse(&raw_path, "hard link to the image root"))?;
                let (target_parent, target_name) = self.open_parent(&target)?;
                match stat_nofollow(&target_parent, target_name) {
                    None => {
                        return Err(self.refuse(
                            &raw_path,
                            &format!(
                                "hard link to {}, which is not (yet) in the image",
                                show(&target)
                            ),
                        ))
                    }
                    Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                        return Err(self.refuse(&raw_path, "hard link to a directory"))
                    }
                    Some(_) => {}
                }
                if target == path {
                    // A link to itself: the file is already there.
                    return Ok(());
                }
                self.remove(&parent, name, &path)?;
                rfs::linkat(
                    &target_parent,
                    OsStr::from_bytes(target_name),
                    &parent,
                    OsStr::from_bytes(name),
                    AtFlags::empty(),
                )
                .map_err(|e| self.io(&path, "creating hard link", e))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.stats.skipped_special += 1;
                return Ok(());
            }
            // Metadata-only entries that the tar crate did not fold into the next entry.
            EntryType::XGlobalHeader => return Ok(()),
            other => {
                return Err(self.refuse(&raw_path, &format!("unsupported tar entry type {other:?}")))
            }
        }
        self.created.insert(path);
        Ok(())
    }

    /// Opens the directory that holds `path` (a normalised, non-empty path) without
    /// following any symlink, creating missing parents as 0755 directories (layers may omit
    /// them). Returns the parent fd and the final component.
    fn open_parent<'p>(&self, path: &'p [u8]) -> Result<(OwnedFd, &'p [u8])> {
        let mut components = path.split(|b| *b == b'/');
        let name = components.next_back().unwrap_or_default();
        let mut dir = rfs::openat(
            &self.root,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io(b".", "opening unpack root", e))?;
        for component in components {
            let c = OsStr::from_bytes(component);
            let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
            dir = match rfs::openat(&dir, c, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => {
                    rfs::mkdirat(&dir, c, Mode::from_raw_mode(0o755))
                        .map_err(|e| self.io(path, "creating parent directory", e))?;
                    rfs::openat(&dir, c, flags, Mode::empty())
                        .map_err(|e| self.io(path, "opening parent directory", e))?
                }
                Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                    return Err(self.refuse(
                        path,
                        &format!(
                            "its parent {} is a symlink or not a directory; berth never \
                             writes through symlinks",
                            show(
                                &path[..component.as_ptr() as usize - path.as_ptr() as usize
                                    + component.len()]
                            )
                        ),
                    ))
                }
                Err(e) => return Err(self.io(path, "opening parent directory", e)),
            };
        }
        Ok((dir, name))
    }

    fn mkdir(&self, parent: &OwnedFd, name: &[u8], path: &[u8]) -> Result<()> {
        rfs::mkdirat(parent, OsStr::from_bytes(name), Mode::from_raw_mode(0o700))
            .map_err(|e| self.io(path, "creating directory", e))
    }

    /// Removes whatever is at `name` (recursively for directories); nothing there is fine.
    fn remove(&self, parent: &OwnedFd, name: &[u8], path: &[u8]) -> Result<()> {
        let Some(st) = stat_nofollow(parent, name) else {
            return Ok(());
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let dir = self.open_child_dir(parent, name, path)?;
            self.clear_children(&dir, path, &|_| true)?;
            rfs::unlinkat(parent, OsStr::from_bytes(name), AtFlags::REMOVEDIR)
        } else {
            rfs::unlinkat(parent, OsStr::from_bytes(name), AtFlags::empty())
        }
        .map_err(|e| self.io(path, "removing", e))
    }

    /// Opaque whiteout: removes the children of `dir` (at `dir_path`) that lower layers put
    /// there, keeping what this layer added.
    fn clear_dir(&self, dir: &OwnedFd, dir_path: &[u8]) -> Result<()> {
        let lower = |child: &[u8]| !self.created.contains(&join(dir_path, child));
        self.clear_children(dir, dir_path, &lower)
    }

    fn clear_children(
        &self,
        dir: &OwnedFd,
        dir_path: &[u8],
        should_remove: &dyn Fn(&[u8]) -> bool,
    ) -> Result<()> {
        let mut names = Vec::new();
        let mut iter = rfs::Dir::read_from(dir).map_err(|e| self.io(dir_path, "listing", e))?;
        while let Some(child) = iter.read() {
            let child = child.map_err(|e| self.io(dir_path, "listing", e))?;
            let name = child.file_name().to_bytes();
            if name != b"." && name != b".." && should_remove(name) {
                names.push(name.to_vec());
            }
        }
        for name in names {
            self.remove(dir, &name, &join(dir_path, &name))?;
        }
        Ok(())
    }

    fn open_child_dir(&self, parent: &OwnedFd, name: &[u8], path: &[u8]) -> Result<OwnedFd> {
        rfs::openat(
            parent,
            OsStr::from_bytes(name),
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io(path, "opening directory", e))
    }

    /// Owner (root only), mode and mtime of a file or directory, through its fd. The owner
    /// goes first because chown clears set-id bits.
    fn set_metadata(&self, fd: impl AsFd, path: &[u8], header: &tar::Header) -> Result<()> {
        if self.as_root {
            let (uid, gid) = ids(header);
            rfs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| self.io(path, "setting owner", e))?;
        }
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        rfs::fchmod(&fd, Mode::from_raw_mode(mode))
            .map_err(|e| self.io(path, "setting mode", e))?;
        rfs::futimens(&fd, &times(header)).map_err(|e| self.io(path, "setting mtime", e))
    }

    fn set_link_metadata(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        path: &[u8],
        header: &tar::Header,
    ) -> Result<()> {
        let name = OsStr::from_bytes(name);
        if self.as_root {
            let (uid, gid) = ids(header);
            rfs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.io(path, "setting symlink owner", e))?;
        }
        rfs::utimensat(parent, name, &times(header), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io(path, "setting symlink mtime", e))
    }

    fn refuse(&self, path: &[u8], why: &str) -> Error {
        Error::UnsafeLayer {
            layer: self.layer.to_string(),
            path: show(path),
            reason: why.to_string(),
        }
    }

    fn bad(&self, reason: String) -> Error {
        Error::BadLayer {
            layer: self.layer.to_string(),
            reason,
        }
    }

    fn io(&self, path: &[u8], what: &str, e: rustix::io::Errno) -> Error {
        Error::io(
            format!("layer {}: {what} {}", self.layer, show(path)),
            e.into(),
        )
    }
}

/// Normalises a tar path: `Ok(None)` for the root itself (`.`, `./`), an error naming the
/// rule for absolute paths and `..`, otherwise the path without `.` and empty components.
fn normalise(raw: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute paths are not allowed in layers");
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("`..` is not allowed in layer paths"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

fn parent_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

fn stat_nofollow(parent: &OwnedFd, name: &[u8]) -> Option<rfs::Stat> {
    rfs::statat(parent, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW).ok()
}

fn ids(header: &tar::Header) -> (u32, u32) {
    let uid = header.uid().unwrap_or(0);
    let gid = header.gid().unwrap_or(0);
    (
        u32::try_from(uid).unwrap_or(u32::MAX - 1),
        u32::try_from(gid).unwrap_or(u32::MAX - 1),
    )
}

fn times(header: &tar::Header) -> Timestamps {
    let secs = header.mtime().unwrap_or(0);
    let ts = Timespec {
        tv_sec: i64::try_from(secs).unwrap_or(0),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: ts,
        last_modification: ts,
    }
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an uncompressed tar in memory; headers are written raw so that paths the
    /// `tar` builder would refuse (`..`, absolute) can be tested.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Layer(tar::Builder::new(Vec::new()))
        }
        fn entry(mut self, kind: EntryType, path: &str, link: &str, data: &[u8]) -> Self {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_mtime(1_700_000_000);
            let name = &mut h.as_gnu_mut().unwrap().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn file(self, path: &str, data: &str) -> Self {
            self.entry(EntryType::Regular, path, "", data.as_bytes())
        }
        fn dir(self, path: &str) -> Self {
            self.entry(EntryType::Directory, path, "", b"")
        }
        fn symlink(self, path: &str, target: &str) -> Self {
            self.entry(EntryType::Symlink, path, target, b"")
        }
        fn hardlink(self, path: &str, target: &str) -> Self {
            self.entry(EntryType::Link, path, target, b"")
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn apply(root: &Path, layer: Vec<u8>) -> Result<LayerStats> {
        apply_layer(root, layer.as_slice(), Compression::None, "sha256:test")
    }

    fn refused(root: &Path, layer: Vec<u8>, needle: &str) {
        let err = apply(root, layer).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn applies_files_dirs_links_and_modes() {
        let root = tempfile::tempdir().unwrap();
        let stats = apply(
            root.path(),
            Layer::new()
                .dir("./etc")
                .file("etc/hostname", "box\n")
                .symlink("bin", "usr/bin")
                .file("usr/bin/sh", "#!")
                .hardlink("usr/bin/sh2", "usr/bin/sh")
                .entry(EntryType::Char, "dev/null", "", b"")
                .bytes(),
        )
        .unwrap();
        assert_eq!(stats.skipped_special, 1);
        let r = root.path();
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "box\n"
        );
        assert_eq!(
            std::fs::read_link(r.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(std::fs::read(r.join("usr/bin/sh2")).unwrap(), b"#!");
        assert!(!r.join("dev/null").exists());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(r.join("etc")).unwrap().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::metadata(r.join("etc/hostname")).unwrap().mtime(),
            1_700_000_000
        );
    }

    #[test]
    fn refuses_escapes() {
        let root = tempfile::tempdir().unwrap();
        refused(root.path(), Layer::new().file("../x", "x").bytes(), "`..`");
        refused(
            root.path(),
            Layer::new().file("a/../../x", "x").bytes(),
            "`..`",
        );
        refused(
            root.path(),
            Layer::new().file("/abs", "x").bytes(),
            "absolute",
        );
        refused(
            root.path(),
            Layer::new().symlink(".", "/").bytes(),
            "image root",
        );
        refused(
            root.path(),
            Layer::new().symlink("./", "/etc").bytes(),
            "image root",
        );
        assert!(!root.path().parent().unwrap().join("x").exists());
    }

    #[test]
    fn never_writes_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap();
        // In one layer, and across layers.
        refused(
            root.path(),
            Layer::new()
                .symlink("evil", target)
                .file("evil/pwned", "x")
                .bytes(),
            "symlink",
        );
        refused(
            root.path(),
            Layer::new().file("evil/pwned", "x").bytes(),
            "symlink",
        );
        refused(root.path(), Layer::new().dir("evil/sub").bytes(), "symlink");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // Replacing the symlink itself is fine: it is removed, not followed.
        apply(root.path(), Layer::new().file("evil", "plain").bytes()).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("evil")).unwrap(),
            "plain"
        );
    }

    #[test]
    fn checks_hard_link_targets() {
        let root = tempfile::tempdir().unwrap();
        refused(
            root.path(),
            Layer::new().hardlink("l", "../../etc/shadow").bytes(),
            "`..`",
        );
        refused(
            root.path(),
            Layer::new().hardlink("l", "/etc/shadow").bytes(),
            "absolute",
        );
        refused(
            root.path(),
            Layer::new()
                .hardlink("l", "later")
                .file("later", "x")
                .bytes(),
            "not (yet)",
        );
        refused(
            root.path(),
            Layer::new()
                .symlink("s", "/etc")
                .hardlink("l", "s/shadow")
                .bytes(),
            "symlink",
        );
        refused(
            root.path(),
            Layer::new().dir("d").hardlink("l", "d").bytes(),
            "directory",
        );
    }

    #[test]
    fn applies_whiteouts() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        apply(
            r,
            Layer::new()
                .file("a/keep", "1")
                .file("a/gone", "1")
                .file("o/lower", "1")
                .file("top", "1")
                .bytes(),
        )
        .unwrap();
        apply(
            r,
            Layer::new()
                .file("a/.wh.gone", "")
                .file(".wh.top", "")
                .file("o/upper", "2")
                .file("o/.wh..wh..opq", "")
                .bytes(),
        )
        .unwrap();
        assert!(r.join("a/keep").exists());
        assert!(!r.join("a/gone").exists() && !r.join("a/.wh.gone").exists());
        assert!(!r.join("top").exists());
        assert!(!r.join("o/lower").exists());
        assert!(r.join("o/upper").exists() && !r.join("o/.wh..wh..opq").exists());
        refused(
            r,
            Layer::new().file("a/.wh...", "").bytes(),
            "malformed whiteout",
        );
    }

    #[test]
    fn rejects_truncated_layers() {
        let root = tempfile::tempdir().unwrap();
        let mut bytes = Layer::new().file("big", &"x".repeat(4096)).bytes();
        bytes.truncate(512 + 1000);
        let err = apply(root.path(), bytes).unwrap_err();
        assert!(matches!(err, Error::BadLayer { .. }), "{err}");
    }

    #[test]
    fn decompresses_gzip_and_zstd() {
        use std::io::Write;
        let plain = Layer::new().file("f", "hello").bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(plain.as_slice(), 3).unwrap();
        for (bytes, c) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
            let root = tempfile::tempdir().unwrap();
            apply_layer(root.path(), bytes.as_slice(), c, "l").unwrap();
            assert_eq!(
                std::fs::read_to_string(root.path().join("f")).unwrap(),
                "hello"
            );
        }
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::from_media_type("application/x-unknown"), None);
    }
}
