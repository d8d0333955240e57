//! Realising a spec (from `spec::build` and its edits) through [`Syscall`]: namespaces, the
//! image mount, the root file system, pivot_root. By mechanism, as youki's `rootfs/`:
//! - this file: the namespace and overlay sequence;
//! - `mounts`: OCI mounts into mount(2) calls (a table of options), masked and read-only
//!   kernel paths;
//! - `devices`: the host nodes of `linux.devices` bound into /dev, and /dev's links;
//! - `userdb`: the files generated from the image's own (passwd, group, ld.so.cache).
//!
//! One user namespace mapping one id, as enroot's: the container's user (the user's own
//! uid, or 0 with `--remap-root`) is the user outside, so `/proc/self/uid_map` reads
//! `1100 1100 1` (or `0 1100 1`) as under pyxis. An image's files belong to many ids (root,
//! `_apt`, `man`, ...) that one id cannot map, so squashfuse reports every file as owned by
//! the container's user (`-o uid=,gid=`): the user's own outside `--remap-root` and root's
//! inside it, as after enroot unpacks an image as the user. `apt-get` run as the remapped
//! root can then open, chmod and replace any file of the image (its chowns succeed without
//! effect through the seccomp filter). berth holds the namespace's capabilities while it
//! mounts; the command gets none (see `berth_sys::process::confine`) unless it is the
//! remapped root, and runs with no_new_privs on nosuid mounts.

mod devices;
mod mounts;
mod userdb;

use std::ffi::{CString, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use berth_sys::{Mount, MountpointKind, MsFlags, Syscall};
use oci_spec::runtime::Spec;

use super::spec;
use crate::gpu::edit;
use crate::{Error, Result};

/// The squashfuse program berth serves images with: the high-level one, whose library
/// takes `-o uid=,gid=` (Debian 12's squashfuse_ll 0.1.105 has no way to report owners).
const SQUASHFUSE: &str = "squashfuse";
const BIN_DIRS: [&str; 3] = ["/usr/bin", "/usr/local/bin", "/bin"];

/// A container whose root is in place (berth's root and cwd are now the container's).
#[derive(Debug)]
pub struct Assembled {
    /// The squashfuse daemon; the caller kills and reaps it when the container ends.
    pub helper: i32,
    /// What `after_pivot` started (the size watcher), killed and reaped with the helper.
    pub watcher: Option<i32>,
}

/// Finds squashfuse in the system's own directories (not the user's PATH: the daemon runs
/// with the container's privileges over its files).
pub fn find_squashfuse() -> Result<PathBuf> {
    BIN_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(SQUASHFUSE))
        .find(|p| p.is_file())
        .ok_or(Error::SquashfuseMissing)
}

