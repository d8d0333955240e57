//! slurmstepd on the compute node (S_CTX_REMOTE): the authoritative side. Nothing the login
//! node decided is trusted; the request is parsed and judged again here.
//!
//! Who runs which line here matters:
//! - `init` and the option callbacks run in slurmstepd as root, before privileges are dropped.
//! - `user_init` runs in slurmstepd with real uid 0 and effective uid the user, already in the
//!   step's cgroups, before the tasks are forked. It prepares the step's one container on this
//!   node: the policy checked and the image fetched into the node cache as root, from the
//!   root-owned config, in one launcher call; the container started as the user (`berth
//!   start --private`), its namespaces and spec taken from that child by root and kept in
//!   [`STEP`] as descriptors, which every task inherits through fork.
//! - `task_init` runs in each task's process, as the user, in its task cgroups: it enters the
//!   container (`container.rs`). Failing here ends the task with exit code 1, shows the message
//!   on the task's stderr (srun's, or the batch output file) and leaves the node up: this is
//!   where every job-caused problem is reported.
//! - `task_exit` (per task) and `exit` run in slurmstepd as root: the container is stopped
//!   when the last local task has exited, before Slurm's process tracking would find the
//!   holder still in the step and kill it (which costs a second per step).
//!
//! A failure in `init`, `init_post_opt` or `user_init` would DRAIN THE NODE for batch jobs, so
//! nothing a job can cause may fail there: `guard` defers the failure to `task_init`.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::config::Config;
use crate::container::{self, NodeBind, StepContainer};
use crate::error::Error;
use crate::guard;
use crate::launcher::{HandedFds, Identity, Launcher, Partition, StepIds, Verdict, IMAGE_FD};
use crate::options::{
    self, Access, ContainerRequest, Given, ImageChoice, Mount, Opt, Origin, Stage, SPECS,
};
use crate::spank::{self, Spank, StepInfo};
use crate::submit::{self, REQUEST_VAR, SLURM_CONTAINER};

/// Slurm's step id of the batch script (SLURM_BATCH_SCRIPT in slurm.h).
const BATCH_STEP: u32 = 0xffff_fffb;
/// Slurm's step id of the extern step (SLURM_EXTERN_CONT), which runs no user command.
const EXTERN_STEP: u32 = 0xffff_fffc;

/// How long the holder gets to unmount and end squashfuse before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The option values slurmstepd received with the step (srun's launch message, or the batch
/// step's environment), as given: judged in `user_init`.
static GIVEN: Mutex<Vec<Given>> = Mutex::new(Vec::new());

/// The plugstack.conf arguments, read in `init`.
static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

/// This step's container on this node, from `user_init` until it is stopped.
static STEP: Mutex<Option<Step>> = Mutex::new(None);

#[derive(Debug)]
struct Step {
    container: StepContainer,
    /// `--container-stage-out`, as host paths (`berth stage out` arguments), and the job's
    /// user, who copies them once the container has stopped.
    stage_out: Option<(String, Launcher)>,
    /// Tasks of the step on this node, and how many have exited.
    local_tasks: u32,
    exited: u32,
}

/// Looks up a variable of the job's environment (`spank_getenv`).
type JobEnv<'a> = &'a dyn Fn(&str) -> Result<Option<Vec<u8>>, Error>;

/// Locks a mutex whose holder may have panicked: the data (plain values) is still valid.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the plugstack.conf arguments and registers the options, without which slurmstepd
/// would drop the values srun and sbatch sent.
pub fn init(spank: Spank, args: &[String]) -> Result<(), Error> {
    let (config, problems) = Config::from_plugin_args(args);
    for problem in &problems {
        spank::log_error(&problem.to_string());
    }
    spank::log_debug(&format!("launcher {}", config.berth.display()));
    *lock(&CONFIG) = Some(config);
    spank.register(&crate::OPTIONS)
}

