//! Issue 13: pyxis 0.24's own bats suite against the cluster, through
//! `tests/pyxis-compat/run` (see docs/PYXIS-COMPAT.md). `tests/run` runs that script itself
//! (and CI with it), so this target is ignored by default; it exists to run the suite right
//! after `/work/e2e-run`'s install, under the same hold of the cluster lock:
//!   e2e-run WORKTREE --test pyxis_compat -- --ignored
//! with the runner's arguments (files, FILE.bats:NAME tests, --all) in PYXIS_COMPAT_ARGS,
//! separated by `;` (test names contain spaces).

use std::path::Path;
use std::process::Command;

use berth_e2e::Cluster;

#[test]
#[ignore = "tests/run runs tests/pyxis-compat/run itself; this runs it under the e2e lock"]
fn pyxis_suite_passes() {
    let _cluster = Cluster::get();
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("pyxis-compat/run");
    let args = std::env::var("PYXIS_COMPAT_ARGS").unwrap_or_default();
    // The runner's own output (one line per test) goes straight to the terminal.
    let status = Command::new(&runner)
        .args(args.split(';').filter(|a| !a.is_empty()))
        .status()
        .expect("tests/pyxis-compat/run starts");
    assert!(status.success(), "pyxis tests failed (lines above)");
}
