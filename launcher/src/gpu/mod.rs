//! GPUs and fabric devices from the allocation, as edits of the container's spec.
//!
//! Discovery (`discover`, I/O through [`Node`]) turns the request — Slurm's GPU indexes
//! (`SLURM_STEP_GPUS`/`SLURM_JOB_GPUS`, passed as `berth start --gpus=LIST`) or `berth exec
//! --gpus=all|LIST` — into [`ContainerEdits`], the shape of CDI's container edits: device
//! nodes, binds, variables and loader-cache entries. [`edit::apply`] then adds them to the
//! spec purely, so `--print-spec` shows exactly what a GPU container gets.
//!
//! - Which devices: gres.conf (`gres`) maps the indexes to device files in `File=` order;
//!   with `AutoDetect=nvml` the files come from NVML (`nvml`, MIG included); with neither
//!   (a workstation), `/dev/nvidiaN` by minor.
//! - What else: a CDI spec (`cdi`) covering the devices wins; otherwise berth's discovery
//!   adds the NVIDIA control nodes, the driver's libraries, programs and sockets (`driver`),
//!   found through the host's ld.so cache (`ldcache`), or `/dev/kfd` for AMD render nodes.
//! - Fabric (`fabric` classes of `[gpu]`): every container gets the node's RDMA and
//!   GPUDirect devices the site lists, GPUs or not.
//!
//! Devices are bound from the host (rootless), never created; the device cgroup Slurm set
//! still decides which can be opened.

pub mod cdi;
mod discover;
pub mod driver;
pub mod edit;
pub mod gres;
pub mod ldcache;
mod node;
pub mod nvml;
mod settings;

use std::path::PathBuf;

pub use discover::discover;
pub use node::{HostNode, Node};
pub use settings::{AbsPath, DevPath, DriverVersion, FabricClass, LibraryName};

use crate::{Error, Result};

/// Which GPUs a container gets: `--gpus=all`, or Slurm indexes (`0,2`, `0-3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    Indexes(Vec<usize>),
}

impl Selection {
    pub fn parse(value: &str) -> Result<Selection> {
        if value == "all" {
            return Ok(Selection::All);
        }
        let bad = || Error::GpuSelection(value.to_string());
        let mut out = Vec::new();
        for part in value.split(',').filter(|p| !p.is_empty()) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let (lo, hi): (usize, usize) = (
                lo.parse().map_err(|_| bad())?,
                hi.parse().map_err(|_| bad())?,
            );
            if lo > hi || hi - lo > 4096 {
                return Err(bad());
            }
            out.extend((lo..=hi).filter(|i| !out.contains(i)).collect::<Vec<_>>());
        }
        Ok(Selection::Indexes(out))
    }
}

/// A device node: where it appears inside, the host node bound there, its type and numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    pub path: PathBuf,
    pub host: PathBuf,
    /// 'c' or 'b'.
    pub kind: char,
    pub major: u64,
    pub minor: u64,
}

/// A bind of a host file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindEdit {
    pub host: PathBuf,
    pub container: PathBuf,
    pub readonly: bool,
}

/// What the allocation adds to a container: CDI's container edits, plus loader-cache
/// entries (in place of CDI's update-ldcache hook) and a line saying where they came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerEdits {
    pub devices: Vec<DeviceNode>,
    pub binds: Vec<BindEdit>,
    pub env: Vec<(String, String)>,
    /// (soname, path inside) for the container's ld.so cache.
    pub ld_cache: Vec<(String, PathBuf)>,
    /// The driver whose libraries are bound (the image's CUDA forward-compatibility
    /// libraries win when they are newer).
    pub driver_version: Option<String>,
    /// How the edits were found, for `--print-spec` and support.
    pub source: Vec<String>,
}

#[cfg(test)]
mod tests;
