//! slurmd itself (S_CTX_SLURMD), as root, once when the daemon starts.
//!
//! Nothing may fail here (a failing plugin stops slurmd); the one job is to report a broken
//! plugstack.conf line early, in the slurmd log, rather than only per job step.

use crate::config::Config;
use crate::error::Error;
use crate::spank;

pub fn init(args: &[String]) -> Result<(), Error> {
    let (config, problems) = Config::from_plugin_args(args);
    for problem in &problems {
        spank::log_error(&problem.to_string());
    }
    spank::log_debug(&format!(
        "spank_berth.so loaded in slurmd, launcher {}",
        config.berth.display()
    ));
    Ok(())
}
