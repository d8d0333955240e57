//! The OCI runtime spec of a container, built purely from the image, the user's options and
//! facts about the host user: no I/O here, so every rule is unit-tested. `--print-spec`
//! shows exactly this document; `assemble` realises it.
//!
//! Paths that live in the container's private runtime directory (the "bundle", a tmpfs only
//! berth's mount namespace sees) are relative, as OCI allows: `root.path` is `root`, the
//! generated passwd/group files are `passwd` and `group`.

use std::path::{Path, PathBuf};

use berth_sys::caps::{Capability, Kept};
use berth_sys::mount_options::{is_tmpfs_option, BIND_FLAGS};
use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use crate::image_config::ImageConfig;
use crate::{Error, Result};

/// Annotation keys carrying what OCI has no field for.
pub const ANN_IMAGE: &str = "org.berth.image";
pub const ANN_IMAGE_OFFSET: &str = "org.berth.image.offset";
pub const ANN_USER_NAME: &str = "org.berth.user.name";
pub const ANN_USER_HOME: &str = "org.berth.user.home";

/// The generated passwd and group files, relative to the bundle.
pub const PASSWD: &str = "passwd";
pub const GROUP: &str = "group";

/// Host files every container sees (read-only), when the host has them.
pub const HOST_FILES: [&str; 2] = ["/etc/hosts", "/etc/resolv.conf"];
/// The character devices every container gets (bound from the host): path, major, minor.
pub const DEVICES: [(&str, u64, u64); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// Kernel interfaces hidden inside (an empty read-only tmpfs over directories, /dev/null
/// over files), and those made read-only: Docker 28's defaults (runc's and crun's, plus
/// `/proc/interrupts`, powercap and the per-CPU thermal throttle counters of its GHSA-6fw5
/// and GHSA-jq35 advisories; Podman masks those too). A `*` in a component stands for every
/// copy the node has (as Podman writes it; Docker lists each CPU's).
/// /proc and /sys are the host's, so for a job running as root (uid 0, no capabilities)
/// these are what keeps /proc/sysrq-trigger, /proc/sys/kernel/core_pattern and friends out
/// of reach.
pub const MASKED_PATHS: [&str; 13] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/sys/devices/system/cpu/cpu*/thermal_throttle",
];
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What a `--bind` entry puts at its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    /// The host path `source`.
    Host,
    /// A new, empty tmpfs (source `tmpfs`).
    Tmpfs,
    /// Nothing: the container's default mount there is left out (source `umount`).
    Umount,
}

/// `--bind SRC:DST[:FLAGS]`, FLAGS joined by `+`. SRC is a host path (canonical once
/// parsed), `tmpfs` or `umount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub readonly: bool,
    pub kind: BindKind,
    /// The flags besides `ro`/`rw`, in the order given: [`BIND_FLAGS`], and a tmpfs's
    /// options ([`berth_sys::mount_options::TMPFS_OPTIONS`]).
    pub options: Vec<String>,
}

