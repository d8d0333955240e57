//! Submission on the login node, shared by srun (`local`) and sbatch/salloc (`allocator`),
//! both running as the user: collect the options, decide what the step runs in, refuse what
//! policy refuses, pin the image's tag to a digest, and hand the result to the job.
//!
//! Failing here is the right way to refuse a request: srun/sbatch print the message and exit
//! non-zero before anything is queued or reaches a compute node. Every check is repeated on
//! the node, which trusts nothing from here (a user can run srun with a plugstack.conf of
//! their own); these checks exist to give a clear answer early.
//!
//! What the job receives: `SLURM_SPANK_BERTH_REQUEST`, the merged request in the options' own
//! syntax ([`ContainerRequest::to_transport`]), with the image replaced by its digest-pinned
//! form; or, where the registry wants credentials the user lacks and the site's controller
//! pins tags (`[registry] controller_pin`), with the tag as written, which the job control
//! variable `BERTH_PIN` names for `berth pin-job` (PrologSlurmctld) to pin once per job. It is set in the submitting process's environment, which srun and sbatch copy into
//! the step's (srun only after `init_post_opt`, so the value set here is the one sent); the
//! `SLURM_` prefix is what lets it through `--export=NONE`, under which Slurm passes only
//! `SLURM_*` variables (seen on 22.05, for sbatch and for an srun inside such a job, which
//! inherits SLURM_EXPORT_ENV=NONE). sbatch/salloc also put it in Slurm's job control
//! environment as `BERTH_REQUEST`, which Slurm hands to the batch step under the same
//! `SLURM_SPANK_` name and to the job's prolog/epilog.
//!
//! Steps inside a job. The job's tasks see the request, so an srun inside them runs in
//! the same pinned image (not a re-resolved tag) unless it names another. Slurm's own
//! `--container` cannot be told apart that way: srun and sbatch export it as SLURM_CONTAINER
//! only if that is not already set, so inside `sbatch --container=A` a nested
//! `srun --container=B` would still show A. The plugin therefore takes SLURM_CONTAINER out of
//! the environment once it has read it: the job's tasks no longer carry it, and a nested
//! `srun --container=B` exports B afresh.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

use crate::config::Config;
use crate::error::Error;
use crate::launcher::{self, Launcher, Partition, Verdict};
use crate::options::{
    self, ContainerRequest, Env, Given, ImageChoice, Opt, Origin, Settings, SPECS,
};
use crate::spank::{self, Context, Spank};

/// The variable that carries the merged, pinned request to the node and to nested steps.
pub const REQUEST_VAR: &str = "SLURM_SPANK_BERTH_REQUEST";

/// The name given to `spank_job_control_setenv`, which Slurm prefixes into [`REQUEST_VAR`].
pub const JOB_CONTROL_NAME: &str = "BERTH_REQUEST";

/// The job control variable naming the image whose tag the controller pins.
pub const PIN_NAME: &str = "BERTH_PIN";

/// Slurm's own `--container` value, as srun/sbatch/salloc export it.
pub const SLURM_CONTAINER: &str = "SLURM_CONTAINER";

/// What the option callbacks of this srun/sbatch process collected.
#[derive(Debug)]
struct Collected {
    config: Config,
    /// The `_SLURM_SPANK_OPTION_berth_*` values this process inherited from an enclosing job,
    /// read before Slurm replays them through the callbacks (indexed like `SPECS`).
    inherited: Vec<Option<Vec<u8>>>,
    given: Vec<Given>,
}

static COLLECTED: Mutex<Option<Collected>> = Mutex::new(None);

fn collected() -> std::sync::MutexGuard<'static, Option<Collected>> {
    COLLECTED.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process environment as bytes: on the login node it is the user's own, the right
/// source for `BERTH_CONTAINER_*` and Slurm's exports.
fn getenv(name: &str) -> Option<Vec<u8>> {
    std::env::var_os(name).map(|v| v.as_bytes().to_vec())
}

