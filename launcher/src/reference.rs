//! Image references: the strings users write (`--container-image`, `berth exec IMAGE`) parsed
//! into exactly one canonical form, `host[:port]/repository[:tag][@algorithm:hex]`.
//!
//! The policy compares canonical strings, so every way of spelling the same image differently
//! is either mapped to the one spelling by a rule the user can predict (Docker's: a bare name
//! means `docker.io/library/NAME`) or refused with the spelling to use instead (uppercase or a
//! trailing dot in the registry, an explicit default port, Docker Hub's alias hosts, a
//! non-canonical IP address). Refusing rather than silently normalising keeps one form in
//! logs, cache keys and policy rules, and makes look-alike references visible to the user.
//!
//! The grammar is the OCI distribution spec's (repository components
//! `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`, tags `[\w][\w.-]{0,127}`), plus pyxis/enroot's
//! `REGISTRY#IMAGE` form for compatibility. Its `USER@` form is refused: credentials come from
//! the site's auth file, never from a reference a job can set.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use sha2::Digest as _;

use crate::{Error, Result};

/// Longest reference accepted, in bytes. Real references are far shorter; the bound keeps
/// hostile input out of logs, error messages and the plugin's argument vectors.
pub const MAX_REFERENCE_LEN: usize = 4096;

/// Longest repository path, the limit of the distribution reference implementation (and so
/// of the registries built on it).
pub const MAX_REPOSITORY_LEN: usize = 255;

/// Docker Hub's one canonical name; a bare `ubuntu` means `docker.io/library/ubuntu`.
pub const DOCKER_HUB: &str = "docker.io";

/// Other host names of Docker Hub. They are refused in references (write `docker.io`) so the
/// policy never has to know that several names mean one registry.
pub const DOCKER_HUB_ALIASES: &[&str] = &[
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// The one transport prefix that names a registry image (pyxis and skopeo accept it).
const DOCKER_TRANSPORT: &str = "docker://";

/// Tags are at most this long (distribution spec).
const MAX_TAG_LEN: usize = 128;

/// A reference as the user typed it is echoed back in messages; past this length it is cut
/// so an over-long reference cannot flood a job's error output.
const MAX_SHOWN_LEN: usize = 200;

const USER_AT_REASON: &str = "`@` may only introduce a digest (IMAGE@sha256:<64 hex digits>); \
     the pyxis/enroot `USER@` form is not accepted because registry credentials come from the \
     site's auth file, not from the image reference";

/// A content digest, e.g. `sha256:0123...` (64 lowercase hex digits).
///
/// The fields are private so that every `Digest` in the program has been validated: its hex
/// is safe to use as a file name in the cache and its `Display` is the canonical spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: DigestAlgorithm,
    hex: String,
}

/// The digest algorithms the OCI image spec registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    /// The name used in digests, e.g. `sha256`.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 64,
            DigestAlgorithm::Sha512 => 128,
        }
    }
}

impl Digest {
    /// Parses `algorithm:hex`, accepting only sha256 and sha512 with exactly the right number
    /// of lowercase hex digits (uppercase hex would be a second spelling of the same digest).
    pub fn parse(text: &str) -> Result<Digest> {
        parse_digest(text).map_err(|reason| Error::InvalidDigest {
            digest: shown(text),
            reason,
        })
    }

    /// The digest of `bytes` (e.g. to verify a manifest against the digest it was asked by).
    pub fn compute(algorithm: DigestAlgorithm, bytes: &[u8]) -> Digest {
        let hex = match algorithm {
            DigestAlgorithm::Sha256 => hex::encode(sha2::Sha256::digest(bytes)),
            DigestAlgorithm::Sha512 => hex::encode(sha2::Sha512::digest(bytes)),
        };
        Digest { algorithm, hex }
    }

    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// The lowercase hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

fn parse_digest(text: &str) -> Result<Digest, String> {
    let (name, hex) = text
        .split_once(':')
        .ok_or("a digest is written ALGORITHM:HEX, e.g. sha256:<64 hex digits>")?;
    let algorithm = match name {
        "sha256" => DigestAlgorithm::Sha256,
        "sha512" => DigestAlgorithm::Sha512,
        other => {
            return Err(format!(
                "unsupported digest algorithm `{}`; use sha256 or sha512",
                other.escape_debug()
            ))
        }
    };
    if hex.len() != algorithm.hex_len() {
        return Err(format!(
            "a {} digest has {} hex digits, this one has {}",
            algorithm.name(),
            algorithm.hex_len(),
            hex.len()
        ));
    }
    if !hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("digest hex digits must be 0-9 and lowercase a-f".into());
    }
    Ok(Digest {
        algorithm,
        hex: hex.to_owned(),
    })
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Digest> {
        Digest::parse(s)
    }
}

