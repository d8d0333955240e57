#!/usr/bin/env python3
"""What a container adds to a Slurm step: `srun --container=IMG true` against `srun true`.

Run as root from the repository root against the running test cluster (`tests/cluster/up`);
every srun runs as the test user:

    benches/srun.py [--runs 25] [--task-runs 10] [--tasks 1,2,4,8,16,32] [--image IMG]

Two measurements, each interleaved round by round (the order rotating every round) so that
drift on the machine hits bare and container runs alike:

1. per step: `srun true`, `srun --container=IMG true` (Slurm's own option, which berth takes
   over) and `srun --container-image=IMG true` (berth's), `--runs` rounds;
2. per task: `srun -n N true` bare and with a container (the two options alternating), for
   each N of `--tasks`, `--task-runs` rounds; `--overcommit` where N exceeds the node's CPUs.
   The per-task cost is the slope of a least-squares line through the medians over N >= 2
   (Slurm itself adds ~100 ms between a step's first and second task exit, so N = 1 sits off
   any line through the rest).

The image is pulled into the node cache before anything is timed (the figures are warm
cache figures). Prints Markdown tables for docs/BENCHMARKS.md.
"""

import argparse
import os
import pwd
import statistics
import subprocess
import sys
import time

STATE_FILE = "/run/berth-test/state"


def cluster_state():
    try:
        with open(STATE_FILE) as fh:
            state = dict(line.rstrip("\n").split("=", 1) for line in fh if "=" in line)
    except OSError as e:
        sys.exit(f"cluster is not up ({e}): run tests/cluster/up")
    if state.get("READY") != "1":
        sys.exit(f"{STATE_FILE} has no READY=1: tests/cluster/up did not finish")
    return state


class User:
    """Runs commands as the test user, with a clean environment, from its home directory."""

    def __init__(self, name):
        pw = pwd.getpwnam(name)
        self.pw = pw
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": pw.pw_dir,
                    "USER": name, "LOGNAME": name}

    def run(self, args):
        return subprocess.run(args, env=self.env, cwd=self.pw.pw_dir, user=self.pw.pw_uid,
                              group=self.pw.pw_gid, extra_groups=[],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def timed(self, args):
        t0 = time.perf_counter_ns()
        r = self.run(args)
        t1 = time.perf_counter_ns()
        if r.returncode != 0:
            sys.exit(f"failed ({r.returncode}): {' '.join(args)}\n{r.stderr.decode()}")
        return (t1 - t0) / 1e6


def node_cpus():
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], check=True, capture_output=True,
                         text=True).stdout.split()
    return min(int(c) for c in out)


def interleaved(user, variants, rounds):
    """Times each variant (name -> argv) once per round, rotating the order; name -> [ms]."""
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(user.timed(variants[name]))
    return times


def slope(xs, ys):
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=25, help="rounds of the per-step comparison")
    ap.add_argument("--task-runs", type=int, default=10, help="rounds per task count")
    ap.add_argument("--tasks", default="1,2,4,8,16,32", help="task counts, comma-separated")
    ap.add_argument("--image", help="image reference (default: the cluster's approved one)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (srun runs as the test user)")
    state = cluster_state()
    user = User(state["TEST_USER"])
    image = args.image or state["IMAGE_TLS"]
    cpus = node_cpus()
    counts = [int(n) for n in args.tasks.split(",")]
    if len([n for n in counts if n >= 2]) < 2:
        sys.exit("--tasks needs at least two counts >= 2 for a slope")

    # Warm: the image in the node cache, srun's and slurmstepd's binaries in the page cache.
    for _ in range(3):
        user.timed(["srun", f"--container-image={image}", "true"])
        user.timed(["srun", "true"])

    step = interleaved(user, {
        "bare": ["srun", "true"],
        "--container": ["srun", f"--container={image}", "true"],
        "--container-image": ["srun", f"--container-image={image}", "true"],
    }, args.runs)
    bare = statistics.median(step["bare"])
    print(f"Per step: {args.runs} rounds, image {image}, node CPUs {cpus}\n")
    print("| srun | median ms | p90 ms | minus bare ms |")
    print("|---|---:|---:|---:|")
    for name, ms in step.items():
        med = statistics.median(ms)
        p90 = statistics.quantiles(ms, n=10)[-1]
        label = "`srun true`" if name == "bare" else f"`srun {name}=IMG true`"
        print(f"| {label} | {med:.1f} | {p90:.1f} | {med - bare:+.1f} |")

    medians = {"bare": {}, "container": {}}
    for n in counts:
        base = ["srun", "-n", str(n)] + (["--overcommit"] if n > cpus else [])
        runs = {"bare": [], "container": []}
        for r in range(args.task_runs):
            # Both spellings of the request, each as often first as second.
            option = "--container" if (r // 2) % 2 else "--container-image"
            order = [("bare", base + ["true"]),
                     ("container", base + [f"{option}={image}", "true"])]
            for name, argv in order[::-1] if r % 2 else order:
                runs[name].append(user.timed(argv))
        for k in runs:
            medians[k][n] = statistics.median(runs[k])
    print(f"\nPer task: {args.task_runs} rounds per N; --overcommit for N > {cpus}\n")
    print("| N | bare ms | container ms | difference ms |")
    print("|---:|---:|---:|---:|")
    for n in counts:
        b, c = medians["bare"][n], medians["container"][n]
        print(f"| {n} | {b:.1f} | {c:.1f} | {c - b:+.1f} |")
    xs = [n for n in counts if n >= 2]
    sb = slope(xs, [medians["bare"][n] for n in xs])
    sc = slope(xs, [medians["container"][n] for n in xs])
    print(f"| slope over N >= 2, ms/task | {sb:.2f} | {sc:.2f} | {sc - sb:+.2f} |")


if __name__ == "__main__":
    main()