/// `slurm_spank_init`: reads the plugstack.conf arguments, notes the inherited option
/// values, and offers the options to the command line.
pub fn init(spank: Spank, args: &[String]) -> Result<(), Error> {
    let (config, problems) = Config::from_plugin_args(args);
    // The admin reads these in slurmd's log; on every user's terminal they would be noise.
    for problem in &problems {
        spank::log_debug(&problem.to_string());
    }
    let inherited = SPECS.iter().map(|s| inherited(s.opt, &getenv)).collect();
    *collected() = Some(Collected {
        config,
        inherited,
        given: Vec::new(),
    });
    spank.register(&crate::OPTIONS)
}

/// The value of `opt` Slurm will replay from the environment of an enclosing job:
/// `_SLURM_SPANK_OPTION_berth_<opt>` (set in salloc's shell), else the copy sbatch exports as
/// `SLURM_SPANK__SLURM_SPANK_OPTION_berth_<opt>`, which is all a batch script has (seen on
/// 22.05: slurmstepd takes the former out of the batch step's environment, and srun replays
/// the latter).
fn inherited(opt: Opt, env: Env) -> Option<Vec<u8>> {
    let name = opt.slurm_env_name();
    env(&name).or_else(|| env(&format!("SLURM_SPANK_{name}")))
}

/// An option callback: records the value. Slurm first replays the options inherited from an
/// enclosing job, then runs the command line's; the first call of an option with exactly the
/// inherited value is the replay.
pub fn option(opt: Opt, value: &[u8]) -> Result<(), Error> {
    let mut guard = collected();
    let state = guard.as_mut().ok_or_else(not_initialised)?;
    let replay = state.inherited[opt.index()].as_deref() == Some(value)
        && !state.given.iter().any(|g| g.opt == opt);
    state.given.push(Given {
        opt,
        value: value.to_vec(),
        origin: if replay {
            Origin::Inherited
        } else {
            Origin::CommandLine
        },
    });
    Ok(())
}

fn not_initialised() -> Error {
    Error::Panicked {
        callback: "option",
        detail: "an option callback ran before slurm_spank_init".to_owned(),
    }
}

/// Slurm's `--container` where the site runs Slurm's own OCI containers (`oci_conf`, see
/// [`spank::slurm_oci_conf`]) is Slurm's: berth does not read it as an image (elsewhere it
/// does, as pyxis users expect), and a step that asks for both kinds is refused rather than
/// run in a berth container inside Slurm's. Returns the value berth may read.
pub fn slurm_container_for_berth(
    oci_conf: Option<&std::path::Path>,
    slurm_container: Option<Vec<u8>>,
    request: &ContainerRequest,
) -> Result<Option<Vec<u8>>, Error> {
    let Some(oci_conf) = oci_conf else {
        return Ok(slurm_container);
    };
    match (slurm_container.filter(|v| !v.is_empty()), request) {
        (Some(bundle), ContainerRequest::Container { .. }) => Err(Error::TwoContainerKinds {
            bundle: String::from_utf8_lossy(&bundle).into_owned(),
            oci_conf: oci_conf.display().to_string(),
        }),
        _ => Ok(None),
    }
}

/// `slurm_spank_init_post_opt`: every option is known; decide, check, pin and export.
pub fn init_post_opt(spank: Spank, context: Context) -> Result<(), Error> {
    let (config, given) = {
        let guard = collected();
        let state = guard.as_ref().ok_or_else(not_initialised)?;
        (state.config.clone(), state.given.clone())
    };
    let launcher = Launcher::new(&config.berth);
    let oci_conf = spank::slurm_oci_conf();
    let env = |name: &str| match oci_conf {
        Some(_) if name == SLURM_CONTAINER => None,
        _ => getenv(name),
    };
    let request = decide(&given, &env, context, &launcher)?;
    slurm_container_for_berth(oci_conf.as_deref(), getenv(SLURM_CONTAINER), &request)?;
    spank::log_debug(&format!("request: {request:?}"));
    if let ContainerRequest::Container { options, .. } = &request {
        for warning in missing_sources(&options.mounts) {
            spank::log_error(&warning);
        }
    }

    // The process environment is changed on purpose: srun, sbatch and salloc build the
    // job's environment from their own `environ`, and Slurm offers a plugin no other way to
    // reach it here (spank_setenv/unsetenv answer ESPANK_NOT_REMOTE outside slurmstepd; the
    // job control environment reaches neither an srun step nor salloc's shell). Slurm's own
    // option handling sets variables the same way in this callback.
    // See the module comment: read once, then out of the job's way (unless it is Slurm's).
    if oci_conf.is_none() {
        std::env::remove_var(SLURM_CONTAINER);
    }
    let transport = request.to_transport();
    if transport.is_empty() {
        // A request inherited from an enclosing job and overridden to nothing cannot happen
        // (an inherited one is always chosen), but a stale value in the user's own shell can.
        std::env::remove_var(REQUEST_VAR);
        return Ok(());
    }
    std::env::set_var(REQUEST_VAR, OsStr::new(&transport));
    if context == Context::Allocator {
        spank.job_control_setenv(JOB_CONTROL_NAME, &transport)?;
    }
    if let Some(image) = left_to_the_controller(&request) {
        // PrologSlurmctld sees it as SPANK_BERTH_PIN: srun and salloc hand the job control
        // environment to slurmctld with the allocation they create (an srun inside a job
        // creates none, and its tag is the job's, pinned already or under this same name).
        spank.job_control_setenv(PIN_NAME, image)?;
    }
    Ok(())
}

