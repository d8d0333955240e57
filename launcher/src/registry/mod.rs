//! A small blocking client for the OCI distribution API (pull only).
//!
//! Blocking on purpose: berth runs inside Slurm process trees, where an async runtime and its
//! threads buy nothing for a handful of sequential requests. Everything a registry sends is
//! checked before use: manifests and blobs against their digests (while streaming, for blobs),
//! sizes against the manifest, and redirects against the site policy:
//!
//! - manifest requests follow a redirect only within the request's own registry and
//!   repository, token requests only within the token service's host (they decide *what*
//!   runs, and may carry credentials);
//! - blob requests may be redirected to the registry itself or, over HTTPS, to the hosts
//!   the site lists in `[registry] blob_hosts` (registries hand out CDN or S3 URLs): nothing
//!   else, so a registry cannot make the node (root) fetch internal URLs. The bytes are
//!   verified against the digest from the manifest, and credentials never leave the
//!   registry's origin;
//! - the site's credentials go to a token service on another host than the registry only
//!   when `[registry] token_hosts` lists it; elsewhere tokens are asked for anonymously;
//! - text a registry sends (error bodies) reaches messages only summarised: short, and with
//!   control characters escaped.
//!
//! Here: the client, its credentials and CA files, manifests and small blobs. Requests,
//! retries and redirects are in `request`, logging in (basic, bearer tokens) in `token`,
//! digest checks in `verify`, layer downloads in `download`, the cache's access records in
//! `access`.
//!
//! TLS trusts the system roots plus the registry's own CA files from the containers layout
//! (`<certs_dir>/HOST[:PORT]/*.crt`). Proxies come from `HTTPS_PROXY`/`HTTP_PROXY`/
//! `NO_PROXY`. Transport errors, 429 and 5xx are retried `retries` times with backoff, then
//! reported as the registry being down.

pub mod access;
pub mod auth;
mod download;
mod hosts;
mod landing;
pub mod manifest;
pub mod mirrors;
pub mod progress;
mod request;
mod token;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::config::RegistryConfig;
use crate::reference::{Digest, DigestAlgorithm, Reference};
use crate::{Error, Result};
use access::Puller;
use auth::Credentials;
use berth_sys::fsid::FsUser;
pub use download::BlobJob;
pub use hosts::HostPattern;
pub use landing::Landing;
use manifest::{Descriptor, ImageManifest, Manifest, MANIFEST_ACCEPT};
pub use mirrors::{Endpoint, MirrorRule};
use request::{header, read_small};
pub use verify::Verifier;

// For the fuzz targets (crate::fuzz): what a registry or its token service sends back.
pub(crate) use request::error_text;
pub(crate) use token::token_of;

/// Manifests, indexes, image configs and token answers are small; a registry that sends more
/// is broken or hostile.
const SMALL_DOCUMENT_LIMIT: u64 = 8 << 20;
const MAX_REDIRECTS: u32 = 5;
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What a request is for; decides redirect and credential rules and the 404 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Manifest,
    Token,
    Blob,
}

/// How a client may talk to its registry, decided by the caller from the site policy.
pub struct ClientOptions {
    /// The policy approved plain HTTP for this registry.
    pub plain_http: bool,
    /// No progress lines on stderr.
    pub quiet: bool,
    /// The logins the client may pull with (see [`Logins::read`]).
    pub logins: Logins,
}

/// The registry logins a pull may use, read before it starts: root hands a node's pull to
/// the cache's service user, who can read neither the site's file nor a user's.
#[derive(Debug, Clone, Default)]
pub struct Logins {
    /// The site's `[registry] auth_file`.
    site: Option<auth::LoginFile>,
    /// A user's own login, used where the site has no credentials for the registry (see
    /// [`access`]).
    user: Option<UserLogin>,
}

/// A user's own registry login files, read with their rights, and their uid.
#[derive(Debug, Clone)]
struct UserLogin {
    uid: u32,
    files: Vec<auth::LoginFile>,
}

