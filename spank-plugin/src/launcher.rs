//! Asking the `berth` launcher (the binary named by `berth=` in plugstack.conf) for its
//! verdicts. The plugin decides nothing about images itself: policy, digests and the site
//! configuration are the launcher's, reached through a small command-line contract:
//!
//! | command | exit 0 | exit 1 | anything else |
//! |---|---|---|---|
//! | `berth policy check -- IMAGE` | allowed: stdout is exactly `allow: VETTED (rule: RULE)` | refused: stdout is exactly `deny: REASON` | berth failed |
//! | `berth resolve -- IMAGE` | `host/repo@sha256:HEX` on stdout | - | could not pin (stderr says why) |
//! | `berth policy require-container [--partition P]` (login node) | required, the reason on stdout | not required | berth failed |
//! | `berth policy require-container --job JOBID` (node, root) | required (for the partition slurmctld records, or by the strictest rule where it cannot tell), the reason on stdout | not required | berth failed |
//! | `berth policy check --fetch --as-user UID:GID:GIDS -- IMAGE` (node, root) | allowed and cached, as `policy check`; progress lines on stderr | refused, as `policy check` | could not fetch (stderr says why) |
//! | `berth start [OPTIONS] [--image-fd=3] -- IMAGE` (node, the user) | `PID:FD` on one line, then runs until SIGTERM | - | could not start |
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

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth_sys::memfd::SpecHandle;

use crate::error::Error;

/// How long a launcher call may take. A registry lookup through a slow proxy takes seconds;
/// a minute means something is stuck, and the user is better told so than left waiting.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// How long `berth fetch` may take on the node: a pull of tens of GB over a busy link takes
/// many minutes; beyond this the job is better failed than left waiting for ever.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The PATH of launcher calls in slurmstepd, whose environment is otherwise empty.
const NODE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Output beyond this is dropped: the answers are one line, and a runaway child must not
/// grow srun's memory.
const OUTPUT_MAX_BYTES: usize = 64 * 1024;

/// The launcher binary, the limit its calls run under and the identity they run as.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub path: PathBuf,
    pub timeout: Duration,
    identity: Identity,
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

/// A container `berth start` holds for the step: its handle and a pidfd on the holder, so
/// stopping it signals that process even if its pid were reused.
pub struct Holder {
    pub pid: i32,
    /// The holder's descriptor of the container's OCI spec (`/proc/PID/fd/FD`).
    pub spec_fd: i32,
    pidfd: berth_sys::process::PidFd,
}

/// What a finished call left behind.
#[derive(Debug)]
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
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
pub const IMAGE_FD: i32 = 3;

impl Launcher {
    pub fn new(path: &Path) -> Self {
        Launcher {
            path: path.to_owned(),
            timeout: TIMEOUT,
            identity: Identity::Caller,
        }
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
    ///
    /// A local image path is looked up with the rights of `user` (uid, gid, groups), never
    /// root's, so the answer tells the user nothing about files they cannot see.
    pub fn check_and_fetch(&self, image: &str, user: (u32, u32, &[u32])) -> Result<Verdict, Error> {
        let as_user = as_user_arg(user);
        let args = [
            "policy",
            "check",
            "--fetch",
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
            // The last line is berth's error; the ones before it were progress.
            let detail = out.stderr.trim().lines().last().unwrap_or_default();
            Error::FetchFailed {
                image: image.to_owned(),
                detail: format!("{}: {}", describe(out.status), detail.trim()),
            }
        })
    }

