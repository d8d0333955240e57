#!/usr/bin/env python3
"""What binding GPUs adds to a container's start: `--gres=gpu:4` against no GPU.

Run as root from the repository root against the running test cluster (`tests/cluster/up`,
whose four GPUs and driver are fake: tests/cluster/fake-gpu); every command runs as the
test user:

    benches/gpu.py [--runs 25] [--image IMG] [--berth BIN]

Two measurements, each interleaved round by round (the order rotating every round):

1. per step: `srun --container-image=IMG true` with and without `--gres=gpu:4`, and bare
   `srun true` with and without it (what Slurm's own gres handling costs: device cgroup
   rules, environment);
2. per container, without Slurm's noise: `berth exec --gpus=0,1,2,3 SIF true` against
   `berth exec SIF true` on the cached SIF of the same image;
3. discovery alone (gres.conf, ld.so cache, device nodes, CDI directories, the spec edit):
   the same two with `--print-spec`, which stops before assembly.

With GPUs a container gets 4 GPU nodes, the control and uvm nodes, the fake driver's
libraries (bound read-only), nvidia-smi and a generated ld.so.cache; both sides get the
fabric nodes. Prints Markdown tables for docs/BENCHMARKS.md.
"""

import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from srun import User, cluster_state, interleaved  # noqa: E402


def table(title, times, base):
    print(f"{title}\n")
    print("| variant | median ms | p90 ms | minus first row ms |")
    print("|---|---:|---:|---:|")
    ref = statistics.median(times[base])
    for name, ms in times.items():
        med = statistics.median(ms)
        p90 = statistics.quantiles(ms, n=10)[-1]
        print(f"| {name} | {med:.1f} | {p90:.1f} | {med - ref:+.1f} |")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=25, help="rounds of each comparison (>= 20)")
    ap.add_argument("--image", help="image reference (default: the cluster's approved one)")
    ap.add_argument("--berth", help="the berth binary (default: the cluster's BERTH_BIN)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the commands run as the test user)")
    state = cluster_state()
    user = User(state["TEST_USER"])
    image = args.image or state["IMAGE_TLS"]
    args.berth = args.berth or state["BERTH_BIN"]
    sif = subprocess.run([args.berth, "fetch", image], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    for _ in range(3):
        user.timed(["srun", "--gres=gpu:4", f"--container-image={image}", "true"])
        user.timed([args.berth, "exec", "--gpus=0,1,2,3", sif, "true"])

    step = interleaved(user, {
        "`srun true`": ["srun", "true"],
        "`srun --gres=gpu:4 true`": ["srun", "--gres=gpu:4", "true"],
        "`srun --container-image=IMG true`": ["srun", f"--container-image={image}", "true"],
        "`srun --gres=gpu:4 --container-image=IMG true`":
            ["srun", "--gres=gpu:4", f"--container-image={image}", "true"],
    }, args.runs)
    table(f"Per step: {args.runs} rounds, image {image}", step, "`srun true`")
    exec_ = interleaved(user, {
        "`berth exec SIF true`": [args.berth, "exec", sif, "true"],
        "`berth exec --gpus=0,1,2,3 SIF true`": [args.berth, "exec", "--gpus=0,1,2,3", sif,
                                                 "true"],
    }, args.runs)
    table(f"Per container: {args.runs} rounds, {sif}", exec_, "`berth exec SIF true`")
    spec = interleaved(user, {
        "`berth exec --print-spec SIF true`": [args.berth, "exec", "--print-spec", sif, "true"],
        "`berth exec --print-spec --gpus=0,1,2,3 SIF true`":
            [args.berth, "exec", "--print-spec", "--gpus=0,1,2,3", sif, "true"],
    }, args.runs)
    table(f"Discovery only: {args.runs} rounds", spec, "`berth exec --print-spec SIF true`")


if __name__ == "__main__":
    main()
