#!/usr/bin/env python3
"""Pull + convert: cold `berth fetch` against `skopeo copy` + `umoci unpack` + `mksquashfs`.

Run as root from the repository root (issue 4):

    benches/fetch.py [--berth target/release/berth] [--runs 3] [--format oci|v2s2]
                     [--image-dir /var/tmp/berth-bench-image] [--rebuild] [--no-berth]
                     [--warm-runs 20] [--keep] [--work-dir /var/tmp]
                     [--fresh-fs | --no-fresh-fs] [--fs-size 3G]

What it does:
1. Starts its own Debian `docker-registry` on a free 127.0.0.1 port (plain HTTP, filesystem
   storage in a temp dir, log in that dir), killed by PID at the end.
2. Builds (once; cached in --image-dir) a ~430 MB, 5-layer OCI image with GNU tar layers and
   `umoci raw add-layer` (`umoci insert` truncates large files): a busybox-static base; real
   shared libraries from /usr/lib/x86_64-linux-gnu (libLLVM-15 plus ~70 MB of smaller ones);
   15,000 small files (half random, half text) with symlinks and hard links; three large
   files (64 MiB random, 48 MiB text, 16 MiB zeros); and an update layer with a whiteout,
   an opaque directory, overwritten files and a changed mode. It pushes it with
   `skopeo copy` as `bench/big:latest` (the --format manifest type) and `bench/big:other`
   (the other type).
3. Per run, interleaved (the order alternates each run): berth cold (`prune --all`, then
   time `berth fetch`); the alternative (empty work dir, then time `skopeo copy` to an OCI
   layout, `umoci unpack --rootless`, and `mksquashfs` with berth's exact flags, stage by
   stage). With --fresh-fs (the default), every measurement, on both sides, gets its own
   freshly made filesystem (untimed, before it): a sparse --fs-size file in --work-dir,
   `mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0` (no background init during
   the measurement), `mount -o loop`, root chmod 0755; the alternative's work dir (OCI
   layout, bundle, out.sqfs) or berth's `[cache] dir` (its staging and SIF) lives on it.
   A side's filesystem is unmounted and its file deleted (untimed) just before that side's
   next measurement; the last one of each side stays mounted for the warm fetch and the
   comparison, then goes too. Why: on the dev VM's ext4, creating a file costs ~0.03 ms
   normally but ~0.8 ms of kernel time for minutes after a large deletion nearby, and each
   run deletes ~17,000 files of the previous results, so on a shared filesystem every run
   after the first measures the disk's recovery, not the tools. --no-fresh-fs keeps the old
   protocol (everything in one temp dir under --work-dir, emptied before each run).
   The registry's storage stays in the temp dir (it is the source, like a remote registry).
   Before each measurement `sync` flushes the previous one's dirty pages (untimed);
   the page cache is not dropped: it is left as it is: the registry's blobs stay cached between runs,
   as they would on a registry host, and neither side drops caches.
   Then the warm fetch (already cached), by tag and by digest, median of --warm-runs.
4. Checks both results hold the same files (`unsquashfs -lln`, the SIF read at its partition
   offset): names, types, modes, owners, sizes, link targets. Prints a Markdown table.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

IMAGE_BUILD_VERSION = "3"  # bump when the image recipe changes: forces a rebuild
CPUS = len(os.sched_getaffinity(0))
# berth's flags: launcher/src/sif/writer.rs (create_from_dir + MKSQUASHFS_COMPRESSION).
MKSQUASHFS_FLAGS = ["-comp", "lz4", "-noappend", "-no-xattrs", "-quiet", "-no-progress",
                    "-processors", str(CPUS)]
SIF_PARTITION = 0x4004


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def kill_group(p):
    """Kills a child started with process_group=0 and everything it started (berth's
    mksquashfs), and reaps it, so nothing keeps writing to a filesystem we unmount."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        p.wait()
    except ChildProcessError:
        pass


