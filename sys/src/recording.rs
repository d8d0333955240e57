//! [`RecordingSyscall`]: a [`Syscall`] that performs nothing and records every call, so
//! container assembly (which mounts, in which order, with which flags and targets) is
//! unit-tested without root.

use std::cell::RefCell;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::{Error, Isolation, Mount, Result, Syscall};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    UnshareUserMount,
    Isolate(Isolation),
    WriteIdMaps {
        uid_map: String,
        gid_map: String,
    },
    MakeMountsPrivate,
    Mount(Mount),
    MountInRoot {
        root: PathBuf,
        mount: Mount,
    },
    SymlinkInRoot {
        root: PathBuf,
        target: PathBuf,
        link: PathBuf,
    },
    SetReadonly(PathBuf),
    MountFuse {
        source: PathBuf,
        target: PathBuf,
        subtype: String,
        uid: u32,
        gid: u32,
    },
    StartFuseHelper {
        argv: Vec<String>,
        target: PathBuf,
    },
    PivotRoot(PathBuf),
    DropPrivileges {
        uid: u32,
        gid: u32,
    },
}

#[derive(Debug, Default)]
pub struct RecordingSyscall {
    pub calls: RefCell<Vec<Call>>,
    /// When set, the call whose `Debug` form contains this string fails with EPERM.
    pub fail_on: Option<String>,
}

/// The pid [`RecordingSyscall::start_fuse_helper`] pretends to have started.
pub const HELPER_PID: i32 = 4242;

impl RecordingSyscall {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    fn record(&self, call: Call) -> Result<()> {
        let failing = self
            .fail_on
            .as_ref()
            .is_some_and(|needle| format!("{call:?}").contains(needle.as_str()));
        self.calls.borrow_mut().push(call);
        if failing {
            return Err(Error::Os {
                call: "recorded",
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        Ok(())
    }
}

impl Syscall for RecordingSyscall {
    fn unshare_user_mount(&self) -> Result<()> {
        self.record(Call::UnshareUserMount)
    }
    fn isolate(&self, iso: Isolation) -> Result<()> {
        if iso == Isolation::default() {
            return Ok(());
        }
        self.record(Call::Isolate(iso))
    }
    fn write_id_maps(&self, uid_map: &str, gid_map: &str) -> Result<()> {
        self.record(Call::WriteIdMaps {
            uid_map: uid_map.into(),
            gid_map: gid_map.into(),
        })
    }
    fn make_mounts_private(&self) -> Result<()> {
        self.record(Call::MakeMountsPrivate)
    }
    fn mount(&self, m: &Mount) -> Result<()> {
        self.record(Call::Mount(m.clone()))
    }
    fn mount_in_root(&self, root: &Path, m: &Mount) -> Result<()> {
        self.record(Call::MountInRoot {
            root: root.into(),
            mount: m.clone(),
        })
    }
    fn symlink_in_root(&self, root: &Path, target: &Path, link: &Path) -> Result<()> {
        self.record(Call::SymlinkInRoot {
            root: root.into(),
            target: target.into(),
            link: link.into(),
        })
    }
    fn set_readonly(&self, path: &Path) -> Result<()> {
        self.record(Call::SetReadonly(path.into()))
    }
    fn mount_fuse(
        &self,
        source: &Path,
        target: &Path,
        subtype: &str,
        uid: u32,
        gid: u32,
    ) -> Result<OwnedFd> {
        self.record(Call::MountFuse {
            source: source.into(),
            target: target.into(),
            subtype: subtype.into(),
            uid,
            gid,
        })?;
        // A real fd, so callers can name it in the helper's argv and close it.
        std::fs::File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|source| Error::Os {
                call: "open /dev/null",
                source,
            })
    }
    fn start_fuse_helper(&self, argv: &[CString], _fuse: OwnedFd, target: &Path) -> Result<i32> {
        self.record(Call::StartFuseHelper {
            argv: argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            target: target.into(),
        })?;
        Ok(HELPER_PID)
    }
    fn pivot_root(&self, root: &Path) -> Result<()> {
        self.record(Call::PivotRoot(root.into()))
    }
    fn drop_privileges(&self, uid: u32, gid: u32) -> Result<()> {
        self.record(Call::DropPrivileges { uid, gid })
    }
}
