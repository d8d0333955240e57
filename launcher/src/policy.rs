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
//! path (every symlink and `..` followed, with the job user's rights when root checks for a
//! job) lies below a listed admin directory, and every component from `/` down to the file is
//! owned by root and writable by root alone, so nobody else can change what the path names.

use std::fmt;
use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

pub use berth_sys::fsid::FsUser;

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
    /// Whose rights look up the paths of local image files; None: the caller's.
    resolver: Option<FsUser>,
}

impl Policy {
    pub fn new(config: &PolicyConfig) -> Policy {
        Policy {
            config: config.clone(),
            resolver: None,
        }
    }

    /// The same policy, looking up user-written paths with `user`'s file-system rights
    /// instead of the caller's. Root checking a job's image uses it, so that its answer
    /// tells the user nothing about files the user cannot see (which root-only files exist,
    /// where links in unreadable directories point), and root never walks into an automount
    /// or a dead NFS server for the user. What the look-up found is then checked with root's
    /// rights.
    pub fn resolving_as(self, user: FsUser) -> Policy {
        Policy {
            resolver: Some(user),
            ..self
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
        // local_path may look the name up, so as the resolver too.
        if let Some(path) = self.as_resolver(|| local_path(image))?.map_err(refuse)? {
            let (resolved, verdict) = self.check_local(image, path)?;
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

    /// Whether [`requires_container`](Self::requires_container) can answer differently for
    /// different partitions: only then is a job's partition worth asking Slurm for.
    pub fn partition_matters(&self) -> bool {
        let global = self.config.require_container;
        self.config
            .partitions
            .values()
            .any(|p| p.require_container.is_some_and(|r| r != global))
    }

    /// The strictest answer of [`requires_container`](Self::requires_container), for a job
    /// whose partition cannot be known: whether any partition, or the global rule, requires
    /// a container.
    pub fn requires_container_anywhere(&self) -> bool {
        self.config.require_container
            || self
                .config
                .partitions
                .values()
                .any(|p| p.require_container == Some(true))
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

    /// Decides on a local image file. The user's path is resolved with the rights of the
    /// [`resolving_as`](Self::resolving_as) user where one is set, so root's answer reveals
    /// nothing that user could not see; the result is then checked with the caller's rights,
    /// one component at a time from `/` without following symlinks.
    fn check_local(&self, image: &str, path: &Path) -> Result<(PathBuf, Verdict)> {
        let shown = reference::shown(image);
        let deny = |p: &Path, reason: String| Ok((p.to_path_buf(), Verdict::Deny { reason }));
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
        let real = match self.as_resolver(|| fs::canonicalize(path))? {
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
        let Some(dir) = self.admin_dir_of(&real) else {
            let resolved = if real == path {
                String::new()
            } else {
                format!(" resolves to {}, which", real.display())
            };
            return deny(
                &real,
                format!(
                    "`{shown}`{resolved} is outside the site's local image directories; {}",
                    self.local_dirs_summary()
                ),
            );
        };
        if let Err(reason) = admin_owned(&real) {
            return deny(
                &real,
                format!("`{shown}` resolves to {}, but {reason}", real.display()),
            );
        }
        Ok((
            real,
            Verdict::Allow {
                rule: format!("local_image_dirs: {}", dir.as_path().display()),
            },
        ))
    }

    /// The listed directory `real` (a resolved path) lies in, if any. A listed directory may
    /// itself be reached through a symlink (/images -> /srv/images), so resolved paths are
    /// compared, component by component; one missing on this node allows nothing here.
    fn admin_dir_of(&self, real: &Path) -> Option<&AdminDir> {
        self.config
            .local_image_dirs
            .iter()
            .find(|dir| fs::canonicalize(dir.as_path()).is_ok_and(|d| real.starts_with(d)))
    }

    /// Checks the local image file `image` hands over as an open descriptor (`berth start
    /// --image-fd`): it must be the very file the path it was opened at names now, and that
    /// path must pass [`check`](Self::check) as a local image. Returns the path.
    pub fn check_local_descriptor(&self, image: &File) -> Result<PathBuf> {
        let refuse = |reason: String| Error::FetchDenied { reason };
        let meta = image
            .metadata()
            .map_err(|e| Error::io("reading the image descriptor", e))?;
        let fd_path = fs::read_link(format!("/proc/self/fd/{}", image.as_raw_fd()))
            .map_err(|e| Error::io("reading the image descriptor's path", e))?;
        let shown = fd_path.display().to_string();
        let Some(path) = fd_path.to_str().filter(|p| p.starts_with('/')) else {
            return Err(refuse(format!(
                "the image descriptor is `{shown}`, not a file reached by a path"
            )));
        };
        match self.check(path)? {
            (ImageRequest::LocalFile(real), Verdict::Allow { .. }) if real == fd_path => {
                // The walk in check_local found every component root-owned and writable by
                // root alone, so the path still names the file the descriptor holds unless
                // root changed it; compare to be sure.
                let now = fs::metadata(&real).map_err(|e| Error::io(&shown, e))?;
                if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
                    return Err(refuse(format!(
                        "the image descriptor's file is no longer at {shown}; start again"
                    )));
                }
                Ok(real)
            }
            (_, Verdict::Deny { reason }) => Err(refuse(reason)),
            (_, Verdict::Allow { .. }) => Err(refuse(format!(
                "the image descriptor's path `{shown}` is not a resolved path"
            ))),
        }
    }

    /// Runs a look-up of a user-written path with the rights of the user set by
    /// [`resolving_as`](Self::resolving_as), or the caller's own.
    fn as_resolver<T>(&self, lookup: impl FnOnce() -> T) -> Result<T> {
        match &self.resolver {
            None => Ok(lookup()),
            Some(user) => berth_sys::fsid::as_user(user, lookup).map_err(|e| {
                Error::io(
                    format!(
                        "taking uid {} gid {} to look the image path up",
                        user.uid, user.gid
                    ),
                    e,
                )
            }),
        }
    }
}

/// Why `file` (an absolute, resolved path) could be replaced by someone other than root, if
/// it could: every directory from `/` down and the file itself must be owned by root and
/// writable by root alone, and the file must be a regular file. The walk opens one component
/// at a time below the previous one (`O_PATH | O_NOFOLLOW`), so a symlink swapped in
/// meanwhile is seen as a symlink and refused, never followed. On success, the file's
/// metadata.
fn admin_owned(file: &Path) -> std::result::Result<fs::Metadata, String> {
    let fix = "so someone other than the site admins could replace the image; every directory \
               from / to a local image, and the image itself, must be owned by root and \
               writable only by root (the site admins must fix this)";
    let mut at = PathBuf::new();
    let mut parent: Option<File> = None;
    let mut parts = file.components().peekable();
    while let Some(part) = parts.next() {
        match (part, &parent) {
            (Component::RootDir, None) | (Component::Normal(_), Some(_)) => {}
            _ => {
                return Err(format!(
                    "{} is not an absolute, resolved path",
                    file.display()
                ))
            }
        }
        at.push(part);
        let opened =
            berth_sys::fsid::open_path_nofollow(parent.as_ref().map(AsFd::as_fd), part.as_os_str())
                .map(File::from);
        let (node, meta) = opened
            .and_then(|node| node.metadata().map(|meta| (node, meta)))
            .map_err(|e| format!("{} cannot be checked ({e})", at.display()))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            return Err(format!(
                "{} is a symbolic link now (was the path changed while it was checked?)",
                at.display()
            ));
        }
        if meta.uid() != 0 {
            return Err(format!(
                "{} is owned by uid {}, {fix}",
                at.display(),
                meta.uid()
            ));
        }
        match meta.mode() & 0o022 {
            0 => {}
            0o020 => return Err(format!("{} is writable by its group, {fix}", at.display())),
            _ => return Err(format!("{} is writable by every user, {fix}", at.display())),
        }
        if parts.peek().is_none() {
            if !kind.is_file() {
                return Err(format!(
                    "{} is not a regular file; a local image is a SIF or squashfs file",
                    at.display()
                ));
            }
            return Ok(meta);
        }
        parent = Some(node);
    }
    Err("an empty path is no image file".into())
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
    use std::os::unix::fs::{symlink, PermissionsExt};

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
        // Where the partition is unknown, the strictest rule.
        assert!(p.requires_container_anywhere());
        assert!(p.partition_matters());
        assert!(
            !policy("[policy.partitions.gpu]\nrequire_container = false\n").partition_matters()
        );
        assert!(
            !policy("[policy]\nrequire_container = true\n[policy.partitions.gpu]\n")
                .partition_matters()
        );
        assert!(Policy::new(&config).requires_container_anywhere());
        assert!(
            !policy("[policy.partitions.gpu]\nrequire_container = false\n")
                .requires_container_anywhere()
        );
    }

    /// A real directory tree: `images/` (listed) with a good image, a symlink inside pointing
    /// outside, a symlink to a good image, a `..` escape, and `outside/` (not listed). It lies
    /// in /var/lib, whose ancestors are root-owned and writable only by root: local images are accepted only in such places. None
    /// (the test is skipped) when not root, who cannot make such a tree.
    struct Tree {
        _dir: tempfile::TempDir,
        images: PathBuf,
        outside: PathBuf,
    }

    fn tree() -> Option<Tree> {
        if berth_sys::identity::effective_uid() != 0 {
            eprintln!("skipped: local image trees must be root-owned, and this is not root");
            return None;
        }
        // Not below the checkout, which may lie under a world-writable /tmp: /var/lib is
        // root's and writable by root alone on every Debian system.
        let dir = tempfile::tempdir_in("/var/lib").unwrap();
        let images = dir.path().join("images");
        let outside = dir.path().join("outside");
        fs::create_dir(&images).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::create_dir(images.join("sub")).unwrap();
        for dir in [&images, &outside, &images.join("sub")] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::write(images.join("good.sif"), b"x").unwrap();
        fs::write(images.join("sub/deep.sif"), b"x").unwrap();
        fs::write(outside.join("evil.sif"), b"x").unwrap();
        symlink(outside.join("evil.sif"), images.join("link-out.sif")).unwrap();
        symlink("good.sif", images.join("link-in.sif")).unwrap();
        symlink(&outside, images.join("dir-out")).unwrap();
        Some(Tree {
            _dir: dir,
            images,
            outside,
        })
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

    fn nobody() -> FsUser {
        FsUser {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        }
    }

    #[test]
    fn local_files_only_from_listed_directories_after_resolving_symlinks() {
        let Some(t) = tree() else { return };
        let p = local_policy(&[&t.images], true);
        let rule = format!("local_image_dirs: {}", t.images.display());
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
                ImageRequest::LocalFile(t.images.join(resolved)),
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
        let Some(t) = tree() else { return };
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
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("good.sif");
        fs::write(&image, b"x").unwrap();
        let p = local_policy(&[dir.path()], false);
        let reason = deny_reason(&p, &image.display().to_string());
        assert!(reason.contains("local_images = false"), "{reason}");
        assert!(reason.contains("localhost:5000/*"), "{reason}");
        let none = local_policy(&[], true);
        let reason = deny_reason(&none, &image.display().to_string());
        assert!(reason.contains("local_image_dirs is empty"), "{reason}");
    }

    #[test]
    fn every_component_from_the_root_must_be_root_owned_and_writable_by_root_alone() {
        let Some(t) = tree() else { return };
        let p = local_policy(&[&t.images], true);
        let deep = t.images.join("sub/deep.sif").display().to_string();
        let sub = t.images.join("sub");
        for (mode, owner, said) in [
            (0o777, 0, "writable by every user"),
            (0o775, 0, "writable by its group"),
            (0o1777, 0, "writable by every user"),
            (0o755, 1100, "owned by uid 1100"),
        ] {
            fs::set_permissions(&sub, fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&sub, Some(owner), None).unwrap();
            let reason = deny_reason(&p, &deep);
            assert!(
                reason.contains(&format!("{} is {said}", sub.display())),
                "{reason}"
            );
            assert!(
                reason.contains("owned by root and writable only by root"),
                "{reason}"
            );
            // Siblings on a clean path stay allowed.
            assert!(matches!(
                verdict(&p, &t.images.join("good.sif").display().to_string()),
                Verdict::Allow { .. }
            ));
        }
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&sub, Some(0), None).unwrap();
        // The file itself, and a writable ancestor above the listed directory.
        let file = t.images.join("sub/deep.sif");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o664)).unwrap();
        assert!(deny_reason(&p, &deep).contains("deep.sif is writable by its group"));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let above = t.images.parent().unwrap();
        fs::set_permissions(above, fs::Permissions::from_mode(0o757)).unwrap();
        let reason = deny_reason(&p, &deep);
        fs::set_permissions(above, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(
            reason.contains(&format!("{} is writable by every user", above.display())),
            "{reason}"
        );
        assert!(matches!(verdict(&p, &deep), Verdict::Allow { .. }));
        // Anywhere under /tmp (world-writable) is refused, listed or not.
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("x.sif"), b"x").unwrap();
        let p = local_policy(&[tmp.path()], true);
        let reason = deny_reason(&p, &tmp.path().join("x.sif").display().to_string());
        assert!(reason.contains("writable by every user"), "{reason}");
    }

