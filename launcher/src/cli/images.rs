//! `berth images` / `berth prune` (placeholder until the cache lands).
use super::Globals;
use crate::Result;
#[derive(Debug, clap::Args)]
pub struct ListArgs {}
#[derive(Debug, clap::Args)]
pub struct PruneArgs {}
pub fn run_list(_a: ListArgs, _g: &Globals) -> Result<i32> {
    todo!("berth images")
}
pub fn run_prune(_a: PruneArgs, _g: &Globals) -> Result<i32> {
    todo!("berth prune")
}