def timed_berth_fetch(args):
    """Times a `berth fetch`, and its phases from when its progress lines arrive on stderr:
    pull ends at the last `pulling` line, unpack at the `building squashfs` line.
    Returns (seconds, stdout, stderr, maxrss_kib, {pull, unpack, squash} or None)."""
    import threading
    chunks = []
    t0 = time.perf_counter()
    p = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)

    def reader():
        while True:
            b = os.read(p.stderr.fileno(), 65536)
            if not b:
                return
            chunks.append((time.perf_counter() - t0, b))
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        out = p.stdout.read().decode()
        th.join()
        _, status, ru = os.wait4(p.pid, 0)
    except BaseException:
        kill_group(p)
        raise
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = b"".join(c for _, c in chunks).decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{err[-4000:]}")
    pull_end = squash_start = None
    for t, c in chunks:
        for line in c.decode(errors="replace").replace("\r", "\n").splitlines():
            if "pulling" in line:
                pull_end = t
            elif "building squashfs" in line and squash_start is None:
                squash_start = t
    phases = None
    if pull_end is not None and squash_start is not None:
        phases = {"pull": pull_end, "unpack": squash_start - pull_end, "squash": dt - squash_start}
    return dt, out, err, ru.ru_maxrss, phases


def timed(args, **kw):
    """Runs a command; returns (seconds, result with .stdout, .stderr, .maxrss_kib).

    Raises with the command's stderr on failure. os.wait4 gives this child's own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=err, process_group=0, **kw)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            kill_group(p)
            raise
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        r = argparse.Namespace(stdout=out.read().decode(errors="replace"),
                               stderr=err.read().decode(errors="replace"), maxrss_kib=ru.ru_maxrss)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{r.stderr[-4000:]}")
    return dt, r


# ---------------------------------------------------------------- image


def tar_layer(src, out):
    # GNU tar, numeric root ownership, sorted names, fixed mtimes: reproducible layers.
    sh("tar", "--create", "--file", out, "--directory", src, "--sort=name", "--numeric-owner",
       "--owner=0", "--group=0", "--mtime=2026-01-01 00:00:00", "--format=gnu", ".")


def write(path, data, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def text_bytes(rng, n):
    words = ["alpha", "beta", "gamma", "delta", "epoch", "loss", "step", "node", "gpu",
             "rank", "batch", "value", "sensor", "temperature", "pressure", "ok", "warn"]
    out, size = [], 0
    i = 0
    while size < n:
        line = f"{i},{rng.choice(words)},{rng.random():.6f},{rng.randint(0, 99999)},{rng.choice(words)}\n"
        out.append(line)
        size += len(line)
        i += 1
    return "".join(out).encode()[:n]


def layer_base(d):
    for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "home", "mnt", "root", "run", "var/tmp",
                "usr/bin", "usr/lib", "opt"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    os.chmod(os.path.join(d, "tmp"), 0o1777)
    shutil.copy2("/bin/busybox", os.path.join(d, "bin/busybox"))
    for applet in ("sh", "true", "cat", "ls", "sleep", "id", "env", "cp", "mv", "rm", "sed", "awk"):
        os.symlink("busybox", os.path.join(d, "bin", applet))
    write(os.path.join(d, "etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n")
    write(os.path.join(d, "etc/group"), b"root:x:0:\n")
    write(os.path.join(d, "etc/hosts"), b"")
    write(os.path.join(d, "etc/resolv.conf"), b"")


def layer_libs(d):
    src = "/usr/lib/x86_64-linux-gnu"
    dst = os.path.join(d, "usr/lib/x86_64-linux-gnu")
    os.makedirs(dst)
    shutil.copy2(os.path.join(src, "libLLVM-15.so.1"), dst)  # 117 MB, compresses ~2x
    budget = 70 << 20
    for name in sorted(os.listdir(src)):
        p = os.path.join(src, name)
        if name.startswith("libLLVM") or name.startswith("libclang"):
            continue
        if os.path.islink(p):
            t = os.readlink(p)
            if "/" not in t and os.path.isfile(os.path.join(src, t)):
                os.symlink(t, os.path.join(dst, name))  # may dangle if t is skipped: fine
            continue
        if not os.path.isfile(p):
            continue
        sz = os.path.getsize(p)
        if sz > (4 << 20) or sz > budget:
            continue
        shutil.copy2(p, dst)
        budget -= sz
        if budget <= 0:
            break


def layer_small(d, rng):
    root = os.path.join(d, "opt/app")
    n = 15000
    for i in range(n):
        sub = os.path.join(root, f"pkg{i % 150:03d}", f"mod{(i // 150) % 10}")
        size = int(2 ** rng.uniform(8, 14))  # 256 B .. 16 KiB, log-uniform
        data = rng.randbytes(size) if i % 2 else text_bytes(rng, size)
        write(os.path.join(sub, f"f{i:05d}.{'bin' if i % 2 else 'py'}"), data,
              0o755 if i % 17 == 0 else 0o644)
    for i in range(0, n, 50):  # symlinks and hard links
        sub = os.path.join(root, f"pkg{i % 150:03d}")
        os.symlink(f"mod{(i // 150) % 10}/f{i:05d}.{'bin' if i % 2 else 'py'}",
                   os.path.join(sub, f"link{i:05d}"))
    for i in range(0, n, 500):
        sub = os.path.join(root, f"pkg{i % 150:03d}", f"mod{(i // 150) % 10}")
        os.link(os.path.join(sub, f"f{i:05d}.py"), os.path.join(sub, f"hard{i:05d}.py"))


def layer_data(d, rng):
    data = os.path.join(d, "data")
    write(os.path.join(data, "weights.bin"), rng.randbytes(64 << 20))
    write(os.path.join(data, "table.csv"), text_bytes(rng, 48 << 20))
    write(os.path.join(data, "zeros.img"), bytes(16 << 20))


def layer_update(d, rng):
    app = os.path.join(d, "opt/app")
    os.makedirs(app)
    write(os.path.join(app, ".wh.pkg007"), b"")  # whiteout: drop a whole directory
    os.makedirs(os.path.join(app, "pkg008"))
    write(os.path.join(app, "pkg008/.wh..wh..opq"), b"")  # opaque: replace its contents
    write(os.path.join(app, "pkg008/replaced.txt"), text_bytes(rng, 5000))
    write(os.path.join(app, "pkg009/mod0/f00009.bin"), rng.randbytes(9000), 0o600)  # overwrite
    write(os.path.join(d, "etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    write(os.path.join(d, "data/README"), b"benchmark data\n")


def build_image(image_dir):
    """Builds the OCI layout IMAGE_DIR (tag `bench`) unless a current one is there."""
    stamp = os.path.join(image_dir, "berth-bench-version")
    if os.path.exists(stamp) and open(stamp).read() == IMAGE_BUILD_VERSION:
        log(f"image: reusing {image_dir}")
        return
    log(f"image: building in {image_dir} (once; takes a minute or two)")
    t0 = time.perf_counter()
    tmp = image_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(image_dir, ignore_errors=True)
    os.makedirs(tmp)
    layout = os.path.join(tmp, "oci")
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", f"{layout}:bench")
    rng = random.Random(4)
    for name, fn in (("base", layer_base), ("libs", layer_libs), ("small", layer_small),
                     ("data", layer_data), ("update", layer_update)):
        stage = os.path.join(tmp, f"stage-{name}")
        os.makedirs(stage)
        fn(stage) if fn in (layer_base, layer_libs) else fn(stage, rng)
        tar = os.path.join(tmp, f"{name}.tar")
        tar_layer(stage, tar)
        shutil.rmtree(stage)
        sh("umoci", "raw", "add-layer", "--image", f"{layout}:bench",
           "--history.created_by", f"berth bench layer {name}", tar)
        log(f"image: layer {name} {os.path.getsize(tar) / 1e6:.0f} MB")
        os.unlink(tar)
    sh("umoci", "config", "--image", f"{layout}:bench", "--config.cmd", "/bin/sh",
       "--config.env", "PATH=/usr/bin:/bin")
    sh("umoci", "gc", "--layout", layout)
    with open(os.path.join(tmp, "berth-bench-version"), "w") as f:
        f.write(IMAGE_BUILD_VERSION)
    os.rename(tmp, image_dir)
    log(f"image: built in {time.perf_counter() - t0:.0f} s")


def layout_facts(layout):
    def blob(digest):
        alg, hx = digest.split(":")
        return os.path.join(layout, "blobs", alg, hx)
    index = json.load(open(os.path.join(layout, "index.json")))
    m = next(x for x in index["manifests"] if x.get("annotations", {}).get(
        "org.opencontainers.image.ref.name") == "bench")
    manifest = json.load(open(blob(m["digest"])))
    layers = manifest["layers"]
    return len(layers), sum(l["size"] for l in layers)


# ---------------------------------------------------------------- fresh filesystems


class FreshFs:
    """Loop-mounted ext4 filesystems, one per measurement (see --fresh-fs).

    Every image file and mountpoint made is tracked until it is gone, so release_all()
    (called from main's finally) leaves nothing mounted or on disk after a failure."""

    def __init__(self, image_parent, mount_parent, size):
        self.image_parent, self.mount_parent, self.size = image_parent, mount_parent, size
        self.live = {}  # mountpoint -> image file
        self.n = 0

    def make(self, tag):
        self.n += 1
        img = os.path.join(self.image_parent, f"berth-bench-fs-{os.getpid()}-{self.n}-{tag}.img")
        mnt = os.path.join(self.mount_parent, f"fs-{self.n}-{tag}")
        os.makedirs(mnt)
        self.live[mnt] = img
        with open(img, "wb") as f:
            f.truncate(self.size)  # sparse
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img)
        sh("mount", "-o", "loop", img, mnt)
        os.chmod(mnt, 0o755)  # berth's cache must not be group/world-writable
        return mnt

    def release(self, mnt):
        img = self.live[mnt]
        if os.path.ismount(mnt):
            for _ in range(10):
                if subprocess.run(["umount", mnt]).returncode == 0:
                    break
                time.sleep(0.5)
            else:
                log(f"{mnt}: busy; detaching it lazily")
                subprocess.run(["umount", "-l", mnt])
        if not os.path.ismount(mnt):
            os.rmdir(mnt)
        try:
            os.unlink(img)
        except FileNotFoundError:
            pass
        del self.live[mnt]

    def release_all(self):
        for mnt in list(self.live):
            try:
                self.release(mnt)
            except Exception as e:
                log(f"cleanup of {mnt} ({self.live.get(mnt)}): {e}")


