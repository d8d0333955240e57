//! Free space of a file system, for the image cache's check before a build, and the flags of
//! a mount, for a bind's remount.

use std::io;
use std::path::Path;

use nix::mount::MsFlags;

/// Bytes an unprivileged writer may still use on the file system holding `path` (root may
/// use the reserved blocks too; the cache leaves those alone).
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// The flags of the mount holding `path` that a bind of it keeps in a user namespace
/// (the kernel locks them): read-only, nosuid, nodev, noexec and the atime ones, as
/// mount(2) flags for a remount that must repeat them.
pub fn mount_flags(path: &Path) -> io::Result<MsFlags> {
    use nix::sys::statvfs::FsFlags;
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let pairs = [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st_flag, _)| st.flags().contains(*st_flag))
        .fold(MsFlags::empty(), |acc, (_, ms)| acc | *ms))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_some_space_and_errors_for_missing_paths() {
        let t = tempfile::tempdir().unwrap();
        assert!(super::available_bytes(t.path()).unwrap() > 0);
        assert!(super::available_bytes(&t.path().join("none")).is_err());
    }

    #[test]
    fn mount_flags_are_those_of_the_mount() {
        use super::MsFlags;
        // The per-mount options of / as the kernel lists them (field 6 of mountinfo).
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let options: Vec<String> = info
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .rfind(|f| f[4] == "/")
            .map(|f| f[5].split(',').map(String::from).collect())
            .unwrap();
        let flags = super::mount_flags(std::path::Path::new("/")).unwrap();
        for (name, flag) in [
            ("ro", MsFlags::MS_RDONLY),
            ("nosuid", MsFlags::MS_NOSUID),
            ("nodev", MsFlags::MS_NODEV),
            ("noexec", MsFlags::MS_NOEXEC),
            ("relatime", MsFlags::MS_RELATIME),
        ] {
            assert_eq!(
                flags.contains(flag),
                options.iter().any(|o| o == name),
                "{name}: {flags:?} {options:?}"
            );
        }
        assert!(super::mount_flags(std::path::Path::new("/no/such/path")).is_err());
    }
}
