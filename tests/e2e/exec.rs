//! Issue 3: `berth exec`, `berth start`/`stop` and `berth exec --join`, run as the
//! unprivileged user `berthtest` (uid 1100) on images built here from busybox-static.
//! No cluster is needed. The berth under test is `$BERTH_BIN`, else the workspace's
//! `target/debug/berth` (build it first: `cargo build -p berth`). Run as root (the tests
//! build images and switch to berthtest with runuser).
//!
//! The tests run one at a time (a lock): the leak check counts the user's processes.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_e2e::{serial, unique_name, wait_until};

const USER: &str = "berthtest";
const UID: &str = "1100";

fn berth() -> PathBuf {
    std::env::var_os("BERTH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/berth"))
}

/// The images of this run, in a world-readable directory.
struct Images {
    dir: PathBuf,
    /// busybox, as a SIF written by `berth sif create`.
    sif: PathBuf,
    /// busybox with `/escape -> /etc` and `/up -> ../../../..`, as a bare squashfs.
    symlinks: PathBuf,
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        // One fixed place, made anew by each run, so runs do not pile up in /tmp.
        let dir = PathBuf::from("/tmp/berth-e2e-exec");
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{}: {e}", dir.display()),
            _ => {}
        }
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .expect("busybox-static must be installed (/bin/busybox)");
        for applet in [
            "sh", "id", "cat", "grep", "touch", "sleep", "true", "ls", "echo",
        ] {
            symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(rootfs.join("etc/notprog"), "plain text\n").unwrap();
        let sif = dir.join("busybox.sif");
        root_ok(&[
            berth().as_os_str(),
            "sif".as_ref(),
            "create".as_ref(),
            rootfs.as_os_str(),
            sif.as_os_str(),
        ]);

        symlink("/etc", rootfs.join("escape")).unwrap();
        symlink("../../../..", rootfs.join("up")).unwrap();
        let symlinks = dir.join("symlinks.sqfs");
        let mk = Command::new("mksquashfs")
            .args([rootfs.as_os_str(), symlinks.as_os_str()])
            .args(["-all-root", "-quiet", "-noappend", "-comp", "lz4"])
            .output()
            .expect("squashfs-tools must be installed");
        assert!(
            mk.status.success(),
            "mksquashfs: {}",
            String::from_utf8_lossy(&mk.stderr)
        );

        std::fs::write(dir.join("corrupt.sif"), vec![0x5a; 64 * 1024]).unwrap();
        std::fs::create_dir(dir.join("bindsrc")).unwrap();
        std::fs::write(dir.join("bindsrc/file"), "from the host\n").unwrap();
        Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&dir)
            .status()
            .unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Images { dir, sif, symlinks }
    })
}

