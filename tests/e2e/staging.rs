//! Issue 12, staging at job start: a large image is fetched and converted outside the job's
//! memory cgroup, so a small `--mem` job whose image is not cached yet completes; data is
//! staged in (20,000 files and 1 GiB, compared inside the container, reused by the next
//! job), results staged out after a failure; the limits (per user, total, a file system
//! that fills mid-copy) refuse or fail cleanly; the job epilog removes a job's data at its
//! end and after scancel; the shared image store converts once and outlives a killed holder.
//! Needs `tests/cluster/up`; fails (does not skip) without it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth_e2e::{
    assert_node_idle, serial, sh, unique_name, wait_until, write_user_file, Cluster, Cmd,
};

/// The cluster's busybox image with one more layer: `/payload`, `mib` MiB of random bytes
/// (incompressible, so the SIF is as big), and `/marker`. Built with GNU tar and `umoci raw
/// add-layer` (`umoci insert` truncates large files) and pushed under a new name, so no
/// node has it cached.
fn push_big_image(cluster: &Cluster, mib: usize, marker: &str) -> String {
    let work = Path::new("/var/tmp").join(unique_name("berth-e2e-big"));
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/templates/skopeo-policy.json");
    let name = unique_name("big");
    let reference = format!("{}/test/{name}:v1", cluster.tls_registry().host);
    sh(&format!(
        "w={work}; mkdir -p $w/root
         skopeo --policy {policy} copy -q docker://{base} oci:$w/oci:big
         head -c {mib}M /dev/urandom > $w/root/payload
         printf %s {marker} > $w/root/marker
         tar --sort=name --owner=0 --group=0 --numeric-owner -C $w/root -cf $w/layer.tar payload marker
         umoci raw add-layer --image $w/oci:big $w/layer.tar
         skopeo --policy {policy} copy -q oci:$w/oci:big docker://{reference}
         rm -rf $w",
        work = work.display(),
        policy = policy.display(),
        base = cluster.image_tls().reference,
    ));
    reference
}

/// The memory cgroup (`/proc/PID/cgroup`'s memory line, or the v2 line) of every process
/// now fetching or converting `image`: `berth policy check --fetch IMAGE` and its
/// mksquashfs.
fn fetch_cgroups(image: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return seen;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // The plugin fetches the digest-pinned form the submission resolved.
        let repo = image.rsplit_once(':').map_or(image, |(repo, _)| repo);
        let fetching =
            args.iter().any(|a| a == "--fetch") && args.iter().any(|a| a.starts_with(repo));
        let converting = args.first().is_some_and(|a| a.ends_with("mksquashfs"))
            && args
                .iter()
                .any(|a| a.contains("/cache/") || a.contains("berth"));
        if !(fetching || converting) {
            continue;
        }
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let memory = cgroup
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == "memory"))
            })
            .or_else(|| cgroup.lines().find(|l| l.starts_with("0::")))
            .unwrap_or_default()
            .to_owned();
        seen.push((args.join(" "), memory));
    }
    seen
}

/// Removes the image's SIF from the cluster's node cache (named `<digest>-<REPO>.sif`,
/// REPO the first 32 hex digits of the SHA-256 of `registry/repository`), so the cache does
/// not keep hundreds of MB per run.
fn drop_cached(image: &str) {
    let repo = image.rsplit_once(':').unwrap().0;
    sh(&format!(
        "key=$(printf %s {repo} | sha256sum | cut -c1-32); rm -f /var/cache/berth/images/*-$key.sif"
    ));
}

