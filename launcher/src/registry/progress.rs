//! Progress lines for long steps, on stderr only (stdout carries just the result):
//! `berth: pulling REF 120/300 MB 80 MB/s`, at most one a second plus a final line.

use std::io::Write;
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_secs(1);
const MB: f64 = 1_000_000.0;

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    quiet: bool,
    start: Instant,
    last: Instant,
}

impl Progress {
    pub fn new(label: String, total: u64, quiet: bool) -> Progress {
        let now = Instant::now();
        Progress {
            label,
            total,
            done: 0,
            quiet,
            start: now,
            last: now,
        }
    }

    pub fn add(&mut self, bytes: u64) {
        self.done += bytes;
        if self.last.elapsed() >= INTERVAL {
            self.last = Instant::now();
            self.print();
        }
    }

    /// Prints the final line.
    pub fn finish(&mut self) {
        self.print();
    }

    fn print(&self) {
        if self.quiet {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "berth: {} {:.1}/{:.1} MB {:.1} MB/s\n",
            self.label,
            self.done as f64 / MB,
            self.total as f64 / MB,
            self.done as f64 / MB / secs
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
