//! Files berth generates from the image's own: passwd and group with the user's entries,
//! and the loader cache with the driver's libraries. They are written in the bundle and
//! bound read-only over the image's, which never changes; but a writable container gets its
//! passwd and group in its own files (the overlay's upper layer), as enroot writes them, so
//! `groupadd` and the package scripts that run it can replace them. And one berth writes
//! into the container's upper layer: apt's setting for the remapped root of a Debian image.

use std::os::fd::AsFd;
use std::path::Path;

use super::AssemblyInputs;
use crate::container::spec::{GROUP, PASSWD};
use crate::gpu::{driver, edit, ldcache};
use crate::{Error, Result};

/// Where the generated passwd and group go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserDbIn {
    /// The bundle, for the spec's read-only binds.
    Bundle,
    /// The container's own `/etc` (a writable container: call on the overlay root).
    Root,
}

/// Writes passwd and group where `into` says: the image's own entries (read inside the
/// root, so an image symlink cannot make berth read a host file) plus the user's, unless the
/// image already has an entry with the user's uid/gid. In the container's own files, the
/// user added to passwd gets a shadow entry too where the image has a shadow file (as
/// enroot's `pwck` adds it): PAM's account check (sshd, su) refuses a user it lacks. It has
/// no password (`*`) and no ageing.
pub fn write_user_db(root: &Path, bundle: &Path, f: &AssemblyInputs, into: UserDbIn) -> Result<()> {
    let image_passwd = String::from_utf8_lossy(&read_in_root(root, "/etc/passwd")?).into_owned();
    let group = String::from_utf8_lossy(&read_in_root(root, "/etc/group")?).into_owned();
    let passwd = with_entry(
        &image_passwd,
        2,
        &f.uid_inside.to_string(),
        &format!(
            "{}:x:{}:{}::{}:/bin/sh",
            f.user, f.uid_inside, f.gid_inside, f.home
        ),
    );
    let group = with_entry(
        &group,
        2,
        &f.gid_inside.to_string(),
        &format!("{}:x:{}:", f.user, f.gid_inside),
    );
    match into {
        UserDbIn::Bundle => {
            write(bundle, PASSWD, passwd.as_bytes())?;
            write(bundle, GROUP, group.as_bytes())
        }
        UserDbIn::Root => {
            write_in_root(root, "/etc", PASSWD, passwd.as_bytes(), 0o644)?;
            write_in_root(root, "/etc", GROUP, group.as_bytes(), 0o644)?;
            let shadow = read_in_root(root, "/etc/shadow")?;
            if passwd == image_passwd || shadow.is_empty() {
                return Ok(());
            }
            let shadow = with_entry(
                &String::from_utf8_lossy(&shadow),
                0,
                &f.user,
                &format!("{}:*:::::::", f.user),
            );
            write_in_root(root, "/etc", "shadow", shadow.as_bytes(), 0o640)
        }
    }
}

/// apt's setting, in a Debian image run as root, to download as root instead of as `_apt`
/// (enroot's `10-aptfix` hook writes the same): in berth's one-id user namespace the
/// seccomp filter lets apt's switch to `_apt` succeed without effect, and apt, checking its
/// ids afterwards, stops with "Could not switch group".
const APT_AS_ROOT: (&str, &str) = (
    "99berth-remapped-root",
    "// berth: the remapped root downloads as root (see --container-remap-root)\n\
     APT::Sandbox::User \"root\";\n",
);

/// Writes [`APT_AS_ROOT`] into the image's `/etc/apt/apt.conf.d` (made if missing, resolved
/// inside the root) when the container's user is root and the image is Debian's or a
/// derivative's (`/etc/debian_version`). Call on the overlay root before it turns
/// read-only: the file goes to the upper layer, never the image.
pub fn write_apt_config(root: &Path, f: &AssemblyInputs) -> Result<()> {
    if f.uid_inside != 0 {
        return Ok(());
    }
    let root_fd = berth_sys::rootfs::open_dir(root).map_err(|source| Error::Sys {
        path: "/".into(),
        source,
    })?;
    let debian = Path::new("/etc/debian_version");
    match berth_sys::rootfs::open_in_root(root_fd.as_fd(), debian, libc::O_PATH) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(source) => {
            return Err(Error::Sys {
                path: debian.into(),
                source,
            })
        }
    }
    let (name, text) = APT_AS_ROOT;
    write_in_root(root, "/etc/apt/apt.conf.d", name, text.as_bytes(), 0o644)
}