/// The image whose tag the controller pins (`berth pin-job`): a registry image the
/// submission could not pin, because the registry wants credentials the user lacks.
fn left_to_the_controller(request: &ContainerRequest) -> Option<&str> {
    match request {
        ContainerRequest::Container { image, .. }
            if !image.starts_with('/') && !launcher::is_pinned(image) =>
        {
            Some(image)
        }
        _ => None,
    }
}

/// Where the chosen image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageSource {
    /// `--container-image` or `BERTH_CONTAINER_IMAGE`, with its origin.
    Option(Origin),
    /// Slurm's `--container`.
    SlurmContainer,
    /// The enclosing job's request, already pinned.
    Job,
}

/// Picks the step's image, strongest first: this command's `--container-image`, Slurm's
/// `--container` (also a command-line option; `--container-image` wins when both are given),
/// the enclosing job's pinned image, its replayed `--container-image` (the same image,
/// unpinned: only met where the job's request was lost, e.g. removed with `env -u`), and
/// last the user's `BERTH_CONTAINER_IMAGE`.
fn select_image(
    settings: &Settings,
    slurm_container: Option<ImageChoice>,
    job: Option<ImageChoice>,
) -> Option<(ImageChoice, ImageSource)> {
    let option = |wanted: Origin| {
        settings
            .image
            .clone()
            .filter(|(_, origin)| *origin == wanted)
            .map(|(image, origin)| (image, ImageSource::Option(origin)))
    };
    option(Origin::CommandLine)
        .or_else(|| slurm_container.map(|i| (i, ImageSource::SlurmContainer)))
        .or_else(|| job.map(|i| (i, ImageSource::Job)))
        .or_else(|| option(Origin::Inherited))
        .or_else(|| option(Origin::Environment))
}

