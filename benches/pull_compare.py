#!/usr/bin/env python3
"""Cold pull + convert over a real link: berth with parallel layer downloads, berth one layer
at a time, and `skopeo copy` + `umoci unpack --rootless` + `mksquashfs`, in one run.

Run as root from the repository root (issue 11):

    benches/pull_compare.py [--berth target/release/berth] [--runs 3] [--parallel 4]
                            [--rate-mbs 100] [--image-dir /var/tmp/berth-bench-image]
                            [--work-dir /var/tmp] [--fs-size 3G]

The image is fetch.py's 5-layer benchmark image (built once, cached in --image-dir). The
registry (Debian's `docker-registry`, plain HTTP) runs in a network namespace of its own,
reached over a veth pair, so every byte crosses a network device: first at full speed, then
slowed to --rate-mbs MB/s with `tc` (a token bucket on the registry's side of the veth, the
direction towards the client; all connections share it, like a node's share of a link).
Per link setting and run, interleaved (the order rotates each run), each side on a fresh
loop-mounted ext4 (fetch.py's protocol, for the same reason): berth `fetch` with
`[registry] parallel_downloads` = --parallel, the same with 1, and the alternative pipeline
with berth's mksquashfs flags. Prints a Markdown table of medians and ratios.
"""

import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("fetch_bench", os.path.join(HERE, "fetch.py"))
fb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fb)

NETNS = f"berth-bench-{os.getpid()}"
HOST_IF, NS_IF = f"bbh{os.getpid() % 100000}", f"bbn{os.getpid() % 100000}"
HOST_IP, NS_IP = "10.203.77.1", "10.203.77.2"
PORT = 5000
TAGS = {}  # side -> the short name of its filesystems


def ns(*args, **kw):
    return fb.sh("ip", "netns", "exec", NETNS, *args, **kw)


def make_link():
    fb.sh("ip", "netns", "add", NETNS)
    fb.sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    fb.sh("ip", "link", "set", NS_IF, "netns", NETNS)
    fb.sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
    fb.sh("ip", "link", "set", HOST_IF, "up")
    ns("ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
    ns("ip", "link", "set", NS_IF, "up")
    ns("ip", "link", "set", "lo", "up")


def set_rate(mbs):
    """Limits the registry's sending side to mbs MB/s; None: no limit."""
    subprocess.run(["ip", "netns", "exec", NETNS, "tc", "qdisc", "del", "dev", NS_IF, "root"],
                   stderr=subprocess.DEVNULL)
    if mbs:
        ns("tc", "qdisc", "add", "dev", NS_IF, "root", "tbf", "rate", f"{int(mbs * 8)}mbit",
           "burst", "1mb", "latency", "100ms")


def remove_link():
    subprocess.run(["ip", "link", "del", HOST_IF], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "del", NETNS], stderr=subprocess.DEVNULL)