/// Builds the container described by `spec` with `bundle` as its private runtime directory
/// and pivots into it. Must be called single-threaded, before anything else touched
/// namespaces. On error, the FUSE daemon (if started) dies with berth (it has
/// PR_SET_PDEATHSIG). `after_pivot` runs right after pivot_root, while berth still holds
/// the capabilities of the container's user namespace (whose mounts a process started there
/// may change later).
pub fn assemble(
    sys: &impl Syscall,
    spec: &Spec,
    bundle: &Path,
    squashfuse: &Path,
    after_pivot: impl FnOnce() -> Result<Option<i32>>,
) -> Result<Assembled> {
    let facts = AssemblyInputs::of(spec)?;
    let (root, helper) = mount_root(sys, &facts, bundle, squashfuse)?;
    let container = |what| move |source| Error::Container { what, source };
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(true);
    let user_db = if readonly {
        userdb::UserDbIn::Bundle
    } else {
        userdb::UserDbIn::Root
    };
    userdb::write_user_db(&root, bundle, &facts, user_db)?;
    userdb::write_apt_config(&root, &facts)?;
    for (name, text) in super::slurm::scripts(spec)? {
        use std::os::unix::fs::PermissionsExt;
        let path = bundle.join(&name);
        std::fs::write(&path, text)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    userdb::write_ld_cache(
        &root,
        bundle,
        &edit::ld_cache_entries(spec)?,
        edit::driver_version(spec).as_deref(),
    )?;
    for m in spec.mounts().iter().flatten() {
        for call in mounts::to_sys_mounts(m, bundle)? {
            sys.mount_in_root(&root, &call)
                .map_err(|source| Error::Sys {
                    path: m.destination().clone(),
                    source,
                })?;
        }
        if m.destination() == Path::new("/dev") {
            devices::bind_devices(sys, &root, spec)?;
            devices::links(sys, &root)?;
        }
    }
    let linux = spec.linux().as_ref();
    mounts::mask_and_protect(
        sys,
        &root,
        &linux
            .and_then(|l| l.masked_paths().clone())
            .unwrap_or_default(),
        &linux
            .and_then(|l| l.readonly_paths().clone())
            .unwrap_or_default(),
    )?;
    if readonly {
        sys.set_readonly(&root)
            .map_err(container("making the root read-only"))?;
    }
    sys.pivot_root(&root).map_err(container("pivot_root"))?;
    // Still with the capabilities of the user namespace that owns the container's mounts.
    let watcher = after_pivot()?;
    Ok(Assembled { helper, watcher })
}

/// The first half of assembly, shared with `save`: new user and mount namespaces (the
/// container's user mapped to the user), the runtime tmpfs on `bundle`, the image mounted at
/// `bundle/lower` and the overlay root at `bundle/root` (returned with the squashfuse
/// daemon's pid). Nothing is pivoted yet: host paths stay reachable.
pub fn mount_root(
    sys: &impl Syscall,
    facts: &AssemblyInputs,
    bundle: &Path,
    squashfuse: &Path,
) -> Result<(PathBuf, i32)> {
    sys.unshare_user_mount()
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EPERM | libc::ENOSPC | libc::EINVAL | libc::EUSERS) => {
                Error::UserNamespaces { source }
            }
            _ => Error::Container {
                what: "unshare",
                source,
            },
        })?;
    let container = |what| move |source| Error::Container { what, source };
    sys.write_id_maps(
        &format!("{} {} 1", facts.uid_inside, facts.uid),
        &format!("{} {} 1", facts.gid_inside, facts.gid),
    )
    .map_err(container("writing the id maps"))?;
    // Owned by the user namespace, like the mount namespace: joiners enter them there.
    sys.isolate(facts.isolation)
        .map_err(container("unshare (network, IPC or UTS namespace)"))?;
    sys.make_mounts_private()
        .map_err(container("making mounts private"))?;

    // The bundle: a tmpfs only this mount namespace sees; nothing is written on the host.
    sys.mount(&Mount {
        source: Some("tmpfs".into()),
        target: bundle.into(),
        fstype: Some("tmpfs".into()),
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        data: Some("mode=700".into()),
        readonly: false,
        kind: MountpointKind::Dir,
    })
    .map_err(container("mounting the runtime tmpfs"))?;
    // A writable container's changes go to its directory on disk (see `writable`); a
    // read-only one's upper layer only gets berth's mountpoints, in the tmpfs.
    let changes = facts.changes.as_deref().unwrap_or(bundle);
    let [upper, work] = ["upper", "work"].map(|d| changes.join(d));
    let [lower, root] = ["lower", "root"].map(|d| bundle.join(d));
    let mut fresh = vec![&lower, &root];
    if facts.changes.is_none() {
        fresh.extend([&upper, &work]);
    }
    for d in fresh {
        std::fs::create_dir(d).map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
    }

    let helper = mount_image(sys, facts, &lower, squashfuse)?;

    // The image stays read-only; the upper layer gives mountpoints the image lacks and, with
    // --writable, a root that can change for the container's life. nosuid: an image's
    // set-user-id files give nothing (no_new_privs would ignore them anyway). A copy of a
    // running named container has that container's upper layer between (see `writable`).
    let lowers = match &facts.below {
        Some(below) => format!("{}:{}", below.join("upper").display(), lower.display()),
        None => lower.display().to_string(),
    };
    sys.mount(&Mount {
        source: Some("overlay".into()),
        target: root.clone(),
        fstype: Some("overlay".into()),
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        data: Some(format!(
            "lowerdir={lowers},upperdir={},workdir={},userxattr",
            upper.display(),
            work.display()
        )),
        readonly: false,
        kind: MountpointKind::Dir,
    })
    .map_err(container("mounting the overlay root"))?;
    Ok((root, helper))
}

