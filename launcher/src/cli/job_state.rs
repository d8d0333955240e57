//! `berth job-state JOBID` (hidden; the plugin on a node, as root): the state slurmctld
//! records for a job, one word as `squeue --format=%T` prints it (RUNNING, COMPLETING,
//! CANCELLED, ...). The plugin asks while it prepares a step's container, so that a job
//! cancelled or out of time meanwhile stops the fetch at once (see the plugin's `job_end`).
//! Exit 0 with the state, 2 where Slurm could not tell.

use super::Globals;
use crate::slurm;
use crate::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(value_name = "JOBID")]
    pub job: u32,
}

pub fn run(args: Args, _globals: &Globals) -> Result<i32> {
    match slurm::job_field(args.job, "--format=%T") {
        Ok(state) if is_state(&state) => {
            println!("{state}");
            Ok(0)
        }
        Ok(state) => {
            eprintln!(
                "berth: squeue named the state of job {} {state:?}",
                args.job
            );
            Ok(2)
        }
        Err(why) => {
            eprintln!("berth: job {}: {why}", args.job);
            Ok(2)
        }
    }
}

/// One of Slurm's state words: capitals and underscores.
fn is_state(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_state_word_is_a_state() {
        for state in ["RUNNING", "COMPLETING", "OUT_OF_MEMORY"] {
            assert!(is_state(state), "{state}");
        }
        for text in ["", "running", "RUNNING X", "RUNNING\n", "(null)"] {
            assert!(!is_state(text), "{text:?}");
        }
    }
}
