//! `berth exec` (placeholder until the container runtime lands).
use super::Globals;
use crate::Result;
#[derive(Debug, clap::Args)]
pub struct Args {}
pub fn run(_a: Args, _g: &Globals) -> Result<i32> {
    todo!("berth exec")
}
