//! Asking the `berth` launcher (the binary named by `berth=` in plugstack.conf) for its
//! verdicts. The plugin decides nothing about images itself: policy, digests and the site
//! configuration are the launcher's, reached through a small command-line contract:
//!
//! | command | exit 0 | exit 1 | anything else |
//! |---|---|---|---|
//! | `berth policy check -- IMAGE` | allowed: stdout is exactly `allow: VETTED (rule: RULE)` | refused: stdout is exactly `deny: REASON` | berth failed |
//! | `berth resolve -- IMAGE` | `host/repo@sha256:HEX` on stdout | - | could not pin (stderr says why); 77: the registry wants credentials the user lacks and the controller pins the tag (`[registry] controller_pin`) |
//! | `berth pin-job --show JOBID -- IMAGE` (node, root) | the pin recorded for IMAGE in the job's AdminComment, `host/repo@sha256:HEX` | no pin recorded | berth failed |
//! | `berth policy require-container [--partition P]` (login node) | required, the reason on stdout | not required | berth failed |
//! | `berth policy require-container --job JOBID` (node, root) | required (for the partition slurmctld records, or by the strictest rule where it cannot tell), the reason on stdout | not required | berth failed |
//! | `berth policy check --fetch --job J --step S --uid U --as-user UID:GID:GIDS -- IMAGE` (node, root) | allowed and cached, as `policy check`; progress lines on stderr; the decision recorded in the audit trail | refused, as `policy check` | could not fetch (stderr says why); 78: the node's config is invalid |
//! | `berth start --private [OPTIONS] [--image-fd=3] -- IMAGE` (node, the user) | `PID:FD` on one line (PID its own, FD its sealed spec memfd), then runs until SIGTERM | - | could not start |
//! | `berth named remove --job JOB` (node, the user, job epilog) | the job's named containers removed | - | berth failed |
//! | `berth save [--changes DIR [--keep-changes] [--below NAMED_DIR]] -- IMAGE DEST` (node, the user, step end) | DEST written; progress on stderr | - | berth failed |
//!
//! Every image goes after `--`, so none is ever read as an option. A verdict is taken only
//! from its exact line with its exit status: anything else (help text, a crash, another
//! version's output) is a launcher failure, and the step fails closed. VETTED is the
//! canonical reference, or for a local image file the resolved path root checked; the node
//! opens that file and hands it to `berth start` as descriptor 3 (`--image-fd=3`), so the
//! holder runs exactly the file root vetted.
//!
//! On the login node the child runs with the caller's identity and environment (the user,
//! whose proxy settings and credentials a registry lookup may need); in slurmstepd it takes
//! the [`Identity`] the call needs. Always: stdin from /dev/null, no inherited descriptors
//! beyond stdin/stdout/stderr, and a time limit. No thread is started: srun and slurmstepd
//! are multi-threaded C programs that fork later, so output is read with poll(2) in the
//! calling thread.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth_sys::holder::{ContainerProcess, Held};
use berth_sys::identity::Credentials;
use berth_sys::memfd::SpecHandle;
use berth_sys::process::{PidFd, Spawn, Spawned};
use berth_sys::Namespaces;

use crate::error::Error;
use crate::job_end;
use crate::spank::escape_control;

/// How long a launcher call may take. A registry lookup through a slow proxy takes seconds;
/// a minute means something is stuck, and the user is better told so than left waiting.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// How long `berth fetch` may take on the node: a pull of tens of GB over a busy link takes
/// many minutes; beyond this the job is better failed than left waiting for ever.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How long slurmctld may take to say how a job stands (`berth job-state`).
const JOB_STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Slurm's name for the node, in slurmd's and slurmstepd's environment and the tasks'.
pub const NODE_NAME_VAR: &str = "SLURMD_NODENAME";

/// The PATH of launcher calls in slurmstepd, whose environment is otherwise empty.
const NODE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Output beyond this is dropped: the answers are one line, and a runaway child must not
/// grow srun's memory.
const OUTPUT_MAX_BYTES: usize = 64 * 1024;

/// The launcher's exit status when the site configuration is unreadable or invalid
/// (sysexits' EX_CONFIG; `berth::config::EXIT_MISCONFIGURED`).
const EXIT_MISCONFIGURED: i32 = 78;

/// `berth resolve`'s exit status when the controller pins the tag instead
/// (`berth::jobpin::DEFERRED_EXIT`).
const EXIT_DEFERRED: i32 = 77;

/// How much of a failed holder's stderr is read into slurmstepd: its last lines, which say
/// why. The holder is the user's process and its stderr the user's to fill.
const STDERR_TAIL_BYTES: u64 = 16 * 1024;

/// The launcher binary, the limit its calls run under and the identity they run as.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub path: PathBuf,
    pub timeout: Duration,
    identity: Identity,
    /// The job whose end stops a call (slurmstepd's `user_init`), see [`job_end`].
    watch: Option<job_end::Watch>,
}

/// Who a launcher call runs as. slurmstepd runs `user_init` with real uid 0 and effective
/// uid the user, so its child can become either: root for the site's decisions and the
/// root-owned node cache, the user for the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The calling process's identity and whole environment (srun/sbatch: the user).
    Caller,
    /// Full root, no supplementary groups, and only PATH in the environment, so nothing of
    /// the job's environment reaches the site policy or the node cache.
    Root,
    /// The job's user and groups, only PATH in the environment (berth takes HOME and USER
    /// from the password database).
    User {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
}

/// A container `berth start` holds for the step: the holder, a child of this process known
/// by the pidfd opened right after spawning it (so it is signalled, and only it, even if its
/// pid were reused), and the container's namespaces and spec, taken from that child by
/// descriptor. Nothing here comes from what the holder printed but the spec fd's number,
/// checked against the child itself. Or the holder of another step's named container,
/// entered by this step but not its to stop ([`Holder::attach`]).
pub struct Holder {
    pub pid: i32,
    pub handle: SpecHandle,
    pub namespaces: Namespaces,
    /// The environment and confinement of the container's spec.
    pub process: ContainerProcess,
    /// The spec's annotations (what the container is).
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The holder and its stderr, where this process started it.
    child: Option<(Child, File)>,
    pidfd: PidFd,
}

/// What a finished call left behind.
#[derive(Debug)]
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// The job step a node-side decision is for, as the audit trail records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepIds {
    pub job: u32,
    /// The step id, or `batch` for the batch script's step.
    pub step: String,
    pub uid: u32,
}

/// `berth policy check`'s verdict.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed: the canonical reference, or the resolved path of a local image file.
    Allow(String),
    Deny(String),
}

/// Which partition `berth policy require-container` judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition<'a> {
    /// As the submitting side's environment names it; None: only the global rule.
    Named(Option<&'a str>),
    /// The one slurmctld records for the job (on the node, where the step's environment
    /// is srun's user's to set).
    OfJob(u32),
}

/// The descriptor `berth start --image-fd` finds a local image file on.
pub const IMAGE_FD: RawFd = 3;

/// Descriptors of this process a launcher call gets, each at the number beside it.
pub type HandedFds = Vec<(RawFd, OwnedFd)>;

