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
    /// Make the holder non-dumpable before anything else: no other process of the user can
    /// then trace it or open its descriptors and namespaces, only root can (how the SPANK
    /// plugin starts a step's container, whose namespaces root takes from the holder). Such
    /// a container cannot be joined with `berth exec --join` by its user.
    #[arg(long)]
    pub private: bool,
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
    if a.private {
        // First: until this, any process of the user may open our stdout or ptrace us.
        berth_sys::process::set_non_dumpable().map_err(|source| Error::Container {
            what: "making the holder private",
            source,
        })?;
    }
    let config = Config::load_for_caller(g.config.as_deref())?;
    // Held for the container's life: a cached image stays locked against eviction.
    let image = cache::runnable(&config, &a.image)?;
    let site = &config.site;
    let spec = match build_spec(&a.container, site, &image.path, Vec::new()) {
        Err(Error::NoCommand) => {
            build_spec(&a.container, site, &image.path, vec!["/bin/sh".into()])?
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
    // The pidfd of the process checked: the signal reaches that process, whatever its pid.
    let pidfd = handle::check(&h)?;
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
