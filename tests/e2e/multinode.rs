//! Issue 14, many nodes, on the cluster `tests/cluster/up --nodes 4` brings up (n1..n4 on
//! this machine, each with its own berth cache, runtime, stage and container directories,
//! /home shared), as berthtest: one container per node per step, shared by the node's tasks;
//! a batch script in the image on the first node whose srun spans both nodes; every node on
//! the digest pinned at submission after the tag moved; each blob downloaded once per node,
//! and once for the whole cluster with the shared image store; a failure on one node named in
//! the job's error, with no node drained; each node's cache its own.
//!
//! On a one-node cluster each test says it is skipped and passes (bring the cluster up with
//! `tests/cluster/up --nodes 4`); without a cluster they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_e2e::{
    access_lines, assert_node_idle, cache_key, copy_image, serial, unique_name, wait_until,
    write_user_file, Cluster, Cmd, Run, TestImage,
};

/// How long a job across all nodes may take here (4 slurmd on 2 busy cores).
const JOB_LIMIT: Duration = Duration::from_secs(240);

/// The cluster when it has several nodes; `None`, after saying so, on a one-node cluster.
fn multinode() -> Option<Cluster> {
    let cluster = Cluster::get();
    if cluster.nodes().len() < 2 {
        eprintln!(
            "skipped: the cluster has one node; bring it up with `tests/cluster/up --nodes 4`"
        );
        return None;
    }
    Some(cluster)
}

/// The cluster's busybox image under a new name (`test/<name>-...:v1`), so no node has it
/// cached and the registry's log shows only this test's requests for it.
fn fresh_image(cluster: &Cluster, name: &str) -> TestImage {
    let reference = format!(
        "{}/test/{}:v1",
        cluster.tls_registry().host,
        unique_name(name)
    );
    let digest = copy_image(&cluster.image_tls().reference, &reference);
    TestImage { reference, digest }
}

/// `test/<name>` of a reference `host/test/<name>:tag`.
fn repository(image: &TestImage) -> &str {
    let (_, path) = image.reference.split_once('/').expect("host/path");
    path.rsplit_once(':').map_or(path, |(repo, _)| repo)
}

/// `host/path` of a reference `host/path:tag`.
fn full_repository(image: &TestImage) -> &str {
    image
        .reference
        .rsplit_once(':')
        .map_or(&image.reference, |(repo, _)| repo)
}

/// The file name berth's cache gives `digest` of `repo` (`host/path`). The cluster's images
/// all share one digest, so the repository tells this test's copy from the others.
fn sif_name(repo: &str, digest: &str) -> String {
    format!("{}.sif", cache_key(repo, digest))
}

/// Whether `cache` (a node's image cache) holds `digest` of `image`'s repository.
fn cached(cache: &Path, image: &TestImage, digest: &str) -> bool {
    cache
        .join("images")
        .join(sif_name(full_repository(image), digest))
        .exists()
}

/// GETs of each blob of `repo` in registry log text: blob digest -> count.
fn blob_gets(log: &str, repo: &str) -> BTreeMap<String, usize> {
    let mut gets = BTreeMap::new();
    for line in access_lines(log, &format!("GET /v2/{repo}/blobs/")) {
        let digest = line
            .split(&format!("/v2/{repo}/blobs/"))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default()
            .to_owned();
        *gets.entry(digest).or_insert(0) += 1;
    }
    gets
}

/// What each task of a step prints: its node, its mount namespace and the image's registry.
const TASK_REPORT: &str = "echo task node=$SLURMD_NODENAME mnt=$(readlink /proc/self/ns/mnt) \
                           $(grep BERTH_REGISTRY /etc/os-release)";

/// The first host of a Slurm host list (`n[1-2]` -> `n1`), as Slurm orders it.
fn first_host(list: &str) -> String {
    let run = Cmd::root(["scontrol", "show", "hostnames", list]).run();
    run.assert_success();
    run.stdout.lines().next().unwrap_or_default().to_owned()
}

/// `srun WHERE --container-image=IMAGE true` as the test user, WHERE one option saying on
/// which nodes (`-N4`, `-wn1`).
fn srun_true(nodes: &str, image: &str) -> Run {
    Cmd::user(["srun", nodes, &format!("--container-image={image}"), "true"])
        .timeout(JOB_LIMIT)
        .run()
}

