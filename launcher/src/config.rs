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

/// The exit status of every `berth` command that stopped because the site configuration is
/// unreadable or invalid: sysexits' EX_CONFIG. The SPANK plugin tells it apart from other
/// failures and refuses the job with "node misconfigured" instead of blaming the image.
pub const EXIT_MISCONFIGURED: i32 = 78;

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
    /// `[audit]`: where the node's decisions are recorded (see `audit`).
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
    /// `[metrics]`: the Prometheus textfile (see `metrics`).
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
    /// `[site]`: binds and variables every container gets, limits on users' binds.
    #[serde(default)]
    pub site: crate::site::SiteConfig,
    #[serde(default)]
    pub gpu: GpuConfig,
    /// `[stage]`: node-local copies of users' data (see `stage`).
    #[serde(default)]
    pub stage: StageConfig,
    /// `[store]`: the shared image store (see `cache::store`).
    #[serde(default)]
    pub store: StoreConfig,
    /// `[security]`: what containers run under besides berth's own defaults.
    #[serde(default)]
    pub security: SecurityConfig,
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
    /// Who writes the cache: "root", or a service user (the package creates `berth`) that
    /// root's fetches become before they touch a registry or an image's bytes.
    pub owner: String,
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
    /// Most file data one image build holds in memory (blocks being compressed or waiting
    /// to be written), e.g. "64M"; the directory tree comes on top (bounded by max_entries).
    pub build_memory: String,
    /// The cgroup (relative to the hierarchy's root) root's image builds move into before
    /// downloading, so a build never counts against a job's memory limit; "" keeps them in
    /// the job's cgroups.
    pub build_cgroup: crate::cache::BuildCgroup,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from("/var/cache/berth"),
            owner: "root".into(),
            max_size: "20G".into(),
            max_image_size: "10G".into(),
            max_entries: 1_000_000,
            max_path_length: 4096,
            max_path_depth: 256,
            build_memory: "64M".into(),
            build_cgroup: crate::cache::BuildCgroup::default(),
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
    /// The HTTP proxy every registry request goes through (see [`ProxyUrl`]); unset: the
    /// caller's HTTPS_PROXY/HTTP_PROXY/NO_PROXY environment, which on a node is empty.
    pub proxy: Option<ProxyUrl>,
    /// Registry hosts reached directly although `proxy` is set (see [`NoProxyHost`]).
    pub no_proxy: Vec<NoProxyHost>,
    /// Layers of one image downloaded at the same time.
    pub parallel_downloads: usize,
    /// The longest a registry's `Retry-After` (429, 503) is waited for, in seconds.
    pub max_retry_wait_secs: u64,
    /// `[[registry.mirrors]]`: other hosts that serve a registry's images.
    pub mirrors: Vec<crate::registry::MirrorRule>,
    /// berth running as an ordinary user (the digest lookup at submission) may use that
    /// user's own registry credentials (podman/docker login files). Never used as root.
    pub user_credentials: bool,
    /// The controller pins tags the submitting user cannot resolve: slurm.conf runs `berth
    /// pin-job` as PrologSlurmctld (see `jobpin`).
    pub controller_pin: bool,
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
            proxy: None,
            no_proxy: Vec::new(),
            parallel_downloads: 4,
            max_retry_wait_secs: 60,
            mirrors: Vec::new(),
            user_credentials: false,
            controller_pin: false,
        }
    }
}

/// `[registry] proxy`: an `http://` or `https://` proxy URL with a host (and usually a port,
/// `user:password@` if the proxy wants it), checked when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl(String);

impl<'de> Deserialize<'de> for ProxyUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let url = String::deserialize(d)?;
        let fail = |why: &str| {
            serde::de::Error::custom(format!(
                "[registry] proxy `{url}`: {why}; write it as http://HOST:PORT (e.g. \
                 \"http://proxy.example.org:3128\")"
            ))
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(fail("berth speaks only to http:// and https:// proxies"));
        }
        let proxy = ureq::Proxy::new(&url).map_err(|e| fail(&e.to_string()))?;
        if proxy.host().is_empty() {
            return Err(fail("it names no host"));
        }
        Ok(ProxyUrl(url))
    }
}

/// A `[registry] no_proxy` entry, matched against the registry's host (not its port):
/// `host` exactly, `.domain` or `*.domain` for every host below domain, `*` for all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoProxyHost(String);

impl<'de> Deserialize<'de> for NoProxyHost {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let entry = String::deserialize(d)?;
        let host = entry.trim_start_matches("*.").trim_start_matches('.');
        let valid_host = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if entry == "*" || valid_host {
            Ok(NoProxyHost(entry))
        } else {
            Err(serde::de::Error::custom(format!(
                "[registry] no_proxy entry `{entry}`: not a host name; use `host`, \
                 `.domain`, `*.domain` or `*` (no scheme, path or port)"
            )))
        }
    }
}

