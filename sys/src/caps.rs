//! Capabilities and no_new_privs.

pub use caps::Capability;

use crate::{Error, Result};

/// Sets no_new_privs: nothing exec'd from here on (setuid binaries, file capabilities) can
/// gain privileges.
pub fn set_no_new_privs() -> Result<()> {
    nix::sys::prctl::set_no_new_privs().map_err(Error::os("prctl(PR_SET_NO_NEW_PRIVS)"))
}

fn caps_error(e: caps::errors::CapsError) -> Error {
    Error::Invalid {
        what: "setting the container's capabilities",
        message: e.to_string(),
    }
}

/// Drops every capability: bounding set first (which needs CAP_SETPCAP, still held), then
/// ambient, inheritable, permitted and effective, so no later exec can regain any.
pub fn drop_all() -> Result<()> {
    caps::clear(None, caps::CapSet::Bounding).map_err(caps_error)?;
    caps::clear(None, caps::CapSet::Ambient).map_err(caps_error)?;
    caps::clear(None, caps::CapSet::Inheritable).map_err(caps_error)?;
    caps::clear(None, caps::CapSet::Permitted).map_err(caps_error)?;
    Ok(())
}

/// The capabilities a container's processes keep. Every one of them is a capability in the
/// container's own user namespace, which the process has just created or joined: the kernel
/// lets it act only on what that namespace owns (its mount, UTS, IPC and network namespaces),
/// never on the host's, so keeping one gives the user nothing `unshare -Ur` would not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Kept {
    /// None: every capability is dropped (a plain container).
    #[default]
    None,
    /// Every capability the user namespace grants: a `--remap-root` container's root, uid 0
    /// there, which keeps them across exec as root does.
    All,
    /// Only these, also made ambient, so they survive the exec of a program run under the
    /// user's own (non-zero) uid, which would otherwise clear them.
    Ambient(Vec<Capability>),
}

impl Kept {
    /// Whether a process confined so holds `cap` (in the container's user namespace).
    pub fn holds(&self, cap: Capability) -> bool {
        match self {
            Kept::None => false,
            Kept::All => true,
            Kept::Ambient(kept) => kept.contains(&cap),
        }
    }

    /// The OCI names (`CAP_SYS_ADMIN`, ...) of the ambient ones.
    pub fn ambient_names(&self) -> Vec<String> {
        match self {
            Kept::Ambient(kept) => kept.iter().map(|c| c.to_string()).collect(),
            Kept::None | Kept::All => Vec::new(),
        }
    }

