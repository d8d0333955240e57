//! The SIF on-disk format (Singularity Image Format, version "01"), as Apptainer's reference
//! implementation (github.com/apptainer/sif) writes it. Everything is little-endian and packed
//! (no alignment padding between fields):
//!
//! ```text
//! global header, 128 bytes at offset 0
//!   0  launch script   [32]  "#!/usr/bin/env run-singularity\n", NUL padded
//!  32  magic           [10]  "SIF_MAGIC\0"
//!  42  version         [3]   "01\0"
//!  45  arch            [3]   "02\0" = amd64 (see ARCHES)
//!  48  uuid            [16]
//!  64  created, modified             i64 unix seconds
//!  80  descriptors free, total       i64
//!  96  descriptors offset, size      i64 (bytes)
//! 112  data offset, size             i64 (bytes)
//! descriptor, 585 bytes each, `total` of them from `descriptors offset` (4096)
//!   0  data type i32   4  used u8   5  id u32   9  group id u32   13  link u32
//!  17  offset i64   25  size i64   33  size with padding i64
//!  41  created i64  49  modified i64  57  uid i64  65  gid i64 (legacy)
//!  73  name [128]   201 extra [384] (partitions: fstype i32, parttype i32, arch [3])
//! ```
//!
//! Unused descriptors are kept (zeroed) so the table has room for objects Apptainer's tools
//! add later (signatures), exactly as the reference implementation does.

use std::borrow::Cow;

pub const HEADER_LEN: usize = 128;
pub const DESCRIPTOR_LEN: usize = 585;
pub const LAUNCH_LEN: usize = 32;
pub const NAME_LEN: usize = 128;
pub const EXTRA_LEN: usize = 384;
/// The magic at byte 32; the trailing NUL is part of the 10-byte field.
pub const MAGIC: &[u8; 10] = b"SIF_MAGIC\0";
/// The only SIF specification version that exists; Apptainer refuses others too.
pub const VERSION: &[u8; 3] = b"01\0";
/// What Apptainer writes as the launch script, so `./image.sif` behaves as users expect
/// wherever Apptainer is installed.
pub const LAUNCH_SCRIPT: &str = "#!/usr/bin/env run-singularity\n";
/// Where the descriptor table starts and how many slots it has, as Apptainer writes them, so
/// `apptainer sign` can add its signature descriptors to files berth writes.
pub const DESCRIPTORS_OFFSET: u64 = 4096;
pub const DESCRIPTOR_SLOTS: u64 = 48;
/// Group ids carry this mask on disk; "no group" is the mask alone.
pub const GROUP_MASK: u32 = 0xf000_0000;
/// The first (and, for berth, only) object group.
pub const DEFAULT_GROUP: u32 = GROUP_MASK | 1;
/// Partitions start on a page boundary (Apptainer aligns them to 4096 as well), so
/// squashfuse's reads at `offset=N` line up with page-cache pages.
pub const PARTITION_ALIGN: u64 = 4096;
/// The squashfs superblock magic, "hsqs" on disk.
pub const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";

/// SIF data object types (Apptainer's `DataType`, 0x4001 onwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Deffile,
    EnvVar,
    Labels,
    Partition,
    Signature,
    GenericJson,
    Generic,
    CryptoMessage,
    Sbom,
    OciRootIndex,
    OciBlob,
    /// A type a later SIF writer added; kept so the file still reads and round-trips.
    Unknown(i32),
}

const DATA_TYPES: [(i32, DataType, &str); 11] = [
    (0x4001, DataType::Deffile, "Def.FILE"),
    (0x4002, DataType::EnvVar, "Env.Vars"),
    (0x4003, DataType::Labels, "JSON.Labels"),
    (0x4004, DataType::Partition, "FS"),
    (0x4005, DataType::Signature, "Signature"),
    (0x4006, DataType::GenericJson, "JSON.Generic"),
    (0x4007, DataType::Generic, "Generic/Raw"),
    (0x4008, DataType::CryptoMessage, "Cryptographic Message"),
    (0x4009, DataType::Sbom, "SBOM"),
    (0x400a, DataType::OciRootIndex, "OCI.RootIndex"),
    (0x400b, DataType::OciBlob, "OCI.Blob"),
];

