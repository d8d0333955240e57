//! pyxis's behaviours that its own bats suite cannot see (issue 13), end to end on the real
//! cluster as the test user: named containers kept across a job's steps, entered while
//! running, and removed at job end and after scancel; writable containers writing to local
//! disk, not the job's memory, under the site's size limit; the remapped root installing a
//! package with apt-get, and the image's files owned as under enroot.
//! Needs `tests/cluster/up`; fails (does not skip) without it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_e2e::{as_root, serial, unique_name, wait_until, Batch, Cluster, Cmd, Run};

/// Where the test cluster's containers keep their files (`[runtime] writable_dir`).
const WRITABLE_DIR: &str = "/var/tmp/berth-containers";
/// Where root records named containers on the node.
const RECORD_DIR: &str = "/run/berth/named";

fn image(cluster: &Cluster) -> String {
    cluster.image_tls().reference
}

/// The directory of job `job`'s named containers of the test user on the node.
fn job_dir(cluster: &Cluster, job: &str) -> PathBuf {
    Path::new(WRITABLE_DIR)
        .join(cluster.uid().to_string())
        .join(format!("job-{job}"))
}

/// Shell lines of a batch script that wait (up to about 30 s) until a step entering named
/// container `name` finds `check` true in it: the step started in the background runs.
/// Each step asks for a little memory: by default a step takes all of the job's, and an
/// overlapping one would wait for it.
fn until_running(name: &str, check: &str) -> String {
    format!(
        "i=0\nuntil srun --overlap --mem=100M --container-name={name}:exec {check} 2>/dev/null; do\n    \
         i=$((i + 1)); [ $i -lt 60 ] || {{ echo never-running; exit 1; }}; sleep 0.5\ndone"
    )
}

/// Waits for the job epilog to remove job `job`'s named containers and their records.
fn assert_removed(cluster: &Cluster, job: &str) {
    let files = job_dir(cluster, job);
    let record = Path::new(RECORD_DIR).join(job);
    assert!(
        wait_until(Duration::from_secs(30), || !files.exists()
            && !record.exists()),
        "job {job} ended but {} or {} is still there",
        files.display(),
        record.display()
    );
}

#[test]
fn a_named_container_keeps_its_files_across_the_jobs_steps_and_goes_with_the_job() {
    let _serial = serial();
    let cluster = Cluster::get();
    let img = image(&cluster);
    // The batch script itself runs on the host: it can look at the node's disk.
    let batch = Batch::new(
        &cluster,
        "e2e-pyxis",
        &format!(
            r#"#!/bin/sh
set -u
srun --container-image={img} --container-name=keep sh -c 'echo kept-data > /kept'
echo "second: $(srun --container-name=keep cat /kept)"
echo "unnamed: $(srun --container-image={img} cat /kept 2>&1)"
echo "on-disk: $(cat {WRITABLE_DIR}/$(id -u)/job-$SLURM_JOB_ID/keep/upper/kept)"
srun --container-name=keep:create true 2>&1 | sed 's/^/create: /'
srun --container-name=other true 2>&1 | sed 's/^/missing: /'
srun --container-name=keep:exec true 2>&1 | sed 's/^/exec: /'
srun --container-image={img} --container-name=keep:no_exec cat /kept | sed 's/^/no_exec: /'
"#
        ),
    );
    let (run, job) = batch.submit(&["--wait"]);
    run.assert_success();
    let out = batch.output();
    assert!(out.contains("second: kept-data"), "{out}");
    assert!(
        out.contains("on-disk: kept-data"),
        "written to local disk:\n{out}"
    );
    assert!(
        // srun's own error line may come first in the captured output.
        out.contains("unnamed: ") && out.contains("cat: can't open '/kept'"),
        "an unnamed container starts afresh:\n{out}"
    );
    assert!(
        out.contains("create: ") && out.contains("already exists"),
        "{out}"
    );
    assert!(
        out.contains("missing: ") && out.contains("no container named 'other'"),
        "{out}"
    );
    assert!(
        out.contains("exec: ") && out.contains("is not running"),
        "{out}"
    );
    assert!(out.contains("no_exec: kept-data"), "{out}");
    assert_removed(&cluster, &job);
    cluster.assert_node_healthy();
}

