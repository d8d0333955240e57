//! Helpers shared by the end-to-end suites (`tests/e2e/*.rs`), which run against the real
//! cluster that `tests/cluster/up` starts (one node, or n1..nN with `up --nodes N`).
//!
//! Every suite starts with [`Cluster::get`]: without a running cluster it panics with
//! "cluster is not up: run tests/cluster/up", so an end-to-end test fails instead of
//! passing vacuously. Commands run through [`Cmd`] (as the unprivileged test user with
//! [`Cmd::user`], or as root with [`Cmd::root`]), always with a clean environment and a
//! time limit, and come back as a [`Run`] that prints everything when an assertion fails.
//! Daemon logs are read from a [`LogCursor`], so a test looks only at the lines it caused.

pub mod images;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where `tests/cluster/up` records what it started (shell `KEY=VALUE` lines).
pub const STATE_FILE: &str = "/run/berth-test/state";

/// The PATH every command gets: a clean, predictable one, not the test runner's.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Time limit of a [`Cmd`] unless [`Cmd::timeout`] says otherwise. A hung `srun` must fail
/// the test, not hang CI.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Daemons whose PIDs the state file records, with the program name each PID must have.
const DAEMONS: &[(&str, &str)] = &[
    ("MUNGED_PID", "munged"),
    ("SLURMCTLD_PID", "slurmctld"),
    ("SLURMD_PID", "slurmd"),
    ("REGISTRY_TLS_PID", "docker-registry"),
    ("REGISTRY_PLAIN_PID", "docker-registry"),
];

/// The running test cluster, as its state file describes it.
#[derive(Debug, Clone)]
pub struct Cluster {
    vars: BTreeMap<String, String>,
}

impl Cluster {
    /// The running cluster. Panics with "cluster is not up: run tests/cluster/up" and the
    /// reason when the state file is missing, `up` did not finish, or a daemon is gone.
    #[track_caller]
    pub fn get() -> Cluster {
        match Cluster::load(Path::new(STATE_FILE)) {
            Ok(cluster) => cluster,
            Err(why) => panic!("cluster is not up: run tests/cluster/up as root ({why})"),
        }
    }

    /// Reads a state file and checks that every daemon it names is still running.
    pub fn load(state_file: &Path) -> Result<Cluster, String> {
        let text = std::fs::read_to_string(state_file)
            .map_err(|e| format!("cannot read {}: {e}", state_file.display()))?;
        let cluster = Cluster {
            vars: parse_state(&text)?,
        };
        if cluster.vars.get("READY").map(String::as_str) != Some("1") {
            return Err(format!(
                "{} has no READY=1: up did not finish",
                state_file.display()
            ));
        }
        // Every node's slurmd too (SLURMD_PID_<node>), not only the first's.
        let slurmds = cluster
            .vars
            .keys()
            .filter(|k| k.starts_with("SLURMD_PID_"))
            .map(|k| (k.as_str(), "slurmd"));
        for (key, program) in DAEMONS.iter().copied().chain(slurmds) {
            let pid = cluster
                .try_var(key)
                .ok_or_else(|| format!("{key} missing from the state file"))?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim_end() != program {
                return Err(format!("{program} ({key}={pid}) is not running"));
            }
        }
        Ok(cluster)
    }

