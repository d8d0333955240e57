//! A squashfs 4.0 writer fed straight from layer streams: no unpacked tree on disk.
//!
//! File data goes out as it is read: each 128 KiB block is handed to a pool of compressing
//! threads (one per core) and written in order, at its final place in the output, by one
//! writer thread; at most a bounded number of blocks are in flight, so memory does not grow
//! with the image. Only the metadata (the merged directory tree, [`Tree`]) stays in memory;
//! once the layers are read, [`build`] writes the inode, directory and id tables after the
//! data and the superblock in front of it.
//!
//! What the image gets is exactly what the tree says: owners, modes (set-id bits included)
//! and mtimes from the layers' headers, whoever runs the build (root or the cache's service
//! user), and the root directory 0755 root:root. Compression is lz4 (see
//! `sif::MKSQUASHFS_COMPRESSION` for why), both for data blocks and metadata; a block that
//! does not shrink is stored as is, and an all-zero block is stored as a hole (sparse), as
//! mksquashfs does. There are no fragment blocks (each file's tail is a block of its own:
//! slightly larger images of small files, but no tail packing to hold back in memory), no
//! xattrs, and no NFS export table.
//!
//! Data of a file that a later layer removes or replaces has already been written when the
//! later layer says so: it stays in the image as unreferenced blocks (space, never visible).

mod digest;
mod format;
mod tree;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

pub use tree::{FileData, Kind, Meta, Node, NodeId, Tree};

use crate::{Error, Result};
use digest::TailHash;

/// squashfs data block size: mksquashfs's default, and squashfuse's cache unit.
pub const BLOCK_SIZE: usize = 128 << 10;
/// How much block data (read, compressing, or waiting to be written) one build may hold:
/// about two buffers per block in flight (the block read, and its compressed copy).
pub const DEFAULT_BLOCK_MEMORY: usize = 64 << 20;

/// How a build runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Compressing threads.
    pub threads: usize,
    /// Bytes of block data in flight at most (see [`DEFAULT_BLOCK_MEMORY`]).
    pub block_memory: usize,
    /// Where the blocks of a [`Data::fork`]ed stream wait (in an unlinked file) while
    /// another stream writes the image's tail.
    pub spill_dir: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            block_memory: DEFAULT_BLOCK_MEMORY,
            spill_dir: std::env::temp_dir(),
        }
    }
}

/// What a build wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of the squashfs (the partition's length, padded to 4 KiB).
    pub bytes: u64,
    pub inodes: u64,
    /// Data blocks written, and those stored as holes.
    pub blocks: u64,
    pub sparse_blocks: u64,
    /// Its SHA-256 with the superblock hashed last, as the writer hashed it (see
    /// `digest`), in hex.
    pub sha256_superblock_last: String,
}

/// Builds a squashfs in `out` at byte `base`: `fill` gets the [`Data`] handle to stream file
/// contents through and returns the finished tree, whose metadata is then written after the
/// data. Returns what was written; the squashfs spans `base .. base + stats.bytes`.
pub fn build(
    out: &File,
    base: u64,
    options: &Options,
    fill: impl FnOnce(&mut Data) -> Result<Tree>,
) -> Result<Stats> {
    let threads = options.threads.max(1);
    let in_flight = (options.block_memory / (2 * BLOCK_SIZE)).max(threads + 1);
    let mut hash = TailHash::new(base);
    let data_start = write_compressor_options(out, base, &mut hash)?;

    let (tree, written) = std::thread::scope(|scope| {
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(in_flight);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (done_tx, done_rx) = mpsc::sync_channel::<ToWriter>(in_flight);
        let (tokens_tx, tokens_rx) = block_tokens(in_flight);
        for _ in 0..threads {
            let (jobs, done) = (Arc::clone(&jobs_rx), done_tx.clone());
            scope.spawn(move || compress_blocks(&jobs, &done));
        }
        let spill_dir = &options.spill_dir;
        let writer = scope.spawn(move || {
            write_blocks(
                out,
                base + data_start,
                spill_dir,
                &done_rx,
                &tokens_tx,
                hash,
            )
        });
        let mut data = Data::first(jobs_tx, done_tx, tokens_rx);
        let filled = fill(&mut data);
        // Closing the queue ends the compressors, then the writer, in order (every fork
        // has ended with `fill`).
        drop(data);
        let written = writer.join().expect("the block writer does not panic");
        // A write error is the cause of any "writer stopped" the filler saw.
        let written = written.map_err(write_error)?;
        Ok::<_, Error>((filled?, written))
    })?;
    format::write_tables(out, base, &tree, written)
}

