//! (placeholder: filled in by the reference work)