/// Records one option value of the step; never fails (see the module comment).
pub fn option(opt: Opt, value: &[u8]) -> Result<(), Error> {
    lock(&GIVEN).push(Given {
        opt,
        value: value.to_vec(),
        origin: Origin::CommandLine,
    });
    Ok(())
}

/// Prepares the step's container, or checks that the step may run without one. Any error
/// is deferred to `task_init` by the guard.
pub fn user_init(spank: Spank) -> Result<(), Error> {
    let info = spank.step_info()?;
    if info.step_id == EXTERN_STEP {
        return Ok(());
    }
    let getenv = |name: &str| -> Result<Option<Vec<u8>>, Error> {
        spank.getenv(&CString::new(name).expect("variable names have no NUL"))
    };
    let (request, origin) = step_request(&getenv)?;
    spank::log_debug(&format!("step request ({origin}): {request:?}"));
    let launcher = Launcher::new(&lock(&CONFIG).clone().unwrap_or_default().berth);
    let root = launcher.run_as(Identity::Root);
    let (image, options) = match request {
        ContainerRequest::Container { image, options } => (image, options),
        ContainerRequest::None | ContainerRequest::Host => {
            // The partition as slurmctld records it: the step's SLURM_JOB_PARTITION is what
            // srun sent, which its user can set (SPANK has no item for the partition).
            return match root.require_container(Partition::OfJob(info.job_id))? {
                Some(reason) => Err(Error::ContainerRequired {
                    asked_for_host: request == ContainerRequest::Host,
                    partition: None,
                    reason,
                }),
                None => Ok(()),
            };
        }
    };
    let step = StepIds {
        job: info.job_id,
        step: match info.step_id {
            BATCH_STEP => "batch".to_owned(),
            id => id.to_string(),
        },
        uid: info.uid,
    };
    let verdict = root.check_and_fetch(&image, &step, (info.uid, info.gid, &info.groups))?;
    // The decision in slurmd's log too, at its default level, beside the launcher's syslog
    // line and audit file (`berth audit --job ID`).
    spank::log_info(&format!(
        "audit: job={} step={} uid={} image={image:?} verdict={}",
        step.job,
        step.step,
        step.uid,
        match &verdict {
            Verdict::Allow(vetted) => format!("allow vetted={vetted:?}"),
            Verdict::Deny(reason) => format!("deny reason={reason:?}"),
        }
    ));
    let vetted = match verdict {
        Verdict::Deny(reason) => return Err(Error::PolicyDenied { image, reason }),
        Verdict::Allow(vetted) => vetted,
    };
    let binds = node_binds(&info, getenv("PMIX_SERVER_TMPDIR")?, spank::task_prolog());
    let user = launcher.run_as(Identity::User {
        uid: info.uid,
        gid: info.gid,
        groups: info.groups.clone(),
    });
    let mut options = options;
    // Staged as the user, so only what the user can read is copied; bound read-only, so
    // the copy stays what the manifest says and the next job can reuse it.
    if !options.stage_in.is_empty() {
        let out = user.stage(&["in", &stage_list(&options.stage_in)])?;
        options.mounts.extend(staged_mounts(&out)?);
    }
    let stage_out = match options.stage_out.as_slice() {
        [] => None,
        stages => Some((stage_out_list(stages, &options.mounts)?, user.clone())),
    };
    // The GPUs Slurm allocated: indexes in gres.conf order (the batch step has only the
    // job's list). Absent or empty: a container without GPUs.
    let gpus_var = if info.step_id == BATCH_STEP {
        "SLURM_JOB_GPUS"
    } else {
        "SLURM_STEP_GPUS"
    };
    let gpus = getenv(gpus_var)?.map(|g| String::from_utf8_lossy(&g).into_owned());
    let (args, local_image) = start_image(&image, &vetted, &options, &binds, gpus.as_deref())?;
    let holder = user.start(&args, local_image)?;
    spank::log_debug(&format!("container of {image} held by pid {}", holder.pid));
    *lock(&STEP) = Some(Step {
        container: StepContainer {
            holder,
            keep_env: options.env,
            workdir_given: options.workdir.is_some(),
            run_entrypoint: options.entrypoint == Some(true),
        },
        stage_out,
        local_tasks: info.local_tasks,
        exited: 0,
    });
    Ok(())
}