/// [`build`] on the caller's thread, for the layer fuzz target (thousands of builds a
/// second, where starting the threads of one would cost more than the build): the blocks
/// `fill` streams wait in memory, at most `max_blocks` of them (the next is an error), and
/// are then compressed and written as [`build`]'s threads would, to the same bytes. `fill`
/// must not [`Data::fork`] (a second stream would spill to the temporary directory).
pub fn build_serial(
    out: &File,
    base: u64,
    max_blocks: usize,
    fill: impl FnOnce(&mut Data) -> Result<Tree>,
) -> Result<Stats> {
    let mut hash = TailHash::new(base);
    let data_start = write_compressor_options(out, base, &mut hash)?;
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(max_blocks);
    // Every block, and the stream's end.
    let (done_tx, done_rx) = mpsc::sync_channel::<ToWriter>(max_blocks + 1);
    let (tokens_tx, tokens_rx) = block_tokens(max_blocks);
    // No buffer comes back while `fill` runs: past `max_blocks`, `Data` finds the writer
    // stopped instead of waiting for ever.
    drop(tokens_tx);
    let mut data = Data::first(jobs_tx, done_tx.clone(), tokens_rx);
    let filled = fill(&mut data);
    drop(data);
    compress_blocks(&Mutex::new(jobs_rx), &done_tx);
    drop(done_tx);
    // The buffers the writer hands back go nowhere.
    let (unused_tx, _) = mpsc::sync_channel(0);
    let written = write_blocks(
        out,
        base + data_start,
        &std::env::temp_dir(),
        &done_rx,
        &unused_tx,
        hash,
    )
    .map_err(write_error)?;
    format::write_tables(out, base, &filled?, written)
}

/// The tokens that bound a build's blocks in flight, `n` of them. A token is a block
/// buffer: the writer hands each one back once its block is on disk, so blocks are read
/// into memory that is neither allocated nor zeroed again.
fn block_tokens(n: usize) -> (SyncSender<Vec<u8>>, Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::sync_channel(n);
    for _ in 0..n {
        tx.send(Vec::new()).expect("the channel holds every token");
    }
    (tx, rx)
}

/// Writes the compressor options after the superblock's place (the superblock is written
/// last); returns where the data starts, relative to `base`.
fn write_compressor_options(out: &File, base: u64, hash: &mut TailHash) -> Result<u64> {
    let options_block = format::compressor_options();
    let at = base + format::SUPERBLOCK_LEN as u64;
    hash.write(out, at, &options_block).map_err(write_error)?;
    Ok((format::SUPERBLOCK_LEN + options_block.len()) as u64)
}

fn write_error(e: io::Error) -> Error {
    Error::io("writing the squashfs image", e)
}

/// Where file contents go during a [`build`]: one stream of blocks, whose files' blocks
/// are consecutive in the image. [`Data::fork`] makes another stream, for another thread.
pub struct Data {
    jobs: SyncSender<Job>,
    writer: SyncSender<ToWriter>,
    tokens: Arc<Mutex<Receiver<Vec<u8>>>>,
    /// Streams made so far (the next one's number).
    streams: Arc<AtomicUsize>,
    stream: usize,
    /// A buffer taken for a block that turned out empty (the file ended early).
    spare: Option<Vec<u8>>,
    /// The sequence number of the next block in this stream.
    next: u64,
}

impl Drop for Data {
    fn drop(&mut self) {
        // The writer ends the stream once its last block is written. It may have stopped
        // already (an error); nothing to tell it then.
        let _ = self.writer.send(ToWriter::Closed {
            stream: self.stream,
            blocks: self.next,
        });
    }
}

impl Data {
    /// A build's first stream, the one its `fill` gets.
    fn first(
        jobs: SyncSender<Job>,
        writer: SyncSender<ToWriter>,
        tokens: Receiver<Vec<u8>>,
    ) -> Data {
        Data {
            jobs,
            writer,
            tokens: Arc::new(Mutex::new(tokens)),
            streams: Arc::new(AtomicUsize::new(1)),
            stream: 0,
            spare: None,
            next: 0,
        }
    }

    /// A new stream into the same image, to fill from another thread. Its blocks go
    /// straight to the image's tail when no other stream is writing there, else to a
    /// spill file copied to the tail at the end: either way a stream's blocks end up
    /// consecutive (so each of its files' blocks do).
    pub fn fork(&self) -> Data {
        Data {
            jobs: self.jobs.clone(),
            writer: self.writer.clone(),
            tokens: Arc::clone(&self.tokens),
            streams: Arc::clone(&self.streams),
            stream: self.streams.fetch_add(1, Ordering::Relaxed),
            spare: None,
            next: 0,
        }
    }

