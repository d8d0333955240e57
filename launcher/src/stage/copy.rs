//! Walking a source tree into a manifest, and copying it in parallel.
//!
//! - The walk never follows a symlink (`symlink_metadata`), and files are opened with
//!   `O_NOFOLLOW`, so a link swapped in after the walk is not followed either: links are
//!   copied as links, whatever they point at, and nothing outside the tree is read.
//! - Files are copied by worker threads (many small files are bound by per-file latency,
//!   not bandwidth), each with `std::io::copy`, which uses `copy_file_range` between two
//!   files on Linux (in-kernel, reflinks where the file system can) and falls back to
//!   read/write elsewhere.
//! - Modes and modification times are kept for files and directories; symlinks keep their
//!   target (their own times are not kept: nothing reads them).
//! - Everything is created private (0600/0700) and given its mode only once complete, and
//!   directories last, deepest first, so a directory's time is not changed by its content.

use std::fs::{self, File, FileTimes};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::registry::progress::Progress;
use crate::{Error, Result};

/// One entry of a source: its path relative to the source ("" for the source itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    /// Permission bits (with sticky; set-id bits are not kept: staged data is the user's).
    pub mode: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink { target: String },
}

/// The entries of `src` (a file or a directory), parents before their children, in name
/// order. Refuses what berth does not stage (devices, FIFOs, sockets) and names that are not
/// UTF-8, naming the path. A child is looked at through its directory's listing (`fstatat`
/// on the open directory), not by resolving its whole path again.
pub fn walk(src: &Path) -> Result<Vec<Entry>> {
    let root = fs::symlink_metadata(src)
        .map_err(|e| Error::io(format!("reading {}", src.display()), e))?;
    let mut entries = Vec::new();
    let mut pending = vec![(String::new(), root)];
    while let Some((rel, meta)) = pending.pop() {
        let path = join(src, &rel);
        let kind = if meta.is_dir() {
            let listing = |e| Error::io(format!("reading directory {}", path.display()), e);
            let mut children = Vec::new();
            for child in fs::read_dir(&path).map_err(listing)? {
                let child = child.map_err(listing)?;
                let name = child.file_name().into_string().map_err(|name| {
                    stage_error(format!(
                        "{}: the name {name:?} is not UTF-8; berth stages UTF-8 names only \
                         (rename the file)",
                        path.display()
                    ))
                })?;
                let meta = child
                    .metadata()
                    .map_err(|e| Error::io(format!("reading {}", child.path().display()), e))?;
                let rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                children.push((rel, meta));
            }
            // Reversed onto the stack, so they come off in name order.
            children.sort_unstable_by(|a, b| b.0.cmp(&a.0));
            pending.extend(children);
            Kind::Dir
        } else if meta.is_file() {
            Kind::File
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)
                .map_err(|e| Error::io(format!("reading link {}", path.display()), e))?;
            let target = target.into_os_string().into_string().map_err(|t| {
                stage_error(format!(
                    "{}: the link target {t:?} is not UTF-8",
                    path.display()
                ))
            })?;
            Kind::Symlink { target }
        } else {
            return Err(stage_error(format!(
                "{} is not a file, directory or symlink (a device, FIFO or socket); berth \
                 stages only those three: leave it out of the source",
                path.display()
            )));
        };
        entries.push(Entry {
            path: rel,
            size: if kind == Kind::File { meta.len() } else { 0 },
            kind,
            mode: meta.mode() & 0o1777,
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        });
    }
    Ok(entries)
}

/// Bytes of file data in `entries`.
pub fn data_size(entries: &[Entry]) -> u64 {
    entries.iter().map(|e| e.size).sum()
}

