//! Issue 15: the escapes container runtimes and image tools shipped in the last decade, each
//! tried against berth end to end and shown harmless. One test per pattern, named after its
//! CVE; hostile images are pushed to the approved registry and run by the test user through
//! `srun`, as a user of a site would. Each case checks that the refusal names its cause, the
//! step fails, nothing changed on the host, and the node is left as it was: idle, no mount,
//! process or cache staging left (see [`Leftovers`]). docs/SECURITY.md lists the cases.
//! Needs `tests/cluster/up`; fails (does not skip) without it.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use berth_e2e::images::{busybox_layer, push_layers, put_manifest, python_layer, Pushed};
use berth_e2e::{
    access_lines, as_root, assert_node_idle, serial, sh, unique_name, wait_until, write_user_file,
    Cluster, Cmd, PluginlessConf, Run, ScratchBerth,
};

/// The node cache of the cluster's berth.toml (`tests/cluster/templates/berth.toml`).
const NODE_CACHE: &str = "/var/cache/berth";

/// What the test's commands print when they ran: a refused step must not print it.
const RAN: &str = "COMMAND-RAN";

/// A scratch directory under /var/tmp, readable by the test user, removed on drop.
struct Work(PathBuf);

impl Work {
    fn new(prefix: &str) -> Work {
        let dir = Path::new("/var/tmp").join(unique_name(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Work(dir)
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The busybox base layer, built once per run.
fn base_layer() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = PathBuf::from("/var/tmp/berth-e2e-cve-base");
        let _ = std::fs::remove_dir_all(&dir);
        busybox_layer(&dir)
    })
}

/// An image of the busybox base and one layer written by the Python `script` (see
/// [`python_layer`]), pushed to the approved registry as `test/cve-NAME-...`.
fn image_with_layer(work: &Work, name: &str, script: &str) -> Pushed {
    let layer = python_layer(&work.0.join(name), script);
    push_layers(
        &Cluster::get().tls_registry().host,
        &[],
        &unique_name(&format!("cve-{name}")),
        "v",
        &[base_layer(), &layer],
        name,
    )
}

/// `srun` as the test user: `options`, then `image`, then `sh -c script`.
fn srun(options: &[&str], image: &str, script: &str) -> Run {
    let image = format!("--container-image={image}");
    let mut all = vec!["srun"];
    all.extend_from_slice(options);
    all.extend_from_slice(&[&image, "sh", "-c", script]);
    Cmd::user(all).run()
}

/// The step failed before the user's command ran, saying each of `causes`.
#[track_caller]
fn assert_refused(run: &Run, causes: &[&str]) {
    run.assert_failure();
    for cause in causes {
        assert!(
            run.stderr.contains(cause),
            "no {cause:?} in the refusal:\n{run}"
        );
    }
    assert!(!run.stdout.contains(RAN), "the command ran:\n{run}");
}

/// Files of a cache subdirectory (`images`, `tmp`).
fn cache_entries(sub: &str) -> BTreeSet<String> {
    std::fs::read_dir(Path::new(NODE_CACHE).join(sub))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What a step could leave on the node, taken before a case; [`Leftovers::assert_none`]
/// compares after it.
struct Leftovers {
    processes: BTreeSet<String>,
    mounts: Vec<String>,
    staging: BTreeSet<String>,
    runtime: BTreeSet<String>,
}

impl Leftovers {
    fn now(cluster: &Cluster) -> Leftovers {
        Leftovers {
            processes: launcher_processes(cluster),
            mounts: container_mounts(),
            staging: cache_entries("tmp"),
            runtime: runtime_dirs(),
        }
    }

    /// No new process of the cluster's berth or of squashfuse, no new mount, runtime
    /// directory or cache staging, no cached image for `refused` digests, and the node idle.
    /// (Only what is new counts: other work on the machine may have its own.)
    #[track_caller]
    fn assert_none(&self, cluster: &Cluster, refused: &[&str]) {
        let mut left = BTreeSet::new();
        let gone = wait_until(Duration::from_secs(15), || {
            left = &launcher_processes(cluster) - &self.processes;
            left.is_empty()
        });
        assert!(gone, "processes left: {left:?}");
        assert_eq!(container_mounts(), self.mounts, "mounts left behind");
        // A failed download keeps its blobs for a resumed pull; anything unpacked or built
        // must be gone.
        let staging: Vec<String> = cache_entries("tmp")
            .difference(&self.staging)
            .filter(|key| {
                let dir = Path::new(NODE_CACHE).join("tmp").join(key);
                std::fs::read_dir(dir)
                    .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name() != "blobs"))
                    .unwrap_or(false)
            })
            .cloned()
            .collect();
        assert!(staging.is_empty(), "cache staging left: {staging:?}");
        assert_eq!(runtime_dirs(), self.runtime, "runtime directories left");
        for digest in refused {
            let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
            let cached: Vec<String> = cache_entries("images")
                .into_iter()
                .filter(|n| n.starts_with(hex))
                .collect();
            assert!(cached.is_empty(), "a refused image is cached: {cached:?}");
        }
        assert_node_idle(cluster);
    }
}

/// `PID ARGS` of the running processes of the cluster's berth and of squashfuse.
fn launcher_processes(cluster: &Cluster) -> BTreeSet<String> {
    let berth = cluster.berth_bin().display().to_string();
    as_root(["ps", "-e", "-o", "pid=,args="])
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| {
            let program = l.split_whitespace().nth(1).unwrap_or("");
            program == berth || program.starts_with("squashfuse")
        })
        .map(str::to_owned)
        .collect()
}

/// Mounts in the host's mount table that a container, a writable container's files or a
/// fetch could have left.
fn container_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("/run/berth") || l.contains("berth-containers") || l.contains(NODE_CACHE)
        })
        .map(str::to_owned)
        .collect()
}

