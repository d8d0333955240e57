//! Asking the `berth` launcher (the binary named by `berth=` in plugstack.conf) for its
//! verdicts. The plugin decides nothing about images itself: policy, digests and the site
//! configuration are the launcher's, reached through a small command-line contract:
//!
//! | command | exit 0 | exit 1 | anything else |
//! |---|---|---|---|
//! | `berth policy check IMAGE` | allowed | refused, `deny: REASON` on stdout | berth failed |
//! | `berth resolve IMAGE` | `host/repo@sha256:HEX` on stdout | - | could not pin (stderr says why) |
//! | `berth policy require-container [--partition P]` | required, the reason on stdout | not required | berth failed |
//!
//! The child runs with the caller's identity and environment (on the login node: the user,
//! whose proxy settings and credentials a registry lookup may need), stdin from /dev/null,
//! no inherited descriptors beyond stdin/stdout/stderr, and a time limit. No thread is
//! started: srun and slurmstepd are multi-threaded C programs that fork later, so output is
//! read with poll(2) in the calling thread.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::Error;

/// How long a launcher call may take. A registry lookup through a slow proxy takes seconds;
/// a minute means something is stuck, and the user is better told so than left waiting.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Output beyond this is dropped: the answers are one line, and a runaway child must not
/// grow srun's memory.
const OUTPUT_MAX_BYTES: usize = 64 * 1024;

/// The launcher binary and the limit its calls run under.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub path: PathBuf,
    pub timeout: Duration,
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
    Allow,
    Deny(String),
}

impl Launcher {
    pub fn new(path: &Path) -> Self {
        Launcher {
            path: path.to_owned(),
            timeout: TIMEOUT,
        }
    }

    /// `berth policy check IMAGE`.
    pub fn policy_check(&self, image: &str) -> Result<Verdict, Error> {
        let args = ["policy", "check", image];
        let out = self.run(&args)?;
        match out.status.code() {
            Some(0) => Ok(Verdict::Allow),
            Some(1) => {
                let line = first_line(&out.stdout);
                let reason = line.strip_prefix("deny: ").unwrap_or(line);
                Ok(Verdict::Deny(if reason.is_empty() {
                    "the site policy refuses it (berth gave no reason)".to_owned()
                } else {
                    reason.to_owned()
                }))
            }
            _ => Err(self.failed(&args, &out)),
        }
    }

