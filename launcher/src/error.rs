//! The launcher's one error type. Every message names the cause and, where the user can act,
//! the fix: these strings reach researchers through srun's stderr and batch output files.
//!
//! Several areas add variants here; keep each area's variants in its own marked section.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- general -------------------------------------------------------------------------
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Sys {
        path: PathBuf,
        #[source]
        source: berth_sys::Error,
    },
    // ---- config --------------------------------------------------------------------------
    #[error("berth configuration {path}: {message}")]
    Config { path: PathBuf, message: String },
    // ---- sif -----------------------------------------------------------------------------
    // ---- container -----------------------------------------------------------------------
    // ---- reference / policy --------------------------------------------------------------
    // ---- registry / fetch / cache --------------------------------------------------------
}

impl Error {
    /// Wraps an I/O error with what berth was doing, e.g. `io("reading /x/y.sif", e)`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