/// The whole submission-side decision, with the environment and the launcher as arguments
/// so tests can drive it.
fn decide(
    given: &[Given],
    env: Env,
    context: Context,
    launcher: &Launcher,
) -> Result<ContainerRequest, Error> {
    let mut settings = options::settings(given, Some(env))?;
    if let Ok(cwd) = std::env::current_dir() {
        options::absolute_sources(&mut settings.options.mounts, &cwd);
    }
    let slurm_container = env(SLURM_CONTAINER)
        .filter(|v| !v.is_empty())
        .map(|v| options::parse_image("--container (SLURM_CONTAINER)", &v))
        .transpose()?;
    let job = env(REQUEST_VAR)
        .map(|text| ContainerRequest::from_transport(&text))
        .transpose()?
        .and_then(|request| match request {
            ContainerRequest::None | ContainerRequest::Named { .. } => None,
            ContainerRequest::Host => Some(ImageChoice::Host),
            ContainerRequest::Container { image, .. } => Some(ImageChoice::Image(image)),
        });

    let (image, source) = match select_image(&settings, slurm_container, job) {
        Some((ImageChoice::Image(image), source)) => (image, source),
        // The job's container of that name: the node knows its image.
        None if settings.options.name.is_some() => {
            return Ok(ContainerRequest::Named {
                options: settings.options,
            })
        }
        choice => {
            if choice.is_none() && settings.options_origin == Some(Origin::CommandLine) {
                let option = given
                    .iter()
                    .rev()
                    .find(|g| g.origin == Origin::CommandLine && g.opt != Opt::Image)
                    .map(|g| options::source_name(g.opt, g.origin))
                    .unwrap_or_default();
                return Err(Error::OptionsWithoutImage { option });
            }
            let asked_for_host = choice.is_some();
            let partition = partition(env, context);
            if let Some(reason) =
                launcher.require_container(Partition::Named(partition.as_deref()))?
            {
                return Err(Error::ContainerRequired {
                    asked_for_host,
                    partition,
                    reason,
                });
            }
            return Ok(if asked_for_host {
                ContainerRequest::Host
            } else {
                ContainerRequest::None
            });
        }
    };

    let vetted = match launcher.policy_check(&image)? {
        Verdict::Deny(reason) => return Err(Error::PolicyDenied { image, reason }),
        Verdict::Allow(vetted) => vetted,
    };
    let pinned = match source {
        // Pinned when the job was submitted (or by the controller, under the name written):
        // the whole job runs the same bytes.
        ImageSource::Job => image,
        // A local image file, by the path it resolves to: there is no digest to pin, and
        // the node checks that path again.
        _ if vetted.starts_with('/') => vetted,
        // None: the registry wants credentials the user lacks, and the controller pins the
        // tag once for the whole job (`berth pin-job`); the tag goes as written.
        ImageSource::Option(_) | ImageSource::SlurmContainer => {
            launcher.resolve(&image)?.unwrap_or(image)
        }
    };
    Ok(ContainerRequest::Container {
        image: pinned,
        options: settings.options,
    })
}

/// Warnings for the mount sources this host lacks. Only a warning: the node, where the
/// job's paths must exist (a node-local `/raid`, say), checks them and refuses the step
/// there, from the task, with the same cause.
fn missing_sources(mounts: &[options::Mount]) -> Vec<String> {
    mounts
        .iter()
        .filter(|m| m.is_host_path())
        .filter_map(|m| {
            let e = std::fs::metadata(&m.src).err()?;
            Some(format!(
                "warning: the mount source path does not exist or is unusable here: '{}' \
                 ({e}); the compute node checks it again and refuses the step if it lacks it",
                m.src
            ))
        })
        .collect()
}

