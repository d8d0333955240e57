//! User and mount namespaces: creating them, writing id maps, and joining a running
//! container's namespaces by descriptor ([`join`]).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::CloneFlags;

use crate::process::{confine, Confinement};
use crate::{rootfs, Error, Result};

pub(crate) fn unshare(flags: CloneFlags) -> Result<()> {
    nix::sched::unshare(flags).map_err(Error::os("unshare"))
}

/// Writes the calling process's id maps. `setgroups` must be denied before an unprivileged
/// process may write its gid_map (user_namespaces(7)); it stays denied for nested namespaces.
pub(crate) fn write_id_maps(uid_map: &str, gid_map: &str) -> Result<()> {
    let _dumpable = crate::process::dumpable_for_id_maps()?;
    let write = |path: &str, text: &str| {
        std::fs::write(path, text).map_err(Error::io_path("write", Path::new(path)))
    };
    write("/proc/self/setgroups", "deny")?;
    write("/proc/self/uid_map", uid_map)?;
    write("/proc/self/gid_map", gid_map)
}

// ioctl(2) requests of nsfs (include/uapi/linux/nsfs.h): _IO(0xb7, 1) and _IO(0xb7, 2).
const NS_GET_USERNS: libc::c_ulong = 0xb701;
const NS_GET_PARENT: libc::c_ulong = 0xb702;

/// Descriptors of a running container's user and mount namespaces (close-on-exec), as
/// [`crate::holder::open`] takes them from a `berth start` holder. Joining by descriptor, not
/// by a pid or a `/proc` path, means a joiner enters exactly the namespaces that were
/// checked when the descriptors were opened, whatever became of the holder's pid since.
#[derive(Debug)]
pub struct Namespaces {
    pub user: OwnedFd,
    pub mnt: OwnedFd,
    /// The container's own network, IPC and UTS namespaces, where it has them (`--unshare`);
    /// None where it shares the host's.
    pub net: Option<OwnedFd>,
    pub ipc: Option<OwnedFd>,
    pub uts: Option<OwnedFd>,
}

/// The namespaces a container may have of its own besides user and mount (pyxis's
/// `--container-unshare`); by default it shares the host's network, IPC and hostname, as a
/// job's processes do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Isolation {
    pub net: bool,
    pub ipc: bool,
    pub uts: bool,
}

impl Isolation {
    fn flags(self) -> CloneFlags {
        [
            (self.net, CloneFlags::CLONE_NEWNET),
            (self.ipc, CloneFlags::CLONE_NEWIPC),
            (self.uts, CloneFlags::CLONE_NEWUTS),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(CloneFlags::empty(), |all, (_, flag)| all | *flag)
    }
}

/// Enters new namespaces of the kinds `iso` names, owned by the current user namespace; a
/// new network namespace gets its loopback interface up (as a container runtime's does), so
/// 127.0.0.1 answers inside.
pub(crate) fn isolate(iso: Isolation) -> Result<()> {
    if iso == Isolation::default() {
        return Ok(());
    }
    unshare(iso.flags())?;
    if iso.net {
        loopback_up()?;
    }
    Ok(())
}

fn loopback_up() -> Result<()> {
    // SAFETY: socket(2) takes no pointers; a new fd (owned below) or -1.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Error::Os {
            call: "socket",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the fd was just created and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; zeroed is a valid value (empty name, no flags).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq passed, which lives across
    // both calls; the socket is open.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(Error::Os {
                call: "ioctl(SIOCGIFFLAGS, lo)",
                source: std::io::Error::last_os_error(),
            });
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(Error::Os {
                call: "ioctl(SIOCSIFFLAGS, lo)",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Joins the namespaces `ns`, then confines the process as `confinement` says ([`confine`]:
/// working directory inside the container, no_new_privs, capabilities). It does not exec, so
/// the SPANK plugin can call it from `task_init` and return into Slurm, which execs the task.
/// The caller must be single-threaded (setns of a user namespace requires it).
///
/// The holder's user namespace may be nested in others below the joiner's (a container
/// started from inside another); the mount namespace belongs to one of them, so the chain is
/// entered from the outside in, the mount namespace right after the user namespace that owns
/// it.
pub fn join(ns: &Namespaces, confinement: &Confinement) -> Result<()> {
    let own = ino(&File::open("/proc/self/ns/user")
        .map_err(Error::io_path("open", Path::new("/proc/self/ns/user")))?)?;
    let mnt_owner = ino(&ns_ioctl(&ns.mnt, NS_GET_USERNS, "NS_GET_USERNS")?)?;

    // Walk up from the target to our own user namespace, then enter from the outside in.
    let mut chain = vec![ns.user.try_clone().map_err(|source| Error::Os {
        call: "dup",
        source,
    })?];
    loop {
        let parent = ns_ioctl(
            chain.last().expect("chain is never empty"),
            NS_GET_PARENT,
            "NS_GET_PARENT",
        )?;
        if ino(&parent)? == own {
            break;
        }
        chain.push(parent);
    }
    for user in chain.iter().rev() {
        nix::sched::setns(user.as_fd(), CloneFlags::CLONE_NEWUSER)
            .map_err(Error::os("setns(user namespace)"))?;
        if ino(user)? == mnt_owner {
            nix::sched::setns(ns.mnt.as_fd(), CloneFlags::CLONE_NEWNS)
                .map_err(Error::os("setns(mount namespace)"))?;
            // Made with the mount namespace, owned by the same user namespace.
            for other in [&ns.net, &ns.ipc, &ns.uts].into_iter().flatten() {
                nix::sched::setns(other.as_fd(), CloneFlags::empty())
                    .map_err(Error::os("setns(network, IPC or UTS namespace)"))?;
            }
        }
    }
    // setns(CLONE_NEWNS) put root and cwd at the namespace's root, the container's `/`, so
    // the working directory is resolved from there.
    confine(confinement).map_err(|(_, e)| e)
}

/// chdir to `cwd` resolved inside the current root, so it cannot be a path outside it
/// (runc CVE-2024-21626 started a process with its cwd outside the root).
pub fn enter_workdir(cwd: &Path) -> Result<()> {
    let root = rootfs::open_dir(Path::new("/"))?;
    let dir = rootfs::open_in_root(root.as_fd(), cwd, libc::O_PATH | libc::O_DIRECTORY)?;
    nix::unistd::fchdir(dir.as_raw_fd()).map_err(Error::os_path("chdir", cwd))
}

fn ns_ioctl(fd: &impl AsRawFd, request: libc::c_ulong, call: &'static str) -> Result<OwnedFd> {
    // SAFETY: nsfs ioctls take no argument and return a new fd or -1.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request) };
    if r < 0 {
        return Err(Error::Os {
            call,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn ino(fd: &impl AsFd) -> Result<u64> {
    let f = File::from(
        fd.as_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::Os {
                call: "dup",
                source,
            })?,
    );
    Ok(f.metadata()
        .map_err(|source| Error::Os {
            call: "fstat(namespace)",
            source,
        })?
        .ino())
}
