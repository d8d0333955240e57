//! berth's launcher library: image references, site policy, the registry client, OCI to SIF
//! conversion, the node image cache and container assembly. The `berth` binary
//! (`main.rs`, `cli/`) is a thin command-line layer over it, so everything here is usable and
//! testable without Slurm.

#![forbid(unsafe_code)]

pub mod audit;
pub mod cache;
pub mod cli;
pub mod config;
pub mod container;
pub mod doctor;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod gpu;
pub mod image_config;
pub mod jobpin;
pub mod metrics;
mod pieces;
pub mod policy;
pub mod reference;
pub mod registry;
pub mod sif;
pub mod site;
pub mod slurm;
pub mod squash;
pub mod stage;
pub mod unpack;

pub use error::{Error, Result};