#[test]
fn a_small_mem_job_fetches_a_large_image_outside_its_memory_cgroup() {
    let _serial = serial();
    let cluster = Cluster::get();
    let marker = unique_name("big-marker");
    let image = push_big_image(&cluster, 320, &marker);

    let name = unique_name("e2e-staging");
    let script: PathBuf = cluster.home().join(format!("{name}.sh"));
    let output: PathBuf = cluster.home().join(format!("{name}.out"));
    write_user_file(
        &cluster,
        &script,
        "#!/bin/sh\ncat /marker; echo; wc -c </payload\n",
        0o755,
    );
    let done = AtomicBool::new(false);
    let (run, seen) = std::thread::scope(|s| {
        let job = s.spawn(|| {
            let run = Cmd::user([
                "sbatch".to_owned(),
                "--wait".into(),
                "--parsable".into(),
                "--mem=48M".into(),
                format!("--output={}", output.display()),
                format!("--container-image={image}"),
                script.display().to_string(),
            ])
            .timeout(Duration::from_secs(600))
            .run();
            done.store(true, Ordering::SeqCst);
            run
        });
        let mut seen = Vec::new();
        while !done.load(Ordering::SeqCst) {
            seen.extend(fetch_cgroups(&image));
            std::thread::sleep(Duration::from_millis(50));
        }
        (job.join().unwrap(), seen)
    });
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&output);

    assert!(run.success(), "{run:?}\noutput:\n{text}");
    assert!(text.contains(&marker), "{text}");
    assert!(text.contains(&(320u64 << 20).to_string()), "{text}");
    // The job prolog starts the fetch at job start; the step's own fetch (in the job's
    // cgroup) waits for it on the image lock. Whichever builds moves into berth's build
    // cgroup before it downloads, and what it runs (mksquashfs) is there too.
    let outside = |memory: &str| memory.ends_with(":/berth/fetch");
    assert!(
        seen.iter()
            .any(|(p, m)| p.contains("--fetch") && outside(m)),
        "never saw a fetch in berth's build cgroup: {seen:?}"
    );
    for (process, memory) in seen.iter().filter(|(p, _)| !p.contains("--fetch")) {
        assert!(outside(memory), "{process} ran in memory cgroup {memory:?}");
    }
    // The prolog's fetch records its decision once it has the image (it may have waited
    // for the step's fetch on the image lock).
    let job = run.stdout.trim();
    let audit = || {
        Cmd::root([
            cluster.berth_bin().display().to_string(),
            "audit".into(),
            "--job".into(),
            job.to_owned(),
        ])
        .run()
    };
    assert!(
        wait_until(Duration::from_secs(30), || audit()
            .stdout
            .contains("prolog")),
        "no fetch at job start (step 'prolog') in the audit trail of job {job}: {}",
        audit()
    );
    drop_cached(&image);
    assert_node_idle(&cluster);
}

/// The stage area as an admin (or the package's tmpfiles) makes it: root's, mode 1777.
fn stage_area() -> PathBuf {
    let area = PathBuf::from("/var/tmp/berth-stage");
    sh(&format!(
        "mkdir -p {a} && chown root:root {a} && chmod 1777 {a}",
        a = area.display()
    ));
    area
}

/// `berth stage ARGS...` as the test user (the site config: users cannot pass --config).
fn stage(args: &[&str]) -> berth_e2e::Run {
    let mut all = vec![
        Cluster::get().berth_bin().display().to_string(),
        "stage".into(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    Cmd::user(all).timeout(Duration::from_secs(300)).run()
}

/// A tree of `files` small files (4 to 64 KiB, random) and one `big_mib` MiB file, with a
/// symlink inside the tree and one pointing out of it, in the user's home.
fn user_tree(cluster: &Cluster, files: usize, big_mib: usize) -> PathBuf {
    let dir = cluster.home().join(unique_name("stage-src"));
    // One process writes the small files: a shell loop forks per file.
    sh(&format!(
        "d={d}; mkdir -p $d/small
         /usr/bin/python3 -c '
import os, random, sys
d = sys.argv[1]
for i in range(1, int(sys.argv[2]) + 1):
    with open(f\"{{d}}/f{{i}}\", \"wb\") as f:
        f.write(os.urandom(random.randint(4, 64) * 1024))
' $d/small {files}
         head -c {big_mib}M /dev/urandom > $d/big
         ln -s small/f1 $d/link
         ln -s /etc/shadow $d/outside
         chown -R {uid}:{uid} $d",
        d = dir.display(),
        uid = cluster.uid()
    ));
    dir
}

/// The user's part of the stage area, and the directory of a kept copy of `src` in it
/// (`KEY`: the first 32 hex digits of the SHA-256 of the source path).
fn user_area(cluster: &Cluster) -> PathBuf {
    stage_area().join(cluster.uid().to_string())
}

fn kept_copy(cluster: &Cluster, src: &Path) -> PathBuf {
    let key = sh(&format!(
        "printf %s {} | sha256sum | cut -c1-32",
        src.display()
    ));
    user_area(cluster).join(key.trim())
}

/// Job `job`'s part of the user's stage area, which the job epilog removes.
fn job_part(cluster: &Cluster, job: &str) -> PathBuf {
    user_area(cluster).join(format!("job-{job}"))
}

/// Waits (the epilog runs a moment after the job leaves squeue) for `path` to be gone.
#[track_caller]
fn assert_removed(path: &Path, what: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || !path.exists()),
        "{what} {} is still there",
        path.display()
    );
}

/// `sbatch --parsable ARGS...` as the test user, waiting for the job with `--wait` where
/// `wait`; the job id is the run's stdout.
fn sbatch(args: &[String], wait: bool) -> berth_e2e::Run {
    let mut all = vec!["sbatch".to_owned(), "--parsable".into()];
    if wait {
        all.push("--wait".into());
    }
    all.extend(args.iter().cloned());
    Cmd::user(all).timeout(Duration::from_secs(600)).run()
}

/// The cluster's berth.toml with one line replaced, for one test's duration (the e2e lock
/// keeps other suites out meanwhile); put back when dropped.
struct SiteEdit {
    path: PathBuf,
    original: String,
}

impl SiteEdit {
    fn replace(from: &str, to: &str) -> SiteEdit {
        let path = Cluster::get().berth_config();
        let original = std::fs::read_to_string(&path).unwrap();
        assert!(
            original.contains(from),
            "the cluster's berth.toml has no {from:?}"
        );
        std::fs::write(&path, original.replace(from, to)).unwrap();
        SiteEdit { path, original }
    }
}

impl Drop for SiteEdit {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.original);
    }
}

