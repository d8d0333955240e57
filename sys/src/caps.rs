//! Capabilities and no_new_privs.

use crate::{Error, Result};

/// Sets no_new_privs: nothing exec'd from here on (setuid binaries, file capabilities) can
/// gain privileges.
pub fn set_no_new_privs() -> Result<()> {
    nix::sys::prctl::set_no_new_privs().map_err(Error::os("prctl(PR_SET_NO_NEW_PRIVS)"))
}

/// Drops every capability: bounding set first (which needs CAP_SETPCAP, still held), then
/// ambient, inheritable, permitted and effective, so no later exec can regain any.
pub fn drop_all() -> Result<()> {
    let err = |e: caps::errors::CapsError| Error::Invalid {
        what: "dropping capabilities",
        message: e.to_string(),
    };
    caps::clear(None, caps::CapSet::Bounding).map_err(err)?;
    caps::clear(None, caps::CapSet::Ambient).map_err(err)?;
    caps::clear(None, caps::CapSet::Inheritable).map_err(err)?;
    caps::clear(None, caps::CapSet::Permitted).map_err(err)?;
    Ok(())
}

/// The names (`CAP_CHOWN`, ...) of every capability berth knows, for describing the full
/// set a `--remap-root` container keeps.
pub fn all_names() -> Vec<String> {
    let mut names: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
    names.sort();
    names
}
