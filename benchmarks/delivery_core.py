#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The isstreamer_lite authors
"""Delivery-core figures against the documented rate limit, on loopback only.

Four scenarios, each printing its figures next to its target; a summary table
comes last and the exit status is 1 if any target was missed::

    python3 benchmarks/delivery_core.py [--quick] [--only NAME]

drain20k   20,000 events spooled by a child while the server is down, replayed by
           a second child (same key and spool_dir); sink limit 30 requests / 10 s.
sensor500  500 events/s for 20 s at buffer_size=10, then close(60).
burst900   900 events at once, then close() with its default timeout.
cpu20k     client CPU of 20,000 events (no rate limit, sink in its own process)
           against a plain http.client loop; 5 interleaved repeats, medians. Both
           import json and http.client before the CPU baseline.

--quick: smaller versions; --only NAME (repeatable) picks scenarios. Only
127.0.0.1 is contacted: proxy and IS_* variables are removed first.
"""

import argparse
import collections
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import isstreamer_lite  # noqa: E402

KEY = "ist_bench_key_0001"
LIMIT, WINDOW = 30, 10.0
SCENARIOS = ("drain20k", "sensor500", "burst900", "cpu20k")

# Code run by the child processes: argv = [-c, mode, arg...]; prints one JSON line.
CHILD = r'''
import json, sys, time, resource
import http.client
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
mode, args = sys.argv[1], sys.argv[2:]
if mode in ("fill", "drain", "lib"):
    from isstreamer_lite import Streamer
    api, spool, n, wait = args[0], args[1], int(args[2]), float(args[3])
    cpu0, wall0 = cpu(), time.monotonic()
    bucket = "bench-lib" if mode == "lib" else "bench-drain"   # fill and drain share one
    s = Streamer("", bucket, "ist_bench_key_0001", ini_file_location=False,
                 api_base=api, spool_dir=spool, buffer_size=10, handle_sigterm=False)
    for i in range(n if mode != "drain" else 0):
        s.log("v", i)
    ok = s.close(wait)
    used, wall = cpu() - cpu0, time.monotonic() - wall0
    st = s.stats()
    print(json.dumps({"close": ok, "cpu": used, "wall": wall, "spooled": st["spooled"],
                      "delivered": st["delivered"], "replayed": st["replayed"],
                      "requests": st["requests"], "dropped": st["dropped"]}))
else:                                   # "base": the plain standard-library loop
    host, port, n = args[0], int(args[1]), int(args[2])
    headers = {"Content-Type": "application/json", "X-IS-AccessKey": "ist_bench_key_0001",
               "X-IS-BucketKey": "bench-base", "Accept-Version": "~0",
               "User-Agent": "isstreamer_lite/1.0.0 Python/%d.%d" % sys.version_info[:2]}
    cpu0, wall0 = cpu(), time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    ok = 0
    for start in range(0, n, 10):
        events = [{"key": "v", "value": i, "epoch": time.time()}
                  for i in range(start, min(n, start + 10))]
        conn.request("POST", "/api/events", json.dumps(events), headers)
        response = conn.getresponse()
        response.read()
        ok += 200 <= response.status < 300
    conn.close()
    print(json.dumps({"cpu": cpu() - cpu0, "wall": time.monotonic() - wall0,
                      "requests_ok": ok, "requests": (n + 9) // 10}))
'''


def clean_environment():
    """Drop proxy and IS_* variables here, so in-process Streamers stay on loopback."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name.startswith("IS_"):
            del os.environ[name]


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") \
        else REPO
    return env


def start_child(mode, *args):
    cmd = [sys.executable, "-c", CHILD, mode] + [str(a) for a in args]
    return subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)


def finish_child(proc, timeout):
    """The child's JSON line as a dict ({} if it failed); kills it after ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        print("    child %s killed after %.0f s" % (proc.args[3], timeout))
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print("    child %s exited %s: %s" % (proc.args[3], proc.returncode, err[-500:]))
        return {}
    return json.loads(lines[-1])


