//! Issue 15, faults: SIGKILL of `berth` at every phase of a fetch (download, build,
//! publish, seal) and of a stage (copying, publish), of the fetch a job's step
//! started, of squashfuse while tasks read, of the holder of a step's container; a cache on
//! a full file system and on a read-only one; a registry that disappears mid-pull; a job
//! cancelled while its node waits for the image (it ends at once, the node answering
//! slurmctld all along). After
//! each: the next job works, the cache holds only whole images (`berth images --verify`: the
//! seal and the SHA-256 recorded at build), no mount (host's and slurmd's tables), process,
//! held lock, staging tree or runtime directory is left, and the node is idle, not drained.
//!
//! How each phase is hit, without any hook in berth: the test watches what the phase makes
//! (a `.partial` blob in the image's staging directory; the SIF's temporary file growing
//! there once every layer is in, as the squashfs is written straight from the layers) and
//! kills the moment it appears. The two phases too short to watch are reached otherwise:
//! *publish* by `strace`'s syscall fault injection (SIGKILL at the worker's rename into
//! `images/`), *seal* by stopping root's process, so the worker (the
//! cache's service user) publishes and exits and root never seals. A stage's publish
//! (between its two renames) is hit by SIGKILL at the second `rename`.
//! Needs `tests/cluster/up`; fails (does not skip) without it.

#[path = "node.rs"]
mod node;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_e2e::{
    assert_node_idle, cache_key, hold_image_lock, serial, sh, unique_name, wait_until, Batch,
    Cluster, Cmd, Run, ScratchBerth,
};
use node::{assert_cache_whole, push_image, Image, NodeSnapshot, Proc, CACHE};

/// Removes the image from the cluster's cache, so runs do not pile up images.
fn drop_cached(image: &Image) {
    let _ = std::fs::remove_file(image.cached(Path::new(CACHE)));
}

/// `srun --container-image=IMAGE cat /marker` as the test user: the next job after a fault.
fn next_job_runs(image: &Image) {
    let run = Cmd::user([
        "srun".to_owned(),
        format!("--container-image={}", image.reference),
        "cat".into(),
        "/marker".into(),
    ])
    .timeout(Duration::from_secs(300))
    .run();
    run.assert_success();
    assert_eq!(run.stdout.trim(), image.marker, "{run}");
}

/// A `berth` run as root with the cluster's configuration, for the test to kill; its stderr
/// goes to a file the test reads after.
struct Spawned {
    child: Child,
    stderr: PathBuf,
}

impl Spawned {
    fn berth(args: &[&str]) -> Spawned {
        Spawned::spawn(Cluster::get().berth_bin(), args)
    }

