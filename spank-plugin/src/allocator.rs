//! sbatch and salloc on the login node (S_CTX_ALLOCATOR), running as the user.
//!
//! As in srun, failing here refuses the job before it is queued, with the message on the
//! user's terminal. The option value travels to the nodes in the job's environment
//! (`SLURM_SPANK__SLURM_SPANK_OPTION_berth_container_image`), where `remote` reads it.

use crate::error::Error;
use crate::options;
use crate::spank::Spank;

/// Offers berth's options to sbatch's/salloc's command line (and `#SBATCH` lines).
pub fn init(spank: Spank) -> Result<(), Error> {
    spank.register(&crate::OPTIONS)
}

/// `sbatch --container-image=VALUE`: refuse a malformed value before the job is queued.
pub fn container_image(value: &[u8]) -> Result<(), Error> {
    options::validate_image(value).map(drop)
}
