//! Which Slurm node this is ([`node_name`]), and what berth asks of Slurm's own commands
//! about a job: one field of the job as slurmctld
//! records it (`squeue`), and the job's AdminComment set (`scontrol update`, which slurmctld
//! accepts from root, SlurmUser and Slurm administrators only).
//!
//! The commands come from the system's directories, never a PATH the caller set, and run
//! with an empty environment, so nothing of the caller's (SLURM_CONF, SQUEUE_FORMAT) steers
//! them. Each query names exactly one field, so no text a user chose (a job name, a comment)
//! can pass for another field, as it could in `scontrol show job`'s `KEY=VALUE` line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The directories Slurm's commands are looked for in, after the calling Slurm's own.
const DIRS: [&str; 3] = ["/usr/bin", "/usr/local/bin", "/bin"];

/// The path of Slurm's command `name`: that of the Slurm that started this call first. The
/// caller is slurmstepd or slurmctld (`PREFIX/sbin`, root) or srun/sbatch (`PREFIX/bin`), and
/// a Slurm installed from source under /opt has its commands in `PREFIX/bin`, where another
/// release's in /usr/bin would not be understood by its slurmctld (seen on 24.11: every
/// partition lookup failed). `/proc/<parent>/exe` is a path the kernel gives, not one the
/// caller chose.
fn program(name: &str) -> Result<String, String> {
    let caller = std::fs::read_link(format!("/proc/{}/exe", std::os::unix::process::parent_id()));
    candidates(name, caller.ok().as_deref())
        .into_iter()
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or_else(|| format!("{name} is not installed in {}", DIRS.join(", ")))
}

/// The install prefix of the program that started this process (`/usr` for Debian's Slurm,
/// `/opt/slurm-24.11` for one built from source, when that is slurmstepd or slurmctld), as
/// the kernel names its executable.
pub fn caller_prefix() -> Option<PathBuf> {
    let exe = std::fs::read_link(format!("/proc/{}/exe", std::os::unix::process::parent_id()));
    prefix_of(&exe.ok()?).map(Path::to_path_buf)
}

/// `PREFIX` of `PREFIX/bin/PROGRAM` or `PREFIX/sbin/PROGRAM`.
fn prefix_of(exe: &Path) -> Option<&Path> {
    exe.parent()?.parent()
}

/// Where `name` is looked for, in order, for a caller running `caller_exe`.
fn candidates(name: &str, caller_exe: Option<&Path>) -> Vec<PathBuf> {
    let own = caller_exe
        .and_then(prefix_of)
        .map(|prefix| prefix.join("bin").join(name));
    own.into_iter()
        .chain(DIRS.iter().map(|dir| Path::new(dir).join(name)))
        .collect()
}

fn run(name: &str, args: &[String]) -> Result<std::process::Output, String> {
    let path = program(name)?;
    Command::new(&path)
        .args(args)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {path}: {e}"))
}

/// `command args` answered `status` with `out`: for messages.
fn refused(name: &str, args: &[String], out: &std::process::Output) -> String {
    format!(
        "{name} {} answered {} with {:?}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        match String::from_utf8_lossy(&out.stderr).trim() {
            "" => String::new(),
            err => format!(" ({err})"),
        }
    )
}

/// One field of `job` as `squeue --noheader --states=all ARG --jobs=JOB` prints it, `arg`
/// being one `--format=%X` or `--Format=FIELD:0` (width 0: the whole value). The answer must
/// be one line; an unset string field reads as empty (squeue prints `(null)`).
pub fn job_field(job: u32, arg: &str) -> Result<String, String> {
    let args = vec![
        "--noheader".to_string(),
        "--states=all".to_string(),
        arg.to_string(),
        format!("--jobs={job}"),
    ];
    let out = run("squeue", &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [value] if out.status.success() => Ok(match *value {
            "(null)" => String::new(),
            value => value.trim_start().to_string(),
        }),
        _ => Err(refused("squeue", &args, &out)),
    }
}

/// Sets `job`'s AdminComment (`scontrol update JobId=JOB AdminComment=TEXT`).
pub fn set_admin_comment(job: u32, text: &str) -> Result<(), String> {
    let args = vec![
        "update".to_string(),
        format!("JobId={job}"),
        format!("AdminComment={text}"),
    ];
    let out = run("scontrol", &args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(refused("scontrol", &args, &out))
    }
}

/// This node's Slurm name (`NodeName`): `SLURMD_NODENAME` where Slurm set it (slurmd and
/// slurmstepd set it for themselves, their prologs and the tasks, and the plugin hands it to
/// the berth it runs), else the short host name. The two differ where NodeName is an alias
/// of the host (`NodeHostname=`) and where several slurmd share a host (multiple-slurmd), so
/// gres.conf's `NodeName=` lines and the audit trail need Slurm's name, not the host's.
/// The variable only picks which of the site's gres.conf lines apply and how records name
/// the node; a user who sets it fools nobody but their own `berth exec`.
pub fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    node_name_from(std::env::var("SLURMD_NODENAME").ok(), &host)
}

fn node_name_from(slurmd_nodename: Option<String>, hostname: &str) -> String {
    // Slurm's node names are host-name-like; anything else did not come from Slurm.
    let from_slurm = slurmd_nodename.filter(|n| {
        !n.is_empty()
            && n.len() <= 255
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    });
    from_slurm.unwrap_or_else(|| {
        hostname
            .trim()
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_slurms_name_for_it_else_the_short_host_name() {
        assert_eq!(node_name_from(Some("n2".into()), "vm.example.org\n"), "n2");
        assert_eq!(node_name_from(None, "vm.example.org\n"), "vm");
        for odd in ["", "a b", "n1\nn2", "../x/y"] {
            assert_eq!(node_name_from(Some(odd.into()), "vm\n"), "vm", "{odd:?}");
        }
    }

    #[test]
    fn the_calling_slurms_commands_come_first() {
        let from = |exe: &str| candidates("squeue", Some(Path::new(exe)));
        assert_eq!(
            from("/opt/slurm-24.11/sbin/slurmstepd")[0],
            PathBuf::from("/opt/slurm-24.11/bin/squeue")
        );
        assert_eq!(from("/usr/bin/srun")[0], PathBuf::from("/usr/bin/squeue"));
        let fixed: Vec<PathBuf> = DIRS.iter().map(|d| Path::new(d).join("squeue")).collect();
        assert_eq!(candidates("squeue", None), fixed);
        assert_eq!(from("/opt/slurm-24.11/sbin/slurmctld")[1..], fixed[..]);
    }
}