/// `berth start`'s arguments and, for a local image file, the file itself: root allowed
/// `vetted` (its resolved path, every component root-owned and writable by root alone, so
/// it still names the file root checked), and the holder gets that open file, not a path
/// the user wrote and could have pointed elsewhere meanwhile. A registry image starts from
/// the reference as requested (the node cache holds it, under the policy, by that name).
fn start_image(
    image: &str,
    vetted: &str,
    options: &options::ContainerOptions,
    binds: &[NodeBind],
    gpus: Option<&str>,
) -> Result<(Vec<String>, HandedFds), Error> {
    if !vetted.starts_with('/') {
        return Ok((
            container::start_args(image, options, binds, gpus),
            Vec::new(),
        ));
    }
    use std::os::unix::fs::OpenOptionsExt;
    // As the user (slurmstepd's effective uid here), with no symlink followed, and
    // close-on-exec: only the launcher call gets it, as IMAGE_FD.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(vetted)
        .map_err(|e| Error::LocalImageUnreadable {
            path: vetted.to_owned(),
            reason: e.to_string(),
        })?;
    let mut args = container::start_args(vetted, options, binds, gpus);
    args.insert(1, format!("--image-fd={IMAGE_FD}"));
    Ok((args, vec![(IMAGE_FD, OwnedFd::from(file))]))
}

/// `SRC:DST,...`, the form `berth stage` and the options take.
fn stage_list(stages: &[Stage]) -> String {
    let list: Vec<String> = stages
        .iter()
        .map(|s| format!("{}:{}", s.src, s.dst))
        .collect();
    list.join(",")
}

/// The binds of `berth stage in`'s answer (`SRC<TAB>LOCAL<TAB>DST` lines): each local copy
/// read-only at its DST.
fn staged_mounts(out: &str) -> Result<Vec<Mount>, Error> {
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|line| match line.split('\t').collect::<Vec<_>>()[..] {
            [_, local, dst] => Ok(Mount {
                src: local.to_owned(),
                dst: dst.to_owned(),
                access: Access::ReadOnly,
            }),
            _ => Err(Error::StageFailed {
                detail: format!("unexpected answer from berth stage in: {line:?}"),
            }),
        })
        .collect()
}