impl Bind {
    /// Parses `SRC:DST[:FLAGS]`; a host SRC is canonicalized here (it must exist).
    pub fn parse(spec: &str) -> Result<Bind> {
        let bad = |reason: &str| Error::BindSyntax {
            spec: spec.into(),
            reason: reason.into(),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (src, dst, flags) = match parts.as_slice() {
            [s, d] => (*s, *d, ""),
            [s, d, f] => (*s, *d, *f),
            _ => return Err(bad("expected SRC:DST or SRC:DST:FLAGS")),
        };
        if src.is_empty() {
            return Err(bad("empty source"));
        }
        if !Path::new(dst).is_absolute() {
            return Err(bad("the destination must be absolute"));
        }
        let kind = match src {
            "tmpfs" => BindKind::Tmpfs,
            "umount" => BindKind::Umount,
            _ => BindKind::Host,
        };
        let mut readonly = false;
        let mut options = Vec::new();
        for flag in flags.split('+').filter(|f| !f.is_empty()) {
            match flag {
                "ro" => readonly = true,
                "rw" => readonly = false,
                f if BIND_FLAGS.contains(&f) || (kind == BindKind::Tmpfs && is_tmpfs_option(f)) => {
                    options.push(f.to_owned())
                }
                f => return Err(bad(&format!("unknown flag {f:?}"))),
            }
        }
        if kind == BindKind::Umount && (readonly || !options.is_empty()) {
            return Err(bad("umount takes no flags"));
        }
        let source = match kind {
            BindKind::Host => std::fs::canonicalize(src).map_err(|source| Error::BindSource {
                path: src.into(),
                source,
            })?,
            _ => src.into(),
        };
        Ok(Bind {
            source,
            destination: dst.into(),
            readonly,
            kind,
            options,
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub binds: Vec<Bind>,
    pub workdir: Option<PathBuf>,
    /// `--env KEY=VALUE`, in order; later ones win.
    pub env: Vec<(String, String)>,
    pub writable: bool,
    pub no_home: bool,
    pub remap_root: bool,
    /// Run the image's entrypoint before an explicit command.
    pub entrypoint: bool,
    /// The command; empty means the image's entrypoint + cmd.
    pub command: Vec<String>,
    /// Network, IPC and UTS namespaces of the container's own (`--unshare`).
    pub isolation: berth_sys::Isolation,
}

/// Facts about the host and the user berth runs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub uid: u32,
    pub gid: u32,
    pub user: String,
    /// The user's home directory, when it exists on this host.
    pub home: Option<PathBuf>,
    pub cwd: Option<PathBuf>,
    /// `TERM`, passed through so terminal programs work.
    pub term: Option<String>,
    /// Which of [`HOST_FILES`] exist here.
    pub files: Vec<PathBuf>,
}

impl Host {
    /// The current process's user and host.
    pub fn current() -> Host {
        let uid = berth_sys::identity::real_uid();
        let info = berth_sys::identity::user_info(uid);
        Host {
            uid,
            gid: berth_sys::identity::real_gid(),
            user: info
                .as_ref()
                .map_or_else(|| format!("user{uid}"), |i| i.name.clone()),
            home: info.map(|i| i.home).filter(|h| h.is_dir()),
            cwd: std::env::current_dir().ok(),
            term: std::env::var("TERM").ok(),
            files: HOST_FILES
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .collect(),
        }
    }
}

/// Where the image's root file system is, as `sif::open_image` found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef<'a> {
    pub path: &'a Path,
    pub offset: u64,
    pub config: &'a ImageConfig,
}

/// Builds the container's spec. It is written as JSON and read back into `oci-spec`'s types
/// (which checks its shape): their `Default`s are Docker's (default capabilities, masked
/// paths, resources), not "nothing", so building from them would smuggle those in.
pub fn build(image: &ImageRef<'_>, opts: &Options, host: &Host) -> Result<Spec> {
    let config = image.config;
    let (inside_uid, inside_gid) = if opts.remap_root {
        (0, 0)
    } else {
        (host.uid, host.gid)
    };
    let mut process = json!({
        "user": { "uid": inside_uid, "gid": inside_gid },
        "args": command(config, opts)?,
        "env": environment(config, opts, host),
        "cwd": workdir(config, opts, host)?,
        "noNewPrivileges": true,
    });
    // No capabilities means none (OCI); berth_sys::holder reads the same three cases back.
    match kept_capabilities(opts) {
        Kept::None => {}
        Kept::All => {
            let all = berth_sys::caps::all_names();
            process["capabilities"] =
                json!({ "bounding": all, "effective": all, "permitted": all });
        }
        kept @ Kept::Ambient(_) => {
            let names = kept.ambient_names();
            process["capabilities"] = json!({
                "bounding": names, "effective": names, "inheritable": names,
                "permitted": names, "ambient": names,
            });
        }
    }
    let home = home_inside(opts, host);
    let spec = json!({
        "ociVersion": "1.0.2",
        "root": { "path": "root", "readonly": !opts.writable },
        "process": process,
        "mounts": mounts(opts, host)?,
        "linux": {
            "namespaces": namespaces(opts.isolation),
            "devices": DEVICES.iter().map(|(path, major, minor)| {
                json!({ "path": path, "type": "c", "major": major, "minor": minor })
            }).collect::<Vec<_>>(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "uidMappings": [{ "containerID": inside_uid, "hostID": host.uid, "size": 1 }],
            "gidMappings": [{ "containerID": inside_gid, "hostID": host.gid, "size": 1 }],
        },
        "annotations": {
            ANN_IMAGE: image.path,
            ANN_IMAGE_OFFSET: image.offset.to_string(),
            ANN_USER_NAME: host.user,
            ANN_USER_HOME: home,
            // The SPANK plugin's joiners read it (--container-entrypoint).
            (berth_sys::holder::ANN_ENTRYPOINT): json!(config.entrypoint).to_string(),
        },
    });
    serde_json::from_value(spec).map_err(Error::Spec)
}

/// OCI's names of the namespace kinds `--unshare` takes, as berth_sys::Isolation has them.
pub const ISOLATION_KINDS: [&str; 3] = ["network", "ipc", "uts"];

/// The container's namespaces: always user, mount and cgroup; network, IPC and UTS where
/// asked. The cgroup namespace is each process's own, made as it enters
/// (`berth_sys::cgroup`); listed so every way in reads it from the spec.
fn namespaces(iso: berth_sys::Isolation) -> Vec<Value> {
    let wanted = [iso.net, iso.ipc, iso.uts];
    ["user", "mount", "cgroup"]
        .into_iter()
        .chain(
            ISOLATION_KINDS
                .into_iter()
                .zip(wanted)
                .filter(|(_, on)| *on)
                .map(|(kind, _)| kind),
        )
        .map(|kind| json!({ "type": kind }))
        .collect()
}

/// The isolation a spec's namespaces ask for (the inverse of [`namespaces`]).
pub fn isolation(spec: &Spec) -> berth_sys::Isolation {
    let kinds: Vec<String> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
        .iter()
        .map(|n| {
            serde_json::to_value(n.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        })
        .collect();
    let has = |kind: &str| kinds.iter().any(|k| k == kind);
    berth_sys::Isolation {
        net: has("network"),
        ipc: has("ipc"),
        uts: has("uts"),
    }
}

/// The capabilities the container's processes keep, every one in the container's own user
/// namespace ([`Kept`]): a remapped root keeps what that namespace grants; a plain container
/// with a UTS namespace of its own keeps CAP_SYS_ADMIN, ambient, because setting its hostname
/// (the point of `--unshare=uts`, and what pyxis users do with it) needs that capability in
/// the namespace's owner; any other container keeps none.
pub fn kept_capabilities(opts: &Options) -> Kept {
    if opts.remap_root {
        Kept::All
    } else if opts.isolation.uts {
        Kept::Ambient(vec![Capability::CAP_SYS_ADMIN])
    } else {
        Kept::None
    }
}

/// Adds the container's seccomp profile (`linux.seccomp`): berth's default denials (the mount
/// family among them unless the processes keep CAP_SYS_ADMIN, see [`kept_capabilities`]),
/// the site's `[security] seccomp_deny`, and for a `--remap-root` container the fake chown
/// family. Every way into the container reads it back from the published spec, so `berth
/// exec`, `berth exec --join` and Slurm's tasks run under the same filter.
pub fn with_seccomp(spec: &mut Spec, opts: &Options, site_deny: &[String]) -> Result<()> {
    let privilege = berth_sys::seccomp::Privilege {
        remap_root: opts.remap_root,
        sys_admin: kept_capabilities(opts).holds(Capability::CAP_SYS_ADMIN),
    };
    let profile = berth_sys::seccomp::Profile::for_container(privilege, site_deny);
    let linux = spec.linux().clone().unwrap_or_default();
    let value = serde_json::to_value(profile).map_err(Error::Spec)?;
    let mut linux = linux;
    linux.set_seccomp(Some(serde_json::from_value(value).map_err(Error::Spec)?));
    spec.set_linux(Some(linux));
    Ok(())
}

/// Narrows /sys/fs/cgroup to `view` (`berth_sys::cgroup::view`: the job's cgroup, or the
/// launching process's own outside Slurm): its mounts go right after the /sys bind they
/// cover, read-only like it.
pub fn with_cgroup_view(spec: &mut Spec, view: &[berth_sys::cgroup::CgroupMount]) -> Result<()> {
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let after_sys = mounts
        .iter()
        .position(|m| m.destination() == Path::new("/sys"))
        .map_or(mounts.len(), |i| i + 1);
    let added = view.iter().map(|m| match &m.source {
        Some(source) => bind(source, &m.target, true),
        None => mount(
            &m.target,
            "tmpfs",
            Path::new("tmpfs"),
            &["ro", "nosuid", "nodev", "noexec", "mode=555", "size=4k"],
        ),
    });
    let added: Vec<oci_spec::runtime::Mount> = added
        .map(serde_json::from_value)
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::Spec)?;
    mounts.splice(after_sys..after_sys, added);
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// The command line: an explicit command runs as given (pyxis: the entrypoint only with
/// `--entrypoint`); no command runs entrypoint + cmd, like `docker run`.
fn command(config: &ImageConfig, opts: &Options) -> Result<Vec<String>> {
    let args: Vec<String> = if opts.command.is_empty() {
        config
            .entrypoint
            .iter()
            .chain(&config.cmd)
            .cloned()
            .collect()
    } else if opts.entrypoint {
        config
            .entrypoint
            .iter()
            .chain(&opts.command)
            .cloned()
            .collect()
    } else {
        opts.command.clone()
    };
    if args.is_empty() {
        return Err(Error::NoCommand);
    }
    Ok(args)
}

/// `--workdir`, else the image's WorkingDir, else the host cwd when it is visible at the same
/// place inside (the bound home) or through a bind, else `/`.
fn workdir(config: &ImageConfig, opts: &Options, host: &Host) -> Result<PathBuf> {
    if let Some(w) = &opts.workdir {
        if !w.is_absolute() {
            return Err(Error::NotAbsolute {
                what: "--workdir",
                path: w.clone(),
            });
        }
        return Ok(w.clone());
    }
    if !config.working_dir.is_empty() {
        return Ok(config.working_dir.clone().into());
    }
    let Some(cwd) = &host.cwd else {
        return Ok("/".into());
    };
    // The last bind wins, as its mount is the one on top.
    for bind in opts.binds.iter().rev().filter(|b| b.kind == BindKind::Host) {
        if let Ok(rel) = cwd.strip_prefix(&bind.source) {
            return Ok(bind.destination.join(rel));
        }
    }
    match (&host.home, opts.no_home) {
        (Some(home), false) => Ok(cwd
            .strip_prefix(home)
            .map_or_else(|_| "/".into(), |rel| home_inside(opts, host).join(rel))),
        _ => Ok("/".into()),
    }
}

/// Image env; then PATH if the image sets none (so image commands are found); HOME, USER and
/// TERM of the host user; then `--env`. Nothing else of the host's environment (LANG/LC_*
/// notably) comes in unless named with `--env`.
fn environment(config: &ImageConfig, opts: &Options, host: &Host) -> Vec<String> {
    let home = home_inside(opts, host);
    let mut vars = vec![
        ("PATH".to_string(), config.path().to_string()),
        ("HOME".to_string(), home.display().to_string()),
        ("USER".to_string(), host.user.clone()),
    ];
    if let Some(term) = &host.term {
        vars.push(("TERM".to_string(), term.clone()));
    }
    vars.extend(opts.env.iter().cloned());
    with_vars(&config.env, &vars)
}

/// `env` (`KEY=VALUE` strings) with each of `vars` set: replaced where the key is already
/// there, appended otherwise, later ones winning.
pub fn with_vars(env: &[String], vars: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let pairs = env.iter().map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k.to_string(), v.to_string())
    });
    for (k, v) in pairs.chain(vars.iter().cloned()) {
        match out.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn mount(destination: &Path, typ: &str, source: &Path, options: &[&str]) -> Value {
    json!({ "destination": destination, "type": typ, "source": source, "options": options })
}

/// A bind mount of `source` (a host path, or relative: in the bundle) at `destination`.
pub(crate) fn bind(source: &Path, destination: &Path, readonly: bool) -> Value {
    let options: &[&str] = if readonly {
        &["rbind", "ro"]
    } else {
        &["rbind"]
    };
    mount(destination, "bind", source, options)
}

/// The mounts, in the order they are made (later ones on top of earlier ones).
fn mounts(opts: &Options, host: &Host) -> Result<Vec<Value>> {
    let p = Path::new;
    // /proc and /sys are binds of the host's: a new procfs or sysfs needs a PID or network
    // namespace of our own, which would hide the job's processes and network from it.
    let mut v = vec![
        bind(p("/proc"), p("/proc"), false),
        bind(p("/sys"), p("/sys"), true),
        mount(
            p("/dev"),
            "tmpfs",
            p("tmpfs"),
            &["nosuid", "noexec", "mode=755", "size=64k"],
        ),
    ];
    // The devices of `linux.devices` are bound into this /dev right after it is mounted.
    v.push(mount(
        p("/dev/pts"),
        "devpts",
        p("devpts"),
        &[
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
        ],
    ));
    v.push(mount(
        p("/dev/shm"),
        "tmpfs",
        p("shm"),
        &["nosuid", "nodev", "mode=1777"],
    ));
    v.push(mount(
        p("/tmp"),
        "tmpfs",
        p("tmpfs"),
        &["nosuid", "nodev", "mode=1777"],
    ));
    // POSIX message queues of the container's own IPC namespace.
    if opts.isolation.ipc {
        v.push(mount(
            p("/dev/mqueue"),
            "mqueue",
            p("mqueue"),
            &["nosuid", "nodev", "noexec"],
        ));
    }
    for f in &host.files {
        v.push(bind(f, f, true));
    }
    // A read-only container gets the generated files bound over the image's; a writable
    // one has them written into its own files (`assemble::userdb`), as enroot does, so
    // groupadd, useradd and package scripts that run them can replace them.
    if !opts.writable {
        v.push(bind(p(PASSWD), p("/etc/passwd"), true));
        v.push(bind(p(GROUP), p("/etc/group"), true));
    }
    if let (Some(home), false) = (&host.home, opts.no_home) {
        v.push(bind(home, &home_inside(opts, host), false));
    }
    for b in &opts.binds {
        match b.kind {
            BindKind::Host => {
                let mut m = bind(&b.source, &b.destination, b.readonly);
                // `bind` asks for the bind alone, without the mounts below the source.
                if b.options.iter().any(|o| o == "bind") {
                    m["options"][0] = json!("bind");
                }
                extend_options(
                    &mut m,
                    b.options.iter().filter(|o| *o != "bind" && *o != "rbind"),
                );
                v.push(m);
            }
            BindKind::Tmpfs => {
                let mut m = mount(&b.destination, "tmpfs", p("tmpfs"), &["nosuid", "nodev"]);
                let ro = b.readonly.then(|| "ro".to_owned());
                extend_options(&mut m, b.options.iter().chain(ro.as_ref()));
                v.push(m);
            }
            BindKind::Umount => {
                if KERNEL_MOUNTS.iter().any(|k| b.destination == Path::new(k)) {
                    return Err(Error::BindSyntax {
                        spec: format!("umount:{}", b.destination.display()),
                        reason: format!(
                            "{} is a kernel interface every container keeps",
                            b.destination.display()
                        ),
                    });
                }
                let before = v.len();
                v.retain(|m| m["destination"] != json!(b.destination));
                if v.len() == before {
                    return Err(Error::BindSyntax {
                        spec: format!("umount:{}", b.destination.display()),
                        reason: "nothing is mounted there by default (or by an earlier \
                                 --container-mounts entry); remove the entry"
                            .into(),
                    });
                }
            }
        }
    }
    Ok(v)
}

/// The default mounts `umount:` may not remove: the kernel interfaces, which the masked and
/// read-only paths of the spec are applied on.
const KERNEL_MOUNTS: [&str; 4] = ["/proc", "/sys", "/dev", "/dev/pts"];

/// Appends `extra` to a mount's options.
fn extend_options<'a>(m: &mut Value, extra: impl Iterator<Item = &'a String>) {
    if let Some(options) = m["options"].as_array_mut() {
        options.extend(extra.map(|o| json!(o)));
    }
}

/// Where the user's home appears: at its own path, or at /root for a remapped root, whose
/// home that is (as in pyxis).
fn home_inside(opts: &Options, host: &Host) -> PathBuf {
    match (&host.home, opts.remap_root) {
        (_, true) => PathBuf::from("/root"),
        (Some(home), false) => home.clone(),
        (None, false) => PathBuf::from("/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            uid: 1100,
            gid: 1200,
            user: "ada".into(),
            home: Some("/home/ada".into()),
            cwd: Some("/home/ada/proj".into()),
            term: Some("xterm-256color".into()),
            files: vec!["/etc/hosts".into()],
        }
    }

    fn opts(command: &[&str]) -> Options {
        Options {
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn build_with(config: &ImageConfig, o: &Options, h: &Host) -> Spec {
        let image = ImageRef {
            path: Path::new("/img.sif"),
            offset: 4096,
            config,
        };
        build(&image, o, h).unwrap()
    }

    fn env_of(spec: &Spec) -> Vec<String> {
        spec.process().as_ref().unwrap().env().clone().unwrap()
    }

    fn get<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
        env.iter()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
    }

    fn destinations(spec: &Spec) -> Vec<String> {
        spec.mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.destination().display().to_string())
            .collect()
    }

    #[test]
    fn with_vars_replaces_in_place_and_appends_new_keys() {
        let env = ["A=1".to_string(), "B=2".to_string(), "C".to_string()];
        let vars = [
            ("B".to_string(), "x".to_string()),
            ("D".to_string(), "4".to_string()),
            ("B".to_string(), "y=z".to_string()),
        ];
        assert_eq!(with_vars(&env, &vars), ["A=1", "B=y=z", "C=", "D=4"]);
    }

    #[test]
    fn env_is_image_then_host_identity_then_options() {
        let config = ImageConfig {
            env: vec![
                "PATH=/opt/bin".into(),
                "A=image".into(),
                "HOME=/root".into(),
            ],
            ..Default::default()
        };
        let mut o = opts(&["true"]);
        o.env = vec![("A".into(), "option".into()), ("LANG".into(), "C".into())];
        let env = env_of(&build_with(&config, &o, &host()));
        assert_eq!(get(&env, "PATH"), Some("/opt/bin"));
        assert_eq!(get(&env, "A"), Some("option"));
        assert_eq!(get(&env, "HOME"), Some("/home/ada"));
        assert_eq!(get(&env, "USER"), Some("ada"));
        assert_eq!(get(&env, "TERM"), Some("xterm-256color"));
        assert_eq!(get(&env, "LANG"), Some("C"));
        assert_eq!(env.iter().filter(|kv| kv.starts_with("A=")).count(), 1);
    }

    #[test]
    fn host_locale_never_leaks_and_path_has_a_default() {
        let env = env_of(&build_with(
            &ImageConfig::default(),
            &opts(&["true"]),
            &host(),
        ));
        assert!(get(&env, "PATH").unwrap().contains("/usr/bin"));
        assert!(env
            .iter()
            .all(|kv| !kv.starts_with("LANG=") && !kv.starts_with("LC_")));
    }

    #[test]
    fn workdir_precedence() {
        let config = ImageConfig {
            working_dir: "/work".into(),
            ..Default::default()
        };
        let cwd = |c: &ImageConfig, o: &Options, h: &Host| {
            build_with(c, o, h)
                .process()
                .as_ref()
                .unwrap()
                .cwd()
                .clone()
        };
        let mut o = opts(&["true"]);
        assert_eq!(cwd(&config, &o, &host()), Path::new("/work"));
        let none = ImageConfig::default();
        assert_eq!(cwd(&none, &o, &host()), Path::new("/home/ada/proj"));
        o.no_home = true;
        assert_eq!(cwd(&none, &o, &host()), Path::new("/"));
        o.binds = vec![Bind {
            source: "/home/ada".into(),
            destination: "/data".into(),
            readonly: false,
            kind: BindKind::Host,
            options: vec![],
        }];
        assert_eq!(cwd(&none, &o, &host()), Path::new("/data/proj"));
        o.workdir = Some("/explicit".into());
        assert_eq!(cwd(&config, &o, &host()), Path::new("/explicit"));
        o.workdir = Some("relative".into());
        let image = ImageRef {
            path: Path::new("/i"),
            offset: 0,
            config: &none,
        };
        assert!(matches!(
            build(&image, &o, &host()),
            Err(Error::NotAbsolute { .. })
        ));
    }

    #[test]
    fn command_follows_docker_without_args_and_pyxis_with() {
        let config = ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["--default".into()],
            ..Default::default()
        };
        let args = |o: &Options| {
            build_with(&config, o, &host())
                .process()
                .as_ref()
                .unwrap()
                .args()
                .clone()
                .unwrap()
        };
        assert_eq!(args(&opts(&[])), ["/entry", "--default"]);
        assert_eq!(args(&opts(&["ls", "-l"])), ["ls", "-l"]);
        let mut o = opts(&["ls"]);
        o.entrypoint = true;
        assert_eq!(args(&o), ["/entry", "ls"]);
        let image = ImageRef {
            path: Path::new("/i"),
            offset: 0,
            config: &ImageConfig::default(),
        };
        assert!(matches!(
            build(&image, &opts(&[]), &host()),
            Err(Error::NoCommand)
        ));
    }

    #[test]
    fn identity_and_capabilities() {
        let spec = build_with(&ImageConfig::default(), &opts(&["id"]), &host());
        let p = spec.process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (1100, 1200));
        assert!(
            p.capabilities().is_none(),
            "no capabilities unless remapped"
        );
        assert_eq!(p.no_new_privileges(), Some(true));
        let map = &spec
            .linux()
            .as_ref()
            .unwrap()
            .uid_mappings()
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            (map.container_id(), map.host_id(), map.size()),
            (1100, 1100, 1)
        );

