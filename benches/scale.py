#!/usr/bin/env python3
"""What a job costs as it grows from 1 to many nodes (issue 14; docs/SCALE.md).

Run as root from the repository root, under the e2e lock, on the multi-node test cluster:

    /work/e2e-run WORKTREE --up-with "--nodes 4" --cmd "benches/scale.py"
    benches/scale.py [--runs 3] [--payload-mib 32] [--fetchers 1,8,32,64] [--rate-mbs 50]
                     [--skip-slurm] [--skip-fetchers]

1. Through Slurm, as berthtest: `srun -N{1,2,4} --container-image=IMAGE` from srun's start
   to the first task's output line (and to srun's end), cold (an image name no node has
   cached: each run pushes the cluster's busybox plus a --payload-mib MiB random layer under
   a new name) and warm (the same image again), interleaved by node count; and the requests
   the job made to the registry (its access log, by kind). Then the cold case with the shared
   image store ([store] dir added to berth.toml for the run, as tests/e2e/multinode.rs does).
2. Without Slurm, what only shows at scale: K `berth fetch` processes started at once, each
   with its own cache directory (K nodes), all sharing one store, against a registry in a
   network namespace whose link is slowed to --rate-mbs MB/s with `tc` (benches/pull_compare.py's
   veth + tbf); and the same K without the store. Reports wall time to the last fetcher,
   bytes the registry sent (the veth's counter), and the store's lease waits.

Prints Markdown tables. The machine has few cores and is shared: figures are noisy, compare
ratios within one run.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name, file):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fb = load("fetch_bench", "fetch.py")
pc = load("pull_compare", "pull_compare.py")

STATE = "/run/berth-test/state"
NODE_LIST = []  # the cluster's nodes, from the state file
SKOPEO_POLICY = os.path.join(HERE, "..", "tests", "cluster", "templates", "skopeo-policy.json")


def state():
    vals = {}
    with open(STATE) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                vals[k] = v
    return vals


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, **kw)


def build_payload_layout(work, base_ref, mib):
    """An OCI layout `work/oci:big`: base_ref plus one layer of mib MiB of random bytes
    (incompressible, so the image and SIF really are that big)."""
    root = os.path.join(work, "root")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "payload"), "wb") as f:
        f.write(os.urandom(mib << 20))
    run("skopeo", "--policy", SKOPEO_POLICY, "copy", "-q", f"docker://{base_ref}",
        f"oci:{work}/oci:big")
    run("tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-C", root, "-cf",
        f"{work}/layer.tar", "payload")
    run("umoci", "raw", "add-layer", "--image", f"{work}/oci:big", f"{work}/layer.tar")
    return f"{work}/oci:big"


def push(layout, ref, *flags):
    run("skopeo", "--policy", SKOPEO_POLICY, "copy", "-q", *flags, f"oci:{layout}",
        f"docker://{ref}")


def access_requests(text, repo):
    """Registry access-log requests for repo in text, by kind."""
    kinds = {}
    for line in text.splitlines():
        parts = line.split('"')
        if len(parts) < 2 or " HTTP/" not in parts[1]:
            continue
        method, path = parts[1].split()[:2]
        if f"/v2/{repo}/" not in path and path != "/v2/":
            continue
        kind = "ping /v2/" if path == "/v2/" else \
            f"{method} {'blob' if '/blobs/' in path else 'manifest'}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def srun_first_task(nodes, image, home):
    """Runs srun on the first `nodes` nodes as berthtest (named, so the warm run lands where
    the cold one pulled); returns (s to the first task line, s to srun's end)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(["runuser", "-u", "berthtest", "--", "srun", f"-N{nodes}",
                          f"-w{','.join(NODE_LIST[:nodes])}",
                          f"--container-image={image}", "echo", "task"],
                         cwd=home, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = None
    for line in p.stdout:
        if first is None and line.startswith("task"):
            first = time.perf_counter() - t0
    err = p.stderr.read()
    if p.wait() != 0 or first is None:
        raise RuntimeError(f"srun -N{nodes} {image} failed: {err[-2000:]}")
    return first, time.perf_counter() - t0