impl Logins {
    /// The site's credentials file, and the login files whose credentials a pull may use
    /// where the site has none, where `[registry] user_credentials` allows: a user's own run
    /// reads the caller's (found through its environment); root's own pulls use the site's
    /// credentials only; root pulling for a job `user` reads that user's, from their home and
    /// runtime directories only (the job's environment is not root's to follow), with their
    /// rights so root opens nothing they could not, and the cache records the pull (see
    /// [`access`]).
    pub fn read(config: &RegistryConfig, user: Option<&FsUser>) -> Result<Logins> {
        Ok(Logins {
            site: auth::read_site_file(&config.auth_file)?,
            user: user_login(config, user)?,
        })
    }
}

/// A manifest as the registry served it, with the digest of its exact bytes.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub digest: Digest,
    pub manifest: Manifest,
}

/// The image a reference names on this host's platform.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The digest the reference pointed to: an index or an image manifest. Pinning this keeps
    /// a multi-platform image multi-platform.
    pub target: Digest,
    /// The image manifest for this host's platform (the same as `target` for
    /// single-platform images): the cache key.
    pub manifest_digest: Digest,
    pub manifest: ImageManifest,
}

pub struct Client {
    /// The host contacted (a mirror's, for a mirror), for messages and credentials.
    registry: String,
    base: String,
    /// A mirror's project path before every repository, or empty.
    prefix: String,
    agent: ureq::Agent,
    credentials: Option<Credentials>,
    /// Where credentials would come from, for the message when there are none.
    auth_file: PathBuf,
    /// A user's own credentials files are used (`[registry] user_credentials`).
    own_credentials: bool,
    /// Whose credentials this client pulls with, for the cache's access record.
    puller: Puller,
    /// The Authorization header for the registry (basic or a bearer token), shared by the
    /// parallel downloads; replaced when a token expires.
    authorization: Mutex<Option<String>>,
    retries: u32,
    max_retry_wait: Duration,
    parallel: usize,
    blob_hosts: Vec<HostPattern>,
    token_hosts: Vec<HostPattern>,
    options: ClientOptions,
    mirror: Option<String>,
}

impl Client {
    /// A client for `registry` (canonical `host[:port]`) itself, mirrors aside.
    pub fn new(config: &RegistryConfig, registry: &str, options: ClientOptions) -> Result<Client> {
        let endpoint = Endpoint {
            host: registry.to_string(),
            prefix: String::new(),
            mirror_of: None,
        };
        Client::for_endpoint(config, &endpoint, options)
    }

    /// The mirror this client pulls from (`host/prefix (mirror of upstream)`), None for the
    /// registry itself: named on a pull's progress line.
    pub fn mirror(&self) -> Option<&str> {
        self.mirror.as_deref()
    }

    /// A client for one endpoint: a registry or a mirror of one. CA files and credentials
    /// are the endpoint host's own.
    pub fn for_endpoint(
        config: &RegistryConfig,
        endpoint: &Endpoint,
        options: ClientOptions,
    ) -> Result<Client> {
        let registry = endpoint.host.as_str();
        let logins = &options.logins;
        let own_credentials = logins.user.is_some();
        let (credentials, puller) = match auth::login_for(logins.site.as_slice(), registry)? {
            Some((site, _)) => (Some(site), Puller::Site),
            None => match &logins.user {
                Some(login) => match auth::login_for(&login.files, registry)? {
                    Some((credentials, _)) => (Some(credentials), Puller::User(login.uid)),
                    None => (None, Puller::Site),
                },
                None => (None, Puller::Site),
            },
        };
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(root_certs(&config.certs_dir, registry)?)
            .build();
        let timeout = Some(Duration::from_secs(config.timeout_secs.max(1)));
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .proxy(config.agent_proxy())
            .http_status_as_error(false)
            .max_redirects(0)
            .https_only(!options.plain_http)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(timeout)
            .timeout_recv_response(timeout)
            .timeout_per_read(timeout)
            .build()
            .new_agent();
        let scheme = if options.plain_http { "http" } else { "https" };
        // Docker Hub's canonical name is not the host that serves its API.
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        Ok(Client {
            registry: registry.to_string(),
            base: format!("{scheme}://{host}"),
            prefix: endpoint.prefix.clone(),
            agent,
            credentials,
            auth_file: config.auth_file.clone(),
            own_credentials,
            puller,
            authorization: Mutex::new(None),
            retries: config.retries.max(1),
            max_retry_wait: Duration::from_secs(config.max_retry_wait_secs),
            parallel: config.parallel_downloads.max(1),
            blob_hosts: config.blob_hosts.clone(),
            token_hosts: config.token_hosts.clone(),
            options,
            mirror: endpoint.mirror_of.is_some().then(|| endpoint.describe()),
        })
    }

