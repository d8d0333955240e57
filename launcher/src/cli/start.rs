//! `berth start [OPTIONS] [--image-fd FD] IMAGE`: hold a container for a job step and print
//! its handle; `berth stop HANDLE`: end it.
//!
//! A step's tasks join what `berth start --private` holds (the SPANK plugin's holder), so in
//! that mode, and whenever `--image-fd` is given, it applies the site policy itself instead of
//! trusting that a caller checked: registry images come through the policy-checked node
//! cache, and a local image file runs only where the policy allows local images and the file
//! lies in a listed, root-owned directory. The SPANK plugin hands over the very file root
//! vetted, opened, as `--image-fd` (the path the user wrote could point elsewhere by the time
//! the holder opens it). A plain `berth start` outside Slurm is, like `berth exec`, the
//! caller's own container: their own image files run in it.

use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use super::exec::{build_spec, changes_for, print_spec, ContainerArgs};
use super::Globals;
use crate::cache;
use crate::config::Config;
use crate::container::writable::NamedId;
use crate::container::{self, handle};
use crate::policy::{ImageRequest, Policy, Verdict};
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
    /// Run the local image file open on this descriptor (inherited from the caller), which
    /// IMAGE must name by its resolved path. The site policy on local images applies to it.
    #[arg(long, value_name = "FD")]
    pub image_fd: Option<u32>,
    /// Keep the container's changes as container NAME of job JOB (`--container-name`):
    /// a later `berth start --named` of the same JOB/NAME continues from them, until
    /// `berth named remove --job JOB`. One container at a time may use them.
    #[arg(long, value_name = "JOB/NAME", value_parser = NamedId::parse)]
    pub named: Option<NamedId>,
    /// Leave a writable container's changes on disk when it stops, for `berth save
    /// --changes` (the spec's org.berth.changes annotation names them).
    #[arg(long)]
    pub keep_changes: bool,
    /// The job step JOB.STEP this container is for, recorded in its spec (org.berth.step):
    /// the SPANK plugin checks it before entering a step's container by that name
    /// (`--container-name=JOB.STEP`, as in pyxis).
    #[arg(long, value_name = "JOB.STEP", value_parser = parse_step)]
    pub step: Option<String>,
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
    let image = if a.private || a.image_fd.is_some() {
        image_to_run(&config, a.image_fd, &a.image)?
    } else {
        ImageToRun::cached(cache::runnable(&config, &a.image)?)
    };
    let mut spec = match build_spec(&a.container, &image.path, Vec::new(), &config) {
        Err(Error::NoCommand) => {
            build_spec(&a.container, &image.path, vec!["/bin/sh".into()], &config)?
        }
        other => other?,
    };
    if let Some(step) = &a.step {
        handle::annotate_step(&mut spec, step);
    }
    if a.container.print_spec {
        return print_spec(&spec);
    }
    let mut changes = changes_for(&a.container, a.named.as_ref(), &config, &mut spec)?;
    if a.keep_changes {
        changes.iter_mut().for_each(|c| c.keep());
    }
    container::start(&spec, &config.runtime, changes)
}

/// `JOB.STEP`, two numbers.
fn parse_step(text: &str) -> std::result::Result<String, String> {
    match text.split_once('.') {
        Some((job, step)) if job.parse::<u32>().is_ok() && step.parse::<u32>().is_ok() => {
            Ok(text.to_owned())
        }
        _ => Err(format!("expected JOB.STEP (two numbers), not '{text}'")),
    }
}

/// The image file a container runs, and what keeps it usable while it runs.
struct ImageToRun {
    path: PathBuf,
    /// A registry image's lock against eviction.
    _cached: Option<cache::RunnableImage>,
    /// A local image's descriptor, so the file stays what was checked.
    _file: Option<File>,
}

impl ImageToRun {
    fn cached(image: cache::RunnableImage) -> ImageToRun {
        ImageToRun {
            path: image.path.clone(),
            _cached: Some(image),
            _file: None,
        }
    }
}

/// The file for `image`, or for the descriptor `fd`, under the site policy (see the module
/// comment).
fn image_to_run(config: &Config, fd: Option<u32>, image: &str) -> Result<ImageToRun> {
    let policy = Policy::new(&config.policy);
    let refuse = |reason: String| Error::FetchDenied { reason };
    if let Some(fd) = fd {
        // A new open of the descriptor's file (not of any path), so no unsafe adoption of a
        // raw descriptor is needed.
        let file = File::open(format!("/proc/self/fd/{fd}"))
            .map_err(|e| Error::io(format!("--image-fd {fd}: opening the descriptor"), e))?;
        let path = policy.check_local_descriptor(&file)?;
        if path.as_os_str() != image {
            return Err(refuse(format!(
                "--image-fd {fd} holds {}, not `{}` as the command line says; name the \
                 descriptor's own file",
                path.display(),
                crate::reference::shown(image)
            )));
        }
        return Ok(ImageToRun {
            path,
            _cached: None,
            _file: Some(file),
        });
    }
    match policy.check(image)? {
        (_, Verdict::Deny { reason }) => Err(refuse(reason)),
        (ImageRequest::LocalFile(path), Verdict::Allow { .. }) => {
            // Resolved, and root-owned all the way down: the path keeps naming this file.
            let file = File::open(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
            Ok(ImageToRun {
                path,
                _cached: None,
                _file: Some(file),
            })
        }
        (ImageRequest::Registry(reference), Verdict::Allow { .. }) => {
            // The canonical form names its registry, so a file of that name created
            // meanwhile cannot be taken for it.
            Ok(ImageToRun::cached(cache::runnable(
                config,
                &reference.to_string(),
            )?))
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_two_numbers() {
        assert_eq!(parse_step("12.4294967291"), Ok("12.4294967291".into()));
        for bad in ["12", "12.x", ".3", "12.3.4", "-1.2"] {
            let err = parse_step(bad).unwrap_err();
            assert!(err.contains("expected JOB.STEP"), "{bad}: {err}");
        }
    }
}
