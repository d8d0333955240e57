//! The host as discovery sees it, behind a trait so discovery is unit-tested on a fake node.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::nvml;
use crate::Result;

/// The host as discovery sees it; a fake in tests.
pub trait Node {
    fn read(&self, path: &Path) -> Option<Vec<u8>>;
    /// Type ('c'/'b'), major and minor of a device node.
    fn device(&self, path: &Path) -> Option<(char, u64, u64)>;
    /// The path after symlinks.
    fn resolve(&self, path: &Path) -> Option<PathBuf>;
    fn exists(&self, path: &Path) -> bool;
    /// Names in a directory.
    fn list(&self, dir: &Path) -> Vec<String>;
    /// Whether this process may open the device (the device cgroup and file modes agree).
    fn may_open(&self, path: &Path) -> bool;
    /// The Slurm node name gres.conf's `NodeName=` lines are matched against.
    fn node_name(&self) -> String;
    fn nvml(&self) -> Result<Box<dyn nvml::Nvml>>;
}

/// The real host.
pub struct HostNode;

impl Node for HostNode {
    fn read(&self, path: &Path) -> Option<Vec<u8>> {
        std::fs::read(path).ok()
    }

    fn device(&self, path: &Path) -> Option<(char, u64, u64)> {
        let meta = std::fs::metadata(path).ok()?;
        let kind = if meta.file_type().is_char_device() {
            'c'
        } else if meta.file_type().is_block_device() {
            'b'
        } else {
            return None;
        };
        let rdev = meta.rdev();
        Some((
            kind,
            u64::from(libc::major(rdev)),
            u64::from(libc::minor(rdev)),
        ))
    }

    fn resolve(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn list(&self, dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn may_open(&self, path: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        // Only permission errors mean no: a node without a driver behind it (ENXIO) can
        // still be bound, and opens fail the same inside.
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
        {
            Ok(_) => true,
            Err(e) => !matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)),
        }
    }

    fn node_name(&self) -> String {
        crate::slurm::node_name()
    }

    fn nvml(&self) -> Result<Box<dyn nvml::Nvml>> {
        Ok(Box::new(nvml::DriverNvml::open()?))
    }
}
