//! What the fault and load suites share (`faults.rs` and `load.rs` each include this file
//! as a module): images pushed for a test, new to every cache; and what a fault or a load
//! run must not leave on the node: mounts in the host's and slurmd's mount
//! tables, berth's runtime directories, processes (squashfuse, mksquashfs, holders, the
//! cache's service user), slurmd's descriptors, held cache locks, staging trees and images
//! that do not verify. A [`NodeSnapshot`] is taken before the test and compared after it.

// Each suite uses its own part of what is here.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_e2e::{assert_node_idle, cache_key, sh, unique_name, wait_until, Cluster, Cmd};

/// The cluster's node cache (`[cache] dir` of tests/cluster/templates/berth.toml).
pub const CACHE: &str = "/var/cache/berth";
/// The cluster's runtime directory (`[runtime] dir`).
pub const RUNTIME: &str = "/run/berth";
/// The cache's service user (`[cache] owner`).
pub const SERVICE_USER: &str = "berth";

/// One process, as /proc shows it.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    /// R, S, D, T (stopped), Z (zombie), ...
    pub state: char,
    pub args: Vec<String>,
}

impl Proc {
    pub fn read(pid: u32) -> Option<Proc> {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let args = std::fs::read(dir.join("cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some(Proc {
            pid,
            ppid: field("PPid:").parse().ok()?,
            uid: field("Uid:").split_whitespace().next()?.parse().ok()?,
            comm: field("Name:"),
            state: field("State:").chars().next()?,
            args,
        })
    }

    /// Every process of the machine.
    pub fn all() -> Vec<Proc> {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .filter_map(Proc::read)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn gone_or_zombie(pid: u32) -> bool {
        Proc::read(pid).is_none_or(|p| p.state == 'Z')
    }
}

/// The uid of a user of this machine.
pub fn uid_of(user: &str) -> u32 {
    sh(&format!("id -u {user}")).trim().parse().unwrap()
}

/// Processes a container step, a fetch or a stage runs, that must be gone when nothing
/// runs: squashfuse, mksquashfs, anything of the cache's service user, and berth or
/// slurmstepd processes (the holder runs as the test user; slurmstepd as root).
pub fn berth_processes(cluster: &Cluster) -> Vec<Proc> {
    let service = uid_of(SERVICE_USER);
    let user = cluster.uid();
    Proc::all()
        .into_iter()
        .filter(|p| p.state != 'Z' || p.comm.starts_with("squashfuse"))
        .filter(|p| {
            p.comm.starts_with("squashfuse")
                || p.comm == "mksquashfs"
                || p.comm == "slurmstepd"
                || p.uid == service
                || (p.comm == "berth" && (p.uid == user || p.args.iter().any(|a| a == "--fetch")))
        })
        .collect()
}

/// Mount points (with their type and source) of a mount table, without the ids that change
/// between reads.
fn mounts(mountinfo: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(mountinfo)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(format!(
                "{} {} {}",
                fields.get(4)?,
                fields.get(dash + 1)?,
                fields.get(dash + 2)?
            ))
        })
        .collect()
}

/// What the node holds when nothing runs, to compare against after a test.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    /// Such processes that outlived the wait for a quiet node (another suite's or a
    /// person's, not this test's doing): reported once, then not counted against the test.
    earlier: BTreeSet<u32>,
    host_mounts: BTreeSet<String>,
    slurmd_mounts: BTreeSet<String>,
    runtime: BTreeSet<String>,
    pub slurmd_fds: usize,
    pub slurmd_rss_kib: u64,
}

pub fn slurmd_pid(cluster: &Cluster) -> u32 {
    cluster.var("SLURMD_PID").parse().unwrap()
}

fn slurmd_fds(cluster: &Cluster) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", slurmd_pid(cluster)))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// slurmd's resident memory (VmRSS) in KiB.
pub fn slurmd_rss_kib(cluster: &Cluster) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", slurmd_pid(cluster)))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What is in berth's runtime directory: its entries, but for `named/`, the directory the
/// plugin keeps its container records in (made by the node's first container step, and
/// kept), whose records are listed instead, as `named/RECORD`.
fn runtime_entries() -> BTreeSet<String> {
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut entries = BTreeSet::new();
    for name in names(RUNTIME) {
        if name == "named" {
            let records = names(&format!("{RUNTIME}/named"));
            entries.extend(records.into_iter().map(|r| format!("named/{r}")));
        } else {
            entries.insert(name);
        }
    }
    entries
}

