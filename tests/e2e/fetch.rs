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

use berth_e2e::images::{push_layers, python_layer, Pushed};
use berth_e2e::{
    access_lines, serial, sh, unique_name, Cluster, Cmd, PrivateRegistry, Run, ScratchBerth,
};

/// A private cache and configuration for one test.
struct Env {
    cluster: Cluster,
    scratch: ScratchBerth,
    /// The suite's tests one at a time: several read the registry's access log to show
    /// that a fetch made no request, and another test's cold fetch of the same image
    /// would write lines there (seen once on 25.11).
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Env {
    fn new(extra_allowed: &[&str]) -> Env {
        Env::with_registry(extra_allowed, &Cluster::get().certs_dir(), None)
    }

    /// An environment whose `[registry]` reads CAs from `certs_dir` and, when given,
    /// credentials from `auth_file`.
    fn with_registry(extra_allowed: &[&str], certs_dir: &Path, auth_file: Option<&Path>) -> Env {
        let serial = serial();
        let cluster = Cluster::get();
        let mut allowed = vec![format!("\"{}/*\"", cluster.tls_registry().host)];
        allowed.extend(extra_allowed.iter().map(|a| format!("\"{a}\"")));
        let auth = auth_file
            .map(|p| format!("auth_file = \"{}\"\n", p.display()))
            .unwrap_or_default();
        let scratch = ScratchBerth::new("berth-e2e-fetch", |dir| {
            format!(
                "[policy]\nallowed = [{}]\n[cache]\ndir = \"{}\"\nmax_size = \"10G\"\n\
                 [registry]\ncerts_dir = \"{}\"\n{auth}retries = 3\ntimeout_secs = 5\n",
                allowed.join(", "),
                dir.join("cache").display(),
                certs_dir.display()
            )
        });
        Env {
            cluster,
            scratch,
            _serial: serial,
        }
    }

    fn berth(&self, args: &[&str]) -> Run {
        self.scratch.berth(args)
    }

    fn fetch_ok(&self, image: &str) -> PathBuf {
        let run = self.berth(&["fetch", image]);
        assert!(run.success(), "{run:?}");
        let path = PathBuf::from(run.stdout.trim());
        assert!(path.is_file(), "stdout is not just the SIF path: {run:?}");
        path
    }

    fn images(&self) -> Vec<String> {
        match std::fs::read_dir(self.scratch.dir.join("cache/images")) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn staging(&self) -> Vec<String> {
        std::fs::read_dir(self.scratch.dir.join("cache/tmp"))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The image config stored in a SIF, as `berth sif inspect` prints it.
fn sif_config(env: &Env, sif: &Path) -> String {
    let run = env.berth(&["sif", "inspect", &sif.display().to_string()]);
    assert!(run.success(), "{run:?}");
    run.stdout
}

/// Builds a one-layer image holding `/payload` (`size` random bytes) and `/marker`
/// (`marker`), and pushes it to the TLS registry as `test/NAME:TAG`.
fn push_image(name: &str, tag: &str, size: usize, marker: &str) -> Pushed {
    push_image_to(
        &Cluster::get().tls_registry().host,
        &[],
        name,
        tag,
        size,
        marker,
    )
}

/// [`push_image`] to the registry `host`, with extra `skopeo copy` options (CA, creds).
fn push_image_to(
    host: &str,
    skopeo_options: &[String],
    name: &str,
    tag: &str,
    size: usize,
    marker: &str,
) -> Pushed {
    let work = Path::new("/var/tmp").join(unique_name("berth-e2e-image"));
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let mut payload = vec![0u8; size];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut payload))
        .unwrap();
    std::fs::write(rootfs.join("payload"), payload).unwrap();
    std::fs::write(rootfs.join("marker"), marker).unwrap();
    let layer_path = work.join("layer.tar.gz");
    sh(&format!(
        "tar --sort=name --owner=0 --group=0 --numeric-owner -C {} -cf - payload marker | gzip -1 > {}",
        rootfs.display(),
        layer_path.display()
    ));
    let pushed = push_layers(host, skopeo_options, name, tag, &[&layer_path], marker);
    std::fs::remove_dir_all(&work).unwrap();
    pushed
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
    // Named by manifest digest and repository: `images/<hex>-<repository key>.sif`.
    let hex = image.digest.strip_prefix("sha256:").unwrap();
    let name = sif.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        sif.parent().unwrap().ends_with("images")
            && name.starts_with(&format!("{hex}-"))
            && name.ends_with(".sif"),
        "{run:?}"
    );
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
            let cmd = env.scratch.cmd(&["fetch", "--quiet", &image.reference]);
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
    let layer_gets = access_lines(&text, &format!("blobs/{}", image.layers[0]));
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
    let mut child = Command::new(&env.scratch.berth)
        .args([
            "--config",
            &env.scratch.config.display().to_string(),
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
    assert_eq!(
        env.images(),
        vec![sif.file_name().unwrap().to_string_lossy().into_owned()]
    );
    assert!(env.images()[0].starts_with(hex), "{:?}", env.images());
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
    let hex = image.layers[0].strip_prefix("sha256:").unwrap();
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
        run.stderr.contains("corrupt data") && run.stderr.contains(&image.layers[0]),
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
        env.scratch.berth.display().to_string(),
        "fetch".into(),
        image.reference,
    ])
    .run();
    assert!(!run.success(), "{run:?}");
    assert!(run.stderr.contains("runs as root"), "{run:?}");
}

#[test]
fn a_private_repository_needs_the_site_credentials_and_says_where_they_go() {
    let registry = PrivateRegistry::start();
    let image = push_image_to(
        &registry.host,
        &registry.skopeo_options(),
        &unique_name("private"),
        "v",
        4096,
        "private",
    );
    let auth_file = registry.dir.join("auth.json");
    let env = Env::with_registry(
        &[&format!("{}/*", registry.host)],
        &registry.certs_dir,
        Some(&auth_file),
    );

    // No entry for the registry (no file at all): a clear refusal naming the registry, that
    // it needs credentials, and where the admin puts them.
    let run = env.berth(&["fetch", &image.reference]);
    assert!(!run.success(), "{run:?}");
    for needle in [
        registry.host.as_str(),
        "requires credentials",
        "[registry] auth_file",
        &auth_file.display().to_string(),
    ] {
        assert!(run.stderr.contains(needle), "missing {needle:?}: {run:?}");
    }
    assert!(env.images().is_empty());

    // The admin adds them: root-owned, 0600, docker config.json `auths`.
    let auth = format!("{}:{}", PrivateRegistry::USER, PrivateRegistry::PASSWORD);
    let encoded = sh(&format!("printf %s '{auth}' | base64 -w0"));
    std::fs::write(
        &auth_file,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{encoded}"}}}}}}"#,
            registry.host
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &auth_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let sif = env.fetch_ok(&image.reference);
    assert!(sif_config(&env, &sif).contains(&image.digest));
}

#[test]
fn hostile_layers_are_refused_quickly_and_the_next_pull_still_works() {
    let env = Env::new(&[]);
    let host = env.cluster.tls_registry().host.clone();
    let work = env.scratch.dir.join("layers");
    std::fs::create_dir_all(&work).unwrap();
    let cases = [
        // A path deeper than PATH_MAX, then an entry berth refuses: the staging is left
        // behind with a tree a path-based removal cannot delete.
        (
            "deep",
            "i = t.TarInfo('/'.join(['d' * 250] * 40) + '/f'); i.size = 1\n\
             tf.addfile(i, io.BytesIO(b'x'))\n\
             tf.addfile(t.TarInfo('../x'))\ntf.close()",
            "max_path_length",
        ),
        // A header declaring an 11 GiB file (the data would follow): over max_image_size.
        (
            "bomb",
            "i = t.TarInfo('big'); i.size = 11 << 30\nout.write(i.tobuf(format=t.GNU_FORMAT))\n\
             out.write(bytes(1 << 20))\nout.close()",
            "max_image_size",
        ),
        // A GNU long name claiming 3 GiB: the tar crate would read it all into memory.
        (
            "longname",
            "i = t.TarInfo('././@LongLink'); i.type = t.GNUTYPE_LONGNAME; i.size = 3 << 30\n\
             out.write(i.tobuf(format=t.GNU_FORMAT))\nout.write(bytes(1 << 20))\nout.close()",
            "extension header",
        ),
    ];
    for (name, script, needle) in cases {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let layer = python_layer(&dir, script);
        let image = push_layers(&host, &[], &unique_name(name), "v", &[&layer], name);
        let start = Instant::now();
        let run = env.berth(&["fetch", &image.reference]);
        assert!(!run.success(), "{run:?}");
        assert!(run.stderr.contains(needle), "{name}: {run:?}");
        assert!(start.elapsed() < Duration::from_secs(20), "{name}: {run:?}");
        assert!(env.images().is_empty(), "{:?}", env.images());
    }
    // A good image after all of them: the leftovers are no obstacle and are cleaned up.
    let good = push_image(&unique_name("after"), "v", 1000, "after");
    let sif = env.fetch_ok(&good.reference);
    assert!(sif_config(&env, &sif).contains("MARKER=after"));
    assert!(
        env.staging().is_empty(),
        "staging left behind: {:?}",
        env.staging()
    );
}

#[test]
fn a_users_lock_on_a_cached_image_does_not_stop_prune() {
    let env = Env::new(&[]);
    let locked = env.fetch_ok(&env.cluster.image_tls().reference);
    env.fetch_ok(&env.cluster.image_tls_v2s2().reference);
    // Any user can open a 0644 SIF and hold a shared lock on it for as long as they like.
    let mut holder = Command::new("runuser")
        .args(["-u", env.cluster.user(), "--", "flock", "-s"])
        .arg(&locked)
        .args(["sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let held = berth_e2e::wait_until(Duration::from_secs(10), || {
        std::fs::File::open(&locked)
            .map(|f| f.try_lock().is_err())
            .unwrap_or(false)
    });
    let run = env.berth(&["prune", "--all"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(held, "the user's lock was never taken");
    assert!(run.success(), "{run:?}");
    assert!(env.images().is_empty(), "{:?} {run:?}", env.images());
}

#[test]
fn a_cache_directory_others_can_write_is_refused() {
    let env = Env::new(&[]);
    env.fetch_ok(&env.cluster.image_tls().reference);
    let images = env.scratch.dir.join("cache/images");
    std::fs::set_permissions(&images, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let run = env.berth(&["fetch", &env.cluster.image_tls().by_digest()]);
    assert!(!run.success(), "{run:?}");
    assert!(
        run.stderr.contains(&images.display().to_string()) && run.stderr.contains("chmod 755"),
        "{run:?}"
    );
}