/// A registry image reference in canonical form. `Display` prints the canonical string and
/// `Reference::parse` of that string gives the same value back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Canonical `host[:port]`: lowercase, no trailing dot, no default port, `docker.io` for
    /// Docker Hub.
    pub registry: String,
    /// Repository path, e.g. `test/busybox`, `library/ubuntu`.
    pub repository: String,
    pub tag: Option<String>,
    /// When present it decides what is fetched; a tag next to it is only a label.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses what a user wrote: `[docker://]NAME[:TAG][@DIGEST]` where NAME is
    /// `[REGISTRY/]REPOSITORY` or pyxis's `REGISTRY#REPOSITORY`. Refuses, with the reason and
    /// the fix, anything that is not one canonical registry reference.
    pub fn parse(input: &str) -> Result<Reference> {
        parse_reference(input).map_err(|reason| Error::InvalidReference {
            image: shown(input),
            reason,
        })
    }

    /// The same image pinned to `digest` (the tag is kept as a label for humans).
    pub fn pinned(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The tag to resolve when no digest is given; Docker's default is `latest`.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }

    /// `registry/repository`, the part policy patterns match.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Reference> {
        Reference::parse(s)
    }
}

/// The input as it may be echoed in a message: control characters escaped, cut when long.
pub fn shown(input: &str) -> String {
    let escaped: String = input.escape_debug().collect();
    if escaped.chars().count() <= MAX_SHOWN_LEN {
        return escaped;
    }
    let cut: String = escaped.chars().take(MAX_SHOWN_LEN).collect();
    format!("{cut}... ({} bytes)", input.len())
}

/// Checks that apply to every image argument, reference or file path: not empty, not
/// starting with `-`, not over-long, printable ASCII without spaces.
pub fn check_text(input: &str) -> Result<(), String> {
    if input.is_empty() {
        return Err(
            "the image is empty; give a reference like registry.example.org/team/image:tag".into(),
        );
    }
    // No reference starts with `-`, and a program handed one could take it for an option
    // (`-h` once made root's `berth policy check` print its help and exit 0).
    if input.starts_with('-') {
        return Err(
            "it starts with `-`, like a command-line option; image references never do \
             (give a local file starting with `-` as ./NAME or by absolute path)"
                .into(),
        );
    }
    if input.len() > MAX_REFERENCE_LEN {
        return Err(format!(
            "it is {} bytes long; image references longer than {MAX_REFERENCE_LEN} bytes are refused",
            input.len()
        ));
    }
    if let Some((at, c)) = input.char_indices().find(|(_, c)| !c.is_ascii()) {
        return Err(format!(
            "it contains the non-ASCII character {c:?} at byte {at}; image references are \
             ASCII (check for a look-alike letter)"
        ));
    }
    if let Some(at) = input
        .bytes()
        .position(|b| b.is_ascii_control() || b == b' ')
    {
        return Err(format!(
            "it contains whitespace or a control character at byte {at}; remove it"
        ));
    }
    Ok(())
}

/// Whether `name` (without transport prefix) starts with an explicit registry, by Docker's
/// rule: a first path component containing `.` or `:`, or `localhost`, is a registry; pyxis's
/// `REGISTRY#IMAGE` names one too. Anything else is a Docker Hub repository.
pub fn has_explicit_registry(name: &str) -> bool {
    match name.split_once('/') {
        Some((first, _)) => looks_like_registry(first) || first.contains('#'),
        None => name.contains('#'),
    }
}

fn looks_like_registry(component: &str) -> bool {
    component.contains('.')
        || component.contains(':')
        || component.eq_ignore_ascii_case("localhost")
}

