//! `berth policy check [--fetch]` and `berth policy require-container` as the SPANK plugin
//! runs them: exit 0 allow, 1 deny (malformed references included), 78 configuration errors
//! (EX_CONFIG), 125 failed fetches; the verdict line on stdout.
//!
//! The tests run as root (so `--config` is honoured). That a non-root caller's `--config` is
//! refused cannot be tested in-process; the end-to-end suite covers it as the test user.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn berth(config: &Path, args: &[&OsStr]) -> Run {
    policy(config, "check", args)
}

fn policy(config: &Path, subcommand: &str, args: &[&OsStr]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("--config")
        .arg(config)
        .args(["policy", subcommand])
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("berth.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const POLICY: &str = r#"
[policy]
allowed = ["localhost:5000/test/*"]
"#;

#[test]
fn allowed_image_exits_0_with_the_canonical_reference_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), POLICY);
    let run = berth(&cfg, &["localhost:5000#test/busybox:1.36".as_ref()]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(
        run.stdout,
        "allow: localhost:5000/test/busybox:1.36 (rule: localhost:5000/test/*)\n"
    );
}

#[test]
fn denied_and_malformed_images_exit_1_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), POLICY);
    for (image, fragment) in [
        (
            "localhost:5000/testing/x",
            "on localhost:5000 the site allows only: localhost:5000/test/*",
        ),
        ("ubuntu", "`ubuntu` (that is, `docker.io/library/ubuntu`)"),
        ("user@localhost:5000/test/x", "site's auth file"),
        ("LOCALHOST:5000/test/x", "write `localhost:5000`"),
        ("/etc/passwd", "local_images = false"),
        (
            "dockerd://ubuntu",
            "`dockerd://` transport is not supported",
        ),
    ] {
        let run = berth(&cfg, &[image.as_ref()]);
        assert_eq!(run.code, 1, "{image}: {}{}", run.stdout, run.stderr);
        assert!(run.stdout.starts_with("deny: "), "{image}: {}", run.stdout);
        assert!(run.stdout.contains(fragment), "{image}: {}", run.stdout);
    }
}

#[test]
fn non_utf8_image_is_refused_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), POLICY);
    let run = berth(&cfg, &[OsStr::from_bytes(b"localhost:5000/test/\xff")]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("not valid UTF-8"), "{}", run.stdout);
}

#[test]
fn json_output_carries_verdict_rule_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), POLICY);
    let run = berth(&cfg, &["--json".as_ref(), "localhost:5000/test/a".as_ref()]);
    assert_eq!(run.code, 0);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["reference"], "localhost:5000/test/a");
    assert_eq!(v["rule"], "localhost:5000/test/*");

    let run = berth(&cfg, &["--json".as_ref(), "evil.com/test/a".as_ref()]);
    assert_eq!(run.code, 1);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["image"], "evil.com/test/a");
    assert!(v["reason"]
        .as_str()
        .unwrap()
        .contains("localhost:5000/test/*"));
}

#[test]
fn a_malformed_pattern_is_a_configuration_error_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "[policy]\nallowed = [\"localhost:5000/test*\"]\n",
    );
    let run = berth(&cfg, &["localhost:5000/test/a".as_ref()]);
    // EX_CONFIG: the plugin tells users the node is misconfigured.
    assert_eq!(run.code, 78, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr.contains("localhost:5000/test*"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("berth.toml"), "{}", run.stderr);
}

#[test]
fn require_container_answers_globally_and_per_partition() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "[policy]\nrequire_container = false\n[policy.partitions.gpu]\nrequire_container = true\n",
    );
    let global = policy(&cfg, "require-container", &[]);
    assert_eq!(global.code, 1, "{}{}", global.stdout, global.stderr);
    assert_eq!(global.stdout, "");
    let gpu = policy(
        &cfg,
        "require-container",
        &["--partition".as_ref(), "gpu".as_ref()],
    );
    assert_eq!(gpu.code, 0, "{}{}", gpu.stdout, gpu.stderr);
    assert!(
        gpu.stdout.contains("partition `gpu` requires"),
        "{}",
        gpu.stdout
    );
    assert!(gpu.stdout.contains("--container-image"), "{}", gpu.stdout);
    let other = policy(
        &cfg,
        "require-container",
        &["--partition".as_ref(), "debug".as_ref()],
    );
    assert_eq!(other.code, 1);
    let both = policy(
        &cfg,
        "require-container",
        &["--partition".as_ref(), "debug,gpu".as_ref()],
    );
    assert_eq!(both.code, 0);

    let strict = config(dir.path(), "[policy]\nrequire_container = true\n");
    let run = policy(&strict, "require-container", &[]);
    assert_eq!(run.code, 0);
    assert!(
        run.stdout.starts_with("this cluster requires"),
        "{}",
        run.stdout
    );
}

