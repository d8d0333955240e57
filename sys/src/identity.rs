//! Who the current process is.

/// The real uid of this process (who started berth, whatever its effective ids).
pub fn real_uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}