impl NodeSnapshot {
    /// Waits for the node to be quiet (no container processes, node idle), then records it.
    pub fn take(cluster: &Cluster) -> NodeSnapshot {
        damaged_before(cluster);
        assert_node_idle(cluster);
        wait_until(Duration::from_secs(20), || {
            berth_processes(cluster).is_empty()
        });
        let earlier: Vec<Proc> = berth_processes(cluster);
        if !earlier.is_empty() {
            println!("processes already on the node (not this test's): {earlier:#?}");
        }
        NodeSnapshot {
            earlier: earlier.iter().map(|p| p.pid).collect(),
            host_mounts: mounts(Path::new("/proc/self/mountinfo")),
            slurmd_mounts: mounts(&PathBuf::from(format!(
                "/proc/{}/mountinfo",
                slurmd_pid(cluster)
            ))),
            runtime: runtime_entries(),
            slurmd_fds: slurmd_fds(cluster),
            slurmd_rss_kib: slurmd_rss_kib(cluster),
        }
    }

    /// [`berth_processes`] that were not there when the snapshot was taken.
    pub fn new_processes(&self, cluster: &Cluster) -> Vec<Proc> {
        berth_processes(cluster)
            .into_iter()
            .filter(|p| !self.earlier.contains(&p.pid))
            .collect()
    }

    /// Waits up to `limit` for the processes a test started to be gone; true when they are.
    pub fn processes_gone(&self, cluster: &Cluster, limit: Duration) -> bool {
        wait_until(limit, || self.new_processes(cluster).is_empty())
    }

    /// Panics naming whatever is left: processes (after up to 30 s for steps to end),
    /// mounts new in the host's or slurmd's table, runtime directories, descriptors slurmd
    /// holds beyond those it had; then waits for the node to be idle (not drained).
    #[track_caller]
    pub fn assert_nothing_left(&self, cluster: &Cluster) {
        assert!(
            self.processes_gone(cluster, Duration::from_secs(30)),
            "processes left: {:#?}",
            self.new_processes(cluster)
                .iter()
                .map(|p| format!("{} {} uid {} {}", p.pid, p.state, p.uid, p.args.join(" ")))
                .collect::<Vec<_>>()
        );
        let now = NodeSnapshot::take(cluster);
        let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
            b.difference(a).cloned().collect()
        };
        assert!(
            new(&self.host_mounts, &now.host_mounts).is_empty(),
            "mounts left in the host's table: {:#?}",
            new(&self.host_mounts, &now.host_mounts)
        );
        assert!(
            new(&self.slurmd_mounts, &now.slurmd_mounts).is_empty(),
            "mounts left in slurmd's table: {:#?}",
            new(&self.slurmd_mounts, &now.slurmd_mounts)
        );
        assert!(
            new(&self.runtime, &now.runtime).is_empty(),
            "runtime directories left in {RUNTIME}: {:#?}",
            new(&self.runtime, &now.runtime)
        );
        // slurmd closes a finished step's connections a moment after the step ends.
        let fds_back = wait_until(Duration::from_secs(10), || {
            slurmd_fds(cluster) <= self.slurmd_fds
        });
        assert!(
            fds_back,
            "slurmd holds {} descriptors, {} before: {}",
            slurmd_fds(cluster),
            self.slurmd_fds,
            sh(&format!("ls -l /proc/{}/fd", slurmd_pid(cluster)))
        );
        assert_node_idle(cluster);
    }
}

/// The node cache holds only whole images: `berth images --verify` (each image sealed by
/// root and matching the SHA-256 recorded when it was built) passes, no build lock is held,
/// and no staging tree is left (`tmp/` empty).
/// Images another suite damaged or planted before this one's first snapshot are reported,
/// not blamed on this suite: only images damaged since fail it.
#[track_caller]
pub fn assert_cache_whole(cluster: &Cluster) {
    let earlier = damaged_before(cluster);
    let damaged = damaged_images(cluster);
    let new: Vec<&String> = damaged.difference(earlier).collect();
    assert!(new.is_empty(), "the cache holds damaged images: {new:#?}");
    let held = sh(&format!(
        "for l in {CACHE}/locks/*.lock; do [ -e \"$l\" ] || continue; \
         flock -n -E 99 \"$l\" true || echo \"$l\"; done"
    ));
    assert!(held.trim().is_empty(), "build locks still held: {held}");
    let staging = sh(&format!("ls -A {CACHE}/tmp"));
    assert!(
        staging.trim().is_empty(),
        "staging left in {CACHE}/tmp: {staging}"
    );
}