/// Runs a batch job of `nodes` nodes in `image` whose script is `body` (`sbatch --wait`, as
/// the test user); returns sbatch's run and the job's output.
fn batch_job(cluster: &Cluster, nodes: usize, image: &str, body: &str) -> (Run, String) {
    let name = unique_name("multinode-batch");
    let (script, output) = (
        cluster.home().join(format!("{name}.sh")),
        cluster.home().join(format!("{name}.out")),
    );
    write_user_file(
        cluster,
        &script,
        &format!(
            "#!/bin/sh\n#SBATCH -N{nodes}\n#SBATCH --container-image={image}\n\
             #SBATCH --output={}\n{body}",
            output.display()
        ),
        0o755,
    );
    let run = Cmd::user(["sbatch", "--wait", &script.display().to_string()])
        .timeout(JOB_LIMIT)
        .run();
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&output);
    (run, text)
}

#[test]
fn each_node_runs_one_container_that_its_tasks_share() {
    let _serial = serial();
    let Some(cluster) = multinode() else { return };
    let nodes = cluster.nodes();
    let n = nodes.len();
    let run = Cmd::user([
        "srun",
        &format!("-N{n}"),
        &format!("-n{}", 2 * n),
        &format!("--container-image={}", cluster.image_tls().reference),
        "sh",
        "-c",
        TASK_REPORT,
    ])
    .timeout(JOB_LIMIT)
    .run();
    run.assert_success();
    let tasks = berth_e2e::records(&run.stdout, "task ");
    assert_eq!(tasks.len(), 2 * n, "{run}");
    let mut per_node: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for task in &tasks {
        assert_eq!(
            task.get("BERTH_REGISTRY").map(String::as_str),
            Some(cluster.tls_registry().host.as_str()),
            "a task ran outside the image: {run}"
        );
        per_node
            .entry(&task["node"])
            .or_default()
            .insert(&task["mnt"]);
    }
    let seen: Vec<&str> = per_node.keys().copied().collect();
    assert_eq!(
        seen,
        nodes.iter().map(String::as_str).collect::<Vec<_>>(),
        "{run}"
    );
    for (node, mnts) in &per_node {
        assert_eq!(
            mnts.len(),
            1,
            "the tasks on {node} are in different containers: {run}"
        );
    }
    let containers: BTreeSet<&str> = per_node.values().flatten().copied().collect();
    assert_eq!(containers.len(), n, "nodes share a container: {run}");
    assert_node_idle(&cluster);
}

#[test]
fn a_batch_script_runs_in_the_image_on_the_first_node_and_its_srun_spans_two() {
    let _serial = serial();
    let Some(cluster) = multinode() else { return };
    let (run, text) = batch_job(
        &cluster,
        2,
        &cluster.image_tls().reference,
        &format!(
            "echo batch node=$SLURMD_NODENAME list=$SLURM_JOB_NODELIST \
             $(grep BERTH_REGISTRY /etc/os-release)\nsrun -N2 sh -c '{TASK_REPORT}'\n"
        ),
    );
    assert!(run.success(), "{run}\n--- job output ---\n{text}");
    let registry = cluster.tls_registry().host;
    let batch = berth_e2e::records(&text, "batch ");
    assert_eq!(batch.len(), 1, "{text}");
    assert_eq!(
        batch[0].get("BERTH_REGISTRY"),
        Some(&registry),
        "the script ran outside the image: {text}"
    );
    assert_eq!(batch[0]["node"], first_host(&batch[0]["list"]), "{text}");
    let tasks = berth_e2e::records(&text, "task ");
    let nodes: BTreeSet<&str> = tasks.iter().map(|t| t["node"].as_str()).collect();
    assert_eq!(
        (tasks.len(), nodes.len()),
        (2, 2),
        "the nested srun did not span both nodes: {text}"
    );
    assert!(
        tasks
            .iter()
            .all(|t| t.get("BERTH_REGISTRY") == Some(&registry)),
        "a task of the nested srun ran outside the image: {text}"
    );
    assert_node_idle(&cluster);
}