        let mut o = opts(&["id"]);
        o.remap_root = true;
        let spec = build_with(&ImageConfig::default(), &o, &host());
        let p = spec.process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (0, 0));
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps.effective().as_ref().unwrap().len() > 30);
        let map = &spec
            .linux()
            .as_ref()
            .unwrap()
            .gid_mappings()
            .as_ref()
            .unwrap()[0];
        assert_eq!((map.container_id(), map.host_id()), (0, 1200));
    }

    /// What each kind of container keeps, as its tasks read it back from the spec, and the
    /// filter that goes with it: the mount family only where CAP_SYS_ADMIN is held.
    #[test]
    fn kept_capabilities_decide_the_confinement_and_the_mount_family() {
        use berth_sys::seccomp::{Filter, Privilege, Profile};
        let uts = berth_sys::Isolation {
            uts: true,
            ..Default::default()
        };
        let plain = opts(&["true"]);
        let with_uts = Options {
            isolation: uts,
            ..opts(&["true"])
        };
        let root = Options {
            remap_root: true,
            ..opts(&["true"])
        };
        let root_with_uts = Options {
            remap_root: true,
            ..with_uts.clone()
        };
        let sys_admin = Kept::Ambient(vec![Capability::CAP_SYS_ADMIN]);
        for (o, kept, privilege) in [
            (&plain, Kept::None, Privilege::default()),
            (
                &with_uts,
                sys_admin,
                Privilege {
                    remap_root: false,
                    sys_admin: true,
                },
            ),
            (
                &root,
                Kept::All,
                Privilege {
                    remap_root: true,
                    sys_admin: true,
                },
            ),
            (
                &root_with_uts,
                Kept::All,
                Privilege {
                    remap_root: true,
                    sys_admin: true,
                },
            ),
        ] {
            assert_eq!(kept_capabilities(o), kept);
            let mut spec = build_with(&ImageConfig::default(), o, &host());
            with_seccomp(&mut spec, o, &[]).unwrap();
            let json = serde_json::to_vec(&spec).unwrap();
            let process = berth_sys::holder::ContainerProcess::from_spec(&json).unwrap();
            assert_eq!(process.confinement.caps, kept, "{o:?}");
            let expected = Filter::compile(&Profile::for_container(privilege, &[])).unwrap();
            assert_eq!(process.confinement.seccomp, Some(expected), "{o:?}");
        }
    }

    #[test]
    fn unshared_namespaces_are_in_the_spec_and_read_back() {
        let c = ImageConfig::default();
        let plain = build_with(&c, &opts(&["true"]), &host());
        assert_eq!(isolation(&plain), berth_sys::Isolation::default());
        assert!(!destinations(&plain).contains(&"/dev/mqueue".to_string()));
        let iso = berth_sys::Isolation {
            net: true,
            ipc: true,
            uts: false,
        };
        let o = Options {
            isolation: iso,
            ..opts(&["true"])
        };
        let spec = build_with(&c, &o, &host());
        assert_eq!(isolation(&spec), iso);
        // IPC of its own brings its own message queues.
        assert!(destinations(&spec).contains(&"/dev/mqueue".to_string()));
    }

    #[test]
    fn root_is_readonly_unless_writable() {
        let spec = build_with(&ImageConfig::default(), &opts(&["true"]), &host());
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let mut o = opts(&["true"]);
        o.writable = true;
        let spec = build_with(&ImageConfig::default(), &o, &host());
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(false));
    }

    #[test]
    fn mounts_in_order_with_home_and_binds_last() {
        let mut o = opts(&["true"]);
        o.binds = vec![Bind {
            source: "/scratch".into(),
            destination: "/data".into(),
            readonly: true,
            kind: BindKind::Host,
            options: vec![],
        }];
        let spec = build_with(&ImageConfig::default(), &o, &host());
        let d = destinations(&spec);
        let pos = |p: &str| {
            d.iter()
                .position(|x| x == p)
                .unwrap_or_else(|| panic!("{p} in {d:?}"))
        };
        assert!(pos("/dev") < pos("/dev/pts") && pos("/dev/pts") < pos("/tmp"));
        assert!(pos("/proc") < pos("/home/ada") && pos("/home/ada") < pos("/data"));
        assert!(
            d.contains(&"/etc/hosts".to_string()) && !d.contains(&"/etc/resolv.conf".to_string())
        );
        let data = spec.mounts().as_ref().unwrap().last().unwrap().clone();
        assert_eq!(data.options().clone().unwrap(), ["rbind", "ro"]);
        assert_eq!(data.source().clone().unwrap(), Path::new("/scratch"));

        o.no_home = true;
        let d = destinations(&build_with(&ImageConfig::default(), &o, &host()));
        assert!(!d.contains(&"/home/ada".to_string()));
    }

    #[test]
    fn devices_and_kernel_interfaces() {
        let spec = build_with(&ImageConfig::default(), &opts(&["true"]), &host());
        let linux = spec.linux().as_ref().unwrap();
        let devices = linux.devices().as_ref().unwrap();
        let null = devices
            .iter()
            .find(|d| d.path() == Path::new("/dev/null"))
            .unwrap();
        assert_eq!((null.major(), null.minor()), (1, 3));
        assert_eq!(devices.len(), DEVICES.len());
        assert!(!destinations(&spec).contains(&"/dev/null".to_string()));
        let masked = linux.masked_paths().as_ref().unwrap();
        assert!(masked.contains(&"/proc/kcore".to_string()));
        assert!(masked.contains(&"/sys/firmware".to_string()));
        assert!(masked.contains(&"/sys/devices/system/cpu/cpu*/thermal_throttle".to_string()));
        let ro = linux.readonly_paths().as_ref().unwrap();
        assert!(ro.contains(&"/proc/sys".to_string()));
        assert!(ro.contains(&"/proc/sysrq-trigger".to_string()));
    }

    #[test]
    fn the_seccomp_profile_reads_back_as_berth_wrote_it() {
        let mut o = opts(&["true"]);
        o.remap_root = true;
        let mut spec = build_with(&ImageConfig::default(), &o, &host());
        with_seccomp(&mut spec, &o, &["perf_event_open".into()]).unwrap();
        let json = serde_json::to_vec(&spec).unwrap();
        let process = berth_sys::holder::ContainerProcess::from_spec(&json).unwrap();
        let root = berth_sys::seccomp::Privilege {
            remap_root: true,
            sys_admin: true,
        };
        let expected =
            berth_sys::seccomp::Profile::for_container(root, &["perf_event_open".into()]);
        assert_eq!(
            process.confinement.seccomp,
            Some(berth_sys::seccomp::Filter::compile(&expected).unwrap())
        );
        let seccomp = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        let names: Vec<&String> = seccomp
            .syscalls()
            .iter()
            .flatten()
            .flat_map(|r| r.names())
            .collect();
        assert!(names.iter().any(|n| *n == "keyctl"));
        assert!(
            names.iter().any(|n| *n == "fchownat"),
            "remapped: fake chown"
        );
    }

    #[test]
    fn the_cgroup_view_covers_sys_and_every_process_gets_a_cgroup_namespace() {
        use berth_sys::cgroup::CgroupMount;
        let mut spec = build_with(&ImageConfig::default(), &opts(&["true"]), &host());
        let view = [
            CgroupMount {
                target: "/sys/fs/cgroup/memory".into(),
                source: Some("/sys/fs/cgroup/memory/slurm/job_1".into()),
            },
            CgroupMount {
                target: "/sys/fs/cgroup/pids".into(),
                source: None,
            },
        ];
        with_cgroup_view(&mut spec, &view).unwrap();
        let all = destinations(&spec);
        let sys = all.iter().position(|d| d == "/sys").unwrap();
        assert_eq!(all[sys + 1], "/sys/fs/cgroup/memory");
        assert_eq!(all[sys + 2], "/sys/fs/cgroup/pids");
        let mounts = spec.mounts().as_ref().unwrap();
        let memory = &mounts[sys + 1];
        assert_eq!(
            memory.source().as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory/slurm/job_1"))
        );
        assert!(memory
            .options()
            .as_ref()
            .unwrap()
            .contains(&"ro".to_string()));
        assert_eq!(mounts[sys + 2].typ().as_deref(), Some("tmpfs"));
        let json = serde_json::to_vec(&spec).unwrap();
        let process = berth_sys::holder::ContainerProcess::from_spec(&json).unwrap();
        assert!(process.confinement.cgroup_ns);
    }

    #[test]
    fn bind_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().display().to_string();
        let b = Bind::parse(&format!("{src}:/data:ro")).unwrap();
        assert!(b.readonly && b.destination == Path::new("/data"));
        assert!(!Bind::parse(&format!("{src}:/data")).unwrap().readonly);
        for bad in [
            format!("{src}:rel"),
            format!("{src}:/d:xx"),
            "/a".into(),
            ":/d".into(),
        ] {
            assert!(
                matches!(Bind::parse(&bad), Err(Error::BindSyntax { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            Bind::parse("/no/such/dir:/d"),
            Err(Error::BindSource { .. })
        ));
    }

    #[test]
    fn bind_flags_tmpfs_and_umount_parse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().display().to_string();
        let b = Bind::parse(&format!("{src}:/m:ro+unbindable+nosuid")).unwrap();
        assert!(b.readonly && b.kind == BindKind::Host);
        assert_eq!(b.options, ["unbindable", "nosuid"]);
        let t = Bind::parse("tmpfs:/t:rw+size=1G+huge=within_size").unwrap();
        assert_eq!(
            (t.kind, t.source.as_path()),
            (BindKind::Tmpfs, Path::new("tmpfs"))
        );
        assert_eq!(t.options, ["size=1G", "huge=within_size"]);
        assert_eq!(Bind::parse("umount:/root").unwrap().kind, BindKind::Umount);
        for bad in [
            format!("{src}:/m:size=1G"),
            "tmpfs:/t:uid=0=1".into(),
            "tmpfs:/t:mode=".into(),
            "umount:/root:ro".into(),
        ] {
            assert!(
                matches!(Bind::parse(&bad), Err(Error::BindSyntax { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn tmpfs_binds_and_umount_shape_the_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().display().to_string();
        let mut o = opts(&["true"]);
        o.binds = [
            format!("{src}:/m:bind+ro+rprivate"),
            "tmpfs:/t:size=1M".into(),
            "umount:/home/ada".into(),
            "umount:/etc/hosts".into(),
        ]
        .iter()
        .map(|b| Bind::parse(b).unwrap())
        .collect();
        let spec = build_with(&ImageConfig::default(), &o, &host());
        let d = destinations(&spec);
        assert!(!d.contains(&"/home/ada".to_string()) && !d.contains(&"/etc/hosts".to_string()));
        let mounts = spec.mounts().as_ref().unwrap();
        let m = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/m"))
            .unwrap();
        assert_eq!(m.options().clone().unwrap(), ["bind", "ro", "rprivate"]);
        let t = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/t"))
            .unwrap();
        assert_eq!(t.typ().as_deref(), Some("tmpfs"));
        assert_eq!(t.options().clone().unwrap(), ["nosuid", "nodev", "size=1M"]);

        let image = ImageRef {
            path: Path::new("/i"),
            offset: 0,
            config: &ImageConfig::default(),
        };
        for (umount, reason) in [
            ("umount:/proc", "kernel interface"),
            ("umount:/nothing", "nothing is mounted"),
        ] {
            o.binds = vec![Bind::parse(umount).unwrap()];
            let msg = build(&image, &o, &host()).unwrap_err().to_string();
            assert!(msg.contains(reason), "{msg}");
        }
    }

    #[test]
    fn a_remapped_root_has_its_home_at_root() {
        let mut o = opts(&["true"]);
        o.remap_root = true;
        let spec = build_with(&ImageConfig::default(), &o, &host());
        let home = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.source().as_deref() == Some(Path::new("/home/ada")))
            .unwrap()
            .clone();
        assert_eq!(home.destination(), Path::new("/root"));
        assert_eq!(get(&env_of(&spec), "HOME"), Some("/root"));
        assert_eq!(spec.annotations().as_ref().unwrap()[ANN_USER_HOME], "/root");
        // The job's directory below the home is the same directory below /root.
        let cwd = spec.process().as_ref().unwrap().cwd().clone();
        assert_eq!(cwd, Path::new("/root/proj"));
    }

    #[test]
    fn annotations_name_the_image_and_user() {
        let spec = build_with(&ImageConfig::default(), &opts(&["true"]), &host());
        let a = spec.annotations().as_ref().unwrap();
        assert_eq!(a[ANN_IMAGE], "/img.sif");
        assert_eq!(a[ANN_IMAGE_OFFSET], "4096");
        assert_eq!(a[ANN_USER_NAME], "ada");
        assert_eq!(a[ANN_USER_HOME], "/home/ada");
        assert_eq!(a[berth_sys::holder::ANN_ENTRYPOINT], "[]");
        let config = ImageConfig {
            entrypoint: vec!["/entry".into(), "a b".into()],
            ..ImageConfig::default()
        };
        let spec = build_with(&config, &opts(&["true"]), &host());
        let a = spec.annotations().as_ref().unwrap();
        assert_eq!(a[berth_sys::holder::ANN_ENTRYPOINT], r#"["/entry","a b"]"#);
    }
}