/// Entries of berth's runtime directory; the plugin's record directory of named containers
/// (`/run/berth/named`, kept once made) counts by its contents.
fn runtime_dirs() -> BTreeSet<String> {
    let list = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut entries: BTreeSet<String> = list("/run/berth")
        .into_iter()
        .filter(|n| n != "named")
        .collect();
    entries.extend(
        list("/run/berth/named")
            .into_iter()
            .map(|n| format!("named/{n}")),
    );
    entries
}

fn sha256(path: &Path) -> String {
    sh(&format!("sha256sum {}", path.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The node's berth.toml with `edit` applied, put back on drop. Replaced by a rename, so a
/// launcher call never reads half a file.
struct NodeConfig {
    path: PathBuf,
    original: String,
}

impl NodeConfig {
    fn edit(cluster: &Cluster, edit: impl FnOnce(&str) -> String) -> NodeConfig {
        let path = cluster.berth_config();
        let original = std::fs::read_to_string(&path).expect("read berth.toml");
        let config = NodeConfig { path, original };
        let text = edit(&config.original);
        assert_ne!(text, config.original, "the edit changed nothing");
        config.write(&text);
        config
    }

    fn write(&self, text: &str) {
        let temporary = self.path.with_extension("toml.e2e-cve");
        std::fs::write(&temporary, text).unwrap();
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::rename(&temporary, &self.path).unwrap();
    }
}

impl Drop for NodeConfig {
    fn drop(&mut self) {
        self.write(&self.original.clone());
    }
}

/// `text` with `line` added under its `[section]` header.
fn with_line(text: &str, section: &str, line: &str) -> String {
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "no {header:?} in berth.toml");
    text.replacen(&header, &format!("{header}{line}\n"), 1)
}

// ---- CVE-2019-5736: /proc/self/exe overwrite ----------------------------------------------

/// runc re-executed itself into the container, where a process could reopen
/// /proc/<runc>/exe for writing and replace the host's runc. berth's holder and squashfuse
/// are the user's own processes (no root process ever enters the container), the image is
/// a read-only FUSE mount, and the host binaries are root's: every open for writing fails
/// and no binary changes.
#[test]
fn cve_2019_5736_proc_exe_of_the_task_holder_and_helpers_cannot_be_written() {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = Leftovers::now(&cluster);
    let binaries: Vec<PathBuf> = [
        cluster.berth_bin(),
        PathBuf::from("/usr/sbin/slurmstepd"),
        PathBuf::from("/usr/bin/squashfuse"),
        PathBuf::from("/usr/bin/squashfuse_ll"),
    ]
    .into_iter()
    .filter(|p| p.exists())
    .collect();
    let hashes: Vec<String> = binaries.iter().map(|p| sha256(p)).collect();
    // `exec 3>>` opens for writing (O_APPEND) and writes nothing, so even a hole would not
    // damage the cluster's binaries.
    let script = format!(
        "try() {{ if (exec 3>>\"$1\") 2>/dev/null; then echo \"OPENED $1 $2\"; \
         else echo \"refused $1 $2\"; fi; }}; \
         try /proc/self/exe self; try /proc/$$/exe shell; try /proc/$PPID/exe parent; \
         for p in /proc/[0-9]*; do c=$(cat $p/comm 2>/dev/null); \
           case \"$c\" in berth|squashfuse*|slurmstepd) try $p/exe $c;; esac; done; echo {RAN}"
    );
    let run = srun(&[], &cluster.image_tls().reference, &script);
    run.assert_success();
    assert!(
        !run.stdout.contains("OPENED"),
        "a binary was opened for writing:\n{run}"
    );
    for who in ["self", "shell", "berth", "squashfuse", "slurmstepd"] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with("refused") && l.contains(who)),
            "no {who} process was tried:\n{run}"
        );
    }
    for (path, hash) in binaries.iter().zip(&hashes) {
        assert_eq!(&sha256(path), hash, "{} changed", path.display());
    }
    before.assert_none(&cluster, &[]);
}

// ---- CVE-2021-30465: a mount target swapped for a symlink ---------------------------------

/// runc resolved mount destinations with host paths, so a symlink in the container's root
/// (or one swapped in during setup) moved a mount outside it. berth opens each destination
/// with `openat2(RESOLVE_IN_ROOT)` and mounts onto that descriptor: symlinks in the image
/// pointing out of the root resolve inside it.
#[test]
fn cve_2021_30465_mount_destinations_symlinked_out_of_the_root_land_inside_it() {
    let _serial = serial();
    let cluster = Cluster::get();
    let work = Work::new("berth-e2e-cve-30465");
    let image = image_with_layer(
        &work,
        "symlinks",
        "for name, target in [('escape', '/etc'), ('up', '../../../../..'), ('host', '/')]:\n\
         \x20   i = t.TarInfo(name); i.type = t.SYMTYPE; i.linkname = target; tf.addfile(i)\n\
         tf.close()",
    );
    let source = work.0.join("source");
    std::fs::create_dir(&source).unwrap();
    write_user_file(&cluster, &source.join("file"), "from the host\n", 0o644);
    let (a, b, c) = (
        unique_name("cve-a"),
        unique_name("cve-b"),
        unique_name("cve-c"),
    );
    let src = source.display();
    let mounts = format!(
        "--container-mounts={src}:/escape/{a}:x-create=dir,{src}:/up/{b}:x-create=dir,\
         {src}:/host/tmp/{c}:x-create=dir"
    );
    let before = Leftovers::now(&cluster);
    let run = srun(
        &[&mounts],
        &image.reference,
        &format!("cat /etc/{a}/file /{b}/file /tmp/{c}/file && echo {RAN}"),
    );
    run.assert_success();
    assert_eq!(run.stdout.matches("from the host").count(), 3, "{run}");
    for outside in [
        Path::new("/etc").join(&a),
        Path::new("/").join(&b),
        Path::new("/tmp").join(&c),
    ] {
        assert!(!outside.exists(), "{} made on the host", outside.display());
    }
    before.assert_none(&cluster, &[]);
}

