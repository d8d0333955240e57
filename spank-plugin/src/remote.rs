//! slurmstepd on the compute node (S_CTX_REMOTE).
//!
//! Who runs which line here matters:
//! - `init` and the option callbacks run in slurmstepd as root, before privileges are dropped.
//!   A failure reported here DRAINS THE NODE for batch jobs, so nothing a job can cause may
//!   fail here: values are only recorded, and `guard` defers any failure to `task_init`.
//! - `task_init` runs in each task's process, as the user, after Slurm placed it in the job's
//!   cgroups. Failing here ends the task with exit code 1, shows the message to the user and
//!   leaves the node up: this is where every job-caused problem is reported.

use std::ffi::CString;
use std::sync::Mutex;

use crate::config::Config;
use crate::error::Error;
use crate::guard;
use crate::options::IMAGE_OPTION;
use crate::spank::{self, Spank};

/// The `--container-image` value slurmstepd received with the step (srun's launch message or
/// sbatch's environment), as given: it is judged in `task_init`, where a verdict is safe.
static IMAGE: Mutex<Option<Vec<u8>>> = Mutex::new(None);

/// Reads the plugstack.conf arguments and registers the options, without which slurmstepd
/// would drop the values srun and sbatch sent.
pub fn init(spank: Spank, args: &[String]) -> Result<(), Error> {
    let (config, problems) = Config::from_plugin_args(args);
    for problem in &problems {
        spank::log_error(&problem.to_string());
    }
    spank::log_debug(&format!("launcher {}", config.berth.display()));
    spank.register(&crate::OPTIONS)
}

/// Records the step's `--container-image` value; never fails (see the module comment).
pub fn container_image(value: &[u8]) -> Result<(), Error> {
    *IMAGE.lock().unwrap_or_else(|p| p.into_inner()) = Some(value.to_vec());
    Ok(())
}

/// Runs in each task before it executes the user's command: fails the task if the job asked
/// for a container, because this build cannot run one yet and must not run the job on the
/// host instead.
pub fn task_init(spank: Spank) -> Result<(), Error> {
    if let Some(earlier) = guard::take_deferred() {
        return Err(Error::EarlierFailure { earlier });
    }
    let option = IMAGE.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let slurm_container = spank.getenv(c"SLURM_CONTAINER")?;
    let exported = CString::new(format!("SLURM_SPANK_{}", option_env_name(IMAGE_OPTION)))
        .expect("option names have no NUL");
    let exported = spank.getenv(&exported)?;
    match requested_image(option, slurm_container, exported) {
        None => Ok(()),
        Some((image, origin)) => Err(Error::ContainersNotSupportedYet {
            image: String::from_utf8_lossy(&image).into_owned(),
            origin,
        }),
    }
}

/// The variable Slurm puts an option's value in for the batch step:
/// `_SLURM_SPANK_OPTION_<plugin>_<option>`, every non-alphanumeric byte turned into `_` (as
/// spank.c's `_opt_env_name` does). sbatch exports it once more with a `SLURM_SPANK_` prefix,
/// which is the copy that survives `sbatch --export=NONE` (a Slurm 22.05 bug drops the option
/// itself there).
fn option_env_name(option: &str) -> String {
    let canonical = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    };
    format!(
        "_SLURM_SPANK_OPTION_{}_{}",
        canonical(crate::PLUGIN_NAME),
        canonical(option)
    )
}

/// Which image, if any, the step asked for and where the request came from, in order of
/// precedence: berth's own option, then Slurm's native `--container` (SLURM_CONTAINER), then
/// the exported copy of the option. An empty value is no request.
fn requested_image(
    option: Option<Vec<u8>>,
    slurm_container: Option<Vec<u8>>,
    exported_option: Option<Vec<u8>>,
) -> Option<(Vec<u8>, &'static str)> {
    [
        (option, "--container-image"),
        (slurm_container, "--container, SLURM_CONTAINER"),
        (exported_option, "--container-image, exported by sbatch"),
    ]
    .into_iter()
    .find_map(|(value, source)| value.filter(|v| !v.is_empty()).map(|v| (v, source)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<Vec<u8>> {
        Some(s.as_bytes().to_vec())
    }

    #[test]
    fn no_request_runs_on_the_host() {
        assert_eq!(requested_image(None, None, None), None);
        assert_eq!(requested_image(v(""), v(""), v("")), None);
    }

    #[test]
    fn each_source_is_a_request() {
        assert_eq!(
            requested_image(v("a"), None, None),
            Some((b"a".to_vec(), "--container-image"))
        );
        assert_eq!(
            requested_image(None, v("b"), None),
            Some((b"b".to_vec(), "--container, SLURM_CONTAINER"))
        );
        assert_eq!(
            requested_image(None, None, v("c")),
            Some((b"c".to_vec(), "--container-image, exported by sbatch"))
        );
    }

    #[test]
    fn own_option_wins_over_slurm_container() {
        assert_eq!(
            requested_image(v("a"), v("b"), v("c")).map(|(i, _)| i),
            Some(b"a".to_vec())
        );
        assert_eq!(
            requested_image(v(""), v("b"), v("c")).map(|(i, _)| i),
            Some(b"b".to_vec())
        );
    }

    #[test]
    fn option_env_name_matches_slurm() {
        assert_eq!(
            option_env_name("container-image"),
            "_SLURM_SPANK_OPTION_berth_container_image"
        );
    }

    #[test]
    fn refusal_message_tells_the_user_what_to_do() {
        let msg = Error::ContainersNotSupportedYet {
            image: "busybox".into(),
            origin: "--container-image",
        }
        .to_string();
        assert!(msg.contains("'busybox'"), "{msg}");
        assert!(msg.contains(
            "this berth build does not run containers on compute nodes yet; remove \
             --container-image / --container to run on the host"
        ));
    }
}
