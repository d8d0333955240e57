//! MPI in containers (issue 14), end to end as the test user: an MPI program in images made
//! from Debian packages (tests/cluster/mpi-image) runs with the right ranks and an allreduce
//! gives the right sum under `srun --mpi=pmix` (Open MPI) and `--mpi=pmi2` (MPICH), across
//! every node the cluster has (two tasks per node); a step's container has its own PMIx server
//! directory and no other job's; PMI_FD is the one descriptor a task gets beyond a bare
//! task's; a PMIx directory berth cannot trust fails the step with a message, no drain; a
//! node still fetching the image takes its part in the PMIx fence of the nodes that are not.
//! Needs `tests/cluster/up` (one node or `--nodes N`); fails (does not skip) without it.
//! docs/MPI.md says what a site sets for this.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use berth_e2e::{
    cache_key, copy_image, hold_image_lock, serial, unique_name, wait_until, write_user_file,
    Cluster, Cmd, Run,
};

/// Tasks per node in every MPI step: more than one, so ranks meet both on a node (shared
/// memory) and, on a multi-node cluster, across nodes.
const TASKS_PER_NODE: usize = 2;

/// An MPI image and the program in it, as `tests/cluster/mpi-image` builds them.
#[derive(Clone, Copy)]
enum Mpi {
    /// Debian bookworm's Open MPI 4.1, a PMIx client (`--mpi=pmix`): `/hello`.
    OpenMpi,
    /// Debian trixie's MPICH 4.2, a PMI-2 client (`--mpi=pmi2`): `/hello-mpich`.
    Mpich,
}

impl Mpi {
    fn flavour(self) -> &'static str {
        match self {
            Mpi::OpenMpi => "openmpi",
            Mpi::Mpich => "mpich",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Mpi::OpenMpi => "/hello",
            Mpi::Mpich => "/hello-mpich",
        }
    }

    /// The image's reference, pushed by `tests/cluster/mpi-image` (a no-op when `up` already
    /// did it: the tag is a hash of what goes into the image).
    fn image(self, cluster: &Cluster) -> &'static str {
        static IMAGES: [OnceLock<String>; 2] = [OnceLock::new(), OnceLock::new()];
        IMAGES[self as usize].get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/mpi-image");
            let registry = cluster.tls_registry().host;
            let run = Cmd::root([
                script.as_os_str(),
                "push".as_ref(),
                registry.as_ref(),
                self.flavour().as_ref(),
            ])
            .timeout(Duration::from_secs(900))
            .run();
            run.assert_success();
            run.stdout
                .lines()
                .last()
                .expect("mpi-image prints the reference")
                .to_owned()
        })
    }
}

/// The cluster's nodes, from Slurm (one on the default cluster, N with `up --nodes N`).
fn nodes() -> Vec<String> {
    let run = Cmd::root(["sinfo", "-h", "-N", "-o", "%N"]).run();
    run.assert_success();
    let names: BTreeSet<String> = run.stdout.lines().map(|l| l.trim().to_owned()).collect();
    assert!(!names.is_empty(), "sinfo lists no node:\n{run}");
    names.into_iter().collect()
}

/// Every node of the cluster idle again, none drained or down (a step's end reaches slurmctld
/// a moment after srun returns).
fn assert_nodes_idle() {
    let states = || {
        let run = Cmd::root(["sinfo", "-h", "-N", "-o", "%N %T"]).run();
        run.assert_success();
        run.stdout
            .lines()
            .map(|l| l.trim().to_owned())
            .collect::<BTreeSet<_>>()
    };
    let idle = wait_until(Duration::from_secs(20), || {
        states().iter().all(|l| l.ends_with(" idle"))
    });
    assert!(idle, "nodes not idle after the test: {:?}", states());
}

/// The test rig's nodes share one host, and so one host name and boot id: UCX (MPICH's
/// transport) takes ranks on other "nodes" for local ones and tries shared memory with
/// processes in another node's container, which fails. Over several nodes the rig's MPICH
/// uses TCP (and loopback to itself); real nodes need nothing (docs/MPI.md).
fn rig_env(nodes: usize) -> &'static [(&'static str, &'static str)] {
    if nodes > 1 {
        &[("UCX_TLS", "tcp,self")]
    } else {
        &[]
    }
}

