//! The squashfs 4.0 on-disk encoding: blocks, metadata blocks, inodes, directories, the id
//! table and the superblock (little endian throughout; layout as in the kernel's
//! `squashfs_fs.h` and squashfs-tools).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::tree::{Kind, NodeId, Tree};
use super::{Stats, Written, BLOCK_SIZE};
use crate::{Error, Result};

pub const SUPERBLOCK_LEN: usize = 96;
const MAGIC: u32 = 0x7371_7368;
const LZ4: u16 = 5;
/// LZ4's options version squashfs-tools and the kernel expect (`LZ4_LEGACY`).
const LZ4_LEGACY: u32 = 1;
const FLAG_NO_FRAGMENTS: u16 = 0x0010;
const FLAG_NO_XATTRS: u16 = 0x0200;
const FLAG_COMPRESSOR_OPTIONS: u16 = 0x0400;
const METADATA_SIZE: usize = 8192;
const METADATA_UNCOMPRESSED: u16 = 0x8000;
const BLOCK_UNCOMPRESSED: u32 = 1 << 24;
const NONE: u64 = u64::MAX;
const NO_FRAGMENT: u32 = u32::MAX;
const NO_XATTR: u32 = u32::MAX;
/// Padding of the whole image, as mksquashfs does (block devices, loop mounts).
const PAD: u64 = 4096;
/// Inode types (the basic directory-entry types are the first three).
const DIR: u16 = 1;
const FILE: u16 = 2;
const SYMLINK: u16 = 3;
const LDIR: u16 = 8;
const LFILE: u16 = 9;
/// Entries one directory header may cover.
const DIR_RUN: usize = 256;

