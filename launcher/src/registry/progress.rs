//! Progress lines for long steps, on stderr only (stdout carries just the result):
//! `berth: pulling REF 120/300 MB 80 MB/s`, at most one a second plus a final line.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_secs(1);
const MB: f64 = 1_000_000.0;

/// Shared by parallel downloads: `add` takes `&self`.
pub struct Progress {
    label: String,
    total: u64,
    quiet: bool,
    start: Instant,
    /// Bytes done and when the last line was printed.
    state: Mutex<(u64, Instant)>,
}

impl Progress {
    pub fn new(label: String, total: u64, quiet: bool) -> Progress {
        let now = Instant::now();
        Progress {
            label,
            total,
            quiet,
            start: now,
            state: Mutex::new((0, now)),
        }
    }

    pub fn add(&self, bytes: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 += bytes;
        if state.1.elapsed() >= INTERVAL {
            state.1 = Instant::now();
            self.print(state.0);
        }
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Prints the final line.
    pub fn finish(&self) {
        self.print(self.done());
    }

    fn print(&self, done: u64) {
        if self.quiet {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "berth: {} {:.1}/{:.1} MB {:.1} MB/s\n",
            self.label,
            done as f64 / MB,
            self.total as f64 / MB,
            done as f64 / MB / secs
        );
        // Progress is best effort: a closed stderr must not fail the fetch.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// A one-off status line on stderr (e.g. "waiting for ..."), unless quiet.
pub fn note(quiet: bool, message: &str) {
    if !quiet {
        let _ = writeln!(std::io::stderr(), "berth: {message}");
    }
}
