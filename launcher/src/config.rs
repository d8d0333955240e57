//! The site configuration, `/etc/berth/berth.toml` (documented key by key in
//! `configs/berth.toml`). It is owned by root and is the only source of policy: nothing in a
//! user's environment or files can replace or extend it (see [`Config::load_for_caller`]).
//!
//! Each area owns its section struct; keep every field documented and defaulted so an empty
//! file is a valid, safe (deny-everything) configuration.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// Where the site configuration lives. Fixed at build time on purpose: a user-controlled
/// path would let jobs choose their own policy.
pub const DEFAULT_PATH: &str = "/etc/berth/berth.toml";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub gpu: GpuConfig,
}

/// `[policy]`: which images may run. Owned by `policy.rs`. Entries are validated while the
/// file is parsed (see the types in `policy`), so a malformed pattern is a config error that
/// names it rather than a rule that silently never matches.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Registry images that may run: `host[:port]/*`, `host[:port]/prefix/*`,
    /// `host[:port]/repo`. Empty (the default) allows no registry image.
    pub allowed: Vec<crate::policy::Pattern>,
    /// Registries (`host[:port]`) that may be reached over plain HTTP instead of HTTPS.
    pub plain_http: Vec<crate::policy::RegistryHost>,
    /// Only digest-pinned references (`...@sha256:...`) are accepted.
    pub require_digest: bool,
    /// Local SIF/squashfs files may run, and only from `local_image_dirs`.
    pub local_images: bool,
    /// Absolute, admin-owned directories local image files must lie in (after symlinks).
    pub local_image_dirs: Vec<crate::policy::AdminDir>,
    /// Every job must run in a container.
    pub require_container: bool,
    /// `[policy.partitions.NAME]`: per-partition overrides.
    pub partitions: std::collections::BTreeMap<String, PartitionPolicyConfig>,
}

/// `[policy.partitions.NAME]`: what differs for jobs in partition NAME.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionPolicyConfig {
    /// Overrides `[policy] require_container` for this partition when set.
    pub require_container: Option<bool>,
}

/// `[cache]`: the node-local image cache. Owned by `cache/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Directory on fast node-local storage, written only by root or the service identity.
    pub dir: PathBuf,
    /// Evict least-recently-used images above this total, e.g. "10G", "500M".
    pub max_size: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from("/var/cache/berth"),
            max_size: "20G".into(),
        }
    }
}

/// `[registry]`: how to reach registries (CAs, credentials, retries). Owned by `registry/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Per-registry CA files in the containers layout: `<certs_dir>/HOST[:PORT]/ca.crt`.
    pub certs_dir: PathBuf,
    /// Admin-only docker-style `config.json` (`auths`) with registry credentials.
    pub auth_file: PathBuf,
    /// Attempts per request before a registry counts as down.
    pub retries: u32,
    /// Seconds without progress before a request is abandoned.
    pub timeout_secs: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            certs_dir: PathBuf::from("/etc/containers/certs.d"),
            auth_file: PathBuf::from("/etc/berth/auth.json"),
            retries: 3,
            timeout_secs: 30,
        }
    }
}

/// `[runtime]`: how containers are assembled on this node. Owned by `container/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Root-owned directory (tmpfs) under which containers mount their private scratch
    /// space; berth falls back to a private directory under $TMPDIR when it is missing.
    pub dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            dir: PathBuf::from("/run/berth"),
        }
    }
}

/// `[gpu]`: binding the allocation's GPUs and the node's fabric devices. Owned by `gpu/`.
/// Entries are checked while the file is parsed, so a bad value names its key and the
/// allowed values.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Bind the GPUs Slurm allocated (or `--gpus` names) into containers.
    pub enabled: bool,
    /// slurmd's gres.conf, which maps Slurm's GPU indexes to device files.
    pub gres_conf: PathBuf,
    /// Directories of CDI specs; a spec that covers the allocated devices is used instead of
    /// berth's own discovery. Empty: never use CDI.
    pub cdi_dirs: Vec<crate::gpu::AbsPath>,
    /// More driver libraries to bind with the GPUs, by name as the ld.so cache lists them
    /// without the version (`libnvidia-fbc.so`).
    pub extra_libraries: Vec<crate::gpu::LibraryName>,
    /// The driver version whose libraries are bound ("550.54.15"); empty: the running
    /// driver's (/proc/driver/nvidia/version), else the version of the host's
    /// libnvidia-ml.so.1.
    pub driver_version: crate::gpu::DriverVersion,
    /// Fabric device classes every container gets when the node has them.
    pub fabric: Vec<crate::gpu::FabricClass>,
    /// More device files every container gets when present (absolute, under /dev).
    pub fabric_devices: Vec<crate::gpu::DevPath>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        use crate::gpu::FabricClass;
        GpuConfig {
            enabled: true,
            gres_conf: PathBuf::from("/etc/slurm/gres.conf"),
            cdi_dirs: ["/etc/cdi", "/var/run/cdi"]
                .iter()
                .map(|d| crate::gpu::AbsPath(d.into()))
                .collect(),
            extra_libraries: Vec::new(),
            driver_version: crate::gpu::DriverVersion::default(),
            fabric: vec![
                FabricClass::Uverbs,
                FabricClass::RdmaCm,
                FabricClass::Gdrdrv,
            ],
            fabric_devices: Vec::new(),
        }
    }
}

impl Config {
    /// Parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading berth configuration {}", path.display()), e))?;
        Config::from_toml(path, &text)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("{e}(fix the file; `configs/berth.toml` documents every key)"),
        })
    }

    /// Loads the configuration the way every `berth` command does. `explicit` (the
    /// `--config` flag) is honoured only for root, so that tests and admins can point at
    /// another file while users cannot bring their own policy. A missing default file means
    /// the built-in defaults, which allow no image.
    pub fn load_for_caller(explicit: Option<&Path>) -> Result<Config> {
        match explicit {
            Some(path) => {
                if berth_sys::identity::real_uid() != 0 {
                    return Err(Error::Config {
                        path: path.to_path_buf(),
                        message: "--config is only for root; berth always uses the site's \
                                  /etc/berth/berth.toml for other users"
                            .into(),
                    });
                }
                Config::from_file(path)
            }
            None => {
                let path = PathBuf::from(DEFAULT_PATH);
                if path.exists() {
                    Config::from_file(&path)
                } else {
                    Ok(Config::default())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_valid() {
        Config::from_toml(Path::new("x.toml"), "").unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_with_the_path() {
        let err = Config::from_toml(Path::new("/etc/berth/berth.toml"), "[nope]\na = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/berth/berth.toml"), "{err}");
    }
}
