//! `[site]`: what every container on this site gets without rebuilding berth, and which
//! host paths users may bind. Applied to a container's options by [`apply`], a pure function
//! of the settings, the user's binds and which site sources exist on this node:
//!
//! - `binds` (required): in every container; a user's bind to the same destination is
//!   refused, so `--container-mounts` cannot remove one;
//! - `optional_binds`: in every container whose node has the source; a user may replace one;
//! - `env`: variables every container starts with (a user's `--env` still wins);
//! - `user_bind_prefixes`: when not empty, the host paths users may bind must lie below one
//!   of them (after symlinks), like Apptainer's `limit container paths`.
//!
//! Mounts are made shallowest destination first, so a bind inside another (a user's
//! /scratch/me inside the site's /scratch) stays visible.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::container::spec::{Bind, BindKind};
use crate::{Error, Result};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteConfig {
    /// `SRC:DST[:ro|rw]` in every container.
    pub binds: Vec<SiteBind>,
    /// `SRC:DST[:ro|rw]` in every container on nodes where SRC exists.
    pub optional_binds: Vec<SiteBind>,
    /// Variables every container starts with.
    pub env: BTreeMap<String, String>,
    /// Absolute host directories users' binds must lie below; empty: no limit.
    pub user_bind_prefixes: Vec<AbsolutePath>,
}

/// A site bind, its syntax checked when the configuration is read (its source is looked up
/// on each node when a container starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteBind {
    pub text: String,
    source: PathBuf,
}

impl<'de> Deserialize<'de> for SiteBind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parts: Vec<&str> = text.split(':').collect();
        let ok = match parts.as_slice() {
            [s, d] | [s, d, "ro" | "rw"] => {
                Path::new(s).is_absolute() && Path::new(d).is_absolute()
            }
            _ => false,
        };
        if !ok {
            return Err(serde::de::Error::custom(format!(
                "[site] bind `{text}`: write SRC:DST or SRC:DST:ro (both absolute), e.g. \
                 \"/etc/localtime:/etc/localtime:ro\""
            )));
        }
        Ok(SiteBind {
            source: PathBuf::from(parts[0]),
            text,
        })
    }
}

/// An absolute path from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsolutePath(pub PathBuf);

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let path = PathBuf::deserialize(d)?;
        if path.is_absolute() {
            Ok(AbsolutePath(path))
        } else {
            Err(serde::de::Error::custom(format!(
                "[site] user_bind_prefixes entry `{}` is not an absolute path",
                path.display()
            )))
        }
    }
}

/// The binds of a container: the user's (checked against `user_bind_prefixes` and the
/// required site binds), then the site's, ordered for mounting. Optional site binds whose
/// source `exists` says is missing are skipped.
pub fn apply(
    site: &SiteConfig,
    user: Vec<Bind>,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Vec<Bind>> {
    let required: Vec<Bind> = site
        .binds
        .iter()
        .map(|b| Bind::parse(&b.text))
        .collect::<Result<_>>()?;
    for bind in &user {
        let refuse = |reason: String| Error::BindRefused {
            bind: format!("{}:{}", bind.source.display(), bind.destination.display()),
            reason,
        };
        // A tmpfs or an umount brings no host data in.
        if bind.kind == BindKind::Host
            && !site.user_bind_prefixes.is_empty()
            && !site
                .user_bind_prefixes
                .iter()
                .any(|p| bind.source.starts_with(&p.0))
        {
            let allowed: Vec<String> = site
                .user_bind_prefixes
                .iter()
                .map(|p| p.0.display().to_string())
                .collect();
            return Err(refuse(format!(
                "the site allows binding only paths below {}",
                allowed.join(", ")
            )));
        }
        if required.iter().any(|r| r.destination == bind.destination) {
            return Err(refuse(format!(
                "{} is a mount the site gives every container; bind to another destination",
                bind.destination.display()
            )));
        }
    }
    let optional = site
        .optional_binds
        .iter()
        .filter(|b| exists(&b.source))
        .map(|b| Bind::parse(&b.text))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|o| !user.iter().any(|u| u.destination == o.destination))
        .collect::<Vec<_>>();
    let mut binds: Vec<Bind> = user.into_iter().chain(required).chain(optional).collect();
    // Stable: same-depth binds keep their order (the user's first).
    binds.sort_by_key(|b| b.destination.components().count());
    Ok(binds)
}

