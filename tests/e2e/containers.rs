//! Containers on the compute node (issue 5), end to end on the real cluster as the test user:
//! steps and batch scripts run in the approved image, refusals reach the user and never drain
//! the node, tasks share one container per step but keep their own cgroups, limits, PMI,
//! exit codes and scancel behave as without a container, and nothing is left behind.
//! Needs `tests/cluster/up`; fails (does not skip) without it.
//!
//! The tests run one at a time (see [`serial`]): the cluster has one node with two CPUs, and
//! the leftover checks look at the whole node.

use std::path::Path;
use std::time::{Duration, Instant};

use berth_e2e::{
    as_root, assert_node_idle, serial, unique_name, wait_until, Batch, Cluster, Cmd,
    PluginlessConf, Run,
};

/// What `/etc/os-release` of the test images says and the host's does not: `up` writes the
/// image's registry into it.
const IMAGE_MARK: &str = "localhost:5000";

/// `srun` as the test user with `args` after it.
fn srun(args: &[&str]) -> Run {
    let mut all = vec!["srun"];
    all.extend_from_slice(args);
    Cmd::user(all).run()
}

/// `--container-image=` the approved test image.
fn approved(cluster: &Cluster) -> String {
    format!("--container-image={}", cluster.image_tls().reference)
}

/// `sbatch --wait` of `batch` with `options`; returns sbatch's run and the job's output.
fn run_batch(batch: &Batch, options: &[&str]) -> (Run, String) {
    let mut all = vec!["--wait"];
    all.extend_from_slice(options);
    let (run, _) = batch.submit(&all);
    (run, batch.output())
}

#[test]
fn srun_runs_the_command_in_the_approved_image() {
    let _serial = serial();
    let cluster = Cluster::get();
    let run = srun(&[&approved(&cluster), "cat", "/etc/os-release"]);
    run.assert_success();
    assert!(
        run.stdout.contains(IMAGE_MARK),
        "not the image's os-release:\n{run}"
    );
    // The same by digest, and without the container the host's.
    let run = srun(&[
        &format!("--container-image={}", cluster.image_tls().by_digest()),
        "cat",
        "/etc/os-release",
    ]);
    run.assert_success();
    assert!(run.stdout.contains(IMAGE_MARK), "{run}");
    let host = srun(&["cat", "/etc/os-release"]);
    host.assert_success();
    assert!(!host.stdout.contains(IMAGE_MARK), "{host}");
    assert_node_idle(&cluster);
}

#[test]
fn the_task_runs_as_the_user_in_the_job_directory_with_the_image_path() {
    let _serial = serial();
    let cluster = Cluster::get();
    let run = Cmd::user([
        "srun",
        &approved(&cluster),
        "sh",
        "-c",
        "id -u; pwd; echo PATH=$PATH; echo LANG=${LANG:-unset}; echo ID=$SLURM_PROCID",
    ])
    .env("LANG", "C.UTF-8")
    .run();
    run.assert_success();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&cluster.uid().to_string().as_str()),
        "{run}"
    );
    assert_eq!(
        lines.get(1).copied(),
        Some(cluster.home().to_str().unwrap()),
        "{run}"
    );
    assert!(
        lines.contains(&"LANG=unset"),
        "host locale leaked in:\n{run}"
    );
    assert!(
        lines.contains(&"ID=0"),
        "Slurm's task variables are lost:\n{run}"
    );
}

#[test]
fn sbatch_runs_the_batch_script_in_the_container() {
    let _serial = serial();
    let cluster = Cluster::get();
    // On the command line.
    let batch = Batch::new(
        &cluster,
        "e2e-containers",
        "#!/bin/sh\ncat /etc/os-release\n",
    );
    let (run, output) = run_batch(&batch, &[&approved(&cluster)]);
    run.assert_success();
    assert!(
        output.contains(IMAGE_MARK),
        "batch output:\n{output}\n{run}"
    );
    // As an #SBATCH line.
    let batch = Batch::new(
        &cluster,
        "e2e-containers",
        &format!(
            "#!/bin/sh\n#SBATCH {}\ncat /etc/os-release\n",
            approved(&cluster)
        ),
    );
    let (run, output) = run_batch(&batch, &[]);
    run.assert_success();
    assert!(
        output.contains(IMAGE_MARK),
        "batch output:\n{output}\n{run}"
    );
    assert_node_idle(&cluster);
}