#[test]
fn a_running_named_container_is_entered_by_an_overlapping_step() {
    let _serial = serial();
    let cluster = Cluster::get();
    let img = image(&cluster);
    // /tmp is the container's own tmpfs, not part of its kept files: only a step inside the
    // running container sees what the first step put there.
    let batch = Batch::new(
        &cluster,
        "e2e-pyxis",
        &format!(
            r#"#!/bin/sh
set -u
srun --mem=100M --container-image={img} --container-name=live sh -c 'touch /tmp/first; sleep 20' &
first=$!
{wait_live}
srun --overlap --mem=100M --container-name=live --container-mounts=/tmp:/hostmnt sh -c \
    'test -e /tmp/first && echo entered; test -e /hostmnt || echo no-new-mounts' 2>&1
kill $first
wait
"#,
            wait_live = until_running("live", "test -e /tmp/first"),
        ),
    );
    let (run, job) = batch.submit(&["--wait"]);
    run.assert_success();
    let out = batch.output();
    assert!(out.contains("entered"), "{out}");
    assert!(out.contains("no-new-mounts"), "{out}");
    assert!(
        out.contains("ignoring --container-mounts"),
        "the entering step says its mounts are ignored:\n{out}"
    );
    assert_removed(&cluster, &job);
}

/// `--container-name=NAME:no_exec` while another step runs NAME (pyxis starts a second
/// copy on the same files): berth runs a copy whose own writes lie over the container's,
/// never two writers on one overlay upper layer. The copy sees the container's files, is
/// not in the running step's namespaces, and what it writes goes when it ends, as its
/// temporary layer does.
#[test]
fn a_no_exec_step_on_a_running_named_container_runs_a_copy_over_it() {
    let _serial = serial();
    let cluster = Cluster::get();
    let img = image(&cluster);
    let batch = Batch::new(
        &cluster,
        "e2e-pyxis",
        &format!(
            r#"#!/bin/sh
set -u
srun --mem=100M --container-image={img} --container-name=shared \
    sh -c 'echo base > /base; touch /tmp/first; sleep 20' &
first=$!
{wait_shared}
srun --overlap --mem=100M --container-name=shared:no_exec sh -c \
    'test -e /tmp/first || echo not-entered; echo "copy sees $(cat /base)"; echo c > /copy' 2>&1
srun --overlap --mem=100M --container-name=shared sh -c 'test -e /copy || echo copy-writes-gone'
kill $first
wait
srun --mem=100M --container-name=shared sh -c 'cat /base; test -e /copy || echo still-gone'
echo "temporary layers left: $(ls {WRITABLE_DIR}/$(id -u) | grep -c '^tmp-')"
"#,
            wait_shared = until_running("shared", "test -e /tmp/first"),
        ),
    );
    let (run, job) = batch.submit(&["--wait"]);
    run.assert_success();
    let out = batch.output();
    for line in [
        "not-entered",
        "copy sees base",
        "this step runs a copy of it",
        "copy-writes-gone",
        "still-gone",
        "temporary layers left: 0",
    ] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    assert!(out.lines().any(|l| l == "base"), "{out}");
    assert_removed(&cluster, &job);
    cluster.assert_node_healthy();
}

