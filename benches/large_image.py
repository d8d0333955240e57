#!/usr/bin/env python3
"""Large images, cold and warm (issue 17): `srun --container-image` of a >= 4 GB image.

Run as root from the repository root, under the cluster lock (it uses the test cluster's
registry, Slurm and installed berth):

    /work/e2e-run WORKTREE --cmd "python3 benches/large_image.py [--old-berth PATH]
        [--warm-runs 5] [--rebuild] [--skip-pipeline] [--work-dir /var/tmp]"

What it does:
1. Builds (unless the registry has it already, or --rebuild; `--prepare` builds only this,
   outside the lock) a 5-layer OCI image of about
   4.2 GB as an OCI layout, with GNU-format tar layers written by Python's tarfile and
   compressed by `gzip -1` processes in parallel: a busybox-static base
   plus 40,000 small Python-package-like text files (~260 MB); two layers of shared
   libraries (3.5 GB, ten files of 70-900 MB, random-ish bytes that lz4 and gzip halve);
   already-compressed data (500 MB of random bytes in 20 files); an update layer with
   whiteouts of 2,000 of the small files, an opaque directory and rewritten files. Pushes
   it with skopeo to the cluster's approved registry as localhost:5000/bench/large:latest
   (one benchmark image in the registry; re-pushes dedupe); --remove-layout removes the
   local layout (--layout, 2.6 GB) afterwards.
2. Each cold run starts from an empty node cache (`berth prune --all`) and a dropped page
   cache (`sync; echo 3 > /proc/sys/vm/drop_caches`), so the registry's blobs are read
   from disk too. Runs, in this order:
   a. `runuser -u berthtest -- srun --container-image=IMAGE true`, cold, then --warm-runs
      warm (median): job start to the task's exit through Slurm, with the installed berth;
   b. `berth fetch IMAGE` as root, cold, with the installed berth (this tree): phases from
      the times its progress lines arrive on stderr (download ends at the last "pulling"
      line, the build at "built"), peak RSS of the process tree (wait4: the largest single
      process, reaped children included);
   c. the same with --old-berth (today's path: unpack to disk, then mksquashfs);
   d. skopeo copy (registry -> OCI layout) + `umoci unpack --rootless` + mksquashfs with
      berth's old flags (`-comp lz4 -noappend -no-xattrs -quiet -no-progress -processors
      CPUS`), each timed, with its peak RSS; its files are removed afterwards (untimed).
   e. (unless --skip-cpu-profile) where a build's CPU goes, without the registry:
      `target/release/examples/build_cpu` (cargo build --release --example build_cpu)
      over the layout's blobs: SHA-256, gzip inflate, and the whole build, in CPU
      seconds (user + sys) per GB; needs the layout (not with --remove-layout).
3. Prints, on stdout, everything docs/BENCHMARKS.md quotes: a Markdown table (phases,
   total, CPU s, peak RSS, squashfs size per path), s/GB of file data and the ratios to
   berth, the load average before and after, the whiteouts' wasted bytes, the entry
   check against mksquashfs, and the CPU profile.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

IMAGE = "localhost:5000/bench/large:latest"
# Where the image and the cache are: the test cluster's, or (--own-registry) a private
# docker-registry and berth.toml (benches/fetch.py's) when the cluster cannot be had.
SITE = {"image": IMAGE, "config": [], "cache": "/var/cache/berth", "skopeo_tls": []}
CPUS = len(os.sched_getaffinity(0))
MKSQUASHFS_FLAGS = ["-comp", "lz4", "-noappend", "-no-xattrs", "-quiet", "-no-progress",
                    "-processors", str(CPUS)]
POLICY = "tests/cluster/templates/skopeo-policy.json"
MB = 1e6


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def drop_caches():
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Run:
    """A command timed to its exit, with its stderr lines' arrival times and the peak RSS
    (MiB) of its process tree from wait4."""

    def __init__(self, args, env=None):
        self.args = [str(a) for a in args]
        start = time.perf_counter()
        p = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env)
        self.lines = []
        for raw in p.stderr:
            self.lines.append((time.perf_counter() - start, raw.decode(errors="replace").rstrip()))
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        self.secs = time.perf_counter() - start
        self.peak_mib = usage.ru_maxrss / 1024
        self.cpu = usage.ru_utime + usage.ru_stime
        if p.returncode != 0:
            tail = "\n".join(l for _, l in self.lines[-15:])
            raise SystemExit(f"{' '.join(self.args)} failed ({p.returncode}):\n{tail}")

    def complete(self, needle):
        """When a progress line containing needle first showed all its bytes done
        (`... DONE/TOTAL MB ...`)."""
        for t, line in self.lines:
            if needle in line and " MB " in line:
                done, total = line.rsplit(" MB ", 1)[0].split()[-1].split("/")
                if done == total:
                    return t
        return None

    def last(self, needle):
        """When the last stderr line containing needle arrived (None if none did)."""
        times = [t for t, l in self.lines if needle in l]
        return times[-1] if times else None


# --- the image ----------------------------------------------------------------------------

WORDS = ("def class return import from self None True False if else elif for while in "
         "try except finally with as lambda yield numpy torch tensor array shape dtype "
         "config value result cache buffer index layer weight bias forward backward grad "
         "optimizer module parameter device cuda kernel stream batch epoch loss").split()


class Chunks:
    """A reader of `size` bytes made of 8 KiB chunks picked at random from `pool`."""

    def __init__(self, pool, size, rng):
        self.pool, self.left, self.rng = pool, size, rng
        self.buf, self.pos = b"", 0

    def read(self, n=-1):
        if self.pos == len(self.buf):
            if self.left == 0:
                return b""
            self.buf = b"".join(self.rng.choices(self.pool, k=128))[: self.left]
            self.left -= len(self.buf)
            self.pos = 0
        if n < 0:
            n = len(self.buf)
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def library_pool(rng):
    """8 KiB chunks like machine code: 4 KiB random, then those bytes again with every
    16th changed (lz4 and gzip store about half)."""
    pool = []
    for _ in range(1024):
        a = bytearray(rng.randbytes(4096))
        b = bytearray(a)
        for i in range(0, 4096, 16):
            b[i] = rng.randrange(256)
        pool.append(bytes(a + b))
    return pool


def python_file(rng, size):
    lines = []
    n = 0
    while n < size:
        indent = "    " * rng.randrange(3)
        line = indent + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 10)))
        line += f"  # {rng.randrange(10**6)}\n"
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:size]


def add_bytes(tar, path, data, mode=0o644):
    import io
    info = tarfile.TarInfo(path)
    info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, path, mode=0o755):
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 1_700_000_000
    tar.addfile(info)


class Hashing:
    """A file-like sink that hashes what goes through it (the layer's diff_id)."""

    def __init__(self, out):
        self.out, self.hash = out, hashlib.sha256()

    def write(self, data):
        self.hash.update(data)
        return self.out.write(data)


def write_layer(path, fill):
    """Writes a gzip -1 tar layer at path by running fill(tar) into a gzip process;
    returns the tar's sha256 (its diff_id)."""
    with open(path, "wb") as out:
        gz = subprocess.Popen(["gzip", "-1", "-n"], stdin=subprocess.PIPE, stdout=out)
        sink = Hashing(gz.stdin)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            fill(tar)
        gz.stdin.close()
        if gz.wait() != 0:
            raise SystemExit(f"gzip of {path} failed")
    return "sha256:" + sink.hash.hexdigest()


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def assemble_layout(layout, layers):
    """An OCI layout at `layout` (tag latest) from [(name, gzip path, diff_id)]: the blobs
    are moved in, config, manifest and index written."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)

    def blob(data=None, path=None):
        digest = file_digest(path) if path else "sha256:" + hashlib.sha256(data).hexdigest()
        dest = os.path.join(blobs, digest.split(":")[1])
        if path:
            size = os.path.getsize(path)
            os.rename(path, dest)
        else:
            size = len(data)
            with open(dest, "wb") as f:
                f.write(data)
        return {"digest": digest, "size": size}

    descs = [dict(blob(path=gz), mediaType="application/vnd.oci.image.layer.v1.tar+gzip")
             for _, gz, _ in layers]
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]},
              "history": [{"created_by": name} for name, _, _ in layers]}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": dict(blob(json.dumps(config).encode()),
                               mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": descs}
    index = {"schemaVersion": 2, "manifests": [dict(
        blob(json.dumps(manifest).encode()),
        mediaType="application/vnd.oci.image.manifest.v1+json",
        annotations={"org.opencontainers.image.ref.name": "latest"})]}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def small_files():
    """(path, size) of the Python-package-like files, reproducibly."""
    rng = random.Random(17)
    files = []
    for pkg in range(400):
        for mod in range(100):
            size = int(min(64 << 10, rng.lognormvariate(8.3, 0.9)))
            files.append((f"usr/lib/python3/site-packages/pkg{pkg:03d}/mod{mod:03d}.py", size))
    return files


def layer_base(tar):
    rng = random.Random(1)
    for d in ("bin", "etc", "tmp", "usr", "usr/lib", "usr/lib/python3",
              "usr/lib/python3/site-packages"):
        add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
    with open("/bin/busybox", "rb") as f:
        add_bytes(tar, "bin/busybox", f.read(), 0o755)
    for name in ("sh", "true", "ls", "cat"):
        info = tarfile.TarInfo(f"bin/{name}")
        info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "busybox", 1_700_000_000
        tar.addfile(info)
    add_bytes(tar, "etc/os-release", b'NAME="berth bench"\n')
    done_dirs = set()
    for path, size in small_files():
        d = os.path.dirname(path)
        if d not in done_dirs:
            add_dir(tar, d)
            done_dirs.add(d)
        add_bytes(tar, path, python_file(rng, size))


LIB_SIZES = [900, 600, 500, 400, 300, 250, 200, 150, 120, 80]  # MB, 3.5 GB in all


def layer_libs(part):
    def fill(tar):
        rng = random.Random(100 + part)
        pool = library_pool(rng)
        add_dir(tar, "usr/local/lib")
        for i, mb in enumerate(LIB_SIZES):
            if i % 2 != part:
                continue
            info = tarfile.TarInfo(f"usr/local/lib/libbench{i}.so.1")
            info.size, info.mode, info.mtime = mb * 1_000_000, 0o755, 1_700_000_000
            tar.addfile(info, Chunks(pool, info.size, rng))
    return fill


def layer_data(tar):
    rng = random.Random(3)
    add_dir(tar, "opt/data")
    for i in range(20):
        info = tarfile.TarInfo(f"opt/data/shard{i:02d}.npz")
        info.size, info.mode, info.mtime = 25_000_000, 0o644, 1_700_000_000
        tar.addfile(info, Chunks([rng.randbytes(8192) for _ in range(512)], info.size, rng))


def whited_out():
    """(files, bytes) of file data the update layer removes (whiteouts and the opaque
    directory): what the streamed build has already written when the whiteout comes."""
    rng = random.Random(4)
    files = small_files()
    gone = {path: size for path, size in rng.sample(files, 2000)}
    gone.update((p, n) for p, n in files if "/pkg007/" in p)
    return len(gone), sum(gone.values())


def layer_update(tar):
    rng = random.Random(4)
    files = small_files()
    for path, _ in rng.sample(files, 2000):
        d, name = os.path.split(path)
        add_bytes(tar, f"{d}/.wh.{name}", b"")
    add_dir(tar, "usr/lib/python3/site-packages/pkg007")
    add_bytes(tar, "usr/lib/python3/site-packages/pkg007/.wh..wh..opq", b"")
    add_bytes(tar, "usr/lib/python3/site-packages/pkg007/__init__.py", b"# rewritten\n")
    add_bytes(tar, "etc/os-release", b'NAME="berth bench"\nVERSION="2"\n')


def build_layout(layout):
    """Writes the image as an OCI layout at `layout` (once: a complete one is reused)."""
    if os.path.exists(os.path.join(layout, "complete")):
        return
    subprocess.run(["rm", "-rf", layout])
    work = os.path.dirname(layout)
    os.makedirs(work, exist_ok=True)
    layers = [("base", layer_base), ("libs-a", layer_libs(0)), ("libs-b", layer_libs(1)),
              ("data", layer_data), ("update", layer_update)]
    paths = {name: os.path.join(work, f"{name}.tar.gz") for name, _ in layers}
    diff_ids = {}

    def write(name, fill):
        diff_ids[name] = write_layer(paths[name], fill)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=write, args=(name, fill)) for name, fill in layers]
    # Two at a time: the two large ones together, so both cores compress.
    for batch in (threads[1:3], threads[0:1] + threads[3:]):
        for t in batch:
            t.start()
        for t in batch:
            t.join()
    log(f"layers written in {time.perf_counter() - t0:.0f} s")
    assemble_layout(layout, [(name, paths[name], diff_ids[name]) for name, _ in layers])
    open(os.path.join(layout, "complete"), "w").close()


def push(layout):
    sh("skopeo", "--policy", POLICY, "copy", "-q", "--format", "oci",
       *[f"--dest{t}" for t in SITE["skopeo_tls"]],
       f"oci:{layout}:latest", f"docker://{SITE['image']}")


def in_registry():
    return subprocess.run(["skopeo", "inspect", "--raw",
                           *[f"-{t}" for t in SITE["skopeo_tls"]],
                           f"docker://{SITE['image']}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


# --- the measurements ---------------------------------------------------------------------

def cold(berth):
    sh(berth, *SITE["config"], "prune", "--all", stdout=subprocess.DEVNULL)
    drop_caches()


def fetch_phases(berth, label):
    cold(berth)
    r = Run([berth, *SITE["config"], "fetch", SITE["image"]])
    pulled = r.complete("pulling")
    built = r.last("built") or r.last("building squashfs")
    unpacked = r.last("unpacking")
    row = {"label": label, "total": r.secs, "peak": r.peak_mib, "cpu": r.cpu, "download": pulled}
    if unpacked is not None:  # today's path: unpack, then mksquashfs, then publish
        row["unpack"] = unpacked - pulled
        row["squash+fsync+publish"] = r.secs - unpacked
    else:
        row["build"] = built - pulled
        row["fsync+publish"] = r.secs - built
    row["sif"] = cached_sif_size()
    row["listing"] = listing(cached_sif(), 32768)
    log(f"{label}: {r.secs:.1f} s, peak {r.peak_mib:.0f} MiB")
    log("\n".join(f"  {t:7.2f} {l}" for t, l in r.lines))
    return row


def listing(image, offset=0):
    """Entries of a squashfs as {path: (mode, owner, size of a regular file)}, from
    `unsquashfs -lln` (directory sizes and times differ between writers by design)."""
    out = subprocess.run(["unsquashfs", "-lln", "-o", str(offset), "-d", "", image],
                         check=True, capture_output=True).stdout.decode(errors="replace")
    entries = {}
    for line in out.splitlines():
        f = line.split(None, 5)
        if len(f) < 6 or f[0][0] not in "-dl":
            continue
        path = f[5].split(" -> ")[0]
        entries[path] = (f[0], f[1], f[2] if f[0][0] == "-" else "")
    return entries


def cached_sif():
    return max((os.path.join(dp, f) for dp, _, fs in os.walk(SITE["cache"])
                for f in fs if f.endswith(".sif")), key=os.path.getsize, default=None)


def cached_sif_size():
    return max((os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(SITE["cache"])
                for f in fs if f.endswith(".sif")), default=0)


def pipeline(work):
    d = tempfile.mkdtemp(prefix="berth-large-", dir=work)
    try:
        drop_caches()
        oci, bundle, out = os.path.join(d, "oci"), os.path.join(d, "bundle"), os.path.join(d, "out.sqfs")
        rows = {}
        r = Run(["skopeo", "--policy", POLICY, "copy", "-q",
                 *[f"--src{t}" for t in SITE["skopeo_tls"]],
                 f"docker://{SITE['image']}", f"oci:{oci}:latest"])
        rows["skopeo copy"] = (r.secs, r.peak_mib, r.cpu)
        r = Run(["umoci", "unpack", "--rootless", "--image", f"{oci}:latest", bundle])
        rows["umoci unpack"] = (r.secs, r.peak_mib, r.cpu)
        r = Run(["mksquashfs", os.path.join(bundle, "rootfs"), out] + MKSQUASHFS_FLAGS)
        rows["mksquashfs"] = (r.secs, r.peak_mib, r.cpu)
        t = time.perf_counter()
        sh("sync")
        rows["sync"] = (time.perf_counter() - t, 0, 0)
        size = os.path.getsize(out)
        return rows, size, listing(out)
    finally:
        subprocess.run(["rm", "-rf", d])


def srun_times(warm_runs):
    cmd = ["runuser", "-u", "berthtest", "--", "srun", f"--container-image={IMAGE}", "true"]
    cold(os.environ.get("BERTH_BIN", "/usr/bin/berth"))
    c = Run(cmd)
    log(f"srun cold {c.secs:.1f} s")
    warm = [Run(cmd).secs for _ in range(warm_runs)]
    return c.secs, statistics.median(warm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-berth", help="today's berth binary (unpack + mksquashfs)")
    ap.add_argument("--warm-runs", type=int, default=5)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-old", action="store_true", help="without --old-berth's run")
    ap.add_argument("--skip-cpu-profile", action="store_true",
                    help="without build_cpu's profile of the build over the layout's blobs")
    ap.add_argument("--work-dir", default="/var/tmp")
    ap.add_argument("--layout", default="/var/tmp/berth-large-image/oci",
                    help="where the image's OCI layout is built (once) and pushed from")
    ap.add_argument("--prepare", action="store_true",
                    help="only build the layout (no cluster needed: run it outside the lock)")
    ap.add_argument("--remove-layout", action="store_true",
                    help="remove the layout once the image is in the registry")
    ap.add_argument("--srun-only", action="store_true",
                    help="only the srun cold/warm times (short, under the cluster lock)")
    ap.add_argument("--own-registry", action="store_true",
                    help="no cluster: a private docker-registry and berth.toml, no srun")
    a = ap.parse_args()
    if a.prepare:
        build_layout(a.layout)
        return
    berth = os.environ.get("BERTH_BIN", "/usr/bin/berth")
    registry = None
    if a.own_registry:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "fetch_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fetch.py"))
        fetch_bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fetch_bench)
        tmp = tempfile.mkdtemp(prefix="berth-large-site-", dir=a.work_dir)
        registry, port = fetch_bench.start_registry(tmp)
        cache = os.path.join(tmp, "cache")
        SITE.update(image=f"127.0.0.1:{port}/bench/large:latest", cache=cache,
                    config=["--config", fetch_bench.write_berth_config(tmp, port, cache)],
                    skopeo_tls=["-tls-verify=false"])
        berth = os.environ.get("BERTH_NEW", "target/release/berth")
    try:
        run(a, berth)
    finally:
        if registry:
            registry.kill()
            registry.wait()
            subprocess.run(["rm", "-rf", tmp])


def cpu_profile(layout):
    """build_cpu's lines over the layout's layer blobs, in image order (None when the
    binary or the layout is missing)."""
    exe = "target/release/examples/build_cpu"
    if not (os.path.exists(exe) and os.path.exists(os.path.join(layout, "index.json"))):
        log(f"no CPU profile: needs {exe} (cargo build --release --example build_cpu) "
            f"and the layout {layout}")
        return None
    blobs = os.path.join(layout, "blobs", "sha256")
    with open(os.path.join(layout, "index.json")) as f:
        manifest = json.load(f)["manifests"][0]["digest"].split(":")[1]
    with open(os.path.join(blobs, manifest)) as f:
        layers = [os.path.join(blobs, l["digest"].split(":")[1]) for l in json.load(f)["layers"]]
    drop_caches()
    return subprocess.run([exe, os.path.dirname(layout), *layers], check=True,
                          capture_output=True).stdout.decode()


def run(a, berth):
    load_before = loadavg()
    log(f"load before: {load_before}")
    if a.rebuild or not in_registry():
        if a.rebuild:
            subprocess.run(["rm", "-rf", a.layout])
        build_layout(a.layout)
        push(a.layout)
    if a.remove_layout:
        subprocess.run(["rm", "-rf", os.path.dirname(a.layout)])
    srun_cold = srun_warm = None
    if not a.own_registry:
        srun_cold, srun_warm = srun_times(a.warm_runs)
    if a.srun_only:
        sh(berth, *SITE["config"], "prune", "--all", stdout=subprocess.DEVNULL)
        print(f"srun --container-image cold: {srun_cold:.1f} s; warm (median of "
              f"{a.warm_runs}): {srun_warm * 1000:.0f} ms; load after: {loadavg()}")
        return
    rows = [fetch_phases(berth, "berth (streamed squashfs)")]
    if a.old_berth and not a.skip_old:
        rows.append(fetch_phases(a.old_berth, "berth today (unpack + mksquashfs)"))
    pipe = None if a.skip_pipeline else pipeline(a.work_dir)
    sh(berth, *SITE["config"], "prune", "--all", stdout=subprocess.DEVNULL)
    profile = None if a.skip_cpu_profile else cpu_profile(a.layout)
    load_after = loadavg()
    log(f"load after: {load_after}")

    print(f"\nload average (1, 5, 15 min) before: {load_before}; after: {load_after}; "
          f"CPUs: {CPUS}\n")
    if srun_cold is not None:
        print(f"srun --container-image cold: {srun_cold:.1f} s; warm (median of "
              f"{a.warm_runs}): {srun_warm * 1000:.0f} ms\n")
    print("| path | phases (s) | total s | CPU s | peak RSS MiB | squashfs MB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r.items()
                           if k not in ("label", "total", "peak", "sif", "listing", "cpu"))
        print(f"| {r['label']} | {phases} | {r['total']:.1f} | {r['cpu']:.1f} | {r['peak']:.0f} "
              f"| {r['sif'] / MB:.0f} |")
    if pipe:
        stages, size, reference = pipe
        total = sum(s for s, _, _ in stages.values())
        cpu = sum(c for _, _, c in stages.values())
        phases = ", ".join(f"{k} {s:.1f}" for k, (s, _, _) in stages.items())
        peak = max(p for _, p, _ in stages.values())
        print(f"| skopeo + umoci + mksquashfs | {phases} | {total:.1f} | {cpu:.1f} | {peak:.0f} "
              f"| {size / MB:.0f} |")
        print()
        for r in rows:
            differ = sorted(p for p in set(reference) | set(r["listing"])
                            if reference.get(p) != r["listing"].get(p))
            print(f"{r['label']}: {len(r['listing'])} entries, {len(differ)} differ from "
                  f"mksquashfs's {len(reference)} (mode, owner, file size){': ' if differ else ''}"
                  f"{', '.join(differ[:5])}")
    # Per GB of the image's file data (the regular files' sizes, whiteouts applied).
    listing_ = rows[0]["listing"]
    gb = sum(int(size) for mode, _, size in listing_.values() if mode.startswith("-")) / 1e9
    print(f"\nimage: {gb:.2f} GB of file data, {len(listing_)} entries")
    berth_total = rows[0]["total"]
    for r in rows:
        print(f"{r['label']}: {r['total'] / gb:.1f} s/GB, {r['cpu'] / gb:.1f} CPU-s/GB, "
              f"{r['total'] / berth_total:.2f}x berth's time")
    if pipe:
        print(f"skopeo + umoci + mksquashfs: {total / gb:.1f} s/GB, {cpu / gb:.1f} CPU-s/GB, "
              f"{total / berth_total:.2f}x berth's time")
    if srun_cold is not None:
        print(f"srun cold: {srun_cold / gb:.1f} s/GB")
    files, wasted = whited_out()
    print(f"whiteouts: {files} files removed by the update layer, {wasted / MB:.1f} MB of "
          f"file data written anyway ({100 * wasted / (gb * 1e9):.2f}% of the image's data)")
    if profile:
        print(f"\nCPU profile (build_cpu over the layout's blobs, page cache dropped):\n"
              f"{profile}")


if __name__ == "__main__":
    main()
