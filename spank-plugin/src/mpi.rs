//! MPI in a step's container: what the node hands the container so that an MPI library
//! inside reaches Slurm's MPI plugin on the node (docs/MPI.md).
//!
//! - `--mpi=pmi2`: slurmstepd gives each task a socket, `PMI_FD`, before it executes it. A
//!   task enters the container by setns in `task_init` and Slurm then executes it, so the
//!   descriptor stays exactly as Slurm made it; there is nothing to pass here
//!   (tests/e2e/mpi.rs checks a task's descriptors are a bare task's).
//! - `--mpi=pmix`: the PMIx client library connects to the server's socket in the step's
//!   PMIx server directory, which the container must have at the same path. Slurm's pmix
//!   plugin makes it before `user_init` (`<SlurmdSpoolDir>/pmix.<job>.<step>/`, owned by the
//!   job's user, mode 0700) and exports it as `PMIX_SERVER_TMPDIR` into slurmstepd's own
//!   environment, where the job cannot set anything; the job's environment may carry any
//!   value of that name, so that one is never read. Even so the directory is checked before
//!   it is bound: a bind of the node's choosing must not become a way to a path the user
//!   could not otherwise reach.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::container::NodeBind;
use crate::error::Error;

/// The PMIx client's MCA settings that name the modules Slurm's PMIx server uses, each with
/// the variable the server's setup puts in the task's environment.
const PMIX_MCA_FROM: [(&[u8], &[u8]); 3] = [
    (b"PMIX_MCA_ptl", b"PMIX_PTL_MODULE"),
    (b"PMIX_MCA_psec", b"PMIX_SECURITY_MODE"),
    (b"PMIX_MCA_gds", b"PMIX_GDS_MODULE"),
];

/// The variables a task in a container gets so that the PMIx library in the image, built
/// apart from the node's, picks the transport, security and data-store modules Slurm's PMIx
/// server uses rather than its own defaults, which the server may lack: PMIX_MCA_ptl,
/// PMIX_MCA_psec and PMIX_MCA_gds from PMIX_PTL_MODULE, PMIX_SECURITY_MODE and
/// PMIX_GDS_MODULE, as enroot's Slurm hook (50-slurm-pmi.sh) sets them for pyxis. Only for a
/// PMIx step (SLURM_MPI_TYPE unset or pmix*), and each only where the job does not set it
/// already.
pub fn pmix_mca_env(job_env: &[Vec<u8>]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let get = |name: &[u8]| {
        job_env.iter().find_map(|kv| {
            kv.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(b"="))
        })
    };
    if get(b"SLURM_MPI_TYPE").is_some_and(|t| !t.starts_with(b"pmix")) {
        return Vec::new();
    }
    PMIX_MCA_FROM
        .iter()
        .filter(|(mca, _)| get(mca).is_none())
        .filter_map(|(mca, from)| {
            get(from)
                .filter(|v| !v.is_empty())
                .map(|v| (mca.to_vec(), v.to_vec()))
        })
        .collect()
}

/// The variable Slurm's pmix plugin sets in slurmstepd's environment (`PMIXP_PMIXLIB_TMPDIR`).
pub const SERVER_DIR_VAR: &str = "PMIX_SERVER_TMPDIR";

/// The step whose PMIx server directory is asked for.
#[derive(Debug, Clone, Copy)]
pub struct PmixStep {
    pub job: u32,
    pub step: u32,
    pub uid: libc::uid_t,
}

/// The bind of the step's PMIx server directory, or `None` when the step has no PMIx
/// (`value`, slurmstepd's own `PMIX_SERVER_TMPDIR`, is unset). `spool` is slurm.conf's
/// `SlurmdSpoolDir`. An error names the directory and why it is refused.
pub fn server_dir_bind(
    value: Option<&OsStr>,
    spool: Option<&[u8]>,
    step: PmixStep,
) -> Result<Option<NodeBind>, Error> {
    let Some(value) = value else {
        return Ok(None);
    };
    let refused = |reason: String| Error::PmixServerDir {
        path: value.to_string_lossy().into_owned(),
        reason,
    };
    let dir = checked_path(value.as_bytes(), spool, step).map_err(refused)?;
    check_owners(Path::new(OsStr::from_bytes(dir)), step.uid).map_err(refused)?;
    Ok(Some(NodeBind {
        path: String::from_utf8_lossy(dir).into_owned(),
        read_only: false,
    }))
}