/// `srun --mpi=KIND` as the test user over every node, TASKS_PER_NODE tasks on each.
fn srun_mpi(kind: &str, nodes: usize, args: &[&str]) -> Run {
    let (n, tasks, per_node) = (
        nodes.to_string(),
        (nodes * TASKS_PER_NODE).to_string(),
        TASKS_PER_NODE.to_string(),
    );
    let mut all = vec![
        "srun",
        "--mpi",
        kind,
        "-N",
        &n,
        "-n",
        &tasks,
        "--ntasks-per-node",
        &per_node,
    ];
    all.extend_from_slice(args);
    let mut cmd = Cmd::user(all).timeout(Duration::from_secs(300));
    for (name, value) in rig_env(nodes) {
        cmd = cmd.env(name, value);
    }
    cmd.run()
}

/// Runs `mpi`'s program under `--mpi=kind` over every node and checks the world.
fn check_world(kind: &str, mpi: Mpi) {
    let _serial = serial();
    let cluster = Cluster::get();
    let image = format!("--container-image={}", mpi.image(&cluster));
    let nodes = nodes();
    let run = srun_mpi(kind, nodes.len(), &[&image, mpi.program()]);
    assert_world(&run, &nodes);
    assert_nodes_idle();
}

/// What a step of an MPI program over every node printed is the whole world: ranks 0..n-1
/// each once, every rank sees size n and the allreduce sum 0+..+(n-1), and each node runs
/// exactly its share of the ranks.
fn assert_world(run: &Run, nodes: &[String]) {
    run.assert_success();
    // One `hello` line per rank: `hello rank=R size=S host=H node=N sum=X expected=Y`.
    let lines = berth_e2e::records(&run.stdout, "hello ");
    let size = nodes.len() * TASKS_PER_NODE;
    let ranks: Vec<usize> = lines
        .iter()
        .map(|l| l["rank"].parse().expect("rank is a number"))
        .collect();
    assert_eq!(
        ranks.iter().copied().collect::<BTreeSet<_>>(),
        (0..size).collect::<BTreeSet<_>>(),
        "not every rank once:\n{run}"
    );
    assert_eq!(ranks.len(), size, "a rank twice:\n{run}");
    let expected = (size * (size - 1) / 2).to_string();
    let host = Cmd::root(["hostname"]).run().stdout.trim().to_owned();
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &lines {
        assert_eq!(line["size"], size.to_string(), "wrong size:\n{run}");
        assert_eq!(line["sum"], expected, "wrong allreduce:\n{run}");
        // Every node of the test cluster is this machine.
        assert_eq!(line["host"], host, "not this machine's host name:\n{run}");
        *per_node.entry(line["node"].as_str()).or_default() += 1;
    }
    let expected_nodes: BTreeMap<&str, usize> =
        nodes.iter().map(|n| (n.as_str(), TASKS_PER_NODE)).collect();
    assert_eq!(
        per_node, expected_nodes,
        "ranks not spread over the nodes:\n{run}"
    );
}

/// Whether the cluster's Slurm has its pmix plugin (`srun --mpi=list`). Debian's has; the
/// test rig's minimal builds of newer releases are made without PMIx (tests/cluster/
/// slurm-release), so the PMIx tests skip there, saying so.
fn slurm_has_pmix() -> bool {
    let list = Cmd::user(["srun", "--mpi=list"]).run();
    let has = format!("{}{}", list.stdout, list.stderr).contains("pmix");
    if !has {
        eprintln!("skipped: this Slurm has no pmix plugin (srun --mpi=list)");
    }
    has
}

#[test]
fn pmix_open_mpi_hello_and_allreduce_over_every_node() {
    if slurm_has_pmix() {
        check_world("pmix", Mpi::OpenMpi);
    }
}

#[test]
fn pmi2_mpich_hello_and_allreduce_over_every_node() {
    check_world("pmi2", Mpi::Mpich);
}