    fn spawn(
        program: impl AsRef<std::ffi::OsStr>,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> Spawned {
        let stderr = Path::new("/var/tmp").join(unique_name("berth-e2e-faults-stderr"));
        let child = Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", berth_e2e::PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Spawned { child, stderr }
    }

    /// `berth fetch ...` under strace, which SIGKILLs the thread that makes its second
    /// rename: strace counts each thread's calls apart, and only the worker's main thread
    /// renames twice (the finished SIF into `image.sif`, then that into `images/`); each
    /// downloader thread renames one blob. (`-P` on the image's path does not match there.)
    fn killed_at_publish(args: &[&str]) -> Spawned {
        let calls = "rename,renameat,renameat2";
        let mut strace = vec![
            "-f".to_owned(),
            "-qq".into(),
            "-o".into(),
            "/dev/null".into(),
            "-e".into(),
            format!("trace={calls}"),
            "-e".into(),
            format!("inject={calls}:signal=SIGKILL:when=2"),
            Cluster::get().berth_bin().display().to_string(),
        ];
        strace.extend(args.iter().map(|a| a.to_string()));
        Spawned::spawn("strace", &strace)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for a fetch whose worker strace killed at its publish: it fails (root reports
    /// its worker's death); returns what it printed.
    fn killed_by_strace(mut self) -> String {
        let status = self.child.wait().unwrap();
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let _ = std::fs::remove_file(&self.stderr);
        assert!(
            !status.success(),
            "the fetch was not killed at its publish: {text}"
        );
        text
    }

    /// SIGKILL, then reaps it and returns what it printed.
    fn kill(mut self) -> String {
        signal("KILL", self.pid());
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "berth was not killed but {status}"
        );
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let _ = std::fs::remove_file(&self.stderr);
        text
    }
}

fn signal(name: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status();
}

/// Whether the fetch into `staging` is building: every layer downloaded and the SIF's
/// squashfs being written (its temporary file there has data).
fn building(staging: &Path) -> bool {
    let downloading = entries(&staging.join("blobs"))
        .iter()
        .any(|n| n.ends_with(".partial"));
    !downloading
        && entries(staging).iter().any(|n| {
            n.starts_with(".image.sif.tmp")
                && std::fs::metadata(staging.join(n)).is_ok_and(|m| m.len() > 0)
        })
}

/// The service user's worker building for a root `berth` whose arguments name `path` (a
/// fork: same arguments), and that root process (the worker's PID namespace's parent's
/// parent).
fn worker_naming(path: &str) -> Option<(Proc, Proc)> {
    Proc::all().into_iter().find_map(|p| {
        if p.comm != "berth" || p.uid == 0 || p.state == 'Z' {
            return None;
        }
        if !p.args.iter().any(|a| a.contains(path)) {
            return None;
        }
        let root = Proc::read(p.ppid).and_then(|ns| Proc::read(ns.ppid))?;
        (root.uid == 0 && root.comm == "berth").then_some((p, root))
    })
}

/// Polls (every 2 ms, at most 120 s) until `found` returns something; panics if `fetch`
/// ends first, since then the phase was never reached.
fn wait_for_phase<T>(fetch: &mut Spawned, phase: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(t) = found() {
            return t;
        }
        assert!(
            fetch.running(),
            "berth ended before the {phase} phase: {}",
            std::fs::read_to_string(&fetch.stderr).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "no {phase} phase within 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Where a fetch is killed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// A layer is being downloaded (`blobs/<hex>.partial` exists).
    Download,
    /// Every layer is in; the SIF's squashfs is being written from them.
    Build,
    /// The SIF is complete; the worker's rename into `images/` is where it is killed.
    Publish,
    /// The worker published the image; root has not sealed it.
    Seal,
}

/// Runs `berth fetch` of a new image as root with the cluster's configuration (what the
/// plugin and the job prolog run), SIGKILLs it in `phase`, checks what the kill left, then
/// that the next job runs the image and nothing is left.
fn kill_fetch_at(phase: Phase) {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = NodeSnapshot::take(&cluster);
    let image = push_image(&cluster.tls_registry().host, 96, 3000, 0);
    let cache = Path::new(CACHE);
    let staging = image.staging(cache);
    let mut fetch = match phase {
        Phase::Publish => Spawned::killed_at_publish(&["fetch", &image.reference]),
        _ => Spawned::berth(&["fetch", &image.reference]),
    };
    match phase {
        Phase::Download => {
            wait_for_phase(&mut fetch, "download", || {
                entries(&staging.join("blobs"))
                    .into_iter()
                    .find(|n| n.ends_with(".partial"))
            });
        }
        Phase::Build => {
            wait_for_phase(&mut fetch, "build", || building(&staging).then_some(()));
        }
        Phase::Publish => {}
        Phase::Seal => {
            // Root only waits for the worker; stopped, it never seals what the worker
            // publishes.
            wait_for_phase(&mut fetch, "build", || building(&staging).then_some(()));
            let path = image.reference.split_once('/').unwrap().1.to_owned();
            let (worker, _) = worker_naming(&path).expect("the build's worker");
            signal("STOP", fetch.pid());
            assert!(
                wait_until(Duration::from_secs(120), || Proc::gone_or_zombie(
                    worker.pid
                )),
                "the worker did not finish"
            );
        }
    }
    let stderr = match phase {
        Phase::Publish => fetch.killed_by_strace(),
        _ => fetch.kill(),
    };

    // What the kill left: never a partial image under its final name. After the seal kill
    // the worker's complete image is there, the service user's and unsealed, so nothing
    // runs it until root seals it.
    let cached = image.cached(cache);
    if phase == Phase::Seal {
        let meta = std::fs::metadata(&cached).expect("the worker published the image");
        assert_ne!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            0,
            "sealed although root was killed"
        );
    } else {
        assert!(!cached.exists(), "{phase:?}: a partial image was published");
    }
    if phase != Phase::Seal && phase != Phase::Publish {
        assert!(
            staging.exists(),
            "{phase:?}: the kill left no staging (it did not hit the build): {stderr}"
        );
    }

    next_job_runs(&image);
    assert_cache_whole(&cluster);
    let sealed = std::fs::metadata(&cached).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&sealed), 0);
    before.assert_nothing_left(&cluster);
    drop_cached(&image);
}