def closed_port_url():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return "http://127.0.0.1:%d" % port


class Watcher(threading.Thread):
    """Follows a sink's events: when each unique "v" value arrived (bounded)."""

    def __init__(self, sink, count, limit):
        threading.Thread.__init__(self, daemon=True)
        self.sink, self.count, self.limit = sink, count, limit
        self.seen, self.index = set(), 0
        self.full_at = self.last_at = None
        self.stopping = threading.Event()

    def run(self):
        deadline = time.monotonic() + self.limit
        while not self.stopping.is_set() and time.monotonic() < deadline:
            with self.sink.changed:
                new = self.sink.events[self.index:]
            self.index += len(new)
            before = len(self.seen)
            self.seen.update(e["value"] for _, e in new if e.get("key") == "v")
            if len(self.seen) > before:
                self.last_at = time.monotonic()
            if len(self.seen) >= self.count and self.full_at is None:
                self.full_at = self.last_at
                return
            self.stopping.wait(0.01)

    def stop(self):
        self.stopping.set()
        self.join(5)


def tally(sink, n, *more):
    """(unique values of 0..n-1 received, duplicates, missing) from the sinks' events."""
    values = collections.Counter()
    for one in (sink,) + more:
        with one.changed:
            values.update(e["value"] for _, e in one.events if e.get("key") == "v")
    unique = sum(1 for i in range(n) if values[i])
    duplicates = sum(c - 1 for c in values.values() if c > 1)
    return unique, duplicates, n - unique


class Report(object):
    def __init__(self):
        self.rows = []

    def figure(self, scenario, name, value, target=None, met=None):
        print("  %-34s %-28s %s" % (name, value, "(target: %s)" % target if target else ""))
        if target is not None:
            self.rows.append((scenario, "%s = %s" % (name, value), target, met))


def seconds(value):
    return "not reached" if value is None else "%.2f s" % value


def drain20k(report, quick):
    n = 2000 if quick else 20000
    spool = tempfile.mkdtemp(prefix="isl-bench-drain-")
    sink = isstreamer_lite._Sink(host="127.0.0.1", port=0, rate_limit=LIMIT, window=WINDOW)
    try:
        started = time.monotonic()
        filled = finish_child(start_child("fill", closed_port_url(), spool, n, 30), 90)
        print("  first child (server down): %.1f s, close() -> %s, spooled %s, dropped %s"
              % (time.monotonic() - started, filled.get("close"), filled.get("spooled"),
                 filled.get("dropped")))
        sink.start()
        watcher = Watcher(sink, n, 80)
        watcher.start()
        started = time.monotonic()
        drained = finish_child(start_child("drain", sink.url, spool, 0, 60), 90)
        exited = time.monotonic() - started
        watcher.join(1.0 if watcher.full_at is None else 0.1)
        watcher.stop()
        sink.stop()
        # Not measured: what is still spooled goes to an unlimited sink, to tell
        # "not delivered yet" from "lost".
        recovery = isstreamer_lite._Sink(host="127.0.0.1", port=0).start()
        if len(watcher.seen) < n:
            finish_child(start_child("drain", recovery.url, spool, 0, 60), 90)
        recovery.stop()
    finally:
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)
    unique, duplicates, missing = tally(sink, n)
    lost = tally(sink, n, recovery)[2]
    took = None if watcher.full_at is None else watcher.full_at - started
    report.figure("drain20k", "delivered (unique of %d)" % n, unique, "all %d" % n,
                  missing == 0)
    report.figure("drain20k", "still spooled (sent afterwards)", missing - lost)
    report.figure("drain20k", "lost (in neither sink)", lost, "0", lost == 0)
    report.figure("drain20k", "duplicates", duplicates)
    report.figure("drain20k", "second child start -> all in sink", seconds(took),
                  "<= 10 s", took is not None and took <= 10.0)
    report.figure("drain20k", "requests (events API + buckets)", sink.requests)
    report.figure("drain20k", "429 answers", sink.rate_limited, "<= 1", sink.rate_limited <= 1)
    report.figure("drain20k", "second child exit after", "%.2f s" % exited)
    report.figure("drain20k", "second child close(60) returned", drained.get("close"))
    report.figure("drain20k", "second child stats replayed", drained.get("replayed"))


