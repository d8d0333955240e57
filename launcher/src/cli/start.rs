//! `berth start [OPTIONS] IMAGE`: hold a container for a job step and print its handle;
//! `berth stop HANDLE`: end it.

use std::time::Duration;

use super::exec::{build_spec, print_spec, ContainerArgs};
use super::Globals;
use crate::cache;
use crate::config::Config;
use crate::container::{self, handle};
use crate::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub container: ContainerArgs,
    /// The image: a registry reference, or a .sif or squashfs file.
    pub image: String,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// The handle `berth start` printed (PID:FD).
    pub handle: String,
    /// Seconds to wait for the container to end.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// Starts the container; returns when it is stopped. Joiners bring their own command; the
/// spec's command is the image's (or /bin/sh), shown by --print-spec and run by nobody.
pub fn run_start(a: StartArgs, g: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(g.config.as_deref())?;
    // Held for the container's life: a cached image stays locked against eviction.
    let image = cache::runnable(&config, &a.image)?;
    let spec = match build_spec(&a.container, &image.path, Vec::new(), &config) {
        Err(Error::NoCommand) => {
            build_spec(&a.container, &image.path, vec!["/bin/sh".into()], &config)?
        }
        other => other?,
    };
    if a.container.print_spec {
        return print_spec(&spec);
    }
    container::start(&spec, &config.runtime)
}

/// Sends SIGTERM to the holder and waits (bounded) until it has torn the container down.
pub fn run_stop(a: StopArgs, _g: &Globals) -> Result<i32> {
    let h = handle::parse(&a.handle)?;
    let sys = |what| move |source| Error::Container { what, source };
    // The pidfd first, then the check: the signal then reaches the process we checked.
    let pidfd = berth_sys::process::PidFd::open(h.pid).map_err(|e| Error::HandleGone {
        handle: h.to_string(),
        source: std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::ESRCH)),
    })?;
    handle::check(&h)?;
    pidfd
        .signal(berth_sys::process::Signal::SIGTERM)
        .map_err(sys("signalling the holder"))?;
    if pidfd
        .wait_exit(Duration::from_secs(a.timeout))
        .map_err(sys("waiting for the holder"))?
    {
        Ok(0)
    } else {
        Err(Error::StopTimeout {
            handle: h.to_string(),
            secs: a.timeout,
        })
    }
}