    /// `berth resolve IMAGE`: the digest-pinned reference.
    pub fn resolve(&self, image: &str) -> Result<String, Error> {
        let out = self.run(&["resolve", image])?;
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

    /// `berth policy require-container [--partition P]`: `Some(reason)` where the site
    /// requires every step to run in a container.
    pub fn require_container(&self, partition: Option<&str>) -> Result<Option<String>, Error> {
        let mut args = vec!["policy", "require-container"];
        args.extend(partition.iter().flat_map(|p| ["--partition", p]));
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

    /// Runs the launcher with `args` to completion or until the time limit, collecting its
    /// output.
    fn run(&self, args: &[&str]) -> Result<Outcome, Error> {
        let mut command = Command::new(&self.path);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout can stop the launcher and its helpers.
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and only makes one
        // async-signal-safe system call. It marks every descriptor above stderr close-on-exec,
        // so the launcher cannot read from or hold open what the calling Slurm process left
        // inheritable (its sockets to slurmctld, slurmstepd's to the tasks). Marking rather
        // than closing keeps the pipe std uses to report a failed exec.
        unsafe {
            command.pre_exec(|| {
                // Linux 5.11; on an older kernel the leak it prevents remains, which is no
                // reason to refuse the job.
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| Error::LauncherNotRunnable {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        collect(child, self.timeout).map_err(|e| match e {
            Collect::TimedOut => Error::LauncherTimedOut {
                command: self.command_line(args),
                seconds: self.timeout.as_secs(),
            },
            Collect::Io(e) => Error::LauncherFailed {
                command: self.command_line(args),
                status: format!("reading its output failed: {e}"),
                stderr: String::new(),
            },
        })
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
fn collect(mut child: Child, timeout: Duration) -> Result<Outcome, Collect> {
    let mut pipes: [Option<Box<dyn ReadFd>>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
    ];
    let mut output = [Vec::new(), Vec::new()];
    let pumped = pump(&mut pipes, &mut output, Instant::now() + timeout);
    if pumped.is_err() {
        let pgid = libc::pid_t::try_from(child.id()).expect("pids fit pid_t");
        // SAFETY: kill(2) with a negative pid signals the group the child leads (it was
        // spawned with process_group(0)); the group cannot be reused before we reap it.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
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

/// Moves what the pipes deliver into `output` until every pipe is closed or `deadline`.
fn pump(
    pipes: &mut [Option<Box<dyn ReadFd>>; 2],
    output: &mut [Vec<u8>; 2],
    deadline: Instant,
) -> Result<(), Collect> {
    loop {
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
        let (_d, berth) = fake(
            r#"[ "$1 $2" = "policy check" ] || exit 2
               case "$3" in
                 ok/*) echo "allow: $3 (rule: ok/*)"; exit 0;;
                 quiet/*) exit 1;;
                 *) echo "deny: registry of $3 is not in the allow-list"; exit 1;;
               esac"#,
        );
        assert_eq!(berth.policy_check("ok/a"), Ok(Verdict::Allow));
        assert_eq!(
            berth.policy_check("evil/a"),
            Ok(Verdict::Deny(
                "registry of evil/a is not in the allow-list".into()
            ))
        );
        assert!(
            matches!(berth.policy_check("quiet/a"), Ok(Verdict::Deny(r)) if r.contains("no reason"))
        );
    }

    #[test]
    fn launcher_failure_is_not_a_verdict() {
        let (_d, berth) = fake("echo 'config unreadable' >&2; exit 125");
        let err = berth.policy_check("a").unwrap_err();
        assert_eq!(
            err,
            Error::LauncherFailed {
                command: format!("{} policy check a", berth.path.display()),
                status: "exit status 125".into(),
                stderr: "config unreadable".into(),
            }
        );
        let (_d, berth) = fake("kill -9 $$");
        let err = berth.require_container(None).unwrap_err();
        assert!(err.to_string().contains("killed by signal 9"), "{err}");
    }

    #[test]
    fn resolve_gives_the_pinned_reference() {
        let (_d, berth) = fake(&format!(
            r#"[ "$1" = resolve ] || exit 2
               case "$2" in
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
    fn require_container_passes_the_partition() {
        let (_d, berth) = fake(
            r#"[ "$1 $2" = "policy require-container" ] || exit 2
               [ "$3 $4" = "--partition gpu" ] && { echo "partition gpu runs containers only"; exit 0; }
               [ -z "$3" ] && exit 1
               exit 3"#,
        );
        assert_eq!(
            berth.require_container(Some("gpu")),
            Ok(Some("partition gpu runs containers only".into()))
        );
        assert_eq!(berth.require_container(None), Ok(None));
        assert!(berth.require_container(Some("cpu")).is_err());
    }

    #[test]
    fn missing_launcher_is_named() {
        let berth = Launcher::new(Path::new("/nonexistent/berth"));
        let msg = berth.policy_check("a").unwrap_err().to_string();
        assert!(
            msg.contains("could not run the berth launcher /nonexistent/berth"),
            "{msg}"
        );
    }

    #[test]
    fn a_hanging_launcher_is_killed_at_the_limit() {
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
        // A descriptor without close-on-exec, as Slurm's own often are.
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        // SAFETY: fd is open; clearing FD_CLOEXEC only changes what exec keeps.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let (_d, berth) = fake(&format!(
            "[ -e /proc/self/fd/{fd} ] && {{ echo leaked >&2; exit 3; }}; exit 0"
        ));
        assert_eq!(berth.policy_check("a"), Ok(Verdict::Allow));
    }

    #[test]
    fn output_is_bounded() {
        let (_d, berth) = fake("head -c 1000000 /dev/zero | tr '\\0' x; exit 1");
        match berth.policy_check("a") {
            Ok(Verdict::Deny(reason)) => assert_eq!(reason.len(), OUTPUT_MAX_BYTES),
            other => panic!("{other:?}"),
        }
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