#[test]
fn nested_steps_each_run_in_their_own_image_or_on_the_host() {
    let _serial = serial();
    let cluster = Cluster::get();
    let a = cluster.image_tls().reference;
    let b = cluster.image_tls_v2s2().reference;
    // The batch script on the host; its steps in A, in B, and plain.
    let batch = Batch::new(
        &cluster,
        "e2e-containers",
        &format!(
            "#!/bin/sh\n\
             srun --container-image={a} sh -c 'echo A; cat /etc/os-release' || echo A-failed\n\
             srun --container-image={b} sh -c 'echo B; cat /etc/os-release' || echo B-failed\n\
             srun sh -c 'echo PLAIN; cat /etc/os-release' || echo PLAIN-failed\n"
        ),
    );
    let (run, output) = run_batch(&batch, &[]);
    run.assert_success();
    let section = |name: &str, next: Option<&str>| -> String {
        let start = output
            .find(&format!("{name}\n"))
            .unwrap_or_else(|| panic!("no step {name} in:\n{output}"));
        let rest = &output[start..];
        let end = next
            .and_then(|n| rest.find(&format!("{n}\n")))
            .unwrap_or(rest.len());
        rest[..end].to_owned()
    };
    assert!(section("A", Some("B")).contains(IMAGE_MARK), "{output}");
    assert!(section("B", Some("PLAIN")).contains(IMAGE_MARK), "{output}");
    assert!(!section("PLAIN", None).contains(IMAGE_MARK), "{output}");
    assert!(!output.contains("-failed"), "{output}");
    assert_node_idle(&cluster);
}

#[test]
fn a_denied_image_is_refused_at_submission() {
    let _serial = serial();
    let cluster = Cluster::get();
    let denied = format!("--container-image={}", cluster.image_plain().reference);
    let run = srun(&[&denied, "cat", "/etc/os-release"]);
    run.assert_failure();
    assert!(run.stderr.contains("is not allowed"), "{run}");
    assert!(run.stdout.is_empty(), "something ran:\n{run}");
    let batch = Batch::new(
        &cluster,
        "e2e-containers",
        "#!/bin/sh\ncat /etc/os-release\n",
    );
    let (run, output) = run_batch(&batch, &[&denied]);
    run.assert_failure();
    assert!(run.stderr.contains("is not allowed"), "{run}");
    assert!(output.is_empty(), "a job ran:\n{output}");
    assert_node_idle(&cluster);
}

#[test]
fn the_node_refuses_a_denied_image_the_submission_check_never_saw() {
    let _serial = serial();
    let cluster = Cluster::get();
    let bypass = PluginlessConf::new(&cluster);
    let forged = format!("container-image={}", cluster.image_plain().by_digest());
    let run = bypass.srun(&forged, &["cat", "/etc/os-release"]);
    run.assert_failure();
    assert!(
        run.stderr.contains("is not allowed on this cluster"),
        "the node did not say why:\n{run}"
    );
    assert!(run.stdout.is_empty(), "the command ran anyway:\n{run}");
    assert_node_idle(&cluster);
    // The node alone still runs an approved request in its container.
    let allowed = format!("container-image={}", cluster.image_tls().by_digest());
    let run = bypass.srun(&allowed, &["cat", "/etc/os-release"]);
    run.assert_success();
    assert!(run.stdout.contains(IMAGE_MARK), "{run}");
    assert_node_idle(&cluster);
}