/// The race of the CVE: a named, writable container keeps its changes in the user's own
/// directory on the node, so the batch script (on the host, as the user) flips a directory
/// of the container between a directory and a symlink to `/` while its steps mount onto
/// paths below it. Steps may fail in the race; none mounts outside the container's root.
#[test]
fn cve_2021_30465_a_symlink_swapped_in_while_steps_mount_stays_inside() {
    let _serial = serial();
    let cluster = Cluster::get();
    let work = Work::new("berth-e2e-cve-30465-race");
    let source = work.0.join("source");
    std::fs::create_dir(&source).unwrap();
    write_user_file(&cluster, &source.join("file"), "from the host\n", 0o644);
    let mark = unique_name("cve-race");
    let script = format!(
        "#!/bin/sh\n\
         srun --container-image={image} --container-name=cve sh -c 'mkdir /t' || exit 3\n\
         t=/var/tmp/berth-containers/$(id -u)/job-$SLURM_JOB_ID/cve/upper/t\n\
         [ -d $t ] || {{ echo no upper directory $t; exit 4; }}\n\
         (end=$(($(date +%s) + 8)); while [ $(date +%s) -lt $end ]; do\n\
         \x20 if [ -L $t ]; then rm -f $t; mkdir $t; else rm -rf $t; ln -s / $t; fi; done) &\n\
         for i in 1 2 3 4 5 6; do\n\
         \x20 srun --container-name=cve --container-mounts={src}:/t/{mark}-$i:x-create=dir \\\n\
         \x20   sh -c \"cat /t/{mark}-$i/file && echo mounted-$i\"\n\
         done\n\
         wait\n\
         rm -rf $t; ln -s / $t\n\
         srun --container-name=cve --container-mounts={src}:/t/tmp/{mark}:x-create=dir \\\n\
         \x20 sh -c 'cat /tmp/{mark}/file && echo {RAN}'\n",
        image = cluster.image_tls().reference,
        src = source.display(),
    );
    let script_path = cluster.home().join(format!("{mark}.sh"));
    let output = cluster.home().join(format!("{mark}.out"));
    write_user_file(&cluster, &script_path, &script, 0o755);
    let before = Leftovers::now(&cluster);
    let run = Cmd::user([
        "sbatch".to_owned(),
        "--wait".into(),
        format!("--output={}", output.display()),
        script_path.display().to_string(),
    ])
    .timeout(Duration::from_secs(300))
    .run();
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&script_path);
    let _ = std::fs::remove_file(&output);
    assert!(run.success(), "{run}\n{text}");
    assert!(
        text.contains(RAN),
        "the last step did not mount inside:\n{text}"
    );
    for i in 1..=6 {
        let outside = Path::new("/").join(format!("{mark}-{i}"));
        assert!(
            !outside.exists(),
            "{} made on the host:\n{text}",
            outside.display()
        );
    }
    let outside = Path::new("/tmp").join(&mark);
    assert!(
        !outside.exists(),
        "{} made on the host:\n{text}",
        outside.display()
    );
    before.assert_none(&cluster, &[]);
}

// ---- CVE-2024-21626: a leaked descriptor or working directory -----------------------------

/// runc leaked a descriptor of the host's /sys/fs/cgroup into the container, and a
/// working directory of /proc/self/fd/N put the process's cwd outside the root. A task
/// holds only its standard descriptors (and Slurm's PMI one, when asked for), its working
/// directory is inside the root, and `--container-workdir=/proc/self/fd/N` is refused.
#[test]
fn cve_2024_21626_no_descriptor_or_working_directory_from_outside_reaches_a_task() {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = Leftovers::now(&cluster);
    let image = cluster.image_tls().reference;
    // The task's shell execs `ls` (so no shell keeps a descriptor of its own): what it lists
    // is what the task had, plus ls's handle on the directory it reads.
    let fds_script = "echo pmi=${PMI_FD:-none}; exec ls -l /proc/self/fd";
    for mpi in ["--mpi=none", "--mpi=pmi2"] {
        let run = srun(&[mpi, "-n", "2"], &image, fds_script);
        run.assert_success();
        // Each task's own PMI descriptor (their numbers differ between tasks).
        let pmi: Vec<&str> = run
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix("pmi="))
            .filter(|p| *p != "none")
            .collect();
        let expected_pmi = if mpi == "--mpi=pmi2" { 2 } else { 0 };
        assert_eq!(pmi.len(), expected_pmi, "{run}");
        let mut open: Vec<&str> = run
            .stdout
            .lines()
            .filter_map(|l| l.split_once(" -> "))
            .filter(|(_, target)| !(target.starts_with("/proc/") && target.ends_with("/fd")))
            .filter_map(|(left, _)| left.split_whitespace().last())
            .collect();
        open.sort();
        let mut expected = vec!["0", "0", "1", "1", "2", "2"];
        expected.extend(pmi);
        expected.sort();
        assert_eq!(
            open, expected,
            "a descriptor leaked into a task ({mpi}):\n{run}"
        );
    }
    let script = format!("echo cwd=$(readlink /proc/$$/cwd); echo pwd=$(pwd -P); echo {RAN}");
    let run = srun(&["-n", "2"], &image, &script);
    run.assert_success();
    for (cwd, pwd) in run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("cwd="))
        .zip(run.stdout.lines().filter_map(|l| l.strip_prefix("pwd=")))
    {
        assert!(
            cwd == pwd && !cwd.contains("unreachable"),
            "the working directory is outside the root: {cwd} / {pwd}\n{run}"
        );
    }
    for fd in 3..=9 {
        let workdir = format!("--container-workdir=/proc/self/fd/{fd}");
        let run = srun(&[&workdir], &image, &script);
        if run.success() {
            let cwd = run.stdout.lines().find_map(|l| l.strip_prefix("cwd="));
            let pwd = run.stdout.lines().find_map(|l| l.strip_prefix("pwd="));
            assert!(
                cwd == pwd && cwd.is_some_and(|c| !c.contains("unreachable")),
                "{workdir} left the root:\n{run}"
            );
        } else {
            assert_refused(&run, &[&format!("/proc/self/fd/{fd}")]);
        }
    }
    before.assert_none(&cluster, &[]);
}

