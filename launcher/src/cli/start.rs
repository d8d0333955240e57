//! `berth start` / `berth stop` (placeholder until the container runtime lands).
use super::Globals;
use crate::Result;
#[derive(Debug, clap::Args)]
pub struct StartArgs {}
#[derive(Debug, clap::Args)]
pub struct StopArgs {}
pub fn run_start(_a: StartArgs, _g: &Globals) -> Result<i32> {
    todo!("berth start")
}
pub fn run_stop(_a: StopArgs, _g: &Globals) -> Result<i32> {
    todo!("berth stop")
}
