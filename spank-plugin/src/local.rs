//! srun on the login node (S_CTX_LOCAL), running as the user who typed the command.
//!
//! Failing here is the right way to refuse a bad request: srun prints the message and exits
//! non-zero before anything reaches a compute node.

use crate::error::Error;
use crate::options;
use crate::spank::Spank;

/// Offers berth's options to srun's command line.
pub fn init(spank: Spank) -> Result<(), Error> {
    spank.register(&crate::OPTIONS)
}

/// `srun --container-image=VALUE`: refuse a malformed value at submission.
pub fn container_image(value: &[u8]) -> Result<(), Error> {
    options::validate_image(value).map(drop)
}
