//! The plugin's arguments from plugstack.conf, e.g.
//! `required spank_berth.so berth=/usr/local/bin/berth`. Pure and unit-tested.
//!
//! A mistake here must not stop every job on the cluster, so a bad argument is reported (to the
//! slurmd log) and ignored, and the plugin carries on with the default for it.

use std::path::PathBuf;

use crate::error::Error;

/// Where the Debian package installs the launcher.
pub const DEFAULT_BERTH: &str = "/usr/bin/berth";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The `berth` launcher binary the plugin runs on the node.
    pub berth: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            berth: PathBuf::from(DEFAULT_BERTH),
        }
    }
}

impl Config {
    /// Builds the configuration from the plugstack.conf arguments, returning with it the
    /// problems found, each of which the caller logs; a later argument overrides an earlier one.
    pub fn from_plugin_args<S: AsRef<str>>(args: &[S]) -> (Config, Vec<Error>) {
        let mut config = Config::default();
        let mut problems = Vec::new();
        for arg in args {
            let arg = arg.as_ref();
            match arg.split_once('=') {
                Some(("berth", value)) if value.starts_with('/') => {
                    config.berth = PathBuf::from(value);
                }
                Some(("berth", value)) => problems.push(Error::RelativeLauncherPath {
                    value: value.to_owned(),
                    default: DEFAULT_BERTH,
                }),
                _ => problems.push(Error::UnknownPluginArgument {
                    arg: arg.to_owned(),
                }),
            }
        }
        (config, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_arguments_gives_the_default() {
        let (config, problems) = Config::from_plugin_args::<&str>(&[]);
        assert_eq!(config.berth, PathBuf::from("/usr/bin/berth"));
        assert!(problems.is_empty());
    }

    #[test]
    fn berth_path_is_taken() {
        let (config, problems) = Config::from_plugin_args(&["berth=/usr/local/bin/berth"]);
        assert_eq!(config.berth, PathBuf::from("/usr/local/bin/berth"));
        assert!(problems.is_empty());
    }

    #[test]
    fn last_berth_wins() {
        let (config, _) = Config::from_plugin_args(&["berth=/a/berth", "berth=/b/berth"]);
        assert_eq!(config.berth, PathBuf::from("/b/berth"));
    }

    #[test]
    fn unknown_arguments_are_reported_and_ignored() {
        let (config, problems) =
            Config::from_plugin_args(&["verbose", "berth=/opt/berth", "Berth=/x", "runtime=/y"]);
        assert_eq!(config.berth, PathBuf::from("/opt/berth"));
        assert_eq!(
            problems,
            vec![
                Error::UnknownPluginArgument {
                    arg: "verbose".into()
                },
                Error::UnknownPluginArgument {
                    arg: "Berth=/x".into()
                },
                Error::UnknownPluginArgument {
                    arg: "runtime=/y".into()
                },
            ]
        );
        assert!(problems[0].to_string().contains("berth=/path/to/berth"));
    }

    #[test]
    fn relative_or_empty_path_keeps_the_default() {
        for value in ["bin/berth", ""] {
            let (config, problems) = Config::from_plugin_args(&[format!("berth={value}")]);
            assert_eq!(config, Config::default());
            assert_eq!(
                problems,
                vec![Error::RelativeLauncherPath {
                    value: value.into(),
                    default: DEFAULT_BERTH
                }]
            );
        }
    }
}