    /// `berth start ARGS...`: starts the step's container and returns once it printed its
    /// handle; the holder keeps running (a child of this process) until [`Holder::stop`].
    /// `image`, a local image file, is handed over as descriptor [`IMAGE_FD`].
    pub fn start(&self, args: &[String], image: Option<&File>) -> Result<Holder, Error> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // A file, not a pipe: nobody reads the holder's stderr while it runs, and a full
        // pipe would block it. It is read only if the start fails.
        let mut stderr = anonymous_file().map_err(|e| self.io_failure(&args, &e))?;
        let mut command = self.command_handing_over(&args, image.map(AsRawFd::as_raw_fd));
        command
            .stdout(Stdio::piped())
            .stderr(stderr.try_clone().map_err(|e| self.io_failure(&args, &e))?);
        let mut child = self.spawn(&mut command)?;
        let mut pipes: [Option<Box<dyn ReadFd>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
            None,
        ];
        let mut output = [Vec::new(), Vec::new()];
        // One line, not EOF: the holder's helpers may keep stdout open.
        let read = pump(
            &mut pipes,
            &mut output,
            Instant::now() + self.timeout,
            false,
            &|out: &[Vec<u8>; 2]| out[0].contains(&b'\n'),
        );
        let handle = String::from_utf8_lossy(&output[0]).into_owned();
        if let (Ok(()), Some(SpecHandle { pid, fd: spec_fd })) =
            (&read, SpecHandle::parse(first_line(&handle)))
        {
            let pidfd = berth_sys::process::PidFd::open(pid).map_err(|e| Error::StartFailed {
                command: self.command_line(&args),
                detail: format!("the holder {pid} ended at once ({e})"),
            })?;
            // `child` is dropped without waiting: the holder runs on, and is reaped by
            // Holder::stop (or by slurmstepd, which reaps every child it has).
            return Ok(Holder {
                pid,
                spec_fd,
                pidfd,
            });
        }
        kill_group(&child);
        let status = child.wait().map_err(|e| self.io_failure(&args, &e))?;
        let mut text = String::new();
        // Best effort: the message is what matters, and the status is known anyway.
        let _ = stderr
            .rewind()
            .and_then(|()| stderr.read_to_string(&mut text));
        let detail = match read {
            Err(Collect::TimedOut) => format!("no handle within {} s", self.timeout.as_secs()),
            // A whole line that is not a handle: berth was killed for it above, so its exit
            // status would only say how fast that was.
            Ok(()) if handle.contains('\n') => {
                format!("it printed '{}', not a PID:FD handle", handle.trim())
            }
            _ => describe(status),
        };
        Err(Error::StartFailed {
            command: self.command_line(&args),
            detail: match text.trim() {
                "" => detail,
                text => format!("{detail}: {text}"),
            },
        })
    }

    /// `berth policy check -- IMAGE`.
    pub fn policy_check(&self, image: &str) -> Result<Verdict, Error> {
        let args = ["policy", "check", "--", image];
        let out = self.run(&args)?;
        verdict(&out).ok_or_else(|| self.failed(&args, &out))
    }

    /// `berth resolve -- IMAGE`: the digest-pinned reference.
    pub fn resolve(&self, image: &str) -> Result<String, Error> {
        let out = self.run(&["resolve", "--", image])?;
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
        Ok(pinned.to_owned())
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
        let mut command = self.command(args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = self.spawn(&mut command)?;
        collect(child, self.timeout, echo).map_err(|e| match e {
            Collect::TimedOut => Error::LauncherTimedOut {
                command: self.command_line(args),
                seconds: self.timeout.as_secs(),
            },
            Collect::Io(e) => self.io_failure(args, &e),
        })
    }

    /// The launcher with `args`, as [`Identity`] says, in a process group of its own (so a
    /// time limit can stop the launcher and its helpers together).
    fn command(&self, args: &[&str]) -> Command {
        self.command_handing_over(args, None)
    }

    /// [`command`](Self::command), with `image` (a descriptor of this process) open in the
    /// launcher as [`IMAGE_FD`].
    fn command_handing_over(&self, args: &[&str], image: Option<RawFd>) -> Command {
        let mut command = Command::new(&self.path);
        command.args(args).stdin(Stdio::null()).process_group(0);
        if self.identity != Identity::Caller {
            command.env_clear().env("PATH", NODE_PATH).current_dir("/");
        }
        let identity = self.identity.clone();
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe system calls (the group list was allocated before the fork). It
        // marks every descriptor above stderr close-on-exec, so the launcher cannot read from
        // or hold open what the calling Slurm process left inheritable (its sockets to
        // slurmctld, slurmstepd's to the tasks); marking rather than closing keeps the pipe
        // std uses to report a failed exec. Then it takes the identity.
        unsafe {
            command.pre_exec(move || {
                // Linux 5.11; on an older kernel the leak it prevents remains, which is no
                // reason to refuse the job.
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                if let Some(fd) = image {
                    hand_over_image(fd)?;
                }
                become_identity(&identity)
            });
        }
        command
    }

    fn spawn(&self, command: &mut Command) -> Result<Child, Error> {
        command.spawn().map_err(|e| Error::LauncherNotRunnable {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })
    }
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Holder({}:{})", self.pid, self.spec_fd)
    }
}