/// Copies `entries` (from [`walk`] of `src`) to `dst`, which must not exist, with `threads`
/// workers. On error `dst` may be partly written: the caller copies into a private
/// temporary name and removes it on failure.
pub fn copy(
    src: &Path,
    dst: &Path,
    entries: &[Entry],
    threads: usize,
    progress: &Mutex<Progress>,
) -> Result<()> {
    for entry in entries {
        let to = join(dst, &entry.path);
        match &entry.kind {
            Kind::Dir => fs::DirBuilder::new()
                .mode(0o700)
                .create(&to)
                .map_err(|e| Error::io(format!("creating {}", to.display()), e))?,
            Kind::Symlink { target } => std::os::unix::fs::symlink(target, &to)
                .map_err(|e| Error::io(format!("creating link {}", to.display()), e))?,
            Kind::File => {}
        }
    }
    let device = |path: &Path| fs::metadata(path).map(|m| m.dev()).ok();
    let same_fs = device(src) == device(dst.parent().unwrap_or(dst));
    let piece_bytes = (!same_fs && threads > 1).then_some(PIECE_BYTES);
    let work = plan(&spread_over_directories(entries), piece_bytes);
    copy_files(src, dst, &work, threads, same_fs, progress)?;
    for entry in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        let to = join(dst, &entry.path);
        let dir = File::open(&to).map_err(|e| Error::io(format!("opening {}", to.display()), e))?;
        finish(&dir, &to, entry)?;
    }
    Ok(())
}