#[test]
fn stage_in_copies_a_tree_reuses_it_and_stages_results_out() {
    let _serial = serial();
    let cluster = Cluster::get();
    let area = stage_area();
    let src = user_tree(&cluster, 2000, 64);
    let src_arg = src.display().to_string();

    let first = stage(&["in", &src_arg]);
    assert!(first.success(), "{first}");
    let fields: Vec<&str> = first.stdout.trim().split('\t').collect();
    assert_eq!(fields.len(), 3, "{first}");
    let local = PathBuf::from(fields[1]);
    assert!(
        local.starts_with(area.join(cluster.uid().to_string())),
        "{first}"
    );
    // Byte for byte, links as links (the one pointing out of the tree not followed).
    sh(&format!(
        "diff -r --no-dereference {src_arg} {}",
        local.display()
    ));
    let user_dir = area.join(cluster.uid().to_string());
    let mode = sh(&format!("stat -c %a {}", user_dir.display()));
    assert_eq!(mode.trim(), "700");

    let again = stage(&["in", &src_arg]);
    assert!(again.success(), "{again}");
    assert!(again.stderr.contains("unchanged, reused"), "{again}");
    assert!(again.elapsed < Duration::from_secs(2), "{again}");

    let results = cluster.home().join(unique_name("stage-out"));
    let out = stage(&[
        "out",
        &format!("{}:{}", local.join("small").display(), results.display()),
    ]);
    assert!(out.success(), "{out}");
    sh(&format!("diff -r {}/small {}", src_arg, results.display()));

    let clean = stage(&["clean"]);
    assert!(clean.success(), "{clean}");
    assert!(!local.exists());
    sh(&format!("rm -rf {src_arg} {}", results.display()));
}

#[test]
fn a_source_the_user_cannot_read_is_refused_and_nothing_is_staged() {
    let _serial = serial();
    let cluster = Cluster::get();
    let area = stage_area();
    assert!(stage(&["clean"]).success());
    let src = user_tree(&cluster, 10, 1);
    // Another user's private file inside the user's tree.
    sh(&format!(
        "echo secret > {d}/theirs && chown root:root {d}/theirs && chmod 0600 {d}/theirs",
        d = src.display()
    ));
    let run = stage(&["in", &src.display().to_string()]);
    assert!(!run.success(), "{run}");
    assert!(
        run.stderr.contains("theirs") && run.stderr.contains("ermission denied"),
        "{run}"
    );
    let user_dir = area.join(cluster.uid().to_string());
    let left = sh(&format!("ls -A {}", user_dir.display()));
    assert!(left.trim().is_empty(), "left in the stage area: {left}");
    sh(&format!("rm -rf {}", src.display()));
}

#[test]
fn a_stage_over_the_user_limit_is_refused_before_copying() {
    let _serial = serial();
    let cluster = Cluster::get();
    stage_area();
    // The test cluster's max_user is the default 100G: a sparse file larger than that
    // costs no disk and must be refused before a byte is copied.
    let src = cluster.home().join(unique_name("stage-huge"));
    sh(&format!(
        "truncate -s 200G {s} && chown {uid} {s}",
        s = src.display(),
        uid = cluster.uid()
    ));
    let run = stage(&["in", &src.display().to_string()]);
    let _ = std::fs::remove_file(&src);
    assert!(!run.success(), "{run}");
    assert!(run.stderr.contains("[stage] max_user"), "{run}");
    assert!(run.elapsed < Duration::from_secs(5), "{run}");
}

