//! `berth policy ...` (placeholder until the policy module lands).
use super::Globals;
use crate::Result;
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Check,
}
pub fn run(_c: Command, _g: &Globals) -> Result<i32> {
    todo!("berth policy")
}
