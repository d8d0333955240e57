#!/usr/bin/env python3
"""Parallel against sequential layer downloads: cold `berth fetch` over a throttled link.

Run as root from the repository root (issue 11):

    benches/pull_parallel.py [--berth target/release/berth] [--runs 3] [--layers 4]
                             [--layer-mib 32] [--conn-mbps 25] [--parallel 1,4]

--conn-mbps 0: no throttle (loopback speed).
Starts its own `docker-registry` (plain HTTP, loopback, temp dir) and in front of it a
throttling TCP proxy that limits every connection to --conn-mbps MB/s towards the client
(what a per-flow limit, a long-latency link or a shared uplink does to one connection).
Pushes a --layers layer image of random (incompressible) --layer-mib MiB files with umoci
and skopeo, then times cold `berth fetch` (empty cache each run) through the proxy with
`[registry] parallel_downloads` set to each value of --parallel, runs interleaved. The time
includes the unpack and the SIF build, which are the same for every setting.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def sh(*args, **kw):
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throttle_proxy(listen_port, target_port, bytes_per_s):
    """A TCP proxy on listen_port to target_port, each connection's downstream limited."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(64)

    def pump(src, dst, limit):
        start, sent = time.monotonic(), 0
        try:
            while True:
                data = src.recv(64 << 10)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
                if limit:
                    ahead = sent / limit - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept():
        while True:
            client, _ = server.accept()
            upstream = socket.create_connection(("127.0.0.1", target_port))
            threading.Thread(target=pump, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, bytes_per_s), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--berth", default="target/release/berth")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--layer-mib", type=int, default=32)
    p.add_argument("--conn-mbps", type=float, default=25.0)
    p.add_argument("--parallel", default="1,4")
    a = p.parse_args()
    berth = os.path.abspath(a.berth)
    settings = [int(x) for x in a.parallel.split(",")]
    work = tempfile.mkdtemp(prefix="berth-bench-pull-", dir="/var/tmp")
    registry = None
    try:
        reg_port, proxy_port = free_port(), free_port()
        with open(f"{work}/registry.yml", "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {work}/storage\nhttp:\n  addr: 127.0.0.1:{reg_port}\n")
        log = open(f"{work}/registry.log", "w")
        registry = subprocess.Popen(["docker-registry", "serve", f"{work}/registry.yml"],
                                    stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", reg_port)).close()
                break
            except OSError:
                time.sleep(0.1)
        layout = f"{work}/oci"
        sh("umoci", "init", "--layout", layout)
        sh("umoci", "new", "--image", f"{layout}:bench")
        for i in range(a.layers):
            d = f"{work}/layer{i}"
            os.makedirs(d)
            with open(f"{d}/random{i}", "wb") as f:
                f.write(os.urandom(a.layer_mib << 20))
            sh("tar", "--numeric-owner", "--owner=0", "--group=0", "-C", d, "-cf",
               f"{work}/layer{i}.tar", f"random{i}")
            sh("umoci", "raw", "add-layer", "--image", f"{layout}:bench", f"{work}/layer{i}.tar")
        sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:bench",
           f"docker://127.0.0.1:{reg_port}/bench/pull:latest")
        throttle_proxy(proxy_port, reg_port, a.conn_mbps * 1e6)
        image = f"127.0.0.1:{proxy_port}/bench/pull:latest"
        times = {n: [] for n in settings}
        for run in range(a.runs):
            order = settings if run % 2 == 0 else list(reversed(settings))
            for n in order:
                cache = f"{work}/cache-{n}"
                shutil.rmtree(cache, ignore_errors=True)
                config = f"{work}/berth-{n}.toml"
                with open(config, "w") as f:
                    f.write(f"[policy]\nallowed = [\"127.0.0.1:{proxy_port}/*\"]\n"
                            f"plain_http = [\"127.0.0.1:{proxy_port}\"]\n"
                            f"[cache]\ndir = \"{cache}\"\n"
                            f"[registry]\nparallel_downloads = {n}\ntimeout_secs = 60\n")
                sh("sync")
                t0 = time.monotonic()
                sh(berth, "--config", config, "fetch", "--quiet", image, stdout=subprocess.DEVNULL)
                times[n].append(time.monotonic() - t0)
        total_mb = a.layers * (a.layer_mib << 20) / 1e6
        link = f"{a.conn_mbps:g} MB/s per connection" if a.conn_mbps else "unthrottled"
        print(f"{a.layers} layers x {a.layer_mib} MiB random ({total_mb:.0f} MB), {link}, "
              f"{a.runs} runs\n")
        print("| parallel_downloads | cold fetch s (median) | all runs |")
        print("|---:|---:|---|")
        for n in settings:
            runs = ", ".join(f"{t:.2f}" for t in times[n])
            print(f"| {n} | {statistics.median(times[n]):.2f} | {runs} |")
    finally:
        if registry:
            registry.kill()
            registry.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
