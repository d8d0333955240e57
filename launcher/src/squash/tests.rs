//! The writer's output read back by the real tools: unsquashfs (listing, extraction,
//! superblock) and squashfuse (a mount, as `berth exec` uses it).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::EntryType;

use super::*;
use crate::unpack::{self, Budget, Compression, LayerStats, Limits};

/// A squashfs built from `layers` (tar streams) at `dir/image.sqfs`, with each layer's
/// stats, through the path a cache build takes.
pub(crate) fn build_image(
    dir: &Path,
    layers: &[(&[u8], Compression)],
    budget: &mut Budget,
    options: &Options,
) -> crate::Result<(PathBuf, Vec<LayerStats>, Stats)> {
    let path = dir.join("image.sqfs");
    let out = image_file(&path);
    let mut all = Vec::new();
    let stats = build(&out, 0, options, |data| {
        let mut tree = Tree::new();
        for (layer, compression) in layers {
            all.push(unpack::apply_layer(
                &mut tree,
                data,
                *layer,
                *compression,
                "sha256:test",
                budget,
            )?);
        }
        Ok(tree)
    })?;
    out.set_len(stats.bytes).unwrap();
    assert_recorded_hash(&out, &stats);
    Ok((path, all, stats))
}

/// A new image file at `path`, readable too: the writer hashes the spills it copies by
/// reading them back.
fn image_file(path: &Path) -> File {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap()
}

/// The hash `build` recorded as it wrote is the SHA-256 of the image's bytes after its
/// superblock, then of its superblock, as `sif::Sif::verify` computes it.
fn assert_recorded_hash(out: &File, stats: &Stats) {
    use sha2::Digest as _;
    let mut bytes = vec![0u8; stats.bytes as usize];
    out.read_exact_at(&mut bytes, 0).unwrap();
    let (superblock, rest) = bytes.split_at(format::SUPERBLOCK_LEN);
    let mut hasher = sha2::Sha256::new();
    hasher.update(rest);
    hasher.update(superblock);
    assert_eq!(hex::encode(hasher.finalize()), stats.sha256_superblock_last);
}

/// The same image through `unpack::apply_layers`, `workers` layers read at once, at
/// `dir/parallel.sqfs`.
pub(crate) fn build_image_parallel(
    dir: &Path,
    layers: &[(&[u8], Compression)],
    workers: usize,
) -> crate::Result<(PathBuf, Vec<LayerStats>)> {
    let path = dir.join("parallel.sqfs");
    let out = image_file(&path);
    let options = Options {
        spill_dir: dir.to_path_buf(),
        ..Options::default()
    };
    let mut all = Vec::new();
    let stats = build(&out, 0, &options, |data| {
        let mut tree = Tree::new();
        let sources = layers
            .iter()
            .enumerate()
            .map(|(i, (layer, compression))| {
                let layer: &[u8] = layer;
                unpack::Source {
                    layer: format!("sha256:test{i}"),
                    compression: *compression,
                    open: Box::new(move || Ok(Box::new(layer) as Box<dyn Read + Send>)),
                }
            })
            .collect();
        all = unpack::apply_layers(&mut tree, data, sources, &mut default_budget(), workers)?;
        Ok(tree)
    })?;
    out.set_len(stats.bytes).unwrap();
    assert_recorded_hash(&out, &stats);
    Ok((path, all))
}

pub(crate) fn default_budget() -> Budget {
    Budget::new(Limits::from_config(&crate::config::CacheConfig::default()).unwrap())
}

/// Extracts `image` into `to` (which must not exist) with unsquashfs, which checks every
/// table on the way.
pub(crate) fn extract(image: &Path, to: &Path) {
    let out = Command::new("unsquashfs")
        .args(["-no-progress", "-d"])
        .arg(to)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unsquashfs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `unsquashfs -lln`: mode, owner, size and path of every entry (the size of a symlink
/// and of a device differs between tools, so callers pick the fields they need).
fn listing(image: &Path) -> Vec<Vec<String>> {
    let out = Command::new("unsquashfs")
        .args(["-lln", "-d", ""])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(['d', '-', 'l']))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

fn header(kind: EntryType, path: &str, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_path(path).unwrap();
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid + 1);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// Bytes that compress somewhat, different for every `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|i| {
            if i % 7 == 0 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
            }
            (x >> 33) as u8 % 16 + b'a'
        })
        .collect()
}

