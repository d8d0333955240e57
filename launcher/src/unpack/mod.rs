//! The rules for OCI layer tarballs, applied to the image's tree in memory.
//!
//! Layers come from registries, so every entry is hostile until proven otherwise. Each
//! layer's tar stream is read once: its entries change the merged tree ([`Tree`]) and a
//! regular file's contents go straight to the squashfs being built ([`Data`]); nothing is
//! unpacked on disk, so there is no file system to escape from, and still the rules of an
//! unpack onto disk hold, so that the image is what the layers say and nothing more:
//!
//! - paths are normalised from the raw header bytes; absolute paths and `..` are refused, and
//!   an entry that names the root itself (`.`) is refused unless it is a plain directory
//!   (GNU `tar -C dir .` writes one; it carries nothing but the root's own mode, ignored);
//! - a path whose parent is a symlink (planted by this or an earlier layer) or a file is
//!   refused: a symlink is never followed (umoci CVE-2021-29136 and friends);
//! - hard links must name an entry that already exists in the image, reached the same way,
//!   and not a directory;
//! - device nodes and fifos are skipped (an unprivileged container cannot use them, and a
//!   root-built cache must not hold device files users could reach);
//! - OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are applied, not copied;
//! - a file entry shorter than its header size (a truncated layer) is an error; a name
//!   longer than 255 bytes (what Linux and squashfs allow) is refused.
//!
//! Root builds images from registries, so everything it would spend is bounded per image
//! (see [`limits`]): bytes, entries, path length and depth, and the tar extension headers
//! that the `tar` crate would otherwise read whole into memory.
//!
//! Owners, modes (set-id bits included) and mtimes come from the headers, whoever builds
//! (root, or the cache's service user, who could not chown files on disk). Extended
//! attributes are not applied.

use std::collections::HashSet;
use std::io::{self, Read};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use tar::EntryType;

use crate::squash::{Data, FileData, Kind, Meta, Node, NodeId, Tree};
use crate::{Error, Result};

mod limits;
mod remove;

pub use limits::{Budget, Limits, EXTENSION_LIMIT};
pub use remove::remove_tree;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
/// The longest file name (one path component) Linux, and so squashfuse, can show.
const NAME_MAX: usize = 255;
/// Decompressed bytes handed from the decompressing thread to the reader per message, and
/// how many messages may wait: enough to keep the cores busy, little memory.
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

/// Applies one layer, decompressing it as `compression` says, to `tree`, streaming its
/// files' contents into `data`. `layer` names the layer in error messages (e.g. its
/// digest). What the layer declares is charged to `budget`, the image's, and the layer is
/// refused past its limits.
///
/// Decompression runs on a second thread, so that inflating the stream overlaps with
/// parsing it and handing blocks to the compressors.
pub fn apply_layer(
    tree: &mut Tree,
    data: &mut Data,
    reader: impl Read + Send,
    compression: Compression,
    layer: &str,
    budget: &mut Budget,
) -> Result<LayerStats> {
    let mut merger = Merger::new(tree, layer, budget.limits().clone());
    let mut stats = LayerStats::default();
    // Each entry is applied as soon as it is read: a refused one ends the layer.
    read_layer(
        data,
        reader,
        compression,
        layer,
        budget,
        &mut stats,
        |entry| merger.apply(entry),
    )?;
    Ok(stats)
}

/// A layer blob for [`apply_layers`]: its name (for messages), compression, and how to
/// open it (which may wait for its download).
pub struct Source<'a> {
    pub layer: String,
    pub compression: Compression,
    pub open: Box<dyn FnOnce() -> Result<Box<dyn Read + Send + 'a>> + Send + 'a>,
}

/// What one worker made of a layer: its entries in order, then how reading it ended.
type LayerRead = (Vec<Entry>, LayerStats, Result<()>);

