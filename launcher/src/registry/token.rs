//! Logging in to a registry: basic credentials, or a bearer token from the service a 401
//! names (asked again when it expires during a pull), and what to tell the user when there
//! are no credentials.

use super::auth::{self, Challenge};
use super::request::{error_detail, header, host_of, origin, read_small, repository_of};
use super::{hosts, Client, Purpose};
use crate::{Error, Result};

impl Client {
    /// Why a request without credentials was refused, and where an admin puts them.
    pub(super) fn no_credentials(&self, status: u16) -> String {
        let own = if self.own_credentials {
            "; or log in yourself (`podman login` or `docker login` writes your own \
             credentials, which berth uses as you: ~/.docker/config.json or \
             $XDG_RUNTIME_DIR/containers/auth.json)"
        } else {
            ""
        };
        format!(
            "HTTP {status}: it requires credentials and berth has none for {}; they go in {} \
             (`[registry] auth_file` in berth.toml: docker config.json `auths` format, owned \
             by root, mode 0600){own}",
            self.registry,
            self.auth_file.display()
        )
    }

    /// Acts on a 401's challenge: a bearer token from the realm, or basic credentials.
    pub(super) fn authenticate(&self, challenge: &str, url: &str, what: &str) -> Result<()> {
        let unauthorized = |message: String| Error::Unauthorized {
            registry: self.registry.clone(),
            repository: repository_of(url),
            message,
        };
        match auth::parse_challenge(challenge) {
            Some(Challenge::Basic) => {
                let creds = self
                    .credentials
                    .as_ref()
                    .ok_or_else(|| unauthorized(self.no_credentials(401)))?;
                *self.auth_header() = Some(creds.basic_header());
                Ok(())
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let realm_ok = realm.starts_with("https://")
                    || (self.options.plain_http
                        && realm.starts_with("http://")
                        && host_of(&realm) == host_of(&self.base));
                if !realm_ok {
                    return Err(self.error(format!(
                        "{what}: refusing token service {realm}: it must use https"
                    )));
                }
                let scope =
                    scope.unwrap_or_else(|| format!("repository:{}:pull", repository_of(url)));
                let mut token_url = format!("{realm}?scope={}", query_escape(&scope));
                if let Some(service) = service {
                    token_url.push_str(&format!("&service={}", query_escape(&service)));
                }
                let credentials = self.may_send_credentials_to(&realm);
                let token = self.fetch_token(token_url, credentials, what)?;
                *self.auth_header() = Some(format!("Bearer {token}"));
                Ok(())
            }
            None => Err(unauthorized(format!(
                "HTTP 401 with an authentication scheme berth does not speak: {challenge:?}"
            ))),
        }
    }

    /// The site's credentials are for this registry: a token service on another host gets
    /// them only when the site lists it in `[registry] token_hosts`.
    pub(super) fn may_send_credentials_to(&self, realm: &str) -> bool {
        let realm_host = host_of(realm);
        realm_host == host_of(&self.base) || hosts::any_matches(&self.token_hosts, &realm_host)
    }

    fn fetch_token(&self, url: String, credentials: bool, what: &str) -> Result<String> {
        // Credentials go to the token service only on the first request; `get` does not add
        // the registry's Authorization header to token requests.
        let mut request = self.agent.get(&url);
        if let (Some(creds), true) = (&self.credentials, credentials) {
            request = request.header("Authorization", creds.basic_header());
        }
        let resp = match request.call() {
            Ok(r) if r.status().is_redirection() => {
                let location = header(r.headers(), "location").unwrap_or_default();
                let next = self.check_redirect(&url, &location, Purpose::Token, what)?;
                self.get(next, None, Purpose::Token, what)?
            }
            Ok(r) => r,
            Err(e) => {
                return Err(Error::RegistryDown {
                    registry: self.registry.clone(),
                    attempts: 1,
                    message: format!("token service {}: {e}", origin(&url)),
                })
            }
        };
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(Error::Unauthorized {
                registry: self.registry.clone(),
                repository: what.to_string(),
                message: format!("the token service refused the credentials (HTTP {status})"),
            });
        }
        if !(200..300).contains(&status) {
            return Err(self.error(format!(
                "token service: HTTP {status} {}",
                error_detail(resp)
            )));
        }
        let bytes = read_small(resp, "token answer")?;
        token_of(&bytes).map_err(|e| self.error(e))
    }
}

/// The bearer token in a token service's answer (`token`, or OAuth2's `access_token`), or
/// what is wrong with the answer.
pub(crate) fn token_of(answer: &[u8]) -> std::result::Result<String, String> {
    #[derive(serde::Deserialize)]
    struct TokenAnswer {
        token: Option<String>,
        access_token: Option<String>,
    }
    let answer: TokenAnswer = serde_json::from_slice(answer)
        .map_err(|e| format!("token service sent an unreadable answer ({e})"))?;
    answer
        .token
        .or(answer.access_token)
        .ok_or_else(|| "token service sent no token".into())
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_escaped_for_the_query() {
        assert_eq!(
            query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