#[test]
fn sbatch_stages_20000_files_and_1gib_reuses_them_and_stages_out_after_a_failure() {
    let _serial = serial();
    let cluster = Cluster::get();
    stage_area();
    assert!(stage(&["clean"]).success());
    let src = user_tree(&cluster, 20_000, 1024);
    let scratch = PathBuf::from("/tmp").join(unique_name("stage-scratch"));
    let results = cluster.home().join(unique_name("stage-results"));
    sh(&format!(
        "mkdir -p {s} && chown {uid} {s}",
        s = scratch.display(),
        uid = cluster.uid()
    ));
    let name = unique_name("e2e-stage-job");
    let script = cluster.home().join(format!("{name}.sh"));
    let output = cluster.home().join(format!("{name}.out"));
    // Inside the container: the staged copy (/in) against the source itself (/src, bound
    // read-only), file by file, and the big file's inode and mtime, as results; then a
    // failing exit: the results must still come back.
    write_user_file(
        &cluster,
        &script,
        "#!/bin/sh\nmkdir -p /out/res\n\
         (cd /in && find . -type f | sort | xargs md5sum) > /out/res/in.sums\n\
         (cd /src && find . -type f | sort | xargs md5sum) > /out/res/src.sums\n\
         if cmp /out/res/in.sums /out/res/src.sums && cmp /in/big /src/big; then \
         echo same > /out/res/verdict; else echo DIFFERENT > /out/res/verdict; fi\n\
         find /in -type f | wc -l > /out/res/count\n\
         stat -c '%i %Y' /in/big > /out/res/big\nexit 3\n",
        0o755,
    );
    let args = vec![
        format!("--output={}", output.display()),
        format!("--container-image={}", cluster.image_tls().reference),
        format!("--container-stage-in={}:/in", src.display()),
        format!(
            "--container-mounts={}:/out,{}:/src:ro",
            scratch.display(),
            src.display()
        ),
        format!("--container-stage-out=/out/res:{}", results.display()),
        script.display().to_string(),
    ];
    let result = |name: &str| std::fs::read_to_string(results.join(name)).unwrap_or_default();
    let first = sbatch(&args, true);
    let first_text = std::fs::read_to_string(&output).unwrap_or_default();
    let (first_verdict, first_count, first_big) =
        (result("verdict"), result("count"), result("big"));
    let kept = kept_copy(&cluster, &src).join("data/big");
    let host_big = sh(&format!("stat -c '%i %Y' {}", kept.display()));
    let second = sbatch(&args, true);
    let second_text = std::fs::read_to_string(&output).unwrap_or_default();
    let second_big = result("big");
    let parts = [first.stdout.trim(), second.stdout.trim()].map(|job| job_part(&cluster, job));
    sh(&format!(
        "rm -rf {} {} {} {} {}",
        src.display(),
        scratch.display(),
        results.display(),
        script.display(),
        output.display()
    ));

    assert_eq!(first.code(), Some(3), "{first}\n{first_text}");
    assert_eq!(
        first_verdict.trim(),
        "same",
        "the staged copy differs\n{first_text}"
    );
    assert_eq!(first_count.trim(), "20001", "{first_text}");
    assert_eq!(second.code(), Some(3), "{second}\n{second_text}");
    assert!(
        second_text.contains("unchanged, reused"),
        "the second job copied again:\n{second_text}"
    );
    // Not copied again: the very same file, untouched, in both containers.
    assert_eq!(first_big, second_big, "the second job has another copy");
    assert_eq!(first_big.trim(), host_big.trim());
    // Each job's own part (its claim on the kept copy) went with it.
    for part in &parts {
        assert_removed(part, "the job's part");
    }
    assert!(stage(&["clean"]).success());
    assert_node_idle(&cluster);
}

