//! The site's image policy: which registry images and local image files may run.
//!
//! The policy comes only from the root-owned configuration (`[policy]` in
//! `/etc/berth/berth.toml`, see `Config::load_for_caller`). Checking is pure string work on
//! canonical references plus, for local files, path resolution on the real file system: it
//! never touches the network, so a refused image is refused before any registry is asked.
//!
//! Registry rules match canonical `registry/repository` names at path-component boundaries:
//! `localhost:5000/test/*` allows `localhost:5000/test/a` and `localhost:5000/test/a/b`, never
//! `localhost:5000/testing/a`, `localhost:5000/test` itself, `localhost:50001/...` or
//! `evil.com/localhost:5000/test/a`. Local files are allowed only when their fully resolved
//! path (every symlink and `..` followed) lies below a listed admin directory.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::PolicyConfig;
use crate::reference::{self, Reference, DOCKER_HUB, DOCKER_HUB_ALIASES};
use crate::{Error, Result};

const PATTERN_FORMS: &str =
    "patterns are `host[:port]/*`, `host[:port]/repo/prefix/*` or `host[:port]/repo`";

/// What an image argument asks for, once classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRequest {
    /// A registry image, canonical.
    Registry(Reference),
    /// A local image file. When the path could be resolved this is the resolved path (no
    /// symlinks, no `..`): callers must open this path, not the one the user wrote.
    LocalFile(PathBuf),
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `rule` is the `allowed` pattern or `local_image_dirs` entry that allowed it.
    Allow { rule: String },
    /// `reason` names the image, the rule or cause that refused it, and what is allowed.
    Deny { reason: String },
}

