//! Issue 8, the security review's findings 1 and 10 run for real against the cluster as the
//! test user: a process of the job's user attacks the step's `berth start` holder while
//! slurmstepd starts it, and a holder's stderr carries terminal escapes and forged lines.
//! Whatever happens, root must not signal anything but the holder it spawned, the step runs
//! the approved image or fails closed with a clear message, and the node stays up.
//! Needs `tests/cluster/up`; fails (does not skip) without it.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use berth_e2e::{serial, unique_name, wait_until, write_user_file, Cluster, Cmd, LogCursor, Run};

/// What `/etc/os-release` of the test images says and the host's does not.
const IMAGE_MARK: &str = "localhost:5000";

/// The review's attacker (`reviews/security-1/attacker.py`), run as the job's user, made
/// faster so it wins the race every time: it follows the kernel's last pid and watches each
/// new process until it has exec'd; the step's `berth start` is frozen at once, a forged
/// `VICTIM:3` handle is written into its stdout through /proc, and it goes on. It says what
/// it managed.
const ATTACKER: &str = r#"
import os, signal, sys, time
victim = sys.argv[1]
def last_pid():
    with open("/proc/sys/kernel/ns_last_pid") as f:
        return int(f.read())
seen, pending = last_pid(), set()
print("watching", flush=True)
deadline = time.time() + 60
while time.time() < deadline:
    now = last_pid()
    pending.update(range(seen + 1, now + 1))
    seen = max(seen, now)
    for pid in list(pending):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            pending.discard(pid)
            continue
        if cmd[0].startswith(b"slurmstepd") or cmd[0] == b"":
            continue  # forked, not exec'd yet
        pending.discard(pid)
        if len(cmd) < 2 or not cmd[0].endswith(b"/berth") or cmd[1] != b"start":
            continue
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError as e:
            print(f"attacker: cannot stop {pid}: {e}", flush=True)
            sys.exit(0)
        try:
            with open(f"/proc/{pid}/fd/1", "w") as pipe:
                pipe.write(f"{victim}:3\n")
            print(f"attacker: wrote '{victim}:3' into /proc/{pid}/fd/1", flush=True)
        except OSError as e:
            print(f"attacker: cannot open /proc/{pid}/fd/1: {e}", flush=True)
        os.kill(pid, signal.SIGCONT)
        sys.exit(0)
print("attacker: no berth start seen", flush=True)
sys.exit(1)
"#;

/// [`ATTACKER`] running as the job's user against `target`, watching before the step starts.
struct Attacker {
    child: Child,
    said: BufReader<ChildStdout>,
    _script: UserFile,
}

