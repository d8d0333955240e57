//! Issue 11: registries as sites run them, against the test cluster's registries
//! (`localhost:5000` HTTPS): mirrors (`[[registry.mirrors]]`), a layer resumed from staged
//! bytes with a Range request, progress, and a private registry through Slurm. The HTTP
//! edge cases a real registry will not produce on cue (a connection dropped mid-blob, 429
//! with Retry-After, an oversized blob, an expiring token) are unit tests with in-test
//! servers in `launcher/src/registry/download.rs`.
//!
//! The tests use their own cache and configuration (root's `--config`), except the
//! private-registry test: it runs jobs through Slurm, so it adds its registry
//! (`localhost:5002`, started by the test) and `user_credentials` to the cluster's own
//! berth.toml for its duration (the e2e lock keeps other suites out meanwhile).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::Duration;

use berth_e2e::{
    unique_name, wait_until, write_user_file, Cluster, Cmd, PrivateRegistry, ScratchBerth,
};

/// A private cache and a configuration made of `extra` after the cache and CA settings.
fn site(extra: &str) -> ScratchBerth {
    let cluster = Cluster::get();
    ScratchBerth::new("berth-e2e-registries", |dir| {
        format!(
            "[cache]\ndir = \"{}\"\n[registry]\ncerts_dir = \"{}\"\nretries = 2\n\
             timeout_secs = 5\n{extra}",
            dir.join("cache").display(),
            cluster.certs_dir().display()
        )
    })
}

