//! The `berth` command line. One file per subcommand; each exposes `Args` and
//! `run(args, &Globals) -> Result<i32>` returning the process exit code.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::Result;

mod audit;
mod config;
mod doctor;
mod exec;
mod fetch;
mod generate;
mod images;
mod job_state;
mod named;
mod pin;
mod policy;
mod save;
mod sif;
mod stage;
mod start;

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Unprivileged containers from approved registries, for Slurm clusters"
)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand understands.
#[derive(Debug, clap::Args)]
pub struct Globals {
    /// Use this configuration file instead of /etc/berth/berth.toml (root only).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command inside an image as an unprivileged container.
    Exec(exec::Args),
    /// Start a container for a job step and print a handle other processes can join.
    Start(start::StartArgs),
    /// Stop a container started with `berth start`.
    Stop(start::StopArgs),
    /// Read and write SIF image files.
    #[command(subcommand)]
    Sif(sif::Command),
    /// Check images against the site policy.
    #[command(subcommand)]
    Policy(policy::Command),
    /// Pull an approved image into the node cache and print its SIF path.
    Fetch(fetch::FetchArgs),
    /// Print the digest-pinned form of an image reference.
    Resolve(fetch::ResolveArgs),
    /// Pin a job's image tag on the controller (run as PrologSlurmctld), or show the pin.
    PinJob(pin::Args),
    /// List the images in the node cache.
    Images(images::ListArgs),
    /// Evict images from the node cache.
    Prune(images::PruneArgs),
    /// Save a stopped container's file system (its image and changes) as a SIF file.
    Save(save::Args),
    /// Manage the named containers (`--container-name`) of your jobs on this node.
    #[command(subcommand)]
    Named(named::Command),
    /// Copy data to node-local storage and results back.
    #[command(subcommand)]
    Stage(stage::Command),
    /// Show which image and digest each step of a job ran on this node (the audit file).
    Audit(audit::Args),
    /// Check what berth needs on this node and say how to fix each failure.
    Doctor(doctor::Args),
    /// Validate the site configuration.
    #[command(subcommand)]
    Config(config::Command),
    /// Print the state Slurm records for a job (used by the plugin on the node).
    #[command(hide = true)]
    JobState(job_state::Args),
    /// Write the man page or shell completions (used when packaging).
    #[command(subcommand, hide = true)]
    Generate(generate::Command),
}

impl Cli {
    pub fn run(self) -> Result<i32> {
        let g = &self.globals;
        match self.command {
            Command::Exec(a) => exec::run(a, g),
            Command::Start(a) => start::run_start(a, g),
            Command::Stop(a) => start::run_stop(a, g),
            Command::Sif(c) => sif::run(c, g),
            Command::Policy(c) => policy::run(c, g),
            Command::Fetch(a) => fetch::run_fetch(a, g),
            Command::Resolve(a) => fetch::run_resolve(a, g),
            Command::PinJob(a) => pin::run(a, g),
            Command::Images(a) => images::run_list(a, g),
            Command::Prune(a) => images::run_prune(a, g),
            Command::Named(c) => named::run(c, g),
            Command::Save(a) => save::run(a, g),
            Command::Stage(c) => stage::run(c, g),
            Command::Audit(a) => audit::run(a, g),
            Command::Config(c) => config::run(c, g),
            Command::Doctor(a) => doctor::run(a, g),
            Command::JobState(a) => job_state::run(a, g),
            Command::Generate(c) => generate::run(c, g),
        }
    }
}