/// `--container-stage-out`'s container paths as the host paths they are bound from (the
/// deepest bind that holds each), for `berth stage out`. Refused before the step runs when
/// a path is in no bind: what the container writes elsewhere is gone when it stops.
fn stage_out_list(stages: &[Stage], mounts: &[Mount]) -> Result<String, Error> {
    let host = |path: &str| {
        mounts
            .iter()
            .filter_map(|m| {
                let rest = path.strip_prefix(m.dst.trim_end_matches('/'))?;
                (rest.is_empty() || rest.starts_with('/'))
                    .then(|| (m.dst.len(), format!("{}{rest}", m.src)))
            })
            .max_by_key(|(depth, _)| *depth)
            .map(|(_, host)| host)
    };
    let mapped = stages
        .iter()
        .map(|s| {
            host(&s.src)
                .map(|src| Stage {
                    src,
                    dst: s.dst.clone(),
                })
                .ok_or_else(|| Error::StageInvalid {
                    option: "--container-stage-out".into(),
                    entry: format!("{}:{}", s.src, s.dst),
                    reason: format!(
                        "'{}' is in no directory bound from the node (--container-mounts); \
                         what the container writes elsewhere is gone when it stops: bind a \
                         node-local directory and write the results there",
                        s.src
                    ),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(stage_list(&mapped))
}

/// What the node itself must make visible in the container, at the same path: the batch
/// script's directory in slurmd's spool (the batch step execs the script there), the
/// PMIx server's directory, whose sockets MPI libraries inside connect to, and the site's
/// TaskProlog file, which slurmstepd executes by its host path after the task entered the
/// container (it runs with the image's interpreter: see docs/COMPATIBILITY.md).
fn node_binds(
    info: &StepInfo,
    pmix_dir: Option<Vec<u8>>,
    task_prolog: Option<Vec<u8>>,
) -> Vec<NodeBind> {
    let mut binds = Vec::new();
    if let Some(script) = task_prolog.filter(|p| p.starts_with(b"/")) {
        binds.push(NodeBind {
            path: String::from_utf8_lossy(&script).into_owned(),
            read_only: true,
        });
    }
    if info.step_id == BATCH_STEP {
        let script = info
            .argv
            .first()
            .map(|a| String::from_utf8_lossy(a).into_owned());
        if let Some((dir, _)) = script.as_deref().and_then(|s| s.rsplit_once('/')) {
            if !dir.is_empty() {
                binds.push(NodeBind {
                    path: dir.to_owned(),
                    read_only: true,
                });
            }
        }
    }
    if let Some(dir) = pmix_dir.filter(|d| d.starts_with(b"/")) {
        binds.push(NodeBind {
            path: String::from_utf8_lossy(&dir).into_owned(),
            read_only: false,
        });
    }
    binds
}

/// Runs in each task before it executes the user's command: reports an earlier failure on
/// this node, or enters the step's container if it has one.
pub fn task_init(spank: Spank) -> Result<(), Error> {
    if let Some(earlier) = guard::take_deferred() {
        return Err(Error::EarlierFailure { earlier });
    }
    match lock(&STEP).as_ref() {
        Some(step) => step.container.enter(spank),
        None => Ok(()),
    }
}

/// A task of the step exited (slurmstepd, root): after the last one, stop the container.
pub fn task_exit() -> Result<(), Error> {
    let mut step = lock(&STEP);
    let last = match step.as_mut() {
        Some(s) => {
            s.exited += 1;
            s.exited >= s.local_tasks
        }
        None => false,
    };
    if last {
        stop(step.take())?;
    }
    Ok(())
}

/// The step ends (slurmstepd, root): stop the container if no task_exit did (e.g. the tasks
/// could not be launched).
pub fn exit() -> Result<(), Error> {
    stop(lock(&STEP).take())
}

fn stop(step: Option<Step>) -> Result<(), Error> {
    let Some(step) = step else { return Ok(()) };
    let pid = step.container.holder.pid;
    let killed = step.container.holder.stop(STOP_GRACE);
    // Results go back whatever the step's outcome (a failed step's output is often what
    // the user needs most); a failure is reported, never fails slurmstepd's callback.
    if let Some((list, user)) = step.stage_out {
        if let Err(e) = user.stage(&["out", &list]) {
            spank::log_error(&e.to_string());
            eprintln!("berth: {e}");
        }
    }
    if killed? {
        spank::log_error(&format!(
            "the container holder (pid {pid}) did not end within {} s of SIGTERM and was \
             killed; its runtime directory may be left under the runtime dir",
            STOP_GRACE.as_secs()
        ));
    }
    Ok(())
}

/// The step's request from its environment and options (see [`requested`]).
fn step_request(getenv: JobEnv) -> Result<(ContainerRequest, &'static str), Error> {
    let given = lock(&GIVEN).clone();
    let transport = getenv(REQUEST_VAR)?;
    let mut exported = Vec::new();
    for spec in &SPECS {
        if let Some(value) = getenv(&format!("SLURM_SPANK_{}", spec.opt.slurm_env_name()))? {
            exported.push((spec.opt, value));
        }
    }
    let slurm_container = getenv(SLURM_CONTAINER)?;
    let oci_conf = spank::slurm_oci_conf();
    // Slurm's own where oci.conf is configured (submit::slurm_container_for_berth).
    let ours = slurm_container.clone().filter(|_| oci_conf.is_none());
    let (request, origin) = requested(transport, given, ours, exported)?;
    submit::slurm_container_for_berth(oci_conf.as_deref(), slurm_container, &request)?;
    Ok((request, origin))
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
    fn the_site_task_prolog_is_bound_read_only_at_its_path() {
        let info = StepInfo {
            job_id: 7,
            step_id: BATCH_STEP,
            uid: 1100,
            gid: 1100,
            groups: vec![],
            argv: vec![b"/var/spool/slurmd/job00007/slurm_script".to_vec()],
            local_tasks: 1,
        };
        let ro = |path: &str| NodeBind {
            path: path.into(),
            read_only: true,
        };
        assert_eq!(
            node_binds(&info, v("/tmp/pmix"), v("/etc/slurm/task_prolog")),
            vec![
                ro("/etc/slurm/task_prolog"),
                ro("/var/spool/slurmd/job00007"),
                NodeBind {
                    path: "/tmp/pmix".into(),
                    read_only: false
                },
            ]
        );
        // No TaskProlog, or a relative one Slurm would look up itself: nothing to bind.
        let step = StepInfo { step_id: 0, ..info };
        assert_eq!(node_binds(&step, None, None), vec![]);
        assert_eq!(node_binds(&step, None, v("prolog.sh")), vec![]);
    }

    #[test]
    fn a_local_image_starts_from_the_vetted_file_itself() {
        let options = options::ContainerOptions::default();
        let (args, file) = start_image("h/r:1", "h/r:1", &options, &[], None).unwrap();
        assert_eq!(args, ["start", "--private", "--", "h/r:1"]);
        assert!(file.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let vetted = dir.path().join("a.sif");
        std::fs::write(&vetted, b"x").unwrap();
        let vetted = vetted.display().to_string();
        // The user wrote some other path; what starts is the one root vetted.
        let (args, file) = start_image("/home/u/link/a.sif", &vetted, &options, &[], None).unwrap();
        assert_eq!(
            args,
            ["start", "--image-fd=3", "--private", "--", vetted.as_str()]
        );
        assert_eq!(file.len(), 1);
        assert_eq!(file[0].0, IMAGE_FD);
        // A symlink put in its place is not followed.
        let link = dir.path().join("link.sif");
        std::os::unix::fs::symlink(&vetted, &link).unwrap();
        let err = start_image("x", &link.display().to_string(), &options, &[], None).unwrap_err();
        assert!(
            matches!(&err, Error::LocalImageUnreadable { reason, .. } if reason.contains("symbolic links")),
            "{err:?}"
        );
    }

    #[test]
    fn staged_copies_are_bound_read_only_at_their_destination() {
        let mounts = staged_mounts("/d\t/var/tmp/s/1100/k/data\t/in\n").unwrap();
        assert_eq!(
            mounts,
            vec![Mount {
                src: "/var/tmp/s/1100/k/data".into(),
                dst: "/in".into(),
                access: Access::ReadOnly
            }]
        );
        assert!(staged_mounts("garbage\n").is_err());
    }

    #[test]
    fn stage_out_sources_map_through_the_deepest_bind() {
        let mount = |src: &str, dst: &str| Mount {
            src: src.into(),
            dst: dst.into(),
            access: Access::ReadWrite,
        };
        let mounts = [mount("/tmp/job", "/out"), mount("/tmp/deep", "/out/d")];
        let stage = |src: &str, dst: &str| Stage {
            src: src.into(),
            dst: dst.into(),
        };
        assert_eq!(
            stage_out_list(
                &[stage("/out/r", "/home/u/r"), stage("/out/d/x", "/home/u/x")],
                &mounts
            ),
            Ok("/tmp/job/r:/home/u/r,/tmp/deep/x:/home/u/x".into())
        );
        // Whole components only, and a path in no bind is refused before the step runs.
        let err = stage_out_list(&[stage("/output/r", "/home/u/r")], &mounts).unwrap_err();
        assert!(err.to_string().contains("in no directory bound"), "{err}");
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
}
