//! The values of `[gpu]` in berth.toml, each checked while the file is parsed so that a bad
//! one is refused with its key and what is allowed.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::driver;

/// An absolute path (`[gpu] cdi_dirs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AbsPath(pub PathBuf);

impl TryFrom<String> for AbsPath {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        if Path::new(&s).is_absolute() {
            Ok(AbsPath(s.into()))
        } else {
            Err(format!(
                "[gpu] cdi_dirs entry {s:?} must be an absolute directory"
            ))
        }
    }
}

/// A library name as ld.so caches list it, without version (`[gpu] extra_libraries`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct LibraryName(pub String);

impl TryFrom<String> for LibraryName {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        if s.starts_with("lib") && s.ends_with(".so") && !s.contains('/') {
            Ok(LibraryName(s))
        } else {
            Err(format!(
                "[gpu] extra_libraries entry {s:?}: give a library name as the ld.so cache \
                 lists it, without version and directory, like \"libnvidia-fbc.so\""
            ))
        }
    }
}

/// `[gpu] driver_version`: "" (detect) or N.N[.N].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DriverVersion(pub Option<String>);

impl TryFrom<String> for DriverVersion {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        if s.is_empty() {
            Ok(DriverVersion(None))
        } else if driver::is_version(&s) {
            Ok(DriverVersion(Some(s)))
        } else {
            Err(format!(
                "[gpu] driver_version {s:?}: use the driver's version like \"550.54.15\", or \
                 \"\" to detect it"
            ))
        }
    }
}

/// `[gpu] fabric` classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FabricClass {
    /// `/dev/infiniband/uverbs*`: RDMA verbs (NCCL, UCX, MPI over InfiniBand/RoCE).
    Uverbs,
    /// `/dev/infiniband/rdma_cm`: RDMA connection manager.
    RdmaCm,
    /// `/dev/infiniband/umad*` and `issm*`: management datagrams (subnet tools).
    Umad,
    /// `/dev/gdrdrv`: GDRCopy (GPUDirect RDMA copies).
    Gdrdrv,
}

impl FabricClass {
    /// The directory and file-name prefixes of the class's nodes.
    pub(super) fn nodes(self) -> (&'static str, &'static [&'static str]) {
        match self {
            FabricClass::Uverbs => ("/dev/infiniband", &["uverbs"]),
            FabricClass::RdmaCm => ("/dev/infiniband", &["rdma_cm"]),
            FabricClass::Umad => ("/dev/infiniband", &["umad", "issm"]),
            FabricClass::Gdrdrv => ("/dev", &["gdrdrv"]),
        }
    }
}

/// `[gpu] fabric_devices` entries: absolute paths under /dev.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DevPath(pub PathBuf);

impl TryFrom<String> for DevPath {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        let p = Path::new(&s);
        if p.starts_with("/dev")
            && p != Path::new("/dev")
            && !p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            Ok(DevPath(p.into()))
        } else {
            Err(format!(
                "[gpu] fabric_devices entry {s:?} must be a device file under /dev, like \
                 \"/dev/infiniband/uverbs0\""
            ))
        }
    }
}