impl DataType {
    pub fn from_raw(raw: i32) -> Self {
        DATA_TYPES
            .iter()
            .find(|(r, _, _)| *r == raw)
            .map_or(DataType::Unknown(raw), |(_, t, _)| *t)
    }

    pub fn raw(self) -> i32 {
        match self {
            DataType::Unknown(raw) => raw,
            known => DATA_TYPES.iter().find(|(_, t, _)| *t == known).unwrap().0,
        }
    }

    /// The name Apptainer's `sif list` prints for the type.
    pub fn name(self) -> Cow<'static, str> {
        match DATA_TYPES.iter().find(|(_, t, _)| *t == self) {
            Some((_, _, name)) => Cow::Borrowed(name),
            None => Cow::Owned(format!("Unknown({:#x})", self.raw())),
        }
    }
}

/// File system types of partition objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Squash,
    Ext3,
    ImmuObj,
    Raw,
    EncryptedSquash,
    Unknown(i32),
}

const FS_TYPES: [(i32, FsType, &str); 5] = [
    (1, FsType::Squash, "Squashfs"),
    (2, FsType::Ext3, "Ext3"),
    (3, FsType::ImmuObj, "Archive"),
    (4, FsType::Raw, "Raw"),
    (5, FsType::EncryptedSquash, "Encrypted squashfs"),
];

impl FsType {
    pub fn from_raw(raw: i32) -> Self {
        FS_TYPES
            .iter()
            .find(|(r, _, _)| *r == raw)
            .map_or(FsType::Unknown(raw), |(_, t, _)| *t)
    }

    pub fn raw(self) -> i32 {
        match self {
            FsType::Unknown(raw) => raw,
            known => FS_TYPES.iter().find(|(_, t, _)| *t == known).unwrap().0,
        }
    }

    pub fn name(self) -> Cow<'static, str> {
        match FS_TYPES.iter().find(|(_, t, _)| *t == self) {
            Some((_, _, name)) => Cow::Borrowed(name),
            None => Cow::Owned(format!("Unknown({})", self.raw())),
        }
    }
}

/// Partition roles. `PrimSys` is the container's root file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartType {
    System,
    PrimSys,
    Data,
    Overlay,
    Unknown(i32),
}

const PART_TYPES: [(i32, PartType, &str); 4] = [
    (1, PartType::System, "System"),
    (2, PartType::PrimSys, "PrimSys"),
    (3, PartType::Data, "Data"),
    (4, PartType::Overlay, "Overlay"),
];

impl PartType {
    pub fn from_raw(raw: i32) -> Self {
        PART_TYPES
            .iter()
            .find(|(r, _, _)| *r == raw)
            .map_or(PartType::Unknown(raw), |(_, t, _)| *t)
    }

    pub fn raw(self) -> i32 {
        match self {
            PartType::Unknown(raw) => raw,
            known => PART_TYPES.iter().find(|(_, t, _)| *t == known).unwrap().0,
        }
    }

    pub fn name(self) -> Cow<'static, str> {
        match PART_TYPES.iter().find(|(_, t, _)| *t == self) {
            Some((_, _, name)) => Cow::Borrowed(name),
            None => Cow::Owned(format!("Unknown({})", self.raw())),
        }
    }
}

/// SIF architecture codes (two ASCII digits) and the Go names Apptainer prints for them.
const ARCHES: [(&[u8; 2], &str); 12] = [
    (b"00", "unknown"),
    (b"01", "386"),
    (b"02", "amd64"),
    (b"03", "arm"),
    (b"04", "arm64"),
    (b"05", "ppc64"),
    (b"06", "ppc64le"),
    (b"07", "mips"),
    (b"08", "mipsle"),
    (b"09", "mips64"),
    (b"10", "mips64le"),
    (b"11", "s390x"),
];

/// The name of a 3-byte arch field ("02\0" -> "amd64").
pub fn arch_name(code: &[u8; 3]) -> Cow<'static, str> {
    match ARCHES.iter().find(|(c, _)| c[..] == code[..2]) {
        Some((_, name)) => Cow::Borrowed(name),
        None => Cow::Owned(format!("unknown({})", trim_nul(code))),
    }
}