    #[test]
    fn the_walk_refuses_a_symlink_it_meets_and_never_follows_it() {
        let Some(t) = tree() else { return };
        // A resolved path is symlink-free; meeting one means the path changed meanwhile.
        let reason = admin_owned(&t.images.join("dir-out/evil.sif")).unwrap_err();
        assert!(reason.contains("dir-out is a symbolic link"), "{reason}");
        let reason = admin_owned(&t.images.join("link-in.sif")).unwrap_err();
        assert!(
            reason.contains("link-in.sif is a symbolic link"),
            "{reason}"
        );
        assert!(admin_owned(&t.images.join("good.sif")).unwrap().is_file());
        let reason = admin_owned(Path::new("relative/x.sif")).unwrap_err();
        assert!(
            reason.contains("not an absolute, resolved path"),
            "{reason}"
        );
    }

    #[test]
    fn paths_are_resolved_with_the_job_users_rights() {
        let Some(t) = tree() else { return };
        // A root-only directory: root would see which files exist there, the user must not.
        let secret = t.images.join("secret");
        fs::create_dir(&secret).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(secret.join("present.sif"), b"x").unwrap();
        fs::set_permissions(
            t.images.parent().unwrap(),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let p = local_policy(&[&t.images], true).resolving_as(nobody());
        let answer = |name: &str| {
            let image = secret.join(name).display().to_string();
            deny_reason(&p, &image).replace(&image, "IMAGE")
        };
        let present = answer("present.sif");
        assert!(present.contains("Permission denied"), "{present}");
        assert_eq!(
            present,
            answer("absent.sif"),
            "the answers tell files apart"
        );
        // What the user may see is still allowed, and root's own check is unchanged.
        let good = t.images.join("good.sif").display().to_string();
        assert!(matches!(verdict(&p, &good), Verdict::Allow { .. }));
        let as_root = local_policy(&[&t.images], true);
        let image = secret.join("present.sif").display().to_string();
        assert!(matches!(verdict(&as_root, &image), Verdict::Allow { .. }));
    }

    #[test]
    fn an_image_descriptor_must_be_an_allowed_file_at_its_own_path() {
        let Some(t) = tree() else { return };
        let p = local_policy(&[&t.images], true);
        let good = File::open(t.images.join("good.sif")).unwrap();
        assert_eq!(
            p.check_local_descriptor(&good).unwrap(),
            t.images.join("good.sif")
        );
        let evil = File::open(t.outside.join("evil.sif")).unwrap();
        let err = p.check_local_descriptor(&evil).unwrap_err().to_string();
        assert!(
            err.contains("outside the site's local image directories"),
            "{err}"
        );
        // Renamed since it was opened (by root: no one else can write there): the
        // descriptor's file is what runs, under its present name.
        fs::rename(t.images.join("good.sif"), t.images.join("old.sif")).unwrap();
        fs::write(t.images.join("good.sif"), b"y").unwrap();
        assert_eq!(
            p.check_local_descriptor(&good).unwrap(),
            t.images.join("old.sif")
        );
        let removed = File::open(t.images.join("good.sif")).unwrap();
        fs::remove_file(t.images.join("good.sif")).unwrap();
        let err = p.check_local_descriptor(&removed).unwrap_err().to_string();
        assert!(err.contains("(deleted)"), "{err}");
        let refused = local_policy(&[&t.images], false);
        let err = refused
            .check_local_descriptor(&good)
            .unwrap_err()
            .to_string();
        assert!(err.contains("local_images = false"), "{err}");
    }

    #[test]
    fn a_bare_name_that_exists_as_a_file_is_a_local_request() {
        // Relative to the working directory, so use a name unique to this test run.
        let p = local_policy(&[Path::new("/srv/images")], false);
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
