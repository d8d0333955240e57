//! Where a registry's bytes come from: `[[registry.mirrors]]` rules, in the spirit of
//! containers-registries.conf. The policy judges the name the user wrote (`docker.io/...`);
//! only the host contacted changes. Manifests fetched by digest and every blob are verified
//! against the digests, so a mirror can withhold an image but not change it. (A tag asked of
//! a mirror is what the mirror says it is, as with any pull-through cache; pin a digest where
//! that matters.)
//!
//! ```toml
//! [[registry.mirrors]]
//! registry = "docker.io"
//! mirrors = ["harbor.example.org/dockerhub-proxy"]
//! fallback = false
//! ```

use serde::Deserialize;

use super::{Client, ClientOptions};
use crate::config::RegistryConfig;
use crate::reference;
use crate::{Error, Result};

/// One `[[registry.mirrors]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorRule {
    /// The registry as users name it, canonical `host[:port]` (`docker.io` for Docker Hub).
    pub registry: RegistryName,
    /// Tried in order: `host[:port]` or `host[:port]/path` (a project under which the mirror
    /// serves the registry's repositories, as Harbor's proxy-cache projects do).
    pub mirrors: Vec<MirrorLocation>,
    /// Whether the registry itself is contacted when no mirror answers. Default false: sites
    /// mirror to keep nodes off the internet.
    #[serde(default)]
    pub fallback: bool,
}

/// A registry host as references spell it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RegistryName(String);

impl TryFrom<String> for RegistryName {
    type Error = Error;
    fn try_from(text: String) -> Result<RegistryName> {
        reference::check_text(&text)
            .and_then(|()| reference::check_registry(&text))
            .map_err(|reason| entry_error("mirrors.registry", &text, reason))?;
        Ok(RegistryName(text))
    }
}

/// A mirror: its host and the path its copy of the registry lives under.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MirrorLocation {
    host: String,
    prefix: String,
}

impl TryFrom<String> for MirrorLocation {
    type Error = Error;
    fn try_from(text: String) -> Result<MirrorLocation> {
        let (host, prefix) = text.split_once('/').unwrap_or((&text, ""));
        reference::check_text(&text)
            .and_then(|()| reference::check_registry(host))
            .and_then(|()| match prefix {
                "" => Ok(()),
                p => reference::check_repository(p),
            })
            .map_err(|reason| entry_error("mirrors.mirrors", &text, reason))?;
        Ok(MirrorLocation {
            host: host.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

fn entry_error(key: &'static str, text: &str, reason: String) -> Error {
    Error::RegistryEntry {
        key,
        value: reference::shown(text),
        reason: format!(
            "{reason}; write registries as `host[:port]` and mirrors as `host[:port]` or \
             `host[:port]/path`"
        ),
    }
}

/// A place berth pulls a registry's images from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The host contacted, `host[:port]`; its CA files, credentials and the policy's
    /// plain-HTTP approval are looked up under this name.
    pub host: String,
    /// Put before every repository in request paths (a mirror's project), or empty.
    pub prefix: String,
    /// The registry users named, when this is a mirror of it.
    pub mirror_of: Option<String>,
}

impl Endpoint {
    /// `host[/prefix]`, and for a mirror what it mirrors: for messages and `policy check`.
    pub fn describe(&self) -> String {
        let place = match self.prefix.as_str() {
            "" => self.host.clone(),
            p => format!("{}/{p}", self.host),
        };
        match &self.mirror_of {
            Some(upstream) => format!("{place} (mirror of {upstream})"),
            None => place,
        }
    }
}

/// The endpoints to try for `registry`, in order: its mirrors, then the registry itself
/// unless a rule says mirrors only.
pub fn endpoints(config: &RegistryConfig, registry: &str) -> Vec<Endpoint> {
    let rule = config.mirrors.iter().find(|r| r.registry.0 == registry);
    let mut list: Vec<Endpoint> = rule
        .iter()
        .flat_map(|r| &r.mirrors)
        .map(|m| Endpoint {
            host: m.host.clone(),
            prefix: m.prefix.clone(),
            mirror_of: Some(registry.to_string()),
        })
        .collect();
    if rule.is_none_or(|r| r.fallback) {
        list.push(Endpoint {
            host: registry.to_string(),
            prefix: String::new(),
            mirror_of: None,
        });
    }
    list
}

/// Runs `first` (e.g. resolving the reference) against each endpoint of `registry` in turn
/// and returns the client of the first that answers, for the rest of the pull. An endpoint
/// that fails is reported on stderr and the next one tried; with none left, the last
/// failure is returned.
pub fn first_answering<T>(
    config: &RegistryConfig,
    registry: &str,
    options: impl Fn(&Endpoint) -> ClientOptions,
    mut first: impl FnMut(&Client) -> Result<T>,
) -> Result<(Client, T)> {
    let mut last = None;
    for endpoint in endpoints(config, registry) {
        let opts = options(&endpoint);
        let quiet = opts.quiet;
        let attempt = Client::for_endpoint(config, &endpoint, opts)
            .and_then(|client| first(&client).map(|answer| (client, answer)));
        match attempt {
            Ok(found) => return Ok(found),
            Err(e) => {
                super::progress::note(quiet, &format!("{}: {e}", endpoint.describe()));
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Registry {
        registry: registry.to_string(),
        message: "no endpoint to pull from: its [[registry.mirrors]] rule lists no mirror and \
                  has fallback = false"
            .into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_text: &str) -> RegistryConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn mirrors_come_first_and_the_upstream_only_with_fallback() {
        let config = rules(
            r#"
            [[mirrors]]
            registry = "docker.io"
            mirrors = ["harbor.example.org/dockerhub-proxy", "mirror2.example.org:5000"]
            [[mirrors]]
            registry = "nvcr.io"
            mirrors = ["harbor.example.org/ngc"]
            fallback = true
            "#,
        );
        let shown = |registry: &str| {
            endpoints(&config, registry)
                .iter()
                .map(Endpoint::describe)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shown("docker.io"),
            [
                "harbor.example.org/dockerhub-proxy (mirror of docker.io)",
                "mirror2.example.org:5000 (mirror of docker.io)"
            ]
        );
        assert_eq!(
            shown("nvcr.io"),
            ["harbor.example.org/ngc (mirror of nvcr.io)", "nvcr.io"]
        );
        assert_eq!(shown("localhost:5000"), ["localhost:5000"]);
    }

    #[test]
    fn refuses_malformed_rules_naming_the_key() {
        for bad in [
            r#"[[mirrors]]
               registry = "https://docker.io"
               mirrors = []"#,
            r#"[[mirrors]]
               registry = "docker.io"
               mirrors = ["harbor.example.org/Upper"]"#,
            r#"[[mirrors]]
               registry = "docker.io"
               mirrors = ["h"]
               fallbak = true"#,
        ] {
            let err = toml::from_str::<RegistryConfig>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("mirrors"), "{bad}: {err}");
        }
    }
}
