//! Writing SIF files the way Apptainer lays them out: header, a 48-slot descriptor table at
//! 4096, the squashfs root partition at the first 4096-aligned offset after the table
//! (32768), then the image config as a JSON.Generic object. Apptainer's `sif list`,
//! `apptainer inspect`/`run` and `apptainer sign` accept the result; berth reads the config
//! back by name.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::format::{
    host_arch, DataType, Descriptor, FsType, Header, PartType, Partition, DESCRIPTORS_OFFSET,
    DESCRIPTOR_LEN, DESCRIPTOR_SLOTS, LAUNCH_LEN, LAUNCH_SCRIPT, PARTITION_ALIGN,
};
use super::reader::{check_squashfs, sha256_at};
use super::CONFIG_NAME;
use crate::image_config::ImageConfig;
use crate::{Error, Result};

/// Data starts right after the descriptor table, as in Apptainer's files.
const DATA_OFFSET: u64 = DESCRIPTORS_OFFSET + DESCRIPTOR_SLOTS * DESCRIPTOR_LEN as u64;
/// The root partition's offset: DATA_OFFSET (32176) rounded up to PARTITION_ALIGN.
pub const PARTITION_OFFSET: u64 = DATA_OFFSET.div_ceil(PARTITION_ALIGN) * PARTITION_ALIGN;

/// mksquashfs compression for images berth builds: lz4 at its default level.
///
/// `berth exec` start-up through squashfuse is dominated by decompressing the first binaries
/// it reads, and conversion runs on the compute node at the start of a job on a cache miss,
/// so both decompression and compression speed matter more than the last 30% of size.
/// Measured here (2 shared cores, squashfuse 0.1.105, medians; table in docs/BENCHMARKS.md,
/// "SIF compression"): first exec of busybox from a fresh mount lz4 7-8 ms, zstd-3 13-15 ms,
/// gzip-9 26 ms, uncompressed 5 ms; /usr/lib/x86_64-linux-gnu (734 MiB): build lz4 1.6 s,
/// zstd-3 5.3 s, gzip-9 73 s, lz4 -Xhc 158 s; size lz4 349 MiB, zstd-3 248 MiB, uncompressed
/// 723 MiB; reading a 117 MB library lz4 172 ms, zstd-3 313 ms, gzip-9 452 ms, uncompressed
/// 91 ms. Uncompressed reads faster still but doubles the bytes every staging copy moves;
/// lz4 -Xhc reads no faster than lz4 and builds 100x slower.
pub const MKSQUASHFS_COMPRESSION: &[&str] = &["-comp", "lz4"];

/// Where distributions install mksquashfs (squashfs-tools). berth runs it by absolute path,
/// as root for the node cache: never through PATH, whose directories (`/usr/local/sbin`
/// first, or whatever a caller's environment says) are not berth's to trust.
const MKSQUASHFS: [&str; 2] = ["/usr/bin/mksquashfs", "/usr/sbin/mksquashfs"];

fn mksquashfs() -> Result<&'static Path> {
    MKSQUASHFS
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::io(
                format!(
                    "finding mksquashfs (looked for {}; install squashfs-tools: apt-get install \
                     squashfs-tools)",
                    MKSQUASHFS.join(", ")
                ),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
}

/// Writes `out` atomically (temp file in the same dir + fsync + rename) from a squashfs file and a config: header, a PrimSys/squashfs partition descriptor, and a descriptor holding the ImageConfig JSON.
pub fn write_image(out: &Path, squashfs: &Path, config: &ImageConfig) -> Result<()> {
    let mut src = File::open(squashfs)
        .map_err(|e| Error::io(format!("opening squashfs {}", squashfs.display()), e))?;
    let src_len = src
        .metadata()
        .map_err(|e| Error::io(format!("reading the size of {}", squashfs.display()), e))?
        .len();
    check_squashfs(&src, squashfs, 0, src_len)?;
    let mut tmp = TempOut::create(out)?;
    tmp.file
        .seek(SeekFrom::Start(PARTITION_OFFSET))
        .map_err(|e| Error::io(format!("writing {}", tmp.path.display()), e))?;
    // std's File-to-File copy uses copy_file_range, so no bytes pass through user space and
    // file systems that can share extents (btrfs, xfs) do.
    let copied = std::io::copy(&mut src, &mut tmp.file).map_err(|e| {
        Error::io(
            format!("copying {} into {}", squashfs.display(), tmp.path.display()),
            e,
        )
    })?;
    if copied != src_len {
        return Err(Error::io(
            format!("copying {}", squashfs.display()),
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file changed size while being copied ({src_len} -> {copied} bytes)"),
            ),
        ));
    }
    finish(tmp, copied, config, None)
}

