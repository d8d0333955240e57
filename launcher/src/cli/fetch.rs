//! `berth fetch [--quiet] IMAGE`: pull an approved image into the node cache and print the
//! path of its SIF; `berth resolve IMAGE`: print the digest-pinned reference. Only the result
//! goes to stdout; progress goes to stderr.

use super::Globals;
use crate::cache::{self, FetchOptions};
use crate::config::Config;
use crate::{jobpin, Error, Result};

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// A registry reference, `host[:port]/repo[:tag][@sha256:...]`.
    #[arg(value_name = "IMAGE")]
    pub image: String,
}

#[derive(Debug, clap::Args)]
pub struct ResolveArgs {
    /// A registry reference, `host[:port]/repo[:tag]`.
    #[arg(value_name = "IMAGE")]
    pub image: String,
}

pub fn run_fetch(args: FetchArgs, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    let path = cache::fetch_with(
        &config,
        &args.image,
        &FetchOptions {
            quiet: args.quiet,
            user: None,
        },
    )?;
    println!("{}", path.display());
    Ok(0)
}

/// Where the registry refuses the user and the controller pins tags instead
/// (`[registry] controller_pin`), exits [`jobpin::DEFERRED_EXIT`] with the reason on stderr:
/// the plugin then leaves the tag to the controller.
pub fn run_resolve(args: ResolveArgs, globals: &Globals) -> Result<i32> {
    let config = Config::load_for_caller(globals.config.as_deref())?;
    match cache::resolve(&config, &args.image) {
        Ok(pinned) => {
            println!("{pinned}");
            Ok(0)
        }
        Err(e @ Error::Unauthorized { .. })
            if config.registry.controller_pin && berth_sys::identity::effective_uid() != 0 =>
        {
            eprintln!("berth: {e}; the controller pins it when the job starts");
            Ok(jobpin::DEFERRED_EXIT)
        }
        Err(e) => Err(e),
    }
}
