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
//! Root unpacks registry images, so everything it would spend is bounded per image (see
//! [`limits`]): bytes, entries, path length and depth, and the tar extension headers that
//! the `tar` crate would otherwise read whole into memory.
//!
//! Modes are preserved. Ownership from the headers is applied on disk when berth runs as
//! root; an unprivileged writer (the cache's service user) keeps its own uid and owner
//! rights on disk, without set-id bits, and records every entry's owner and mode from the
//! headers in [`Ownership`], which mksquashfs then applies (see [`pseudo`]), so the image
//! comes out the same either way. Extended attributes are not applied.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::Path;
use std::rc::Rc;
use std::sync::mpsc;

use berth_sys::fs::{self as sysfs, Dir, EntryKind};
use tar::EntryType;

use crate::{Error, Result};

mod limits;
pub mod pseudo;
mod remove;

pub use limits::{Budget, Limits, EXTENSION_LIMIT};
pub use pseudo::Ownership;
pub use remove::remove_tree;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
/// Decompressed bytes handed from the decompressing thread to the writer per message, and
/// how many messages may wait: enough to keep both cores busy, little memory.
const CHUNK: usize = 256 << 10;
const CHUNKS_IN_FLIGHT: usize = 16;

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
/// `layer` names the layer in error messages (e.g. its digest). What the layer declares is
/// charged to `budget`, the image's, and the layer is refused past its limits. An
/// unprivileged caller's entries' owners and modes are recorded in `ownership`, the image's.
///
/// Decompression runs on a second thread, so that inflating the stream (user CPU) overlaps
/// with creating the files (kernel CPU): on a 2-core node that is most of the unpack time.
pub fn apply_layer(
    root: &Path,
    reader: impl Read + Send,
    compression: Compression,
    layer: &str,
    budget: &mut Budget,
    ownership: &mut Ownership,
) -> Result<LayerStats> {
    let root_fd = Dir::open(root)
        .map_err(|e| Error::io(format!("opening unpack root {}", root.display()), e))?;
    let decoder: Box<dyn Read + Send> = match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(reader)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(reader)
                .map_err(|e| Error::io(format!("starting zstd decoder for layer {layer}"), e))?,
        ),
    };
    let mut applier = Applier {
        root: Rc::new(root_fd),
        last_parent: None,
        as_root: berth_sys::identity::effective_uid() == 0,
        layer,
        created: HashSet::new(),
        dirs: Vec::new(),
        stats: LayerStats::default(),
        limits: budget.limits().clone(),
        ownership,
    };
    let result = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel(CHUNKS_IN_FLIGHT);
        scope.spawn(move || decompress(decoder, &tx));
        // `run` consumes the receiver: when it stops early (a refused entry), the
        // decompressing thread's next send fails and it ends, so the scope can close.
        let stream = ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        };
        applier.run(limits::TarGuard::new(stream, budget, layer))
    });
    // A limit the guard enforced reaches the applier as a bare I/O error: say which.
    match (result, budget.take_refusal()) {
        (Err(_), Some(refusal)) => Err(refusal),
        (result, _) => result.map(|()| applier.stats),
    }
}

/// The decompressing thread: reads `decoder` to the end (or its first error) in chunks.
fn decompress(mut decoder: Box<dyn Read + Send + '_>, tx: &mpsc::SyncSender<io::Result<Vec<u8>>>) {
    loop {
        let mut chunk = vec![0u8; CHUNK];
        let n = match decoder.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        chunk.truncate(n);
        if tx.send(Ok(chunk)).is_err() || n == 0 {
            return;
        }
    }
}

