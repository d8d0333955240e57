//! A container held by `berth start`, taken by descriptor: its user and mount namespaces and
//! its published OCI spec, opened from the holder process through `/proc/PID` while a pidfd
//! shows the holder is the process meant. Whoever joins afterwards (the SPANK plugin's tasks,
//! which inherit the descriptors through fork; `berth exec --join`) uses only these, never a
//! pid number again.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::memfd::SpecHandle;
use crate::namespaces::Namespaces;
use crate::process::{Confinement, PidFd};
use crate::{Error, Result};

/// What a holder gives a joiner.
#[derive(Debug)]
pub struct Held {
    pub namespaces: Namespaces,
    /// The container's OCI spec (JSON), read from the holder's sealed spec memfd.
    pub spec: Vec<u8>,
}

/// Opens the namespaces and reads the spec of the holder `handle` names. `pidfd` must have
/// been opened on `handle.pid` before this call (by the holder's parent right after spawning
/// it, or by a joiner right after reading the handle): the process is checked to be alive
/// after the opens, so everything opened through `/proc/PID` belongs to that process and not
/// to a later one with the same pid. Opening another process's `/proc/PID/ns` and fds needs
/// ptrace access: the same user for a dumpable holder, root for a non-dumpable one (`berth
/// start --private`; see [`crate::identity::with_effective_root`]).
pub fn open(pidfd: &PidFd, handle: SpecHandle) -> Result<Held> {
    let ns = |name: &str| -> Result<std::os::fd::OwnedFd> {
        let path = PathBuf::from(format!("/proc/{}/ns/{name}", handle.pid));
        // std opens with O_CLOEXEC: a task inherits these through fork, never through exec.
        Ok(File::open(&path)
            .map_err(Error::io_path("open", &path))?
            .into())
    };
    // The holder's own where it has one (`--unshare`), none where it shares this process's.
    let own = |name: &str| -> Result<Option<std::os::fd::OwnedFd>> {
        let theirs = ns(name)?;
        let mine = PathBuf::from(format!("/proc/self/ns/{name}"));
        let same = std::fs::metadata(&mine)
            .map_err(Error::io_path("stat", &mine))?
            .ino()
            == File::from(theirs.try_clone().map_err(Error::io_path("dup", &mine))?)
                .metadata()
                .map_err(Error::io_path("fstat", &mine))?
                .ino();
        Ok((!same).then_some(theirs))
    };
    let namespaces = Namespaces {
        user: ns("user")?,
        mnt: ns("mnt")?,
        net: own("net")?,
        ipc: own("ipc")?,
        uts: own("uts")?,
    };
    let spec = handle.read().map_err(|source| Error::Os {
        call: "reading the holder's spec",
        source,
    })?;
    if !pidfd.is_alive()? {
        return Err(Error::Invalid {
            what: "opening the container",
            message: format!(
                "its holder {} ended while it was being opened; start it again",
                handle.pid
            ),
        });
    }
    Ok(Held { namespaces, spec })
}

/// What a process entering the container takes from its spec: the environment, and the
/// [`Confinement`] every way into the container applies alike (`berth exec`, `berth exec
/// --join`, the SPANK plugin's `task_init`), derived here and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerProcess {
    pub env: Vec<String>,
    pub confinement: Confinement,
    /// The image's entrypoint ([`ANN_ENTRYPOINT`]; empty when the image has none), which the
    /// SPANK plugin puts in front of a task's command on `--container-entrypoint`.
    pub entrypoint: Vec<String>,
}

/// The spec annotation that carries the image's entrypoint, a JSON array of strings: the
/// spec's own `process.args` is entrypoint and cmd run together, which a joiner cannot split.
pub const ANN_ENTRYPOINT: &str = "org.berth.image.entrypoint";

