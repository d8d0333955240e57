//! Starting, supervising and reaping processes: the container command, the FUSE helper.
//!
//! berth is single-threaded, so after fork(2) the child may allocate; still, everything the
//! child needs is prepared before the fork, and the child reports a failure before exec
//! through a close-on-exec pipe (stage + errno) instead of printing, so the parent can turn
//! it into a clear message and the right exit status (127, 126).

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
pub use nix::sys::signal::Signal;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use crate::{caps, namespaces, seccomp, Error, Result};

/// Signals berth passes on to the container command.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Signals that ask a `berth start` holder to tear its container down.
const STOP: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// How a process is started.
#[derive(Debug, Clone, Default)]
pub struct CommandSpec {
    /// argv; `argv[0]` is searched in `search_path` unless it contains a `/`.
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub search_path: Vec<PathBuf>,
    /// What the program is confined by once started.
    pub confinement: Confinement,
    /// Descriptors besides 0-2 that the program inherits (a FUSE connection, a PMI fd).
    pub keep_fds: Vec<RawFd>,
    /// Point the child's stdout at berth's stderr (helpers must not hold `berth start`'s
    /// stdout, or whoever reads the handle would wait for them too).
    pub stdout_to_stderr: bool,
}

/// What a process in a container is confined by, whether it was started there (`berth
/// exec`, [`spawn`]) or joined it (`berth exec --join`, the SPANK plugin's tasks,
/// [`crate::namespaces::join`]): both apply it through [`confine`], in one order. Built
/// from the container's OCI spec by [`crate::holder::ContainerProcess`] and the launcher.
/// no_new_privs is not a field: berth sets it for every process it starts or joins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    /// Working directory, resolved inside the current root; `None` keeps the current one.
    pub cwd: Option<PathBuf>,
    /// The capabilities kept, all in the container's user namespace (see [`caps::Kept`]).
    pub caps: caps::Kept,
    /// Enter a cgroup namespace of its own (the spec lists a `cgroup` namespace), so the
    /// process sees its cgroup as `/` (see [`crate::cgroup`]).
    pub cgroup_ns: bool,
    /// The spec's `linux.seccomp`, compiled; `None` only for berth's own helpers (the FUSE
    /// daemon), which run outside any container.
    pub seccomp: Option<seccomp::Filter>,
}

/// Applies `c` to the calling process, in youki's order: the working directory inside the
/// root, no_new_privs, the cgroup namespace (while the capabilities it needs are still
/// held), capabilities, then seccomp last, so nothing berth still does is filtered and
/// everything the command does is. The error says which stage failed.
pub fn confine(c: &Confinement) -> std::result::Result<(), (Stage, Error)> {
    if let Some(cwd) = &c.cwd {
        namespaces::enter_workdir(cwd).map_err(|e| (Stage::Workdir, e))?;
    }
    caps::set_no_new_privs().map_err(|e| (Stage::Setup, e))?;
    if c.cgroup_ns {
        namespaces::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| (Stage::Setup, e))?;
    }
    c.caps.apply().map_err(|e| (Stage::Setup, e))?;
    if let Some(filter) = &c.seccomp {
        filter.install().map_err(|e| (Stage::Setup, e))?;
    }
    Ok(())
}

/// Where a child failed before its program started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Setup,
    Workdir,
    Exec,
}

/// A child that could not start its program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnFailure {
    pub stage: Stage,
    pub errno: i32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Forks and starts `spec`; `Ok(Err(_))` when the child got as far as running but could