/// The writer's side of the decompressed stream; an empty chunk is the end.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(next) => {
                    self.chunk = next?;
                    self.pos = 0;
                }
                // The thread ended after the empty end-of-stream chunk.
                Err(mpsc::RecvError) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct Applier<'a> {
    root: Rc<Dir>,
    /// The parent directory of the previous entry: tar streams list a directory's entries
    /// together, so most entries reuse it instead of resolving their path again. Dropped
    /// whenever a directory is removed (the only way a path can stop naming the directory
    /// this fd holds).
    last_parent: Option<(Vec<u8>, Rc<Dir>)>,
    as_root: bool,
    layer: &'a str,
    /// Paths this layer created: an opaque whiteout hides only what lower layers left.
    created: HashSet<Vec<u8>>,
    /// Directory metadata, applied after the layer so that a read-only directory mode does
    /// not stop its own children from being written.
    dirs: Vec<(Vec<u8>, tar::Header)>,
    stats: LayerStats,
    limits: Limits,
    /// What an unprivileged unpack cannot put on disk (unused as root).
    ownership: &'a mut Ownership,
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
            if self.kind(&parent, name, path)? != Some(EntryKind::Directory) {
                continue;
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
        self.limits.check_path(self.layer, &path)?;
        let (parent, name) = self.open_parent(&path)?;

        if name == OPAQUE_WHITEOUT {
            // `parent` is the directory the marker sits in, the one to make opaque.
            return self.remove_lower_children(&parent, parent_of(&path));
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(self.refuse(&raw_path, "malformed whiteout"));
            }
            return self.remove(&parent, hidden, &path);
        }

        match kind {
            EntryType::Directory => {
                match self.kind(&parent, name, &path)? {
                    Some(EntryKind::Directory) => {}
                    Some(EntryKind::Other) => {
                        self.remove(&parent, name, &path)?;
                        self.mkdir(&parent, name, &path)?;
                    }
                    None => self.mkdir(&parent, name, &path)?,
                }
                self.dirs.push((path.clone(), entry.header().clone()));
            }
            EntryType::Regular | EntryType::Continuous => {
                // Most files are new: try to create first, and look at what is in the way
                // only when something is.
                let mut out = match parent.create_file(name, 0o600) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.remove(&parent, name, &path)?;
                        parent.create_file(name, 0o600)
                    }
                    other => other,
                }
                .map_err(|e| self.io(&path, "creating file", e))?;
                let expected = entry.size();
                // A failed write is the node's disk (full, read-only, failing), not a
                // corrupt layer: it must not tell the user to push the image again.
                let mut write_failed = false;
                let mut sink = WriteSide {
                    inner: &mut out,
                    failed: &mut write_failed,
                };
                let copied = io::copy(&mut entry, &mut sink).map_err(|e| match write_failed {
                    true => self.io(&path, "writing file", e),
                    false => self.bad(format!("reading {}: {e}", show(&path))),
                })?;
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
                parent
                    .symlink(&target, name)
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
                self.limits.check_path(self.layer, &target)?;
                let (target_parent, target_name) = self.open_parent(&target)?;
                match self.kind(&target_parent, target_name, &target)? {
                    None => {
                        return Err(self.refuse(
                            &raw_path,
                            &format!(
                                "hard link to {}, which is not (yet) in the image",
                                show(&target)
                            ),
                        ))
                    }
                    Some(EntryKind::Directory) => {
                        return Err(self.refuse(&raw_path, "hard link to a directory"))
                    }
                    Some(EntryKind::Other) => {}
                }
                if target == path {
                    // A link to itself: the file is already there.
                    return Ok(());
                }
                self.remove(&parent, name, &path)?;
                parent
                    .hard_link(&target_parent, target_name, name)
                    .map_err(|e| self.io(&path, "creating hard link", e))?;
                if !self.as_root {
                    self.ownership.link(&target, &path);
                }
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
    /// them). Returns the parent and the final component.
    fn open_parent<'p>(&mut self, path: &'p [u8]) -> Result<(Rc<Dir>, &'p [u8])> {
        let dir_path = parent_of(path);
        let name = match path.iter().rposition(|b| *b == b'/') {
            Some(i) => &path[i + 1..],
            None => path,
        };
        if dir_path.is_empty() {
            return Ok((Rc::clone(&self.root), name));
        }
        if let Some((cached, dir)) = &self.last_parent {
            if cached == dir_path {
                return Ok((Rc::clone(dir), name));
            }
        }
        // One in-root lookup that refuses symlinks; the walk below only runs when a parent
        // is missing (to create it) or the lookup failed (to name the culprit).
        let dir = match self.root.open_beneath(dir_path) {
            Ok(dir) => Rc::new(dir),
            Err(_) => Rc::new(self.walk_creating(path, dir_path)?),
        };
        self.last_parent = Some((dir_path.to_vec(), Rc::clone(&dir)));
        Ok((dir, name))
    }

    /// Walks `dir_path` one component at a time with `O_NOFOLLOW`, creating what is missing.
    fn walk_creating(&mut self, path: &[u8], dir_path: &[u8]) -> Result<Dir> {
        let mut dir: Option<Dir> = None;
        for component in dir_path.split(|b| *b == b'/') {
            let here = dir.as_ref().unwrap_or(&self.root);
            let next = match here.open_child(component) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    here.mkdir(component, 0o755)
                        .map_err(|e| self.io(path, "creating parent directory", e))?;
                    if !self.as_root {
                        // What a root unpack makes of a parent no entry declares.
                        let end =
                            component.as_ptr() as usize - path.as_ptr() as usize + component.len();
                        let meta = pseudo::Meta {
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                        };
                        self.ownership.set(&path[..end], meta);
                    }
                    here.open_child(component)
                }
                other => other,
            };
            dir = Some(match next {
                Ok(d) => d,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    let end =
                        component.as_ptr() as usize - path.as_ptr() as usize + component.len();
                    return Err(self.refuse(
                        path,
                        &format!(
                            "its parent {} is a symlink or not a directory; berth never \
                             writes through symlinks",
                            show(&path[..end])
                        ),
                    ));
                }
                Err(e) => return Err(self.io(path, "opening parent directory", e)),
            });
        }
        dir.ok_or_else(|| self.refuse(path, "empty parent path"))
    }

    fn kind(&self, parent: &Dir, name: &[u8], path: &[u8]) -> Result<Option<EntryKind>> {
        parent
            .kind(name)
            .map_err(|e| self.io(path, "inspecting", e))
    }

    fn mkdir(&self, parent: &Dir, name: &[u8], path: &[u8]) -> Result<()> {
        parent
            .mkdir(name, 0o700)
            .map_err(|e| self.io(path, "creating directory", e))
    }

    /// Removes whatever is at `name` (recursively for directories); nothing there is fine.
    fn remove(&mut self, parent: &Dir, name: &[u8], path: &[u8]) -> Result<()> {
        self.ownership.remove_tree(path);
        match self.kind(parent, name, path)? {
            None => Ok(()),
            Some(EntryKind::Directory) => {
                self.last_parent = None;
                remove_tree(parent, name).map_err(|e| self.io(path, "removing", e))
            }
            Some(EntryKind::Other) => parent
                .remove_file(name)
                .map_err(|e| self.io(path, "removing", e)),
        }
    }

    /// Removes the children of `dir` (at `dir_path`) except what this layer itself added:
    /// an opaque whiteout hides only what lower layers put there.
    fn remove_lower_children(&mut self, dir: &Dir, dir_path: &[u8]) -> Result<()> {
        let names = dir
            .entry_names()
            .map_err(|e| self.io(dir_path, "listing", e))?;
        for name in names {
            let child = join(dir_path, &name);
            if !self.created.contains(&child) {
                self.remove(dir, &name, &child)?;
            }
        }
        Ok(())
    }

    fn open_child_dir(&self, parent: &Dir, name: &[u8], path: &[u8]) -> Result<Dir> {
        parent
            .open_child(name)
            .map_err(|e| self.io(path, "opening directory", e))
    }

    /// Owner, mode and mtime of a file or directory, through its fd. The owner goes first
    /// because chown clears set-id bits. Unprivileged, the owner and mode go to the
    /// [`Ownership`] record and the file keeps owner rights on disk (see the module doc).
    fn set_metadata(
        &mut self,
        fd: impl std::os::fd::AsFd,
        path: &[u8],
        header: &tar::Header,
    ) -> Result<()> {
        let (uid, gid) = ids(header);
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let on_disk = if self.as_root {
            sysfs::fchown(&fd, uid, gid).map_err(|e| self.io(path, "setting owner", e))?;
            mode
        } else {
            self.ownership.set(path, pseudo::Meta { mode, uid, gid });
            let owner_bits = if header.entry_type() == EntryType::Directory {
                0o700
            } else {
                0o600
            };
            (mode & 0o777) | owner_bits
        };
        sysfs::fchmod(&fd, on_disk).map_err(|e| self.io(path, "setting mode", e))?;
        sysfs::set_mtime(&fd, mtime(header)).map_err(|e| self.io(path, "setting mtime", e))
    }

    fn set_link_metadata(
        &mut self,
        parent: &Dir,
        name: &[u8],
        path: &[u8],
        header: &tar::Header,
    ) -> Result<()> {
        let (uid, gid) = ids(header);
        if self.as_root {
            parent
                .lchown(name, uid, gid)
                .map_err(|e| self.io(path, "setting symlink owner", e))?;
        } else {
            let mode = 0o777;
            self.ownership.set(path, pseudo::Meta { mode, uid, gid });
        }
        parent
            .lset_mtime(name, mtime(header))
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

    fn io(&self, path: &[u8], what: &str, e: io::Error) -> Error {
        Error::io(format!("layer {}: {what} {}", self.layer, show(path)), e)
    }
}

