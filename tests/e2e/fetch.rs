//! Issue 4: `berth fetch`, `berth resolve`, `berth images`, `berth prune` against the test
//! cluster's registries (`localhost:5000` HTTPS approved, `localhost:5001` plain HTTP not).
//!
//! Each test uses its own cache directory and configuration (root's `--config`), so tests
//! run in parallel and never disturb the cluster's own cache. Images that must be new to
//! the registry are built here (a random file in a gzip layer) and pushed with skopeo.
//! The berth under test is the cluster's installed one, or `$BERTH_BIN` when set (a
//! development build).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_e2e::{access_lines, unique_name, Cluster, Cmd, Run};

/// A private cache and configuration for one test.
struct Env {
    cluster: Cluster,
    dir: PathBuf,
    config: PathBuf,
    berth: PathBuf,
}

impl Env {
    fn new(extra_allowed: &[&str]) -> Env {
        let cluster = Cluster::get();
        let dir = Path::new("/var/tmp").join(unique_name("berth-e2e-fetch"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("berth.toml");
        let mut allowed = vec![format!("\"{}/*\"", cluster.tls_registry().host)];
        allowed.extend(extra_allowed.iter().map(|a| format!("\"{a}\"")));
        std::fs::write(
            &config,
            format!(
                "[policy]\nallowed = [{}]\n[cache]\ndir = \"{}\"\nmax_size = \"10G\"\n\
                 [registry]\ncerts_dir = \"{}\"\nretries = 3\ntimeout_secs = 5\n",
                allowed.join(", "),
                dir.join("cache").display(),
                cluster.certs_dir().display()
            ),
        )
        .unwrap();
        let berth = std::env::var_os("BERTH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| cluster.berth_bin());
        Env {
            cluster,
            dir,
            config,
            berth,
        }
    }

    fn cmd(&self, args: &[&str]) -> Cmd {
        let mut all: Vec<String> = vec![
            self.berth.display().to_string(),
            "--config".into(),
            self.config.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        Cmd::root(all)
    }

    fn berth(&self, args: &[&str]) -> Run {
        self.cmd(args).run()
    }

    fn fetch_ok(&self, image: &str) -> PathBuf {
        let run = self.berth(&["fetch", image]);
        assert!(run.success(), "{run:?}");
        let path = PathBuf::from(run.stdout.trim());
        assert!(path.is_file(), "stdout is not just the SIF path: {run:?}");
        path
    }

    fn images(&self) -> Vec<String> {
        match std::fs::read_dir(self.dir.join("cache/images")) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn staging(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("cache/tmp"))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The image config stored in a SIF, as `berth sif inspect` prints it.
fn sif_config(env: &Env, sif: &Path) -> String {
    let run = env.berth(&["sif", "inspect", &sif.display().to_string()]);
    assert!(run.success(), "{run:?}");
    run.stdout
}

/// An image pushed by a test: its reference, manifest digest and layer digest.
struct Pushed {
    reference: String,
    digest: String,
    layer: String,
}

/// Builds a one-layer image holding `/payload` (`size` random bytes) and `/marker`
/// (`marker`), and pushes it to the TLS registry as `test/NAME:TAG`.
fn push_image(name: &str, tag: &str, size: usize, marker: &str) -> Pushed {
    let cluster = Cluster::get();
    let work = Path::new("/var/tmp").join(unique_name("berth-e2e-image"));
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let mut payload = vec![0u8; size];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut payload))
        .unwrap();
    std::fs::write(rootfs.join("payload"), payload).unwrap();
    std::fs::write(rootfs.join("marker"), marker).unwrap();
    let layout = work.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer_path = work.join("layer.tar.gz");
    sh(&format!(
        "tar --sort=name --owner=0 --group=0 --numeric-owner -C {} -cf - payload marker | gzip -1 > {}",
        rootfs.display(),
        layer_path.display()
    ));
    let layer_bytes = std::fs::read(&layer_path).unwrap();
    let diff_id = sh(&format!("gzip -dc {} | sha256sum", layer_path.display()));
    let layer = add_blob(&blobs, &layer_bytes);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", format!("MARKER={marker}")], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", diff_id.split_whitespace().next().unwrap())]},
    })
    .to_string();
    let config_digest = add_blob(&blobs, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_bytes.len()}],
    })
    .to_string();
    let digest = add_blob(&blobs, manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let reference = format!("{}/test/{name}:{tag}", cluster.tls_registry().host);
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/templates/skopeo-policy.json");
    let digest_file = work.join("digest");
    sh(&format!(
        "skopeo --policy {} copy -q --preserve-digests --digestfile {} oci:{}:{tag} docker://{reference} </dev/null",
        policy.display(),
        digest_file.display(),
        layout.display()
    ));
    let pushed_digest = std::fs::read_to_string(&digest_file).unwrap();
    assert_eq!(pushed_digest.trim(), digest, "skopeo changed the manifest");
    std::fs::remove_dir_all(&work).unwrap();
    Pushed {
        reference,
        digest,
        layer,
    }
}

