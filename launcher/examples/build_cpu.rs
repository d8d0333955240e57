//! Where a cold build's CPU goes, without a registry: `benches/large_image.py` runs this
//! over the benchmark image's gzip layer blobs (in image order) and reports each stage's
//! CPU seconds (user + sys of the whole process, so a stage's threads all count) and wall
//! seconds:
//!
//! - `sha256`: the digest of every blob (what the download verifies);
//! - `inflate`: gzip decompression of every blob to nowhere (one layer after another);
//! - `build`: the whole build (`squash::build` + `unpack::apply_layers`, as `berth fetch`
//!   runs it, several layers at once) into a scratch file in the output directory, fsync included.
//!
//! Usage: `build_cpu OUT_DIR BLOB...` (release build: `cargo run --release --example
//! build_cpu -- ...`).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::time::Instant;

use berth::config::CacheConfig;
use berth::squash;
use berth::unpack::{self, Budget, Compression, Limits};
use sha2::Digest;

/// User + system CPU seconds of this process so far (all threads), from /proc.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) end at the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..]
        .split(' ')
        .collect();
    let ticks = |i: usize| fields[i].parse::<f64>().expect("a tick count");
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn stage(name: &str, bytes: u64, run: impl FnOnce() -> io::Result<()>) {
    let (cpu, wall) = (cpu_secs(), Instant::now());
    run().unwrap_or_else(|e| panic!("{name}: {e}"));
    let (cpu, wall) = (cpu_secs() - cpu, wall.elapsed().as_secs_f64());
    println!(
        "{name:8} cpu {cpu:6.2} s  wall {wall:6.2} s  {:6.2} cpu-s/GB of input",
        cpu / (bytes as f64 / 1e9)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out_dir, blobs) = args
        .split_first()
        .expect("usage: build_cpu OUT_DIR BLOB...");
    let size = |p: &String| std::fs::metadata(p).map(|m| m.len()).expect("a blob");
    let compressed: u64 = blobs.iter().map(size).sum();
    let open = |p: &String| File::open(p).map(|f| BufReader::with_capacity(256 << 10, f));

    stage("sha256", compressed, || {
        for blob in blobs {
            let mut reader = open(blob)?;
            let mut hash = sha2::Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match reader.read(&mut buf)? {
                    0 => break,
                    n => hash.update(&buf[..n]),
                }
            }
            std::hint::black_box(hash.finalize());
        }
        Ok(())
    });
    stage("inflate", compressed, || {
        for blob in blobs {
            io::copy(
                &mut unpack::decoder(open(blob)?, Compression::Gzip)?,
                &mut io::sink(),
            )?;
        }
        Ok(())
    });
    let limits = Limits::from_config(&CacheConfig::default()).expect("default limits");
    let out_path = std::path::Path::new(out_dir).join("build_cpu.sqfs");
    // Readable too: the writer hashes the spills it copies by reading them back.
    let out = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out_path)
        .expect("the scratch file");
    let mut built = squash::Stats::default();
    stage("build", compressed, || {
        let mut budget = Budget::new(limits.clone());
        let options = squash::Options {
            spill_dir: out_dir.into(),
            ..Default::default()
        };
        built = squash::build(&out, 0, &options, |data| {
            let mut tree = squash::Tree::new();
            let sources = blobs
                .iter()
                .map(|blob| unpack::Source {
                    layer: blob.clone(),
                    compression: Compression::Gzip,
                    open: Box::new(move || {
                        let reader =
                            open(blob).map_err(|e| berth::Error::io("opening a blob", e))?;
                        Ok(Box::new(reader) as Box<dyn Read + Send>)
                    }),
                })
                .collect();
            let workers = unpack::layer_workers(options.threads);
            unpack::apply_layers(&mut tree, data, sources, &mut budget, workers)?;
            Ok(tree)
        })
        .map_err(io::Error::other)?;
        out.sync_all()
    });
    std::fs::remove_file(&out_path).expect("removing the scratch file");
    println!(
        "squashfs {} MB, {} inodes, {} blocks ({} sparse); input {} MB of gzip",
        built.bytes / 1_000_000,
        built.inodes,
        built.blocks,
        built.sparse_blocks,
        compressed / 1_000_000
    );
}
