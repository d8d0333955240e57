//! Who the current process is.

use std::path::PathBuf;

/// The real uid of this process (who started berth, whatever its effective ids).
pub fn real_uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// The real gid of this process.
pub fn real_gid() -> u32 {
    // SAFETY: getgid cannot fail and touches no memory.
    unsafe { libc::getgid() }
}

/// The effective uid of this process (whose rights its file operations use).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The identity a spawned program takes (see [`crate::process::Spawn::credentials`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Full root, no supplementary groups.
    pub fn root() -> Credentials {
        Credentials {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// Takes these credentials. A process whose real uid is 0 may take euid 0 back first
    /// (slurmstepd runs `user_init` with real uid 0 and effective uid the user), so groups and
    /// gid are set while it is root, the uid last. Async-signal-safe: it runs between fork
    /// and exec.
    pub(crate) fn take_in_child(&self) -> std::io::Result<()> {
        let ok = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls on integers and a valid slice of `groups.len()` gids.
        unsafe {
            ok(libc::setresuid(0, 0, 0))?;
            ok(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            ok(libc::setresgid(self.gid, self.gid, self.gid))?;
            ok(libc::setresuid(self.uid, self.uid, self.uid))
        }
    }
}

/// Runs `f` with effective uid 0 and gives the caller's effective uid back afterwards. This
/// is how slurmstepd's `user_init` (real uid 0, effective uid the user) opens what only root
/// may open, as slurmstepd's own `_reclaim_privileges` does; glibc's seteuid applies to
/// every thread of the process. Where the effective uid is 0 already, or the real uid is not
/// 0 (a user's own process, a unit test), `f` simply runs as the caller.
pub fn with_effective_root<T>(f: impl FnOnce() -> T) -> crate::Result<T> {
    use nix::unistd::{seteuid, Uid};
    let (real, effective) = (real_uid(), effective_uid());
    if effective == 0 || real != 0 {
        return Ok(f());
    }
    seteuid(Uid::from_raw(0)).map_err(crate::Error::os("seteuid(0)"))?;
    /// Gives the user's euid back even if `f` panics.
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Err(e) = seteuid(Uid::from_raw(self.0)) {
                // Going on as root where the caller expects the user's rights would be worse
                // than ending slurmstepd.
                panic!("seteuid({}) failed after a root-only open: {e}", self.0);
            }
        }
    }
    let _restore = Restore(effective);
    Ok(f())
}

/// The passwd entry of a uid: what a container needs to give the user a name and a home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub home: PathBuf,
}

/// Looks a uid up in the host's user database (files, LDAP, ... through NSS); `None` when
/// the uid has no entry, which is legal (containers then use a synthetic name).
pub fn user_info(uid: u32) -> Option<UserInfo> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| UserInfo {
            name: u.name,
            home: u.dir,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_every_user_database() {
        let root = user_info(0).expect("uid 0 has a passwd entry");
        assert_eq!(root.name, "root");
        assert!(root.home.is_absolute());
    }

    #[test]
    fn ids_match_the_kernel_view() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let real: u32 = uid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(real_uid(), real);
        let gid_line = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
        let real: u32 = gid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(real_gid(), real);
    }

    /// slurmstepd's `user_init`: real uid 0, effective uid the user. Root-only files open
    /// inside [`with_effective_root`] only, and the user's euid comes back after it.
    #[test]
    fn effective_root_is_taken_back_and_given_up() {
        if real_uid() != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root only").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        // SAFETY: the forked child only changes its euid, opens a file and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let user = nix::unistd::Uid::from_raw(65534);
                let steps = [
                    nix::unistd::seteuid(user).is_ok(),
                    std::fs::read(&secret).is_err(),
                    with_effective_root(|| std::fs::read(&secret)).is_ok_and(|r| r.is_ok()),
                    effective_uid() == 65534,
                ];
                let failed = steps.iter().position(|ok| !ok).map_or(0, |i| i + 1);
                // SAFETY: _exit skips the parent's atexit handlers in this copy.
                unsafe { libc::_exit(failed as i32) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let exit = crate::process::reap(child.as_raw()).unwrap();
                assert_eq!(exit, crate::process::Exit::Code(0));
            }
        }
    }
}