/// not start the program (command not found, workdir missing, ...), already reaped.
pub fn spawn(spec: &CommandSpec) -> Result<std::result::Result<i32, SpawnFailure>> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::os("pipe2"))?;
    let envp: Vec<&CStr> = spec.env.iter().map(|c| c.as_c_str()).collect();
    let candidates = candidates(spec);
    let parent = nix::unistd::getpid();
    // SAFETY: berth is single-threaded (it must be, to have unshared a user namespace), so
    // the child is a full copy with no lock held by a vanished thread.
    match unsafe { nix::unistd::fork() }.map_err(Error::os("fork"))? {
        ForkResult::Child => {
            drop(read);
            let failure = child(spec, &candidates, &envp, Start::Forked { parent });
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&(failure.stage as u32).to_ne_bytes());
            msg[4..].copy_from_slice(&failure.errno.to_ne_bytes());
            let _ = nix::unistd::write(&write, &msg);
            // SAFETY: _exit skips atexit handlers and buffered output of the parent's copy.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(write);
            let mut msg = [0u8; 8];
            let n = read_full(read.as_fd(), &mut msg)?;
            if n == 0 {
                return Ok(Ok(child.as_raw()));
            }
            reap(child.as_raw())?;
            let stage = match u32::from_ne_bytes(msg[..4].try_into().expect("4 bytes")) {
                1 => Stage::Workdir,
                2 => Stage::Exec,
                _ => Stage::Setup,
            };
            let errno = i32::from_ne_bytes(msg[4..].try_into().expect("4 bytes"));
            Ok(Err(SpawnFailure { stage, errno }))
        }
    }
}

/// Starts a FUSE daemon serving `fuse` (kept open across its exec) and returns its pid.
pub fn spawn_helper(argv: &[CString], fuse: OwnedFd) -> Result<i32> {
    let spec = CommandSpec {
        argv: argv.to_vec(),
        env: Vec::new(),
        search_path: Vec::new(),
        confinement: Confinement::default(),
        keep_fds: vec![fuse.as_raw_fd()],
        stdout_to_stderr: true,
    };
    match spawn(&spec)? {
        Ok(pid) => Ok(pid),
        Err(f) => Err(Error::OsPath {
            call: "exec",
            path: PathBuf::from(OsStr::from_bytes(argv[0].as_bytes())),
            source: std::io::Error::from_raw_os_error(f.errno),
        }),
    }
    // `fuse` is dropped here: only the daemon holds the connection now, so if it dies the
    // kernel aborts the mount instead of hanging its users.
}

/// The `/dev/fd/N` mountpoint argument by which libfuse (3.3+) serves an already mounted
/// connection instead of mounting one itself.
pub fn fuse_fd_arg(fuse: BorrowedFd<'_>) -> CString {
    CString::new(format!("/dev/fd/{}", fuse.as_raw_fd())).expect("no NUL in a number")
}

fn candidates(spec: &CommandSpec) -> Vec<CString> {
    let Some(arg0) = spec.argv.first() else {
        return Vec::new();
    };
    if arg0.as_bytes().contains(&b'/') {
        return vec![arg0.clone()];
    }
    spec.search_path
        .iter()
        .map(|dir| {
            let mut p = dir.as_os_str().as_bytes().to_vec();
            p.push(b'/');
            p.extend_from_slice(arg0.as_bytes());
            CString::new(p).expect("no NUL: built from CStrings and a path")
        })
        .collect()
}

/// Replaces this process, already in the container and confined by
/// [`crate::namespaces::join`], with `spec` (`berth exec --join`: berth has nothing left to
/// do once the command runs); returns only on failure. `spec.confinement` is not applied a
/// second time: join dropped the capabilities a second cgroup namespace would need, and the
/// filter is in place.
pub fn exec(spec: &CommandSpec) -> SpawnFailure {
    let envp: Vec<&CStr> = spec.env.iter().map(|c| c.as_c_str()).collect();
    child(spec, &candidates(spec), &envp, Start::Joined)
}

/// How a [`child`] came to be.
enum Start {
    /// Forked by [`spawn`], to die with `parent`; confined here.
    Forked { parent: Pid },
    /// Confined when it joined the container ([`exec`]).
    Joined,
}

