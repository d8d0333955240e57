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
}
