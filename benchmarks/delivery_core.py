#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The isstreamer_lite authors
"""Delivery-core figures against the documented rate limits, on loopback only.

The scenarios of issue 17, each printing its figures next to its target; a
summary table comes last and the exit status is 1 if any target was missed::

    python3 benchmarks/delivery_core.py [--quick] [--only NAME]

drain2k    2,000 events spooled by a child while the server is down, replayed by a
           second child (same key and spool_dir) against 100 calls / 10 s while it
           logs live events at 2/s: no call over 10, all within 25 s, <= one 429,
           live events within 3 s (p95 within 2 s).
burst900   900 events at once, then close() with no arguments, 30 calls / 10 s:
           all delivered by close(), no call over 10, <= one 429.
steady25   25 events/s for 20 s at 30 calls / 10 s: all delivered by close(10), no 429.
flood200   200 events/s for 10 s, then close(5): False within 8 s, no call over 10,
           nothing lost (the next process delivers the rest).
six        six processes, one access key, 4 events/s each for 30 s, 30 calls / 10 s:
           nothing lost, <= 6 429s, p95 latency <= 5 s.
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
SCENARIOS = ("drain2k", "burst900", "steady25", "flood200", "six", "cpu20k")

# Code run by the child processes: argv = [-c, mode, arg...]; prints one JSON line.
CHILD = r'''
import json, sys, time, resource
import http.client
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
mode, args = sys.argv[1], sys.argv[2:]
if mode == "run":
    # api spool bucket key burst rate seconds wait: log `burst` events at once, then
    # `rate` a second for `seconds`, then close(wait) (close() if wait < 0).
    from isstreamer_lite import Streamer
    api, spool, bucket, key = args[:4]
    burst, rate, seconds, wait = int(args[4]), float(args[5]), float(args[6]), float(args[7])
    cpu0, wall0 = cpu(), time.monotonic()
    s = Streamer("", bucket, "ist_bench_key_0001", ini_file_location=False,
                 api_base=api, spool_dir=spool, buffer_size=10, handle_sigterm=False)
    for i in range(burst):
        s.log(key, i)
    started, i = time.monotonic(), 0
    while rate and time.monotonic() - started < seconds:
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s.log(key, burst + i)
        i += 1
    closing = time.monotonic()
    ok = s.close() if wait < 0 else s.close(wait)
    used, wall = cpu() - cpu0, time.monotonic() - wall0
    st = s.stats()
    print(json.dumps({"close": ok, "cpu": used, "wall": wall, "close_s": wall0 + wall - closing,
                      "logged": burst + i, "spooled": st["spooled"],
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


class CallSink(isstreamer_lite._Sink):
    """A sink (enforcing ``rate_limit`` calls per ``window``) that keeps the size of
    every call and when each accepted event arrived (Unix time)."""

    def __init__(self, rate_limit=None, window=WINDOW):
        isstreamer_lite._Sink.__init__(self, host="127.0.0.1", port=0,
                                       rate_limit=rate_limit, window=window)
        self.sizes, self.arrivals = [], []

    def _add_events(self, handler, data):
        with self.changed:
            self.sizes.append(len(data) if isinstance(data, list) else 1)
            before = len(self.events)
        isstreamer_lite._Sink._add_events(self, handler, data)
        now = time.time()
        with self.changed:
            self.arrivals.extend((now, e) for _, e in self.events[before:])


def tally(sinks, key, n):
    """(unique values of 0..n-1 of ``key`` received, duplicates, missing)."""
    values = collections.Counter()
    for one in sinks:
        with one.changed:
            values.update(e["value"] for _, e in one.events if e.get("key") == key)
    unique = sum(1 for i in range(n) if values[i])
    duplicates = sum(c - 1 for c in values.values() if c > 1)
    return unique, duplicates, n - unique


def latencies(sink, keys):
    """Seconds from log() (the event's epoch) to arrival, for events of ``keys``."""
    with sink.changed:
        return sorted(at - e["epoch"] for at, e in sink.arrivals if e.get("key") in keys)


def p95(values):
    return values[min(len(values) - 1, int(len(values) * 0.95))] if values else None


def recover(spool, bucket, key, n, sinks):
    """Not measured: what is still spooled goes to an unlimited sink, to tell "not
    delivered yet" from "lost". Returns the number lost (in no sink)."""
    if tally(sinks, key, n)[2]:
        extra = CallSink().start()
        finish_child(start_child("run", extra.url, spool, bucket, key, 0, 0, 0, 60), 90)
        extra.stop()
        sinks = list(sinks) + [extra]
    return tally(sinks, key, n)[2]


class Report(object):
    def __init__(self):
        self.rows = []

    def figure(self, scenario, name, value, target=None, met=None):
        print("  %-40s %-24s %s" % (name, value, "(target: %s)" % target if target else ""))
        if target is not None:
            self.rows.append((scenario, "%s = %s" % (name, value), target, met))


def seconds(value):
    return "not reached" if value is None else "%.2f s" % value


def calls_figures(report, scenario, sink, most_429):
    largest = max(sink.sizes) if sink.sizes else 0
    report.figure(scenario, "largest call (events)", largest, "<= 10", largest <= 10)
    report.figure(scenario, "calls to /api/events", len(sink.sizes))
    report.figure(scenario, "429 answers", sink.rate_limited, "<= %d" % most_429,
                  sink.rate_limited <= most_429)


def drain2k(report, quick):
    n, live_rate = (500 if quick else 2000), 2.0
    spool = tempfile.mkdtemp(prefix="isl-bench-drain-")
    sink = CallSink(rate_limit=100)
    try:
        started = time.monotonic()
        filled = finish_child(start_child("run", closed_port_url(), spool, "bench-drain", "v",
                                          n, 0, 0, 2), 90)
        print("  first child (server down): %.1f s, close() -> %s, spooled %s, dropped %s"
              % (time.monotonic() - started, filled.get("close"), filled.get("spooled"),
                 filled.get("dropped")))
        sink.start()
        started = time.time()
        drained = finish_child(start_child("run", sink.url, spool, "bench-drain", "live", 0,
                                           live_rate, 10 if quick else 20, 30), 90)
        sink.stop()
        with sink.changed:
            arrived = [at for at, e in sink.arrivals if e.get("key") == "v"]
        lost = recover(spool, "bench-drain", "v", n, [sink])
    finally:
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)
    unique, duplicates, missing = tally([sink], "v", n)
    took = max(arrived) - started if len(arrived) >= n else None
    live = latencies(sink, ("live",))
    report.figure("drain2k", "backlog delivered (unique of %d)" % n, unique, "all %d" % n,
                  missing == 0)
    report.figure("drain2k", "lost (in no sink)", lost, "0", lost == 0)
    report.figure("drain2k", "duplicates", duplicates)
    report.figure("drain2k", "second child start -> backlog in sink", seconds(took),
                  "<= 25 s", took is not None and took <= 25.0)
    calls_figures(report, "drain2k", sink, 1)
    report.figure("drain2k", "live events (of %s logged)" % drained.get("logged"), len(live),
                  "all", len(live) == drained.get("logged"))
    report.figure("drain2k", "live latency max", seconds(live[-1] if live else None),
                  "<= 3 s", bool(live) and live[-1] <= 3.0)
    report.figure("drain2k", "live latency p95", seconds(p95(live)), "<= 2 s",
                  bool(live) and p95(live) <= 2.0)


