//! Slurm releases (issue 16), end to end on whichever release the cluster runs: Debian's
//! 22.05 (`tests/cluster/up`) or one built from the shared sources (`tests/cluster/up
//! --slurm 24.11`). What a newer release offers (`--container-entrypoint` through
//! `spank_prepend_task_argv`), what must work on every release (a site TaskProlog in
//! containerized steps), and what an admin sees when a plugin or a package meets another
//! release: Slurm's own refusal, and the package's guard. Needs the cluster; fails without it.

use std::path::{Path, PathBuf};

use berth_e2e::{serial, unique_name, write_user_file, Cluster, Cmd, PluginlessConf};

/// The release the cluster runs, as (major, minor); 22.05 for a state file from before
/// releases were recorded.
fn release(cluster: &Cluster) -> (u32, u32) {
    let text = cluster.try_var("SLURM_RELEASE").unwrap_or("22.05");
    let (major, minor) = text.split_once('.').expect("SLURM_RELEASE is MAJOR.MINOR");
    (major.parse().unwrap(), minor.parse().unwrap())
}

fn release_text(cluster: &Cluster) -> String {
    let (major, minor) = release(cluster);
    format!("{major}.{minor:02}")
}

/// Slurm 23.11 brought `spank_prepend_task_argv`.
fn can_prepend_task_argv(cluster: &Cluster) -> bool {
    release(cluster) >= (23, 11)
}

/// `/bin/sh -c` printing VAR or "unset": an absolute path, because 22.05 looks the
/// command up on the host before the task enters the container (newer releases after).
fn print_var(var: &str) -> [String; 3] {
    [
        "/bin/sh".into(),
        "-c".into(),
        format!("echo \"${{{var}:-unset}}\""),
    ]
}

#[test]
fn container_entrypoint_runs_first_where_slurm_allows_it() {
    let cluster = Cluster::get();
    let image = format!("--container-image={}", cluster.var("IMAGE_ENTRYPOINT"));
    let print = print_var("BERTH_IMAGE_ENTRYPOINT");
    let srun = |extra: &[&str]| {
        let mut args: Vec<&str> = vec!["srun", "-N1", &image];
        args.extend_from_slice(extra);
        args.extend(print.iter().map(String::as_str));
        Cmd::user(args).run()
    };
    let run = srun(&["--container-entrypoint"]);
    if can_prepend_task_argv(&cluster) {
        // The entrypoint ran first, in the task's environment, and exec'd the command.
        run.assert_success();
        assert_eq!(run.stdout.trim(), "ran", "{run:?}");
    } else {
        run.assert_failure();
        assert!(
            run.stderr.contains("only on Slurm 23.11 and later")
                && run.stderr.contains("in front of your command"),
            "{run:?}"
        );
    }
    // Without the option the image's entrypoint stays out, on every release (as in pyxis).
    let plain = srun(&[]);
    plain.assert_success();
    assert_eq!(plain.stdout.trim(), "unset", "{plain:?}");
    cluster.assert_node_healthy();
}

#[test]
fn the_site_task_prolog_exports_into_host_and_container_steps() {
    let cluster = Cluster::get();
    let image = format!("--container-image={}", cluster.image_tls().reference);
    let print = print_var("BERTH_SITE_TASK_PROLOG");
    for container in [None, Some(image.as_str())] {
        let mut args: Vec<&str> = vec!["srun", "-N1"];
        args.extend(container);
        args.extend(print.iter().map(String::as_str));
        let run = Cmd::user(&args).run();
        run.assert_success();
        assert_eq!(run.stdout.trim(), "ran", "{args:?}: {run:?}");
    }
    // The batch step too: its slurmstepd has the configuration from slurmd (no slurm.conf
    // path on 24.11 and later), and its one task runs the script in the image.
    let name = unique_name("e2e-release-prolog");
    let script = cluster.home().join(format!("{name}.sh"));
    let output = cluster.home().join(format!("{name}.out"));
    write_user_file(
        &cluster,
        &script,
        "#!/bin/sh\necho \"${BERTH_SITE_TASK_PROLOG:-unset}\"\n",
        0o755,
    );
    for container in [None, Some(image.as_str())] {
        let out = format!("--output={}", output.display());
        let mut args: Vec<&str> = vec!["sbatch", "--wait", "-N1", &out];
        args.extend(container);
        let path = script.display().to_string();
        args.push(&path);
        let run = Cmd::user(&args).run();
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        let _ = std::fs::remove_file(&output);
        run.assert_success();
        assert_eq!(text.trim(), "ran", "{args:?}: {run:?}");
    }
    let _ = std::fs::remove_file(&script);
    cluster.assert_node_healthy();
}

