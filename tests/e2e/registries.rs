//! Issue 11: registries as sites run them, against the test cluster's registries
//! (`localhost:5000` HTTPS). Mirrors (`[[registry.mirrors]]`) and the pull pipeline's
//! parallel downloads and progress; the HTTP edge cases (an interrupted blob resumed, 429
//! with Retry-After, an oversized blob, an expiring token) are unit tests with in-test
//! servers in `launcher/src/registry/download.rs`, where the server can misbehave on cue.
//!
//! Each test uses its own cache and configuration (root's `--config`), so they run in
//! parallel and never disturb the cluster's own cache.

use std::path::{Path, PathBuf};

use berth_e2e::{unique_name, Cluster, Cmd, Run};

/// A private cache and a configuration made of `extra` after the cache and CA settings.
struct Site {
    dir: PathBuf,
    config: PathBuf,
    berth: PathBuf,
}

impl Site {
    fn new(extra: &str) -> Site {
        let cluster = Cluster::get();
        let dir = Path::new("/var/tmp").join(unique_name("berth-e2e-registries"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("berth.toml");
        std::fs::write(
            &config,
            format!(
                "[cache]\ndir = \"{}\"\n[registry]\ncerts_dir = \"{}\"\nretries = 2\n\
                 timeout_secs = 5\n{extra}",
                dir.join("cache").display(),
                cluster.certs_dir().display()
            ),
        )
        .unwrap();
        let berth = std::env::var_os("BERTH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| cluster.berth_bin());
        Site { dir, config, berth }
    }

    fn berth(&self, args: &[&str]) -> Run {
        let mut all = vec![
            self.berth.display().to_string(),
            "--config".into(),
            self.config.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        Cmd::root(all).run()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_mirror_serves_another_registrys_name_with_the_upstream_unreachable() {
    let cluster = Cluster::get();
    let registry = cluster.tls_registry();
    // `mirrored.invalid` cannot resolve: every byte must come from the mirror, which keeps
    // the registry's repositories under its project `test`.
    let site = Site::new(&format!(
        "[[registry.mirrors]]\nregistry = \"mirrored.invalid\"\nmirrors = [\"{}/test\"]\n\
         [policy]\nallowed = [\"mirrored.invalid/*\"]\n",
        registry.host
    ));
    let image = "mirrored.invalid/busybox:latest";

    let check = site.berth(&["policy", "check", image]);
    assert!(check.success(), "{check:?}");
    assert_eq!(
        check.stdout,
        format!("allow: {image} (rule: mirrored.invalid/*)\n")
    );
    assert!(
        check.stderr.contains(&format!(
            "pull from: {}/test (mirror of mirrored.invalid)",
            registry.host
        )),
        "{check:?}"
    );
    // The policy judges the name written: the mirror's own name is not approved.
    let mirror_name = cluster.image_tls().reference;
    let denied = site.berth(&["policy", "check", &mirror_name]);
    assert_eq!(denied.code(), Some(1), "{denied:?}");

    let log = registry.log_cursor();
    let fetched = site.berth(&["fetch", "--quiet", image]);
    assert!(fetched.success(), "{fetched:?}");
    let sif = PathBuf::from(fetched.stdout.trim());
    assert!(sif.exists(), "{fetched:?}");
    // The same bytes as the mirror's own image: the manifest digest is in the cache name.
    let digest = cluster.image_tls().digest;
    let hex = digest.trim_start_matches("sha256:");
    assert!(sif.to_string_lossy().contains(hex), "{}", sif.display());
    let seen = log.read_new();
    assert!(
        seen.contains("/v2/test/busybox/manifests/latest"),
        "the mirror was not asked: {seen}"
    );

    // `berth resolve` (the submission-side pin) goes through the mirror too and prints the
    // name the user wrote, pinned.
    let pinned = site.berth(&["resolve", image]);
    assert!(pinned.success(), "{pinned:?}");
    assert_eq!(
        pinned.stdout.trim(),
        format!("mirrored.invalid/busybox@{digest}")
    );
}

#[test]
fn a_pull_with_parallel_downloads_reports_totals_and_rates() {
    let cluster = Cluster::get();
    let registry = cluster.tls_registry();
    let site = Site::new(&format!(
        "parallel_downloads = 2\n[policy]\nallowed = [\"{}/*\"]\n",
        registry.host
    ));
    let image = cluster.image_tls();
    let run = site.berth(&["fetch", &image.reference]);
    assert!(run.success(), "{run:?}");
    // The final line: `berth: pulling REF DONE/TOTAL MB RATE MB/s`, done equal to total.
    let line = run
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("berth: pulling "))
        .unwrap_or_else(|| panic!("no progress line: {run:?}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (done, total) = fields[3].split_once('/').unwrap();
    assert_eq!(done, total, "{line}");
    assert_eq!(fields[4], "MB", "{line}");
    assert_eq!(fields.last(), Some(&"MB/s"), "{line}");
}
