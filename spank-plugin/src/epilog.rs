//! slurmd's job epilog (S_CTX_JOB_SCRIPT): a root process slurmd forks on each node of a
//! job once the job has ended there — normally, by failure, or by scancel — after its steps'
//! stage-out.
//!
//! It removes what the job left on the node, as the job's user, not as root: the job's
//! named containers (`named`) and what it staged for itself (`berth stage clean --job N`:
//! copies a cancelled step left half made, the job's copies where `[stage] after_job =
//! "remove"`, and its claims on kept copies, which other jobs may then evict). Those trees
//! are the users' own, and a link planted there must not make root remove anything; as the
//! user, berth can remove nothing the user could not. It never fails: a failing epilog
//! DRAINS THE NODE, and data left behind is only space, which the limits and the areas'
//! ageing account for.

use crate::config::Config;
use crate::error::Error;
use crate::launcher::{Identity, Launcher};
use crate::named;
use crate::prolog::{job_number, PrologEnv};
use crate::spank;

/// Removes the job's named containers and its own part of the stage area on this node;
/// never fails (a problem is logged).
pub fn job_epilog(args: &[String], env: PrologEnv) -> Result<(), Error> {
    let (config, _) = Config::from_plugin_args(args);
    let Some((job, user)) = job_user(env) else {
        spank::log_error("job epilog: no SLURM_JOB_ID/UID; its data is left for the limits");
        return Ok(());
    };
    let as_user = Launcher::new(&config.berth).run_as(user);
    named::remove_job(job, &as_user);
    let job = job.to_string();
    if let Err(e) = as_user.stage(&["clean", "--job", &job]) {
        spank::log_error(&format!("job {job}: removing its staged data: {e}"));
    }
    Ok(())
}

/// The job's id and its user, from the epilog's environment.
fn job_user(env: PrologEnv) -> Option<(u32, Identity)> {
    let number = |name| job_number(env, name);
    let uid = number("SLURM_JOB_UID")?;
    Some((
        number("SLURM_JOB_ID")?,
        Identity::User {
            uid,
            // Removing one's own files needs only the uid.
            gid: number("SLURM_JOB_GID").unwrap_or(uid),
            groups: Vec::new(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn the_job_and_its_user_come_from_slurmds_variables() {
        let vars = [
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_UID", "1100"),
            ("SLURM_JOB_GID", "1100"),
        ];
        let env = |name: &str| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        };
        let job_of_1100 = Some((
            42,
            Identity::User {
                uid: 1100,
                gid: 1100,
                groups: Vec::new(),
            },
        ));
        assert_eq!(job_user(&env), job_of_1100);
        // Without the user there is no one to run as: nothing is removed.
        let no_uid = |name: &str| env(name).filter(|_| name != "SLURM_JOB_UID");
        assert_eq!(job_user(&no_uid), None);
        // slurmd may leave out the gid: the uid is what removing one's own files needs.
        let no_gid = |name: &str| env(name).filter(|_| name != "SLURM_JOB_GID");
        assert_eq!(job_user(&no_gid), job_of_1100);
    }
}
