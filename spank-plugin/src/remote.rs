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
//!   [`STEP`] as descriptors, which every task inherits through fork. While it waits for a
//!   launcher call (a cold image's fetch takes minutes) slurmstepd has effective uid 0 again,
//!   so that its other threads, Slurm's PMIx server among them, are not the user meanwhile;
//!   and the job's end (a cancel, its time limit) stops the call (see `job_end`).
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
use crate::job_end;
use crate::launcher::{
    self, HandedFds, Holder, Identity, Launcher, Partition, StepIds, Verdict, IMAGE_FD,
};
use crate::mpi;
use crate::named;
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
    /// The record of the container this step started (named, or unnamed as JOBID.STEPID),
    /// which other steps may enter until it stops.
    record: Option<named::Record>,
    /// `--container-save`: done once the container stopped.
    save: Option<SaveAfter>,
    /// What each task tells the user before it starts (options an entering step ignores).
    notice: Option<String>,
}

/// A `berth save` to run as the user when the step's container has stopped.
#[derive(Debug)]
struct SaveAfter {
    user: Launcher,
    /// The container's changes directory, and whether it stays (a named container's).
    changes: Option<(String, bool)>,
    /// A copy's: the named container's changes directory below them.
    below: Option<String>,
    image: String,
    dest: String,
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
    // A job cancelled (or out of time) meanwhile stops the calls below at once: Slurm's
    // signals wait until the tasks run (see `job_end`).
    let launcher = Launcher::new(&lock(&CONFIG).clone().unwrap_or_default().berth).watching(
        job_end::Watch::new(
            info.job_id,
            spank::slurmd_spooldir().as_deref(),
            std::env::var(launcher::NODE_NAME_VAR).ok().as_deref(),
        ),
    );
    let root = launcher.run_as(Identity::Root);
    let (image, options) = match request {
        ContainerRequest::Container { image, options } => (Some(image), options),
        ContainerRequest::Named { options } => (None, options),
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
    let record = options
        .name
        .clone()
        .map(|n| (named::Record::of(info.job_id, &n.name), n));
    let image = match (record.as_ref(), image) {
        (None, Some(image)) => image,
        // Cannot be built from the options (a request without an image has a name).
        (None, None) => {
            return Err(Error::TransportInvalid {
                line: "a container request with neither an image nor a name".into(),
            })
        }
        (Some((record, n)), requested) => {
            // Entered only if root recorded it, it still runs, and it is the user's.
            let running = record
                .holder()
                .and_then(|h| match Holder::attach(h, info.uid) {
                    Ok(holder) if named::runs(&holder.annotations, info.job_id, &n.name) => {
                        Some(holder)
                    }
                    Ok(_) => None,
                    Err(why) => {
                        spank::log_debug(&format!("named container {}: {why}", n.name));
                        None
                    }
                });
            match named::decide(n, running.is_some(), record.image(), requested)? {
                named::Decision::Start(image) => image,
                named::Decision::Enter => {
                    let holder = running.expect("entered only when running");
                    named::check_unshare(&holder, &n.name, &options.unshare)?;
                    enter_running(&n.name, &options, holder, info.local_tasks);
                    return Ok(());
                }
            }
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
    let image = match pin_for_job(&root, &info, &image)? {
        Some(pinned) => {
            if info.step_id == BATCH_STEP {
                // Every srun in the script carries the job's request: now the pinned one.
                let request = ContainerRequest::Container {
                    image: pinned.clone(),
                    options: options.clone(),
                };
                spank.setenv(REQUEST_VAR.as_bytes(), request.to_transport().as_bytes())?;
            }
            pinned
        }
        None => image,
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
    let mut binds = node_binds(&info);
    // slurmstepd's own environment, where Slurm's pmix plugin put it (see `mpi`), never the
    // job's, whose variable of that name the user sets at will.
    binds.extend(mpi::server_dir_bind(
        std::env::var_os(mpi::SERVER_DIR_VAR).as_deref(),
        spank::slurmd_spooldir().as_deref(),
        mpi::PmixStep {
            job: info.job_id,
            step: info.step_id,
            uid: info.uid,
        },
    )?);
    let user = launcher.run_as(Identity::User {
        uid: info.uid,
        gid: info.gid,
        groups: info.groups.clone(),
    });
    let mut options = options;
    // Staged as the user, so only what the user can read is copied; bound read-only, so
    // the copy stays what the manifest says and the next job can reuse it.
    if !options.stage_in.is_empty() {
        let job = info.job_id.to_string();
        let out = user.stage(&["in", "--job", &job, &stage_list(&options.stage_in)])?;
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
    let (mut args, local_image) = start_image(
        &image,
        &vetted,
        &options,
        &binds,
        gpus.as_deref(),
        (info.job_id, info.step_id),
    )?;
    // A batch script in the image calls srun, sbatch, squeue...: the node's client, run
    // with the node's libraries, reaches into its container.
    // Its Slurm is this slurmstepd's, configured by the slurm.conf it loaded.
    // The user's launcher cannot read slurmstepd's /proc/PID/exe: its prefix comes from here.
    if info.step_id == BATCH_STEP {
        if let Some(prefix) = std::fs::read_link("/proc/self/exe")
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        {
            args.insert(1, format!("--slurm-prefix={}", prefix.display()));
        }
        args.insert(
            1,
            match spank::slurm_conf_path() {
                Some(conf) => format!("--slurm-client={}", conf.display()),
                None => "--slurm-client".to_owned(),
            },
        );
    }
    let task_prolog = crate::task_prolog::path();
    if let Some(path) = &task_prolog {
        args.insert(1, format!("--stand-in={}", path.display()));
    }
    let holder = user.start(&args, local_image)?;
    spank::log_debug(&format!("container of {image} held by pid {}", holder.pid));
    // A copy of a named container another step runs (see `named`).
    let below = holder.annotations.get(named::ANN_BELOW).cloned();
    let save = options.save.clone().map(|dest| SaveAfter {
        user: user.clone(),
        changes: holder
            .annotations
            .get(named::ANN_CHANGES)
            .map(|dir| (dir.clone(), record.is_some() && below.is_none())),
        below: below.clone(),
        // What the holder ran: the vetted file for a local image.
        image: if vetted.starts_with('/') {
            vetted.clone()
        } else {
            image.clone()
        },
        dest,
    });
    // Recorded once it runs, so the job's other steps can enter it: a named container (not
    // a copy of one, which is this step's alone), or an unnamed one as JOBID.STEPID.
    let (record, notice) = match (record, &below) {
        (Some((_, n)), Some(_)) => (
            None,
            Some(format!(
                "container '{}' is running in another step: this step runs a copy of it, and \
                 what it writes to the container's files is gone when it ends (write results \
                 to a directory bound with --container-mounts)",
                n.name
            )),
        ),
        (Some((record, _)), None) => (Some((record, Some(image.as_str()))), None),
        (None, _) => (
            Some((named::Record::of_step(info.job_id, info.step_id), None)),
            None,
        ),
    };
    let record = match record {
        Some((record, image)) => {
            if let Err(e) = record.started(image, holder.handle) {
                let _ = holder.stop(STOP_GRACE);
                return Err(e);
            }
            Some(record)
        }
        None => None,
    };
    *lock(&STEP) = Some(Step {
        container: StepContainer {
            holder,
            keep_env: options.env,
            workdir_given: options.workdir.is_some(),
            task_prolog,
            run_entrypoint: options.entrypoint == Some(true),
        },
        stage_out,
        local_tasks: info.local_tasks,
        exited: 0,
        record,
        save,
        notice,
    });
    Ok(())
}

/// The digest a step runs for a registry image its request names by tag (the submission
/// could not pin it: the registry wants credentials the user lacks, see `submit`); `None`
/// for an image that needs no pin. The pin is the one the controller recorded for the job
/// (`berth pin-job`, every node reads the same), else, in the batch step only (one step on
/// one node, before any other), this node's own resolution, which the batch step passes on
/// to the steps of its script. Any other step naming a tag with no pin is refused: nodes
/// resolving a tag each on their own could run different images.
fn pin_for_job(root: &Launcher, info: &StepInfo, image: &str) -> Result<Option<String>, Error> {
    if image.starts_with('/') || launcher::is_pinned(image) {
        return Ok(None);
    }
    // Only a registry image the policy allows is pinned; any other is refused (or run from
    // its file) by the check that follows, with the policy's own words.
    match root.policy_check(image)? {
        Verdict::Allow(vetted) if !vetted.starts_with('/') => {}
        _ => return Ok(None),
    }
    if let Some(pinned) = root.job_pin(info.job_id, image)? {
        return Ok(Some(pinned));
    }
    // Resolved here (as root, with the site's credentials): the batch step's pin, or for
    // another step the registry's own words where it refuses the tag here too.
    let resolved = root.resolve(image);
    match (info.step_id, resolved) {
        (BATCH_STEP, Ok(Some(pinned))) => Ok(Some(pinned)),
        (_, Err(e)) => Err(Error::NotPinned {
            image: image.to_owned(),
            job: info.job_id,
            cause: format!(" (and it cannot be resolved here: {e})"),
        }),
        _ => Err(Error::NotPinned {
            image: image.to_owned(),
            job: info.job_id,
            cause: String::new(),
        }),
    }
}

/// This step's tasks enter named container `name`, which another step of the job runs (as
/// `srun --overlap --container-name=NAME` does in pyxis); that step's container, mounts
/// and image stay as they are, so this step's own mount options are ignored, saying so.
fn enter_running(name: &str, options: &options::ContainerOptions, holder: Holder, tasks: u32) {
    let ignored: Vec<String> = [
        (!options.mounts.is_empty(), Opt::Mounts),
        (options.workdir.is_some(), Opt::Workdir),
        (options.writable.is_some(), Opt::Writable),
        (options.remap_root.is_some(), Opt::RemapRoot),
        (options.mount_home.is_some(), Opt::MountHome),
        (options.save.is_some(), Opt::Save),
    ]
    .iter()
    .filter(|(given, _)| *given)
    .map(|(_, opt)| format!("--{}", opt.name()))
    .collect();
    let notice = (!ignored.is_empty()).then(|| {
        format!(
            "ignoring {} for container '{name}': it is running in another step, which set it \
             up",
            ignored.join(", ")
        )
    });
    spank::log_debug(&format!(
        "entering named container {name} of holder {}",
        holder.pid
    ));
    *lock(&STEP) = Some(Step {
        container: StepContainer {
            holder,
            keep_env: options.env.clone(),
            workdir_given: false,
            // The running container was started with the stand-in in place.
            task_prolog: crate::task_prolog::path(),
            run_entrypoint: options.entrypoint == Some(true),
        },
        stage_out: None,
        local_tasks: tasks,
        exited: 0,
        record: None,
        save: None,
        notice,
    });
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
    ids: (u32, u32),
) -> Result<(Vec<String>, HandedFds), Error> {
    if !vetted.starts_with('/') {
        return Ok((
            container::start_args(image, options, binds, gpus, ids),
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
    let mut args = container::start_args(vetted, options, binds, gpus, ids);
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
                flags: Vec::new(),
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
/// script's directory in slurmd's spool (the batch step execs the script there). (The PMIx
/// server's directory is `mpi`'s; the site's TaskProlog is not among them: berth runs it on
/// the node, see `task_prolog`.)
fn node_binds(info: &StepInfo) -> Vec<NodeBind> {
    let mut binds = Vec::new();
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
    binds
}

/// Runs in each task before it executes the user's command: reports an earlier failure on
/// this node, or enters the step's container if it has one.
pub fn task_init(spank: Spank) -> Result<(), Error> {
    if let Some(earlier) = guard::take_deferred() {
        // Named, because in a job of many nodes the user reads every node's tasks in one
        // stream. Slurm's name (the task's SLURMD_NODENAME), not the host's.
        let node = match spank.getenv(c"SLURMD_NODENAME") {
            Ok(Some(name)) => format!("node {}", String::from_utf8_lossy(&name)),
            _ => "this node".to_owned(),
        };
        return Err(Error::EarlierFailure { node, earlier });
    }
    match lock(&STEP).as_ref() {
        Some(step) => {
            // On the task's stderr, which is the user's (srun's, or the batch output).
            if let Some(notice) = &step.notice {
                eprintln!("berth: {notice}");
            }
            step.container.enter(spank)
        }
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
    let Some(mut step) = step else { return Ok(()) };
    // The holder's own messages go to the job's stderr (slurmstepd's), escaped: the holder
    // is the user's process.
    for line in step.container.holder.messages().lines() {
        eprintln!("{}", spank::escape_control(line));
    }
    let pid = step.container.holder.pid;
    // First, so no step enters a container that is stopping.
    if let Some(record) = &step.record {
        if let Err(e) = record.stopped(step.container.holder.handle) {
            spank::log_error(&e.to_string());
        }
    }
    let killed = step.container.holder.stop(STOP_GRACE);
    if let Some(save) = step.save {
        let changes = save
            .changes
            .as_ref()
            .map(|(dir, keep)| (dir.as_str(), *keep));
        if let Err(e) = save
            .user
            .save(changes, save.below.as_deref(), &save.image, &save.dest)
        {
            spank::log_error(&e.to_string());
            eprintln!("berth: {e}");
        }
    }
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
        (None, _) if settings.options.name.is_some() => {
            return Ok((
                ContainerRequest::Named {
                    options: settings.options,
                },
                "--container-name",
            ))
        }
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
    fn the_batch_scripts_directory_is_bound_at_its_path() {
        let info = StepInfo {
            job_id: 7,
            step_id: BATCH_STEP,
            uid: 1100,
            gid: 1100,
            groups: vec![],
            argv: vec![b"/var/spool/slurmd/job00007/slurm_script".to_vec()],
            local_tasks: 1,
        };
        assert_eq!(
            node_binds(&info),
            vec![NodeBind {
                path: "/var/spool/slurmd/job00007".into(),
                read_only: true
            }]
        );
        // Another step has no script.
        let step = StepInfo { step_id: 0, ..info };
        assert_eq!(node_binds(&step), vec![]);
    }

    #[test]
    fn a_local_image_starts_from_the_vetted_file_itself() {
        let options = options::ContainerOptions::default();
        let (args, file) = start_image("h/r:1", "h/r:1", &options, &[], None, (7, 2)).unwrap();
        assert_eq!(args, ["start", "--private", "--step=7.2", "--", "h/r:1"]);
        assert!(file.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let vetted = dir.path().join("a.sif");
        std::fs::write(&vetted, b"x").unwrap();
        let vetted = vetted.display().to_string();
        // The user wrote some other path; what starts is the one root vetted.
        let (args, file) =
            start_image("/home/u/link/a.sif", &vetted, &options, &[], None, (7, 2)).unwrap();
        assert_eq!(
            args,
            [
                "start",
                "--image-fd=3",
                "--private",
                "--step=7.2",
                "--",
                vetted.as_str()
            ]
        );
        assert_eq!(file.len(), 1);
        assert_eq!(file[0].0, IMAGE_FD);
        // A symlink put in its place is not followed.
        let link = dir.path().join("link.sif");
        std::os::unix::fs::symlink(&vetted, &link).unwrap();
        let err = start_image(
            "x",
            &link.display().to_string(),
            &options,
            &[],
            None,
            (7, 2),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::LocalImageUnreadable { reason, .. } if reason.contains("symbolic links")),
            "{err:?}"
        );
    }

    /// A launcher that allows `ok/*`, has a job pin for `ok/pinned:1`, resolves `ok/*` but
    /// `ok/gone*`, and logs its calls.
    fn pinning_launcher(dir: &tempfile::TempDir) -> Launcher {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("berth");
        let d = "a".repeat(64);
        std::fs::write(
            &path,
            format!(
                r#"#!/bin/sh
echo "$*" >> {calls}
case "$1" in
  policy) case "$4" in ok/*) echo "allow: $4 (rule: ok/*)";; *) echo "deny: no"; exit 1;; esac;;
  pin-job) [ "$5" = ok/pinned:1 ] && {{ echo "ok/pinned@sha256:{d}"; exit 0; }}; exit 1;;
  resolve) case "$3" in ok/gone*) echo "ok/gone: not found" >&2; exit 125;; esac
           echo "${{3%%:*}}@sha256:{d}";;
esac"#,
                calls = dir.path().join("calls").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Launcher::new(&path)
    }

    #[test]
    fn a_tag_runs_the_jobs_pin_or_the_batch_steps_own_and_is_refused_elsewhere() {
        let _serial = crate::launcher::serial_spawns();
        let dir = tempfile::tempdir().unwrap();
        let root = pinning_launcher(&dir);
        let step = |step_id| StepInfo {
            job_id: 7,
            step_id,
            uid: 1100,
            gid: 1100,
            groups: Vec::new(),
            argv: Vec::new(),
            local_tasks: 1,
        };
        let d = "a".repeat(64);
        let pinned = format!("ok/x@sha256:{d}");
        // Pinned, local or refused: nothing to pin, and no pin looked up.
        for image in [pinned.as_str(), "/img/a.sif", "evil/a:1"] {
            assert_eq!(pin_for_job(&root, &step(0), image), Ok(None), "{image}");
        }
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert!(!calls.contains("pin-job"), "{calls}");
        // The controller's pin, on every step.
        assert_eq!(
            pin_for_job(&root, &step(0), "ok/pinned:1"),
            Ok(Some(format!("ok/pinned@sha256:{d}")))
        );
        // No pin: the batch step resolves it; any other step is refused, with the
        // registry's words where the tag cannot be resolved here either.
        assert_eq!(
            pin_for_job(&root, &step(BATCH_STEP), "ok/x:1"),
            Ok(Some(pinned))
        );
        let err = pin_for_job(&root, &step(0), "ok/x:1").unwrap_err();
        assert!(
            matches!(&err, Error::NotPinned { cause, .. } if cause.is_empty()),
            "{err}"
        );
        let err = pin_for_job(&root, &step(0), "ok/gone:1").unwrap_err();
        assert!(err.to_string().contains("ok/gone: not found"), "{err}");
        assert!(err.to_string().contains("PrologSlurmctld"), "{err}");
    }

    #[test]
    fn staged_copies_are_bound_read_only_at_their_destination() {
        let mounts = staged_mounts("/d\t/var/tmp/s/1100/k/data\t/in\n").unwrap();
        assert_eq!(
            mounts,
            vec![Mount {
                src: "/var/tmp/s/1100/k/data".into(),
                dst: "/in".into(),
                access: Access::ReadOnly,
                flags: Vec::new(),
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
            flags: Vec::new(),
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
