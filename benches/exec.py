#!/usr/bin/env python3
"""Container start cost: `berth exec IMG /bin/true` against the tools users would pick instead.

Run as root from the repository root (it drops to a non-root user for every measured command):

    benches/exec.py [--runs 50] [--user berthtest] [--berth target/release/berth]

It builds one busybox-static root filesystem, then from it a SIF (berth), a crun bundle
(rootless `crun run`) and a plain directory (`ch-run`), and times `/bin/true` through each,
interleaved round by round so drift on the machine hits every tool alike. It prints medians,
ratios against crun and bare, and berth's peak RSS, as a Markdown table for docs/BENCHMARKS.md.

crun refuses this machine's hybrid cgroup layout, so (as ARCHITECTURE.md records) the whole
benchmark runs in a private mount namespace with /sys/fs/cgroup/unified unmounted, and crun's
spec has no `linux.resources`; berth and ch-run do not care.
"""

import argparse
import ctypes
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def build_rootfs(root):
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "home", "mnt", "root", "run", "var"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy2("/bin/busybox", os.path.join(root, "bin/busybox"))
    for applet in ("sh", "true", "cat", "sleep", "id"):
        os.symlink("busybox", os.path.join(root, "bin", applet))
    for f, text in (("passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("group", "root:x:0:\n"),
                    ("hosts", ""), ("resolv.conf", "")):
        with open(os.path.join(root, "etc", f), "w") as fh:
            fh.write(text)


def measure(cmd, env):
    t0 = time.perf_counter_ns()
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t1 = time.perf_counter_ns()
    if r.returncode != 0:
        sys.exit(f"benchmark command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr.decode()}")
    return (t1 - t0) / 1e6


def peak_rss_kib(cmd, env):
    """Peak RSS of the measured process itself (berth), via wait4's rusage. Through ctypes:
    some Python builds lack the `resource` module that os.wait4 needs."""
    libc = ctypes.CDLL(None, use_errno=True)
    rusage = (ctypes.c_long * 18)()  # struct rusage: 2 timevals, then ru_maxrss, ...
    status = ctypes.c_int()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if libc.wait4(p.pid, ctypes.byref(status), 0, rusage) != p.pid or status.value != 0:
        sys.exit(f"{' '.join(cmd)} failed")
    p.returncode = 0  # reaped above; keep Popen from waiting again
    return rusage[4]


def as_user(user):
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": pw.pw_dir, "USER": user,
            "LOGNAME": user, "XDG_RUNTIME_DIR": os.environ["BENCH_DIR"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--user", default="berthtest")
    ap.add_argument("--berth", default="target/release/berth")
    a = ap.parse_args()
    berth = os.path.abspath(a.berth)

    if "BENCH_DIR" not in os.environ:
        # Re-run ourselves inside a private mount namespace without the cgroup2 hierarchy.
        work = tempfile.mkdtemp(prefix="berth-bench-")
        os.chmod(work, 0o755)
        rootfs = os.path.join(work, "bundle", "rootfs")
        build_rootfs(rootfs)
        sh(berth, "sif", "create", rootfs, os.path.join(work, "img.sif"), stdout=subprocess.DEVNULL)
        pw = pwd.getpwnam(a.user)
        for dirpath, dirnames, filenames in os.walk(work):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), pw.pw_uid, pw.pw_gid)
        os.chown(work, pw.pw_uid, pw.pw_gid)
        env = dict(os.environ, BENCH_DIR=work)
        inner = f"umount /sys/fs/cgroup/unified 2>/dev/null; exec {sys.executable} {' '.join(sys.argv)}"
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner], env=env)
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(r.returncode)

    work = os.environ["BENCH_DIR"]
    env = as_user(a.user)
    bundle = os.path.join(work, "bundle")
    sh("crun", "spec", "--rootless", cwd=bundle, env=env)
    spec_path = os.path.join(bundle, "config.json")
    with open(spec_path) as fh:
        spec = json.load(fh)
    spec["process"]["args"] = ["/bin/true"]
    spec["process"]["terminal"] = False
    spec["linux"].pop("resources", None)
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)

    sif = os.path.join(work, "img.sif")
    tools = {
        "bare /bin/true": ["/bin/true"],
        "berth exec (SIF, squashfuse)": [berth, "exec", "--no-home", sif, "/bin/true"],
        "crun run (rootless, directory)": ["crun", "--root", os.path.join(work, "crun"), "run",
                                           "--bundle", bundle, "bench"],
        "ch-run (directory)": ["ch-run", os.path.join(bundle, "rootfs"), "--", "/bin/true"],
    }
    for cmd in tools.values():  # warm-up, and proof each works before timing
        measure(cmd, env)
    times = {k: [] for k in tools}
    for _ in range(a.runs):
        for name, cmd in tools.items():
            times[name].append(measure(cmd, env))
    med = {k: statistics.median(v) for k, v in times.items()}
    crun = med["crun run (rootless, directory)"]
    bare = med["bare /bin/true"]
    print(f"`/bin/true` start, {a.runs} interleaved runs each, as {a.user}, medians:\n")
    print("| tool | median ms | p90 ms | vs crun | vs bare |")
    print("|---|---:|---:|---:|---:|")
    for name, v in times.items():
        p90 = statistics.quantiles(v, n=10)[-1]
        print(f"| {name} | {med[name]:.1f} | {p90:.1f} | {med[name] / crun:.2f}x | {med[name] / bare:.1f}x |")
    rss = peak_rss_kib(tools["berth exec (SIF, squashfuse)"], env)
    print(f"\nberth peak RSS (the berth process, not squashfuse): {rss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