impl RegistryConfig {
    /// The proxy for the registry client's agent: the configured one with its `no_proxy`
    /// exceptions, or (none configured) the caller's environment, as curl and skopeo do.
    pub fn agent_proxy(&self) -> Option<ureq::Proxy> {
        let Some(ProxyUrl(url)) = &self.proxy else {
            return ureq::Proxy::try_from_env();
        };
        // Validated when the configuration was read.
        let parsed = ureq::Proxy::new(url).ok()?;
        let mut builder = ureq::Proxy::builder(parsed.protocol())
            .host(parsed.host())
            .port(parsed.port());
        if let Some(user) = parsed.username() {
            builder = builder.username(user);
        }
        if let Some(password) = parsed.password() {
            builder = builder.password(password);
        }
        for NoProxyHost(entry) in &self.no_proxy {
            builder = builder.no_proxy(entry);
        }
        builder.build().ok()
    }
}

/// `[runtime]`: how containers are assembled on this node. Owned by `container/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Root-owned directory (tmpfs) under which containers mount their private scratch
    /// space; berth falls back to a private directory under $TMPDIR when it is missing.
    pub dir: PathBuf,
    /// Sticky, world-writable directory on node-local disk where writable and named
    /// containers keep their changes (one private 0700 directory per user below it), so
    /// what a container writes is not held in memory. Owned by `container/writable.rs`.
    pub writable_dir: PathBuf,
    /// The most one container may write, e.g. "20G"; past it its root turns read-only.
    pub writable_max_size: String,
}

/// `[store]`: converted images shared by every node through a shared file system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory on NFS or a parallel file system, written by root on every node; empty
    /// (the default) means no shared store.
    pub dir: PathBuf,
    /// How long a node's claim to convert an image lasts unless renewed (it is renewed
    /// while the node works): the longest a crashed node can hold up the others.
    pub lease_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dir: PathBuf::new(),
            lease_secs: 120,
        }
    }
}

/// `[stage]`: where and how much users may stage on a node. Owned by `stage/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageConfig {
    /// Sticky, world-writable directory on fast node-local storage; each user gets a
    /// private (0700) directory below it.
    pub dir: PathBuf,
    /// The most one user may have staged on a node, e.g. "100G".
    pub max_user: String,
    /// The most all users together may have staged on a node, e.g. "500G"; "" for no
    /// limit but `reserve`.
    pub max_total: String,
    /// Free space every stage leaves on the stage area's file system, e.g. "10G".
    pub reserve: String,
    /// Files copied at once.
    pub threads: usize,
    /// What becomes of a job's staged data when the job ends.
    pub after_job: AfterJob,
}

/// `[stage] after_job`: what the job epilog does with a job's staged data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterJob {
    /// Kept for the user's next jobs on the node, under the quotas, least recently used
    /// evicted first when a new stage needs the room.
    Keep,
    /// Removed: nothing of a user's data outlives the job on the node.
    Remove,
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            dir: PathBuf::from("/var/tmp/berth-stage"),
            max_user: "100G".into(),
            max_total: String::new(),
            reserve: "10G".into(),
            threads: 8,
            after_job: AfterJob::Keep,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            dir: PathBuf::from("/run/berth"),
            writable_dir: PathBuf::from("/var/tmp/berth-containers"),
            writable_max_size: "20G".into(),
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

/// `[security]`: additions to the confinement every container gets (see
/// `berth_sys::seccomp`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Syscalls denied (EPERM) in every container on top of berth's default list, e.g.
    /// `perf_event_open`.
    pub seccomp_deny: Vec<SyscallName>,
}

impl SecurityConfig {
    pub fn seccomp_deny(&self) -> Vec<String> {
        self.seccomp_deny.iter().map(|n| n.0.clone()).collect()
    }
}

/// A `seccomp_deny` entry: the name of a syscall of x86_64 (or its i386 ABI) or aarch64, so
/// a typo is a configuration error instead of a denial that never applies.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SyscallName(String);

impl TryFrom<String> for SyscallName {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<SyscallName, String> {
        if berth_sys::seccomp::is_known(&name) {
            Ok(SyscallName(name))
        } else {
            Err(format!(
                "seccomp_deny entry `{name}` is not a syscall of x86_64 or aarch64; \
                 write its name as syscalls(2) lists it (e.g. `perf_event_open`)"
            ))
        }
    }
}