/// Builds a squashfs from a directory with mksquashfs using berth's chosen compression, then write_image.
///
/// mksquashfs writes straight into the SIF at PARTITION_OFFSET (`-o`), so a large root file
/// system is written once instead of being built in a temp file and copied. Images from
/// registries do not come this way (see `squash`): this is for directories on disk
/// (`berth sif create DIR`, a saved container).
pub fn create_from_dir(out: &Path, dir: &Path, config: &ImageConfig) -> Result<()> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("reading source directory {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            format!("reading source directory {}", dir.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"),
        ));
    }
    let tmp = TempOut::create(out)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let result = Command::new(mksquashfs()?)
        .arg(dir)
        .arg(&tmp.path)
        .arg("-o")
        .arg(PARTITION_OFFSET.to_string())
        // Owners and modes stay as on disk (no -all-root): the container runs as the caller
        // and must see the files' real ownership. Xattrs are dropped: squashfuse ignores
        // most and security.* ones would be meaningless inside a user namespace.
        .args([
            "-noappend",
            "-no-xattrs",
            "-quiet",
            "-no-progress",
            "-processors",
        ])
        .arg(cpus.to_string())
        .args(MKSQUASHFS_COMPRESSION)
        .output()
        .map_err(|e| Error::io("running mksquashfs", e))?;
    if !result.status.success() {
        return Err(Error::Mksquashfs {
            dir: dir.to_owned(),
            status: result.status.to_string(),
            stderr: String::from_utf8_lossy(&result.stderr).trim().to_owned(),
        });
    }
    let len = tmp
        .file
        .metadata()
        .map_err(|e| Error::io(format!("reading the size of {}", tmp.path.display()), e))?
        .len();
    let part_len = len
        .checked_sub(PARTITION_OFFSET)
        .ok_or_else(|| Error::Mksquashfs {
            dir: dir.to_owned(),
            status: result.status.to_string(),
            stderr: format!("it wrote only {len} bytes"),
        })?;
    check_squashfs(&tmp.file, &tmp.path, PARTITION_OFFSET, part_len)?;
    finish(tmp, part_len, config, None)
}

/// A root partition `create_with`'s builder wrote: its length, and its SHA-256 with the
/// squashfs superblock hashed last, as the builder hashed it while writing (hex).
pub struct Built {
    pub len: u64,
    pub sha256_superblock_last: String,
}

/// Builds a SIF whose root file system `build` writes: it gets the (temporary) file and the
/// partition's offset. Used to stream a squashfs built from layers straight into place
/// (`squash::build`), with no file in between and nothing read back.
pub fn create_with(
    out: &Path,
    config: &ImageConfig,
    build: impl FnOnce(&File, u64) -> Result<Built>,
) -> Result<()> {
    let tmp = TempOut::create(out)?;
    let built = build(&tmp.file, PARTITION_OFFSET)?;
    check_squashfs(&tmp.file, &tmp.path, PARTITION_OFFSET, built.len)?;
    finish(tmp, built.len, config, Some(built.sha256_superblock_last))
}

/// Completes a SIF whose squashfs already lies at PARTITION_OFFSET: appends the config,
/// writes the header and descriptor table, then syncs and renames it into place. The
/// config records `sha256_superblock_last` where the builder hashed the partition, and
/// otherwise the partition's SHA-256, read back.
fn finish(
    tmp: TempOut,
    part_len: u64,
    config: &ImageConfig,
    sha256_superblock_last: Option<String>,
) -> Result<()> {
    let io = |e| Error::io(format!("writing {}", tmp.path.display()), e);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let arch = host_arch();

    let mut part = Descriptor::new(DataType::Partition, 1, "");
    part.offset = PARTITION_OFFSET as i64;
    part.size = part_len as i64;
    // Apptainer counts the alignment gap before an object in its padded size.
    part.size_with_padding = (PARTITION_OFFSET - DATA_OFFSET + part_len) as i64;
    part.created = now;
    part.modified = now;
    part.set_partition(Partition {
        fs: FsType::Squash,
        part: PartType::PrimSys,
        arch,
    });

    let config = match sha256_superblock_last {
        Some(hash) => ImageConfig {
            rootfs_sha256_superblock_last: hash,
            ..config.clone()
        },
        // Hashed from the file itself, as written, so a later read that differs is damage.
        None => ImageConfig {
            rootfs_sha256: sha256_at(&tmp.file, &tmp.path, &[(PARTITION_OFFSET, part_len)])?,
            ..config.clone()
        },
    };
    let json = serde_json::to_vec_pretty(&config).expect("ImageConfig always serializes");
    let mut conf = Descriptor::new(DataType::GenericJson, 2, CONFIG_NAME);
    conf.offset = (PARTITION_OFFSET + part_len) as i64;
    conf.size = json.len() as i64;
    conf.size_with_padding = conf.size;
    conf.created = now;
    conf.modified = now;

    let end = conf.offset as u64 + json.len() as u64;
    let mut launch = [0u8; LAUNCH_LEN];
    launch[..LAUNCH_SCRIPT.len()].copy_from_slice(LAUNCH_SCRIPT.as_bytes());
    let header = Header {
        launch,
        arch,
        id: random_uuid()?,
        created: now,
        modified: now,
        descriptors_free: DESCRIPTOR_SLOTS as i64 - 2,
        descriptors_total: DESCRIPTOR_SLOTS as i64,
        descriptors_offset: DESCRIPTORS_OFFSET as i64,
        descriptors_size: (DESCRIPTOR_SLOTS * DESCRIPTOR_LEN as u64) as i64,
        data_offset: DATA_OFFSET as i64,
        data_size: (end - DATA_OFFSET) as i64,
    };

    let mut table = vec![0u8; (PARTITION_OFFSET - DESCRIPTORS_OFFSET) as usize];
    table[..DESCRIPTOR_LEN].copy_from_slice(&part.to_bytes());
    table[DESCRIPTOR_LEN..2 * DESCRIPTOR_LEN].copy_from_slice(&conf.to_bytes());
    let mut head = vec![0u8; DESCRIPTORS_OFFSET as usize];
    head[..header.to_bytes().len()].copy_from_slice(&header.to_bytes());

    tmp.file.write_all_at(&head, 0).map_err(io)?;
    tmp.file
        .write_all_at(&table, DESCRIPTORS_OFFSET)
        .map_err(io)?;
    tmp.file
        .write_all_at(&json, conf.offset as u64)
        .map_err(io)?;
    tmp.file.set_len(end).map_err(io)?;
    tmp.persist()
}