fn add_blob(blobs: &Path, bytes: &[u8]) -> String {
    let tmp = blobs.join("incoming");
    std::fs::write(&tmp, bytes).unwrap();
    let out = sh(&format!("sha256sum {}", tmp.display()));
    let hex = out.split_whitespace().next().unwrap().to_string();
    std::fs::rename(&tmp, blobs.join(&hex)).unwrap();
    format!("sha256:{hex}")
}

fn sh(script: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn without_tag(reference: &str) -> &str {
    reference.rsplit_once(':').unwrap().0
}

#[test]
fn approved_image_is_fetched_with_its_config_and_warm_fetch_needs_no_network() {
    let env = Env::new(&[]);
    let image = env.cluster.image_tls();
    let run = env.berth(&["fetch", &image.reference]);
    assert!(run.success(), "{run:?}");
    let sif = PathBuf::from(run.stdout.trim());
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "stdout must be only the path: {run:?}"
    );
    assert!(
        run.stderr.contains("berth: pulling") && run.stderr.contains(" MB/s"),
        "{run:?}"
    );
    let hex = image.digest.strip_prefix("sha256:").unwrap();
    assert!(sif.ends_with(format!("images/{hex}.sif")), "{run:?}");
    let inspect = sif_config(&env, &sif);
    assert!(inspect.contains(&image.digest), "{inspect}");
    assert!(inspect.contains("\"/bin/sh\""), "{inspect}");

    // Warm, pinned by digest: no request reaches the registry, and it is fast.
    let log = env.cluster.tls_registry().log_cursor();
    let pinned = image.by_digest();
    let start = Instant::now();
    assert_eq!(env.fetch_ok(&pinned), sif);
    let warm = start.elapsed();
    assert!(
        access_lines(&log.read_new(), "/v2/").is_empty(),
        "{}",
        log.read_new()
    );
    assert!(
        warm < Duration::from_millis(500),
        "warm fetch took {warm:?}"
    );

    // Docker v2 schema 2 image too, and both listed.
    env.fetch_ok(&env.cluster.image_tls_v2s2().reference);
    let list = env.berth(&["images"]);
    assert!(list.success(), "{list:?}");
    assert!(
        list.stdout.contains(&image.digest) && list.stdout.contains(&image.reference),
        "{list:?}"
    );
    assert_eq!(list.stdout.lines().count(), 3, "{list:?}");
}

#[test]
fn unapproved_plain_http_registry_is_refused_before_any_request() {
    let env = Env::new(&[]);
    let plain = env.cluster.plain_registry();
    let log = plain.log_cursor();
    for args in [
        vec!["fetch", env.cluster.image_plain().reference.as_str()],
        vec!["resolve", env.cluster.image_plain().reference.as_str()],
    ] {
        let run = env.berth(&args);
        assert!(!run.success(), "{run:?}");
        assert!(run.stderr.contains("not an approved image"), "{run:?}");
    }
    // Give the registry time to log anything it did receive.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        access_lines(&log.read_new(), "/v2/").is_empty(),
        "{}",
        log.read_new()
    );
    assert!(env.images().is_empty());
}

#[test]
fn a_moved_tag_still_fetches_the_resolved_digest() {
    let env = Env::new(&[]);
    let name = unique_name("moving");
    let first = push_image(&name, "v", 1000, "first");
    let run = env.berth(&["resolve", &first.reference]);
    assert!(run.success(), "{run:?}");
    let pinned = run.stdout.trim().to_string();
    assert_eq!(
        pinned,
        format!("{}@{}", without_tag(&first.reference), first.digest)
    );
    let second = push_image(&name, "v", 1000, "second");
    assert_ne!(first.digest, second.digest);

    let old = env.fetch_ok(&pinned);
    assert!(sif_config(&env, &old).contains("MARKER=first"));
    let new = env.fetch_ok(&first.reference);
    assert!(sif_config(&env, &new).contains("MARKER=second"));
}