#[test]
fn unsquashfs_and_squashfuse_read_what_it_writes() {
    let big = pattern(3 * BLOCK_SIZE + 17, 1);
    let exact = pattern(BLOCK_SIZE, 2);
    let random: Vec<u8> = (0..BLOCK_SIZE as u32 + 5)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // A hole in the middle: one all-zero block between data.
    let mut sparse = pattern(BLOCK_SIZE, 3);
    sparse.extend(vec![0u8; BLOCK_SIZE]);
    sparse.extend(pattern(100, 4));
    let long = "n".repeat(255);
    let mut b = tar::Builder::new(Vec::new());
    let add =
        |b: &mut tar::Builder<Vec<u8>>, h: tar::Header, data: &[u8]| b.append(&h, data).unwrap();
    add(
        &mut b,
        header(EntryType::Directory, "usr/lib", 0o755, 0, 0),
        b"",
    );
    add(
        &mut b,
        header(
            EntryType::Regular,
            "usr/lib/big.so",
            0o755,
            0,
            big.len() as u64,
        ),
        &big,
    );
    add(
        &mut b,
        header(EntryType::Regular, "exact", 0o644, 0, exact.len() as u64),
        &exact,
    );
    add(
        &mut b,
        header(EntryType::Regular, "random", 0o600, 7, random.len() as u64),
        &random,
    );
    add(
        &mut b,
        header(EntryType::Regular, "sparse", 0o644, 0, sparse.len() as u64),
        &sparse,
    );
    add(
        &mut b,
        header(EntryType::Regular, "empty", 0o4755, 0, 0),
        b"",
    );
    // A GNU long name: longer than the header's 100 bytes.
    let mut h = header(EntryType::Regular, "d/x", 0o644, 1000, 2);
    b.append_data(&mut h, format!("d/{long}"), &b"ok"[..])
        .unwrap();
    let mut link = header(EntryType::Symlink, "lib", 0o777, 0, 0);
    link.set_link_name("usr/lib").unwrap();
    link.set_cksum();
    add(&mut b, link, b"");
    let mut hard = header(EntryType::Link, "usr/lib/again.so", 0o644, 0, 0);
    hard.set_link_name("usr/lib/big.so").unwrap();
    hard.set_cksum();
    add(&mut b, hard, b"");
    // More entries than one directory header holds (256), several metadata blocks' worth.
    for i in 0..700 {
        let path = format!("many/file-{i:04}");
        add(
            &mut b,
            header(EntryType::Regular, &path, 0o644, i % 3, 4),
            b"data",
        );
    }
    let layer = b.into_inner().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        threads: 3,
        block_memory: 8 * BLOCK_SIZE,
        ..Options::default()
    };
    let (image, _, stats) = build_image(
        dir.path(),
        &[(&layer, Compression::None)],
        &mut default_budget(),
        &options,
    )
    .unwrap();
    assert_eq!(stats.sparse_blocks, 1);

    let superblock = Command::new("unsquashfs")
        .arg("-s")
        .arg(&image)
        .output()
        .unwrap();
    let superblock = String::from_utf8_lossy(&superblock.stdout);
    assert!(superblock.contains("Compression lz4"), "{superblock}");
    assert!(superblock.contains("Block size 131072"), "{superblock}");

    let root = dir.path().join("root");
    extract(&image, &root);
    let read = |p: &str| std::fs::read(root.join(p)).unwrap();
    assert_eq!(read("usr/lib/big.so"), big);
    assert_eq!(read("usr/lib/again.so"), big);
    assert_eq!(read("exact"), exact);
    assert_eq!(read("random"), random);
    assert_eq!(read("sparse"), sparse);
    assert_eq!(read("empty"), b"");
    assert_eq!(read(&format!("d/{long}")), b"ok");
    assert_eq!(read("lib/big.so"), big);
    assert_eq!(std::fs::read_dir(root.join("many")).unwrap().count(), 700);
    assert_eq!(read("many/file-0699"), b"data");

    let entries = listing(&image);
    let find = |path: &str| {
        entries
            .iter()
            .find(|e| e.get(5).map(String::as_str) == Some(path))
            .unwrap_or_else(|| panic!("{path} not listed"))
            .clone()
    };
    // The root, listed without a name.
    assert_eq!(entries[0][..2], ["drwxr-xr-x", "0/0"]);
    assert_eq!(find("/empty")[..2], ["-rwsr-xr-x", "0/1"]);
    assert_eq!(find("/random")[..3], ["-rw-------", "7/8", "131077"]);
    assert_eq!(find("/many/file-0002")[..2], ["-rw-r--r--", "2/3"]);
    assert_eq!(find("/lib")[0], "lrwxrwxrwx");
    assert_eq!(find("/usr")[..2], ["drwxr-xr-x", "0/0"]);

    // squashfuse, as berth exec mounts images.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("squashfuse")
        .arg(&image)
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success());
    let seen = (|| {
        use std::os::unix::fs::MetadataExt;
        // (squashfuse's high-level mode numbers inodes itself: the link count tells.)
        let again = std::fs::metadata(mnt.join("usr/lib/again.so"))?;
        Ok::<_, std::io::Error>((
            std::fs::read(mnt.join("usr/lib/big.so"))?,
            std::fs::read(mnt.join("sparse"))?,
            std::fs::read_link(mnt.join("lib"))?,
            std::fs::read_dir(mnt.join("many"))?.count(),
            again.nlink(),
            std::fs::metadata(mnt.join("empty"))?.mode() & 0o7777,
        ))
    })();
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    let (b, s, l, n, links, mode) = seen.unwrap();
    assert_eq!(b, big);
    assert_eq!(s, sparse);
    assert_eq!(l, Path::new("usr/lib"));
    assert_eq!(n, 700);
    assert_eq!(links, 2);
    assert_eq!(mode, 0o4755);
}

