//! berth's kernel boundary. Every syscall and every `unsafe` block of the product lives in
//! this crate, behind small safe functions and the [`Syscall`] trait, so that container
//! assembly above it can be unit-tested without root.

pub mod caps;
pub mod cgroup;
pub mod error;
pub mod fs;
pub mod fsid;
pub mod holder;
pub mod identity;
pub mod memfd;
pub mod mount_options;
pub mod namespaces;
pub mod process;
#[cfg(any(test, feature = "recording"))]
pub mod recording;
pub mod rootfs;
pub mod seccomp;
pub mod statfs;
pub mod syscall;

pub use error::{Error, Result};
pub use namespaces::{join, Isolation, Namespaces};
pub use nix::mount::MsFlags;
pub use process::Confinement;
pub use rootfs::MountpointKind;
pub use syscall::{LinuxSyscall, Mount, Syscall};