#[test]
fn concurrent_fetches_download_each_blob_once() {
    let env = Env::new(&[]);
    let image = push_image(&unique_name("concurrent"), "v", 8 << 20, "c");
    let log = env.cluster.tls_registry().log_cursor();
    let children: Vec<_> = (0..8)
        .map(|_| {
            let cmd = env.cmd(&["fetch", "--quiet", &image.reference]);
            std::thread::spawn(move || cmd.run())
        })
        .collect();
    let runs: Vec<Run> = children.into_iter().map(|c| c.join().unwrap()).collect();
    for run in &runs {
        assert!(run.success(), "{run:?}");
        assert_eq!(run.stdout, runs[0].stdout, "{run:?}");
        assert!(run.stderr.is_empty(), "--quiet prints nothing: {run:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let text = log.read_new();
    assert!(
        !access_lines(&text, "GET /v2/").is_empty(),
        "no requests logged: {text}"
    );
    let layer_gets = access_lines(&text, &format!("blobs/{}", image.layer));
    assert_eq!(
        layer_gets.len(),
        1,
        "layer downloaded more than once: {layer_gets:#?}"
    );
    assert_eq!(env.images().len(), 1);
}

#[test]
fn kill_during_fetch_leaves_nothing_usable_and_a_new_fetch_succeeds() {
    let env = Env::new(&[]);
    let image = push_image(&unique_name("killed"), "v", 64 << 20, "k");
    let mut child = Command::new(&env.berth)
        .args([
            "--config",
            &env.config.display().to_string(),
            "fetch",
            &image.reference,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it while it works in staging (downloading or unpacking).
    let started = Instant::now();
    while env.staging().is_empty() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        env.images().iter().all(|n| !n.ends_with(".sif")) || env.images().len() == 1,
        "a partial image was published: {:?}",
        env.images()
    );

    let sif = env.fetch_ok(&image.reference);
    let hex = image.digest.strip_prefix("sha256:").unwrap();
    assert_eq!(env.images(), vec![format!("{hex}.sif")]);
    assert!(
        env.staging().is_empty(),
        "staging left behind: {:?}",
        env.staging()
    );
    assert!(sif_config(&env, &sif).contains(&image.digest));
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let env = Env::new(&[]);
    let image = push_image(&unique_name("corrupt"), "v", 4096, "x");
    let hex = image.layer.strip_prefix("sha256:").unwrap();
    let data = env.cluster.tls_registry().storage.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let run = env.berth(&["fetch", &image.reference]);
    assert!(!run.success(), "{run:?}");
    assert!(
        run.stderr.contains("corrupt data") && run.stderr.contains(&image.layer),
        "{run:?}"
    );
    assert!(env.images().is_empty(), "{:?}", env.images());
}

#[test]
fn a_registry_that_is_down_fails_clearly_after_bounded_retries() {
    let env = Env::new(&["localhost:5999/*"]);
    let start = Instant::now();
    let run = env.berth(&["fetch", "localhost:5999/test/busybox:latest"]);
    assert!(!run.success(), "{run:?}");
    assert!(
        run.stderr
            .contains("localhost:5999 is unreachable after 3 attempt(s)"),
        "{run:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(20), "{run:?}");
}

#[test]
fn prune_evicts_least_recently_used() {
    let env = Env::new(&[]);
    env.fetch_ok(&env.cluster.image_tls().reference);
    env.fetch_ok(&env.cluster.image_tls_v2s2().reference);
    let run = env.berth(&["prune", "--max-size", "2M"]);
    assert!(run.success(), "{run:?}");
    assert!(
        run.stdout.contains(&env.cluster.image_tls().digest),
        "{run:?}"
    );
    assert_eq!(env.images().len(), 1);
    let run = env.berth(&["prune", "--all"]);
    assert!(run.success(), "{run:?}");
    assert!(env.images().is_empty());
}

#[test]
fn a_user_cannot_fill_the_node_cache() {
    // The user's berth reads the site configuration (--config is root's), whose cache is
    // root's; the image is new, so it is not cached there.
    let env = Env::new(&[]);
    let image = push_image(&unique_name("user"), "v", 100, "u");
    let run = Cmd::user([
        env.berth.display().to_string(),
        "fetch".into(),
        image.reference,
    ])
    .run();
    assert!(!run.success(), "{run:?}");
    assert!(run.stderr.contains("runs as root"), "{run:?}");
}