    /// The value of one state key, if recorded.
    pub fn try_var(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// The value of one state key; panics naming the key when it is missing.
    #[track_caller]
    pub fn var(&self, key: &str) -> &str {
        self.try_var(key)
            .unwrap_or_else(|| panic!("{key} missing from {STATE_FILE}; rerun tests/cluster/up"))
    }

    /// The Slurm node name (`hostname -s` of this machine).
    pub fn node(&self) -> &str {
        self.var("NODE")
    }

    /// Every Slurm node: `n1..nN` on a cluster brought up with `up --nodes N`, else the one
    /// node [`Cluster::node`].
    pub fn nodes(&self) -> Vec<String> {
        match self.try_var("NODE_LIST") {
            Some(list) => list.split(',').map(str::to_owned).collect(),
            None => vec![self.node().to_owned()],
        }
    }

    /// Node `node`'s berth image cache as the tests (on the host) see it: with several nodes
    /// each has its own (bound over `/var/cache/berth` in that node's mount namespace).
    pub fn node_cache_dir(&self, node: &str) -> PathBuf {
        PathBuf::from(
            self.try_var(&format!("CACHE_DIR_{node}"))
                .unwrap_or("/var/cache/berth"),
        )
    }

    /// Node `node`'s slurmd log (slurmstepd logs there too).
    pub fn node_slurmd_log(&self, node: &str) -> PathBuf {
        PathBuf::from(
            self.try_var(&format!("SLURMD_LOG_{node}"))
                .unwrap_or_else(|| self.var("SLURMD_LOG")),
        )
    }

    /// `args` as root on node `node`: in its slurmd's mount namespace (where berth's
    /// directories are the node's own), as its jobs' prologs and steps see the machine.
    pub fn on_node<I, S>(&self, node: &str, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let pid = self
            .try_var(&format!("SLURMD_PID_{node}"))
            .unwrap_or_else(|| self.var("SLURMD_PID"));
        let mut all: Vec<OsString> = ["nsenter", "-t", pid, "-m", "--"]
            .iter()
            .map(OsString::from)
            .collect();
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        Cmd::root(all)
    }

    /// The unprivileged user jobs run as (`berthtest`).
    pub fn user(&self) -> &str {
        self.var("TEST_USER")
    }

    pub fn uid(&self) -> u32 {
        self.var("TEST_UID").parse().expect("TEST_UID is a number")
    }

    /// The test user's home directory (owned by the user; jobs may write there).
    pub fn home(&self) -> PathBuf {
        PathBuf::from(self.var("TEST_HOME"))
    }

    /// The test CA's certificate, installed as `<certs_dir>/localhost:5000/ca.crt`.
    pub fn ca_cert(&self) -> PathBuf {
        PathBuf::from(self.var("CA_CERT"))
    }

    /// The per-registry certificate directory (`/etc/containers/certs.d`).
    pub fn certs_dir(&self) -> PathBuf {
        PathBuf::from(self.var("CERTS_DIR"))
    }

    /// `localhost:5000`: HTTPS, certificate from the test CA, allowed by the site policy.
    pub fn tls_registry(&self) -> Registry {
        self.registry("TLS", true)
    }

    /// `localhost:5001`: plain HTTP, not allowed by the site policy (the outside world).
    pub fn plain_registry(&self) -> Registry {
        self.registry("PLAIN", false)
    }

    fn registry(&self, kind: &str, tls: bool) -> Registry {
        let port: u16 = self
            .var(&format!("REGISTRY_{kind}_PORT"))
            .parse()
            .expect("registry port is a number");
        Registry {
            host: format!("localhost:{port}"),
            port,
            tls,
            log: PathBuf::from(self.var(&format!("REGISTRY_{kind}_LOG"))),
            storage: PathBuf::from(self.var(&format!("REGISTRY_{kind}_ROOT"))),
        }
    }

    /// `localhost:5000/test/busybox:latest`, pushed as an OCI manifest.
    pub fn image_tls(&self) -> TestImage {
        self.image("IMAGE_TLS")
    }

    /// `localhost:5000/test/busybox:v2s2`, the same image pushed as a Docker v2 schema 2
    /// manifest.
    pub fn image_tls_v2s2(&self) -> TestImage {
        self.image("IMAGE_TLS_V2S2")
    }

    /// `localhost:5001/test/busybox:latest` (OCI), from the registry policy refuses.
    pub fn image_plain(&self) -> TestImage {
        self.image("IMAGE_PLAIN")
    }

    fn image(&self, key: &str) -> TestImage {
        TestImage {
            reference: self.var(key).to_owned(),
            digest: self.var(&format!("{key}_DIGEST")).to_owned(),
        }
    }

    /// slurmd's log file; slurmstepd logs there too.
    pub fn slurmd_log(&self) -> PathBuf {
        PathBuf::from(self.var("SLURMD_LOG"))
    }

    pub fn slurmctld_log(&self) -> PathBuf {
        PathBuf::from(self.var("SLURMCTLD_LOG"))
    }

    /// Where `berth` is installed (`/usr/local/bin/berth`).
    pub fn berth_bin(&self) -> PathBuf {
        PathBuf::from(self.var("BERTH_BIN"))
    }

    /// The site config the cluster's berth reads (`/etc/berth/berth.toml`).
    pub fn berth_config(&self) -> PathBuf {
        PathBuf::from(self.var("BERTH_CONFIG"))
    }

    /// The installed plugin (`.../slurm-wlm/spank_berth.so`).
    pub fn spank_plugin(&self) -> PathBuf {
        PathBuf::from(self.var("SPANK_PLUGIN"))
    }

    /// Slurm's state of the node (`idle`, `mixed`, `drained`, ...), from `sinfo`.
    pub fn node_state(&self) -> String {
        self.state_of(self.node())
    }

    /// The state of every node, one word each (the same word once when they agree), e.g.
    /// `idle` or `idle drained`.
    pub fn nodes_state(&self) -> String {
        let mut states: Vec<String> = self.nodes().iter().map(|n| self.state_of(n)).collect();
        states.sort();
        states.dedup();
        states.join(" ")
    }

    /// Slurm's state of `node`.
    pub fn state_of(&self, node: &str) -> String {
        let run = Cmd::root(["sinfo", "-h", "-N", "-n", node, "-o", "%T"]).run();
        run.assert_success();
        // sinfo prints the node once per partition, with the same state.
        let mut states: Vec<&str> = run.stdout.lines().map(str::trim).collect();
        states.dedup();
        states.join(" ")
    }

    /// Panics when a node is drained or down: a required plugin that fails on the node
    /// drains it, and srun may still exit 0, so a passing step alone proves little.
    #[track_caller]
    pub fn assert_node_healthy(&self) {
        for node in self.nodes() {
            let state = self.state_of(&node);
            if state.contains("drain") || state.contains("down") || state.contains("fail") {
                let reason = Cmd::root(["sinfo", "-h", "-N", "-n", &node, "-o", "%E"]).run();
                let reason = reason
                    .stdout
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                panic!("node {node} is {state}: {reason}");
            }
        }
    }
}

/// One of the cluster's registries.
#[derive(Debug, Clone)]
pub struct Registry {
    /// `localhost:PORT`, as image references name it.
    pub host: String,
    pub port: u16,
    /// HTTPS with the test CA (`true`) or plain HTTP.
    pub tls: bool,
    /// The registry's log, one access-log line per HTTP request among its own lines.
    pub log: PathBuf,
    /// The registry's storage directory (wiped by every `up`).
    pub storage: PathBuf,
}

impl Registry {
    /// A cursor at the current end of this registry's log.
    pub fn log_cursor(&self) -> LogCursor {
        LogCursor::at_end(&self.log)
    }

