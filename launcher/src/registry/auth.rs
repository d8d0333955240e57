//! Registry credentials and authentication challenges.
//!
//! Credentials come from the site's auth file (`[registry] auth_file`, a docker-style
//! `config.json` with an `auths` map). It holds secrets for every user of the node, so berth
//! refuses to read one that is not owned by root (or the service identity running berth) or
//! that others can read or write.
//!
//! Where the site allows it (`[registry] user_credentials`), berth running as an ordinary
//! user (the digest lookup at submission, `berth resolve`) also uses that user's own
//! credentials, from the files podman, skopeo and docker write: never as root, so a node
//! never pulls into the shared cache with one user's credentials.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use crate::{Error, Result};

/// A username and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print the secret, even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` header value.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The site's auth file at `path` (`[registry] auth_file`), read by whoever reads the
/// site's credentials for a pull: root on the node, before it hands the pull to the cache's
/// service user (who cannot read the admin-only file). A missing file means no credentials.
/// An unreadable file (berth running as an ordinary user) also means none: such a caller can
/// still use public repositories.
pub fn read_site_file(path: &Path) -> Result<Option<LoginFile>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let euid = berth_sys::identity::effective_uid();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(auth_error(
            path,
            format!(
                "owned by uid {}, not root; it holds registry secrets, so berth only trusts an \
                 admin-owned file (fix: chown root:root and chmod 600)",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o007 != 0 || meta.mode() & 0o020 != 0 {
        return Err(auth_error(
            path,
            format!(
                "mode {:o} lets other users read or change registry secrets (fix: chmod 600)",
                meta.mode() & 0o7777
            ),
        ));
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(LoginFile {
            path: path.to_path_buf(),
            text: Ok(text),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// The caller's own registry credentials files, in the order podman and skopeo read them:
/// `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
/// `$XDG_CONFIG_HOME/containers/auth.json` (default `~/.config`), then docker's
/// `$DOCKER_CONFIG/config.json` (default `~/.docker`). `home` is the passwd entry's.
pub fn user_auth_files(env: impl Fn(&str) -> Option<String>, home: &Path) -> Vec<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut files = Vec::new();
    files.extend(set("REGISTRY_AUTH_FILE"));
    files.extend(set("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")));
    files.push(
        set("XDG_CONFIG_HOME")
            .unwrap_or_else(|| home.join(".config"))
            .join("containers/auth.json"),
    );
    files.push(
        set("DOCKER_CONFIG")
            .unwrap_or_else(|| home.join(".docker"))
            .join("config.json"),
    );
    files
}

/// One of a user's login files as read with their rights: its text, or why berth does not
/// use it (said only where the file would have been used, as when reading it then).
#[derive(Debug, Clone)]
pub struct LoginFile {
    path: PathBuf,
    text: std::result::Result<String, String>,
}

/// Reads the caller's own `files` (see [`user_auth_files`]); missing ones are skipped. Only
/// files the caller (`uid`) owns count: credentials another user planted would make berth
/// act as that user.
pub fn read_login_files(files: &[PathBuf], uid: u32) -> Result<Vec<LoginFile>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut read = Vec::new();
    for path in files {
        // Judged by the file opened, not the path: a symlink swapped in meanwhile cannot
        // make berth read another user's file. Non-blocking, so a FIFO cannot hang it.
        let Ok(mut file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        else {
            continue;
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let text = if !meta.is_file() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
            Err(format!(
                "not a regular file owned by you (uid {uid}) and writable by you alone, so \
                 berth does not use it (fix: chown and chmod 600 it, or remove it)"
            ))
        } else {
            let mut text = String::new();
            file.read_to_string(&mut text)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            Ok(text)
        };
        read.push(LoginFile {
            path: path.clone(),
            text,
        });
    }
    Ok(read)
}

/// The first entry for `registry` in the login `files` (see [`read_login_files`]), with the
/// file it came from.
pub fn login_for(files: &[LoginFile], registry: &str) -> Result<Option<(Credentials, PathBuf)>> {
    for file in files {
        let text = file
            .text
            .as_ref()
            .map_err(|message| auth_error(&file.path, message.clone()))?;
        if let Some(credentials) = parse_auth_file(&file.path, text, registry)? {
            return Ok(Some((credentials, file.path.clone())));
        }
    }
    Ok(None)
}

pub(crate) fn parse_auth_file(
    path: &Path,
    text: &str,
    registry: &str,
) -> Result<Option<Credentials>> {
    let file: AuthFile = serde_json::from_str(text).map_err(|e| {
        auth_error(
            path,
            format!("not a docker-style config.json ({e}); expected {{\"auths\": {{\"HOST[:PORT]\": {{\"auth\": \"BASE64(user:password)\"}}}}}}"),
        )
    })?;
    let Some((key, entry)) = file
        .auths
        .iter()
        .find(|(key, _)| normalise_key(key) == normalise_key(registry))
    else {
        return Ok(None);
    };
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials {
            username: username.clone(),
            password: password.clone(),
        }));
    }
    let encoded = entry.auth.as_deref().ok_or_else(|| {
        auth_error(
            path,
            format!("entry {key:?} has neither `auth` nor `username` and `password`"),
        )
    })?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| auth_error(path, format!("entry {key:?}: `auth` is not base64 text")))?;
    let (username, password) = decoded.split_once(':').ok_or_else(|| {
        auth_error(
            path,
            format!("entry {key:?}: `auth` must encode USER:PASSWORD"),
        )
    })?;
    Ok(Some(Credentials {
        username: username.into(),
        password: password.into(),
    }))
}