def slurm_part(a, st):
    registry = f"localhost:{st['REGISTRY_TLS_PORT']}"
    log_path = st["REGISTRY_TLS_LOG"]
    home = st["TEST_HOME"]
    NODE_LIST[:] = st.get("NODE_LIST", st["NODE"]).split(",")
    max_nodes = len(NODE_LIST)
    counts = [n for n in (1, 2, 4, 8, 16) if n <= max_nodes]
    work = tempfile.mkdtemp(prefix="berth-bench-scale-", dir="/var/tmp")
    layout = build_payload_layout(work, st["IMAGE_TLS"], a.payload_mib)
    results = {}
    requests = {}

    def one(case, n, store=None):
        slug = "store" if store else "nodes"
        name = f"test/scale-{os.getpid()}-{slug}-{n}-{time.monotonic_ns()}"
        ref = f"{registry}/{name}:v1"
        push(layout, ref)
        offset = os.path.getsize(log_path)
        conf = st["BERTH_CONFIG"]
        original = open(conf).read()
        if store:
            with open(conf, "a") as f:
                f.write(f'\n[store]\ndir = "{store}"\nlease_secs = 30\n')
        try:
            cold = srun_first_task(n, ref, home)
            warm = srun_first_task(n, ref, home)
        finally:
            with open(conf, "w") as f:
                f.write(original)
        time.sleep(0.5)  # the registry logs a request a moment after answering it
        with open(log_path) as f:
            f.seek(offset)
            kinds = access_requests(f.read(), name)
        results.setdefault((case, n, "cold"), []).append(cold)
        results.setdefault((case, n, "warm"), []).append(warm)
        requests[(case, n)] = kinds
        fb.log(f"{case} N={n}: cold first task {cold[0]:.2f} s, warm {warm[0]:.2f} s, "
               f"registry {kinds}")

    try:
        for i in range(a.runs):
            for n in counts[i % len(counts):] + counts[:i % len(counts)]:
                one("node caches", n)
        store = os.path.join(os.path.dirname(st["REGISTRY_TLS_ROOT"]), f"scale-store-{os.getpid()}")
        os.makedirs(store)
        shutil.chown(store, "berth", "berth")
        try:
            for _ in range(a.runs):
                one("shared store", counts[-1], store=store)
                shutil.rmtree(store)
                os.makedirs(store)
                shutil.chown(store, "berth", "berth")
        finally:
            shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    print(f"\n### Through Slurm: srun -N to the first task ({a.payload_mib} MiB image layer, "
          f"{fb.CPUS} CPUs, medians of {a.runs})\n")
    print("| image cache | nodes | cold: first task s | cold: srun end s | warm: first task s | "
          "warm: srun end s | registry requests (one job, cold + warm step) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for case, n in sorted(requests, key=lambda k: (k[0] != "node caches", k[1])):
        c, w = results[(case, n, "cold")], results[(case, n, "warm")]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(requests[(case, n)].items()))
        print(f"| {case} | {n} | {med(x[0] for x in c):.2f} | {med(x[1] for x in c):.2f} | "
              f"{med(x[0] for x in w):.2f} | {med(x[1] for x in w):.2f} | {kinds} |")


def tx_bytes():
    out = pc.ns("ip", "-s", "-j", "link", "show", pc.NS_IF, capture_output=True, text=True).stdout
    return json.loads(out)[0]["stats64"]["tx"]["bytes"]


