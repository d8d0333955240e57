//! The security review's attacks on the site policy (issue 8; findings 2, 3, 8 and 9 of
//! `reviews/security-1/REPORT.md`), run for real on the cluster as the test user. Each must
//! fail closed: the job fails with a clear message, nothing runs on the host or from an
//! image the policy did not approve, and the node stays idle.
//!
//! The local-image tests switch the node to `local_images = true` with a listed directory
//! of their own, and put the configuration back when they end (see [`LocalImages`]).
//! Needs `tests/cluster/up`; fails (does not skip) without it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use berth_e2e::{
    as_root, assert_node_idle, serial, unique_name, wait_until, write_user_file, Cluster, Cmd,
    PluginlessConf, Run, PATH,
};

/// The partition of the test cluster whose berth.toml entry says `require_container = true`.
const STRICT: &str = "strict";

/// What the node says when a step in `strict` has no container.
const CONTAINER_REQUIRED: &str = "partition `strict` requires every job to run in a container";

/// os-release marks of the two local test images.
const APPROVED: &str = "APPROVED admin image";
const NOT_APPROVED: &str = "NOT APPROVED user image";

// ---- finding 8: images that look like options ---------------------------------------------

#[test]
fn images_that_look_like_options_are_refused_at_submission_and_on_the_node() {
    let _serial = serial();
    let cluster = Cluster::get();
    let bypass = PluginlessConf::new(&cluster);
    for image in ["-h", "--help"] {
        let option = format!("--container-image={image}");
        let run = Cmd::user(["srun", &option, "sh", "-c", "echo ran"]).run();
        run.assert_failure();
        assert!(
            run.stderr.contains("srun: error: berth:") && run.stderr.contains("starts with `-`"),
            "not refused at submission with the cause:\n{run}"
        );
        assert!(run.stdout.is_empty(), "{run}");
        // Without the plugin at submission, the node refuses it on its own.
        let run = bypass.srun(
            &format!("container-image={image}"),
            &["sh", "-c", "echo ran"],
        );
        run.assert_failure();
        assert!(
            run.stderr.contains("is not allowed on this cluster")
                && run.stderr.contains("starts with `-`"),
            "not refused on the node with the cause:\n{run}"
        );
        assert!(run.stdout.is_empty(), "something ran:\n{run}");
        assert_node_idle(&cluster);
        // Root's launcher call, exactly as the plugin makes it: a deny line, never help.
        let uid = cluster.uid().to_string();
        let run = as_root([
            cluster.berth_bin().to_str().unwrap(),
            "policy",
            "check",
            "--fetch",
            "--as-user",
            &format!("{uid}:{uid}"),
            "--",
            image,
        ]);
        assert_eq!(run.code(), Some(1), "{run}");
        assert!(run.stdout.starts_with("deny: image `-"), "{run}");
        assert_eq!(run.stdout.lines().count(), 1, "{run}");
    }
}

// ---- finding 3: the partition from srun's environment -------------------------------------

/// The review's LD_PRELOAD shim: srun keeps the caller's SLURM_JOB_PARTITION instead of
/// setting the real one, so the step's environment names a partition of the user's choice.
const NOPART_C: &str = r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
int setenv(const char *n, const char *v, int o) {
    static int (*real)(const char *, const char *, int);
    if (!real) real = dlsym(RTLD_NEXT, "setenv");
    return strcmp(n, "SLURM_JOB_PARTITION") ? real(n, v, o) : 0;
}
"#;

/// The shim, compiled into the user's home; removed on drop.
struct Shim {
    dir: PathBuf,
    so: PathBuf,
}

