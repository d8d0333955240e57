//! `berth named remove --job JOB`: removes the calling user's named containers of a job
//! (`berth start --named JOB/NAME`) from this node; the SPANK plugin's job epilog runs it as
//! the job's user when the job ends.

use super::Globals;
use crate::config::Config;
use crate::container::writable;
use crate::Result;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Remove the named containers of a job (their changes) from this node.
    Remove(RemoveArgs),
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// The job whose containers go.
    #[arg(long)]
    pub job: u32,
}

pub fn run(c: Command, g: &Globals) -> Result<i32> {
    match c {
        Command::Remove(a) => {
            let config = Config::load_for_caller(g.config.as_deref())?;
            writable::remove_job(&config.runtime, a.job)?;
            Ok(0)
        }
    }
}