/// The child side of [`spawn`] and of [`exec`]; returns only on failure.
fn child(spec: &CommandSpec, candidates: &[CString], envp: &[&CStr], start: Start) -> SpawnFailure {
    let setup = |e: Errno| SpawnFailure {
        stage: Stage::Setup,
        errno: e as i32,
    };
    let result = (|| -> std::result::Result<(), SpawnFailure> {
        // Undo what berth set up for itself: blocked signals, SIGPIPE ignored by Rust's runtime.
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
            .map_err(setup)?;
        // SAFETY: restoring the default disposition installs no handler.
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) }
            .map_err(setup)?;
        // If berth dies (even by SIGKILL), its children go too, so no container process or
        // FUSE daemon outlives the process responsible for cleaning up.
        if let Start::Forked { parent } = start {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(setup)?;
            if nix::unistd::getppid() != parent {
                return Err(setup(Errno::ESRCH));
            }
            confine(&spec.confinement).map_err(|(stage, e)| SpawnFailure {
                stage,
                errno: e.raw_os_error().unwrap_or(match stage {
                    Stage::Workdir => libc::ENOENT,
                    _ => libc::EPERM,
                }),
            })?;
        }
        if spec.stdout_to_stderr {
            nix::unistd::dup2(2, 1).map_err(setup)?;
        }
        // Every fd above 2 closes at exec (the error pipe included), except those asked for.
        // SAFETY: close_range only changes fd flags of this process.
        if unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) } != 0
        {
            return Err(setup(Errno::last()));
        }
        for &fd in &spec.keep_fds {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(setup)?;
        }
        Ok(())
    })();
    if let Err(f) = result {
        return f;
    }
    let argv: Vec<&CStr> = spec.argv.iter().map(|c| c.as_c_str()).collect();
    // Like execvp: go on past missing entries, remember a permission problem.
    let mut errno = Errno::ENOENT;
    for path in candidates {
        match nix::unistd::execve(path, &argv, envp) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => {}
            Err(Errno::EACCES) => errno = Errno::EACCES,
            Err(e) => {
                errno = e;
                break;
            }
        }
    }
    SpawnFailure {
        stage: Stage::Exec,
        errno: errno as i32,
    }
}

fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Error::os("read")(e)),
        }
    }
    Ok(n)
}

/// Waits for `pid` to end and says how.
pub fn reap(pid: i32) -> Result<Exit> {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(status) => {
                if let Some(exit) = exit_of(status) {
                    return Ok(exit);
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Error::os("waitpid")(e)),
        }
    }
}

/// SIGKILLs `pid` and reaps it.
/// Runs `f` in a child process (which exits with its return value) and returns the
/// child's pid. The child dies with this process (PR_SET_PDEATHSIG) and has its signals
/// unblocked. For work that must stay in this process's namespaces and privileges while
/// this process moves on (berth's size watcher keeps the capabilities of the container's
/// user namespace, whose mounts it may change, when berth's command gives them up). Call only
/// while single-threaded: the child runs Rust code after fork.
pub fn fork_child(f: impl FnOnce() -> i32) -> Result<i32> {
    let parent = nix::unistd::getpid();
    // SAFETY: the caller is single-threaded, so the child's copy of the address space is
    // consistent (no lock held by another thread) and it may run ordinary code.
    match unsafe { nix::unistd::fork() }.map_err(Error::os("fork"))? {
        nix::unistd::ForkResult::Parent { child } => Ok(child.as_raw()),
        nix::unistd::ForkResult::Child => {
            let ready = nix::sys::signal::sigprocmask(
                SigmaskHow::SIG_SETMASK,
                Some(&SigSet::empty()),
                None,
            )
            .and_then(|()| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL))
            .is_ok()
                && nix::unistd::getppid() == parent;
            let code = if ready { f() } else { 125 };
            // SAFETY: _exit ends the child at once, running no parent-owned destructors.
            unsafe { libc::_exit(code) }
        }
    }
}

