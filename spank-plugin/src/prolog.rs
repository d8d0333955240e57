//! slurmd's job prolog (S_CTX_JOB_SCRIPT): a root process slurmd forks for each new job on
//! each node, outside the job's cgroups, before the job's first step runs there.
//!
//! For a job submitted with a container image, the image's fetch (pull and conversion into
//! the node cache) starts here, in parallel on every node of the allocation, and is left
//! running on its own: the prolog returns at once, so slurmd is never held up and nothing a
//! registry does can fail the prolog, which would DRAIN THE NODE. The step's own fetch in
//! `user_init` then waits for this one on the cache's image lock and finds the image cached;
//! if the prefetch failed, the step's fetch fails the same way and `task_init` reports the
//! cause to the user, so there is no separate failure record to keep. (Either fetch builds
//! outside the job's memory cgroup: see the launcher's `[cache] build_cgroup`.)
//!
//! What the prolog can see (Slurm 22.05 and later): the job's SPANK environment, each
//! variable prefixed with `SPANK_` — the request the login node checked and pinned
//! (`SPANK_BERTH_REQUEST`, from `spank_job_control_setenv` in `submit`), and the raw option
//! values (`SPANK__SLURM_SPANK_OPTION_berth_*`) when the submission ran without the plugin —
//! and SLURM_JOB_ID / SLURM_JOB_UID. Both sbatch and srun/salloc allocations carry them.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use crate::config::Config;
use crate::error::Error;
use crate::launcher::{Identity, Launcher, StepIds};
use crate::options::{ContainerRequest, Opt};
use crate::spank;
use crate::submit::JOB_CONTROL_NAME;

/// The audit trail's step name for the prolog's fetch.
const PROLOG_STEP: &str = "prolog";

/// Looks up a variable of the prolog's environment.
pub type PrologEnv<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// Starts the job's image fetch when the job asked for an image; never fails (a problem is
/// logged, and the step's own fetch will meet and report it).
pub fn job_prolog(args: &[String], env: PrologEnv) -> Result<(), Error> {
    let (config, _) = Config::from_plugin_args(args);
    let Some((image, step)) = prefetch_request(env)? else {
        return Ok(());
    };
    let root = Launcher::new(&config.berth).run_as(Identity::Root);
    match root.prefetch(&image, &step) {
        Ok(pid) => spank::log_info(&format!(
            "job {}: fetching {image} at job start (pid {pid})",
            step.job
        )),
        Err(e) => spank::log_error(&format!(
            "job {}: could not start the fetch of {image} at job start: {e}; the first step \
             fetches it instead",
            step.job
        )),
    }
    Ok(())
}

/// The image the job was submitted with, and the job's ids, from the prolog's environment;
/// None for a job without a container image (or asking for the host). A request that does
/// not parse is left to the step, which judges it again and reports it.
fn prefetch_request(env: PrologEnv) -> Result<Option<(String, StepIds)>, Error> {
    let text = |name: &str| env(name).map(|v| v.as_bytes().to_vec());
    let request = match text(&format!("SPANK_{JOB_CONTROL_NAME}")) {
        Some(transport) => ContainerRequest::from_transport(&transport).ok(),
        None => text(&format!("SPANK_{}", Opt::Image.slurm_env_name())).and_then(|value| {
            let mut transport = format!("{}=", Opt::Image.name()).into_bytes();
            transport.extend(value);
            ContainerRequest::from_transport(&transport).ok()
        }),
    };
    let Some(ContainerRequest::Container { image, .. }) = request else {
        return Ok(None);
    };
    // A local image file needs no fetch, and root must not look up a path the user wrote
    // (the step's check does that with the user's own rights).
    if image.starts_with('/') {
        return Ok(None);
    }
    let number = |name| job_number(env, name);
    let (Some(job), Some(uid)) = (number("SLURM_JOB_ID"), number("SLURM_JOB_UID")) else {
        return Ok(None);
    };
    Ok(Some((
        image,
        StepIds {
            job,
            step: PROLOG_STEP.to_owned(),
            uid,
        },
    )))
}

/// A number slurmd puts in the job prolog's and epilog's environment (SLURM_JOB_ID,
/// SLURM_JOB_UID, SLURM_JOB_GID).
pub fn job_number(env: PrologEnv, name: &str) -> Option<u32> {
    env(name)?.to_str()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_checked_request_names_the_image() {
        let env = env_of(&[
            (
                "SPANK_BERTH_REQUEST",
                "container-image=h/r@sha256:00\ncontainer-readonly",
            ),
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_UID", "1100"),
        ]);
        let (image, step) = prefetch_request(&env).unwrap().unwrap();
        assert_eq!(image, "h/r@sha256:00");
        assert_eq!(
            step,
            StepIds {
                job: 42,
                step: "prolog".into(),
                uid: 1100
            }
        );
    }

    #[test]
    fn the_raw_option_stands_in_without_the_plugin_at_submission() {
        let env = env_of(&[
            ("SPANK__SLURM_SPANK_OPTION_berth_container_image", "h/r:1"),
            ("SLURM_JOB_ID", "7"),
            ("SLURM_JOB_UID", "1100"),
        ]);
        assert_eq!(prefetch_request(&env).unwrap().unwrap().0, "h/r:1");
    }

    #[test]
    fn nothing_to_fetch_for_the_host_no_image_or_a_bad_request() {
        for vars in [
            vec![("SPANK_BERTH_REQUEST", "container-image=none")],
            vec![],
            vec![("SPANK_BERTH_REQUEST", "bogus=1")],
            vec![("SPANK_BERTH_REQUEST", "container-image=a b")],
            // A local file: nothing to fetch, and no user path for root to look up.
            vec![("SPANK_BERTH_REQUEST", "container-image=/home/u/link/a.sif")],
        ] {
            let mut vars = vars;
            vars.extend([("SLURM_JOB_ID", "1"), ("SLURM_JOB_UID", "1")]);
            assert_eq!(prefetch_request(&env_of(&vars)).unwrap(), None, "{vars:?}");
        }
        // Without the job's ids there is nothing to record the decision under.
        let env = env_of(&[("SPANK_BERTH_REQUEST", "container-image=a")]);
        assert_eq!(prefetch_request(&env).unwrap(), None);
    }
}
