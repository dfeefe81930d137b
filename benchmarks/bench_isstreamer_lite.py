#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The isstreamer_lite authors
"""Benchmark isstreamer_lite against ISStreamer 2.0.0 on one loopback server.

One run measures both clients side by side and prints a table of medians,
the ratios between the clients and whether each target is met, then writes
everything (every repeat, not just medians) as JSON::

    python3 benchmarks/bench_isstreamer_lite.py            # full run, a few minutes
    python3 benchmarks/bench_isstreamer_lite.py --quick    # smoke run, under a minute
    python3 benchmarks/bench_isstreamer_lite.py --skip-isstreamer --json /tmp/r.json

What is measured (each client measurement in a fresh subprocess, so that
imports, threads and ``getrusage`` of one never touch another):

* ``log()`` cost per call at ``buffer_size`` 10 and 1000 and from 1 and 4
  threads, and at ``buffer_size`` 10 in durable mode, next to the deque
  floor ``q.append((key, value, time.time()))`` timed the same way in the
  same process: the median of single calls each timed with
  ``time.perf_counter`` (what the "median cost" targets use), and as
  diagnostics the wall time and the caller threads' CPU of N calls in a row;
* end to end: wall time and client CPU (``getrusage(RUSAGE_SELF)`` user+sys,
  all threads) to construct a Streamer, log N events and ``close()`` (for
  ISStreamer: and join the threads it spawned), at ``buffer_size`` 10 and
  100, with the TCP connections, requests and events the server saw; in
  durable mode also the bytes written per event (the library's count and
  the child's ``/proc/self/io``) against each event's compact JSON size,
  and the spool files left behind, for a burst and for a trickle of events
  at 20 a second;
* the same over HTTPS (a self-signed certificate made with the ``openssl``
  command for this run, trusted through the client's SSL context, or
  ``SSL_CERT_FILE`` for ISStreamer), plus plain ``http.client`` with and
  without connection reuse, as client CPU per request;
* ``python -X importtime`` of each module, and tracemalloc bytes per queued
  event with 100,000 events queued behind a server that never answers.

ISStreamer 2.0.0 comes from PyPI into a virtual environment under the user's
cache directory (``--venv`` to choose another): it is the comparison baseline,
never a dependency of isstreamer_lite. No traffic leaves 127.0.0.1: the
subprocesses refuse to resolve or connect to any other address.

Runs on CPython 3.6 to 3.13 with only the standard library (``-X importtime``
needs 3.7; on 3.6 import time is reported as unavailable).
"""

import argparse
import collections
import json
import os
import platform
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)


# --- Constants -----------------------------------------------------------------

# The last stdout line of a child that starts with this holds its JSON result.
_RESULT_PREFIX = "BENCH-RESULT "
# Written to stderr right before the measured import, so that -X importtime
# lines of interpreter start-up can be told from those of the import itself.
_IMPORT_MARK = "BENCH-IMPORT-MARK"
_ISSTREAMER_VERSION = "2.0.0"
_ACCESS_KEY = "ist_benchmark_not_a_real_key"
# Both clients log the same event shape: one key, a float reading.
_KEY = "temperature"
_VALUE = 21.5
# Environment variables isstreamer_lite reads; cleared in the children so that
# a developer's own settings cannot steer the benchmark (or off loopback).
_LITE_ENV = ("IS_ACCESS_KEY", "IS_BUCKET_KEY", "IS_BUCKET_NAME", "IS_API_BASE",
             "IS_SPOOL_DIR", "IS_DURABLE")
_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "ALL_PROXY")
# The ISStreamer children open one connection per batch, thousands at once:
# a short listen backlog would drop SYNs and add 1 s retransmits to its time.
_LISTEN_BACKLOG = 4096
# Generous guards: a child that takes longer than this has hung.
_CHILD_TIMEOUT = 600.0
_JOIN_TIMEOUT = 300.0

_FULL = {"log_calls": 20000, "log_repeats": 7, "log_repeats_isstreamer": 5,
         "events": 20000, "e2e_repeats": 5, "https_repeats": 3,
         "memory_events": 100000, "memory_repeats": 3, "import_repeats": 9,
         "trickle_events": 100, "trickle_repeats": 3}
_QUICK = {"log_calls": 5000, "log_repeats": 3, "log_repeats_isstreamer": 3,
          "events": 4000, "e2e_repeats": 3, "https_repeats": 3,
          "memory_events": 100000, "memory_repeats": 1, "import_repeats": 5,
          "trickle_events": 40, "trickle_repeats": 1}
# Durable mode at a sensor's pace rather than in a burst: events per second.
# Each fsync then writes back a page for a few lines, which is what an SD
# card sees; the burst hides it.
_TRICKLE_RATE = 20.0

# Targets from the issue. "log() median cost within 3x of the deque floor"
# is judged on the per-call median (each call timed alone, p50); "flat" is
# our reading: every configuration's p50 within 3x of the floor's p50 in
# the same configuration, and the largest of those ratios at most 2x the
# smallest (ratios, not microseconds: the machine's speed drifts between
# configurations). The loop-wall and caller-CPU ratios are diagnostics.
_TARGET_LOG_VS_ISSTREAMER = 50.0
_TARGET_LOG_VS_FLOOR = 3.0
_TARGET_FLAT_SPREAD = 2.0
_TARGET_CPU_SHARE = 1.0 / 3.0
# Durable mode: log() within 2x its default-mode cost; the journal written
# per event at most 1.5x the event's compact JSON.
_TARGET_DURABLE_LOG = 2.0
_TARGET_JOURNAL_VS_JSON = 1.5
_TARGET_HTTPS_CONNECTIONS = 1
_TARGET_BYTES_PER_EVENT = 200.0
_TARGET_IMPORT_MS = 10.0


# --- Network guard (children) ----------------------------------------------------

def _is_loopback(host):
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return host in ("localhost", "::1") or str(host).startswith("127.")


def _guard_network():
    """Make this process unable to resolve or connect outside the loopback."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host):
            raise OSError("benchmark network guard: %r is not a loopback address" % (host,))
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise OSError("benchmark network guard: %r is not a loopback address"
                          % (address[0],))

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex


# --- Clients (children) ------------------------------------------------------------

def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _thread_time():
    clock = getattr(time, "thread_time", None)
    return clock() if clock is not None else None


def _join_spawned(deadline):
    """Join every non-daemon thread but this one: ISStreamer's ship threads."""
    me = threading.current_thread()
    while True:
        others = [t for t in threading.enumerate() if t is not me and not t.daemon]
        if not others:
            return True
        for thread in others:
            thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return False


def _isstreamer_ini(workdir, api_base):
    """The ini file that points ISStreamer at ``api_base``, written once per child."""
    ini = os.path.join(workdir, "bench-%d.ini" % os.getpid())
    if not os.path.exists(ini):
        with open(ini, "w") as handle:
            handle.write("[isstreamer.client_config]\naccess_key = %s\n"
                         "[isstreamer.api_config]\nstream_api_base = %s\n"
                         % (_ACCESS_KEY, api_base))
        from ISStreamer import configutil
        if configutil.getConfig(ini)["stream_api_base"] != api_base:
            raise SystemExit("ISStreamer would not use %s from %s" % (api_base, ini))
    return ini


