//! Layer downloads that survive real networks: a bounded number in parallel
//! (`[registry] parallel_downloads`), each interrupted transfer resumed with a `Range` request
//! from the bytes already staged, sizes checked against the manifest before anything is
//! written, and every blob verified against its digest before it appears under its name.
//! Each blob's bytes are readable as they land (see `landing`), its stream ending only once
//! the whole is verified.
//!
//! Threads, not async: a handful of long transfers, in the launcher only (never in the
//! plugin, which runs inside slurmstepd).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::landing::Landing;
use super::manifest::Descriptor;
use super::progress::{self, Progress};
use super::{header, Client, Purpose, Verifier};
use crate::reference::Digest;
use crate::{Error, Result};

const CHUNK: usize = 256 << 10;

/// One blob to download, to `dest`; its bytes are readable from `landing` as they arrive.
pub struct BlobJob<'a> {
    pub desc: &'a Descriptor,
    pub dest: PathBuf,
    pub landing: Landing,
}

impl BlobJob<'_> {
    pub fn new(desc: &Descriptor, dest: PathBuf) -> BlobJob<'_> {
        BlobJob {
            desc,
            dest,
            landing: Landing::default(),
        }
    }
}

/// How one transfer attempt ended short of success.
enum Transfer {
    /// Worth another attempt; `progressed` says whether it received any bytes (which then
    /// stay staged for the next attempt to resume from).
    Interrupted { message: String, progressed: bool },
    /// The registry stayed unreachable through the request's own retries: give up, but keep
    /// the staged bytes for the next fetch of the image to resume from.
    Unreachable(Error),
    /// The blob or the answer is wrong: give up and remove the staged bytes.
    Failed(Error),
}

