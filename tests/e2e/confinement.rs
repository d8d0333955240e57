//! Issue 15, confinement as Slurm's tasks get it, run through `srun` as the test user: every
//! task runs under berth's seccomp filter (`Seccomp: 2`), a denied call fails with EPERM, a
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
    // A remapped root holds CAP_SYS_ADMIN over the container's mount namespace, so without
    // the filter this mount succeeds (and could uncover masked paths).
    let run = srun(
        &cluster,
        &["--container-remap-root"],
        "mount -t tmpfs t /tmp; echo mount=$?",
    );
    run.assert_success();
    assert!(run.stdout.contains("mount=1"), "mount was not refused:\n{run}");
    assert!(run.stderr.contains("permission denied"), "not EPERM:\n{run}");
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