#[test]
fn a_stage_over_the_total_limit_is_refused_before_copying() {
    let _serial = serial();
    let cluster = Cluster::get();
    let area = stage_area();
    assert!(stage(&["clean"]).success());
    // Another user (root) holds 120G; the cluster's max_total is 150G, its max_user 100G:
    // 40G more fits the user's limit but not the total.
    let other = area.join(".usage-0");
    std::fs::write(&other, (120u64 << 30).to_string()).unwrap();
    let src = cluster.home().join(unique_name("stage-40g"));
    sh(&format!(
        "truncate -s 40G {s} && chown {uid} {s}",
        s = src.display(),
        uid = cluster.uid()
    ));
    let run = stage(&["in", &src.display().to_string()]);
    let _ = std::fs::remove_file(&other);
    let _ = std::fs::remove_file(&src);
    assert!(!run.success(), "{run}");
    assert!(run.stderr.contains("[stage] max_total"), "{run}");
    assert!(run.stderr.contains("other users'"), "{run}");
    assert!(run.elapsed < Duration::from_secs(5), "{run}");
    let left = sh(&format!("ls -A {}", user_area(&cluster).display()));
    assert!(left.trim().is_empty(), "left in the stage area: {left}");
}

#[test]
fn a_stage_that_fills_the_disk_fails_the_job_cleanly_and_the_node_stays_idle() {
    let _serial = serial();
    let cluster = Cluster::get();
    stage_area();
    assert!(stage(&["clean"]).success());
    // A small file system of the user's own as their part of the area: 4 MiB, nothing
    // kept free ([stage] reserve = 0). 2,000 one-byte files pass the check before copying
    // (2,000 bytes) but take a 4 KiB page each (8 MiB): the copy fills it.
    let _no_reserve = SiteEdit::replace(
        "after_job = \"keep\"",
        "after_job = \"keep\"\nreserve = \"0\"",
    );
    let part = user_area(&cluster);
    sh(&format!(
        "mount -t tmpfs -o size=4M,mode=0700,uid={uid},gid={uid} berth-e2e-full {p}",
        p = part.display(),
        uid = cluster.uid()
    ));
    let src = cluster.home().join(unique_name("stage-tiny"));
    sh(&format!(
        "mkdir -p {s} && for i in $(seq 1 2000); do printf x > {s}/f$i; done && chown -R {uid} {s}",
        s = src.display(),
        uid = cluster.uid()
    ));
    let name = unique_name("e2e-stage-full");
    let output = cluster.home().join(format!("{name}.out"));
    let run = sbatch(
        &[
            format!("--output={}", output.display()),
            format!("--container-image={}", cluster.image_tls().reference),
            format!("--container-stage-in={}:/in", src.display()),
            "--wrap=ls /in | wc -l".into(),
        ],
        true,
    );
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    let job_gone = wait_until(Duration::from_secs(30), || {
        !job_part(&cluster, run.stdout.trim()).exists()
    });
    let left = sh(&format!("ls -A {}", part.display()));
    let used = sh(&format!(
        "df --output=used -B1 {} | tail -1",
        part.display()
    ));
    sh(&format!(
        "umount {}; rm -rf {} {}",
        part.display(),
        src.display(),
        output.display()
    ));

    assert!(!run.success(), "{run}\n{text}");
    assert!(
        text.contains("filled up") && text.contains("nothing was kept"),
        "{text}"
    );
    assert!(
        job_gone && left.trim().is_empty(),
        "left in the full area: {left}"
    );
    assert!(
        used.trim().parse::<u64>().unwrap_or(u64::MAX) < 1 << 20,
        "still used: {used}"
    );
    assert_node_idle(&cluster);
}

#[test]
fn with_after_job_remove_staged_data_goes_at_job_end_and_after_scancel() {
    let _serial = serial();
    let cluster = Cluster::get();
    stage_area();
    assert!(stage(&["clean"]).success());
    let _remove = SiteEdit::replace("after_job = \"keep\"", "after_job = \"remove\"");
    let src = user_tree(&cluster, 20_000, 16);
    let name = unique_name("e2e-stage-end");
    let output = cluster.home().join(format!("{name}.out"));
    let job_args = |command: &str| {
        vec![
            format!("--output={}", output.display()),
            format!("--container-image={}", cluster.image_tls().reference),
            format!("--container-stage-in={}:/in", src.display()),
            format!("--wrap={command}"),
        ]
    };

    // A job that ends by itself: its copy is there while it runs, gone after.
    let ended = sbatch(&job_args("test -f /in/big && ls /in/small | wc -l"), true);
    let ended_text = std::fs::read_to_string(&output).unwrap_or_default();
    let ended_part = job_part(&cluster, ended.stdout.trim());

    // A job cancelled while it runs.
    let running = sbatch(&job_args("sleep 300"), false);
    let running_part = job_part(&cluster, running.stdout.trim());
    let running_copy = running_part.join(kept_copy(&cluster, &src).file_name().unwrap());
    let was_there = wait_until(Duration::from_secs(120), || {
        running_copy.join("data/big").exists()
    });
    Cmd::user(["scancel", running.stdout.trim()])
        .run()
        .assert_success();

    // A job cancelled while its data is being copied (the copy is in progress under the
    // job's part): the half copy goes too.
    let copying = sbatch(&job_args("true"), false);
    let copying_part = job_part(&cluster, copying.stdout.trim());
    let in_progress = || {
        std::fs::read_dir(&copying_part).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        })
    };
    let caught = wait_until(Duration::from_secs(120), in_progress);
    Cmd::user(["scancel", copying.stdout.trim()])
        .run()
        .assert_success();

    for part in [&ended_part, &running_part, &copying_part] {
        assert_removed(part, "the job's staged data");
    }
    let left = sh(&format!("ls -A {}", user_area(&cluster).display()));
    sh(&format!("rm -rf {} {}", src.display(), output.display()));
    assert!(ended.success(), "{ended}\n{ended_text}");
    assert!(ended_text.contains("20000"), "{ended_text}");
    assert!(
        was_there,
        "the running job's copy never appeared at {}",
        running_copy.display()
    );
    assert!(caught, "never saw the third job's copy in progress");
    assert!(left.trim().is_empty(), "left in the stage area: {left}");
    assert_node_idle(&cluster);
}