#[test]
fn a_missing_image_fails_the_step_not_the_node() {
    let _serial = serial();
    let cluster = Cluster::get();
    let bypass = PluginlessConf::new(&cluster);
    let missing = format!(
        "container-image=localhost:5000/test/busybox@sha256:{}",
        "0".repeat(64)
    );
    let run = bypass.srun(&missing, &["true"]);
    run.assert_failure();
    assert!(run.stderr.contains("could not fetch image"), "{run}");
    assert_node_idle(&cluster);
    // A mount source the submission check never saw (missing on the node).
    let bad_mount = format!(
        "container-image={}\ncontainer-mounts=/nonexistent-e2e:/x",
        cluster.image_tls().by_digest()
    );
    let run = bypass.srun(&bad_mount, &["true"]);
    run.assert_failure();
    assert!(run.stderr.contains("/nonexistent-e2e"), "{run}");
    assert_node_idle(&cluster);
}

#[test]
fn two_tasks_share_one_container_with_their_own_cgroups() {
    let _serial = serial();
    let cluster = Cluster::get();
    let mark = unique_name("e2e-shared");
    let script = format!(
        "touch /tmp/{mark}.$SLURM_PROCID; sleep 2; \
         echo task$SLURM_PROCID sees $(ls /tmp | grep -c {mark}); \
         echo task$SLURM_PROCID:$(grep -lx $$ /sys/fs/cgroup/memory/step_*/task_*/cgroup.procs)"
    );
    let run = srun(&["-n", "2", &approved(&cluster), "sh", "-c", &script]);
    run.assert_success();
    for task in 0..2 {
        assert!(
            run.stdout.contains(&format!("task{task} sees 2")),
            "the tasks do not share /tmp:\n{run}"
        );
        let cgroup = run
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("task{task}:")))
            .unwrap_or_else(|| panic!("no cgroup line of task {task}:\n{run}"));
        assert!(
            cgroup.contains(&format!("/task_{task}")),
            "task {task} is not in its task cgroup: {cgroup}"
        );
    }
    assert!(
        !Path::new(&format!("/tmp/{mark}.0")).exists(),
        "the container's /tmp is the host's"
    );
    assert_node_idle(&cluster);
}

#[test]
fn exit_codes_propagate() {
    let _serial = serial();
    let cluster = Cluster::get();
    let run = srun(&[&approved(&cluster), "sh", "-c", "exit 3"]);
    assert_eq!(run.code(), Some(3), "{run}");
    let batch = Batch::new(&cluster, "e2e-containers", "#!/bin/sh\nexit 3\n");
    let (run, _) = run_batch(&batch, &[&approved(&cluster)]);
    assert_eq!(
        run.code(),
        Some(3),
        "sbatch --wait exits with the job's code:\n{run}"
    );
    assert_node_idle(&cluster);
}

#[test]
fn memory_limit_applies_inside_the_container() {
    let _serial = serial();
    let cluster = Cluster::get();
    // dd's buffer is one block: 256 MB touched by a read from /dev/zero.
    let run = srun(&[
        "--mem=64M",
        &approved(&cluster),
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=256M",
        "count=1",
    ]);
    run.assert_failure();
    assert!(
        run.stderr.to_ascii_lowercase().contains("oom"),
        "no OOM kill reported:\n{run}"
    );
    // The same in a job with room for it succeeds, so the limit is what killed it.
    let run = srun(&[
        "--mem=512M",
        &approved(&cluster),
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=256M",
        "count=1",
    ]);
    run.assert_success();
    assert_node_idle(&cluster);
}

#[test]
fn pmi2_descriptor_passes_into_the_container() {
    let _serial = serial();
    let cluster = Cluster::get();
    let run = srun(&[
        "--mpi=pmi2",
        &approved(&cluster),
        "sh",
        "-c",
        "readlink /proc/self/fd/$PMI_FD",
    ]);
    run.assert_success();
    assert!(
        run.stdout.trim().starts_with("socket:["),
        "PMI_FD is not an open socket inside:\n{run}"
    );
}