    /// Streams up to `size` bytes of `reader` into the image as one file's contents.
    /// Returns the file's data and how many bytes `reader` had (less than `size` when it
    /// ended early: the caller decides whether a short file is an error). A read error
    /// becomes the error `read_error` makes of it (the caller knows which layer it was).
    pub fn file(
        &mut self,
        reader: &mut impl Read,
        size: u64,
        read_error: impl Fn(io::Error) -> Error,
    ) -> Result<(FileData, u64)> {
        let first = self.next;
        let mut copied = 0u64;
        while copied < size {
            let want = (size - copied).min(BLOCK_SIZE as u64) as usize;
            let mut block = self.buffer()?;
            let n = read_full(reader, &mut block[..want]).map_err(&read_error)?;
            if n == 0 {
                self.spare = Some(block);
                break;
            }
            copied += n as u64;
            self.submit(block, n)?;
            if n < want {
                break;
            }
        }
        let data = FileData {
            size: copied,
            stream: self.stream,
            first_block: first,
            blocks: self.next - first,
        };
        Ok((data, copied))
    }

    /// A block buffer of [`BLOCK_SIZE`] bytes, once a block in flight is on disk (the
    /// bound on memory): zeroed only the first time it is used.
    fn buffer(&mut self) -> Result<Vec<u8>> {
        let mut block = match self.spare.take() {
            Some(block) => block,
            None => self
                .tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv()
                .map_err(|_| writer_stopped())?,
        };
        block.resize(BLOCK_SIZE, 0);
        Ok(block)
    }

    /// Queues the first `len` bytes of `data` as the next block.
    fn submit(&mut self, data: Vec<u8>, len: usize) -> Result<()> {
        let job = Job {
            stream: self.stream,
            seq: self.next,
            data,
            len,
        };
        self.next += 1;
        self.jobs.send(job).map_err(|_| writer_stopped())
    }
}

fn writer_stopped() -> Error {
    Error::io(
        "writing the squashfs image",
        io::Error::other("the block writer stopped"),
    )
}

/// Reads until `buf` is full or the reader ends.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A block read: the first `len` bytes of `data` (a [`BLOCK_SIZE`] buffer).
struct Job {
    stream: usize,
    seq: u64,
    data: Vec<u8>,
    len: usize,
}

/// A block ready to be written.
struct Done {
    stream: usize,
    seq: u64,
    /// What goes on disk (nothing for a hole) and its squashfs size word.
    stored: format::Stored,
    word: u32,
    /// The block's buffer, to hand back once it is written.
    buffer: Vec<u8>,
}

/// A compressing thread: takes blocks until the queue closes.
fn compress_blocks(jobs: &Mutex<Receiver<Job>>, done: &SyncSender<ToWriter>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let (stored, word) = format::compress_block(&job.data[..job.len]);
        if done
            .send(ToWriter::Block(Done {
                stream: job.stream,
                seq: job.seq,
                stored,
                word,
                buffer: job.data,
            }))
            .is_err()
        {
            return;
        }
    }
}

/// What the writer thread is told.
enum ToWriter {
    Block(Done),
    /// A stream has no more blocks than these.
    Closed {
        stream: usize,
        blocks: u64,
    },
}

/// What the writer thread wrote.
pub(super) struct Written {
    /// The size words of the data blocks, in the order they are in the image.
    sizes: Vec<u32>,
    /// Where each stream's blocks start in `sizes`.
    starts: Vec<u64>,
    /// Bytes of data.
    bytes: u64,
    /// The hash of everything after the superblock so far.
    hash: TailHash,
}

/// One stream, as the writer sees it.
#[derive(Default)]
struct Stream {
    /// Blocks that came before those before them.
    waiting: BTreeMap<u64, Done>,
    sizes: Vec<u32>,
    /// Where the blocks go, once the first one is written.
    spill: Option<Spill>,
    closed: Option<u64>,
}

impl Stream {
    /// Closed, and every block written.
    fn complete(&self) -> bool {
        self.closed == Some(self.sizes.len() as u64)
    }
}

enum Spill {
    /// At the image's tail, from this index of the image's blocks.
    Direct { start: u64 },
    /// In an unlinked file, `bytes` long so far.
    File { file: File, bytes: u64 },
}