impl Launcher {
    pub fn new(path: &Path) -> Self {
        Launcher {
            path: path.to_owned(),
            timeout: TIMEOUT,
            identity: Identity::Caller,
            watch: None,
        }
    }

    /// The same launcher, its calls stopped (the launcher killed, [`Error::JobEnded`]) once
    /// Slurm says the watched job ended.
    pub fn watching(&self, watch: job_end::Watch) -> Launcher {
        Launcher {
            watch: Some(watch),
            ..self.clone()
        }
    }

    /// `berth job-state JOBID` (as root, never watched): the job's state as slurmctld
    /// records it; None where it could not tell.
    fn job_state(&self, job: u32) -> Option<String> {
        let root = Launcher {
            timeout: JOB_STATE_TIMEOUT,
            identity: Identity::Root,
            watch: None,
            ..self.clone()
        };
        let job = job.to_string();
        let out = root.run(&["job-state", &job]).ok()?;
        out.status
            .success()
            .then(|| first_line(&out.stdout).to_owned())
    }

    /// The same launcher, its calls run as `identity`.
    pub fn run_as(&self, identity: Identity) -> Launcher {
        Launcher {
            identity,
            ..self.clone()
        }
    }

    /// `berth policy check --fetch IMAGE`: the node's verdict and, for an allowed image, the
    /// pull into the node cache, in one launcher call. The pull's progress lines go on to
    /// this process's stderr as they come, which slurmstepd connects to the job's stderr
    /// (srun's terminal, the batch output file).
    /// `step` (`--job ID --step ID --uid N`) names the job step, so the launcher records the
    /// decision in the node's audit trail.
    ///
    /// A local image path is looked up with the rights of `user` (uid, gid, groups), never
    /// root's, so the answer tells the user nothing about files they cannot see.
    pub fn check_and_fetch(
        &self,
        image: &str,
        step: &StepIds,
        user: (u32, u32, &[u32]),
    ) -> Result<Verdict, Error> {
        let (job, step_id, uid) = (
            step.job.to_string(),
            step.step.clone(),
            step.uid.to_string(),
        );
        let as_user = as_user_arg(user);
        let args = [
            "policy",
            "check",
            "--fetch",
            "--job",
            &job,
            "--step",
            &step_id,
            "--uid",
            &uid,
            "--as-user",
            &as_user,
            "--",
            image,
        ];
        let launcher = Launcher {
            timeout: FETCH_TIMEOUT,
            ..self.clone()
        };
        let out = launcher.collect_output(&args, true)?;
        verdict(&out).ok_or_else(|| {
            if let Some(e) = misconfigured(&out) {
                return e;
            }
            // The last line is berth's error; the ones before it were progress.
            let detail = out.stderr.trim().lines().last().unwrap_or_default();
            Error::FetchFailed {
                image: image.to_owned(),
                detail: format!("{}: {}", describe(out.status), detail.trim()),
            }
        })
    }

    /// `berth policy check --fetch IMAGE` started and left running on its own (its own
    /// process group, no output): the job prolog's prefetch, which must not hold up slurmd.
    /// Returns its pid. A later fetch of the same image on the node waits for it on the
    /// cache's image lock and then finds the image there.
    pub fn prefetch(&self, image: &str, step: &StepIds) -> Result<u32, Error> {
        let (job, uid) = (step.job.to_string(), step.uid.to_string());
        let args = [
            "policy", "check", "--fetch", "--job", &job, "--step", &step.step, "--uid", &uid, "--",
            image,
        ];
        let mut command = self.command(&args);
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let spawned = self.spawn(command, Vec::new())?;
        Ok(spawned.child.id())
    }

    /// `berth stage ARGS...` (as the job's user): data copied to or from node-local storage.
    /// Progress goes on to this process's stderr (the job's); returns stdout, one line per
    /// staged source.
    pub fn stage(&self, args: &[&str]) -> Result<String, Error> {
        let args = [&["stage"], args].concat();
        let launcher = Launcher {
            timeout: FETCH_TIMEOUT,
            ..self.clone()
        };
        let out = launcher.collect_output(&args, true)?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let detail = out.stderr.trim().lines().last().unwrap_or_default();
        Err(Error::StageFailed {
            detail: format!("{}: {}", describe(out.status), detail.trim()),
        })
    }

