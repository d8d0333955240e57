//! The handle of a container held by `berth start`: `PID:FD`. PID is the holder, whose user
//! and mount namespaces joiners enter; FD is a sealed memfd of the holder holding the
//! container's OCI spec (JSON) for the process's env, cwd and capabilities. A joiner opens a
//! pidfd on PID first, then takes the namespaces and the spec through `/proc/PID` (only the
//! same user can, and only root for a `--private` holder) and checks the pidfd is still
//! alive, so everything it uses belongs to that one process ([`berth_sys::holder`]). One
//! line, so it can be passed around as text.

use std::os::fd::{AsRawFd, OwnedFd};

use berth_sys::holder::Held;
use berth_sys::memfd::{SpecHandle, SPEC_NAME};
use berth_sys::process::PidFd;
use oci_spec::runtime::Spec;

use crate::{Error, Result};

/// The spec annotation naming the job step (`JOB.STEP`) a held container is for
/// (`berth start --step`).
pub const ANN_STEP: &str = "org.berth.step";

/// Records in `spec` that the container is job step `step`'s (`JOB.STEP`).
pub fn annotate_step(spec: &mut Spec, step: &str) {
    let mut annotations = spec.annotations().clone().unwrap_or_default();
    annotations.insert(ANN_STEP.into(), step.into());
    spec.set_annotations(Some(annotations));
}

/// Parses a handle as given on the command line.
pub fn parse(text: &str) -> Result<SpecHandle> {
    SpecHandle::parse(text).ok_or_else(|| Error::BadHandle(text.into()))
}

/// A pidfd on the handle's holder, opened before anything is read through its pid, so what
/// is checked and what is signalled or joined is one process.
pub fn pidfd(h: &SpecHandle) -> Result<PidFd> {
    PidFd::open(h.pid).map_err(|e| gone(h, e))
}

/// Checks the handle still names a berth holder: its pid is alive and owns a sealed spec
/// memfd at the handle's fd (a pid can be reused); returns the pidfd to act on.
pub fn check(h: &SpecHandle) -> Result<PidFd> {
    let pidfd = pidfd(h)?;
    berth_sys::holder::open(&pidfd, *h).map_err(|e| gone(h, e))?;
    Ok(pidfd)
}

/// The held container's namespaces and spec, by descriptor (see [`berth_sys::holder`]).
pub fn open(h: &SpecHandle) -> Result<Held> {
    berth_sys::holder::open(&pidfd(h)?, *h).map_err(|e| gone(h, e))
}

fn gone(h: &SpecHandle, e: berth_sys::Error) -> Error {
    let source = match e {
        berth_sys::Error::Os { source, .. } | berth_sys::Error::OsPath { source, .. } => source,
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    };
    Error::HandleGone {
        handle: h.to_string(),
        source,
    }
}

/// Publishes `spec` in a sealed memfd, prints the handle on stdout and detaches stdout.
/// The returned fd must stay open for as long as the container is held.
pub fn publish(spec: &Spec) -> Result<OwnedFd> {
    let json = serde_json::to_vec(spec).map_err(Error::Spec)?;
    let fd = berth_sys::memfd::sealed(SPEC_NAME, &json).map_err(|source| Error::Container {
        what: "publishing the spec",
        source,
    })?;
    let handle = SpecHandle {
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
    fn a_malformed_handle_names_the_expected_form() {
        let err = parse("12").unwrap_err().to_string();
        assert!(err.contains("expected PID:FD"), "{err}");
    }

    #[test]
    fn a_handle_to_a_non_berth_fd_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let h = SpecHandle {
            pid: std::process::id() as i32,
            fd: f.as_raw_fd(),
        };
        assert!(matches!(open(&h), Err(Error::HandleGone { .. })));
    }
}