#[test]
fn scancel_ends_a_containerized_sleep_within_seconds() {
    let _serial = serial();
    let cluster = Cluster::get();
    let output = cluster
        .home()
        .join(format!("{}.out", unique_name("e2e-scancel")));
    let run = Cmd::user([
        "sbatch",
        "--parsable",
        &format!("--output={}", output.display()),
        &approved(&cluster),
        "--wrap",
        "sleep 300",
    ])
    .run();
    run.assert_success();
    let job = run.stdout.trim().split(';').next().unwrap().to_owned();
    let state = || {
        as_root(["squeue", "-h", "-j", &job, "-o", "%T"])
            .stdout
            .trim()
            .to_owned()
    };
    assert!(
        wait_until(Duration::from_secs(60), || state() == "RUNNING"),
        "job {job} never ran: {}",
        state()
    );
    // Until the sleep runs inside the container.
    assert!(
        wait_until(Duration::from_secs(30), || user_processes(
            &cluster, "sleep"
        ) > 0),
        "no sleep of job {job}"
    );
    let cancelled = Instant::now();
    Cmd::user(["scancel", &job]).run().assert_success();
    assert!(
        wait_until(Duration::from_secs(15), || state().is_empty()),
        "job {job} still {} after scancel",
        state()
    );
    assert!(
        cancelled.elapsed() < Duration::from_secs(10),
        "scancel took {:?}",
        cancelled.elapsed()
    );
    // The job leaves squeue while slurmstepd is still reaping: a leak outlives this wait.
    assert!(
        wait_until(Duration::from_secs(5), || user_processes(&cluster, "sleep")
            == 0),
        "a sleep of job {job} outlived it"
    );
    let _ = std::fs::remove_file(&output);
    assert_node_idle(&cluster);
}

/// Processes of the test user whose command name is `name`.
fn user_processes(cluster: &Cluster, name: &str) -> usize {
    let run = as_root(["pgrep", "-u", cluster.user(), "-x", name]);
    run.stdout.lines().count()
}

/// Mounts in the host's mount table that a container could have left.
fn container_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("squashfuse") || l.contains("fuse.") || l.contains("/run/berth"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn nothing_is_left_after_many_jobs() {
    let _serial = serial();
    let cluster = Cluster::get();
    let before = container_mounts();
    let runtime = Path::new("/run/berth");
    let runtime_before = std::fs::read_dir(runtime).map(|d| d.count()).unwrap_or(0);
    for i in 0..50 {
        let run = srun(&[&approved(&cluster), "true"]);
        assert!(run.success(), "job {i} failed:\n{run}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || {
            user_processes(&cluster, "squashfuse") + user_processes(&cluster, "berth") == 0
        }),
        "processes left: {}",
        as_root(["ps", "-u", cluster.user(), "-o", "pid,args"]).stdout
    );
    assert_eq!(container_mounts(), before, "mounts left behind");
    let runtime_after = std::fs::read_dir(runtime).map(|d| d.count()).unwrap_or(0);
    assert_eq!(runtime_after, runtime_before, "runtime directories left");
    assert_node_idle(&cluster);
}

/// The partition of the test cluster whose berth.toml entry says `require_container = true`.
const STRICT: &str = "strict";