def fetchers_part(a, st):
    """K concurrent `berth fetch` with their own caches, with and without a shared store,
    against a tc-slowed registry in a network namespace."""
    berth = a.berth or st["BERTH_BIN"]
    tmp = tempfile.mkdtemp(prefix="berth-bench-fetchers-", dir="/var/tmp")
    registry = None
    rows = []
    try:
        layout = build_payload_layout(os.path.join(tmp, "image"), st["IMAGE_TLS"], a.payload_mib)
        pc.make_link()
        registry = pc.start_registry(tmp)
        ref = f"{pc.NS_IP}:{pc.PORT}/bench/scale:latest"
        push(layout, ref, "--dest-tls-verify=false")
        pc.set_rate(a.rate_mbs)
        for k in a.fetchers:
            for with_store in (True, False):
                if not with_store and k > a.max_no_store:
                    continue  # K full pulls over the slowed link take K times as long
                rows.append(fetch_round(berth, tmp, ref, k, with_store))
    finally:
        if registry is not None:
            registry.kill()
            registry.wait()
        pc.remove_link()
        shutil.rmtree(tmp, ignore_errors=True)
    image_mib = a.payload_mib
    print(f"\n### {', '.join(map(str, a.fetchers))} concurrent `berth fetch` (one per 'node', "
          f"each its own cache), registry behind tc tbf {a.rate_mbs:g} MB/s, "
          f"image ~{image_mib} MiB, {fb.CPUS} CPUs\n")
    print("| fetchers | shared store | wall s (last done) | median fetch s | registry sent MiB | "
          "MiB per fetcher | lease waits | copied from store |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {'yes' if r['store'] else 'no'} | {r['wall']:.2f} | "
              f"{r['median']:.2f} | {r['sent'] / 2**20:.1f} | {r['sent'] / 2**20 / r['k']:.2f} | "
              f"{r['waits']} | {r['copied']} |")


def fetch_round(berth, tmp, ref, k, with_store):
    round_dir = os.path.join(tmp, f"round-{k}-{'store' if with_store else 'nostore'}")
    store = os.path.join(round_dir, "store")
    os.makedirs(store)
    configs = []
    for i in range(k):
        d = os.path.join(round_dir, f"node{i}")
        os.makedirs(d)
        cfg = os.path.join(d, "berth.toml")
        pc.berth_config(cfg, os.path.join(d, "cache"), 4)
        if with_store:
            with open(cfg, "a") as f:
                f.write(f'[store]\ndir = "{store}"\nlease_secs = 30\n')
        configs.append(cfg)
    before = tx_bytes()
    times, errs = [None] * k, [""] * k
    start = threading.Barrier(k + 1)

    def fetch(i):
        start.wait()
        t0 = time.perf_counter()
        p = subprocess.run([berth, "--config", configs[i], "fetch", ref], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"fetcher {i}: {p.stderr[-2000:]}")
        times[i] = time.perf_counter() - t0
        errs[i] = p.stderr

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if any(t is None for t in times):
        raise RuntimeError("a fetcher failed (see above)")
    row = {"k": k, "store": with_store, "wall": wall, "median": statistics.median(times),
           "sent": tx_bytes() - before,
           "waits": sum("another node is converting" in e for e in errs),
           "copied": sum("from the shared image store" in e for e in errs)}
    fb.log(f"{k} fetchers, store={with_store}: {row}")
    shutil.rmtree(round_dir, ignore_errors=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--payload-mib", type=int, default=32)
    ap.add_argument("--fetchers", default="1,8,32,64",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--max-no-store", type=int, default=8,
                    help="largest K also run without the store")
    ap.add_argument("--rate-mbs", type=float, default=50.0)
    ap.add_argument("--berth", help="the berth of part 2 (default: the cluster's)")
    ap.add_argument("--skip-slurm", action="store_true")
    ap.add_argument("--skip-fetchers", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (runuser, network namespaces, the cluster's berth.toml)")
    if not os.path.exists(STATE):
        sys.exit("the test cluster is not up: run through /work/e2e-run ... --up-with \"--nodes 4\"")

    def on_term(signum, frame):  # unwind through the finally blocks
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    st = state()
    if not a.skip_slurm:
        slurm_part(a, st)
    if not a.skip_fetchers:
        fetchers_part(a, st)


if __name__ == "__main__":
    main()