/// The directory (without Slurm's trailing slash) when its path is the one Slurm makes for
/// this step: absolute, plain components, named `pmix.<job>.<step>`, in `SlurmdSpoolDir`.
fn checked_path<'a>(
    value: &'a [u8],
    spool: Option<&[u8]>,
    step: PmixStep,
) -> Result<&'a [u8], String> {
    let dir = value.strip_suffix(b"/").unwrap_or(value);
    if !dir.starts_with(b"/") {
        return Err("it is not an absolute path".into());
    }
    if dir[1..]
        .split(|&b| b == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return Err("it has empty, '.' or '..' components".into());
    }
    let at = dir.iter().rposition(|&b| b == b'/').unwrap_or(0);
    let (parent, name) = (&dir[..at.max(1)], &dir[at + 1..]);
    let expected = format!("pmix.{}.{}", step.job, step.step);
    if name != expected.as_bytes() {
        return Err(format!(
            "it is not named {expected}, as Slurm's pmix plugin names this step's"
        ));
    }
    if let Some(spool) = spool {
        let spool = spool.strip_suffix(b"/").unwrap_or(spool);
        if !spool_matches(spool, parent) {
            return Err(format!(
                "it is not in slurm.conf's SlurmdSpoolDir ({})",
                String::from_utf8_lossy(spool)
            ));
        }
    }
    Ok(dir)
}

/// Whether `path` is the spool directory `template` (slurm.conf's, where `%n`, the node's
/// name, and `%h`, its host name, each stand for one or more bytes other than '/').
fn spool_matches(template: &[u8], path: &[u8]) -> bool {
    match template {
        [] => path.is_empty(),
        [b'%', b'n' | b'h', rest @ ..] => (1..=path.len())
            .take_while(|&i| path[i - 1] != b'/')
            .any(|i| spool_matches(rest, &path[i..])),
        [first, rest @ ..] => path.first() == Some(first) && spool_matches(rest, &path[1..]),
    }
}