/// The arch field for the machine berth runs on: images berth writes are built from this
/// machine's files.
pub fn host_arch() -> [u8; 3] {
    let go_name = match std::env::consts::ARCH {
        "x86" => "386",
        "x86_64" => "amd64",
        "arm" => "arm",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "mips" if cfg!(target_endian = "little") => "mipsle",
        "mips" => "mips",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        "mips64" => "mips64",
        "s390x" => "s390x",
        _ => "unknown",
    };
    let code = ARCHES.iter().find(|(_, n)| *n == go_name).unwrap().0;
    [code[0], code[1], 0]
}

/// A fixed-size NUL-padded text field as text (lossy: it is only ever displayed).
pub fn trim_nul(field: &[u8]) -> Cow<'_, str> {
    let end = field.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&field[..end])
}

/// Why a header or descriptor could not be decoded; the reader adds the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    BadMagic,
    BadVersion(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub launch: [u8; LAUNCH_LEN],
    pub arch: [u8; 3],
    pub id: [u8; 16],
    pub created: i64,
    pub modified: i64,
    pub descriptors_free: i64,
    pub descriptors_total: i64,
    pub descriptors_offset: i64,
    pub descriptors_size: i64,
    pub data_offset: i64,
    pub data_size: i64,
}

impl Header {
    /// Decodes the first 128 bytes of a file. Magic and version are checked here; offsets
    /// and sizes are checked by the reader, which knows the file's length.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, FormatError> {
        if &b[32..42] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if &b[42..45] != VERSION {
            return Err(FormatError::BadVersion(trim_nul(&b[42..45]).into_owned()));
        }
        let i = |at: usize| i64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        Ok(Header {
            launch: b[0..32].try_into().unwrap(),
            arch: b[45..48].try_into().unwrap(),
            id: b[48..64].try_into().unwrap(),
            created: i(64),
            modified: i(72),
            descriptors_free: i(80),
            descriptors_total: i(88),
            descriptors_offset: i(96),
            descriptors_size: i(104),
            data_offset: i(112),
            data_size: i(120),
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..32].copy_from_slice(&self.launch);
        b[32..42].copy_from_slice(MAGIC);
        b[42..45].copy_from_slice(VERSION);
        b[45..48].copy_from_slice(&self.arch);
        b[48..64].copy_from_slice(&self.id);
        let fields = [
            self.created,
            self.modified,
            self.descriptors_free,
            self.descriptors_total,
            self.descriptors_offset,
            self.descriptors_size,
            self.data_offset,
            self.data_size,
        ];
        for (n, v) in fields.iter().enumerate() {
            b[64 + 8 * n..72 + 8 * n].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The UUID in its usual 8-4-4-4-12 text form.
    pub fn uuid(&self) -> String {
        let h = hex::encode(self.id);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// Partition metadata kept in a partition descriptor's `extra` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub fs: FsType,
    pub part: PartType,
    pub arch: [u8; 3],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub data_type: DataType,
    pub used: bool,
    pub id: u32,
    /// As on disk, with GROUP_MASK set; see `group()`.
    pub group_id: u32,
    pub link: u32,
    pub offset: i64,
    pub size: i64,
    pub size_with_padding: i64,
    pub created: i64,
    pub modified: i64,
    pub uid: i64,
    pub gid: i64,
    pub name: [u8; NAME_LEN],
    pub extra: [u8; EXTRA_LEN],
}

impl Descriptor {
    pub fn parse(b: &[u8; DESCRIPTOR_LEN]) -> Descriptor {
        let u = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let i = |at: usize| i64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        Descriptor {
            data_type: DataType::from_raw(i32::from_le_bytes(b[0..4].try_into().unwrap())),
            // Go's encoding/binary reads any non-zero byte as true; so do we.
            used: b[4] != 0,
            id: u(5),
            group_id: u(9),
            link: u(13),
            offset: i(17),
            size: i(25),
            size_with_padding: i(33),
            created: i(41),
            modified: i(49),
            uid: i(57),
            gid: i(65),
            name: b[73..201].try_into().unwrap(),
            extra: b[201..585].try_into().unwrap(),
        }
    }

    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0..4].copy_from_slice(&self.data_type.raw().to_le_bytes());
        b[4] = u8::from(self.used);
        b[5..9].copy_from_slice(&self.id.to_le_bytes());
        b[9..13].copy_from_slice(&self.group_id.to_le_bytes());
        b[13..17].copy_from_slice(&self.link.to_le_bytes());
        let fields = [
            self.offset,
            self.size,
            self.size_with_padding,
            self.created,
            self.modified,
            self.uid,
            self.gid,
        ];
        for (n, v) in fields.iter().enumerate() {
            b[17 + 8 * n..25 + 8 * n].copy_from_slice(&v.to_le_bytes());
        }
        b[73..201].copy_from_slice(&self.name);
        b[201..585].copy_from_slice(&self.extra);
        b
    }

    /// A used descriptor with everything else zero, to be filled in by the writer.
    pub fn new(data_type: DataType, id: u32, name: &str) -> Descriptor {
        let mut n = [0u8; NAME_LEN];
        assert!(name.len() <= NAME_LEN, "descriptor name {name:?} too long");
        n[..name.len()].copy_from_slice(name.as_bytes());
        Descriptor {
            data_type,
            used: true,
            id,
            group_id: DEFAULT_GROUP,
            link: 0,
            offset: 0,
            size: 0,
            size_with_padding: 0,
            created: 0,
            modified: 0,
            uid: 0,
            gid: 0,
            name: n,
            extra: [0; EXTRA_LEN],
        }
    }

    pub fn name(&self) -> Cow<'_, str> {
        trim_nul(&self.name)
    }