impl Shim {
    fn build(cluster: &Cluster) -> Shim {
        let dir = cluster.home().join(unique_name("e2e-nopart"));
        std::fs::create_dir(&dir).expect("shim dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let source = dir.join("nopart.c");
        std::fs::write(&source, NOPART_C).unwrap();
        let so = dir.join("nopart.so");
        as_root([
            "cc",
            "-shared",
            "-fPIC",
            "-o",
            so.to_str().unwrap(),
            source.to_str().unwrap(),
            "-ldl",
        ])
        .assert_success();
        std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o755)).unwrap();
        Shim { dir, so }
    }

    /// `args` as the test user with the shim preloaded and the partition forged to `debug`.
    fn run(&self, args: &[&str]) -> Run {
        Cmd::user(args)
            .env("SLURM_JOB_PARTITION", "debug")
            .env("LD_PRELOAD", &self.so)
            .run()
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_partition_forged_in_sruns_environment_still_requires_a_container() {
    let _serial = serial();
    let cluster = Cluster::get();
    let shim = Shim::build(&cluster);
    // srun sends the step its own environment, SLURM_JOB_PARTITION=debug included (Slurm
    // sets the real value only in each task, after the plugin decided). The forged value
    // also passes the submission check (srun's plugin cannot see `-p`), so the node decides,
    // and must ask slurmctld.
    let run = shim.run(&["srun", "-p", STRICT, "sh", "-c", "echo ran"]);
    run.assert_failure();
    assert!(
        run.stderr.contains(CONTAINER_REQUIRED),
        "not refused for partition strict:\n{run}"
    );
    assert!(run.stdout.is_empty(), "the command ran on the host:\n{run}");
    assert_node_idle(&cluster);
    // The batch step too.
    let name = unique_name("e2e-nopart-batch");
    let script = cluster.home().join(format!("{name}.sh"));
    let output = cluster.home().join(format!("{name}.out"));
    write_user_file(&cluster, &script, "#!/bin/sh\necho ran\n", 0o755);
    let run = shim.run(&[
        "sbatch",
        "--wait",
        "-p",
        STRICT,
        &format!("--output={}", output.display()),
        script.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&output);
    run.assert_failure();
    assert!(
        text.contains(CONTAINER_REQUIRED),
        "batch output does not say why:\n{text}\n{run}"
    );
    assert!(!text.contains("ran"), "the script ran on the host:\n{text}");
    assert_node_idle(&cluster);
}

// ---- findings 2 and 9: local images -------------------------------------------------------

/// The node's configuration with `local_images = true` and one listed directory of the
/// test's own (root-owned, 0755, under /var/lib) holding the approved image; the original
/// configuration is put back and the directory removed on drop.
struct LocalImages {
    config: PathBuf,
    original: String,
    dir: PathBuf,
    approved: PathBuf,
}

impl LocalImages {
    fn enable(cluster: &Cluster) -> LocalImages {
        let config = cluster.berth_config();
        let original = std::fs::read_to_string(&config).expect("read berth.toml");
        let dir = PathBuf::from("/var/lib").join(unique_name("berth-e2e-images"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let approved = dir.join("good.sif");
        build_image(cluster, &approved, APPROVED);
        let text = original
            .replace("local_images = false", "local_images = true")
            .replace(
                "local_image_dirs = []",
                &format!("local_image_dirs = [{:?}]", dir.display().to_string()),
            );
        assert!(
            text.contains("local_images = true") && text.contains(dir.to_str().unwrap()),
            "berth.toml has no `local_images = false` / `local_image_dirs = []` to switch:\n{original}"
        );
        let guard = LocalImages {
            config,
            original,
            dir,
            approved,
        };
        guard.write(&text);
        guard
    }

    /// Replaces the configuration in one rename, so no launcher call reads half a file.
    fn write(&self, text: &str) {
        let temporary = self.config.with_extension("toml.e2e");
        std::fs::write(&temporary, text).unwrap();
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::rename(&temporary, &self.config).unwrap();
    }
}

impl Drop for LocalImages {
    fn drop(&mut self) {
        self.write(&self.original.clone());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A busybox SIF whose /etc/os-release says `mark`, written to `out` (as root).
fn build_image(cluster: &Cluster, out: &Path, mark: &str) {
    let root = tempfile_dir("e2e-rootfs");
    for dir in ["bin", "etc"] {
        std::fs::create_dir(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox");
    for applet in ["sh", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/os-release"), format!("NAME=\"{mark}\"\n")).unwrap();
    as_root([
        cluster.berth_bin().to_str().unwrap(),
        "sif",
        "create",
        "--env",
        "PATH=/bin",
        root.to_str().unwrap(),
        out.to_str().unwrap(),
    ])
    .assert_success();
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

/// A fresh directory under /tmp (root's, for building images).
fn tempfile_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(prefix));
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// The user's side of the symlink swap (appendix B): `~/NAME/evil/good.sif`, the user's
/// own image, and `~/NAME/link`, a symlink to the listed directory or to `evil`.
struct UserTree {
    dir: PathBuf,
    evil: PathBuf,
    link: PathBuf,
}

impl UserTree {
    fn new(cluster: &Cluster) -> UserTree {
        let dir = cluster.home().join(unique_name("e2e-swap"));
        let evil = dir.join("evil");
        std::fs::create_dir_all(&evil).unwrap();
        build_image(cluster, &evil.join("good.sif"), NOT_APPROVED);
        as_root([
            "chown",
            "-R",
            &cluster.uid().to_string(),
            dir.to_str().unwrap(),
        ])
        .assert_success();
        UserTree {
            link: dir.join("link"),
            dir,
            evil,
        }
    }

    /// Points `link` at `target`, as the user.
    fn point_at(&self, target: &Path) {
        Cmd::user([
            "ln",
            "-sfn",
            target.to_str().unwrap(),
            self.link.to_str().unwrap(),
        ])
        .run()
        .assert_success();
    }

    /// The user's image as the user wrote it: through the link.
    fn through_link(&self) -> String {
        self.link.join("good.sif").display().to_string()
    }
}

impl Drop for UserTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Flips LINK between two targets as fast as rename(2) allows, so LINK always exists and
/// any two look-ups a few microseconds apart may see different targets.
const FLIP_PY: &str = r#"
import os, sys
targets, link = sys.argv[1:3], sys.argv[3]
while True:
    for target in targets:
        os.symlink(target, link + ".new")
        os.replace(link + ".new", link)
"#;

/// A process of the user flipping `link` between the listed directory and `evil`, until
/// dropped (its whole process group is killed then).
struct Flipper(Child);

impl Flipper {
    fn start(cluster: &Cluster, tree: &UserTree, approved_dir: &Path) -> Flipper {
        let child = Command::new("runuser")
            .args(["-u", cluster.user(), "--", "python3", "-c", FLIP_PY])
            .args([approved_dir, &tree.evil, &tree.link])
            .env_clear()
            .env("PATH", PATH)
            .process_group(0)
            .spawn()
            .expect("start the flipping loop");
        let flipper = Flipper(child);
        // Python takes a moment to start; the link points at `evil` until it runs.
        let flipping = wait_until(Duration::from_secs(20), || {
            std::fs::read_link(&tree.link).is_ok_and(|t| t == approved_dir)
        });
        assert!(flipping, "the flipping loop never ran");
        flipper
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.wait();
    }
}

/// `berth start --print-spec ARGS` as the user: the image checks of `berth start`, without
/// holding a container.
fn start_spec(cluster: &Cluster, shell: &str) -> Run {
    let berth = cluster.berth_bin().display().to_string();
    Cmd::user(["sh", "-c", &shell.replace("BERTH", &berth)]).run()
}

#[test]
fn berth_start_runs_only_allowed_local_files_and_the_descriptor_it_was_given() {
    let _serial = serial();
    let cluster = Cluster::get();
    let site = LocalImages::enable(&cluster);
    let tree = UserTree::new(&cluster);
    let approved = site.approved.display().to_string();
    let evil = tree.evil.join("good.sif").display().to_string();
    // By path: the user's own file is outside the listed directory; through a link into
    // it, the listed file (by its resolved path) is what starts.
    let run = start_spec(
        &cluster,
        &format!("exec BERTH start --private --print-spec -- {evil}"),
    );
    run.assert_failure();
    assert!(
        run.stderr
            .contains("outside the site's local image directories"),
        "{run}"
    );
    tree.point_at(&site.dir);
    let run = start_spec(
        &cluster,
        &format!(
            "exec BERTH start --private --print-spec -- {}",
            tree.through_link()
        ),
    );
    run.assert_success();
    assert!(run.stdout.contains(&approved), "{run}");
    // By descriptor: the file on it is what is checked and runs, and must be the one named.
    let run = start_spec(
        &cluster,
        &format!("exec BERTH start --print-spec --image-fd=3 -- {approved} 3<{approved}"),
    );
    run.assert_success();
    assert!(run.stdout.contains(&approved), "{run}");
    let run = start_spec(
        &cluster,
        &format!("exec BERTH start --print-spec --image-fd=3 -- {approved} 3<{evil}"),
    );
    run.assert_failure();
    assert!(
        run.stderr
            .contains("outside the site's local image directories"),
        "{run}"
    );
    assert!(!run.stdout.contains(&evil), "{run}");
    let run = start_spec(
        &cluster,
        &format!("exec BERTH start --print-spec --image-fd=3 -- {evil} 3<{approved}"),
    );
    run.assert_failure();
    assert!(run.stderr.contains("--image-fd 3 holds"), "{run}");
    // A group-writable listed directory makes every image in it refused.
    std::fs::set_permissions(&site.dir, std::fs::Permissions::from_mode(0o775)).unwrap();
    let run = start_spec(
        &cluster,
        &format!("exec BERTH start --print-spec -- {approved}"),
    );
    std::fs::set_permissions(&site.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    run.assert_failure();
    assert!(run.stderr.contains("is writable by its group"), "{run}");
}

#[test]
fn a_local_image_swapped_after_the_check_is_not_what_runs() {
    let _serial = serial();
    let cluster = Cluster::get();
    let site = LocalImages::enable(&cluster);
    let tree = UserTree::new(&cluster);
    // Forged requests (no plugin at submission), so the node resolves the user's link.
    let bypass = PluginlessConf::new(&cluster);
    let request = format!("container-image={}", tree.through_link());
    let os_release = ["cat", "/etc/os-release"];
    tree.point_at(&site.dir);
    let run = bypass.srun(&request, &os_release);
    run.assert_success();
    assert!(run.stdout.contains(APPROVED), "{run}");
    tree.point_at(&tree.evil);
    let run = bypass.srun(&request, &os_release);
    run.assert_failure();
    assert!(
        run.stderr
            .contains("outside the site's local image directories"),
        "{run}"
    );
    // The link flips all the while: whatever the check saw, only the approved image runs.
    // (Before the fix, about one run in four ran the user's image.)
    {
        let _flipping = Flipper::start(&cluster, &tree, &site.dir);
        for _ in 0..20 {
            let run = bypass.srun(&request, &os_release);
            assert!(
                !run.stdout.contains(NOT_APPROVED),
                "the swapped-in image ran:\n{run}"
            );
            if run.success() {
                assert!(run.stdout.contains(APPROVED), "{run}");
            }
        }
    }
    // Submitted normally, the request carries the path it resolved to at submission.
    tree.point_at(&site.dir);
    let run = Cmd::user([
        "srun",
        &format!("--container-image={}", tree.through_link()),
        "cat",
        "/etc/os-release",
    ])
    .run();
    run.assert_success();
    assert!(run.stdout.contains(APPROVED), "{run}");
    assert_node_idle(&cluster);
}

#[test]
fn root_tells_the_user_nothing_about_files_the_user_cannot_see() {
    let _serial = serial();
    let cluster = Cluster::get();
    let _site = LocalImages::enable(&cluster);
    // A file only root can see, and one that does not exist, in /root (0700).
    let present = RootFile::new();
    let absent = PathBuf::from("/root").join(unique_name("e2e-oracle"));
    let uid = cluster.uid().to_string();
    let answer = |path: &Path| {
        let run = as_root([
            cluster.berth_bin().to_str().unwrap(),
            "policy",
            "check",
            "--as-user",
            &format!("{uid}:{uid}"),
            "--",
            path.to_str().unwrap(),
        ]);
        assert_eq!(run.code(), Some(1), "{run}");
        run.stdout.replace(path.to_str().unwrap(), "PATH")
    };
    let (seen_present, seen_absent) = (answer(&present.0), answer(&absent));
    // And through the node, as the user sees it.
    let bypass = PluginlessConf::new(&cluster);
    let node = |path: &Path| {
        let run = bypass.srun(&format!("container-image={}", path.display()), &["true"]);
        run.assert_failure();
        run.stderr.replace(path.to_str().unwrap(), "PATH")
    };
    let (node_present, node_absent) = (node(&present.0), node(&absent));
    assert!(seen_present.contains("Permission denied"), "{seen_present}");
    assert_eq!(
        seen_present, seen_absent,
        "root's answers tell the files apart"
    );
    assert!(node_present.contains("Permission denied"), "{node_present}");
    assert_eq!(
        strip_job_ids(&node_present),
        strip_job_ids(&node_absent),
        "the node's answers tell the files apart"
    );
    assert_node_idle(&cluster);
}

/// A file in /root, which only root can see; removed on drop.
struct RootFile(PathBuf);

impl RootFile {
    fn new() -> RootFile {
        let path = PathBuf::from("/root").join(unique_name("e2e-oracle"));
        std::fs::write(&path, b"x").unwrap();
        RootFile(path)
    }
}

impl Drop for RootFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The lines of `text` in sorted order with digits removed: srun's messages name job and
/// task ids, and srun's and slurmstepd's lines arrive in either order.
fn strip_job_ids(text: &str) -> Vec<String> {
    // srun's own scheduling notes come and go with the node's load: not part of the answer.
    let scheduling = |l: &&str| {
        l.starts_with("srun: job ")
            && (l.contains("queued and waiting") || l.contains("has been allocated"))
    };
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !scheduling(l))
        .map(|l| l.chars().filter(|c| !c.is_ascii_digit()).collect())
        .collect();
    lines.sort();
    lines
}