/// One node still fetching the image while the other nodes' ranks are in MPI_Init: the
/// first node waits on its cache's lock for the image, held here for 45 s, while the others
/// have it cached. Under Slurm's ring fence that node passes the others' contributions on
/// while it waits, so its slurmstepd sends (with munge credentials made as root) and takes
/// the direct connections that follow (munge credentials decoded as root). Left with the
/// user's effective uid while berth waits, it gets EACCES for every send until its retries
/// run out, or munge refuses a credential, and the step hangs.
#[test]
fn a_node_slow_to_fetch_still_takes_its_part_in_the_pmix_fence() {
    let _serial = serial();
    let cluster = Cluster::get();
    let nodes = nodes();
    if nodes.len() < 2 {
        eprintln!(
            "skipped: the cluster has one node; bring it up with `tests/cluster/up --nodes 4`"
        );
        return;
    }
    if !slurm_has_pmix() {
        return;
    }
    let repository = format!(
        "{}/test/{}",
        cluster.tls_registry().host,
        unique_name("mpi-slow")
    );
    let reference = format!("{repository}:v1");
    let digest = copy_image(Mpi::OpenMpi.image(&cluster), &reference);
    let image = format!("--container-image={reference}");
    let (slow, others) = nodes.split_first().expect("nodes");
    // Every node's cache made (the busybox image, everywhere); this image on all but one.
    let busybox = format!("--container-image={}", cluster.image_tls().reference);
    for (on, image) in [(&nodes[..], &busybox), (others, &image)] {
        Cmd::user([
            "srun",
            &format!("-N{}", on.len()),
            &format!("-w{}", on.join(",")),
            image,
            "true",
        ])
        .timeout(Duration::from_secs(300))
        .run()
        .assert_success();
    }

    let held = hold_image_lock(
        &cluster.node_cache_dir(slow),
        &cache_key(&repository, &digest),
    );
    let step = {
        let (image, n) = (image.clone(), nodes.len());
        // The ring fence: the slow node passes the others' contributions on before its
        // own tasks run, so the next node connects back to it directly meanwhile.
        std::thread::spawn(move || {
            srun_mpi(
                "pmix",
                n,
                &[
                    "--export=ALL,SLURM_PMIX_FENCE=ring",
                    &image,
                    Mpi::OpenMpi.program(),
                ],
            )
        })
    };
    // Longer than slurmstepd's PMIx sends retry (7 tries over about 32 s): a slow node that
    // cannot send as the user has then failed its part of the fence for good.
    std::thread::sleep(Duration::from_secs(45));
    held.unlock().unwrap();
    let run = step.join().unwrap();
    assert!(
        run.stderr.contains("waiting for another berth fetch"),
        "{slow} did not wait for its fetch, so nothing was tested:\n{run}"
    );
    assert_world(&run, &nodes);
    assert_nodes_idle();
}

/// A task's descriptors as `N:KIND` (socket, pipe, or the path), from its shell's own
/// /proc/PID/fd, so nothing of the listing command is counted.
const FD_LIST: &str =
    r#"for f in /proc/$$/fd/*; do t=$(readlink "$f"); echo "${f##*/}:${t%%:*}"; done"#;

#[test]
fn pmi2s_descriptor_is_all_a_container_task_gets_beyond_a_bare_one() {
    let _serial = serial();
    let cluster = Cluster::get();
    let image = format!("--container-image={}", cluster.image_tls().reference);
    let fds = |extra: &[&str]| {
        let mut args = vec!["srun", "--mpi=pmi2", "-N1", "-n1"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["sh", "-c", FD_LIST]);
        let run = Cmd::user(args).run();
        run.assert_success();
        let listed: BTreeSet<String> = run.stdout.lines().map(str::to_owned).collect();
        (run, listed)
    };
    let (bare_run, bare) = fds(&[]);
    let (run, inside) = fds(&[&image]);
    assert_eq!(
        inside, bare,
        "descriptors differ from a bare task's:\n{bare_run}\n{run}"
    );
    // PMI_FD among them, a socket.
    let pmi = Cmd::user([
        "srun",
        "--mpi=pmi2",
        "-N1",
        "-n1",
        &image,
        "sh",
        "-c",
        "echo $PMI_FD",
    ])
    .run();
    pmi.assert_success();
    let fd = pmi.stdout.trim();
    assert!(
        inside.contains(&format!("{fd}:socket")),
        "PMI_FD={fd} is not among the socket descriptors {inside:?}"
    );
    assert_nodes_idle();
}

/// A batch job of the test user whose one `--mpi=pmix` step runs in the busybox image,
/// writes its PMIx server directory to `report`, and sleeps; scancel'd when dropped.
struct PmixSleeper {
    job: String,
}

impl PmixSleeper {
    fn start(cluster: &Cluster, node: &str, report: &Path) -> PmixSleeper {
        let script = cluster
            .home()
            .join(format!("{}.sh", unique_name("e2e-mpi")));
        write_user_file(
            cluster,
            &script,
            &format!(
                "#!/bin/sh\nexec srun --mpi=pmix --container-image={image} sh -c \
                 'echo $PMIX_SERVER_TMPDIR > {report}.part && mv {report}.part {report}; \
                 sleep 300'\n",
                image = cluster.image_tls().reference,
                report = report.display()
            ),
            0o755,
        );
        let run = Cmd::user([
            "sbatch",
            "--parsable",
            "-N1",
            "-n1",
            "-w",
            node,
            "-o",
            "/dev/null",
            &script.display().to_string(),
        ])
        .run();
        run.assert_success();
        let job = run.stdout.trim().to_owned();
        PmixSleeper { job }
    }
}

