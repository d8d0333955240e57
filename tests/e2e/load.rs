//! Issue 15, load: many containerized steps one after another, many at once, and many
//! racing for one image no node has: every step succeeds or fails with a message, each blob
//! of the new image is downloaded once (the registry's access log), and afterwards no mount,
//! process, runtime directory or descriptor of slurmd or of the job's slurmstepd is left and
//! slurmd's memory has not grown.
//!
//! Sizes: CI runs a bounded variant (100 sequential steps, 20 at once, 20 racing: about
//! 3 minutes here); `BERTH_TEST_LOAD=full` runs the 500 sequential and 50 at once
//! (docs/SECURITY.md records the last full run). The one-node cluster has 2 CPUs, so only
//! two jobs run at a time: the concurrent and racing steps are `srun --overlap` steps of one
//! job (each its own container, fetch and holder, as separate jobs' steps would be).
//! Needs `tests/cluster/up`; fails (does not skip) without it.

#[path = "node.rs"]
mod node;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_e2e::{
    access_lines, assert_node_idle, serial, sh, unique_name, wait_until, write_user_file, Cluster,
    Cmd, Run,
};
use node::{push_image, slurmd_rss_kib, NodeSnapshot, Proc, CACHE};

/// How much load: (sequential steps, concurrent steps, steps racing for one new image).
fn sizes() -> (usize, usize, usize) {
    match std::env::var("BERTH_TEST_LOAD").as_deref() {
        Ok("full") => (500, 50, 20),
        _ => (100, 20, 20),
    }
}

/// slurmd may grow this much (KiB) over the run: allocator noise, not a leak per step.
const RSS_SLACK_KIB: u64 = 2048;

/// The images a run mixes: the cluster's busybox pushed as OCI and as Docker v2s2, plus
/// `cold` images pushed now (new to the node: the first step to use each pulls it).
fn mixed_images(cluster: &Cluster, cold: usize) -> Vec<(String, String)> {
    let mut images = vec![
        (cluster.image_tls().reference, String::new()),
        (cluster.image_tls_v2s2().reference, String::new()),
    ];
    for _ in 0..cold {
        let image = push_image(&cluster.tls_registry().host, 1, 10, 0);
        images.push((image.reference, image.marker));
    }
    images
}

/// The step's command: prints the image's marker (empty for busybox) and its task id.
const STEP_COMMAND: &str = "cat /marker 2>/dev/null; echo \" task=$SLURM_PROCID\"";

/// Checks one step's result: success with its image's marker, or a failure that says why
/// (a line naming berth, the image or Slurm's refusal), never a hang or a bare status.
#[track_caller]
fn check_step(what: &str, code: i32, output: &str, marker: &str) -> bool {
    if code == 0 {
        assert!(
            output.contains(&format!("{marker} task=0")),
            "{what}: succeeded with the wrong output: {output}"
        );
        return true;
    }
    assert!(
        output.contains("berth") || output.contains("srun: error"),
        "{what}: failed ({code}) without a message: {output:?}"
    );
    false
}

/// Counts failures and prints the tally.
fn report(what: &str, ok: usize, total: usize, took: Duration) {
    println!(
        "{what}: {ok}/{total} steps succeeded in {took:.1?} ({:.0} ms a step)",
        took.as_secs_f64() * 1000.0 / total as f64
    );
}

