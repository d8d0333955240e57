//! Sealed memory files: how a `berth start` holder publishes its container's spec to
//! joiners (readable by the same user through `/proc/PID/fd/N`, unchangeable once sealed).

use std::ffi::CStr;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::fcntl::{FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use crate::{Error, Result};

/// Every seal [`sealed`] sets: nothing can change the content or the seals any more.
const SEALS: SealFlag = SealFlag::F_SEAL_SEAL
    .union(SealFlag::F_SEAL_SHRINK)
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_WRITE);

/// A spec is a few KiB; more is not one berth published, and is not read into memory.
const SPEC_MAX_BYTES: u64 = 1024 * 1024;

/// An unnamed, unsealed file in memory (close-on-exec), e.g. for a child's output that is
/// read only if something failed.
pub fn anonymous(name: &CStr) -> Result<std::fs::File> {
    let fd = memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC).map_err(Error::os("memfd_create"))?;
    Ok(fd.into())
}

/// A memfd holding `bytes`, sealed against any change.
pub fn sealed(name: &std::ffi::CStr, bytes: &[u8]) -> Result<OwnedFd> {
    let fd = memfd_create(
        name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(Error::os("memfd_create"))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes).map_err(|source| Error::Os {
        call: "write(memfd)",
        source,
    })?;
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&file),
        FcntlArg::F_ADD_SEALS(SEALS),
    )
    .map_err(Error::os("fcntl(F_ADD_SEALS)"))?;
    Ok(file.into())
}

/// The name of the memfd a `berth start` holder publishes its container's spec in. Joiners
/// check it, so a stale handle (a reused pid) never reads another process's descriptor.
pub const SPEC_NAME: &CStr = c"berth-spec";

/// The handle `berth start` prints and the SPANK plugin keeps: `PID:FD`, the holder whose
/// namespaces joiners enter and its sealed memfd holding the container's OCI spec, which the
/// same user reads through `/proc/PID/fd/FD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecHandle {
    pub pid: i32,
    pub fd: i32,
}

impl SpecHandle {
    /// Parses `PID:FD` (surrounding whitespace allowed); `None` if it is not one.
    pub fn parse(text: &str) -> Option<SpecHandle> {
        let (pid, fd) = text.trim().split_once(':')?;
        let (pid, fd) = (pid.parse().ok()?, fd.parse().ok()?);
        (pid > 0 && fd >= 0).then_some(SpecHandle { pid, fd })
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", self.pid, self.fd))
    }

    /// Checks that the handle still names a holder's spec memfd.
    pub fn check(&self) -> std::io::Result<()> {
        let target = std::fs::read_link(self.path())?;
        let expected = format!("/memfd:{}", SPEC_NAME.to_string_lossy());
        if target.to_string_lossy().starts_with(&expected) {
            Ok(())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("it is {}, not a berth container's spec", target.display()),
            ))
        }
    }

    /// The spec's bytes (JSON), after [`SpecHandle::check`] and a check that the memfd is
    /// sealed against any change (as [`sealed`] leaves it), so what was read stays what the
    /// holder runs with.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        self.check()?;
        let file = std::fs::File::open(self.path())?;
        let seals = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            FcntlArg::F_GET_SEALS,
        )
        .map(SealFlag::from_bits_truncate)
        .map_err(std::io::Error::from)?;
        if !seals.contains(SEALS) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the spec memfd is not sealed, so it is not a berth container's",
            ));
        }
        let mut bytes = Vec::new();
        file.take(SPEC_MAX_BYTES).read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

impl std::fmt::Display for SpecHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.pid, self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn own(fd: &impl AsRawFd) -> SpecHandle {
        SpecHandle {
            pid: std::process::id() as i32,
            fd: fd.as_raw_fd(),
        }
    }

    #[test]
    fn parses_pid_colon_fd() {
        assert_eq!(
            SpecHandle::parse("123:4\n"),
            Some(SpecHandle { pid: 123, fd: 4 })
        );
        assert_eq!(SpecHandle { pid: 123, fd: 4 }.to_string(), "123:4");
        for bad in ["", "123", "x:4", "0:4", "12:-1", "1:2:3"] {
            assert_eq!(SpecHandle::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_a_spec_memfd_and_refuses_any_other_descriptor() {
        let spec = sealed(SPEC_NAME, b"{}").unwrap();
        assert_eq!(own(&spec).read().unwrap(), b"{}");
        let other = sealed(c"other", b"{}").unwrap();
        let err = own(&other).read().unwrap_err();
        assert!(
            err.to_string().contains("not a berth container's spec"),
            "{err}"
        );
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(own(&null).check().is_err());
    }

    #[test]
    fn content_is_readable_through_proc_and_cannot_change() {
        let fd = sealed(c"test", b"{\"a\":1}").unwrap();
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}");
        // Opening for writing is allowed; any write is refused by the seal.
        let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(w.write_all(b"x").is_err());
    }
}
