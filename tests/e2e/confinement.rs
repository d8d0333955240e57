//! Issue 15, confinement as Slurm's tasks get it, run through `srun` as the test user: every
//! task runs under berth's seccomp filter (`Seccomp: 2`), a denied call fails with EPERM (a
//! remapped root may mount, in the container only), a
//! `--container-remap-root` container's chown succeeds without effect while a plain one's
//! fails as the kernel says, and the kernel interfaces runtimes hide are hidden.
//! Needs `tests/cluster/up`; fails (does not skip) without it.

use berth_e2e::{assert_node_idle, serial, Cluster, Cmd, Run};

/// `srun` as the test user in the approved image, with `options` before the image and
/// `script` run by its sh.
fn srun(cluster: &Cluster, options: &[&str], script: &str) -> Run {
    let image = format!("--container-image={}", cluster.image_tls().reference);
    let mut all = vec!["srun"];
    all.extend_from_slice(options);
    all.extend_from_slice(&[&image, "sh", "-c", script]);
    Cmd::user(all).run()
}

#[test]
fn every_task_runs_under_seccomp_and_a_denied_call_fails_with_eperm() {
    let _serial = serial();
    let cluster = Cluster::get();
    let run = srun(
        &cluster,
        &["-n", "2"],
        "echo task$SLURM_PROCID $(grep Seccomp: /proc/self/status)",
    );
    run.assert_success();
    for task in 0..2 {
        assert!(
            run.stdout.contains(&format!("task{task} Seccomp: 2")),
            "task {task} is not filtered:\n{run}"
        );
    }
    // A remapped root holds CAP_SYS_ADMIN in the container's user namespace: it may mount
    // (as Docker's profile allows a CAP_SYS_ADMIN holder; the mount stays in the container's
    // mount namespace), but pivot_root, which the kernel would let it try too, is refused by
    // the filter with EPERM.
    let host_mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let run = srun(
        &cluster,
        &["--container-remap-root"],
        "mount -t tmpfs berth-e2e-inside /tmp && grep -c '^berth-e2e-inside /tmp ' /proc/self/mounts; \
         pivot_root /tmp /tmp; echo pivot=$?",
    );
    run.assert_success();
    assert!(run.stdout.starts_with("1\n"), "mount was refused:\n{run}");
    assert!(
        run.stdout.contains("pivot=1"),
        "pivot_root was not refused:\n{run}"
    );
    assert!(
        run.stderr.contains("Operation not permitted"),
        "not EPERM:\n{run}"
    );
    assert!(!host_mounts.contains("berth-e2e-inside"));
    assert!(
        !std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains("berth-e2e-inside"),
        "the container's mount reached the host"
    );
    assert_node_idle(&cluster);
}

/// `--container-unshare=uts` without `--container-remap-root`: the task keeps CAP_SYS_ADMIN
/// in the container's user namespace, and nothing else (ambient, as it runs under the
/// user's own uid), so it sets the container's hostname as pyxis users do; the node's stays,
/// no_new_privs holds. A container without a UTS namespace of its own keeps no capability.
#[test]
fn a_task_with_its_own_uts_namespace_may_set_its_hostname_and_holds_nothing_more() {
    let _serial = serial();
    let cluster = Cluster::get();
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let script = "hostname berth-e2e-uts; echo set=$?; hostname; \
                  grep -E '^(CapEff|CapAmb|CapBnd|NoNewPrivs)' /proc/self/status";
    let run = srun(&cluster, &["--container-unshare=uts"], script);
    run.assert_success();
    for expected in [
        "set=0\nberth-e2e-uts\n",
        "CapEff:\t0000000000200000",
        "CapAmb:\t0000000000200000",
        "CapBnd:\t0000000000200000",
        "NoNewPrivs:\t1",
    ] {
        assert!(run.stdout.contains(expected), "{expected:?}:\n{run}");
    }
    let run = srun(&cluster, &[], script);
    run.assert_success();
    for expected in [
        "set=1",
        "CapEff:\t0000000000000000",
        "CapAmb:\t0000000000000000",
    ] {
        assert!(run.stdout.contains(expected), "{expected:?}:\n{run}");
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        node
    );
    assert_node_idle(&cluster);
}

#[test]
fn a_remapped_root_s_chown_succeeds_without_effect_and_a_plain_one_fails() {
    let _serial = serial();
    let cluster = Cluster::get();
    let script = "touch /tmp/f && chown 1234:1234 /tmp/f; echo chown=$?; stat -c %u:%g /tmp/f";
    let run = srun(&cluster, &["--container-remap-root"], script);
    run.assert_success();
    assert!(run.stdout.contains("chown=0\n0:0"), "{run}");
    let run = srun(&cluster, &[], script);
    run.assert_success();
    let uid = cluster.uid();
    assert!(
        run.stdout.contains(&format!("chown=1\n{uid}:")),
        "a plain container's chown to an unmapped id must fail:\n{run}"
    );
    assert_node_idle(&cluster);
}

