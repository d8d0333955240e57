//! The stable driver of the fuzz targets, shared by the crates that have targets (each
//! includes this file into its `tests/fuzz.rs` with `#[path]`): every target runs over its
//! seed corpus (`fuzz/corpus/NAME`, where cargo-fuzz keeps it too, crash reproducers
//! included) and then over inputs mutated from it until its time is up. Not
//! coverage-guided like libFuzzer (`cargo fuzz run NAME`, nightly), but it replays every
//! known crash and shakes each parser with many thousands of malformed inputs on every test
//! run, on stable.
//!
//! `BERTH_FUZZ_SECS` sets the time per target (default 4); `BERTH_FUZZ_SEED` the mutation
//! seed (default fixed, so a failure in CI reproduces). A failing input is saved under
//! `target/fuzz-failures/` and named in the failure, ready to be added to the corpus.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A target: its name (the cargo-fuzz binary and corpus directory) and body, which must
/// return for every input without panicking.
pub type Target = (&'static str, fn(&[u8]));

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that break parsers more often than random ones: limits, separators, quotes.
const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\0\0\0\x80",
    b"/",
    b"../",
    b":",
    b"@",
    b"\"",
    b"\\",
    b",",
    b"=",
    b"\n",
    b"[",
    b"{",
    b"sha256:",
    b".wh.",
];

/// One mutation of `input`, sometimes spliced with `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next() as u8;
            }
            2 => {
                let at = rng.below(len + 1);
                let bytes = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(at..at, bytes.iter().copied());
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(16)).min(len);
                out.drain(at..end);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(64)).min(len);
                let copy = out[at..end].to_vec();
                let to = rng.below(len + 1);
                out.splice(to..to, copy);
            }
            5 => out.truncate(rng.below(len + 1)),
            6 if !other.is_empty() => {
                let at = rng.below(len + 1);
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(256)).min(other.len());
                out.truncate(at);
                out.extend_from_slice(&other[from..end]);
            }
            _ => {
                // A little-endian number at an aligned offset: SIF and tar fields.
                if len >= 8 {
                    let at = rng.below(len / 8) * 8;
                    let v = match rng.below(4) {
                        0 => 0,
                        1 => u64::MAX,
                        2 => 1 << rng.below(64),
                        _ => rng.next(),
                    };
                    out[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    out
}

/// `fuzz/`, from the test crate's manifest directory (each crate sits beside it).
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn corpus_dir(name: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(name)
}

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(corpus_dir(name))
        .unwrap_or_else(|e| panic!("the seed corpus fuzz/corpus/{name}: {e}"))
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "fuzz/corpus/{name} is empty");
    seeds.into_iter().map(|(_, b)| b).collect()
}

/// The message of the last panic a target raised (the hook keeps it instead of printing
/// the thousands a run may catch... of which one is enough).
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Runs `body` on `input`; a panic fails the test, naming a saved copy of the input.
fn run_one(name: &str, body: fn(&[u8]), input: &[u8]) {
    if std::panic::catch_unwind(|| body(input)).is_err() {
        let dir = fuzz_dir().join("../target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(input, &mut hasher);
        let file = dir.join(format!(
            "{name}-{:016x}",
            std::hash::Hasher::finish(&hasher)
        ));
        std::fs::write(&file, input).unwrap();
        let message = LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default();
        panic!(
            "fuzz target {name} panicked on {} bytes ({message}), saved as {}; reproduce \
             with `cargo fuzz run {name} {}` (nightly) and add it to fuzz/corpus/{name}",
            input.len(),
            file.display(),
            file.display()
        );
    }
}

fn fuzz((name, body): Target, seconds: u64, seed: u64) -> u64 {
    let seeds = corpus(name);
    for s in &seeds {
        run_one(name, body, s);
    }
    let mut rng = Rng(seed
        ^ name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        }));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = seeds.len() as u64;
    // Mutants that did not crash become parents too, so mutations stack up.
    let mut pool = seeds.clone();
    while Instant::now() < deadline {
        for _ in 0..64 {
            let parent = &pool[rng.below(pool.len())];
            let other = &seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, parent, other);
            run_one(name, body, &input);
            runs += 1;
            if pool.len() < 4096 && rng.below(8) == 0 {
                pool.push(input);
            }
        }
    }
    runs
}

/// Runs every target of `targets` for the configured time; returns (name, inputs run).
pub fn run_all(targets: &[Target]) -> Vec<(&'static str, u64)> {
    let seconds = std::env::var("BERTH_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let seed = std::env::var("BERTH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_b3a7);
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = info.to_string();
        }
    }));
    let counts = targets
        .iter()
        .map(|target| {
            let runs = fuzz(*target, seconds, seed);
            eprintln!("fuzz {}: {runs} inputs in {seconds} s", target.0);
            (target.0, runs)
        })
        .collect();
    let _ = std::panic::take_hook();
    counts
}
