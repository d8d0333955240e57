//! Running containers: `berth exec` (run one command), `berth start` (hold a container for
//! others to join) and joining one.
//!
//! - `spec`: the OCI runtime spec, built purely from image, options and host facts.
//! - `assemble`: realising a spec through `berth_sys::Syscall` (namespaces, image, root).
//! - `handle`: what `berth start` prints and joiners read.
//!
//! Process model of `berth exec`: berth (single-threaded) blocks the signals it forwards,
//! assembles the container in its own namespaces, pivots into it, forks the command, passes
//! signals on, and when the command ends kills and reaps the squashfuse daemon and exits with
//! the command's status. berth being the last process in the namespaces, they and every
//! mount go with it. Children die with berth even if it is SIGKILLed (PR_SET_PDEATHSIG).

pub mod assemble;
pub mod handle;
pub mod save;
pub mod slurm;
pub mod spec;
pub mod writable;

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use berth_sys::holder::ContainerProcess;
use berth_sys::process::{self, CommandSpec, SpawnFailure, Stage};
use berth_sys::LinuxSyscall;
use oci_spec::runtime::Spec;

use crate::config::RuntimeConfig;
use crate::{Error, Result};
use writable::Changes;

/// The exit status berth gives an error: 127 and 126 for a command that is missing or not
/// executable (the shell's convention), 125 for berth's own failures.
pub fn exit_code(e: &Error) -> i32 {
    match e {
        Error::CommandNotFound { .. } => 127,
        Error::NotExecutable { .. } => 126,
        _ => 125,
    }
}

/// Runs the spec's command in a new container whose writes go to `changes` (if writable);
/// returns its exit status.
pub fn exec(spec: &Spec, runtime: &RuntimeConfig, changes: Option<Changes>) -> Result<i32> {
    let command = command_spec(spec)?;
    let running = Running::start(spec, runtime, changes)?;
    let child = process::spawn(&command).map_err(sys_err("starting the command"))?;
    let result = match child {
        Ok(pid) => running
            .signals
            .supervise(pid)
            .map(|exit| exit.code())
            .map_err(sys_err("waiting for the command")),
        Err(failure) => Err(spawn_error(failure, &command)),
    };
    running.stop()?;
    result
}

/// Starts a container that stays until SIGTERM/SIGINT/SIGHUP/SIGQUIT: prints its handle
/// (`PID:FD`, see [`handle`]) on stdout, then detaches stdout so a reader sees EOF.
pub fn start(spec: &Spec, runtime: &RuntimeConfig, changes: Option<Changes>) -> Result<i32> {
    let running = Running::start(spec, runtime, changes)?;
    let published = handle::publish(spec)?;
    let helper_end = running
        .signals
        .wait_for_stop(running.helper)
        .map_err(sys_err("waiting for a stop signal"));
    drop(published);
    match helper_end? {
        // The helper is reaped already; only the bundle is left.
        Some(exit) => {
            running.remove_bundle()?;
            Err(Error::HelperDied(exit.to_string()))
        }
        None => {
            running.stop()?;
            Ok(0)
        }
    }
}

/// Joins the container of `handle` and replaces this process with `argv` there (`berth exec
/// --join`). Returns only on failure.
pub fn join_exec(handle: &str, argv: Vec<String>, env: &[(String, String)]) -> Result<i32> {
    let held = handle::open(&handle::parse(handle)?)?;
    let mut spec: Spec = serde_json::from_slice(&held.spec).map_err(Error::Spec)?;
    if let Some(p) = spec.process_mut() {
        let vars = spec::with_vars(p.env().as_deref().unwrap_or_default(), env);
        p.set_env(Some(vars));
        p.set_args(Some(argv));
    }
    let command = command_spec(&spec)?;
    // join applies the Confinement (exec does not again): the working directory is then
    // resolved inside the container, and nothing runs there with more than it keeps.
    berth_sys::join(&held.namespaces, &command.confinement)
        .map_err(sys_err("joining the container"))?;
    Err(spawn_error(process::exec(&command), &command))
}

/// A container berth holds: its signals, FUSE daemon, bundle and, when it can write, the
/// directory its changes go to and the process watching their size.
struct Running {
    signals: process::Signals,
    helper: i32,
    bundle: Bundle,
    changes: Option<Changes>,
    watcher: Option<i32>,
}