// ---- CVE-2025-31133, CVE-2025-52565, CVE-2025-52881: /dev/null and /proc tricks ----------

/// runc bound the container's own /dev/null over masked paths and /dev/console, and wrote
/// to /proc files through paths the image could redirect, so an image whose /dev/null is a
/// symlink to /proc/sys/kernel/core_pattern, or whose /proc is a symlink, got writable
/// kernel files. berth's /dev is a fresh tmpfs with the host's device nodes bound in, masks
/// bind the host's /dev/null, and every target resolves inside the root.
#[test]
fn cve_2025_31133_52565_52881_dev_and_proc_symlinks_in_the_image_unmask_nothing() {
    let _serial = serial();
    let cluster = Cluster::get();
    let work = Work::new("berth-e2e-cve-2025");
    let image = image_with_layer(
        &work,
        "devproc",
        "def link(name, target):\n\
         \x20   i = t.TarInfo(name); i.type = t.SYMTYPE; i.linkname = target; tf.addfile(i)\n\
         link('dev/null', '/proc/sys/kernel/core_pattern')\n\
         link('dev/console', '/proc/sysrq-trigger')\n\
         link('dev/ptmx', '/proc/sys/kernel/hostname')\n\
         i = t.TarInfo('xproc'); i.type = t.DIRTYPE; i.mode = 0o555; tf.addfile(i)\n\
         link('proc', '/xproc')\n\
         tf.close()",
    );
    let core_pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let script = format!(
        "echo probe > /dev/null && echo null=written; [ -c /dev/null ] && echo null=device; \
         echo kcore=$(head -c 16 /proc/kcore | wc -c); \
         (echo h > /proc/sysrq-trigger) 2>/dev/null && echo sysrq=written || echo sysrq=refused; \
         (echo '|/tmp/x' > /proc/sys/kernel/core_pattern) 2>/dev/null && echo cp=written || echo cp=refused; \
         (echo cve > /dev/ptmx) 2>/dev/null; (echo h > /dev/console) 2>/dev/null; \
         grep Seccomp: /proc/self/status; grep -E ' /x?proc/' /proc/self/mountinfo; echo {RAN}"
    );
    let before = Leftovers::now(&cluster);
    for options in [&[][..], &["--container-remap-root"][..]] {
        let run = srun(options, &image.reference, &script);
        run.assert_success();
        let out = &run.stdout;
        for expected in [
            "null=written",
            "null=device",
            "sysrq=refused",
            "cp=refused",
            "Seccomp:\t2",
        ] {
            assert!(out.contains(expected), "{expected} ({options:?}):\n{run}");
        }
        // Masked files get a mount over them, read-only paths a read-only one, wherever the
        // image's /proc symlink put /proc (those this node has).
        let mounted = |path: &str| {
            out.lines()
                .find(|l| l.contains(&format!("/xproc/{path} ")))
                .map(str::to_owned)
        };
        for path in ["kcore", "keys", "timer_list", "sched_debug"] {
            if Path::new("/proc").join(path).exists() {
                assert!(
                    mounted(path).is_some(),
                    "/proc/{path} is not masked:\n{run}"
                );
            }
        }
        for path in ["sys", "sysrq-trigger", "fs", "irq", "bus"] {
            if Path::new("/proc").join(path).exists() {
                let line =
                    mounted(path).unwrap_or_else(|| panic!("/proc/{path} is not covered:\n{run}"));
                assert!(
                    line.contains(" ro,"),
                    "/proc/{path} is writable: {line}\n{run}"
                );
            }
        }
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(),
        core_pattern
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        hostname
    );
    before.assert_none(&cluster, &[]);
}

// ---- umoci CVE-2021-29136: tar entries that leave the root --------------------------------