#[derive(serde::Deserialize)]
struct SpecDoc {
    process: ProcessDoc,
    #[serde(default)]
    linux: LinuxDoc,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

#[derive(serde::Deserialize, Default)]
struct LinuxDoc {
    #[serde(default)]
    namespaces: Vec<NamespaceDoc>,
    /// Absent only in specs berth did not write (it always writes one, see
    /// [`crate::seccomp::Profile::for_container`]): then no filter is installed.
    #[serde(default)]
    seccomp: Option<crate::seccomp::Profile>,
}

#[derive(serde::Deserialize)]
struct NamespaceDoc {
    #[serde(rename = "type")]
    typ: String,
}

#[derive(serde::Deserialize)]
struct ProcessDoc {
    #[serde(default)]
    env: Vec<String>,
    cwd: PathBuf,
    /// Absent: every capability is dropped. Present with an `ambient` list: those are kept,
    /// ambient (a plain container with its own UTS namespace keeps CAP_SYS_ADMIN). Present
    /// without one: a `--remap-root` container's root, which keeps what its user namespace
    /// grants. See [`crate::caps::Kept`].
    #[serde(default)]
    capabilities: Option<CapabilitiesDoc>,
}

#[derive(serde::Deserialize)]
struct CapabilitiesDoc {
    #[serde(default)]
    ambient: Vec<String>,
}

impl CapabilitiesDoc {
    fn kept(doc: Option<&CapabilitiesDoc>) -> Result<crate::caps::Kept> {
        match doc {
            None => Ok(crate::caps::Kept::None),
            Some(c) if c.ambient.is_empty() => Ok(crate::caps::Kept::All),
            Some(c) => crate::caps::Kept::ambient_from_names(&c.ambient),
        }
    }
}

impl ContainerProcess {
    /// From an OCI runtime spec (JSON); a spec without `process` or `process.cwd` is refused,
    /// and so is a seccomp profile berth cannot enforce as written.
    pub fn from_spec(json: &[u8]) -> Result<ContainerProcess> {
        let doc: SpecDoc = serde_json::from_slice(json).map_err(|e| Error::Invalid {
            what: "reading the container's OCI spec",
            message: e.to_string(),
        })?;
        let entrypoint = match doc.annotations.get(ANN_ENTRYPOINT) {
            Some(json) => serde_json::from_str(json).map_err(|e| Error::Invalid {
                what: "reading the image's entrypoint from the container's OCI spec",
                message: e.to_string(),
            })?,
            None => Vec::new(),
        };
        Ok(ContainerProcess {
            entrypoint,
            env: doc.process.env,
            confinement: Confinement {
                cwd: Some(doc.process.cwd),
                caps: CapabilitiesDoc::kept(doc.process.capabilities.as_ref())?,
                // Each process makes its own on entering: see `crate::cgroup`.
                cgroup_ns: doc.linux.namespaces.iter().any(|n| n.typ == "cgroup"),
                seccomp: doc
                    .linux
                    .seccomp
                    .as_ref()
                    .map(crate::seccomp::Filter::compile)
                    .transpose()?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::{sealed, SPEC_NAME};
    use std::os::fd::AsRawFd;

    #[test]
    fn the_spec_decides_the_confinement() {
        let plain = br#"{"process":{"env":["PATH=/bin"],"cwd":"/w","args":["sh"]}}"#;
        assert_eq!(
            ContainerProcess::from_spec(plain).unwrap(),
            ContainerProcess {
                env: vec!["PATH=/bin".into()],
                confinement: Confinement {
                    cwd: Some("/w".into()),
                    caps: crate::caps::Kept::None,
                    cgroup_ns: false,
                    seccomp: None,
                },
                entrypoint: Vec::new(),
            }
        );
        let profile = crate::seccomp::Profile::for_container(
            crate::seccomp::Privilege {
                remap_root: true,
                sys_admin: true,
            },
            &[],
        );
        let filtered = serde_json::json!({
            "process": { "cwd": "/" },
            "linux": {
                "seccomp": profile,
                "maskedPaths": ["/proc/kcore"],
                "namespaces": [{ "type": "user" }, { "type": "cgroup" }],
            },
        });
        let p = ContainerProcess::from_spec(filtered.to_string().as_bytes()).unwrap();
        assert!(p.confinement.cgroup_ns);
        assert_eq!(
            p.confinement.seccomp,
            Some(crate::seccomp::Filter::compile(&profile).unwrap())
        );
        let unenforceable =
            br#"{"process":{"cwd":"/"},"linux":{"seccomp":{"defaultAction":"SCMP_ACT_ERRNO"}}}"#;
        assert!(ContainerProcess::from_spec(unenforceable).is_err());
        let with_entry = br#"{"process":{"cwd":"/"},
            "annotations":{"org.berth.image.entrypoint":"[\"/entry.sh\",\"-x\"]"}}"#;
        assert_eq!(
            ContainerProcess::from_spec(with_entry).unwrap().entrypoint,
            ["/entry.sh", "-x"]
        );
        let bad = br#"{"process":{"cwd":"/"},"annotations":{"org.berth.image.entrypoint":"x"}}"#;
        assert!(ContainerProcess::from_spec(bad).is_err());
        let root = br#"{"process":{"cwd":"/","capabilities":{"bounding":["CAP_CHOWN"]}}}"#;
        let p = ContainerProcess::from_spec(root).unwrap();
        assert_eq!(p.confinement.caps, crate::caps::Kept::All);
        let sys_admin = br#"{"process":{"cwd":"/","capabilities":{"ambient":["CAP_SYS_ADMIN"]}}}"#;
        assert_eq!(
            ContainerProcess::from_spec(sys_admin)
                .unwrap()
                .confinement
                .caps,
            crate::caps::Kept::Ambient(vec![crate::caps::Capability::CAP_SYS_ADMIN])
        );
        let unknown = br#"{"process":{"cwd":"/","capabilities":{"ambient":["CAP_EVERYTHING"]}}}"#;
        assert!(ContainerProcess::from_spec(unknown).is_err());
        assert!(p.env.is_empty());
        assert!(ContainerProcess::from_spec(br#"{"process":{}}"#).is_err());
        assert!(ContainerProcess::from_spec(b"not json").is_err());
    }

    /// A child of this test in namespaces of its own (unprivileged user namespaces), holding
    /// a spec memfd at fd 3 and a marker file in a tmpfs only its mount namespace has.
    fn holder(spec_name: &str) -> Option<std::process::Child> {
        let python = format!(
            "import os, fcntl, time\n\
             fd = os.memfd_create('{spec_name}', os.MFD_ALLOW_SEALING)\n\
             os.write(fd, b'{{\"process\":{{\"cwd\":\"/mnt\"}},\"linux\":{{\"namespaces\":[{{\"type\":\"cgroup\"}}]}}}}')\n\
             fcntl.fcntl(fd, 1033, 15)  # F_ADD_SEALS: seal, shrink, grow, write\n\
             os.dup2(fd, 3)\n\
             print('ready', flush=True)\n\
             time.sleep(30)\n"
        );
        // unshare execs sh, which execs python: the child's pid is the holder's.
        let mut child = std::process::Command::new("unshare")
            .args(["-Urm", "sh", "-c"])
            .arg("mount -t tmpfs t /mnt && echo inside > /mnt/marker && exec python3 -c \"$0\"")
            .arg(python)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let mut line = String::new();
        let read = std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut()?),
            &mut line,
        );
        if read.is_err() || line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        Some(child)
    }

    #[test]
    fn a_holder_is_opened_and_joined_by_descriptor() {
        let Some(mut child) = holder("berth-spec") else {
            eprintln!("skipped: no unprivileged user namespaces or python3 here");
            return;
        };
        // The holder's first process is unshare's child sh, then python: take python's pid.
        let pid = child.id() as i32;
        let pidfd = PidFd::open(pid).unwrap();
        let held = open(&pidfd, SpecHandle { pid, fd: 3 }).unwrap();
        assert_eq!(
            held.spec,
            br#"{"process":{"cwd":"/mnt"},"linux":{"namespaces":[{"type":"cgroup"}]}}"#
        );
        let process = ContainerProcess::from_spec(&held.spec).unwrap();
        assert!(process.confinement.cgroup_ns);
        // Join from a fresh single-threaded process (setns of a user namespace needs one):
        // the marker exists only in the holder's mount namespace.
        let ns = &held.namespaces;
        // Then exec there, as `berth exec --join` does: confined once, by join (a second
        // cgroup namespace would need the capabilities join dropped).
        let command = crate::process::CommandSpec {
            argv: ["/bin/sh", "-c", "[ \"$(cat marker)\" = inside ] && exit 7"]
                .map(|a| std::ffi::CString::new(a).unwrap())
                .to_vec(),
            confinement: process.confinement.clone(),
            ..Default::default()
        };
        // SAFETY: the forked child only joins, reads a file and execs or exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = crate::namespaces::join(ns, &process.confinement).is_ok()
                    && std::fs::read_to_string("marker").is_ok_and(|m| m == "inside\n");
                if ok {
                    crate::process::exec(&command);
                }
                unsafe { libc::_exit(1) }
            }
            nix::unistd::ForkResult::Parent { child: joiner } => {
                let exit = crate::process::reap(joiner.as_raw()).unwrap();
                assert_eq!(exit, crate::process::Exit::Code(7));
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Ended: nothing is opened from its pid any more.
        assert!(open(&pidfd, SpecHandle { pid, fd: 3 }).is_err());
    }

    #[test]
    fn a_descriptor_that_is_not_a_sealed_spec_is_refused() {
        let Some(mut child) = holder("other-name") else {
            eprintln!("skipped: no unprivileged user namespaces or python3 here");
            return;
        };
        let pid = child.id() as i32;
        let pidfd = PidFd::open(pid).unwrap();
        let err = open(&pidfd, SpecHandle { pid, fd: 3 }).unwrap_err();
        assert!(
            err.to_string().contains("not a berth container's spec"),
            "{err}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // An unsealed memfd with the right name is refused too.
        let me = std::process::id() as i32;
        let unsealed =
            nix::sys::memfd::memfd_create(SPEC_NAME, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        let handle = SpecHandle {
            pid: me,
            fd: unsealed.as_raw_fd(),
        };
        let err = open(&PidFd::open(me).unwrap(), handle).unwrap_err();
        assert!(err.to_string().contains("not sealed"), "{err}");
        let sealed = sealed(SPEC_NAME, b"{}").unwrap();
        let handle = SpecHandle {
            pid: me,
            fd: sealed.as_raw_fd(),
        };
        assert_eq!(open(&PidFd::open(me).unwrap(), handle).unwrap().spec, b"{}");
    }
}
