//! Host entries of `[registry] blob_hosts` and `token_hosts`: the hosts beyond a registry
//! itself that berth may fetch blobs from or send a registry's credentials to.

use serde::Deserialize;

use crate::reference;
use crate::{Error, Result};

/// `host[:port]` (exactly that host) or `*.domain` (any host below `domain`, at a label
/// boundary; not `domain` itself), in the canonical spelling registries are written in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HostPattern(String);

impl HostPattern {
    /// Whether `host` (`host[:port]`, lowercase, as in a URL berth built or checked) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self.0.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => host == self.0,
        }
    }
}

impl TryFrom<String> for HostPattern {
    type Error = Error;
    fn try_from(text: String) -> Result<HostPattern> {
        let host = text.strip_prefix("*.").unwrap_or(&text);
        reference::check_text(&text)
            .and_then(|()| reference::check_registry(host))
            .map_err(|reason| Error::RegistryEntry {
                key: "blob_hosts/token_hosts",
                value: reference::shown(&text),
                reason: format!("{reason}; entries are `host[:port]` or `*.domain`"),
            })?;
        Ok(HostPattern(text))
    }
}

/// Whether any of `patterns` matches `host`.
pub fn any_matches(patterns: &[HostPattern], host: &str) -> bool {
    patterns.iter().any(|p| p.matches(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> Result<HostPattern> {
        HostPattern::try_from(text.to_string())
    }

    #[test]
    fn matches_exact_hosts_and_subdomains_at_label_boundaries() {
        let cdn = pattern("*.cdn.example.org").unwrap();
        assert!(cdn.matches("eu.cdn.example.org"));
        assert!(cdn.matches("a.b.cdn.example.org"));
        for other in [
            "cdn.example.org",
            "evilcdn.example.org",
            "cdn.example.org.evil.io",
        ] {
            assert!(!cdn.matches(other), "{other}");
        }
        let exact = pattern("auth.example.org:8443").unwrap();
        assert!(exact.matches("auth.example.org:8443"));
        assert!(!exact.matches("auth.example.org"));
        for bad in [
            "https://cdn.example.org",
            "CDN.example.org",
            "cdn.example.org/x",
            "",
        ] {
            let err = pattern(bad).unwrap_err().to_string();
            assert!(err.contains("[registry]"), "{bad}: {err}");
        }
    }
}