    /// The object group, 0 for none (the on-disk mask removed, as Apptainer shows it).
    pub fn group(&self) -> u32 {
        self.group_id & !GROUP_MASK
    }

    /// Partition metadata, for partition objects only.
    pub fn partition(&self) -> Option<Partition> {
        if self.data_type != DataType::Partition {
            return None;
        }
        let x = &self.extra;
        Some(Partition {
            fs: FsType::from_raw(i32::from_le_bytes(x[0..4].try_into().unwrap())),
            part: PartType::from_raw(i32::from_le_bytes(x[4..8].try_into().unwrap())),
            arch: x[8..11].try_into().unwrap(),
        })
    }

    pub fn set_partition(&mut self, p: Partition) {
        self.extra = [0; EXTRA_LEN];
        self.extra[0..4].copy_from_slice(&p.fs.raw().to_le_bytes());
        self.extra[4..8].copy_from_slice(&p.part.raw().to_le_bytes());
        self.extra[8..11].copy_from_slice(&p.arch);
    }
}

/// The fields of a squashfs superblock berth checks before handing a file to squashfuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SquashfsSuper {
    pub major: u16,
    pub minor: u16,
    pub compression: u16,
    /// Bytes of the file system proper (the file may be padded past it).
    pub bytes_used: u64,
}

/// The superblock is 96 bytes; these are the fields berth reads.
pub const SQUASHFS_SUPER_LEN: usize = 96;

