//! Reading SIF files and bare squashfs images, refusing anything berth cannot run safely.
//!
//! Every offset and size in a file comes from whoever built the image, so each one is checked
//! against the file's real length before it is used: a truncated download or a hostile file
//! gives a clear error here instead of a confusing failure inside squashfuse.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    DataType, Descriptor, FormatError, FsType, Header, PartType, SquashfsSuper, DESCRIPTOR_LEN,
    HEADER_LEN, MAGIC, SQUASHFS_MAGIC, SQUASHFS_SUPER_LEN,
};
use super::CONFIG_NAME;
use crate::image_config::ImageConfig;
use crate::{Error, Result};

/// More descriptor slots than any real writer makes (Apptainer: 48); a larger count in a
/// header is corruption, and refusing it bounds what a hostile header can make us allocate.
const MAX_DESCRIPTORS: i64 = 4096;
/// The stored image config is a few KiB; anything this large is corruption.
const MAX_CONFIG_LEN: i64 = 1 << 20;

/// Where an image's root file system lies: a squashfs at `offset` in `path`, `size` bytes
/// long, to be mounted with `squashfuse -o offset=<offset>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    pub path: PathBuf,
    pub offset: u64,
    pub size: u64,
    /// The config stored in the SIF by berth; the default (empty) config for bare squashfs
    /// files and SIFs written by other tools.
    pub config: ImageConfig,
}

/// Opens a SIF or a bare squashfs file and says where its root filesystem is. Refuses, with a
/// clear reason, a SIF with no PrimSys partition, a non-squashfs PrimSys (ext3, encrypted...),
/// bad magic/version, truncated/corrupt headers or descriptors pointing outside the file.
pub fn open_image(path: &Path) -> Result<ImageSource> {
    let file =
        File::open(path).map_err(|e| Error::io(format!("opening image {}", path.display()), e))?;
    let len = file_len(&file, path)?;
    let mut start = [0u8; HEADER_LEN];
    let have = (len as usize).min(HEADER_LEN);
    read_at(&file, path, &mut start[..have], 0)?;
    if have >= SQUASHFS_MAGIC.len() && &start[..4] == SQUASHFS_MAGIC {
        check_squashfs(&file, path, 0, len)?;
        return Ok(ImageSource {
            path: path.to_owned(),
            offset: 0,
            size: len,
            config: ImageConfig::default(),
        });
    }
    let sif = Sif::from_file(file, path)?;
    let part = sif.primary_partition()?;
    let fs = part
        .partition()
        .expect("primary_partition returns partitions")
        .fs;
    if fs != FsType::Squash {
        return Err(Error::SifUnsupportedFs {
            path: path.to_owned(),
            fs: fs.name().into_owned(),
        });
    }
    // Both were checked against the file length when the SIF was read.
    let (offset, size) = (part.offset as u64, part.size as u64);
    check_squashfs(&sif.file, path, offset, size)?;
    Ok(ImageSource {
        path: path.to_owned(),
        offset,
        size,
        config: sif.config()?.unwrap_or_default(),
    })
}

/// A SIF file, its header validated and every used descriptor checked to lie inside the file.
#[derive(Debug)]
pub struct Sif {
    path: PathBuf,
    file: File,
    len: u64,
    header: Header,
    /// The used descriptors, in table order.
    descriptors: Vec<Descriptor>,
}