/// An image pushed for one test, new to every cache.
pub struct Image {
    pub reference: String,
    pub digest: String,
    /// What `/marker` in the image holds.
    pub marker: String,
    /// Its name in the node cache: `<manifest hex>-<repository key>`.
    pub key: String,
}

impl Image {
    pub fn staging(&self, cache: &Path) -> PathBuf {
        cache.join("tmp").join(&self.key)
    }

    pub fn cached(&self, cache: &Path) -> PathBuf {
        cache.join("images").join(format!("{}.sif", self.key))
    }
}

/// Pushes the cluster's busybox with one more layer to `host` (the cluster's approved
/// registry by default): `/marker`, `random_mib` MiB of random bytes (incompressible, so
/// download, unpack and mksquashfs each take a moment), `files` small files, and
/// `zero_mib` MiB of zeros (which compress to almost nothing: a layer that unpacks to much
/// more than it downloads).
pub fn push_image(host: &str, random_mib: usize, files: usize, zero_mib: usize) -> Image {
    let cluster = Cluster::get();
    let work = Path::new("/var/tmp").join(unique_name("berth-e2e-faults"));
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/templates/skopeo-policy.json");
    let name = unique_name("faults");
    let marker = unique_name("marker");
    let repository = format!("{host}/test/{name}");
    let reference = format!("{repository}:v1");
    let certs = work.join("certs");
    sh(&format!(
        "w={w}; mkdir -p $w/root/files $w/certs/{host}; cp {ca} $w/certs/{host}/ca.crt
         skopeo --policy {policy} copy -q docker://{base} oci:$w/oci:img
         head -c {random_mib}M /dev/urandom > $w/root/random
         head -c {zero_mib}M /dev/zero > $w/root/zeros
         printf %s {marker} > $w/root/marker
         python3 -c 'import sys
for i in range(int(sys.argv[2])): open(f\"{{sys.argv[1]}}/f{{i}}\", \"w\").write(str(i) * 50)' $w/root/files {files}
         tar --sort=name --owner=0 --group=0 --numeric-owner -C $w/root -cf $w/layer.tar .
         umoci raw add-layer --image $w/oci:img $w/layer.tar
         skopeo --policy {policy} copy -q --dest-cert-dir {certs}/{host} --digestfile $w/digest \
             oci:$w/oci:img docker://{reference}",
        w = work.display(),
        ca = cluster.ca_cert().display(),
        policy = policy.display(),
        base = cluster.image_tls().reference,
        certs = certs.display(),
    ));
    let digest = std::fs::read_to_string(work.join("digest"))
        .unwrap()
        .trim()
        .to_owned();
    sh(&format!("rm -rf {}", work.display()));
    let key = cache_key(&repository, &digest);
    Image {
        reference,
        digest,
        marker,
        key,
    }
}

/// `berth images --verify`'s DAMAGED lines for the cluster's cache.
fn damaged_images(cluster: &Cluster) -> BTreeSet<String> {
    let verify = Cmd::root([
        cluster.berth_bin().display().to_string(),
        "images".into(),
        "--verify".into(),
    ])
    .timeout(Duration::from_secs(600))
    .run();
    assert!(!verify.timed_out() && verify.code().is_some(), "{verify}");
    verify
        .stdout
        .lines()
        .filter(|l| l.starts_with("DAMAGED"))
        .map(str::to_owned)
        .collect()
}

/// The damaged images the cache held when this suite first looked (at its first
/// [`NodeSnapshot::take`]).
fn damaged_before(cluster: &Cluster) -> &'static BTreeSet<String> {
    static EARLIER: std::sync::OnceLock<BTreeSet<String>> = std::sync::OnceLock::new();
    EARLIER.get_or_init(|| {
        let damaged = damaged_images(cluster);
        if !damaged.is_empty() {
            println!("damaged before this suite ran (not its doing): {damaged:#?}");
        }
        damaged
    })
}