/// Writes `bytes` as file `name` (with `mode`) of directory `dir` of the container's root
/// (made if missing, resolved inside the root), replacing what is there: written beside it
/// and renamed over it, so a symlink at that name is replaced, never followed, and no
/// reader sees half a file.
fn write_in_root(root: &Path, dir: &str, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let root_fd = berth_sys::rootfs::open_dir(root).map_err(|source| Error::Sys {
        path: root.into(),
        source,
    })?;
    let dir_fd = berth_sys::rootfs::ensure_in_root(
        root_fd.as_fd(),
        Path::new(dir),
        berth_sys::MountpointKind::Dir,
    )
    .map_err(|source| Error::Sys {
        path: dir.into(),
        source,
    })?;
    // Names looked up in the directory resolved above, through its descriptor.
    let at = berth_sys::rootfs::fd_path(dir_fd.as_fd());
    let tmp = at.join(format!(".{name}.berth"));
    let failed = |e| Error::io(format!("writing {dir}/{name} in the container"), e);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| file.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, at.join(name)))
        .map_err(failed)
}

/// Where CUDA images keep the forward-compatibility driver libraries (`cuda-compat-*`).
const CUDA_COMPAT: &str = "/usr/local/cuda/compat";

/// Writes the bundle's ld.so.cache when the spec binds libraries: the image's CUDA
/// forward-compatibility libraries when they are of a newer driver than `driver` (as
/// libnvidia-container does: a CUDA newer than the node's driver then still runs), then the
/// spec's entries (they win over an image's stub of the same name), then the image's own.
pub fn write_ld_cache(
    root: &Path,
    bundle: &Path,
    entries: &[(String, String)],
    driver: Option<&str>,
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let image = ldcache::parse(&read_in_root(root, edit::LDCACHE_PATH)?).unwrap_or_default();
    let compat = match driver {
        Some(d) => compat_libraries(&list_in_root(root, CUDA_COMPAT)?, d),
        None => Vec::new(),
    };
    let all: Vec<ldcache::Entry> = compat
        .iter()
        .map(|name| ldcache::Entry::native(name, &format!("{CUDA_COMPAT}/{name}")))
        .chain(entries.iter().map(|(k, v)| ldcache::Entry::native(k, v)))
        .chain(image)
        .collect();
    write(bundle, edit::LDCACHE, &ldcache::write(&all))
}