class _Client(object):
    """One Streamer of either library, opened and finished the same way."""

    def __init__(self, spec, buffer_size, api_base, **lite_options):
        self.kind = spec["client"]
        if not _is_loopback(api_base.split("://", 1)[1].rsplit(":", 1)[0]):
            raise SystemExit("refusing a non-loopback api_base %r" % (api_base,))
        bucket_key = "bench-%d-%d" % (os.getpid(), int(time.time() * 1000) % 1000000)
        if self.kind == "lite":
            import isstreamer_lite
            context = None
            if api_base.startswith("https://"):
                context = ssl.create_default_context(cafile=spec["cafile"])
            self.streamer = isstreamer_lite.Streamer(
                bucket_name="benchmark", bucket_key=bucket_key, access_key=_ACCESS_KEY,
                buffer_size=buffer_size, api_base=api_base, ssl_context=context,
                spool_dir=spec["spool_dir"], **lite_options)
        else:
            ini = _isstreamer_ini(spec["workdir"], api_base)
            from ISStreamer.Streamer import Streamer
            self.streamer = Streamer(bucket_name="benchmark", bucket_key=bucket_key,
                                     access_key=_ACCESS_KEY, ini_file_location=ini,
                                     buffer_size=buffer_size)
        self.log = self.streamer.log

    def settle(self):
        """Wait until the bucket request made at construction has been answered."""
        deadline = time.monotonic() + 30.0
        if self.kind == "lite":
            while self.streamer.stats()["buckets_created"] < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
        else:
            _join_spawned(deadline)

    def finish(self):
        """close(), and for ISStreamer wait for its ship threads; True if all went."""
        if self.kind == "lite":
            return bool(self.streamer.close(timeout=_JOIN_TIMEOUT))
        self.streamer.close()
        return _join_spawned(time.monotonic() + _JOIN_TIMEOUT)

    def stats(self):
        if self.kind == "lite":
            stats = self.streamer.stats()
            return {k: stats[k] for k in ("logged", "delivered", "requests", "spooled",
                                          "replayed", "retried", "connections", "dropped",
                                          "journalled", "journal_bytes")
                    if k in stats}
        return {}


def _log_loop(log, calls):
    for _ in range(calls):
        log(_KEY, _VALUE)


def _floor_loop(queue, calls):
    for _ in range(calls):
        queue.append((_KEY, _VALUE, time.time()))


def _each(target, calls):
    """Time single calls one by one: an empty span, the deque floor, log().

    ``target`` is (log, floor deque). The three are interleaved call by
    call, so that all see the same machine: on a shared or virtual CPU the
    speed of plain Python code can change by 2x from one 20 ms to the next,
    and a floor timed a moment before log() would not be its floor. The
    empty span (two clock reads in a row) is the timing overhead, taken off
    both.
    """
    log, queue = target
    clock = time.perf_counter
    empty, floor, logged = [], [], []
    for _ in range(calls):
        t0 = clock()
        t1 = clock()
        queue.append((_KEY, _VALUE, time.time()))
        t2 = clock()
        log(_KEY, _VALUE)
        t3 = clock()
        empty.append(t1 - t0)
        floor.append(t2 - t1)
        logged.append(t3 - t2)
    return empty, floor, logged


def _in_threads(loop, target, threads, calls):
    """Run ``loop(target, calls / threads)`` in ``threads`` threads started together.

    Returns (wall seconds per call, thread CPU seconds per call summed over
    the threads or None, what each loop returned).
    """
    share = calls // threads
    barrier = threading.Barrier(threads + 1)
    outcome = [None] * threads

    def run(index):
        barrier.wait()
        cpu = _thread_time()
        value = loop(target, share)
        outcome[index] = (None if cpu is None else _thread_time() - cpu, value)

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join(_JOIN_TIMEOUT)
    wall = (time.perf_counter() - start) / (share * threads)
    cpus = [o[0] for o in outcome]
    cpu = None if None in cpus else sum(cpus) / (share * threads)
    return wall, cpu, [o[1] for o in outcome]


def _percentiles(times, overhead):
    times = sorted(t - overhead for t in times)
    return {"p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99)],
            "max": times[-1]}


def _task_log_cost(spec):
    """log() and deque-floor cost per call for each configuration.

    Three views of the same thing: percentiles of single calls timed one by
    one (the p50 is the "median cost" the targets use), and as diagnostics
    the wall time per call of N calls in a row (it includes the time other
    threads, the worker too, hold the GIL) and the logging threads' own CPU
    per call (time.thread_time).
    """
    rows = []
    calls = spec["calls"]
    for repeat in range(spec["repeats"]):
        for config in spec["configs"]:
            threads = config["threads"]
            client = _Client(spec, config["buffer_size"], spec["api_base"],
                             **config.get("lite_options", {}))
            client.settle()
            floor_queue = collections.deque()
            floor, floor_cpu, _ = _in_threads(_floor_loop, floor_queue, threads, calls)
            floor_queue.clear()
            cost, cost_cpu, _ = _in_threads(_log_loop, client.log, threads, calls)
            each = _in_threads(_each, (client.log, floor_queue), threads, calls)[2]
            empty = [t for chunk in each for t in chunk[0]]
            overhead = statistics.median(empty)
            floor_each = _percentiles([t for chunk in each for t in chunk[1]], overhead)
            log_each = _percentiles([t for chunk in each for t in chunk[2]], overhead)
            delivered = client.finish()
            rows.append({"repeat": repeat, "config": config["name"],
                         "buffer_size": config["buffer_size"],
                         "threads": threads, "log_s": cost, "floor_s": floor,
                         "log_thread_cpu_s": cost_cpu, "floor_thread_cpu_s": floor_cpu,
                         "log_each_s": log_each, "floor_each_s": floor_each,
                         "timer_overhead_s": overhead, "finished": delivered})
    return {"rows": rows}


def _proc_io():
    """This process's /proc/self/io counters (Linux), or None elsewhere."""
    try:
        with open("/proc/self/io") as handle:
            return {name: int(value) for name, value in
                    (line.split(":", 1) for line in handle if ":" in line)}
    except (OSError, ValueError):
        return None


def _spool_files(spool_dir):
    """Segment (.jsonl) and ack (.ack) files under ``spool_dir``, as relative paths."""
    found = []
    for folder, _, names in os.walk(spool_dir):
        found.extend(os.path.relpath(os.path.join(folder, name), spool_dir)
                     for name in names if name.endswith((".jsonl", ".ack")))
    return sorted(found)


class _FsyncCounter(object):
    """Counts os.fsync calls while installed (isstreamer_lite calls os.fsync)."""

    def __init__(self):
        self.calls = 0
        self.real = os.fsync

    def __call__(self, fd):
        self.calls += 1
        return self.real(fd)


def _task_e2e(spec):
    """Construct, log N events, close (and join): wall and CPU seconds.

    Also the child's /proc/self/io deltas over the same span (Linux; the
    server is another process, so they are the client's own), its fsync
    calls, and the segment and ack files left in its spool once close()
    returned. ``interval``: seconds to sleep after each event (a trickle
    instead of a burst).
    """
    events, interval = spec["events"], spec.get("interval", 0.0)
    fsyncs = os.fsync = _FsyncCounter()
    io0 = _proc_io()
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    client = _Client(spec, spec["buffer_size"], spec["api_base"],
                     **spec.get("lite_options", {}))
    log = client.log
    if interval:
        for i in range(events):
            log(_KEY, 20.0 + (i % 100) * 0.125)
            time.sleep(interval)
    else:
        for i in range(events):
            log(_KEY, 20.0 + (i % 100) * 0.125)
    finished = client.finish()
    wall = time.perf_counter() - wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    user, system = usage.ru_utime - usage0.ru_utime, usage.ru_stime - usage0.ru_stime
    io1 = _proc_io()
    io = None if io0 is None or io1 is None else {k: io1[k] - io0[k] for k in io0 if k in io1}
    return {"wall_s": wall, "cpu_s": user + system, "cpu_user_s": user, "cpu_sys_s": system,
            "finished": finished, "stats": client.stats(), "max_rss_kb": usage.ru_maxrss,
            "proc_io": io, "spool_files_left": _spool_files(spec["spool_dir"]),
            "fsyncs": fsyncs.calls}