impl SquashfsSuper {
    /// None when the bytes do not start with the squashfs magic.
    pub fn parse(b: &[u8; SQUASHFS_SUPER_LEN]) -> Option<SquashfsSuper> {
        if &b[0..4] != SQUASHFS_MAGIC {
            return None;
        }
        let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap());
        Some(SquashfsSuper {
            compression: u16_at(20),
            major: u16_at(28),
            minor: u16_at(30),
            bytes_used: u64::from_le_bytes(b[40..48].try_into().unwrap()),
        })
    }

    pub fn compression_name(&self) -> Cow<'static, str> {
        match self.compression {
            1 => "gzip".into(),
            2 => "lzma".into(),
            3 => "lzo".into(),
            4 => "xz".into(),
            5 => "lz4".into(),
            6 => "zstd".into(),
            n => format!("unknown({n})").into(),
        }
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC). Apptainer writes Go's zero time
/// (year 1) into files made deterministic, so negative values must work.
pub fn format_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (H. Hinnant), valid for the whole proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> Header {
        let mut launch = [0u8; LAUNCH_LEN];
        launch[..LAUNCH_SCRIPT.len()].copy_from_slice(LAUNCH_SCRIPT.as_bytes());
        Header {
            launch,
            arch: *b"02\0",
            id: *b"0123456789abcdef",
            created: 1_700_000_000,
            modified: -62_135_596_800,
            descriptors_free: 46,
            descriptors_total: 48,
            descriptors_offset: 4096,
            descriptors_size: 48 * 585,
            data_offset: 32176,
            data_size: 12345,
        }
    }

    #[test]
    fn header_round_trips_and_lays_out_fields_like_apptainer() {
        let h = sample_header();
        let b = h.to_bytes();
        assert_eq!(&b[32..45], b"SIF_MAGIC\x0001\x00");
        assert_eq!(&b[88..96], &48i64.to_le_bytes());
        assert_eq!(&b[112..120], &32176i64.to_le_bytes());
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert_eq!(h.uuid(), "30313233-3435-3637-3839-616263646566");
    }

    #[test]
    fn header_refuses_bad_magic_and_version() {
        let mut b = sample_header().to_bytes();
        b[34] = b'X';
        assert_eq!(Header::parse(&b), Err(FormatError::BadMagic));
        let mut b = sample_header().to_bytes();
        b[42..45].copy_from_slice(b"02\0");
        assert_eq!(Header::parse(&b), Err(FormatError::BadVersion("02".into())));
    }

    #[test]
    fn descriptor_round_trips_with_partition_metadata() {
        let mut d = Descriptor::new(DataType::Partition, 7, "rootfs");
        d.link = GROUP_MASK | 2;
        d.offset = 32768;
        d.size = 4096;
        d.size_with_padding = 4688;
        d.created = 5;
        d.modified = -6;
        d.set_partition(Partition {
            fs: FsType::Squash,
            part: PartType::PrimSys,
            arch: *b"02\0",
        });
        let b = d.to_bytes();
        assert_eq!(&b[0..4], &0x4004i32.to_le_bytes());
        assert_eq!(&b[17..25], &32768i64.to_le_bytes());
        assert_eq!(&b[201..209], &[1, 0, 0, 0, 2, 0, 0, 0]);
        let back = Descriptor::parse(&b);
        assert_eq!(back, d);
        assert_eq!(back.name(), "rootfs");
        assert_eq!(back.group(), 1);
        let p = back.partition().unwrap();
        assert_eq!((p.fs, p.part), (FsType::Squash, PartType::PrimSys));
        assert_eq!(arch_name(&p.arch), "amd64");
    }

    #[test]
    fn unknown_codes_survive_a_round_trip() {
        let mut d = Descriptor::new(DataType::Unknown(0x4999), 1, "");
        d.set_partition(Partition {
            fs: FsType::Unknown(9),
            part: PartType::Unknown(8),
            arch: *b"99\0",
        });
        let back = Descriptor::parse(&d.to_bytes());
        assert_eq!(back.data_type, DataType::Unknown(0x4999));
        assert_eq!(back.data_type.name(), "Unknown(0x4999)");
        assert!(
            back.partition().is_none(),
            "only partitions have partition metadata"
        );
        assert_eq!(arch_name(b"99\0"), "unknown(99)");
        for raw in 0x4001..=0x400b {
            assert_eq!(DataType::from_raw(raw).raw(), raw);
            assert!(!matches!(DataType::from_raw(raw), DataType::Unknown(_)));
        }
    }

    #[test]
    fn squashfs_superblock_fields() {
        let mut b = [0u8; SQUASHFS_SUPER_LEN];
        assert!(SquashfsSuper::parse(&b).is_none());
        b[0..4].copy_from_slice(b"hsqs");
        b[20] = 6;
        b[28] = 4;
        b[40..48].copy_from_slice(&1234u64.to_le_bytes());
        let s = SquashfsSuper::parse(&b).unwrap();
        assert_eq!((s.major, s.bytes_used), (4, 1234));
        assert_eq!(s.compression_name(), "zstd");
    }

    #[test]
    fn times_format_including_go_zero_time() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_590_175_859), "2020-05-22T19:30:59Z");
        assert_eq!(format_time(-62_135_596_800), "0001-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn host_arch_is_known_here() {
        assert_ne!(arch_name(&host_arch()), "unknown");
    }
}
