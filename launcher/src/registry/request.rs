//! Requests to a registry: retries with backoff (429/503 honour `Retry-After`), one
//! authentication on a 401, redirects checked against the rules in the module comment of
//! `registry`, and what a registry answers kept short in messages.

use std::time::Duration;

use ureq::http::{HeaderMap, Response};
use ureq::Body;

use super::{hosts, progress, Client, Purpose, MAX_REDIRECTS, SMALL_DOCUMENT_LIMIT};
use crate::reference;
use crate::{Error, Result};

impl Client {
    /// GET with retries, authentication and redirect rules. Returns only 2xx responses.
    pub(super) fn get(
        &self,
        url: String,
        accept: Option<&str>,
        purpose: Purpose,
        what: &str,
    ) -> Result<Response<Body>> {
        self.get_range(url, accept, purpose, what, None)
    }

    /// `get`, asking for `range` (a `Range` header value, for resumed blobs) on every hop.
    pub(super) fn get_range(
        &self,
        mut url: String,
        accept: Option<&str>,
        purpose: Purpose,
        what: &str,
        range: Option<String>,
    ) -> Result<Response<Body>> {
        let mut attempt = 0;
        let mut redirects = 0;
        let mut authenticated = false;
        loop {
            attempt += 1;
            let mut request = self.agent.get(&url);
            if let Some(accept) = accept {
                request = request.header("Accept", accept);
            }
            let to_registry = origin(&url) == origin(&self.base);
            if let (Some(authorization), true, false) = (
                self.auth_header().clone(),
                to_registry,
                purpose == Purpose::Token,
            ) {
                request = request.header("Authorization", authorization);
            }
            if let Some(range) = &range {
                request = request.header("Range", range);
            }
            let resp = match request.call() {
                Ok(resp) => resp,
                Err(_) if attempt < self.retries => {
                    backoff(attempt);
                    continue;
                }
                Err(e) => {
                    return Err(Error::RegistryDown {
                        registry: self.registry.clone(),
                        attempts: attempt,
                        message: format!("{what}: {e}"),
                    })
                }
            };
            let status = resp.status().as_u16();
            match status {
                200..=299 => return Ok(resp),
                301 | 302 | 303 | 307 | 308 => {
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        return Err(self.error(format!("{what}: too many redirects")));
                    }
                    let location = header(resp.headers(), "location")
                        .ok_or_else(|| self.error(format!("{what}: redirect without Location")))?;
                    url = self.check_redirect(&url, &location, purpose, what)?;
                    attempt = 0;
                }
                401 if !authenticated && purpose != Purpose::Token && to_registry => {
                    let challenge = header(resp.headers(), "www-authenticate").unwrap_or_default();
                    self.authenticate(&challenge, &url, what)?;
                    authenticated = true;
                    attempt -= 1;
                }
                401 | 403 => {
                    let detail = error_detail(resp);
                    return Err(Error::Unauthorized {
                        registry: self.registry.clone(),
                        repository: repository_of(&url),
                        message: match (&self.credentials, detail.is_empty()) {
                            (None, _) => self.no_credentials(status),
                            (Some(c), true) => {
                                format!("HTTP {status} with the credentials of {}", c.username)
                            }
                            (Some(c), false) => format!(
                                "HTTP {status} with the credentials of {}: {detail}",
                                c.username
                            ),
                        },
                    });
                }
                404 if purpose == Purpose::Manifest => {
                    return Err(Error::ImageNotFound {
                        reference: what.to_string(),
                    })
                }
                429 | 503 if attempt < self.retries => {
                    // The registry says when to come back; bounded, so a job start does not
                    // hang on a registry asking for an hour.
                    let wait = retry_after(resp.headers())
                        .unwrap_or_else(|| backoff_delay(attempt))
                        .min(self.max_retry_wait);
                    progress::note(
                        self.options.quiet,
                        &format!(
                            "{what}: {} answered HTTP {status}, retrying in {} s",
                            self.registry,
                            wait.as_secs_f32().ceil()
                        ),
                    );
                    std::thread::sleep(wait);
                }
                500..=599 if attempt < self.retries => backoff(attempt),
                429 | 500..=599 => {
                    return Err(Error::RegistryDown {
                        registry: self.registry.clone(),
                        attempts: attempt,
                        message: format!("{what}: HTTP {status} {}", error_detail(resp)),
                    })
                }
                _ => {
                    return Err(self.error(format!("{what}: HTTP {status} {}", error_detail(resp))))
                }
            }
        }
    }

    pub(super) fn check_redirect(
        &self,
        from: &str,
        location: &str,
        purpose: Purpose,
        what: &str,
    ) -> Result<String> {
        let next = if location.starts_with("https://") || location.starts_with("http://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", origin(from))
        } else {
            return Err(self.error(format!("{what}: unsupported redirect to {location:?}")));
        };
        let allowed = match purpose {
            // What runs is decided here: the registry's own answer for this repository.
            Purpose::Manifest => {
                origin(&next) == origin(&self.base) && repository_of(&next) == repository_of(from)
            }
            Purpose::Token => origin(&next) == origin(from),
            Purpose::Blob => {
                origin(&next) == origin(&self.base)
                    || (next.starts_with("https://")
                        && hosts::any_matches(&self.blob_hosts, &host_of(&next)))
            }
        };
        if allowed {
            return Ok(next);
        }
        let fix = match purpose {
            Purpose::Blob => {
                "if it is the registry's CDN, the site admins can list that host in \
                 `[registry] blob_hosts` (HTTPS only)"
            }
            Purpose::Manifest | Purpose::Token => {
                "berth follows such redirects only within the registry (or token service) \
                 itself; use the registry's own address"
            }
        };
        Err(self.error(format!(
            "{what}: refusing redirect to {}: {fix}",
            reference::shown(&origin(&next))
        )))
    }
}

