//! Who the current process is.

use std::path::PathBuf;

/// The real uid of this process (who started berth, whatever its effective ids).
pub fn real_uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// The real gid of this process.
pub fn real_gid() -> u32 {
    // SAFETY: getgid cannot fail and touches no memory.
    unsafe { libc::getgid() }
}

/// The effective uid of this process (whose rights its file operations use).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The identity a spawned program takes (see [`crate::process::Spawn::credentials`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Full root, no supplementary groups.
    pub fn root() -> Credentials {
        Credentials {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// Takes these credentials. A process whose real uid is 0 may take euid 0 back first
    /// (slurmstepd runs `user_init` with real uid 0 and effective uid the user), so groups and
    /// gid are set while it is root, the uid last. Async-signal-safe: it runs between fork
    /// and exec.
    pub(crate) fn take_in_child(&self) -> std::io::Result<()> {
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
            ok(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            ok(libc::setresgid(self.gid, self.gid, self.gid))?;
            ok(libc::setresuid(self.uid, self.uid, self.uid))
        }
    }
}

/// Gives up root for good: no supplementary groups, real, effective and saved gid `gid`,
/// then the same for uid `uid`, and no_new_privs, so no set-id program can hand anything
/// back. Then checks that it held: the ids read back, and taking uid 0 again fails. A
/// process that would go on with a way back to root is worse than one that stops, so any
/// surprise is an error. The caller must be single-threaded (setresuid(2) changes the
/// calling thread; glibc's wrappers signal the others, the raw calls here do not).
pub(crate) fn drop_for_good(uid: u32, gid: u32) -> crate::Result<()> {
    use nix::unistd::{getgroups, getresgid, getresuid, setgroups, setresgid, setresuid, Gid, Uid};
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[]).map_err(crate::Error::os("setgroups([])"))?;
    setresgid(g, g, g).map_err(crate::Error::os("setresgid"))?;
    setresuid(u, u, u).map_err(crate::Error::os("setresuid"))?;
    crate::caps::set_no_new_privs()?;
    let ids = getresuid().map_err(crate::Error::os("getresuid"))?;
    let gids = getresgid().map_err(crate::Error::os("getresgid"))?;
    let groups = getgroups().map_err(crate::Error::os("getgroups"))?;
    let held = [ids.real, ids.effective, ids.saved] == [u; 3]
        && [gids.real, gids.effective, gids.saved] == [g; 3]
        && groups.iter().all(|&group| group == g);
    let root = Uid::from_raw(0);
    let regained = uid != 0 && setresuid(root, root, root).is_ok();
    if held && !regained {
        return Ok(());
    }
    Err(crate::Error::Invalid {
        what: "dropping privileges",
        message: format!(
            "after taking uid {uid} and gid {gid} the process has uids {ids:?}, gids {gids:?},              groups {groups:?}{}; refusing to go on",
            if regained { " and could take uid 0 back" } else { "" }
        ),
    })
}

/// Runs `work` in a forked child that first becomes `uid`/`gid` for good through `sys`
/// (see [`crate::Syscall::drop_privileges`]), and returns the bytes `work` answers with.
/// The caller keeps its own identity: root splits off the part of a job that handles
/// untrusted bytes (registry answers, layer tarballs) and goes on as root with what only
/// root may do afterwards.
///
/// The work runs as the first process of a new PID namespace, so when it ends the kernel
/// kills everything it started: once this returns, no process of the unprivileged side is
/// left holding a file the caller goes on to trust (root seals the images it built). It
/// also dies with the caller (SIGKILL on the parent's death, set after the drop, which
/// would clear it). berth is single-threaded when it calls this, so the child may allocate
/// and start threads of its own.
pub fn run_in_child_as(
    sys: &dyn crate::Syscall,
    uid: u32,
    gid: u32,
    work: impl FnOnce() -> Vec<u8>,
) -> crate::Result<Vec<u8>> {
    use std::io::Read;
    let (mut read, write) = std::io::pipe().map_err(|source| crate::Error::Os {
        call: "pipe",
        source,
    })?;
    // SAFETY: berth is single-threaded here (see above), so the child is a full copy with no
    // lock held by a vanished thread.
    match unsafe { nix::unistd::fork() }.map_err(crate::Error::os("fork"))? {
        nix::unistd::ForkResult::Child => {
            drop(read);
            let code = namespace_init(sys, uid, gid, write, work);
            // SAFETY: _exit skips the atexit handlers and buffers of the parent's copy.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write);
            let mut answer = Vec::new();
            let got = read.read_to_end(&mut answer);
            let exit = crate::process::reap(child.as_raw())?;
            got.map_err(|source| crate::Error::Os {
                call: "reading the answer of the unprivileged child",
                source,
            })?;
            match exit {
                crate::process::Exit::Code(0) => Ok(answer),
                exit => Err(crate::Error::Invalid {
                    what: "the unprivileged child",
                    message: format!(
                        "running as uid {uid} it ended with {exit}: {}",
                        String::from_utf8_lossy(&answer).trim()
                    ),
                }),
            }
        }
    }
}

