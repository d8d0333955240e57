//! `berth pin-job`: run as slurmctld's PrologSlurmctld (no arguments; the job from its
//! environment), it pins the tag the job's submission could not resolve and records the
//! digest in the job's AdminComment (see `jobpin`). It always exits 0: a failing
//! PrologSlurmctld would requeue a batch job (again and again) or cancel an interactive
//! one, while a job without a pin is refused on its nodes with the cause.
//! `berth pin-job --show JOBID IMAGE`: print the digest-pinned reference recorded for IMAGE
//! in the job (the plugin on a node, as root); exit 1 when there is none.

use super::Globals;
use crate::config::Config;
use crate::jobpin;
use crate::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the pin recorded for IMAGE in this job instead of recording one.
    #[arg(long, value_name = "JOBID", requires = "image")]
    pub show: Option<u32>,
    /// The image as the job's request names it (with --show).
    #[arg(value_name = "IMAGE")]
    pub image: Option<String>,
}

pub fn run(args: Args, globals: &Globals) -> Result<i32> {
    if let (Some(job), Some(image)) = (args.show, &args.image) {
        return Ok(match jobpin::lookup(job, image)? {
            Some(pinned) => {
                println!("{pinned}");
                0
            }
            None => {
                eprintln!("berth: job {job} has no digest pin for {image}");
                1
            }
        });
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (Some(job), Some(image)) = (env("SLURM_JOB_ID"), env(jobpin::PROLOG_VAR)) else {
        // A job that needs no pin: most jobs, at no more cost than this.
        return Ok(0);
    };
    let outcome = job
        .parse::<u32>()
        .map_err(|_| format!("SLURM_JOB_ID {job:?} is not a job id"))
        .and_then(|id| {
            let config =
                Config::load_for_caller(globals.config.as_deref()).map_err(|e| e.to_string())?;
            jobpin::record(&config, id, &image).map_err(|e| e.to_string())
        });
    // slurmctld logs what its PrologSlurmctld prints (at debug level).
    match outcome {
        Ok(Some(pinned)) => eprintln!("berth: job {job}: {image} pinned to {pinned}"),
        Ok(None) => eprintln!("berth: job {job}: {image} not pinned: the site policy refuses it"),
        Err(e) => eprintln!(
            "berth: job {job}: {image} not pinned: {e}; its steps will be refused with the cause"
        ),
    }
    Ok(0)
}
