//! The admin's side (issue 10), end to end on the real cluster: `berth config check` names
//! the line of each mistake, and a node whose installed /etc/berth/berth.toml is invalid
//! refuses container jobs with "node misconfigured" (the reason in slurmd's log) and stays
//! idle. Needs `tests/cluster/up`; fails (does not skip) without it.
//!
//! Tests that change the installed config run under [`serial`] and put it back in a drop
//! guard, so a failing assertion cannot leave the cluster misconfigured.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_e2e::{serial, unique_name, wait_until, write_user_file, Cluster, Cmd, LogCursor, Run};

const MISCONFIGURED: &str = "node misconfigured";

/// `berth ARGS` as the test user.
fn berth(cluster: &Cluster, args: &[&str]) -> Run {
    let bin = cluster.berth_bin().display().to_string();
    let mut all = vec![bin.as_str()];
    all.extend_from_slice(args);
    Cmd::user(all).run()
}

/// A file in the test user's home, removed on drop.
struct UserFile(PathBuf);

impl UserFile {
    fn new(cluster: &Cluster, contents: &str) -> UserFile {
        let path = cluster
            .home()
            .join(format!("{}.toml", unique_name("e2e-admin")));
        write_user_file(cluster, &path, contents, 0o644);
        UserFile(path)
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for UserFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Replaces the installed berth.toml for the guard's lifetime.
struct InstalledConfig {
    path: PathBuf,
    saved: Vec<u8>,
}

impl InstalledConfig {
    fn replace(cluster: &Cluster, contents: &str) -> InstalledConfig {
        let path = cluster.berth_config();
        let saved = std::fs::read(&path).expect("the installed berth.toml");
        write_atomically(&path, contents.as_bytes());
        InstalledConfig { path, saved }
    }
}

impl Drop for InstalledConfig {
    fn drop(&mut self) {
        write_atomically(&self.path, &self.saved);
    }
}

/// Writes `path` through a temporary file and a rename: a job reading it meanwhile sees the
/// old or the new file, never half of one.
fn write_atomically(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("e2e-tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A batch job submitted on hold (so the login node's checks run now, the node's when it
/// is released), its script and output removed on drop.
struct HeldJob {
    job: String,
    output: PathBuf,
    _files: (UserFile, UserFile),
}

impl HeldJob {
    fn submit(cluster: &Cluster, image_option: &str, command: &str) -> HeldJob {
        let name = unique_name("e2e-admin-job");
        let script = cluster.home().join(format!("{name}.sh"));
        let output = cluster.home().join(format!("{name}.out"));
        write_user_file(cluster, &script, &format!("#!/bin/sh\n{command}\n"), 0o755);
        let out = format!("--output={}", output.display());
        let script_arg = script.display().to_string();
        let sbatch = Cmd::user([
            "sbatch",
            "--hold",
            "--parsable",
            &out,
            image_option,
            &script_arg,
        ])
        .run();
        sbatch.assert_success();
        HeldJob {
            job: sbatch.stdout.trim().to_owned(),
            output: output.clone(),
            _files: (UserFile(script), UserFile(output)),
        }
    }

    /// Releases the job, waits for it to end and returns its output.
    fn release_and_wait(&self) -> String {
        Cmd::root(["scontrol", "release", &self.job])
            .run()
            .assert_success();
        let ended = wait_until(Duration::from_secs(60), || {
            Cmd::root(["squeue", "-h", "-j", &self.job])
                .run()
                .stdout
                .trim()
                .is_empty()
        });
        assert!(ended, "job {} did not end", self.job);
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

#[track_caller]
fn assert_node_idle(cluster: &Cluster) {
    cluster.assert_node_healthy();
    let idle = wait_until(Duration::from_secs(20), || cluster.node_state() == "idle");
    assert!(idle, "node is {} after the test", cluster.node_state());
}

#[test]
fn config_check_accepts_the_installed_config() {
    let cluster = Cluster::get();
    let config = cluster.berth_config().display().to_string();
    let run = berth(&cluster, &["config", "check", &config]);
    run.assert_success();
    assert!(run.stdout.contains(&format!("{config}: valid")), "{run:?}");
}

#[test]
fn config_check_names_the_line_of_each_mistake() {
    let cluster = Cluster::get();
    for (text, place, words) in [
        (
            "[policy]\nallowed = []\nalowed = [\"x/*\"]\n",
            ":3:1:",
            "unknown field `alowed`, expected one of",
        ),
        (
            "[cache]\ndir = \"/var/cache/berth\"\n\n[policy]\nrequire_digest = \"yes\"\n",
            ":5:18:",
            "expected a boolean",
        ),
        (
            "[policy]\nallowed = [\n  \"localhost:5000/*\",\n  \"https://evil/*\",\n]\n",
            ":4:3:",
            "https://evil/*",
        ),
    ] {
        let file = UserFile::new(&cluster, text);
        let run = berth(&cluster, &["config", "check", &file.arg()]);
        assert_eq!(run.code(), Some(1), "{run:?}");
        let expected = format!("{}{place}", file.arg());
        assert!(run.stderr.contains(&expected), "no {expected} in {run:?}");
        assert!(run.stderr.contains(words), "no {words} in {run:?}");
    }
}

#[test]
fn a_node_with_an_invalid_config_refuses_container_jobs_and_stays_idle() {
    let _serial = serial();
    let cluster = Cluster::get();
    let image = format!("--container-image={}", cluster.image_tls().reference);
    // Submitted while the config is valid (the login node's check passes and pins the
    // image), held, and released once the node's config is broken: the node's own check
    // is the one that must refuse it.
    let held = HeldJob::submit(&cluster, &image, "cat /etc/os-release");
    let slurmd_log = LogCursor::at_end(cluster.slurmd_log());
    let broken = InstalledConfig::replace(
        &cluster,
        "[policy]\nallowed = [\"localhost:5000/*\"]\nnot_a_key = 1\n",
    );
    let text = held.release_and_wait();
    assert!(text.contains(MISCONFIGURED), "job output: {text}");
    assert!(text.contains("berth.toml:3:1"), "job output: {text}");
    assert!(!text.contains("BERTH_REGISTRY"), "the job ran: {text}");
    let (log, found) = slurmd_log.wait_for(Duration::from_secs(10), |t| t.contains(MISCONFIGURED));
    assert!(
        found,
        "no '{MISCONFIGURED}' for the admin in slurmd's log:\n{log}"
    );
    assert_node_idle(&cluster);

    // At submission too, srun says the same rather than blaming the image.
    let srun = Cmd::user(["srun", &image, "true"])
        .current_dir(cluster.home())
        .run();
    srun.assert_failure();
    assert!(srun.stderr.contains(MISCONFIGURED), "{srun:?}");
    assert_node_idle(&cluster);

    drop(broken);
    let again = Cmd::user(["srun", &image, "true"])
        .current_dir(cluster.home())
        .run();
    again.assert_success();
}

/// A registry name that only the proxy can resolve: tinyproxy runs in a mount namespace of
/// its own whose /etc/hosts maps it to the plain-HTTP test registry's address. Anything
/// that reaches the registry under this name went through the proxy.
const PROXIED_HOST: &str = "berth-proxied.test";
const PROXY_PORT: u16 = 18128;

/// Debian's tinyproxy on 127.0.0.1:PROXY_PORT, stopped on drop.
struct Tinyproxy {
    child: std::process::Child,
    dir: PathBuf,
}

impl Tinyproxy {
    fn start() -> Tinyproxy {
        let dir = std::env::temp_dir().join(unique_name("e2e-admin-tinyproxy"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("tinyproxy.conf");
        let hosts = dir.join("hosts");
        std::fs::write(
            &conf,
            format!(
                "Port {PROXY_PORT}\nListen 127.0.0.1\nUser nobody\nGroup nogroup\n\
                 Timeout 30\nMaxClients 20\nLogLevel Connect\n"
            ),
        )
        .unwrap();
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n127.0.0.1 {PROXIED_HOST}\n"),
        )
        .unwrap();
        let script = format!(
            "mount --bind {} /etc/hosts && exec tinyproxy -d -c {}",
            hosts.display(),
            conf.display()
        );
        let log = std::fs::File::create(dir.join("tinyproxy.log")).unwrap();
        let child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare + tinyproxy (apt install tinyproxy; tests/cluster/up does)");
        let listening = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", PROXY_PORT)).is_ok()
        });
        let proxy = Tinyproxy { child, dir };
        assert!(listening, "tinyproxy did not listen: {}", proxy.log());
        proxy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tinyproxy.log")).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The test's site config: the proxied registry approved, reached over plain HTTP, through
/// the proxy if `proxy`; `cache` is a `[cache]` table or nothing.
fn proxied_config(cluster: &Cluster, proxy: bool, cache: &str) -> String {
    let plain = cluster.plain_registry().port;
    let tls = cluster.tls_registry().port;
    let proxy = if proxy {
        format!("proxy = \"http://127.0.0.1:{PROXY_PORT}\"\nno_proxy = [\"localhost\"]\n")
    } else {
        String::new()
    };
    format!(
        "[policy]\nallowed = [\"localhost:{tls}/*\", \"{PROXIED_HOST}:{plain}/*\"]\n\
         plain_http = [\"{PROXIED_HOST}:{plain}\"]\n{cache}\
         [registry]\ncerts_dir = \"{}\"\nretries = 1\ntimeout_secs = 5\n{proxy}",
        cluster.certs_dir().display()
    )
}

/// A root-only config file and cache directory for direct launcher calls, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = PathBuf::from("/var/tmp").join(unique_name("e2e-admin"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn config(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_node_fetch_goes_through_the_configured_proxy() {
    let _serial = serial();
    let cluster = Cluster::get();
    let scratch = Scratch::new();
    let cache = format!("[cache]\ndir = \"{}\"\n", scratch.0.join("cache").display());
    let with_proxy = scratch.config("proxy.toml", &proxied_config(&cluster, true, &cache));
    let direct = scratch.config("direct.toml", &proxied_config(&cluster, false, &cache));
    let image = format!(
        "{PROXIED_HOST}:{}/test/busybox",
        cluster.plain_registry().port
    );
    let bin = cluster.berth_bin().display().to_string();
    // What the plugin runs in slurmstepd: root, an environment with only PATH.
    let node_fetch = |config: &str| {
        Cmd::root([
            &bin, "--config", config, "policy", "check", "--fetch", &image,
        ])
        .run()
    };

    let proxy = Tinyproxy::start();
    // Without the setting the name does not even resolve: only the proxy reaches it.
    let run = node_fetch(&direct);
    assert_ne!(run.code(), Some(0), "{run:?}");
    let run = node_fetch(&with_proxy);
    run.assert_success();
    assert!(run.stdout.starts_with("allow: "), "{run:?}");
    assert!(
        proxy.log().contains(PROXIED_HOST),
        "tinyproxy saw no request for {PROXIED_HOST}:\n{}",
        proxy.log()
    );

    drop(proxy);
    let run = Cmd::root([&bin, "--config", &with_proxy, "resolve", &image]).run();
    assert_ne!(run.code(), Some(0), "{run:?}");
    assert!(
        run.stderr.contains("unreachable") && run.stderr.contains("[registry] proxy"),
        "not a clear message with the proxy down: {run:?}"
    );
}

#[test]
fn a_job_runs_an_image_reached_only_through_the_proxy() {
    let _serial = serial();
    let cluster = Cluster::get();
    let proxy = Tinyproxy::start();
    let _config = InstalledConfig::replace(&cluster, &proxied_config(&cluster, true, ""));
    let image = format!(
        "--container-image={PROXIED_HOST}:{}/test/busybox",
        cluster.plain_registry().port
    );
    let run = Cmd::user(["srun", &image, "cat", "/etc/os-release"]).run();
    run.assert_success();
    // The plain registry's image says where it was pushed.
    let plain = format!("BERTH_REGISTRY=localhost:{}", cluster.plain_registry().port);
    assert!(run.stdout.contains(&plain), "{run:?}");
    assert!(proxy.log().contains(PROXIED_HOST), "{}", proxy.log());

    drop(proxy);
    let run = Cmd::user(["srun", &image, "true"]).run();
    run.assert_failure();
    assert!(run.stderr.contains("[registry] proxy"), "{run:?}");
    assert_node_idle(&cluster);
}

/// A datagram socket at /dev/log standing in for syslog while no syslog daemon runs (the
/// test machine has none), removed on drop. `None` where a real one listens: the test then
/// checks the audit file only.
/// A stand-in syslog daemon on /dev/log (where the machine runs none) that reads as it
/// goes, as a daemon does: a datagram socket queues only net.unix.max_dgram_qlen messages.
struct SyslogListener {
    received: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl SyslogListener {
    fn bind() -> Option<SyslogListener> {
        if Path::new("/dev/log").exists() {
            return None;
        }
        let socket = std::os::unix::net::UnixDatagram::bind("/dev/log").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (into, stopped) = (received.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    into.lock().unwrap().push(text);
                }
            }
        });
        Some(SyslogListener {
            received,
            stop,
            reader: Some(reader),
        })
    }

    /// Every message received so far.
    fn messages(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for SyslogListener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let _ = std::fs::remove_file("/dev/log");
    }
}

/// The cluster's own config with an `[audit]` table of the test's.
fn audited_config(cluster: &Cluster, allowed: &str, audit_file: &Path) -> String {
    format!(
        "[policy]\nallowed = [{allowed}]\n[registry]\ncerts_dir = \"{}\"\n\
         [audit]\nfile = \"{}\"\nsyslog = true\n",
        cluster.certs_dir().display(),
        audit_file.display()
    )
}

#[test]
fn node_decisions_are_audited_and_berth_audit_names_each_steps_digest() {
    let _serial = serial();
    let cluster = Cluster::get();
    let scratch = Scratch::new();
    let audit_file = scratch.0.join("audit.jsonl");
    let tls = cluster.image_tls();
    let approved = format!("\"localhost:{}/*\"", cluster.tls_registry().port);
    let syslog = SyslogListener::bind();
    let config =
        InstalledConfig::replace(&cluster, &audited_config(&cluster, &approved, &audit_file));
    let bin = cluster.berth_bin().display().to_string();
    let image = format!("--container-image={}", tls.reference);

    // Allowed: the job's step 0 ran the image's digest.
    let slurmd_log = LogCursor::at_end(cluster.slurmd_log());
    let run = Cmd::user(["srun", &image, "sh", "-c", "echo $SLURM_JOB_ID"]).run();
    run.assert_success();
    let job = run.stdout.trim().to_owned();
    let audit = Cmd::root([&bin, "audit", "--job", &job]).run();
    audit.assert_success();
    let step0 = audit
        .stdout
        .lines()
        .find(|l| l.starts_with("0 "))
        .unwrap_or_default();
    assert!(
        step0.contains("allow") && step0.contains(&tls.digest),
        "{audit:?}"
    );
    let json = Cmd::root([&bin, "audit", "--job", &job, "--json"]).run();
    let record: serde_json::Value =
        serde_json::from_str(json.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(record["user"], cluster.user(), "{record}");
    assert_eq!(record["node"], cluster.node(), "{record}");
    assert_eq!(record["rule"], approved.trim_matches('"'), "{record}");
    let line = format!("audit: job={job} step=0 uid={} ", cluster.uid());
    let (log, found) = slurmd_log.wait_for(Duration::from_secs(10), |t| t.contains(&line));
    assert!(
        found && log.contains("verdict=allow"),
        "no '{line}' in slurmd's log:\n{log}"
    );

    // Denied on the node: submitted while allowed, released after the site withdrew it.
    let held = HeldJob::submit(&cluster, &image, "true");
    let withdrawn = InstalledConfig::replace(&cluster, &audited_config(&cluster, "", &audit_file));
    held.release_and_wait();
    let denied_job = held.job.clone();
    let audit = Cmd::root([&bin, "audit", "--job", &denied_job]).run();
    audit.assert_success();
    let batch = audit
        .stdout
        .lines()
        .find(|l| l.starts_with("batch "))
        .unwrap_or_default();
    assert!(batch.contains("deny"), "{audit:?}");
    drop(withdrawn);
    drop(config);
    assert_node_idle(&cluster);

    if let Some(syslog) = syslog {
        let messages = syslog.messages();
        for (job, verdict) in [(&job, "allow"), (&denied_job, "deny")] {
            let needle = format!("\"job\":\"{job}\"");
            assert!(
                messages.iter().any(|m| m.starts_with("<38>berth[")
                    && m.contains(&needle)
                    && m.contains(&format!("\"verdict\":\"{verdict}\""))),
                "no syslog line for job {job} ({verdict}) in {messages:#?}"
            );
        }
    }
}

/// The metrics textfile's samples as Python's prometheus_client parses them:
/// `name{labels}` -> value, one per line of its output; panics if it does not parse.
fn parse_metrics(file: &Path) -> std::collections::BTreeMap<String, f64> {
    let program = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families as parse\n\
        for family in parse(open(sys.argv[1]).read()):\n\
        \x20   for s in family.samples:\n\
        \x20       labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n\
        \x20       print(f'{s.name}{{{labels}}} {s.value}')\n";
    let path = file.display().to_string();
    let run = Cmd::root(["/usr/bin/python3", "-c", program, &path]).run();
    run.assert_success();
    run.stdout
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

#[test]
fn the_metrics_textfile_parses_and_its_counters_move_with_each_job() {
    let _serial = serial();
    let cluster = Cluster::get();
    let scratch = Scratch::new();
    let file = scratch.0.join("berth.prom");
    let config = format!(
        "[policy]\nallowed = [\"localhost:{}/*\"]\n[registry]\ncerts_dir = \"{}\"\n\
         [audit]\nfile = \"\"\nsyslog = false\n[metrics]\nfile = \"{}\"\n",
        cluster.tls_registry().port,
        cluster.certs_dir().display(),
        file.display()
    );
    let _config = InstalledConfig::replace(&cluster, &config);
    let image = format!("--container-image={}", cluster.image_tls().reference);
    Cmd::user(["srun", &image, "true"]).run().assert_success();
    let first = parse_metrics(&file);
    let allowed = "berth_decisions_total{verdict=allow}";
    let fetches = |m: &std::collections::BTreeMap<String, f64>| {
        m.get("berth_cache_hits_total{}").copied().unwrap_or(0.0)
            + m.get("berth_cache_misses_total{}").copied().unwrap_or(0.0)
    };
    // One decision per step; the job prolog's prefetch at job start is a fetch too.
    assert_eq!(first.get(allowed), Some(&1.0), "{first:#?}");
    assert!(fetches(&first) >= 1.0, "{first:#?}");
    assert!(first["berth_cache_entries{}"] >= 1.0, "{first:#?}");
    assert!(first["berth_cache_bytes{}"] > 0.0, "{first:#?}");
    assert!(
        first.contains_key("berth_containers_running{}"),
        "{first:#?}"
    );

    Cmd::user(["srun", &image, "true"]).run().assert_success();
    let second = parse_metrics(&file);
    assert_eq!(second.get(allowed), Some(&2.0), "{second:#?}");
    assert!(fetches(&second) >= fetches(&first) + 1.0, "{second:#?}");
    assert!(
        second["berth_cache_hits_total{}"] >= 1.0,
        "the second fetch is a hit: {second:#?}"
    );
    assert_node_idle(&cluster);
}

/// Sets /dev/fuse's mode for the guard's lifetime.
struct FuseMode(u32);

impl FuseMode {
    fn set(mode: u32) -> FuseMode {
        use std::os::unix::fs::PermissionsExt;
        let old = std::fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(mode)).unwrap();
        FuseMode(old)
    }
}

impl Drop for FuseMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.0));
    }
}

#[test]
fn doctor_passes_on_the_cluster_and_names_the_fix_for_an_unusable_dev_fuse() {
    let _serial = serial();
    let cluster = Cluster::get();
    let bin = cluster.berth_bin().display().to_string();
    let run = Cmd::root([&bin, "doctor"]).run();
    run.assert_success();
    for check in [
        "user namespaces",
        "/dev/fuse",
        "squashfuse",
        "cgroups",
        "plugstack entry",
    ] {
        assert!(
            run.stdout.contains(&format!("ok    {check}: ")),
            "{check}: {run:?}"
        );
    }
    let registry = format!(
        "ok    registry: localhost:{} answers",
        cluster.tls_registry().port
    );
    assert!(run.stdout.contains(&registry), "{run:?}");

    let _fuse = FuseMode::set(0o600);
    let run = Cmd::root([&bin, "doctor"]).run();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(
        run.stdout
            .contains("FAIL  /dev/fuse: /dev/fuse is mode 0600"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("fix: ") && run.stdout.contains("chmod 0666 /dev/fuse"),
        "{run:?}"
    );
}

#[test]
fn site_mounts_and_variables_reach_every_container_and_user_binds_are_limited() {
    let _serial = serial();
    let cluster = Cluster::get();
    let scratch = Scratch::new();
    let site_dir = scratch.0.join("site");
    std::fs::create_dir_all(&site_dir).unwrap();
    std::fs::write(site_dir.join("marker"), "site mount\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for dir in [&scratch.0, &site_dir] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        site_dir.join("marker"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let home = cluster.home().display().to_string();
    let config = format!(
        "[policy]\nallowed = [\"localhost:{}/*\"]\n[registry]\ncerts_dir = \"{}\"\n\
         [audit]\nfile = \"\"\nsyslog = false\n\
         [site]\nbinds = [\"{}:/site:ro\"]\noptional_binds = [\"/no/such/dir:/opt/missing\"]\n\
         env = {{ BERTH_SITE_TEST = \"from-the-site\" }}\nuser_bind_prefixes = [\"{home}\"]\n",
        cluster.tls_registry().port,
        cluster.certs_dir().display(),
        site_dir.display(),
    );
    let _config = InstalledConfig::replace(&cluster, &config);
    let image = format!("--container-image={}", cluster.image_tls().reference);

    let run = Cmd::user([
        "srun",
        &image,
        "sh",
        "-c",
        "cat /site/marker; echo $BERTH_SITE_TEST; test -e /opt/missing || echo no-optional",
    ])
    .run();
    run.assert_success();
    assert_eq!(
        run.stdout.lines().collect::<Vec<_>>(),
        ["site mount", "from-the-site", "no-optional"],
        "{run:?}"
    );

    // Replacing the site's mount is refused, and so is a bind outside the allowed prefixes.
    let over = format!("--container-mounts={home}:/site");
    let run = Cmd::user(["srun", &image, &over, "true"]).run();
    run.assert_failure();
    assert!(
        run.stderr.contains("mount the site gives every container"),
        "{run:?}"
    );
    let outside = "--container-mounts=/etc:/data";
    let run = Cmd::user(["srun", &image, outside, "true"]).run();
    run.assert_failure();
    assert!(
        run.stderr.contains(&format!("only paths below {home}")),
        "{run:?}"
    );
    // Inside the prefixes it works.
    let inside = format!("--container-mounts={home}:/data");
    Cmd::user(["srun", &image, &inside, "true"])
        .run()
        .assert_success();
    assert_node_idle(&cluster);
}