#[test]
fn check_with_fetch_pulls_only_what_it_allows() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // Port 1 on loopback: nothing listens, so an attempted pull fails at once.
    let cfg = config(
        dir.path(),
        &format!(
            "[policy]\nallowed = [\"127.0.0.1:1/test/*\"]\nplain_http = [\"127.0.0.1:1\"]\n\
             [cache]\ndir = \"{}\"\n",
            cache.display()
        ),
    );
    let denied = berth(&cfg, &["--fetch".as_ref(), "127.0.0.1:1/other/a".as_ref()]);
    assert_eq!(denied.code, 1, "{}{}", denied.stdout, denied.stderr);
    assert!(denied.stdout.starts_with("deny: "), "{}", denied.stdout);
    assert!(!cache.exists(), "a denied image touched the cache");

    let allowed = berth(&cfg, &["--fetch".as_ref(), "127.0.0.1:1/test/a".as_ref()]);
    assert_eq!(allowed.code, 125, "{}{}", allowed.stdout, allowed.stderr);
    // No verdict line: exit 0 and `allow:` promise the image is in the cache.
    assert!(allowed.stdout.is_empty(), "{}", allowed.stdout);
    assert!(allowed.stderr.contains("127.0.0.1:1"), "{}", allowed.stderr);
}

#[test]
fn an_image_that_looks_like_an_option_is_denied_after_the_double_dash() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), POLICY);
    for image in ["-h", "--help", "--fetch"] {
        for fetch in [None, Some("--fetch")] {
            let args: Vec<&OsStr> = fetch
                .into_iter()
                .chain(["--", image])
                .map(OsStr::new)
                .collect();
            let run = berth(&cfg, &args);
            assert_eq!(run.code, 1, "{image}: {}{}", run.stdout, run.stderr);
            assert!(
                run.stdout.starts_with(&format!(
                    "deny: image `{image}` refused: it starts with `-`"
                )),
                "{}",
                run.stdout
            );
            assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
        }
    }
}

#[test]
fn require_container_for_a_job_slurm_cannot_name_applies_the_strictest_rule() {
    let dir = tempfile::tempdir().unwrap();
    // No job has this id (squeue refuses it, or is not installed): the partition is unknown.
    let job = ["--job".as_ref(), "4294967295".as_ref()];
    let cfg = config(
        dir.path(),
        "[policy]\nrequire_container = false\n[policy.partitions.gpu]\nrequire_container = true\n",
    );
    let run = policy(&cfg, "require-container", &job);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("could not be learnt from Slurm")
            && run.stdout.contains("strictest rule"),
        "{}",
        run.stdout
    );
    // Where no partition could require one, Slurm is not asked and nothing is required.
    let cfg = config(
        dir.path(),
        "[policy.partitions.debug]\nrequire_container = false\n",
    );
    let run = policy(&cfg, "require-container", &job);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    // And where every partition requires one, the answer needs no Slurm either.
    let cfg = config(dir.path(), "[policy]\nrequire_container = true\n");
    let run = policy(&cfg, "require-container", &job);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("this cluster requires"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_mirrored_registry_is_judged_by_its_name_and_shows_where_the_bytes_come_from() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        r#"
[policy]
allowed = ["docker.io/library/*"]
[[registry.mirrors]]
registry = "docker.io"
mirrors = ["harbor.example.org/dockerhub-proxy"]
fallback = true
"#,
    );
    let run = berth(&cfg, &["ubuntu:24.04".as_ref()]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    // stdout keeps exactly the verdict line the plugin reads; where the bytes come from
    // goes to stderr.
    assert_eq!(
        run.stdout,
        "allow: docker.io/library/ubuntu:24.04 (rule: docker.io/library/*)\n"
    );
    assert!(
        run.stderr.contains(
            "pull from: harbor.example.org/dockerhub-proxy (mirror of docker.io), then docker.io"
        ),
        "{}",
        run.stderr
    );
    let run = berth(&cfg, &["--json".as_ref(), "ubuntu".as_ref()]);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        v["pull_from"],
        serde_json::json!([
            "harbor.example.org/dockerhub-proxy (mirror of docker.io)",
            "docker.io"
        ])
    );
    // The mirror's own name is not approved by the rule.
    let run = berth(
        &cfg,
        &["harbor.example.org/dockerhub-proxy/library/ubuntu".as_ref()],
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
}