pub(super) fn read_small(resp: Response<Body>, what: &str) -> Result<Vec<u8>> {
    resp.into_body()
        .into_with_config()
        .limit(SMALL_DOCUMENT_LIMIT)
        .read_to_vec()
        .map_err(|e| {
            Error::io(
                format!("reading {what}"),
                std::io::Error::other(e.to_string()),
            )
        })
}

/// The registry's error text (`{"errors":[{"message":...}]}`) for messages: short, control
/// characters escaped, and nothing of a body in another format (an HTML page, a proxy's
/// answer) beyond its first line.
pub(super) fn error_detail(resp: Response<Body>) -> String {
    let body = resp
        .into_body()
        .into_with_config()
        .limit(16 << 10)
        .read_to_vec()
        .unwrap_or_default();
    error_text(&body)
}

/// [`error_detail`] of an error body already read.
pub(crate) fn error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let text = match serde_json::from_slice::<Errors>(body) {
        Ok(e) => e
            .errors
            .iter()
            .map(|i| format!("{} {}", i.code, i.message))
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(body)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    reference::shown(text.trim())
}

pub(super) fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(String::from)
}

/// `scheme://host[:port]` of a URL.
pub(super) fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?']).next().unwrap_or("");
    format!("{scheme}://{host}")
}

/// `host[:port]`, lowercase.
pub(super) fn host_of(url: &str) -> String {
    origin(url)
        .split_once("://")
        .map(|(_, h)| h.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The repository in a `/v2/<repo>/(manifests|blobs)/...` URL, for messages.
pub(super) fn repository_of(url: &str) -> String {
    let path = url.split_once("/v2/").map(|(_, p)| p).unwrap_or("");
    for marker in ["/manifests/", "/blobs/"] {
        if let Some((repo, _)) = path.split_once(marker) {
            return repo.to_string();
        }
    }
    path.to_string()
}

pub(super) fn backoff(attempt: u32) {
    std::thread::sleep(backoff_delay(attempt));
}

/// 200 ms, doubling per attempt, at most 5 s.
pub(super) fn backoff_delay(attempt: u32) -> Duration {
    let ms = 200u64 << attempt.saturating_sub(1).min(5);
    Duration::from_millis(ms.min(5000))
}

/// A `Retry-After` in seconds (the form registries send; an HTTP date counts as absent and
/// the usual backoff applies).
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = header(headers, "retry-after")?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_helpers() {
        assert_eq!(
            origin("https://h:5000/v2/a/b/blobs/x?y=1"),
            "https://h:5000"
        );
        assert_eq!(host_of("https://H:5000/v2/"), "h:5000");
        assert_eq!(
            repository_of("https://h/v2/test/busybox/manifests/latest"),
            "test/busybox"
        );
    }
}
