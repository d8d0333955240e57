#!/usr/bin/env python3
"""Stage-in speed: `berth stage in` against `cp -a` and `rsync -a`, in the same run (issue 12).

Run as root from the repository root:

    benches/stage.py [--berth target/release/berth] [--runs 3] [--dir /var/tmp]
                     [--big-mib 1024] [--files 20000] [--threads 8]

In a temporary directory under --dir it makes (a) one --big-mib MiB random file and (b) a
tree of --files random files of 4 to 64 KiB, then copies each with the three tools,
interleaved round by round so drift on the machine hits every tool alike. Every copy goes to
a freshly made ext4 file system (a sparse file under --dir, `mkfs.ext4` with no lazy init,
loop-mounted; untimed), the node-local disk of the stage area: on this VM's ext4, creating
files is many times slower for minutes after a large deletion nearby (see benches/fetch.py),
so one file system reused would measure the previous run's clean-up. Each copy is `sync`ed
after its time is taken (untimed). Sources are read from the page cache alike (the first
round warms it). Needs rsync. It also times `berth stage in` of each source again
unchanged (the reuse check: a metadata walk of source and copy), and prints medians and
ratios as Markdown for docs/BENCHMARKS.md. Targets: (a) berth >= 0.95x cp's speed; (b) berth
>= 3x rsync's and faster than cp; re-staging unchanged data < 0.5 s.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def run(args, **kw):
    return subprocess.run(args, check=True, stdin=subprocess.DEVNULL, **kw)


def timed(args):
    t0 = time.perf_counter()
    r = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    t = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(args)}\n{r.stderr.decode()}")
    return t


def make_sources(work, big_mib, files):
    big = os.path.join(work, "big")
    run(["dd", "if=/dev/urandom", f"of={big}", "bs=1M", f"count={big_mib}", "status=none"])
    tree = os.path.join(work, "tree")
    rng = random.Random(12)
    per_dir = 1000
    for i in range(files):
        d = os.path.join(tree, f"d{i // per_dir}")
        if i % per_dir == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(os.urandom(rng.randint(4, 64) * 1024))
    return {"a": big, "b": tree}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the sources and the file systems' image files go")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (berth takes --config from root only)")
    berth = os.path.abspath(args.berth)
    work = tempfile.mkdtemp(prefix="berth-bench-stage-", dir=args.dir)
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    disk = os.path.join(work, "disk.img")
    config = os.path.join(work, "berth.toml")
    area = os.path.join(mnt, "area")
    with open(config, "w") as f:
        f.write(f'[stage]\ndir = "{area}"\nmax_user = "1T"\nreserve = "0"\n'
                f'threads = {args.threads}\n')
    stage = [berth, "--config", config, "stage"]
    out = os.path.join(mnt, "out")

    def fresh_fs():
        if os.path.ismount(mnt):
            run(["umount", mnt])
        if os.path.exists(disk):
            os.remove(disk)
        run(["truncate", "-s", f"{args.big_mib * 2 + 1024}M", disk])
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", disk])
        run(["mount", "-o", "loop", disk, mnt])
        os.mkdir(area)
        os.chmod(area, 0o1777)
        run(["sync"])

    tools = {
        "berth stage in": lambda src: [*stage, "in", "--quiet", src],
        "cp -a": lambda src: ["cp", "-a", src, out],
        "rsync -a": lambda src: ["rsync", "-a", src, out],
    }
    try:
        sources = make_sources(work, args.big_mib, args.files)
        times = {(case, tool): [] for case in sources for tool in tools}
        restage = {}
        for case, src in sources.items():
            timed(["cat", src] if case == "a" else ["tar", "-cf", "/dev/null", src])
            for _ in range(args.runs):
                for tool, command in tools.items():
                    fresh_fs()
                    times[(case, tool)].append(timed(command(src)))
                    run(["sync"])
            # Stage once, then the unchanged source again.
            fresh_fs()
            run([*stage, "in", "--quiet", src], stdout=subprocess.DEVNULL)
            restage[case] = statistics.median(
                timed([*stage, "in", "--quiet", src]) for _ in range(max(args.runs, 5)))
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", mnt])
        shutil.rmtree(work, ignore_errors=True)

    names = {"a": f"(a) one {args.big_mib} MiB file", "b": f"(b) {args.files} files of 4-64 KiB"}
    print(f"| case | berth stage in | cp -a | rsync -a | berth vs cp | berth vs rsync |"
          f" re-stage unchanged |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in sources:
        med = {tool: statistics.median(times[(case, tool)]) for tool in tools}
        runs = {tool: ", ".join(f"{t:.2f}" for t in times[(case, tool)]) for tool in tools}
        b, c, r = med["berth stage in"], med["cp -a"], med["rsync -a"]
        print(f"| {names[case]} | {b:.2f} s ({runs['berth stage in']}) | {c:.2f} s "
              f"({runs['cp -a']}) | {r:.2f} s ({runs['rsync -a']}) | {c / b:.2f}x | "
              f"{r / b:.2f}x | {restage[case]:.3f} s |")


if __name__ == "__main__":
    main()