fn parse_reference(input: &str) -> Result<Reference, String> {
    check_text(input)?;
    let rest = input.strip_prefix(DOCKER_TRANSPORT).unwrap_or(input);
    if let Some((transport, _)) = rest.split_once("://") {
        return Err(format!(
            "the `{transport}://` transport is not supported: berth runs images from the site's \
             approved registries (`docker://` or no prefix), not from local daemons or archives"
        ));
    }
    if rest.starts_with(['/', '.', '~']) {
        return Err("this is a file path, not a registry reference".into());
    }

    let (name_and_tag, digest) = split_digest(rest)?;
    if name_and_tag.contains('@') {
        return Err(USER_AT_REASON.into());
    }

    // The tag follows the last ':' after the last '/', so a registry port is never a tag.
    let last_part = name_and_tag.rfind(['/', '#']).map_or(0, |i| i + 1);
    let (name, tag) = match name_and_tag[last_part..].rfind(':') {
        Some(i) => {
            let at = last_part + i;
            (&name_and_tag[..at], Some(&name_and_tag[at + 1..]))
        }
        None => (name_and_tag, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }

    let (registry, repository) = split_registry(name)?;
    check_registry(registry)?;
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        // Docker's rule: official images live under `library/`.
        format!("library/{repository}")
    } else {
        repository.to_owned()
    };
    check_repository(&repository)?;

    Ok(Reference {
        registry: registry.to_owned(),
        repository,
        tag: tag.map(str::to_owned),
        digest,
    })
}

/// Splits off `@DIGEST`. An `@` followed by something shaped like `algorithm:hex` (no `/`) is a
/// digest and must be a valid one; any other `@` is left for the caller to refuse as `USER@`.
fn split_digest(text: &str) -> Result<(&str, Option<Digest>), String> {
    let Some((name, after)) = text.rsplit_once('@') else {
        return Ok((text, None));
    };
    let digest_shaped = !after.contains('/')
        && after.split_once(':').is_some_and(|(alg, _)| {
            !alg.is_empty()
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+._-".contains(&b))
        });
    if !digest_shaped {
        return Err(USER_AT_REASON.into());
    }
    Ok((name, Some(parse_digest(after)?)))
}

/// Splits NAME into registry and repository: pyxis's `REGISTRY#REPOSITORY` (exactly one `#`,
/// after a registry host), Docker's `REGISTRY/REPOSITORY`, or an implied `docker.io`.
fn split_registry(name: &str) -> Result<(&str, &str), String> {
    if let Some((registry, repository)) = name.split_once('#') {
        if repository.contains('#') {
            return Err("more than one `#`; the only accepted use is REGISTRY#IMAGE".into());
        }
        if registry.contains('/') || !looks_like_registry(registry) {
            return Err(format!(
                "`#` must follow a registry host (REGISTRY#IMAGE, e.g. nvcr.io#nvidia/pytorch), \
                 and `{}` is not one: a registry name contains `.` or `:` or is `localhost`",
                registry.escape_debug()
            ));
        }
        return Ok((registry, repository));
    }
    match name.split_once('/') {
        Some((first, rest)) if looks_like_registry(first) => Ok((first, rest)),
        _ => Ok((DOCKER_HUB, name)),
    }
}

/// Accepts only the one canonical spelling of `host[:port]`; for a fixable variant the
/// message gives the canonical spelling to write instead.
pub fn check_registry(registry: &str) -> Result<(), String> {
    let (canonical, differences) = canonical_registry(registry)?;
    if canonical == registry {
        return Ok(());
    }
    Err(format!(
        "registry `{}` is not written in its one canonical form ({}); write `{canonical}`",
        registry.escape_debug(),
        differences.join(", ")
    ))
}

/// The canonical spelling of a registry and the list of ways `registry` differs from it, or
/// why it is not a registry at all.
fn canonical_registry(registry: &str) -> Result<(String, Vec<&'static str>), String> {
    let mut differences = Vec::new();
    let (host, port) = if let Some(bracketed) = registry.strip_prefix('[') {
        let (addr, after) = bracketed
            .split_once(']')
            .ok_or("unterminated `[` in an IPv6 registry address")?;
        let ip: Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("`[{}]` is not an IPv6 address", addr.escape_debug()))?;
        let canonical = format!("[{ip}]");
        if canonical[1..canonical.len() - 1] != *addr {
            differences.push("IPv6 address not in its shortest lowercase form");
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or("only `:PORT` may follow an IPv6 registry address")?,
            ),
        };
        (canonical, port)
    } else {
        let (host, port) = match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        };
        (canonical_host(host, &mut differences)?, port)
    };

    let mut canonical = host;
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
            return Err(format!(
                "`{}` is not a port number (1-65535)",
                port.escape_debug()
            ));
        }
        let number: u16 = match port.parse() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("`{port}` is not a port number (1-65535)")),
        };
        if number.to_string() != port {
            differences.push("leading zeros in the port");
        }
        // HTTPS registries are reached on 443 and plain-HTTP ones on 80 when no port is
        // written, so `:443`/`:80` would be a second name for the same endpoint.
        if number == 443 || number == 80 {
            differences.push("explicit default port");
        } else {
            canonical = format!("{canonical}:{number}");
        }
    }
    Ok((canonical, differences))
}