#[test]
fn sequential_steps_leak_nothing_and_slurmd_does_not_grow() {
    let _serial = serial();
    let cluster = Cluster::get();
    let (sequential, _, _) = sizes();
    let images = mixed_images(&cluster, sequential / 50);
    // Warm-up: slurmd's first steps fill its caches.
    for (image, _) in &images[..2] {
        srun(image, &[]).assert_success();
    }
    let before = NodeSnapshot::take(&cluster);
    let started = Instant::now();
    let mut ok = 0;
    for i in 0..sequential {
        let (image, marker) = &images[i % images.len()];
        let run = srun(image, &[]);
        let output = format!("{}{}", run.stdout, run.stderr);
        assert!(!run.timed_out(), "step {i} hung:\n{run}");
        ok += usize::from(check_step(
            &format!("step {i}"),
            run.code().unwrap_or(-1),
            &output,
            marker,
        ));
    }
    report("sequential", ok, sequential, started.elapsed());
    assert_eq!(ok, sequential, "every step of a healthy node succeeds");
    before.assert_nothing_left(&cluster);
    let rss = slurmd_rss_kib(&cluster);
    println!(
        "slurmd: RSS {} KiB before, {rss} KiB after; {} descriptors before",
        before.slurmd_rss_kib, before.slurmd_fds
    );
    assert!(
        rss <= before.slurmd_rss_kib + RSS_SLACK_KIB,
        "slurmd grew from {} to {rss} KiB over {sequential} steps",
        before.slurmd_rss_kib
    );
    drop_cold(&images);
}

fn srun(image: &str, extra: &[&str]) -> Run {
    let mut args = vec!["srun".to_owned(), format!("--container-image={image}")];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(["sh".into(), "-c".into(), STEP_COMMAND.into()]);
    Cmd::user(args).timeout(Duration::from_secs(120)).run()
}

/// Removes the images this run pushed from the node cache, so runs do not pile them up.
fn drop_cold(images: &[(String, String)]) {
    for (image, marker) in images {
        if !marker.is_empty() {
            let repo = image.rsplit_once(':').unwrap().0;
            sh(&format!(
                "key=$(printf %s {repo} | sha256sum | cut -c1-32); rm -f {CACHE}/images/*-$key.sif"
            ));
        }
    }
}

/// A batch job that runs `steps` (image, marker) as `srun --overlap` steps all at once and
/// records each one's output and exit status. It waits at `go` before the steps and at
/// `end` after them, so the test can count its slurmstepd's descriptors at both points.
struct ManySteps {
    dir: PathBuf,
    job: String,
}