/// Applies `sources` in order to `tree`, as [`apply_layer`] one after the other would, but
/// reads up to `workers` layers at once: each is decompressed and parsed on threads of
/// its own, its files' contents streamed into a stream of their own
/// ([`Data::fork`]), its entries kept; the entries are then applied to the tree layer by
/// layer, in order, with every rule (whiteouts, opaque directories, links, never through
/// a symlink) as the merged tree stands at that layer. The first error in layer order
/// wins: a layer's read error comes after its entries read before it are applied (so a
/// refused entry is reported as it would be one layer at a time), and ends the others.
pub fn apply_layers(
    tree: &mut Tree,
    data: &mut Data,
    sources: Vec<Source<'_>>,
    budget: &mut Budget,
    workers: usize,
) -> Result<Vec<LayerStats>> {
    let count = sources.len();
    let budget = &*budget;
    let sources: Vec<Mutex<Option<Source>>> =
        sources.into_iter().map(|s| Mutex::new(Some(s))).collect();
    let names: Vec<String> = sources
        .iter()
        .map(|s| {
            lock(s)
                .as_ref()
                .map(|s| s.layer.clone())
                .unwrap_or_default()
        })
        .collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let read: Mutex<Vec<Option<LayerRead>>> = Mutex::new((0..count).map(|_| None).collect());
    let ready = Condvar::new();
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, count.max(1)) {
            let mut data = data.fork();
            let (sources, next, stop, read, ready) = (&sources, &next, &stop, &read, &ready);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(source) = sources.get(i).and_then(|s| lock(s).take()) else {
                        return;
                    };
                    let mut entries = Vec::new();
                    let mut stats = LayerStats::default();
                    let reading = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        (source.open)().and_then(|reader| {
                            let reader = Stoppable {
                                inner: reader,
                                stop,
                            };
                            read_layer(
                                &mut data,
                                reader,
                                source.compression,
                                &source.layer,
                                budget,
                                &mut stats,
                                |entry| {
                                    entries.push(entry);
                                    Ok(())
                                },
                            )
                        })
                    }));
                    // A panic still fills the slot (the merge waits for it), then goes on
                    // to the scope, which hands it to the caller, as one thread would.
                    let (ended, panic) = match reading {
                        Ok(ended) => (ended, None),
                        Err(panic) => {
                            let ended = Err(bad(&source.layer, "reading it panicked".into()));
                            (ended, Some(panic))
                        }
                    };
                    lock(read)[i] = Some((entries, stats, ended));
                    ready.notify_all();
                    if let Some(panic) = panic {
                        std::panic::resume_unwind(panic);
                    }
                }
            });
        }
        let merged = (|| {
            let mut all = Vec::with_capacity(count);
            for (i, layer) in names.iter().enumerate() {
                let (entries, stats, ended) = {
                    let mut slots = lock(&read);
                    loop {
                        match slots[i].take() {
                            Some(done) => break done,
                            None => slots = ready.wait(slots).unwrap_or_else(|p| p.into_inner()),
                        }
                    }
                };
                let mut merger = Merger::new(tree, layer, budget.limits().clone());
                for entry in entries {
                    merger.apply(entry)?;
                }
                ended?;
                all.push(stats);
            }
            Ok(all)
        })();
        // The workers still reading stop at their next read.
        stop.store(true, Ordering::Relaxed);
        merged
    })
}

/// How many layers [`apply_layers`] should read at once on `threads` cores: each reader
/// keeps about two cores busy (inflate, parse, its share of the compressors), and more
/// than 8 at once would only add their buffers (8 MiB each). One on two cores: a second
/// reader there only spills its blocks to be copied later (measured: 25-28 s against
/// 20-21 s for the benchmark's 4.2 GB image, docs/BENCHMARKS.md).
pub fn layer_workers(threads: usize) -> usize {
    (threads / 2).clamp(1, 8)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A layer blob that ends with an error once the build has failed elsewhere.
struct Stoppable<'s, R> {
    inner: R,
    stop: &'s AtomicBool,
}

impl<R: Read> Read for Stoppable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("the build stopped (another layer failed)"));
        }
        self.inner.read(buf)
    }
}

/// Reads one layer: decompresses it (on a thread of its own), parses its tar stream
/// through the limits' guard, streams each regular file's contents into `data`, and hands
/// every entry to `each`, in order.
fn read_layer(
    data: &mut Data,
    reader: impl Read + Send,
    compression: Compression,
    layer: &str,
    budget: &Budget,
    stats: &mut LayerStats,
    each: impl FnMut(Entry) -> Result<()>,
) -> Result<()> {
    let decoder = decoder(reader, compression)
        .map_err(|e| Error::io(format!("starting the decoder for layer {layer}"), e))?;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel(CHUNKS_IN_FLIGHT);
        // Chunks read go back to the decompressing thread, to be filled again rather than
        // allocated and zeroed anew (one 256 KiB chunk per 256 KiB of the layer otherwise).
        let (back_tx, back_rx) = mpsc::sync_channel(CHUNKS_IN_FLIGHT);
        scope.spawn(move || decompress(decoder, &tx, &back_rx));
        // The reader consumes the receiver: when it stops early (a refused entry), the
        // decompressing thread's next send fails and it ends, so the scope can close.
        let stream = ChannelReader {
            rx,
            back: back_tx,
            chunk: Vec::new(),
            len: 0,
            pos: 0,
        };
        read_tar(data, stream, layer, budget, stats, each)
    })
}