/// Mounts the image at `lower`: berth mounts the FUSE file system itself (it holds the
/// privileges in its namespace; squashfuse, exec'd, would not) and hands the connection to
/// squashfuse as `/dev/fd/N`. The container's user owns the connection (only its processes
/// may use it) and, as squashfuse reports them, every file of the image.
fn mount_image(
    sys: &impl Syscall,
    facts: &AssemblyInputs,
    lower: &Path,
    squashfuse: &Path,
) -> Result<i32> {
    let fuse = sys
        .mount_fuse(
            &facts.image,
            lower,
            "squashfuse",
            facts.uid_inside,
            facts.gid_inside,
        )
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM | libc::ENOENT | libc::ENODEV | libc::ENXIO) => {
                Error::FuseUnavailable {
                    uid: facts.uid,
                    source,
                }
            }
            _ => Error::ImageMount {
                path: facts.image.clone(),
                source,
            },
        })?;
    let argv = [
        cstring(squashfuse.as_os_str().to_owned())?,
        cstring("-f".into())?,
        cstring("-o".into())?,
        cstring(
            format!(
                "offset={},uid={},gid={}",
                facts.offset, facts.uid_inside, facts.gid_inside
            )
            .into(),
        )?,
        cstring(facts.image.clone().into_os_string())?,
        berth_sys::process::fuse_fd_arg(fuse.as_fd()),
    ];
    sys.start_fuse_helper(&argv, fuse, lower)
        .map_err(|source| Error::ImageMount {
            path: facts.image.clone(),
            source,
        })
}

fn cstring(s: OsString) -> Result<CString> {
    CString::new(s.into_vec()).map_err(|e| {
        Error::io(
            "a path contains a NUL byte",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        )
    })
}

/// What assembly needs from the spec besides its mounts and devices: the image, the user's
/// ids outside and the container's inside, the user's name and home.
pub struct AssemblyInputs {
    pub(crate) image: PathBuf,
    pub(crate) offset: u64,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) uid_inside: u32,
    pub(crate) gid_inside: u32,
    pub(crate) user: String,
    pub(crate) home: String,
    /// The directory holding the overlay's upper and work directories on disk, if any.
    pub(crate) changes: Option<PathBuf>,
    /// A named container's directory whose upper layer lies below `changes` (a copy).
    pub(crate) below: Option<PathBuf>,
    pub(crate) isolation: berth_sys::Isolation,
}