#[test]
fn a_partition_that_requires_a_container_refuses_steps_without_one() {
    let _serial = serial();
    let cluster = Cluster::get();
    let partition = format!("--partition={STRICT}");
    // Named in srun's input variable, the partition is known at submission: srun stops there.
    let run = Cmd::user(["srun", "sh", "-c", "echo ran"])
        .env("SLURM_PARTITION", STRICT)
        .run();
    run.assert_failure();
    assert!(
        run.stderr.contains("srun: error: berth:")
            && run
                .stderr
                .contains("requires every job to run in a container"),
        "not refused by srun:\n{run}"
    );
    assert!(
        !run.stderr.contains("slurmstepd"),
        "the step reached the node:\n{run}"
    );
    assert!(run.stdout.is_empty(), "{run}");
    // `-p` is no SPANK option, so only the node sees it: refused from task_init, nothing runs.
    let run = srun(&[&partition, "sh", "-c", "echo ran"]);
    run.assert_failure();
    assert!(
        run.stderr
            .contains("partition `strict` requires every job to run in a container"),
        "{run}"
    );
    assert!(run.stdout.is_empty(), "the command ran on the host:\n{run}");
    assert_node_idle(&cluster);
    // A forged submission (no plugin at srun) asking for the host is refused on the node too.
    let bypass = PluginlessConf::new(&cluster);
    let run = bypass.srun(
        "container-image=none",
        &[&partition, "sh", "-c", "echo ran"],
    );
    run.assert_failure();
    assert!(
        run.stderr
            .contains("requires every job to run in a container"),
        "{run}"
    );
    assert!(run.stdout.is_empty(), "the command ran on the host:\n{run}");
    assert_node_idle(&cluster);
    // With an image, the partition runs the step in it.
    let run = srun(&[&partition, &approved(&cluster), "cat", "/etc/os-release"]);
    run.assert_success();
    assert!(run.stdout.contains(IMAGE_MARK), "{run}");
    assert_node_idle(&cluster);
}

/// One field of `scontrol show job -o JOB` (empty once Slurm has forgotten the job).
fn job_field(job: &str, field: &str) -> String {
    let run = as_root(["scontrol", "show", "job", "-o", job]);
    let prefix = format!("{field}=");
    run.stdout
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&prefix))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_containerized_job_times_out_like_a_bare_one() {
    let _serial = serial();
    let cluster = Cluster::get();
    let batch = Batch::new(&cluster, "e2e-containers", "#!/bin/sh\nsleep 300\n");
    let output = |tag: &str| format!("--output={}.{tag}", batch.output.display());
    let submit = |extra: &[&str]| -> String {
        let script = batch.script.display().to_string();
        let mut args = vec!["sbatch", "--parsable"];
        args.extend_from_slice(extra);
        args.push(&script);
        let run = Cmd::user(args).run();
        run.assert_success();
        run.stdout.trim().split(';').next().unwrap().to_owned()
    };
    let bare = submit(&[&output("bare")]);
    let contained = submit(&[&output("container"), &approved(&cluster)]);
    let jobs = [bare.as_str(), contained.as_str()];
    assert!(
        wait_until(Duration::from_secs(60), || user_processes(
            &cluster, "sleep"
        ) == 2),
        "the two sleeps never ran: {:?}",
        jobs.map(|j| job_field(j, "JobState"))
    );
    // The time limit is up now. Slurm's minimum limit is a minute; moving the end time
    // instead takes the same path (slurmctld's periodic check, every 30 s, then KillWait).
    for job in jobs {
        as_root(["scontrol", "update", &format!("JobId={job}"), "EndTime=now"]).assert_success();
    }
    assert!(
        wait_until(Duration::from_secs(60), || jobs
            .iter()
            .all(|j| job_field(j, "JobState") == "TIMEOUT")),
        "states: {:?}",
        jobs.map(|j| job_field(j, "JobState"))
    );
    assert!(
        wait_until(Duration::from_secs(15), || user_processes(
            &cluster, "sleep"
        ) + user_processes(
            &cluster,
            "squashfuse"
        ) + user_processes(
            &cluster, "berth"
        ) == 0),
        "processes left: {}",
        as_root(["ps", "-u", cluster.user(), "-o", "pid,args"]).stdout
    );
    for tag in ["bare", "container"] {
        let path = format!("{}.{tag}", batch.output.display());
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        assert!(
            text.contains("DUE TO TIME LIMIT"),
            "{tag} job's output:\n{text}"
        );
    }
    assert_node_idle(&cluster);
}