    /// `https://localhost:5000` or `http://localhost:5001`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host
        )
    }
}

/// An image `up` pushed, with the manifest digest the registry stored.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// `localhost:PORT/test/busybox:TAG`.
    pub reference: String,
    /// `sha256:...` of the pushed manifest.
    pub digest: String,
}

impl TestImage {
    /// `localhost:PORT/test/busybox@sha256:...`: the same image pinned by digest.
    pub fn by_digest(&self) -> String {
        let name = match self.reference.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => name,
            _ => self.reference.as_str(),
        };
        format!("{name}@{}", self.digest)
    }
}

/// Parses the state file: `KEY=VALUE` lines, `#` comments and blank lines ignored; a later
/// line for the same key wins.
pub fn parse_state(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut vars = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("state line {} is not KEY=VALUE: {line:?}", number + 1))?;
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("state line {} has a bad key: {line:?}", number + 1));
        }
        vars.insert(key.to_owned(), value.to_owned());
    }
    Ok(vars)
}

/// A command to run to completion with its output captured: as the test user or as root,
/// with a clean environment (PATH = [`PATH`], LANG=C.UTF-8, plus what [`Cmd::env`] adds),
/// stdin from /dev/null unless [`Cmd::stdin`] gives bytes, and a time limit enforced by
/// coreutils `timeout` (which kills the command's whole process group).
#[derive(Debug, Clone)]
pub struct Cmd {
    args: Vec<OsString>,
    user: Option<String>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl Cmd {
    /// `args` as the cluster's test user (`runuser -u berthtest`), in the user's home
    /// directory (slurmstepd chdirs to the submit directory as the user, so it must be one
    /// the user can enter).
    pub fn user<I, S>(args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cluster = Cluster::get();
        let mut cmd = Cmd::new(args);
        cmd.user = Some(cluster.user().to_owned());
        cmd.cwd = Some(cluster.home());
        cmd
    }

    /// `args` as the user running the tests (root in CI), in `/`.
    pub fn root<I, S>(args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Cmd::new(args)
    }

    fn new<I, S>(args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        assert!(!args.is_empty(), "Cmd needs a program");
        Cmd {
            args,
            user: None,
            env: Vec::new(),
            cwd: Some(PathBuf::from("/")),
            stdin: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Adds one environment variable (the environment is otherwise clean).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Cmd {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn timeout(mut self, limit: Duration) -> Cmd {
        self.timeout = limit;
        self
    }

    /// Runs the command to completion (or its time limit) and returns what happened.
    /// Panics only when the command cannot be started at all.
    pub fn run(&self) -> Run {
        let mut command = Command::new("timeout");
        command.env_clear().env("PATH", PATH).env("LANG", "C.UTF-8");
        // SIGTERM at the limit, SIGKILL 10 s later if that was not enough.
        command
            .arg("--kill-after=10")
            .arg(format!("{}", self.timeout.as_secs_f64()));
        if let Some(user) = &self.user {
            // runuser sets HOME, SHELL, USER and LOGNAME; `env` sets the rest, so the
            // user's command sees exactly the environment this Cmd describes.
            command.args(["runuser", "-u", user, "--", "env"]);
        } else {
            command.arg("env");
        }
        command.arg(format!("PATH={PATH}")).arg("LANG=C.UTF-8");
        for (key, value) in &self.env {
            let mut pair = key.clone();
            pair.push("=");
            pair.push(value);
            command.arg(pair);
        }
        // `env` would read a first argument containing '=' as one more variable.
        assert!(
            !self.args[0].to_string_lossy().contains('='),
            "program name contains '=': {:?}",
            self.args[0]
        );
        command.args(&self.args);
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let started = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.describe()));
        if let Some(bytes) = &self.stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            let bytes = bytes.clone();
            // A writer thread, so a command that exits without reading cannot block us.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.describe()));
        Run {
            command: self.describe(),
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }

    fn describe(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        match &self.user {
            Some(user) => format!("[as {user}] {}", args.join(" ")),
            None => format!("[as root] {}", args.join(" ")),
        }
    }
}

/// Shorthand: run `args` as the test user with the default time limit.
pub fn as_user<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Cmd::user(args).run()
}

/// Shorthand: run `args` as root with the default time limit.
pub fn as_root<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Cmd::root(args).run()
}

/// What a [`Cmd`] did. `Display` shows the command, status, time and both outputs, so
/// `assert!(run.success(), "{run}")` explains itself.
#[derive(Debug, Clone)]
pub struct Run {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code; `None` when a signal ended the command.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// True when the time limit ended the command (`timeout` exits 124, or 137 after
    /// its SIGKILL).
    pub fn timed_out(&self) -> bool {
        matches!(self.code(), Some(124) | Some(137))
    }