/// The partition the job will run in, where the submitting process can know it. SPANK has no
/// item for it and Slurm's `--partition` is not a SPANK option, so only the environment
/// tells: the partition input variables (`SBATCH_PARTITION`, `SALLOC_PARTITION`,
/// `SLURM_PARTITION` for srun) and, for an srun inside an allocation, the allocation's own.
/// `-p` on the command line is not visible here; the node checks again with the real one.
fn partition(env: Env, context: Context) -> Option<String> {
    let vars: &[&str] = match context {
        Context::Allocator => &["SBATCH_PARTITION", "SALLOC_PARTITION"],
        _ => &["SLURM_PARTITION", "SLURM_JOB_PARTITION"],
    };
    vars.iter()
        .find_map(|var| env(var))
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn slurm_container_is_slurms_where_oci_conf_is_configured() {
        let image = ContainerRequest::Container {
            image: "img".into(),
            options: options::ContainerOptions::default(),
        };
        let bundle = Some(b"/scratch/bundle".to_vec());
        let oci = std::path::Path::new("/etc/slurm/oci.conf");
        // No oci.conf: berth's to read, as an image.
        assert_eq!(
            slurm_container_for_berth(None, bundle.clone(), &ContainerRequest::None).unwrap(),
            bundle
        );
        // oci.conf: Slurm's; berth reads nothing and runs no container of its own...
        for request in [ContainerRequest::None, ContainerRequest::Host] {
            assert_eq!(
                slurm_container_for_berth(Some(oci), bundle.clone(), &request).unwrap(),
                None
            );
        }
        // ...and --container-image alone is still berth's.
        assert_eq!(
            slurm_container_for_berth(Some(oci), None, &image).unwrap(),
            None
        );
        // Both kinds at once: refused, naming both and the way out.
        let err = slurm_container_for_berth(Some(oci), bundle, &image).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::TwoContainerKinds { .. }), "{err:?}");
        assert!(
            text.contains("/scratch/bundle") && text.contains("/etc/slurm/oci.conf"),
            "{text}"
        );
    }

    const DIGEST: &str = "564738b94caf6e650d2958faba160d41ffd14562c384717105d50bd4e59b20cc";

    /// A stand-in launcher: allows `ok/*`, pins by appending the digest, requires a container
    /// in partition `gpu`, and leaves a trace of each call in `calls`.
    fn launcher(dir: &tempfile::TempDir) -> Launcher {
        let path = dir.path().join("berth");
        let calls = dir.path().join("calls");
        std::fs::write(
            &path,
            format!(
                r#"#!/bin/sh
echo "$*" >> {calls}
case "$1 $2" in
  "policy check") case "$4" in
      ok/*) echo "allow: $4 (rule: ok/*)";;
      /*) echo "allow: /real$4 (rule: local_image_dirs: /real)";;
      *) echo "deny: $4 is not approved"; exit 1;;
    esac;;
  "policy require-container") [ "$4" = gpu ] && {{ echo "partition gpu requires containers"; exit 0; }}; exit 1;;
  "resolve --") case "$3" in ok/private*) exit 77;; esac; echo "${{3%%:*}}@sha256:{DIGEST}";;
  *) exit 2;;
esac"#,
                calls = calls.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Launcher::new(&path)
    }

    fn calls(dir: &tempfile::TempDir) -> Vec<String> {
        std::fs::read_to_string(dir.path().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn cli(opt: Opt, value: &str) -> Given {
        Given {
            opt,
            value: value.as_bytes().to_vec(),
            origin: Origin::CommandLine,
        }
    }

    fn run(
        given: &[Given],
        env: &[(&str, &str)],
        context: Context,
    ) -> (Result<ContainerRequest, Error>, Vec<String>) {
        let _serial = crate::launcher::serial_spawns();
        let dir = tempfile::tempdir().unwrap();
        let env: HashMap<String, Vec<u8>> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect();
        let result = decide(given, &|k| env.get(k).cloned(), context, &launcher(&dir));
        (result, calls(&dir))
    }

    fn image_of(result: Result<ContainerRequest, Error>) -> String {
        match result {
            Ok(ContainerRequest::Container { image, .. }) => image,
            other => panic!("{other:?}"),
        }
    }

    fn pinned(repo: &str) -> String {
        format!("{repo}@sha256:{DIGEST}")
    }

    #[test]
    fn image_sources_in_order() {
        let job = format!("container-image={}", pinned("ok/job"));
        let inherited = Given {
            origin: Origin::Inherited,
            ..cli(Opt::Image, "ok/replayed:1")
        };
        type Case<'a> = (Vec<Given>, Vec<(&'a str, &'a str)>, String);
        let cases: Vec<Case> = vec![
            // --container-image wins over --container.
            (
                vec![cli(Opt::Image, "ok/opt:1")],
                vec![("SLURM_CONTAINER", "ok/native:1")],
                pinned("ok/opt"),
            ),
            (
                vec![],
                vec![("SLURM_CONTAINER", "ok/native:1")],
                pinned("ok/native"),
            ),
            // Inside a job: the job's pinned image, not re-resolved, beats its replayed option
            // and the user's environment default.
            (
                vec![inherited.clone()],
                vec![(REQUEST_VAR, &job), ("BERTH_CONTAINER_IMAGE", "ok/env:1")],
                pinned("ok/job"),
            ),
            // ... also when only the --export=NONE copy reached the batch step.
            (
                vec![],
                vec![("SLURM_SPANK_BERTH_REQUEST", &job)],
                pinned("ok/job"),
            ),
            // ... but a nested srun's own choice beats it.
            (
                vec![inherited.clone(), cli(Opt::Image, "ok/mine:2")],
                vec![(REQUEST_VAR, &job)],
                pinned("ok/mine"),
            ),
            (
                vec![inherited.clone()],
                vec![(REQUEST_VAR, &job), ("SLURM_CONTAINER", "ok/nested:3")],
                pinned("ok/nested"),
            ),
            (vec![inherited], vec![], pinned("ok/replayed")),
            (
                vec![],
                vec![("BERTH_CONTAINER_IMAGE", "ok/env:1")],
                pinned("ok/env"),
            ),
        ];
        for (given, env, want) in cases {
            let (result, _) = run(&given, &env, Context::Local);
            assert_eq!(image_of(result), want, "{given:?} {env:?}");
        }
    }

    #[test]
    fn the_job_image_is_checked_but_not_resolved_again() {
        let job = format!("container-image={}", pinned("ok/job"));
        let (result, calls) = run(&[], &[(REQUEST_VAR, &job)], Context::Local);
        assert_eq!(image_of(result), pinned("ok/job"));
        assert_eq!(calls, vec![format!("policy check -- {}", pinned("ok/job"))]);
    }

    #[test]
    fn a_local_image_is_sent_by_its_resolved_path_and_not_pinned() {
        let (result, calls) = run(&[cli(Opt::Image, "/img/a.sif")], &[], Context::Local);
        assert_eq!(image_of(result), "/real/img/a.sif");
        assert_eq!(calls, vec!["policy check -- /img/a.sif"]);
    }

    #[test]
    fn a_fresh_image_is_checked_then_pinned() {
        let (result, calls) = run(&[cli(Opt::Image, "ok/a:1")], &[], Context::Allocator);
        assert_eq!(image_of(result), pinned("ok/a"));
        assert_eq!(calls, vec!["policy check -- ok/a:1", "resolve -- ok/a:1"]);
    }

    #[test]
    fn a_tag_the_user_cannot_resolve_is_left_to_the_controller() {
        let (result, calls) = run(&[cli(Opt::Image, "ok/private:1")], &[], Context::Local);
        let request = result.unwrap();
        assert_eq!(left_to_the_controller(&request), Some("ok/private:1"));
        assert_eq!(
            calls,
            vec!["policy check -- ok/private:1", "resolve -- ok/private:1"]
        );
        // Pinned, local and host requests need nothing of the controller.
        for given in [cli(Opt::Image, "ok/a:1"), cli(Opt::Image, "/img/a.sif")] {
            let (result, _) = run(&[given], &[], Context::Local);
            assert_eq!(left_to_the_controller(&result.unwrap()), None);
        }
        assert_eq!(left_to_the_controller(&ContainerRequest::Host), None);
    }

    #[test]
    fn denied_image_is_refused_with_the_launchers_reason() {
        let (result, calls) = run(&[cli(Opt::Image, "evil/a")], &[], Context::Local);
        assert_eq!(
            result,
            Err(Error::PolicyDenied {
                image: "evil/a".into(),
                reason: "evil/a is not approved".into()
            })
        );
        assert_eq!(calls.len(), 1, "nothing is resolved for a denied image");
    }

    #[test]
    fn host_and_no_container() {
        let host = [cli(Opt::Image, "none")];
        let job = format!("container-image={}", pinned("ok/job"));
        let (result, calls) = run(&host, &[(REQUEST_VAR, &job)], Context::Local);
        assert_eq!(result, Ok(ContainerRequest::Host));
        assert_eq!(calls, vec!["policy require-container"]);
        let (result, _) = run(&[], &[], Context::Local);
        assert_eq!(result, Ok(ContainerRequest::None));
        // A job on the host hands "on the host" down to its steps.
        let (result, _) = run(
            &[],
            &[(REQUEST_VAR, "container-image=none")],
            Context::Local,
        );
        assert_eq!(result, Ok(ContainerRequest::Host));
    }

    #[test]
    fn required_container_refuses_host_steps_with_the_partition() {
        let host = [cli(Opt::Image, "none")];
        let (result, calls) = run(&host, &[("SLURM_JOB_PARTITION", "gpu")], Context::Local);
        assert_eq!(
            result,
            Err(Error::ContainerRequired {
                asked_for_host: true,
                partition: Some("gpu".into()),
                reason: "partition gpu requires containers".into()
            })
        );
        assert_eq!(calls, vec!["policy require-container --partition gpu"]);
        let (result, _) = run(&[], &[("SBATCH_PARTITION", "gpu")], Context::Allocator);
        assert!(matches!(
            result,
            Err(Error::ContainerRequired {
                asked_for_host: false,
                ..
            })
        ));
        // sbatch inside a job does not take the enclosing job's partition for its own.
        let (result, _) = run(&[], &[("SLURM_JOB_PARTITION", "gpu")], Context::Allocator);
        assert_eq!(result, Ok(ContainerRequest::None));
    }

    #[test]
    fn options_without_an_image_are_refused_only_from_the_command_line() {
        let (result, _) = run(&[cli(Opt::Workdir, "/w")], &[], Context::Local);
        assert_eq!(
            result,
            Err(Error::OptionsWithoutImage {
                option: "--container-workdir".into()
            })
        );
        let (result, _) = run(&[], &[("BERTH_CONTAINER_WORKDIR", "/w")], Context::Local);
        assert_eq!(result, Ok(ContainerRequest::None));
    }

    #[test]
    fn mount_sources_missing_here_only_warn_and_relative_ones_become_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let there = dir.path().display().to_string();
        let missing = format!("{there}/missing");
        let given = [
            cli(Opt::Image, "ok/a"),
            cli(
                Opt::Mounts,
                &format!("{there}:/in:ro,{missing}:/m,./rel/./x:/r,tmpfs:/t"),
            ),
        ];
        let (result, _) = run(&given, &[], Context::Local);
        let Ok(ContainerRequest::Container { options, .. }) = result else {
            panic!("{result:?}")
        };
        let cwd = std::env::current_dir().unwrap();
        let sources: Vec<&str> = options.mounts.iter().map(|m| m.src.as_str()).collect();
        let relative = cwd.join("rel/x").display().to_string();
        assert_eq!(sources, [there.as_str(), &missing, &relative, "tmpfs"]);
        let warnings = missing_sources(&options.mounts);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains(&format!("'{missing}'")),
            "{warnings:?}"
        );
        assert!(warnings[0].contains("does not exist"), "{warnings:?}");
    }

    #[test]
    fn bad_values_anywhere_are_refused() {
        let (result, _) = run(&[], &[("SLURM_CONTAINER", "a b")], Context::Local);
        let msg = result.unwrap_err().to_string();
        assert!(
            msg.starts_with("--container (SLURM_CONTAINER) contains a space"),
            "{msg}"
        );
        let (result, _) = run(&[], &[(REQUEST_VAR, "bogus")], Context::Local);
        assert!(matches!(result, Err(Error::TransportInvalid { .. })));
        let both = [cli(Opt::Writable, ""), cli(Opt::Readonly, "")];
        assert_eq!(
            run(&both, &[], Context::Local).0,
            Err(Error::WritableAndReadonly)
        );
    }

    #[test]
    fn inherited_values_come_from_either_variable() {
        let salloc =
            |v: &str| (v == "_SLURM_SPANK_OPTION_berth_container_image").then(|| b"a".to_vec());
        let batch = |v: &str| {
            (v == "SLURM_SPANK__SLURM_SPANK_OPTION_berth_container_image").then(|| b"b".to_vec())
        };
        assert_eq!(inherited(Opt::Image, &salloc), Some(b"a".to_vec()));
        assert_eq!(inherited(Opt::Image, &batch), Some(b"b".to_vec()));
        assert_eq!(inherited(Opt::Workdir, &batch), None);
    }

    #[test]
    fn replayed_options_are_told_from_the_command_line() {
        *collected() = Some(Collected {
            config: Config::default(),
            inherited: SPECS
                .iter()
                .map(|s| (s.opt == Opt::Writable).then(Vec::new))
                .collect(),
            given: Vec::new(),
        });
        option(Opt::Writable, b"").unwrap(); // Slurm's replay of the job's option
        option(Opt::Readonly, b"").unwrap(); // this srun's own
        option(Opt::Writable, b"").unwrap(); // given again on the command line
        let origins: Vec<Origin> = collected()
            .take()
            .unwrap()
            .given
            .iter()
            .map(|g| g.origin)
            .collect();
        assert_eq!(
            origins,
            vec![Origin::Inherited, Origin::CommandLine, Origin::CommandLine]
        );
    }
}
