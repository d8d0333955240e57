#!/usr/bin/env python3
"""A cold image on a node, with and without the shared image store (issue 12).

Run as root from the repository root:

    benches/stage_store.py [--berth target/release/berth] [--payload-mib 1024] [--runs 2]

Starts its own `docker-registry` (plain HTTP, loopback; benches/fetch.py's) and pushes a
busybox image with one more layer: a --payload-mib MiB file, half random bytes and half
text, so the conversion compresses something. Then, per run, with empty caches:

- no store: `berth fetch` pulls and converts (what every node of a job does without one);
- first node with a store: pulls, converts and publishes to the store;
- every other node with a store: copies the SIF from the store and checks its SHA-256.

That fetch is what stands between a job's start on a node and its first task when the
image is cold (the job prolog starts it at allocation; the first step waits for it). The
store is a local directory here, so the copy runs at local-disk speed, not NFS's.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch import log, sh, start_registry, timed_berth_fetch, write_berth_config  # noqa: E402


def push_image(tmp, ref, payload_mib):
    layout = os.path.join(tmp, "oci")
    root = os.path.join(tmp, "root")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy2("/bin/busybox", os.path.join(root, "bin/busybox"))
    os.symlink("busybox", os.path.join(root, "bin/sh"))
    half = payload_mib // 2
    sh("sh", "-c", f"head -c {half}M /dev/urandom > {root}/payload && "
       f"yes 'a line of text in the payload of the bench image' | head -c {payload_mib - half}M "
       f">> {root}/payload")
    tar = os.path.join(tmp, "layer.tar")
    sh("tar", "--create", "--file", tar, "--directory", root, "--sort=name", "--numeric-owner",
       "--owner=0", "--group=0", ".")
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", f"{layout}:bench")
    sh("umoci", "raw", "add-layer", "--image", f"{layout}:bench", tar)
    sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:bench",
       f"docker://{ref}")
    shutil.rmtree(root)
    shutil.rmtree(layout)
    os.remove(tar)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--payload-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (berth --config is root-only)")
    berth = os.path.abspath(args.berth)
    tmp = tempfile.mkdtemp(prefix="berth-bench-store-", dir=args.dir)
    reg = None
    times = {"no store": [], "store, first node": [], "store, other node": []}
    try:
        reg, port = start_registry(tmp)
        ref = f"127.0.0.1:{port}/bench/store:v1"
        push_image(tmp, ref, args.payload_mib)
        for run in range(args.runs):
            nodes = {}
            for side, store in (("no store", None), ("store, first node", "store"),
                                ("store, other node", "store")):
                node = os.path.join(tmp, f"run{run}-{len(nodes)}")
                os.makedirs(node)
                cfg = write_berth_config(node, port, os.path.join(node, "cache"))
                if store:
                    store_dir = os.path.join(tmp, f"run{run}-store")
                    os.makedirs(store_dir, exist_ok=True)
                    with open(cfg, "a") as f:
                        f.write(f'[store]\ndir = "{store_dir}"\n')
                sh("sync")
                dt, _, err, *_ = timed_berth_fetch([berth, "--config", cfg, "fetch", ref])
                from_store = "from the shared image store" in err
                if from_store != (side == "store, other node"):
                    sys.exit(f"{side}: unexpected source of the image:\n{err}")
                times[side].append(dt)
                nodes[side] = node
                log(f"run {run}: {side}: {dt:.1f} s")
            for node in nodes.values():
                shutil.rmtree(node)
            shutil.rmtree(os.path.join(tmp, f"run{run}-store"), ignore_errors=True)
    finally:
        if reg:
            reg.kill()
            reg.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"| cold image ({args.payload_mib} MiB payload) | median | runs |")
    print("|---|---:|---|")
    for side, ts in times.items():
        print(f"| {side} | {statistics.median(ts):.1f} s | "
              f"{', '.join(f'{t:.1f}' for t in ts)} |")


if __name__ == "__main__":
    main()