/// A writer that notes whether a write failed, so a copy's error can be told apart from
/// the reader's.
struct WriteSide<'a, W> {
    inner: W,
    failed: &'a mut bool,
}

impl<W: io::Write> io::Write for WriteSide<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|_| *self.failed = true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| *self.failed = true)
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

fn ids(header: &tar::Header) -> (u32, u32) {
    let uid = header.uid().unwrap_or(0);
    let gid = header.gid().unwrap_or(0);
    (
        u32::try_from(uid).unwrap_or(u32::MAX - 1),
        u32::try_from(gid).unwrap_or(u32::MAX - 1),
    )
}

fn mtime(header: &tar::Header) -> i64 {
    i64::try_from(header.mtime().unwrap_or(0)).unwrap_or(0)
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
        /// An entry with its own mode and owner (a symlink's `data` is its target).
        fn owned(mut self, kind: EntryType, path: &str, mode: u32, uid: u64, data: &[u8]) -> Self {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            let data = if kind == EntryType::Symlink {
                h.set_link_name(std::str::from_utf8(data).unwrap()).unwrap();
                &b""[..]
            } else {
                data
            };
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid + 1);
            h.set_mtime(1_700_000_000);
            h.set_path(path).unwrap();
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

    fn budget() -> Budget {
        Budget::new(Limits::from_config(&crate::config::CacheConfig::default()).unwrap())
    }

    fn apply(root: &Path, layer: Vec<u8>) -> Result<LayerStats> {
        apply_layer(
            root,
            layer.as_slice(),
            Compression::None,
            "sha256:test",
            &mut budget(),
            &mut Ownership::default(),
        )
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

    /// The cache's service user cannot chown nor keep a 0555 directory while it writes into
    /// it: what it unpacks stays its own and writable, and the SIF still gets the layers'
    /// owners and modes, set-id bits included, through the recorded pseudo file.
    #[test]
    fn an_unprivileged_unpack_gives_the_image_its_layers_owners_and_modes() {
        if berth_sys::identity::real_uid() != 0 {
            eprintln!("skipped: needs root to become another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let root = dir.path().join("rootfs");
        let lower = Layer::new()
            .owned(EntryType::Directory, "ro", 0o555, 0, b"")
            .owned(EntryType::Directory, "secret", 0o700, 0, b"")
            .owned(EntryType::Regular, "secret/key", 0o400, 0, b"k")
            .owned(EntryType::Regular, "bin/su", 0o4755, 0, b"#!")
            .hardlink("bin/su2", "bin/su")
            .owned(EntryType::Regular, "gone/f", 0o644, 5, b"")
            .bytes();
        let upper = Layer::new()
            .owned(EntryType::Regular, "ro/new", 0o644, 1234, b"n")
            .owned(EntryType::Symlink, "ln", 0o777, 42, b"ro/new")
            .file("gone/.wh..wh..opq", "")
            .bytes();
        let root2 = root.clone();
        let answer = berth_sys::identity::run_in_child_as(
            &berth_sys::LinuxSyscall,
            65534,
            65534,
            move || {
                std::fs::create_dir(&root2).unwrap();
                let mut ownership = Ownership::default();
                let mut budget = budget();
                for layer in [lower, upper] {
                    let applied = apply_layer(
                        &root2,
                        layer.as_slice(),
                        Compression::None,
                        "l",
                        &mut budget,
                        &mut ownership,
                    );
                    if let Err(e) = applied {
                        return e.to_string().into_bytes();
                    }
                }
                let pseudo = root2.with_file_name("pseudo");
                let args = ownership.mksquashfs_args(&pseudo).unwrap();
                let out = root2.with_file_name("image.sqfs");
                let made = std::process::Command::new("mksquashfs")
                    .arg(&root2)
                    .arg(&out)
                    .args(["-noappend", "-quiet", "-no-progress"])
                    .args(&args)
                    .output()
                    .unwrap();
                made.stderr
            },
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&answer), "");
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(root.join("ro")).unwrap();
        assert_eq!((on_disk.uid(), on_disk.mode() & 0o7777), (65534, 0o755));
        let su = std::fs::metadata(root.join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7000, 0, "no set-id bits on disk");
        let listing = std::process::Command::new("unsquashfs")
            .args(["-lln", "-d", ""])
            .arg(dir.path().join("image.sqfs"))
            .output()
            .unwrap();
        let listing = String::from_utf8(listing.stdout).unwrap();
        let entries: Vec<String> = listing
            .lines()
            .filter(|l| !l.starts_with("Parallel") && !l.is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!("{} {} {}", f[0], f[1], f.get(5).unwrap_or(&""))
            })
            .collect();
        assert_eq!(
            entries,
            [
                "drwxr-xr-x 0/0 ",
                "drwxr-xr-x 0/0 /bin",
                "-rwsr-xr-x 0/1 /bin/su",
                "-rwsr-xr-x 0/1 /bin/su2",
                "drwxr-xr-x 0/0 /gone",
                "lrwxrwxrwx 42/43 /ln",
                "dr-xr-xr-x 0/1 /ro",
                "-rw-r--r-- 1234/1235 /ro/new",
                "drwx------ 0/1 /secret",
                "-r-------- 0/1 /secret/key",
            ]
            .map(String::from)
            .to_vec(),
            "{listing}"
        );
    }

    #[test]
    fn refuses_escapes() {
        // A private parent, so that a stray `x` elsewhere cannot fool the final check.
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        refused(&root, Layer::new().file("../x", "x").bytes(), "`..`");
        refused(&root, Layer::new().file("a/../../x", "x").bytes(), "`..`");
        refused(&root, Layer::new().file("/abs", "x").bytes(), "absolute");
        refused(&root, Layer::new().symlink(".", "/").bytes(), "image root");
        refused(
            &root,
            Layer::new().symlink("./", "/etc").bytes(),
            "image root",
        );
        assert!(!outer.path().join("x").exists());
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
    fn a_replaced_parent_is_never_written_through_an_old_handle() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        // `d` is a directory, then a symlink out of the root: `d/f2` must be refused, not
        // written into the removed directory or through the symlink.
        refused(
            root.path(),
            Layer::new()
                .file("d/f1", "1")
                .symlink("d", outside.path().to_str().unwrap())
                .file("d/f2", "2")
                .bytes(),
            "symlink",
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // `e` is removed and made again: later files land in the new directory.
        apply(
            root.path(),
            Layer::new()
                .file("e/old", "1")
                .file("e", "now a file")
                .dir("e")
                .file("e/new", "2")
                .bytes(),
        )
        .unwrap();
        assert!(root.path().join("e/new").is_file() && !root.path().join("e/old").exists());
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

    /// A disk that fills while a file is written is the node's problem, reported as an I/O
    /// error naming the file (which the cache turns into its out-of-space message), never as
    /// a corrupt layer to push again.
    #[test]
    fn a_full_disk_is_not_a_corrupt_layer() {
        if berth_sys::identity::effective_uid() != 0 {
            eprintln!("skipped: needs root (mounts a small tmpfs)");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1M", "berth-unit-full"])
            .arg(root.path())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let err = apply(
            root.path(),
            Layer::new().file("big", &"x".repeat(3 << 20)).bytes(),
        );
        let _ = std::process::Command::new("umount")
            .arg(root.path())
            .status();
        match err {
            Err(Error::Io { context, source }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{context}");
                assert!(context.contains("writing file big"), "{context}");
            }
            other => panic!("{other:?}"),
        }
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
            apply_layer(
                root.path(),
                bytes.as_slice(),
                c,
                "l",
                &mut budget(),
                &mut Ownership::default(),
            )
            .unwrap();
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

    /// A reader of `len` zero bytes that counts how many were read, standing in for a
    /// highly compressible payload without holding it in memory.
    struct Zeros {
        left: u64,
        read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl Read for Zeros {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.left.min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            self.left -= n as u64;
            self.read
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(n)
        }
    }

    /// zstd of `header` followed by `size` zeros and the end of the archive, streamed: the
    /// review's bombs (a 4 GiB file in 132 KB; a 3 GiB GNU long name in 99 KB).
    fn bomb(header: &tar::Header, size: u64) -> Vec<u8> {
        let zeros = Zeros {
            left: size.div_ceil(512) * 512 + 1024,
            read: Default::default(),
        };
        let stream = io::Cursor::new(header.as_bytes().to_vec()).chain(zeros);
        zstd::stream::encode_all(stream, 3).unwrap()
    }

    fn small_limits() -> Limits {
        Limits {
            max_bytes: 64 << 20,
            ..Limits::from_config(&crate::config::CacheConfig::default()).unwrap()
        }
    }

    #[test]
    fn a_decompression_bomb_is_refused_at_its_header() {
        let mut h = tar::Header::new_gnu();
        h.set_path("big").unwrap();
        h.set_entry_type(EntryType::Regular);
        h.set_size(4 << 30);
        h.set_mode(0o644);
        h.set_cksum();
        let layer = bomb(&h, 4 << 30);
        assert!(layer.len() < 1 << 20, "{} bytes", layer.len());
        let root = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        let err = apply_layer(
            root.path(),
            layer.as_slice(),
            Compression::Zstd,
            "sha256:bomb",
            &mut Budget::new(small_limits()),
            &mut Ownership::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[cache] max_image_size = 64.0M") && err.contains("sha256:bomb"),
            "{err}"
        );
        // Refused at the header: nothing written, no time spent inflating 4 GiB.
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert!(!root.path().join("big").exists());
    }

    #[test]
    fn the_byte_limit_counts_every_layer_of_the_image() {
        let mut limits = small_limits();
        limits.max_bytes = 10_000;
        let mut budget = Budget::new(limits);
        let root = tempfile::tempdir().unwrap();
        let layer = || Layer::new().file("f", &"x".repeat(6000)).bytes();
        apply_layer(
            root.path(),
            layer().as_slice(),
            Compression::None,
            "l1",
            &mut budget,
            &mut Ownership::default(),
        )
        .unwrap();
        let err = apply_layer(
            root.path(),
            layer().as_slice(),
            Compression::None,
            "l2",
            &mut budget,
            &mut Ownership::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::ImageLimit {
                    key: "max_image_size",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_huge_gnu_long_name_is_refused_before_it_is_read() {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(EntryType::GNULongName);
        h.set_size(3 << 30);
        h.set_cksum();
        let root = tempfile::tempdir().unwrap();
        let refused = |r: Result<LayerStats>| {
            assert!(
                matches!(&r, Err(Error::UnsafeLayer { reason, .. }) if reason.contains("extension header")),
                "{r:?}"
            )
        };
        // The review's layer: 3 GiB of name in about 100 KB of zstd.
        let layer = bomb(&h, 3 << 30);
        refused(apply_layer(
            root.path(),
            layer.as_slice(),
            Compression::Zstd,
            "l",
            &mut budget(),
            &mut Ownership::default(),
        ));
        // Streamed uncompressed, to see how much was read before the refusal: the header and
        // at most the chunks in flight between the threads, never the 3 GiB name.
        let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let zeros = Zeros {
            left: 3 << 30,
            read: read.clone(),
        };
        let stream = io::Cursor::new(h.as_bytes().to_vec()).chain(zeros);
        refused(apply_layer(
            root.path(),
            stream,
            Compression::None,
            "l",
            &mut budget(),
            &mut Ownership::default(),
        ));
        let read = read.load(std::sync::atomic::Ordering::Relaxed);
        assert!(read < 16 << 20, "{read} bytes read");
        // A PAX header just over the bound is refused the same way, one at it is fine.
        for (size, ok) in [(EXTENSION_LIMIT + 1, false), (EXTENSION_LIMIT, true)] {
            let mut b = tar::Builder::new(Vec::new());
            let mut pax = tar::Header::new_ustar();
            pax.set_entry_type(EntryType::XHeader);
            pax.set_path("PaxHeaders/f").unwrap();
            let record = pax_record("comment", size);
            pax.set_size(record.len() as u64);
            pax.set_cksum();
            b.append(&pax, record.as_slice()).unwrap();
            let mut f = tar::Header::new_ustar();
            f.set_path("f").unwrap();
            f.set_size(0);
            f.set_cksum();
            b.append(&f, &b""[..]).unwrap();
            let r = apply(root.path(), b.into_inner().unwrap());
            assert_eq!(r.is_ok(), ok, "{size}: {r:?}");
        }
    }

    /// One PAX record `LEN KEY=VALUE\n` of exactly `total` bytes.
    fn pax_record(key: &str, total: u64) -> Vec<u8> {
        let total = total as usize;
        let digits = total.to_string().len();
        let value = "v".repeat(total - digits - key.len() - 3);
        let record = format!("{total} {key}={value}\n");
        assert_eq!(record.len(), total);
        record.into_bytes()
    }

    #[test]
    fn a_pax_size_is_followed_like_the_tar_crate_does() {
        // A PAX `size` record overrides the header's size (0 here): the guard must count
        // the 600 bytes and find the next header where the crate does.
        let mut b = tar::Builder::new(Vec::new());
        let mut pax = tar::Header::new_ustar();
        pax.set_entry_type(EntryType::XHeader);
        pax.set_path("PaxHeaders/big").unwrap();
        let record = b"12 size=600\n";
        pax.set_size(record.len() as u64);
        pax.set_cksum();
        b.append(&pax, &record[..]).unwrap();
        let mut f = tar::Header::new_ustar();
        f.set_path("big").unwrap();
        f.set_size(0);
        f.set_mode(0o644);
        f.set_cksum();
        b.append(&f, &[7u8; 600][..]).unwrap();
        let mut g = tar::Header::new_ustar();
        g.set_path("after").unwrap();
        g.set_size(3);
        g.set_mode(0o644);
        g.set_cksum();
        b.append(&g, &b"abc"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let root = tempfile::tempdir().unwrap();
        apply(root.path(), layer.clone()).unwrap();
        assert_eq!(std::fs::read(root.path().join("big")).unwrap(), [7u8; 600]);
        assert_eq!(std::fs::read(root.path().join("after")).unwrap(), b"abc");
        let mut limits = small_limits();
        limits.max_bytes = 600 + 12;
        let r = apply_layer(
            tempfile::tempdir().unwrap().path(),
            layer.as_slice(),
            Compression::None,
            "l",
            &mut Budget::new(limits),
            &mut Ownership::default(),
        );
        assert!(matches!(r, Err(Error::ImageLimit { .. })), "{r:?}");
    }

    #[test]
    fn entries_paths_and_depth_are_limited() {
        let root = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 3,
            max_path_length: 50,
            max_path_depth: 4,
            ..small_limits()
        };
        let run = |layer: Vec<u8>| {
            apply_layer(
                root.path(),
                layer.as_slice(),
                Compression::None,
                "l",
                &mut Budget::new(limits.clone()),
                &mut Ownership::default(),
            )
        };
        let key = |r: Result<LayerStats>| match r {
            Err(Error::ImageLimit { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let many = (0..4).fold(Layer::new(), |l, i| l.file(&format!("f{i}"), ""));
        assert_eq!(key(run(many.bytes())), "max_entries");
        let long = format!("{}/f", "x".repeat(49));
        assert_eq!(
            key(run(Layer::new().file(&long, "").bytes())),
            "max_path_length"
        );
        assert_eq!(
            key(run(Layer::new().file("a/b/c/d/e", "").bytes())),
            "max_path_depth"
        );
        assert_eq!(
            key(run(Layer::new().hardlink("l", "a/b/c/d/e").bytes())),
            "max_path_depth"
        );
        run(Layer::new()
            .file("a/b/c/d", "")
            .file("./a//b/c/d", "")
            .bytes())
        .unwrap();
    }
}