#[test]
fn a_mirror_serves_another_registrys_name_with_the_upstream_unreachable() {
    let cluster = Cluster::get();
    let registry = cluster.tls_registry();
    // `mirrored.invalid` cannot resolve: every byte must come from the mirror, which keeps
    // the registry's repositories under its project `test`.
    let site = site(&format!(
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
    let site = site(&format!(
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

/// The private registry's port.
const PRIVATE_PORT: u16 = 5002;

/// Files the test puts where the node's berth reads them (the site's auth file, the
/// registry's CA), put back as they were when dropped.
struct Installed(Vec<(PathBuf, Option<Vec<u8>>)>);

impl Installed {
    fn file(&mut self, path: &Path, contents: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        self.0.push((path.to_path_buf(), std::fs::read(path).ok()));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        for (path, before) in self.0.drain(..).rev() {
            let _ = match before {
                Some(bytes) => std::fs::write(&path, bytes),
                None => std::fs::remove_file(&path),
            };
        }
    }
}

/// The private registry (`localhost:5002`, htpasswd) as the cluster's site uses it: approved
/// in the cluster's berth.toml, its credentials in the site's root-only auth file, its CA
/// trusted; all put back when dropped.
struct PrivateSite {
    registry: PrivateRegistry,
    _installed: Installed,
    /// The site's auth file, in the `auths` format the user's own login files use too.
    auth_json: String,
}

/// How the site treats the private registry.
struct SiteSetup {
    /// The controller pins tags users cannot resolve (the test cluster's slurm.conf runs
    /// `berth pin-job` as PrologSlurmctld).
    controller_pin: bool,
    /// The site's auth file holds credentials for the registry (else only users' own
    /// logins reach it).
    site_credentials: bool,
}

/// Users pin at submission with their own login or a digest; the nodes pull with the site's.
const USERS_RESOLVE: SiteSetup = SiteSetup {
    controller_pin: false,
    site_credentials: true,
};
/// The controller pins what users cannot resolve; the nodes pull with the site's credentials.
const CONTROLLER_PINS: SiteSetup = SiteSetup {
    controller_pin: true,
    site_credentials: true,
};
/// Only users' own logins reach the registry.
const USERS_LOGINS_ONLY: SiteSetup = SiteSetup {
    controller_pin: false,
    site_credentials: false,
};

impl PrivateSite {
    fn new(cluster: &Cluster, setup: SiteSetup) -> PrivateSite {
        let SiteSetup {
            controller_pin,
            site_credentials,
        } = setup;
        let registry = PrivateRegistry::start_on(PRIVATE_PORT);
        let config = std::fs::read_to_string(cluster.berth_config()).unwrap();
        let auth_file = config
            .lines()
            .find_map(|l| l.strip_prefix("auth_file = \""))
            .and_then(|rest| rest.strip_suffix('"'))
            .map(PathBuf::from)
            .expect("the cluster's berth.toml names its auth_file");
        let site_config = config
            .lines()
            .filter(|l| !l.starts_with("controller_pin"))
            .collect::<Vec<_>>()
            .join("\n")
            .replacen(
                "allowed = [",
                &format!("allowed = [\"{}/*\", ", registry.host),
                1,
            )
            .replacen(
                "[registry]\n",
                &format!(
                    "[registry]\nuser_credentials = true\ncontroller_pin = {controller_pin}\n"
                ),
                1,
            );
        assert!(
            site_config.contains(&registry.host) && site_config.contains("controller_pin"),
            "the cluster's berth.toml changed shape"
        );
        let mut installed = Installed(Vec::new());
        installed.file(&cluster.berth_config(), site_config.as_bytes(), 0o644);
        let auth_json = format!(
            r#"{{"auths": {{"{}": {{"username": "{}", "password": "{}"}}}}}}"#,
            registry.host,
            PrivateRegistry::USER,
            PrivateRegistry::PASSWORD
        );
        let site_auth = if site_credentials {
            auth_json.as_str()
        } else {
            r#"{"auths": {}}"#
        };
        installed.file(&auth_file, site_auth.as_bytes(), 0o600);
        let ca = std::fs::read(cluster.ca_cert()).unwrap();
        installed.file(
            &cluster.certs_dir().join(&registry.host).join("ca.crt"),
            &ca,
            0o644,
        );
        let peek = Cmd::user(["cat", &auth_file.display().to_string()]).run();
        assert!(
            !peek.success(),
            "the user read the site's credentials: {peek:?}"
        );
        PrivateSite {
            registry,
            _installed: installed,
            auth_json,
        }
    }

    /// Copies `source` (a cluster image) to `repo:tag` here; returns the digest pushed.
    fn push(&self, source: &str, target: &str) -> String {
        push(source, target, &self.registry.skopeo_options().join(" "))
    }
}

/// `skopeo copy` of `source` (on the cluster's HTTPS registry) to `target` with `options`
/// for the destination; returns the digest of what was pushed.
fn push(source: &str, target: &str, options: &str) -> String {
    let cluster = Cluster::get();
    let digest_file = Path::new("/var/tmp").join(unique_name("digest"));
    let copy = Command::new("bash")
        .args([
            "-c",
            &format!(
                "skopeo copy -q --src-cert-dir {}/localhost:5000 {options} --digestfile {} \
                 docker://{source} docker://{target}",
                cluster.certs_dir().display(),
                digest_file.display(),
            ),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(copy.status.success(), "{copy:?}");
    let digest = std::fs::read_to_string(&digest_file).unwrap();
    let _ = std::fs::remove_file(&digest_file);
    digest.trim().to_string()
}

#[test]
fn a_private_image_runs_through_slurm_with_the_users_login_or_a_digest() {
    let _serial = berth_e2e::serial();
    let cluster = Cluster::get();
    // Where the controller does not pin, the user's login or a digest is needed.
    let site = PrivateSite::new(&cluster, USERS_RESOLVE);
    let registry = &site.registry;
    // The cluster's test image, copied into the private registry (its os-release names
    // localhost:5000, where it was built).
    let image = format!("{}/private/busybox:latest", registry.host);
    let digest = site.push(&cluster.image_tls().reference, &image);
    let pinned = format!("{}/private/busybox@{digest}", registry.host);

    let srun = |image: &str, auth: Option<&Path>| {
        let mut cmd = Cmd::user([
            "srun",
            &format!("--container-image={image}"),
            "cat",
            "/etc/os-release",
        ]);
        if let Some(auth) = auth {
            cmd = cmd.env("REGISTRY_AUTH_FILE", auth);
        }
        cmd.run()
    };

    // Without a login of their own the pin at submission cannot read the tag: refused with
    // both fixes named.
    let refused = srun(&image, None);
    assert!(!refused.success(), "{refused:?}");
    assert!(
        refused.stderr.contains("requires credentials") && refused.stderr.contains("login"),
        "{refused:?}"
    );

    // With the user's own login (a podman auth file they own) the tag is pinned at
    // submission and the node pulls that digest with the site's credentials.
    let login = cluster.home().join(format!("{}.json", unique_name("auth")));
    write_user_file(&cluster, &login, &site.auth_json, 0o600);
    let ran = srun(&image, Some(&login));
    assert!(ran.success(), "{ran:?}");
    assert!(
        ran.stdout.contains("BERTH_REGISTRY=localhost:5000"),
        "{ran:?}"
    );

    // A batch job: the script runs in the image, and so do two steps the script (on the
    // host) starts, each pinned where it is submitted, with the login the job inherited.
    let script = cluster
        .home()
        .join(format!("{}.sh", unique_name("private")));
    let output = script.with_extension("out");
    let body = format!(
        "#!/bin/sh\nfor step in 1 2; do srun --container-image={image} grep BERTH_REGISTRY \
         /etc/os-release; done\n"
    );
    write_user_file(&cluster, &script, &body, 0o755);
    let batch = Cmd::user([
        "sbatch".to_string(),
        "--wait".into(),
        format!("--output={}", output.display()),
        script.display().to_string(),
    ])
    .env("REGISTRY_AUTH_FILE", &login)
    .run();
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&output);
    assert!(batch.success(), "{batch:?}\n{text}");
    assert_eq!(
        text.matches("BERTH_REGISTRY=localhost:5000").count(),
        2,
        "{text}"
    );
    let _ = std::fs::remove_file(&login);

    // Cached on the node now, the tag is still refused to a user without a login: the pin
    // at submission asks the registry, not the node's cache.
    let still_refused = srun(&image, None);
    assert!(!still_refused.success(), "{still_refused:?}");

    // Named by digest, the image needs no credentials at submission at all: the policy
    // allows the repository, and the node pulled (or pulls) it with the site's.
    let by_digest = srun(&pinned, None);
    assert!(by_digest.success(), "{by_digest:?}");
}

#[test]
fn the_controller_pins_a_private_tag_the_user_cannot_read_and_only_admins_can_change_it() {
    let _serial = berth_e2e::serial();
    let cluster = Cluster::get();
    let site = PrivateSite::new(&cluster, CONTROLLER_PINS);
    let repo = format!("{}/{}", site.registry.host, unique_name("private/pinned"));
    let image = format!("{repo}:latest");
    let digest = site.push(&cluster.image_tls().reference, &image);

    // No login, no digest: srun is accepted, the controller pins the tag, the node runs it.
    let ran = Cmd::user([
        "srun",
        &format!("--container-image={image}"),
        "sh",
        "-c",
        "echo job=$SLURM_JOB_ID; grep BERTH_REGISTRY /etc/os-release",
    ])
    .run();
    assert!(ran.success(), "{ran:?}");
    assert!(
        ran.stdout.contains("BERTH_REGISTRY=localhost:5000"),
        "{ran:?}"
    );
    let job = ran
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("job="))
        .unwrap()
        .to_string();
    let comment = admin_comment(&job);
    assert!(
        comment.contains(&format!("berth-pin:{image}=")) && comment.ends_with(&digest),
        "{comment}"
    );
    assert_eq!(
        step_digests(&job, &repo),
        vec![("0".to_string(), digest.clone())]
    );

    // The user cannot write a pin: slurmctld keeps AdminComment to its administrators.
    let forged = Cmd::user([
        "scontrol",
        "update",
        &format!("JobId={job}"),
        "AdminComment=berth-pin:forged",
    ])
    .run();
    assert!(!forged.success(), "{forged:?}");
    assert_eq!(admin_comment(&job), comment, "the user changed the pin");
}

/// The job's AdminComment, whole.
fn admin_comment(job: &str) -> String {
    let run = Cmd::root([
        "squeue",
        "--noheader",
        "--states=all",
        "--Format=admin_comment:0",
        &format!("--jobs={job}"),
    ])
    .run();
    assert!(run.success(), "{run:?}");
    run.stdout.trim().to_string()
}

/// `(step, digest)` of each step of `job` that ran an image of `repo` (`host/path`), as the
/// node's audit trail records them, the job prolog's prefetch (which fetches ahead, and runs
/// nothing) aside. The repository tells this job's records from those of an earlier
/// cluster's job with the same id (the audit file outlives a restart).
fn step_digests(job: &str, repo: &str) -> Vec<(String, String)> {
    let cluster = Cluster::get();
    let bin = cluster.berth_bin().display().to_string();
    let audit = Cmd::root([&bin, "audit", "--job", job, "--json"]).run();
    assert!(audit.success(), "{audit:?}");
    audit
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| {
            r["step"] != "prolog"
                && r["image"].as_str().is_some_and(|i| {
                    i.starts_with(&format!("{repo}@")) || i.starts_with(&format!("{repo}:"))
                })
        })
        .map(|r| {
            (
                r["step"].as_str().unwrap_or_default().to_string(),
                r["digest"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Where a tag moves while a job runs: `repo` gets `first` (a cluster image) now and
/// `second` when [`Moving::moved`] is called.
struct Moving {
    image: String,
    first_digest: String,
    second: String,
    options: String,
}

impl Moving {
    fn new(registry_host: &str, options: String) -> Moving {
        let cluster = Cluster::get();
        let image = format!("{registry_host}/{}:moving", unique_name("moving"));
        let first_digest = push(&cluster.image_tls().reference, &image, &options);
        Moving {
            image,
            first_digest,
            second: cluster.image_tls_v2s2().reference,
            options,
        }
    }

    /// `host/path`, without the tag.
    fn repo(&self) -> &str {
        self.image
            .rsplit_once(':')
            .map_or(&self.image, |(repo, _)| repo)
    }

    fn moved(&self) {
        let second = push(&self.second, &self.image, &self.options);
        assert_ne!(second, self.first_digest, "the tag did not move");
    }
}

/// A file in the user's home the test creates to let a job go on.
fn signal_file(name: &str) -> PathBuf {
    Cluster::get().home().join(unique_name(name))
}

/// sbatch: the tag moves after the job started; the batch step and a step its script starts
/// (an srun with the job's environment, as the script's own would have) run the first digest.
/// salloc + srun: the tag moves between two steps; both run the first digest.
fn all_steps_run_the_first_digest(moving: &Moving) {
    let cluster = Cluster::get();
    let container = format!("--container-image={}", moving.image);

    // sbatch: the script (in the image) prints the request its steps inherit, then waits.
    let output = signal_file("moving-out");
    let batch = Cmd::user([
        "sbatch",
        "--parsable",
        &container,
        &format!("--output={}", output.display()),
        "--wrap",
        "echo request=$SLURM_SPANK_BERTH_REQUEST; sleep 60",
    ])
    .run();
    assert!(batch.success(), "{batch:?}");
    let job = batch.stdout.trim().to_string();
    let request = || {
        std::fs::read_to_string(&output)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("request=").map(str::to_string))
    };
    assert!(
        wait_until(Duration::from_secs(60), || request().is_some()),
        "job {job} printed no request"
    );
    let request = request().unwrap();
    assert!(
        request.contains(&format!("@{}", moving.first_digest)),
        "the batch step did not pass the pin on: {request}"
    );
    moving.moved();
    let step = Cmd::user(["srun", &format!("--jobid={job}"), "--overlap", "true"])
        .env("SLURM_SPANK_BERTH_REQUEST", &request)
        .run();
    let _ = Cmd::user(["scancel", &job]).run();
    let _ = std::fs::remove_file(&output);
    assert!(step.success(), "{step:?}");
    let steps = step_digests(&job, moving.repo());
    assert!(steps.iter().any(|(s, _)| s == "batch"), "{steps:?}");
    assert!(steps.iter().any(|(s, _)| s == "0"), "{steps:?}");
    for (step, digest) in &steps {
        assert_eq!(digest, &moving.first_digest, "step {step} of job {job}");
    }

    // salloc, then two sruns from its shell with the tag moved between them.
    let moving = Moving::new(
        moving.image.split('/').next().unwrap(),
        moving.options.clone(),
    );
    let (stepped, go_on) = (signal_file("stepped"), signal_file("go-on"));
    let script = format!(
        "srun true && echo job=$SLURM_JOB_ID && touch {stepped} && \
         while [ ! -e {go_on} ]; do sleep 0.2; done && srun true",
        stepped = stepped.display(),
        go_on = go_on.display()
    );
    let salloc = std::thread::spawn({
        let container = format!("--container-image={}", moving.image);
        move || Cmd::user(["salloc", &container, "sh", "-c", &script]).run()
    });
    assert!(
        wait_until(Duration::from_secs(90), || stepped.exists()),
        "salloc's first step did not run"
    );
    moving.moved();
    write_user_file(&cluster, &go_on, "", 0o644);
    let salloc = salloc.join().unwrap();
    let _ = std::fs::remove_file(&stepped);
    let _ = std::fs::remove_file(&go_on);
    assert!(salloc.success(), "{salloc:?}");
    let job = salloc
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("job="))
        .unwrap()
        .to_string();
    let steps = step_digests(&job, moving.repo());
    assert_eq!(steps.len(), 2, "{steps:?}");
    for (step, digest) in &steps {
        assert_eq!(digest, &moving.first_digest, "step {step} of job {job}");
    }
}

#[test]
fn a_public_tag_moved_while_a_job_runs_changes_no_step() {
    let _serial = berth_e2e::serial();
    let cluster = Cluster::get();
    let options = format!(
        "--dest-cert-dir {}/localhost:5000",
        cluster.certs_dir().display()
    );
    all_steps_run_the_first_digest(&Moving::new(&cluster.tls_registry().host, options));
}

#[test]
fn a_private_tag_moved_while_a_job_runs_changes_no_step() {
    let _serial = berth_e2e::serial();
    let cluster = Cluster::get();
    let site = PrivateSite::new(&cluster, CONTROLLER_PINS);
    let options = site.registry.skopeo_options().join(" ");
    all_steps_run_the_first_digest(&Moving::new(&site.registry.host, options));
}

/// A user's own `docker login` file (`~/.docker/config.json`, theirs, 0600), removed when
/// dropped.
struct UserLogin(PathBuf);

impl UserLogin {
    fn install(user: &str, json: &str) -> UserLogin {
        let home = sh_out(&format!("getent passwd {user} | cut -d: -f6"));
        let dir = Path::new(home.trim()).join(".docker");
        assert!(
            !dir.exists(),
            "{} exists; the test will not touch it",
            dir.display()
        );
        let file = dir.join("config.json");
        let made = Cmd::root([
            "runuser",
            "-u",
            user,
            "--",
            "sh",
            "-c",
            &format!(
                "umask 077 && mkdir {} && cat > {}",
                dir.display(),
                file.display()
            ),
        ])
        .stdin(json)
        .run();
        assert!(made.success(), "{made:?}");
        UserLogin(dir)
    }
}

impl Drop for UserLogin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sh -c script`'s stdout, as root.
fn sh_out(script: &str) -> String {
    let run = Cmd::root(["sh", "-c", script]).run();
    assert!(run.success(), "{run:?}");
    run.stdout
}

#[test]
fn an_image_one_users_login_pulled_is_not_served_to_a_user_without_access() {
    let _serial = berth_e2e::serial();
    let cluster = Cluster::get();
    // Only users' own logins reach the registry: the site has no credentials for it.
    let site = PrivateSite::new(&cluster, USERS_LOGINS_ONLY);
    let repo = format!("{}/{}", site.registry.host, unique_name("private/mine"));
    let digest = site.push(&cluster.image_tls().reference, &format!("{repo}:1"));
    let pinned = format!("{repo}@{digest}");
    let other = cluster.var("OTHER_USER").to_string();
    let as_other = |image: &str| {
        Cmd::root([
            "runuser",
            "-u",
            &other,
            "--",
            "srun",
            &format!("--container-image={image}"),
            "grep",
            "BERTH_REGISTRY",
            "/etc/os-release",
        ])
        .run()
    };

    // berthtest's own login pins the tag at submission and pulls it on the node (root reads
    // the login with berthtest's rights); the cache records whose login that was.
    let mine = UserLogin::install(cluster.user(), &site.auth_json);
    let ran = Cmd::user([
        "srun",
        &format!("--container-image={repo}:1"),
        "grep",
        "BERTH_REGISTRY",
        "/etc/os-release",
    ])
    .run();
    assert!(ran.success(), "{ran:?}");
    let records = sh_out(&format!(
        "grep -l '^user {}$' /var/cache/berth/access/* || true",
        cluster.uid()
    ));
    assert!(
        records.contains(&digest[7..]),
        "no access record for {digest}: {records}"
    );

    // The other user, without a login, names the cached image by digest: the registry does
    // not confirm their access, so the node does not serve it.
    let refused = as_other(&pinned);
    assert!(!refused.success(), "{refused:?}");
    assert!(
        refused.stderr.contains("another user's registry login"),
        "{refused:?}"
    );
    assert!(refused.stdout.is_empty(), "{refused:?}");

    // With a login of their own that can read it, they are served the cached image.
    let theirs = UserLogin::install(&other, &site.auth_json);
    let served = as_other(&pinned);
    assert!(served.success(), "{served:?}");
    drop(theirs);
    // The user whose login pulled it runs it without the registry being asked.
    drop(mine);
    let again = Cmd::user(["srun", &format!("--container-image={pinned}"), "true"]).run();
    assert!(again.success(), "{again:?}");
}

/// `sha256sum` of `text`, hex.
fn sha256_hex(text: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn an_interrupted_layer_resumes_from_its_staged_bytes_with_a_range_request() {
    let cluster = Cluster::get();
    let registry = cluster.tls_registry();
    let site = site(&format!("[policy]\nallowed = [\"{}/*\"]\n", registry.host));
    let image = cluster.image_tls();
    let stored = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        std::fs::read(registry.storage.join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        )))
        .unwrap()
    };
    let manifest: serde_json::Value = serde_json::from_slice(&stored(&image.digest)).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = stored(&layer);

    // What an interrupted fetch leaves: the first half of the layer, staged under the
    // image's cache name (`<manifest hex>-<first 32 hex of sha256(registry/repository)>`).
    assert!(site.berth(&["images"]).success(), "the cache is made");
    let key = format!(
        "{}-{}",
        image.digest.trim_start_matches("sha256:"),
        &sha256_hex(&format!("{}/test/busybox", registry.host))[..32]
    );
    let blobs = site.dir.join("cache/tmp").join(key).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = bytes.len() / 2;
    std::fs::write(
        blobs.join(format!("{}.partial", layer.trim_start_matches("sha256:"))),
        &bytes[..half],
    )
    .unwrap();

    let log = registry.log_cursor();
    let run = site.berth(&["fetch", "--quiet", &image.reference]);
    assert!(run.success(), "{run:?}");
    // The registry sent the rest only (206, the other half), and the image was built.
    let seen = log.read_new();
    let request = format!("\"GET /v2/test/busybox/blobs/{layer} HTTP/1.1\" 206 ");
    let line = seen
        .lines()
        .find(|l| l.contains(&request))
        .unwrap_or_else(|| panic!("no ranged request for {layer}:\n{seen}"));
    let sent: usize = line[line.find(&request).unwrap() + request.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(sent, bytes.len() - half, "{line}");
    assert!(PathBuf::from(run.stdout.trim()).exists(), "{run:?}");
}