impl Client {
    /// Downloads `jobs` with at most `[registry] parallel_downloads` transfers at a time. The
    /// first failure sets `stop`, which stops the others at their next chunk (their bytes
    /// stay staged for a retry), and is returned. The caller sets `stop` to end the downloads
    /// early (its build failed): what that interrupts is no error of the download's. Every
    /// job's landing has ended when this returns: verified, or failed (its readers get an
    /// error).
    pub fn download_blobs(
        &self,
        repository: &str,
        jobs: &[BlobJob<'_>],
        progress: &Progress,
        stop: &AtomicBool,
    ) -> Result<()> {
        let next = AtomicUsize::new(0);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let workers = self.parallel.min(jobs.len());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return;
                        };
                        if let Err(e) = self.download_blob(repository, job, progress, stop) {
                            // Only the failure that stopped the others is theirs to report.
                            if !stop.swap(true, Ordering::Relaxed) {
                                let mut slot =
                                    first_error.lock().unwrap_or_else(|p| p.into_inner());
                                *slot = Some(e);
                            }
                            return;
                        }
                    }
                });
            }
        });
        for job in jobs {
            job.landing.abandon();
        }
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Downloads one blob to `dest`, which appears (by rename from `dest.partial`, in the
    /// caller's private staging directory) only once verified and synced. An interrupted
    /// transfer resumes from the staged bytes; attempts that received bytes do not count
    /// against `[registry] retries`, so a flaky link finishes a large blob.
    fn download_blob(
        &self,
        repository: &str,
        job: &BlobJob<'_>,
        progress: &Progress,
        stop: &AtomicBool,
    ) -> Result<()> {
        let (desc, dest) = (job.desc, &job.dest);
        let digest = desc.digest()?;
        let partial = PathBuf::from(format!("{}.partial", dest.display()));
        // Bytes staged by an earlier, crashed fetch count as done from the start; later
        // attempts count what they receive.
        progress.add(partial.metadata().map_or(0, |m| m.len().min(desc.size)));
        let mut failures = 0;
        loop {
            match self.try_download(repository, job, &digest, &partial, progress, stop) {
                Ok(()) => break,
                Err(Transfer::Interrupted {
                    message,
                    progressed,
                }) => {
                    if stop.load(Ordering::Relaxed) {
                        return Err(Error::Registry {
                            registry: self.registry.clone(),
                            message: format!("downloading {digest}: stopped after {message}"),
                        });
                    }
                    failures = if progressed { 1 } else { failures + 1 };
                    if failures >= self.retries {
                        return Err(Error::RegistryDown {
                            registry: self.registry.clone(),
                            attempts: failures,
                            message: format!("downloading {digest}: {message}"),
                        });
                    }
                    progress::note(
                        self.options.quiet,
                        &format!("resuming {digest} after: {message}"),
                    );
                    super::request::backoff(failures);
                }
                Err(Transfer::Unreachable(e)) => return Err(e),
                Err(Transfer::Failed(e)) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            }
        }
        std::fs::rename(&partial, dest)
            .map_err(|e| Error::io(format!("publishing blob {}", dest.display()), e))
    }

    /// One attempt: asks for the bytes after those staged in `partial` (all of them when
    /// there are none), checks the announced length against the manifest before writing,
    /// and verifies the whole blob at the end. Staged bytes are never rewritten (a reader
    /// of the landing may have consumed them): a server that ignores the range has the
    /// staged length of its answer skipped, and the verification covers the file's bytes.
    fn try_download(
        &self,
        repository: &str,
        job: &BlobJob<'_>,
        digest: &Digest,
        partial: &Path,
        progress: &Progress,
        stop: &AtomicBool,
    ) -> std::result::Result<(), Transfer> {
        let desc = job.desc;
        let what = format!("blob {digest} of {}/{repository}", self.registry);
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.path(repository));
        let staged = match partial.metadata() {
            Ok(m) if m.len() < desc.size => m.len(),
            // A staged file as long as the blob or longer is left from an earlier fetch (one
            // attempt stops reading at the blob's size, and a failed verification removes
            // it): it failed verification then, or is not ours. Start over.
            _ => 0,
        };
        let range = (staged > 0).then(|| format!("bytes={staged}-"));
        let resp = self
            .get_range(url, None, Purpose::Blob, &what, range)
            .map_err(|e| match e {
                Error::RegistryDown { .. } => Transfer::Unreachable(e),
                e => Transfer::Failed(e),
            })?;
        // Where the answer's body starts in the blob: a server may ignore the range.
        let body_at = if resp.status().as_u16() == 206 {
            resumed_offset(resp.headers(), staged, desc.size).map_err(|m| self.fail(&what, m))?
        } else {
            0
        };
        let expected = desc.size - body_at;
        if let Some(length) = header(resp.headers(), "content-length") {
            if length.trim().parse::<u64>().ok() != Some(expected) {
                return Err(self.fail(
                    &what,
                    format!(
                        "the server announces {} bytes where the manifest declares {expected}; \
                         refused before writing (a corrupt or hostile registry, or a proxy \
                         rewriting the answer)",
                        crate::reference::shown(length.trim())
                    ),
                ));
            }
        }
        let mut verifier = Verifier::new(digest, desc.size, what.clone());
        let mut file = if staged > 0 {
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .open(partial)
                .map_err(|e| io_failed(partial, "opening", e))?;
            rehash(&file, staged, &mut verifier).map_err(|e| io_failed(partial, "reading", e))?;
            file
        } else {
            // Readable too: the landing's readers share this descriptor.
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(partial)
                .map_err(|e| io_failed(partial, "creating", e))?
        };
        job.landing
            .open(&file, staged)
            .map_err(|e| io_failed(partial, "opening", e))?;
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut received = false;
        let mut skip = staged - body_at;
        let mut written = staged;
        // Up to the declared size and no further: past it, a read error would leave a
        // complete file that the next attempt could not resume.
        while written < desc.size {
            if stop.load(Ordering::Relaxed) {
                return Err(Transfer::Interrupted {
                    message: "another layer failed".into(),
                    progressed: received,
                });
            }
            let n = reader.read(&mut buf).map_err(|e| Transfer::Interrupted {
                message: e.to_string(),
                progressed: received,
            })?;
            if n == 0 {
                break;
            }
            let skipped = n.min(usize::try_from(skip).unwrap_or(usize::MAX));
            skip -= skipped as u64;
            let bytes = &buf[skipped..n];
            verifier.update(bytes).map_err(Transfer::Failed)?;
            file.write_all(bytes)
                .map_err(|e| io_failed(partial, "writing", e))?;
            written += bytes.len() as u64;
            job.landing.wrote(written);
            received = true;
            progress.add(bytes.len() as u64);
        }
        verifier.finish().map_err(Transfer::Failed)?;
        // The build may finish the layer now; the sync is for the blob kept for a retry.
        job.landing.verified();
        file.sync_all()
            .map_err(|e| io_failed(partial, "syncing", e))?;
        Ok(())
    }

    fn fail(&self, what: &str, message: String) -> Transfer {
        Transfer::Failed(self.error(format!("{what}: {message}")))
    }
}