def start_registry(tmp):
    cfg = os.path.join(tmp, "registry.yml")
    with open(cfg, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {tmp}/registry\n"
                f"http:\n  addr: {NS_IP}:{PORT}\n")
    log = open(os.path.join(tmp, "registry.log"), "wb")
    proc = subprocess.Popen(["ip", "netns", "exec", NETNS, "docker-registry", "serve", cfg],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://{NS_IP}:{PORT}/v2/", timeout=1).read()
            return proc
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start; see {tmp}/registry.log")
            time.sleep(0.1)


def berth_config(path, cache_dir, parallel):
    with open(path, "w") as f:
        f.write(f"[policy]\nallowed = [\"{NS_IP}:{PORT}/*\"]\nplain_http = [\"{NS_IP}:{PORT}\"]\n"
                f"[cache]\ndir = \"{cache_dir}\"\nmax_size = \"10G\"\n"
                f"[registry]\nparallel_downloads = {parallel}\ntimeout_secs = 60\n"
                f"certs_dir = \"{os.path.dirname(path)}/certs.d\"\n"
                f"auth_file = \"{os.path.dirname(path)}/auth.json\"\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--rate-mbs", type=float, default=100.0)
    ap.add_argument("--image-dir", default="/var/tmp/berth-bench-image")
    ap.add_argument("--work-dir", default="/var/tmp")
    ap.add_argument("--fs-size", default="3G")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, loop mounts, berth --config)")
    berth = os.path.abspath(a.berth)
    fb.build_image(a.image_dir)
    layout = os.path.join(a.image_dir, "oci")
    nlayers, layer_bytes = fb.layout_facts(layout)
    fs_size = int(a.fs_size[:-1]) << {"K": 10, "M": 20, "G": 30}[a.fs_size[-1].upper()]
    tmp = tempfile.mkdtemp(prefix="berth-bench-pullcmp-", dir=a.work_dir)
    fresh = fb.FreshFs(a.work_dir, tmp, fs_size)
    registry = None

    def on_term(signum, frame):  # unwind through the finally below
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        make_link()
        registry = start_registry(tmp)
        ref = f"{NS_IP}:{PORT}/bench/big:latest"
        fb.timed(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:bench",
                  f"docker://{ref}"])
        mounted = {}

        def fresh_dir(side):
            if side in mounted:
                fresh.release(mounted.pop(side))
            mounted[side] = fresh.make(TAGS[side])
            fb.sh("sync")  # the previous measurement's writeback is not billed to this one
            return mounted[side]

        def run_berth(side, parallel):
            cfg = os.path.join(tmp, f"berth-{parallel}.toml")
            berth_config(cfg, os.path.join(fresh_dir(side), "cache"), parallel)
            dt, _, _, _, phases = fb.timed_berth_fetch([berth, "--config", cfg, "fetch", ref])
            return dt, phases

        def run_alt(side):
            work = os.path.join(fresh_dir(side), "work")
            os.makedirs(work)
            copy, _ = fb.timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                f"docker://{ref}", f"oci:{work}/oci:bench"])
            unpack, _ = fb.timed(["umoci", "unpack", "--rootless", "--image",
                                  f"{work}/oci:bench", f"{work}/bundle"])
            squash, _ = fb.timed(["mksquashfs", f"{work}/bundle/rootfs", f"{work}/out.sqfs"]
                                 + fb.MKSQUASHFS_FLAGS)
            return copy + unpack + squash, {"pull": copy, "unpack": unpack, "squash": squash}

        sides = [(f"berth parallel_downloads={a.parallel}", lambda s: run_berth(s, a.parallel)),
                 ("berth parallel_downloads=1", lambda s: run_berth(s, 1)),
                 ("skopeo + umoci + mksquashfs", run_alt)]
        TAGS.update(zip((name for name, _ in sides), ("parallel", "sequential", "alt")))
        links = [("veth, full speed", None), (f"veth, tc tbf {a.rate_mbs:g} MB/s", a.rate_mbs)]
        results = {}
        for link, rate in links:
            set_rate(rate)
            for i in range(a.runs):
                for side, run in sides[i % 3:] + sides[:i % 3]:
                    dt, phases = run(side)
                    results.setdefault((link, side), []).append((dt, phases))
                    shown = " ".join(f"{k} {v:.2f}" for k, v in (phases or {}).items())
                    fb.log(f"{link}, run {i + 1}: {side} {dt:.2f} s ({shown})")
        med = statistics.median
        print(f"\nfetch.py's image: {nlayers} layers, {fb.mib(layer_bytes):.0f} MiB of gzip "
              f"layers; {fb.CPUS} CPUs; medians of {a.runs} cold runs, interleaved, each on a "
              f"fresh {a.fs_size} ext4\n")
        print("| link | side | total s (median) | pull / unpack / squash s | all runs | "
              "alternative / this |")
        print("|---|---|---:|---|---|---:|")
        for link, _ in links:
            alt = med(t for t, _ in results[(link, sides[2][0])])
            for side, _ in sides:
                runs = results[(link, side)]
                total = med(t for t, _ in runs)
                ph = [p for _, p in runs if p]
                phases = " / ".join(f"{med(p[k] for p in ph):.2f}"
                                    for k in ("pull", "unpack", "squash")) if ph else ""
                print(f"| {link} | {side} | {total:.2f} | {phases} | "
                      f"{', '.join(f'{t:.2f}' for t, _ in runs)} | {alt / total:.2f}x |")
    finally:
        if registry is not None:
            registry.kill()
            registry.wait()
        remove_link()
        fresh.release_all()
        if not fresh.live:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