/// The writer thread: writes each stream's blocks in sequence order, the stream at the
/// image's tail (from `start`) straight there and the others, while it does, to spill
/// files; when the tail's stream ends, a spilling one takes it over; at the end, the spill
/// files left go after it. Returns where everything went.
fn write_blocks(
    out: &File,
    start: u64,
    spill_dir: &Path,
    done: &Receiver<ToWriter>,
    tokens: &SyncSender<Vec<u8>>,
    hash: TailHash,
) -> io::Result<Written> {
    let mut streams: Vec<Stream> = Vec::new();
    let mut image = Written {
        sizes: Vec::new(),
        starts: Vec::new(),
        bytes: 0,
        hash,
    };
    // The stream writing at the tail, until its last block is written.
    let mut tail: Option<usize> = None;
    for message in done.iter() {
        let id = match &message {
            ToWriter::Block(block) => block.stream,
            ToWriter::Closed { stream, .. } => *stream,
        };
        if streams.len() <= id {
            streams.resize_with(id + 1, Stream::default);
        }
        let stream = &mut streams[id];
        match message {
            ToWriter::Block(block) => {
                stream.waiting.insert(block.seq, block);
            }
            ToWriter::Closed { blocks, .. } => stream.closed = Some(blocks),
        }
        while let Some(block) = stream.waiting.remove(&(stream.sizes.len() as u64)) {
            let bytes = match &block.stored {
                format::Stored::Hole => &[][..],
                format::Stored::Packed(packed) => packed,
                format::Stored::Raw(len) => &block.buffer[..*len],
            };
            let spill = match &mut stream.spill {
                Some(spill) => spill,
                None if tail.is_none() => {
                    tail = Some(id);
                    stream.spill.insert(Spill::Direct {
                        start: image.sizes.len() as u64,
                    })
                }
                None => stream.spill.insert(Spill::File {
                    file: scratch_file(spill_dir)?,
                    bytes: 0,
                }),
            };
            match spill {
                Spill::Direct { .. } => {
                    let at = start + image.bytes;
                    image.hash.write(out, at, bytes)?;
                    image.bytes += bytes.len() as u64;
                    image.sizes.push(block.word);
                }
                Spill::File { file, bytes: len } => {
                    file.write_all_at(bytes, *len)?;
                    *len += bytes.len() as u64;
                }
            }
            stream.sizes.push(block.word);
            // The filler may have stopped already (an error); nothing to hand back then.
            let _ = tokens.send(block.buffer);
        }
        if tail == Some(id) && stream.complete() {
            // The open stream that spilled the most takes the tail over: what it spilled
            // so far is copied there now, and what it writes next goes straight there.
            tail = None;
            let heir = (streams.iter().enumerate())
                .filter(|(_, s)| !s.complete())
                .filter_map(|(i, s)| match &s.spill {
                    Some(Spill::File { bytes, .. }) => Some((i, *bytes)),
                    _ => None,
                })
                .max_by_key(|(_, bytes)| *bytes);
            if let Some((heir, _)) = heir {
                let stream = &mut streams[heir];
                if let Some(Spill::File { file, bytes }) = stream.spill.take() {
                    let first = image.sizes.len() as u64;
                    append(out, start, &mut image, &file, bytes)?;
                    image.sizes.extend_from_slice(&stream.sizes);
                    stream.spill = Some(Spill::Direct { start: first });
                    tail = Some(heir);
                }
            }
        }
    }
    // Every stream is closed: the spilled ones go after the tail, in stream order.
    for stream in &mut streams {
        match stream.spill.take() {
            None => image.starts.push(image.sizes.len() as u64),
            Some(Spill::Direct { start }) => image.starts.push(start),
            Some(Spill::File { file, bytes }) => {
                image.starts.push(image.sizes.len() as u64);
                append(out, start, &mut image, &file, bytes)?;
                image.sizes.extend_from_slice(&stream.sizes);
            }
        }
    }
    Ok(image)
}

/// Copies the `bytes` of a spill file to the image's tail (its data starting at `start` in
/// `out`), and hashes them there.
fn append(
    out: &File,
    start: u64,
    image: &mut Written,
    mut spill: &File,
    bytes: u64,
) -> io::Result<()> {
    let at = start + image.bytes;
    spill.seek(SeekFrom::Start(0))?;
    let mut to = out;
    to.seek(SeekFrom::Start(at))?;
    // copy_file_range where the file system has it: no copy through user space (a
    // reflink on XFS), so the hash reads the copy back.
    if io::copy(&mut spill.take(bytes), &mut to)? != bytes {
        return Err(io::Error::other("a spill file ended early"));
    }
    image.hash.copied(out, at, bytes)?;
    image.bytes += bytes;
    Ok(())
}

/// A read-write file in `dir`, already unlinked (nothing to clean up, whatever happens):
/// a stream's spill file, or a scratch image.
pub fn scratch_file(dir: &Path) -> io::Result<File> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = dir.join(format!(
        ".berth-scratch-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

#[cfg(test)]
pub(crate) mod tests;
