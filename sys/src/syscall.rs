//! [`Syscall`]: the operations container assembly performs, behind a trait so the order,
//! flags and targets of every mount can be unit-tested with a recording double
//! (`recording::RecordingSyscall`, feature `recording`) without root or a kernel.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::rootfs::{self, MountpointKind};
use crate::{namespaces, process, Error, Isolation, Result};

/// One mount(2). `target` is a host path for [`Syscall::mount`] and a path inside the
/// container root for [`Syscall::mount_in_root`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: Option<PathBuf>,
    pub target: PathBuf,
    pub fstype: Option<String>,
    pub flags: MsFlags,
    pub data: Option<String>,
    /// Made read-only after mounting, recursively (every submount of a recursive bind too).
    pub readonly: bool,
    /// What to create at `target` when it does not exist.
    pub kind: MountpointKind,
}

pub trait Syscall {
    /// Enters a new user namespace and a new mount namespace (the caller must be
    /// single-threaded).
    fn unshare_user_mount(&self) -> Result<()>;
    /// Enters new network, IPC and UTS namespaces as `iso` asks (none: nothing).
    fn isolate(&self, iso: Isolation) -> Result<()>;
    /// Writes this process's `setgroups` ("deny"), `uid_map` and `gid_map`.
    fn write_id_maps(&self, uid_map: &str, gid_map: &str) -> Result<()>;
    /// Stops mount events propagating between this mount namespace and the host's.
    fn make_mounts_private(&self) -> Result<()>;
    /// mount(2) at a path of berth's own (private) mount namespace.
    fn mount(&self, m: &Mount) -> Result<()>;
    /// mount(2) at `m.target` resolved inside `root`, creating the mountpoint if needed.
    fn mount_in_root(&self, root: &Path, m: &Mount) -> Result<()>;
    /// Creates the symlink `link` (inside `root`) pointing at `target`.
    fn symlink_in_root(&self, root: &Path, target: &Path, link: &Path) -> Result<()>;
    /// Makes the mount at `path` read-only (that mount only, not the mounts on top of it).
    fn set_readonly(&self, path: &Path) -> Result<()>;
    /// Mounts a FUSE file system at `target` and returns the /dev/fuse connection for the
    /// daemon that will serve it. `uid`/`gid` own the mount, as seen by the caller.
    fn mount_fuse(
        &self,
        source: &Path,
        target: &Path,
        subtype: &str,
        uid: u32,
        gid: u32,
    ) -> Result<OwnedFd>;
    /// Starts the daemon serving `fuse` (its argv names the connection as `/dev/fd/N`, see
    /// [`process::fuse_fd_arg`]) and returns its pid once `target` answers.
    fn start_fuse_helper(&self, argv: &[CString], fuse: OwnedFd, target: &Path) -> Result<i32>;
    /// pivot_root(2) into `root` and detach the old root.
    fn pivot_root(&self, root: &Path) -> Result<()>;
    /// Gives up root for good and becomes `uid`/`gid` with no supplementary groups (see
    /// [`crate::identity::run_in_child_as`]); fails unless root is then out of reach.
    fn drop_privileges(&self, uid: u32, gid: u32) -> Result<()>;
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn unshare_user_mount(&self) -> Result<()> {
        namespaces::unshare(
            nix::sched::CloneFlags::CLONE_NEWUSER | nix::sched::CloneFlags::CLONE_NEWNS,
        )
    }

    fn isolate(&self, iso: Isolation) -> Result<()> {
        namespaces::isolate(iso)
    }

    fn write_id_maps(&self, uid_map: &str, gid_map: &str) -> Result<()> {
        namespaces::write_id_maps(uid_map, gid_map)
    }

    fn make_mounts_private(&self) -> Result<()> {
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(Error::os_path("make mounts private", Path::new("/")))
    }