/// The child of [`run_in_child_as`]: enters a new PID namespace, starts its first process
/// (which drops, works and answers on `write`) and exits as that process did.
fn namespace_init(
    sys: &dyn crate::Syscall,
    uid: u32,
    gid: u32,
    write: std::io::PipeWriter,
    work: impl FnOnce() -> Vec<u8>,
) -> i32 {
    use std::io::Write;
    let mut write = write;
    let setup = |e: crate::Error, write: &mut std::io::PipeWriter| {
        let _ = write.write_all(e.to_string().as_bytes());
        1
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(crate::Error::os("prctl(PR_SET_PDEATHSIG)"))
        .and_then(|()| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
                .map_err(crate::Error::os("unshare(CLONE_NEWPID)"))
        })
    {
        return setup(e, &mut write);
    }
    // SAFETY: as in run_in_child_as: this process is a single-threaded copy.
    match unsafe { nix::unistd::fork() } {
        Err(e) => setup(crate::Error::os("fork")(e), &mut write),
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(write);
            match crate::process::reap(child.as_raw()) {
                Ok(crate::process::Exit::Code(code)) => code,
                Ok(crate::process::Exit::Signal(_)) | Err(_) => 4,
            }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            // If the process waiting for this one died before the pdeathsig below was set,
            // this one finishes its work and finds no reader for its answer: nothing more.
            let dropped = sys.drop_privileges(uid, gid).and_then(|()| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(crate::Error::os("prctl(PR_SET_PDEATHSIG)"))
            });
            // A panic must end the process here: unwinding out of this function would run
            // the caller's own code (meant for the parent) in this copy.
            let (answer, code) = match dropped
                .map(|()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)))
            {
                Ok(Ok(answer)) => (answer, 0),
                Ok(Err(_)) => (b"it panicked (see above)".to_vec(), 3),
                Err(e) => (e.to_string().into_bytes(), 1),
            };
            let code = if write.write_all(&answer).is_ok() {
                code
            } else {
                2
            };
            // SAFETY: _exit skips the atexit handlers and buffers of the parent's copy.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Runs `f` with effective uid 0 and gives the caller's effective uid back afterwards. This
/// is how slurmstepd's `user_init` (real uid 0, effective uid the user) opens what only root
/// may open, as slurmstepd's own `_reclaim_privileges` does; glibc's seteuid applies to
/// every thread of the process. Where the effective uid is 0 already, or the real uid is not
/// 0 (a user's own process, a unit test), `f` simply runs as the caller.
pub fn with_effective_root<T>(f: impl FnOnce() -> T) -> crate::Result<T> {
    use nix::unistd::{seteuid, Uid};
    let (real, effective) = (real_uid(), effective_uid());
    if effective == 0 || real != 0 {
        return Ok(f());
    }
    seteuid(Uid::from_raw(0)).map_err(crate::Error::os("seteuid(0)"))?;
    /// Gives the user's euid back even if `f` panics.
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Err(e) = seteuid(Uid::from_raw(self.0)) {
                // Going on as root where the caller expects the user's rights would be worse
                // than ending slurmstepd.
                panic!("seteuid({}) failed after a root-only open: {e}", self.0);
            }
        }
    }
    let _restore = Restore(effective);
    Ok(f())
}

/// The passwd entry of a uid: what a container needs to give the user a name and a home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub home: PathBuf,
}

/// Looks a uid up in the host's user database (files, LDAP, ... through NSS); `None` when
/// the uid has no entry, which is legal (containers then use a synthetic name).
pub fn user_info(uid: u32) -> Option<UserInfo> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| UserInfo {
            name: u.name,
            home: u.dir,
        })
}