    /// From the OCI names of a spec's `process.capabilities.ambient`; an unknown name is an
    /// error rather than a capability silently dropped.
    pub fn ambient_from_names(names: &[String]) -> Result<Kept> {
        let kept = names
            .iter()
            .map(|n| {
                n.parse::<Capability>().map_err(|_| Error::Invalid {
                    what: "reading the container's capabilities from its OCI spec",
                    message: format!("unknown capability {n:?}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Kept::Ambient(kept))
    }

    /// Applies this to the calling process, which holds the user namespace's full set (it
    /// has just created or joined it) and has no_new_privs set.
    pub fn apply(&self) -> Result<()> {
        match self {
            Kept::All => Ok(()),
            Kept::None => drop_all(),
            Kept::Ambient(kept) => keep_ambient(kept),
        }
    }
}

/// Keeps exactly `kept`, ambient: the bounding set loses every other (while CAP_SETPCAP is
/// still held), the inheritable set and then the ambient one get `kept` (an ambient
/// capability must be permitted and inheritable), and effective and permitted shrink to it
/// last, effective first as the kernel wants it within permitted.
fn keep_ambient(kept: &[Capability]) -> Result<()> {
    let set: caps::CapsHashSet = kept.iter().copied().collect();
    for cap in caps::all() {
        // Read first, as caps::clear does: a capability this kernel does not know reads as
        // absent, where dropping it would fail.
        let bounded = caps::has_cap(None, caps::CapSet::Bounding, cap).unwrap_or(false);
        if bounded && !set.contains(&cap) {
            caps::drop(None, caps::CapSet::Bounding, cap).map_err(caps_error)?;
        }
    }
    caps::set(None, caps::CapSet::Inheritable, &set).map_err(caps_error)?;
    caps::clear(None, caps::CapSet::Ambient).map_err(caps_error)?;
    for cap in kept {
        caps::raise(None, caps::CapSet::Ambient, *cap).map_err(caps_error)?;
    }
    caps::set(None, caps::CapSet::Effective, &set).map_err(caps_error)?;
    caps::set(None, caps::CapSet::Permitted, &set).map_err(caps_error)?;
    Ok(())
}

/// The names (`CAP_CHOWN`, ...) of every capability berth knows, for describing the full
/// set a `--remap-root` container keeps.
pub fn all_names() -> Vec<String> {
    let mut names: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_kept_is_what_is_held() {
        assert!(!Kept::None.holds(Capability::CAP_SYS_ADMIN));
        assert!(Kept::All.holds(Capability::CAP_NET_ADMIN));
        let sys_admin = Kept::ambient_from_names(&["CAP_SYS_ADMIN".into()]).unwrap();
        assert_eq!(sys_admin, Kept::Ambient(vec![Capability::CAP_SYS_ADMIN]));
        assert!(sys_admin.holds(Capability::CAP_SYS_ADMIN));
        assert!(!sys_admin.holds(Capability::CAP_CHOWN));
        assert_eq!(sys_admin.ambient_names(), vec!["CAP_SYS_ADMIN".to_string()]);
        let e = Kept::ambient_from_names(&["CAP_NO_SUCH".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown capability \"CAP_NO_SUCH\""), "{e}");
    }

    /// In a user namespace of its own (as a container's task), a child keeps CAP_SYS_ADMIN
    /// across the exec of a program run under a non-zero uid, and nothing else; no_new_privs
    /// stays set.
    #[test]
    fn an_ambient_capability_survives_exec_under_a_plain_uid() {
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        // The caller's own ids, as a plain container maps them; run as root (whose 0 inside
        // would keep every capability across exec anyway), a non-zero id inside instead.
        // Everything the child writes is made before the fork (the test harness has threads).
        let inside = |id: u32| if id == 0 { 1100 } else { id };
        let uid_map = format!("{} {uid} 1", inside(uid));
        let gid_map = format!("{} {gid} 1", inside(gid));
        // CAP_SYS_ADMIN is bit 21: 0x200000, in every set after the exec.
        let script = std::ffi::CString::new(
            "grep -q '^Uid:.[1-9]' /proc/self/status && \
             grep -q '^CapAmb:.0000000000200000' /proc/self/status && \
             grep -q '^CapEff:.0000000000200000' /proc/self/status && \
             grep -q '^CapBnd:.0000000000200000' /proc/self/status && \
             grep -q '^NoNewPrivs:.1' /proc/self/status",
        )
        .unwrap();
        let kept = Kept::Ambient(vec![Capability::CAP_SYS_ADMIN]);
        // SAFETY: the child only makes syscalls, execs or _exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = (|| -> i32 {
                    if crate::namespaces::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_err() {
                        eprintln!("skipped: no unprivileged user namespaces here");
                        return 0;
                    }
                    let maps = std::fs::write("/proc/self/setgroups", "deny")
                        .and_then(|()| std::fs::write("/proc/self/uid_map", &uid_map))
                        .and_then(|()| std::fs::write("/proc/self/gid_map", &gid_map));
                    if maps.is_err() || set_no_new_privs().is_err() {
                        return 10;
                    }
                    if kept.apply().is_err() {
                        return 11;
                    }
                    let _ = nix::unistd::execv(c"/bin/sh", &[c"sh", c"-c", script.as_c_str()]);
                    12
                })();
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