impl Sif {
    pub fn open(path: &Path) -> Result<Sif> {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("opening SIF {}", path.display()), e))?;
        Sif::from_file(file, path)
    }

    /// Reads the SIF in an already open file; `path` names it in messages.
    pub fn from_file(file: File, path: &Path) -> Result<Sif> {
        let corrupt = |message: String| Error::SifCorrupt {
            path: path.to_owned(),
            message,
        };
        let len = file_len(&file, path)?;
        if len < HEADER_LEN as u64 {
            let mut start = vec![0u8; len as usize];
            read_at(&file, path, &mut start, 0)?;
            if start.len() >= 42 && &start[32..42] == MAGIC {
                return Err(corrupt(format!(
                    "the file is {len} bytes, shorter than the {HEADER_LEN}-byte SIF header"
                )));
            }
            return Err(Error::NotAnImage {
                path: path.to_owned(),
            });
        }
        let mut hb = [0u8; HEADER_LEN];
        read_at(&file, path, &mut hb, 0)?;
        let header = match Header::parse(&hb) {
            Ok(h) => h,
            Err(FormatError::BadMagic) => {
                return Err(Error::NotAnImage {
                    path: path.to_owned(),
                })
            }
            Err(FormatError::BadVersion(version)) => {
                return Err(Error::SifVersion {
                    path: path.to_owned(),
                    version,
                })
            }
        };

        let total = header.descriptors_total;
        if !(0..=MAX_DESCRIPTORS).contains(&total) {
            return Err(corrupt(format!(
                "the header says it has {total} descriptors (expected 0 to {MAX_DESCRIPTORS})"
            )));
        }
        let table_start = header.descriptors_offset;
        let table_len = total as u64 * DESCRIPTOR_LEN as u64;
        if table_start < HEADER_LEN as i64 {
            return Err(corrupt(format!(
                "the descriptor table offset {table_start} overlaps the header"
            )));
        }
        let table_end = table_start as u64 + table_len;
        if table_end > len {
            return Err(corrupt(format!(
                "the descriptor table (bytes {table_start}..{table_end}) extends past the end of \
                 the file ({len} bytes)"
            )));
        }
        let mut table = vec![0u8; table_len as usize];
        read_at(&file, path, &mut table, table_start as u64)?;
        let mut descriptors = Vec::new();
        for raw in table.chunks_exact(DESCRIPTOR_LEN) {
            let d = Descriptor::parse(raw.try_into().unwrap());
            if !d.used {
                continue;
            }
            let what = format!("object {} ({})", d.id, d.data_type.name());
            if d.offset < 0 || d.size < 0 {
                return Err(corrupt(format!(
                    "{what} has a negative offset ({}) or size ({})",
                    d.offset, d.size
                )));
            }
            let end = (d.offset as u64).checked_add(d.size as u64);
            match end {
                Some(end) if end <= len => {}
                _ => {
                    return Err(corrupt(format!(
                        "{what} spans bytes {}..{} but the file has only {len} bytes",
                        d.offset,
                        d.offset as u128 + d.size as u128
                    )))
                }
            }
            if d.size > 0 && (d.offset as u64) < table_end {
                return Err(corrupt(format!(
                    "{what} at offset {} overlaps the header or descriptor table (which end at \
                     {table_end})",
                    d.offset
                )));
            }
            descriptors.push(d);
        }
        // Objects share no bytes: Apptainer never writes two over the same bytes, and where
        // they did, what one object (a signature, the config) says about its bytes would
        // also be about another's (the sif library's CVE-2022-39237 class of confusion).
        let mut extents: Vec<&Descriptor> = descriptors.iter().filter(|d| d.size > 0).collect();
        extents.sort_by_key(|d| d.offset);
        if let Some(pair) = extents
            .windows(2)
            .find(|pair| pair[0].offset + pair[0].size > pair[1].offset)
        {
            let show = |d: &Descriptor| {
                format!(
                    "object {} ({}, bytes {}..{})",
                    d.id,
                    d.data_type.name(),
                    d.offset,
                    d.offset + d.size
                )
            };
            return Err(corrupt(format!(
                "{} and {} overlap",
                show(pair[0]),
                show(pair[1])
            )));
        }
        Ok(Sif {
            path: path.to_owned(),
            file,
            len,
            header,
            descriptors,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The used descriptors, in table order.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// The partition descriptor holding the root file system (parttype PrimSys). Exactly one
    /// must exist: with two, which one runs would be a guess.
    pub fn primary_partition(&self) -> Result<&Descriptor> {
        let mut prim = self
            .descriptors
            .iter()
            .filter(|d| d.partition().is_some_and(|p| p.part == PartType::PrimSys));
        match (prim.next(), prim.next()) {
            (Some(d), None) => Ok(d),
            (Some(a), Some(b)) => Err(Error::SifCorrupt {
                path: self.path.clone(),
                message: format!(
                    "objects {} and {} are both PrimSys partitions; a SIF has one root file system",
                    a.id, b.id
                ),
            }),
            (None, _) => {
                let held: Vec<String> = self
                    .descriptors
                    .iter()
                    .map(|d| match d.partition() {
                        Some(p) => format!("{} partition ({})", p.part.name(), p.fs.name()),
                        None => d.data_type.name().into_owned(),
                    })
                    .collect();
                let message = if held.is_empty() {
                    "it holds no objects at all".to_owned()
                } else {
                    format!("it holds: {}", held.join(", "))
                };
                Err(Error::SifNoRootfs {
                    path: self.path.clone(),
                    message,
                })
            }
        }
    }

    /// The bytes of one object, refusing objects larger than `max` bytes.
    pub fn read_data(&self, d: &Descriptor, max: i64) -> Result<Vec<u8>> {
        if d.size > max {
            return Err(Error::SifCorrupt {
                path: self.path.clone(),
                message: format!(
                    "object {} ({}) is {} bytes, more than the {max} expected",
                    d.id,
                    d.data_type.name(),
                    d.size
                ),
            });
        }
        let mut buf = vec![0u8; d.size as usize];
        read_at(&self.file, &self.path, &mut buf, d.offset as u64)?;
        Ok(buf)
    }

    /// The image config berth stored (a JSON.Generic object named CONFIG_NAME), or None when
    /// the SIF was written by another tool.
    pub fn config(&self) -> Result<Option<ImageConfig>> {
        let mut found = self
            .descriptors
            .iter()
            .filter(|d| d.data_type == DataType::GenericJson && d.name() == CONFIG_NAME);
        let d = match (found.next(), found.next()) {
            (None, _) => return Ok(None),
            (Some(d), None) => d,
            (Some(a), Some(b)) => {
                return Err(Error::SifCorrupt {
                    path: self.path.clone(),
                    message: format!(
                        "objects {} and {} are both named {CONFIG_NAME}; which config applies \
                         would be a guess",
                        a.id, b.id
                    ),
                })
            }
        };
        let bytes = self.read_data(d, MAX_CONFIG_LEN)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::SifCorrupt {
                path: self.path.clone(),
                message: format!(
                    "object {} ({CONFIG_NAME}) is not a valid image config: {e}",
                    d.id
                ),
            })
    }

    /// Checks the root partition against the SHA-256 the writer recorded in the config:
    /// `Verified::Hash` when it matches, `Verified::NotRecorded` for an image without one
    /// (another tool's, or berth's before it recorded hashes), an error naming the image when
    /// the bytes differ or the partition cannot be read to its end.
    pub fn verify(&self) -> Result<Verified> {
        let part = self.primary_partition()?;
        self.squashfs_super(part)?;
        let config = self.config()?.unwrap_or_default();
        let (offset, size) = (part.offset as u64, part.size as u64);
        // The superblock (checked above, so the partition holds one) hashed first or last.
        let sb = SQUASHFS_SUPER_LEN as u64;
        let (recorded, ranges) = if !config.rootfs_sha256_superblock_last.is_empty() {
            let ranges = vec![(offset + sb, size - sb), (offset, sb)];
            (config.rootfs_sha256_superblock_last, ranges)
        } else if !config.rootfs_sha256.is_empty() {
            (config.rootfs_sha256, vec![(offset, size)])
        } else {
            return Ok(Verified::NotRecorded);
        };
        let found = sha256_at(&self.file, &self.path, &ranges)?;
        if found != recorded {
            return Err(Error::SifCorrupt {
                path: self.path.clone(),
                message: format!(
                    "its root file system has SHA-256 {found}, which does not match the \
                     {recorded} recorded when it was written: the file is damaged (remove it; \
                     berth fetches it again when a job needs it)"
                ),
            });
        }
        Ok(Verified::Hash)
    }

    /// The squashfs superblock of a partition, checked as `open_image` checks it.
    pub fn squashfs_super(&self, d: &Descriptor) -> Result<SquashfsSuper> {
        check_squashfs(&self.file, &self.path, d.offset as u64, d.size as u64)
    }
}

/// Checks that `size` bytes at `offset` hold a squashfs 4.x file system that fits in them, so
/// squashfuse gets a file system it can read to the end.
pub(crate) fn check_squashfs(
    file: &File,
    path: &Path,
    offset: u64,
    size: u64,
) -> Result<SquashfsSuper> {
    let corrupt = |message: String| Error::SifCorrupt {
        path: path.to_owned(),
        message,
    };
    if size < SQUASHFS_SUPER_LEN as u64 {
        return Err(corrupt(format!(
            "the root file system at offset {offset} is {size} bytes, too small to be a squashfs \
             ({SQUASHFS_SUPER_LEN}-byte superblock)"
        )));
    }
    let mut sb = [0u8; SQUASHFS_SUPER_LEN];
    read_at(file, path, &mut sb, offset)?;
    let Some(s) = SquashfsSuper::parse(&sb) else {
        return Err(corrupt(format!(
            "the root file system at offset {offset} should be squashfs but starts with {} \
             instead of the squashfs magic \"hsqs\"",
            hex::encode(&sb[..4])
        )));
    };
    if s.major != 4 {
        return Err(corrupt(format!(
            "the squashfs at offset {offset} is version {}.{}; squashfuse reads version 4",
            s.major, s.minor
        )));
    }
    if s.bytes_used > size {
        return Err(corrupt(format!(
            "the squashfs at offset {offset} says it is {} bytes but only {size} are there",
            s.bytes_used
        )));
    }
    Ok(s)
}

/// What [`Sif::verify`] could check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The root partition's bytes match the SHA-256 recorded at writing.
    Hash,
    /// The image records no hash; only its structure was checked.
    NotRecorded,
}

