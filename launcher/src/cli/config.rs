//! `berth config check [FILE]`: validate a site configuration (by default the installed
//! /etc/berth/berth.toml) before it reaches the nodes. Errors name FILE:LINE:COLUMN and, for
//! an unknown key, the keys allowed there. Exit status: 0 valid, 1 invalid.
//! Anyone may check any file they can read: checking grants nothing, unlike `--config`.

use std::path::PathBuf;

use super::Globals;
use crate::config::{Config, DEFAULT_PATH};
use crate::Result;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Validate a berth.toml: print `FILE: valid` and exit 0, or FILE:LINE:COLUMN and the
    /// problem and exit 1.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The file to check (default: /etc/berth/berth.toml).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
}

pub fn run(command: Command, _globals: &Globals) -> Result<i32> {
    let Command::Check(args) = command;
    let path = args.file.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    match Config::from_file(&path) {
        Ok(config) => {
            println!("{}: valid", path.display());
            if config.policy.allowed.is_empty() && !config.policy.local_images {
                println!(
                    "note: [policy] allowed is empty and local_images is false, so no image \
                     may run; name your registries in `allowed`"
                );
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("berth: {e}");
            Ok(1)
        }
    }
}
