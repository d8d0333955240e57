//! Free space of a file system, for the image cache's check before a build.

use std::io;
use std::path::Path;

/// Bytes an unprivileged writer may still use on the file system holding `path` (root may
/// use the reserved blocks too; the cache leaves those alone).
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_some_space_and_errors_for_missing_paths() {
        let t = tempfile::tempdir().unwrap();
        assert!(super::available_bytes(t.path()).unwrap() > 0);
        assert!(super::available_bytes(&t.path().join("none")).is_err());
    }
}