impl Config {
    /// Parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigUnreadable {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(path, &text)
    }

    /// Parses `text`, the contents of `path`. An error names the line and column the problem
    /// starts at (toml's span), as `berth config check` shows it.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, entry_offset(text, span, e.message())))
                .unwrap_or((1, 1));
            Error::ConfigAt {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim_end().to_owned(),
            }
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

/// Where the problem starts. toml spans a bad entry of a list with the whole list, so for
/// the `[policy]` entry errors (which quote the entry) this finds the entry inside it: in a
/// list written one entry per line, the line named is the entry's own.
fn entry_offset(text: &str, span: std::ops::Range<usize>, message: &str) -> usize {
    let entry = message
        .split_once("entry `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(entry, _)| entry);
    let within = text.get(span.clone()).unwrap_or_default();
    entry
        .and_then(|entry| {
            within
                .find(&format!("\"{entry}\""))
                .or_else(|| within.find(&format!("'{entry}'")))
        })
        .map_or(span.start, |at| span.start + at)
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    // toml's spans fall on character boundaries; anything else counts as the end.
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::from_toml(Path::new("/etc/berth/berth.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_unknown_key_names_its_line_and_the_keys_allowed() {
        let err = error_of("[policy]\nallowed = []\nalowed = []\n");
        assert!(err.contains("/etc/berth/berth.toml:3:1:"), "{err}");
        assert!(err.contains("unknown field `alowed`"), "{err}");
        assert!(err.contains("`require_digest`"), "{err}");
    }

    #[test]
    fn a_wrong_type_names_its_line_and_column() {
        let err = error_of("\n[policy]\nrequire_digest = \"yes\"\n");
        assert!(err.contains("berth.toml:3:18:"), "{err}");
        assert!(err.contains("expected a boolean"), "{err}");
    }

    #[test]
    fn a_bad_registry_pattern_names_its_line() {
        let err = error_of("[policy]\nallowed = [\n  \"ok.example/*\",\n  \"Bad Host/*\",\n]\n");
        assert!(err.contains("berth.toml:4:3:"), "{err}");
        assert!(err.contains("Bad Host/*"), "{err}");
    }

    #[test]
    fn the_proxy_setting_reaches_the_agent_with_its_exceptions() {
        let config = Config::from_toml(
            Path::new("b.toml"),
            "[registry]\nproxy = \"http://u:p@proxy.example:3128\"\n\
             no_proxy = [\"internal.example\", \".lab.example\"]\n",
        )
        .unwrap();
        let proxy = config.registry.agent_proxy().unwrap();
        assert_eq!((proxy.host(), proxy.port()), ("proxy.example", 3128));
        assert_eq!((proxy.username(), proxy.password()), (Some("u"), Some("p")));
        let uri = |s: &str| s.parse::<ureq::http::Uri>().unwrap();
        assert!(proxy.is_no_proxy(&uri("https://internal.example/v2/")));
        assert!(proxy.is_no_proxy(&uri("https://r.lab.example/v2/")));
        assert!(!proxy.is_no_proxy(&uri("https://registry.example.org/v2/")));
    }

    #[test]
    fn a_bad_proxy_setting_names_its_line() {
        let err = error_of("[registry]\nproxy = \"socks5://p:1080\"\n");
        assert!(err.contains("berth.toml:2:9:"), "{err}");
        assert!(err.contains("http://HOST:PORT"), "{err}");
        let err = error_of("[registry]\nno_proxy = [\"http://x/\"]\n");
        assert!(err.contains("no_proxy entry `http://x/`"), "{err}");
    }

    #[test]
    fn seccomp_denials_are_syscall_names_and_a_typo_names_its_line() {
        let config = Config::from_toml(
            Path::new("b.toml"),
            "[security]\nseccomp_deny = [\"perf_event_open\", \"open\"]\n",
        )
        .unwrap();
        assert_eq!(
            config.security.seccomp_deny(),
            ["perf_event_open".to_string(), "open".to_string()]
        );
        let err = error_of("[security]\nseccomp_deny = [\n  \"acct\",\n  \"perf_event_opn\",\n]\n");
        assert!(err.contains("berth.toml:4:3:"), "{err}");
        assert!(err.contains("`perf_event_opn` is not a syscall"), "{err}");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("a\nbé c", 6), (2, 4));
        assert_eq!(line_column("", 0), (1, 1));
    }

    #[test]
    fn the_shipped_config_is_valid_and_approves_nothing() {
        let config = Config::from_toml(
            Path::new("configs/berth.toml"),
            include_str!("../../configs/berth.toml"),
        )
        .unwrap();
        assert!(config.policy.allowed.is_empty());
        assert!(!config.policy.local_images);
    }

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