    /// `berth start ARGS...`: starts the step's container and returns once it printed its
    /// handle and its namespaces and spec are open; the holder keeps running (a child of this
    /// process) until [`Holder::stop`]. The handle is output the user can write to (any of
    /// their processes may open the pipe), so it is only believed where it names the child
    /// spawned here, and what root opens is opened from that child.
    ///
    /// `fds` are given to `berth start` at the descriptor numbers they name (3 and above),
    /// e.g. a file root opened and vetted for it.
    pub fn start(&self, args: &[String], fds: HandedFds) -> Result<Holder, Error> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.waiting(&args, || self.start_holder(&args, fds))
    }

    fn start_holder(&self, args: &[&str], fds: HandedFds) -> Result<Holder, Error> {
        // A file, not a pipe: nobody reads the holder's stderr while it runs, and a full
        // pipe would block it. It is read only if the start fails.
        let mut stderr = berth_sys::memfd::anonymous(c"berth-start-stderr")
            .map_err(|e| self.io_failure(args, &std::io::Error::other(e)))?;
        let mut command = self.command(args);
        command
            .stdout(Stdio::piped())
            .stderr(stderr.try_clone().map_err(|e| self.io_failure(args, &e))?);
        let mut spawned = self.spawn(command, fds)?;
        let mut pipes: [Option<Box<dyn ReadFd>>; 2] = [
            spawned
                .child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn ReadFd>),
            None,
        ];
        let mut output = [Vec::new(), Vec::new()];
        let mut ended = self.watch_end();
        // One line, not EOF: the holder's helpers may keep stdout open.
        let read = pump(
            &mut pipes,
            &mut output,
            Instant::now() + self.timeout,
            None,
            &|out: &[Vec<u8>; 2]| out[0].contains(&b'\n'),
            ended.as_deref_mut(),
        );
        let printed = String::from_utf8_lossy(&output[0]).into_owned();
        let opened = match (&read, SpecHandle::parse(first_line(&printed))) {
            (Ok(()), Some(handle)) => Some(self.open_holder(&spawned, handle)),
            _ => None,
        };
        if let Some(Ok(opened)) = opened {
            let Spawned { child, pidfd } = spawned;
            return Ok(opened.into_holder(Some((child, stderr)), pidfd));
        }
        spawned.kill_group();
        let status = spawned
            .child
            .wait()
            .map_err(|e| self.io_failure(args, &e))?;
        let detail = match (read, opened) {
            (Err(ended @ Collect::JobEnded(_)), _) => {
                return Err(self.collect_failure(args, ended));
            }
            (_, Some(Err(refusal))) => refusal,
            (Err(Collect::TimedOut), _) => {
                format!("no handle within {} s", self.timeout.as_secs())
            }
            // A whole line that is not a handle: berth was killed for it above, so its exit
            // status would only say how fast that was.
            (Ok(()), None) if printed.contains('\n') => {
                format!("it printed '{}', not a PID:FD handle", printed.trim())
            }
            _ => describe(status),
        };
        let text = stderr_tail(&mut stderr);
        Err(Error::StartFailed {
            command: self.command_line(args),
            // Shown through spank's log functions, which escape it.
            detail: match text.trim() {
                "" => detail,
                text => format!("{detail}: {text}"),
            },
        })
    }

    /// Takes the container's namespaces and spec from the spawned holder, as root where this
    /// process may take root back (slurmstepd's `user_init`): the holder is non-dumpable, so
    /// neither the user nor any other of their processes could. Refuses a handle that names
    /// any process but the child itself.
    fn open_holder(&self, spawned: &Spawned, handle: SpecHandle) -> Result<Opened, String> {
        if handle.pid != spawned.pid() {
            return Err(format!(
                "it printed the handle {handle}, but it is process {}: something else wrote \
                 into its output, which is refused",
                spawned.pid()
            ));
        }
        Opened::of(&spawned.pidfd, handle)
    }

    /// `berth save` (as the job's user, once the step's container stopped): the container's
    /// file system to `dest` as a SIF. Its messages go on to the job's stderr. `below`: a
    /// copy's, the named container's changes under `changes`.
    pub fn save(
        &self,
        changes: Option<(&str, bool)>,
        below: Option<&str>,
        image: &str,
        dest: &str,
    ) -> Result<(), Error> {
        let mut args = vec!["save"];
        if let Some((dir, keep)) = changes {
            args.extend(["--changes", dir]);
            if keep {
                args.push("--keep-changes");
            }
            args.extend(below.iter().flat_map(|b| ["--below", b]));
        }
        args.extend(["--", image, dest]);
        let launcher = Launcher {
            timeout: FETCH_TIMEOUT,
            ..self.clone()
        };
        let out = launcher.collect_output(&args, true)?;
        if out.status.success() {
            return Ok(());
        }
        Err(Error::SaveFailed {
            path: dest.to_owned(),
            detail: format!(
                "{}: {}",
                describe(out.status),
                out.stderr.trim().lines().last().unwrap_or_default().trim()
            ),
        })
    }

    /// `berth named remove --job JOB` (as the job's user): the job's named containers go.
    pub fn remove_named(&self, job: u32) -> Result<(), Error> {
        let job = job.to_string();
        let args = ["named", "remove", "--job", &job];
        let out = self.run(&args)?;
        if out.status.success() {
            return Ok(());
        }
        Err(self.failed(&args, &out))
    }

    /// `berth policy check -- IMAGE`.
    pub fn policy_check(&self, image: &str) -> Result<Verdict, Error> {
        let args = ["policy", "check", "--", image];
        let out = self.run(&args)?;
        verdict(&out).ok_or_else(|| self.failed(&args, &out))
    }

    /// `berth resolve -- IMAGE`: the digest-pinned reference; `None` where the controller
    /// pins the tag instead (the user has no credentials for the registry).
    pub fn resolve(&self, image: &str) -> Result<Option<String>, Error> {
        let out = self.run(&["resolve", "--", image])?;
        if out.status.code() == Some(EXIT_DEFERRED) {
            return Ok(None);
        }
        if !out.status.success() {
            return Err(Error::ResolveFailed {
                image: image.to_owned(),
                detail: format!("{}: {}", describe(out.status), out.stderr.trim()),
            });
        }
        let pinned = first_line(&out.stdout);
        if !is_pinned(pinned) {
            return Err(Error::ResolveFailed {
                image: image.to_owned(),
                detail: format!(
                    "berth resolve printed '{pinned}', which is not a reference with an \
                     @sha256: digest"
                ),
            });
        }
        Ok(Some(pinned.to_owned()))
    }

    /// `berth pin-job --show JOBID -- IMAGE`: the digest the controller pinned IMAGE to for
    /// the job, if it did.
    pub fn job_pin(&self, job: u32, image: &str) -> Result<Option<String>, Error> {
        let job = job.to_string();
        let args = ["pin-job", "--show", &job, "--", image];
        let out = self.run(&args)?;
        match out.status.code() {
            Some(0) if is_pinned(first_line(&out.stdout)) => {
                Ok(Some(first_line(&out.stdout).to_owned()))
            }
            Some(1) => Ok(None),
            _ => Err(self.failed(&args, &out)),
        }
    }

    /// `berth policy require-container [--partition P | --job JOBID]`: `Some(reason)` where
    /// the site requires every step to run in a container.
    pub fn require_container(&self, partition: Partition) -> Result<Option<String>, Error> {
        let job;
        let mut args = vec!["policy", "require-container"];
        match partition {
            Partition::Named(name) => args.extend(name.iter().flat_map(|p| ["--partition", p])),
            Partition::OfJob(id) => {
                job = id.to_string();
                args.extend(["--job", &job]);
            }
        }
        let out = self.run(&args)?;
        match out.status.code() {
            Some(0) => {
                let reason = first_line(&out.stdout);
                Ok(Some(if reason.is_empty() {
                    "the site policy requires a container".to_owned()
                } else {
                    reason.to_owned()
                }))
            }
            Some(1) => Ok(None),
            _ => Err(self.failed(&args, &out)),
        }
    }

    fn failed(&self, args: &[&str], out: &Outcome) -> Error {
        if let Some(e) = misconfigured(out) {
            return e;
        }
        Error::LauncherFailed {
            command: self.command_line(args),
            status: describe(out.status),
            stderr: out.stderr.trim().to_owned(),
        }
    }

    fn command_line(&self, args: &[&str]) -> String {
        format!("{} {}", self.path.display(), args.join(" "))
    }

    fn io_failure(&self, args: &[&str], e: &std::io::Error) -> Error {
        Error::LauncherFailed {
            command: self.command_line(args),
            status: format!("reading its output failed: {e}"),
            stderr: String::new(),
        }
    }

    /// Runs the launcher with `args` to completion or until the time limit, collecting its
    /// output.
    fn run(&self, args: &[&str]) -> Result<Outcome, Error> {
        self.collect_output(args, false)
    }

    /// [`run`](Self::run), with stderr also copied to this process's stderr if `echo`.
    fn collect_output(&self, args: &[&str], echo: bool) -> Result<Outcome, Error> {
        self.waiting(args, || {
            let mut command = self.command(args);
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
            let spawned = self.spawn(command, Vec::new())?;
            let mut ended = self.watch_end();
            collect(spawned, self.timeout, echo, ended.as_deref_mut())
                .map_err(|e| self.collect_failure(args, e))
        })
    }

    /// What stops a pump where this call is watched: the state the job ended in.
    fn watch_end(&self) -> Option<Box<dyn FnMut() -> Option<String> + '_>> {
        let mut looking = self.watch.as_ref()?.start();
        Some(Box::new(move || looking.ended(&|job| self.job_state(job))))
    }

    fn collect_failure(&self, args: &[&str], e: Collect) -> Error {
        match e {
            Collect::TimedOut => Error::LauncherTimedOut {
                command: self.command_line(args),
                seconds: self.timeout.as_secs(),
            },
            Collect::JobEnded(state) => Error::JobEnded {
                job: self.watch.as_ref().map_or(0, |w| w.job),
                state,
            },
            Collect::Io(e) => self.io_failure(args, &e),
        }
    }

    /// Runs `wait`, which spawns the launcher and waits for it, with effective uid 0 where
    /// this process can take it back: slurmstepd's `user_init`, whose euid is the user's for
    /// the whole process. A cold image's fetch keeps it there for minutes, while slurmstepd's
    /// own threads go on: its PMIx server sends to other nodes and takes their direct
    /// connections with munge credentials, which munge refuses to a process whose euid is
    /// the user's, and the job's tasks hang in MPI_Init (docs/MPI.md). What the child
    /// becomes is [`Identity`]'s, not this euid's.
    fn waiting<T>(
        &self,
        args: &[&str],
        wait: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        berth_sys::identity::with_effective_root(wait)
            .map_err(|e| self.io_failure(args, &std::io::Error::other(e)))?
    }

    /// The launcher with `args`, in a process group of its own (so a time limit can stop the
    /// launcher and its helpers together); [`Launcher::spawn`] gives it the identity.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.path);
        command.args(args).stdin(Stdio::null()).process_group(0);
        if self.identity != Identity::Caller {
            command.env_clear().env("PATH", NODE_PATH).current_dir("/");
            // Slurm's name for this node, which slurmd and slurmstepd set for themselves:
            // berth's audit trail and gres.conf lookups need it where it is not the host
            // name (NodeName aliases, several slurmd on one host).
            if let Some(node) = std::env::var_os(NODE_NAME_VAR) {
                command.env(NODE_NAME_VAR, node);
            }
        }
        command
    }

    /// Starts `command` as [`Identity`] says, with no descriptor of this process beyond
    /// stdin/stdout/stderr (Slurm's sockets to slurmctld, slurmstepd's to the tasks).
    fn spawn(&self, command: Command, fds: HandedFds) -> Result<Spawned, Error> {
        let spawn = fds
            .into_iter()
            .fold(Spawn::new(command), |spawn, (number, fd)| {
                spawn.with_fd(number, fd)
            });
        let spawn = match &self.identity {
            Identity::Caller => spawn,
            Identity::Root => spawn.credentials(Credentials::root()),
            Identity::User { uid, gid, groups } => spawn.credentials(Credentials {
                uid: *uid,
                gid: *gid,
                groups: groups.clone(),
            }),
        };
        spawn.spawn().map_err(|e| Error::LauncherNotRunnable {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })
    }
}