/// [`read_layer`]'s parsing half, on the caller's thread, over the decompressed tar stream.
fn read_tar(
    data: &mut Data,
    tar: impl Read,
    layer: &str,
    budget: &Budget,
    stats: &mut LayerStats,
    each: impl FnMut(Entry) -> Result<()>,
) -> Result<()> {
    let mut reader = Reader { data, layer, stats };
    let mut archive = tar::Archive::new(limits::TarGuard::new(tar, budget, layer));
    let result = reader.run(&mut archive, each);
    // A limit the guard enforced reaches the reader as a bare I/O error: say which.
    match (result, archive.into_inner().refusal) {
        (Err(_), Some(refusal)) => Err(refusal),
        (result, _) => result,
    }
}

/// Applies one layer's tar stream, already decompressed (e.g. by [`decoder`]), on the
/// caller's thread: [`apply_layer`] without its decompressing thread, for the layer fuzz
/// target, which runs these rules on thousands of inputs a second.
pub fn apply_tar(
    tree: &mut Tree,
    data: &mut Data,
    tar: impl Read,
    layer: &str,
    budget: &Budget,
) -> Result<LayerStats> {
    let mut merger = Merger::new(tree, layer, budget.limits().clone());
    let mut stats = LayerStats::default();
    read_tar(data, tar, layer, budget, &mut stats, |entry| {
        merger.apply(entry)
    })?;
    Ok(stats)
}

/// The decompressed stream of a layer blob.
pub fn decoder<'r>(
    reader: impl Read + Send + 'r,
    compression: Compression,
) -> io::Result<Box<dyn Read + Send + 'r>> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        // Every member of a multi-member stream (pigz, concatenated), as Go's gzip.Reader
        // reads them for docker and containerd; `GzDecoder` stops after the first.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
    })
}

/// A chunk of the decompressed stream: its first `len` bytes (0: the end).
type Chunk = io::Result<(Vec<u8>, usize)>;

/// The decompressing thread: reads `decoder` to the end (or its first error) in chunks,
/// into the chunks the reader gave `back` where it has some.
fn decompress(
    mut decoder: Box<dyn Read + Send + '_>,
    tx: &mpsc::SyncSender<Chunk>,
    back: &mpsc::Receiver<Vec<u8>>,
) {
    loop {
        let mut chunk = back.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        let n = match decoder.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        if tx.send(Ok((chunk, n))).is_err() || n == 0 {
            return;
        }
    }
}

/// The reader's side of the decompressed stream.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    back: mpsc::SyncSender<Vec<u8>>,
    chunk: Vec<u8>,
    len: usize,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.len {
            match self.rx.recv() {
                Ok(next) => {
                    let (chunk, len) = next?;
                    let used = std::mem::replace(&mut self.chunk, chunk);
                    // Not the empty placeholder of the start. When the channel is full (the
                    // thread has enough) or gone (it ended), the chunk is dropped.
                    if used.len() == CHUNK {
                        let _ = self.back.try_send(used);
                    }
                    (self.len, self.pos) = (len, 0);
                }
                // The thread ended after the empty end-of-stream chunk.
                Err(mpsc::RecvError) => return Ok(0),
            }
        }
        let n = buf.len().min(self.len - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One tar entry as read: what [`Merger::apply`] applies to the tree.
struct Entry {
    raw_path: Vec<u8>,
    kind: EntryType,
    meta: Meta,
    link: Option<Vec<u8>>,
    /// A regular file's contents, already in the image.
    contents: Option<FileData>,
}

/// Reads a layer's entries, streaming regular files' contents into the image.
struct Reader<'a> {
    data: &'a mut Data,
    layer: &'a str,
    stats: &'a mut LayerStats,
}

impl Reader<'_> {
    fn run<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
        mut each: impl FnMut(Entry) -> Result<()>,
    ) -> Result<()> {
        let entries = archive
            .entries()
            .map_err(|e| bad(self.layer, format!("not a tar archive: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| bad(self.layer, format!("corrupt tar stream: {e}")))?;
            self.stats.entries += 1;
            each(self.read(entry)?)?;
        }
        Ok(())
    }

    fn read<R: Read>(&mut self, mut entry: tar::Entry<R>) -> Result<Entry> {
        let raw_path = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        let meta = meta(entry.header());
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let mut contents = None;
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                // A path the merge will refuse is not worth reading.
                if let Ok(Some(path)) = normalise(&raw_path) {
                    let expected = entry.size();
                    let layer = self.layer;
                    let (file, copied) =
                        self.data.file(&mut entry, expected, |e| Error::BadLayer {
                            layer: layer.to_string(),
                            reason: format!("reading {}: {e}", show(&path)),
                        })?;
                    if copied != expected {
                        return Err(bad(
                            self.layer,
                            format!("{} is truncated: {copied} of {expected} bytes", show(&path)),
                        ));
                    }
                    self.stats.bytes += copied;
                    contents = Some(file);
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.stats.skipped_special += 1;
            }
            _ => {}
        }
        Ok(Entry {
            raw_path,
            kind,
            meta,
            link,
            contents,
        })
    }
}