/// Runs `work` with `threads` workers; the first error stops them all. Whole files go
/// through the kernel (`copy_file_range`) when `src` and `dst` share a file system
/// (`same_fs`), and everything else through each worker's buffer.
fn copy_files(
    src: &Path,
    dst: &Path,
    work: &[Work],
    threads: usize,
    same_fs: bool,
    progress: &Mutex<Progress>,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, work.len().max(1)) {
            scope.spawn(|| {
                let mut buffer = Vec::new();
                loop {
                    let at = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = work.get(at) else { break };
                    if failure.lock().is_ok_and(|f| f.is_some()) {
                        break;
                    }
                    if buffer.is_empty() && (!same_fs || item.piece.is_some()) {
                        buffer = vec![0; BUFFER_BYTES];
                    }
                    let done = match &item.piece {
                        None => {
                            copy_file(src, dst, item.entry, &mut buffer).map(|()| item.entry.size)
                        }
                        Some(piece) => copy_piece(src, dst, item.entry, piece, &mut buffer),
                    };
                    match done {
                        Ok(bytes) => progress
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .add(bytes),
                        Err(e) => {
                            failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            break;
                        }
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Between file systems, files above this size are copied in pieces of it by several
/// workers at once: one stream of reads from shared storage (NFS, Lustre) is bound by its
/// round trips and one core's copying, several in flight are not. Within one file system a
/// file is copied whole by the kernel (`copy_file_range`, a reflink where it can).
const PIECE_BYTES: u64 = 64 << 20;

/// One unit of a worker's work: a whole file, or one piece of a large one.
struct Work<'e> {
    entry: &'e Entry,
    piece: Option<Piece>,
}

/// A piece of a large file: where it is, and the state its file's pieces share.
struct Piece {
    offset: u64,
    len: u64,
    shared: Arc<Pieces>,
}

/// What the pieces of one file share: the two files, open while pieces are in flight, and
/// how many pieces are left, so that the last one checks the size and gives the copy its
/// mode and time.
#[derive(Default)]
struct Pieces {
    files: Mutex<Option<Arc<(File, File)>>>,
    left: AtomicUsize,
}

/// The work for `files` (in the order workers take them): large files' pieces first, so
/// that they spread over the workers, then the rest; without `piece_bytes` every file whole.
fn plan<'e>(files: &[&'e Entry], piece_bytes: Option<u64>) -> Vec<Work<'e>> {
    let piece_bytes = piece_bytes.unwrap_or(u64::MAX);
    let (large, small): (Vec<&Entry>, Vec<&Entry>) =
        files.iter().partition(|e| e.size > piece_bytes);
    let mut work = Vec::new();
    for entry in large {
        let count = entry.size.div_ceil(piece_bytes);
        let shared = Arc::new(Pieces {
            left: AtomicUsize::new(count as usize),
            ..Pieces::default()
        });
        for i in 0..count {
            let offset = i * piece_bytes;
            let len = piece_bytes.min(entry.size - offset);
            let shared = Arc::clone(&shared);
            work.push(Work {
                entry,
                piece: Some(Piece {
                    offset,
                    len,
                    shared,
                }),
            });
        }
    }
    work.extend(small.into_iter().map(|entry| Work { entry, piece: None }));
    work
}

/// Copies one piece of a large file at its offset (`pread`/`pwrite` through `buffer`); the
/// bytes copied. The first piece to run opens both files, the last one closes them after
/// checking that the source did not grow and finishing the copy.
fn copy_piece(
    src: &Path,
    dst: &Path,
    entry: &Entry,
    piece: &Piece,
    buffer: &mut [u8],
) -> Result<u64> {
    let Piece {
        offset,
        len,
        shared: pieces,
    } = piece;
    let (from, to) = (join(src, &entry.path), join(dst, &entry.path));
    let files = {
        let mut open = pieces.files.lock().unwrap_or_else(|p| p.into_inner());
        match &*open {
            Some(files) => Arc::clone(files),
            None => {
                let (input, output) = open_pair(&from, &to)?;
                Arc::clone(open.insert(Arc::new((input, output))))
            }
        }
    };
    let (input, output) = (&files.0, &files.1);
    let changed = |copied: u64| {
        stage_error(format!(
            "{} changed while it was copied ({} bytes when listed, {copied} at offset {offset}); \
             stage it again once it is no longer being written",
            from.display(),
            entry.size
        ))
    };
    let io = |e| Error::io(format!("copying {} to {}", from.display(), to.display()), e);
    let mut copied = 0;
    while copied < *len {
        let want = buffer.len().min((*len - copied) as usize);
        let n = match input.read_at(&mut buffer[..want], offset + copied) {
            Ok(0) => return Err(changed(offset + copied)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        output
            .write_all_at(&buffer[..n], offset + copied)
            .map_err(io)?;
        copied += n as u64;
    }
    if pieces.left.fetch_sub(1, Ordering::AcqRel) == 1 {
        pieces
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if input.read_at(&mut buffer[..1], entry.size).map_err(io)? != 0 {
            return Err(changed(entry.size + 1));
        }
        finish(output, &to, entry)?;
    }
    Ok(copied)
}

/// The files of `entries` in the order workers take them: round-robin over their
/// directories. Creating a file takes its directory's lock, so workers in one directory
/// wait for each other (perf shows them spinning on it), while workers in different ones
/// do not.
fn spread_over_directories(entries: &[Entry]) -> Vec<&Entry> {
    let mut groups: Vec<Vec<&Entry>> = Vec::new();
    let mut group_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for entry in entries.iter().filter(|e| e.kind == Kind::File) {
        let dir = entry.path.rsplit_once('/').map_or("", |(dir, _)| dir);
        let at = *group_of.entry(dir).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[at].push(entry);
    }
    let longest = groups.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest)
        .flat_map(|i| groups.iter().filter_map(move |g| g.get(i).copied()))
        .collect()
}

/// The buffer of each worker copying between two file systems: 128 KiB, as cp's. With
/// 256 KiB a 512 MiB copy took twice the kernel time here (perf: in the copy to the buffer;
/// a buffer that no longer stays in the CPU's cache between the read and the write).
const BUFFER_BYTES: usize = 128 << 10;

/// Copies one file: within one file system with `io::copy` (`copy_file_range`: in the
/// kernel, a reflink where the file system can), between two through `buffer` (empty for
/// the former). Between file systems `copy_file_range` fails (EXDEV) and `io::copy` falls
/// back to `sendfile`, which measured about 2x slower than `read`/`write` through the
/// buffer for a 1 GiB file here (docs/BENCHMARKS.md), and costs two more calls per file.
fn copy_file(src: &Path, dst: &Path, entry: &Entry, buffer: &mut [u8]) -> Result<()> {
    let (from, to) = (join(src, &entry.path), join(dst, &entry.path));
    let (mut input, mut output) = open_pair(&from, &to)?;
    let copied = if buffer.is_empty() {
        io::copy(&mut input, &mut output)
    } else {
        copy_through(&mut input, &mut output, buffer)
    }
    .map_err(|e| Error::io(format!("copying {} to {}", from.display(), to.display()), e))?;
    if copied != entry.size {
        return Err(stage_error(format!(
            "{} changed while it was copied ({} bytes when listed, {copied} copied); stage it \
             again once it is no longer being written",
            from.display(),
            entry.size
        )));
    }
    finish(&output, &to, entry)
}

/// Opens `from` to read, never through a symlink, and creates `to`, private until finished.
fn open_pair(from: &Path, to: &Path) -> Result<(File, File)> {
    let input = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)
        .map_err(|e| Error::io(format!("reading {}", from.display()), e))?;
    let output = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| Error::io(format!("creating {}", to.display()), e))?;
    Ok((input, output))
}