    fn mount(&self, m: &Mount) -> Result<()> {
        do_mount(m, &m.target)?;
        if m.readonly {
            let fd = rootfs::open_dir(&m.target)?;
            rootfs::set_readonly_fd(fd.as_fd(), true, &m.target)?;
        }
        Ok(())
    }

    fn mount_in_root(&self, root: &Path, m: &Mount) -> Result<()> {
        let root_fd = rootfs::open_dir(root)?;
        let target = rootfs::ensure_in_root(root_fd.as_fd(), &m.target, m.kind)?;
        do_mount(m, &rootfs::fd_path(target.as_fd()))?;
        if m.readonly {
            // `target` still names the covered mountpoint; look the path up again to get
            // the new mount on top of it.
            let mounted = rootfs::open_in_root(root_fd.as_fd(), &m.target, libc::O_PATH)?;
            rootfs::set_readonly_fd(mounted.as_fd(), true, &m.target)?;
        }
        Ok(())
    }

    fn symlink_in_root(&self, root: &Path, target: &Path, link: &Path) -> Result<()> {
        let root_fd = rootfs::open_dir(root)?;
        let (parent, name) = match (link.parent(), link.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => {
                return Err(Error::BadContainerPath {
                    path: link.to_path_buf(),
                })
            }
        };
        let dir = rootfs::ensure_in_root(root_fd.as_fd(), parent, MountpointKind::Dir)?;
        nix::unistd::symlinkat(target, Some(dir.as_raw_fd()), name)
            .map_err(Error::os_path("symlink", link))
    }

    fn set_readonly(&self, path: &Path) -> Result<()> {
        let fd = rootfs::open_dir(path)?;
        rootfs::set_readonly_fd(fd.as_fd(), false, path)
    }

    fn mount_fuse(
        &self,
        source: &Path,
        target: &Path,
        subtype: &str,
        uid: u32,
        gid: u32,
    ) -> Result<OwnedFd> {
        let dev = Path::new("/dev/fuse");
        let fuse = nix::fcntl::open(
            dev,
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(Error::os_path("open", dev))?;
        // SAFETY: open returned a new fd that nothing else owns.
        let fuse = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fuse) };
        let m = Mount {
            source: Some(source.to_path_buf()),
            target: target.to_path_buf(),
            fstype: Some(format!("fuse.{subtype}")),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
            data: Some(format!(
                "fd={},rootmode=40000,user_id={uid},group_id={gid}",
                fuse.as_raw_fd()
            )),
            readonly: false,
            kind: MountpointKind::Dir,
        };
        do_mount(&m, target)?;
        Ok(fuse)
    }

    fn start_fuse_helper(&self, argv: &[CString], fuse: OwnedFd, target: &Path) -> Result<i32> {
        let pid = process::spawn_helper(argv, fuse)?;
        // statfs(2) on a FUSE mount waits for the daemon's INIT reply; if the daemon dies
        // first (bad image, say) the connection aborts and statfs fails. So this returns as
        // soon as the mount is live, with no polling. (Our copy of the /dev/fuse fd was
        // moved into spawn_helper and closed there, so a dead daemon does abort it.)
        match nix::sys::statfs::statfs(target) {
            Ok(_) => Ok(pid),
            Err(_) => {
                let status = process::reap(pid)?;
                Err(Error::HelperFailed {
                    program: argv[0].to_string_lossy().into_owned(),
                    status: status.to_string(),
                })
            }
        }
    }

    fn pivot_root(&self, root: &Path) -> Result<()> {
        rootfs::pivot_root(root)
    }

    fn drop_privileges(&self, uid: u32, gid: u32) -> Result<()> {
        crate::identity::drop_for_good(uid, gid)
    }
}

fn do_mount(m: &Mount, target: &Path) -> Result<()> {
    nix::mount::mount(
        m.source.as_deref(),
        target,
        m.fstype.as_deref(),
        m.flags,
        m.data.as_deref(),
    )
    .map_err(Error::os_path("mount", &m.target))
}