# ---------------------------------------------------------------- registry


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_registry(tmp):
    port = free_port()
    store = os.path.join(tmp, "registry")
    os.makedirs(store)
    cfg = os.path.join(tmp, "registry.yml")
    with open(cfg, "w") as f:
        f.write(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {store}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
""")
    logf = open(os.path.join(tmp, "registry.log"), "wb")
    proc = subprocess.Popen(["docker-registry", "serve", cfg], stdin=subprocess.DEVNULL,
                            stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).read()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start; see {tmp}/registry.log")
            time.sleep(0.1)
    return proc, port


# ---------------------------------------------------------------- berth


def write_berth_config(tmp, port, cache_dir):
    cfg = os.path.join(tmp, "berth.toml")
    with open(cfg, "w") as f:
        f.write(f"""[policy]
allowed = ["127.0.0.1:{port}/*"]
plain_http = ["127.0.0.1:{port}"]
[cache]
dir = "{cache_dir}"
max_size = "10G"
[registry]
certs_dir = "{tmp}/certs.d"
auth_file = "{tmp}/auth.json"
[runtime]
dir = "{tmp}/run"
""")
    return cfg


def sif_partition(path):
    """(offset, length) of the first squashfs partition in a SIF."""
    with open(path, "rb") as f:
        hdr = f.read(128)
        if hdr[32:41] != b"SIF_MAGIC":
            raise RuntimeError(f"{path}: not a SIF")
        dtotal, descoff = struct.unpack_from("<qq", hdr, 88)
        f.seek(descoff)
        for _ in range(dtotal):
            d = f.read(585)
            dtype, used = struct.unpack_from("<iB", d, 0)
            off, size = struct.unpack_from("<qq", d, 17)
            if used and dtype == SIF_PARTITION:
                f.seek(off)
                if f.read(4) == b"hsqs":
                    return off, size
    raise RuntimeError(f"{path}: no squashfs partition")


def listing(img, offset=0):
    """{path: (mode, owner, size, link)} from `unsquashfs -lln`."""
    r = sh("unsquashfs", "-lln", "-o", offset, "-d", "R", img, stdout=subprocess.PIPE,
           text=True)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("R"):
            continue
        name, _, link = parts[5].partition(" -> ")
        out[name] = (parts[0], parts[1], parts[2], link)
    return out


def cat_hash(img, offset, files):
    r = subprocess.run(["unsquashfs", "-cat", "-o", str(offset), img] + files,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    return hashlib.sha256(r.stdout).hexdigest(), len(r.stdout)


def compare(sif, sqfs):
    """Entries of both images by `unsquashfs -lln` (name, mode, owner, size, link target),
    and the bytes of a sample of regular files: every 100th plus all over 1 MiB."""
    off, _ = sif_partition(sif)
    a, b = listing(sif, off), listing(sqfs)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: berth {a.get(k)} vs alternative {b.get(k)}")
    regular = sorted(k for k, v in b.items() if v[0].startswith("-"))
    sample = [k[2:] for i, k in enumerate(regular) if i % 100 == 0 or int(b[k][2]) > (1 << 20)]
    ha, hb = cat_hash(sif, off, sample), cat_hash(sqfs, 0, sample)
    if ha != hb:
        diffs.append(f"content of {len(sample)} sampled files differs")
    return len(a), len(b), diffs, (len(sample), hb[1])


# ---------------------------------------------------------------- main


def mib(n):
    return n / (1 << 20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warm-runs", type=int, default=20)
    ap.add_argument("--format", choices=("oci", "v2s2"), default="oci",
                    help="manifest type pushed as :latest (the other one goes to :other)")
    ap.add_argument("--image-dir", default="/var/tmp/berth-bench-image")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached image")
    ap.add_argument("--no-berth", action="store_true", help="time only the alternative")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    # Where both sides unpack (a different filesystem or disk region). On the dev VM,
    # creating files costs ~0.03 ms each on a quiet ext4 but ~0.8 ms of kernel time in the
    # minutes after a large deletion nearby (each run deletes ~17,000 files), and that
    # dominates both sides' unpack times.
    ap.add_argument("--work-dir", default="/var/tmp",
                    help="parent of the temp dir holding berth's cache and the alternative's work "
                         "(and, with --fresh-fs, of the filesystem image files)")
    ap.add_argument("--fresh-fs", action=argparse.BooleanOptionalAction, default=True,
                    help="give every measurement its own freshly made loop-mounted ext4 "
                         "(default); --no-fresh-fs: both sides share one temp dir as before")
    ap.add_argument("--fs-size", default="3G",
                    help="size of each --fresh-fs sparse image file (default 3G)")
    args = ap.parse_args()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    fs_size = (int(args.fs_size[:-1]) * units[args.fs_size[-1].upper()]
               if args.fs_size[-1:].upper() in units else int(args.fs_size))
    if os.geteuid() != 0:
        sys.exit("run as root (berth --config is root-only)")
    berth = os.path.abspath(args.berth)
    if not args.no_berth and not os.access(berth, os.X_OK):
        sys.exit(f"{berth}: not executable (build it, or pass --no-berth)")
    if args.rebuild:
        shutil.rmtree(args.image_dir, ignore_errors=True)
    build_image(args.image_dir)
    layout = os.path.join(args.image_dir, "oci")
    nlayers, layer_bytes = layout_facts(layout)

    tmp = tempfile.mkdtemp(prefix="berth-bench-fetch-", dir=args.work_dir)
    reg = None
    fresh = FreshFs(args.work_dir, tmp, fs_size) if args.fresh_fs else None

    def on_term(signum, frame):  # SIGTERM/SIGHUP: unwind through the finally below
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    # Also when started in the background of a script, where SIGINT comes in ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, on_term)
    try:
        reg, port = start_registry(tmp)
        ref = f"127.0.0.1:{port}/bench/big"
        other = "v2s2" if args.format == "oci" else "oci"
        for tag, fmt in (("latest", args.format), ("other", other)):
            dt, _ = timed(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--format", fmt,
                           f"oci:{layout}:bench", f"docker://{ref}:{tag}"])
            log(f"pushed {ref}:{tag} ({fmt}) in {dt:.1f} s")
        _, r = timed(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}:latest"])
        digest = json.loads(r.stdout)["Digest"]
        cache_dir = os.path.join(tmp, "cache")
        cfg = write_berth_config(tmp, port, cache_dir)
        work = os.path.join(tmp, "work")
        bcmd = [berth, "--config", cfg]
        current = {}  # side -> its mounted filesystem (the last one stays for the checks)

        def new_fs(who):
            """--fresh-fs: unmounts and deletes `who`'s previous filesystem, makes its next
            one, and points `who`'s working area at it (berth: a rewritten config)."""
            nonlocal cache_dir, work
            if who in current:
                fresh.release(current.pop(who))
            current[who] = fresh.make(who)
            if who == "berth":
                cache_dir = os.path.join(current[who], "cache")
                write_berth_config(tmp, port, cache_dir)
            else:
                work = os.path.join(current[who], "work")

        def run_berth():
            if fresh:
                new_fs("berth")
            # Flush (not drop) what the previous measurement (and mkfs) left dirty, so its
            # writeback is not billed to this one.
            sh("sync")
            timed(bcmd + ["prune", "--all"])
            shutil.rmtree(cache_dir, ignore_errors=True)
            dt, out, err, rss, phases = timed_berth_fetch(bcmd + ["fetch", f"{ref}:latest"])
            berth_rss.append(rss)
            berth_phases.append(phases)
            return dt, out.strip(), err

        facts, alt_rss = {}, []

        def run_alt():
            if fresh:
                new_fs("alt")
            sh("sync")  # as in run_berth
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            t = {}
            t["copy"], r1 = timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                  f"docker://{ref}:latest", f"oci:{work}/oci:bench"])
            t["unpack"], r2 = timed(["umoci", "unpack", "--rootless", "--image",
                                    f"{work}/oci:bench", f"{work}/bundle"])
            t["squash"], r3 = timed(["mksquashfs", f"{work}/bundle/rootfs", f"{work}/out.sqfs"]
                                   + MKSQUASHFS_FLAGS)
            t["total"] = t["copy"] + t["unpack"] + t["squash"]
            alt_rss.append((r1.maxrss_kib, r2.maxrss_kib, r3.maxrss_kib))
            # berth fsyncs its SIF before publishing it; this is the same durability here.
            t["fsync"], _ = timed(["sync", f"{work}/out.sqfs"])
            if not facts:  # the unpacked tree, once
                rootfs = os.path.join(work, "bundle/rootfs")
                facts["du"] = int(sh("du", "-sb", rootfs, stdout=subprocess.PIPE,
                                     text=True).stdout.split()[0])
                facts["nfiles"] = sum(len(f) + len(d) for _, d, f in os.walk(rootfs))
            # berth removes its staging (blobs and unpacked tree) before it returns.
            t["cleanup"], _ = timed(["rm", "-rf", f"{work}/bundle", f"{work}/oci"])
            return t

        berth_t, alt_t, sif, berth_err, berth_rss = [], [], None, "", []
        berth_phases = []
        for i in range(args.runs):
            order = ("berth", "alt") if i % 2 == 0 else ("alt", "berth")
            for who in order:
                if who == "berth" and not args.no_berth:
                    dt, sif, berth_err = run_berth()
                    berth_t.append(dt)
                    ph = berth_phases[-1]
                    log(f"run {i + 1}: berth fetch cold {dt:.2f} s"
                        + (" (" + " ".join(f"{k} {v:.2f}" for k, v in ph.items()) + ")" if ph else "")
                        + f" -> {sif}")
                elif who == "alt":
                    t = run_alt()
                    alt_t.append(t)
                    log(f"run {i + 1}: alternative " + " ".join(f"{k} {v:.2f}" for k, v in t.items()))

        # Facts about the result of the last alternative run (still on disk).
        du, nfiles = facts["du"], facts["nfiles"]
        sqfs_size = os.path.getsize(os.path.join(work, "out.sqfs"))

        warm_tag, warm_dig, same, other_ok = [], [], None, None
        if not args.no_berth:
            for _ in range(args.warm_runs):
                dt, r = timed(bcmd + ["fetch", "--quiet", f"{ref}:latest"])
                warm_tag.append(dt)
                assert r.stdout.strip() == sif, (r.stdout, sif)
                dt, r = timed(bcmd + ["fetch", "--quiet", f"{ref}@{digest}"])
                warm_dig.append(dt)
            same = compare(sif, os.path.join(work, "out.sqfs"))
            try:
                _, r = timed(bcmd + ["fetch", "--quiet", f"{ref}:other"])
                o = r.stdout.strip()
                na, nb, d, _ = compare(o, os.path.join(work, "out.sqfs"))
                other_ok = f"ok, {na} entries, {len(d)} differences" if not d else f"{len(d)} differences: {d[:3]}"
            except Exception as e:  # report, do not abort the benchmark
                other_ok = f"FAILED: {e}"

        # ------------------------------------------------------------ report
        med = statistics.median
        print()
        print(f"Image: {ref}:latest ({args.format} manifest), {nlayers} layers, "
              f"{mib(layer_bytes):.0f} MiB of gzip layers, rootfs {mib(int(du)):.0f} MiB "
              f"in {nfiles} entries; {CPUS} CPUs; medians of {args.runs} cold runs "
              f"(interleaved, page cache as is, "
              + (f"each on its own fresh {args.fs_size} loop-mounted ext4" if fresh
                 else "shared work dir (--no-fresh-fs)")
              + f") and {args.warm_runs} warm fetches.")
        print()
        print("| stage | alternative s | berth s |")
        print("|---|---:|---:|")
        bt = f"{med(berth_t):.2f}" if berth_t else "pending"
        bp = [x for x in berth_phases if x]

        def bph(k):
            return f"{med(x[k] for x in bp):.2f}" if bp else ""
        print(f"| pull: `skopeo copy` to an OCI layout / berth | {med(x['copy'] for x in alt_t):.2f} | {bph('pull')} |")
        print(f"| unpack: `umoci unpack --rootless` / berth | {med(x['unpack'] for x in alt_t):.2f} | {bph('unpack')} |")
        print(f"| `mksquashfs -comp lz4` (berth: + fsync, publish, remove staging) | {med(x['squash'] for x in alt_t):.2f} | {bph('squash')} |")
        print(f"| **total, cold** | **{med(x['total'] for x in alt_t):.2f}** | **{bt}** |")
        with_sync = med(x['total'] + x['fsync'] + x['cleanup'] for x in alt_t)
        print(f"| alternative + `sync out.sqfs` ({med(x['fsync'] for x in alt_t):.2f} s) + "
              f"`rm -rf` bundle and layout ({med(x['cleanup'] for x in alt_t):.2f} s) | {with_sync:.2f} | |")
        if berth_t:
            print(f"| ratio alternative / berth | | **{med(x['total'] for x in alt_t) / med(berth_t):.2f}x** "
                  f"({with_sync / med(berth_t):.2f}x with fsync + cleanup) |")
            paired = med(a["total"] / b for a, b in zip(alt_t, berth_t))
            print(f"| median of per-run ratios (same run, adjacent) | | {paired:.2f}x |")
            a = [max(x[i] for x in alt_rss) / 1024 for i in range(3)]
            print(f"| peak RSS (with reaped children, so berth's includes its mksquashfs) | "
                  f"skopeo {a[0]:.0f}, umoci {a[1]:.0f}, mksquashfs {a[2]:.0f} MiB | "
                  f"{max(berth_rss) / 1024:.0f} MiB |")
            print(f"| warm `berth fetch` by tag | | {med(warm_tag) * 1000:.1f} ms |")
            print(f"| warm `berth fetch` by digest | | {med(warm_dig) * 1000:.1f} ms |")
            print(f"| result size | {mib(sqfs_size):.1f} MiB squashfs | {mib(os.path.getsize(sif)):.1f} MiB SIF |")
        else:
            print(f"| result size | {mib(sqfs_size):.1f} MiB squashfs | pending |")
        print()
        print("All cold runs (s): alternative " + ", ".join(f"{x['total']:.2f}" for x in alt_t)
              + ("; berth " + ", ".join(f"{x:.2f}" for x in berth_t) if berth_t else ""))
        if same:
            na, nb, d, (ns, nbytes) = same
            verdict = "same" if not d else f"{len(d)} DIFFERENCES"
            print(f"Results compared (unsquashfs -lln: name, mode, owner, size, link; bytes of "
                  f"{ns} sampled files, {mib(nbytes):.0f} MiB): berth {na}, alternative {nb} "
                  f"entries: {verdict}")
            for x in d[:20]:
                print(f"  {x}")
            print(f"berth fetch of :other ({other} manifest): {other_ok}")
        if berth_err:
            log("berth fetch stderr (last cold run):\n" + berth_err[-3000:])
    finally:
        if reg is not None:
            reg.kill()
            reg.wait()
        if fresh is not None:
            fresh.release_all()  # before anything is removed: never rmtree into a mount
        if args.keep:
            log(f"kept {tmp}" + (" (the fresh filesystems are gone)" if fresh else ""))
        elif fresh is None or not fresh.live:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"left {tmp}: still mounted under it: {list(fresh.live)}")


if __name__ == "__main__":
    main()