fn canonical_host(host: &str, differences: &mut Vec<&'static str>) -> Result<String, String> {
    let mut lower = host.to_ascii_lowercase();
    if lower != host {
        differences.push("uppercase letters");
    }
    if lower.ends_with('.') {
        differences.push("trailing dot");
        lower = lower.trim_end_matches('.').to_owned();
    }
    if lower.is_empty() {
        return Err("the registry host name is empty".into());
    }
    if lower.len() > 253 {
        return Err("the registry host name is longer than 253 characters".into());
    }
    let labels: Vec<&str> = lower.split('.').collect();
    for label in &labels {
        let bytes = label.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-';
        if !valid {
            return Err(format!(
                "`{}` is not a valid host name: each dot-separated part must be 1-63 letters, \
                 digits or inner hyphens",
                host.escape_debug()
            ));
        }
    }
    if labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        // Resolvers read `127.1` or `0127.0.0.1` as addresses too; only the dotted quad of
        // plain decimal numbers is accepted, so one address has one spelling.
        let octets: Vec<u8> = labels.iter().filter_map(|l| l.parse().ok()).collect();
        let [a, b, c, d] = octets[..] else {
            return Err(format!(
                "`{host}` is not an IPv4 address: write four numbers 0-255, e.g. 127.0.0.1"
            ));
        };
        let canonical = Ipv4Addr::new(a, b, c, d).to_string();
        if canonical != lower {
            differences.push("leading zeros in the IPv4 address");
        }
        return Ok(canonical);
    }
    if DOCKER_HUB_ALIASES.contains(&lower.as_str()) {
        differences.push("an alias of Docker Hub");
        return Ok(DOCKER_HUB.to_owned());
    }
    Ok(lower)
}