/// The sonames (`libcuda.so.1`, ...) in a compat directory's `names` when its libcuda is of
/// a newer driver branch than `driver`.
fn compat_libraries(names: &[String], driver: &str) -> Vec<String> {
    let major = |v: &str| v.split('.').next().and_then(|m| m.parse::<u32>().ok());
    let newer = names.iter().any(|n| {
        n.starts_with("libcuda.so.")
            && driver::version_from_library(Path::new(n)).is_some_and(|v| major(&v) > major(driver))
    });
    if !newer {
        return Vec::new();
    }
    names
        .iter()
        .filter(|n| {
            n.split_once(".so.")
                .is_some_and(|(_, v)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        })
        .cloned()
        .collect()
}

/// The names in a directory of the image (resolved inside the root), or none.
fn list_in_root(root: &Path, path: &str) -> Result<Vec<String>> {
    let root_fd = berth_sys::rootfs::open_dir(root).map_err(|source| Error::Sys {
        path: root.into(),
        source,
    })?;
    let dir = match berth_sys::rootfs::open_in_root(
        root_fd.as_fd(),
        Path::new(path),
        libc::O_RDONLY | libc::O_DIRECTORY,
    ) {
        Ok(fd) => fd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Ok(Vec::new())
        }
        Err(source) => {
            return Err(Error::Sys {
                path: path.into(),
                source,
            })
        }
    };
    // The opened directory itself, through its descriptor: no path lookup in the image.
    let entries = std::fs::read_dir(berth_sys::rootfs::fd_path(dir.as_fd()))
        .map_err(|e| Error::io(format!("reading the image's {path}"), e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

fn write(bundle: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = bundle.join(name);
    std::fs::write(&path, bytes).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// `text` (a passwd, group or shadow file) with `entry` appended unless a line has `key`
/// in field `field`.
pub fn with_entry(text: &str, field: usize, key: &str, entry: &str) -> String {
    if text.lines().any(|l| l.split(':').nth(field) == Some(key)) {
        return text.to_string();
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(entry);
    out.push('\n');
    out
}

/// A file of the image, or nothing when the image has none.
fn read_in_root(root: &Path, path: &str) -> Result<Vec<u8>> {
    let root_fd = berth_sys::rootfs::open_dir(root).map_err(|source| Error::Sys {
        path: root.into(),
        source,
    })?;
    match berth_sys::rootfs::open_in_root(root_fd.as_fd(), Path::new(path), libc::O_RDONLY) {
        Ok(fd) => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)
                .map_err(|e| Error::io(format!("reading the image's {path}"), e))?;
            Ok(bytes)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(source) => Err(Error::Sys {
            path: path.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache written for an image `root` with the driver's libcuda bound.
    fn cache_for(root: &Path) -> Vec<ldcache::Entry> {
        let bundle = tempfile::tempdir().unwrap();
        let ours = [(
            "libcuda.so.1".to_string(),
            "/usr/local/nvidia/lib64/libcuda.so.1".to_string(),
        )];
        write_ld_cache(root, bundle.path(), &ours, Some("550.54.15")).unwrap();
        ldcache::parse(&std::fs::read(bundle.path().join("ld.so.cache")).unwrap()).unwrap()
    }

    #[test]
    fn newer_cuda_compat_libraries_win() {
        let names: Vec<String> = [
            "libcuda.so",
            "libcuda.so.1",
            "libcuda.so.555.42.06",
            "libnvidia-ptxjitcompiler.so.1",
            "libnvidia-ptxjitcompiler.so.555.42.06",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            compat_libraries(&names, "550.54.15"),
            ["libcuda.so.1", "libnvidia-ptxjitcompiler.so.1"]
        );
        assert!(compat_libraries(&names, "560.28.03").is_empty());
        assert!(compat_libraries(&names, "555.1").is_empty());

        let root = tempfile::tempdir().unwrap();
        let compat = root.path().join("usr/local/cuda/compat");
        std::fs::create_dir_all(&compat).unwrap();
        for n in &names {
            std::fs::write(compat.join(n), "").unwrap();
        }
        let written = cache_for(root.path());
        let cuda = written.iter().find(|e| e.key == "libcuda.so.1").unwrap();
        assert_eq!(cuda.value, "/usr/local/cuda/compat/libcuda.so.1");
        assert_eq!(
            written.iter().filter(|e| e.key == "libcuda.so.1").count(),
            1
        );
    }

    fn inputs(uid_inside: u32) -> AssemblyInputs {
        AssemblyInputs {
            image: "/img.sif".into(),
            offset: 0,
            uid: 1100,
            gid: 1100,
            uid_inside,
            gid_inside: uid_inside,
            user: "ada".into(),
            home: "/".into(),
            changes: None,
            below: None,
            isolation: berth_sys::Isolation::default(),
        }
    }

    #[test]
    fn the_remapped_root_of_a_debian_image_downloads_as_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let conf = r.join("etc/apt/apt.conf.d/99berth-remapped-root");
        // Not Debian: nothing written.
        write_apt_config(r, &inputs(0)).unwrap();
        assert!(!r.join("etc/apt").exists());
        std::fs::create_dir(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/debian_version"), "12.5\n").unwrap();
        // The user's own ids: apt cannot install anyway, nothing written.
        write_apt_config(r, &inputs(1100)).unwrap();
        assert!(!r.join("etc/apt").exists());
        // Root: the directory made as apt expects it, the setting in it.
        write_apt_config(r, &inputs(0)).unwrap();
        let text = std::fs::read_to_string(&conf).unwrap();
        assert!(text.contains("APT::Sandbox::User \"root\";"), "{text}");
        // A symlink the image put at that name is replaced, not followed out of the root.
        let outside = tempfile::tempdir().unwrap();
        std::fs::remove_file(&conf).unwrap();
        std::os::unix::fs::symlink(outside.path().join("x"), &conf).unwrap();
        write_apt_config(r, &inputs(0)).unwrap();
        assert!(!outside.path().join("x").exists());
        assert!(std::fs::symlink_metadata(&conf).unwrap().is_file());
        // Nor is a symlinked directory: it resolves inside the root, where it dangles.
        std::fs::remove_dir_all(r.join("etc/apt")).unwrap();
        std::fs::create_dir(r.join("etc/apt")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("etc/apt/apt.conf.d")).unwrap();
        assert!(write_apt_config(r, &inputs(0)).is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn user_db_keeps_image_entries() {
        let text = "root:x:0:0::/root:/bin/sh\nada:x:1100:1200::/h:/bin/sh";
        assert_eq!(with_entry(text, 2, "1100", "new"), text);
        assert_eq!(
            with_entry(text, 2, "7", "x:x:7:7"),
            format!("{text}\nx:x:7:7\n")
        );
        assert_eq!(with_entry("", 2, "7", "x:x:7:7"), "x:x:7:7\n");
        assert_eq!(with_entry(text, 0, "ada", "new"), text);
    }

    /// A writable container's own files get the entries (groupadd can replace them), and
    /// shadow the user's where the image has one; a read-only one's go to the bundle.
    #[test]
    fn a_writable_containers_user_db_is_written_into_its_files() {
        let (root, bundle) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let etc = root.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(etc.join("shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        // A symlink at a name is replaced, not followed.
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("g"), etc.join("group")).unwrap();
        let mut f = inputs(1100);
        f.home = "/home/ada".into();
        write_user_db(root.path(), bundle.path(), &f, UserDbIn::Root).unwrap();
        let read = |name: &str| std::fs::read_to_string(etc.join(name)).unwrap();
        assert_eq!(
            read("passwd"),
            "root:x:0:0::/root:/bin/sh\nada:x:1100:1100::/home/ada:/bin/sh\n"
        );
        assert_eq!(read("group"), "ada:x:1100:\n");
        assert!(!outside.path().join("g").exists());
        assert_eq!(read("shadow"), "root:*:19000:0:99999:7:::\nada:*:::::::\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| {
            std::fs::metadata(etc.join(name))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(
            (mode("passwd") & 0o777, mode("shadow") & 0o777),
            (0o644, 0o640)
        );
        assert!(std::fs::read_dir(bundle.path()).unwrap().next().is_none());
        // Again (a named container's next step): nothing added twice.
        write_user_db(root.path(), bundle.path(), &f, UserDbIn::Root).unwrap();
        for name in ["passwd", "shadow"] {
            let text = read(name);
            assert_eq!(text.lines().filter(|l| l.starts_with("ada:")).count(), 1);
        }
        // The remapped root is the image's root: shadow untouched. No shadow: none made.
        write_user_db(root.path(), bundle.path(), &inputs(0), UserDbIn::Root).unwrap();
        std::fs::remove_file(etc.join("shadow")).unwrap();
        std::fs::write(etc.join("passwd"), "").unwrap();
        write_user_db(root.path(), bundle.path(), &f, UserDbIn::Root).unwrap();
        assert!(!etc.join("shadow").exists());
        // Read-only: the bundle's files, the image's untouched.
        std::fs::write(etc.join("passwd"), "").unwrap();
        write_user_db(root.path(), bundle.path(), &f, UserDbIn::Bundle).unwrap();
        assert!(bundle.path().join("passwd").is_file());
        assert_eq!(read("passwd"), "");
    }

    #[test]
    fn the_ld_cache_puts_the_drivers_first_and_keeps_the_images() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let image = ldcache::write(&[
            ldcache::Entry::native("libcuda.so.1", "/usr/lib/stubs/libcuda.so.1"),
            ldcache::Entry::native("libc.so.6", "/lib/libc.so.6"),
        ]);
        std::fs::write(root.path().join("etc/ld.so.cache"), image).unwrap();
        let written = cache_for(root.path());
        let pairs: Vec<_> = written
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1"),
                ("libc.so.6", "/lib/libc.so.6")
            ]
        );
        // No libraries: no cache written.
        let empty = tempfile::tempdir().unwrap();
        write_ld_cache(root.path(), empty.path(), &[], None).unwrap();
        assert!(!empty.path().join("ld.so.cache").exists());
    }
}