def _task_raw_https(spec):
    """POST the same batches with plain http.client: one connection, or one each."""
    import http.client
    body = json.dumps([{"key": _KEY, "value": 20.0 + i * 0.125, "epoch": time.time()}
                       for i in range(spec["batch"])]).encode("utf-8")
    headers = {"Content-Type": "application/json", "X-IS-AccessKey": _ACCESS_KEY,
               "X-IS-BucketKey": "bench-raw", "Accept-Version": "~0"}
    port = int(spec["api_base"].rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=spec["cafile"])
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    conn = None
    for _ in range(spec["requests"]):
        if conn is None:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
        conn.request("POST", "/api/events", body, headers)
        response = conn.getresponse()
        response.read()
        if response.status != 204:
            raise SystemExit("server answered %d" % response.status)
        if not spec["reuse"]:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return {"wall_s": time.perf_counter() - wall0, "cpu_s": _cpu_seconds() - cpu0,
            "finished": True}


def _task_memory(spec):
    """tracemalloc bytes per queued event, the worker stuck on a silent server."""
    import gc
    import tracemalloc
    events = spec["events"]
    if spec["client"] == "lite":
        # The worker sends the bucket request, the server never answers, and
        # every event logged meanwhile stays queued.
        client = _Client(spec, 10, spec["api_base"], max_queue=2 * events, timeout=600.0,
                         exit_timeout=0.0)
        deadline = time.monotonic() + 10.0
        while client.streamer.stats()["requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        # ISStreamer only queues while the queue is shorter than buffer_size.
        client = _Client(spec, 10 * events, spec["api_base"])
    time.sleep(0.3)
    log = client.log
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(events):
        log(_KEY, 20.0 + (i % 1000) * 0.01)      # a fresh float per event
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if client.kind == "lite":
        queued = client.streamer.stats()["queued"]
    else:
        queued = len(client.streamer.LogQueue)
    where = ("the log() deque (worker blocked on the bucket request)" if client.kind == "lite"
             else "ISStreamer's LogQueue (buffer_size %d: nothing shipped)" % (10 * events))
    result = {"events": events, "queued": queued, "queued_in": where,
              "bytes_per_event": (current - base) / events,
              "peak_bytes_per_event": (peak - base) / events,
              "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    _emit(result)
    os._exit(0)         # the worker is stuck on the silent server on purpose


_TASKS = {"log_cost": _task_log_cost, "e2e": _task_e2e, "raw_https": _task_raw_https,
          "memory": _task_memory}


def _emit(result):
    sys.stdout.write(_RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def _child_main(spec_text):
    spec = json.loads(spec_text)
    _guard_network()
    # Import the client and write its ini before anything is measured.
    if spec["client"] == "lite":
        sys.path.insert(0, spec["repo"])
        import isstreamer_lite  # noqa: F401
    elif spec["client"] == "isstreamer":
        _isstreamer_ini(spec["workdir"], spec["api_base"])
        import ISStreamer.Streamer  # noqa: F401
    _emit(_TASKS[spec["task"]](spec))
    return 0


# --- Loopback server (parent) --------------------------------------------------------

class _Counters(object):
    """What the server saw since the last reset(); guarded by ``lock``."""

    FIELDS = ("connections", "requests", "bucket_requests", "event_requests", "events",
              "bad_requests", "handshake_errors")

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self, keep_bodies=False):
        """Zero the counters; with ``keep_bodies``, also keep each events body."""
        with self.lock:
            self.values = dict.fromkeys(self.FIELDS, 0)
            self.bodies = [] if keep_bodies else None

    def keep(self, body):
        with self.lock:
            if self.bodies is not None:
                self.bodies.append(body)

    def take_bodies(self):
        with self.lock:
            bodies, self.bodies = self.bodies, None
            return bodies or []

    def add(self, **counts):
        with self.lock:
            for name, count in counts.items():
                self.values[name] += count

    def snapshot(self):
        with self.lock:
            return dict(self.values)


def _make_server(ssl_context=None):
    """A threaded HTTP/1.1 keep-alive events API on 127.0.0.1; return (server, url)."""
    import http.server
    import socketserver
    counters = _Counters()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120

        def log_message(self, *args):
            pass

        def reply(self, status):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            if path == "/api/buckets":
                counters.add(requests=1, bucket_requests=1)
                return self.reply(201)
            if path != "/api/events":
                counters.add(requests=1, bad_requests=1)
                return self.reply(404)
            try:
                data = json.loads(body.decode("utf-8"))
            except ValueError:
                counters.add(requests=1, bad_requests=1)
                return self.reply(400)
            counters.add(requests=1, event_requests=1,
                         events=len(data) if isinstance(data, list) else 1)
            counters.keep(body)
            self.reply(204)

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = _LISTEN_BACKLOG

        def finish_request(self, request, client_address):
            # Runs in the connection's own thread: TLS handshakes run in
            # parallel instead of one by one in the accepting thread.
            counters.add(connections=1)
            # As real servers do: without it Nagle holds the reply behind the
            # TLS session tickets until the client's delayed ACK (~40 ms).
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is None:
                return Handler(request, client_address, self)
            try:
                request = ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                counters.add(handshake_errors=1)
                return None
            try:
                return Handler(request, client_address, self)
            finally:
                request.close()

        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], OSError):
                http.server.HTTPServer.handle_error(self, request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    server.counters = counters
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True,
                              name="bench-server")
    thread.start()
    scheme = "https" if ssl_context is not None else "http"
    return server, "%s://127.0.0.1:%d" % (scheme, server.server_address[1])


def _make_silent_listener():
    """A socket that listens and never accepts: connects succeed, replies never come."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    return listener, "http://127.0.0.1:%d" % listener.getsockname()[1]


def _make_certificate(directory):
    """A self-signed EC certificate for IP 127.0.0.1; return (cert, key) paths."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
               "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
               "-days", "2", "-subj", "/CN=127.0.0.1",
               "-addext", "subjectAltName=IP:127.0.0.1"]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    if done.returncode != 0:
        raise SystemExit("openssl could not make a certificate:\n" + done.stderr)
    return cert, key


# --- ISStreamer in its own virtual environment -------------------------------------

def _venv_python(venv):
    if os.name == "nt":
        return os.path.join(venv, "Scripts", "python.exe")
    return os.path.join(venv, "bin", "python")


def _isstreamer_version(python):
    if not os.path.exists(python):
        return None
    done = subprocess.run([python, "-c", "import ISStreamer.version as v; print(v.__version__)"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, cwd=tempfile.gettempdir())
    return done.stdout.strip() if done.returncode == 0 else None


def _default_venv():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "isstreamer_lite-bench", "venv-py%d.%d" % sys.version_info[:2])