impl AssemblyInputs {
    pub fn of(spec: &Spec) -> Result<AssemblyInputs> {
        let missing =
            |what: &str| Error::Spec(serde::de::Error::custom(format!("the spec has no {what}")));
        let ann = spec.annotations().clone().unwrap_or_default();
        let get = |k: &str| ann.get(k).cloned().ok_or_else(|| missing(k));
        let linux = spec
            .linux()
            .as_ref()
            .ok_or_else(|| missing("linux section"))?;
        let host_id = |maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>, what| {
            maps.as_ref()
                .and_then(|m| m.first())
                .map(|m| m.host_id())
                .ok_or_else(|| missing(what))
        };
        let user = spec
            .process()
            .as_ref()
            .ok_or_else(|| missing("process"))?
            .user();
        Ok(AssemblyInputs {
            image: get(spec::ANN_IMAGE)?.into(),
            offset: get(spec::ANN_IMAGE_OFFSET)?
                .parse()
                .map_err(|_| missing("numeric image offset"))?,
            uid: host_id(linux.uid_mappings(), "uid mapping")?,
            gid: host_id(linux.gid_mappings(), "gid mapping")?,
            uid_inside: user.uid(),
            gid_inside: user.gid(),
            user: get(spec::ANN_USER_NAME)?,
            home: get(spec::ANN_USER_HOME)?,
            changes: ann.get(super::writable::ANN_CHANGES).map(PathBuf::from),
            below: ann.get(super::writable::ANN_BELOW).map(PathBuf::from),
            isolation: spec::isolation(spec),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::spec::{build, Host, ImageRef, Options};
    use crate::image_config::ImageConfig;
    use berth_sys::recording::{Call, RecordingSyscall, HELPER_PID};

    fn spec_for(remap_root: bool, writable: bool) -> Spec {
        let host = Host {
            uid: 1100,
            gid: 1200,
            user: "ada".into(),
            home: None,
            cwd: None,
            term: None,
            files: Vec::new(),
        };
        let opts = Options {
            remap_root,
            writable,
            command: vec!["true".into()],
            ..Default::default()
        };
        let image = ImageRef {
            path: Path::new("/img.sif"),
            offset: 4096,
            config: &ImageConfig::default(),
        };
        build(&image, &opts, &host).unwrap()
    }

    fn run(sys: &RecordingSyscall, spec: &Spec) -> (tempfile::TempDir, Result<Assembled>) {
        let bundle = tempfile::tempdir().unwrap();
        let r = assemble(
            sys,
            spec,
            bundle.path(),
            Path::new("/usr/bin/squashfuse"),
            || Ok(None),
        );
        (bundle, r)
    }

    #[test]
    fn assembles_in_order() {
        let sys = RecordingSyscall::default();
        let (bundle, r) = run(&sys, &spec_for(false, false));
        assert_eq!(r.unwrap().helper, HELPER_PID);
        let b = bundle.path();
        let calls = sys.calls();
        assert_eq!(calls[0], Call::UnshareUserMount);
        assert_eq!(
            calls[1],
            Call::WriteIdMaps {
                uid_map: "1100 1100 1".into(),
                gid_map: "1200 1200 1".into()
            }
        );
        assert_eq!(calls[2], Call::MakeMountsPrivate);
        assert!(
            matches!(&calls[3], Call::Mount(m) if m.target == b && m.fstype.as_deref() == Some("tmpfs"))
        );
        assert_eq!(
            calls[4],
            Call::MountFuse {
                source: "/img.sif".into(),
                target: b.join("lower"),
                subtype: "squashfuse".into(),
                uid: 1100,
                gid: 1200
            }
        );
        let Call::StartFuseHelper { argv, target } = &calls[5] else {
            panic!("{:?}", calls[5])
        };
        assert_eq!(target, &b.join("lower"));
        assert_eq!(
            &argv[..5],
            [
                "/usr/bin/squashfuse",
                "-f",
                "-o",
                "offset=4096,uid=1100,gid=1200",
                "/img.sif"
            ]
        );
        assert!(argv[5].starts_with("/dev/fd/"));
        let Call::Mount(overlay) = &calls[6] else {
            panic!("{:?}", calls[6])
        };
        assert_eq!(overlay.target, b.join("root"));
        assert!(overlay.data.as_deref().unwrap().contains("userxattr"));
        assert_eq!(overlay.flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);

        // Then the spec's mounts inside the root, /dev's links right after /dev.
        let in_root: Vec<&Mount> = calls
            .iter()
            .filter_map(|c| match c {
                Call::MountInRoot { root, mount } => {
                    assert_eq!(root, &b.join("root"));
                    Some(mount)
                }
                _ => None,
            })
            .collect();
        assert_eq!(in_root[0].target, Path::new("/proc"));
        assert_eq!(in_root[0].flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(in_root[1].readonly, "/sys is read-only");
        let null = in_root
            .iter()
            .find(|m| m.target == Path::new("/dev/null"))
            .unwrap();
        assert_eq!(null.kind, MountpointKind::File);
        let passwd = in_root
            .iter()
            .find(|m| m.target == Path::new("/etc/passwd"))
            .unwrap();
        assert_eq!(passwd.source.as_deref(), Some(b.join("passwd").as_path()));
        assert!(passwd.readonly);
        let pts = in_root
            .iter()
            .find(|m| m.target == Path::new("/dev/pts"))
            .unwrap();
        assert_eq!(pts.fstype.as_deref(), Some("devpts"));
        assert_eq!(pts.flags, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC);
        assert_eq!(
            pts.data.as_deref(),
            Some("newinstance,ptmxmode=0666,mode=0620")
        );
        // Right after /dev: its devices, then its links.
        let dev_at = calls.iter().position(|c| matches!(c, Call::MountInRoot { mount, .. } if mount.target == Path::new("/dev"))).unwrap();
        let n_dev = spec::DEVICES.len();
        for (i, (path, _, _)) in spec::DEVICES.iter().enumerate() {
            assert!(
                matches!(&calls[dev_at + 1 + i], Call::MountInRoot { mount, .. } if mount.target == Path::new(path) && mount.source.as_deref() == Some(Path::new(path))),
                "{path}: {:?}",
                calls[dev_at + 1 + i]
            );
        }
        assert!(
            matches!(&calls[dev_at + 1 + n_dev], Call::SymlinkInRoot { link, .. } if link == Path::new("/dev/ptmx"))
        );

        // The one user namespace's maps were all: the command runs in it.
        let n = calls.len();
        assert_eq!(calls[n - 2], Call::SetReadonly(b.join("root")));
        assert_eq!(calls[n - 1], Call::PivotRoot(b.join("root")));
        assert_eq!(
            calls
                .iter()
                .filter(|c| matches!(c, Call::WriteIdMaps { .. }))
                .count(),
            1
        );
        let passwd = std::fs::read_to_string(b.join("passwd")).unwrap();
        assert_eq!(passwd, "ada:x:1100:1200::/:/bin/sh\n");
    }

    #[test]
    fn writable_and_remapped_root() {
        let sys = RecordingSyscall::default();
        let (bundle, r) = run(&sys, &spec_for(true, true));
        r.unwrap();
        let calls = sys.calls();
        assert!(
            !calls.iter().any(|c| matches!(c, Call::SetReadonly(_))),
            "writable root"
        );
        // The remapped root is the user outside, and owns the image's files inside.
        assert_eq!(
            calls[1],
            Call::WriteIdMaps {
                uid_map: "0 1100 1".into(),
                gid_map: "0 1200 1".into()
            }
        );
        assert!(calls.contains(&Call::MountFuse {
            source: "/img.sif".into(),
            target: bundle.path().join("lower"),
            subtype: "squashfuse".into(),
            uid: 0,
            gid: 0
        }));
        assert!(calls
            .iter()
            .any(|c| matches!(c, Call::StartFuseHelper { argv, .. }
            if argv[3] == "offset=4096,uid=0,gid=0")));
        assert_eq!(
            calls.last(),
            Some(&Call::PivotRoot(bundle.path().join("root")))
        );
        // Written into the container's own files, not bound over them.
        let group = std::fs::read_to_string(bundle.path().join("root/etc/group")).unwrap();
        assert_eq!(group, "ada:x:0:\n");
        assert!(!bundle.path().join("group").exists());
        assert!(!calls.iter().any(|c| matches!(c, Call::MountInRoot { mount, .. }
            if mount.target == Path::new("/etc/passwd") || mount.target == Path::new("/etc/group"))));
    }

    /// The overlay's mount options when `spec` is assembled, and the bundle.
    fn overlay_of(spec: &Spec) -> (String, tempfile::TempDir) {
        let sys = RecordingSyscall::default();
        let (bundle, r) = run(&sys, spec);
        r.unwrap();
        let overlay = sys
            .calls()
            .into_iter()
            .find_map(|c| match c {
                Call::Mount(m) if m.fstype.as_deref() == Some("overlay") => m.data,
                _ => None,
            })
            .unwrap();
        (overlay, bundle)
    }

    #[test]
    fn a_writable_container_writes_to_its_directory_on_disk() {
        let changes = tempfile::tempdir().unwrap();
        let mut spec = spec_for(false, true);
        crate::container::writable::annotate(&mut spec, changes.path(), None);
        let (overlay, bundle) = overlay_of(&spec);
        let c = changes.path().display();
        assert!(
            overlay.contains(&format!("upperdir={c}/upper,workdir={c}/work")),
            "{overlay}"
        );
        assert!(
            !bundle.path().join("upper").exists(),
            "nothing in the tmpfs"
        );
    }

    #[test]
    fn a_copy_of_a_named_container_has_its_upper_layer_below_its_own() {
        let (copy, named) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut spec = spec_for(false, true);
        crate::container::writable::annotate(&mut spec, copy.path(), Some(named.path()));
        let (overlay, bundle) = overlay_of(&spec);
        let (c, n, b) = (
            copy.path().display(),
            named.path().display(),
            bundle.path().display(),
        );
        assert_eq!(
            overlay,
            format!("lowerdir={n}/upper:{b}/lower,upperdir={c}/upper,workdir={c}/work,userxattr")
        );
    }

    #[test]
    fn unshared_namespaces_come_right_after_the_id_maps() {
        let mut spec = spec_for(false, false);
        let iso = berth_sys::Isolation {
            net: true,
            ipc: false,
            uts: true,
        };
        let mut linux = spec.linux().clone().unwrap();
        let mut namespaces = linux.namespaces().clone().unwrap();
        for kind in [
            oci_spec::runtime::LinuxNamespaceType::Network,
            oci_spec::runtime::LinuxNamespaceType::Uts,
        ] {
            let mut ns = oci_spec::runtime::LinuxNamespace::default();
            ns.set_typ(kind);
            namespaces.push(ns);
        }
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        let sys = RecordingSyscall::default();
        let (_b, r) = run(&sys, &spec);
        r.unwrap();
        assert_eq!(sys.calls()[2], Call::Isolate(iso));
        // None asked for: no call at all.
        let sys = RecordingSyscall::default();
        let (_b, r) = run(&sys, &spec_for(false, false));
        r.unwrap();
        assert!(!sys.calls().iter().any(|c| matches!(c, Call::Isolate(_))));
    }

    #[test]
    fn errors_name_their_cause() {
        let sys = RecordingSyscall {
            fail_on: Some("UnshareUserMount".into()),
            ..Default::default()
        };
        let (_b, r) = run(&sys, &spec_for(false, false));
        assert!(matches!(r, Err(Error::UserNamespaces { .. })));
        let sys = RecordingSyscall {
            fail_on: Some("MountFuse".into()),
            ..Default::default()
        };
        let (_b, r) = run(&sys, &spec_for(false, false));
        let e = r.unwrap_err();
        assert!(matches!(e, Error::FuseUnavailable { uid: 1100, .. }), "{e}");
        assert!(e.to_string().contains("0666"));
    }

    #[test]
    fn kernel_paths_are_masked_and_read_only() {
        let sys = RecordingSyscall::default();
        let (_bundle, r) = run(&sys, &spec_for(false, false));
        r.unwrap();
        let calls = sys.calls();
        let find = |target: &str| {
            calls.iter().find_map(|c| match c {
                Call::MountInRoot { mount, .. } if mount.target == Path::new(target) => {
                    Some(mount.clone())
                }
                _ => None,
            })
        };
        let mount = |target: &str| find(target).unwrap_or_else(|| panic!("no mount at {target}"));
        // Every listed path this kernel has is covered; those it lacks (/proc/kcore and
        // /proc/sysrq-trigger on kernels built without them) are skipped.
        for path in spec::MASKED_PATHS {
            let Ok(meta) = std::fs::metadata(path) else {
                assert!(find(path).is_none(), "{path} is missing but mounted");
                continue;
            };
            let m = mount(path);
            if meta.is_dir() {
                assert_eq!(m.fstype.as_deref(), Some("tmpfs"), "{path}");
                assert!(m.flags.contains(MsFlags::MS_RDONLY), "{path}");
            } else {
                assert_eq!(m.source.as_deref(), Some(Path::new("/dev/null")), "{path}");
                assert_eq!((m.flags, m.kind), (MsFlags::MS_BIND, MountpointKind::File));
            }
        }
        for path in spec::READONLY_PATHS {
            if Path::new(path).exists() {
                let m = mount(path);
                assert!(m.readonly && m.flags.contains(MsFlags::MS_BIND), "{path}");
                assert_eq!(m.source.as_deref(), Some(Path::new(path)));
            }
        }
        assert!(mount("/proc/sys").kind == MountpointKind::Dir);
        assert_eq!(mount("/proc/keys").kind, MountpointKind::File);
        // After every mount of the spec, before the root turns read-only.
        let last_spec_mount = calls
            .iter()
            .rposition(|c| matches!(c, Call::MountInRoot { mount, .. } if mount.target == Path::new("/etc/group")))
            .unwrap();
        let kcore_at = calls
            .iter()
            .position(|c| matches!(c, Call::MountInRoot { mount, .. } if mount.target == Path::new("/proc/keys")))
            .unwrap();
        let ro_at = calls
            .iter()
            .position(|c| matches!(c, Call::SetReadonly(_)))
            .unwrap();
        assert!(last_spec_mount < kcore_at && kcore_at < ro_at);
    }

    #[test]
    fn devices_of_the_spec_are_bound_into_dev() {
        let mut spec = spec_for(false, false);
        let edits = crate::gpu::ContainerEdits {
            devices: vec![crate::gpu::DeviceNode {
                path: "/dev/nvidia1".into(),
                host: "/dev/nvidia1".into(),
                kind: 'c',
                major: 195,
                minor: 1,
            }],
            ld_cache: vec![(
                "libcuda.so.1".into(),
                "/usr/local/nvidia/lib64/libcuda.so.1".into(),
            )],
            ..Default::default()
        };
        crate::gpu::edit::apply(&mut spec, &edits).unwrap();
        let sys = RecordingSyscall::default();
        let (bundle, r) = run(&sys, &spec);
        r.unwrap();
        let calls = sys.calls();
        let dev_at = calls.iter().position(|c| matches!(c, Call::MountInRoot { mount, .. } if mount.target == Path::new("/dev"))).unwrap();
        let gpu_at = calls.iter().position(|c| matches!(c, Call::MountInRoot { mount, .. } if mount.target == Path::new("/dev/nvidia1") && mount.flags == MsFlags::MS_BIND && mount.kind == MountpointKind::File)).unwrap();
        assert!(dev_at < gpu_at);
        let cache = calls
            .iter()
            .find_map(|c| match c {
                Call::MountInRoot { mount, .. }
                    if mount.target == Path::new("/etc/ld.so.cache") =>
                {
                    Some(mount.clone())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(
            cache.source.as_deref(),
            Some(bundle.path().join("ld.so.cache").as_path())
        );
        assert!(cache.readonly);
        let written =
            crate::gpu::ldcache::parse(&std::fs::read(bundle.path().join("ld.so.cache")).unwrap())
                .unwrap();
        assert_eq!(written[0].key, "libcuda.so.1");
    }
}