impl Attacker {
    fn start(cluster: &Cluster, target: u32) -> Attacker {
        let name = format!("{}.py", unique_name("attacker"));
        let script = UserFile(cluster.home().join(name));
        write_user_file(cluster, &script.0, ATTACKER, 0o644);
        let mut child = Command::new("runuser")
            .args(["-u", cluster.user(), "--", "python3"])
            .arg(&script.0)
            .arg(target.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("runuser");
        let mut said = BufReader::new(child.stdout.take().expect("piped"));
        let mut first = String::new();
        let _ = said.read_line(&mut first);
        assert_eq!(first.trim(), "watching", "the attacker did not start");
        Attacker {
            child,
            said,
            _script: script,
        }
    }

    /// Whether it found the step's holder, and what it says it did.
    fn finish(mut self) -> (bool, String) {
        let found = self.child.wait().expect("attacker").success();
        let mut said = String::new();
        let _ = self.said.read_to_string(&mut said);
        eprintln!("{said}");
        (found, said)
    }
}

/// The step ran the approved image, or failed closed saying why.
#[track_caller]
fn assert_approved_or_refused(run: &Run) {
    if run.success() {
        assert!(
            run.stdout.contains(IMAGE_MARK),
            "not the approved image: {run}"
        );
    } else {
        assert!(
            run.stderr.contains("something else wrote into its output"),
            "the step failed without saying why: {run}"
        );
    }
}

/// The user's own stand-in for a holder (the review's fakeholder.sh): a sealed memfd named
/// `berth-spec` at fd 3, its pid on stdout.
const FAKE_HOLDER: &str = r#"
import os, fcntl, time
fd = os.memfd_create("berth-spec", os.MFD_ALLOW_SEALING)
os.write(fd, b'{"process":{"env":["PATH=/bin:/usr/bin"],"cwd":"/"}}')
fcntl.fcntl(fd, 1033, 15)
os.dup2(fd, 3)
print(os.getpid(), flush=True)
time.sleep(300)
"#;

/// A process of another user (root) that the attack aims slurmstepd's SIGTERM/SIGKILL at.
struct Victim(Child);

impl Victim {
    fn start() -> Victim {
        Victim(Command::new("sleep").arg("600").spawn().expect("sleep"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the node to be idle again and panics if it is drained, down or still busy.
#[track_caller]
fn assert_node_idle(cluster: &Cluster) {
    cluster.assert_node_healthy();
    let idle = wait_until(Duration::from_secs(20), || cluster.node_state() == "idle");
    assert!(idle, "node is {} after the test", cluster.node_state());
}

/// `path` in the test user's home, removed on drop.
struct UserFile(PathBuf);

impl Drop for UserFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_forged_holder_handle_signals_nothing_and_runs_nothing_else() {
    let _serial = serial();
    let cluster = Cluster::get();
    let mut victim = Victim::start();
    // Started first, as the job's user: it watches for the step's holder.
    let attacker = Attacker::start(&cluster, victim.pid());
    let image = format!("--container-image={}", cluster.image_tls().reference);
    let run = Cmd::user(["srun", &image, "cat", "/etc/os-release"]).run();
    let (found, said) = attacker.finish();
    assert!(
        found,
        "the attacker never saw the step's berth start: {said}\n{run}"
    );
    assert!(
        victim.alive(),
        "slurmstepd signalled the victim {}: {said}\n{run}",
        victim.pid()
    );
    assert_approved_or_refused(&run);
    assert_node_idle(&cluster);
    // Still alive after the step's end, when the holder is stopped.
    std::thread::sleep(Duration::from_secs(1));
    assert!(victim.alive(), "the victim died at the step's end");
}

/// The same attack aimed at the user's own fake container: a same-user process holding a
/// memfd named `berth-spec` in namespaces of its own (the review's A3). The step must not
/// run in it.
#[test]
fn a_handle_to_the_users_own_namespaces_is_not_joined() {
    let _serial = serial();
    let cluster = Cluster::get();
    // The user's fake "holder": its own user+mount namespace with a marker the approved
    // image does not have, and a sealed memfd named berth-spec at fd 3.
    let fake = UserFile(cluster.home().join(format!("{}.py", unique_name("fake"))));
    write_user_file(&cluster, &fake.0, FAKE_HOLDER, 0o644);
    let mut holder = Command::new("runuser")
        .args(["-u", cluster.user(), "--", "unshare", "-Urm", "sh", "-c"])
        .arg("mount -t tmpfs t /tmp && echo USERS-OWN > /tmp/marker && exec python3 \"$0\"")
        .arg(&fake.0)
        .stdout(Stdio::piped())
        .spawn()
        .expect("runuser");
    let mut line = String::new();
    let out = holder.stdout.take().expect("piped");
    let _ = BufReader::new(out).read_line(&mut line);
    let fake_pid: u32 = line.trim().parse().expect("the fake holder's pid");
    let attacker = Attacker::start(&cluster, fake_pid);
    let image = format!("--container-image={}", cluster.image_tls().reference);
    let script = "cat /tmp/marker; cat /etc/os-release";
    let run = Cmd::user(["srun", &image, "sh", "-c", script]).run();
    attacker.finish();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        !run.stdout.contains("USERS-OWN"),
        "the step ran in the user's namespaces: {run}"
    );
    assert_approved_or_refused(&run);
    assert_node_idle(&cluster);
}

/// Finding 10's vehicle, closed: a bind source named by the job's environment
/// (PMIX_SERVER_TMPDIR, with a terminal escape and a forged log line in it) used to reach
/// the holder, whose stderr then carried them. berth now takes the PMIx directory from
/// slurmstepd's own environment only (docs/MPI.md), so the forged value reaches neither a
/// holder, the user, nor slurmd's log, and the step runs. (The escaping itself is
/// unit-tested beside the code.)
#[test]
fn a_forged_pmix_directory_with_control_characters_reaches_no_holder() {
    let _serial = serial();
    let cluster = Cluster::get();
    let log = LogCursor::at_end(cluster.slurmd_log());
    let image = format!("--container-image={}", cluster.image_tls().reference);
    let dir = "/nonexistent/\x1b[31mRED\nberth: FORGED-LINE";
    let run: Run = Cmd::user(["srun", &image, "true"])
        .env("PMIX_SERVER_TMPDIR", dir)
        .run();
    run.assert_success();
    assert!(
        !run.stderr.contains("FORGED-LINE"),
        "the forged value was used: {run}"
    );
    assert_node_idle(&cluster);
    let text = log.read_new();
    assert!(
        !text.contains("FORGED-LINE"),
        "the forged value reached slurmd's log: {text}"
    );
}