/// The lz4 options squashfs readers require after the superblock, as a metadata block.
pub fn compressor_options() -> Vec<u8> {
    let mut b = Vec::with_capacity(10);
    b.extend_from_slice(&(8 | METADATA_UNCOMPRESSED).to_le_bytes());
    b.extend_from_slice(&LZ4_LEGACY.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

/// How a data block is stored.
pub enum Stored {
    /// All zeros: nothing on disk (a hole).
    Hole,
    /// lz4, smaller than the block.
    Packed(Vec<u8>),
    /// As read: the first `len` bytes of the block's buffer.
    Raw(usize),
}

/// One data block as stored: lz4 when that is smaller, else as is; nothing at all (a hole)
/// when it is all zeros. Returns how, and the block's size word.
pub fn compress_block(data: &[u8]) -> (Stored, u32) {
    if data.iter().all(|b| *b == 0) {
        return (Stored::Hole, 0);
    }
    let packed = lz4_flex::block::compress(data);
    if packed.len() < data.len() {
        let word = packed.len() as u32;
        (Stored::Packed(packed), word)
    } else {
        (
            Stored::Raw(data.len()),
            data.len() as u32 | BLOCK_UNCOMPRESSED,
        )
    }
}

/// A metadata table being written: 8 KiB blocks, each lz4-compressed when that helps,
/// behind a 2-byte length header.
#[derive(Default)]
struct Metadata {
    table: Vec<u8>,
    pending: Vec<u8>,
    /// Where each block starts in `table`.
    starts: Vec<u64>,
}

impl Metadata {
    /// Where the next byte goes: (its block's offset in the table, offset in the block).
    fn pos(&self) -> (u64, u16) {
        (self.table.len() as u64, self.pending.len() as u16)
    }

    fn put(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= METADATA_SIZE {
            let rest = self.pending.split_off(METADATA_SIZE);
            self.flush();
            self.pending = rest;
        }
    }

    fn flush(&mut self) {
        self.starts.push(self.table.len() as u64);
        let packed = lz4_flex::block::compress(&self.pending);
        let (header, bytes) = if packed.len() < self.pending.len() {
            (packed.len() as u16, &packed)
        } else {
            (
                self.pending.len() as u16 | METADATA_UNCOMPRESSED,
                &self.pending,
            )
        };
        self.table.extend_from_slice(&header.to_le_bytes());
        self.table.extend_from_slice(bytes);
        self.pending.clear();
    }

    fn finish(mut self) -> (Vec<u8>, Vec<u64>) {
        if !self.pending.is_empty() {
            self.flush();
        }
        (self.table, self.starts)
    }
}

/// Little-endian field writer for one inode or directory record.
#[derive(Default)]
struct Record(Vec<u8>);

impl Record {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// Writes the tables for `tree` after the data the writer thread wrote (`written`, relative
/// to `base`), then the superblock at `base`. `written.sizes` are the size words of the
/// data blocks in the order they are in the image, each stream's starting at
/// `written.starts[stream]`; `written.hash` goes on over the tables and ends with the
/// superblock.
pub(super) fn write_tables(out: &File, base: u64, tree: &Tree, written: Written) -> Result<Stats> {
    let Written {
        sizes,
        starts,
        bytes,
        mut hash,
    } = written;
    let (sizes, starts) = (sizes.as_slice(), starts.as_slice());
    let data_start = (SUPERBLOCK_LEN + compressor_options().len()) as u64;
    let data_end = data_start + bytes;
    let mut positions = Vec::with_capacity(sizes.len());
    let mut pos = data_start;
    for word in sizes {
        positions.push(pos);
        pos += u64::from(word & !BLOCK_UNCOMPRESSED);
    }
    debug_assert_eq!(pos, data_end);

    let layout = Layout::of(tree);
    let mut w = TableWriter {
        tree,
        layout: &layout,
        sizes,
        starts,
        positions: &positions,
        inodes: Metadata::default(),
        dirs: Metadata::default(),
        refs: HashMap::new(),
        ids: Vec::new(),
        id_index: HashMap::new(),
    };
    // Children before parents: a directory's listing needs its entries' inode references.
    for &(dir, parent) in layout.dirs.iter().rev() {
        w.directory(dir, parent)?;
    }
    let root_ref = w.refs[&Tree::ROOT];
    let ids = w.ids;
    let (inode_table, _) = w.inodes.finish();
    let (dir_table, _) = w.dirs.finish();
    let mut id_meta = Metadata::default();
    for id in &ids {
        id_meta.put(&id.to_le_bytes());
    }
    let (id_table, id_starts) = id_meta.finish();

    let io = |e| Error::io("writing the squashfs tables", e);
    let inode_start = data_end;
    let dir_start = inode_start + inode_table.len() as u64;
    let id_start = dir_start + dir_table.len() as u64;
    let id_index_start = id_start + id_table.len() as u64;
    let mut index = Vec::with_capacity(id_starts.len() * 8);
    for s in &id_starts {
        index.extend_from_slice(&(id_start + s).to_le_bytes());
    }
    let bytes_used = id_index_start + index.len() as u64;
    let mut tables = inode_table;
    tables.extend_from_slice(&dir_table);
    tables.extend_from_slice(&id_table);
    tables.extend_from_slice(&index);
    hash.write(out, base + inode_start, &tables).map_err(io)?;
    // The padding is written, not left to a later write past it: it is part of the
    // partition, and of its hash.
    let padded = bytes_used.div_ceil(PAD) * PAD;
    let padding = vec![0; (padded - bytes_used) as usize];
    hash.write(out, base + bytes_used, &padding).map_err(io)?;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32);
    let mut sb = Record::default();
    sb.u32(MAGIC)
        .u32(layout.count)
        .u32(now)
        .u32(BLOCK_SIZE as u32)
        .u32(0)
        .u16(LZ4)
        .u16(BLOCK_SIZE.trailing_zeros() as u16)
        .u16(FLAG_NO_FRAGMENTS | FLAG_NO_XATTRS | FLAG_COMPRESSOR_OPTIONS)
        .u16(ids.len() as u16)
        .u16(4)
        .u16(0)
        .u64(root_ref)
        .u64(bytes_used)
        .u64(id_index_start)
        .u64(NONE)
        .u64(inode_start)
        .u64(dir_start)
        .u64(id_start)
        .u64(NONE);
    debug_assert_eq!(sb.0.len(), SUPERBLOCK_LEN);
    out.write_all_at(&sb.0, base).map_err(io)?;
    Ok(Stats {
        bytes: padded,
        inodes: u64::from(layout.count),
        blocks: sizes.len() as u64,
        sparse_blocks: sizes.iter().filter(|w| **w == 0).count() as u64,
        sha256_superblock_last: hash.finish(&sb.0),
    })
}

/// Inode numbers, link counts and the directories in pre-order (with their parent's
/// number), from one walk of what the root reaches.
struct Layout {
    numbers: HashMap<NodeId, u32>,
    links: HashMap<NodeId, u32>,
    dirs: Vec<(NodeId, u32)>,
    count: u32,
}

impl Layout {
    fn of(tree: &Tree) -> Layout {
        let mut l = Layout {
            numbers: HashMap::from([(Tree::ROOT, 1)]),
            links: HashMap::new(),
            dirs: Vec::new(),
            count: 1,
        };
        let mut stack = vec![(Tree::ROOT, 0u32)];
        while let Some((dir, parent)) = stack.pop() {
            l.dirs.push((dir, parent));
            let number = l.numbers[&dir];
            for &child in tree.entries(dir).expect("a directory").values() {
                *l.links.entry(child).or_insert(0) += 1;
                if !l.numbers.contains_key(&child) {
                    l.count += 1;
                    l.numbers.insert(child, l.count);
                    if tree.entries(child).is_some() {
                        stack.push((child, number));
                    }
                }
            }
        }
        // The root's parent: one past the last inode, as mksquashfs writes it.
        l.dirs[0].1 = l.count + 1;
        l
    }
}

struct TableWriter<'a> {
    tree: &'a Tree,
    layout: &'a Layout,
    sizes: &'a [u32],
    starts: &'a [u64],
    positions: &'a [u64],
    inodes: Metadata,
    dirs: Metadata,
    /// Inode references (`block << 16 | offset`) of the inodes written so far.
    refs: HashMap<NodeId, u64>,
    ids: Vec<u32>,
    id_index: HashMap<u32, u16>,
}

impl TableWriter<'_> {
    fn id(&mut self, id: u32) -> Result<u16> {
        if let Some(i) = self.id_index.get(&id) {
            return Ok(*i);
        }
        let i = u16::try_from(self.ids.len())
            .ok()
            .filter(|i| *i < u16::MAX)
            .ok_or_else(|| {
                Error::io(
                    "writing the squashfs id table",
                    std::io::Error::other(
                        "the image uses more than 65535 distinct user and group ids, the most a \
                         squashfs holds",
                    ),
                )
            })?;
        self.ids.push(id);
        self.id_index.insert(id, i);
        Ok(i)
    }

    /// The common inode header; starts the inode, so records its reference.
    fn header(&mut self, node: NodeId, kind: u16) -> Result<Record> {
        let meta = self.tree.node(node).meta;
        let (uid, gid) = (self.id(meta.uid)?, self.id(meta.gid)?);
        let (block, offset) = self.inodes.pos();
        self.refs.insert(node, block << 16 | u64::from(offset));
        let mut r = Record::default();
        r.u16(kind)
            .u16((meta.mode & 0o7777) as u16)
            .u16(uid)
            .u16(gid)
            .u32(meta.mtime)
            .u32(self.layout.numbers[&node]);
        Ok(r)
    }

    /// Writes the inode of a file or symlink (once, however many names it has).
    fn leaf(&mut self, node: NodeId) -> Result<()> {
        if self.refs.contains_key(&node) {
            return Ok(());
        }
        let links = self.layout.links[&node];
        let record = match &self.tree.node(node).kind {
            Kind::Symlink(target) => {
                let mut r = self.header(node, SYMLINK)?;
                r.u32(links).u32(target.len() as u32).bytes(target);
                r
            }
            Kind::File(data) => {
                let first = self.starts.get(data.stream).copied().unwrap_or(0) + data.first_block;
                let range = first as usize..(first + data.blocks) as usize;
                let words = &self.sizes[range.clone()];
                let start = self.positions.get(range.start).copied().unwrap_or(0);
                let sparse: u64 = words
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| **w == 0)
                    .map(|(i, _)| (data.size - i as u64 * BLOCK_SIZE as u64).min(BLOCK_SIZE as u64))
                    .sum();
                let basic = links == 1
                    && sparse == 0
                    && u32::try_from(data.size).is_ok()
                    && u32::try_from(start).is_ok();
                let mut r;
                if basic {
                    r = self.header(node, FILE)?;
                    r.u32(start as u32)
                        .u32(NO_FRAGMENT)
                        .u32(0)
                        .u32(data.size as u32);
                } else {
                    r = self.header(node, LFILE)?;
                    r.u64(start)
                        .u64(data.size)
                        .u64(sparse)
                        .u32(links)
                        .u32(NO_FRAGMENT)
                        .u32(0)
                        .u32(NO_XATTR);
                }
                for w in words {
                    r.u32(*w);
                }
                r
            }
            Kind::Dir(_) => unreachable!("directories are written by `directory`"),
        };
        self.inodes.put(&record.0);
        Ok(())
    }

    /// Writes the inodes of `dir`'s files and links, its listing, then its own inode.
    fn directory(&mut self, dir: NodeId, parent: u32) -> Result<()> {
        let entries = self.tree.entries(dir).expect("a directory");
        let mut subdirs = 0;
        for &child in entries.values() {
            match self.tree.node(child).kind {
                Kind::Dir(_) => subdirs += 1,
                _ => self.leaf(child)?,
            }
        }
        let (listing_block, listing_offset) = self.dirs.pos();
        let mut listing = Record::default();
        // (entries left in the run, its inode block, its base inode number)
        let mut run: Option<(usize, u64, u32)> = None;
        let names: Vec<(&[u8], NodeId)> = entries.iter().map(|(n, c)| (&**n, *c)).collect();
        for (i, &(name, child)) in names.iter().enumerate() {
            let reference = self.refs[&child];
            let (block, offset) = (reference >> 16, (reference & 0xffff) as u16);
            let number = self.layout.numbers[&child];
            let fits = |(left, run_block, base): (usize, u64, u32)| {
                left > 0
                    && run_block == block
                    && i16::try_from(i64::from(number) - i64::from(base)).is_ok()
            };
            let (left, _, base) = match run.filter(|r| fits(*r)) {
                Some(r) => r,
                None => {
                    // A new run: as many of the following entries as may share it.
                    let count = (names.len() - i).min(DIR_RUN);
                    let count = names[i..i + count]
                        .iter()
                        .take_while(|(_, c)| {
                            let r = self.refs[c];
                            r >> 16 == block
                                && i16::try_from(
                                    i64::from(self.layout.numbers[c]) - i64::from(number),
                                )
                                .is_ok()
                        })
                        .count();
                    listing.u32(count as u32 - 1).u32(block as u32).u32(number);
                    (count, block, number)
                }
            };
            run = Some((left - 1, block, base));
            let kind = match self.tree.node(child).kind {
                Kind::Dir(_) => DIR,
                Kind::File(_) => FILE,
                Kind::Symlink(_) => SYMLINK,
            };
            listing
                .u16(offset)
                .u16((i64::from(number) - i64::from(base)) as i16 as u16)
                .u16(kind)
                .u16(name.len() as u16 - 1)
                .bytes(name);
        }
        self.dirs.put(&listing.0);
        // squashfs counts `.` and `..` as 3 bytes of every listing.
        let size = listing.0.len() as u64 + 3;
        let links = 2 + subdirs;
        let mut r;
        if let (Ok(size16), Ok(block32)) = (u16::try_from(size), u32::try_from(listing_block)) {
            r = self.header(dir, DIR)?;
            r.u32(block32)
                .u32(links)
                .u16(size16)
                .u16(listing_offset)
                .u32(parent);
        } else {
            r = self.header(dir, LDIR)?;
            r.u32(links)
                .u32(size as u32)
                .u32(listing_block as u32)
                .u32(parent)
                .u16(0)
                .u16(listing_offset)
                .u32(NO_XATTR);
        }
        self.inodes.put(&r.0);
        Ok(())
    }
}
