//! `berth sif ...` (placeholder until the SIF module lands).
use super::Globals;
use crate::Result;
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Inspect,
}
pub fn run(_c: Command, _g: &Globals) -> Result<i32> {
    todo!("berth sif")
}