/// umoci followed a `.` symlink (and other links) in a layer and wrote outside the root.
/// berth applies entries with descriptors, refuses absolute and `..` paths, never writes
/// through a symlink and keeps hard links inside the root: each hostile layer is refused
/// naming the entry, nothing is written outside, and no cache entry or staging is left.
#[test]
fn cve_2021_29136_tar_entries_that_leave_the_root_are_refused() {
    let _serial = serial();
    let cluster = Cluster::get();
    let work = Work::new("berth-e2e-cve-29136");
    let mark = unique_name("berth-cve-29136");
    let outside = Path::new("/tmp").join(&mark);
    let file = |path: &str| {
        format!("i = t.TarInfo({path:?}); i.size = 4; tf.addfile(i, io.BytesIO(b'evil'))\n")
    };
    let link = |path: &str, kind: &str, target: &str| {
        format!(
            "i = t.TarInfo({path:?}); i.type = t.{kind}; i.linkname = {target:?}; tf.addfile(i)\n"
        )
    };
    let cases = [
        (
            "dotdot",
            file(&format!("../../../../../../tmp/{mark}")),
            "`..` is not allowed in layer paths",
        ),
        (
            "absolute",
            file(&format!("/tmp/{mark}")),
            "absolute paths are not allowed in layers",
        ),
        (
            "through-symlink",
            link("evil", "SYMTYPE", "/tmp") + &file(&format!("evil/{mark}")),
            "berth never writes through symlinks",
        ),
        (
            "hardlink-out",
            link("passwd", "LNKTYPE", "../../../../etc/passwd"),
            "hard link target `..` is not allowed",
        ),
        (
            "hardlink-absolute",
            link("shadow", "LNKTYPE", "/etc/shadow"),
            "hard link target absolute paths are not allowed",
        ),
        (
            "dot-symlink",
            link(".", "SYMTYPE", "/tmp") + &file(&mark),
            "it would replace the image root",
        ),
        (
            "slash-symlink",
            link("/", "SYMTYPE", "/tmp") + &file(&mark),
            "absolute paths are not allowed in layers",
        ),
    ];
    for (name, script, cause) in cases {
        let image = image_with_layer(&work, name, &format!("{script}tf.close()"));
        let before = Leftovers::now(&cluster);
        let run = srun(&[], &image.reference, &format!("echo {RAN}"));
        assert_refused(&run, &["refusing entry", cause, &image.layers[1]]);
        assert!(!outside.exists(), "{name}: {} written", outside.display());
        before.assert_none(&cluster, &[&image.digest]);
    }
}

// ---- CVE-2022-39237: SIF descriptors with bad offsets, weak hashes ------------------------

/// SIFs for the cases: one written by `berth sif create` from a busybox root, and copies of
/// it whose descriptor table lies (the root file system runs past the end of the file, or
/// into the stored config), or that carry a signature object made with SHA-1.
struct Sifs {
    good: PathBuf,
    eof: PathBuf,
    overlap: PathBuf,
    signed: PathBuf,
}

fn hostile_sifs(cluster: &Cluster, work: &Work) -> Sifs {
    let rootfs = work.0.join("rootfs");
    sh(&format!(
        "mkdir -p {0}/bin && cp /bin/busybox {0}/bin/ && ln -s busybox {0}/bin/sh",
        rootfs.display()
    ));
    let good = work.0.join("good.sif");
    as_root([
        cluster.berth_bin().to_str().unwrap(),
        "sif",
        "create",
        rootfs.to_str().unwrap(),
        good.to_str().unwrap(),
    ])
    .assert_success();
    // The header's descriptor table offset is at byte 96; in a descriptor, the data type
    // is at 0 (0x4004 partition, 0x4006 JSON), offset at 17 and size at 25.
    let patch = |out: &Path, how: &str| {
        sh(&format!(
            "python3 - {0} {1} <<'EOF'\n\
             import struct, sys\n\
             b = bytearray(open(sys.argv[1], 'rb').read())\n\
             table, = struct.unpack_from('<q', b, 96)\n\
             total, = struct.unpack_from('<q', b, 88)\n\
             objs = {{}}\n\
             for n in range(total):\n\
             \x20   d = table + n * 585\n\
             \x20   if b[d + 4]:\n\
             \x20       kind, = struct.unpack_from('<i', b, d)\n\
             \x20       objs[kind] = (d,) + struct.unpack_from('<qq', b, d + 17)\n\
             part, off, size = objs[0x4004]\n\
             {how}\n\
             open(sys.argv[2], 'wb').write(b)\n\
             EOF",
            good.display(),
            out.display()
        ));
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o644)).unwrap();
    };
    let eof = work.0.join("eof.sif");
    patch(
        &eof,
        "struct.pack_into('<q', b, part + 25, len(b) - off + 4096)",
    );
    let overlap = work.0.join("overlap.sif");
    patch(
        &overlap,
        "_, joff, jsize = objs[0x4006]\n\
         assert joff > off, 'the config follows the partition'\n\
         struct.pack_into('<q', b, part + 25, joff - off + 1)",
    );
    // A signature object (type 0x4005) in a free descriptor slot, over the partition, its
    // PGP armour naming SHA-1: what the vulnerable sif library accepted as a signature.
    let signed = work.0.join("signed.sif");
    patch(
        &signed,
        "free = next(n for n in range(total) if not b[table + n * 585 + 4])\n\
         d = table + free * 585\n\
         sig = b'-----BEGIN PGP SIGNED MESSAGE-----\\nHash: SHA1\\n\\n' + bytes(64)\n\
         struct.pack_into('<iBIIIqqq', b, d, 0x4005, 1, 99, 0, 1, len(b), len(sig), len(sig))\n\
         struct.pack_into('<i', b, d + 201, 1)\n\
         b += sig",
    );
    Sifs {
        good,
        eof,
        overlap,
        signed,
    }
}