/// A step's unnamed container is entered by `--container-name=JOBID.STEPID` while it runs,
/// as in pyxis, confined as every joined task is (seccomp, no new privileges); only from
/// its own job, and not once it has stopped.
#[test]
fn a_steps_unnamed_container_is_entered_by_jobid_stepid() {
    let _serial = serial();
    let cluster = Cluster::get();
    let img = image(&cluster);
    let step_file = cluster.home().join(unique_name("e2e-step"));
    let batch = Batch::new(
        &cluster,
        "e2e-pyxis",
        &format!(
            r#"#!/bin/sh
set -u
srun --mem=100M --container-image={img} --container-mounts={home}:/out sh -c \
    'touch /tmp/first; echo $SLURM_STEP_ID > /out/{name}.tmp; mv /out/{name}.tmp /out/{name}; sleep 20' &
first=$!
until [ -s {step} ]; do sleep 0.2; done
name=$SLURM_JOB_ID.$(cat {step})
{wait_step}
srun --overlap --mem=100M --container-name=$name sh -c \
    'test -e /tmp/first && echo entered; grep -E "^(Seccomp|NoNewPrivs):" /proc/self/status'
kill $first
wait
srun --mem=100M --container-name=$name true 2>&1 | sed 's/^/after: /'
echo done
"#,
            step = step_file.display(),
            home = cluster.home().display(),
            name = step_file.file_name().unwrap().to_string_lossy(),
            wait_step = until_running("$name", "test -e /tmp/first"),
        ),
    );
    let (run, job) = batch.submit(&["--mem=300M"]);
    run.assert_success();
    assert!(
        wait_until(Duration::from_secs(60), || step_file.exists()),
        "job {job}'s step never started:\n{}",
        batch.output()
    );
    let step = std::fs::read_to_string(&step_file).unwrap();
    // Another job of the same user names it: not that job's container.
    let other = Cmd::user([
        "srun",
        "--mem=100M",
        &format!("--container-name={job}.{}", step.trim()),
        "true",
    ])
    .timeout(Duration::from_secs(60))
    .run();
    other.assert_failure();
    assert!(other.stderr.contains("no container named"), "{other}");
    assert!(
        wait_until(Duration::from_secs(90), || batch.output().contains("done")),
        "job {job} did not end:\n{}",
        batch.output()
    );
    let _ = std::fs::remove_file(&step_file);
    let out = batch.output();
    assert!(out.contains("entered"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(
        out.contains("after: ") && out.contains("no container named"),
        "a stopped step's container is gone:\n{out}"
    );
    // Its record went with it, before the job's end.
    let record = Path::new(RECORD_DIR).join(&job);
    assert!(!record.exists(), "{} is left", record.display());
    cluster.assert_node_healthy();
}

/// A writable container has the user in its own passwd, group and shadow files (as
/// enroot writes them), which groupadd and useradd can replace: openssh's postinst runs
/// them, and PAM's account check (sshd) needs the shadow entry. A read-only one has them
/// bound, read-only, over the image's.
#[test]
fn a_writable_container_has_the_user_in_its_own_passwd_group_and_shadow() {
    let _serial = serial();
    let cluster = Cluster::get();
    let user = cluster.user();
    let added = in_debian(
        &["--container-remap-root", "--container-writable"],
        "groupadd -r e2egroup && useradd -r -g e2egroup e2euser && \
         grep -c '^e2e' /etc/group /etc/passwd",
    );
    added.assert_success();
    assert!(added.stdout.contains("/etc/group:1"), "{added}");
    assert!(added.stdout.contains("/etc/passwd:1"), "{added}");
    let script = format!(
        "grep -c '^{user}:' /etc/passwd /etc/shadow; grep -q ' /etc/passwd ' /proc/self/mountinfo \
         && echo passwd-bound; true"
    );
    let writable = in_debian(&["--container-writable"], &script);
    writable.assert_success();
    assert!(writable.stdout.contains("/etc/passwd:1"), "{writable}");
    assert!(writable.stdout.contains("/etc/shadow:1"), "{writable}");
    assert!(!writable.stdout.contains("passwd-bound"), "{writable}");
    let readonly = in_debian(&[], &script);
    assert!(readonly.stdout.contains("/etc/passwd:1"), "{readonly}");
    assert!(readonly.stdout.contains("passwd-bound"), "{readonly}");
    cluster.assert_node_healthy();
}

#[test]
fn scancel_removes_the_jobs_named_containers() {
    let _serial = serial();
    let cluster = Cluster::get();
    let img = image(&cluster);
    let batch = Batch::new(
        &cluster,
        "e2e-pyxis",
        &format!(
            "#!/bin/sh\nsrun --container-image={img} --container-name=gone sh -c \
             'echo x > /data; sleep 120'\n"
        ),
    );
    let (run, job) = batch.submit(&[]);
    run.assert_success();
    let upper = job_dir(&cluster, &job).join("gone/upper/data");
    assert!(
        wait_until(Duration::from_secs(60), || upper.exists()),
        "job {job}'s named container never wrote {}:\n{}",
        upper.display(),
        batch.output()
    );
    Cmd::user(["scancel", &job]).run().assert_success();
    assert_removed(&cluster, &job);
    cluster.assert_node_healthy();
}

/// The `shmem` line of a memory cgroup's memory.stat: tmpfs pages charged to it.
const SHMEM_OF_TASK: &str = r#"cg=$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup); sed -n 's/^total_shmem //p' /sys/fs/cgroup/memory$cg/memory.stat"#;

#[test]
fn what_a_writable_container_writes_is_on_disk_not_in_the_jobs_memory() {
    let _serial = serial();
    let cluster = Cluster::get();
    // 100 MiB into a 64 MiB job: a tmpfs root would be charged for all of it (killed or
    // out of space); on disk the page cache is written back and reclaimed.
    let run = Cmd::user([
        "srun",
        "--mem=64M",
        &format!("--container-image={}", image(&cluster)),
        "--container-writable",
        "sh",
        "-c",
        &format!(
            "dd if=/dev/zero of=/big bs=1M count=100 2>/dev/null && ls -l /big && \
             echo shmem=$({SHMEM_OF_TASK})"
        ),
    ])
    .run();
    run.assert_success();
    assert!(run.stdout.contains("104857600"), "{run}");
    let shmem: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("shmem="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shmem figure:\n{run}"));
    assert!(
        shmem < 16 << 20,
        "{shmem} bytes of tmpfs charged to the job: the writes are in its memory\n{run}"
    );
    // Nothing left behind once the container stopped.
    let user_dir = Path::new(WRITABLE_DIR).join(cluster.uid().to_string());
    let left = as_root(["find", &user_dir.display().to_string(), "-name", "tmp-*"]);
    assert_eq!(left.stdout.trim(), "", "left behind: {left}");
}

#[test]
fn a_writable_container_turns_read_only_past_the_size_limit() {
    let _serial = serial();
    let cluster = Cluster::get();
    // The test cluster's [runtime] writable_max_size is 500M.
    let run = Cmd::user([
        "srun",
        &format!("--container-image={}", image(&cluster)),
        "--container-writable",
        "sh",
        "-c",
        "touch /small && dd if=/dev/zero of=/big bs=1M count=600 2>/dev/null; sleep 3; \
         touch /after",
    ])
    .run();
    run.assert_failure();
    assert!(run.stderr.contains("Read-only file system"), "{run}");
    assert!(
        run.stderr.contains("writable_max_size"),
        "the user is told why:\n{run}"
    );
}

/// The node's configuration with local image files allowed from `dir` (root's, listed in
/// `local_image_dirs`); put back on drop.
struct AllowLocalImages {
    config: PathBuf,
    original: String,
}

impl AllowLocalImages {
    fn from(cluster: &Cluster, dir: &Path) -> AllowLocalImages {
        let config = cluster.berth_config();
        let original = std::fs::read_to_string(&config).expect("read berth.toml");
        let text = original
            .replace("local_images = false", "local_images = true")
            .replace(
                "local_image_dirs = []",
                &format!("local_image_dirs = [{:?}]", dir.display().to_string()),
            );
        assert_ne!(
            text, original,
            "nothing to switch in berth.toml:\n{original}"
        );
        let guard = AllowLocalImages { config, original };
        guard.install(&text);
        guard
    }

    /// In one rename, so no launcher call reads half a file.
    fn install(&self, text: &str) {
        let temporary = self.config.with_extension("toml.pyxis");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, &self.config).unwrap();
    }
}

impl Drop for AllowLocalImages {
    fn drop(&mut self) {
        self.install(&self.original.clone());
    }
}

#[test]
fn a_saved_container_runs_only_where_the_site_allows_local_images() {
    let _serial = serial();
    let cluster = Cluster::get();
    let saved = cluster
        .home()
        .join(format!("{}.sif", unique_name("e2e-saved")));
    let run = Cmd::user([
        "srun",
        &format!("--container-image={}", image(&cluster)),
        &format!("--container-save={}", saved.display()),
        "sh",
        "-c",
        "echo saved-data > /marker",
    ])
    .run();
    run.assert_success();
    assert!(saved.is_file(), "no {}:\n{run}", saved.display());
    let mut magic = [0u8; 10];
    std::io::Read::read_exact(&mut std::fs::File::open(&saved).unwrap(), &mut magic).unwrap();
    assert_eq!(&magic, b"#!/usr/bin", "a SIF starts with its launch script");

    // By default the site runs no local image files, and says which setting would.
    let run = Cmd::user([
        "srun",
        &format!("--container-image={}", saved.display()),
        "cat",
        "/marker",
    ])
    .run();
    run.assert_failure();
    assert!(run.stderr.contains("local_images"), "{run}");

    // Where the admin allows local images from a directory of theirs, it runs.
    let dir = PathBuf::from("/var/lib").join(unique_name("berth-e2e-saved"));
    std::fs::create_dir(&dir).unwrap();
    let installed = dir.join("saved.sif");
    std::fs::copy(&saved, &installed).unwrap();
    let outcome = {
        let _allowed = AllowLocalImages::from(&cluster, &dir);
        Cmd::user([
            "srun",
            &format!("--container-image={}", installed.display()),
            "cat",
            "/marker",
        ])
        .run()
    };
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&saved);
    outcome.assert_success();
    assert!(outcome.stdout.contains("saved-data"), "{outcome}");
}

/// This process's namespace of `kind` (the node's: the tests run on the host).
fn host_ns(kind: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn unshare_gives_the_step_its_own_namespaces_shared_by_its_tasks() {
    let _serial = serial();
    let cluster = Cluster::get();
    let img = format!("--container-image={}", image(&cluster));
    let show = "for n in net ipc uts; do readlink /proc/self/ns/$n; done; \
                ip link show lo | head -1";
    let run = Cmd::user([
        "srun",
        "-n2",
        "--overcommit",
        "--container-unshare=net,ipc,uts",
        &img,
        "sh",
        "-c",
        show,
    ])
    .run();
    run.assert_success();
    for kind in ["net", "ipc", "uts"] {
        let seen: std::collections::BTreeSet<&str> = run
            .stdout
            .lines()
            .filter(|l| l.starts_with(&format!("{kind}:")))
            .collect();
        assert_eq!(
            seen.len(),
            1,
            "both tasks share one {kind} namespace:\n{run}"
        );
        assert!(
            !seen.contains(host_ns(kind).as_str()),
            "{kind} is the node's:\n{run}"
        );
    }
    assert!(run.stdout.contains("LOOPBACK,UP"), "loopback is up:\n{run}");

    // By default the node's, as in pyxis.
    let run = Cmd::user(["srun", &img, "readlink", "/proc/self/ns/net"]).run();
    run.assert_success();
    assert_eq!(run.stdout.trim(), host_ns("net"), "{run}");

    let run = Cmd::user(["srun", "--container-unshare=net,foo", &img, "true"]).run();
    run.assert_failure();
    assert!(run.stderr.contains("unknown namespace 'foo'"), "{run}");
}

#[test]
fn a_step_entering_a_named_container_shares_its_namespaces() {
    let _serial = serial();
    let cluster = Cluster::get();
    let img = image(&cluster);
    let batch = Batch::new(
        &cluster,
        "e2e-pyxis",
        &format!(
            r#"#!/bin/sh
srun --mem=100M --container-image={img} --container-name=isolated --container-unshare=net \
    sh -c 'readlink /proc/self/ns/net > /tmp/first-net; sleep 20' &
first=$!
srun --overlap --mem=100M --container-image={img} --container-name=plain sleep 20 &
second=$!
{wait_isolated}
{wait_plain}
srun --overlap --mem=100M --container-name=isolated sh -c \
    '[ "$(readlink /proc/self/ns/net)" = "$(cat /tmp/first-net)" ] && echo same-net'
srun --overlap --mem=100M --container-name=plain --container-unshare=net true 2>&1 | sed 's/^/plain: /'
kill $first $second
wait
"#,
            wait_isolated = until_running("isolated", "test -e /tmp/first-net"),
            wait_plain = until_running("plain", "true"),
        ),
    );
    let (run, job) = batch.submit(&["--wait"]);
    run.assert_success();
    let out = batch.output();
    assert!(out.contains("same-net"), "{out}");
    assert!(
        out.contains("plain: ") && out.contains("not in a separate network namespace"),
        "{out}"
    );
    assert_removed(&cluster, &job);
}

#[test]
fn a_batch_script_in_the_image_calls_the_nodes_slurm_client() {
    let _serial = serial();
    let cluster = Cluster::get();
    let other = cluster.image_tls_v2s2().reference;
    let batch = Batch::new(
        &cluster,
        "e2e-pyxis",
        &format!(
            r#"#!/bin/sh
grep -q {mark} /etc/os-release && echo script-in-image
echo "squeue: $(squeue -h -j $SLURM_JOB_ID -o %i)"
scontrol show job $SLURM_JOB_ID | grep -o 'JobState=RUNNING'
srun sh -c 'grep -q {mark} /etc/os-release && echo nested-in-image'
srun --container-image={other} sh -c 'grep -q {mark} /etc/os-release && echo nested-other'
srun --container-image=none sh -c 'grep -q {mark} /etc/os-release || echo nested-host'
"#,
            mark = "localhost:5000",
        ),
    );
    let (run, job) = batch.submit(&["--wait", &format!("--container-image={}", image(&cluster))]);
    run.assert_success();
    let out = batch.output();
    for line in [
        "script-in-image",
        &format!("squeue: {job}"),
        "JobState=RUNNING",
        "nested-in-image",
        "nested-other",
        "nested-host",
    ] {
        assert!(
            out.contains(line),
            "no {line:?} in the job's output:\n{out}"
        );
    }
    cluster.assert_node_healthy();
}

#[test]
fn the_sites_task_prolog_runs_on_the_node_not_in_the_image() {
    let _serial = serial();
    let cluster = Cluster::get();
    // tests/cluster/up's TaskProlog exists on the node only and exports this variable.
    let prolog = "/usr/local/lib/berth-e2e/task-prolog";
    assert!(Path::new(prolog).is_file(), "the cluster has no {prolog}");
    let run = Cmd::user([
        "srun",
        &format!("--container-image={}", image(&cluster)),
        "sh",
        "-c",
        &format!("echo \"prolog=$BERTH_E2E_TASK_PROLOG\"; grep -c node {prolog} || true"),
    ])
    .run();
    run.assert_success();
    assert!(run.stdout.contains("prolog=ran-on-the-node"), "{run}");
    // Inside, only the stand-in (no "node" in it): the site's script stayed on the node.
    assert!(run.stdout.lines().any(|l| l.trim() == "0"), "{run}");
}

/// pyxis's Debian image (tests/pyxis-compat/images, through the cluster's docker.io mirror).
const DEBIAN_IMAGE: &str = "ubuntu:24.04";

/// `srun --container-image=DEBIAN_IMAGE OPTIONS sh -c SCRIPT` as the test user.
fn in_debian(options: &[&str], script: &str) -> Run {
    let image = format!("--container-image={DEBIAN_IMAGE}");
    let mut args = vec!["srun", image.as_str()];
    args.extend_from_slice(options);
    args.extend(["sh", "-c", script]);
    Cmd::user(args).timeout(Duration::from_secs(240)).run()
}

/// One id is all berth's user namespace maps, as enroot's: the image's files (root's,
/// `_apt`'s, the `shadow` group's) are the user's own in the container and root's with
/// --container-remap-root, and /proc/self/uid_map reads as under pyxis. The mirror that
/// serves the image says nothing on the job's stderr once the image is cached.
#[test]
fn the_images_files_belong_to_the_user_and_to_the_remapped_root() {
    let _serial = serial();
    let cluster = Cluster::get();
    // The user's primary group owns their home.
    let uid = cluster.uid();
    let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(cluster.home()).unwrap());
    let script = "id -u; cat /proc/self/uid_map; \
                  stat -c '%n %u:%g' / /etc/shadow /var/lib/apt/lists/partial";
    // The first run pulls the image if needed; the second finds it cached.
    in_debian(&[], "true").assert_success();
    let plain = in_debian(&[], script);
    plain.assert_success();
    let lines: Vec<Vec<&str>> = plain
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let me = format!("{uid}:{gid}");
    assert_eq!(lines[0], [uid.to_string()], "{plain}");
    assert_eq!(
        lines[1],
        [uid.to_string(), uid.to_string(), "1".into()],
        "{plain}"
    );
    for path in ["/", "/etc/shadow", "/var/lib/apt/lists/partial"] {
        assert!(lines.contains(&vec![path, me.as_str()]), "{path}: {plain}");
    }
    assert!(!plain.stderr.contains("pull from"), "{plain}");

    let root = in_debian(&["--container-remap-root"], script);
    root.assert_success();
    let lines: Vec<Vec<&str>> = root
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["0"], "{root}");
    assert_eq!(
        lines[1],
        ["0".to_string(), uid.to_string(), "1".into()],
        "{root}"
    );
    for path in ["/", "/etc/shadow", "/var/lib/apt/lists/partial"] {
        assert!(lines.contains(&vec![path, "0:0"]), "{path}: {root}");
    }
    cluster.assert_node_healthy();
}