def _ensure_isstreamer(venv, progress):
    """The venv python that has ISStreamer 2.0.0, installing it first if missing."""
    python = _venv_python(venv)
    if _isstreamer_version(python) == _ISSTREAMER_VERSION:
        return python
    progress("installing ISStreamer==%s from PyPI into %s" % (_ISSTREAMER_VERSION, venv))
    for command in ([sys.executable, "-m", "venv", "--clear", venv],
                    [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                     "ISStreamer==%s" % _ISSTREAMER_VERSION]):
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        if done.returncode != 0:
            raise SystemExit("%s failed:\n%s" % (" ".join(command), done.stdout))
    version = _isstreamer_version(python)
    if version != _ISSTREAMER_VERSION:
        raise SystemExit("%s has ISStreamer %r, not %s" % (venv, version, _ISSTREAMER_VERSION))
    return python


# --- Running the children (parent) ----------------------------------------------------

class _Bench(object):
    """State of one benchmark run: servers, interpreters, working directory."""

    def __init__(self, args, progress):
        self.args = args
        self.progress = progress
        self.sizes = dict(_QUICK if args.quick else _FULL)
        if args.events:
            self.sizes["events"] = args.events
        self.workdir = tempfile.mkdtemp(prefix="isstreamer_lite-bench-")
        self.cert, key = _make_certificate(self.workdir)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(self.cert, key)
        self.http, self.http_url = _make_server()
        self.https, self.https_url = _make_server(server_context)
        self.pythons = {"lite": sys.executable}
        if not args.skip_isstreamer:
            self.pythons["isstreamer"] = args.isstreamer_python or _ensure_isstreamer(
                args.venv or _default_venv(), progress)

    def close(self):
        for server in (self.http, self.https):
            server.shutdown()
            server.server_close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def clients(self):
        return [name for name in ("lite", "isstreamer") if name in self.pythons]

    def environment(self, client):
        env = dict(os.environ)
        for name in _LITE_ENV + _PROXY_ENV + ("PYTHONPATH", "SSL_CERT_DIR"):
            env.pop(name, None)
        env.update({"HOME": self.workdir, "XDG_STATE_HOME": self.workdir,
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                    "PYTHONDONTWRITEBYTECODE": "1"})
        if client == "isstreamer":
            # ISStreamer uses http.client's default context: trust our
            # certificate through OpenSSL's default verify file.
            env["SSL_CERT_FILE"] = self.cert
        else:
            env.pop("SSL_CERT_FILE", None)
        return env

    def child(self, client, task, server=None, keep_bodies=False, **spec):
        """Run one task in a fresh interpreter; return its result and what the server saw.

        ``keep_bodies``: also report the compact JSON size of the events the
        server received, worked out from the bodies after the child is done.
        """
        spool_dir = tempfile.mkdtemp(prefix="spool-", dir=self.workdir)
        spec.update({"task": task, "client": client, "repo": self.args.lite_dir,
                     "cafile": self.cert,
                     "workdir": self.workdir, "spool_dir": spool_dir})
        if server is not None:
            server.counters.reset(keep_bodies)
        command = [self.pythons[client], os.path.abspath(__file__), "--child", json.dumps(spec)]
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, cwd=self.workdir,
                                  env=self.environment(client), timeout=_CHILD_TIMEOUT)
        finally:
            shutil.rmtree(spool_dir, ignore_errors=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
        if not lines:
            raise SystemExit("%s %s child failed (exit %d):\n%s%s" % (
                client, task, done.returncode, done.stdout[-3000:], done.stderr[-3000:]))
        result = json.loads(lines[-1][len(_RESULT_PREFIX):])
        if server is not None:
            result["server"] = server.counters.snapshot()
            if keep_bodies:
                result["server"]["event_json"] = _event_json_size(server.counters.take_bodies())
        if done.stderr.strip():
            result["stderr_tail"] = done.stderr.strip()[-2000:]
        return result

    def import_time_us(self, client, repeats):
        """-X importtime cumulative microseconds of the import, one entry per run."""
        if sys.version_info < (3, 7):
            return []
        statement = "import isstreamer_lite" if client == "lite" else \
            "from ISStreamer.Streamer import Streamer"
        code = "import sys; sys.path.insert(0, %r); sys.stderr.write(%r); %s" % (
            self.args.lite_dir, _IMPORT_MARK + "\n", statement)
        env = self.environment(client)
        env.pop("PYTHONDONTWRITEBYTECODE", None)     # measure with a warm .pyc cache
        runs = []
        for index in range(repeats + 1):
            done = subprocess.run([self.pythons[client], "-X", "importtime", "-c", code],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, cwd=self.workdir, env=env)
            if done.returncode != 0:
                raise SystemExit("importing %s failed:\n%s" % (client, done.stderr[-3000:]))
            if index:                                 # the first run warms the caches
                runs.append(_parse_importtime(done.stderr))
        return runs


def _event_json_size(bodies):
    """Events in ``bodies`` and the sum of each one's compact JSON size in bytes.

    Each event is re-encoded as ``json.dumps({"key": .., "value": ..,
    "epoch": ..}, separators=(",", ":"))``: the size of the event itself,
    without the brackets and commas of the array it came in.
    """
    events = size = 0
    for body in bodies:
        data = json.loads(body.decode("utf-8"))
        for event in data if isinstance(data, list) else [data]:
            events += 1
            compact = {"key": event.get("key"), "value": event.get("value"),
                       "epoch": event.get("epoch")}
            size += len(json.dumps(compact, separators=(",", ":")))
    return {"events": events, "bytes": size}


def _lite_version(directory):
    """``__version__`` of the measured isstreamer_lite.py, read as text."""
    try:
        with open(os.path.join(directory, "isstreamer_lite.py")) as handle:
            for line in handle:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        return None
    return None


def _parse_importtime(stderr):
    """Sum the cumulative microseconds of the top-level imports after the mark."""
    total, seen_mark = 0, False
    for line in stderr.splitlines():
        if line.strip() == _IMPORT_MARK:
            seen_mark = True
            continue
        if not seen_mark or not line.startswith("import time:") or "|" not in line:
            continue
        fields = line.split("|")
        name = fields[-1]
        if name.startswith(" ") and not name.startswith("  ") and fields[1].strip().isdigit():
            total += int(fields[1])
    return total


# --- Measurements (parent) --------------------------------------------------------------

def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _measure_imports(bench, results):
    for client in bench.clients:
        bench.progress("import time: %s" % client)
        runs = bench.import_time_us(client, bench.sizes["import_repeats"])
        results["import"][client] = {"runs_us": runs, "median_ms":
                                     _median(runs) / 1000.0 if runs else None}


# isstreamer_lite with a max_queue above the events of a run: nothing spooled.
_BIG_QUEUE_VARIANT = "lite max_queue=50000"
# isstreamer_lite in durable mode (journal before delivery, fsync every
# sync_interval / 2), as the durable-mode targets describe it.
_DURABLE_OPTIONS = {"durable": True, "sync_interval": 1.0}
_DURABLE_VARIANT = "lite durable"


def _config(buffer_size, threads, **lite_options):
    name = "bs%d_t%d" % (buffer_size, threads)
    if lite_options.get("durable"):
        name += "_durable"
    return {"name": name, "buffer_size": buffer_size, "threads": threads,
            "lite_options": lite_options}


# The configurations "flat in buffer_size and threads" is judged on.
_LOG_CONFIGS = [_config(10, 1), _config(1000, 1), _config(10, 4)]
# The same log() measurement in durable mode (isstreamer_lite only), run
# in the same child right after its default-mode twin, bs10_t1.
_DURABLE_CONFIG = _config(10, 1, **_DURABLE_OPTIONS)


def _config_name(config):
    return config["name"]


# The three views of log() cost per call, each as (log() of a row, its deque
# floor): p50 of single calls, loop wall time, caller-thread CPU. Seconds.
_VIEWS = {
    "p50": (lambda r: r["log_each_s"]["p50"], lambda r: r["floor_each_s"]["p50"]),
    "loop_wall": (lambda r: r["log_s"], lambda r: r["floor_s"]),
    "caller_cpu": (lambda r: r["log_thread_cpu_s"], lambda r: r["floor_thread_cpu_s"]),
}


def _over_floor(row, view):
    """log() / deque floor of one repeat in one view, or None."""
    log_of, floor_of = _VIEWS[view]
    value, floor = log_of(row), floor_of(row)
    if value is None or floor is None or floor <= 0:
        return None
    return value / floor


def _measure_log_cost(bench, results):
    """Ratios are medians of each repeat's own ratio: the log() and floor
    figures of one repeat were taken moments apart, those of two repeats not."""
    sizes = bench.sizes
    for client in bench.clients:
        bench.progress("log() cost: %s" % client)
        repeats = sizes["log_repeats" if client == "lite" else "log_repeats_isstreamer"]
        configs = list(_LOG_CONFIGS)
        if client == "lite":
            configs.insert(1, _DURABLE_CONFIG)
        out = bench.child(client, "log_cost", bench.http, api_base=bench.http_url,
                          configs=configs, calls=sizes["log_calls"], repeats=repeats)
        summary = {"calls": sizes["log_calls"], "repeats": repeats, "rows": out["rows"],
                   "timer_overhead_us": _median([r["timer_overhead_s"] * 1e6
                                                 for r in out["rows"]]),
                   "server": out["server"]}
        for config in configs:
            rows = [r for r in out["rows"] if r["config"] == config["name"]]
            cpu = _median([r["log_thread_cpu_s"] * 1e6 for r in rows
                           if r["log_thread_cpu_s"] is not None])
            floor_cpu = _median([r["floor_thread_cpu_s"] * 1e6 for r in rows
                                 if r["floor_thread_cpu_s"] is not None])
            each = {}
            for which in ("log", "floor"):
                for stat in ("p50", "p99", "max"):
                    each["%s_%s_us" % (which, stat)] = _median(
                        [r["%s_each_s" % which][stat] * 1e6 for r in rows])
            summary[_config_name(config)] = dict(
                each, log_us=_median([r["log_s"] * 1e6 for r in rows]),
                floor_us=_median([r["floor_s"] * 1e6 for r in rows]),
                vs_floor=_median([_over_floor(r, "loop_wall") for r in rows]),
                log_thread_cpu_us=cpu, floor_thread_cpu_us=floor_cpu,
                cpu_vs_floor=_median([_over_floor(r, "caller_cpu") for r in rows]),
                p50_vs_floor=_median([_over_floor(r, "p50") for r in rows]),
                all_finished=all(r["finished"] for r in rows))
        if client == "lite":
            summary["durable_vs_default"] = _durable_vs_default(
                out["rows"], _LOG_CONFIGS[0]["name"], _DURABLE_CONFIG["name"])
        results["log_cost"][client] = summary


def _durable_vs_default(rows, default, durable):
    """log() in durable mode / default mode, in each view: the median over
    repeats of (durable / its floor) / (default / its floor), and the plain
    ratio of the two medians ("<view>_raw") that a change of machine speed
    between the two measurements skews."""
    pairs = {}
    for row in rows:
        if row["config"] in (default, durable):
            pairs.setdefault(row["repeat"], {})[row["config"]] = row
    ratios = {}
    for view, (log_of, _) in _VIEWS.items():
        values = []
        for pair in pairs.values():
            if len(pair) == 2:
                values.append(_ratio(_over_floor(pair[durable], view),
                                     _over_floor(pair[default], view)))
        ratios[view] = _median(values)
        ratios[view + "_raw"] = _ratio(
            _median([log_of(p[durable]) for p in pairs.values() if durable in p]),
            _median([log_of(p[default]) for p in pairs.values() if default in p]))
    return ratios


def _measure_e2e(bench, results, key, server, url, buffer_size, repeats, variants=()):
    """``variants``: extra (name, lite options) runs of isstreamer_lite.

    Durable variants also get the compact JSON size of the events the server
    received, to set the journal's bytes against.
    """
    events = bench.sizes["events"]
    runs = collections.OrderedDict((name, []) for name in bench.clients)
    for name, _ in variants:
        runs[name] = []
    options = dict(variants)
    for repeat in range(repeats):
        for name in runs:                       # interleaved, so drift hits all alike
            bench.progress("%s: %s, repeat %d/%d" % (key, name, repeat + 1, repeats))
            client = name if name in bench.clients else "lite"
            lite_options = options.get(name, {})
            runs[name].append(bench.child(client, "e2e", server, api_base=url,
                                          buffer_size=buffer_size, events=events,
                                          lite_options=lite_options,
                                          keep_bodies=bool(lite_options.get("durable"))))
    for name, rows in runs.items():
        results[key][name] = _summarise_delivery(rows, events)
    results[key]["events"] = events
    results[key]["buffer_size"] = buffer_size


def _per_event(rows, value):
    """Median over ``rows`` of ``value(row)`` / events logged in that row, or None."""
    ratios = []
    for row in rows:
        number, logged = value(row), (row.get("stats") or {}).get("logged")
        if number is not None and logged:
            ratios.append(number / logged)
    return _median(ratios)


def _disk_summary(rows):
    """Bytes isstreamer_lite wrote to its spool/journal, per event logged, three ways.

    ``journal_bytes`` is the library's own count (segment lines + ack
    records); ``wchar`` and ``write_bytes`` come from the child's
    /proc/self/io: ``wchar`` every byte handed to write()-family system calls
    (files and pipes; the HTTP requests go out through send() and are not in
    it), ``write_bytes`` what reached the block layer, counted a 4 KiB page
    each time a clean page is dirtied, so small appends synced apart cost a
    page apiece.
    """
    def io(field):
        return lambda row: (row.get("proc_io") or {}).get(field)

    def json_bytes(row):
        return _get(row, "server", "event_json", "bytes")

    summary = {
        "journal_bytes_per_event": _per_event(rows, lambda r: r["stats"].get("journal_bytes")),
        "journalled": _median([r["stats"].get("journalled") for r in rows]),
        "wchar_per_event": _per_event(rows, io("wchar")),
        "write_bytes_per_event": _per_event(rows, io("write_bytes")),
        "cancelled_write_bytes_per_event": _per_event(rows, io("cancelled_write_bytes")),
        "write_syscalls": _median([io("syscw")(r) for r in rows]),
        "fsyncs": _median([r.get("fsyncs") for r in rows]),
        "spool_files_left": max(len(r.get("spool_files_left") or []) for r in rows),
    }
    with_json = [r for r in rows if json_bytes(r) is not None]
    if with_json:
        json_per_event = _median([json_bytes(r) / max(1, _get(r, "server", "event_json",
                                                                "events"))
                                  for r in with_json])
        summary["event_json_bytes"] = json_per_event
        for field in ("journal_bytes", "wchar", "write_bytes"):
            summary["%s_vs_json" % field] = _ratio(summary[field + "_per_event"],
                                                   json_per_event)
    return summary


def _summarise_delivery(rows, events):
    requests = [r["server"]["requests"] for r in rows]
    spooled = [r["stats"].get("spooled") for r in rows if r.get("stats")]
    summary = {
        "wall_s": _median([r["wall_s"] for r in rows]),
        "cpu_s": _median([r["cpu_s"] for r in rows]),
        "spooled": _median(spooled) if spooled else None,
        "cpu_per_request_us": _median([r["cpu_s"] / max(1, r["server"]["requests"]) * 1e6
                                       for r in rows]),
        "connections": _median([r["server"]["connections"] for r in rows]),
        "requests": _median(requests),
        "events_received": [r["server"]["events"] for r in rows],
        "all_delivered": all(r["server"]["events"] == events and r["finished"] for r in rows),
        "runs": rows,
    }
    if all(r.get("stats") for r in rows):       # isstreamer_lite: what it wrote to disk
        summary.update(_disk_summary(rows))
    return summary


def _measure_trickle(bench, results):
    """isstreamer_lite durable, events logged at _TRICKLE_RATE a second, bs=10."""
    events, repeats = bench.sizes["trickle_events"], bench.sizes["trickle_repeats"]
    rows = []
    for repeat in range(repeats):
        bench.progress("durable trickle: %d events at %g/s, repeat %d/%d"
                       % (events, _TRICKLE_RATE, repeat + 1, repeats))
        rows.append(bench.child("lite", "e2e", bench.http, api_base=bench.http_url,
                                buffer_size=10, events=events, interval=1.0 / _TRICKLE_RATE,
                                lite_options=_DURABLE_OPTIONS, keep_bodies=True))
    results["durable_trickle"] = dict(_summarise_delivery(rows, events), events=events,
                                      rate_per_s=_TRICKLE_RATE, buffer_size=10)


def _measure_raw_https(bench, results, repeats):
    requests = bench.sizes["events"] // 10
    for reuse in (True, False):
        name = "http.client reuse" if reuse else "http.client new"
        rows = []
        for repeat in range(repeats):
            bench.progress("https: %s, repeat %d/%d" % (name, repeat + 1, repeats))
            row = bench.child("lite", "raw_https", bench.https, api_base=bench.https_url,
                              requests=requests, batch=10, reuse=reuse)
            rows.append(row)
        results["https"][name] = _summarise_delivery(rows, requests * 10)


def _measure_memory(bench, results):
    events = bench.sizes["memory_events"]
    for client in bench.clients:
        rows = []
        for repeat in range(bench.sizes["memory_repeats"]):
            bench.progress("memory: %s, repeat %d/%d" % (client, repeat + 1,
                                                         bench.sizes["memory_repeats"]))
            listener, url = _make_silent_listener()
            try:
                rows.append(bench.child(client, "memory", api_base=url, events=events))
            finally:
                listener.close()
        results["memory"][client] = {
            "events": events,
            "bytes_per_event": _median([r["bytes_per_event"] for r in rows]),
            "peak_bytes_per_event": _median([r["peak_bytes_per_event"] for r in rows]),
            "max_rss_kb": _median([r["max_rss_kb"] for r in rows]),
            "all_queued": all(r["queued"] == events for r in rows), "runs": rows}


# --- Report --------------------------------------------------------------------------------

def _get(results, *path):
    node = results
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _worst(values):
    return max(values) if values and all(v is not None for v in values) else None


def _spread(values):
    return max(values) / min(values) if values and all(values) else None


def _targets(results):
    """Each target of the issue, and the diagnostics next to it.

    One dict each: target (what), value, limit, unit, kind and met. ``kind``
    is "target" (the issue's wording, as we read it), "check" (a yes/no the
    issue implies) or "diagnostic" (another view of the same thing, shown
    against the target's limit for comparison but not the target itself).
    ``met`` is None when it was not measured.
    """
    log = results["log_cost"]
    lite = [_get(log, "lite", _config_name(c)) or {} for c in _LOG_CONFIGS]
    iss_bs10 = _get(log, "isstreamer", "bs10_t1", "log_us")
    durable = _get(log, "lite", "durable_vs_default") or {}
    bs10 = results.get("e2e_http_bs10") or {}
    cpu_share = _ratio(_get(bs10, "lite", "cpu_s"), _get(bs10, "isstreamer", "cpu_s"))
    journal = _get(bs10, _DURABLE_VARIANT) or {}
    https_conn = _get(results, "https", "lite", "connections")
    https_req = _get(results, "https", "lite", "requests")
    memory = _get(results, "memory", "lite", "bytes_per_event")
    imports = _get(results, "import", "lite", "median_ms")
    configs = "bs 10/1000, 1/4 threads"
    lines = []

    def add(kind, name, value, op, limit, unit="x"):
        met = None
        if value is not None:
            met = {"<=": value <= limit, ">=": value >= limit, "<": value < limit,
                   "==": value == limit}[op]
        lines.append({"kind": kind, "target": name, "value": value,
                      "limit": "%s %.3g" % (op, limit), "unit": unit, "met": met})

    add("target", "log() vs ISStreamer at bs=10, loop wall/call (x cheaper)",
        _ratio(iss_bs10, lite[0].get("log_us")), ">=", _TARGET_LOG_VS_ISSTREAMER)
    add("target", "log() median (p50, one call timed alone) / deque p50, bs=10",
        lite[0].get("p50_vs_floor"), "<=", _TARGET_LOG_VS_FLOOR)
    add("target", "log() median / deque median, worst of %s" % configs,
        _worst([c.get("p50_vs_floor") for c in lite]), "<=", _TARGET_LOG_VS_FLOOR)
    add("target", "log() median flat: max / min of p50/floor over %s" % configs,
        _spread([c.get("p50_vs_floor") for c in lite]), "<=", _TARGET_FLAT_SPREAD)
    add("diagnostic", "log() median flat in plain us: slowest p50 / fastest p50",
        _spread([c.get("log_p50_us") for c in lite]), "<=", _TARGET_FLAT_SPREAD)
    add("diagnostic", "loop wall/call (incl. worker GIL time) / deque loop, bs=10",
        lite[0].get("vs_floor"), "<=", _TARGET_LOG_VS_FLOOR)
    add("diagnostic", "loop wall/call / deque loop, worst config",
        _worst([c.get("vs_floor") for c in lite]), "<=", _TARGET_LOG_VS_FLOOR)
    add("diagnostic", "loop wall/call flat: max / min of loop wall/floor",
        _spread([c.get("vs_floor") for c in lite]), "<=", _TARGET_FLAT_SPREAD)
    add("diagnostic", "caller-thread CPU/call / deque's, worst config",
        _worst([c.get("cpu_vs_floor") for c in lite]), "<=", _TARGET_LOG_VS_FLOOR)
    add("target", "durable log() median / default's, bs=10 (each over its floor)",
        durable.get("p50"), "<=", _TARGET_DURABLE_LOG)
    add("diagnostic", "durable / default, loop wall/call, bs=10",
        durable.get("loop_wall"), "<=", _TARGET_DURABLE_LOG)
    add("diagnostic", "durable / default, caller-thread CPU/call, bs=10",
        durable.get("caller_cpu"), "<=", _TARGET_DURABLE_LOG)
    add("target", "client CPU, %s events at bs=10, lite / ISStreamer" % _fmt(bs10.get("events")),
        cpu_share, "<=", _TARGET_CPU_SHARE)
    add("target", "durable: journal bytes (library count) / event JSON bytes",
        journal.get("journal_bytes_vs_json"), "<=", _TARGET_JOURNAL_VS_JSON)
    add("diagnostic", "durable: wchar (/proc/self/io) per event / JSON bytes",
        journal.get("wchar_vs_json"), "<=", _TARGET_JOURNAL_VS_JSON)
    add("diagnostic", "durable: write_bytes (block layer) per event / JSON bytes",
        journal.get("write_bytes_vs_json"), "<=", _TARGET_JOURNAL_VS_JSON)
    trickle = results.get("durable_trickle") or {}
    add("diagnostic", "durable at %g events/s: write_bytes per event / JSON bytes"
        % _TRICKLE_RATE, trickle.get("write_bytes_vs_json"), "<=", _TARGET_JOURNAL_VS_JSON)
    left = [b.get("spool_files_left") for b in (journal, trickle) if b]
    add("check", "durable: segment and ack files left after close()",
        max(left) if left and None not in left else None, "==", 0, "")
    add("target", "HTTPS: connections for %s requests" % (_fmt(https_req),), https_conn,
        "==", _TARGET_HTTPS_CONNECTIONS, "")
    add("target", "memory per queued event (tracemalloc)", memory, "<=",
        _TARGET_BYTES_PER_EVENT, "B")
    add("target", "import isstreamer_lite (-X importtime)", imports, "<", _TARGET_IMPORT_MS,
        "ms")
    return lines


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return "{:,}".format(value)
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return "{:,.0f}".format(value)
    return "%.*g" % (digits, value)


# Extra rows of the isstreamer_lite variants in the end-to-end blocks.
_BIG_QUEUE_ROWS = (("wall_s", "wall s"), ("cpu_s", "client CPU s"), ("spooled", "spooled"),
                   ("all_delivered", "all arrived"))
_DURABLE_ROWS = (("wall_s", "wall s"), ("cpu_s", "client CPU s"),
                 ("spooled", "spooled (over max_queue; already on disk, not rewritten)"),
                 ("journalled", "journalled before delivery"),
                 ("journal_bytes_per_event", "journal bytes/event (library count)"),
                 ("event_json_bytes", "event compact JSON bytes (as received)"),
                 ("journal_bytes_vs_json", "journal bytes / JSON bytes"),
                 ("wchar_per_event", "wchar bytes/event (/proc/self/io)"),
                 ("wchar_vs_json", "wchar / JSON bytes"),
                 ("write_bytes_per_event", "write_bytes/event (/proc/self/io)"),
                 ("write_bytes_vs_json", "write_bytes / JSON bytes"),
                 ("cancelled_write_bytes_per_event", "cancelled_write_bytes/event"),
                 ("write_syscalls", "write syscalls (syscw)"),
                 ("fsyncs", "fsync calls"),
                 ("spool_files_left", "segment + ack files left after close()"),
                 ("all_delivered", "all arrived"))

_LEGEND = """\
"log() median": the p50 of single calls each timed alone, interleaved call by call with
the deque floor and an empty timing whose p50 is subtracted from both; the figure the
"median cost" targets use. "diag:" rows are diagnostics: loop wall = wall time of N calls
in a row / N (it includes the time the worker holds the GIL meanwhile), the floor's loop
run just before; caller-thread CPU = time.thread_time of the logging threads only.
Ratios to the floor are medians of each repeat's own ratio. DURABLE: durable=True,
sync_interval=1.0, right after bs=10, 1 thread in the same child; durable / default
compares each one's cost over its own floor (the plain ratio of medians is shown too).
End to end: construct + log N events + close() (+ join ISStreamer's threads), CPU from
getrusage (all threads); ISS/lite: ISStreamer's value / isstreamer_lite's.
With the default max_queue=10000 a 20,000-event burst spills 10,000 events through the
spool (by design: log() outruns delivery, the excess is written to disk once and replayed
before close() returns); the "lite max_queue=50000" row keeps them all in memory.
Durable bytes: "library count" is stats()["journal_bytes"] (segment lines + ack records)
per event logged; JSON bytes: json.dumps({"key", "value", "epoch"}, separators=(",", ":"))
of each event the server received; wchar: bytes the child handed to write() calls (files,
pipes; its HTTP goes out by send() and is not counted); write_bytes: bytes it dirtied in
the page cache for the block layer, a 4 KiB page per dirtying (Linux /proc/self/io), so a
page synced and appended to again counts again. "durable, N events at R/s": the same
client logging at a sensor's pace instead of in a burst, one fsync per batch or so."""


def _table(results):
    """The human-readable report: medians, ratios ISStreamer / lite, targets."""
    rows = [("measurement (median)", "lite", "ISStreamer", "ISS/lite")]
    log = results["log_cost"]
    for config in _LOG_CONFIGS[:1] + [_DURABLE_CONFIG] + _LOG_CONFIGS[1:]:
        name = _config_name(config)
        label = "log() median us/call (p50), bs=%d, %d thread%s%s" % (
            config["buffer_size"], config["threads"], "s" if config["threads"] > 1 else "",
            ", DURABLE" if config["lite_options"].get("durable") else "")
        for field, text in (("log_p50_us", label),
                            ("floor_p50_us", "  deque floor median us/call (same process)"),
                            ("p50_vs_floor", "  log() median / floor median"),
                            ("log_p99_us", "  log() one call timed alone: p99 us"),
                            ("log_max_us", "  log() one call timed alone: max us"),
                            ("log_us", "  diag: log() loop wall us/call"),
                            ("floor_us", "  diag: deque floor loop wall us/call"),
                            ("vs_floor", "  diag: loop wall log() / floor"),
                            ("log_thread_cpu_us", "  diag: log() caller-thread CPU us/call"),
                            ("cpu_vs_floor", "  diag: caller CPU / floor caller CPU")):
            lite, iss = _get(log, "lite", name, field), _get(log, "isstreamer", name, field)
            ratio = _fmt(_ratio(iss, lite)) if field.startswith("log_") else ""
            rows.append((text, _fmt(lite), _fmt(iss), ratio))
        if config is _DURABLE_CONFIG:
            ratios = _get(log, "lite", "durable_vs_default") or {}
            for field, text in (("p50", "  durable / default: median, each over its floor"),
                                ("p50_raw", "  durable / default: median, plain us ratio"),
                                ("loop_wall", "  diag: durable / default: loop wall"),
                                ("caller_cpu", "  diag: durable / default: caller CPU")):
                rows.append((text, _fmt(ratios.get(field)), "", ""))
    for key, title in (("e2e_http_bs10", "HTTP"), ("e2e_http_bs100", "HTTP"),
                       ("https", "HTTPS")):
        block = results.get(key) or {}
        if "lite" not in block:
            continue
        head = "%s %s events, bs=%s" % (title, _fmt(block.get("events")),
                                         block.get("buffer_size"))
        no_ratio = ("all_delivered", "spooled", "journal_bytes_per_event")
        for field, label in (("wall_s", "wall s"), ("cpu_s", "client CPU s"),
                             ("cpu_per_request_us", "client CPU us/request"),
                             ("spooled", "events spooled to disk on the way"),
                             ("journal_bytes_per_event", "spool bytes written/event logged"),
                             ("connections", "TCP connections seen"),
                             ("requests", "requests seen"),
                             ("all_delivered", "every event arrived")):
            lite, iss = _get(block, "lite", field), _get(block, "isstreamer", field)
            ratio = "" if field in no_ratio else _fmt(_ratio(iss, lite))
            rows.append(("%s: %s" % (head, label), _fmt(lite), _fmt(iss), ratio))
        for variant, fields in ((_BIG_QUEUE_VARIANT, _BIG_QUEUE_ROWS),
                                (_DURABLE_VARIANT, _DURABLE_ROWS)):
            if variant not in block:
                continue
            for field, label in fields:
                value = _get(block, variant, field)
                iss = _get(block, "isstreamer", field)
                ratio = _fmt(_ratio(iss, value)) if field in ("wall_s", "cpu_s") else ""
                rows.append(("  %s: %s" % (variant, label), _fmt(value), "", ratio))
    trickle = results.get("durable_trickle") or {}
    if trickle.get("runs"):
        head = "durable, %s events at %g/s, bs=%d" % (
            _fmt(trickle["events"]), trickle["rate_per_s"], trickle["buffer_size"])
        for field, label in _DURABLE_ROWS:
            if field != "spooled":
                rows.append(("%s: %s" % (head, label), _fmt(trickle.get(field)), "", ""))
    https = results.get("https") or {}
    if "http.client reuse" in https:
        reuse = _get(https, "http.client reuse", "cpu_per_request_us")
        new = _get(https, "http.client new", "cpu_per_request_us")
        rows.append(("HTTPS http.client CPU us/request: reuse | new conn each",
                     _fmt(reuse), _fmt(new), "new/reuse %s" % _fmt(_ratio(new, reuse))))
    imports = results["import"]
    rows.append(("import ms (-X importtime, cumulative)",
                 _fmt(_get(imports, "lite", "median_ms")),
                 _fmt(_get(imports, "isstreamer", "median_ms")),
                 _fmt(_ratio(_get(imports, "isstreamer", "median_ms"),
                             _get(imports, "lite", "median_ms")))))
    memory = results["memory"]
    for field, label in (("bytes_per_event", "bytes/queued event (100k queued)"),
                         ("peak_bytes_per_event", "  peak bytes/event during logging"),
                         ("max_rss_kb", "  child max RSS KiB")):
        lite, iss = _get(memory, "lite", field), _get(memory, "isstreamer", field)
        rows.append((label, _fmt(lite), _fmt(iss), _fmt(_ratio(iss, lite))))

    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0])] +
                               [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]))
        if index == 0:
            lines.append("-" * len(lines[0]))
    lines.append("")
    lines.append(_LEGEND)
    lines.append("")
    lines.append("targets (diagnostic lines are other views of the target above them, set "
                 "against its limit for comparison)")
    targets = results["targets"]
    width = max(len(t["target"]) for t in targets) + len("diagnostic: ")
    for target in targets:
        if target["kind"] == "diagnostic":
            status = {True: "within", False: "over", None: "not measured"}[target["met"]]
            name = "  diagnostic: " + target["target"]
        else:
            status = {True: "met", False: "NOT MET", None: "not measured"}[target["met"]]
            name = ("check: " if target["kind"] == "check" else "") + target["target"]
        lines.append("  %-*s %10s %-2s (%s)  %s" % (
            width, name, _fmt(target["value"]), target["unit"], target["limit"], status))
    return "\n".join(lines)