def limited_sink_and_streamer(name, **options):
    """A spool folder, a sink enforcing the documented limit, and a Streamer for it."""
    spool = tempfile.mkdtemp(prefix="isl-bench-%s-" % name)
    sink = isstreamer_lite._Sink(host="127.0.0.1", port=0, rate_limit=LIMIT, window=WINDOW)
    sink.start()
    streamer = isstreamer_lite.Streamer(
        "", "bench-" + name, KEY, ini_file_location=False, api_base=sink.url,
        spool_dir=spool, handle_sigterm=False, **options)
    return spool, sink, streamer


def sensor500(report, quick):
    duration, rate = (5 if quick else 20), 500
    n = duration * rate + 1
    budget = duration + 5.0
    spool, sink, streamer = limited_sink_and_streamer("sensor", buffer_size=10)
    try:
        watcher = Watcher(sink, n, duration + 90)
        watcher.start()
        started = time.monotonic()
        for i in range(n):
            due = started + i / float(rate)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            streamer.log("v", i)
        logged = time.monotonic() - started
        result = streamer.close(60)
        closed = time.monotonic() - started
        stats = streamer.stats()
        watcher.join(0.5 if watcher.full_at is None else 0.1)
        watcher.stop()
    finally:
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)
    unique, duplicates, lost = tally(sink, n)
    last = watcher.full_at if watcher.full_at is not None else watcher.last_at
    last = None if last is None else last - started
    report.figure("sensor500", "logging took (paced)", "%.2f s" % logged)
    report.figure("sensor500", "delivered (unique of %d)" % n, unique, "all %d" % n, lost == 0)
    report.figure("sensor500", "duplicates", duplicates)
    report.figure("sensor500", "start -> last event in sink", seconds(last),
                  "<= %.0f s, all delivered" % budget,
                  lost == 0 and last is not None and last <= budget)
    report.figure("sensor500", "429 answers", sink.rate_limited, "<= 1", sink.rate_limited <= 1)
    report.figure("sensor500", "close(60) returned", result, "True", result is True)
    report.figure("sensor500", "close() returned after", "%.2f s" % closed)
    report.figure("sensor500", 'stats()["spooled"]', stats["spooled"])
    report.figure("sensor500", "requests", sink.requests)


def burst900(report, quick):
    n = 450 if quick else 900
    spool, sink, streamer = limited_sink_and_streamer("burst")
    try:
        started = time.monotonic()
        for i in range(n):
            streamer.log("v", i)
        result = streamer.close()
        elapsed = time.monotonic() - started
        stats = streamer.stats()
        unique, duplicates, lost = tally(sink, n)
    finally:
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)
    report.figure("burst900", "delivered by close() (unique)", unique, "all %d" % n, lost == 0)
    report.figure("burst900", "duplicates", duplicates)
    report.figure("burst900", 'stats()["spooled"]', stats["spooled"], "0",
                  stats["spooled"] == 0)
    report.figure("burst900", "429 answers", sink.rate_limited, "<= 1", sink.rate_limited <= 1)
    report.figure("burst900", "close() returned", result)
    report.figure("burst900", "elapsed (log + close())", "%.2f s" % elapsed)
    report.figure("burst900", "requests", sink.requests)


