//! `berth doctor`: one line per check (`ok`, `warn` or `FAIL`), each failure followed by its
//! fix. Exit status: 0 when nothing failed, 1 otherwise. Run it as root on each node.

use super::Globals;
use crate::config::Config;
use crate::doctor::{run_all, Status};
use crate::Result;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    let mut failed = 0;
    for check in run_all(&config) {
        match check.status {
            Status::Ok(detail) => println!("ok    {}: {detail}", check.name),
            Status::Warn(detail) => println!("warn  {}: {detail}", check.name),
            Status::Fail { problem, fix } => {
                failed += 1;
                println!("FAIL  {}: {problem}\n      fix: {fix}", check.name);
            }
        }
    }
    if failed > 0 {
        eprintln!("berth: {failed} check(s) failed; apply the fixes above");
        return Ok(1);
    }
    Ok(0)
}