/// A directory whose listing needs more than 64 KiB (an extended directory inode), and an
/// empty image.
#[test]
fn large_directories_and_an_empty_image() {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..3000 {
        let path = format!("big/{}-{i}", "x".repeat(40));
        b.append(&header(EntryType::Regular, &path, 0o644, 0, 0), &b""[..])
            .unwrap();
    }
    let layer = b.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (image, _, _) = build_image(
        dir.path(),
        &[(&layer, Compression::None)],
        &mut default_budget(),
        &Options::default(),
    )
    .unwrap();
    let root = dir.path().join("root");
    extract(&image, &root);
    assert_eq!(std::fs::read_dir(root.join("big")).unwrap().count(), 3000);

    let empty = tempfile::tempdir().unwrap();
    let (image, _, stats) = build_image(
        empty.path(),
        &[],
        &mut default_budget(),
        &Options::default(),
    )
    .unwrap();
    assert_eq!((stats.inodes, stats.bytes % 4096), (1, 0));
    assert_eq!(listing(&image).len(), 1);
}

/// A 64 MiB file through a writer allowed 4 blocks in flight (the memory bound), written
/// at an offset as inside a SIF.
#[test]
fn a_large_file_streams_through_a_small_window_at_an_offset() {
    struct Counting(u64);
    impl std::io::Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0 as usize);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = (i % 251) as u8 + 1;
            }
            self.0 -= n as u64;
            Ok(n)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("image.sqfs"))
        .unwrap();
    let size = 64u64 << 20;
    let options = Options {
        threads: 2,
        block_memory: 4 * BLOCK_SIZE,
        ..Options::default()
    };
    let stats = build(&out, 4096, &options, |data| {
        let mut tree = Tree::new();
        root_file(&mut tree, data, "f", &mut Counting(size), size)?;
        Ok(tree)
    })
    .unwrap();
    assert_eq!(stats.blocks, size / BLOCK_SIZE as u64);
    // At an offset, as inside a SIF: unsquashfs reads it with -o.
    let listing = Command::new("unsquashfs")
        .args(["-o", "4096", "-lln", "-d", ""])
        .arg(dir.path().join("image.sqfs"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(text.contains(&format!(" {size} ")), "{text}");
}

/// Streams `size` bytes of `contents` through `data` as the file `name` in the root.
fn root_file(
    tree: &mut Tree,
    data: &mut Data,
    name: &str,
    contents: &mut impl Read,
    size: u64,
) -> crate::Result<()> {
    let (file, copied) = data.file(contents, size, |e| {
        crate::Error::io("reading the test file", e)
    })?;
    assert_eq!(copied, size);
    let meta = tree.node(Tree::ROOT).meta;
    let id = tree.add(Node {
        kind: Kind::File(file),
        meta,
    });
    tree.entries_mut(Tree::ROOT)
        .unwrap()
        .insert(name.as_bytes().into(), id);
    Ok(())
}

/// Two streams filled in turns: the first writes at the image's tail, the second (opened
/// while the first is still writing) goes to a spill file, and takes the tail over when
/// the first ends. Every file's blocks stay consecutive and its contents whole, and no
/// spill file is left.
#[test]
fn forked_streams_keep_each_file_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.sqfs");
    let out = image_file(&path);
    let options = Options {
        threads: 2,
        block_memory: 4 * BLOCK_SIZE,
        spill_dir: dir.path().to_path_buf(),
    };
    let files = [
        ("a1", pattern(300_000, 1)),
        ("b1", pattern(500_000, 2)),
        ("a2", pattern(200_000, 3)),
        ("b2", pattern(BLOCK_SIZE * 2, 4)),
    ];
    let stats = build(&out, 0, &options, |data| {
        let (mut a, mut b) = (Some(data.fork()), data.fork());
        let mut tree = Tree::new();
        for (name, contents) in &files {
            if *name == "b2" {
                a = None;
            }
            let stream = match (name.starts_with('a'), &mut a) {
                (true, Some(a)) => a,
                _ => &mut b,
            };
            let size = contents.len() as u64;
            root_file(&mut tree, stream, name, &mut contents.as_slice(), size)?;
        }
        Ok(tree)
    })
    .unwrap();
    out.set_len(stats.bytes).unwrap();
    // The spilled stream, copied in the kernel, is hashed too.
    assert_recorded_hash(&out, &stats);
    assert_eq!(stats.blocks, 3 + 4 + 2 + 2);
    let root = dir.path().join("root");
    extract(&path, &root);
    for (name, contents) in &files {
        assert_eq!(&std::fs::read(root.join(name)).unwrap(), contents, "{name}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("scratch"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A layer with multi-block, sparse and small files, links, and a whiteout, gzipped.
fn mixed_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut sparse = pattern(BLOCK_SIZE, 5);
    sparse.extend(vec![0u8; BLOCK_SIZE]);
    sparse.extend(pattern(99, 6));
    let big = pattern(2 * BLOCK_SIZE + 3, 7);
    let files: [(&str, &[u8]); 4] = [
        ("a/big", &big),
        ("a/sparse", &sparse),
        ("a/small", b"small"),
        ("b/.wh.gone", b""),
    ];
    for (path, data) in files {
        let h = header(EntryType::Regular, path, 0o640, 1000, data.len() as u64);
        b.append(&h, data).unwrap();
    }
    let mut link = header(EntryType::Symlink, "a/link", 0o777, 0, 0);
    link.set_link_name("small").unwrap();
    link.set_cksum();
    b.append(&link, &b""[..]).unwrap();
    let mut hard = header(EntryType::Link, "b/hard", 0o640, 1000, 0);
    hard.set_link_name("a/small").unwrap();
    hard.set_cksum();
    b.append(&hard, &b""[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

/// The fuzz target's build (`build_serial`, `apply_tar` on the caller's thread) writes the
/// very bytes a cache build (`build`, `apply_layer` with its threads) writes, so fuzzing it
/// fuzzes what production runs.
#[test]
fn a_serial_build_writes_the_bytes_a_threaded_build_writes() {
    let layer = mixed_layer();
    let dir = tempfile::tempdir().unwrap();
    let layers = [
        (&layer[..], Compression::Gzip),
        (&layer[..], Compression::Gzip),
    ];
    let (image, _, threaded) = build_image(
        dir.path(),
        &layers,
        &mut default_budget(),
        &Options::default(),
    )
    .unwrap();
    let out = berth_sys::memfd::anonymous(c"berth-test-serial").unwrap();
    let budget = default_budget();
    let serial = build_serial(&out, 0, 64, |data| {
        let mut tree = Tree::new();
        for (blob, compression) in layers {
            let tar = unpack::decoder(blob, compression).unwrap();
            unpack::apply_tar(&mut tree, data, tar, "sha256:test", &budget)?;
        }
        Ok(tree)
    })
    .unwrap();
    assert_recorded_hash(&out, &serial);
    // The same but for the hash, which covers the superblock's mkfs time.
    let unhashed = |stats: &Stats| Stats {
        sha256_superblock_last: String::new(),
        ..stats.clone()
    };
    assert_eq!(unhashed(&serial), unhashed(&threaded));
    assert!(
        serial.blocks >= 5 && serial.sparse_blocks >= 1,
        "{serial:?}"
    );
    let mut written = vec![0u8; serial.bytes as usize];
    out.read_exact_at(&mut written, 0).unwrap();
    let mut expected = std::fs::read(&image).unwrap();
    // All but the superblock's mkfs time, the second of each build.
    written[8..12].fill(0);
    expected[8..12].fill(0);
    assert!(written == expected, "the images differ");
}

/// Past its block allowance a serial build fails (it has no writer to wait for).
#[test]
fn a_serial_build_past_its_blocks_fails_without_waiting() {
    let out = berth_sys::memfd::anonymous(c"berth-test-serial").unwrap();
    let result = build_serial(&out, 0, 2, |data| {
        let big = pattern(3 * BLOCK_SIZE, 8);
        data.file(&mut &big[..], big.len() as u64, |e| {
            crate::Error::io("reading the test file", e)
        })?;
        Ok(Tree::new())
    });
    let e = result.unwrap_err().to_string();
    assert!(e.contains("writing the squashfs image"), "{e}");
}
