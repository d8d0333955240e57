//! slurmstepd on the compute node (S_CTX_REMOTE).
//!
//! Who runs which line here matters:
//! - `init` and the option callbacks run in slurmstepd as root, before privileges are dropped.
//!   A failure reported here DRAINS THE NODE for batch jobs, so nothing a job can cause may
//!   fail here: values are only recorded, and `guard` defers any failure to `task_init`.
//! - `task_init` runs in each task's process, as the user, after Slurm placed it in the job's
//!   cgroups. Failing here ends the task with exit code 1, shows the message to the user and
//!   leaves the node up: this is where every job-caused problem is reported.

use std::ffi::CString;
use std::sync::Mutex;

use crate::config::Config;
use crate::error::Error;
use crate::guard;
use crate::options::{self, ContainerRequest, Given, ImageChoice, Opt, Origin, SPECS};
use crate::spank::{self, Spank};
use crate::submit::{REQUEST_VAR, SLURM_CONTAINER};

/// The option values slurmstepd received with the step (srun's launch message, or the batch
/// step's environment), as given: they are judged in `task_init`, where a verdict is safe.
static GIVEN: Mutex<Vec<Given>> = Mutex::new(Vec::new());

/// Reads the plugstack.conf arguments and registers the options, without which slurmstepd
/// would drop the values srun and sbatch sent.
pub fn init(spank: Spank, args: &[String]) -> Result<(), Error> {
    let (config, problems) = Config::from_plugin_args(args);
    for problem in &problems {
        spank::log_error(&problem.to_string());
    }
    spank::log_debug(&format!("launcher {}", config.berth.display()));
    spank.register(&crate::OPTIONS)
}

/// Records one option value of the step; never fails (see the module comment).
pub fn option(opt: Opt, value: &[u8]) -> Result<(), Error> {
    GIVEN.lock().unwrap_or_else(|p| p.into_inner()).push(Given {
        opt,
        value: value.to_vec(),
        origin: Origin::CommandLine,
    });
    Ok(())
}

/// Runs in each task before it executes the user's command: fails the task if the job asked
/// for a container, because this build cannot run one yet and must not run the job on the
/// host instead.
pub fn task_init(spank: Spank) -> Result<(), Error> {
    if let Some(earlier) = guard::take_deferred() {
        return Err(Error::EarlierFailure { earlier });
    }
    let given = GIVEN.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let getenv = |name: &str| -> Result<Option<Vec<u8>>, Error> {
        spank.getenv(&CString::new(name).expect("variable names have no NUL"))
    };
    let transport = getenv(REQUEST_VAR)?;
    let mut exported = Vec::new();
    for spec in &SPECS {
        if let Some(value) = getenv(&format!("SLURM_SPANK_{}", spec.opt.slurm_env_name()))? {
            exported.push((spec.opt, value));
        }
    }
    let (request, origin) = requested(transport, given, getenv(SLURM_CONTAINER)?, exported)?;
    match request {
        ContainerRequest::None | ContainerRequest::Host => Ok(()),
        ContainerRequest::Container { image, .. } => {
            Err(Error::ContainersNotSupportedYet { image, origin })
        }
    }
}