/// A site's own `oci.conf` beside the running slurm.conf, for as long as it lives: Slurm's
/// OCI container support configured. Never replaces one the site has.
struct SiteOciConf(PathBuf);

impl SiteOciConf {
    fn install(cluster: &Cluster) -> SiteOciConf {
        let conf = Path::new(
            cluster
                .try_var("SLURM_CONF")
                .unwrap_or("/etc/slurm/slurm.conf"),
        );
        let path = conf
            .parent()
            .expect("slurm.conf's directory")
            .join("oci.conf");
        assert!(
            !path.exists(),
            "{} exists already: not the test's",
            path.display()
        );
        // Slurm's documented crun example; no step here gets as far as running it.
        std::fs::write(
            &path,
            "RunTimeRun=\"crun --rootless=true --root=/run/user/%U/ run --bundle %b %n.%u.%j.%s.%t\"\n",
        )
        .expect("write oci.conf");
        SiteOciConf(path)
    }
}

impl Drop for SiteOciConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where the site configured Slurm's own OCI support, `--container` is Slurm's: berth runs
/// its containers for `--container-image` only, and refuses a step asking for both at
/// submission (srun and sbatch) rather than nest one container in the other.
#[test]
fn slurms_container_option_stays_slurms_where_oci_conf_is_configured() {
    let _serial = serial();
    let cluster = Cluster::get();
    let image = format!("--container-image={}", cluster.image_tls().reference);
    let image = image.as_str();
    let oci = SiteOciConf::install(&cluster);
    let bundle = "--container=/nonexistent/e2e-bundle";
    let srun = Cmd::user(["srun", "-N1", bundle, image, "true"]).run();
    let sbatch = Cmd::user(["sbatch", bundle, image, "--wrap", "true"]).run();
    for run in [&srun, &sbatch] {
        run.assert_failure();
        assert!(
            run.stderr.contains(&oci.0.display().to_string())
                && run.stderr.contains("/nonexistent/e2e-bundle"),
            "{run:?}"
        );
    }
    // --container-image alone is still berth's.
    let ours = Cmd::user(["srun", "-N1", image, "cat", "/etc/os-release"]).run();
    ours.assert_success();
    assert!(ours.stdout.contains("BERTH_REGISTRY="), "{ours:?}");
    drop(oci);
    cluster.assert_node_healthy();
}

/// The plugin this checkout built for another release than the cluster's: Debian's 22.05
/// build (target/release) on a newer cluster, a `packaging/build --slurm` build
/// (target/slurm-RELEASE/release) on 22.05.
fn plugin_for_another_release(cluster: &Cluster) -> Option<PathBuf> {
    let target = Path::new(cluster.var("REPO")).join("target");
    if release(cluster) != (22, 5) {
        let debian = target.join("release/libspank_berth.so");
        return debian.is_file().then_some(debian);
    }
    let mut builds: Vec<PathBuf> = std::fs::read_dir(&target)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("slurm-"))
        .map(|e| e.path().join("release/libspank_berth.so"))
        .filter(|p| p.is_file())
        .collect();
    builds.sort();
    builds.pop()
}