impl Drop for PmixSleeper {
    fn drop(&mut self) {
        let _ = Cmd::root(["scancel", &self.job]).run();
    }
}

#[test]
fn a_task_sees_its_own_pmix_directory_and_not_another_jobs() {
    if !slurm_has_pmix() {
        return;
    }
    let _serial = serial();
    let cluster = Cluster::get();
    let node = nodes().remove(0);
    let report = cluster.home().join(unique_name("e2e-mpi-pmixdir"));
    let other = PmixSleeper::start(&cluster, &node, &report);
    assert!(
        wait_until(Duration::from_secs(120), || report.exists()),
        "job {} never reported its PMIx directory",
        other.job
    );
    let other_dir = std::fs::read_to_string(&report).unwrap().trim().to_owned();
    let _ = std::fs::remove_file(&report);
    assert!(
        other_dir.contains(&format!("pmix.{}.", other.job)),
        "job {}'s PMIx directory is {other_dir:?}",
        other.job
    );
    // Its own, with the server's data store in it (PMIx's ds21 shared memory, which clients
    // map; the server itself listens on loopback TCP); the other job's is not there, not
    // even when the job's environment names it (the old bind of any PMIX_SERVER_TMPDIR).
    let check = format!(
        "ls $PMIX_SERVER_TMPDIR | grep -c '^pmix_dstor_ds21_' | sed 's/^/own-store=/'; \
         test -e {other_dir} && echo other=visible || echo other=absent"
    );
    let run = one_task_on(&node, &["--mpi=pmix"], &["sh", "-c", &check])
        .env("PMIX_SERVER_TMPDIR", &other_dir)
        .run();
    run.assert_success();
    assert!(
        run.stdout.contains("other=absent"),
        "another job's PMIx directory:\n{run}"
    );
    assert!(
        run.stdout.contains("own-store=1"),
        "no PMIx data store in the step's own directory:\n{run}"
    );
    let forged = one_task_on(
        &node,
        &[],
        &[
            "sh",
            "-c",
            &format!("test -e {other_dir} && echo other=visible || echo other=absent"),
        ],
    )
    .env("PMIX_SERVER_TMPDIR", &other_dir)
    .run();
    forged.assert_success();
    assert!(
        forged.stdout.contains("other=absent"),
        "a forged PMIX_SERVER_TMPDIR was bound:\n{forged}"
    );
    drop(other);
    assert_nodes_idle();
}

/// `srun ARGS -N1 -n1 -w NODE` of `command` in the cluster's busybox image, as the test user.
fn one_task_on(node: &str, args: &[&str], command: &[&str]) -> Cmd {
    let image = format!("--container-image={}", Cluster::get().image_tls().reference);
    let mut all = vec!["srun"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-N1", "-n1", "-w", node, &image]);
    all.extend_from_slice(command);
    Cmd::user(all)
}

/// slurm.conf's SlurmdSpoolDir for `node` (`%n` and `%h` expanded as slurmd does).
fn slurmd_spool(node: &str) -> String {
    let run = Cmd::root(["scontrol", "show", "config"]).run();
    run.assert_success();
    let template = run
        .stdout
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "SlurmdSpoolDir").then(|| v.trim().to_owned())
        })
        .expect("SlurmdSpoolDir in scontrol show config");
    let host = Cmd::root(["hostname", "-s"]).run().stdout.trim().to_owned();
    template.replace("%n", node).replace("%h", &host)
}

/// Restores a directory's mode when dropped, so a failing test leaves the node as it was.
struct ModeBack {
    path: String,
    mode: u32,
}

impl Drop for ModeBack {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(self.mode));
    }
}

#[test]
fn an_untrusted_pmix_directory_fails_the_step_clearly_without_a_drain() {
    use std::os::unix::fs::PermissionsExt;
    if !slurm_has_pmix() {
        return;
    }
    let _serial = serial();
    let node = nodes().remove(0);
    let spool = slurmd_spool(&node);
    let mode = std::fs::metadata(&spool)
        .expect("the spool dir")
        .permissions()
        .mode()
        & 0o7777;
    // A site mistake berth must not build on: a spool directory anyone can write to, where
    // another user could have made the step's PMIx directory.
    let _back = ModeBack {
        path: spool.clone(),
        mode,
    };
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let run = one_task_on(&node, &["--mpi=pmix"], &["true"]).run();
    drop(_back);
    run.assert_failure();
    for needle in ["PMIx server directory", &spool, "chmod 0755", "docs/MPI.md"] {
        assert!(
            run.stderr.contains(needle),
            "no {needle:?} in the message:\n{run}"
        );
    }
    assert_nodes_idle();
}
