//! `berth audit --job ID`: what the node decided for each step of a job, from the audit file
//! (`[audit] file`): one line per decision, `STEP TIME VERDICT IMAGE DIGEST-or-REASON`, or
//! the records themselves with `--json`. Run it on the node the job ran on (as root, or a
//! member of the file's group).

use super::Globals;
use crate::audit::records_of_job;
use crate::config::Config;
use crate::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Slurm job id.
    #[arg(long, value_name = "ID")]
    pub job: String,
    /// Print the audit records (JSON lines) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    let records = records_of_job(&config.audit.file, &args.job)?;
    if records.is_empty() {
        eprintln!(
            "berth: no decision for job {} in {} (on this node); it may have run on another \
             node, or without a container",
            args.job,
            config.audit.file.display()
        );
        return Ok(1);
    }
    if !args.json {
        println!(
            "{:<6}  {:<20}  {:<7}  {:<40}  DIGEST / REASON",
            "STEP", "TIME", "VERDICT", "IMAGE"
        );
    }
    for r in &records {
        if args.json {
            println!("{}", serde_json::to_string(r).expect("a record serializes"));
            continue;
        }
        let detail = r.digest.as_deref().or(r.reason.as_deref()).unwrap_or("-");
        println!(
            "{:<6}  {:<20}  {:<7}  {:<40}  {detail}",
            r.step.as_deref().unwrap_or("-"),
            r.time,
            r.verdict,
            r.image
        );
    }
    Ok(0)
}