/// `https://host:port/v1/` and `host:port` name the same registry; Docker Hub has several
/// spellings.
fn normalise_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

fn auth_error(path: &Path, message: String) -> Error {
    Error::AuthFile {
        path: path.to_path_buf(),
        message,
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`; parameter
/// values may be quoted (with `\` escapes) and contain commas.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest);
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    } else {
        None
    }
}

fn parse_params(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        let Some(eq) = s.find('=') else { break };
        let key = s[..eq].trim().to_string();
        s = &s[eq + 1..];
        let mut value = String::new();
        if let Some(quoted) = s.strip_prefix('"') {
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            s = &quoted[end..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        out.push((key, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=https://t/x, service="a\"b""#),
            Some(Challenge::Bearer {
                realm: "https://t/x".into(),
                service: Some("a\"b".into()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn reads_docker_config_auths() {
        let p = Path::new("/etc/berth/auth.json");
        let text = r#"{"auths": {
            "https://localhost:5002/v1/": {"auth": "YWxpY2U6czNjcjN0"},
            "other:1": {"username": "bob", "password": "pw"},
            "broken:2": {"auth": "bm9jb2xvbg=="}
        }}"#;
        let c = parse_auth_file(p, text, "localhost:5002").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cr3t")
        );
        assert_eq!(c.basic_header(), "Basic YWxpY2U6czNjcjN0");
        assert_eq!(
            parse_auth_file(p, text, "other:1")
                .unwrap()
                .unwrap()
                .username,
            "bob"
        );
        assert!(parse_auth_file(p, text, "nothere:5000").unwrap().is_none());
        let err = parse_auth_file(p, text, "broken:2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("USER:PASSWORD") && err.contains("/etc/berth/auth.json"),
            "{err}"
        );
        assert!(parse_auth_file(p, r#"{"auths": 5}"#, "x").is_err());
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    fn credentials_for(path: &Path, registry: &str) -> Result<Option<Credentials>> {
        let file = read_site_file(path)?;
        Ok(login_for(file.as_slice(), registry)?.map(|(credentials, _)| credentials))
    }

    fn user_credentials_for(
        files: &[PathBuf],
        registry: &str,
        uid: u32,
    ) -> Result<Option<(Credentials, PathBuf)>> {
        login_for(&read_login_files(files, uid)?, registry)
    }

    #[test]
    fn finds_a_users_own_credentials_where_podman_and_docker_keep_them() {
        let home = Path::new("/home/alice");
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            user_auth_files(env(&[]), home),
            [
                PathBuf::from("/home/alice/.config/containers/auth.json"),
                PathBuf::from("/home/alice/.docker/config.json")
            ]
        );
        assert_eq!(
            user_auth_files(
                env(&[
                    ("REGISTRY_AUTH_FILE", "/tmp/a.json"),
                    ("XDG_RUNTIME_DIR", "/run/user/1100"),
                    ("DOCKER_CONFIG", "/d"),
                    ("XDG_CONFIG_HOME", "")
                ]),
                home
            ),
            [
                PathBuf::from("/tmp/a.json"),
                PathBuf::from("/run/user/1100/containers/auth.json"),
                PathBuf::from("/home/alice/.config/containers/auth.json"),
                PathBuf::from("/d/config.json")
            ]
        );

        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (podman, docker) = (dir.path().join("auth.json"), dir.path().join("config.json"));
        std::fs::write(&podman, r#"{"auths": {"other:1": {"auth": "eDp5"}}}"#).unwrap();
        std::fs::write(
            &docker,
            r#"{"auths": {"r:1": {"username": "alice", "password": "pw"}}}"#,
        )
        .unwrap();
        let files = [
            dir.path().join("missing.json"),
            podman.clone(),
            docker.clone(),
        ];
        let me = berth_sys::identity::effective_uid();
        let (creds, from) = user_credentials_for(&files, "r:1", me).unwrap().unwrap();
        assert_eq!((creds.username.as_str(), from), ("alice", docker.clone()));
        assert!(user_credentials_for(&files, "none:1", me)
            .unwrap()
            .is_none());
        // Another user's file, or one others can change, is refused with the fix.
        let err = user_credentials_for(&files, "r:1", me + 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("owned by you (uid"), "{err}");
        std::fs::set_permissions(&podman, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(user_credentials_for(&files, "r:1", me).is_err());
        // A FIFO in its place neither hangs the reader nor counts as a login file.
        std::fs::remove_file(&podman).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&podman)
            .status()
            .unwrap();
        assert!(made.success());
        let err = user_credentials_for(&files, "r:1", me)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn refuses_an_auth_file_others_can_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        std::fs::write(
            &path,
            r#"{"auths": {"r:1": {"username": "u", "password": "p"}}}"#,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = credentials_for(&path, "r:1").unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            credentials_for(&path, "r:1").unwrap().unwrap().username,
            "u"
        );
        assert!(credentials_for(&dir.path().join("missing"), "r:1")
            .unwrap()
            .is_none());
    }
}