#[test]
fn every_node_runs_the_digest_pinned_at_submission_after_the_tag_moved() {
    let _serial = serial();
    let Some(cluster) = multinode() else { return };
    let nodes = cluster.nodes();
    let n = nodes.len();
    let image = fresh_image(&cluster, "multinode-moving");
    let name = unique_name("multinode-moving");
    let (started, go_on) = (
        cluster.home().join(format!("{name}.started")),
        cluster.home().join(format!("{name}.go")),
    );
    let body = format!(
        "echo $SLURM_JOB_ID > {started}\nwhile [ ! -e {go_on} ]; do sleep 0.2; done\n\
         srun -N{n} sh -c '{TASK_REPORT}'\n",
        started = started.display(),
        go_on = go_on.display(),
    );
    let batch = std::thread::spawn({
        let (cluster, image) = (cluster.clone(), image.reference.clone());
        move || batch_job(&cluster, n, &image, &body)
    });
    let job = || {
        std::fs::read_to_string(&started)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    let began = wait_until(JOB_LIMIT, || job().is_some());
    // The tag moves while the job runs, before its step across the nodes starts.
    let moved = copy_image(&cluster.image_tls_v2s2().reference, &image.reference);
    write_user_file(&cluster, &go_on, "", 0o644);
    let (run, text) = batch.join().unwrap();
    let job = job();
    for file in [&started, &go_on] {
        let _ = std::fs::remove_file(file);
    }
    assert!(began, "the batch script did not start: {run}");
    assert_ne!(moved, image.digest, "the tag did not move");
    assert!(run.success(), "{run}\n--- job output ---\n{text}");
    assert_eq!(berth_e2e::records(&text, "task ").len(), n, "{text}");

    // What each node decided (berth's audit trail, one record per step per node).
    let job = job.unwrap();
    let audit = Cmd::root([
        cluster.berth_bin().display().to_string().as_str(),
        "audit",
        "--job",
        &job,
        "--json",
    ])
    .run();
    audit.assert_success();
    let steps: Vec<serde_json::Value> = audit
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        // Job ids restart with every `up` while the audit file stays: this job's image only.
        .filter(|r: &serde_json::Value| {
            r["step"] == "0"
                && r["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with(&format!("{}@", full_repository(&image))))
        })
        .collect();
    let step_nodes: BTreeSet<&str> = steps.iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(
        step_nodes,
        nodes.iter().map(String::as_str).collect(),
        "every node records step 0 under its Slurm name: {}",
        audit.stdout
    );
    for record in &steps {
        assert_eq!(record["digest"], image.digest, "{record}");
    }
    for node in &nodes {
        let cache = cluster.node_cache_dir(node);
        assert!(
            cached(&cache, &image, &image.digest),
            "{node} lacks the pinned digest"
        );
        assert!(
            !cached(&cache, &image, &moved),
            "{node} fetched the moved tag's digest"
        );
    }
    assert_node_idle(&cluster);
}

#[test]
fn each_node_downloads_each_blob_once() {
    let _serial = serial();
    let Some(cluster) = multinode() else { return };
    let n = cluster.nodes().len();
    let image = fresh_image(&cluster, "multinode-blobs");
    let log = cluster.tls_registry().log_cursor();
    // Two steps: the second finds the image in every node's cache.
    for _ in 0..2 {
        srun_true(&format!("-N{n}"), &image.reference).assert_success();
    }
    let gets = blob_gets(&log.read_new(), repository(&image));
    // The config blob and the image's three layers.
    assert!(gets.len() >= 2, "no blob downloads logged: {gets:?}");
    for (blob, count) in &gets {
        assert_eq!(
            *count, n,
            "blob {blob} was downloaded {count} times by {n} nodes"
        );
    }
    for node in cluster.nodes() {
        assert!(
            cached(&cluster.node_cache_dir(&node), &image, &image.digest),
            "{node}"
        );
    }
    assert_node_idle(&cluster);
}

/// `[store] dir` set in the cluster's berth.toml (every node reads the one file) to a
/// directory every node sees, as NFS would share it; the config restored and the store
/// removed on drop.
struct SharedStore {
    dir: PathBuf,
    config: PathBuf,
    original: String,
}

impl SharedStore {
    fn new(cluster: &Cluster) -> SharedStore {
        let config = cluster.berth_config();
        let original = std::fs::read_to_string(&config).unwrap();
        assert!(
            !original.contains("[store]"),
            "{} already has a [store] section",
            config.display()
        );
        let dir = Path::new(cluster.var("REGISTRY_TLS_ROOT"))
            .parent()
            .unwrap()
            .join(unique_name("store"));
        std::fs::create_dir_all(&dir).unwrap();
        // The cache's service user writes the store ([cache] owner = "berth").
        Cmd::root(["chown", "berth:berth", &dir.display().to_string()])
            .run()
            .assert_success();
        std::fs::write(
            &config,
            format!(
                "{original}\n[store]\ndir = \"{}\"\nlease_secs = 30\n",
                dir.display()
            ),
        )
        .unwrap();
        SharedStore {
            dir,
            config,
            original,
        }
    }
}

impl Drop for SharedStore {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.config, &self.original);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_shared_store_converts_each_image_once_for_the_whole_cluster() {
    let _serial = serial();
    let Some(cluster) = multinode() else { return };
    let n = cluster.nodes().len();
    let store = SharedStore::new(&cluster);
    let image = fresh_image(&cluster, "multinode-store");
    let log = cluster.tls_registry().log_cursor();
    let run = srun_true(&format!("-N{n}"), &image.reference);
    let published: Vec<String> = std::fs::read_dir(store.dir.join("images"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    drop(store);
    run.assert_success();
    let gets = blob_gets(&log.read_new(), repository(&image));
    assert!(gets.len() >= 2, "no blob downloads logged: {gets:?}");
    for (blob, count) in &gets {
        assert_eq!(
            *count, 1,
            "blob {blob} was downloaded {count} times: one node converts"
        );
    }
    let sif = sif_name(full_repository(&image), &image.digest);
    assert!(
        published.contains(&sif),
        "{sif} not published in the store: {published:?}"
    );
    for node in cluster.nodes() {
        assert!(
            cached(&cluster.node_cache_dir(&node), &image, &image.digest),
            "{node}"
        );
    }
    assert_node_idle(&cluster);
}

/// Node `node`'s cache made immutable (`chattr +i`, which binds root too): nothing can be
/// written there, as on a node whose disk failed. Undone on drop.
struct ReadOnlyCache(PathBuf);

impl ReadOnlyCache {
    fn new(cluster: &Cluster, node: &str) -> ReadOnlyCache {
        let dir = cluster.node_cache_dir(node);
        Cmd::root(["chattr", "-R", "+i", &dir.display().to_string()])
            .run()
            .assert_success();
        ReadOnlyCache(dir)
    }
}

impl Drop for ReadOnlyCache {
    fn drop(&mut self) {
        let _ = Cmd::root(["chattr", "-R", "-i", &self.0.display().to_string()]).run();
    }
}

#[test]
fn a_failure_on_one_node_names_it_fails_the_job_and_drains_no_node() {
    let _serial = serial();
    let Some(cluster) = multinode() else { return };
    let nodes = cluster.nodes();
    let n = nodes.len();
    let victim = nodes.last().unwrap().clone();
    // The victim's cache has its directories (a fetch made them) before it breaks.
    srun_true(&format!("-w{victim}"), &cluster.image_tls().reference).assert_success();
    let image = fresh_image(&cluster, "multinode-broken");
    let broken = ReadOnlyCache::new(&cluster, &victim);

    let step = srun_true(&format!("-N{n}"), &image.reference);

    let (batch, text) = batch_job(&cluster, n, &image.reference, &format!("srun -N{n} true\n"));
    drop(broken);

    let named = format!("failed earlier on node {victim}");
    step.assert_failure();
    assert!(
        step.stderr.contains(&named),
        "srun does not name {victim}: {step}"
    );
    batch.assert_failure();
    assert!(
        text.contains(&named),
        "the job's output does not name {victim}: {text}"
    );
    for node in nodes.iter().filter(|n| **n != victim) {
        let other = format!("failed earlier on node {node}");
        assert!(
            !step.stderr.contains(&other) && !text.contains(&other),
            "{node} blamed: {step}\n{text}"
        );
    }
    // No node drained, the victim included: all idle once the jobs end.
    assert_node_idle(&cluster);
}

#[test]
fn each_node_has_a_cache_of_its_own() {
    let _serial = serial();
    let Some(cluster) = multinode() else { return };
    let nodes = cluster.nodes();
    let (first, second) = (&nodes[0], &nodes[1]);
    let image = fresh_image(&cluster, "multinode-local");
    srun_true(&format!("-w{first}"), &image.reference).assert_success();
    assert!(
        cached(&cluster.node_cache_dir(first), &image, &image.digest),
        "{first}"
    );
    assert!(
        !cached(&cluster.node_cache_dir(second), &image, &image.digest),
        "{second} has an image only {first} fetched"
    );
    // Each node's berth sees its own directory at the configured path.
    let sif = sif_name(full_repository(&image), &image.digest);
    let listing = |node: &str| {
        let run = cluster
            .on_node(node, ["ls", "/var/cache/berth/images"])
            .run();
        run.assert_success();
        run.stdout.lines().any(|l| l == sif)
    };
    assert!(listing(first), "{first}'s /var/cache/berth is not its own");
    assert!(!listing(second), "{second}'s /var/cache/berth is {first}'s");
    assert_node_idle(&cluster);
}
