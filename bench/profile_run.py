"""Profile one upload workload inside a gunicorn worker (cProfile, optionally py-spy).

    python bench/profile_run.py --workload w2                 # flask-bits, 64 MiB in 64 KiB
    python bench/profile_run.py --workload w1 --target baseline
    python bench/profile_run.py --workload w2 --patched /tmp/fb-patched --out /tmp/w2.prof
    python bench/profile_run.py --workload w2 --py-spy /tmp/w2.collapsed

Runs gunicorn with one gthread worker and one thread (so that one profiler sees every
request), pinned to CPU 1 (the client on CPU 0), uploads the file, then prints the top
functions by own time and by cumulative time, and the worker's CPU time per fragment.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent)]

from client import Client  # noqa: E402
from client import upload  # noqa: E402
from run import BenchServer  # noqa: E402
from run import MiB  # noqa: E402
from run import Variant  # noqa: E402
from run import make_source  # noqa: E402

WORKLOADS = {"w1": (512 * MiB, 8 * MiB), "w2": (64 * MiB, 64 * 1024)}


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
        except (OSError, IndexError, ValueError):
            pass
    return user, system


def by_package(stats: pstats.Stats, fragments: int) -> None:
    """Own time and calls per package (flask_bits modules one by one), per fragment."""
    groups: dict[str, list[float]] = {}
    for (filename, _line, func), (_cc, nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "flask_bits/" in filename:
            key = "flask_bits/" + filename.rsplit("flask_bits/", 1)[1]
        elif "site-packages/" in filename:
            key = filename.rsplit("site-packages/", 1)[1].split("/", 1)[0]
        elif filename == "~":
            key = "builtins: " + func.split(" of ")[0].strip("<>{}")
        else:
            key = "stdlib " + Path(filename).name
        g = groups.setdefault(key, [0.0, 0])
        g[0] += tt
        g[1] += nc
    total = sum(g[0] for g in groups.values())
    print(f"own time by package, per fragment (cProfile; total {total / fragments * 1e6:.0f} µs "
          "per request incl. profiling overhead):")
    for key, (tt, nc) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"  {tt / fragments * 1e6:8.0f} µs {nc / fragments:7.1f} calls  {key}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="w2")
    p.add_argument("--target", choices=("bits", "bits-wsgi", "baseline", "baseline-flask"),
                   default="bits")
    p.add_argument("--size", type=int, default=None, help="bytes (default per workload)")
    p.add_argument("--fragment", type=int, default=None, help="bytes per fragment")
    p.add_argument("--fsync", action="store_true", help="BITS_FSYNC / BASELINE_FSYNC")
    p.add_argument("--patched", default=None, help="folder holding a patched flask_bits")
    p.add_argument("--no-cprofile", action="store_true", help="plain app (CPU time only)")
    p.add_argument("--py-spy", default=None, metavar="FILE",
                   help="also record the worker with py-spy (collapsed stacks) to FILE")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the server (e.g. EXAMPLE_LOG_LEVEL=WARNING)")
    p.add_argument("--out", default=None, help="keep the .prof file here")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()

    if args.patched and not (Path(args.patched) / "flask_bits" / "__init__.py").is_file():
        p.error(f"--patched: no flask_bits package in {args.patched}")
    size, frag = WORKLOADS[args.workload]
    size, frag = args.size or size, args.fragment or frag
    os.sched_setaffinity(0, {0})
    tmp = Path(tempfile.mkdtemp(prefix="flask-bits-profile-"))
    prof = Path(args.out or tmp / "worker.prof").resolve()
    spy = None
    try:
        make_source(tmp / "source.bin", size)
        kind = "B" if args.target.startswith("bits") else "A"
        variant = Variant("P", kind, fsync=args.fsync, pythonpath=args.patched,
                          flask=args.target == "baseline-flask",
                          wsgi=args.target == "bits-wsgi")
        srv = BenchServer(variant, tmp / "srv", workers=1, threads=1, cpu=1)
        srv.env.update(kv.split("=", 1) for kv in args.env)
        if not args.no_cprofile:
            srv.args[-1] = "profile_app:app"
            srv.env.update(PROFILE_TARGET=args.target,
                           PROFILE_OUT=str(prof))
        with srv:
            deadline = time.monotonic() + 30
            while not srv.worker_pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            with Client(srv.port) as c:
                c.post(variant.prefix + "/ping", "Ping")
                if not args.no_cprofile:
                    c.conn.request("GET", "/__profile__/reset")
                    c.conn.getresponse().read()
            pids = srv.worker_pids()
            if args.py_spy:
                spy = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(pids[0]), "--rate", "1000",
                     "--format", "raw", "--output", args.py_spy, "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            u0, s0 = cpu_times(pids)
            fd = os.open(tmp / "source.bin", os.O_RDONLY)
            try:
                with Client(srv.port) as c:
                    res = upload(c, f"{variant.prefix}/profiled.bin", fd, size, frag,
                                 deadline=time.monotonic() + 600)
            finally:
                os.close(fd)
            u1, s1 = cpu_times(pids)
            user, system = u1 - u0, s1 - s0
            cpu = user + system
            if spy is not None:
                spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
                spy.wait(timeout=30)
                spy = None
            if not args.no_cprofile:
                with Client(srv.port) as c:
                    c.conn.request("GET", "/__profile__/dump")
                    c.conn.getresponse().read()
        print(f"{args.target} {args.workload}: {size / MiB:.0f} MiB in {frag // 1024} KiB "
              f"fragments: {res.fragments} fragments in {res.seconds:.2f} s wall, "
              f"worker CPU {cpu:.2f} s = {cpu / res.fragments * 1e6:.0f} µs/fragment "
              f"({user / res.fragments * 1e6:.0f} user + {system / res.fragments * 1e6:.0f} "
              "system), "
              f"{cpu / (size / MiB) * 1e3:.2f} ms/MiB")
        if not args.no_cprofile:
            stats = pstats.Stats(str(prof))
            by_package(stats, res.fragments)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
    finally:
        if spy is not None:
            spy.kill()
            spy.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
