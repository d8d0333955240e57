//! (placeholder: filled in by the policy work)