def start_sink_process():
    """`python -m isstreamer_lite sink --port 0 --quiet`; returns (process, url or None)."""
    proc = subprocess.Popen([sys.executable, "-m", "isstreamer_lite", "sink", "--port", "0",
                             "--quiet"], env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    first = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(15)
    match = re.search(r"on (http://127\.0\.0\.1:(\d+))", first[0] if first else "")
    if match is None or match.group(2) == "0":
        return proc, None
    return proc, match.group(1)


def stop_sink_process(proc):
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return out.strip().splitlines()[-1] if out.strip() else "(no summary)"


def cpu20k(report, quick):
    n, repeats = (5000, 3) if quick else (20000, 5)
    proc, url = start_sink_process()
    runs = {"lib": [], "base": []}
    try:
        if url is None:
            print("  the sink process did not print a URL with a real port")
            report.figure("cpu20k", "library/baseline CPU ratio", "no sink", "<= 1.0", False)
            return
        print("  sink process at %s (pid %d)" % (url, proc.pid))
        port = url.rsplit(":", 1)[1]
        for repeat in range(repeats):
            order = ("lib", "base") if repeat % 2 == 0 else ("base", "lib")
            for mode in order:
                spool = tempfile.mkdtemp(prefix="isl-bench-cpu-")
                try:
                    args = (url, spool, n, 60) if mode == "lib" else ("127.0.0.1", port, n)
                    result = finish_child(start_child(mode, *args), 120)
                finally:
                    shutil.rmtree(spool, ignore_errors=True)
                runs[mode].append(result)
                print("    run %d %-4s cpu %.3f s wall %.3f s %s" % (
                    repeat + 1, mode, result.get("cpu", float("nan")),
                    result.get("wall", float("nan")),
                    "close() %s delivered %s replayed %s spooled %s requests %s" % (
                        result.get("close"), result.get("delivered"), result.get("replayed"),
                        result.get("spooled"), result.get("requests")) if mode == "lib" else
                    "2xx %s/%s" % (result.get("requests_ok"), result.get("requests"))))
    finally:
        print("  sink process: %s" % stop_sink_process(proc))
    lib = [r["cpu"] for r in runs["lib"] if "cpu" in r]
    base = [r["cpu"] for r in runs["base"] if "cpu" in r]
    complete = all(r.get("close") and r.get("delivered", 0) + r.get("replayed", 0) == n
                   for r in runs["lib"]) and \
        all(r.get("requests_ok") == r.get("requests") for r in runs["base"])
    if not lib or not base:
        report.figure("cpu20k", "library/baseline CPU ratio", "no data", "<= 1.0", False)
        return
    ratio = statistics.median(lib) / statistics.median(base)
    report.figure("cpu20k", "library CPU median (%d runs)" % len(lib),
                  "%.3f s" % statistics.median(lib))
    report.figure("cpu20k", "baseline CPU median (%d runs)" % len(base),
                  "%.3f s" % statistics.median(base))
    report.figure("cpu20k", "every run delivered all %d" % n, complete, "True", complete)
    report.figure("cpu20k", "library/baseline CPU ratio", "%.2f" % ratio, "<= 1.0",
                  ratio <= 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller, faster variants")
    parser.add_argument("--only", action="append", choices=SCENARIOS, metavar="NAME",
                        help="run only this scenario (repeatable): " + ", ".join(SCENARIOS))
    args = parser.parse_args()
    clean_environment()
    report = Report()
    print("isstreamer_lite %s from %s, Python %s%s" % (
        isstreamer_lite.__version__, isstreamer_lite.__file__, sys.version.split()[0],
        ", quick" if args.quick else ""))
    for name in SCENARIOS:
        if args.only and name not in args.only:
            continue
        print("\n== %s" % name)
        began = time.monotonic()
        globals()[name](report, args.quick)
        print("  (scenario took %.1f s)" % (time.monotonic() - began))
    print("\n%-10s %-58s %-24s %s" % ("scenario", "figure", "target", "met"))
    for scenario, figure, target, met in report.rows:
        print("%-10s %-58s %-24s %s" % (scenario, figure, target, "yes" if met else "no"))
    missed = sorted(set(row[0] for row in report.rows if not row[3]))
    print("\nmissed: %s" % (", ".join(missed) if missed else "none"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
