#!/usr/bin/env python3
"""Job start to first task for a cold image, through Slurm, with and without the shared
image store (issue 12).

Run as root from the repository root, with the test cluster up (tests/cluster/up):

    benches/job_start.py [--payload-mib 1024] [--runs 2]

Pushes an image of busybox plus one --payload-mib MiB file (half random, half text:
benches/stage_store.py's) to the cluster's approved registry, then per run and mode:
empties the node's image cache (`berth prune --all`: the test images are fetched again by
the next test that needs them), drops the page cache, and times, as the test user,

    srun --container-image=IMAGE sh -c 'read up _ </proc/uptime; echo $up'

from srun's start to the clock the first task prints (the kernel's uptime, which a container
shares, in hundredths of a second; busybox's date has no sub-second format): allocation, the job prolog's fetch at
job start (PrologFlags=Alloc), the step's launch and the container's start. Modes:

- no store: the node pulls and converts the image (every node of a job without a store);
- store, other node: the SIF is already in the shared store (published by a first fetch,
  untimed), so the node copies it and checks its SHA-256 (every node but the first);
- warm: the image already in the node cache.

The store is a directory on this machine's disk (`[store] dir`, added to a copy of the
cluster's berth.toml for the run and taken out again), so its copy runs at local-disk
speed, not NFS's.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch import log, sh  # noqa: E402
from stage_store import push_image  # noqa: E402

CONFIG = "/etc/berth/berth.toml"
STATE = "/run/berth-test/state"


def state(key):
    value = None
    with open(STATE) as f:
        for line in f:
            if line.startswith(key + "="):
                value = line.rstrip("\n").split("=", 1)[1]
    if value is None:
        sys.exit(f"{key} not in {STATE}: is the test cluster up (tests/cluster/up)?")
    return value


def first_task(user, image):
    """Seconds from srun's start to the clock its first task prints."""
    t0 = uptime()
    r = subprocess.run(["runuser", "-u", user, "--", "srun", "-N1", "-n1",
                        f"--container-image={image}", "sh", "-c",
                        "read up _ </proc/uptime; echo $up"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd="/tmp")
    if r.returncode != 0:
        sys.exit(f"srun failed ({r.returncode}):\n{r.stderr}")
    return float(r.stdout.split()[0]) - t0


def uptime():
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def cold():
    sh("berth", "prune", "--all")
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--payload-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    user = state("TEST_USER")
    registry = state("IMAGE_TLS").split("/")[0]
    image = f"{registry}/bench/job-start:v1"
    tmp = tempfile.mkdtemp(prefix="berth-bench-job-start-", dir=args.dir)
    os.chmod(tmp, 0o755)  # the cache's service user reaches the store through it
    store = os.path.join(tmp, "store")
    os.makedirs(store)
    shutil.chown(store, "berth", "berth")
    original = open(CONFIG).read()
    times = {"no store": [], "store, other node": [], "warm": []}
    try:
        push_image(tmp, image, args.payload_mib)
        for run in range(args.runs):
            with open(CONFIG, "w") as f:
                f.write(original)
            cold()
            times["no store"].append(first_task(user, image))
            times["warm"].append(first_task(user, image))
            with open(CONFIG, "w") as f:
                f.write(original + f'\n[store]\ndir = "{store}"\n')
            cold()
            first_task(user, image)  # the first node: pulls, converts, publishes
            cold()
            times["store, other node"].append(first_task(user, image))
            log(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    finally:
        with open(CONFIG, "w") as f:
            f.write(original)
        shutil.rmtree(tmp, ignore_errors=True)
    load = open("/proc/loadavg").read().split()[0]
    print(f"\n{args.payload_mib} MiB payload, medians of {args.runs} (load {load}):\n")
    print("| cold image, job start to first task | time |")
    print("|---|---:|")
    for name, values in times.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} s ({each}) |")


if __name__ == "__main__":
    main()