/// One `allowed` entry, validated when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Pattern {
    text: String,
    registry: String,
    scope: Scope,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// `host/*`: every repository of the registry.
    Registry,
    /// `host/prefix/*`: repositories strictly below `prefix`.
    Below(String),
    /// `host/repo`: exactly that repository.
    Exactly(String),
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern> {
        parse_pattern(text).map_err(|reason| Error::PolicyEntry {
            key: "allowed",
            value: reference::shown(text),
            reason: format!("{reason}; {PATTERN_FORMS}"),
        })
    }

    /// The canonical `host[:port]` the pattern is about.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn matches(&self, r: &Reference) -> bool {
        if r.registry != self.registry {
            return false;
        }
        match &self.scope {
            Scope::Registry => true,
            // Repositories are validated (no empty components), so a '/' right after the
            // prefix means at least one more whole component follows.
            Scope::Below(prefix) => r
                .repository
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
            Scope::Exactly(repository) => r.repository == *repository,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TryFrom<String> for Pattern {
    type Error = Error;
    fn try_from(text: String) -> Result<Pattern> {
        Pattern::parse(&text)
    }
}

fn parse_pattern(text: &str) -> Result<Pattern, String> {
    reference::check_text(text)?;
    let (registry, path) = text.split_once('/').ok_or_else(|| {
        format!("no repository part; to allow the whole registry write `{text}/*`")
    })?;
    reference::check_registry(registry)?;
    if path.contains([':', '@', '#']) {
        return Err("patterns name repositories, not tags or digests".into());
    }
    let scope = if path == "*" {
        Scope::Registry
    } else if let Some(prefix) = path.strip_suffix("/*") {
        Scope::Below(prefix.to_owned())
    } else {
        Scope::Exactly(path.to_owned())
    };
    match &scope {
        Scope::Registry => {}
        Scope::Below(repository) | Scope::Exactly(repository) => {
            if repository.contains('*') {
                return Err(
                    "`*` may only be the whole last path component (`.../*`), never part of a name"
                        .into(),
                );
            }
            reference::check_repository(repository)?;
        }
    }
    if let Scope::Exactly(repository) = &scope {
        // References name Docker Hub's official images `library/NAME`, so this pattern would
        // never match. (`docker.io/NAME/*` is fine: it is the namespace of user NAME.)
        if registry == DOCKER_HUB && !repository.contains('/') {
            return Err(format!(
                "Docker Hub's official images are `docker.io/library/NAME`; write \
                 `docker.io/library/{repository}`"
            ));
        }
    }
    Ok(Pattern {
        text: text.to_owned(),
        registry: registry.to_owned(),
        scope,
    })
}

/// A `plain_http` entry: a registry in canonical `host[:port]` form.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RegistryHost(String);

impl RegistryHost {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RegistryHost {
    type Error = Error;
    fn try_from(text: String) -> Result<RegistryHost> {
        reference::check_text(&text)
            .and_then(|()| reference::check_registry(&text))
            .map_err(|reason| Error::PolicyEntry {
                key: "plain_http",
                value: reference::shown(&text),
                reason: format!("{reason}; entries are registries, `host[:port]`"),
            })?;
        Ok(RegistryHost(text))
    }
}

/// A `local_image_dirs` entry: an absolute directory other than `/`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PathBuf")]
pub struct AdminDir(PathBuf);

impl AdminDir {
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl TryFrom<PathBuf> for AdminDir {
    type Error = Error;
    fn try_from(path: PathBuf) -> Result<AdminDir> {
        let refuse = |reason: &str| Error::PolicyEntry {
            key: "local_image_dirs",
            value: path.display().to_string(),
            reason: reason.into(),
        };
        if !path.is_absolute() {
            return Err(refuse(
                "must be an absolute path, or it would depend on the caller's working directory",
            ));
        }
        if path.parent().is_none() {
            return Err(refuse(
                "`/` would allow every file on the node; list the image directories",
            ));
        }
        Ok(AdminDir(path))
    }
}

/// The site policy, ready to check images.
#[derive(Debug, Clone)]
pub struct Policy {
    config: PolicyConfig,
}

impl Policy {
    pub fn new(config: &PolicyConfig) -> Policy {
        Policy {
            config: config.clone(),
        }
    }

    /// Classifies `image` (as given to `--container-image` or `berth exec`) and decides.
    /// `Err` means the argument is not a usable image request at all (malformed, a trick, an
    /// unsupported transport); the message says why and what to write instead. A well-formed
    /// request the policy refuses is `Ok` with `Verdict::Deny`.
    pub fn check(&self, image: &str) -> Result<(ImageRequest, Verdict)> {
        let refuse = |reason: String| Error::InvalidReference {
            image: reference::shown(image),
            reason,
        };
        reference::check_text(image).map_err(refuse)?;
        if let Some(path) = local_path(image).map_err(refuse)? {
            let (resolved, verdict) = self.check_local(image, path);
            return Ok((ImageRequest::LocalFile(resolved), verdict));
        }
        let r = Reference::parse(image)?;
        let verdict = self.check_reference(image, &r);
        Ok((ImageRequest::Registry(r), verdict))
    }

    /// Decides on an already parsed reference; `image` is what the user wrote, for messages.
    pub fn check_reference(&self, image: &str, r: &Reference) -> Verdict {
        let canonical = r.to_string();
        let named = if canonical == image {
            format!("`{canonical}`")
        } else {
            format!("`{}` (that is, `{canonical}`)", reference::shown(image))
        };
        let Some(pattern) = self.config.allowed.iter().find(|p| p.matches(r)) else {
            return Verdict::Deny {
                reason: format!(
                    "{named} is not an approved image: no entry of the site policy's `allowed` \
                     list matches it; {}",
                    self.allowed_summary(&r.registry)
                ),
            };
        };
        if self.config.require_digest && r.digest.is_none() {
            return Verdict::Deny {
                reason: format!(
                    "{named} names a tag, but this site runs only digest-pinned images \
                     (policy: require_digest = true); run `berth resolve {canonical}` and use \
                     the `...@sha256:...` reference it prints"
                ),
            };
        }
        Verdict::Allow {
            rule: pattern.to_string(),
        }
    }

    /// Whether `registry` (canonical `host[:port]`) may be reached over plain HTTP.
    pub fn allows_plain_http(&self, registry: &str) -> bool {
        self.config
            .plain_http
            .iter()
            .any(|r| r.as_str() == registry)
    }

    /// Whether `host` (`host[:port]` as in a URL, e.g. a redirect target of a manifest
    /// request) is a registry some `allowed` pattern names. Docker Hub's API and alias hosts
    /// count as `docker.io`. Non-canonical spellings are not recognised, so they are refused.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = if DOCKER_HUB_ALIASES.contains(&host) {
            DOCKER_HUB
        } else {
            host
        };
        self.config.allowed.iter().any(|p| p.registry() == host)
    }

    /// Whether a job in `partition` (Slurm's value; a comma-separated list means the job may
    /// run in any of them) must use a container. A partition's own setting wins over the
    /// global one; with a list, the job must use one if any of its partitions requires it.
    pub fn requires_container(&self, partition: Option<&str>) -> bool {
        let global = self.config.require_container;
        match partition {
            None => global,
            Some(list) => list.split(',').any(|name| {
                self.config
                    .partitions
                    .get(name.trim())
                    .and_then(|p| p.require_container)
                    .unwrap_or(global)
            }),
        }
    }

    fn allowed_summary(&self, registry: &str) -> String {
        let allowed = &self.config.allowed;
        if allowed.is_empty() {
            return "this site allows no registry images (`allowed` is empty)".into();
        }
        let same: Vec<String> = allowed
            .iter()
            .filter(|p| p.registry() == registry)
            .map(ToString::to_string)
            .collect();
        if same.is_empty() {
            let all: Vec<String> = allowed.iter().map(ToString::to_string).collect();
            format!("allowed are: {}", all.join(", "))
        } else {
            format!("on {registry} the site allows only: {}", same.join(", "))
        }
    }

    fn local_dirs_summary(&self) -> String {
        let dirs: Vec<String> = self
            .config
            .local_image_dirs
            .iter()
            .map(|d| d.as_path().display().to_string())
            .collect();
        if dirs.is_empty() {
            "no local image directory is listed (local_image_dirs is empty)".into()
        } else {
            format!("local image files must lie in: {}", dirs.join(", "))
        }
    }

    fn check_local(&self, image: &str, path: &Path) -> (PathBuf, Verdict) {
        let shown = reference::shown(image);
        let deny = |p: &Path, reason: String| (p.to_path_buf(), Verdict::Deny { reason });
        if !self.config.local_images {
            return deny(
                path,
                format!(
                    "`{shown}` is a local image file, and this site does not run local image \
                     files (policy: local_images = false); use an image from an approved \
                     registry: {}",
                    self.allowed_summary("")
                ),
            );
        }
        if path.starts_with("~") {
            return deny(
                path,
                format!(
                    "`{shown}`: berth does not expand `~`; give the absolute path ({})",
                    self.local_dirs_summary()
                ),
            );
        }
        // canonicalize follows every symlink, including the last component, and resolves
        // `..` on the real file system, so a link inside an allowed directory that points
        // outside it resolves to the outside path and is refused below.
        let real = match fs::canonicalize(path) {
            Ok(real) => real,
            Err(e) => {
                return deny(
                    path,
                    format!(
                        "`{shown}` cannot be used as a local image: {e}; {}",
                        self.local_dirs_summary()
                    ),
                )
            }
        };
        match fs::metadata(&real) {
            Ok(m) if m.is_file() => {}
            _ => {
                return deny(
                    &real,
                    format!(
                        "`{shown}` resolves to {}, which is not a regular file; a local image is \
                         a SIF or squashfs file",
                        real.display()
                    ),
                )
            }
        }
        for dir in &self.config.local_image_dirs {
            // A listed directory may itself be reached through a symlink (/images ->
            // /srv/images); compare resolved paths, component by component. A listed
            // directory missing on this node allows nothing here.
            let Ok(real_dir) = fs::canonicalize(dir.as_path()) else {
                continue;
            };
            if real == real_dir || !real.starts_with(&real_dir) {
                continue;
            }
            if let Some(open) = world_writable_on_the_way(&real_dir, &real) {
                return deny(
                    &real,
                    format!(
                        "`{shown}` resolves to {}, but {} is writable by every user, so anyone \
                         could replace the image; the site admins must fix its permissions",
                        real.display(),
                        open.display()
                    ),
                );
            }
            return (
                real,
                Verdict::Allow {
                    rule: format!("local_image_dirs: {}", dir.as_path().display()),
                },
            );
        }
        let resolved = if real == path {
            String::new()
        } else {
            format!(" resolves to {}, which", real.display())
        };
        deny(
            &real,
            format!(
                "`{shown}`{resolved} is outside the site's local image directories; {}",
                self.local_dirs_summary()
            ),
        )
    }
}

/// The first path from `dir` down to `file` (both resolved, `file` below `dir`) that any
/// user may write to, if there is one.
fn world_writable_on_the_way(dir: &Path, file: &Path) -> Option<PathBuf> {
    let mut path = dir.to_path_buf();
    let mut candidates = vec![path.clone()];
    for component in file.strip_prefix(dir).ok()?.components() {
        path.push(component);
        candidates.push(path.clone());
    }
    candidates
        .into_iter()
        .find(|p| fs::metadata(p).map_or(true, |m| m.permissions().mode() & 0o002 != 0))
}

/// The file path `image` names, if it names one: a path (`/`, `.`, `~`), `file://PATH`, or a
/// name without an explicit registry that exists as a file here (so a file called `ubuntu`
/// is never silently swapped for Docker Hub's). Other transports are refused.
pub fn local_path(image: &str) -> Result<Option<&Path>, String> {
    if image.starts_with("docker://") {
        return Ok(None);
    }
    if image.starts_with(['/', '.', '~']) {
        return Ok(Some(Path::new(image)));
    }
    if let Some(path) = image.strip_prefix("file://") {
        return Ok(Some(Path::new(path)));
    }
    // skopeo-style transports: `oci-archive:/x.tar`, `docker-daemon:img`, ...
    const TRANSPORTS: &[&str] = &[
        "oci:",
        "oci-archive:",
        "docker-archive:",
        "docker-daemon:",
        "containers-storage:",
        "dir:",
    ];
    // The prefix as written (`dockerd://`, `oci-archive:`), so the message shows it.
    let transport = image.find("://").map(|end| &image[..end + 3]).or_else(|| {
        TRANSPORTS
            .iter()
            .find(|t| image.starts_with(**t) && !is_docker_image_with_tag(image, t))
            .copied()
    });
    if let Some(transport) = transport {
        return Err(format!(
            "the `{transport}` transport is not supported: berth runs images from the site's \
             approved registries, and local SIF/squashfs files given by absolute path where the \
             site allows them"
        ));
    }
    if !reference::has_explicit_registry(image) && Path::new(image).symlink_metadata().is_ok() {
        return Ok(Some(Path::new(image)));
    }
    Ok(None)
}

/// `oci:1.0` or `dir:latest` could be Docker Hub images with a tag; only a transport followed
/// by something that cannot be a tag (a path, an image name with its own tag) is one.
fn is_docker_image_with_tag(image: &str, transport: &str) -> bool {
    let rest = &image[transport.len()..];
    !rest.is_empty()
        && !rest.starts_with(['/', '.', '~'])
        && !rest.contains([':', '/'])
        && matches!(transport, "oci:" | "dir:")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::config::{Config, PartitionPolicyConfig};

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn policy(toml_text: &str) -> Policy {
        let config = Config::from_toml(Path::new("test.toml"), toml_text).unwrap();
        Policy::new(&config.policy)
    }

    fn verdict(p: &Policy, image: &str) -> Verdict {
        p.check(image).unwrap_or_else(|e| panic!("{image}: {e}")).1
    }

    fn deny_reason(p: &Policy, image: &str) -> String {
        match verdict(p, image) {
            Verdict::Deny { reason } => reason,
            allow => panic!("{image} was allowed: {allow:?}"),
        }
    }

    #[test]
    fn patterns_match_at_path_component_boundaries() {
        let p = policy(
            r#"[policy]
            allowed = ["localhost:5000/test/*", "nvcr.io/*", "docker.io/library/ubuntu"]"#,
        );
        let allowed = [
            ("localhost:5000/test/busybox", "localhost:5000/test/*"),
            ("localhost:5000/test/a/b:1", "localhost:5000/test/*"),
            ("localhost:5000#test/busybox", "localhost:5000/test/*"),
            (
                "docker://localhost:5000/test/busybox",
                "localhost:5000/test/*",
            ),
            ("nvcr.io/nvidia/pytorch:24.05", "nvcr.io/*"),
            ("ubuntu", "docker.io/library/ubuntu"),
            ("docker.io/ubuntu:22.04", "docker.io/library/ubuntu"),
        ];
        for (image, rule) in allowed {
            assert_eq!(
                verdict(&p, image),
                Verdict::Allow { rule: rule.into() },
                "{image}"
            );
        }
        let denied = [
            "localhost:5000/testing/x",
            "localhost:5000/test",
            "localhost:5000/tes/t",
            "localhost:5000/other/test/x",
            "localhost:50001/test/x",
            "localhost/test/x",
            "evil.com/localhost/test/x",
            "nvcr.io.evil.com/nvidia/x",
            "evil.com/nvcr.io/x",
            "ubuntu-evil",
            "docker.io/library/ubuntu/x",
            "busybox",
            "evil/ubuntu",
        ];
        for image in denied {
            let reason = deny_reason(&p, image);
            assert!(reason.contains(image), "{image}: {reason}");
            assert!(
                reason.contains("not an approved image"),
                "{image}: {reason}"
            );
        }
    }

    #[test]
    fn denials_name_the_image_the_rule_and_what_is_allowed() {
        let p = policy(r#"policy.allowed = ["localhost:5000/test/*", "nvcr.io/nvidia/*"]"#);
        let same_registry = deny_reason(&p, "localhost:5000/testing/x");
        assert!(
            same_registry.contains("on localhost:5000 the site allows only: localhost:5000/test/*"),
            "{same_registry}"
        );
        let other = deny_reason(&p, "ubuntu");
        assert!(
            other.contains("`ubuntu` (that is, `docker.io/library/ubuntu`)"),
            "{other}"
        );
        assert!(
            other.contains("allowed are: localhost:5000/test/*, nvcr.io/nvidia/*"),
            "{other}"
        );
        let nothing = deny_reason(&policy(""), "localhost:5000/test/x");
        assert!(nothing.contains("allows no registry images"), "{nothing}");
    }

    #[test]
    fn malformed_references_are_errors_not_verdicts() {
        let p = policy(r#"policy.allowed = ["localhost:5000/*"]"#);
        for image in [
            "LOCALHOST:5000/test/x",
            "localhost:5000./test/x",
            "localhost:5000.evil.com/test/x",
            "evil.com/localhost:5000/test/x",
            "user@localhost:5000/test/x",
            "localhost:5000/test/../x",
            "",
            "dockerd://ubuntu",
            "podman://ubuntu",
            "oci-archive:/srv/x.tar",
            "docker-daemon:ubuntu:latest",
            "oci:/srv/layout",
        ] {
            let err = p.check(image).expect_err(image).to_string();
            assert!(err.starts_with("image `"), "{image}: {err}");
        }
    }

    #[test]
    fn transport_names_that_are_also_image_names_stay_images() {
        let p = policy(r#"policy.allowed = ["docker.io/library/*"]"#);
        for image in ["oci:1.0", "dir:latest"] {
            assert!(
                matches!(verdict(&p, image), Verdict::Allow { .. }),
                "{image}"
            );
        }
    }

    #[test]
    fn require_digest_refuses_tags_and_points_at_resolve() {
        let p = policy("[policy]\nallowed = [\"localhost:5000/*\"]\nrequire_digest = true\n");
        let reason = deny_reason(&p, "localhost:5000/test/x:1");
        assert!(reason.contains("require_digest = true"), "{reason}");
        assert!(
            reason.contains("berth resolve localhost:5000/test/x:1"),
            "{reason}"
        );
        let pinned = format!("localhost:5000/test/x@sha256:{HEX}");
        assert!(matches!(verdict(&p, &pinned), Verdict::Allow { .. }));
    }

    #[test]
    fn malformed_patterns_are_config_errors_naming_them() {
        for (pattern, fragment) in [
            ("localhost:5000", "write `localhost:5000/*`"),
            ("LOCALHOST:5000/*", "write `localhost:5000`"),
            (
                "localhost:5000/test*",
                "`*` may only be the whole last path component",
            ),
            ("localhost:5000/*/x", "`*` may only be"),
            ("*", "no repository part"),
            ("*/x", "not a valid host name"),
            ("localhost:5000/x:latest", "not tags or digests"),
            ("localhost:5000/../*", "`..`"),
            ("localhost:5000/test/", "empty path component"),
            ("docker.io/ubuntu", "write `docker.io/library/ubuntu`"),
            ("index.docker.io/*", "write `docker.io`"),
        ] {
            let text = format!("[policy]\nallowed = [{pattern:?}]\n");
            let err = Config::from_toml(Path::new("/etc/berth/berth.toml"), &text)
                .expect_err(pattern)
                .to_string();
            assert!(err.contains("/etc/berth/berth.toml"), "{pattern}: {err}");
            assert!(err.contains(pattern), "{pattern}: {err}");
            assert!(err.contains(fragment), "{pattern}: {err}");
        }
        for (text, fragment) in [
            (
                "policy.plain_http = [\"Localhost:5001\"]",
                "write `localhost:5001`",
            ),
            ("policy.plain_http = [\"localhost:5001/x\"]", "port"),
            ("policy.local_image_dirs = [\"images\"]", "absolute"),
            ("policy.local_image_dirs = [\"/\"]", "every file"),
            (
                "policy.partitions.gpu.require_digest = true",
                "unknown field",
            ),
        ] {
            let err = Config::from_toml(Path::new("b.toml"), text)
                .expect_err(text)
                .to_string();
            assert!(err.contains(fragment), "{text}: {err}");
        }
    }

    #[test]
    fn plain_http_and_redirect_hosts() {
        let p = policy(
            "[policy]\nallowed = [\"localhost:5000/test/*\", \"docker.io/library/*\"]\n\
             plain_http = [\"localhost:5001\"]\n",
        );
        assert!(p.allows_plain_http("localhost:5001"));
        assert!(!p.allows_plain_http("localhost:5000"));
        assert!(!p.allows_plain_http("LOCALHOST:5001"));
        assert!(p.allows_host("localhost:5000"));
        assert!(p.allows_host("registry-1.docker.io"));
        assert!(p.allows_host("docker.io"));
        for host in [
            "localhost:5001",
            "localhost",
            "evil.com",
            "localhost:5000.evil.com",
            "LOCALHOST:5000",
        ] {
            assert!(!p.allows_host(host), "{host}");
        }
    }

    #[test]
    fn require_container_globally_and_per_partition() {
        let mut config = PolicyConfig {
            require_container: true,
            ..PolicyConfig::default()
        };
        config.partitions.insert(
            "debug".into(),
            PartitionPolicyConfig {
                require_container: Some(false),
            },
        );
        config
            .partitions
            .insert("gpu".into(), PartitionPolicyConfig::default());
        let p = Policy::new(&config);
        assert!(p.requires_container(None));
        assert!(p.requires_container(Some("gpu")));
        assert!(p.requires_container(Some("other")));
        assert!(!p.requires_container(Some("debug")));
        assert!(p.requires_container(Some("debug,gpu")));

        let p = policy("[policy.partitions.gpu]\nrequire_container = true\n");
        assert!(!p.requires_container(None));
        assert!(p.requires_container(Some("gpu")));
        assert!(p.requires_container(Some("cpu, gpu")));
        assert!(!p.requires_container(Some("cpu")));
    }

    /// A real directory tree: `images/` (listed) with a good image, a symlink inside pointing
    /// outside, a symlink to a good image, a `..` escape, and `outside/` (not listed).
    struct Tree {
        _dir: tempfile::TempDir,
        images: PathBuf,
        outside: PathBuf,
    }

    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let outside = dir.path().join("outside");
        fs::create_dir(&images).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::create_dir(images.join("sub")).unwrap();
        fs::write(images.join("good.sif"), b"x").unwrap();
        fs::write(images.join("sub/deep.sif"), b"x").unwrap();
        fs::write(outside.join("evil.sif"), b"x").unwrap();
        symlink(outside.join("evil.sif"), images.join("link-out.sif")).unwrap();
        symlink("good.sif", images.join("link-in.sif")).unwrap();
        symlink(&outside, images.join("dir-out")).unwrap();
        Tree {
            _dir: dir,
            images,
            outside,
        }
    }

    fn local_policy(dirs: &[&Path], enabled: bool) -> Policy {
        let list: Vec<String> = dirs
            .iter()
            .map(|d| format!("{:?}", d.display().to_string()))
            .collect();
        policy(&format!(
            "[policy]\nallowed = [\"localhost:5000/*\"]\nlocal_images = {enabled}\nlocal_image_dirs = [{}]\n",
            list.join(", ")
        ))
    }

    #[test]
    fn local_files_only_from_listed_directories_after_resolving_symlinks() {
        let t = tree();
        let p = local_policy(&[&t.images], true);
        let rule = format!("local_image_dirs: {}", t.images.display());
        let real_images = fs::canonicalize(&t.images).unwrap();
        for (name, resolved) in [
            ("good.sif", "good.sif"),
            ("sub/deep.sif", "sub/deep.sif"),
            ("link-in.sif", "good.sif"),
            ("sub/../good.sif", "good.sif"),
        ] {
            let image = t.images.join(name).display().to_string();
            let (request, v) = p.check(&image).unwrap();
            assert_eq!(v, Verdict::Allow { rule: rule.clone() }, "{image}");
            assert_eq!(
                request,
                ImageRequest::LocalFile(real_images.join(resolved)),
                "{image}"
            );
            let file_url = format!("file://{image}");
            assert_eq!(
                p.check(&file_url).unwrap().1,
                Verdict::Allow { rule: rule.clone() }
            );
        }
        let escapes = [
            t.images.join("link-out.sif"),
            t.images.join("dir-out/evil.sif"),
            t.images.join("../outside/evil.sif"),
            t.outside.join("evil.sif"),
        ];
        for path in escapes {
            let image = path.display().to_string();
            let (request, v) = p.check(&image).unwrap();
            let Verdict::Deny { reason } = v else {
                panic!("{image} escaped the image directory");
            };
            assert!(
                reason.contains("outside the site's local image directories"),
                "{reason}"
            );
            assert!(reason.contains(&t.images.display().to_string()), "{reason}");
            assert_eq!(
                request,
                ImageRequest::LocalFile(fs::canonicalize(&path).unwrap())
            );
        }
        for (path, fragment) in [
            (t.images.clone(), "not a regular file"),
            (t.images.join("sub"), "not a regular file"),
            (t.images.join("missing.sif"), "No such file"),
        ] {
            let reason = deny_reason(&p, &path.display().to_string());
            assert!(reason.contains(fragment), "{reason}");
        }
        assert!(deny_reason(&p, "~/x.sif").contains("does not expand `~`"));
    }

    #[test]
    fn a_listed_directory_must_be_compared_by_components_not_by_string_prefix() {
        let t = tree();
        // Listing ".../images/sub" must not allow ".../images/sub-other/..." nor the parent.
        fs::create_dir(t.images.join("sub-other")).unwrap();
        fs::write(t.images.join("sub-other/x.sif"), b"x").unwrap();
        let p = local_policy(&[&t.images.join("sub")], true);
        assert!(matches!(
            verdict(&p, &t.images.join("sub/deep.sif").display().to_string()),
            Verdict::Allow { .. }
        ));
        deny_reason(&p, &t.images.join("sub-other/x.sif").display().to_string());
        deny_reason(&p, &t.images.join("good.sif").display().to_string());
    }

    #[test]
    fn local_files_are_refused_unless_enabled() {
        let t = tree();
        let p = local_policy(&[&t.images], false);
        let reason = deny_reason(&p, &t.images.join("good.sif").display().to_string());
        assert!(reason.contains("local_images = false"), "{reason}");
        assert!(reason.contains("localhost:5000/*"), "{reason}");
        let none = local_policy(&[], true);
        let reason = deny_reason(&none, &t.images.join("good.sif").display().to_string());
        assert!(reason.contains("local_image_dirs is empty"), "{reason}");
    }

    #[test]
    fn world_writable_image_directories_are_refused() {
        let t = tree();
        let p = local_policy(&[&t.images], true);
        fs::set_permissions(t.images.join("sub"), fs::Permissions::from_mode(0o777)).unwrap();
        let reason = deny_reason(&p, &t.images.join("sub/deep.sif").display().to_string());
        assert!(reason.contains("writable by every user"), "{reason}");
        assert!(matches!(
            verdict(&p, &t.images.join("good.sif").display().to_string()),
            Verdict::Allow { .. }
        ));
    }

    #[test]
    fn a_bare_name_that_exists_as_a_file_is_a_local_request() {
        // Relative to the working directory, so use a name unique to this test run.
        let t = tree();
        let p = local_policy(&[&t.images], false);
        let cwd = std::env::current_dir().unwrap();
        let name = format!("berth-policy-test-{}.sif", std::process::id());
        fs::write(cwd.join(&name), b"x").unwrap();
        let result = p.check(&name);
        fs::remove_file(cwd.join(&name)).unwrap();
        let (request, v) = result.unwrap();
        assert_eq!(request, ImageRequest::LocalFile(PathBuf::from(&name)));
        assert!(matches!(v, Verdict::Deny { .. }));
        // With an explicit registry the same kind of name is always a registry image.
        let (request, _) = p.check(&format!("localhost:5000/{name}")).unwrap();
        assert!(matches!(request, ImageRequest::Registry(_)));
    }

    #[test]
    fn the_example_policy_section_parses() {
        // The whole file is checked by `example_config_parses` (config.rs sections of all
        // areas); this one pins the [policy] part alone.
        let text = fs::read_to_string(example_path()).unwrap();
        let value: toml::Table = toml::from_str(&text).unwrap();
        let section = toml::to_string(&value["policy"]).unwrap();
        let config: PolicyConfig = toml::from_str(&section).unwrap();
        assert!(!config.local_images && !config.require_digest);
    }

    #[test]
    fn example_config_parses() {
        let config = Config::from_file(&example_path()).unwrap_or_else(|e| panic!("{e}"));
        // The example is the safe default: nothing runs until the admin lists something.
        let p = Policy::new(&config.policy);
        assert!(matches!(verdict(&p, "ubuntu"), Verdict::Deny { .. }));
    }

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/berth.toml")
    }
}