#[test]
fn sigkill_while_downloading() {
    kill_fetch_at(Phase::Download);
}

#[test]
fn sigkill_while_building() {
    kill_fetch_at(Phase::Build);
}

#[test]
fn sigkill_before_the_image_is_published() {
    kill_fetch_at(Phase::Publish);
}

#[test]
fn sigkill_before_root_seals_the_image() {
    kill_fetch_at(Phase::Seal);
}

/// The fetches a job started on the node (the job prolog's prefetch and the step's own
/// `berth policy check --fetch`, both root's, the second waiting on the first's build lock)
/// are killed while the image converts: the step fails with a message naming berth (or, when
/// its own fetch started only after the kill, builds the image itself and runs), the node is
/// not drained, and the next job runs the image.
#[test]
fn sigkill_of_a_jobs_fetches_fails_the_step_not_the_node() {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = NodeSnapshot::take(&cluster);
    let image = push_image(&cluster.tls_registry().host, 96, 3000, 0);
    let staging = image.staging(Path::new(CACHE));
    let reference = image.reference.clone();
    let step = std::thread::spawn(move || {
        Cmd::user([
            "srun".to_owned(),
            format!("--container-image={reference}"),
            "cat".into(),
            "/marker".into(),
        ])
        .timeout(Duration::from_secs(300))
        .run()
    });
    let repository = image.reference.rsplit_once(':').unwrap().0.to_owned();
    let path = repository.split_once('/').unwrap().1.to_owned();
    let deadline = Instant::now() + Duration::from_secs(180);
    let building = loop {
        if building(&staging) {
            if let Some((_, root)) = worker_naming(&path) {
                break root;
            }
        }
        assert!(
            !step.is_finished(),
            "the step ended before its image was converted"
        );
        assert!(Instant::now() < deadline, "no conversion within 180 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Every root berth naming the image: the building fetch and any waiting for its lock.
    let fetches: Vec<Proc> = Proc::all()
        .into_iter()
        .filter(|p| p.comm == "berth" && p.uid == 0 && p.args.iter().any(|a| a.contains(&path)))
        .collect();
    assert!(
        fetches.iter().any(|p| p.pid == building.pid),
        "{fetches:#?}"
    );
    for fetch in &fetches {
        signal("KILL", fetch.pid);
    }
    println!(
        "killed {} fetch(es): {:#?}",
        fetches.len(),
        fetches.iter().map(|p| p.args.join(" ")).collect::<Vec<_>>()
    );
    let run: Run = step.join().unwrap();
    assert!(!run.timed_out(), "the step hung:\n{run}");
    if run.success() {
        assert_eq!(run.stdout.trim(), image.marker, "{run}");
        println!("the step's own fetch started after the kill and built the image");
    } else {
        assert!(
            run.stderr.contains("berth"),
            "the step's failure does not say what failed:\n{run}"
        );
    }
    assert_node_idle(&cluster);
    next_job_runs(&image);
    assert_cache_whole(&cluster);
    before.assert_nothing_left(&cluster);
    drop_cached(&image);
}

/// The test user's stage area (`[stage] dir` of the cluster's berth.toml).
fn user_area(cluster: &Cluster) -> PathBuf {
    Path::new("/var/tmp/berth-stage").join(cluster.uid().to_string())
}

/// A tree to stage in the user's home: one large random file and many small ones.
fn stage_source(cluster: &Cluster) -> PathBuf {
    let src = cluster.home().join(unique_name("faults-stage"));
    sh(&format!(
        "s={s}; mkdir -p $s/d; head -c 200M /dev/urandom > $s/big
         python3 -c 'import sys
for i in range(2000): open(f\"{{sys.argv[1]}}/d/f{{i}}\", \"w\").write(str(i) * 100)' $s
         chown -R {uid} $s",
        s = src.display(),
        uid = cluster.uid()
    ));
    src
}

/// `berth stage in SRC` as the test user.
fn stage_in(cluster: &Cluster, src: &Path) -> Run {
    Cmd::user([
        cluster.berth_bin().display().to_string(),
        "stage".into(),
        "in".into(),
        src.display().to_string(),
    ])
    .timeout(Duration::from_secs(300))
    .run()
}

/// The user's area holds exactly one copy of `src`, equal to it, and nothing else.
#[track_caller]
fn assert_one_whole_copy(cluster: &Cluster, src: &Path) {
    let area = user_area(cluster);
    let left = entries(&area);
    assert_eq!(left.len(), 1, "left in {}: {left:?}", area.display());
    sh(&format!(
        "diff -r {} {}/{}/data",
        src.display(),
        area.display(),
        left[0]
    ));
}

/// A stage killed while copying leaves its temporary copy (a stage outside a job has no
/// epilog to remove it); the next stage removes it and makes a whole copy.
#[test]
fn sigkill_of_a_stage_while_copying() {
    let _serial = serial();
    let cluster = Cluster::get();
    let area = user_area(&cluster);
    sh(&format!("rm -rf {}", area.display()));
    let src = stage_source(&cluster);
    let mut stage = Command::new("runuser")
        .args(["-u", cluster.user(), "--"])
        .arg(cluster.berth_bin())
        .args(["stage", "in"])
        .arg(&src)
        .current_dir(cluster.home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let copying = loop {
        let found = entries(&area)
            .into_iter()
            .find(|n| n.starts_with(".tmp-"))
            .filter(|n| area.join(n).join("data").exists());
        if let Some(tmp) = found {
            break tmp;
        }
        assert!(
            stage.try_wait().unwrap().is_none(),
            "the stage ended before copying"
        );
        assert!(Instant::now() < deadline, "no copy within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    };
    // runuser's child, or runuser itself where it execs without forking.
    let berth = Proc::all()
        .into_iter()
        .find(|p| (p.ppid == stage.id() || p.pid == stage.id()) && p.comm == "berth")
        .expect("runuser's berth");
    signal("KILL", berth.pid);
    stage.wait().unwrap();
    assert!(
        area.join(&copying).exists(),
        "the kill left no copy: it did not hit the copy"
    );

    let run = stage_in(&cluster, &src);
    run.assert_success();
    assert_one_whole_copy(&cluster, &src);
    sh(&format!("rm -rf {} {}", src.display(), area.display()));
    assert_node_idle(&cluster);
}

/// A stage killed between its publish's two renames (the earlier copy moved aside, the new
/// one not yet in place; hit with strace's fault injection) leaves both; the next stage
/// removes them and makes a whole copy.
#[test]
fn sigkill_of_a_stage_while_publishing() {
    let _serial = serial();
    let cluster = Cluster::get();
    assert!(
        Path::new("/usr/bin/strace").exists(),
        "this test needs strace (apt-get install strace)"
    );
    let area = user_area(&cluster);
    sh(&format!("rm -rf {}", area.display()));
    let src = stage_source(&cluster);
    stage_in(&cluster, &src).assert_success();
    sh(&format!("echo changed > {}/d/f1", src.display()));
    // The stage's renames: the earlier copy aside (1), the new one into place (2).
    let killed = Cmd::root([
        "strace".to_owned(),
        "-f".into(),
        "-qq".into(),
        "-o".into(),
        "/dev/null".into(),
        "-e".into(),
        "trace=rename".into(),
        "-e".into(),
        "inject=rename:signal=SIGKILL:when=2".into(),
        "runuser".into(),
        "-u".into(),
        cluster.user().into(),
        "--".into(),
        cluster.berth_bin().display().to_string(),
        "stage".into(),
        "in".into(),
        src.display().to_string(),
    ])
    .current_dir(cluster.home())
    .timeout(Duration::from_secs(300))
    .run();
    assert!(!killed.success(), "{killed}");
    let left = entries(&area);
    assert!(
        left.iter().any(|n| n.contains(".old-")) && left.iter().any(|n| n.starts_with(".tmp-")),
        "the kill did not land between the renames: {left:?}\n{killed}"
    );

    let run = stage_in(&cluster, &src);
    run.assert_success();
    assert_one_whole_copy(&cluster, &src);
    sh(&format!("rm -rf {} {}", src.display(), area.display()));
    assert_node_idle(&cluster);
}

/// A step whose two tasks read the image in a loop; `helper` finds one of the step's
/// helpers (squashfuse, the holder), which is killed once the tasks have read for a while.
/// The step ends in bounded time (its tasks see their file system go, or the step is torn
/// down), nothing is left, and the next job runs.
fn kill_a_step_helper(helper: impl Fn(&Cluster, &NodeSnapshot) -> Option<Proc>) -> Run {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = NodeSnapshot::take(&cluster);
    let image = cluster.image_tls().reference;
    let script = "i=0; while [ $i -lt 300 ]; do cat /bin/busybox >/dev/null || exit 3; \
                  i=$((i+1)); sleep 0.1; done";
    let step = {
        let image = image.clone();
        std::thread::spawn(move || {
            Cmd::user([
                "srun".to_owned(),
                format!("--container-image={image}"),
                "-n2".into(),
                "sh".into(),
                "-c".into(),
                script.into(),
            ])
            .timeout(Duration::from_secs(120))
            .run()
        })
    };
    let mut victim = None;
    assert!(
        wait_until(Duration::from_secs(60), || {
            victim = helper(&cluster, &before);
            victim.is_some() || step.is_finished()
        }),
        "the step's helper never appeared"
    );
    let victim = victim.expect("the step ended before its helper was seen");
    // The tasks have started reading by then.
    std::thread::sleep(Duration::from_secs(2));
    signal("KILL", victim.pid);
    let run = step.join().unwrap();
    assert!(!run.timed_out(), "the step did not end:\n{run}");
    assert!(
        run.elapsed < Duration::from_secs(60),
        "the step took {:?} to end:\n{run}",
        run.elapsed
    );
    assert_node_idle(&cluster);
    before.assert_nothing_left(&cluster);
    let next = Cmd::user([
        "srun".to_owned(),
        format!("--container-image={image}"),
        "true".into(),
    ])
    .run();
    next.assert_success();
    before.assert_nothing_left(&cluster);
    run
}

/// The test user's process named `comm` whose arguments contain `arg`, started after
/// `before`.
fn user_process(cluster: &Cluster, before: &NodeSnapshot, comm: &str, arg: &str) -> Option<Proc> {
    before.new_processes(cluster).into_iter().find(|p| {
        p.uid == cluster.uid()
            && p.comm.starts_with(comm)
            && p.state != 'Z'
            && p.args.iter().any(|a| a.contains(arg))
    })
}

#[test]
fn sigkill_of_squashfuse_while_tasks_read() {
    let run = kill_a_step_helper(|cluster, before| {
        // The squashfuse serving the step's image from the node cache.
        user_process(cluster, before, "squashfuse", CACHE)
    });
    // The tasks saw their file system go and said so; the step failed.
    run.assert_failure();
}

#[test]
fn sigkill_of_the_steps_container_holder() {
    kill_a_step_helper(|cluster, before| user_process(cluster, before, "berth", "start"));
}

/// A tmpfs of `size` mounted at `dir`, unmounted (lazily, whatever holds it) on drop.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size},mode=0755 berth-e2e-faults {}",
            dir.display()
        ));
        SmallFs {
            dir: dir.to_owned(),
        }
    }

    fn read_only(&self) {
        sh(&format!("mount -o remount,ro {}", self.dir.display()));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A private berth configuration (service user, as the cluster's) whose cache is `cache`,
/// approving the cluster's registry and `extra` registries, with CAs from `certs_dir`.
fn scratch_berth(name: &str, extra: &[&str], certs_dir: &Path) -> ScratchBerth {
    let cluster = Cluster::get();
    let mut allowed = vec![format!("\"{}/*\"", cluster.tls_registry().host)];
    allowed.extend(extra.iter().map(|a| format!("\"{a}/*\"")));
    ScratchBerth::new(name, |dir| {
        format!(
            "[policy]\nallowed = [{}]\n[cache]\ndir = \"{}\"\nowner = \"berth\"\nmax_size = \"10G\"\n\
             [registry]\ncerts_dir = \"{}\"\nretries = 2\ntimeout_secs = 5\n",
            allowed.join(", "),
            dir.join("cache").display(),
            certs_dir.display()
        )
    })
}

/// `berth --config ... images --verify` passes, no staging is left and no lock held.
#[track_caller]
fn assert_scratch_cache_whole(scratch: &ScratchBerth) {
    let verify = scratch.berth(&["images", "--verify"]);
    verify.assert_success();
    let cache = scratch.dir.join("cache");
    let staging = entries(&cache.join("tmp"));
    assert!(staging.is_empty(), "staging left: {staging:?}");
    let held = sh(&format!(
        "for l in {}/locks/*.lock; do [ -e \"$l\" ] || continue; \
         flock -n -E 99 \"$l\" true || echo \"$l\"; done",
        cache.display()
    ));
    assert!(held.trim().is_empty(), "locks held: {held}");
}

/// A cache on a file system that fills while an image is built: the file system has room
/// for the build when it starts (the check before it passes), and the test fills the rest
/// the moment the SIF is being written. The fetch fails saying so, publishes nothing and
/// keeps nothing of the image; the next fetch on the same cache works.
#[test]
fn a_cache_file_system_that_fills_mid_build() {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = NodeSnapshot::take(&cluster);
    let scratch = scratch_berth("berth-e2e-faults-full", &[], &cluster.certs_dir());
    let cache = scratch.dir.join("cache");
    let _fs = SmallFs::mount(&cache, "400M");
    let image = push_image(&cluster.tls_registry().host, 96, 10, 0);
    let config = scratch.config.display().to_string();
    let mut fetch = Spawned::berth(&["--config", &config, "fetch", &image.reference]);
    let staging = image.staging(&cache);
    wait_for_phase(&mut fetch, "build", || building(&staging).then_some(()));
    let filler = cache.join("filler");
    // fallocate fails once the file system is full, which is the point.
    let _ = Command::new("fallocate")
        .args(["-l", "400M"])
        .arg(&filler)
        .status();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("cat /dev/zero >> {} 2>/dev/null", filler.display()))
        .status();
    let status = fetch.child.wait().unwrap();
    let stderr = std::fs::read_to_string(&fetch.stderr).unwrap_or_default();
    let _ = std::fs::remove_file(&fetch.stderr);
    std::fs::remove_file(&filler).unwrap();
    assert!(!status.success(), "the fetch did not fail: {stderr}");
    assert!(
        stderr.contains("No space left") || stderr.contains("space"),
        "the failure does not say the disk is full:\n{stderr}"
    );
    assert!(
        !image.cached(&cache).exists(),
        "a partial image was published"
    );
    assert!(
        !staging.exists(),
        "the failed build left its staging: {:?}",
        entries(&staging)
    );
    assert!(before.processes_gone(&cluster, Duration::from_secs(10)));

    let next = scratch.berth(&["fetch", &cluster.image_tls().reference]);
    next.assert_success();
    assert_scratch_cache_whole(&scratch);
    assert_node_idle(&cluster);
}

/// A cache on a read-only file system: a fetch that must build fails with the cause (and
/// nothing hangs or panics); an image cached before the file system became read-only
/// still runs.
#[test]
fn a_read_only_cache_file_system() {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = NodeSnapshot::take(&cluster);
    let scratch = scratch_berth("berth-e2e-faults-ro", &[], &cluster.certs_dir());
    let fs = SmallFs::mount(&scratch.dir.join("cache"), "64M");
    let cached = scratch.berth(&["fetch", &cluster.image_tls().by_digest()]);
    cached.assert_success();
    fs.read_only();
    let image = push_image(&cluster.tls_registry().host, 1, 10, 0);
    let run = scratch
        .cmd(&["fetch", &image.reference])
        .timeout(Duration::from_secs(60))
        .run();
    run.assert_failure();
    assert!(
        run.stderr.contains("Read-only file system"),
        "the failure does not name the cause:\n{run}"
    );
    assert!(!run.stderr.contains("panicked"), "{run}");
    let hit = scratch.berth(&["fetch", &cluster.image_tls().by_digest()]);
    hit.assert_success();
    assert_eq!(hit.stdout, cached.stdout);
    scratch.berth(&["images", "--verify"]).assert_success();
    assert!(before.processes_gone(&cluster, Duration::from_secs(10)));
    assert_node_idle(&cluster);
}

/// A TCP proxy to the cluster's registry that passes `rate` bytes a second each way (TLS
/// goes through untouched): a slow registry the test can make disappear by killing it.
struct ThrottledProxy {
    child: Child,
    port: u16,
}

impl ThrottledProxy {
    fn start(port: u16, rate: usize) -> ThrottledProxy {
        let upstream = Cluster::get().tls_registry().port;
        let script = r#"
import socket, sys, threading, time
port, upstream, rate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def pipe(a, b):
    try:
        while True:
            data = a.recv(16384)
            if not data:
                break
            b.sendall(data)
            time.sleep(len(data) / rate)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(64)
print("ready", flush=True)
while True:
    client, _ = server.accept()
    up = socket.create_connection(("127.0.0.1", upstream))
    for a, b in ((client, up), (up, client)):
        threading.Thread(target=pipe, args=(a, b), daemon=True).start()
"#;
        let mut child = Command::new("python3")
            .args(["-c", script])
            .args([port.to_string(), upstream.to_string(), rate.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the proxy did not start");
        ThrottledProxy { child, port }
    }

    /// The registry disappears: SIGKILL, every connection cut.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ThrottledProxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The registry disappears while a layer downloads (a throttled proxy in front of it is
/// killed): the fetch fails in bounded time naming the registry, nothing is published or
/// left running; once the registry is back, the same fetch completes (reusing what was
/// downloaded) and the cache is whole.
#[test]
fn a_registry_that_disappears_mid_pull() {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = NodeSnapshot::take(&cluster);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("localhost:{port}");
    let certs = Path::new("/var/tmp").join(unique_name("berth-e2e-faults-certs"));
    std::fs::create_dir_all(certs.join(&host)).unwrap();
    std::fs::copy(cluster.ca_cert(), certs.join(&host).join("ca.crt")).unwrap();
    let scratch = scratch_berth("berth-e2e-faults-gone", &[&host], &certs);
    // Pushed straight to the registry; pulled through the proxy as `localhost:PORT/...`.
    let pushed = push_image(&cluster.tls_registry().host, 16, 10, 0);
    let through = pushed
        .reference
        .replacen(&cluster.tls_registry().host, &host, 1);
    let key = cache_key(through.rsplit_once(':').unwrap().0, &pushed.digest);
    let staging = scratch.dir.join("cache/tmp").join(&key);

    let mut proxy = ThrottledProxy::start(port, 2 << 20);
    let fetch = {
        let cmd = scratch
            .cmd(&["fetch", &through])
            .timeout(Duration::from_secs(120));
        std::thread::spawn(move || cmd.run())
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            entries(&staging.join("blobs")).iter().any(|n| {
                n.ends_with(".partial")
                    && staging
                        .join("blobs")
                        .join(n)
                        .metadata()
                        .is_ok_and(|m| m.len() > 0)
            })
        }),
        "the download did not start: {:?} in {}",
        entries(&staging.join("blobs")),
        staging.display()
    );
    proxy.kill();
    let run = fetch.join().unwrap();
    run.assert_failure();
    assert!(run.elapsed < Duration::from_secs(60), "{run}");
    assert!(
        run.stderr.contains(&host),
        "the failure does not name the registry:\n{run}"
    );
    let cache = scratch.dir.join("cache");
    assert!(
        entries(&cache.join("images")).is_empty(),
        "something was published"
    );
    // What had arrived waits for the next fetch; the SIF half written does not.
    assert!(run.stderr.contains("kept what was downloaded"), "{run}");
    let kept = entries(&staging.join("blobs"));
    assert!(
        kept.iter().any(|n| n.ends_with(".partial")),
        "no partial blob kept: {kept:?}"
    );
    assert_eq!(entries(&staging), ["blobs"], "{run}");
    assert!(before.processes_gone(&cluster, Duration::from_secs(10)));

    let _back = ThrottledProxy::start(proxy.port, 64 << 20);
    let done = scratch
        .cmd(&["fetch", &through])
        .timeout(Duration::from_secs(120))
        .run();
    done.assert_success();
    let sif = PathBuf::from(done.stdout.trim());
    assert!(sif.ends_with(format!("{key}.sif")), "{done}");
    assert_scratch_cache_whole(&scratch);
    let _ = std::fs::remove_dir_all(&certs);
    assert_node_idle(&cluster);
}

/// A job cancelled while its node waits for its image (another fetch of it holds the node
/// cache's lock): berth stops waiting at once, so the job ends within seconds, not when the
/// fetch would have, and slurmd answers slurmctld in time all along: the node is never
/// marked not responding (`idle*`), as it is while a signal for a step not yet running waits
/// in slurmstepd.
#[test]
fn a_job_cancelled_while_its_image_is_fetched_ends_at_once() {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = NodeSnapshot::take(&cluster);
    let image = push_image(&cluster.tls_registry().host, 1, 1, 0);
    let held = hold_image_lock(Path::new(CACHE), &image.key);
    let batch = Batch::new(&cluster, "faults-cancel", "#!/bin/sh\ncat /marker\n");
    let (submitted, job) = batch.submit(&[&format!("--container-image={}", image.reference)]);
    submitted.assert_success();
    let waiting = wait_until(Duration::from_secs(60), || {
        batch.output().contains("waiting for another berth fetch")
    });
    assert!(
        waiting,
        "the job never waited for the fetch: {}",
        batch.output()
    );
    Cmd::user(["scancel", &job]).run().assert_success();
    let cancelled = Instant::now();
    let mut states = std::collections::BTreeSet::new();
    let ended = wait_until(Duration::from_secs(30), || {
        states.insert(cluster.nodes_state());
        Cmd::root(["squeue", "-h", "-j", &job])
            .run()
            .stdout
            .trim()
            .is_empty()
    });
    let took = cancelled.elapsed();
    drop(held);
    assert!(
        ended,
        "job {job} still there 30 s after scancel: {}",
        batch.output()
    );
    assert!(
        !states.iter().any(|s| s.ends_with('*')),
        "the node stopped answering slurmctld meanwhile: {states:?}"
    );
    eprintln!("job {job} ended {took:?} after scancel; node states {states:?}");
    assert!(before.processes_gone(&cluster, Duration::from_secs(10)));
    next_job_runs(&image);
    drop_cached(&image);
    assert_node_idle(&cluster);
}