/// Where a 206 answer starts: it must be exactly the bytes after those staged
/// (`Content-Range: bytes STAGED-LAST/SIZE`).
fn resumed_offset(
    headers: &ureq::http::HeaderMap,
    staged: u64,
    size: u64,
) -> std::result::Result<u64, String> {
    let range = header(headers, "content-range").unwrap_or_default();
    let wanted = format!("bytes {staged}-{}/", size - 1);
    match range.strip_prefix(&wanted) {
        Some(total) if total == "*" || total == size.to_string() => Ok(staged),
        _ => Err(format!(
            "asked for bytes {staged}- and got a partial answer for {:?}",
            crate::reference::shown(&range)
        )),
    }
}

/// Feeds the first `len` staged bytes of `file` to `verifier`, so a resumed blob is still
/// verified whole.
fn rehash(file: &File, len: u64, verifier: &mut Verifier) -> std::io::Result<()> {
    crate::pieces::for_each(crate::pieces::at(file, 0, len), |piece| {
        verifier.update(piece).map_err(std::io::Error::other)
    })
}

fn io_failed(path: &Path, doing: &str, e: std::io::Error) -> Transfer {
    Transfer::Failed(Error::io(format!("{doing} {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::RegistryConfig;
    use crate::reference::DigestAlgorithm;
    use crate::registry::tests::{bearer_challenge, http, serve};
    use crate::registry::{ClientOptions, Logins};

    fn client(dir: &Path, port: u16, tune: impl FnOnce(&mut RegistryConfig)) -> Client {
        let mut config = RegistryConfig {
            certs_dir: dir.to_path_buf(),
            auth_file: dir.join("no-auth.json"),
            retries: 3,
            timeout_secs: 5,
            ..RegistryConfig::default()
        };
        tune(&mut config);
        let options = ClientOptions {
            plain_http: true,
            quiet: true,
            logins: Logins::read(&config, None).unwrap(),
        };
        Client::new(&config, &format!("127.0.0.1:{port}"), options).unwrap()
    }

    fn descriptor(blob: &[u8]) -> Descriptor {
        Descriptor {
            media_type: String::new(),
            digest: Digest::compute(DigestAlgorithm::Sha256, blob).to_string(),
            size: blob.len() as u64,
            platform: None,
        }
    }

    fn quiet_progress() -> Progress {
        Progress::new(String::new(), 0, true)
    }

    const BLOB: &str = "0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

    /// Downloads [`BLOB`] from the test server on `port` to `blob` in a new directory (with
    /// `staged` already in `blob.partial`, as an earlier attempt would have left it).
    fn pull_blob(
        port: u16,
        staged: Option<&str>,
        tune: impl FnOnce(&mut RegistryConfig),
    ) -> (tempfile::TempDir, Result<()>) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(bytes) = staged {
            std::fs::write(dir.path().join("blob.partial"), bytes).unwrap();
        }
        let desc = descriptor(BLOB.as_bytes());
        let jobs = [BlobJob::new(&desc, dir.path().join("blob"))];
        let pulled = client(dir.path(), port, tune).download_blobs(
            "lab/img",
            &jobs,
            &quiet_progress(),
            &AtomicBool::new(false),
        );
        (dir, pulled)
    }

    /// Neither the blob nor a partial file of it is left.
    fn nothing_left(dir: &Path) {
        assert!(!dir.join("blob.partial").exists());
        assert!(!dir.join("blob").exists());
    }

    #[test]
    fn an_interrupted_blob_resumes_with_a_range_request_and_is_verified_whole() {
        let (port, server) = serve(2, |head| {
            if let Some(range) = head.lines().find_map(|l| l.strip_prefix("range: bytes=")) {
                let from: usize = range.trim().trim_end_matches('-').parse().unwrap();
                http(
                    "206 Partial Content",
                    &format!(
                        "Content-Range: bytes {from}-{}/{}\r\n",
                        BLOB.len() - 1,
                        BLOB.len()
                    ),
                    &BLOB[from..],
                )
            } else {
                // The connection drops after 30 of the bytes the header announces.
                let full = http("200 OK", "", BLOB);
                full[..full.len() - (BLOB.len() - 30)].to_string()
            }
        });
        let (dir, pulled) = pull_blob(port, None, |_| {});
        pulled.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("blob")).unwrap(),
            BLOB
        );
        assert!(!dir.path().join("blob.partial").exists());
        let seen = server.join().unwrap();
        assert!(!seen[0].contains("range:"), "{seen:#?}");
        assert!(seen[1].contains("range: bytes=30-"), "{seen:#?}");
    }

    #[test]
    fn a_server_that_ignores_the_range_has_the_staged_bytes_skipped_not_rewritten() {
        // A build may already have read the staged bytes: they stay, the answer's first
        // 30 bytes are dropped, and the file is verified whole.
        let (port, server) = serve(1, |_| http("200 OK", "", BLOB));
        let (dir, pulled) = pull_blob(port, Some(&BLOB[..30]), |_| {});
        pulled.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("blob")).unwrap(),
            BLOB
        );
        assert!(server.join().unwrap()[0].contains("range: bytes=30-"));
    }

    #[test]
    fn a_landing_ends_verified_or_in_an_error() {
        let (port, server) = serve(2, |head| {
            if head.contains(&descriptor(BLOB.as_bytes()).digest) {
                http("200 OK", "", BLOB)
            } else {
                http("200 OK", "", "not the bytes of its digest")
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let wrong = descriptor(b"the bytes of its digest....");
        let good = descriptor(BLOB.as_bytes());
        let jobs = [
            BlobJob::new(&good, dir.path().join("good")),
            BlobJob::new(&wrong, dir.path().join("wrong")),
        ];
        let err = client(dir.path(), port, |c| c.parallel_downloads = 1)
            .download_blobs("lab/img", &jobs, &quiet_progress(), &AtomicBool::new(false))
            .unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        let mut got = String::new();
        jobs[0].landing.reader().read_to_string(&mut got).unwrap();
        assert_eq!(got, BLOB);
        let err = jobs[1]
            .landing
            .reader()
            .read_to_string(&mut got)
            .unwrap_err();
        assert!(err.to_string().contains("download failed"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn a_resumed_blob_whose_staged_bytes_are_wrong_is_refused_and_removed() {
        // Bytes staged by an earlier attempt that do not belong to the blob: the resumed
        // download still verifies the whole, refuses it, and leaves no partial file.
        let (port, server) = serve(1, |_| {
            http(
                "206 Partial Content",
                &format!(
                    "Content-Range: bytes 10-{}/{}\r\n",
                    BLOB.len() - 1,
                    BLOB.len()
                ),
                &BLOB[10..],
            )
        });
        let (dir, pulled) = pull_blob(port, Some("XXXXXXXXXX"), |_| {});
        let err = pulled.unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        nothing_left(dir.path());
        server.join().unwrap();
    }

    #[test]
    fn retry_after_is_honoured_and_bounded() {
        let answers = Arc::new(AtomicU32::new(0));
        let count = Arc::clone(&answers);
        let (port, server) = serve(3, move |_| match count.fetch_add(1, Ordering::SeqCst) {
            0 => http("429 Too Many Requests", "Retry-After: 1\r\n", ""),
            1 => http("503 Service Unavailable", "Retry-After: 3600\r\n", ""),
            _ => http("200 OK", "", BLOB),
        });
        let start = Instant::now();
        pull_blob(port, None, |c| c.max_retry_wait_secs = 2)
            .1
            .unwrap();
        let waited = start.elapsed();
        // 1 s as asked (the default backoff is 0.2 s), then 2 s, the cap, not an hour.
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        assert_eq!(server.join().unwrap().len(), 3);
    }

    #[test]
    fn a_blob_announced_larger_than_the_manifest_says_is_refused_before_writing() {
        let (port, server) = serve(1, |_| {
            "HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\nxx"
                .to_string()
        });
        let (dir, pulled) = pull_blob(port, None, |_| {});
        let err = pulled.unwrap_err().to_string();
        assert!(
            err.contains("announces 1000000000 bytes") && err.contains("before writing"),
            "{err}"
        );
        nothing_left(dir.path());
        server.join().unwrap();
    }

    #[test]
    fn an_expired_token_is_refreshed_mid_pull() {
        // Each token the service issues is good for one blob request; the pull of three
        // blobs asks for a new one each time the registry answers 401.
        let issued = Arc::new(AtomicU32::new(0));
        let used = Arc::new(Mutex::new(Vec::<u32>::new()));
        let (issued2, used2) = (Arc::clone(&issued), Arc::clone(&used));
        let blobs = ["first blob", "second blob", "third blob"];
        let (port, server) = serve(9, move |head| {
            if head.starts_with("GET /token?") {
                let n = issued2.fetch_add(1, Ordering::SeqCst) + 1;
                return http("200 OK", "", &format!(r#"{{"token":"t{n}"}}"#));
            }
            let token = head
                .lines()
                .find_map(|l| l.strip_prefix("authorization: Bearer t"))
                .and_then(|n| n.trim().parse::<u32>().ok());
            let mut used = used2.lock().unwrap();
            match token {
                Some(n) if !used.contains(&n) => {
                    used.push(n);
                    let blob = blobs
                        .iter()
                        .find(|b| {
                            head.contains(
                                &Digest::compute(DigestAlgorithm::Sha256, b.as_bytes()).to_string(),
                            )
                        })
                        .unwrap();
                    http("200 OK", "", blob)
                }
                _ => bearer_challenge(head),
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let descs: Vec<Descriptor> = blobs.iter().map(|b| descriptor(b.as_bytes())).collect();
        let jobs: Vec<BlobJob> = descs
            .iter()
            .enumerate()
            .map(|(i, desc)| BlobJob::new(desc, dir.path().join(format!("blob{i}"))))
            .collect();
        client(dir.path(), port, |c| c.parallel_downloads = 1)
            .download_blobs("lab/img", &jobs, &quiet_progress(), &AtomicBool::new(false))
            .unwrap();
        for (i, blob) in blobs.iter().enumerate() {
            assert_eq!(
                std::fs::read_to_string(dir.path().join(format!("blob{i}"))).unwrap(),
                *blob
            );
        }
        assert_eq!(issued.load(Ordering::SeqCst), 3);
        assert_eq!(server.join().unwrap().len(), 9);
    }

    #[test]
    fn downloads_run_in_parallel_up_to_the_configured_bound() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let active = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (active2, most2) = (Arc::clone(&active), Arc::clone(&most));
        // Ends with the test process.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (active, most) = (Arc::clone(&active2), Arc::clone(&most2));
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(&stream);
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 2 {
                        line.clear();
                    }
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                    active.fetch_sub(1, Ordering::SeqCst);
                    let _ = (&stream).write_all(http("200 OK", "", BLOB).as_bytes());
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let desc = descriptor(BLOB.as_bytes());
        let jobs: Vec<BlobJob> = (0..7)
            .map(|i| BlobJob::new(&desc, dir.path().join(format!("blob{i}"))))
            .collect();
        let progress = Progress::new(String::new(), 7 * BLOB.len() as u64, true);
        client(dir.path(), port, |c| c.parallel_downloads = 3)
            .download_blobs("lab/img", &jobs, &progress, &AtomicBool::new(false))
            .unwrap();
        assert_eq!(most.load(Ordering::SeqCst), 3);
        assert_eq!(progress.done(), 7 * BLOB.len() as u64);
    }
}