pub fn kill_and_reap(pid: i32) -> Result<Exit> {
    // ESRCH cannot happen for an unreaped child (a zombie still has its pid); any error is
    // reported by the reap that follows.
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    reap(pid)
}

fn exit_of(status: WaitStatus) -> Option<Exit> {
    match status {
        WaitStatus::Exited(_, c) => Some(Exit::Code(c)),
        WaitStatus::Signaled(_, s, _) => Some(Exit::Signal(s as i32)),
        _ => None,
    }
}

/// Signals berth handles synchronously: blocked, and read from a signalfd.
pub struct Signals {
    fd: SignalFd,
}

/// Blocks the forwarded signals and SIGCHLD before any child exists, so none is lost or
/// kills berth between fork and supervision. Children unblock them before exec.
pub fn block_signals() -> Result<Signals> {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set.thread_block().map_err(Error::os("sigprocmask"))?;
    let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC).map_err(Error::os("signalfd"))?;
    Ok(Signals { fd })
}

impl Signals {
    fn next(&self) -> Result<libc::signalfd_siginfo> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => return Ok(info),
                Ok(None) | Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::os("read(signalfd)")(e)),
            }
        }
    }

    /// Passes forwarded signals to `child` until it ends, and returns how it ended.
    /// Signals the kernel sent to the whole foreground process group (Ctrl-C on a
    /// terminal) reached the child already and are not sent twice.
    pub fn supervise(&self, child: i32) -> Result<Exit> {
        loop {
            if let Some(exit) = try_reap(child)? {
                return Ok(exit);
            }
            let info = self.next()?;
            let sig = info.ssi_signo as i32;
            if sig != libc::SIGCHLD && info.ssi_code != libc::SI_KERNEL {
                // ESRCH: the child just ended; the next loop reaps it.
                let _ = nix::sys::signal::kill(Pid::from_raw(child), Signal::try_from(sig).ok());
            }
        }
    }

    /// Waits for a stop signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT) or for `helper` to die;
    /// returns the helper's end in the latter case.
    pub fn wait_for_stop(&self, helper: i32) -> Result<Option<Exit>> {
        loop {
            if let Some(exit) = try_reap(helper)? {
                return Ok(Some(exit));
            }
            let sig = self.next()?.ssi_signo as i32;
            if STOP.iter().any(|s| *s as i32 == sig) {
                return Ok(None);
            }
        }
    }
}

fn try_reap(pid: i32) -> Result<Option<Exit>> {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(status) => Ok(exit_of(status)),
        Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(Error::os("waitpid")(e)),
    }
}

/// Points stdout at /dev/null, so whoever reads berth's stdout (a handle printed by
/// `berth start`) sees end-of-file while berth lives on.
pub fn stdout_to_null() -> Result<()> {
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(Error::os("open /dev/null"))?;
    let r = nix::unistd::dup2(null, 1)
        .map(drop)
        .map_err(Error::os("dup2"));
    let _ = nix::unistd::close(null);
    r
}

/// A program started from a multi-threaded caller (srun, sbatch, slurmstepd: the SPANK
/// plugin) through `std::process::Command`, with what such a caller must do between fork and
/// exec done here: every inherited descriptor above stderr marked close-on-exec (the caller's
/// sockets to slurmctld, slurmstepd's to the tasks), chosen descriptors placed at chosen
/// numbers ([`Spawn::with_fd`]), and optionally another identity ([`Spawn::credentials`]).
/// Everything the child does there is async-signal-safe and prepared before the fork.
pub struct Spawn {
    command: std::process::Command,
    credentials: Option<crate::identity::Credentials>,
    fds: Vec<(RawFd, OwnedFd)>,
}

/// A program [`Spawn`] started: the std child (its pipes, its reaping) and a pidfd opened on
/// it right after the spawn. The child is ours and unreaped, so its pid cannot have been
/// reused in between: the pidfd is that process's.
pub struct Spawned {
    pub child: std::process::Child,
    pub pidfd: PidFd,
}