/// Applies a layer's entries, in order, to the image's tree.
struct Merger<'a> {
    tree: &'a mut Tree,
    layer: &'a str,
    /// Paths this layer created: an opaque whiteout hides only what lower layers left.
    created: HashSet<Vec<u8>>,
    limits: Limits,
}

impl<'a> Merger<'a> {
    fn new(tree: &'a mut Tree, layer: &'a str, limits: Limits) -> Self {
        Merger {
            tree,
            layer,
            created: HashSet::new(),
            limits,
        }
    }

    fn apply(&mut self, entry: Entry) -> Result<()> {
        let Entry {
            raw_path,
            kind,
            meta,
            link,
            contents,
        } = entry;
        let Some(path) = normalise(&raw_path).map_err(|why| self.refuse(&raw_path, why))? else {
            return if kind == EntryType::Directory {
                Ok(())
            } else {
                Err(self.refuse(&raw_path, "it would replace the image root"))
            };
        };
        self.limits.check_path(self.layer, &path)?;
        if path.split(|b| *b == b'/').any(|c| c.len() > NAME_MAX) {
            return Err(self.refuse(&path, "a file name in it is longer than 255 bytes"));
        }
        let (parent, name) = self.parent(&path, true)?.expect("parents are created");

        if name == OPAQUE_WHITEOUT {
            // `parent` is the directory the marker sits in, the one to make opaque.
            self.remove_lower_children(parent, parent_of(&path));
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(self.refuse(&raw_path, "malformed whiteout"));
            }
            self.entries(parent).remove(hidden);
            return Ok(());
        }

        match kind {
            EntryType::Directory => {
                let existing = self.entries(parent).get(name).copied();
                match existing {
                    // A directory again: its entries stay, its metadata is the new one's.
                    Some(dir) if self.tree.entries(dir).is_some() => {
                        self.tree.node_mut(dir).meta = meta;
                    }
                    _ => {
                        self.put(parent, name, Kind::Dir(Default::default()), meta);
                    }
                }
            }
            EntryType::Regular | EntryType::Continuous => {
                let contents = contents.expect("a file's contents are read with it");
                self.put(parent, name, Kind::File(contents), meta);
            }
            EntryType::Symlink => {
                let target =
                    link.ok_or_else(|| self.refuse(&raw_path, "symlink without a target"))?;
                let meta = Meta {
                    mode: 0o777,
                    ..meta
                };
                self.put(parent, name, Kind::Symlink(target.into()), meta);
            }
            EntryType::Link => {
                let raw_target =
                    link.ok_or_else(|| self.refuse(&raw_path, "hard link without a target"))?;
                let target = normalise(&raw_target)
                    .map_err(|why| self.refuse(&raw_path, &format!("hard link target {why}")))?
                    .ok_or_else(|| self.refuse(&raw_path, "hard link to the image root"))?;
                self.limits.check_path(self.layer, &target)?;
                let node = match self.parent(&target, false)? {
                    Some((dir, name)) => self.entries(dir).get(name).copied(),
                    None => None,
                };
                match node {
                    None => {
                        return Err(self.refuse(
                            &raw_path,
                            &format!(
                                "hard link to {}, which is not (yet) in the image",
                                show(&target)
                            ),
                        ))
                    }
                    Some(dir) if self.tree.entries(dir).is_some() => {
                        return Err(self.refuse(&raw_path, "hard link to a directory"))
                    }
                    Some(node) => {
                        // A link to itself leaves the file as it is.
                        self.entries(parent).insert(name.into(), node);
                    }
                }
            }
            // Device nodes and fifos are left out (counted when read).
            EntryType::Char | EntryType::Block | EntryType::Fifo => return Ok(()),
            // Metadata-only entries that the tar crate did not fold into the next entry.
            EntryType::XGlobalHeader => return Ok(()),
            other => {
                return Err(self.refuse(&raw_path, &format!("unsupported tar entry type {other:?}")))
            }
        }
        self.created.insert(path);
        Ok(())
    }

    /// The directory that holds `path` (a normalised, non-empty path), reached without
    /// following any symlink, and the final component. Missing parents are created as
    /// 0755 root directories (layers may omit them) when `create` says so; otherwise a
    /// missing parent is `None`.
    fn parent<'p>(&mut self, path: &'p [u8], create: bool) -> Result<Option<(NodeId, &'p [u8])>> {
        let dir_path = parent_of(path);
        let name = &path[dir_path.len() + usize::from(!dir_path.is_empty())..];
        let mut dir = Tree::ROOT;
        if dir_path.is_empty() {
            return Ok(Some((dir, name)));
        }
        let mut end = 0;
        for component in dir_path.split(|b| *b == b'/') {
            end += component.len();
            let next = match self.entries(dir).get(component).copied() {
                Some(next) => next,
                None if create => {
                    // What a root unpack made of a parent no entry declares.
                    let meta = Tree::new().node(Tree::ROOT).meta;
                    self.put(dir, component, Kind::Dir(Default::default()), meta)
                }
                None => return Ok(None),
            };
            if self.tree.entries(next).is_none() {
                return Err(self.refuse(
                    path,
                    &format!(
                        "its parent {} is a symlink or not a directory; berth never writes \
                         through symlinks",
                        show(&path[..end])
                    ),
                ));
            }
            dir = next;
            end += 1;
        }
        Ok(Some((dir, name)))
    }

    fn entries(&mut self, dir: NodeId) -> &mut std::collections::BTreeMap<Box<[u8]>, NodeId> {
        self.tree.entries_mut(dir).expect("parents are directories")
    }

    /// A new node named `name` in `dir`, replacing whatever had that name.
    fn put(&mut self, dir: NodeId, name: &[u8], kind: Kind, meta: Meta) -> NodeId {
        let id = self.tree.add(Node { kind, meta });
        self.entries(dir).insert(name.into(), id);
        id
    }

    /// Removes the entries of `dir` (at `dir_path`) except what this layer itself added:
    /// an opaque whiteout hides only what lower layers put there.
    fn remove_lower_children(&mut self, dir: NodeId, dir_path: &[u8]) {
        let created = &self.created;
        self.tree
            .entries_mut(dir)
            .expect("parents are directories")
            .retain(|name, _| created.contains(&join(dir_path, name)));
    }

    fn refuse(&self, path: &[u8], why: &str) -> Error {
        Error::UnsafeLayer {
            layer: self.layer.to_string(),
            path: show(path),
            reason: why.to_string(),
        }
    }
}