# --- Command line ----------------------------------------------------------------------------

def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark isstreamer_lite against ISStreamer 2.0.0 on 127.0.0.1.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and events: a smoke run under a minute")
    parser.add_argument("--json", default=os.path.join(_HERE, "results.json"),
                        help="where to write the results (default: %(default)s)")
    parser.add_argument("--skip-isstreamer", action="store_true",
                        help="measure isstreamer_lite only (no virtual environment)")
    parser.add_argument("--venv", help="virtual environment for ISStreamer (default: "
                        "~/.cache/isstreamer_lite-bench/venv-pyX.Y, created if missing)")
    parser.add_argument("--isstreamer-python",
                        help="an interpreter that already has ISStreamer 2.0.0")
    parser.add_argument("--lite-dir", default=_REPO,
                        help="directory holding the isstreamer_lite.py to measure "
                        "(default: the repository, %(default)s)")
    parser.add_argument("--events", type=int,
                        help="events per end-to-end run (default 20000; 4000 with --quick)")
    args = parser.parse_args(argv)
    args.lite_dir = os.path.abspath(args.lite_dir)
    if not os.path.isfile(os.path.join(args.lite_dir, "isstreamer_lite.py")):
        parser.error("no isstreamer_lite.py in %s" % args.lite_dir)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child_main(argv[1])
    args = _parse_args(argv)
    started = time.monotonic()
    load_start = _loadavg()

    def progress(message):
        sys.stderr.write("[%6.1fs] %s\n" % (time.monotonic() - started, message))
        sys.stderr.flush()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < min(hard, 65536):
        # ISStreamer holds a socket per in-flight batch: thousands at once.
        new_soft = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))

    bench = _Bench(args, progress)
    results = {"import": {}, "log_cost": {}, "e2e_http_bs10": {}, "e2e_http_bs100": {},
               "https": {}, "memory": {}, "durable_trickle": {}}
    try:
        sizes = bench.sizes
        _measure_imports(bench, results)
        _measure_log_cost(bench, results)
        _measure_e2e(bench, results, "e2e_http_bs10", bench.http, bench.http_url, 10,
                     sizes["e2e_repeats"], [(_BIG_QUEUE_VARIANT, {"max_queue": 50000}),
                                            (_DURABLE_VARIANT, _DURABLE_OPTIONS)])
        _measure_e2e(bench, results, "e2e_http_bs100", bench.http, bench.http_url, 100,
                     sizes["e2e_repeats"])
        _measure_e2e(bench, results, "https", bench.https, bench.https_url, 10,
                     sizes["https_repeats"])
        _measure_raw_https(bench, results, sizes["https_repeats"])
        _measure_trickle(bench, results)
        _measure_memory(bench, results)
    finally:
        bench.close()
    results["targets"] = _targets(results)
    results["meta"] = {
        "python": sys.version.split()[0], "implementation": platform.python_implementation(),
        "platform": platform.platform(), "cpus": os.cpu_count(), "quick": args.quick,
        "sizes": sizes, "runtime_s": round(time.monotonic() - started, 1),
        "clients": bench.clients, "isstreamer_python": bench.pythons.get("isstreamer"),
        "lite_module": os.path.join(os.path.abspath(args.lite_dir), "isstreamer_lite.py"),
        "lite_version": _lite_version(args.lite_dir),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_1min_start": load_start, "loadavg_1min_end": _loadavg(),
        "e2e_phase": "construct + log N events + close() (+ join ISStreamer's threads)",
        "durable_options": _DURABLE_OPTIONS,
        "log_median": "p50 of single calls timed alone, perf_counter overhead subtracted",
        "memory_event": "key a shared str, value a fresh float, epoch from time.time()",
    }
    directory = os.path.dirname(os.path.abspath(args.json))
    if not os.path.isdir(directory):
        os.makedirs(directory)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
        handle.write("\n")
    print(_table(results))
    print("\nruntime %.1f s; load average %s at start, %s at end (other work on the "
          "machine skews these numbers); JSON written to %s"
          % (time.monotonic() - started, _fmt(load_start), _fmt(_loadavg()), args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