def one_process(name, burst, rate, duration, wait, limit=LIMIT):
    """A child logging against a sink of ``limit`` calls per 10 s; (sink, child, lost)."""
    spool = tempfile.mkdtemp(prefix="isl-bench-%s-" % name)
    sink = CallSink(rate_limit=limit).start()
    try:
        child = finish_child(start_child("run", sink.url, spool, "bench-" + name, "v",
                                         burst, rate, duration, wait), 300)
        sink.stop()
        logged = child.get("logged", 0)
        lost = recover(spool, "bench-" + name, "v", logged, [sink])
    finally:
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)
    return sink, child, lost


def burst900(report, quick):
    n = 450 if quick else 900
    sink, child, lost = one_process("burst", n, 0, 0, -1)
    unique = tally([sink], "v", n)[0]
    report.figure("burst900", "delivered by close() (unique)", unique, "all %d" % n,
                  unique == n)
    report.figure("burst900", "close() returned", child.get("close"), "True",
                  child.get("close") is True)
    report.figure("burst900", "close() took", seconds(child.get("close_s")))
    report.figure("burst900", "lost (in no sink)", lost, "0", lost == 0)
    calls_figures(report, "burst900", sink, 1)


def steady25(report, quick):
    duration = 10 if quick else 20
    sink, child, lost = one_process("steady", 0, 25.0, duration, 10)
    logged = child.get("logged", 0)
    unique = tally([sink], "v", logged)[0]
    report.figure("steady25", "delivered by close(10) (of %d)" % logged, unique,
                  "all", logged > 0 and unique == logged and child.get("close") is True)
    report.figure("steady25", "lost (in no sink)", lost, "0", lost == 0)
    report.figure("steady25", "latency p95", seconds(p95(latencies(sink, ("v",)))))
    calls_figures(report, "steady25", sink, 0)


def flood200(report, quick):
    duration = 5 if quick else 10
    sink, child, lost = one_process("flood", 0, 200.0, duration, 5)
    logged = child.get("logged", 0)
    report.figure("flood200", "close(5) returned", child.get("close"), "False",
                  child.get("close") is False)
    report.figure("flood200", "close(5) took", seconds(child.get("close_s")), "<= 8 s",
                  child.get("close_s", 99) <= 8.0)
    report.figure("flood200", "delivered by then (of %d)" % logged,
                  tally([sink], "v", logged)[0])
    report.figure("flood200", "lost (next process delivers the rest)", lost, "0", lost == 0)
    calls_figures(report, "flood200", sink, 1)


def six(report, quick):
    count, rate, duration = 6, 4.0, (10 if quick else 30)
    spool = tempfile.mkdtemp(prefix="isl-bench-six-")
    sink = CallSink(rate_limit=LIMIT).start()
    keys = ["p%d" % i for i in range(count)]
    try:
        children = [start_child("run", sink.url, spool, "bench-six", key, 0, rate, duration,
                                10) for key in keys]
        results = [finish_child(child, duration + 120) for child in children]
        sink.stop()
        lost = sum(recover(spool, "bench-six", key, r.get("logged", 0), [sink])
                   for key, r in zip(keys, results))
    finally:
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)
    waits = latencies(sink, keys)
    report.figure("six", "closes that returned True", sum(bool(r.get("close"))
                                                          for r in results))
    report.figure("six", "lost (in no sink)", lost, "0", lost == 0)
    report.figure("six", "latency p95", seconds(p95(waits)), "<= 5 s (aim: 2 s)",
                  bool(waits) and p95(waits) <= 5.0)
    report.figure("six", "latency max", seconds(waits[-1] if waits else None))
    calls_figures(report, "six", sink, count)


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
                    if mode == "lib":
                        result = finish_child(start_child("run", url, spool, "bench-lib", "v",
                                                          n, 0, 0, 60), 120)
                    else:
                        result = finish_child(start_child("base", "127.0.0.1", port, n), 120)
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