impl Spawn {
    /// `command` as configured by the caller (arguments, environment, stdio, directory,
    /// process group).
    pub fn new(command: std::process::Command) -> Spawn {
        Spawn {
            command,
            credentials: None,
            fds: Vec::new(),
        }
    }

    /// Runs the program as `credentials` (the caller needs real uid 0 or euid 0).
    pub fn credentials(mut self, credentials: crate::identity::Credentials) -> Spawn {
        self.credentials = Some(credentials);
        self
    }

    /// Gives the program `fd` as its descriptor number `child_fd` (3 or above), inherited
    /// across exec; the caller's copy is closed once the program started. (Should std's own
    /// exec-error pipe hold that number in the child, it is replaced: a failed exec then
    /// shows as exit status 1 instead of a spawn error.)
    pub fn with_fd(mut self, child_fd: RawFd, fd: OwnedFd) -> Spawn {
        self.fds.push((child_fd, fd));
        self
    }

    pub fn spawn(mut self) -> std::io::Result<Spawned> {
        use std::os::unix::process::CommandExt;
        if let Some(&(bad, _)) = self.fds.iter().find(|(n, _)| *n < 3) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("descriptor {bad} is stdin, stdout or stderr, set those on the Command"),
            ));
        }
        let credentials = self.credentials.clone();
        let moves: Vec<(RawFd, RawFd)> = self
            .fds
            .iter()
            .map(|(target, fd)| (*target, fd.as_raw_fd()))
            .collect();
        // Copies land above every target first, so no move overwrites a later source.
        let above = moves.iter().map(|(t, _)| *t).max().unwrap_or(2) + 1;
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe system calls on integers and memory allocated before the fork.
        // Marking (not closing) keeps the pipe std uses to report a failed exec.
        unsafe {
            self.command.pre_exec(move || {
                // Linux 5.11; on an older kernel the leak it prevents remains, which is no
                // reason to refuse the job.
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                let mut copies = [0 as RawFd; 16];
                if moves.len() > copies.len() {
                    return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
                }
                for (copy, (_, source)) in copies.iter_mut().zip(&moves) {
                    *copy = libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, above);
                    if *copy < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (copy, (target, _)) in copies.iter().zip(&moves) {
                    // dup2 leaves the new descriptor inheritable.
                    if libc::dup2(*copy, *target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                match &credentials {
                    Some(c) => c.take_in_child(),
                    None => Ok(()),
                }
            });
        }
        let child = self.command.spawn()?;
        let pid = i32::try_from(child.id()).expect("pids fit pid_t");
        let pidfd = PidFd::open(pid).map_err(|e| {
            std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::ESRCH))
        });
        match pidfd {
            Ok(pidfd) => Ok(Spawned { child, pidfd }),
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit pid_t")
    }

    /// SIGKILLs the process group the child leads (the caller set `process_group(0)`), so
    /// its helpers go too; the group id cannot be reused before the child is reaped.
    pub fn kill_group(&self) {
        // ESRCH: the whole group is gone already.
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
    }
}

/// Waits up to `timeout` until one of `fds` is readable or closed; says which are. EINTR
/// reads as "none yet", so the caller's loop re-checks its own deadline.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: std::time::Duration) -> Result<Vec<bool>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut polled: Vec<PollFd> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let ms = PollTimeout::try_from(timeout.max(std::time::Duration::from_millis(1)))
        .unwrap_or(PollTimeout::MAX);
    match poll(&mut polled, ms) {
        Ok(_) => Ok(polled
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect()),
        Err(Errno::EINTR) => Ok(vec![false; fds.len()]),
        Err(e) => Err(Error::os("poll")(e)),
    }
}

/// Makes this process non-dumpable: no other process of its user may ptrace it or open its
/// `/proc/PID/{fd,ns,mem,...}` any more; root still may. A `berth start` holder the SPANK
/// plugin starts does this first, because root later takes the container's namespaces and
/// spec from it.
pub fn set_non_dumpable() -> Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(Error::os("prctl(PR_SET_DUMPABLE, 0)"))
}

