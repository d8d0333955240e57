//! Sealed memory files: how a `berth start` holder publishes its container's spec to
//! joiners (readable by the same user through `/proc/PID/fd/N`, unchangeable once sealed).

use std::io::Write;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use crate::{Error, Result};

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
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&file),
        FcntlArg::F_ADD_SEALS(seals),
    )
    .map_err(Error::os("fcntl(F_ADD_SEALS)"))?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