/// Apptainer's sif library trusted descriptor offsets and accepted signatures made with
/// weak hashes. berth checks every object against the file and the others, and never takes
/// a hash or signature inside a SIF as proof: a registry image is what root built from
/// blobs verified by sha256/sha512 and sealed (root-owned, 0644, its name and embedded
/// digest agreeing), and digests of other algorithms are refused.
#[test]
fn cve_2022_39237_sifs_with_bad_offsets_or_only_weak_hashes_are_refused() {
    let _serial = serial();
    let cluster = Cluster::get();
    let work = Work::new("berth-e2e-cve-39237");
    let sifs = hostile_sifs(&cluster, &work);
    let berth = cluster.berth_bin().display().to_string();
    let user_run = |args: &[&str]| {
        let mut all = vec![berth.as_str()];
        all.extend_from_slice(args);
        Cmd::user(all).run()
    };
    for sif in [&sifs.good, &sifs.signed] {
        user_run(&["exec", sif.to_str().unwrap(), "sh", "-c", "true"]).assert_success();
    }
    for (sif, cause) in [
        (&sifs.eof, "but the file has only"),
        (&sifs.overlap, "overlap"),
    ] {
        for args in [
            vec!["sif", "inspect", sif.to_str().unwrap()],
            vec!["exec", sif.to_str().unwrap(), "sh", "-c", "echo ran"],
        ] {
            let run = user_run(&args);
            assert_refused(&run, &["corrupt or truncated image", cause]);
            assert!(!run.stdout.contains("ran"), "{run}");
        }
    }

    // The node cache: a cached image replaced by a corrupt one (what a subverted service
    // user, or a bad disk, could leave) is refused by the seal check, as is a signed SIF.
    let image = push_layers(
        &cluster.tls_registry().host,
        &[],
        &unique_name("cve-sealed"),
        "v",
        &[base_layer()],
        "sealed",
    );
    let pinned = image.by_digest();
    srun(&[], &pinned, &format!("echo {RAN}")).assert_success();
    let hex = image.digest.strip_prefix("sha256:").unwrap();
    let name = cache_entries("images")
        .into_iter()
        .find(|n| n.starts_with(hex))
        .expect("the image is cached");
    let cached = Path::new(NODE_CACHE).join("images").join(name);
    let planted = Planted(cached.clone());
    let berth_uid = sh("id -u berth").trim().parse::<u32>().unwrap();
    let cases = [
        (&sifs.eof, 0, "corrupt or truncated image"),
        (&sifs.overlap, 0, "overlap"),
        // Signed, but that counts for nothing: left by the service user, it is sealed by
        // root on the owner's hit and refused for what it holds.
        (&sifs.signed, berth_uid, "not what its name says"),
        // Root's and sound, but not the image its name says.
        (&sifs.good, 0, "not what its name says"),
    ];
    let before = Leftovers::now(&cluster);
    for (sif, owner, cause) in cases {
        planted.put(sif, owner);
        let run = srun(&[], &pinned, &format!("echo {RAN}"));
        assert_refused(&run, &[cause]);
        before.assert_none(&cluster, &[]);
    }
    drop(planted);
    srun(&[], &pinned, &format!("echo {RAN}")).assert_success();

    // Digests are sha256 or sha512: a weaker one is refused at submission and on the node.
    let weak = format!(
        "localhost:5000/test/busybox@sha1:{}",
        "0123456789abcdef0123".repeat(2)
    );
    let run = srun(&[], &weak, &format!("echo {RAN}"));
    assert_refused(&run, &["unsupported digest algorithm `sha1`"]);
    let bypass = PluginlessConf::new(&cluster);
    let run = bypass.srun(&format!("container-image={weak}"), &["echo", RAN]);
    assert_refused(&run, &["unsupported digest algorithm `sha1`"]);
    before.assert_none(&cluster, &[]);
}

/// A file planted at a cached image's path; removed on drop, so the next job fetches the
/// image again.
struct Planted(PathBuf);

impl Planted {
    fn put(&self, from: &Path, owner: u32) {
        let temporary = self.0.with_extension("e2e-cve");
        std::fs::copy(from, &temporary).unwrap();
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&temporary, Some(owner), Some(owner)).unwrap();
        std::fs::rename(&temporary, &self.0).unwrap();
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---- device nodes and set-id files in layers ----------------------------------------------

/// A static program that prints its real and effective ids.
const IDS_C: &str = r#"#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("ids %d %d %d %d\n", (int)getuid(), (int)geteuid(), (int)getgid(), (int)getegid());
    return 0;
}
"#;

/// Device nodes in a layer are never created (a root-built cache must not hold device files
/// users could reach), and set-id files keep their bits in the image but give nothing: the
/// image is mounted nosuid and every task has no_new_privs.
#[test]
fn device_nodes_and_setid_files_in_layers_give_nothing() {
    let _serial = serial();
    let cluster = Cluster::get();
    let work = Work::new("berth-e2e-cve-devices");
    let ids = work.0.join("ids");
    std::fs::write(work.0.join("ids.c"), IDS_C).unwrap();
    sh(&format!(
        "cc -static -O -o {} {}/ids.c",
        ids.display(),
        work.0.display()
    ));
    let image = image_with_layer(
        &work,
        "devices",
        &format!(
            "for name, kind, major, minor in [('opt/mem', t.CHRTYPE, 1, 1), \
             ('opt/kmsg', t.CHRTYPE, 1, 11), ('opt/sda', t.BLKTYPE, 8, 0), ('opt/fifo', t.FIFOTYPE, 0, 0)]:\n\
             \x20   i = t.TarInfo(name); i.type = kind; i.devmajor = major; i.devminor = minor\n\
             \x20   i.mode = 0o666; tf.addfile(i)\n\
             ids = open({:?}, 'rb').read()\n\
             for name, mode in [('opt/suid', 0o4755), ('opt/sgid', 0o2755)]:\n\
             \x20   i = t.TarInfo(name); i.size = len(ids); i.mode = mode; i.uid = 0; i.gid = 0\n\
             \x20   tf.addfile(i, io.BytesIO(ids))\n\
             tf.close()",
            ids.display().to_string()
        ),
    );
    let script = format!(
        "for f in mem kmsg sda fifo; do [ -e /opt/$f ] && echo present $f || echo absent $f; done; \
         stat -c 'mode %a %n' /opt/suid /opt/sgid; /opt/suid; /opt/sgid; \
         grep NoNewPrivs: /proc/self/status; echo {RAN}"
    );
    let before = Leftovers::now(&cluster);
    for options in [&[][..], &["--container-remap-root"][..]] {
        let run = srun(options, &image.reference, &script);
        run.assert_success();
        for f in ["mem", "kmsg", "sda", "fifo"] {
            assert!(run.stdout.contains(&format!("absent {f}")), "{f}:\n{run}");
        }
        assert!(run.stdout.contains("mode 4755 /opt/suid"), "{run}");
        assert!(run.stdout.contains("mode 2755 /opt/sgid"), "{run}");
        let lines: Vec<&str> = run
            .stdout
            .lines()
            .filter(|l| l.starts_with("ids "))
            .collect();
        assert_eq!(lines.len(), 2, "{run}");
        for line in lines {
            let ids: Vec<&str> = line.split(' ').skip(1).collect();
            assert!(
                ids[0] == ids[1] && ids[2] == ids[3],
                "a set-id bit took effect ({options:?}): {line}\n{run}"
            );
        }
        assert!(run.stdout.contains("NoNewPrivs:\t1"), "{run}");
    }
    before.assert_none(&cluster, &[]);
}