fn bad(layer: &str, reason: String) -> Error {
    Error::BadLayer {
        layer: layer.to_string(),
        reason,
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

/// Owner, mode and mtime from a header; ids and times that do not fit squashfs's 32 bits
/// become the largest they can be.
fn meta(header: &tar::Header) -> Meta {
    let id = |v: io::Result<u64>| u32::try_from(v.unwrap_or(0)).unwrap_or(u32::MAX - 1);
    Meta {
        mode: header.mode().unwrap_or(0o644) & 0o7777,
        uid: id(header.uid()),
        gid: id(header.gid()),
        mtime: u32::try_from(header.mtime().unwrap_or(0)).unwrap_or(u32::MAX),
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

    use crate::squash::tests::{
        build_image, build_image_parallel, default_budget as budget, extract,
    };
    use crate::squash::Options;
    use std::path::{Path, PathBuf};

    /// An image built from the layers applied so far, read back from its squashfs by the
    /// real unsquashfs into `path()` after each layer.
    struct Img {
        dir: tempfile::TempDir,
        layers: Vec<(Vec<u8>, Compression)>,
    }

    impl Img {
        fn new() -> Img {
            Img {
                dir: tempfile::tempdir().unwrap(),
                layers: Vec::new(),
            }
        }
        fn path(&self) -> PathBuf {
            self.dir.path().join("root")
        }
        fn apply(&mut self, layer: Vec<u8>) -> Result<LayerStats> {
            self.apply_as(layer, Compression::None)
        }
        fn apply_as(&mut self, layer: Vec<u8>, compression: Compression) -> Result<LayerStats> {
            let mut all: Vec<(&[u8], Compression)> = self
                .layers
                .iter()
                .map(|(l, c)| (l.as_slice(), *c))
                .collect();
            all.push((&layer, compression));
            // Every layer stack also goes through the parallel path (three layers read at
            // once): the same image, or the same error.
            let parallel = build_image_parallel(self.dir.path(), &all, 3);
            let built = build_image(self.dir.path(), &all, &mut budget(), &Options::default());
            let (image, stats, _) = match (built, parallel) {
                (Ok(built), Ok((parallel, parallel_stats))) => {
                    assert_eq!(built.1, parallel_stats);
                    let other = self.dir.path().join("parallel-root");
                    let _ = std::fs::remove_dir_all(&other);
                    extract(&parallel, &other);
                    built
                }
                (Err(e), Err(p)) => {
                    // The layer names differ (test vs testN); the rest is the same.
                    let strip =
                        |m: String| m.replace("sha256:test", "").replace(char::is_numeric, "");
                    assert_eq!(strip(e.to_string()), strip(p.to_string()));
                    return Err(e);
                }
                (built, parallel) => panic!("sequential {built:?}, parallel {parallel:?}"),
            };
            let _ = std::fs::remove_dir_all(self.path());
            extract(&image, &self.path());
            same_tree(&self.path(), &self.dir.path().join("parallel-root"));
            self.layers.push((layer, compression));
            Ok(stats.last().cloned().unwrap_or_default())
        }
        fn refused(&mut self, layer: Vec<u8>, needle: &str) {
            let err = self.apply(layer).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    /// Two extracted trees hold the same entries: names, types, modes, owners, contents,
    /// link targets.
    fn same_tree(a: &Path, b: &Path) {
        use std::os::unix::fs::MetadataExt;
        let (ma, mb) = (a.symlink_metadata().unwrap(), b.symlink_metadata().unwrap());
        let what = |m: &std::fs::Metadata| (m.mode(), m.uid(), m.gid(), m.nlink());
        assert_eq!(what(&ma), what(&mb), "{}", a.display());
        if ma.file_type().is_symlink() {
            assert_eq!(a.read_link().unwrap(), b.read_link().unwrap());
        } else if ma.is_file() {
            assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        } else if ma.is_dir() {
            let names = |d: &Path| {
                let mut n: Vec<_> = std::fs::read_dir(d)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                n.sort();
                n
            };
            assert_eq!(names(a), names(b), "{}", a.display());
            for name in names(a) {
                same_tree(&a.join(&name), &b.join(&name));
            }
        }
    }

    /// One layer through the build path, named `name`, with its own compression and
    /// budget, into a squashfs nobody reads.
    fn apply_one(
        layer: impl Read + Send,
        compression: Compression,
        name: &str,
        budget: &mut Budget,
    ) -> Result<LayerStats> {
        let out = tempfile::tempfile().unwrap();
        let mut stats = None;
        crate::squash::build(&out, 0, &Options::default(), |data| {
            let mut tree = Tree::new();
            stats = Some(apply_layer(
                &mut tree,
                data,
                layer,
                compression,
                name,
                budget,
            )?);
            Ok(tree)
        })?;
        Ok(stats.expect("applied"))
    }

    #[test]
    fn applies_files_dirs_links_and_modes() {
        let mut root = Img::new();
        let stats = root
            .apply(
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

    /// The cache's service user cannot chown files: the image still gets the layers'
    /// owners and modes, set-id bits included, since nothing goes through its file system.
    #[test]
    fn an_unprivileged_build_gives_the_image_its_layers_owners_and_modes() {
        if berth_sys::identity::real_uid() != 0 {
            eprintln!("skipped: needs root to become another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
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
        let at = dir.path().to_owned();
        let answer = berth_sys::identity::run_in_child_as(
            &berth_sys::LinuxSyscall,
            65534,
            65534,
            move || {
                let layers = [
                    (&lower[..], Compression::None),
                    (&upper[..], Compression::None),
                ];
                match build_image(&at, &layers, &mut budget(), &Options::default()) {
                    Ok(_) => Vec::new(),
                    Err(e) => e.to_string().into_bytes(),
                }
            },
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&answer), "");
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
        let mut root = Img::new();
        root.refused(Layer::new().file("../x", "x").bytes(), "`..`");
        root.refused(Layer::new().file("a/../../x", "x").bytes(), "`..`");
        root.refused(Layer::new().file("/abs", "x").bytes(), "absolute");
        root.refused(Layer::new().symlink(".", "/").bytes(), "image root");
        root.refused(Layer::new().symlink("./", "/etc").bytes(), "image root");
        let mut long = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        long.append_data(&mut h, "n".repeat(256), &b"x"[..])
            .unwrap();
        root.refused(long.into_inner().unwrap(), "longer than 255 bytes");
    }

    /// Layers read at once report the first error in layer order: a refusal in the second
    /// layer (a path through the first layer's symlink) wins over the third layer being
    /// garbage, though the third fails first, and the first layer's contents are merged
    /// before it.
    #[test]
    fn parallel_layers_report_the_first_error_in_layer_order() {
        let dir = tempfile::tempdir().unwrap();
        let base = Layer::new()
            .symlink("l", "/etc")
            .file("big", &"x".repeat(1 << 20))
            .bytes();
        let through = Layer::new().file("l/passwd", "evil").bytes();
        let garbage = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        let layers: [(&[u8], Compression); 3] = [
            (&base, Compression::None),
            (&through, Compression::None),
            (&garbage, Compression::Gzip),
        ];
        let err = build_image_parallel(dir.path(), &layers, 3).unwrap_err();
        assert!(
            matches!(&err, Error::UnsafeLayer { layer, .. } if layer == "sha256:test1"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("never writes through symlinks"),
            "{err}"
        );
        // Without the refusal, the garbage layer is the error.
        let err = build_image_parallel(dir.path(), &[layers[0], layers[2]], 3).unwrap_err();
        assert!(err.to_string().contains("sha256:test1"), "{err}");
    }

    #[test]
    fn never_writes_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        let mut root = Img::new();
        let target = outside.path().to_str().unwrap();
        // In one layer, and across layers.
        root.refused(
            Layer::new()
                .symlink("evil", target)
                .file("evil/pwned", "x")
                .bytes(),
            "symlink",
        );
        // A refused layer leaves nothing: the symlink comes in a layer of its own.
        root.apply(Layer::new().symlink("evil", target).bytes())
            .unwrap();
        root.refused(Layer::new().file("evil/pwned", "x").bytes(), "symlink");
        root.refused(Layer::new().dir("evil/sub").bytes(), "symlink");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // Replacing the symlink itself is fine: it is removed, not followed.
        root.apply(Layer::new().file("evil", "plain").bytes())
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("evil")).unwrap(),
            "plain"
        );
    }

    #[test]
    fn a_replaced_parent_is_never_written_through_an_old_handle() {
        let outside = tempfile::tempdir().unwrap();
        let mut root = Img::new();
        // `d` is a directory, then a symlink out of the root: `d/f2` must be refused, not
        // written into the removed directory or through the symlink.
        root.refused(
            Layer::new()
                .file("d/f1", "1")
                .symlink("d", outside.path().to_str().unwrap())
                .file("d/f2", "2")
                .bytes(),
            "symlink",
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // `e` is removed and made again: later files land in the new directory.
        root.apply(
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
        let mut root = Img::new();
        root.refused(
            Layer::new().hardlink("l", "../../etc/shadow").bytes(),
            "`..`",
        );
        root.refused(
            Layer::new().hardlink("l", "/etc/shadow").bytes(),
            "absolute",
        );
        root.refused(
            Layer::new()
                .hardlink("l", "later")
                .file("later", "x")
                .bytes(),
            "not (yet)",
        );
        root.refused(
            Layer::new()
                .symlink("s", "/etc")
                .hardlink("l", "s/shadow")
                .bytes(),
            "symlink",
        );
        root.refused(
            Layer::new().dir("d").hardlink("l", "d").bytes(),
            "directory",
        );
    }

    /// A hard link is a second name for the same inode: it keeps the contents when a later
    /// layer removes or replaces the first name, and a later layer can replace it alone.
    #[test]
    fn hard_links_outlive_their_first_name() {
        let mut root = Img::new();
        root.apply(
            Layer::new()
                .file("a", "shared")
                .hardlink("b", "a")
                .hardlink("c", "a")
                .bytes(),
        )
        .unwrap();
        root.apply(Layer::new().file(".wh.a", "").file("c", "new").bytes())
            .unwrap();
        let r = root.path();
        assert!(!r.join("a").exists());
        assert_eq!(std::fs::read_to_string(r.join("b")).unwrap(), "shared");
        assert_eq!(std::fs::read_to_string(r.join("c")).unwrap(), "new");
        use std::os::unix::fs::MetadataExt;
        // Only `b` is left of the three names: unsquashfs links what squashfs says is one.
        assert_eq!(std::fs::metadata(r.join("b")).unwrap().nlink(), 1);
    }

    #[test]
    fn applies_whiteouts() {
        let mut root = Img::new();
        let r = root.path();
        root.apply(
            Layer::new()
                .file("a/keep", "1")
                .file("a/gone", "1")
                .file("o/lower", "1")
                .file("top", "1")
                .bytes(),
        )
        .unwrap();
        root.apply(
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
        root.refused(
            Layer::new().file("a/.wh...", "").bytes(),
            "malformed whiteout",
        );
    }

    #[test]
    fn rejects_truncated_layers() {
        let mut root = Img::new();
        let mut bytes = Layer::new().file("big", &"x".repeat(4096)).bytes();
        bytes.truncate(512 + 1000);
        let err = root.apply(bytes).unwrap_err();
        assert!(matches!(err, Error::BadLayer { .. }), "{err}");
    }

    /// A blob whose compressed bytes are damaged inside a file's contents: the layer is
    /// named as bad (the registry's copy is broken), not reported as a local I/O error.
    #[test]
    fn a_corrupt_stream_inside_a_file_is_a_bad_layer() {
        let contents: String = (0..400_000u32)
            .map(|i| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8))
            .collect();
        let plain = Layer::new().file("f", &contents).bytes();
        let mut gz = gzip(&plain);
        let middle = gz.len() / 2;
        gz[middle..middle + 64].fill(0xff);
        let err = apply_one(
            gz.as_slice(),
            Compression::Gzip,
            "sha256:bad",
            &mut budget(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::BadLayer { layer, .. } if layer == "sha256:bad"),
            "{err:?}"
        );
    }

    #[test]
    fn decompresses_gzip_and_zstd() {
        let plain = Layer::new().file("f", "hello").bytes();
        let gz = gzip(&plain);
        let zst = zstd::stream::encode_all(plain.as_slice(), 3).unwrap();
        for (bytes, c) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
            let mut root = Img::new();
            root.apply_as(bytes, c).unwrap();
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

    /// `plain` as one gzip member.
    fn gzip(plain: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(plain).unwrap();
        gz.finish().unwrap()
    }

    /// A layer gzipped as several members (pigz, `cat a.gz b.gz`), split in the middle of a
    /// file's contents: read to its end. flate2's `GzDecoder`, used before, stopped after
    /// the first member, and the tar stream ended inside the file. Other bytes between
    /// members are a corrupt layer.
    #[test]
    fn reads_every_member_of_a_multi_member_gzip_layer() {
        let contents = "x".repeat(100_000);
        let plain = Layer::new().file("a", &contents).file("b", "bee").bytes();
        let members: Vec<Vec<u8>> = plain.chunks(40_000).map(gzip).collect();
        let mut root = Img::new();
        root.apply_as(members.concat(), Compression::Gzip).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("a")).unwrap(),
            contents
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("b")).unwrap(),
            "bee"
        );
        // Bytes after a member that are not another member: a corrupt blob.
        let mut stream = members[0].clone();
        stream.extend_from_slice(b"garbage");
        stream.extend_from_slice(&members[1..].concat());
        let err = apply_one(
            stream.as_slice(),
            Compression::Gzip,
            "sha256:tail",
            &mut budget(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::BadLayer { layer, .. } if layer == "sha256:tail"),
            "{err:?}"
        );
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
        let start = std::time::Instant::now();
        let err = apply_one(
            layer.as_slice(),
            Compression::Zstd,
            "sha256:bomb",
            &mut Budget::new(small_limits()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[cache] max_image_size = 64.0M") && err.contains("sha256:bomb"),
            "{err}"
        );
        // Refused at the header: no time spent inflating 4 GiB.
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn the_byte_limit_counts_every_layer_of_the_image() {
        let mut limits = small_limits();
        limits.max_bytes = 10_000;
        let mut budget = Budget::new(limits);
        let layer = || Layer::new().file("f", &"x".repeat(6000)).bytes();
        apply_one(layer().as_slice(), Compression::None, "l1", &mut budget).unwrap();
        let err = apply_one(layer().as_slice(), Compression::None, "l2", &mut budget).unwrap_err();
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
        let mut root = Img::new();
        let refused = |r: Result<LayerStats>| {
            assert!(
                matches!(&r, Err(Error::UnsafeLayer { reason, .. }) if reason.contains("extension header")),
                "{r:?}"
            )
        };
        // The review's layer: 3 GiB of name in about 100 KB of zstd.
        let layer = bomb(&h, 3 << 30);
        refused(apply_one(
            layer.as_slice(),
            Compression::Zstd,
            "l",
            &mut budget(),
        ));
        // Streamed uncompressed, to see how much was read before the refusal: the header and
        // at most the chunks in flight between the threads, never the 3 GiB name.
        let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let zeros = Zeros {
            left: 3 << 30,
            read: read.clone(),
        };
        let stream = io::Cursor::new(h.as_bytes().to_vec()).chain(zeros);
        refused(apply_one(stream, Compression::None, "l", &mut budget()));
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
            let r = root.apply(b.into_inner().unwrap());
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
        let mut root = Img::new();
        root.apply(layer.clone()).unwrap();
        assert_eq!(std::fs::read(root.path().join("big")).unwrap(), [7u8; 600]);
        assert_eq!(std::fs::read(root.path().join("after")).unwrap(), b"abc");
        let mut limits = small_limits();
        limits.max_bytes = 600 + 12;
        let r = apply_one(
            layer.as_slice(),
            Compression::None,
            "l",
            &mut Budget::new(limits),
        );
        assert!(matches!(r, Err(Error::ImageLimit { .. })), "{r:?}");
    }

    #[test]
    fn entries_paths_and_depth_are_limited() {
        let limits = Limits {
            max_entries: 3,
            max_path_length: 50,
            max_path_depth: 4,
            ..small_limits()
        };
        let run = |layer: Vec<u8>| {
            apply_one(
                layer.as_slice(),
                Compression::None,
                "l",
                &mut Budget::new(limits.clone()),
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