/// Checks a repository path: `/`-separated components of the distribution grammar, which also
/// rules out `.`, `..`, empty components and uppercase.
pub fn check_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("the repository name is empty".into());
    }
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(format!(
            "the repository name is {} characters long; registries accept at most {MAX_REPOSITORY_LEN}",
            repository.len()
        ));
    }
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "repository `{repository}` has uppercase letters; repository names are lowercase"
        ));
    }
    for component in repository.split('/') {
        check_component(component)
            .map_err(|why| format!("repository `{}`: {why}", repository.escape_debug()))?;
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn check_component(component: &str) -> Result<(), String> {
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    match bytes {
        [] => return Err("empty path component (`//`, or `/` at an end)".into()),
        b"." | b".." => return Err(format!("`{component}` path components are refused")),
        _ => {}
    }
    if !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "path component `{}` must start and end with a lowercase letter or digit",
            component.escape_debug()
        ));
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let valid = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !valid {
            return Err(format!(
                "path component `{}` has `{}` between letters; only `.`, `_`, `__` or dashes \
                 may separate them",
                component.escape_debug(),
                separator.escape_debug()
            ));
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "tag `{}` is not valid: a tag is 1-{MAX_TAG_LEN} letters, digits, `_`, `.` or `-`, \
             not starting with `.` or `-`",
            tag.escape_debug()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{HEX}")).unwrap()
    }

    #[test]
    fn valid_references_parse_to_their_canonical_form() {
        let d = format!("sha256:{HEX}");
        let cases: Vec<(String, &str, &str, Option<&str>, bool)> = vec![
            // input, registry, repository, tag, has digest
            ("ubuntu".into(), "docker.io", "library/ubuntu", None, false),
            (
                "ubuntu:22.04".into(),
                "docker.io",
                "library/ubuntu",
                Some("22.04"),
                false,
            ),
            (
                "nvidia/cuda:12".into(),
                "docker.io",
                "nvidia/cuda",
                Some("12"),
                false,
            ),
            (
                "docker.io/ubuntu".into(),
                "docker.io",
                "library/ubuntu",
                None,
                false,
            ),
            (
                "docker://ubuntu".into(),
                "docker.io",
                "library/ubuntu",
                None,
                false,
            ),
            ("localhost/x".into(), "localhost", "x", None, false),
            (
                "localhost:5000/test/busybox".into(),
                "localhost:5000",
                "test/busybox",
                None,
                false,
            ),
            (
                "localhost:5000/test/busybox:1.36".into(),
                "localhost:5000",
                "test/busybox",
                Some("1.36"),
                false,
            ),
            (
                format!("localhost:5000/test/busybox@{d}"),
                "localhost:5000",
                "test/busybox",
                None,
                true,
            ),
            (
                format!("localhost:5000/test/busybox:v1@{d}"),
                "localhost:5000",
                "test/busybox",
                Some("v1"),
                true,
            ),
            (
                "docker://nvcr.io/nvidia/pytorch:24.05-py3".into(),
                "nvcr.io",
                "nvidia/pytorch",
                Some("24.05-py3"),
                false,
            ),
            (
                "nvcr.io#nvidia/pytorch:21.04-py3".into(),
                "nvcr.io",
                "nvidia/pytorch",
                Some("21.04-py3"),
                false,
            ),
            (
                "localhost:5000#test/busybox".into(),
                "localhost:5000",
                "test/busybox",
                None,
                false,
            ),
            (
                "127.0.0.1:5000/a/b/c".into(),
                "127.0.0.1:5000",
                "a/b/c",
                None,
                false,
            ),
            ("[::1]:5000/a".into(), "[::1]:5000", "a", None, false),
            (
                "reg.example.org/a.b_c__d---e/f:_T.x-1".into(),
                "reg.example.org",
                "a.b_c__d---e/f",
                Some("_T.x-1"),
                false,
            ),
        ];
        for (input, registry, repository, tag, has_digest) in cases {
            let r = Reference::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry, registry, "{input}");
            assert_eq!(r.repository, repository, "{input}");
            assert_eq!(r.tag.as_deref(), tag, "{input}");
            assert_eq!(r.digest.is_some(), has_digest, "{input}");
            let again = Reference::parse(&r.to_string()).unwrap();
            assert_eq!(again, r, "round trip of {input} via {r}");
        }
    }

    #[test]
    fn display_is_the_canonical_string() {
        let r = Reference::parse("nvcr.io#nvidia/pytorch:21.04").unwrap();
        assert_eq!(r.to_string(), "nvcr.io/nvidia/pytorch:21.04");
        let r = Reference::parse("ubuntu").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/ubuntu");
        assert_eq!(r.tag_or_latest(), "latest");
        assert_eq!(r.name(), "docker.io/library/ubuntu");
        let p = r.pinned(digest());
        assert_eq!(
            p.to_string(),
            format!("docker.io/library/ubuntu@sha256:{HEX}")
        );
        let t = Reference::parse("x.io/a:v2").unwrap().pinned(digest());
        assert_eq!(t.to_string(), format!("x.io/a:v2@sha256:{HEX}"));
        assert_eq!(t.tag_or_latest(), "v2");
    }

    #[test]
    fn tricks_are_refused_with_the_cause_and_the_fix() {
        let long = format!("localhost:5000/{}", "a/".repeat(3000));
        let long_repo = format!("localhost:5000/{}", "a".repeat(300));
        let long_tag = format!("localhost:5000/a:{}", "t".repeat(129));
        let cases: Vec<(&str, &str)> = vec![
            // (input, a fragment the message must contain)
            ("", "empty"),
            (&long, "longer than 4096 bytes"),
            (&long_repo, "at most 255"),
            (&long_tag, "tag"),
            ("LOCALHOST:5000/test/x", "write `localhost:5000`"),
            ("Localhost/test/x", "write `localhost`"),
            ("Registry.Example.org/a", "uppercase letters"),
            ("localhost:5000./a", "not a port number"),
            ("localhost.:5000/a", "trailing dot); write `localhost:5000`"),
            (
                "registry.example.org./a",
                "trailing dot); write `registry.example.org`",
            ),
            (
                "registry.example.org:443/a",
                "explicit default port); write `registry.example.org`",
            ),
            ("registry.example.org:80/a", "explicit default port"),
            (
                "localhost:05000/a",
                "leading zeros in the port); write `localhost:5000`",
            ),
            ("127.000.0.1:5000/a", "write `127.0.0.1:5000`"),
            ("127.1:5000/a", "not an IPv4 address"),
            ("[0:0::1]:5000/a", "write `[::1]:5000`"),
            (
                "index.docker.io/library/ubuntu",
                "alias of Docker Hub); write `docker.io`",
            ),
            ("registry-1.docker.io/library/ubuntu", "write `docker.io`"),
            ("localhost:99999/a", "not a port number"),
            ("localhost:/a", "not a port number"),
            ("ex_ample.com/a", "not a valid host name"),
            ("bad-.com/a", "not a valid host name"),
            ("-bad.com/a", "starts with `-`"),
            (
                "user@localhost:5000/test/x",
                "credentials come from the site's auth file",
            ),
            (
                "user:pw@localhost:5000/test/x",
                "credentials come from the site's auth file",
            ),
            ("user@nvcr.io#nvidia/pytorch", "credentials"),
            ("localhost:5000/x@", "`@` may only introduce a digest"),
            ("a#b#c", "more than one `#`"),
            ("nvidia#pytorch", "must follow a registry host"),
            ("localhost:5000/test#x", "must follow a registry host"),
            ("localhost:5000/a#b", "must follow a registry host"),
            ("localhost:5000/../x", "`..` path components are refused"),
            ("localhost:5000/test/./x", "`.` path components are refused"),
            ("localhost:5000//x", "empty path component"),
            ("localhost:5000/x/", "empty path component"),
            ("localhost:5000/", "empty"),
            ("localhost:5000/Test/x", "lowercase"),
            ("localhost:5000/a..b", "only `.`, `_`, `__` or dashes"),
            ("localhost:5000/a___b", "only `.`, `_`, `__` or dashes"),
            ("localhost:5000/-a", "must start and end"),
            ("localhost:5000/a:.x", "tag"),
            ("localhost:5000/a:", "tag"),
            (
                "localhost:5000/a b",
                "whitespace or a control character at byte 16",
            ),
            ("localhost:5000/a\tb", "whitespace or a control character"),
            ("-h", "starts with `-`"),
            ("--help", "like a command-line option"),
            ("--config=/tmp/x", "starts with `-`"),
            ("localhost:5000/a\nb", "whitespace or a control character"),
            ("lоcalhost:5000/a", "non-ASCII"), // Cyrillic 'о'
            ("/opt/images/x.sif", "file path"),
            ("./x.sif", "file path"),
            ("~/x.sif", "file path"),
            ("file:///opt/x.sif", "`file://` transport is not supported"),
            ("dockerd://ubuntu", "`dockerd://` transport"),
            ("podman://ubuntu", "`podman://` transport"),
            ("docker://docker://ubuntu", "`docker://` transport"),
            (
                "localhost:5000/a@sha256:abc",
                "has 64 hex digits, this one has 3",
            ),
            (
                "localhost:5000/a@md5:0123",
                "unsupported digest algorithm `md5`",
            ),
        ];
        for (input, fragment) in cases {
            let err = match Reference::parse(input) {
                Ok(r) => panic!("{input:?} was accepted as {r}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(fragment), "{input:?}: {err}");
            assert!(err.len() < 1000, "message for {input:?} is not cut: {err}");
        }
    }

    #[test]
    fn digests_are_validated() {
        assert_eq!(digest().to_string(), format!("sha256:{HEX}"));
        assert_eq!(digest().algorithm(), DigestAlgorithm::Sha256);
        assert_eq!(digest().hex(), HEX);
        let long = format!("sha512:{HEX}{HEX}");
        assert_eq!(Digest::parse(&long).unwrap().to_string(), long);
        for bad in [
            format!("sha256:{}", HEX.to_uppercase()),
            format!("sha256:{HEX}0"),
            format!("sha512:{HEX}"),
            format!("SHA256:{HEX}"),
            format!("sha256{HEX}"),
            format!("sha256:{}g", &HEX[1..]),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn computed_digests_match_known_values() {
        // sha256("") and sha512("") from FIPS 180-4's test vectors.
        assert_eq!(
            Digest::compute(DigestAlgorithm::Sha256, b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(Digest::compute(DigestAlgorithm::Sha512, b"")
            .hex()
            .starts_with("cf83e1357eefb8bd"));
    }

    #[test]
    fn explicit_registry_follows_dockers_rule() {
        for (name, explicit) in [
            ("ubuntu", false),
            ("nvidia/cuda", false),
            ("busybox.sqsh", false),
            ("images/x.sif", false),
            ("localhost/x", true),
            ("localhost:5000/x", true),
            ("nvcr.io/nvidia/x", true),
            ("nvcr.io#nvidia/x", true),
        ] {
            assert_eq!(has_explicit_registry(name), explicit, "{name}");
        }
    }

    #[test]
    fn shown_escapes_and_cuts() {
        assert_eq!(shown("a\nb"), "a\\nb");
        let s = shown(&"x".repeat(5000));
        assert!(s.len() < 300 && s.ends_with("(5000 bytes)"), "{s}");
    }
}
