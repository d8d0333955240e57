//! The handle of a container held by `berth start`: `PID:FD`. PID is the holder, whose user
//! and mount namespaces joiners enter; FD is a sealed memfd of the holder holding the
//! container's OCI spec (JSON), which joiners read through `/proc/PID/fd/FD` (only the same
//! user can) for the process's env, cwd and capabilities. One line, so the SPANK plugin can
//! keep it in the job's environment.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use oci_spec::runtime::Spec;

use crate::{Error, Result};

/// The memfd name joiners check, so a stale handle never reads some other process's fd.
const MEMFD_NAME: &std::ffi::CStr = c"berth-spec";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    pub pid: i32,
    pub fd: i32,
}

impl Handle {
    pub fn parse(s: &str) -> Result<Handle> {
        let bad = || Error::BadHandle(s.into());
        let (pid, fd) = s.trim().split_once(':').ok_or_else(bad)?;
        let pid: i32 = pid.parse().map_err(|_| bad())?;
        let fd: i32 = fd.parse().map_err(|_| bad())?;
        if pid <= 0 || fd < 0 {
            return Err(bad());
        }
        Ok(Handle { pid, fd })
    }

    fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", self.pid, self.fd))
    }

    /// Checks the handle still names a berth holder (a pid can be reused).
    pub fn check(&self) -> Result<()> {
        let gone = |source| Error::HandleGone {
            handle: self.to_string(),
            source,
        };
        let target = std::fs::read_link(self.fd_path()).map_err(gone)?;
        let expected = format!("/memfd:{}", MEMFD_NAME.to_string_lossy());
        if !target.to_string_lossy().starts_with(&expected) {
            return Err(gone(std::io::Error::from_raw_os_error(libc::ESRCH)));
        }
        Ok(())
    }

    /// The held container's spec.
    pub fn read_spec(&self) -> Result<Spec> {
        self.check()?;
        let bytes = std::fs::read(self.fd_path()).map_err(|source| Error::HandleGone {
            handle: self.to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(Error::Spec)
    }
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.pid, self.fd)
    }
}

/// Publishes `spec` in a sealed memfd, prints the handle on stdout and detaches stdout.
/// The returned fd must stay open for as long as the container is held.
pub fn publish(spec: &Spec) -> Result<OwnedFd> {
    let json = serde_json::to_vec(spec).map_err(Error::Spec)?;
    let fd = berth_sys::memfd::sealed(MEMFD_NAME, &json).map_err(|source| Error::Container {
        what: "publishing the spec",
        source,
    })?;
    let handle = Handle {
        pid: std::process::id() as i32,
        fd: fd.as_raw_fd(),
    };
    println!("{handle}");
    berth_sys::process::stdout_to_null().map_err(|source| Error::Container {
        what: "detaching stdout",
        source,
    })?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pid_colon_fd() {
        assert_eq!(
            Handle::parse("123:4\n").unwrap(),
            Handle { pid: 123, fd: 4 }
        );
        for bad in ["", "123", "x:4", "0:4", "12:-1", "1:2:3"] {
            assert!(Handle::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_handle_to_a_non_berth_fd_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let h = Handle {
            pid: std::process::id() as i32,
            fd: f.as_raw_fd(),
        };
        assert!(matches!(h.read_spec(), Err(Error::HandleGone { .. })));
    }
}
