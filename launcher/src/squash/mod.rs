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

mod format;
mod tree;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

pub use tree::{FileData, Kind, Meta, Node, NodeId, Tree};

use crate::{Error, Result};

/// squashfs data block size: mksquashfs's default, and squashfuse's cache unit.
pub const BLOCK_SIZE: usize = 128 << 10;
/// How much block data (read, compressing, or waiting to be written) one build may hold:
/// about two copies of each block in flight.
pub const DEFAULT_BLOCK_MEMORY: usize = 64 << 20;

/// How a build runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Compressing threads.
    pub threads: usize,
    /// Bytes of block data in flight at most (see [`DEFAULT_BLOCK_MEMORY`]).
    pub block_memory: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            block_memory: DEFAULT_BLOCK_MEMORY,
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
    let data_start = write_compressor_options(out, base)?;

    let (tree, sizes, end) = std::thread::scope(|scope| {
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(in_flight);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (done_tx, done_rx) = mpsc::sync_channel::<Done>(in_flight);
        let (tokens_tx, tokens_rx) = mpsc::sync_channel::<()>(in_flight);
        for _ in 0..in_flight {
            tokens_tx.send(()).expect("the channel holds every token");
        }
        for _ in 0..threads {
            let (jobs, done) = (Arc::clone(&jobs_rx), done_tx.clone());
            scope.spawn(move || compress_blocks(&jobs, &done));
        }
        drop(done_tx);
        let writer =
            scope.spawn(move || write_blocks(out, base + data_start, &done_rx, &tokens_tx));
        let mut data = Data {
            jobs: Some(jobs_tx),
            tokens: tokens_rx,
            next: 0,
        };
        let filled = fill(&mut data);
        // Closing the queue ends the compressors, then the writer, in order.
        data.jobs = None;
        let written = writer.join().expect("the block writer does not panic");
        // A write error is the cause of any "writer stopped" the filler saw.
        let (sizes, len) = written.map_err(write_error)?;
        let tree = filled?;
        Ok::<_, Error>((tree, sizes, data_start + len))
    })?;
    format::write_tables(out, base, end, &tree, &sizes)
}

/// [`build`] on the caller's thread, for the layer fuzz target (thousands of builds a
/// second, where starting the threads of one would cost more than the build): the blocks
/// `fill` streams wait in memory, at most `max_blocks` of them (the next is an error), and
/// are then compressed and written as [`build`]'s threads would, to the same bytes.
pub fn build_serial(
    out: &File,
    base: u64,
    max_blocks: usize,
    fill: impl FnOnce(&mut Data) -> Result<Tree>,
) -> Result<Stats> {
    let data_start = write_compressor_options(out, base)?;
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(max_blocks);
    let (done_tx, done_rx) = mpsc::sync_channel::<Done>(max_blocks);
    let (tokens_tx, tokens_rx) = mpsc::sync_channel::<()>(max_blocks);
    for _ in 0..max_blocks {
        tokens_tx.send(()).expect("the channel holds every token");
    }
    // No token comes back while `fill` runs: past `max_blocks`, `Data` finds the writer
    // stopped instead of waiting for ever.
    drop(tokens_tx);
    let mut data = Data {
        jobs: Some(jobs_tx),
        tokens: tokens_rx,
        next: 0,
    };
    let filled = fill(&mut data);
    drop(data);
    compress_blocks(&Mutex::new(jobs_rx), &done_tx);
    drop(done_tx);
    let (no_tokens, _) = mpsc::sync_channel(0);
    let (sizes, len) =
        write_blocks(out, base + data_start, &done_rx, &no_tokens).map_err(write_error)?;
    format::write_tables(out, base, data_start + len, &filled?, &sizes)
}

/// Writes the compressor options after the superblock's place (the superblock is written
/// last); returns where the data starts, relative to `base`.
fn write_compressor_options(out: &File, base: u64) -> Result<u64> {
    let options_block = format::compressor_options();
    out.write_all_at(&options_block, base + format::SUPERBLOCK_LEN as u64)
        .map_err(write_error)?;
    Ok((format::SUPERBLOCK_LEN + options_block.len()) as u64)
}

fn write_error(e: io::Error) -> Error {
    Error::io("writing the squashfs image", e)
}

/// Where file contents go during a [`build`].
pub struct Data {
    jobs: Option<SyncSender<Job>>,
    tokens: Receiver<()>,
    /// The sequence number of the next block.
    next: u64,
}

impl Data {
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
            let mut block = vec![0u8; want];
            let n = read_full(reader, &mut block).map_err(&read_error)?;
            if n == 0 {
                break;
            }
            block.truncate(n);
            copied += n as u64;
            self.submit(block)?;
            if n < want {
                break;
            }
        }
        let data = FileData {
            size: copied,
            first_block: first,
            blocks: self.next - first,
        };
        Ok((data, copied))
    }

    fn submit(&mut self, data: Vec<u8>) -> Result<()> {
        let stopped = || {
            Error::io(
                "writing the squashfs image",
                io::Error::other("the block writer stopped"),
            )
        };
        // A token per block in flight: the writer returns it once the block is on disk.
        self.tokens.recv().map_err(|_| stopped())?;
        let job = Job {
            seq: self.next,
            data,
        };
        self.next += 1;
        self.jobs
            .as_ref()
            .expect("jobs open while filling")
            .send(job)
            .map_err(|_| stopped())
    }
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

struct Job {
    seq: u64,
    data: Vec<u8>,
}

struct Done {
    seq: u64,
    /// What goes on disk (empty for a hole) and its squashfs size word.
    bytes: Vec<u8>,
    word: u32,
}

/// A compressing thread: takes blocks until the queue closes.
fn compress_blocks(jobs: &Mutex<Receiver<Job>>, done: &SyncSender<Done>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let (bytes, word) = format::compress_block(job.data);
        if done
            .send(Done {
                seq: job.seq,
                bytes,
                word,
            })
            .is_err()
        {
            return;
        }
    }
}

/// The writer thread: puts blocks on disk in sequence order from `start`, returns each
/// block's size word and the bytes written.
fn write_blocks(
    out: &File,
    start: u64,
    done: &Receiver<Done>,
    tokens: &SyncSender<()>,
) -> io::Result<(Vec<u32>, u64)> {
    let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
    let mut sizes = Vec::new();
    let mut pos = 0u64;
    for block in done.iter() {
        waiting.insert(block.seq, block);
        while let Some(block) = waiting.remove(&(sizes.len() as u64)) {
            out.write_all_at(&block.bytes, start + pos)?;
            pos += block.bytes.len() as u64;
            sizes.push(block.word);
            // The filler may have stopped already (an error); nothing to hand back then.
            let _ = tokens.send(());
        }
    }
    Ok((sizes, pos))
}

#[cfg(test)]
pub(crate) mod tests;