    /// Whose credentials this client pulls with.
    pub fn puller(&self) -> Puller {
        self.puller
    }

    /// Fetches a manifest by tag or digest. A manifest asked for by digest must hash to it.
    pub fn manifest(&self, repository: &str, reference: &Reference) -> Result<FetchedManifest> {
        let wanted = reference
            .digest
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_else(|| reference.tag_or_latest().to_string());
        let url = format!(
            "{}/v2/{}/manifests/{wanted}",
            self.base,
            self.path(repository)
        );
        let shown = reference.to_string();
        let resp = self.get(url, Some(MANIFEST_ACCEPT), Purpose::Manifest, &shown)?;
        let content_type = header(resp.headers(), "content-type").unwrap_or_default();
        let bytes = read_small(resp, &shown)?;
        let algorithm = reference
            .digest
            .as_ref()
            .map_or(DigestAlgorithm::Sha256, |d| d.algorithm());
        let digest = Digest::compute(algorithm, &bytes);
        if let Some(expected) = &reference.digest {
            if &digest != expected {
                return Err(Error::DigestMismatch {
                    what: format!("manifest of {shown}"),
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let manifest = Manifest::parse(&shown, &content_type, &bytes)?;
        Ok(FetchedManifest { digest, manifest })
    }

    /// Resolves a reference to the image manifest for this host's platform.
    pub fn resolve(&self, reference: &Reference) -> Result<ResolvedImage> {
        let top = self.manifest(&reference.repository, reference)?;
        match top.manifest {
            Manifest::Image(manifest) => Ok(ResolvedImage {
                target: top.digest.clone(),
                manifest_digest: top.digest,
                manifest,
            }),
            Manifest::Index(index) => {
                let shown = reference.to_string();
                let entry = manifest::choose_platform(&shown, &index, &manifest::host_platform())?;
                let pinned = reference.pinned(entry.digest()?);
                let chosen = self.manifest(&reference.repository, &pinned)?;
                match chosen.manifest {
                    Manifest::Image(manifest) => Ok(ResolvedImage {
                        target: top.digest,
                        manifest_digest: chosen.digest,
                        manifest,
                    }),
                    Manifest::Index(_) => Err(Error::Manifest {
                        reference: shown,
                        message: "an image index points to another index; berth follows one \
                                  level only"
                            .into(),
                    }),
                }
            }
        }
    }

    /// Fetches a small blob (the image config) into memory, verified.
    pub fn small_blob(&self, repository: &str, desc: &Descriptor) -> Result<Vec<u8>> {
        let digest = desc.digest()?;
        let what = format!("blob {digest} of {}/{repository}", self.registry);
        if desc.size > SMALL_DOCUMENT_LIMIT {
            return Err(self.error(format!(
                "{what} is {} bytes, too big for an image config",
                desc.size
            )));
        }
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.path(repository));
        let resp = self.get(url, None, Purpose::Blob, &what)?;
        let bytes = read_small(resp, &what)?;
        let mut verifier = Verifier::new(&digest, desc.size, what);
        verifier.update(&bytes)?;
        verifier.finish()?;
        Ok(bytes)
    }

    /// A repository's path on this endpoint.
    fn path(&self, repository: &str) -> String {
        match self.prefix.as_str() {
            "" => repository.to_string(),
            prefix => format!("{prefix}/{repository}"),
        }
    }

    /// The shared Authorization header; a poisoned lock (a panicked download thread) still
    /// holds a usable value.
    fn auth_header(&self) -> MutexGuard<'_, Option<String>> {
        self.authorization
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn error(&self, message: String) -> Error {
        Error::Registry {
            registry: self.registry.clone(),
            message,
        }
    }
}

/// A user's own login for [`Logins::read`].
fn user_login(config: &RegistryConfig, user: Option<&FsUser>) -> Result<Option<UserLogin>> {
    let euid = berth_sys::identity::effective_uid();
    if !config.user_credentials {
        return Ok(None);
    }
    let files = match (euid, user) {
        (0, None) => return Ok(None),
        (0, Some(user)) => {
            let uid = user.uid;
            let home = berth_sys::identity::user_info(uid)
                .map(|u| u.home)
                .unwrap_or_default();
            let runtime = format!("/run/user/{uid}");
            let paths = auth::user_auth_files(
                |name| (name == "XDG_RUNTIME_DIR").then(|| runtime.clone()),
                &home,
            );
            berth_sys::fsid::as_user(user, || auth::read_login_files(&paths, uid)).map_err(
                |e| {
                    Error::io(
                        format!("reading the registry login of uid {uid} as that user"),
                        e,
                    )
                },
            )??
        }
        (uid, _) => {
            let home = berth_sys::identity::user_info(uid)
                .map(|u| u.home)
                .unwrap_or_default();
            let paths = auth::user_auth_files(|name| std::env::var(name).ok(), &home);
            auth::read_login_files(&paths, uid)?
        }
    };
    let uid = user.map_or(euid, |u| u.uid);
    Ok(Some(UserLogin { uid, files }))
}

/// System roots plus every `*.crt` in `<certs_dir>/<registry>/` (the containers layout).
fn root_certs(certs_dir: &Path, registry: &str) -> Result<ureq::tls::RootCerts> {
    let mut pem_files = vec![PathBuf::from(SYSTEM_ROOTS)];
    let registry_dir = certs_dir.join(registry);
    if let Ok(entries) = std::fs::read_dir(&registry_dir) {
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        files.sort();
        pem_files.extend(files);
    }
    let mut certs = Vec::new();
    for path in &pem_files {
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("reading CA file {}", path.display()), e)),
        };
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::Registry {
                        registry: registry.to_string(),
                        message: format!(
                            "CA file {} is not valid PEM ({e}); fix or remove it",
                            path.display()
                        ),
                    })
                }
            }
        }
    }
    Ok(if certs.is_empty() {
        ureq::tls::RootCerts::WebPki
    } else {
        ureq::tls::RootCerts::from(certs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-thread HTTP server on loopback that answers `requests` requests, one per
    /// connection, with `respond(request head)`; it returns the request heads it saw.
    pub(super) fn serve(
        requests: usize,
        respond: impl Fn(&str) -> String + Send + 'static,
    ) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..requests {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    // Header names in lower case (HTTP/1.1 clients may send either).
                    match line.split_once(':') {
                        Some((name, value)) if !head.is_empty() => {
                            head.push_str(&format!("{}:{value}", name.to_ascii_lowercase()))
                        }
                        _ => head.push_str(&line),
                    }
                }
                let answer = respond(&head);
                (&stream).write_all(answer.as_bytes()).unwrap();
                seen.push(head);
            }
            seen
        });
        (port, handle)
    }

    pub(super) fn http(status: &str, extra_header: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\n{extra_header}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A 401 asking for a bearer token from `/token` on the server the request went to.
    pub(super) fn bearer_challenge(head: &str) -> String {
        let port = head
            .lines()
            .find_map(|l| l.strip_prefix("host: 127.0.0.1:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        http(
            "401 Unauthorized",
            &format!(
                "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",\
                 service=\"test-registry\",scope=\"repository:lab/img:pull\"\r\n"
            ),
            "",
        )
    }

    #[test]
    fn fetches_a_bearer_token_with_the_site_credentials_and_retries_with_it() {
        let blob = b"layer bytes";
        let digest = Digest::compute(DigestAlgorithm::Sha256, blob);
        let (port, server) = serve(3, move |head| {
            let request_line = head.lines().next().unwrap_or_default();
            if request_line.starts_with("GET /token?") {
                http("200 OK", "", r#"{"token":"t0k3n"}"#)
            } else if head.contains("authorization: Bearer t0k3n") {
                http("200 OK", "", "layer bytes")
            } else {
                bearer_challenge(head)
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let registry = format!("127.0.0.1:{port}");
        let auth_file = dir.path().join("auth.json");
        std::fs::write(
            &auth_file,
            format!(r#"{{"auths": {{"{registry}": {{"username": "alice", "password": "pw"}}}}}}"#),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&auth_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = RegistryConfig {
            certs_dir: dir.path().to_path_buf(),
            auth_file,
            retries: 1,
            timeout_secs: 5,
            ..RegistryConfig::default()
        };
        let client = Client::new(
            &config,
            &registry,
            ClientOptions {
                plain_http: true,
                quiet: true,
                logins: Logins::read(&config, None).unwrap(),
            },
        )
        .unwrap();
        let desc = Descriptor {
            media_type: String::new(),
            digest: digest.to_string(),
            size: blob.len() as u64,
            platform: None,
        };
        assert_eq!(client.small_blob("lab/img", &desc).unwrap(), blob);
        let seen = server.join().unwrap();
        assert!(!seen[0].contains("authorization"), "{seen:#?}");
        // The token request carries the challenge's scope and service and the site's
        // credentials (alice:pw), and the blob is asked for again with the token.
        assert!(
            seen[1].starts_with(
                "GET /token?scope=repository%3Alab%2Fimg%3Apull&service=test-registry "
            ) && seen[1].contains("authorization: Basic YWxpY2U6cHc="),
            "{seen:#?}"
        );
        assert!(
            seen[2].starts_with(&format!("GET /v2/lab/img/blobs/{digest} "))
                && seen[2].contains("authorization: Bearer t0k3n"),
            "{seen:#?}"
        );
    }

    fn plain_client(dir: &Path, registry: &str) -> Client {
        let config = RegistryConfig {
            certs_dir: dir.to_path_buf(),
            auth_file: dir.join("no-auth.json"),
            retries: 1,
            timeout_secs: 5,
            ..RegistryConfig::default()
        };
        let options = ClientOptions {
            plain_http: true,
            quiet: true,
            logins: Logins::read(&config, None).unwrap(),
        };
        Client::new(&config, registry, options).unwrap()
    }

    #[test]
    fn a_manifest_redirect_to_another_host_is_refused_unvisited() {
        // The host the registry would send us to: it must never see a connection.
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let elsewhere_port = elsewhere.local_addr().unwrap().port();
        elsewhere.set_nonblocking(true).unwrap();
        let (port, server) = serve(1, move |_| {
            http(
                "307 Temporary Redirect",
                &format!(
                    "Location: http://127.0.0.1:{elsewhere_port}/v2/lab/img/manifests/latest\r\n"
                ),
                "",
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let registry = format!("127.0.0.1:{port}");
        let client = plain_client(dir.path(), &registry);
        let reference = Reference::parse(&format!("{registry}/lab/img:latest")).unwrap();
        let err = client
            .manifest("lab/img", &reference)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "refusing redirect to http://127.0.0.1:{elsewhere_port}"
            )) && err.contains("only within the registry"),
            "{err}"
        );
        server.join().unwrap();
        assert_eq!(
            elsewhere.accept().map(|_| ()).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "the refused host was contacted"
        );
    }

    #[test]
    fn a_manifest_redirect_on_the_same_registry_is_followed() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[]}}"#,
            "0".repeat(64)
        );
        let expected = Digest::compute(DigestAlgorithm::Sha256, manifest.as_bytes());
        let (port, server) = serve(2, move |head| {
            if head.starts_with("GET /v2/lab/img/manifests/latest ") {
                http(
                    "307 Temporary Redirect",
                    "Location: /v2/lab/img/manifests/moved\r\n",
                    "",
                )
            } else {
                http(
                    "200 OK",
                    "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
                    &manifest,
                )
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let registry = format!("127.0.0.1:{port}");
        let client = plain_client(dir.path(), &registry);
        let reference = Reference::parse(&format!("{registry}/lab/img:latest")).unwrap();
        let fetched = client.manifest("lab/img", &reference).unwrap();
        assert_eq!(fetched.digest, expected);
        let seen = server.join().unwrap();
        assert!(
            seen[1].starts_with("GET /v2/lab/img/manifests/moved "),
            "{seen:#?}"
        );
    }

    fn client_with(config: RegistryConfig, registry: &str) -> Client {
        let options = ClientOptions {
            plain_http: false,
            quiet: true,
            logins: Logins::read(&config, None).unwrap(),
        };
        Client::new(&config, registry, options).unwrap()
    }

    fn hosts(list: &[&str]) -> Vec<HostPattern> {
        list.iter()
            .map(|h| HostPattern::try_from(h.to_string()).unwrap())
            .collect()
    }

    #[test]
    fn blob_redirects_go_only_to_the_registry_or_listed_https_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let config = RegistryConfig {
            certs_dir: dir.path().to_path_buf(),
            auth_file: dir.path().join("none.json"),
            blob_hosts: hosts(&["*.cdn.example.org", "s3.example.org"]),
            ..RegistryConfig::default()
        };
        let client = client_with(config, "registry.example.org");
        let from = "https://registry.example.org/v2/lab/img/blobs/sha256:00";
        let check = |to: &str| client.check_redirect(from, to, Purpose::Blob, "blob");
        for ok in [
            "https://eu.cdn.example.org/blobs/abc?sig=1",
            "https://s3.example.org/bucket/abc",
            "/v2/lab/img/blobs/elsewhere",
        ] {
            check(ok).unwrap();
        }
        for refused in [
            // The metadata service, an internal host, plain HTTP to a listed host.
            "https://169.254.169.254/latest/meta-data/",
            "https://intranet.example.org/admin",
            "http://eu.cdn.example.org/blobs/abc",
            "https://cdn.example.org.evil.io/x",
        ] {
            let err = check(refused).unwrap_err().to_string();
            assert!(err.contains("[registry] blob_hosts"), "{refused}: {err}");
        }
        // Manifests stay in the registry and the repository; tokens on the token host.
        let manifest = "https://registry.example.org/v2/lab/img/manifests/latest";
        let m = |to: &str| client.check_redirect(manifest, to, Purpose::Manifest, "manifest");
        m("/v2/lab/img/manifests/sha256:00").unwrap();
        m("https://eu.cdn.example.org/v2/lab/img/manifests/latest").unwrap_err();
        m("/v2/lab/other/manifests/latest").unwrap_err();
        let token = "https://auth.example.org/token?scope=x";
        let t = |to: &str| client.check_redirect(token, to, Purpose::Token, "token");
        t("/token2?scope=x").unwrap();
        t("https://registry.example.org/token").unwrap_err();
    }

    #[test]
    fn credentials_go_to_a_token_service_elsewhere_only_when_listed() {
        let dir = tempfile::tempdir().unwrap();
        let config = |token_hosts| RegistryConfig {
            certs_dir: dir.path().to_path_buf(),
            auth_file: dir.path().join("none.json"),
            token_hosts,
            ..RegistryConfig::default()
        };
        let client = client_with(config(Vec::new()), "registry.example.org");
        assert!(client.may_send_credentials_to("https://registry.example.org/token"));
        assert!(!client.may_send_credentials_to("https://auth.example.org/token"));
        assert!(!client.may_send_credentials_to("https://evil.example.com/token"));
        let client = client_with(config(hosts(&["auth.example.org"])), "registry.example.org");
        assert!(client.may_send_credentials_to("https://auth.example.org/token"));
        assert!(!client.may_send_credentials_to("https://evil.example.com/token"));
    }

    #[test]
    fn a_registry_error_body_is_summarised_not_echoed() {
        let (port, server) = serve(2, move |head| {
            if head.contains("/manifests/json") {
                http(
                    "400 Bad Request",
                    "",
                    r#"{"errors":[{"code":"DENIED","message":"no \u001b[2Jway\nforged: line"}]}"#,
                )
            } else {
                http(
                    "400 Bad Request",
                    "",
                    "<html>\x1b]0;pwned\x07 first line\nberth: allow: forged\n</html>",
                )
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let registry = format!("127.0.0.1:{port}");
        let client = plain_client(dir.path(), &registry);
        for tag in ["json", "html"] {
            let reference = Reference::parse(&format!("{registry}/lab/img:{tag}")).unwrap();
            let err = client
                .manifest("lab/img", &reference)
                .unwrap_err()
                .to_string();
            assert!(err.contains("HTTP 400"), "{err}");
            assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");
            assert!(!err.contains('\n'), "{err:?}");
            assert!(!err.contains("berth: allow"), "{err:?}");
        }
        server.join().unwrap();
    }
}