/// 16 random bytes shaped as a version-4 UUID, like the ids Apptainer gives its images.
fn random_uuid() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|e| Error::io("reading /dev/urandom for the image UUID", e))?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

/// A file beside the destination that becomes it only once complete, so a reader (or a
/// concurrent `berth fetch` on the same node) never sees a half-written image. Removed on
/// drop unless persisted.
struct TempOut {
    path: PathBuf,
    out: PathBuf,
    file: File,
    persisted: bool,
}

impl TempOut {
    fn create(out: &Path) -> Result<TempOut> {
        let name = out.file_name().ok_or_else(|| {
            Error::io(
                format!("writing {}", out.display()),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the output path has no file name",
                ),
            )
        })?;
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(
            ".{}.tmp-{}-{nanos}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(TempOut {
            path,
            out: out.to_owned(),
            file,
            persisted: false,
        })
    }

    fn persist(mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        std::fs::rename(&self.path, &self.out).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", self.path.display(), self.out.display()),
                e,
            )
        })?;
        self.persisted = true;
        // The rename is durable only once the directory is synced.
        let dir = self.path.parent().expect("temp path has a parent");
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: the error that got us here is the one worth reporting.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sif::{open_image, Sif, Verified};

    fn squashfs_of(dir: &Path, out: &Path) {
        std::fs::write(dir.join("hello.txt"), b"hello from berth\n").unwrap();
        let st = Command::new(mksquashfs().unwrap())
            .arg(dir)
            .arg(out)
            .args(["-noappend", "-quiet", "-no-progress"])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn config() -> ImageConfig {
        ImageConfig {
            env: vec!["PATH=/bin".into(), "A=b c".into()],
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            working_dir: "/work".into(),
            ..Default::default()
        }
    }

    #[test]
    fn layout_matches_apptainer() {
        assert_eq!(DATA_OFFSET, 32176);
        assert_eq!(PARTITION_OFFSET, 32768);
    }

    #[test]
    fn write_image_round_trips_through_the_reader() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let sq = t.path().join("root.sqfs");
        squashfs_of(&root, &sq);
        let out = t.path().join("img.sif");
        write_image(&out, &sq, &config()).unwrap();

        let src = open_image(&out).unwrap();
        assert_eq!(src.offset, PARTITION_OFFSET);
        assert_eq!(src.size, std::fs::metadata(&sq).unwrap().len());
        assert_eq!(src.config, recorded(config(), &src));
        let original = std::fs::read(&sq).unwrap();
        let whole = std::fs::read(&out).unwrap();
        assert_eq!(
            &whole[src.offset as usize..(src.offset + src.size) as usize],
            &original[..]
        );

        let sif = Sif::open(&out).unwrap();
        let h = sif.header();
        assert_eq!((h.descriptors_total, h.descriptors_free), (48, 46));
        assert_eq!(h.data_offset as u64 + h.data_size as u64, sif.file_len());
        assert_eq!(&h.launch[..LAUNCH_SCRIPT.len()], LAUNCH_SCRIPT.as_bytes());
        assert_eq!(h.id[6] >> 4, 4, "UUID version 4");
        // Nothing but the result is left in the directory.
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn write_image_refuses_a_non_squashfs_source_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let not = t.path().join("not.sqfs");
        std::fs::write(&not, vec![0u8; 4096]).unwrap();
        let out = t.path().join("img.sif");
        assert!(matches!(
            write_image(&out, &not, &config()),
            Err(Error::SifCorrupt { .. })
        ));
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_from_dir_reports_mksquashfs_failure_and_cleans_up() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("img.sif");
        let missing = t.path().join("missing");
        assert!(create_from_dir(&out, &missing, &config()).is_err());
        let file = t.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(create_from_dir(&out, &file, &config()).is_err());
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_from_dir_replaces_an_existing_file() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("f"), b"1").unwrap();
        let out = t.path().join("img.sif");
        std::fs::write(&out, b"old").unwrap();
        create_from_dir(&out, &root, &config()).unwrap();
        let src = open_image(&out).unwrap();
        assert_eq!(src.offset, PARTITION_OFFSET);
        assert_eq!(src.config, recorded(config(), &src));
    }

    /// `config` with the root partition's hash the writer recorded, after checking it is
    /// the SHA-256 of the partition's bytes.
    fn recorded(config: ImageConfig, src: &super::super::ImageSource) -> ImageConfig {
        let whole = std::fs::read(&src.path).unwrap();
        let part = &whole[src.offset as usize..(src.offset + src.size) as usize];
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(part));
        assert_eq!(src.config.rootfs_sha256, hash);
        ImageConfig {
            rootfs_sha256: hash,
            ..config
        }
    }

    /// An image streamed in (`create_with`, as the cache builds them) records the hash its
    /// builder kept, which `verify` checks, a changed byte in the superblock included.
    #[test]
    fn a_streamed_image_records_the_hash_its_builder_kept() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("img.sif");
        let options = crate::squash::Options::default();
        create_with(&out, &config(), |file, offset| {
            let stats =
                crate::squash::build(file, offset, &options, |_| Ok(crate::squash::Tree::new()))?;
            Ok(Built {
                len: stats.bytes,
                sha256_superblock_last: stats.sha256_superblock_last,
            })
        })
        .unwrap();
        let config = open_image(&out).unwrap().config;
        assert!(config.rootfs_sha256.is_empty(), "{config:?}");
        assert_eq!(config.rootfs_sha256_superblock_last.len(), 64);
        assert_eq!(Sif::open(&out).unwrap().verify().unwrap(), Verified::Hash);

        // The superblock's mkfs time (bytes 8..12): still a valid squashfs, but not this one.
        let file = OpenOptions::new().write(true).open(&out).unwrap();
        file.write_all_at(b"\x01\x02", PARTITION_OFFSET + 8)
            .unwrap();
        let err = Sif::open(&out).unwrap().verify().unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    /// A whole image verifies; one byte changed in its root partition (a disk error, a
    /// copy cut short and padded) does not, and the error names the image.
    #[test]
    fn verify_finds_a_damaged_root_partition() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("f"), vec![7u8; 100_000]).unwrap();
        let out = t.path().join("img.sif");
        create_from_dir(&out, &root, &config()).unwrap();
        assert_eq!(Sif::open(&out).unwrap().verify().unwrap(), Verified::Hash);

        let file = OpenOptions::new().write(true).open(&out).unwrap();
        file.write_all_at(b"X", PARTITION_OFFSET + 200).unwrap();
        let err = Sif::open(&out).unwrap().verify().unwrap_err().to_string();
        assert!(
            err.contains("img.sif") && err.contains("does not match"),
            "{err}"
        );

        // An image from before berth recorded the hash: nothing to compare with.
        let old = t.path().join("old.sif");
        write_image(&old, &squashfs_in(t.path()), &config()).unwrap();
        let bytes = std::fs::read(&old).unwrap();
        let field = b"\"RootfsSha256\"";
        let at = bytes.windows(field.len()).position(|w| w == field).unwrap();
        let mut patched = bytes.clone();
        // Renames the field, so serde sees none (the JSON stays the same length).
        patched[at + 1] = b'x';
        std::fs::write(&old, patched).unwrap();
        assert_eq!(
            Sif::open(&old).unwrap().verify().unwrap(),
            Verified::NotRecorded
        );
    }

    fn squashfs_in(dir: &Path) -> PathBuf {
        let root = dir.join("sq-root");
        std::fs::create_dir(&root).unwrap();
        let sq = dir.join("root.sqfs");
        squashfs_of(&root, &sq);
        sq
    }

    #[test]
    fn mksquashfs_is_found_in_system_directories_not_path() {
        // Root builds the cache: a `mksquashfs` early in root's PATH must not be what runs.
        let found = mksquashfs().unwrap();
        assert!(
            MKSQUASHFS.iter().any(|p| Path::new(p) == found),
            "{}",
            found.display()
        );
    }
}