    #[track_caller]
    pub fn assert_success(&self) -> &Run {
        assert!(self.success(), "command failed:\n{self}");
        self
    }

    /// Asserts a clean failure: a non-zero exit that is not the time limit.
    #[track_caller]
    pub fn assert_failure(&self) -> &Run {
        assert!(
            !self.success() && !self.timed_out(),
            "command should have failed (and not by timing out):\n{self}"
        );
        self
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.command)?;
        writeln!(
            f,
            "status: {} after {:.2?}{}",
            self.status,
            self.elapsed,
            if self.timed_out() {
                " (time limit)"
            } else {
                ""
            }
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

/// A position in a log file, to read only what was written after it.
#[derive(Debug, Clone)]
pub struct LogCursor {
    path: PathBuf,
    offset: u64,
}

impl LogCursor {
    /// A cursor at the file's current end (at 0 when it does not exist yet).
    pub fn at_end(path: impl AsRef<Path>) -> LogCursor {
        let path = path.as_ref().to_owned();
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        LogCursor { path, offset }
    }

    /// A cursor at the file's start.
    pub fn at_start(path: impl AsRef<Path>) -> LogCursor {
        LogCursor {
            path: path.as_ref().to_owned(),
            offset: 0,
        }
    }

    /// A cursor at a byte offset (e.g. one `up` recorded in the state file).
    pub fn at(path: impl AsRef<Path>, offset: u64) -> LogCursor {
        LogCursor {
            path: path.as_ref().to_owned(),
            offset,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Everything written after the cursor (from the start if the file was truncated
    /// since), lossily decoded.
    pub fn read_new(&self) -> String {
        let Ok(mut file) = File::open(&self.path) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = if len < self.offset { 0 } else { self.offset };
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(start)).expect("seek in log");
        file.read_to_end(&mut bytes).expect("read log");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The text from the cursor up to byte offset `end` (e.g. an offset `up` recorded),
    /// lossily decoded.
    pub fn read_to(&self, end: u64) -> String {
        let Ok(mut file) = File::open(&self.path) else {
            return String::new();
        };
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(self.offset))
            .expect("seek in log");
        file.take(end.saturating_sub(self.offset))
            .read_to_end(&mut bytes)
            .expect("read log");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Polls until `pred` holds for the new text or `limit` passes; returns the last text
    /// read and whether `pred` held (log lines can land a little after a command returns).
    pub fn wait_for(&self, limit: Duration, mut pred: impl FnMut(&str) -> bool) -> (String, bool) {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.read_new();
            if pred(&text) {
                return (text, true);
            }
            if Instant::now() >= deadline {
                return (text, false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Lines of `text` that report an error and mention any of `topics` as a word (any
/// case). An error line is what Slurm's `error()`/`fatal()` write (`error:`, `fatal:`) or
/// a Rust panic message (`panicked`); a debug line that says "error" in passing is not.
/// Words are split at every character but letters, digits and `-`, so `spank_berth.so`
/// and `/usr/local/bin/berth` mention `berth` while the cluster's own paths
/// (`/var/spool/berth-test/...`) do not.
pub fn error_lines<'a>(text: &'a str, topics: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            ["error:", "fatal:", "panicked"]
                .iter()
                .any(|w| lower.contains(w))
                && lower
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .any(|word| topics.iter().any(|t| word.eq_ignore_ascii_case(t)))
        })
        .collect()
}

/// [`error_lines`] about the plugin or the launcher: mentions of `spank` or `berth`.
pub fn plugin_errors(text: &str) -> Vec<&str> {
    error_lines(text, &["spank", "berth"])
}

/// Access-log lines of a registry log for requests whose request line contains `needle`
/// (e.g. `"GET /v2/test/busybox/blobs/sha256:..."`, or just a digest).
pub fn access_lines<'a>(log_text: &'a str, needle: &str) -> Vec<&'a str> {
    // Combined log format: `IP - - [date] "METHOD PATH HTTP/1.1" STATUS SIZE "ref" "agent"`.
    log_text
        .lines()
        .filter(|line| {
            line.split('"')
                .nth(1)
                .is_some_and(|request| request.contains(" HTTP/") && request.contains(needle))
        })
        .collect()
}

/// The cluster's berth run by root with a configuration of the test's own (`--config`), in
/// a scratch directory under /var/tmp that holds it and, as the configuration says, a private
/// cache, so no other test's cache moves; removed on drop.
pub struct ScratchBerth {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The berth binary: `$BERTH_BIN`, else the cluster's.
    pub berth: PathBuf,
}

impl ScratchBerth {
    /// A scratch directory named after `prefix`, with the berth.toml `config` writes for it.
    pub fn new(prefix: &str, config: impl FnOnce(&Path) -> String) -> ScratchBerth {
        let dir = Path::new("/var/tmp").join(unique_name(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("berth.toml");
        std::fs::write(&path, config(&dir)).unwrap();
        let berth = std::env::var_os("BERTH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| Cluster::get().berth_bin());
        ScratchBerth {
            dir,
            config: path,
            berth,
        }
    }

    /// `berth --config CONFIG ARGS...` as root.
    pub fn cmd(&self, args: &[&str]) -> Cmd {
        let mut all: Vec<String> = vec![
            self.berth.display().to_string(),
            "--config".into(),
            self.config.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        Cmd::root(all)
    }

    pub fn berth(&self, args: &[&str]) -> Run {
        self.cmd(args).run()
    }
}

impl Drop for ScratchBerth {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A name no other test (in this or a concurrent run) uses: for files, jobs, images.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

/// Writes `contents` to `path` and hands the file to the test user (mode `mode`), e.g.
/// a batch script in the user's home.
pub fn write_user_file(cluster: &Cluster, path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    let uid = cluster.uid();
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// A batch script in the test user's home and the file its output goes to, both removed
/// when it is dropped.
pub struct Batch {
    pub script: PathBuf,
    pub output: PathBuf,
}

impl Batch {
    /// The script `body`, under a unique name starting with `prefix`.
    pub fn new(cluster: &Cluster, prefix: &str, body: &str) -> Batch {
        let name = unique_name(prefix);
        let script = cluster.home().join(format!("{name}.sh"));
        let output = cluster.home().join(format!("{name}.out"));
        write_user_file(cluster, &script, body, 0o755);
        Batch { script, output }
    }

    /// `sbatch` as the test user with `options` (`--wait` among them to wait); returns the
    /// run and the job id.
    pub fn submit(&self, options: &[&str]) -> (Run, String) {
        let output = format!("--output={}", self.output.display());
        let mut args = vec!["sbatch", "--parsable", &output];
        args.extend_from_slice(options);
        let script = self.script.display().to_string();
        args.push(&script);
        let run = Cmd::user(args).run();
        let job = run.stdout.trim().split(';').next().unwrap_or("").to_owned();
        (run, job)
    }

    /// What the job has written so far (nothing before it starts).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
        let _ = std::fs::remove_file(&self.output);
    }
}

/// Copies image `source` to `target` on the cluster's registries (skopeo finds the test CA
/// in certs.d) and returns the manifest digest pushed: e.g. an image under a name no node has
/// cached yet, or a tag moved to another image.
pub fn copy_image(source: &str, target: &str) -> String {
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/templates/skopeo-policy.json");
    let digest_file = Path::new("/var/tmp").join(unique_name("berth-e2e-digest"));
    let copy = Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .args(["copy", "-q", "--digestfile"])
        .arg(&digest_file)
        .arg(format!("docker://{source}"))
        .arg(format!("docker://{target}"))
        .stdin(Stdio::null())
        .output()
        .expect("skopeo (apt-get install skopeo)");
    let digest = std::fs::read_to_string(&digest_file).unwrap_or_default();
    let _ = std::fs::remove_file(&digest_file);
    assert!(
        copy.status.success() && digest.starts_with("sha256:"),
        "skopeo copy {source} {target}: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    digest.trim().to_owned()
}

/// Holds the lock that runs a suite's tests one at a time: they share the one node (two CPUs)
/// and count the test user's processes and mounts, so two at once would see each other's
/// work. Each suite is its own test binary, so each has its own lock.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `script` with `bash -euo pipefail` (as the test's user, root on the cluster) and
/// returns its stdout; panics with its stderr when it fails.
pub fn sh(script: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `pred` every 100 ms until it holds (true) or `limit` passes (false).
pub fn wait_until(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if pred() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A slurm.conf of the user's own whose plugin stack is empty, so srun runs without berth's
/// submission checks: what a user can always do (SLURM_CONF), and why the node trusts nothing.
pub struct PluginlessConf {
    conf: PathBuf,
    plugstack: PathBuf,
}

impl PluginlessConf {
    pub fn new(cluster: &Cluster) -> PluginlessConf {
        PluginlessConf::with_plugstack(cluster, "")
    }

    /// The same, with `plugstack` as the plugin stack (e.g. a plugin built for another
    /// Slurm release).
    pub fn with_plugstack(cluster: &Cluster, plugstack_text: &str) -> PluginlessConf {
        let name = unique_name("e2e-noplugin");
        let plugstack = cluster.home().join(format!("{name}.plugstack.conf"));
        let conf = cluster.home().join(format!("{name}.slurm.conf"));
        // The running release's (up --slurm RELEASE keeps it in /etc/slurm-RELEASE).
        let site_conf = cluster
            .try_var("SLURM_CONF")
            .unwrap_or("/etc/slurm/slurm.conf");
        let site = std::fs::read_to_string(site_conf).expect("read slurm.conf");
        let mut text: String = site
            .lines()
            .filter(|l| {
                !l.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("plugstackconfig")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!("PlugStackConfig={}\n", plugstack.display()));
        write_user_file(cluster, &plugstack, plugstack_text, 0o644);
        write_user_file(cluster, &conf, &text, 0o644);
        PluginlessConf { conf, plugstack }
    }

    /// srun with this configuration and the request variable forged to `request`.
    pub fn srun(&self, request: &str, args: &[&str]) -> Run {
        let mut all = vec!["srun"];
        all.extend_from_slice(args);
        Cmd::user(all)
            .env("SLURM_CONF", &self.conf)
            .env("SLURM_SPANK_BERTH_REQUEST", request)
            .run()
    }
}

impl Drop for PluginlessConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.conf);
        let _ = std::fs::remove_file(&self.plugstack);
    }
}

/// Waits for every node to be idle again (a step's end is reported a moment after srun
/// returns) and panics if one is drained, down or still busy.
#[track_caller]
pub fn assert_node_idle(cluster: &Cluster) {
    cluster.assert_node_healthy();
    // `planned`: idle, with backfill's mark for a job that has since started or gone, which
    // lasts until its next cycle (bf_interval, 30 s), as after a job cancelled in its prolog.
    let idle = wait_until(Duration::from_secs(20), || {
        matches!(cluster.nodes_state().as_str(), "idle" | "planned")
    });
    // A trailing `*`: slurmd did not answer slurmctld in time (see spank-plugin's job_end).
    assert!(idle, "node(s) {}, not idle", cluster.nodes_state());
}

/// The name berth's node cache gives `digest` (`sha256:HEX`) of `repository` (`host/path`):
/// the digest's hex and the first 32 hex digits of SHA-256(`repository`) (`RepoKey` in
/// launcher/src/cache), worked out here on its own. Its SIF is `images/KEY.sif`, its staging
/// `tmp/KEY`, its lock `locks/KEY.lock`.
pub fn cache_key(repository: &str, digest: &str) -> String {
    let repo_key = sh(&format!(
        "printf %s '{repository}' | sha256sum | cut -c1-32"
    ));
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("{digest} is not a sha256 digest"));
    format!("{hex}-{}", repo_key.trim())
}

/// Holds the lock berth's cache `cache` takes for the image `key` (`DIGESTHEX-REPOKEY`,
/// `lock_image` in launcher/src/cache), as another fetch of it would: a fetch of that image
/// there waits, saying so, until the returned file is dropped. The lock file is made as the
/// cache makes it, owned as its directory.
pub fn hold_image_lock(cache: &Path, key: &str) -> std::fs::File {
    let locks = cache.join("locks");
    let lock = locks.join(format!("{key}.lock"));
    sh(&format!(
        "install -m 0644 -o $(stat -c %u {0}) -g $(stat -c %g {0}) /dev/null {1}",
        locks.display(),
        lock.display()
    ));
    let held = std::fs::File::options().write(true).open(&lock).unwrap();
    held.lock().unwrap();
    held
}

/// A `docker-registry` of one test's own: HTTPS with the cluster's server certificate (for
/// localhost, signed by the test CA) and bcrypt htpasswd authentication. Killed by PID when
/// dropped, so a failing test does not leave it running.
pub struct PrivateRegistry {
    child: std::process::Child,
    pub dir: PathBuf,
    /// `localhost:PORT`.
    pub host: String,
    /// A containers-layout CA directory holding the test CA for `host`.
    pub certs_dir: PathBuf,
}

impl PrivateRegistry {
    pub const USER: &'static str = "alice";
    pub const PASSWORD: &'static str = "s3cr3t-pw";

    /// On a free port the kernel picks (the registry binds it right after).
    pub fn start() -> PrivateRegistry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        PrivateRegistry::start_on(port)
    }

    /// On `port`: for tests whose registry the cluster's own berth.toml names.
    pub fn start_on(port: u16) -> PrivateRegistry {
        let cluster = Cluster::get();
        let dir = Path::new("/var/tmp").join(unique_name("berth-e2e-private"));
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let host = format!("localhost:{port}");
        let htpasswd = Command::new("htpasswd")
            .args(["-Bbn", Self::USER, Self::PASSWORD])
            .output()
            .expect("htpasswd (apt-get install apache2-utils)")
            .stdout;
        std::fs::write(dir.join("htpasswd"), htpasswd).unwrap();
        let tls = Path::new(cluster.var("REGISTRY_TLS_ROOT"))
            .parent()
            .unwrap()
            .join("tls");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n\
                 auth:\n  htpasswd:\n    realm: berth-e2e\n    path: {}\n",
                dir.join("storage").display(),
                tls.join("server.crt").display(),
                tls.join("server.key").display(),
                dir.join("htpasswd").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let certs_dir = dir.join("certs.d");
        std::fs::create_dir_all(certs_dir.join(&host)).unwrap();
        std::fs::copy(cluster.ca_cert(), certs_dir.join(&host).join("ca.crt")).unwrap();
        let registry = PrivateRegistry {
            child,
            dir,
            host,
            certs_dir,
        };
        // Up when it answers the API root with "authentication required".
        let url = format!("https://{}/v2/", registry.host);
        let ca = cluster.ca_cert().display().to_string();
        let answered = wait_until(Duration::from_secs(20), || {
            Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--cacert",
                    &ca,
                    &url,
                ])
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|o| o.stdout == b"401")
        });
        assert!(
            answered,
            "private registry did not come up: {}",
            std::fs::read_to_string(registry.dir.join("registry.log")).unwrap_or_default()
        );
        registry
    }

    /// `skopeo copy` options that reach this registry with its credentials.
    pub fn skopeo_options(&self) -> Vec<String> {
        vec![
            format!(
                "--dest-cert-dir {}",
                self.certs_dir.join(&self.host).display()
            ),
            format!("--dest-creds {}:{}", Self::USER, Self::PASSWORD),
        ]
    }
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Lines `KEY=VALUE ...` of `text` starting with `tag`, as maps.
pub fn records(text: &str, tag: &str) -> Vec<BTreeMap<String, String>> {
    text.lines()
        .filter_map(|l| l.strip_prefix(tag))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_state_lines() {
        let vars = parse_state("# comment\nNODE=vm\n\nA_B=x=y\nNODE=other\n").unwrap();
        assert_eq!(vars.get("NODE").map(String::as_str), Some("other"));
        assert_eq!(vars.get("A_B").map(String::as_str), Some("x=y"));
        assert_eq!(vars.len(), 2);
    }

    #[test]
    fn refuses_malformed_state() {
        assert!(parse_state("NODE vm\n").is_err());
        assert!(parse_state("BAD-KEY=1\n").is_err());
        assert!(parse_state("=1\n").is_err());
    }

    #[test]
    fn load_fails_without_ready_or_daemons() {
        let dir = std::env::temp_dir().join(unique_name("berth-harness"));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state");
        std::fs::write(&state, "NODE=vm\n").unwrap();
        let err = Cluster::load(&state).unwrap_err();
        assert!(err.contains("READY"), "{err}");
        // A PID above the kernel's pid_max limit (2^22) cannot be a running munged.
        std::fs::write(&state, "READY=1\nMUNGED_PID=99999999\n").unwrap();
        let err = Cluster::load(&state).unwrap_err();
        assert!(err.contains("munged"), "{err}");
        assert!(Cluster::load(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_plugin_error_lines_only() {
        let log = "[t] debug:  spank: opening plugin stack /etc/slurm/plugstack.conf\n\
                   [t] error: spank: spank_berth.so: init failed\n\
                   [t] error: Munge decode failed\n\
                   [t] error: Could not open job state file /var/spool/berth-test/slurmctld/job_state\n\
                   [t] error: execve(/usr/local/bin/berth): No such file\n\
                   [t] debug:  berth: retrying after a transient error\n\
                   [t] [3.0] FATAL: Berth launcher missing\n\
                   thread 'main' panicked at spank-plugin/src/lib.rs:1:1: berth\n";
        assert_eq!(
            plugin_errors(log),
            vec![
                "[t] error: spank: spank_berth.so: init failed",
                "[t] error: execve(/usr/local/bin/berth): No such file",
                "[t] [3.0] FATAL: Berth launcher missing",
                "thread 'main' panicked at spank-plugin/src/lib.rs:1:1: berth",
            ]
        );
    }

    #[test]
    fn finds_access_lines() {
        let log = "time=\"x\" level=info msg=\"response completed\" http.request.uri=\"/v2/test/busybox/blobs/sha256:ab\"\n\
                   127.0.0.1 - - [1/Jan/2026:00:00:00 +0000] \"GET /v2/test/busybox/blobs/sha256:ab HTTP/1.1\" 200 5 \"\" \"ua\"\n\
                   127.0.0.1 - - [1/Jan/2026:00:00:00 +0000] \"HEAD /v2/test/busybox/manifests/latest HTTP/1.1\" 200 0 \"\" \"ua\"\n";
        assert_eq!(
            access_lines(log, "GET /v2/test/busybox/blobs/sha256:ab").len(),
            1
        );
        assert_eq!(access_lines(log, "/v2/test/busybox/").len(), 2);
        assert_eq!(access_lines(log, "sha256:cd").len(), 0);
    }

    #[test]
    fn cursor_reads_only_new_text() {
        let dir = std::env::temp_dir().join(unique_name("berth-harness"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        std::fs::write(&path, "old\n").unwrap();
        let cursor = LogCursor::at_end(&path);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"new\n")
            .unwrap();
        assert_eq!(cursor.read_new(), "new\n");
        // Truncated and rewritten (a new `up`): everything is new.
        std::fs::write(&path, "x\n").unwrap();
        assert_eq!(cursor.read_new(), "x\n");
        std::fs::write(&path, "0123456789").unwrap();
        assert_eq!(LogCursor::at(&path, 2).read_to(5), "234");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn digest_reference() {
        let image = TestImage {
            reference: "localhost:5000/test/busybox:latest".into(),
            digest: "sha256:ab".into(),
        };
        assert_eq!(image.by_digest(), "localhost:5000/test/busybox@sha256:ab");
        let untagged = TestImage {
            reference: "localhost:5000/test/busybox".into(),
            digest: "sha256:ab".into(),
        };
        assert_eq!(
            untagged.by_digest(),
            "localhost:5000/test/busybox@sha256:ab"
        );
    }
}