impl ManySteps {
    fn submit(cluster: &Cluster, steps: &[(String, String)]) -> ManySteps {
        let dir = cluster.home().join(unique_name("load"));
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(cluster.uid()), Some(cluster.uid())).unwrap();
        let d = dir.display();
        let mut script =
            format!("#!/bin/bash\ntouch {d}/ready\nwhile [ ! -e {d}/go ]; do sleep 0.1; done\n");
        for (i, (image, _)) in steps.iter().enumerate() {
            script.push_str(&format!(
                "(srun --overlap -n1 --mem=50M --container-image={image} sh -c '{STEP_COMMAND}' \
                 >{d}/out.{i} 2>&1; echo $? >{d}/rc.{i}) &\n"
            ));
        }
        script.push_str(&format!(
            "wait\ntouch {d}/steps-done\nwhile [ ! -e {d}/end ]; do sleep 0.1; done\n"
        ));
        let path = dir.join("job.sh");
        write_user_file(cluster, &path, &script, 0o755);
        let run = Cmd::user([
            "sbatch".to_owned(),
            "--parsable".into(),
            "-N1".into(),
            "-c2".into(),
            "--mem=3000M".into(),
            format!("--output={d}/job.out"),
            path.display().to_string(),
        ])
        .run();
        run.assert_success();
        ManySteps {
            dir,
            job: run.stdout.trim().to_owned(),
        }
    }

    fn wait_for(&self, flag: &str, limit: Duration) {
        assert!(
            wait_until(limit, || self.dir.join(flag).exists()),
            "job {} did not reach {flag}: {}",
            self.job,
            std::fs::read_to_string(self.dir.join("job.out")).unwrap_or_default()
        );
    }

    fn release(&self, flag: &str) {
        std::fs::write(self.dir.join(flag), b"").unwrap();
    }

    /// Descriptors of the job's batch-step slurmstepd.
    fn stepd_fds(&self) -> usize {
        let needle = format!("[{}.batch]", self.job);
        let stepd = Proc::all()
            .into_iter()
            .find(|p| p.comm == "slurmstepd" && p.args.iter().any(|a| a.contains(&needle)))
            .unwrap_or_else(|| panic!("no slurmstepd for {needle}"));
        std::fs::read_dir(format!("/proc/{}/fd", stepd.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Step `i`'s exit status and output.
    fn result(&self, i: usize) -> (i32, String) {
        let rc = std::fs::read_to_string(self.dir.join(format!("rc.{i}"))).unwrap_or_default();
        let out = std::fs::read_to_string(self.dir.join(format!("out.{i}"))).unwrap_or_default();
        (rc.trim().parse().unwrap_or(-1), out)
    }

    /// Runs the steps and returns how many succeeded; checks every step's result and that
    /// the batch slurmstepd holds no more descriptors after the steps than before them.
    fn run(&self, steps: &[(String, String)], what: &str) -> usize {
        self.wait_for("ready", Duration::from_secs(120));
        let fds_before = self.stepd_fds();
        let started = Instant::now();
        self.release("go");
        self.wait_for("steps-done", Duration::from_secs(600));
        let took = started.elapsed();
        let fds_after = self.stepd_fds();
        self.release("end");
        let ok = steps
            .iter()
            .enumerate()
            .filter(|(i, (_, marker))| {
                let (code, output) = self.result(*i);
                check_step(&format!("{what} step {i}"), code, &output, marker)
            })
            .count();
        report(what, ok, steps.len(), took);
        println!(
            "job {} slurmstepd: {fds_before} descriptors before the steps, {fds_after} after",
            self.job
        );
        assert!(
            fds_after <= fds_before,
            "the job's slurmstepd holds {fds_after} descriptors after its steps, {fds_before} before"
        );
        let cluster = Cluster::get();
        assert!(
            wait_until(Duration::from_secs(60), || cluster.node_state() == "idle"),
            "job {} did not end",
            self.job
        );
        ok
    }
}

impl Drop for ManySteps {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("end"), b"");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn concurrent_steps_of_mixed_images_leak_nothing() {
    let _serial = serial();
    let cluster = Cluster::get();
    let (_, concurrent, _) = sizes();
    let images = mixed_images(&cluster, 3);
    let before = NodeSnapshot::take(&cluster);
    let steps: Vec<(String, String)> = (0..concurrent)
        .map(|i| images[i % images.len()].clone())
        .collect();
    let job = ManySteps::submit(&cluster, &steps);
    let ok = job.run(&steps, "concurrent");
    // On this 2-CPU node every step can run; a refusal would be a message, checked above.
    assert_eq!(ok, concurrent, "a step failed on a healthy node");
    before.assert_nothing_left(&cluster);
    drop_cold(&images);
}

#[test]
fn steps_racing_for_one_new_image_download_each_blob_once() {
    let _serial = serial();
    let cluster = Cluster::get();
    let (_, _, racing) = sizes();
    let image = push_image(&cluster.tls_registry().host, 24, 100, 0);
    let layers = layer_digests(&cluster, &image.reference);
    let before = NodeSnapshot::take(&cluster);
    let log = cluster.tls_registry().log_cursor();
    let steps = vec![(image.reference.clone(), image.marker.clone()); racing];
    let job = ManySteps::submit(&cluster, &steps);
    let ok = job.run(&steps, "racing");
    assert_eq!(ok, racing, "a step failed on a healthy node");
    let text = log.read_new();
    let repository = image.reference.rsplit_once(':').unwrap().0;
    let path = repository.split_once('/').unwrap().1;
    for layer in &layers {
        let gets = access_lines(&text, &format!("GET /v2/{path}/blobs/{layer}"));
        assert_eq!(
            gets.len(),
            1,
            "layer {layer} downloaded {} times: {gets:#?}",
            gets.len()
        );
    }
    before.assert_nothing_left(&cluster);
    node::assert_cache_whole(&cluster);
    let _ = std::fs::remove_file(image.cached(Path::new(CACHE)));
    assert_node_idle(&cluster);
}

/// The layer digests of `reference`'s manifest, as the registry serves it.
fn layer_digests(cluster: &Cluster, reference: &str) -> Vec<String> {
    let raw = sh(&format!(
        "skopeo inspect --raw --cert-dir {}/{} docker://{reference}",
        cluster.certs_dir().display(),
        cluster.tls_registry().host
    ));
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}