/// What the step asked for, and from where, in order of precedence:
/// 1. `SLURM_SPANK_BERTH_REQUEST`: the request the login node merged, checked and pinned;
/// 2. without it (srun/sbatch ran without the plugin, e.g. with a plugstack.conf of the
///    user's own), the step's raw options, with the copies sbatch exports as
///    `SLURM_SPANK__SLURM_SPANK_OPTION_berth_*` standing in for options that did not arrive
///    (Slurm 22.05 drops them from the batch step under `--export=NONE`), and Slurm's
///    `--container` (SLURM_CONTAINER) for the image when `--container-image` is absent.
///
/// Every value is parsed again here: nothing from the login node is trusted.
fn requested(
    transport: Option<Vec<u8>>,
    mut given: Vec<Given>,
    slurm_container: Option<Vec<u8>>,
    exported: Vec<(Opt, Vec<u8>)>,
) -> Result<(ContainerRequest, &'static str), Error> {
    if let Some(text) = transport {
        return Ok((
            ContainerRequest::from_transport(&text)?,
            "the request checked at submission",
        ));
    }
    for (opt, value) in exported {
        if !given.iter().any(|g| g.opt.setting().0 == opt.setting().0) {
            given.push(Given {
                opt,
                value,
                origin: Origin::Inherited,
            });
        }
    }
    let settings = options::settings(&given, None)?;
    let (image, origin) = match (settings.image, slurm_container) {
        (Some((image, _)), _) => (image, "--container-image"),
        (None, Some(value)) if !value.is_empty() => (
            options::parse_image("--container (SLURM_CONTAINER)", &value)?,
            "--container, SLURM_CONTAINER",
        ),
        (None, _) => return Ok((ContainerRequest::None, "no request")),
    };
    let request = match image {
        ImageChoice::Host => ContainerRequest::Host,
        ImageChoice::Image(image) => ContainerRequest::Container {
            image,
            options: settings.options,
        },
    };
    Ok((request, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<Vec<u8>> {
        Some(s.as_bytes().to_vec())
    }

    fn image(s: &str) -> ContainerRequest {
        ContainerRequest::Container {
            image: s.into(),
            options: options::ContainerOptions::default(),
        }
    }

    fn option(opt: Opt, value: &str) -> Given {
        Given {
            opt,
            value: value.as_bytes().to_vec(),
            origin: Origin::CommandLine,
        }
    }

    #[test]
    fn no_request_runs_on_the_host() {
        assert_eq!(
            requested(None, vec![], None, vec![]),
            Ok((ContainerRequest::None, "no request"))
        );
        assert_eq!(
            requested(None, vec![], v(""), vec![]).unwrap().0,
            ContainerRequest::None
        );
        assert_eq!(
            requested(v("container-image=none"), vec![], v("a"), vec![])
                .unwrap()
                .0,
            ContainerRequest::Host
        );
    }

    #[test]
    fn the_submitted_request_wins_and_is_checked_again() {
        let (request, origin) = requested(
            v("container-image=h/r@sha256:00\ncontainer-readonly"),
            vec![option(Opt::Image, "other")],
            v("native"),
            vec![],
        )
        .unwrap();
        let ContainerRequest::Container { image, options } = request else {
            panic!()
        };
        assert_eq!(
            (image.as_str(), options.writable),
            ("h/r@sha256:00", Some(false))
        );
        assert!(origin.contains("submission"));
        assert!(requested(v("container-mounts=rel:/x"), vec![], None, vec![]).is_err());
    }

    #[test]
    fn raw_options_without_the_plugin_at_submission() {
        assert_eq!(
            requested(None, vec![option(Opt::Image, "a")], v("b"), vec![]),
            Ok((image("a"), "--container-image"))
        );
        assert_eq!(
            requested(None, vec![], v("b"), vec![]),
            Ok((image("b"), "--container, SLURM_CONTAINER"))
        );
        // The exported copy stands in for an option that did not arrive, and only then.
        assert_eq!(
            requested(None, vec![], None, vec![(Opt::Image, b"c".to_vec())])
                .unwrap()
                .0,
            image("c")
        );
        let (request, _) = requested(
            None,
            vec![option(Opt::Image, "a"), option(Opt::Workdir, "/w")],
            None,
            vec![
                (Opt::Image, b"c".to_vec()),
                (Opt::Workdir, b"/x".to_vec()),
                (Opt::NoEntrypoint, vec![]),
            ],
        )
        .unwrap();
        let ContainerRequest::Container { image, options } = request else {
            panic!()
        };
        assert_eq!(image, "a");
        assert_eq!(options.workdir.as_deref(), Some("/w"));
        assert_eq!(options.entrypoint, Some(false));
    }

    #[test]
    fn refusal_message_tells_the_user_what_to_do() {
        let msg = Error::ContainersNotSupportedYet {
            image: "busybox".into(),
            origin: "--container-image",
        }
        .to_string();
        assert!(msg.contains("'busybox'"), "{msg}");
        assert!(msg.contains(
            "this berth build does not run containers on compute nodes yet; remove \
             --container-image / --container to run on the host"
        ));
    }
}