fn root_ok(args: &[&std::ffi::OsStr]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `berth ARGS` as berthtest, in /tmp, bounded by 60 s.
fn user_cmd(args: &[&str]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", "60", "runuser", "-u", USER, "--"])
        .arg(berth())
        .args(args);
    c.current_dir("/tmp").env_remove("TMPDIR");
    c
}

fn user(args: &[&str]) -> Output {
    user_cmd(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `sh -c SCRIPT` in the busybox image with extra berth options; asserts success.
fn sh(opts: &[&str], script: &str) -> String {
    let img = images().sif.to_str().unwrap();
    let mut args = vec!["exec"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[img, "sh", "-c", script]);
    let o = user(&args);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn ids_inside_equal_outside_or_root_when_remapped() {
    let _s = serial();
    assert_eq!(sh(&[], "id -u; id -g"), format!("{UID}\n{UID}\n"));
    assert_eq!(sh(&["--remap-root"], "id -u; id -g"), "0\n0\n");
}

#[test]
fn no_capabilities_and_no_new_privs() {
    let _s = serial();
    let status = sh(
        &[],
        "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status",
    );
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
}

#[test]
fn root_is_readonly_unless_writable_and_the_image_never_changes() {
    let _s = serial();
    let before = sha256(&images().sif);
    assert_eq!(
        sh(&[], "touch /new 2>/dev/null && echo wrote || echo refused"),
        "refused\n"
    );
    assert_eq!(
        sh(
            &["--writable"],
            "touch /new && echo changed > /etc/notprog && cat /etc/notprog"
        ),
        "changed\n"
    );
    // Nothing persisted: the next container sees the image as it was.
    assert_eq!(sh(&[], "[ -e /new ] || cat /etc/notprog"), "plain text\n");
    assert_eq!(sha256(&images().sif), before);
}

#[test]
fn exit_status_is_the_commands() {
    let _s = serial();
    let img = images().sif.to_str().unwrap();
    let o = user(&["exec", img, "sh", "-c", "exit 42"]);
    assert_eq!(o.status.code(), Some(42), "{}", text(&o));
    let o = user(&["exec", img, "sh", "-c", "kill -KILL $$"]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
}

#[test]
fn missing_and_unexecutable_commands_give_127_and_126() {
    let _s = serial();
    let img = images().sif.to_str().unwrap();
    let o = user(&["exec", img, "no-such-command"]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
    assert!(
        text(&o).contains("command not found in the image"),
        "{}",
        text(&o)
    );
    let o = user(&["exec", img, "/etc/notprog"]);
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
}

#[test]
fn bad_images_are_named_with_the_cause() {
    let _s = serial();
    let missing = images().dir.join("missing.sif");
    let o = user(&["exec", missing.to_str().unwrap(), "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    assert!(text(&o).contains("missing.sif"), "{}", text(&o));
    let o = user(&[
        "exec",
        images().dir.join("corrupt.sif").to_str().unwrap(),
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    assert!(text(&o).contains("corrupt.sif"), "{}", text(&o));
}

#[test]
fn sigterm_to_berth_ends_the_command_within_a_second() {
    let _s = serial();
    let img = images().sif.to_str().unwrap();
    let mut child = user_cmd(&["exec", img, "sleep", "1000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let berth_pid = wait_for_berth(&child);
    // Let the container come up so the signal meets the running command.
    assert!(wait_until(Duration::from_secs(10), || has_child_named(
        berth_pid, "sleep"
    )));
    let t = Instant::now();
    Command::new("kill")
        .args(["-TERM", &berth_pid.to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(128 + 15));
}

/// The berth process under `timeout`/`runuser` (the innermost descendant named berth).
fn wait_for_berth(child: &Child) -> u32 {
    let mut found = None;
    assert!(wait_until(Duration::from_secs(10), || {
        found = descendants(child.id())
            .into_iter()
            .find(|&p| comm(p) == "berth");
        found.is_some()
    }));
    found.unwrap()
}

fn descendants(pid: u32) -> Vec<u32> {
    let kids: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    kids.iter()
        .flat_map(|&k| std::iter::once(k).chain(descendants(k)))
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn has_child_named(pid: u32, name: &str) -> bool {
    descendants(pid).into_iter().any(|p| comm(p) == name)
}

#[test]
fn image_symlinks_cannot_lead_a_bind_out_of_the_root() {
    let _s = serial();
    let img = images().symlinks.to_str().unwrap();
    let src = images().dir.join("bindsrc");
    let unique = unique_name("landed");
    let bind = format!("{}:/escape/{unique}", src.display());
    // /escape -> /etc in the image: the bind lands in the container's /etc.
    let o = user(&[
        "exec",
        "--bind",
        &bind,
        img,
        "cat",
        &format!("/etc/{unique}/file"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from the host\n");
    assert!(
        !Path::new("/etc").join(&unique).exists(),
        "nothing created on the host"
    );
    // /up -> ../../../.. resolves to the container's root, not the host's.
    let bind = format!("{}:/up/{unique}", src.display());
    let o = user(&[
        "exec",
        "--bind",
        &bind,
        img,
        "cat",
        &format!("/{unique}/file"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!Path::new("/").join(&unique).exists());
}

#[test]
fn a_joiner_shares_the_started_containers_tmp() {
    let _s = serial();
    let img = images().sif.to_str().unwrap();
    let mut holder = user_cmd(&["start", img])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let handle = line.trim().to_string();
    assert!(handle.contains(':'), "handle {handle:?}");

    let o = user(&[
        "exec",
        "--join",
        &handle,
        "sh",
        "-c",
        "echo shared > /tmp/note; id -u",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{UID}\n"));
    let o = user(&[
        "exec",
        "--join",
        &handle,
        "sh",
        "-c",
        "cat /tmp/note; grep NoNewPrivs /proc/self/status",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "shared\nNoNewPrivs:\t1\n"
    );
    let o = user(&["exec", "--join", &handle, "no-such-command"]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));

    let o = user(&["stop", &handle]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(holder.wait().unwrap().success());
    let o = user(&["exec", "--join", &handle, "true"]);
    assert_eq!(
        o.status.code(),
        Some(125),
        "joining a stopped container fails: {}",
        text(&o)
    );
}

#[test]
fn a_hundred_runs_leave_no_process_mount_or_directory() {
    let _s = serial();
    let img = images().sif.to_str().unwrap();
    for i in 0..100 {
        let o = user(&["exec", img, "true"]);
        assert!(o.status.success(), "run {i}: {}", text(&o));
    }
    for name in ["berth", "squashfuse", "squashfuse_ll"] {
        let o = Command::new("pgrep")
            .args(["-u", USER, "-x", name])
            .output()
            .unwrap();
        assert!(
            o.stdout.is_empty(),
            "{name} left running: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains("squashfuse") && !mounts.contains(".berth-"),
        "{mounts}"
    );
    let leftovers: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".berth-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Security finding 11: /proc and /sys are the host's, so a job running as real root (uid 0
/// without capabilities) must find the dangerous parts masked or read-only, as under runc.
/// Writes only what is already there, so a failure here changes nothing on the host.
#[test]
fn kernel_interfaces_are_masked_and_read_only_even_for_root() {
    let _s = serial();
    let img = images().sif.to_str().unwrap();
    let script = "\
        (echo h > /proc/sysrq-trigger) 2>/dev/null && echo sysrq=written || echo sysrq=refused; \
        [ -s /proc/kcore ] && echo kcore=visible || echo kcore=hidden; \
        cat /proc/sys/kernel/core_pattern > /tmp/cp; \
        (cat /tmp/cp > /proc/sys/kernel/core_pattern) 2>&1; \
        grep -E ' /proc/(sys|keys|timer_list) ' /proc/self/mountinfo";
    let o = Command::new(berth())
        .args(["exec", img, "sh", "-c", script])
        .current_dir("/tmp")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.contains("sysrq=refused"), "{out}");
    assert!(out.contains("kcore=hidden"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains(" /proc/sys ro"), "{out}");
    assert!(out.contains(" /proc/keys "), "{out}");
}
