//! The mount flags users may ask for by name (pyxis's `--container-mounts` vocabulary). Here
//! because both sides read it: the SPANK plugin refuses an unknown flag at submission, the
//! launcher maps each name to mount(2) flags on the node; the plugin does not link the
//! launcher, and both link this crate.

/// The flags of a bind besides `ro` and `rw`, joined by `+`: `bind` for a non-recursive bind
/// (the default is `rbind`), a propagation type, mount flags, and what to create at a
/// missing destination.
pub const BIND_FLAGS: [&str; 15] = [
    "bind",
    "rbind",
    "private",
    "rprivate",
    "slave",
    "rslave",
    "shared",
    "rshared",
    "unbindable",
    "runbindable",
    "nosuid",
    "nodev",
    "noexec",
    "x-create=file",
    "x-create=dir",
];

/// The options a new tmpfs also takes, each `NAME=VALUE` (`size=1G`, `huge=within_size`).
pub const TMPFS_OPTIONS: [&str; 4] = ["size", "nr_inodes", "mode", "huge"];

/// Whether `flag` is `NAME=VALUE` with NAME one of [`TMPFS_OPTIONS`] and a VALUE of letters,
/// digits and `_` only (sizes, modes, `within_size`): nothing that could add another option
/// to the mount's data.
pub fn is_tmpfs_option(flag: &str) -> bool {
    flag.split_once('=').is_some_and(|(name, value)| {
        TMPFS_OPTIONS.contains(&name)
            && !value.is_empty()
            && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn tmpfs_options_are_plain_values_of_known_names() {
        for ok in ["size=1G", "huge=within_size", "mode=1777", "nr_inodes=10k"] {
            assert!(super::is_tmpfs_option(ok), "{ok}");
        }
        for bad in [
            "size",
            "size=",
            "uid=0",
            "mode=1777,uid=0",
            "size=1G=2",
            "ro",
        ] {
            assert!(!super::is_tmpfs_option(bad), "{bad}");
        }
    }
}