/// The directory is Slurm's and the job's: a real directory (not a link) owned by the job's
/// user, in a parent only root can change (so nobody else can have put it there).
fn check_owners(dir: &Path, uid: libc::uid_t) -> Result<(), String> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let meta = std::fs::metadata(parent)
        .map_err(|e| format!("its parent {} cannot be read: {e}", parent.display()))?;
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "its parent {} is owned by uid {} with mode {:04o}, so another user could have \
             made it; SlurmdSpoolDir must be root's and writable by root only (chmod 0755)",
            parent.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("it cannot be read: {e} (did Slurm's pmix plugin start?)"))?;
    if !meta.is_dir() {
        return Err("it is not a directory".into());
    }
    if meta.uid() != uid {
        return Err(format!(
            "it is owned by uid {}, not by the job's user (uid {uid})",
            meta.uid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        list.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn pmix_modules_become_the_client_s_mca_settings_unless_the_job_sets_them() {
        let server = [
            "PMIX_SECURITY_MODE=munge,native",
            "PMIX_GDS_MODULE=ds21,ds12,hash",
            "PMIX_PTL_MODULE=tcp,usock",
            "PMIX_RANK=3",
        ];
        let all = pairs(&[
            ("PMIX_MCA_ptl", "tcp,usock"),
            ("PMIX_MCA_psec", "munge,native"),
            ("PMIX_MCA_gds", "ds21,ds12,hash"),
        ]);
        assert_eq!(pmix_mca_env(&env(&server)), all);
        let mut pmix = server.to_vec();
        pmix.push("SLURM_MPI_TYPE=pmix_v4");
        assert_eq!(pmix_mca_env(&env(&pmix)), all);
        // The job's own choice stays.
        let mut own = server.to_vec();
        own.push("PMIX_MCA_gds=hash");
        assert_eq!(
            pmix_mca_env(&env(&own)),
            pairs(&[
                ("PMIX_MCA_ptl", "tcp,usock"),
                ("PMIX_MCA_psec", "munge,native")
            ])
        );
        // Not a PMIx step, or no PMIx server: nothing.
        let mut pmi2 = server.to_vec();
        pmi2.push("SLURM_MPI_TYPE=pmi2");
        assert!(pmix_mca_env(&env(&pmi2)).is_empty());
        assert!(pmix_mca_env(&env(&["SLURM_MPI_TYPE=pmix", "PMIX_SECURITY_MODEX=1"])).is_empty());
    }
    use std::os::unix::fs::PermissionsExt;

    const STEP: PmixStep = PmixStep {
        job: 42,
        step: 3,
        uid: 1100,
    };

    fn path(value: &str, spool: Option<&str>) -> Result<String, String> {
        checked_path(value.as_bytes(), spool.map(str::as_bytes), STEP)
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }

    #[test]
    fn slurms_own_path_is_taken_without_its_trailing_slash() {
        let spool = Some("/var/spool/slurmd");
        assert_eq!(
            path("/var/spool/slurmd/pmix.42.3/", spool).unwrap(),
            "/var/spool/slurmd/pmix.42.3"
        );
        assert_eq!(
            path("/var/spool/slurmd/pmix.42.3", Some("/var/spool/slurmd/")).unwrap(),
            "/var/spool/slurmd/pmix.42.3"
        );
        // No SlurmdSpoolDir known: the name and the owners still decide.
        assert_eq!(path("/x/pmix.42.3/", None).unwrap(), "/x/pmix.42.3");
    }

    #[test]
    fn paths_slurm_does_not_make_are_refused() {
        let spool = Some("/var/spool/slurmd");
        for (value, why) in [
            ("pmix.42.3", "absolute"),
            ("/var/spool/slurmd/../../etc/pmix.42.3", "'..'"),
            ("/var/spool/slurmd//pmix.42.3", "empty"),
            ("/var/spool/slurmd/./pmix.42.3", "'.'"),
            ("/var/spool/slurmd/pmix.41.3", "named pmix.42.3"),
            ("/var/spool/slurmd/pmix.42.3/sub", "named pmix.42.3"),
            ("/home/u/pmix.42.3", "SlurmdSpoolDir"),
            ("/var/spool/slurmd/x/pmix.42.3", "SlurmdSpoolDir"),
            ("/", "absolute"),
        ] {
            let err = path(value, spool).expect_err(value);
            assert!(err.contains(why), "{value}: {err}");
        }
    }

    #[test]
    fn node_and_host_names_in_the_spool_template_match_one_component() {
        let spool = Some("/var/spool/slurmd/%n");
        assert!(path("/var/spool/slurmd/n1/pmix.42.3/", spool).is_ok());
        assert!(path("/var/spool/slurmd/pmix.42.3/", spool).is_err());
        assert!(path("/var/spool/slurmd/a/b/pmix.42.3/", spool).is_err());
        assert!(path("/s/n1-h/pmix.42.3", Some("/s/%n-%h")).is_ok());
        assert!(path("/s/n1h/pmix.42.3", Some("/s/%n-%h")).is_err());
    }

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn the_directory_must_be_the_users_in_a_parent_only_root_changes() {
        let me = unsafe { libc::geteuid() };
        let tmp = scratch();
        let parent = tmp.path().join("spool");
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = parent.join("pmix.42.3");
        std::fs::create_dir(&dir).unwrap();
        let owners = check_owners(&dir, me);
        if me == 0 {
            assert_eq!(owners, Ok(()));
            let err = check_owners(&dir, 1100).unwrap_err();
            assert!(err.contains("not by the job's user (uid 1100)"), "{err}");
        } else {
            // Run as a user, the parent is not root's: refused for that.
            assert!(owners.unwrap_err().contains("owned by uid"));
        }
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_owners(&dir, me).unwrap_err();
        assert!(
            err.contains("mode 0777") && err.contains("chmod 0755"),
            "{err}"
        );
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A link in its place, or nothing at all.
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/etc", &dir).unwrap();
        if me == 0 {
            assert_eq!(check_owners(&dir, me), Err("it is not a directory".into()));
        }
        std::fs::remove_file(&dir).unwrap();
        if me == 0 {
            assert!(check_owners(&dir, me)
                .unwrap_err()
                .contains("cannot be read"));
        }
    }

    #[test]
    fn no_variable_means_no_pmix_and_a_bad_one_names_the_directory() {
        assert_eq!(server_dir_bind(None, None, STEP), Ok(None));
        let err = server_dir_bind(Some(OsStr::new("/etc")), None, STEP).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/etc") && text.contains("pmix.42.3"),
            "{text}"
        );
    }
}
