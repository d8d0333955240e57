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
    /// Largest image root builds: refused before download when the layers' compressed sizes
    /// add up to more, and while unpacking when the unpacked bytes do.
    pub max_image_size: String,
    /// Most tar entries (files, directories, links, whiteouts) one image may unpack.
    pub max_entries: u64,
    /// Longest path (bytes) a layer entry or hard-link target may have.
    pub max_path_length: usize,
    /// Most path components a layer entry or hard-link target may have.
    pub max_path_depth: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from("/var/cache/berth"),
            max_size: "20G".into(),
            max_image_size: "10G".into(),
            max_entries: 1_000_000,
            max_path_length: 4096,
            max_path_depth: 256,
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
    /// Hosts other than the registry (`host[:port]` or `*.domain`) that blob downloads may
    /// be redirected to, e.g. a registry's CDN. Empty: blobs come from the registry only.
    pub blob_hosts: Vec<crate::registry::HostPattern>,
    /// Token services on another host than their registry that may receive the registry's
    /// credentials from `auth_file` (`host[:port]` or `*.domain`). Others get anonymous
    /// token requests.
    pub token_hosts: Vec<crate::registry::HostPattern>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            certs_dir: PathBuf::from("/etc/containers/certs.d"),
            auth_file: PathBuf::from("/etc/berth/auth.json"),
            retries: 3,
            timeout_secs: 30,
            blob_hosts: Vec::new(),
            token_hosts: Vec::new(),
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