// ---- a decompression bomb -----------------------------------------------------------------

/// A Python layer script of `count` files of `mib` MiB of zeros: a few hundred KiB of gzip.
fn zeros(count: u32, mib: u32) -> String {
    format!(
        "for n in range({count}):\n\
         \x20   i = t.TarInfo('zero%d' % n); i.size = {mib} << 20\n\
         \x20   tf.addfile(i, io.BytesIO(bytes({mib} << 20)))\n\
         tf.close()"
    )
}

/// A small gzip layer that inflates past `[cache] max_image_size` is stopped at the limit
/// with the key to raise, before more is written, in bounded memory.
#[test]
fn a_decompression_bomb_stops_at_the_image_size_limit() {
    let _serial = serial();
    let cluster = Cluster::get();
    let work = Work::new("berth-e2e-cve-bomb");
    let image = image_with_layer(&work, "bomb", &zeros(24, 8));
    let compressed = std::fs::metadata(work.0.join("bomb/layer.tar.gz"))
        .unwrap()
        .len();
    assert!(compressed < 1 << 20, "the bomb is {compressed} bytes");
    let _config = NodeConfig::edit(&cluster, |text| {
        with_line(text, "cache", "max_image_size = \"64M\"")
    });
    let before = Leftovers::now(&cluster);
    let run = srun(&[], &image.reference, &format!("echo {RAN}"));
    assert_refused(&run, &["max_image_size = 64.0M"]);
    before.assert_none(&cluster, &[&image.digest]);

    // The same fetch as root's node call makes it, measured: memory stays small.
    let scratch = ScratchBerth::new("berth-e2e-cve-bomb", |dir| {
        format!(
            "[policy]\nallowed = [\"localhost:5000/*\"]\n[cache]\ndir = \"{}\"\n\
             max_image_size = \"64M\"\n[registry]\ncerts_dir = \"{}\"\n",
            dir.join("cache").display(),
            cluster.certs_dir().display()
        )
    });
    let mut args = vec![
        "/usr/bin/time".to_owned(),
        "-f".into(),
        "maxrss=%M".into(),
        scratch.berth.display().to_string(),
        "--config".into(),
        scratch.config.display().to_string(),
    ];
    args.extend(["fetch".into(), image.reference.clone()]);
    let run = Cmd::root(args).run();
    assert_refused(&run, &["max_image_size = 64.0M"]);
    let rss_kib: u64 = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("maxrss="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no maxrss:\n{run}"));
    assert!(rss_kib < 256 << 10, "the fetch used {rss_kib} KiB:\n{run}");
}

// ---- an image that claims more than the disk holds ----------------------------------------

/// A tmpfs of `mib` MiB mounted on `dir` (root's, 0755), unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, mib: u32) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        as_root([
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=755"),
            "berth-e2e-cve",
            dir.to_str().unwrap(),
        ])
        .assert_success();
        SmallDisk(dir.to_owned())
    }

    fn used_kib(&self) -> u64 {
        sh(&format!("du -sk {} | cut -f1", self.0.display()))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A manifest whose layer sizes claim more than the limit or the disk is refused before a
/// blob is downloaded; a layer of zeros that inflates to twice the disk builds into a small
/// image (zero blocks are holes) and leaves no staging.
#[test]
fn an_image_larger_than_the_disk_is_refused_before_writing_or_stopped_cleanly() {
    let _serial = serial();
    let cluster = Cluster::get();
    let registry = cluster.tls_registry();
    let work = Work::new("berth-e2e-cve-disk");
    // One real image, and a second manifest in its repository that reuses its blobs and
    // claims 20 GiB for each layer.
    let real = image_with_layer(&work, "full", &zeros(12, 8));
    let mut manifest = registry_manifest(&real);
    for layer in manifest["layers"].as_array_mut().unwrap() {
        layer["size"] = serde_json::json!(20u64 << 30);
    }
    let claims = put_manifest(repository(&real), "claims", &manifest);

    // Through Slurm: over the node's max_image_size (10G) before anything is downloaded.
    let log = registry.log_cursor();
    let before = Leftovers::now(&cluster);
    let run = srun(&[], &claims, &format!("echo {RAN}"));
    assert_refused(&run, &["compressed", "max_image_size"]);
    std::thread::sleep(Duration::from_millis(300));
    for layer in &real.layers {
        assert!(
            access_lines(&log.read_new(), &format!("blobs/{layer}")).is_empty(),
            "a blob was downloaded"
        );
    }
    before.assert_none(&cluster, &[]);

    // A node cache on a 48 MiB disk, as root's node fetch uses it.
    let scratch = ScratchBerth::new("berth-e2e-cve-disk", |dir| {
        format!(
            "[policy]\nallowed = [\"localhost:5000/*\"]\n[cache]\ndir = \"{}\"\n\
             max_image_size = \"100G\"\n[registry]\ncerts_dir = \"{}\"\n",
            dir.join("cache").display(),
            cluster.certs_dir().display()
        )
    });
    let disk = SmallDisk::mount(&scratch.dir.join("cache"), 48);
    let run = scratch.berth(&["fetch", &claims]);
    assert_refused(&run, &["not enough free space", "[cache] dir"]);
    // The real image inflates to 96 MiB of zeros, twice the disk: berth's squashfs stores
    // zero blocks as holes, so it builds in a few hundred KiB and does not fill the disk.
    // (A build that does fill it stops cleanly: faults::a_cache_file_system_that_fills_mid_build.)
    let run = scratch.berth(&["fetch", &real.reference]);
    run.assert_success();
    let left: Vec<_> = std::fs::read_dir(disk.0.join("tmp"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "tmp holds {left:?} after the builds");
    assert!(disk.used_kib() < 8 << 10, "{} KiB used", disk.used_kib());
}

/// The repository name of an image pushed to `test/NAME` (NAME).
fn repository(image: &Pushed) -> &str {
    let (name, _) = image.reference.rsplit_once(':').unwrap();
    name.rsplit_once("/test/").unwrap().1
}

/// The manifest the registry holds for `image`.
fn registry_manifest(image: &Pushed) -> serde_json::Value {
    let cluster = Cluster::get();
    let text = sh(&format!(
        "curl -fsS --cacert {} -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
         {}/v2/test/{}/manifests/{}",
        cluster.ca_cert().display(),
        cluster.tls_registry().url(),
        repository(image),
        image.digest
    ));
    serde_json::from_str(&text).unwrap()
}

// ---- a manifest or blob redirected to an unapproved host ----------------------------------

/// A registry in front of the approved one on a port of its own (plain HTTP): it passes
/// requests for `test/busybox` through, answers manifest requests for `test/redirect-
/// manifest` and blob requests for `test/redirect-blob` with a redirect to the unapproved
/// registry, and prints its port first.
const REDIRECTOR: &str = r#"
import http.server, ssl, sys, urllib.request, urllib.error
upstream, ca, elsewhere = sys.argv[1], sys.argv[2], sys.argv[3]
context = ssl.create_default_context(cafile=ca)
class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, body):
        path = self.path
        for repo in ("redirect-manifest", "redirect-blob"):
            path = path.replace("/test/%s/" % repo, "/test/busybox/")
        if ("/test/redirect-manifest/manifests/" in self.path
                or "/test/redirect-blob/blobs/" in self.path):
            self.send_response(307)
            self.send_header("Location", elsewhere + path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = urllib.request.Request(upstream + path, method=self.command)
        if self.headers.get("Accept"):
            request.add_header("Accept", self.headers["Accept"])
        try:
            reply = urllib.request.urlopen(request, context=context)
        except urllib.error.HTTPError as e:
            reply = e
        data = reply.read()
        self.send_response(reply.status if hasattr(reply, "status") else reply.code)
        for key in ("Content-Type", "Docker-Content-Digest", "Docker-Distribution-Api-Version"):
            if reply.headers.get(key):
                self.send_header(key, reply.headers[key])
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
    def do_GET(self):
        self.answer(True)
    def do_HEAD(self):
        self.answer(False)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// [`REDIRECTOR`] running; killed on drop.
struct Redirector {
    child: Child,
    host: String,
}

impl Redirector {
    fn start(cluster: &Cluster, work: &Work) -> Redirector {
        let script = work.0.join("redirector.py");
        std::fs::write(&script, REDIRECTOR).unwrap();
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(cluster.tls_registry().url())
            .arg(cluster.ca_cert())
            .arg(cluster.plain_registry().url())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut port = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut port,
        )
        .unwrap();
        Redirector {
            child,
            host: format!("localhost:{}", port.trim()),
        }
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An approved registry that redirects a manifest or a blob to a host the site did not
/// approve (`localhost:5001`): berth refuses the redirect, naming the host and the setting,
/// without contacting that host; the same registry's own answers still work.
#[test]
fn a_manifest_or_blob_redirected_to_an_unapproved_host_is_refused_unvisited() {
    let _serial = serial();
    let cluster = Cluster::get();
    let work = Work::new("berth-e2e-cve-redirect");
    let redirector = Redirector::start(&cluster, &work);
    let host = redirector.host.clone();
    let _config = NodeConfig::edit(&cluster, |text| {
        let text = text.replacen("allowed = [", &format!("allowed = [\"{host}/*\", "), 1);
        text.replacen("plain_http = [", &format!("plain_http = [\"{host}\""), 1)
    });
    let elsewhere = cluster.plain_registry().log_cursor();
    let before = Leftovers::now(&cluster);
    let run = srun(&[], &format!("{host}/test/busybox"), &format!("echo {RAN}"));
    run.assert_success();
    assert!(run.stdout.contains(RAN), "{run}");
    for (repo, cause) in [
        ("redirect-manifest", "only within the registry"),
        ("redirect-blob", "[registry] blob_hosts"),
    ] {
        let run = srun(&[], &format!("{host}/test/{repo}"), &format!("echo {RAN}"));
        assert_refused(&run, &["refusing redirect to http://localhost:5001", cause]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let text = elsewhere.read_new();
    assert!(
        access_lines(&text, "/v2/").is_empty(),
        "the unapproved registry was contacted:\n{text}"
    );
    before.assert_none(&cluster, &[]);
}