/// In the child before exec: puts `fd` at [`IMAGE_FD`], open across exec (only dup2/fcntl,
/// async-signal-safe). To move into berth_sys's spawn API with the rest of this module's
/// process handling.
fn hand_over_image(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain system calls on descriptor numbers. dup2 onto itself would keep the
    // close-on-exec flag set above, so that case clears it instead.
    let rc = unsafe {
        if fd == IMAGE_FD {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, IMAGE_FD)
        }
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `UID:GID:GID,GID,...` for `berth policy check --as-user`.
fn as_user_arg((uid, gid, groups): (u32, u32, &[u32])) -> String {
    let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
    format!("{uid}:{gid}:{}", groups.join(","))
}

/// In the child before exec: takes `identity`. slurmstepd's real uid is 0, which lets the
/// child take euid 0 back; groups and gid are set while it is root, the uid last.
fn become_identity(identity: &Identity) -> std::io::Result<()> {
    let (uid, gid, groups): (u32, u32, &[u32]) = match identity {
        Identity::Caller => return Ok(()),
        Identity::Root => (0, 0, &[]),
        Identity::User { uid, gid, groups } => (*uid, *gid, groups),
    };
    let ok = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on integers and a valid slice of `groups.len()` gids.
    unsafe {
        ok(libc::setresuid(0, 0, 0))?;
        ok(libc::setgroups(groups.len(), groups.as_ptr()))?;
        ok(libc::setresgid(gid, gid, gid))?;
        ok(libc::setresuid(uid, uid, uid))
    }
}

/// An unnamed file in memory, for output nobody reads until something failed.
fn anonymous_file() -> std::io::Result<File> {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"berth-start-stderr".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `PID:FD` as `berth start` prints it.
/// SIGKILLs the process group `child` leads (it was spawned with process_group(0)); the
/// group cannot be reused before the child is reaped.
fn kill_group(child: &Child) {
    let pgid = libc::pid_t::try_from(child.id()).expect("pids fit pid_t");
    // SAFETY: kill(2) with a negative pid signals the group; no memory is involved.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

impl Holder {
    /// Asks the holder to tear the container down (SIGTERM: it unmounts, ends squashfuse and
    /// removes its runtime directory), waits up to `grace`, then kills it; reaps it either way.
    /// Returns whether it had to be killed.
    pub fn stop(self, grace: Duration) -> Result<bool, Error> {
        use berth_sys::process::Signal;
        let failed = |e: berth_sys::Error| Error::StopFailed {
            pid: self.pid,
            detail: e.to_string(),
        };
        // An error here means it is gone already (ESRCH), which is what we want.
        let _ = self.pidfd.signal(Signal::SIGTERM);
        let ended = self.pidfd.wait_exit(grace).map_err(failed)?;
        if !ended {
            let _ = self.pidfd.signal(Signal::SIGKILL);
            self.pidfd
                .wait_exit(Duration::from_secs(5))
                .map_err(failed)?;
        }
        // Our child, so ours to reap; slurmstepd may have reaped it already (ECHILD).
        // SAFETY: waitpid on one pid with WNOHANG writes only the status we pass.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::WNOHANG) };
        Ok(!ended)
    }
}

enum Collect {
    TimedOut,
    Io(std::io::Error),
}

/// Reads stdout and stderr until both close, then reaps the child. If `timeout` passes
/// first, kills the child's whole process group (SIGKILL; a launcher's own helpers could
/// otherwise keep running and hold the pipes) and reaps it, so no zombie is left in srun or
/// slurmstepd.
fn collect(mut child: Child, timeout: Duration, echo: bool) -> Result<Outcome, Collect> {
    let mut pipes: [Option<Box<dyn ReadFd>>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
    ];
    let mut output = [Vec::new(), Vec::new()];
    let pumped = pump(
        &mut pipes,
        &mut output,
        Instant::now() + timeout,
        echo,
        &|_: &[Vec<u8>; 2]| false,
    );
    if pumped.is_err() {
        kill_group(&child);
    }
    let status = child.wait().map_err(Collect::Io)?;
    pumped?;
    let [stdout, stderr] = output.map(|o| String::from_utf8_lossy(&o).into_owned());
    Ok(Outcome {
        status,
        stdout,
        stderr,
    })
}

/// Moves what the pipes deliver into `output` until every pipe is closed, `done` holds for
/// what was read, or `deadline`. With `echo`, what the second pipe (stderr) delivers is also
/// written to this process's stderr as it comes.
fn pump(
    pipes: &mut [Option<Box<dyn ReadFd>>; 2],
    output: &mut [Vec<u8>; 2],
    deadline: Instant,
    echo: bool,
    done: &dyn Fn(&[Vec<u8>; 2]) -> bool,
) -> Result<(), Collect> {
    loop {
        if done(output) {
            return Ok(());
        }
        let open: Vec<usize> = (0..2).filter(|&i| pipes[i].is_some()).collect();
        if open.is_empty() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Collect::TimedOut);
        }
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|&i| libc::pollfd {
                fd: pipes[i].as_ref().expect("open").as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: fds is a valid array of fds.len() pollfd structures.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Collect::Io(e));
            }
            continue;
        }
        for (fd, &i) in fds.iter().zip(&open) {
            if fd.revents == 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            match pipes[i].as_mut().expect("open").read(&mut chunk) {
                Ok(0) => pipes[i] = None,
                Ok(n) => {
                    if echo && i == 1 {
                        // Progress for the user; losing a line must not fail the fetch.
                        let _ = std::io::stderr().write_all(&chunk[..n]);
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
trait ReadFd: Read + AsRawFd {}
impl<T: Read + AsRawFd> ReadFd for T {}

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
fn is_pinned(reference: &str) -> bool {
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
        let _ = root.check_and_fetch("--help", (1100, 1100, &[1100, 27]));
        let _ = berth.resolve("--config=/tmp/x");
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            [
                "policy check -- -h",
                "policy check --fetch --as-user 1100:1100:1100,27 -- --help",
                "resolve -- --config=/tmp/x",
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
                 *) echo "registry localhost:5000 unreachable: connection refused" >&2; exit 1;;
               esac"#
        ));
        assert_eq!(
            berth.resolve("good"),
            Ok(format!("localhost:5000/test/busybox@sha256:{DIGEST}"))
        );
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
        let fd = file.as_raw_fd();
        // SAFETY: fd is open; clearing FD_CLOEXEC only changes what exec keeps.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
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

    #[test]
    fn start_returns_at_the_handle_line_and_stop_ends_the_holder() {
        let _serial = serial_spawns();
        // Like berth start: the handle, then running on with stdout still open.
        let (_d, berth) = fake(r#"[ "$1 $2" = "start --" ] || exit 2; echo "$$:0"; exec sleep 30"#);
        let started = Instant::now();
        let holder = berth
            .start(&["start".into(), "--".into(), "img".into()], None)
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(Path::new(&format!("/proc/{}", holder.pid)).exists());
        let pid = holder.pid;
        assert_eq!(
            holder.stop(Duration::from_secs(5)),
            Ok(false),
            "SIGTERM ends it"
        );
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    }

    #[test]
    fn a_failed_start_reports_the_launchers_words() {
        let _serial = serial_spawns();
        let (_d, berth) = fake("echo 'bind source /nope: No such file' >&2; exit 125");
        let msg = berth
            .start(&["start".into()], None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("exit status 125: bind source /nope: No such file"),
            "{msg}"
        );
        let (_d, berth) = fake("echo hello");
        let msg = berth
            .start(&["start".into()], None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("printed 'hello', not a PID:FD handle"),
            "{msg}"
        );
    }

    #[test]
    fn a_holder_that_ignores_sigterm_is_killed() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(r#"trap '' TERM; echo "$$:0"; while :; do sleep 0.1; done"#);
        let holder = berth.start(&["start".into()], None).unwrap();
        assert_eq!(holder.stop(Duration::from_millis(300)), Ok(true));
    }

    #[test]
    fn check_and_fetch_judges_then_names_the_last_line() {
        let _serial = serial_spawns();
        let (_d, berth) = fake(
            r#"[ "$1 $2 $3 $4 $5 $6" = "policy check --fetch --as-user 7:8: --" ] && [ -z "$HOME" ] || exit 2
               case "$7" in
                 ok) echo "allow: h/ok (rule: *)";;
                 evil) echo "deny: not approved"; exit 1;;
                 *) echo 'pulling 1/2 MB' >&2; echo 'manifest unknown' >&2; exit 125;;
               esac"#,
        );
        let berth = berth.run_as(Identity::Root);
        let user = (7, 8, &[][..]);
        assert_eq!(
            berth.check_and_fetch("ok", user),
            Ok(Verdict::Allow("h/ok".into()))
        );
        assert_eq!(
            berth.check_and_fetch("evil", user),
            Ok(Verdict::Deny("not approved".into()))
        );
        let msg = berth
            .check_and_fetch("h/r:1", user)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("fetch image 'h/r:1'"), "{msg}");
        assert!(msg.contains("(exit status 125: manifest unknown)"), "{msg}");
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
                .start(&["start".into(), "--image-fd=3".into()], Some(&file))
                .unwrap_err()
                .to_string();
            assert!(msg.contains("exit status 7: the vetted image"), "{msg}");
        }
        // Without one, descriptor 3 is not open in the launcher.
        let (_d, berth) = fake(r#"[ -e /proc/self/fd/3 ] && exit 3; exit 7"#);
        let msg = berth
            .start(&["start".into()], None)
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