/// `apt-get install` as the remapped root in a writable container (issue 13), offline: a
/// package built here, whose maintainer script gives a file to another user (a chown the
/// seccomp filter lets succeed without effect), installed from a file. dpkg writes its
/// database under /var/lib/dpkg and the package's files in the container's writable layer;
/// on the host they belong to the user.
#[test]
fn the_remapped_root_installs_a_package_with_apt_get() {
    let _serial = serial();
    let cluster = Cluster::get();
    let name = unique_name("e2e-deb");
    let dir = cluster.home().join(&name);
    let build = format!(
        "set -e; mkdir -p {d}/pkg/DEBIAN {d}/pkg/usr/share/berth-e2e\n\
         echo hello-from-the-package > {d}/pkg/usr/share/berth-e2e/hello\n\
         printf 'Package: berth-e2e-hello\\nVersion: 1.0\\nArchitecture: all\\n\
         Maintainer: berth <berth@localhost>\\nDescription: berth e2e test package\\n' \
         > {d}/pkg/DEBIAN/control\n\
         printf '#!/bin/sh\\nset -e\\nchown daemon:daemon /usr/share/berth-e2e/hello\\n' \
         > {d}/pkg/DEBIAN/postinst\n\
         chmod 0755 {d}/pkg/DEBIAN/postinst\n\
         dpkg-deb --root-owner-group --build {d}/pkg {d}/hello.deb >/dev/null",
        d = dir.display()
    );
    let built = Cmd::user(["sh", "-c", &build]).run();
    built.assert_success();
    // The remapped root's home is /root: the package comes in through a bind.
    let install = "apt-get install -y --no-install-recommends /debs/hello.deb && \
                   dpkg-query -W -f='${Status}\\n' berth-e2e-hello && \
                   cat /usr/share/berth-e2e/hello && stat -c '%u' /usr/share/berth-e2e/hello";
    let debs = format!("--container-mounts={}:/debs:ro", dir.display());
    let run = in_debian(
        &["--container-remap-root", "--container-writable", &debs],
        install,
    );
    let _ = std::fs::remove_dir_all(&dir);
    run.assert_success();
    let out: Vec<&str> = run.stdout.lines().rev().take(3).collect();
    assert_eq!(
        out,
        ["0", "hello-from-the-package", "install ok installed"],
        "{run}"
    );
    // Read-only (an unnamed container's default), dpkg's database cannot change.
    let readonly = in_debian(&["--container-remap-root"], "touch /var/lib/dpkg/x");
    readonly.assert_failure();
    assert!(
        readonly.stderr.contains("Read-only file system"),
        "{readonly}"
    );
    cluster.assert_node_healthy();
}