/// The container's variables: the site's, then the user's (which win, being later).
pub fn env(site: &SiteConfig, user: Vec<(String, String)>) -> Vec<(String, String)> {
    site.env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain(user)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(toml: &str) -> SiteConfig {
        crate::config::Config::from_toml(Path::new("b.toml"), &format!("[site]\n{toml}"))
            .unwrap()
            .site
    }

    fn user(spec: &str) -> Bind {
        Bind::parse(spec).unwrap()
    }

    fn dests(binds: &[Bind]) -> Vec<String> {
        binds
            .iter()
            .map(|b| b.destination.display().to_string())
            .collect()
    }

    #[test]
    fn required_and_present_optional_binds_join_the_users_shallowest_first() {
        let s = site(
            "binds = [\"/tmp:/scratch\"]\n\
             optional_binds = [\"/etc:/opt/etc:ro\", \"/no/such:/licences:ro\"]\n",
        );
        let binds = apply(&s, vec![user("/tmp:/scratch/me/deep")], &|p| p.exists()).unwrap();
        assert_eq!(dests(&binds), ["/scratch", "/opt/etc", "/scratch/me/deep"]);
        assert!(binds[1].readonly);
    }

    #[test]
    fn a_user_cannot_replace_a_required_bind_but_may_an_optional_one() {
        let s = site("binds = [\"/tmp:/scratch\"]\noptional_binds = [\"/etc:/opt/etc\"]\n");
        let err = apply(&s, vec![user("/var:/scratch")], &|_| true).unwrap_err();
        assert!(
            err.to_string()
                .contains("mount the site gives every container"),
            "{err}"
        );
        let binds = apply(&s, vec![user("/var:/opt/etc")], &|_| true).unwrap();
        assert_eq!(
            binds
                .iter()
                .filter(|b| b.destination == Path::new("/opt/etc"))
                .count(),
            1
        );
        assert_eq!(
            binds
                .iter()
                .find(|b| b.destination == Path::new("/opt/etc"))
                .unwrap()
                .source,
            Path::new("/var")
        );
    }

    #[test]
    fn user_binds_outside_the_allowed_prefixes_are_refused() {
        let s = site("user_bind_prefixes = [\"/tmp\", \"/var/tmp\"]\n");
        assert!(apply(&s, vec![user("/tmp:/data")], &|_| true).is_ok());
        let err = apply(&s, vec![user("/etc:/data")], &|_| true).unwrap_err();
        assert!(
            err.to_string().contains("only paths below /tmp, /var/tmp"),
            "{err}"
        );
        // Compared by whole components: /tmpfoo is not below /tmp.
        let s = site("user_bind_prefixes = [\"/va\"]\n");
        assert!(apply(&s, vec![user("/var:/data")], &|_| true).is_err());
    }

    #[test]
    fn malformed_site_settings_name_their_line() {
        let err = crate::config::Config::from_toml(
            Path::new("b.toml"),
            "[site]\nbinds = [\"scratch:/scratch\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("b.toml:2:") && err.contains("SRC:DST"),
            "{err}"
        );
        let err = crate::config::Config::from_toml(
            Path::new("b.toml"),
            "[site]\nuser_bind_prefixes = [\"home\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not an absolute path"), "{err}");
    }

    #[test]
    fn site_variables_come_first_so_the_users_win() {
        let s = site("env = { TZ = \"UTC\", SITE = \"x\" }\n");
        let env = env(&s, vec![("TZ".into(), "Europe/Paris".into())]);
        assert_eq!(env.first().unwrap().0, "SITE");
        assert_eq!(
            env.last().unwrap(),
            &("TZ".to_owned(), "Europe/Paris".to_owned())
        );
    }
}
