//! What NVML (NVIDIA's management library) knows about the node's GPUs, behind a trait so
//! `AutoDetect=nvml` and MIG are unit-tested without a GPU. The real implementation uses
//! `nvml-wrapper`, which dlopens `libnvidia-ml.so.1` at run time: berth has no link-time
//! dependency on a driver and works unchanged on nodes without one.
//!
//! MIG instances are read from the driver's capability files
//! (`/proc/driver/nvidia/capabilities/gpuN/mig/giG[/ciC]/access`, each naming the minor of
//! its `/dev/nvidia-caps/nvidia-capM` node), as libnvidia-container does: those files are
//! what a process needs to open, and NVML's safe API does not enumerate MIG devices.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The driver's capability tree.
pub const CAPS_DIR: &str = "/proc/driver/nvidia/capabilities";

/// One physical GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlGpu {
    /// N of `/dev/nvidiaN`.
    pub minor: u32,
    pub uuid: String,
    /// Its MIG instances when MIG mode is on (then these, not the GPU, are allocated).
    pub mig: Vec<MigDevice>,
}

/// One MIG compute instance and the capability nodes that open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDevice {
    pub gpu_instance: u32,
    pub compute_instance: u32,
    /// M of `/dev/nvidia-caps/nvidia-capM` for the GPU instance, then the compute instance.
    pub cap_minors: [u32; 2],
}

impl NvmlGpu {
    /// The allocatable units of this GPU and the device files each needs.
    pub fn units(&self) -> Vec<Vec<PathBuf>> {
        let gpu = PathBuf::from(format!("/dev/nvidia{}", self.minor));
        if self.mig.is_empty() {
            return vec![vec![gpu]];
        }
        self.mig
            .iter()
            .map(|m| {
                let mut files = vec![gpu.clone()];
                files.extend(
                    m.cap_minors
                        .iter()
                        .map(|c| PathBuf::from(format!("/dev/nvidia-caps/nvidia-cap{c}"))),
                );
                files
            })
            .collect()
    }
}

pub trait Nvml {
    /// The GPUs in NVML's index order (slurmd's order for `AutoDetect=nvml`).
    fn gpus(&self) -> Result<Vec<NvmlGpu>>;
}

/// NVML through the driver's library.
pub struct DriverNvml {
    nvml: nvml_wrapper::Nvml,
}

impl DriverNvml {
    pub fn open() -> Result<DriverNvml> {
        nvml_wrapper::Nvml::init()
            .map(|nvml| DriverNvml { nvml })
            .map_err(|e| Error::Nvml(e.to_string()))
    }
}

impl Nvml for DriverNvml {
    fn gpus(&self) -> Result<Vec<NvmlGpu>> {
        let err = |e: nvml_wrapper::error::NvmlError| Error::Nvml(e.to_string());
        let count = self.nvml.device_count().map_err(err)?;
        (0..count)
            .map(|i| {
                let d = self.nvml.device_by_index(i).map_err(err)?;
                let minor = d.minor_number().map_err(err)?;
                // Not every GPU supports MIG; those that do not report NotSupported.
                let mig_on = d.mig_mode().map(|m| m.current == 1).unwrap_or(false);
                Ok(NvmlGpu {
                    minor,
                    uuid: d.uuid().map_err(err)?,
                    mig: if mig_on {
                        mig_layout(Path::new(CAPS_DIR), minor)?
                    } else {
                        Vec::new()
                    },
                })
            })
            .collect()
    }
}

/// The MIG instances of GPU `minor` under `caps` (the capability tree), ordered by GPU
/// instance then compute instance.
pub fn mig_layout(caps: &Path, minor: u32) -> Result<Vec<MigDevice>> {
    let mig = caps.join(format!("gpu{minor}/mig"));
    let mut out = Vec::new();
    for (gi, gi_dir) in numbered(&mig, "gi")? {
        let gi_cap = access_minor(&gi_dir.join("access"))?;
        for (ci, ci_dir) in numbered(&gi_dir, "ci")? {
            out.push(MigDevice {
                gpu_instance: gi,
                compute_instance: ci,
                cap_minors: [gi_cap, access_minor(&ci_dir.join("access"))?],
            });
        }
    }
    Ok(out)
}

/// Subdirectories `PREFIX<N>` of `dir`, by N.
fn numbered(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    };
    let mut out: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The `DeviceFileMinor:` of a capability's access file.
fn access_minor(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading MIG capability {}", path.display()), e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("DeviceFileMinor:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Nvml(format!("{}: no DeviceFileMinor line", path.display())))
}

/// A fake NVML for tests: fixed GPUs.
#[cfg(test)]
pub struct FakeNvml(pub Vec<NvmlGpu>);

#[cfg(test)]
impl Nvml for FakeNvml {
    fn gpus(&self) -> Result<Vec<NvmlGpu>> {
        Ok(self.0.clone())
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A MIG layout as the driver shows it: GPU 0 with GPU instances 1 (compute instances 0
    /// and 1) and 2 (compute instance 0).
    pub fn write_mig_tree(caps: &Path) {
        for (dir, minor) in [
            ("gpu0/mig/gi1", 12),
            ("gpu0/mig/gi1/ci0", 13),
            ("gpu0/mig/gi1/ci1", 14),
            ("gpu0/mig/gi2", 21),
            ("gpu0/mig/gi2/ci0", 22),
        ] {
            let d = caps.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("access"),
                format!("DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n"),
            )
            .unwrap();
        }
    }

    #[test]
    fn mig_layout_comes_from_the_capability_files() {
        let caps = tempfile::tempdir().unwrap();
        write_mig_tree(caps.path());
        let layout = mig_layout(caps.path(), 0).unwrap();
        assert_eq!(
            layout
                .iter()
                .map(|m| (m.gpu_instance, m.compute_instance, m.cap_minors))
                .collect::<Vec<_>>(),
            [(1, 0, [12, 13]), (1, 1, [12, 14]), (2, 0, [21, 22])]
        );
        assert!(mig_layout(caps.path(), 1).unwrap().is_empty());
        let gpu = NvmlGpu {
            minor: 0,
            uuid: "GPU-0".into(),
            mig: layout,
        };
        assert_eq!(
            gpu.units()[1],
            [
                PathBuf::from("/dev/nvidia0"),
                "/dev/nvidia-caps/nvidia-cap12".into(),
                "/dev/nvidia-caps/nvidia-cap14".into()
            ]
        );
    }

    #[test]
    fn a_broken_access_file_is_an_error() {
        let caps = tempfile::tempdir().unwrap();
        let d = caps.path().join("gpu0/mig/gi1");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("access"), "garbage\n").unwrap();
        assert!(mig_layout(caps.path(), 0).is_err());
    }
}