/// The SHA-256 (hex) of the `(offset, len)` ranges of `file`, in that order; a file shorter
/// than that is an error.
pub(crate) fn sha256_at(file: &File, path: &Path, ranges: &[(u64, u64)]) -> Result<String> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for &(offset, len) in ranges {
        crate::pieces::for_each(crate::pieces::at(file, offset, len), |piece| {
            hasher.update(piece);
            Ok::<_, std::io::Error>(())
        })
        .map_err(|e| {
            Error::io(
                format!(
                    "reading {len} bytes at offset {offset} of {}",
                    path.display()
                ),
                e,
            )
        })?;
    }
    Ok(hex::encode(hasher.finalize()))
}

fn file_len(file: &File, path: &Path) -> Result<u64> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::io(
            format!("opening image {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    Ok(meta.len())
}

fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        Error::io(
            format!(
                "reading {} bytes at offset {offset} of {}",
                buf.len(),
                path.display()
            ),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::format::{
        Partition, DESCRIPTORS_OFFSET, DESCRIPTOR_SLOTS, LAUNCH_LEN, NAME_LEN,
    };
    use super::*;

    const DATA_AT: u64 = 32768;

    /// A minimal squashfs superblock (all berth checks before squashfuse sees the file) and
    /// some file system bytes, `len` bytes in all.
    fn fake_squashfs(len: usize) -> Vec<u8> {
        let mut b = vec![0xabu8; len];
        b[..96].fill(0);
        b[0..4].copy_from_slice(b"hsqs");
        b[20] = 5;
        b[28] = 4;
        b[40..48].copy_from_slice(&(len as u64).to_le_bytes());
        b
    }

    fn header(total: i64) -> Header {
        Header {
            launch: [0; LAUNCH_LEN],
            arch: *b"02\0",
            id: [7; 16],
            created: 1,
            modified: 2,
            descriptors_free: 0,
            descriptors_total: total,
            descriptors_offset: DESCRIPTORS_OFFSET as i64,
            descriptors_size: total * DESCRIPTOR_LEN as i64,
            data_offset: DATA_AT as i64,
            data_size: 0,
        }
    }

    fn partition(id: u32, fs: FsType, part: PartType, offset: u64, size: usize) -> Descriptor {
        let mut d = Descriptor::new(DataType::Partition, id, "");
        d.offset = offset as i64;
        d.size = size as i64;
        d.set_partition(Partition {
            fs,
            part,
            arch: *b"02\0",
        });
        d
    }

    /// Lays out a SIF: header, a 48-slot table holding `descs`, and `objects` at their
    /// offsets.
    fn build(h: &Header, descs: &[Descriptor], objects: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut f =
            vec![0u8; (DESCRIPTORS_OFFSET + DESCRIPTOR_SLOTS * DESCRIPTOR_LEN as u64) as usize];
        f[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        for (n, d) in descs.iter().enumerate() {
            let at = DESCRIPTORS_OFFSET as usize + n * DESCRIPTOR_LEN;
            f[at..at + DESCRIPTOR_LEN].copy_from_slice(&d.to_bytes());
        }
        for (offset, bytes) in objects {
            let end = *offset as usize + bytes.len();
            if f.len() < end {
                f.resize(end, 0);
            }
            f[*offset as usize..end].copy_from_slice(bytes);
        }
        f
    }

    fn valid() -> Vec<u8> {
        let sq = fake_squashfs(8192);
        let json = br#"{"Env":["A=1"],"Cmd":["sh"]}"#.to_vec();
        let mut conf = Descriptor::new(DataType::GenericJson, 2, CONFIG_NAME);
        conf.offset = (DATA_AT + 8192) as i64;
        conf.size = json.len() as i64;
        build(
            &header(48),
            &[
                partition(1, FsType::Squash, PartType::PrimSys, DATA_AT, sq.len()),
                conf,
            ],
            &[(DATA_AT, sq), (DATA_AT + 8192, json)],
        )
    }

    fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<ImageSource>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.sif");
        std::fs::write(&p, bytes).unwrap();
        let r = open_image(&p);
        (dir, r)
    }

    fn corrupt_message(bytes: &[u8]) -> String {
        match open_bytes(bytes).1 {
            Err(Error::SifCorrupt { message, .. }) => message,
            other => panic!("expected SifCorrupt, got {other:?}"),
        }
    }

    #[test]
    fn valid_sif_gives_partition_and_config() {
        let (_d, r) = open_bytes(&valid());
        let src = r.unwrap();
        assert_eq!((src.offset, src.size), (DATA_AT, 8192));
        assert_eq!(src.config.env, vec!["A=1"]);
        assert_eq!(src.config.cmd, vec!["sh"]);
    }

    #[test]
    fn bare_squashfs_is_an_image_at_offset_zero() {
        let (_d, r) = open_bytes(&fake_squashfs(4096));
        let src = r.unwrap();
        assert_eq!((src.offset, src.size), (0, 4096));
        assert_eq!(src.config, ImageConfig::default());
    }

    #[test]
    fn bad_magic_is_not_an_image() {
        let mut f = valid();
        f[32] = b'X';
        assert!(matches!(open_bytes(&f).1, Err(Error::NotAnImage { .. })));
        assert!(matches!(
            open_bytes(b"hello").1,
            Err(Error::NotAnImage { .. })
        ));
        assert!(matches!(open_bytes(b"").1, Err(Error::NotAnImage { .. })));
    }

    #[test]
    fn bad_version_is_refused() {
        let mut f = valid();
        f[42..45].copy_from_slice(b"02\0");
        match open_bytes(&f).1 {
            Err(Error::SifVersion { version, .. }) => assert_eq!(version, "02"),
            other => panic!("expected SifVersion, got {other:?}"),
        }
    }

    #[test]
    fn truncated_files_are_refused() {
        let f = valid();
        assert!(corrupt_message(&f[..100]).contains("shorter than the 128-byte SIF header"));
        assert!(corrupt_message(&f[..5000]).contains("descriptor table"));
        // Cut inside the partition: its descriptor now points past the end.
        assert!(corrupt_message(&f[..DATA_AT as usize + 100]).contains("spans bytes 32768..40960"));
    }

    #[test]
    fn descriptor_beyond_eof_is_refused() {
        let sq = fake_squashfs(4096);
        let mut p = partition(1, FsType::Squash, PartType::PrimSys, DATA_AT, 4096);
        p.offset = i64::MAX - 10;
        let f = build(&header(48), &[p.clone()], &[(DATA_AT, sq.clone())]);
        assert!(corrupt_message(&f).contains("but the file has only"));
        p.offset = -1;
        let f = build(&header(48), &[p], &[(DATA_AT, sq)]);
        assert!(corrupt_message(&f).contains("negative offset"));
    }

    #[test]
    fn object_inside_the_descriptor_table_is_refused() {
        let sq = fake_squashfs(4096);
        let f = build(
            &header(48),
            &[partition(1, FsType::Squash, PartType::PrimSys, 4096, 4096)],
            &[(DATA_AT, sq)],
        );
        assert!(corrupt_message(&f).contains("overlaps the header or descriptor table"));
    }

    #[test]
    fn overlapping_objects_are_refused() {
        let mut f = valid();
        // The partition grows into the config that follows it.
        let mut p = partition(1, FsType::Squash, PartType::PrimSys, DATA_AT, 8192 + 4);
        let at = DESCRIPTORS_OFFSET as usize;
        f[at..at + DESCRIPTOR_LEN].copy_from_slice(&p.to_bytes());
        let message = corrupt_message(&f);
        assert!(
            message.contains("object 1 (FS, bytes 32768..40964)")
                && message.contains("object 2 (JSON.Generic, bytes 40960..")
                && message.ends_with("overlap"),
            "{message}"
        );
        // Objects that only touch are fine.
        p.size = 8192;
        f[at..at + DESCRIPTOR_LEN].copy_from_slice(&p.to_bytes());
        assert!(open_bytes(&f).1.is_ok());
    }

    #[test]
    fn absurd_descriptor_counts_are_refused() {
        let f = build(&header(1 << 40), &[], &[]);
        assert!(corrupt_message(&f).contains("descriptors (expected 0 to 4096)"));
        let f = build(&header(-1), &[], &[]);
        assert!(corrupt_message(&f).contains("descriptors"));
    }

    #[test]
    fn no_primsys_partition_is_refused() {
        let f = build(&header(48), &[], &[]);
        match open_bytes(&f).1 {
            Err(Error::SifNoRootfs { message, .. }) => assert!(message.contains("no objects")),
            other => panic!("expected SifNoRootfs, got {other:?}"),
        }
        // A System (not PrimSys) squashfs partition is not a root file system either.
        let f = build(
            &header(48),
            &[partition(
                1,
                FsType::Squash,
                PartType::System,
                DATA_AT,
                4096,
            )],
            &[(DATA_AT, fake_squashfs(4096))],
        );
        match open_bytes(&f).1 {
            Err(Error::SifNoRootfs { message, .. }) => {
                assert!(message.contains("System partition (Squashfs)"), "{message}")
            }
            other => panic!("expected SifNoRootfs, got {other:?}"),
        }
    }

    #[test]
    fn ext3_and_encrypted_root_partitions_are_refused() {
        for (fs, name) in [
            (FsType::Ext3, "Ext3"),
            (FsType::EncryptedSquash, "Encrypted squashfs"),
        ] {
            let f = build(
                &header(48),
                &[partition(1, fs, PartType::PrimSys, DATA_AT, 4096)],
                &[(DATA_AT, vec![0; 4096])],
            );
            match open_bytes(&f).1 {
                Err(Error::SifUnsupportedFs { fs, .. }) => assert_eq!(fs, name),
                other => panic!("expected SifUnsupportedFs, got {other:?}"),
            }
        }
    }

    #[test]
    fn partition_without_squashfs_magic_or_too_short_is_refused() {
        let f = build(
            &header(48),
            &[partition(
                1,
                FsType::Squash,
                PartType::PrimSys,
                DATA_AT,
                4096,
            )],
            &[(DATA_AT, vec![0xde; 4096])],
        );
        assert!(corrupt_message(&f).contains("starts with dededede"));
        let f = build(
            &header(48),
            &[partition(1, FsType::Squash, PartType::PrimSys, DATA_AT, 4)],
            &[(DATA_AT, b"hsqs".to_vec())],
        );
        assert!(corrupt_message(&f).contains("too small to be a squashfs"));
        // The superblock claims more bytes than the partition holds.
        let mut sq = fake_squashfs(4096);
        sq[40..48].copy_from_slice(&9999u64.to_le_bytes());
        let f = build(
            &header(48),
            &[partition(
                1,
                FsType::Squash,
                PartType::PrimSys,
                DATA_AT,
                4096,
            )],
            &[(DATA_AT, sq)],
        );
        assert!(corrupt_message(&f).contains("says it is 9999 bytes"));
    }

    #[test]
    fn two_primsys_partitions_are_refused() {
        let sq = fake_squashfs(4096);
        let f = build(
            &header(48),
            &[
                partition(1, FsType::Squash, PartType::PrimSys, DATA_AT, 4096),
                partition(2, FsType::Squash, PartType::PrimSys, DATA_AT + 4096, 4096),
            ],
            &[(DATA_AT, sq.clone()), (DATA_AT + 4096, sq)],
        );
        assert!(corrupt_message(&f).contains("both PrimSys"));
    }

    #[test]
    fn unused_descriptors_are_ignored_even_if_garbage() {
        let mut f = valid();
        let mut junk = partition(9, FsType::Squash, PartType::PrimSys, u64::MAX / 2, 1);
        junk.used = false;
        let at = DESCRIPTORS_OFFSET as usize + 5 * DESCRIPTOR_LEN;
        f[at..at + DESCRIPTOR_LEN].copy_from_slice(&junk.to_bytes());
        assert!(open_bytes(&f).1.is_ok());
    }

    #[test]
    fn corrupt_config_json_is_refused() {
        let mut f = valid();
        f[DATA_AT as usize + 8192] = b'!';
        assert!(corrupt_message(&f).contains("not a valid image config"));
        // Another tool's JSON.Generic object with a different name is not ours.
        let mut f = valid();
        let at = DESCRIPTORS_OFFSET as usize + DESCRIPTOR_LEN + 73;
        f[at..at + NAME_LEN].fill(0);
        f[at..at + 9].copy_from_slice(b"data.json");
        assert_eq!(open_bytes(&f).1.unwrap().config, ImageConfig::default());
    }
}