/// While alive, makes a non-dumpable process dumpable again (see [`dumpable_for_id_maps`]).
pub(crate) struct DumpableAgain(bool);

impl Drop for DumpableAgain {
    fn drop(&mut self) {
        if self.0 {
            // Cannot fail for 0; if it did, the process would stay dumpable, which is how
            // every user's own container runs anyway.
            let _ = nix::sys::prctl::set_dumpable(false);
        }
    }
}

/// A process writes its own uid_map/gid_map/setgroups through `/proc/self`, whose files a
/// non-dumpable process's user cannot open (they belong to root then). As runc's nsexec
/// does, such a process is dumpable just for those writes.
pub(crate) fn dumpable_for_id_maps() -> Result<DumpableAgain> {
    let was_dumpable =
        nix::sys::prctl::get_dumpable().map_err(Error::os("prctl(PR_GET_DUMPABLE)"))?;
    if !was_dumpable {
        nix::sys::prctl::set_dumpable(true).map_err(Error::os("prctl(PR_SET_DUMPABLE, 1)"))?;
    }
    Ok(DumpableAgain(!was_dumpable))
}

/// A process referred to by a pidfd: signals and waits reach that process even if its pid
/// is reused meanwhile.
pub struct PidFd {
    fd: OwnedFd,
}