impl Running {
    fn start(spec: &Spec, runtime: &RuntimeConfig, changes: Option<Changes>) -> Result<Running> {
        let squashfuse = assemble::find_squashfuse()?;
        let bundle = Bundle::create(runtime)?;
        // Opened while its path is reachable, for the watcher started after pivot_root.
        let upper = changes.as_ref().map(Changes::open_upper).transpose()?;
        // Blocked before the first fork, so no signal is lost or kills berth half-way.
        let signals = process::block_signals().map_err(sys_err("blocking signals"))?;
        let watch = || match (&changes, upper) {
            (Some(changes), Some(upper)) => changes.start_watcher(upper).map(Some),
            _ => Ok(None),
        };
        let assembled = assemble::assemble(&LinuxSyscall, spec, &bundle.path, &squashfuse, watch)?;
        Ok(Running {
            signals,
            helper: assembled.helper,
            bundle,
            changes,
            watcher: assembled.watcher,
        })
    }

    /// Ends the FUSE daemon (the image is read-only: nothing to flush) and removes the
    /// bundle directory if berth created it, and a temporary container's changes.
    fn stop(self) -> Result<()> {
        process::kill_and_reap(self.helper).map_err(sys_err("stopping squashfuse"))?;
        self.remove_bundle()
    }

    fn remove_bundle(self) -> Result<()> {
        if let Some(watcher) = self.watcher {
            process::kill_and_reap(watcher).map_err(sys_err("stopping the size watcher"))?;
        }
        let changes = self.changes.map(Changes::finish).transpose();
        self.bundle.remove()?;
        changes.map(drop)
    }
}

/// The container's private runtime directory. The configured one (root-owned, e.g.
/// /run/berth) is only a mountpoint: berth mounts a tmpfs over it inside its own mount
/// namespace. Without it, berth makes a private directory under $TMPDIR and removes it at
/// the end (through an fd of its parent, since after pivot_root no path reaches it).
struct Bundle {
    path: PathBuf,
    created: Option<(OwnedFd, OsString)>,
}

impl Bundle {
    fn create(runtime: &RuntimeConfig) -> Result<Bundle> {
        if runtime.dir.is_dir() {
            return Ok(Bundle {
                path: runtime.dir.clone(),
                created: None,
            });
        }
        let tmp = tmpdir();
        let (path, parent) = berth_sys::rootfs::private_dir(&tmp, ".berth-")
            .map_err(|source| Error::Sys { path: tmp, source })?;
        let name = path.file_name().expect("mkdtemp names a child").to_owned();
        Ok(Bundle {
            path,
            created: Some((parent, name)),
        })
    }

    fn remove(self) -> Result<()> {
        match self.created {
            Some((parent, name)) => berth_sys::rootfs::remove_dir_at(parent.as_fd(), &name)
                .map_err(|source| Error::Sys {
                    path: self.path,
                    source,
                }),
            None => Ok(()),
        }
    }
}

/// $TMPDIR, or /tmp: where berth keeps what it would otherwise keep in an area the node
/// lacks.
pub fn tmpdir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| "/tmp".into())
}

/// How to start the spec's process.
fn command_spec(spec: &Spec) -> Result<CommandSpec> {
    let process = spec.process().as_ref().ok_or(Error::NoCommand)?;
    let cstrings = |v: &[String]| -> Result<Vec<CString>> {
        v.iter()
            .map(|s| {
                CString::new(s.as_bytes()).map_err(|e| {
                    Error::io(
                        "a command argument or variable contains a NUL byte",
                        std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                    )
                })
            })
            .collect()
    };
    let env = process.env().clone().unwrap_or_default();
    // The same rule as every other way into a container (berth_sys::holder).
    let json = serde_json::to_vec(spec).map_err(Error::Spec)?;
    let confinement = ContainerProcess::from_spec(&json)
        .map_err(sys_err("reading the spec's process"))?
        .confinement;
    Ok(CommandSpec {
        argv: cstrings(process.args().as_deref().unwrap_or_default())?,
        search_path: search_path(&env)
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect(),
        env: cstrings(&env)?,
        confinement,
        keep_fds: Vec::new(),
        stdout_to_stderr: false,
    })
}

fn search_path(env: &[String]) -> &str {
    env.iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("")
}

fn spawn_error(f: SpawnFailure, command: &CommandSpec) -> Error {
    let name = command
        .argv
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let source = std::io::Error::from_raw_os_error(f.errno);
    match f.stage {
        Stage::Exec if f.errno == libc::ENOENT => Error::CommandNotFound {
            command: name,
            path: command
                .search_path
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        },
        Stage::Exec => Error::NotExecutable {
            command: name,
            source,
        },
        Stage::Workdir => Error::Workdir {
            path: command.confinement.cwd.clone().unwrap_or_default(),
            source,
        },
        Stage::Setup => Error::io(
            "preparing the command (capabilities, no_new_privs, fds)",
            source,
        ),
    }
}

fn sys_err(what: &'static str) -> impl FnOnce(berth_sys::Error) -> Error {
    move |source| Error::Container { what, source }
}

/// The path of a file that berth reads on the host before entering the container.
pub fn canonical_image(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path)
        .map_err(|e| Error::io(format!("opening image {}", path.display()), e))
}