/// The mount of `path` in a mountinfo text: (root, options, fstype).
fn mount_of<'a>(mountinfo: &'a str, path: &str) -> Option<(&'a str, &'a str, &'a str)> {
    mountinfo.lines().rev().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let f: Vec<&str> = before.split(' ').collect();
        (f.get(4) == Some(&path)).then(|| (f[3], f[5], after.split(' ').next().unwrap_or("")))
    })
}

/// Docker's, containerd's and runc's default `maskedPaths` and `readonlyPaths`, as a task
/// sees them: every masked path the node has is an empty read-only tmpfs (directories) or
/// /dev/null (files), every read-only one is mounted read-only.
#[test]
fn a_task_finds_the_oci_default_kernel_paths_masked_and_read_only() {
    let _serial = serial();
    let cluster = Cluster::get();
    let masked = [
        "/proc/acpi",
        "/proc/asound",
        "/proc/interrupts",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ]
    .map(String::from);
    // Docker 28's per-CPU masks: every copy this node has (none on a VM).
    let per_cpu = std::fs::read_dir("/sys/devices/system/cpu")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("thermal_throttle"))
        .filter(|p| p.is_dir())
        .map(|p| p.display().to_string());
    let masked: Vec<String> = masked.into_iter().chain(per_cpu).collect();
    let readonly = [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ];
    let run = srun(
        &cluster,
        &[],
        "cat /proc/self/mountinfo; echo kcore=$(head -c 16 /proc/kcore | wc -c); \
         echo firmware=$(ls -A /sys/firmware | wc -l)",
    );
    run.assert_success();
    let out = &run.stdout;
    for path in masked.iter().filter(|p| std::path::Path::new(p).exists()) {
        let (root, options, fstype) =
            mount_of(out, path).unwrap_or_else(|| panic!("{path} is not masked:\n{out}"));
        let hidden = if std::path::Path::new(path).is_dir() {
            fstype == "tmpfs" && options.split(',').any(|o| o == "ro")
        } else {
            root.ends_with("/null")
        };
        assert!(
            hidden,
            "{path} is mounted but not hidden: {root} {options} {fstype}"
        );
    }
    for path in readonly.iter().filter(|p| std::path::Path::new(p).exists()) {
        let (_, options, _) =
            mount_of(out, path).unwrap_or_else(|| panic!("{path} is not read-only:\n{out}"));
        assert!(options.split(',').any(|o| o == "ro"), "{path}: {options}");
    }
    assert!(out.contains("kcore=0\n"), "{run}");
    assert!(out.contains("firmware=0\n"), "{run}");
    assert_node_idle(&cluster);
}

/// A task sees its own cgroup as `/` (a cgroup namespace of its own), and /sys/fs/cgroup
/// shows the job's cgroups, in which it finds itself in its step and task, not the node's
/// tree; hierarchies Slurm does not place jobs in are empty.
#[test]
fn a_task_sees_its_cgroup_as_root_and_only_its_job_under_sys_fs_cgroup() {
    let _serial = serial();
    let cluster = Cluster::get();
    let script = "p=task$SLURM_PROCID; sed \"s/^/$p cgroup /\" /proc/self/cgroup; \
         echo $p own $(grep -lx $$ /sys/fs/cgroup/memory/step_*/task_*/cgroup.procs); \
         echo $p top $(ls -d /sys/fs/cgroup/memory/slurm /sys/fs/cgroup/memory/uid_* 2>&1 | wc -l) \
         $(ls -A /sys/fs/cgroup/pids | wc -l)";
    let run = srun(&cluster, &["-n", "2"], script);
    run.assert_success();
    for task in 0..2 {
        let lines: Vec<&str> = run
            .stdout
            .lines()
            .filter(|l| l.starts_with(&format!("task{task} cgroup ")))
            .collect();
        assert!(!lines.is_empty(), "{run}");
        for line in &lines {
            assert!(
                line.ends_with(":/"),
                "task {task} sees a host path: {line}\n{run}"
            );
        }
        let own = format!("task{task} own /sys/fs/cgroup/memory/step_");
        let line = run.stdout.lines().find(|l| l.starts_with(&own));
        assert!(
            line.is_some_and(|l| l.ends_with(&format!("/task_{task}/cgroup.procs"))),
            "task {task} does not find itself in the job's cgroup:\n{run}"
        );
        // Neither the host's `slurm` nor `uid_N` levels (`ls` fails on both: 2 lines of
        // errors), and the unplaced pids hierarchy is empty.
        assert!(
            run.stdout.contains(&format!("task{task} top 2 0")),
            "the node's tree shows:\n{run}"
        );
    }
    assert_node_idle(&cluster);
}
