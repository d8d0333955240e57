//! (placeholder: filled in by the sif work)
