//! The kernel boundary's one error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{call} failed: {source}")]
    Os {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{call} {}: {source}", path.display())]
    OsPath {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} inside the container passes through a symlink whose target does not exist; berth \
         does not create mountpoints through dangling symlinks (choose another destination or \
         fix the image)",
        path.display()
    )]
    DanglingSymlink { path: PathBuf },
    #[error(
        "{} is not a plain absolute path inside the container (use an absolute path without \
         `..`)",
        path.display()
    )]
    BadContainerPath { path: PathBuf },
    #[error("the FUSE helper {program} exited ({status}) before its mount was ready; its own message is above")]
    HelperFailed { program: String, status: String },
    #[error("{what}: {message}")]
    Invalid { what: &'static str, message: String },
}

impl Error {
    /// The errno behind an OS failure, so callers can turn e.g. EPERM from unshare into advice.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } | Error::OsPath { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn os(call: &'static str) -> impl FnOnce(nix::Error) -> Error {
        move |e| Error::Os {
            call,
            source: std::io::Error::from_raw_os_error(e as i32),
        }
    }

    pub(crate) fn os_path(
        call: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(nix::Error) -> Error {
        let path = path.to_path_buf();
        move |e| Error::OsPath {
            call,
            path,
            source: std::io::Error::from_raw_os_error(e as i32),
        }
    }

    pub(crate) fn io_path(
        call: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::OsPath { call, path, source }
    }
}