/// A configuration standing for one node: its own cache directory, the shared `store` with
/// a 5 s lease.
fn node_config(dir: &Path, name: &str, store: &Path) -> PathBuf {
    let cluster = Cluster::get();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[policy]\nallowed = [\"{}/*\"]\n[cache]\ndir = \"{}\"\n[registry]\n\
             certs_dir = \"{}\"\n[store]\ndir = \"{}\"\nlease_secs = 5\n",
            cluster.tls_registry().host,
            dir.join(name).display(),
            cluster.certs_dir().display(),
            store.display()
        ),
    )
    .unwrap();
    config
}

fn fetch_command(config: &Path, image: &str) -> Command {
    let mut command = Command::new(Cluster::get().berth_bin());
    command
        .arg("--config")
        .arg(config)
        .args(["fetch", image])
        .stdin(Stdio::null());
    command
}

#[test]
fn a_shared_store_converts_once_and_a_killed_converter_holds_it_only_for_its_lease() {
    let cluster = Cluster::get();
    let dir = Path::new("/var/tmp").join(unique_name("berth-e2e-store"));
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let image = push_big_image(&cluster, 200, &unique_name("store-marker"));
    let (a, b, c) = (
        node_config(&dir, "a", &store),
        node_config(&dir, "b", &store),
        node_config(&dir, "c", &store),
    );

    // Node a takes the lease and is killed (its whole process group, as a crashing node
    // loses everything) while it works.
    let mut killed = fetch_command(&a, &image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let leases = store.join("leases");
    let leased = wait_until(Duration::from_secs(120), || {
        std::fs::read_dir(&leases).is_ok_and(|mut d| d.next().is_some())
    });
    sh(&format!("kill -9 -- -{}", killed.id()));
    let _ = killed.wait();
    assert!(leased, "node a never took the store's lease");

    // Node b waits for the dead lease to expire (5 s), then converts and publishes.
    let started = std::time::Instant::now();
    let b_run = fetch_command(&b, &image).output().unwrap();
    let b_took = started.elapsed();
    let b_err = String::from_utf8_lossy(&b_run.stderr).into_owned();
    // Node c copies what b published.
    let c_run = fetch_command(&c, &image).output().unwrap();
    let c_err = String::from_utf8_lossy(&c_run.stderr).into_owned();
    let (b_sif, c_sif) = (
        String::from_utf8_lossy(&b_run.stdout).trim().to_owned(),
        String::from_utf8_lossy(&c_run.stdout).trim().to_owned(),
    );
    let same = sh(&format!("cmp {b_sif} {c_sif} && echo same")).contains("same");
    let _ = std::fs::remove_dir_all(&dir);

    assert!(b_run.status.success(), "node b: {b_err}");
    assert!(b_err.contains("waiting"), "node b did not wait: {b_err}");
    assert!(
        b_took < Duration::from_secs(120),
        "node b was held up {b_took:?}"
    );
    assert!(c_run.status.success(), "node c: {c_err}");
    assert!(
        c_err.contains("from the shared image store"),
        "node c did not copy from the store: {c_err}"
    );
    assert!(!c_err.contains("pulling"), "node c pulled: {c_err}");
    assert!(same, "nodes b and c have different SIFs");
}
