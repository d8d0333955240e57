//! berth's kernel boundary. Every syscall and every `unsafe` block of the product lives in
//! this crate, behind small safe functions and the [`Syscall`] trait, so that container
//! assembly above it can be unit-tested without root.

pub mod error;
pub mod identity;

pub use error::{Error, Result};