/// The last [`STDERR_TAIL_BYTES`] of a failed holder's stderr; best effort, the status is
/// known anyway.
fn stderr_tail(file: &mut File) -> String {
    let mut bytes = Vec::new();
    let _ = file
        .seek(SeekFrom::End(0))
        .and_then(|len| file.seek(SeekFrom::Start(len.saturating_sub(STDERR_TAIL_BYTES))))
        .and_then(|_| file.take(STDERR_TAIL_BYTES).read_to_end(&mut bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Holder({})", self.pid)
    }
}

/// [`Error::NodeMisconfigured`] if the launcher stopped on the site configuration.
fn misconfigured(out: &Outcome) -> Option<Error> {
    (out.status.code() == Some(EXIT_MISCONFIGURED)).then(|| Error::NodeMisconfigured {
        detail: out
            .stderr
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .trim_start_matches("berth: ")
            .to_owned(),
    })
}

/// A holder's container as root opened it.
struct Opened {
    handle: SpecHandle,
    namespaces: Namespaces,
    process: ContainerProcess,
    annotations: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct Annotations {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Opened {
    /// Takes the namespaces and spec of the holder `handle` names, whose pidfd is `pidfd`,
    /// as root where this process may take root back (slurmstepd's `user_init`): a holder
    /// is non-dumpable, so neither the user nor any other of their processes could.
    fn of(pidfd: &PidFd, handle: SpecHandle) -> Result<Opened, String> {
        berth_sys::identity::with_effective_root(|| berth_sys::holder::open(pidfd, handle))
            .and_then(|opened| opened)
            .and_then(|Held { namespaces, spec }| {
                let process = ContainerProcess::from_spec(&spec)?;
                let annotations = serde_json::from_slice::<Annotations>(&spec)
                    .map(|a| a.annotations)
                    .unwrap_or_default();
                Ok(Opened {
                    handle,
                    namespaces,
                    process,
                    annotations,
                })
            })
            .map_err(|e| format!("opening the container of holder {handle}: {e}"))
    }

    fn into_holder(self, child: Option<(Child, File)>, pidfd: PidFd) -> Holder {
        Holder {
            pid: self.handle.pid,
            handle: self.handle,
            namespaces: self.namespaces,
            process: self.process,
            annotations: self.annotations,
            child,
            pidfd,
        }
    }
}

impl Holder {
    /// The running holder `handle` names, started by another step (a named container's):
    /// entered, never stopped, by this one. It must be a berth holder (a sealed spec memfd
    /// at the handle's descriptor) running as `uid`, the job's user: a pid reused since the
    /// handle was recorded is refused.
    pub fn attach(handle: SpecHandle, uid: u32) -> Result<Holder, String> {
        let pidfd = PidFd::open(handle.pid).map_err(|e| format!("holder {handle} is gone: {e}"))?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", handle.pid))
            .map_err(|e| format!("holder {handle} is gone: {e}"))?;
        let owner = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            .and_then(|id| id.parse::<u32>().ok());
        if owner != Some(uid) {
            return Err(format!(
                "process {} is not a container of uid {uid} (it runs as {owner:?})",
                handle.pid
            ));
        }
        Ok(Opened::of(&pidfd, handle)?.into_holder(None, pidfd))
    }

    /// What the running holder said on its stderr (e.g. that the container went over its
    /// size limit and turned read-only), for the job's stderr; empty for an entered one.
    pub fn messages(&mut self) -> String {
        self.child
            .as_mut()
            .map(|(_, stderr)| stderr_tail(stderr))
            .unwrap_or_default()
    }

    /// Asks the holder to tear the container down (SIGTERM: it unmounts, ends squashfuse and
    /// removes its runtime directory), waits up to `grace`, then kills it; reaps it either way.
    /// Returns whether it had to be killed.
    /// A holder this process did not start (an entered named container) is left running.
    pub fn stop(mut self, grace: Duration) -> Result<bool, Error> {
        use berth_sys::process::Signal;
        let pid = self.pid;
        let Some((child, _)) = self.child.as_mut() else {
            return Ok(false);
        };
        let failed = |e: berth_sys::Error| Error::StopFailed {
            pid,
            detail: e.to_string(),
        };
        // Only through the pidfd of the child spawned in `start`: never a number read from
        // output. An error here means it is gone already (ESRCH), which is what we want.
        let _ = self.pidfd.signal(Signal::SIGTERM);
        let ended = self.pidfd.wait_exit(grace).map_err(failed)?;
        if !ended {
            let _ = self.pidfd.signal(Signal::SIGKILL);
            self.pidfd
                .wait_exit(Duration::from_secs(5))
                .map_err(failed)?;
        }
        // Our child, so ours to reap; slurmstepd may have reaped it already (ECHILD).
        let _ = child.try_wait();
        Ok(!ended)
    }
}

enum Collect {
    TimedOut,
    /// The watched job ended, in this state.
    JobEnded(String),
    Io(std::io::Error),
}

/// Reads stdout and stderr until both close, then reaps the child. If `timeout` passes
/// first, kills the child's whole process group (SIGKILL; a launcher's own helpers could
/// otherwise keep running and hold the pipes) and reaps it, so no zombie is left in srun or
/// slurmstepd.
fn collect(
    mut spawned: Spawned,
    timeout: Duration,
    echo: bool,
    ended: Option<&mut (dyn FnMut() -> Option<String> + '_)>,
) -> Result<Outcome, Collect> {
    let child = &mut spawned.child;
    let mut pipes: [Option<Box<dyn ReadFd>>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
    ];
    let mut output = [Vec::new(), Vec::new()];
    let mut echo = echo.then(Echo::default);
    let pumped = pump(
        &mut pipes,
        &mut output,
        Instant::now() + timeout,
        echo.as_mut(),
        &|_: &[Vec<u8>; 2]| false,
        ended,
    );
    if let Some(echo) = echo.as_mut() {
        echo.finish();
    }
    if pumped.is_err() {
        spawned.kill_group();
    }
    let status = spawned.child.wait().map_err(Collect::Io)?;
    pumped?;
    let [stdout, stderr] = output.map(|o| String::from_utf8_lossy(&o).into_owned());
    Ok(Outcome {
        status,
        stdout,
        stderr,
    })
}

/// Passes a child's stderr on to this process's stderr (the job's) line by line, each with
/// its control characters escaped: the root fetch's progress and errors carry text a
/// registry chose, which must not move the user's cursor or forge lines.
#[derive(Default)]
struct Echo {
    partial: Vec<u8>,
}

impl Echo {
    fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            Self::write(&line[..end]);
        }
        if self.partial.len() > OUTPUT_MAX_BYTES {
            self.finish();
        }
    }

    /// Writes what is left of an unfinished line.
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            Self::write(&std::mem::take(&mut self.partial));
        }
    }

    fn write(line: &[u8]) {
        let text = format!("{}\n", escape_control(&String::from_utf8_lossy(line)));
        // Progress for the user; losing a line must not fail the fetch.
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}

/// Moves what the pipes deliver into `output` until every pipe is closed, `done` holds for
/// what was read, `deadline`, or `ended` names the state the watched job ended in (it is
/// called every [`job_end::LOOK_EVERY`] at most). With `echo`, what the second pipe (stderr)
/// delivers is also passed on as it comes.
fn pump(
    pipes: &mut [Option<Box<dyn ReadFd>>; 2],
    output: &mut [Vec<u8>; 2],
    deadline: Instant,
    mut echo: Option<&mut Echo>,
    done: &dyn Fn(&[Vec<u8>; 2]) -> bool,
    mut ended: Option<&mut (dyn FnMut() -> Option<String> + '_)>,
) -> Result<(), Collect> {
    loop {
        if done(output) {
            return Ok(());
        }
        if let Some(state) = ended.as_mut().and_then(|ended| ended()) {
            return Err(Collect::JobEnded(state));
        }
        let open: Vec<usize> = (0..2).filter(|&i| pipes[i].is_some()).collect();
        if open.is_empty() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Collect::TimedOut);
        }
        let left = match ended {
            Some(_) => left.min(job_end::LOOK_EVERY),
            None => left,
        };
        let ready = {
            let fds: Vec<_> = open
                .iter()
                .map(|&i| pipes[i].as_ref().expect("open").as_fd())
                .collect();
            berth_sys::process::poll_readable(&fds, left)
                .map_err(|e| Collect::Io(std::io::Error::other(e)))?
        };
        for (&i, _) in open.iter().zip(ready).filter(|(_, ready)| *ready) {
            let mut chunk = [0u8; 4096];
            match pipes[i].as_mut().expect("open").read(&mut chunk) {
                Ok(0) => pipes[i] = None,
                Ok(n) => {
                    if let (Some(echo), 1) = (echo.as_deref_mut(), i) {
                        echo.feed(&chunk[..n]);
                    }
                    let room = OUTPUT_MAX_BYTES.saturating_sub(output[i].len());
                    output[i].extend_from_slice(&chunk[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Collect::Io(e)),
            }
        }
    }
}

/// A child's pipe: readable, with a descriptor for poll.
trait ReadFd: Read + AsFd {}
impl<T: Read + AsFd> ReadFd for T {}

/// The verdict of a `berth policy check`, or None where berth did not answer with one:
/// stdout must be exactly one line, `allow: VETTED (rule: RULE)` with exit status 0 or
/// `deny: REASON` with exit status 1. Exit 0 alone is no verdict: `berth policy check -h`
/// once printed its help and exited 0.
fn verdict(out: &Outcome) -> Option<Verdict> {
    let line = out
        .stdout
        .strip_suffix('\n')
        .filter(|l| !l.contains('\n'))?;
    match out.status.code()? {
        0 => {
            let (vetted, rule) = line.strip_prefix("allow: ")?.split_once(" (rule: ")?;
            let ok = !vetted.is_empty() && rule.len() > 1 && rule.ends_with(')');
            ok.then(|| Verdict::Allow(vetted.to_owned()))
        }
        1 => line
            .strip_prefix("deny: ")
            .filter(|reason| !reason.trim().is_empty())
            .map(|reason| Verdict::Deny(reason.to_owned())),
        _ => None,
    }
}

/// `UID:GID:GID,GID,...` for `berth policy check --as-user`.
fn as_user_arg((uid, gid, groups): (u32, u32, &[u32])) -> String {
    let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
    format!("{uid}:{gid}:{}", groups.join(","))
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default().trim()
}

/// `exit status 3` or `killed by signal 9`, for messages.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// Whether `reference` names its image by a sha256 digest, as a pinned reference must.
pub fn is_pinned(reference: &str) -> bool {
    reference
        .rsplit_once("@sha256:")
        .is_some_and(|(name, hex)| {
            !name.is_empty()
                && hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Tests that start processes run one at a time, across every module: a test writing its
/// fake launcher script while another forks would leave the script's write descriptor open in
/// that child until it execs, and executing the script then fails with ETXTBSY ("Text file
/// busy").
#[cfg(test)]
pub(crate) fn serial_spawns() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const DIGEST: &str = "564738b94caf6e650d2958faba160d41ffd14562c384717105d50bd4e59b20cc";

    /// A stand-in for the `berth` binary: a shell script whose body sees the arguments.
    fn fake(body: &str) -> (tempfile::TempDir, Launcher) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let launcher = Launcher::new(&path);
        (dir, launcher)
    }

    #[test]
    fn policy_verdicts() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(
            r#"[ "$1 $2 $3" = "policy check --" ] || exit 2
               case "$4" in
                 ok/*) echo "allow: h/$4 (rule: h/ok/*)"; exit 0;;
                 quiet/*) exit 1;;
                 -h) echo "Usage: berth policy check"; exit 0;;
                 *) echo "deny: registry of $4 is not in the allow-list"; exit 1;;
               esac"#,
        );
        assert_eq!(
            berth.policy_check("ok/a"),
            Ok(Verdict::Allow("h/ok/a".into()))
        );
        assert_eq!(
            berth.policy_check("evil/a"),
            Ok(Verdict::Deny(
                "registry of evil/a is not in the allow-list".into()
            ))
        );
        // No verdict line, whatever the exit status: berth failed, the step fails closed.
        for image in ["quiet/a", "-h"] {
            let err = berth.policy_check(image).unwrap_err();
            assert!(
                matches!(err, Error::LauncherFailed { .. }),
                "{image}: {err:?}"
            );
        }
    }

    /// In slurmstepd's `user_init` (real uid 0, effective uid the user) the process waits
    /// for its launcher with effective uid 0, and has the user's back afterwards: the fake
    /// launcher reads its parent's effective uid while the parent waits.
    #[test]
    fn user_init_waits_for_the_launcher_with_effective_root_and_returns_as_the_user() {
        if berth_sys::identity::real_uid() != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let _serial = serial_spawns();
        let (_d, berth) = fake(
            r#"euid=$(awk '/^Uid:/ {print $3}' /proc/$PPID/status)
               echo "allow: h/euid-$euid (rule: h/*)""#,
        );
        let root = berth.run_as(Identity::Root);
        // SAFETY: the forked child changes its euid, spawns the fake launcher and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let steps = [
                    nix::unistd::seteuid(nix::unistd::Uid::from_raw(65534)).is_ok(),
                    root.policy_check("a") == Ok(Verdict::Allow("h/euid-0".into())),
                    berth_sys::identity::effective_uid() == 65534,
                ];
                let failed = steps.iter().position(|ok| !ok).map_or(0, |i| i + 1);
                // SAFETY: _exit skips the parent's atexit handlers in this copy.
                unsafe { libc::_exit(failed as i32) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let exit = berth_sys::process::reap(child.as_raw()).unwrap();
                assert_eq!(exit, berth_sys::process::Exit::Code(0));
            }
        }
    }

    /// slurmd rewrote its credential state file and slurmctld says the job ended: the fetch
    /// it waited for is killed, with its helpers, and the call says why.
    #[test]
    fn a_watched_call_stops_when_the_job_ends() {
        let _serial = serial_spawns();
        let spool = tempfile::tempdir().unwrap();
        let cred_state = spool.path().join("cred_state");
        std::fs::write(&cred_state, "").unwrap();
        let pid_file = spool.path().join("sleeper");
        let (_d, berth) = fake(&format!(
            r#"case "$1" in
                 job-state) [ "$2" = 7 ] && echo CANCELLED;;
                 *) sleep 60 & echo $! > {}; wait;;
               esac"#,
            pid_file.display()
        ));
        let watch = job_end::Watch::new(7, Some(spool.path().as_os_str().as_encoded_bytes()), None);
        let berth = berth.watching(watch).run_as(Identity::Root);
        let slurmd = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            std::fs::File::options()
                .write(true)
                .open(&cred_state)
                .unwrap()
                .set_modified(std::time::SystemTime::now() + Duration::from_secs(1))
                .unwrap();
        });
        let started = Instant::now();
        let step = StepIds {
            job: 7,
            step: "0".into(),
            uid: 1000,
        };
        let err = berth
            .check_and_fetch("a", &step, (1000, 1000, &[]))
            .unwrap_err();
        slurmd.join().unwrap();
        assert_eq!(
            err,
            Error::JobEnded {
                job: 7,
                state: "CANCELLED".into()
            }
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let sleeper = std::fs::read_to_string(&pid_file).unwrap();
        let gone = || {
            std::fs::read_to_string(format!("/proc/{}/stat", sleeper.trim()))
                .map_or(true, |stat| stat.contains(") Z "))
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while !gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(gone(), "the launcher's helper still runs");
    }

    fn outcome(code: i32, stdout: &str) -> Outcome {
        Outcome {
            status: ExitStatus::from_raw(code << 8),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    #[test]
    fn only_the_exact_answer_line_is_a_verdict() {
        let allow = |v: &str| Some(Verdict::Allow(v.into()));
        let deny = |r: &str| Some(Verdict::Deny(r.into()));
        for (code, stdout, expected) in [
            (0, "allow: h/r:1 (rule: h/*)\n", allow("h/r:1")),
            (
                0,
                "allow: /srv/my images/a.sif (rule: local_image_dirs: /srv/my images)\n",
                allow("/srv/my images/a.sif"),
            ),
            (1, "deny: not approved\n", deny("not approved")),
            // Help text, an empty answer, a verdict with the wrong status, a second line,
            // a cut line, a crash: none is a verdict.
            (0, "Print `allow: IMAGE (rule: RULE)` and exit 0\n", None),
            (0, "", None),
            (0, "\n", None),
            (0, "allow: h/r:1\n", None),
            (0, "allow:  (rule: h/*)\n", None),
            (0, "allow: h/r:1 (rule: )\n", None),
            (0, "allow: h/r:1 (rule: h/*)", None),
            (0, "allow: h/r:1 (rule: h/*)\nallow: x (rule: y)\n", None),
            (1, "allow: h/r:1 (rule: h/*)\n", None),
            (0, "deny: no\n", None),
            (1, "deny: \n", None),
            (1, "not approved\n", None),
            (1, "", None),
            (2, "deny: no\n", None),
            (125, "allow: h/r:1 (rule: h/*)\n", None),
        ] {
            assert_eq!(
                verdict(&outcome(code, stdout)),
                expected,
                "{code} {stdout:?}"
            );
        }
        let killed = Outcome {
            status: ExitStatus::from_raw(9),
            stdout: "allow: h/r:1 (rule: h/*)\n".into(),
            stderr: String::new(),
        };
        assert_eq!(verdict(&killed), None);
    }

    #[test]
    fn images_come_after_a_double_dash_in_every_call() {
        let _serial = serial_spawns();
        // The fake answers like berth with its arguments recorded; an image that looks like
        // an option must arrive after `--`.
        let (dir, berth) = fake(
            r#"echo "$*" >> "$(dirname "$0")/calls"
               case "$1" in
                 resolve) echo "h/r@sha256:564738b94caf6e650d2958faba160d41ffd14562c384717105d50bd4e59b20cc";;
                 *) echo "deny: no"; exit 1;;
               esac"#,
        );
        let root = berth.run_as(Identity::Root);
        let _ = berth.policy_check("-h");
        let _ = root.check_and_fetch("--help", &step_ids(), (1100, 1100, &[1100, 27]));
        let _ = berth.resolve("--config=/tmp/x");
        // The prefetch runs detached: wait for its line.
        root.prefetch("--config=/home/u/site.toml", &step_ids())
            .unwrap();
        let calls_file = dir.path().join("calls");
        let deadline = Instant::now() + Duration::from_secs(10);
        let calls = loop {
            let calls = std::fs::read_to_string(&calls_file).unwrap();
            if calls.lines().count() == 4 || Instant::now() > deadline {
                break calls;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            [
                "policy check -- -h",
                "policy check --fetch --job 7 --step 0 --uid 1100 --as-user 1100:1100:1100,27 -- --help",
                "resolve -- --config=/tmp/x",
                "policy check --fetch --job 7 --step 0 --uid 1100 -- --config=/home/u/site.toml",
            ]
        );
    }

    #[test]
    fn launcher_failure_is_not_a_verdict() {
        let _serial = serial_spawns();
        let (_d, berth) = fake("echo 'config unreadable' >&2; exit 125");
        let err = berth.policy_check("a").unwrap_err();
        assert_eq!(
            err,
            Error::LauncherFailed {
                command: format!("{} policy check -- a", berth.path.display()),
                status: "exit status 125".into(),
                stderr: "config unreadable".into(),
            }
        );
        let (_d, berth) = fake("kill -9 $$");
        let err = berth.require_container(Partition::Named(None)).unwrap_err();
        assert!(err.to_string().contains("killed by signal 9"), "{err}");
    }

    #[test]
    fn resolve_gives_the_pinned_reference() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(&format!(
            r#"[ "$1 $2" = "resolve --" ] || exit 2
               case "$3" in
                 good) echo "localhost:5000/test/busybox@sha256:{DIGEST}";;
                 odd) echo "localhost:5000/test/busybox:latest";;
                 private) echo "registry localhost:5002 refused access" >&2; exit 77;;
                 *) echo "registry localhost:5000 unreachable: connection refused" >&2; exit 1;;
               esac"#
        ));
        assert_eq!(
            berth.resolve("good"),
            Ok(Some(format!("localhost:5000/test/busybox@sha256:{DIGEST}")))
        );
        assert_eq!(berth.resolve("private"), Ok(None), "left to the controller");
        let msg = berth.resolve("down").unwrap_err().to_string();
        assert!(msg.contains("could not pin image 'down'"), "{msg}");
        assert!(
            msg.contains("exit status 1: registry localhost:5000 unreachable"),
            "{msg}"
        );
        let msg = berth.resolve("odd").unwrap_err().to_string();
        assert!(
            msg.contains("not a reference with an @sha256: digest"),
            "{msg}"
        );
    }

    #[test]
    fn the_job_pin_is_a_pinned_reference_or_none() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(&format!(
            r#"[ "$1 $2 $3 $4" = "pin-job --show 7 --" ] || exit 2
               case "$5" in
                 pinned) echo "localhost:5002/p/b@sha256:{DIGEST}";;
                 tag) echo "localhost:5002/p/b:1";;
                 *) echo "berth: job 7 has no digest pin" >&2; exit 1;;
               esac"#
        ));
        assert_eq!(
            berth.job_pin(7, "pinned"),
            Ok(Some(format!("localhost:5002/p/b@sha256:{DIGEST}")))
        );
        assert_eq!(berth.job_pin(7, "none"), Ok(None));
        assert!(berth.job_pin(7, "tag").is_err(), "a tag is no pin");
        assert!(berth.job_pin(8, "pinned").is_err());
    }

    #[test]
    fn require_container_passes_the_partition_or_the_job() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(
            r#"[ "$1 $2" = "policy require-container" ] || exit 2
               [ "$3 $4" = "--partition gpu" ] && { echo "partition gpu runs containers only"; exit 0; }
               [ "$3 $4" = "--job 42" ] && { echo "partition strict runs containers only"; exit 0; }
               [ "$3 $4" = "--job 43" ] && exit 1
               [ -z "$3" ] && exit 1
               exit 3"#,
        );
        assert_eq!(
            berth.require_container(Partition::Named(Some("gpu"))),
            Ok(Some("partition gpu runs containers only".into()))
        );
        assert_eq!(berth.require_container(Partition::Named(None)), Ok(None));
        assert!(berth
            .require_container(Partition::Named(Some("cpu")))
            .is_err());
        assert_eq!(
            berth.require_container(Partition::OfJob(42)),
            Ok(Some("partition strict runs containers only".into()))
        );
        assert_eq!(berth.require_container(Partition::OfJob(43)), Ok(None));
    }

    #[test]
    fn missing_launcher_is_named() {
        let _serial = serial_spawns();
        let berth = Launcher::new(Path::new("/nonexistent/berth"));
        let msg = berth.policy_check("a").unwrap_err().to_string();
        assert!(
            msg.contains("could not run the berth launcher /nonexistent/berth"),
            "{msg}"
        );
    }

    #[test]
    fn a_hanging_launcher_is_killed_at_the_limit() {
        let _serial = serial_spawns();
        // The grandchild keeps stdout open: the limit must still hold.
        let (_d, mut berth) = fake("sleep 3 & sleep 3");
        berth.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = berth.policy_check("a").unwrap_err();
        assert!(matches!(err, Error::LauncherTimedOut { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn descriptors_are_not_inherited() {
        let _serial = serial_spawns();
        // A descriptor without close-on-exec, as Slurm's own often are.
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let (_d, berth) = fake(&format!(
            "[ -e /proc/self/fd/{fd} ] && {{ echo leaked >&2; exit 3; }}; echo 'allow: a (rule: *)'"
        ));
        assert_eq!(berth.policy_check("a"), Ok(Verdict::Allow("a".into())));
    }

    #[test]
    fn output_is_bounded() {
        let _serial = serial_spawns();
        let (_d, berth) =
            fake("printf 'deny: '; head -c 1000000 /dev/zero | tr '\\0' x; echo; exit 1");
        let out = berth.run(&["policy", "check", "--", "a"]).unwrap();
        assert_eq!(out.stdout.len(), OUTPUT_MAX_BYTES);
        // Cut short, the line is no verdict.
        assert!(matches!(
            berth.policy_check("a"),
            Err(Error::LauncherFailed { .. })
        ));
    }

    /// A stand-in for `berth start`: python, in this process's namespaces, publishing a
    /// sealed `berth-spec` memfd and printing `PID:FD` (or what `handle` makes of them), then
    /// running until SIGTERM (or, with `ignore_term`, until killed).
    fn fake_holder(handle: &str, ignore_term: bool) -> (tempfile::TempDir, Launcher) {
        let python = format!(
            r#"import os, fcntl, signal, sys, time
if {ignore_term}: signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = os.memfd_create("berth-spec", os.MFD_ALLOW_SEALING)
os.write(fd, b'{{"process":{{"env":["PATH=/img"],"cwd":"/"}}}}')
fcntl.fcntl(fd, 1033, 15)
pid, fd = os.getpid(), fd
print(f"{handle}", flush=True)
while True: time.sleep(0.1)
"#,
            ignore_term = if ignore_term { "True" } else { "False" },
        );
        let (dir, berth) = fake(
            r#"[ "$1 $2 $3" = "start --private --" ] || exit 2
               [ -e /proc/self/fd/5 ] && [ "$(cat /proc/self/fd/5)" != vetted ] && exit 3
               exec python3 "$(dirname "$0")/holder.py""#,
        );
        std::fs::write(dir.path().join("holder.py"), python).unwrap();
        (dir, berth)
    }

    fn start_args() -> Vec<String> {
        ["start", "--private", "--", "img"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn start_returns_at_the_handle_line_and_stop_ends_the_holder() {
        let _serial = serial_spawns();
        let (_d, berth) = fake_holder("{pid}:{fd}", false);
        let started = Instant::now();
        let holder = berth.start(&start_args(), Vec::new()).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(Path::new(&format!("/proc/{}", holder.pid)).exists());
        // The spec was read from the child itself.
        assert_eq!(holder.process.env, vec!["PATH=/img".to_owned()]);
        let pid = holder.pid;
        assert_eq!(
            holder.stop(Duration::from_secs(5)),
            Ok(false),
            "SIGTERM ends it"
        );
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    }

    #[test]
    fn start_hands_the_holder_the_given_descriptors() {
        let _serial = serial_spawns();
        let (_d, berth) = fake_holder("{pid}:{fd}", false);
        let vetted = berth_sys::memfd::sealed(c"image", b"vetted").unwrap();
        let holder = berth.start(&start_args(), vec![(5, vetted)]).unwrap();
        assert_eq!(holder.stop(Duration::from_secs(5)), Ok(false));
        let other = berth_sys::memfd::sealed(c"image", b"other").unwrap();
        let msg = berth
            .start(&start_args(), vec![(5, other)])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("exit status 3"), "{msg}");
    }

    /// Finding 1 of the security review: any process of the user can write into the
    /// holder's stdout. A handle naming another process (here a victim the plugin must never
    /// signal) is refused, and the holder that was spawned is ended instead.
    #[test]
    fn a_handle_naming_another_process_is_refused() {
        let _serial = serial_spawns();
        let mut victim = Command::new("sleep").arg("30").spawn().unwrap();
        let (_d, berth) = fake_holder(&format!("{}:{{fd}}", victim.id()), false);
        let msg = berth
            .start(&start_args(), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&format!("printed the handle {}:", victim.id()))
                && msg.contains("something else wrote into its output"),
            "{msg}"
        );
        assert_eq!(victim.try_wait().unwrap(), None, "the victim lives on");
        victim.kill().unwrap();
        victim.wait().unwrap();
        // Its own pid with an fd that is not its spec memfd is refused too.
        let (_d, berth) = fake_holder("{pid}:0", false);
        let msg = berth
            .start(&start_args(), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a berth container's spec"), "{msg}");
    }

    #[test]
    fn a_failed_start_reports_the_launchers_words() {
        let _serial = serial_spawns();
        let (_d, berth) = fake("echo 'bind source /nope: No such file' >&2; exit 125");
        let msg = berth
            .start(&["start".into()], Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("exit status 125: bind source /nope: No such file"),
            "{msg}"
        );
        let (_d, berth) = fake("echo hello");
        let msg = berth
            .start(&["start".into()], Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("printed 'hello', not a PID:FD handle"),
            "{msg}"
        );
    }

    /// Finding 10: the holder's stderr is the user's to fill; only its tail is read.
    #[test]
    fn only_the_tail_of_a_failed_holders_stderr_is_read() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(
            r#"head -c 1000000 /dev/zero | tr '\0' x >&2
               printf '\033[2Jlast words\n' >&2; exit 125"#,
        );
        let msg = berth
            .start(&["start".into()], Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            msg.len() < STDERR_TAIL_BYTES as usize + 512,
            "{}",
            msg.len()
        );
        assert!(msg.contains("x\u{1b}[2Jlast words"), "{msg}");
        // As every log line of the plugin, it reaches slurmd's log and the user escaped.
        assert!(crate::spank::escape_control(&msg).contains("x\\x1b[2Jlast words"));
    }

    #[test]
    fn a_holder_that_ignores_sigterm_is_killed() {
        let _serial = serial_spawns();
        let (_d, berth) = fake_holder("{pid}:{fd}", true);
        let holder = berth.start(&start_args(), Vec::new()).unwrap();
        assert_eq!(holder.stop(Duration::from_millis(300)), Ok(true));
    }

    #[test]
    fn check_and_fetch_judges_then_names_the_last_line() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(
            r#"[ "$1 $2 $3 $4 $5 $6 $7 $8 $9 ${10} ${11} ${12}" = "policy check --fetch --job 7 --step 0 --uid 1100 --as-user 7:8: --" ] \
                 && [ -z "$HOME" ] || exit 2
               case "${13}" in
                 ok) echo "allow: h/ok (rule: *)";;
                 evil) echo "deny: not approved"; exit 1;;
                 *) echo 'pulling 1/2 MB' >&2; echo 'manifest unknown' >&2; exit 125;;
               esac"#,
        );
        let berth = berth.run_as(Identity::Root);
        let (step, user) = (step_ids(), (7, 8, &[][..]));
        assert_eq!(
            berth.check_and_fetch("ok", &step, user),
            Ok(Verdict::Allow("h/ok".into()))
        );
        assert_eq!(
            berth.check_and_fetch("evil", &step, user),
            Ok(Verdict::Deny("not approved".into()))
        );
        let msg = berth
            .check_and_fetch("h/r:1", &step, user)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("fetch image 'h/r:1'"), "{msg}");
        assert!(msg.contains("(exit status 125: manifest unknown)"), "{msg}");
    }

    fn step_ids() -> StepIds {
        StepIds {
            job: 7,
            step: "0".into(),
            uid: 1100,
        }
    }

    #[test]
    fn an_invalid_site_config_is_a_misconfigured_node() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(
            "echo 'berth: berth configuration /etc/berth/berth.toml:3:1: unknown field' >&2
             exit 78",
        );
        let berth = berth.run_as(Identity::Root);
        for err in [
            berth
                .check_and_fetch("h/r:1", &step_ids(), (7, 8, &[]))
                .unwrap_err(),
            berth.require_container(Partition::OfJob(7)).unwrap_err(),
        ] {
            assert_eq!(
                err,
                Error::NodeMisconfigured {
                    detail: "berth configuration /etc/berth/berth.toml:3:1: unknown field".into()
                }
            );
            assert!(err.to_string().starts_with("node misconfigured: "), "{err}");
        }
    }

    #[test]
    fn a_local_image_is_handed_over_as_descriptor_3() {
        let _serial = serial_spawns();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.sif");
        std::fs::write(&image, b"the vetted image").unwrap();
        // The holder reads its descriptor 3 and prints it in place of a handle.
        let (_d, berth) = fake(
            r#"[ "$2" = "--image-fd=3" ] || exit 2; read -r line <&3; echo "$line" >&2; exit 7"#,
        );
        for _ in 0..2 {
            // Whatever number the file has here (3 if it is the lowest free one).
            let file = File::open(&image).unwrap();
            let msg = berth
                .start(
                    &["start".into(), "--image-fd=3".into()],
                    vec![(IMAGE_FD, OwnedFd::from(file))],
                )
                .unwrap_err()
                .to_string();
            assert!(msg.contains("exit status 7: the vetted image"), "{msg}");
        }
        // Without one, descriptor 3 is not open in the launcher.
        let (_d, berth) = fake(r#"[ -e /proc/self/fd/3 ] && exit 3; exit 7"#);
        let msg = berth
            .start(&["start".into()], Vec::new())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("exit status 7"), "{msg}");
    }

    #[test]
    fn pinned_shape() {
        assert!(is_pinned(&format!("h/r@sha256:{DIGEST}")));
        assert!(!is_pinned(&format!("@sha256:{DIGEST}")));
        assert!(!is_pinned("h/r@sha256:abc"));
        assert!(!is_pinned(&format!("h/r@sha256:{}", DIGEST.to_uppercase())));
        assert!(!is_pinned("h/r:latest"));
    }
}