/// The uid and primary gid of the user called `name` in the host's user database; `None`
/// when there is no such user.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_every_user_database() {
        let root = user_info(0).expect("uid 0 has a passwd entry");
        assert_eq!(root.name, "root");
        assert!(root.home.is_absolute());
        assert_eq!(user_ids("root"), Some((0, 0)));
        assert_eq!(user_ids("no such user, surely"), None);
    }

    #[test]
    fn ids_match_the_kernel_view() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let real: u32 = uid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(real_uid(), real);
        let gid_line = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
        let real: u32 = gid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(real_gid(), real);
    }

    /// A file only root can read, in `dir`.
    fn root_only_file(dir: &std::path::Path) -> std::path::PathBuf {
        let secret = dir.join("secret");
        std::fs::write(&secret, "root only").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        secret
    }

    /// slurmstepd's `user_init`: real uid 0, effective uid the user. Root-only files open
    /// inside [`with_effective_root`] only, and the user's euid comes back after it.
    #[test]
    fn effective_root_is_taken_back_and_given_up() {
        if real_uid() != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = root_only_file(dir.path());
        // SAFETY: the forked child only changes its euid, opens a file and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let user = nix::unistd::Uid::from_raw(65534);
                let steps = [
                    nix::unistd::seteuid(user).is_ok(),
                    std::fs::read(&secret).is_err(),
                    with_effective_root(|| std::fs::read(&secret)).is_ok_and(|r| r.is_ok()),
                    effective_uid() == 65534,
                ];
                let failed = steps.iter().position(|ok| !ok).map_or(0, |i| i + 1);
                // SAFETY: _exit skips the parent's atexit handlers in this copy.
                unsafe { libc::_exit(failed as i32) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let exit = crate::process::reap(child.as_raw()).unwrap();
                assert_eq!(exit, crate::process::Exit::Code(0));
            }
        }
    }

    /// The real drop: afterwards the child has the service user's ids and no groups, cannot
    /// take uid 0 back, and cannot read a root-only file; the parent is still root.
    #[test]
    fn a_child_drops_root_for_good() {
        if real_uid() != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = root_only_file(dir.path());
        let answer = run_in_child_as(&crate::LinuxSyscall, 65534, 65534, || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = |key: &str| {
                let l = status.lines().find(|l| l.starts_with(key)).unwrap();
                l[key.len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let root = nix::unistd::Uid::from_raw(0);
            format!(
                "{}|{}|{}|{}|{}|{}",
                line("Uid:"),
                line("Gid:"),
                line("Groups:"),
                line("NoNewPrivs:"),
                nix::unistd::setresuid(root, root, root).is_err(),
                std::fs::read(&secret).is_err(),
            )
            .into_bytes()
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            "65534 65534 65534 65534|65534 65534 65534 65534||1|true|true"
        );
        assert_eq!(effective_uid(), 0);
    }

    /// What the unprivileged side starts dies with it, so nothing of it can still write a
    /// file root goes on to trust.
    #[test]
    fn nothing_the_child_started_outlives_it() {
        if real_uid() != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let answer = run_in_child_as(&crate::LinuxSyscall, 65534, 65534, || {
            let child = std::process::Command::new("sleep")
                .arg("600")
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // The host's pid of the sleeper, through the host's /proc.
            let host_pid = std::fs::read_link("/proc/self").unwrap();
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", host_pid.display())).unwrap();
            let in_ns = status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1"));
            let sleeper = std::fs::read_to_string(format!(
                "/proc/{}/task/{}/children",
                host_pid.display(),
                host_pid.display()
            ))
            .unwrap();
            std::mem::forget(child);
            format!("{in_ns} {}", sleeper.trim()).into_bytes()
        })
        .unwrap();
        let answer = String::from_utf8(answer).unwrap();
        let (in_ns, sleeper) = answer.split_once(' ').unwrap();
        assert_eq!(
            in_ns, "true",
            "the work ran as its namespace's first process"
        );
        let gone = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            !std::path::Path::new(&format!("/proc/{sleeper}")).exists()
                || std::fs::read_to_string(format!("/proc/{sleeper}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        });
        assert!(
            gone,
            "the sleeper {sleeper} outlived the unprivileged child"
        );
    }

    /// A child that cannot drop never runs the work, and the caller hears why.
    #[test]
    fn a_failed_drop_runs_nothing() {
        let sys = crate::recording::RecordingSyscall {
            fail_on: Some("DropPrivileges".into()),
            ..Default::default()
        };
        let err = run_in_child_as(&sys, 4321, 4322, || {
            unreachable!("the work ran without the drop")
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("uid 4321") && err.contains("exit status 1"),
            "{err}"
        );
    }
}
