//! `berth fetch` / `berth resolve` (placeholder until the registry client lands).
use super::Globals;
use crate::Result;
#[derive(Debug, clap::Args)]
pub struct FetchArgs {}
#[derive(Debug, clap::Args)]
pub struct ResolveArgs {}
pub fn run_fetch(_a: FetchArgs, _g: &Globals) -> Result<i32> {
    todo!("berth fetch")
}
pub fn run_resolve(_a: ResolveArgs, _g: &Globals) -> Result<i32> {
    todo!("berth resolve")
}