/// Copies `input` to its end into `output` through `buffer`; the bytes copied.
fn copy_through(input: &mut File, output: &mut File, buffer: &mut [u8]) -> io::Result<u64> {
    let mut copied = 0;
    loop {
        let n = match input.read(buffer) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        output.write_all(&buffer[..n])?;
        copied += n as u64;
    }
}

/// Gives a complete file or directory its mode and modification time.
fn finish(file: &File, path: &Path, entry: &Entry) -> Result<()> {
    let io = |e| Error::io(format!("setting mode and time of {}", path.display()), e);
    file.set_permissions(fs::Permissions::from_mode(entry.mode))
        .map_err(io)?;
    file.set_times(FileTimes::new().set_modified(time(entry)))
        .map_err(io)
}

fn time(entry: &Entry) -> SystemTime {
    let nanos = Duration::from_nanos(entry.mtime_nsec.clamp(0, 999_999_999) as u64);
    match u64::try_from(entry.mtime) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs) + nanos,
        Err(_) => UNIX_EPOCH - Duration::from_secs(entry.mtime.unsigned_abs()) + nanos,
    }
}

/// `base/rel`, or `base` itself for the root entry.
pub fn join(base: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

pub fn stage_error(message: String) -> Error {
    Error::Stage { message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn progress() -> Mutex<Progress> {
        Mutex::new(Progress::new("test".into(), 0, true))
    }

    /// A tree with nested dirs, many small files, a symlink out of the tree, odd modes.
    fn tree(root: &Path) {
        fs::create_dir_all(root.join("a/b")).unwrap();
        for i in 0..200 {
            fs::write(
                root.join(format!("a/b/f{i}")),
                format!("file {i}").repeat(i),
            )
            .unwrap();
        }
        fs::write(root.join("top"), b"top").unwrap();
        fs::set_permissions(root.join("top"), fs::Permissions::from_mode(0o751)).unwrap();
        symlink("/etc/passwd", root.join("a/out")).unwrap();
        symlink("b/f1", root.join("a/in")).unwrap();
        fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o750)).unwrap();
    }

    #[test]
    fn copies_a_tree_with_modes_times_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        tree(&src);
        let entries = walk(&src).unwrap();
        assert_eq!(entries[0].path, "");
        assert_eq!(entries[1].path, "a");
        assert_eq!(entries.len(), 1 + 2 + 200 + 2 + 1);
        copy(&src, &dst, &entries, 4, &progress()).unwrap();
        // The copy lists the same: same names, kinds, modes, sizes and times (but for the
        // links' own times, which are not kept).
        let without_link_times = |list: Vec<Entry>| -> Vec<Entry> {
            list.into_iter()
                .map(|mut e| {
                    if matches!(e.kind, Kind::Symlink { .. }) {
                        (e.mtime, e.mtime_nsec) = (0, 0);
                    }
                    e
                })
                .collect()
        };
        let copied = without_link_times(walk(&dst).unwrap());
        assert!(copied == without_link_times(entries), "the copy differs");
        assert_eq!(
            fs::read(dst.join("a/b/f7")).unwrap(),
            fs::read(src.join("a/b/f7")).unwrap()
        );
        assert_eq!(
            fs::read_link(dst.join("a/out")).unwrap(),
            Path::new("/etc/passwd")
        );
    }

    #[test]
    fn a_single_file_is_copied_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("one");
        fs::write(&src, vec![7u8; 100_000]).unwrap();
        let entries = walk(&src).unwrap();
        assert_eq!(data_size(&entries), 100_000);
        let dst = dir.path().join("copy");
        copy(&src, &dst, &entries, 8, &progress()).unwrap();
        assert_eq!(walk(&dst).unwrap(), entries);
    }

    #[test]
    fn between_file_systems_a_file_goes_through_the_buffer_whole() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.path().join("in"), &data).unwrap();
        let mut input = File::open(dir.path().join("in")).unwrap();
        let mut output = File::create(dir.path().join("out")).unwrap();
        let mut buffer = vec![0; BUFFER_BYTES];
        let copied = copy_through(&mut input, &mut output, &mut buffer).unwrap();
        assert_eq!(copied, 600_000);
        assert_eq!(fs::read(dir.path().join("out")).unwrap(), data);
        // The same through copy(), from another file system where there is one.
        let shm = Path::new("/dev/shm");
        if fs::metadata(shm).map(|m| m.dev()).ok() != Some(fs::metadata(dir.path()).unwrap().dev())
        {
            let src = tempfile::tempdir_in(shm).unwrap();
            tree(src.path());
            let entries = walk(src.path()).unwrap();
            let dst = dir.path().join("dst");
            copy(src.path(), &dst, &entries, 3, &progress()).unwrap();
            assert_eq!(
                fs::read(dst.join("a/b/f9")).unwrap(),
                fs::read(src.path().join("a/b/f9")).unwrap()
            );
        }
    }

    /// Copies the files of `src` into a new `dst` in pieces of `piece` bytes, 3 workers.
    fn copy_in_pieces(src: &Path, dst: &Path, piece: u64) -> Result<()> {
        let entries = walk(src)?;
        fs::create_dir(dst).unwrap();
        let files: Vec<&Entry> = entries.iter().filter(|e| e.kind == Kind::File).collect();
        let work = plan(&files, Some(piece));
        copy_files(src, dst, &work, 3, false, &progress())
    }

    #[test]
    fn a_large_file_is_copied_in_pieces_by_several_workers() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i % 253) as u8).collect();
        fs::write(src.join("big"), &data).unwrap();
        fs::write(src.join("small"), b"s").unwrap();
        fs::set_permissions(src.join("big"), fs::Permissions::from_mode(0o640)).unwrap();
        let files = walk(&src).unwrap();
        let refs: Vec<&Entry> = files.iter().filter(|e| e.kind == Kind::File).collect();
        let work = plan(&refs, Some(100_000));
        // 11 pieces of the big file first (the last one 3 bytes), then the small file whole.
        assert_eq!(work.len(), 12);
        let last = work[10].piece.as_ref().unwrap();
        assert_eq!((last.offset, last.len), (1_000_000, 3));
        assert!(work[11].piece.is_none());
        let dst = dir.path().join("dst");
        copy_in_pieces(&src, &dst, 100_000).unwrap();
        assert_eq!(fs::read(dst.join("big")).unwrap(), data);
        let (a, b) = (walk(&src).unwrap(), walk(&dst).unwrap());
        assert_eq!(a[1..], b[1..], "sizes, modes and times kept");
    }

    #[test]
    fn a_large_file_that_shrank_or_grew_is_refused() {
        for (listed, now) in [(500_000, 400_000), (500_000, 600_000)] {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("src");
            fs::create_dir(&src).unwrap();
            fs::write(src.join("f"), vec![1u8; listed]).unwrap();
            let entries = walk(&src).unwrap();
            fs::write(src.join("f"), vec![2u8; now]).unwrap();
            let files: Vec<&Entry> = entries.iter().filter(|e| e.kind == Kind::File).collect();
            let dst = dir.path().join("dst");
            fs::create_dir(&dst).unwrap();
            let err = copy_files(
                &src,
                &dst,
                &plan(&files, Some(64 << 10)),
                2,
                false,
                &progress(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("changed while it was copied"), "{err}");
        }
    }

    #[test]
    fn workers_take_files_from_each_directory_in_turn() {
        let file = |path: &str| Entry {
            path: path.into(),
            kind: Kind::File,
            mode: 0o644,
            size: 1,
            mtime: 0,
            mtime_nsec: 0,
        };
        let entries = [
            file("top"),
            file("a/1"),
            file("a/2"),
            file("a/3"),
            file("b/1"),
        ];
        let order: Vec<&str> = spread_over_directories(&entries)
            .iter()
            .map(|e| e.path.as_str())
            .collect();
        assert_eq!(order, ["top", "a/1", "b/1", "a/2", "a/3"]);
    }

    #[test]
    fn a_fifo_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let msg = walk(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("pipe") && msg.contains("not a file"), "{msg}");
    }

    #[test]
    fn a_file_swapped_for_a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"x").unwrap();
        let entries = walk(&src).unwrap();
        fs::remove_file(src.join("f")).unwrap();
        symlink("/etc/hostname", src.join("f")).unwrap();
        let err = copy(&src, &dir.path().join("dst"), &entries, 2, &progress()).unwrap_err();
        assert!(err.to_string().contains("reading"), "{err}");
    }
}