impl PidFd {
    pub fn open(pid: i32) -> Result<PidFd> {
        // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if r < 0 {
            return Err(Error::Os {
                call: "pidfd_open",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        Ok(PidFd {
            fd: unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as RawFd) },
        })
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        // SAFETY: pidfd_send_signal with a null siginfo reads no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(Error::Os {
                call: "pidfd_send_signal",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Whether the process has not ended yet.
    pub fn is_alive(&self) -> Result<bool> {
        Ok(!self.wait_exit(std::time::Duration::ZERO)?)
    }

    /// Waits up to `timeout` for the process to end; `true` if it did.
    pub fn wait_exit(&self, timeout: std::time::Duration) -> Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        loop {
            match poll(&mut fds, ms) {
                Ok(n) => return Ok(n > 0),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::os("poll(pidfd)")(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn sh(script: &str) -> CommandSpec {
        CommandSpec {
            argv: vec![cs("sh"), cs("-c"), cs(script)],
            search_path: vec!["/nonexistent".into(), "/bin".into()],
            confinement: Confinement {
                cwd: None,
                caps: caps::Kept::All,
                cgroup_ns: false,
                seccomp: None,
            },
            ..Default::default()
        }
    }

    #[test]
    fn exit_codes_come_back() {
        let pid = spawn(&sh("exit 42")).unwrap().unwrap();
        assert_eq!(reap(pid).unwrap(), Exit::Code(42));
        let pid = spawn(&sh("kill -9 $$")).unwrap().unwrap();
        assert_eq!(reap(pid).unwrap().code(), 137);
    }

    #[test]
    fn missing_and_unexecutable_commands_are_reported() {
        let mut spec = sh("");
        spec.argv = vec![cs("no-such-command-anywhere")];
        assert_eq!(
            spawn(&spec).unwrap().unwrap_err(),
            SpawnFailure {
                stage: Stage::Exec,
                errno: libc::ENOENT
            }
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "not a program").unwrap();
        spec.argv = vec![cs(dir.path().join("plain").to_str().unwrap())];
        assert_eq!(spawn(&spec).unwrap().unwrap_err().errno, libc::EACCES);
    }

    #[test]
    fn only_kept_fds_reach_the_program() {
        let leak = std::fs::File::open("/dev/null").unwrap();
        let kept = std::fs::File::open("/dev/null").unwrap();
        // O_CLOEXEC is off on `leak` to show close-on-exec comes from berth, not from std.
        nix::fcntl::fcntl(
            leak.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let (l, k) = (leak.as_raw_fd(), kept.as_raw_fd());
        let mut spec = sh(&format!(
            "[ ! -e /proc/self/fd/{l} ] && [ -e /proc/self/fd/{k} ]"
        ));
        spec.keep_fds = vec![k];
        let pid = spawn(&spec).unwrap().unwrap();
        assert_eq!(reap(pid).unwrap(), Exit::Code(0));
    }

    #[test]
    fn no_new_privs_is_set_and_workdir_applied() {
        let mut spec = sh("grep -q '^NoNewPrivs:.*1' /proc/self/status && [ \"$(pwd)\" = /tmp ]");
        spec.confinement.cwd = Some("/tmp".into());
        let pid = spawn(&spec).unwrap().unwrap();
        assert_eq!(reap(pid).unwrap(), Exit::Code(0));
        spec.confinement.cwd = Some("/no/such/dir".into());
        assert_eq!(spawn(&spec).unwrap().unwrap_err().stage, Stage::Workdir);
    }

    #[test]
    fn the_confinement_gives_a_cgroup_namespace_and_seccomp() {
        // Needs CAP_SYS_ADMIN for the cgroup namespace (root, as CI runs; a container's
        // processes hold it in its user namespace).
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the cgroup namespace needs root here");
            return;
        }
        let mut spec = sh("grep -q '^Seccomp:.2' /proc/self/status && \
             ! grep -qv ':/$' /proc/self/cgroup && \
             [ \"$(readlink /proc/self/ns/cgroup)\" != \"$0\" ]");
        let own = std::fs::read_link("/proc/self/ns/cgroup").unwrap();
        spec.argv
            .push(CString::new(own.as_os_str().as_encoded_bytes()).unwrap());
        spec.confinement.cgroup_ns = true;
        let profile =
            crate::seccomp::Profile::for_container(crate::seccomp::Privilege::default(), &[]);
        spec.confinement.seccomp = Some(crate::seccomp::Filter::compile(&profile).unwrap());
        let pid = spawn(&spec).unwrap().unwrap();
        assert_eq!(reap(pid).unwrap(), Exit::Code(0));
    }

    #[test]
    fn spawn_places_given_fds_and_closes_the_rest() {
        let leak = std::fs::File::open("/dev/null").unwrap();
        nix::fcntl::fcntl(
            leak.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let given = crate::memfd::sealed(c"given", b"vetted").unwrap();
        let given_too = crate::memfd::sealed(c"given-too", b"second").unwrap();
        // Swapped: each lands on the other's number, so a naive dup2 would lose one.
        let (a, b) = (given.as_raw_fd(), given_too.as_raw_fd());
        let mut command = std::process::Command::new("/bin/sh");
        command.arg("-c").arg(format!(
            "[ ! -e /proc/self/fd/{} ] && [ \"$(cat /proc/self/fd/{a} /proc/self/fd/{b})\" = secondvetted ]",
            leak.as_raw_fd()
        ));
        let spawned = Spawn::new(command)
            .with_fd(a, given_too)
            .with_fd(b, given)
            .spawn()
            .unwrap();
        assert!(spawned.pidfd.is_alive().is_ok());
        let mut child = spawned.child;
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}");
        let mut command = std::process::Command::new("/bin/true");
        command.stdin(std::process::Stdio::null());
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        assert!(Spawn::new(command).with_fd(1, null).spawn().is_err());
    }

    #[test]
    fn kill_group_ends_the_helpers_too() {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .process_group(0);
        let mut spawned = Spawn::new(command).spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(spawned.child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let helper: i32 = line.trim().parse().unwrap();
        spawned.kill_group();
        spawned.child.wait().unwrap();
        // The helper is sh's child, reaped by init once killed; its pid leaves /proc.
        let gone = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            !std::path::Path::new(&format!("/proc/{helper}")).exists()
                || std::fs::read_to_string(format!("/proc/{helper}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        });
        assert!(gone, "helper {helper} survived");
    }
}