#[test]
fn a_plugin_built_for_another_release_is_refused_by_slurm() {
    let cluster = Cluster::get();
    let Some(other) = plugin_for_another_release(&cluster) else {
        eprintln!(
            "skipped: no plugin built for a release other than {} in this checkout \
             (packaging/build --slurm /opt/slurm-24.11 makes one)",
            release_text(&cluster)
        );
        return;
    };
    // The user's own copy of the site's configuration, whose plugin stack loads that
    // plugin: what srun (as the node's slurmstepd would) does with it.
    let plugin = cluster
        .home()
        .join(format!("{}.so", unique_name("e2e-release")));
    std::fs::copy(&other, &plugin).expect("copy the plugin");
    let conf = PluginlessConf::with_plugstack(
        &cluster,
        &format!("required {} berth=/usr/bin/berth\n", plugin.display()),
    );
    let run = conf.srun("", &["-N1", "true"]);
    let _ = std::fs::remove_file(&plugin);
    run.assert_failure();
    // Slurm names the plugin's release ("Incompatible Slurm plugin ... version (24.11.7)"),
    // then refuses the whole stack because the plugin is `required`.
    assert!(
        run.stderr.contains("Incompatible") && run.stderr.contains("Failed to load plugin"),
        "{run:?}"
    );
    cluster.assert_node_healthy();
}

/// `dpkg-deb -f DEB FIELD`.
fn deb_field(deb: &str, field: &str) -> String {
    let run = Cmd::root(["dpkg-deb", "-f", deb, field]).run();
    run.assert_success();
    run.stdout.trim().to_owned()
}

#[test]
fn the_package_guards_its_release() {
    let cluster = Cluster::get();
    let deb = cluster.var("BERTH_DEB").to_owned();
    let release = release_text(&cluster);
    assert!(
        deb_field(&deb, "Version").ends_with(&format!("+slurm{release}")),
        "{deb}"
    );
    let depends = deb_field(&deb, "Depends");
    let prefix = cluster.try_var("SLURM_PREFIX").unwrap_or("/usr").to_owned();
    if prefix == "/usr" {
        // Debian's Slurm: dpkg itself refuses the package beside another release.
        let (major, minor) = self::release(&cluster);
        let next = format!("{major}.{:02}", minor + 1);
        for pin in [
            format!("slurm-wlm-basic-plugins (>= {release})"),
            format!("slurm-wlm-basic-plugins (<< {next})"),
        ] {
            assert!(depends.contains(&pin), "{pin} not in {depends}");
        }
        return;
    }
    // A from-source Slurm has no package to depend on: the preinst checks the release in
    // its prefix, before anything is unpacked.
    assert!(!depends.contains("slurm"), "{depends}");
    let dir = std::env::temp_dir().join(unique_name("e2e-release-control"));
    Cmd::root(["dpkg-deb", "-e", &deb, &dir.display().to_string()])
        .run()
        .assert_success();
    let preinst = dir.join("preinst").display().to_string();
    Cmd::root(["sh", &preinst, "install"])
        .run()
        .assert_success();
    // The same package on a node whose prefix holds another release: a tmpfs over its bin
    // and sbin in a private mount namespace stands in for that node.
    let fake = format!(
        "set -e; mount -t tmpfs tmpfs {prefix}/sbin; \
         printf '#!/bin/sh\\necho slurm 23.02.7\\n' >{prefix}/sbin/slurmd; \
         chmod 0755 {prefix}/sbin/slurmd; exec sh {preinst} install"
    );
    let run = Cmd::root([
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &fake,
    ])
    .run();
    let _ = std::fs::remove_dir_all(&dir);
    run.assert_failure();
    assert!(
        run.stderr.contains(&format!("built for Slurm {release}"))
            && run.stderr.contains("holds Slurm 23.02")
            && run.stderr.contains("packaging/build --slurm"),
        "{run:?}"
    );
}
