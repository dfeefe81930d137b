"""Tests for isstreamer_lite: ``python3 -m unittest -v test_isstreamer_lite``.

Real HTTP to servers on 127.0.0.1 started by the tests; no sleeps to
synchronise; nothing reaches the real Initial State servers.
"""

import ast
import atexit
import calendar
import collections
import contextlib
import csv
import datetime
import decimal
import email.utils
import errno
import filecmp
import fractions
import glob
import hashlib
import http.client
import importlib.util
import io
import itertools
import json
import logging
import os
import platform
import py_compile
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest
import warnings
from unittest import mock

import isstreamer_lite as lite

HERE = os.path.dirname(os.path.abspath(lite.__file__))
KEY = "ist_test_access_key_0123456789"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy",
              "NO_PROXY", "all_proxy", "ALL_PROXY")
CONFIG_VARS = ("IS_ACCESS_KEY", "IS_BUCKET_KEY", "IS_BUCKET_NAME", "IS_API_BASE",
               "IS_SPOOL_DIR", "IS_DURABLE")
_saved_env = {}
_saved_handlers = {}

# The full matrix runs when ISSTREAMER_LITE_FULL=1, as CPython's expensive
# resources run under -u: every signal at every moment, repeated SIGKILLs,
# every fault, every shell, crash states and the slow link at full size.
# .ci/run asks for it on every Python. The default run (the README's command)
# covers each of those behaviours once, in seconds.
FULL_MATRIX = os.environ.get("ISSTREAMER_LITE_FULL") == "1"


# Where PyPy itself is at fault, its tests are skipped with the reason (README, Tests).
PYPY = platform.python_implementation() == "PyPy"
PYPY_NO_ATEXIT_ON_SIGINT = ("PyPy 7.3.11 runs no atexit hook when a KeyboardInterrupt "
                            "ends the script: it dies of SIGINT at once")


def full_matrix_only(covered):
    """Skip the test unless the full matrix was asked for; ``covered``: what the
    default run checks instead."""
    return unittest.skipUnless(FULL_MATRIX, "full matrix only (ISSTREAMER_LITE_FULL=1); "
                                            "the default run: " + covered)


def full_or(full, default):
    """``full`` when the full matrix was asked for, else the default run's ``default``."""
    return full if FULL_MATRIX else default


def concurrently(case, cells, width=3):
    """Run matrix cells, ``[(subTest labels, callable), ...]``, ``width`` at a time.

    For cells whose children mostly wait (timers, exit hooks, dead servers):
    they overlap instead of queueing, but no more than ``width`` at once, so
    that on a loaded 2-core machine no child is starved past its own
    deadlines. Each cell's failure is reported in the test's thread under its
    subTest labels. The join is a failure guard: each cell bounds its own
    waits.
    """
    errors = [None] * len(cells)
    slots = threading.BoundedSemaphore(width)

    def run(index):
        try:
            with slots:
                cells[index][1]()
        except BaseException:       # reported in the test's thread, below
            errors[index] = sys.exc_info()[1]
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(cells))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    for (labels, _), thread, error in zip(cells, threads, errors):
        with case.subTest(**labels):
            case.assertFalse(thread.is_alive(), "the cell did not end in 600 s")
            if error is not None:
                raise error


# --- Running the suite in worker processes ------------------------------------
#
# Most of the suite's time is waiting: for child processes, timers, servers
# that hang. The README's command runs the test classes in forked worker
# processes (ISSTREAMER_LITE_JOBS, default four a core, at most eight; 1 runs
# them here, one by one), each taking the next class from a shared queue and
# reporting each test's outcome back; this process replays the outcomes to
# unittest's result as they arrive, so -v, -f and the summary read as usual.
# A worker is a process of its own: environment, signal handlers, logging and
# patched module attributes stay within it, as in a serial run.

def _jobs():
    text = os.environ.get("ISSTREAMER_LITE_JOBS", "")
    if not text:        # mostly waiting: four workers a core (eight here), at most eight
        return max(2, min(8, 4 * (os.cpu_count() or 1)))
    try:
        return max(1, int(text))
    except ValueError:
        raise SystemExit("ISSTREAMER_LITE_JOBS=%r: give a whole number of worker processes "
                         "(1 runs the tests in this process)" % text)


class _Remote(Exception):
    """A failure, error or skip as a worker process formatted it."""

    def __str__(self):
        return self.args[0]


class _RemoteFailure(_Remote, AssertionError):
    pass


class _ReportingResult(unittest.TestResult):
    """A worker's result: each test's outcomes go to the parent as one JSON line."""

    def __init__(self, out):
        unittest.TestResult.__init__(self)
        self.out = out
        self.outcomes = []

    def _note(self, test, kind, text=""):
        if not isinstance(test, unittest.TestCase):      # a class or module fixture
            self._send(str(test), [(kind, text)], fixture=True)
        else:
            self.outcomes.append((kind, text))

    def _send(self, name, outcomes, fixture=False, seconds=0.0):
        self._write({"test": name, "outcomes": outcomes, "fixture": fixture,
                     "seconds": seconds})

    def _write(self, report):
        line = json.dumps(report) + "\n"
        os.write(self.out, line.encode("utf-8"))        # a broken pipe ends the worker

    def startTest(self, test):
        unittest.TestResult.startTest(self, test)
        self.outcomes = []
        self.started = time.monotonic()
        self._write({"start": test.id()})

    def stopTest(self, test):
        unittest.TestResult.stopTest(self, test)
        self._send(test.id(), self.outcomes, seconds=time.monotonic() - self.started)

    def addError(self, test, err):
        self._note(test, "error", self._exc_info_to_string(err, test))

    def addFailure(self, test, err):
        self._note(test, "failure", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        self._note(test, "skip", reason)

    def addExpectedFailure(self, test, err):
        self._note(test, "xfail", self._exc_info_to_string(err, test))

    def addUnexpectedSuccess(self, test):
        self._note(test, "xpass")

    def addSubTest(self, test, subtest, err):
        if err is not None:
            kind = "failure" if issubclass(err[0], test.failureException) else "error"
            self.outcomes.append((kind, "%s\n%s" % (subtest, self._exc_info_to_string(
                err, test))))


class _QueueSuite(unittest.TestSuite):
    """A worker's tests: the classes it takes, one by one, from the shared queue."""

    _cleanup = False

    def __init__(self, classes, queue):
        unittest.TestSuite.__init__(self)
        self.classes = classes
        self.queue = queue

    def __iter__(self):
        while True:
            record = os.read(self.queue, 4)     # the parent wrote them all at once
            if len(record) < 4:
                return
            for test in self.classes[struct.unpack(">I", record)[0]]:
                yield test


# The classes that take longest (ISSTREAMER_LITE_TIMES=1 prints each class's
# time), queued first so that no worker starts one of them last. Only the
# queue's order: a stale entry costs seconds, never a result.
_LONGEST_FIRST = ("SlowLinkTest", "CrashTest", "DoneWhenTest", "InstallShellsTest",
                  "CrashStateTest", "InstallScriptTest", "RateLimitedTest", "SignalLifecycleTest",
                  "CliReplayTest", "StatusTest", "DeadlineTest", "StatusTruthTest",
                  "ConcurrentReplayTest", "CliSendTest")


class _ForkingSuite(unittest.TestSuite):
    """The module's tests, run by ``jobs`` forked workers (see above)."""

    def __init__(self, tests, jobs):
        unittest.TestSuite.__init__(self, tests)
        self.jobs = jobs
        self.seconds = collections.Counter()    # per class, for ISSTREAMER_LITE_TIMES=1
        self.slowest = collections.Counter()    # per test
        self.started, self.ended = None, []     # when the run began, each worker ended

    def _classes(self):
        """The tests grouped by class, in the order loaded."""
        groups = collections.OrderedDict()
        pending = list(self._tests)
        while pending:
            test = pending.pop(0)
            if isinstance(test, unittest.TestSuite):
                pending[:0] = list(test)
            else:
                groups.setdefault(type(test), []).append(test)
        rank = {name: n for n, name in enumerate(_LONGEST_FIRST)}
        return sorted(groups.values(), key=lambda tests: rank.get(type(tests[0]).__name__,
                                                                  len(rank)))

    def run(self, result, debug=False):
        self.started = time.monotonic()
        classes = self._classes()
        by_id = {t.id(): t for tests in classes for t in tests}
        child_path()                            # compiled once, before the fork
        queue_r, queue_w = os.pipe()
        os.write(queue_w, b"".join(struct.pack(">I", i) for i in range(len(classes))))
        os.close(queue_w)
        workers = {}
        for _ in range(min(self.jobs, len(classes))):
            out_r, out_w = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:                        # the worker
                status = 1
                try:
                    os.close(out_r)
                    for other in workers:
                        os.close(other)
                    _QueueSuite(classes, queue_r).run(_ReportingResult(out_w))
                    status = 0
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(status)            # the parent's atexit hooks are its own
            os.close(out_w)
            workers[out_r] = (pid, b"")
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminated)
        try:
            self._collect(workers, by_id, result)
        finally:
            if previous is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, previous)
            for fd, (pid, _) in workers.items():
                os.close(fd)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            for fd, (pid, _) in workers.items():
                os.waitpid(pid, 0)
            os.set_blocking(queue_r, False)
            try:
                left = os.read(queue_r, 65536)
            except BlockingIOError:
                left = b""
            os.close(queue_r)
        if os.environ.get("ISSTREAMER_LITE_TIMES") == "1":
            sys.stderr.write("".join("%7.2f s  %s\n" % (seconds, name) for name, seconds
                                     in self.seconds.most_common()))
            sys.stderr.write("slowest tests:\n" + "".join(
                "%7.2f s  %s\n" % (seconds, name) for name, seconds
                in self.slowest.most_common(15)))
            sys.stderr.write("workers ended after %s s\n" % ", ".join(
                "%.1f" % t for t in sorted(self.ended)))
        if left and not result.shouldStop:
            names = [classes[i][0].__class__.__name__ for (i,) in struct.iter_unpack(">I", left)]
            self._report_lost(result, "no worker was left to run %s" % ", ".join(names))
        return result

    def _collect(self, workers, by_id, result):
        """Replay each worker's reports to ``result`` until every worker is done;
        ``workers`` keeps those still running (the caller kills them)."""
        import selectors
        selector = selectors.DefaultSelector()
        for fd in workers:
            selector.register(fd, selectors.EVENT_READ)
        running = {}                            # worker's fd: the test it started last
        while workers and not result.shouldStop:
            for key, _ in selector.select(600):     # a failure guard: tests bound their waits
                fd = key.fd
                chunk = os.read(fd, 65536)
                pid, buffered = workers[fd]
                if not chunk:                   # the worker is done: reaped, forgotten
                    selector.unregister(fd)
                    os.close(fd)
                    del workers[fd]
                    self.ended.append(time.monotonic() - self.started)
                    _, status = os.waitpid(pid, 0)
                    if status or fd in running:
                        self._report_lost(result, "a worker process ended (%s) during %s" % (
                            _wait_status(status), running.get(fd, "its fixtures")))
                    continue
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                workers[fd] = (pid, buffered)
                for line in lines:
                    report = json.loads(line.decode("utf-8"))
                    if "start" in report:
                        running[fd] = report["start"]
                        continue
                    running.pop(fd, None)
                    self.seconds[report["test"].rsplit(".", 1)[0]] += report["seconds"]
                    self.slowest[report["test"]] = report["seconds"]
                    self._replay(report, by_id, result)
        selector.close()

    @staticmethod
    def _replay(report, by_id, result):
        test = by_id.get(report["test"]) if not report["fixture"] else None
        if test is None:
            test = unittest.suite._ErrorHolder(report["test"])
            for kind, text in report["outcomes"]:
                if kind == "skip":
                    result.addSkip(test, text)
                else:
                    result.addError(test, (_Remote, _Remote(text), None))
            return
        result.startTest(test)
        if not report["outcomes"]:
            result.addSuccess(test)
        for kind, text in report["outcomes"]:
            if kind == "failure":
                result.addFailure(test, (_RemoteFailure, _RemoteFailure(text), None))
            elif kind == "error":
                result.addError(test, (_Remote, _Remote(text), None))
            elif kind == "skip":
                result.addSkip(test, text)
            elif kind == "xfail":
                result.addExpectedFailure(test, (_Remote, _Remote(text), None))
            else:
                result.addUnexpectedSuccess(test)
        result.stopTest(test)

    @staticmethod
    def _report_lost(result, why):
        holder = unittest.suite._ErrorHolder("worker process")
        result.addError(holder, (_Remote, _Remote(why), None))


def _wait_status(status):
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.WEXITSTATUS(status)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)      # the workers are killed on the way out


def load_tests(loader, tests, pattern):
    """The README's command: the classes in worker processes where fork is there."""
    jobs = _jobs()
    if jobs == 1 or not hasattr(os, "fork") or threading.active_count() > 1:
        return tests
    return _ForkingSuite([tests], jobs)


# A self-signed certificate for 127.0.0.1 and localhost, valid until 2126,
# made for these tests only (openssl req -x509 -newkey rsa:2048 -days 36500).
_TEST_CERT = """\
-----BEGIN CERTIFICATE-----
MIIDJzCCAg+gAwIBAgIUNbaqqsYX9v2wx0SHlsVdex2EDu4wDQYJKoZIhvcNAQEL
BQAwFDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTEyOTAzNTIzNloYDzIxMjYx
MTA1MDM1MjM2WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwggEiMA0GCSqGSIb3DQEB
AQUAA4IBDwAwggEKAoIBAQCnKQkqHk/tZ31E9Z9IAKtMMgd0LjQgKcShX/buaqgn
rs6KS+KiIO1C77Pre7WUWvE24CK8yamKd5fbbiUjxCb3sB8wbgW9atWktzflVkUa
TWXbG58lIy7X8YcrTy0d8sDkh3FuYAtENkl10sWG4Lqxig17bEKIg5xSPzj3rywl
vquz4mmCyI+Uk1DFqmF2cKyXKIuIKZwyvMAUrOgvF4SwC7czig2g9jq2Op3Ru3Cj
4+kN8h9ifGP6v+45OuiRFlWp8hOEgQCcmcPt5q/b2gofT66ukIxVP8TbAraxTmJO
mqIE39nm5207oTXdaQYA+8FONEWAiUW+9PHrqiVKzZVpAgMBAAGjbzBtMB0GA1Ud
DgQWBBTeu1dW/pkeOAS7Ujvsuz9uCUj1LTAfBgNVHSMEGDAWgBTeu1dW/pkeOAS7
Ujvsuz9uCUj1LTAPBgNVHRMBAf8EBTADAQH/MBoGA1UdEQQTMBGHBH8AAAGCCWxv
Y2FsaG9zdDANBgkqhkiG9w0BAQsFAAOCAQEAPM9PtH2VNighxDP4Zmvx5o4N3IvG
veFkQEd64g6sLYmcuKZ5aOILoCQuaijf4FTBnc1Kl1O6NcU5uiiJLndMG8ZTHrat
KVoUJra/Mrp6pRtRtRtG9ced/5Whb8POafrrMT6r5QeCFnl4AWXfmBuF0dff8q8P
LoZ77Vcf60Me2GjoV6eaKBZd9kJNcibhQMB3Xo36Dsx+ezrisM3c9WuwMyopkII7
1bR8ZI3CgHc9WjgQWGXeCvuNFamQ0Rnh8uke2Kzgl+hvBYizE3DUaVS0Y98xVhkF
FL63XuRu3nDNtW1yd2TISthY/tWgUayXcxcKqj4Vf7HWDutrF4PUAp4Jjw==
-----END CERTIFICATE-----
"""

_TEST_KEY = """\
-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCnKQkqHk/tZ31E
9Z9IAKtMMgd0LjQgKcShX/buaqgnrs6KS+KiIO1C77Pre7WUWvE24CK8yamKd5fb
biUjxCb3sB8wbgW9atWktzflVkUaTWXbG58lIy7X8YcrTy0d8sDkh3FuYAtENkl1
0sWG4Lqxig17bEKIg5xSPzj3rywlvquz4mmCyI+Uk1DFqmF2cKyXKIuIKZwyvMAU
rOgvF4SwC7czig2g9jq2Op3Ru3Cj4+kN8h9ifGP6v+45OuiRFlWp8hOEgQCcmcPt
5q/b2gofT66ukIxVP8TbAraxTmJOmqIE39nm5207oTXdaQYA+8FONEWAiUW+9PHr
qiVKzZVpAgMBAAECggEAAIN2bRQIGClH5T0BRENcQ1upUjNiIvHTPNECp9uEBhCE
v0AEbjhpAi+iVIgzbUU/lco9Jmn9hK4MCrcyk1g4QRfgFfyrNS3C15gIf+0ylntu
Y1dDtzrTG1lj75TKsAYy5CuBBF8fKb0mSfUKePjvxI6Grr5iZfD25fnJFFm2v6xD
rT9v7MhrKbkxuwpEnqdSscunwV74oHFovMB+M6o+c45hgTDoCPQrGAf1NTSK5Fgo
6iMA4KrR07wo0OA1O+6GcY26MhqetIZv6xIuyIhnbO6gjW3DnXpaSHGSKCWLbLOk
zupx52JeCFFpwuVyUzmS/eyi+V22v3ex3XJ62026AQKBgQDVG0gfTNhF18BVAyKw
Q/YhOzWIsywir8Wx0laTTOJctRBrPiKf/0f5VrTkQwdrCdXgdoDaFMguXQtDDQI9
F28rVTmFtk0k4THZEIxSjIMqQOqZkEwtPFOo5ZDKylFjBdxBFRufk8YI8S7hw5IG
rZePRGk5UGjI0E31trPPjCRR8QKBgQDIzkkd2fO/YoP+2kRPY7ePBeN55d4dAuth
+ZFN5roYIOqwh4fG0ORySP43OxmewI75zcxg2RvYg3HZU5u1eEOCY8MLehe0IV7g
eFmzthgy8CETWgzK3nkg4UlRIrSkRNeVoQiyEKqcNs6f/7ifiBNj12eS904eL1xj
3g9hCjYC+QKBgQCxfMphv0e1S88VPspKUiARZ1Xb55ZPwWN/CbcvcW5qVic5moOO
DDiuswdvwV/RR1zJWQlSGNLswnOZwaDmrrjZN170PXQczi4NIlosenjX3T9G7MZ1
OnRXC/O+4ihMt9nMnr7l9laOpgks4Qyi4TuEiC63HIBZGByGFEfICWlKkQKBgC0e
3SMOBE0uz8YGOW81UtuaUSDk2+Hc9BMRxuqgO5SMYO/FpGayLYLYj/bNGtanIflT
mubwIeemsYBJ3yUJnvG/hOYhSw44qV766/0Ln6hieKwmgdVb5A/VT2ohyEFZDrAa
fR+1ywBK+GbPSSbfpqu6jRVi6HSz46i1DvOZHcXRAoGAHNrjaFKzr8W8HlZ5Ey8W
RGxwX+nfw4suX9UuHR4aqOy1b0Uvx8IY4bNWom3szMHajUAX4+SWpvHhlhJ4BpQ2
YzxEaGOBMNlbnX1A3zpb42AGES6RVgdRi99DomJZHP9PFPyd5mTOSVW454UyHVFF
vFTgtnAddKah4/p2M7aWNio=
-----END PRIVATE KEY-----
"""


def _killed(signum, frame):
    os._exit(128 + signum)


def setUpModule():
    """Keep the developer's proxies and IS_* settings out of the tests; stay killable.

    Streamers made here would turn SIGTERM and SIGHUP into SystemExit inside
    whatever test runs (a `timeout` around the suite would become one error,
    and the run would go on). The runner installs its own handlers first,
    which the library never replaces: a signal still ends the run.
    """
    for name in PROXY_VARS + CONFIG_VARS:
        if name in os.environ:
            _saved_env[name] = os.environ.pop(name)
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is signal.SIG_DFL:
                _saved_handlers[number] = signal.signal(number, _killed)


def tearDownModule():
    os.environ.update(_saved_env)
    for number, handler in _saved_handlers.items():
        signal.signal(number, handler)


_child_path = []


def child_path():
    """PYTHONPATH for children: a copy of this module, compiled once for the run.

    With PYTHONDONTWRITEBYTECODE set (CI sets it, so do many shells) every
    child would compile the module's source again: 0.1 to 0.3 s of CPU each,
    for some 200 children a run.
    """
    if not _child_path:
        folder = tempfile.mkdtemp(prefix="isl-module-")
        atexit.register(shutil.rmtree, folder, True)
        target = os.path.join(folder, "isstreamer_lite.py")
        shutil.copy2(lite.__file__, target)
        py_compile.compile(target, cfile=importlib.util.cache_from_source(target),
                           doraise=True)
        _child_path.append(folder)
    return _child_path[0]


# Children run with -S: the standard library and this module are all they
# import, and no .pth file of the machine's site-packages runs in them (one
# here costs 50 ms of CPU at every start, for some 120 children a run).
PYTHON = [sys.executable, "-S"]


def child_env(**extra):
    """Environment for a subprocess: no proxies, no IS_* settings, this module."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS + CONFIG_VARS}
    env["PYTHONPATH"] = child_path()
    env.update(extra)
    return env


def guarded_popen(case, argv, cwd, env, guard_seconds):
    """A child with pipes, killed at the case's cleanup and by a failure guard."""
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True,
                             cwd=cwd, env=env)
    guard = threading.Timer(guard_seconds, child.kill)
    guard.daemon = True
    guard.start()
    case.addCleanup(guard.cancel)

    def reap():
        if child.poll() is None:
            child.kill()
            child.wait(30)
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:          # a test may have closed stdin itself
                stream.close()
    case.addCleanup(reap)
    return child


class IsolatedCase(unittest.TestCase):
    """The base of every test, with the shared fixtures, each undone at cleanup.

    tempdir(), sink() (a ``sink_class``: lite._Sink here, FaultSink for the
    delivery tests), streamer() (fast test settings, closed at cleanup),
    received(); child processes get child_env().

    Nothing a test leaves in the module's globals reaches the next. Rate
    budgets are kept per (api_base, key) for the whole process, and a sink's
    port is often handed out again later in a run: a budget learnt from one
    test's rate-limited sink would otherwise pace a later test whose sink
    got the same port.
    """

    sink_class = lite._Sink             # what sink() starts unless told
    bucket_key = "test-bucket"          # streamer()'s bucket unless told
    temp_prefix = "isl-test-"

    def setUp(self):
        with lite._budgets_lock:
            lite._budgets.clear()

    def tempdir(self):
        """A new temporary folder, removed at cleanup."""
        path = tempfile.mkdtemp(prefix=self.temp_prefix)
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def sink(self, cls=None, **kwargs):
        """A started sink (``cls``, else ``sink_class``) on 127.0.0.1, stopped at cleanup."""
        sink = (cls or self.sink_class)(**kwargs).start()
        self.addCleanup(sink.stop)
        if isinstance(sink, FaultSink):
            self.addCleanup(sink.released.set)  # runs before stop: no hang outlives a test
        return sink

    def streamer(self, target=None, **kwargs):
        """A Streamer to ``target`` (a sink or an API base URL) in a temp spool, closed at cleanup."""
        options = dict(bucket_key=self.bucket_key, access_key=KEY, ini_file_location=False,
                       flush_interval=0.05, backoff_base=0.01, backoff_cap=0.05)
        if target is not None:
            options["api_base"] = getattr(target, "url", target)
        options.update(kwargs)
        if "spool_dir" not in options:
            options["spool_dir"] = self.tempdir()
        streamer = lite.Streamer(**options)
        self.addCleanup(streamer.close, 0.5)     # only spools what is left
        return streamer

    def received(self, sink, bucket=None):
        """(key, value) of the events ``sink`` (or an Outage) received, of ``bucket`` if given."""
        if isinstance(sink, Outage):
            return sink.received(bucket)
        with sink.changed:
            return [(e["key"], e["value"]) for b, e in sink.events
                    if bucket is None or b == bucket]


class LiteTestCase(IsolatedCase):
    """The shared fixtures, with the library's logger quiet and restored at cleanup."""

    def setUp(self):
        IsolatedCase.setUp(self)
        logger = logging.getLogger("isstreamer_lite")
        state = (logger.level, list(logger.handlers), logger.propagate)

        def restore():
            logger.setLevel(state[0])
            logger.handlers[:] = state[1]
            logger.propagate = state[2]
        self.addCleanup(restore)
        # A handler of our own keeps debug_level >= 1 from adding a console one,
        # and keeps lastResort's noise off stderr.
        logger.addHandler(logging.NullHandler())


class RecordingSink(lite._Sink):
    """A sink that also keeps each request's headers and bucket."""

    def __init__(self, **kwargs):
        lite._Sink.__init__(self, **kwargs)
        self.seen = []

    def fault(self, handler, path):
        with self.changed:
            self.seen.append((path, dict(handler.headers), threading.get_ident()))
        return False


# --- Shared fixtures -----------------------------------------------------------
# Sinks, servers, base classes and helpers that several sections use.

def tls_files(case):
    """Write the test certificate and key; return (cert path, key path)."""
    folder = case.tempdir()
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert, "w") as handle:
        handle.write(_TEST_CERT)
    with open(key, "w") as handle:
        handle.write(_TEST_KEY)
    return cert, key


class RequestSizeSink(lite._Sink):
    """A sink that also keeps how many events each accepted request carried."""

    def __init__(self, **kwargs):
        super(RequestSizeSink, self).__init__(**kwargs)
        self.sizes = [0]

    def _add_events(self, handler, data):
        with self.changed:
            self.sizes.append(len(data) if isinstance(data, list) else 1)
        return super(RequestSizeSink, self)._add_events(handler, data)


def installed_pythons():
    """{(major, minor, micro): path} of pyenv's CPythons, else this interpreter."""
    found = {}
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, universal_newlines=True,
                              timeout=30).stdout.strip()
        versions = os.path.join(root, "versions")
        for name in (os.listdir(versions) if os.path.isdir(versions) else ()):
            match = re.match(r"^(\d+)\.(\d+)\.(\d+)$", name)
            path = os.path.join(versions, name, "bin", "python")
            if match and os.access(path, os.X_OK):
                found[tuple(int(part) for part in match.groups())] = path
    if not any(version >= (3, 6) for version in found):
        found[tuple(sys.version_info[:3])] = sys.executable
    return found


EXAMPLES_KEY = "ist_example_key"


EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(lite.__file__)), "examples")


EXAMPLES_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy",
                       "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


class ExamplesSink(lite._Sink):
    """A sink that also keeps the events of each /api/events request, in order."""

    def __init__(self, **kwargs):
        lite._Sink.__init__(self, **kwargs)
        self.requests_events = []

    def fault(self, handler, path):
        if path == "/api/events":
            with self.changed:
                self.requests_events.append(json.loads(handler.body.decode("utf-8")))
        return False


class ExampleCase(IsolatedCase):
    """Helpers: a recording sink, a temp dir, scripts run as children."""

    def setUp(self):
        IsolatedCase.setUp(self)
        self.sink = ExamplesSink().start()
        self.addCleanup(self.sink.stop)
        self.dir = tempfile.mkdtemp(prefix="isl-examples-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def example_env(self, **extra):
        """A child's environment: the sink, a temp spool and HOME, no proxies."""
        env = {k: v for k, v in os.environ.items()
               if k not in EXAMPLES_PROXY_VARS and not k.startswith("IS_")
               and k != "XDG_STATE_HOME"}
        env.update(IS_ACCESS_KEY=EXAMPLES_KEY, IS_API_BASE=self.sink.url,
                   IS_SPOOL_DIR=os.path.join(self.dir, "spool"), HOME=self.dir,
                   PYTHONPATH=child_path(), **extra)
        return env

    def run_script(self, path):
        """Run a script as a child; return its result after checking a clean exit."""
        self.started = time.time()
        result = subprocess.run(PYTHON + ["-W", "default", path], cwd=self.dir,
                                env=self.example_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
        self.finished = time.time()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result

    def run_example(self, name, quiet=True):
        path = os.path.join(EXAMPLES_DIR, name)
        if not os.path.isdir(EXAMPLES_DIR):
            self.skipTest("no examples/ beside %s (a vendored copy)" % lite.__file__)
        result = self.run_script(path)
        if quiet:
            self.assertEqual(result.stderr, "")
        return result

    def run_text(self, text):
        path = os.path.join(self.dir, "device_script.py")
        with open(path, "w") as handle:
            handle.write(text)
        result = self.run_script(path)
        self.assertEqual(result.stderr, "")
        return result

    def received(self):
        """(bucket name, key, value) of every event, in arrival order."""
        with self.sink.changed:
            return [(self.sink.buckets.get(b), e["key"], e["value"])
                    for b, e in self.sink.events]

    def epochs(self):
        with self.sink.changed:
            epochs = [e["epoch"] for _, e in self.sink.events]
        for epoch in epochs:
            self.assertTrue(self.started - 1 <= epoch <= self.finished + 1, epoch)
        return epochs


CLI_KEY = "ist_cli_test_key_0123456789"


CLI_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy",
                  "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


COMMANDS = ("selftest", "send", "pipe", "replay", "sink")


# "isstreamer_lite: 2026-05-01 12:00:00: key value", the --debug 1 echo of one event.
ECHO = re.compile(r"^isstreamer_lite: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: (\S+) (.*)$")


def hold_port(port=0):
    """A socket bound to 127.0.0.1:``port`` that never listens: connections are refused.

    While it is open, no server of this or another test run is handed that
    port (a closed probe's port comes round again, often).
    """
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
    except OSError:
        holder.close()
        raise
    return holder


_DEAD_PORTS = []        # held for the whole run: a dead URL never comes alive


def assert_worker_stopped(streamer, timeout=10):
    """Wait for the worker of a closed Streamer to stop; fail after ``timeout``.

    close() keeps its deadline; a worker that woke late on a loaded machine
    may still be writing the spool or holding its segments when it returns.
    """
    if not streamer._session.worker.stopped.wait(timeout):
        raise AssertionError("the worker did not stop within %g s of close()" % timeout)


def closed_and_stopped(streamer, timeout):
    """close(timeout)'s answer, once the worker has stopped too."""
    answer = streamer.close(timeout)
    assert_worker_stopped(streamer)
    return answer


def dead_url():
    """An http:// base on 127.0.0.1 where nothing listens (connection refused)."""
    holder = hold_port()
    _DEAD_PORTS.append(holder)
    return "http://127.0.0.1:%d" % holder.getsockname()[1]


def cli_env(home, **extra):
    """A child's environment: no proxies, no IS_* settings, this module, HOME=home."""
    env = {k: v for k, v in os.environ.items()
           if k not in CLI_PROXY_VARS and not k.startswith("IS_") and k != "XDG_STATE_HOME"}
    env["PYTHONPATH"] = child_path()
    env["HOME"] = home
    env.update(extra)
    return env


class CliTestCase(IsolatedCase):
    """Helpers: main() with captured output, child processes; the environment kept clean."""

    temp_prefix = "isl-cli-"

    def setUp(self):
        IsolatedCase.setUp(self)
        # Nothing from the developer's environment reaches main() in this process.
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in list(os.environ):
            if name in CLI_PROXY_VARS or name.startswith("IS_") or name == "XDG_STATE_HOME":
                del os.environ[name]
        # main() may install SIGTERM handlers and logging handlers: put them back.
        logger = lite._log
        logging_state = (logger.level, list(logger.handlers))
        handler = signal.getsignal(signal.SIGTERM)

        def restore():
            logger.setLevel(logging_state[0])
            logger.handlers[:] = logging_state[1]
            signal.signal(signal.SIGTERM, handler)
        self.addCleanup(restore)
        self.home = self.tempdir()
        self.spool = self.tempdir()
        self.ini = os.path.join(self.home, "empty.ini")
        with open(self.ini, "w"):
            pass

    def common(self, api_base):
        """The flags that keep an in-process main() off the developer's config."""
        return ["--api-base", api_base, "--access-key", CLI_KEY, "--ini", self.ini,
                "--spool-dir", self.spool]

    def main(self, argv, stdin=None):
        """Run lite.main(argv) here; return (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
            if stdin is not None:
                stack.enter_context(mock.patch.object(sys, "stdin", io.StringIO(stdin)))
            try:
                status = lite.main(argv)
            except SystemExit as exc:
                status = exc.code
        return status, out.getvalue(), err.getvalue()

    def env(self, **extra):
        return cli_env(self.home, **extra)

    def run_cli(self, args, input=None, timeout=60, **env):
        """Run python -m isstreamer_lite ARGS to the end; a CompletedProcess."""
        return subprocess.run(PYTHON + ["-m", "isstreamer_lite"] + list(args),
                              input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout, cwd=self.home,
                              env=self.env(**env))

    def popen(self, argv, **env):
        """Start a child with pipes; killed at cleanup and by a 60 s failure guard."""
        return guarded_popen(self, argv, self.home, self.env(**env), 60.0)

    def spool_events(self, api_base, buckets):
        """Spool events with a Streamer that cannot reach ``api_base``.

        ``buckets``: [(bucket key, bucket name, [(key, value), ...]), ...].
        """
        streamer = lite.Streamer(buckets[0][1], buckets[0][0], CLI_KEY,
                                 ini_file_location=False, api_base=api_base,
                                 spool_dir=self.spool, wait_timeout=0.5,
                                 backoff_base=0.01, backoff_cap=0.05)
        for number, (bucket_key, bucket_name, events) in enumerate(buckets):
            if number:
                streamer.set_bucket(bucket_name, bucket_key)
            for key, value in events:
                streamer.log(key, value)
        closed_and_stopped(streamer, 0.5)              # its wait_timeout
        self.assertEqual(streamer.stats()["delivered"], 0)
        rows = lite._Spool.of_key(self.spool, CLI_KEY).summary()
        self.assertEqual(sorted((r["bucket_key"], r["events"]) for r in rows),
                         sorted((b[0], len(b[2])) for b in buckets))


def report(name, **figures):
    """Print a done-when test's figures to stderr (they go into the report)."""
    sys.stderr.write("\n  [%s] %s\n" % (name, ", ".join(
        "%s=%s" % (k, ("%.3f" % v) if isinstance(v, float) else v)
        for k, v in sorted(figures.items()))))


class FaultSink(lite._Sink):
    """A sink that follows a script of faults per path, then answers normally.

    ``script(path, *actions)`` queues actions for "/api/events", "/api/buckets"
    or "*" (any path, used when the path's own queue is empty). An action is
    a status code, ``(status, headers)``, ``"reset"`` (TCP RST, no answer),
    ``"drop"`` (FIN, no answer), ``("delay", seconds[, action])`` (wait, then
    the action or the normal answer) or ``("hang", seconds)`` (wait, then
    drop). ``rule(handler, path)`` is asked when no scripted action is left
    and returns an action or None. ``stop_hard()`` takes the server down the
    way a crash does: refused connections, kept-alive ones cut.
    """

    def __init__(self, rule=None, **kwargs):
        lite._Sink.__init__(self, **kwargs)
        self.rule = rule
        self.scripts = collections.defaultdict(collections.deque)
        self.seen = []              # (monotonic time, path, action) per request
        self.released = threading.Event()   # ends every delay and hang at once
        self.dead = False
        self._gate = threading.Condition()  # guards dead, _active and _conns
        self._active = 0            # requests being answered normally
        self._conns = []

    def script(self, path, *actions):
        with self.changed:
            self.scripts[path].extend(actions)

    def handle(self, handler):
        with self._gate:
            self._conns.append(handler.connection)
            dead = self.dead
            if not dead:
                self._active += 1
        if dead:
            self.reset(handler)
            return
        try:
            lite._Sink.handle(self, handler)
        finally:
            with self._gate:
                self._active -= 1
                self._gate.notify_all()

    def fault(self, handler, path):
        with self.changed:
            queue = self.scripts.get(path) or self.scripts.get("*")
            action = queue.popleft() if queue else None
        if action is None and self.rule is not None:
            action = self.rule(handler, path)
        with self.changed:
            self.seen.append((time.monotonic(), path, action))
            self.changed.notify_all()
        return self.perform(handler, action)

    def perform(self, handler, action):
        if action is None:
            return False
        if isinstance(action, int):
            self.reply(handler, action, {"message": "scripted %d" % action})
        elif isinstance(action, tuple) and isinstance(action[0], int):
            self.reply(handler, action[0], {"message": "scripted %d" % action[0]}, action[1])
        elif action == "reset":
            self.reset(handler)
        elif action == "drop":
            self.drop(handler)
        elif action[0] == "delay":
            self.released.wait(action[1])
            return self.perform(handler, action[2] if len(action) > 2 else None)
        elif action[0] == "hang":
            self.released.wait(action[1])
            self.drop(handler)
        else:
            raise ValueError("unknown fault action %r" % (action,))
        return True

    @staticmethod
    def reset(handler):
        """Abort the connection with a TCP RST instead of an answer."""
        handler.close_connection = True
        try:
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
            handler.connection.close()      # really closed (RST) once rfile is closed
        except OSError:
            pass

    @staticmethod
    def drop(handler):
        """Close the connection without answering."""
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def stop_hard(self):
        """Go down: new connections refused, open ones cut, nothing half-answered."""
        with self._gate:
            self.dead = True
            self._gate.wait_for(lambda: self._active == 0, 5.0)
            conns = list(self._conns)
        self.stop()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_seen(self, predicate, timeout=10.0):
        """Wait until predicate(list of (time, path, action)) holds; True if it did."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.seen), timeout)


class SizedFaultSink(RequestSizeSink, FaultSink):
    """A FaultSink that keeps how many events each accepted request carried."""


class Outage(object):
    """One fixed port whose server can go down (connection refused) and come back."""

    def __init__(self, case, up=True, **sink_options):
        self.case = case
        self.options = sink_options
        self.sinks = [case.sink(FaultSink, **sink_options)]
        self.port = self.sinks[0].port
        self.url = self.sinks[0].url
        self._cancel = threading.Event()
        self._holder = None             # keeps the port while down (refused, not reused)
        case.addCleanup(self._cancel.set)
        case.addCleanup(self._release)
        if not up:
            self.down()

    @property
    def current(self):
        return self.sinks[-1]

    def down(self):
        self.current.stop_hard()
        self._holder = hold_port(self.port)

    def up(self):
        self._release()
        sink = self.case.sink(FaultSink, port=self.port, **self.options)
        self.sinks.append(sink)
        return sink

    def _release(self):
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.close()

    def later(self, down_at_once, seconds):
        """In a thread: (go down now, then) come back up after ``seconds``."""
        def run():
            if down_at_once:
                self.down()
            if not self._cancel.wait(seconds):
                self.up()
        thread = threading.Thread(target=run, daemon=True, name="outage")
        thread.start()
        return thread

    def received(self, bucket=None):
        pairs = []
        for sink in self.sinks:
            with sink.changed:
                pairs.extend((e["key"], e["value"]) for b, e in sink.events
                             if bucket is None or b == bucket)
        return pairs


def spool_segments(spool_dir):
    """Spool segment files under ``spool_dir``, oldest first."""
    return sorted(glob.glob(os.path.join(spool_dir, "*", "*", "*.jsonl")),
                  key=os.path.basename)


def spooled_events(spool_dir):
    """Events in the unretired, complete lines of every spool segment."""
    events = []
    for path in spool_segments(spool_dir):
        retired = set()
        if os.path.exists(path + ".ack"):
            with open(path + ".ack", "rb") as handle:
                retired = {tuple(int(n) for n in l.split()) for l in handle
                           if re.match(rb"^[0-9]+ [0-9]+\n$", l)}
        offset = 0
        with open(path, "rb") as handle:
            for line in handle:
                if (offset, offset + len(line)) not in retired and line.endswith(b"\n"):
                    events.extend(json.loads(line.decode("utf-8")))
                offset += len(line)
    return events


class _Watch(logging.Handler):
    """Sets ``hit`` at the first record after which ``predicate()`` holds."""

    def __init__(self, predicate):
        logging.Handler.__init__(self)
        self.predicate = predicate
        self.hit = threading.Event()

    def emit(self, record):
        if not self.hit.is_set() and self.predicate():
            self.hit.set()


class DeliveryTestCase(LiteTestCase):
    """LiteTestCase with scriptable FaultSinks by default; waits on stats, exactly-once checks."""

    sink_class = FaultSink              # scriptable faults; lite._Sink where a test says so
    bucket_key = "delivery-bucket"
    temp_prefix = "isl-delivery-"

    def wait_stats(self, streamer, predicate, timeout=10.0):
        """Wait until predicate(streamer.stats()) holds, checked at each log record."""
        logger = logging.getLogger("isstreamer_lite")
        watch = _Watch(lambda: predicate(streamer.stats()))
        level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(watch)
        try:
            if predicate(streamer.stats()):
                return True
            return watch.hit.wait(timeout)
        finally:
            logger.removeHandler(watch)
            logger.setLevel(level)

    def assertExactlyOnce(self, got, expected):
        counts = collections.Counter(got)
        lost = sorted(set(expected) - set(counts))
        duplicated = sorted(k for k, n in counts.items() if n > 1)
        extra = sorted(set(counts) - set(expected))
        self.assertEqual((lost, duplicated, extra), ([], [], []),
                         "lost %d, duplicated %d, unexpected %d"
                         % (len(lost), len(duplicated), len(extra)))


def events(prefix, count):
    return [("%s%03d" % (prefix, i), i) for i in range(count)]


def log_all(streamer, pairs):
    for key, value in pairs:
        streamer.log(key, value)


def utc(text):
    """Unix seconds of an ISO-8601 UTC time such as 2026-12-06T12:00:00."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


ISSUE_KEY = "ist_issue9_access_key_0123456789"


def hang_forever(handler, path):
    """FaultSink rule: accept the request and never answer (until cleanup)."""
    return ("hang", 60.0)


def fingerprint(text):
    """The 16-hex folder name the spool layout gives an access or bucket key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def disk_values(spool_dir, key=None):
    """Counter of the values in unacked spool lines (of events named ``key``)."""
    return collections.Counter(e["value"] for e in spooled_events(spool_dir)
                               if key is None or e["key"] == key)


def disk_keys(spool_dir):
    return collections.Counter(e["key"] for e in spooled_events(spool_dir))


def fds_under(folder):
    """Paths under ``folder`` this process holds open (Linux /proc), or None."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    found = []
    real = os.path.realpath(folder)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(os.path.join("/proc/self/fd", fd))
        except OSError:
            continue
        if target.startswith(real + os.sep):
            found.append(target)
    return found


def bounded_poll(predicate, timeout):
    """Check ``predicate`` every 50 ms (an Event wait, not a sleep) until timeout."""
    tick = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        tick.wait(0.05)
    return True


class Issue9Case(DeliveryTestCase):
    """DeliveryTestCase plus children that are killed at cleanup."""

    def child(self, code, *args, **env):
        """Start ``python -c code args`` with pipes; killed at cleanup and after 60 s."""
        return guarded_popen(self, PYTHON + ["-c", code] + [str(a) for a in args],
                             None, child_env(**env), 60.0)

    def finish(self, proc, timeout=30):
        out, err = proc.communicate(timeout=timeout)
        self.assertEqual(proc.returncode, 0, err[-2000:])
        return out

    def worker_threads(self, before):
        return [t for t in threading.enumerate()
                if t not in before and t.name.startswith("isstreamer_lite[")]


class RawServer(object):
    """A loopback TCP server whose every connection is answered by ``answer(conn, n)``."""

    def __init__(self, case, answer):
        self.answer = answer
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        case.addCleanup(self.close)

    def serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self.run, args=(conn, self.connections),
                             daemon=True).start()

    def run(self, conn, number):
        try:
            self.answer(conn, number, self.stop)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


def read_request(conn):
    """Read one HTTP request (headers and Content-Length body); its body, or None."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return body


def posix_shells():
    """[(label, argv prefix)] of the POSIX shells install.sh must run under."""
    shells = []
    if shutil.which("dash"):
        shells.append(("dash", [shutil.which("dash")]))
    if shutil.which("busybox"):
        shells.append(("busybox sh", [shutil.which("busybox"), "sh"]))
    return shells


class LifecycleCase(LiteTestCase):
    """Helpers: child scripts in a temp folder, killed at cleanup, bounded waits."""

    def setUp(self):
        LiteTestCase.setUp(self)
        if not hasattr(signal, "SIGHUP"):
            self.skipTest("needs POSIX signals")
        self.folder = self.tempdir()
        self.scripts = {}

    def script(self, text):
        if text not in self.scripts:
            path = os.path.join(self.folder, "child%d.py" % len(self.scripts))
            with open(path, "w") as handle:
                handle.write(text)
            self.scripts[text] = path
        return self.scripts[text]

    def popen(self, argv):
        """Start a child with pipes; killed at cleanup and by a 90 s failure guard."""
        return guarded_popen(self, argv, self.folder, child_env(), 90.0)

    def lifecycle(self, mode, api_base, spool, count=100, exit_timeout=1.0):
        """Start LIFECYCLE_CHILD; return (child, path of the file it writes its count to)."""
        count_path = os.path.join(self.tempdir(), "count")
        child = self.popen(PYTHON + [self.script(LIFECYCLE_CHILD), mode, api_base,
                            spool, LIFE_KEY, str(count), str(exit_timeout), count_path])
        return child, count_path

    def read_line(self, child, expected):
        line = child.stdout.readline().strip()
        if line != expected:
            child.kill()
            self.fail("child said %r, not %r: %s" % (line, expected, child.stderr.read()[-800:]))

    def still_running(self, child, seconds):
        """A bounded wait that must time out: the child is still at work."""
        with self.assertRaises(subprocess.TimeoutExpired, msg="the child exited early"):
            child.wait(seconds)

    def finish(self, child):
        """Wait for the child to end; return (status, stderr)."""
        out, err = child.communicate(timeout=60)
        return child.returncode, err

    def plain_sigint_status(self):
        """What a plain script hit by SIGINT exits with: 1 (3.6, 3.7) or -2 (3.8+)."""
        child = self.popen(PYTHON + [self.script(_PLAIN_CHILD)])
        self.read_line(child, "ready")
        child.send_signal(signal.SIGINT)
        return self.finish(child)[0]

    def assertSpooled(self, spool, expected, status, err):
        values = [e["value"] for e in spooled_events(spool)]
        problem = once_problems(values, expected)
        if problem:
            self.fail("spool: %s (exit status %s) %s" % (problem, status, err[-600:]))

    def assertReplayed(self, spool, expected):
        """A new process with the same key and spool delivers each value exactly once."""
        sink = self.sink()
        child, _ = self.lifecycle("replay", sink.url, spool)
        status, err = self.finish(child)
        self.assertEqual(status, 0, err[-600:])
        with sink.changed:
            values = [e["value"] for _, e in sink.events]
        self.assertEqual(once_problems(values, expected), "", "replay")


# --- Configuration -----------------------------------------------------------
# Streamer() arguments, isstreamer.ini, the environment, where the spool goes.

class ConfigurationTest(LiteTestCase):
    """Constructor arguments, then environment, then isstreamer.ini, then defaults."""

    def setUp(self):
        LiteTestCase.setUp(self)
        self.home = self.tempdir()
        self.cwd = self.tempdir()
        old_home, old_cwd = os.environ.get("HOME"), os.getcwd()
        os.environ["HOME"] = self.home
        os.chdir(self.cwd)

        def restore():
            os.chdir(old_cwd)
            if old_home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = old_home
            for name in CONFIG_VARS:
                os.environ.pop(name, None)
        self.addCleanup(restore)

    def write_ini(self, folder, text):
        path = os.path.join(folder, "isstreamer.ini")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def make(self, **kwargs):
        kwargs.setdefault("spool_dir", self.tempdir())
        streamer = lite.Streamer(**kwargs)
        self.addCleanup(streamer.close, 0.5)
        return streamer

    def test_arguments_beat_environment_beat_ini(self):
        """Configuration: argument > IS_* variable > ini > default."""
        self.write_ini(self.home, "[isstreamer.client_config]\naccess_key = ini_key\n"
                                  "default_bucket = ini name\n"
                                  "[isstreamer.api_config]\nstream_api_base = http://127.0.0.1:9\n")
        s = self.make(offline=True)
        self.assertEqual(s._settings.access_key, "ini_key")
        self.assertEqual(s.bucket_name, "ini name")
        self.assertEqual(s._settings.api_base, "http://127.0.0.1:9")
        os.environ["IS_ACCESS_KEY"] = "env_key"
        os.environ["IS_BUCKET_NAME"] = "env name"
        os.environ["IS_BUCKET_KEY"] = "env-bucket"
        os.environ["IS_API_BASE"] = "http://127.0.0.1:10"
        s = self.make(offline=True)
        self.assertEqual((s._settings.access_key, s.bucket_name, s.bucket_key,
                          s._settings.api_base),
                         ("env_key", "env name", "env-bucket", "http://127.0.0.1:10"))
        s = self.make(access_key="arg_key", bucket_name="arg name", bucket_key="arg-bucket",
                      api_base="http://127.0.0.1:11", offline=True)
        self.assertEqual((s._settings.access_key, s.bucket_name, s.bucket_key,
                          s._settings.api_base),
                         ("arg_key", "arg name", "arg-bucket", "http://127.0.0.1:11"))

    def test_default_api_base(self):
        """Configuration: with nothing set the base is https://groker.init.st."""
        s = self.make(access_key="k", offline=True)
        self.assertEqual(s._settings.api_base, "https://groker.init.st")

    def test_api_config_read_without_client_config(self):
        """Configuration: [isstreamer.api_config] counts even alone (ISStreamer ignored it)."""
        self.write_ini(self.home, "[isstreamer.api_config]\nstream_api_base = http://127.0.0.1:12\n")
        s = self.make(access_key="k", offline=True)
        self.assertEqual(s._settings.api_base, "http://127.0.0.1:12")

    def test_ini_search_order(self):
        """Configuration: ini_file_location, else ~/isstreamer.ini, else ./isstreamer.ini."""
        self.write_ini(self.cwd, "[isstreamer.client_config]\naccess_key = cwd_key\n")
        self.assertEqual(self.make(offline=True)._settings.access_key, "cwd_key")
        self.write_ini(self.home, "[isstreamer.client_config]\naccess_key = home_key\n")
        self.assertEqual(self.make(offline=True)._settings.access_key, "home_key")
        other = self.write_ini(self.tempdir(), "[isstreamer.client_config]\naccess_key = own\n")
        self.assertEqual(self.make(offline=True, ini_file_location=other)
                         ._settings.access_key, "own")

    def test_settings_are_one_immutable_object_that_masks_the_key(self):
        """Configuration: settings are built once, cannot change, and repr() hides the key."""
        s = self.make(access_key="secret-key-1234", offline=True)
        with self.assertRaises(AttributeError):
            s._settings.buffer_size = 99
        self.assertEqual(s._settings.buffer_size, 10)
        self.assertNotIn("secret-key", repr(s._settings))
        self.assertIn("...1234", repr(s._settings))

    def test_missing_ini_location_is_an_error(self):
        """Configuration: a given ini_file_location that does not exist is a ConfigError."""
        with self.assertRaisesRegex(lite.ConfigError, "does not exist"):
            self.make(ini_file_location=os.path.join(self.cwd, "nope.ini"))

    def test_offline_mode_and_file_from_ini(self):
        """Configuration: offline_mode and offline_file come from the ini."""
        self.write_ini(self.home, "[isstreamer.client_config]\noffline_mode = true\n"
                                  "offline_file = out.csv\n")
        s = self.make()
        self.assertTrue(s._settings.offline)
        self.assertEqual(s._settings.offline_file, "out.csv")

    def test_missing_access_key_is_an_error(self):
        """Configuration: no access key anywhere (and not offline) fails at construction."""
        with self.assertRaisesRegex(lite.ConfigError, "no access key"):
            self.make()

    def test_bad_api_base_is_an_error(self):
        """Configuration: an api_base that is not http(s) fails at construction."""
        for base in ("ftp://example.invalid", "groker.init.st", "https://", 42):
            with self.assertRaises(lite.ConfigError, msg=repr(base)):
                self.make(access_key="k", api_base=base)

    def test_illegal_bucket_key_is_an_error(self):
        """Configuration: a bucket key with : " ' or over 250 characters fails, naming the rule."""
        for bad in ("a:b", 'a"b', "a'b"):
            with self.assertRaisesRegex(lite.ConfigError, "may not contain"):
                self.make(access_key="k", bucket_key=bad)
        with self.assertRaisesRegex(lite.ConfigError, "251 characters; the limit is 250"):
            self.make(access_key="k", bucket_key="b" * 251)

    def test_empty_bucket_key_becomes_uuid4(self):
        """Configuration: an empty bucket_key becomes a new UUID4."""
        import uuid
        key = self.make(access_key="k", offline=True).bucket_key
        self.assertEqual(uuid.UUID(key).version, 4)

    def test_bad_option_values(self):
        """Configuration: nonsense option values are clear errors."""
        cases = [({"buffer_size": 0}, "buffer_size is 0; it must be a whole number of at "
                                      "least 1"),
                 ({"flush_interval": -1}, "flush_interval is -1; it must be at least 0.001"),
                 ({"max_queue": 1, "buffer_size": 10}, "max_queue is 1; it must be a whole "
                                                       "number of at least buffer_size (10)"),
                 ({"timeout": "soon"}, "timeout must be a number, not 'soon'"),
                 ({"on_error": 5}, "on_error must be callable, not 5"),
                 ({"spool_max_bytes": 0}, "spool_max_bytes is 0; it must be at least 1")]
        for options, message in cases:
            with self.assertRaises((ValueError, TypeError), msg=repr(options)) as caught:
                self.make(access_key="k", offline=True, **options)
            self.assertEqual(str(caught.exception), message)


class DebugLevelTest(LiteTestCase):
    """debug_level echoes events and shows requests, never the access key."""

    def test_echo_and_requests_without_key(self):
        """debug_level: 1 echoes events, 3 shows requests; the key shows only its last 4."""
        sink = self.sink()
        with self.assertLogs("isstreamer_lite", "DEBUG") as logs:
            s = self.streamer(sink, debug_level=3)
            s.log("temp", 21.5)
            self.assertTrue(s.close(5))
        text = "\n".join(logs.output)
        self.assertIn("temp 21.5", text)
        self.assertIn("POST /api/events", text)
        self.assertIn(KEY[-4:], text)
        self.assertNotIn(KEY, text)
        self.assertNotIn(KEY[:-4], text)

    def test_quiet_by_default(self):
        """debug_level: 0 logs nothing below WARNING for a healthy run."""
        sink = self.sink()
        logger = logging.getLogger("isstreamer_lite")
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        s = self.streamer(sink)
        s.log("a", 1)
        self.assertTrue(s.close(5))
        self.assertEqual([r for r in records if r.levelno >= logging.INFO], [])


class SpoolLocationTest(LiteTestCase):
    """Where the spool goes when no spool_dir is given."""

    def test_home_unset_read_only_and_runtime_fallbacks(self):
        """Spool: XDG_STATE_HOME, ~/.local/state, XDG_RUNTIME_DIR, then a private temp folder."""
        folder = self.tempdir()
        state, runtime = os.path.join(folder, "state"), os.path.join(folder, "run")
        os.mkdir(runtime)
        with mock.patch.dict(os.environ, {"XDG_STATE_HOME": state, "XDG_RUNTIME_DIR": runtime}):
            self.assertEqual(lite._default_spool_dir(), os.path.join(state, "isstreamer_lite"))
        env = {"XDG_RUNTIME_DIR": runtime, "HOME": "/nonexistent-home", "XDG_STATE_HOME": ""}
        with mock.patch.dict(os.environ, env), \
                mock.patch.object(lite, "_could_create",
                                  lambda path: not path.startswith("/nonexistent-home")):
            self.assertEqual(lite._default_spool_dir(), os.path.join(runtime, "isstreamer_lite"))
        with mock.patch.dict(os.environ, {"XDG_STATE_HOME": "", "XDG_RUNTIME_DIR": ""}), \
                mock.patch.object(os.path, "expanduser", lambda path: path):     # no HOME
            chosen = lite._default_spool_dir()
        self.assertEqual(chosen, os.path.join(tempfile.gettempdir(),
                                              "isstreamer_lite-%d" % os.getuid()))
        self.assertNotIn("~", chosen)

    def test_debug_level_1_names_the_spool(self):
        """Spool: the start line at debug_level 1 says which folder is used."""
        spool = self.tempdir()
        with self.assertLogs("isstreamer_lite", "INFO") as logs:
            self.streamer(None, spool_dir=spool, debug_level=1, api_base="http://127.0.0.1:9")
        self.assertIn("spool %s" % spool, "\n".join(logs.output))


class KeyLeakTest(LiteTestCase):
    """The access key never shows beyond its last four characters."""

    SECRET = "ist_Secret0123456789abcd"

    def assertNoKey(self, text):
        self.assertNotIn(self.SECRET[:-4], text)
        self.assertNotIn(self.SECRET.replace("\n", "\\n")[:-4], text)

    def test_control_characters_are_a_config_error_without_the_key(self):
        """Config: a key with \n, \r or a control character is refused; the text masks it."""
        for key in (self.SECRET + "\n", self.SECRET + "\r\n", "ist_Secret\x01" + "0" * 12,
                    "ist_Secret\u00e9\u263a0123456789"):
            with self.subTest(key=repr(key)):
                with self.assertRaises(lite.ConfigError) as caught:
                    lite.Streamer(bucket_key="b", access_key=key, ini_file_location=False,
                                  spool_dir=self.tempdir(), api_base="http://127.0.0.1:9")
                self.assertNoKey(str(caught.exception))
                self.assertNotIn(key[:-4], str(caught.exception))
                self.assertIn("access key", str(caught.exception))

    def test_key_from_environment_or_ini_is_stripped(self):
        """Config: whitespace around IS_ACCESS_KEY or the ini's access_key is dropped."""
        sink = self.sink(RecordingSink)
        with mock.patch.dict(os.environ, {"IS_ACCESS_KEY": self.SECRET + "\r\n"}):
            s = self.streamer(sink, access_key="")
        self.assertTrue(s.flush(5), s.stats()["last_error"])
        self.assertEqual(sink.seen[0][1]["X-IS-AccessKey"], self.SECRET)

    def test_malformed_ini_is_reported_by_line_not_quoted(self):
        """Config: an ini without a section or with a bad line names the line, not its text."""
        folder = self.tempdir()
        for text in ("access_key = %s\n" % self.SECRET,
                     "[isstreamer.client_config]\naccess_key = %s\n  garbage\nthis line\n"
                     % self.SECRET):
            path = os.path.join(folder, "isstreamer.ini")
            with open(path, "w") as handle:
                handle.write(text)
            with self.assertRaises(lite.ConfigError) as caught:
                lite.Streamer(ini_file_location=path, spool_dir=folder)
            self.assertNoKey(str(caught.exception))
            self.assertIn("line", str(caught.exception))

    def test_malformed_ini_traceback_never_quotes_the_key(self):
        """Config: a malformed ini's ConfigError chains nothing that quoted the line."""
        folder = self.tempdir()
        for text in ("access_key = %s\n" % self.SECRET,
                     "[isstreamer.client_config]\n%s\n" % self.SECRET,
                     "[isstreamer.client_config]\naccess_key =\n%s\n  x\nbad line\n"
                     % self.SECRET):
            with self.subTest(text=text[:30]):
                path = os.path.join(folder, "isstreamer.ini")
                with open(path, "w") as handle:
                    handle.write(text)
                with self.assertRaises(lite.ConfigError) as caught:
                    lite.Streamer(ini_file_location=path, spool_dir=folder)
                exc = caught.exception
                self.assertIsNone(exc.__cause__)
                self.assertIsNone(exc.__context__)
                self.assertNoKey("".join(traceback.format_exception(
                    type(exc), exc, exc.__traceback__)))

    def test_key_never_in_logs_stats_files_or_cli_output(self):
        """Key: not in debug_level 3 output, stats(), the spool or the CLI's stderr."""
        sink = self.sink(access_key="ist_someone_else_entirely")     # answers 401
        spool = self.tempdir()
        with self.assertLogs("isstreamer_lite", "DEBUG") as logs:
            s = self.streamer(sink, access_key=self.SECRET, debug_level=3, spool_dir=spool,
                              pause_interval=60)
            s.log("k", 1)
            self.assertFalse(s.flush(0.5))
            s.close(1)
        self.assertNoKey("\n".join(logs.output))
        self.assertNoKey(repr(s.stats()) + repr(s))
        for folder, _, names in os.walk(spool):
            for name in names:
                self.assertNotIn(self.SECRET, name)
                with open(os.path.join(folder, name), "rb") as handle:
                    self.assertNotIn(self.SECRET[:-4].encode(), handle.read())
        result = subprocess.run(
            PYTHON + ["-m", "isstreamer_lite", "send", "--access-key",
             self.SECRET + "\n", "--api-base", sink.url, "--spool-dir", spool, "k", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            env=child_env(), timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertNoKey(result.stdout + result.stderr)


# --- Event validation and encoding -------------------------------------------
# What log() and log_object() take and refuse; hostile and random input.

class ValidationTest(LiteTestCase):
    """log() accepts the documented values, converts real numbers, rejects the rest."""

    BAD = [("none", None), ("nan", float("nan")), ("inf", float("inf")),
           ("bytes", b"raw"), ("dict", {"a": 1}), ("list", [1]), ("complex", 1j),
           ("x" * 251, 1), ("long", "v" * 2001), (7, "non-str key"), ("", "empty key"),
           ("dnan", decimal.Decimal("NaN"))]

    def test_key_over_100_characters_warns_once_per_key_and_is_sent(self):
        """log: a key of 101 to 250 characters: one warning per key naming 100 and 250; sent."""
        sink = self.sink()
        for echo in (0, 1):
            s = self.streamer(sink, debug_level=echo, bucket_key="long-keys-%d" % echo)
            keys = ["a" * 101, "b" * 250, "c" * 100]
            with self.assertLogs("isstreamer_lite", "WARNING") as logs:
                for i in range(5):
                    for key in keys:
                        s.log(key, i)
                lite._log.warning("end of test")
            warnings = [line for line in logs.output if "characters" in line]
            self.assertEqual(len(warnings), 2, warnings)
            for line, length in zip(warnings, (101, 250)):
                self.assertIn("%d characters" % length, line)
                self.assertIn("100", line)
                self.assertIn("250", line)
            self.assertTrue(s.close(10))
            self.assertEqual(s.stats()["delivered"], 15)

    def test_good_events_survive_bad_ones(self):
        """Validation: good events between bad ones all arrive and no bad one does."""
        sink = self.sink()
        s = self.streamer(sink)
        expected = []
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            for i, (key, value) in enumerate(self.BAD):
                s.log("good%d" % i, i)
                expected.append(("good%d" % i, i))
                s.log(key, value)
        self.assertTrue(s.close(5))
        self.assertEqual(self.received(sink), expected)
        rejected = s.stats()["rejected"]
        self.assertEqual(rejected, {"not_finite": 2, "value_type": 6, "key_too_long": 1,
                                    "value_too_long": 1, "key_type": 1, "key_empty": 1})
        # One warning per reason a minute: a stream of bad values cannot flood the log.
        self.assertEqual(len(logs.records), len(rejected))
        with self.assertLogs("isstreamer_lite", "WARNING") as more:
            for _ in range(100):
                s.log("bytes", b"raw")
            s.log("", "empty")
            logging.getLogger("isstreamer_lite").warning("end")
        self.assertEqual([r.getMessage() for r in more.records], ["end"])
        self.assertEqual(s.stats()["rejected"]["value_type"], rejected["value_type"] + 100)

    def test_warning_names_key_type_and_rule(self):
        """Validation: the warning names the key, the value's type and the rule."""
        s = self.streamer(None, offline=True, offline_file=os.path.join(self.tempdir(), "o"))
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            s.log("reading", b"raw")
            s.log("x" * 300, 1)
            s.log("temp", float("nan"))
        self.assertIn("'reading' is of type bytes", logs.output[0])
        self.assertIn("values must be str, bool, int or a finite real number", logs.output[0])
        self.assertIn("300 characters; the limit is 250", logs.output[1])
        self.assertIn("must be finite", logs.output[2])

    def test_strict_mode_raises_at_call_site(self):
        """Validation: at debug_level 2 a bad event raises ValueError/TypeError."""
        sink = self.sink()
        s = self.streamer(sink, debug_level=2)
        logging.getLogger("isstreamer_lite").setLevel(logging.WARNING)
        for key, value in self.BAD:
            with self.assertRaises((ValueError, TypeError), msg=repr((key, value))):
                s.log(key, value)
        s.log("fine", 1)
        self.assertTrue(s.close(5))
        self.assertEqual(self.received(sink), [("fine", 1)])

    def test_real_numbers_are_converted(self):
        """Validation: Decimal, Fraction, numpy-like scalars and subclasses are converted."""
        class FakeNumpyScalar(object):
            dtype = "float32"

            def item(self):
                return 2.5

        class Celsius(float):
            pass

        sink = self.sink()
        s = self.streamer(sink)
        s.log("dec", decimal.Decimal("1.25"))
        s.log("frac", fractions.Fraction(1, 4))
        s.log("np", FakeNumpyScalar())
        s.log("sub", Celsius(3.5))
        s.log("int64", 2 ** 63)
        s.log("flag", False)
        self.assertTrue(s.close(5))
        got = dict(self.received(sink))
        self.assertEqual(got, {"dec": 1.25, "frac": 0.25, "np": 2.5, "sub": 3.5,
                               "int64": 2 ** 63, "flag": False})
        self.assertIs(got["flag"], False)

    def test_integers_beyond_64_bits_are_rejected_and_never_block(self):
        """Validation: 2**70 and 10**5000 are refused at log(); good neighbours arrive."""
        sink = self.sink()
        s = self.streamer(sink, buffer_size=50)
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            for i in range(100):
                s.log("good", i)
            s.log("big", 2 ** 70)
            s.log("huge", 10 ** 5000)
            for i in range(100, 105):
                s.log("good", i)
        self.assertTrue(any("64 bits" in line and "'big'" in line for line in logs.output),
                        logs.output)
        self.assertTrue(s.flush(5), s.stats()["last_error"])
        self.assertEqual(self.received(sink), [("good", i) for i in range(105)])
        strict = self.streamer(sink, debug_level=2)
        logging.getLogger("isstreamer_lite").setLevel(logging.WARNING)
        with self.assertRaises(ValueError):
            strict.log("big", -2 ** 64)

    def test_epoch_override(self):
        """Validation: epoch may be a number or a datetime; a bad one falls back to now."""
        sink = self.sink()
        s = self.streamer(sink)
        when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        s.log("n", 1, epoch=1500000000.5)
        s.log("d", 2, epoch=when)
        before = time.time()
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            s.log("bad", 3, epoch="yesterday")
        self.assertIn("using the current time", logs.output[0])
        self.assertTrue(s.close(5))
        epochs = {e["key"]: e["epoch"] for _, e in sink.events}
        self.assertEqual(epochs["n"], 1500000000.5)
        self.assertEqual(epochs["d"], when.timestamp())
        self.assertGreaterEqual(epochs["bad"], before)

    def test_log_after_close_reopens_as_isstreamer_does(self):
        """Lifecycle: close() then log() again delivers every event, at levels 0 and 2."""
        for level in (0, 2):
            sink = self.sink()
            s = self.streamer(sink, debug_level=level)
            logging.getLogger("isstreamer_lite").setLevel(logging.WARNING)
            for loop in range(5):
                for i in range(3):
                    s.log("v", loop * 3 + i)
                self.assertTrue(s.close(5), s.stats()["last_error"])
                self.assertTrue(s.stats()["closed"])
            self.assertEqual(self.received(sink), [("v", i) for i in range(15)])
            s.set_bucket("Other", "after-close")
            s.log("moved", 1)
            self.assertTrue(s.close(5))
            self.assertEqual(self.received(sink, "after-close"), [("moved", 1)])
            self.assertEqual(s.stats()["logged"], 16)


Point = collections.namedtuple("Point", "x y")


class Sensor(object):
    unit = "C"

    def __init__(self):
        self.reading = 21.5
        self._private = "hidden"

    @property
    def doubled(self):
        return self.reading * 2

    @property
    def broken(self):
        raise RuntimeError("sensor offline")

    def method(self):
        return 1


class LogObjectTest(LiteTestCase):
    """log_object flattens containers and objects into prefixed keys."""

    def logged(self, obj, **kwargs):
        sink = self.sink()
        s = self.streamer(sink, buffer_size=100)
        s.log_object(obj, **kwargs)
        self.assertTrue(s.close(5))
        return sink

    def test_dict_list_and_prefixes(self):
        """log_object: dict -> dict_<key>, list -> list_<index>, key_prefix and ""."""
        self.assertEqual(self.received(self.logged({"a": 1, "b": "x"})),
                         [("dict_a", 1), ("dict_b", "x")])
        self.assertEqual(self.received(self.logged([5, 6])), [("list_0", 5), ("list_1", 6)])
        self.assertEqual(self.received(self.logged([5], key_prefix="p")), [("p_0", 5)])
        self.assertEqual(self.received(self.logged({"a": 1}, key_prefix="")), [("a", 1)])
        self.assertEqual(self.received(self.logged((7, 8))), [("tuple_0", 7), ("tuple_1", 8)])

    def test_plain_value_uses_prefix(self):
        """log_object: a plain value is logged under the prefix as its key."""
        self.assertEqual(self.received(self.logged(21.5, key_prefix="temp")), [("temp", 21.5)])

    def test_namedtuple_fields(self):
        """log_object: a namedtuple (like psutil.virtual_memory()) logs its fields."""
        self.assertEqual(self.received(self.logged(Point(1, 2))),
                         [("Point_x", 1), ("Point_y", 2)])

    @unittest.skipIf(sys.version_info < (3, 7), "dataclasses need Python 3.7")
    def test_dataclass_fields(self):
        """log_object: a dataclass logs its fields."""
        import dataclasses
        Reading = dataclasses.make_dataclass("Reading", [("temp", float), ("ok", bool)])
        self.assertEqual(self.received(self.logged(Reading(20.5, True))),
                         [("Reading_temp", 20.5), ("Reading_ok", True)])

    def test_object_attributes_and_properties(self):
        """log_object: public non-callable attributes and properties; failing ones skipped."""
        self.assertEqual(sorted(self.received(self.logged(Sensor()))),
                         [("Sensor_doubled", 43.0), ("Sensor_reading", 21.5), ("Sensor_unit", "C")])

    def test_nested_containers_flatten(self):
        """log_object: nested dicts and lists flatten with _."""
        got = self.received(self.logged({"a": {"b": [1, {"c": 2}]}, "p": Point(3, 4)},
                                        key_prefix="s"))
        self.assertEqual(got, [("s_a_b_0", 1), ("s_a_b_1_c", 2), ("s_p_x", 3), ("s_p_y", 4)])

    def test_one_timestamp_and_bad_values_skipped(self):
        """log_object: one epoch for the call; an unloggable value is skipped, the rest go."""
        sink = self.sink()
        s = self.streamer(sink, buffer_size=100)
        with self.assertLogs("isstreamer_lite", "WARNING"):
            s.log_object({"a": 1, "bad": b"x", "nan": float("nan"), "c": 3})
        self.assertTrue(s.close(5))
        self.assertEqual(self.received(sink), [("dict_a", 1), ("dict_c", 3)])
        self.assertEqual(len({e["epoch"] for _, e in sink.events}), 1)

    def test_strict_log_object_raises_after_logging_the_rest(self):
        """log_object: at debug_level 2 the first bad value raises after the good ones are queued."""
        sink = self.sink()
        s = self.streamer(sink, buffer_size=100, debug_level=2)
        logging.getLogger("isstreamer_lite").setLevel(logging.WARNING)
        with self.assertRaises(TypeError):
            s.log_object({"a": 1, "bad": b"x", "c": 3})
        self.assertTrue(s.close(5))
        self.assertEqual(self.received(sink), [("dict_a", 1), ("dict_c", 3)])


class HostileInputTest(LiteTestCase):
    """Inputs that cannot be sent are refused where they come in, with the rule named."""

    def test_bucket_keys_that_cannot_travel_in_a_header(self):
        """Config: non-Latin-1, control characters or a blank bucket key are refused."""
        for bucket in ("\u6e29\u5ba4", "plant-\U0001f331", "garden\n", " "):
            with self.subTest(bucket=bucket):
                with self.assertRaises(lite.ConfigError) as caught:
                    self.streamer(None, bucket_key=bucket, offline=False,
                                  api_base="http://127.0.0.1:9")
                self.assertIn("bucket_key", str(caught.exception))
        s = self.streamer(None, offline=True, offline_file=os.path.join(self.tempdir(), "o"))
        with self.assertRaises(lite.ConfigError):
            s.set_bucket("x", "garden\r")

    def test_api_base_with_a_path_and_other_bad_settings(self):
        """Config: an api_base with a path, spool_max_bytes=0, a fake loopback name."""
        with self.assertRaises(lite.ConfigError) as caught:
            self.streamer(None, api_base="https://groker.init.st/api/events")
        self.assertIn("has a path", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            self.streamer(None, api_base="http://127.0.0.1:9", spool_max_bytes=0)
        self.assertIn("spool_max_bytes", str(caught.exception))
        self.assertFalse(lite._is_loopback("127.attacker.example"))
        self.assertTrue(lite._is_loopback("127.0.0.2"))
        self.assertTrue(lite._is_loopback("[::1]"))

    def test_https_without_ssl_is_a_config_error(self):
        """Config: a Python built without ssl refuses an https:// api_base at construction."""
        real_import = __import__

        def no_ssl(name, *args, **kwargs):
            if name == "ssl":
                raise ImportError("No module named 'ssl'")
            return real_import(name, *args, **kwargs)
        with mock.patch("builtins.__import__", no_ssl), \
                mock.patch.dict(sys.modules, {"ssl": None}):
            with self.assertRaises(lite.ConfigError) as caught:
                self.streamer(None, api_base="https://groker.init.st")
        self.assertIn("without the ssl module", str(caught.exception))

    def test_lone_surrogates_are_refused_everywhere(self):
        """Validation: a lone surrogate in a key or value is refused; offline keeps the rest."""
        csv_path = os.path.join(self.tempdir(), "out.csv")
        s = self.streamer(None, offline=True, offline_file=csv_path)
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            for i in range(205):
                s.log("good", i)
                if i == 100:
                    s.log("bad", "abc\udcff")
                    s.log("k\udcff", 1)
        self.assertTrue(s.close(5))
        self.assertIn("surrogate", "\n".join(logs.output))
        with open(csv_path, encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        self.assertEqual([int(r[2]) for r in rows], list(range(205)))
        self.assertEqual(s.stats()["rejected"], {"not_utf8": 2})

    def test_lying_str_subclass_cannot_poison_the_key_cache(self):
        """Validation: a str whose __len__ lies is checked as the str it is."""
        class Liar(str):
            def __len__(self):
                return 3
        sink = self.sink()
        s = self.streamer(sink)
        long_key = "k" * 300
        for _ in range(12):
            s.log(Liar(long_key), 1)
            s.log(long_key, 1)
        s.log("fine", 1)
        self.assertTrue(s.flush(5))
        self.assertEqual(self.received(sink), [("fine", 1)])
        self.assertEqual(s.stats()["rejected"], {"key_too_long": 24})

    def test_epochs_that_are_not_unix_seconds(self):
        """Validation: inf, 1e300, 1e18 fall back to now with a warning; 1e12 is named ms."""
        sink = self.sink()
        s = self.streamer(sink, debug_level=1)
        logging.getLogger("isstreamer_lite").setLevel(logging.INFO)
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            for epoch in (float("inf"), 1e300, 1e18, 1e12, -5.0):
                s.log("t", 1, epoch=epoch)
        self.assertIn("milliseconds", "\n".join(logs.output))
        self.assertTrue(s.flush(5))
        now = time.time()
        self.assertTrue(all(abs(e["epoch"] - now) < 60 for _, e in sink.events))
        strict = self.streamer(sink, debug_level=2)
        with self.assertRaises(ValueError):
            strict.log("t", 1, epoch=1e12)


class UnencodableValueTest(Issue9Case):
    """One value json cannot write does not hold up the others."""

    def test_huge_int_does_not_block_good_events(self):
        """Encoding: log("big", 10**5000) between good events: all 105 good ones arrive."""
        sink = self.sink()
        s = self.streamer(sink.url)
        good = [("g%03d" % i, i) for i in range(105)]
        for key, value in good[:100]:
            s.log(key, value)
        s.log("big", 10 ** 5000)
        for key, value in good[100:]:
            s.log(key, value)
        s.flush(5)                  # its answer may say the big one was dead-lettered
        got = self.received(sink)
        self.assertEqual([k for k, _ in got if k == "big"], [], "the huge value was sent")
        self.assertExactlyOnce(got, good)


class FuzzTest(LiteTestCase):
    """Thousands of random keys and values: only valid events reach the wire, all of them."""

    def random_text(self, rng, longest):
        alphabet = ["a", "Z", "0", " ", ",", "=", '"', "\\", "\n", "\t", "\x00", "\x7f",
                    "\u00e9", "\u6e29", "\U0001f331", "\udcff", "\ud83c"]
        length = rng.choice([0, 1, 2, 10, longest - 1, longest, longest + 1])
        return "".join(rng.choice(alphabet) for _ in range(length))

    def random_value(self, rng):
        choice = rng.randrange(9)
        if choice == 0:
            return self.random_text(rng, 2000)
        if choice == 1:
            return rng.choice([2 ** 63, -2 ** 63, 2 ** 63 + 1, 10 ** 30, 0, -1])
        if choice == 2:
            return rng.choice([0.5, -1e308, 1e308, float("nan"), float("inf"), -0.0])
        if choice == 3:
            return rng.choice([True, False, None, b"bytes", [1], {"a": 1}, 1j])
        if choice == 4:
            return decimal.Decimal(rng.choice(["1.5", "NaN", "1e999999"]))
        return rng.random() * 100

    @staticmethod
    def valid(key, value):
        """The API's rules, written independently of the module's checks."""
        def text_ok(text, longest):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return False
            return len(text) <= longest
        if not isinstance(key, str) or not key or not text_ok(key, 250):
            return None
        if isinstance(value, bool) or isinstance(value, str) and text_ok(value, 2000):
            return value
        if isinstance(value, int):
            return value if -2 ** 63 <= value <= 2 ** 63 else None
        if isinstance(value, (float, decimal.Decimal)):
            number = float(value)
            return number if number - number == 0.0 else None
        return None

    def test_random_events_through_log_and_log_object(self):
        """Fuzz: every recorded event obeys the API; every valid event logged arrives."""
        import random
        rng = random.Random(20261201)
        sink = self.sink()
        s = self.streamer(sink, buffer_size=50, max_queue=100000)
        expected = []
        for n in range(3000):
            key, value = self.random_text(rng, 250), self.random_value(rng)
            if n % 3 == 0 and not isinstance(value, (list, dict)):
                s.log_object({key: value}, key_prefix="")
            else:
                s.log(key, value)
            good = self.valid(key, value)
            if good is not None:
                expected.append((key, good))
        self.assertTrue(s.flush(30), s.stats()["last_error"])
        for _, event in sink.events:
            self.assertIsNone(lite._check_event(event), event)
            self.assertTrue(1 <= len(event["key"]) <= 250)
        self.assertEqual(self.received(sink), expected)
        self.assertGreater(len(expected), 500)                  # both kinds, plenty of each
        self.assertGreater(sum(s.stats()["rejected"].values()), 500)

    def test_random_lines_through_pipe(self):
        """Fuzz: random bytes through pipe put only valid events on the wire; good lines all."""
        import random
        rng = random.Random(7)
        pieces = [b"k", b",", b"=", b"{", b"}", b'"', b"\xff", b"\xc3\xa9", b"\xed\xb3\xbf",
                  b"\x00", b"nan", b"1e999", b"007", b"-", b".5", b" ", b"true", b"\t"]
        lines, good = [], []
        for n in range(2000):
            if n % 4 == 0:
                lines.append(b"good%d,%d\n" % (n, n))
                good.append(("good%d" % n, n))
            else:
                lines.append(b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
                             + b"\n")
        sink = self.sink()
        ini_dir = self.tempdir()
        with open(os.path.join(ini_dir, "isstreamer.ini"), "w") as handle:
            handle.write("[isstreamer.client_config]\n")
        stdin = io.TextIOWrapper(io.BytesIO(b"".join(lines)), encoding="ascii")
        err = io.StringIO()
        with mock.patch.object(sys, "stdin", stdin), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            status = lite.main(["pipe", "--bucket-key", "fuzz", "--access-key", KEY,
                                "--api-base", sink.url, "--spool-dir", ini_dir,
                                "--ini", os.path.join(ini_dir, "isstreamer.ini")])
        self.assertIn(status, (0, 1), err.getvalue()[-500:])
        for _, event in sink.events:
            self.assertIsNone(lite._check_event(event), event)
            event["key"].encode("utf-8")
            if isinstance(event["value"], str):
                event["value"].encode("utf-8")
        got = set((e["key"], e["value"]) for _, e in sink.events)
        self.assertEqual([g for g in good if g not in got], [])


# --- Transport ---------------------------------------------------------------
# HTTP on the wire: TLS, proxies, replies, hostile servers, slow links.

class WireTest(LiteTestCase):
    """What goes over the wire matches the events API."""

    def test_headers_body_and_bucket_first(self):
        """Wire: the bucket is created first; events carry the documented headers."""
        sink = self.sink(RecordingSink)
        s = self.streamer(sink, bucket_name="My Bucket", buffer_size=3)
        for i in range(5):
            s.log("k%d" % i, i)
        self.assertTrue(s.close(5))
        paths = [p for p, _, _ in sink.seen]
        self.assertEqual(paths[0], "/api/buckets")
        self.assertEqual(sink.buckets, {"test-bucket": "My Bucket"})
        self.assertTrue(paths[1:] and set(paths[1:]) == {"/api/events"}, paths)
        headers = sink.seen[1][1]
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(headers["X-IS-AccessKey"], KEY)
        self.assertEqual(headers["X-IS-BucketKey"], "test-bucket")
        self.assertEqual(headers["Accept-Version"], "~0")
        self.assertTrue(headers["User-Agent"].startswith("isstreamer_lite/%s Python/"
                                                         % lite.__version__))
        self.assertEqual(self.received(sink), [("k%d" % i, i) for i in range(5)])

    def test_event_encoding_matches_the_json_encoder(self):
        """Wire: the fast event encoding is byte for byte the JSON encoder's, or refuses alike."""
        class Str(str):
            pass
        values = ["", "plain", "qu\"ote\\", "caf\u00e9 \u2603 \U0001f600", "\n\t\x00",
                  "\ud800", Str("sub"), True, False, 0, -1, 2 ** 63 - 1, -2 ** 63, 1.5, -0.0,
                  1e-300, 1.7976931348623157e308, 0.1 + 0.2, None, [1], {"a": 1}]
        for key in ("k", "cl\u00e9 \"q\"", Str("k")):
            for value in values:
                for epoch in (1700000000.123456, 1700000000, 0.0):
                    generic = lite._encode_json({"key": key, "value": value, "epoch": epoch})
                    self.assertEqual(lite._encode_event((key, value, epoch)),
                                     generic.encode("utf-8"), (key, value, epoch))
        for event in (("k", float("nan"), 1.0), ("k", float("inf"), 1.0),
                      ("k", 1, float("nan")), ("k", object(), 1.0)):
            with self.assertRaises((ValueError, TypeError)):
                lite._encode_event(event)

    def test_epoch_on_every_event(self):
        """Wire: each event carries the epoch taken at log() time."""
        sink = self.sink()
        s = self.streamer(sink)
        before = time.time()
        s.log("t", 1)
        after = time.time()
        self.assertTrue(s.flush(5))
        epoch = sink.events[0][1]["epoch"]
        self.assertTrue(before <= epoch <= after)

    def test_body_never_over_one_megabyte(self):
        """Wire: a large buffer of long values is sent in bodies under 1 MB."""
        sink = self.sink()
        sizes = []
        original = sink.handle

        def measure(handler):
            sizes.append(int(handler.headers.get("Content-Length") or 0))
            original(handler)
        sink.handle = measure
        s = self.streamer(sink, buffer_size=2000, max_queue=5000)
        for i in range(1500):
            s.log("k%d" % i, "\u00e9" * 2000)       # ~12 kB each once escaped
        self.assertTrue(s.close(10))
        self.assertEqual(len(sink.events), 1500)
        self.assertTrue(all(size <= 1000000 for size in sizes), max(sizes))
        self.assertGreater(len(sizes), 2)

    def test_any_2xx_is_success(self):
        """Wire: 200 and 202 count as delivered, like 204."""
        class Sink2xx(lite._Sink):
            def fault(self, handler, path):
                if path != "/api/events":
                    return False
                with self.changed:
                    self.events.extend(("b", e) for e in json.loads(handler.body.decode()))
                self.reply(handler, 202 if self.requests % 2 else 200, {"ok": True})
                return True
        sink = self.sink(Sink2xx)
        s = self.streamer(sink, buffer_size=1)
        for i in range(4):
            s.log("a", i)
        self.assertTrue(s.flush(5))
        self.assertEqual(s.stats()["delivered"], 4)
        self.assertEqual(s.stats()["retried"], 0)
        self.assertEqual(len(sink.events), 4)


class ConnectProxy(object):
    """A loopback HTTP CONNECT proxy that records the targets it tunnels to."""

    def __init__(self):
        self.targets = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.open = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.open.append(client)
            threading.Thread(target=self.tunnel, args=(client,), daemon=True).start()

    def tunnel(self, client):
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            request += chunk
        method, target = request.split(b" ")[:2]
        self.targets.append((method.decode(), target.decode()))
        host, port = target.decode().rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.open.append(upstream)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(source, sink):
            try:
                while True:
                    data = source.recv(65536)
                    if not data:
                        break
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for s in (source, sink):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self):
        self.listener.close()
        for s in self.open:
            s.close()


class ClosingSink(lite._Sink):
    """A sink that closes every connection after answering, without saying so."""

    def fault(self, handler, path):
        handler.close_connection = True     # no Connection: close header is sent
        return False


class TransportTest(LiteTestCase):
    """One kept-alive connection, transparent reconnects, proxies and TLS."""

    def https_sink(self):
        cert, key = tls_files(self)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) if hasattr(ssl, "PROTOCOL_TLS_SERVER") \
            else ssl.SSLContext(ssl.PROTOCOL_SSLv23)
        context.load_cert_chain(cert, key)
        return self.sink(ssl_context=context), cert

    def test_connection_is_reused(self):
        """Transport: 30 requests use one TCP connection."""
        sink = self.sink()
        s = self.streamer(sink, buffer_size=1)
        for i in range(30):
            s.log("k", i)
        self.assertTrue(s.close(10))
        self.assertEqual(len(sink.events), 30)
        self.assertEqual(sink.connections, 1)
        self.assertEqual(s.stats()["connections"], 1)

    def test_reconnects_when_server_closed_idle_connection(self):
        """Transport: a connection the server closed is reopened, not counted as a failure."""
        sink = self.sink(ClosingSink)
        s = self.streamer(sink, buffer_size=1)
        for i in range(10):
            s.log("k", i)
            self.assertTrue(s.flush(5))
        self.assertEqual([v for _, v in self.received(sink)], list(range(10)))
        self.assertEqual(s.stats()["retried"], 0)
        self.assertGreaterEqual(sink.connections, 10)

    def test_https_with_own_context_and_reuse(self):
        """Transport: HTTPS through the user's SSL context, one connection for many requests."""
        sink, cert = self.https_sink()
        context = ssl.create_default_context(cafile=cert)
        s = self.streamer(sink, buffer_size=1, ssl_context=context)
        for i in range(20):
            s.log("k", i)
        self.assertTrue(s.close(10))
        self.assertEqual(len(sink.events), 20)
        self.assertEqual(sink.connections, 1)

    def test_certificate_is_verified_by_default(self):
        """Transport: an untrusted certificate is refused; nothing is delivered."""
        sink, cert = self.https_sink()
        s = self.streamer(sink)
        s.log("k", 1)
        self.assertFalse(s.flush(0.5))
        self.assertTrue(bounded_poll(lambda: s.stats()["last_error"], 5))  # a slow handshake
        self.assertEqual(sink.events, [])
        self.assertIn("CERTIFICATE_VERIFY_FAILED", s.stats()["last_error"])
        self.assertFalse(closed_and_stopped(s, 0.2))

    def test_ssl_cert_file_is_honoured(self):
        """Transport: SSL_CERT_FILE makes the default context trust a certificate."""
        sink, cert = self.https_sink()
        os.environ["SSL_CERT_FILE"] = cert
        self.addCleanup(os.environ.pop, "SSL_CERT_FILE", None)
        s = self.streamer(sink)
        s.log("k", 1)
        self.assertTrue(s.flush(5), s.stats()["last_error"])
        self.assertEqual(self.received(sink), [("k", 1)])

    def test_https_proxy_tunnel(self):
        """Transport: with https_proxy set, requests go through a CONNECT tunnel."""
        sink, cert = self.https_sink()
        # Loopback is never proxied: the local sink stands in for a remote host here.
        patcher = mock.patch.object(lite, "_is_loopback", lambda host: False)
        patcher.start()
        self.addCleanup(patcher.stop)
        proxy = ConnectProxy()
        self.addCleanup(proxy.close)
        os.environ["https_proxy"] = "http://127.0.0.1:%d" % proxy.port
        self.addCleanup(os.environ.pop, "https_proxy", None)
        s = self.streamer(sink, buffer_size=1, ssl_context=ssl.create_default_context(cafile=cert))
        for i in range(5):
            s.log("k", i)
        self.assertTrue(s.close(10), s.stats()["last_error"])
        self.assertEqual(len(sink.events), 5)
        self.assertEqual(proxy.targets, [("CONNECT", "127.0.0.1:%d" % sink.port)])

    def test_no_proxy_bypasses_proxy(self):
        """Transport: a host listed in no_proxy is reached directly."""
        sink = self.sink()
        os.environ["http_proxy"] = "http://127.0.0.1:9"       # nothing listens there
        os.environ["no_proxy"] = "127.0.0.1"
        self.addCleanup(os.environ.pop, "http_proxy", None)
        self.addCleanup(os.environ.pop, "no_proxy", None)
        s = self.streamer(sink)
        s.log("k", 1)
        self.assertTrue(s.flush(5), s.stats()["last_error"])

    def test_plain_http_to_remote_host_warns(self):
        """Transport: http:// to a host that is not loopback warns that the key is in clear."""
        sink = self.sink()
        original = lite._is_loopback
        lite._is_loopback = lambda host: False
        self.addCleanup(setattr, lite, "_is_loopback", original)
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            self.streamer(sink)
        self.assertIn("travels in clear text", logs.output[0])


_Gap = collections.namedtuple("_Gap", "event seconds")     # a server's pause in QuickPostTest


class QuickPostTest(LiteTestCase):
    """_HTTPTransport.post(quick=...): the worker's own try at a call, finished elsewhere."""

    ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    def server(self, pieces):
        """A server answering every request on a connection with ``pieces``: bytes to
        send, an Event to wait for (set by the test) before the next piece, or a _Gap."""
        self.requests = []

        def answer(conn, number, stop):
            while not stop.is_set():
                body = read_request(conn)
                if body is None:
                    return
                self.requests.append((number, body))
                for piece in pieces:
                    if isinstance(piece, bytes):
                        conn.sendall(piece)
                    elif isinstance(piece, _Gap):
                        piece.event.wait(piece.seconds)     # a slow server, not a sync
                    else:
                        self.assertTrue(piece.wait(10), "the test never released the answer")
        return RawServer(self, answer)

    def transport(self, server):
        transport = lite._HTTPTransport(server.url, 5.0)
        self.addCleanup(transport.close)
        return transport

    def quick(self, transport, budget=lite._QUICK):
        return transport.post("/api/events", b"[1]", {"X": "1"}, time.monotonic() + 5,
                              quick=time.monotonic() + budget)

    def test_answer_within_the_quick_time_is_read_at_once(self):
        """Transport: an open connection's call answered at once needs no finish()."""
        server = self.server([self.ANSWER])
        transport = self.transport(server)
        transport.post("/api/events", b"[0]", {"X": "1"})      # opens the connection
        response = self.quick(transport, budget=10.0)   # "at once", on a busy machine too
        self.assertEqual((response.status, response.body), (200, b"hello"))
        self.assertEqual([n for n, _ in self.requests], [1, 1])

    def test_no_connection_means_nothing_is_sent_quick(self):
        """Transport: with no open connection a quick post sends nothing; finish() does."""
        server = self.server([self.ANSWER])
        transport = self.transport(server)
        with self.assertRaises(lite._Unfinished) as caught:
            self.quick(transport)
        self.assertEqual(self.requests, [])
        response = transport.finish(caught.exception.exchange)
        self.assertEqual((response.status, response.body), (200, b"hello"))
        self.assertEqual(self.requests, [(1, b"[1]")])

    def unfinished(self, pieces):
        """A quick post of b"[1]" that ran out of time on an open connection, the server
        answering with ``pieces(release)``: (transport, exchange, release)."""
        release = threading.Event()
        self.addCleanup(release.set)
        transport = self.transport(self.server(pieces(release)))
        release.set()
        transport.post("/api/events", b"[0]", {"X": "1"})     # opens the connection
        release.clear()
        with self.assertRaises(lite._Unfinished) as caught:
            self.quick(transport)
        return transport, caught.exception.exchange, release

    def test_late_answer_is_finished_without_sending_again(self):
        """Transport: an answer later than the quick time is read by finish(), the request
        sent once, the connection kept."""
        transport, exchange, release = self.unfinished(lambda release: [release, self.ANSWER])
        release.set()
        response = transport.finish(exchange)
        self.assertEqual((response.status, response.body), (200, b"hello"))
        self.assertEqual(self.requests, [(1, b"[0]"), (1, b"[1]")])

    def test_answer_cut_by_the_quick_time_is_parsed_again_whole(self):
        """Transport: an answer half in when the quick time ends is read from its start."""
        head, tail = self.ANSWER[:30], self.ANSWER[30:]
        transport, exchange, release = self.unfinished(lambda release: [head, release, tail])
        self.assertTrue(exchange.reader.data.startswith(head))
        release.set()
        response = transport.finish(exchange)
        self.assertEqual((response.status, response.body), (200, b"hello"))
        self.assertEqual(len(self.requests), 2)

    def test_quick_timeout_firing_early_is_still_unfinished(self):
        """Transport: a timeout within the quick time means unfinished, even one that fires
        before the clock reaches it (PyPy's do): never a failed call sent again."""
        transport, exchange, release = self.unfinished(lambda release: [release, self.ANSWER])
        release.set()
        transport.finish(exchange)

        class Early(object):                # its first read times out at once
            def __init__(self, sock):
                self.sock, self.fired = sock, False

            def recv(self, size):
                if not self.fired:
                    self.fired = True
                    raise socket.timeout("timed out")
                return self.sock.recv(size)

            def __getattr__(self, name):
                return getattr(self.sock, name)
        release.clear()
        transport._conn.sock = Early(transport._conn.sock)
        with self.assertRaises(lite._Unfinished) as caught:
            self.quick(transport, budget=1.0)   # the bound: the silence timeout is 5 s
        self.assertIsNotNone(transport._conn, "the connection was reset")
        release.set()
        self.assertEqual(transport.finish(caught.exception.exchange).status, 200)
        self.assertEqual([body for _, body in self.requests], [b"[0]", b"[1]", b"[1]"])

    def test_answer_trickled_past_the_quick_time_is_left_to_finish(self):
        """Transport: a server that trickles its answer (a byte every 5 ms, each read
        within its timeout) cannot keep a quick post past its quick time."""
        trickle = [self.ANSWER[i:i + 1] for i in range(len(self.ANSWER))]
        pause = threading.Event()               # never set: each wait is the 5 ms gap
        transport = self.transport(self.server(
            [piece for byte in trickle for piece in (byte, _Gap(pause, 0.005))]))
        transport.post("/api/events", b"[0]", {"X": "1"})     # opens the connection
        with self.assertRaises(lite._Unfinished) as caught:
            self.quick(transport, budget=0.05)  # the whole answer takes 0.2 s or more
        response = transport.finish(caught.exception.exchange)
        self.assertEqual((response.status, response.body), (200, b"hello"))
        self.assertEqual(len(self.requests), 2)

    def test_send_cut_by_the_quick_time_is_sent_again_on_a_new_connection(self):
        """Transport: a request not all written in the quick time is reset and sent whole
        again, as its first try, on a new connection."""
        server = self.server([self.ANSWER])
        transport = self.transport(server)
        transport.post("/api/events", b"[0]", {"X": "1"})

        class Stuck(object):                # a send buffer that stays full
            def __init__(self, sock):
                self.sock, self.timeout = sock, None

            def settimeout(self, seconds):
                self.timeout = seconds

            def sendall(self, data):
                threading.Event().wait(self.timeout)    # blocked for all it may take
                raise socket.timeout("timed out")

            def __getattr__(self, name):
                return getattr(self.sock, name)
        transport._conn.sock = Stuck(transport._conn.sock)
        with self.assertRaises(lite._Unfinished) as caught:
            self.quick(transport)
        exchange = caught.exception.exchange
        self.assertIsNone(transport._conn)
        self.assertEqual((exchange.reader, exchange.attempt), (None, 0))
        response = transport.finish(exchange)
        self.assertEqual(response.status, 200)
        self.assertEqual(self.requests, [(1, b"[0]"), (2, b"[1]")])


class PiecesSocket(object):
    """A socket that answers recv() with the given pieces, then b"" (the stream's end)."""

    def __init__(self, data, size):
        self.pieces = [data[i:i + size] for i in range(0, len(data), size)]

    def recv(self, count):
        return self.pieces.pop(0) if self.pieces else b""


class ReplyReaderTest(IsolatedCase):
    """_read_reply: the bounded HTTP/1.x answer reader, from plain bytes in any pieces."""

    # (answer bytes, limit) -> (status, headers picked, body, reusable)
    TABLE = [
        (b"HTTP/1.1 204 No Content\r\nX-RateLimit-Remaining: 7\r\n\r\n", 100,
         (204, {"x-ratelimit-remaining": "7"}, b"", True)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 100,
         (200, {"content-length": "5"}, b"hello", True)),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", 100, (200, {}, b"ok", True)),
        (b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nretry-after: 4\r\n"
         b"Content-Length: 0\r\n\r\n", 100, (429, {"retry-after": "4"}, b"", True)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", 4,
         (200, {}, b"0123", False)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", 100, (200, {}, b"short", False)),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 100,
         (200, {}, b"ok", False)),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 100, (200, {}, b"ok", False)),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", 100,
         (200, {}, b"ok", True)),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", 100, (200, {}, b"until the end", False)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n", 100,
         (200, {}, b"hello world", True)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
         4, (200, {}, b"0123", False)),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
         100, (201, {}, b"", True)),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 500 Oops\r\n\r\n", 100,
         (103, {"link": "</x>"}, b"", False)),
        (b"HTTP/1.1 200 OK\r\nX-Long: a\r\n  b\r\nContent-Length: 0\r\n\r\n", 100,
         (200, {"x-long": "a b"}, b"", True)),
        (b"HTTP/1.1 200 OK\nContent-Length: 6\n\nab\r\n\r\n", 100,      # bare LF, CRLFs in body
         (200, {"content-length": "6"}, b"ab\r\n\r\n", True)),
        (b"HTTP/1.1 200 OK\r\n\nX: 1\r\n\r\n", 100, (200, {}, b"X: 1\r\n\r\n", False)),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 100, (204, {}, b"", True)),
        (b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\n\r\nC: 3\r\n\r\n", 100,
         (200, {"a": "1", "b": "2"}, b"C: 3\r\n\r\n", False)),
    ]

    def test_bytes_after_the_answer_forbid_reuse(self):
        """Transport: bytes already read past the answer mean the connection is not reused."""
        got = lite._read_reply(lite._SocketLines(PiecesSocket(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", 65536)), 100)
        self.assertEqual((got[0], got[2], got[3]), (200, b"ok", False))

    def test_answers_in_any_pieces(self):
        """Transport: status, headers, body and reuse read alike whatever the recv() sizes."""
        for answer, limit, (status, picked, body, reusable) in self.TABLE:
            for size in (1, 3, 7, 65536):
                with self.subTest(answer=answer[:40], size=size):
                    got = lite._read_reply(lite._SocketLines(PiecesSocket(answer, size)), limit)
                    self.assertEqual((got[0], got[2], got[3]), (status, body, reusable))
                    for name, value in picked.items():
                        self.assertEqual(got[1][name], value)

    def test_what_is_not_an_answer_is_refused(self):
        """Transport: no status line, garbage, an endless line or too many headers raise."""
        import http.client
        cases = [(b"", http.client.RemoteDisconnected),
                 (b"SSH-2.0-OpenSSH\r\n\r\n", http.client.BadStatusLine),
                 (b"HTTP/1.1 2000 OK\r\n\r\n", http.client.BadStatusLine),
                 (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
                  http.client.HTTPException),
                 (b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"\r\n",
                  http.client.HTTPException),
                 (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", http.client.HTTPException),
                 (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                  http.client.HTTPException)]
        for answer, error in cases:
            with self.subTest(answer=answer[:40]):
                with self.assertRaises(error):
                    lite._read_reply(lite._SocketLines(PiecesSocket(answer, 4096)), 100)


class HangingResolverTest(LiteTestCase):
    """close() keeps its deadline even when name resolution never answers."""

    def test_close_returns_while_dns_hangs(self):
        """Lifecycle: close(1) returns in about 1 s with DNS hanging; events are spooled."""
        release = threading.Event()
        self.addCleanup(release.set)
        original = socket.getaddrinfo

        def hanging(host, *args, **kwargs):
            if host == "hangs.example.invalid":     # never sent: answered here
                release.wait(30)
                raise socket.gaierror(-2, "Name or service not known")
            return original(host, *args, **kwargs)
        socket.getaddrinfo = hanging
        self.addCleanup(setattr, socket, "getaddrinfo", original)
        spool = self.tempdir()
        s = self.streamer(None, api_base="http://hangs.example.invalid", spool_dir=spool,
                          timeout=30)
        for i in range(20):
            s.log("k", i)
        started = time.monotonic()
        self.assertFalse(s.close(1.0))
        self.assertLess(time.monotonic() - started, 2.0)
        assert_worker_stopped(s, 5)
        lines = []
        for path in glob.glob(os.path.join(spool, "*", "*", "*.jsonl")):
            with open(path) as handle:
                lines.extend(json.loads(line) for line in handle)
        self.assertEqual(sorted(e["value"] for line in lines for e in line), list(range(20)))


class HostileServerTest(DeliveryTestCase):
    """Answers no server should give cannot stall, spin or desynchronise the stream."""

    def test_interim_1xx_answer_is_never_taken_for_the_final_one(self):
        """Transport: a 103 before a 500 drops the connection; the batch arrives once."""
        got = []

        def answer(conn, number, stop):
            while True:
                body = read_request(conn)
                if body is None:
                    return
                if b"/api/buckets" in body or b"bucketKey" in body:
                    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                    continue
                if number == 1 or len(got) == 0 and number == 2:
                    conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                                 b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
                    got.append(None)
                    continue
                got.extend(json.loads(body.decode("utf-8")))
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        server = RawServer(self, answer)
        s = self.streamer(server.url, buffer_size=10)
        log_all(s, events("e", 10))
        self.assertTrue(s.flush(10), s.stats())
        log_all(s, events("f", 10))
        self.assertTrue(s.flush(10), s.stats())
        delivered = [(e["key"], e["value"]) for e in got if e is not None]
        self.assertExactlyOnce(delivered, events("e", 10) + events("f", 10))

    def test_huge_answer_is_read_only_in_part(self):
        """Transport: a 200 with a 200 MB body is read up to 64 KiB; memory stays flat."""
        import resource
        sent = [0]

        def answer(conn, number, stop):
            while read_request(conn) is not None:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 209715200\r\n\r\n")
                chunk = b"x" * 65536
                while sent[0] < 209715200 and not stop.is_set():
                    conn.sendall(chunk)
                    sent[0] += len(chunk)
        server = RawServer(self, answer)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        s = self.streamer(server.url, buffer_size=5)
        log_all(s, events("h", 5))
        self.assertTrue(s.flush(10), s.stats())
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        self.assertLess(grown_kib, 50 * 1024)
        self.assertLess(sent[0], 100 * 1024 * 1024)       # the client stopped reading

    def test_retry_after_zero_cannot_make_it_spin(self):
        """429: Retry-After 0, negative or past waits longer each time; a few requests a second."""
        now = email.utils.formatdate(time.time() - 60, usegmt=True)

        def cell(value):
            sink = self.sink(rule=lambda handler, path: (
                (429, {"Retry-After": value}) if path == "/api/events" else None))
            s = self.streamer(sink.url, backoff_base=0.1, backoff_cap=30.0)
            log_all(s, events("z", 5))
            self.assertFalse(s.flush(1.0))
            with sink.changed:
                requests = sum(1 for _, path, _ in sink.seen if path == "/api/events")
            self.assertLessEqual(requests, 8)       # 0.05, 0.1, 0.2, 0.4 s ... apart
            self.assertGreaterEqual(requests, 2)
        # Each cell waits out its flush(1.0): the three overlap.
        concurrently(self, [(dict(retry_after=value), lambda value=value: cell(value))
                            for value in ("0", "-3", now)])

    def test_nonsense_rate_limit_headers_never_stall(self):
        """Pacing: a reset in ms, inf, nan or 1e12 with nothing left waits one window at most."""
        for reset in ("inf", "nan", "1e12", "%.0f" % (time.time() * 1000)):
            with self.subTest(reset=reset):
                headers = {"X-RateLimit-Limit": "30", "X-RateLimit-Remaining": "0",
                           "X-RateLimit-Reset": reset}
                sink = self.sink(rule=lambda handler, path, h=headers: (204, h)
                                 if path == "/api/events" else None)
                s = self.streamer(sink.url, buffer_size=5)
                log_all(s, events("r", 5))
                self.assertTrue(s.flush(5), s.stats())
                log_all(s, events("s", 5))
                self.assertTrue(bounded_poll(lambda: s.stats()["waiting"], 10), s.stats())
                self.assertEqual(s.stats()["waiting"], "rate limit window")
                # The documented 10 s window and a little slack, never longer.
                self.assertLessEqual(s._session.worker.waiting[0] - time.monotonic(), 11.01)


class SlowLinkServer(object):
    """The events API behind a slow link: bodies are read at ``rate`` bytes a second.

    Its receive buffer is small, so a client's send waits for the link as it
    would on 2G. Events are stored only once a whole body arrived (a reset
    connection stores nothing). ``gate``: if given, the first connection's
    body is not read until the event is set.
    """

    def __init__(self, case, rate, gate=None):
        self.rate = rate
        self.gate = gate
        self.values = []
        self.sizes = []
        self.resets = 0
        self.first_done = threading.Event()     # the first connection's handler ended
        self.changed = threading.Condition()
        self.server = RawServer(case, self.answer)
        self.server.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.url = self.server.url

    def answer(self, conn, number, stop):
        try:
            self.serve(conn, number, stop)
        except OSError:
            with self.changed:
                self.resets += 1
        finally:
            if number == 1:
                self.first_done.set()

    def receive(self, conn, size):
        """Up to ``size`` bytes, no faster than the link carries them."""
        piece = conn.recv(size)
        if self.rate and piece:
            threading.Event().wait(len(piece) / float(self.rate))
        return piece

    def serve(self, conn, number, stop):
        data = b""
        while not stop.is_set():
            while b"\r\n\r\n" not in data:
                piece = self.receive(conn, 256)
                if not piece:
                    return
                data += piece
            head, data = data.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            if number == 1 and self.gate is not None:
                self.gate.wait(30)
            while len(data) < length:
                piece = self.receive(conn, min(2048, length - len(data)))
                if not piece:
                    raise ConnectionResetError("the client went away mid-body")
                data += piece
            body, data = data[:length], data[length:]
            if b"/api/events" in head.split(b"\r\n")[0]:
                events = json.loads(body.decode("utf-8"))
                with self.changed:
                    self.values.extend(e["value"] for e in events)
                    self.sizes.append(len(events))
                    self.changed.notify_all()
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    def duplicates(self):
        with self.changed:
            return sum(n - 1 for n in collections.Counter(self.values).values())


class SlowLinkTest(DeliveryTestCase):
    """Requests over slow links: timeout is silence, not the whole upload; give-ups reset."""

    def backlog(self, count):
        """A spool of ``count`` events left by a run whose server was down."""
        spool = self.tempdir()
        s = self.streamer("http://127.0.0.1:9", spool_dir=spool, bucket_key="slow")
        for i in range(count):
            s.log("n", i)
        # The server is down: all of it spooled, and the segment let go of (a worker
        # that woke late still holds it when close() answers at its deadline).
        self.assertFalse(closed_and_stopped(s, 0.2))
        self.assertEqual(len(disk_values(spool)), count)
        return spool

    def deliver_backlog(self, count, rate, timeout, close_within, **options):
        spool = self.backlog(count)
        link = SlowLinkServer(self, rate)
        s = self.streamer(link.url, spool_dir=spool, bucket_key="slow", timeout=timeout,
                          **options)
        started = time.monotonic()
        done = s.close(close_within)
        elapsed = time.monotonic() - started
        stats = s.stats()
        if not done:                            # the next process sends the rest
            self.assertTrue(self.streamer(link.url, spool_dir=spool, bucket_key="slow",
                                          timeout=timeout, **options).close(close_within))
        with link.changed:
            values = collections.Counter(link.values)
            most = max(link.sizes)
        self.assertEqual(set(values), set(range(count)), "events lost")
        self.assertLessEqual(link.duplicates(), most)
        return elapsed, stats, link

    def test_slow_upload_is_not_a_timeout(self):
        """Transport: a body that takes 2.5x timeout to upload at a steady pace goes through."""
        elapsed, stats, link = self.deliver_backlog(2200, 40000, 1.0, 30, buffer_size=2200)
        self.assertEqual(stats["retried"], 0, "a steady upload was taken for silence")
        self.assertEqual(link.duplicates(), 0)
        self.assertGreater(elapsed, 1.5, "the link was not slow: the test proves nothing")

    @unittest.skipUnless(FULL_MATRIX, "56 kbit/s for 2,400 events takes ~20 s; "
                                      "ISSTREAMER_LITE_FULL=1 runs it")
    def test_backlog_over_a_56_kbit_link(self):
        """Transport: 2,400 spooled events over 7 kB/s are all delivered by close(75)."""
        elapsed, stats, link = self.deliver_backlog(2400, 7000, 10.0, 75)
        sys.stderr.write("\n56 kbit/s: 2,400 events in %.1f s, %d requests, %d retried, "
                         "%d duplicates\n" % (elapsed, len(link.sizes), stats["retried"],
                                               link.duplicates()))

    def test_abandoned_request_is_reset_not_delivered_later(self):
        """Transport: a request given up on is reset; the kernel does not deliver it after."""
        gate = threading.Event()
        self.addCleanup(gate.set)
        link = SlowLinkServer(self, 0, gate=gate)
        s = self.streamer(link.url, bucket_key="slow", timeout=0.5, buffer_size=1000,
                          backoff_base=0.01)
        for i in range(400):                    # about 18 kB: more than the server buffers
            s.log("n", "%04d-padding-padding" % i)
        self.assertTrue(s.flush(20), "the retry on a new connection did not get through")
        self.assertGreaterEqual(s.stats()["retried"], 1)
        gate.set()                              # the first connection may read on now
        self.assertTrue(link.first_done.wait(30))
        self.assertEqual(link.duplicates(), 0, "the abandoned body reached the server")
        self.assertEqual(link.resets, 1)


# --- Delivery policy ---------------------------------------------------------
# Retry, back-off, pacing and the month, as functions of plain values.

class DecideTest(IsolatedCase):
    """The delivery policy as one pure function: outcome -> _Decision."""

    def decide(self, status=None, **kwargs):
        options = dict(failures=0, base=0.5, cap=30.0, retry_after_cap=120.0, pause=60.0,
                       now=1700000000.0, rand=lambda: 1.0)
        options.update(kwargs)
        return lite._decide(status, **options)

    def test_2xx_is_delivered(self):
        """Policy: 200, 201, 204 and 299 are delivered."""
        for status in (200, 201, 204, 299):
            self.assertEqual(self.decide(status).action, lite._DELIVERED, status)

    def test_network_errors_are_retried(self):
        """Policy: refused, reset and aborted connections retry with reason network."""
        for error in (ConnectionRefusedError(111, "refused"), ConnectionResetError(104, "reset"),
                      ConnectionAbortedError(), OSError(101, "unreachable"), EOFError()):
            decision = self.decide(None, error=error, failures=2)
            self.assertEqual((decision.action, decision.reason), (lite._RETRY, "network"),
                             repr(error))
            self.assertEqual(decision.delay, 2.0)

    def test_timeouts_are_retried(self):
        """Policy: socket.timeout and TimeoutError retry with reason timeout."""
        for error in (socket.timeout("timed out"), TimeoutError()):
            decision = self.decide(None, error=error)
            self.assertEqual((decision.action, decision.reason), (lite._RETRY, "timeout"))

    def test_408_and_5xx_retry_with_full_jitter(self):
        """Policy: 408 and 5xx retry after rand() * min(cap, base * 2^failures)."""
        for status in (408, 500, 502, 503, 504, 599):
            for failures, rand, expected in ((0, 1.0, 0.5), (1, 1.0, 1.0), (3, 1.0, 4.0),
                                             (3, 0.25, 1.0), (3, 0.0, 0.0)):
                decision = self.decide(status, failures=failures, rand=lambda: rand)
                self.assertEqual((decision.action, decision.reason),
                                 (lite._RETRY, "server_error"), status)
                self.assertAlmostEqual(decision.delay, expected, msg=(status, failures, rand))

    def test_retry_delay_respects_cap(self):
        """Policy: the back-off never exceeds the cap, however many failures."""
        for failures in (6, 7, 30, 31, 1000, 10 ** 9):
            decision = self.decide(503, failures=failures)
            self.assertEqual(decision.delay, 30.0, failures)
        self.assertEqual(self.decide(None, error=OSError(), failures=50, cap=0.05).delay, 0.05)

    def test_429_waits_retry_after_seconds(self):
        """Policy: 429 with Retry-After in seconds waits that long, as rate_limited."""
        for header, expected in (("7", 7.0), (" 2.5 ", 2.5)):
            decision = self.decide(429, headers={"retry-after": header})
            self.assertEqual((decision.action, decision.reason), (lite._WAIT, "rate_limited"))
            self.assertEqual(decision.delay, expected)

    def test_429_retry_after_zero_or_negative_still_waits_longer_each_time(self):
        """Policy: Retry-After 0, negative or past waits a floor that doubles per 429 in a row."""
        for header in ("0", "-5"):
            delays = [self.decide(429, headers={"retry-after": header}, failures=n,
                                  base=0.5, cap=30.0).delay for n in range(8)]
            self.assertEqual(delays, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0], header)

    def test_429_waits_until_retry_after_date(self):
        """Policy: 429 with an HTTP-date Retry-After waits until then (injected now)."""
        now = 1700000000.0
        header = email.utils.formatdate(now + 7, usegmt=True)
        decision = self.decide(429, headers={"retry-after": header}, now=now)
        self.assertEqual((decision.action, decision.delay), (lite._WAIT, 7.0))
        past = email.utils.formatdate(now - 20, usegmt=True)
        self.assertEqual(self.decide(429, headers={"retry-after": past}, now=now,
                                     base=0.5).delay, 0.25)

    def test_429_retry_after_beyond_the_window_counts_as_its_end(self):
        """Policy: a Retry-After in ms, years ahead, infinite or past the 10 s window waits 10 s."""
        now = 1700000000.0
        for header in ("%.0f" % ((now + 5) * 1000), "1e12", "3600", "inf", "12",
                       email.utils.formatdate(now + 86400 * 365, usegmt=True)):
            decision = self.decide(429, headers={"retry-after": header}, now=now,
                                   retry_after_cap=120.0)
            self.assertEqual((decision.action, decision.delay), (lite._WAIT, 10.0), header)
        self.assertEqual(self.decide(429, headers={"retry-after": "11"}, now=now).delay, 11.0)

    def test_429_retry_after_is_capped(self):
        """Policy: a Retry-After beyond retry_after_cap waits retry_after_cap."""
        decision = self.decide(429, headers={"retry-after": "8"}, retry_after_cap=5.0)
        self.assertEqual((decision.action, decision.delay), (lite._WAIT, 5.0))

    def test_429_without_retry_after_backs_off(self):
        """Policy: 429 without (or with an unreadable) Retry-After backs off with jitter."""
        for headers in (None, {}, {"retry-after": "soon"}):
            decision = self.decide(429, headers=headers, failures=2, rand=lambda: 0.5)
            self.assertEqual((decision.action, decision.reason), (lite._WAIT, "rate_limited"))
            self.assertEqual(decision.delay, 1.0)

    def test_413_splits(self):
        """Policy: 413 splits the batch, at once."""
        decision = self.decide(413)
        self.assertEqual((decision.action, decision.delay, decision.reason),
                         (lite._SPLIT, 0.0, "too_large"))

    def test_400_bisects(self):
        """Policy: 400 bisects the batch to find the rejected events."""
        decision = self.decide(400)
        self.assertEqual((decision.action, decision.delay, decision.reason),
                         (lite._BISECT, 0.0, "rejected"))

    def test_401_403_pause_as_key_rejected(self):
        """Policy: 401 and 403 pause for pause seconds with reason key_rejected."""
        for status in (401, 403):
            decision = self.decide(status, pause=7.0)
            self.assertEqual((decision.action, decision.delay, decision.reason),
                             (lite._PAUSE, 7.0, "key_rejected"))

    def test_402_pauses_as_quota(self):
        """Policy: 402 pauses for pause seconds with reason quota."""
        decision = self.decide(402, pause=7.0)
        self.assertEqual((decision.action, decision.delay, decision.reason),
                         (lite._PAUSE, 7.0, "quota"))

    def test_other_4xx_pause(self):
        """Policy: another 4xx (404, 409) pauses, naming the status."""
        for status in (404, 409):
            decision = self.decide(status, pause=7.0)
            self.assertEqual((decision.action, decision.reason), (lite._PAUSE, "http_%d" % status))

    def test_pure_when_now_and_rand_given(self):
        """Policy: with now and rand injected, no clock and no random source is read."""
        def forbidden():
            raise AssertionError("the policy read the clock")
        original = lite._time
        lite._time = forbidden
        self.addCleanup(setattr, lite, "_time", original)
        date = email.utils.formatdate(1700000008, usegmt=True)
        self.assertEqual(self.decide(429, headers={"retry-after": date}).delay, 8.0)
        first = [self.decide(503, failures=n).delay for n in range(8)]
        self.assertEqual(first, [self.decide(503, failures=n).delay for n in range(8)])


class RetryDelayTest(IsolatedCase):
    """_retry_delay and _parse_retry_after, without threads."""

    def test_full_jitter_bounds(self):
        """Back-off: uniform in [0, min(cap, base * 2^n)], and really jittered."""
        for failures in range(12):
            bound = min(5.0, 0.1 * 2 ** failures)
            delays = [lite._retry_delay(failures, 0.1, 5.0) for _ in range(200)]
            self.assertTrue(all(0.0 <= d <= bound for d in delays), failures)
            self.assertGreater(len(set(delays)), 100)

    def test_injected_rand_and_cap(self):
        """Back-off: rand scales the bound; the cap holds for huge failure counts."""
        self.assertEqual(lite._retry_delay(0, 0.5, 30.0, lambda: 1.0), 0.5)
        self.assertEqual(lite._retry_delay(4, 0.5, 30.0, lambda: 1.0), 8.0)
        self.assertEqual(lite._retry_delay(4, 0.5, 30.0, lambda: 0.5), 4.0)
        self.assertEqual(lite._retry_delay(10 ** 6, 0.5, 30.0, lambda: 1.0), 30.0)
        self.assertEqual(lite._retry_delay(3, 0.5, 30.0, lambda: 0.0), 0.0)

    def test_parse_retry_after(self):
        """Retry-After: seconds, fractions, negatives, HTTP dates, garbage."""
        now = 1700000000.0
        date = email.utils.formatdate(now + 42, usegmt=True)
        for value, expected in ((None, None), ("5", 5.0), (" 2.5 ", 2.5), ("-3", 0.0),
                                (date, 42.0), ("soon", None), ("", None),
                                (email.utils.formatdate(now - 5, usegmt=True), 0.0)):
            self.assertEqual(lite._parse_retry_after(value, now), expected, repr(value))


class RateBudgetTest(IsolatedCase):
    """_RateBudget learns the window from X-RateLimit-* headers, in monotonic time."""

    WALL = 1700000000.0          # the wall clock when an answer arrives
    MONO = 500.0                 # the monotonic clock at the same moment

    def headers(self, limit, remaining, reset, date=None):
        found = {"x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining),
                 "x-ratelimit-reset": reset if isinstance(reset, str) else "%.3f" % reset}
        if date is not None:
            found["date"] = email.utils.formatdate(date, usegmt=True)
        return found

    def budget(self, limit, remaining, reset_in, **kwargs):
        budget = lite._RateBudget()
        budget.update(self.headers(limit, remaining, self.WALL + reset_in, **kwargs),
                      self.MONO, self.WALL)
        return budget

    def test_unpaced_until_headers_seen(self):
        """Pacing: without (readable) rate-limit headers nothing waits."""
        budget = lite._RateBudget()
        self.assertEqual([budget.reserve(self.MONO) for _ in range(100)], [0.0] * 100)
        budget.update({}, self.MONO, self.WALL)
        budget.update({"x-ratelimit-limit": "x", "x-ratelimit-remaining": "1",
                       "x-ratelimit-reset": "1"}, self.MONO, self.WALL)
        self.assertEqual(budget.reserve(self.MONO), 0.0)

    def test_requests_are_spread_over_the_window(self):
        """Pacing: what is left of a window is spread over it, never spent at once."""
        budget = self.budget(30, 30, 10.0)
        self.assertEqual(budget.reserve(self.MONO), 0.0)
        self.assertAlmostEqual(budget.reserve(self.MONO), 10.0 / 30, places=6)
        now, sent = self.MONO, 1
        while now < self.MONO + 10.0:
            wait = budget.reserve(now)
            if wait == 0.0:
                sent += 1
            else:
                now += wait
        self.assertEqual(sent, 30)              # all of the window, and never more

    def test_empty_window_waits_for_reset(self):
        """Pacing: with nothing left, the next request waits until the reset."""
        budget = self.budget(30, 0, 4.0)
        self.assertAlmostEqual(budget.reserve(self.MONO + 1.0), 3.01, places=6)

    def test_window_refills_at_reset(self):
        """Pacing: at the reset time the window refills to the limit."""
        budget = self.budget(3, 0, 2.0)
        self.assertGreater(budget.reserve(self.MONO), 0.0)
        self.assertEqual(budget.reserve(self.MONO + 2.0), 0.0)

    def test_wall_clock_steps_do_not_stall(self):
        """Pacing: the reset is kept in monotonic time; a wall clock step changes nothing."""
        budget = self.budget(3, 0, 2.0)
        # An hour's step back of the wall clock is invisible to reserve(), which only
        # ever sees the monotonic clock.
        self.assertEqual(budget.reserve(self.MONO + 2.0), 0.0)

    def test_hostile_resets_never_stall_or_spin(self):
        """Pacing: a reset in ms, 1e12, inf, nan, past or far away ends the window within 11 s."""
        cases = ["%.0f" % ((self.WALL + 5) * 1000), "1e12", "inf", "nan", "-1",
                 "%.3f" % (self.WALL - 5), "%.3f" % (self.WALL + 1e6)]
        for reset in cases:
            budget = lite._RateBudget()
            budget.update(self.headers(10, 0, reset), self.MONO, self.WALL)
            wait = budget.reserve(self.MONO)
            self.assertGreaterEqual(wait, 0.0, reset)
            self.assertLessEqual(wait, 11.01, reset)
            self.assertEqual(wait, wait, reset)                     # not NaN
            self.assertEqual(budget.reserve(self.MONO + 11.02), 0.0,
                             reset)                 # after the window, one request goes

    def test_forgotten_one_window_after_the_last_headers(self):
        """Pacing: with no headers since, a window's news lasts it and one more, then nothing waits."""
        budget = self.budget(1, 0, 10.0)          # 1 request per 10 s window
        self.assertAlmostEqual(budget.reserve(self.MONO), 10.01, places=6)
        self.assertEqual(budget.reserve(self.MONO + 10.01), 0.0)     # the next window
        self.assertAlmostEqual(budget.reserve(self.MONO + 10.02), 9.99, places=6)
        # Two windows after the last answer with headers: nothing is known, nothing waits.
        now = self.MONO + 20.01
        self.assertEqual([budget.reserve(now) for _ in range(50)], [0.0] * 50)
        budget.update(self.headers(30, 0, self.WALL + 30.0), now, self.WALL + 20.01)
        self.assertGreater(budget.reserve(now), 9.0)              # taught again

    def test_same_window_remaining_only_decreases(self):
        """Pacing: a late answer in the same window never raises what is left."""
        budget = self.budget(30, 1, 10.0)
        budget.update(self.headers(30, 20, self.WALL + 10.2), self.MONO, self.WALL)
        self.assertEqual(budget.reserve(self.MONO), 0.0)
        self.assertGreater(budget.reserve(self.MONO + 1.0), 8.0)

    def test_new_window_takes_server_remaining(self):
        """Pacing: headers of a new window replace the old count."""
        budget = self.budget(30, 0, 1.0)
        budget.update(self.headers(30, 5, self.WALL + 11.0), self.MONO + 1.0,
                      self.WALL + 1.0)
        self.assertEqual(budget.reserve(self.MONO + 1.0), 0.0)
        self.assertAlmostEqual(budget.reserve(self.MONO + 1.0), 2.0, places=6)

    def test_date_header_corrects_clock_skew(self):
        """Pacing: a server clock 100 s ahead (Date header) does not make us wait 100 s."""
        budget = self.budget(5, 0, 110.0, date=self.WALL + 100)
        self.assertAlmostEqual(budget.reserve(self.MONO), 10.01, places=6)
        # A second of skew, too: the window ends by the server's clock, not ours.
        skewed = self.budget(5, 0, 11.0, date=self.WALL + 1)
        self.assertAlmostEqual(skewed.reserve(self.MONO), 10.01, places=6)

    def test_late_answer_from_a_finished_window_is_ignored(self):
        """Pacing: an answer from a window already over does not refill the current one."""
        budget = self.budget(3, 0, 10.0)
        budget.update(self.headers(3, 2, self.WALL - 1.0), self.MONO, self.WALL)
        self.assertAlmostEqual(budget.reserve(self.MONO), 10.01, places=6)

    def stream(self, rate, skew, limit=30, latency=0.05, seconds=60.0, date=True):
        """A client pacing ``rate`` calls/s (one at a time) against a server of fixed
        10 s windows; its wall clock is ``skew`` s off. Returns (429s, calls per whole window)."""
        budget, start, mono = lite._RateBudget(), 1700000003.3, 500.0
        used, refused, t, due = collections.Counter(), 0, 0.0, 0.0
        while t < seconds:
            t = max(t, due)
            wait = budget.reserve(mono + t)
            if wait > 0:
                t += wait
                continue
            arrived = start + t + latency           # the server's clock is the true one
            window = int(arrived // 10)
            used[window] += 1
            refused += used[window] > limit
            headers = {"x-ratelimit-limit": str(limit),
                       "x-ratelimit-remaining": str(max(0, limit - used[window])),
                       "x-ratelimit-reset": "%.3f" % ((window + 1) * 10.0)}
            if date:
                headers["date"] = email.utils.formatdate(int(arrived), usegmt=True)
            t += 2 * latency
            budget.update(headers, mono + t, start + t + skew)
            due = t + 1.0 / rate - 2 * latency
        return refused, [used[w] for w in sorted(used)][1:-1]

    def test_a_steady_stream_draws_no_429_and_the_ceiling_uses_the_window(self):
        """Pacing: under the ceiling no 429; at it >= 95% of each window's calls, clock skew or not."""
        for skew in (0.0, 0.3, -0.3, 0.9, -0.9, 1.5, -1.5):
            for date in (True, False):
                if not date and abs(skew) > 0.0:
                    continue                # without Date only the wall clock tells
                refused, windows = self.stream(2.5, skew, date=date)
                self.assertEqual(refused, 0, (skew, date, windows))
                refused, windows = self.stream(100.0, skew, date=date)
                self.assertEqual(refused, 0, (skew, date, windows))
                self.assertGreaterEqual(min(windows), 0.95 * 30, (skew, date, windows))

    def shared_path(self):
        folder = tempfile.mkdtemp(prefix="isl-rate-")
        self.addCleanup(shutil.rmtree, folder, True)
        return os.path.join(folder, "key", "rate-x.json")

    def spend(self, budgets, seconds=9.99):
        """Each budget takes a call whenever it may, every 10 ms, the first to ask taking
        turns; [(time, index)] of the calls."""
        now, calls, tick = self.MONO, [], 0
        while now < self.MONO + seconds:
            for index in range(len(budgets)):
                index = (index + tick) % len(budgets)
                if budgets[index].reserve(now) == 0.0:
                    calls.append((now, index))
            now += 0.01
            tick += 1
        return calls

    def test_processes_of_one_key_spend_one_window_through_a_file(self):
        """Pacing: budgets of two processes on one file spend one window together, spread."""
        path = self.shared_path()
        first, second = lite._SharedBudget(path), lite._SharedBudget(path)
        first.update(self.headers(30, 30, self.WALL + 10.0), self.MONO, self.WALL)
        calls = self.spend([first, second])
        self.assertEqual(len(calls), 30)
        self.assertEqual(set(index for _, index in calls), {0, 1})
        gaps = [later - earlier for (earlier, _), (later, _) in zip(calls, calls[1:])]
        self.assertGreaterEqual(min(gaps), 0.3)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        # What the server tells one process paces the other: a window with nothing left.
        second.update(self.headers(30, 0, self.WALL + 20.0), self.MONO + 10.0,
                      self.WALL + 10.0)
        self.assertGreater(first.reserve(self.MONO + 10.0), 9.0)

    def test_processes_take_turns_in_the_order_they_asked(self):
        """Pacing: a process told to wait gets the turn it waited for, even when another
        asks first at that moment: none loses race after race for the shared window."""
        path = self.shared_path()
        first, second = lite._SharedBudget(path), lite._SharedBudget(path)
        first.update(self.headers(30, 30, self.WALL + 10.0), self.MONO, self.WALL)
        self.assertEqual(first.reserve(self.MONO), 0.0)                 # first's call
        wait = second.reserve(self.MONO + 0.01)         # second waits for the next turn
        self.assertGreater(wait, 0.0)
        turn = self.MONO + 0.01 + wait
        self.assertGreater(first.reserve(self.MONO + 0.02), wait)      # first: after second
        self.assertGreater(first.reserve(turn), 0.0, "first took the turn second waited for")
        self.assertEqual(second.reserve(turn), 0.0)
        self.assertEqual(first.reserve(turn + 1.0), 0.0)                # then first's own

    def test_without_the_file_each_process_paces_alone(self):
        """Pacing: a shared file that cannot be written (or is garbage) leaves local pacing."""
        folder = tempfile.mkdtemp(prefix="isl-rate-")
        self.addCleanup(shutil.rmtree, folder, True)
        blocker = os.path.join(folder, "not-a-folder")
        with open(blocker, "w") as handle:
            handle.write("x")
        garbage = os.path.join(folder, "rate-garbage.json")
        with open(garbage, "w") as handle:
            handle.write("{not json")
        os.chmod(garbage, 0o600)
        for path in (os.path.join(blocker, "rate-x.json"), garbage):
            budget = lite._SharedBudget(path)
            budget.update(self.headers(30, 30, self.WALL + 10.0), self.MONO, self.WALL)
            self.assertEqual(len(self.spend([budget])), 30, path)

    def test_one_budget_per_access_key(self):
        """Pacing: Streamers of one key and base share one budget; other keys do not."""
        base = "http://127.0.0.1:9"
        self.assertIs(lite._budget_for(base, "ist_a"), lite._budget_for(base, "ist_a"))
        self.assertIsNot(lite._budget_for(base, "ist_a"), lite._budget_for(base, "ist_b"))


class MonthTallyTest(IsolatedCase):
    """The month's count and projection, from plain times (no clock, no I/O)."""

    def test_month_left(self):
        """Month: seconds to the end of the calendar month (UTC), leap years included."""
        for when, left in (("2026-02-28T23:59:00", 60), ("2028-02-28T00:00:00", 2 * 86400),
                           ("2026-12-01T00:00:00", 31 * 86400), ("2026-04-30T12:00:00", 43200)):
            with self.subTest(when=when):
                self.assertEqual(lite._month_left(utc(when)), left)
                self.assertEqual(lite._month_of(utc(when)), when[:7])

    def test_projection_from_the_last_hour_spread_over_the_hour(self):
        """Month: a first burst is spread over the hour; an hour of steady rate projects it."""
        t0 = utc("2026-12-06T12:00:00")
        tally = lite._MonthTally({"2026-12": 1000, "2026-11": 7})
        tally.add(3600, t0)
        left = lite._month_left(t0)
        self.assertEqual(tally.projected(t0), int(4600 + 1.0 * left))   # 3,600 over 3,600 s
        # A burst of 4,000 at once: about 2.3 million by the month's end, under the cap.
        burst = lite._MonthTally()
        burst.add(4000, t0)
        self.assertLess(burst.projected(t0), lite._MONTHLY_QUOTA)
        for minute in range(1, 61):
            tally.add(600, t0 + 60 * minute)                     # 10 a second for an hour
        now = t0 + 3600
        self.assertAlmostEqual(tally.rate(now), 600 * 60 / 3600.0, places=6)
        self.assertEqual(tally.months["2026-12"], 1000 + 3600 + 600 * 60)
        self.assertEqual(tally.rate(now + 2 * 3600), 0.0)       # nothing lately: no rate
        self.assertEqual(tally.projected(now + 2 * 3600), 1000 + 3600 + 600 * 60)

    def test_months_split_at_midnight_utc_and_merge_with_the_file(self):
        """Month: events count in their UTC month; a save adds only what is new."""
        tally = lite._MonthTally()
        tally.add(3, utc("2026-11-30T23:59:59"))
        tally.add(4, utc("2026-12-01T00:00:01"))
        self.assertEqual(tally.months, {"2026-11": 3, "2026-12": 4})
        merged = tally.merged({"2026-12": 10, "2025-01": 1})
        self.assertEqual(merged, {"2025-01": 1, "2026-11": 3, "2026-12": 14})
        tally.saved(merged)
        tally.add(1, utc("2026-12-02T00:00:00"))
        self.assertEqual(tally.merged(merged)["2026-12"], 15)
        many = dict(("20%02d-01" % y, 1) for y in range(30))
        self.assertEqual(len(tally.merged(many)), lite._MONTHS_KEPT)


# --- Spool -------------------------------------------------------------------
# Segments and acks, every crash state, repair, full and unwritable disks.

class SpoolFormatTest(DeliveryTestCase):
    """What the spool holds on disk, and replay past a torn line."""

    def spool_while_down(self, url, spool_dir, pairs, bucket_key="delivery-bucket"):
        s = self.streamer(url, spool_dir=spool_dir, bucket_key=bucket_key,
                          bucket_name="Spooled")
        log_all(s, pairs)
        self.assertFalse(closed_and_stopped(s, 0.3))
        return s

    def test_lines_are_postable_private_and_keyless(self):
        """Spool: each line a JSON array POSTable as-is; files 0600, dirs 0700, no key."""
        outage = Outage(self, up=False)
        spool_dir = self.tempdir()
        expected = events("f", 25)
        self.spool_while_down(outage.url, spool_dir, expected)
        segments = spool_segments(spool_dir)
        self.assertTrue(segments)
        for root, dirs, files in os.walk(spool_dir):
            for name in dirs:
                path = os.path.join(root, name)
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700, path)
            for name in files:
                path = os.path.join(root, name)
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
                self.assertNotIn(KEY, path)
                with open(path, "rb") as handle:
                    self.assertNotIn(KEY.encode("ascii"), handle.read(), path)
            self.assertNotIn(KEY, root)
        import http.client
        sink = outage.up()
        lines = 0
        for path in segments:
            with open(path, "rb") as handle:
                for line in handle:
                    self.assertTrue(line.endswith(b"\n"))
                    body = line.rstrip(b"\n")
                    self.assertIsInstance(json.loads(body.decode("utf-8")), list)
                    conn = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=10)
                    conn.request("POST", "/api/events", body, {
                        "Content-Type": "application/json", "X-IS-AccessKey": KEY,
                        "X-IS-BucketKey": "delivery-bucket"})
                    self.assertEqual(conn.getresponse().status, 204)
                    conn.close()
                    lines += 1
        self.assertGreater(lines, 0)
        self.assertExactlyOnce(self.received(sink), expected)

    def test_torn_line_skipped_reported_and_not_blocking(self):
        """Spool: a torn last line is reported and skipped; lines before and after arrive."""
        outage = Outage(self, up=False)
        spool_dir = self.tempdir()
        first, second = events("a", 10), events("b", 10)
        self.spool_while_down(outage.url, spool_dir, first)
        torn = spool_segments(spool_dir)[-1]
        with open(torn, "rb") as handle:
            before = handle.read()
        self.assertTrue(before.endswith(b"\n"))            # complete lines precede the tear
        with open(torn, "ab") as handle:
            handle.write(b'[{"key":"torn","value":1,"ep')
        self.spool_while_down(outage.url, spool_dir, second)
        segments = spool_segments(spool_dir)
        self.assertGreater(len(segments), 1)
        self.assertLess(segments.index(torn), len(segments) - 1)   # lines after it exist
        outage.up()
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            replayer = self.streamer(outage.url, spool_dir=spool_dir, bucket_key="replayer")
            self.assertFalse(replayer.flush(10))     # the torn line was dead-lettered
        self.assertTrue(any("torn" in line or "unreadable" in line for line in logs.output),
                        logs.output)
        self.assertExactlyOnce(self.received(outage, "delivery-bucket"), first + second)
        self.assertEqual(replayer.stats()["replayed"], 20)
        self.assertEqual(replayer.stats()["dead_lettered"], 1)
        with open(glob.glob(os.path.join(spool_dir, "*", "deadletter.jsonl"))[0]) as handle:
            self.assertIn('"key\\":\\"torn', handle.read())
        self.assertTrue(replayer.close(5))
        self.assertEqual(spool_segments(spool_dir), [])


class SpoolRepairTest(DeliveryTestCase):
    """Recovery repairs what a power cut (or an older version) left, instead of giving up."""

    def old_spool(self, bucket_key, values, meta=b""):
        """A spool as a crash could leave it: one segment, ``bucket.json`` as given."""
        spool = self.tempdir()
        folder = os.path.join(spool, fingerprint(KEY), fingerprint(bucket_key))
        os.makedirs(folder, 0o700)
        with open(os.path.join(folder, "bucket.json"), "wb") as handle:
            handle.write(meta)
        path = os.path.join(folder, "00000000000000001-1-abcd1234.jsonl")
        with open(path, "wb") as handle:
            for value in values:
                handle.write(json.dumps([{"key": "n", "value": value}]).encode() + b"\n")
        return spool, path

    def test_empty_bucket_json_is_rewritten_by_a_streamer_of_that_bucket(self):
        """Spool: an emptied bucket.json no longer strands its segments; it is rewritten."""
        spool, path = self.old_spool("lost-meta", [1, 2, 3])
        sink = self.sink()
        other = self.streamer(sink.url, spool_dir=spool, bucket_key="another")
        other.log("m", 0)
        self.assertTrue(other.close(5))
        self.assertTrue(os.path.exists(path), "a Streamer of another bucket cannot know it")
        s = self.streamer(sink.url, spool_dir=spool, bucket_key="lost-meta")
        self.assertTrue(bounded_poll(lambda: not os.path.exists(path), 10))
        self.assertTrue(s.close(5))
        self.assertEqual(sorted(v for b, (k, v) in zip(
            [b for b, _ in sink.events], self.received(sink)) if b == "lost-meta"), [1, 2, 3])
        meta = os.path.join(os.path.dirname(path), "bucket.json")
        self.assertEqual(lite._Spool.read_bucket(os.path.dirname(meta)), ("lost-meta", ""))

    def test_ack_log_without_its_segment_is_swept(self):
        """Spool: an .ack left by a power cut after its segment's removal is deleted."""
        spool, path = self.old_spool("orphan", [1])
        orphan = os.path.join(os.path.dirname(path), "00000000000000000-1-0000beef.jsonl.ack")
        with open(orphan, "wb") as handle:
            handle.write(b"0 10\n")
        sink = self.sink()
        s = self.streamer(sink.url, spool_dir=spool, bucket_key="orphan")
        self.assertTrue(bounded_poll(lambda: not os.path.exists(path), 10))
        self.assertTrue(s.close(5))
        self.assertEqual(os.listdir(os.path.dirname(path)), ["bucket.json"])

    def test_writer_rewrites_an_empty_bucket_json(self):
        """Spool: a new segment in a folder whose bucket.json is empty rewrites it first."""
        spool, path = self.old_spool("torn-meta", [])
        os.unlink(path)
        s = self.streamer("http://127.0.0.1:9", spool_dir=spool, bucket_key="torn-meta",
                          durable=True)
        s.log("n", 1)
        self.assertFalse(closed_and_stopped(s, 0.5))
        folder = os.path.dirname(path)
        self.assertEqual(lite._Spool.read_bucket(folder), ("torn-meta", ""))

    def claimed(self, path):
        """A durable reader of the spool holding segment ``path``: (reader, segment)."""
        key_folder = os.path.dirname(os.path.dirname(path))
        reader = lite._SpoolReader(lite._Spool(os.path.dirname(key_folder),
                                               os.path.basename(key_folder), durable=True))
        self.addCleanup(reader.release_all)
        self.assertTrue(reader.claim(0.0))
        return reader, reader.held[0]

    def test_ack_record_never_glues_to_a_torn_one(self):
        """Spool: a record appended after a torn one stands on its own line."""
        spool, path = self.old_spool("torn-ack", [1, 2, 3],
                                     meta=b'{"bucketKey": "torn-ack", "bucketName": ""}')
        with open(path, "rb") as handle:
            lines = handle.readlines()
        starts = [sum(len(l) for l in lines[:i]) for i in range(4)]
        with open(path + ".ack", "wb") as handle:     # "0 <end>\n" cut short by a crash
            handle.write(("0 %d" % starts[1])[:-1].encode())
        reader, segment = self.claimed(path)
        self.assertEqual([r.start for r in segment.lines], starts[:3], "a torn record retires nothing")
        second = segment.lines[1]
        segment.lines.remove(second)
        segment.out += 1
        reader.ack([second])
        self.assertEqual(lite._retired_offsets(path).get(starts[1]), starts[2])
        with open(path, "rb") as handle:
            data = handle.read()
        self.assertEqual([start for start, _, _, _ in lite._unretired_lines(path, data)],
                         [starts[0], starts[2]])

    def test_ack_after_a_failed_write_stands_on_its_own_line(self):
        """Spool: the .ack kept open is reopened after a write that failed half done, and
        the next record does not glue to the torn one."""
        spool, path = self.old_spool("torn-write", [1, 2, 3, 4],
                                     meta=b'{"bucketKey": "torn-write", "bucketName": ""}')
        reader, segment = self.claimed(path)
        first, second, third = [segment.lines.popleft() for _ in range(3)]
        segment.out += 3                    # the fourth line keeps the segment
        reader.ack([first])
        self.assertGreaterEqual(segment.ack_fd, 0, "the .ack is kept open")
        real_write = lite._write_all

        def half_then_fail(fd, data):
            real_write(fd, data[:3])
            raise OSError(errno.EIO, "I/O error")
        with mock.patch.object(lite, "_write_all", half_then_fail):
            reader.ack([second])            # a warning: that line may be sent again
        self.assertEqual(segment.ack_fd, -1)
        reader.ack([third])
        retired = lite._retired_offsets(path)
        self.assertEqual((retired.get(first.start), retired.get(third.start)),
                         (first.end, third.end))
        self.assertNotIn(second.start, retired)

    def test_only_whole_matching_records_retire_a_line(self):
        """Spool: records that are torn, glued or name no line's end retire nothing."""
        folder = self.tempdir()
        path = os.path.join(folder, "segment.jsonl")
        data = b'[1]\n[2]\n[3]\n'
        for record, retired in ((b"0 4\n", [0]), (b"0 4", []), (b"0 44 8\n", []),
                                (b"0 3\n", []), (b"4 8\n8 12\n", [4, 8]), (b"x y\n", []),
                                (b"8 4\n", []), (b"\n4 8\n", [4])):
            with self.subTest(record=record):
                with open(path + ".ack", "wb") as handle:
                    handle.write(record)
                self.assertEqual([s for s, _, _, _ in lite._unretired_lines(path, data)],
                                 [s for s in (0, 4, 8) if s not in retired])


class _Node(object):
    """A file or folder of the recorded file system: what the disk holds of it, and
    what the page cache does (lost in a power cut unless fsynced)."""

    def __init__(self, is_dir, data=b""):
        self.is_dir = is_dir
        self.data = bytearray(data)         # file: the page cache's bytes
        self.synced = bytes(data)           # file: the bytes its last fsync made durable
        self.entries = {}                   # folder: name -> _Node, as the cache has them
        self.synced_entries = {}            # folder: as its last fsync left them
        self.pending = []                   # folder: entry changes since, in order


class CrashRecorder(object):
    """Stands in for the module's ``os``: records every write, fsync, rename,
    unlink and mkdir under ``root`` into a model of what a power cut keeps.

    The model is the one of SQLite's crash VFS and of the ALICE study: a
    file's bytes are durable only through its own fsync, a folder entry only
    through its folder's fsync, and the last unsynced append may be torn.
    Before each fsync (and at the end) it notes the crash states the disk
    could be in at that moment.
    """

    def __init__(self, root, max_subsets=4):
        self._os = os
        self.root = os.path.realpath(root)
        self.max_subsets = max_subsets
        self.top = _Node(True)
        for name in os.listdir(root):       # the run starts from an empty spool_dir
            raise AssertionError("root is not empty: %s" % name)
        self.fds = {}                       # fd -> [node, position, append]
        self.lock = threading.RLock()
        self.ops = 0
        self.last_written = None
        self.durable_at = {}                # value -> op count once its line and name were fsynced
        self.states = collections.OrderedDict()     # digest -> (op number, kind, tree)

    def __getattr__(self, name):
        return getattr(self._os, name)

    # the model

    def _split(self, path):
        path = self._os.path.realpath(self._os.path.join(self._os.getcwd(), path)) \
            if not self._os.path.isabs(path) else self._os.path.normpath(path)
        if path != self.root and not path.startswith(self.root + os.sep):
            return None
        return [p for p in path[len(self.root):].split(os.sep) if p]

    def _lookup(self, parts):
        node = self.top
        for part in parts:
            node = node.entries.get(part) if node is not None and node.is_dir else None
        return node

    def _change(self, folder, change):
        folder.pending.append(change)
        change[0](folder.entries)

    # os functions the spool uses

    def open(self, path, flags, mode=0o777, **kwargs):
        with self.lock:
            parts = self._split(path)
            existed = parts is not None and self._lookup(parts) is not None
            fd = self._os.open(path, flags, mode, **kwargs)
            if parts is None:
                return fd
            self.ops += 1
            node = self._lookup(parts)
            if node is None and flags & os.O_CREAT and not existed:
                node = _Node(False)
                folder, name = self._lookup(parts[:-1]), parts[-1]
                self._change(folder, (lambda e, n=name, v=node: e.__setitem__(n, v),
                                      "add", name))
            if node is not None:
                if not node.is_dir and flags & os.O_TRUNC:
                    del node.data[:]
                self.fds[fd] = [node, 0, bool(flags & os.O_APPEND)]
            return fd

    def mkdir(self, path, mode=0o777, **kwargs):
        with self.lock:
            self._os.mkdir(path, mode, **kwargs)
            parts = self._split(path)
            if parts is not None:
                self.ops += 1
                self._change(self._lookup(parts[:-1]),
                             (lambda e, n=parts[-1], v=_Node(True): e.__setitem__(n, v),
                              "mkdir", parts[-1]))

    def write(self, fd, data):
        with self.lock:
            written = self._os.write(fd, data)
            entry = self.fds.get(fd)
            if entry is not None:
                self.ops += 1
                node = entry[0]
                start = len(node.data) if entry[2] else entry[1]
                node.data[start:start + written] = bytes(data[:written])
                entry[1] = start + written
                self.last_written = node
            return written

    def ftruncate(self, fd, length):
        with self.lock:
            self._os.ftruncate(fd, length)
            entry = self.fds.get(fd)
            if entry is not None:
                self.ops += 1
                del entry[0].data[length:]

    def fsync(self, fd):
        with self.lock:
            entry = self.fds.get(fd)
            if entry is not None:
                self.note_states("before fsync")
                self.ops += 1
                node = entry[0]
                if node.is_dir:
                    node.synced_entries = dict(node.entries)
                    node.pending = []
                else:
                    node.synced = bytes(node.data)
                self._note_durable()
                self.note_states("after fsync")     # what was just made durable is due
            return self._os.fsync(fd)

    def replace(self, src, dst):
        with self.lock:
            self._os.replace(src, dst)
            self._renamed(src, dst)

    def rename(self, src, dst):
        with self.lock:
            self._os.rename(src, dst)
            self._renamed(src, dst)

    def _renamed(self, src, dst):
        old, new = self._split(src), self._split(dst)
        if old is None:
            return
        self.ops += 1
        assert old[:-1] == new[:-1], "renames stay in their folder"

        def move(entries, a=old[-1], b=new[-1]):
            entries[b] = entries.pop(a)
        self._change(self._lookup(old[:-1]), (move, "rename", new[-1]))

    def unlink(self, path):
        with self.lock:
            self._os.unlink(path)
            parts = self._split(path)
            if parts is not None:
                self.ops += 1
                self._change(self._lookup(parts[:-1]),
                             (lambda e, n=parts[-1]: e.pop(n, None), "unlink", parts[-1]))

    def close(self, fd):
        with self.lock:
            self.fds.pop(fd, None)
            return self._os.close(fd)

    # crash states

    def _tree(self, entries_of, data_of, node=None, prefix=""):
        """{relative path: bytes or None (folder)} of the disk as chosen."""
        node = self.top if node is None else node
        tree = {}
        for name, child in sorted(entries_of(node).items()):
            path = prefix + name
            if child.is_dir:
                tree[path] = None
                tree.update(self._tree(entries_of, data_of, child, path + "/"))
            else:
                tree[path] = data_of(child)
        return tree

    def _folders(self, node=None):
        node = self.top if node is None else node
        yield node
        for child in list(node.entries.values()) + list(node.synced_entries.values()):
            if child.is_dir:
                for folder in self._folders(child):
                    yield folder

    def _keep(self, kind, tree):
        # The same files count again once more events are due: the earliest such
        # moment asks the most of recovery (the fewest delivered before the cut).
        digest = hashlib.sha256(repr((sorted(tree.items()), len(self.durable_at)))
                                .encode()).hexdigest()
        if digest not in self.states:
            self.states[digest] = (self.ops, kind, tree)

    def note_states(self, why):
        """The states a power cut now could leave (deduplicated)."""
        synced = lambda n: n.synced_entries
        cached = lambda n: n.entries
        durable = lambda n: n.synced
        self._keep(why + ": all fsynced", self._tree(synced, durable))
        self._keep(why + ": names on disk, unsynced bytes not",
                   self._tree(cached, durable))
        torn = self.last_written
        if torn is not None and torn.data[:len(torn.synced)] == torn.synced \
                and len(torn.data) > len(torn.synced) + 1:
            cut = len(torn.synced) + (len(torn.data) - len(torn.synced)) // 2
            self._keep(why + ": last write torn", self._tree(
                synced, lambda n: bytes(n.data[:cut]) if n is torn else n.synced))
        subsets = 0
        for folder in self._folders():
            for change in folder.pending:
                if subsets >= self.max_subsets:
                    return
                subsets += 1

                entries = dict(folder.synced_entries)
                try:
                    change[0](entries)
                except KeyError:
                    continue            # it needs an earlier change (a rename of a new file)

                def one(n, f=folder, alone=entries):
                    return alone if n is f else n.synced_entries
                self._keep("%s: only the %s of %s reached the disk" % (why, change[1],
                                                                      change[2]),
                           self._tree(one, durable))

    def _note_durable(self):
        """Values in fsynced bytes of segments whose own name is fsynced."""
        for folder in self._folders():
            for name, child in folder.synced_entries.items():
                if name.endswith(lite._SPOOL_SUFFIX) and not child.is_dir:
                    for line in child.synced.split(b"\n")[:-1]:
                        for event in json.loads(line.decode("utf-8")):
                            self.durable_at.setdefault(event["value"], self.ops)

    def durable_upto(self, ops):
        return [v for v, at in self.durable_at.items() if at <= ops]


class _StoredEvents(list):
    """A sink's ``events`` that notes the recorder's op count as each request's events are stored."""

    def __init__(self, sink):
        list.__init__(self)
        self.sink = sink

    def extend(self, items):
        items = list(items)
        list.extend(self, items)
        sink = self.sink
        ops = sink.recorder.ops if sink.recorder is not None else 0
        sink.stored_at.extend((ops, e["value"]) for _, e in items)
        sink.sizes.append(len(items))


class OrderSink(FaultSink):
    """A FaultSink that notes, for each value it stores, the recorder's op count then.

    Noted as the events are stored, before the answer leaves: once it has, the
    client may acknowledge and delete them, and a count read after that would
    say they were stored later than they were (crash states in between then
    looked as though they had lost them).
    """

    def __init__(self, recorder=None, **kwargs):
        FaultSink.__init__(self, **kwargs)
        self.recorder = recorder
        self.stored_at = []                 # (op count, value)
        self.sizes = []                     # events per request stored
        self.events = _StoredEvents(self)


def replay_options(api_base="http://127.0.0.1:9", spool_dir=None):
    """Keyword arguments of lite._resolve_settings, as the command line's replay makes them."""
    import inspect
    options = {name: p.default for name, p in
               inspect.signature(lite.Streamer.__init__).parameters.items() if name != "self"}
    options.update(bucket_key="replay", access_key=KEY, ini_file_location=False,
                   api_base=api_base, spool_dir=spool_dir)
    return options


def replay_settings(api_base, spool_dir):
    """Settings for lite._replay_spool, as the command line's replay makes them."""
    return lite._resolve_settings(**replay_options(api_base, spool_dir))


def write_tree(folder, tree):
    for path, data in sorted(tree.items()):
        full = os.path.join(folder, path)
        if data is None:
            os.mkdir(full, 0o700)
        else:
            with open(full, "wb") as handle:
                handle.write(data)
            os.chmod(full, 0o600)


class CrashStateTest(DeliveryTestCase):
    """Durable mode: every state a power cut can leave is recovered, nothing fsynced is lost."""

    EVENTS = 600 if FULL_MATRIX else 120

    def record_run(self, events):
        """A durable run under server faults, every spool operation recorded."""
        spool = os.path.join(self.tempdir(), "spool")
        os.mkdir(spool, 0o700)
        recorder = CrashRecorder(spool, max_subsets=6 if FULL_MATRIX else 3)
        sink = self.sink(OrderSink, recorder=recorder)
        # Down (reset) and 503s for stretches long enough that fsynced events wait
        # unsent, and up; segments small enough to finish mid-run.
        faults = itertools.cycle(["reset"] * 4 + [None] * 2 + [503] * 4 + [None] * 3)
        sink.rule = lambda handler, path: next(faults) if path == "/api/events" else None
        with mock.patch.object(lite, "os", recorder), \
                mock.patch.object(lite, "_SEGMENT_BYTES", 700):
            s = self.streamer(sink.url, spool_dir=spool, durable=True, sync_interval=0.02,
                              max_retries=2, bucket_key="crash-a")
            for i in range(events):
                if i == events // 2:
                    s.set_bucket("", "crash-b")
                s.log("n", i)
                if i % 10 == 9:
                    s.flush(0.05)           # let the worker journal, send and retire
            self.assertTrue(s.close(30), "the recorded run did not deliver everything")
        with recorder.lock:
            recorder.note_states("at the end")
        return recorder, sink

    def recover(self, sink, folder):
        """A fresh Streamer sends what ``folder`` holds; True once the spool is empty.

        (close() itself may answer False: a torn last line is dead-lettered.)
        """
        s = self.streamer(sink.url, spool_dir=folder, durable=True, bucket_key="crash-a")
        tick = threading.Event()
        deadline = time.monotonic() + 3         # a failure guard: it takes ~10 ms
        while spool_segments(folder) and time.monotonic() < deadline:
            tick.wait(0.01)
        s.close(3)
        return not spool_segments(folder)

    def test_every_crash_state_recovers_what_was_fsynced(self):
        """Durable spool: each crash state keeps every fsynced event; recovery sends it once."""
        recorder, first = self.record_run(self.EVENTS)
        self.assertGreater(len(recorder.states), 20)
        most = max(first.sizes)
        recovery = self.sink(OrderSink)
        failures = []
        for number, (ops, kind, tree) in enumerate(recorder.states.values()):
            folder = os.path.join(self.tempdir(), "state")
            os.mkdir(folder, 0o700)
            write_tree(folder, tree)
            before = collections.Counter(v for at, v in first.stored_at if at <= ops)
            with recovery.changed:
                del recovery.events[:]
            done = self.recover(recovery, folder)
            again = lite._replay_spool(replay_settings(recovery.url, folder), None, 5.0)
            after = collections.Counter(e["value"] for _, e in recovery.events)
            lost = sorted(v for v in recorder.durable_upto(ops) if not before[v] and not after[v])
            twice = sum(n for v, n in (after & before).items()) + \
                sum(n - 1 for n in after.values() if n > 1)
            problems = []
            if not done:
                problems.append("recovery left segments on disk")
            if lost:
                problems.append("lost %d fsynced events (first %s)" % (len(lost), lost[:5]))
            if twice > most:
                problems.append("%d events sent twice, more than one request (%d)"
                                % (twice, most))
            if again[0]["replayed"] or again[1]:
                problems.append("a second recovery sent %d events again, %d lines pending"
                                % (again[0]["replayed"], again[1]))
            if problems:
                failures.append("state %d (op %d, %s): %s" % (number, ops, kind,
                                                             "; ".join(problems)))
                if len(failures) >= 8:
                    break               # enough to see why; each failure waits its guard
        self.assertEqual(failures, [], "%d of %d crash states failed:\n%s" % (
            len(failures), len(recorder.states), "\n".join(failures[:15])))


DURABLE_CHILD = r'''
import sys, time
import isstreamer_lite as lite
api_base, spool_dir = sys.argv[1:3]
s = lite.Streamer("", "durable-bucket", "ist_issue9_access_key_0123456789",
                  ini_file_location=False, api_base=api_base, spool_dir=spool_dir,
                  durable=True, sync_interval=0.2, flush_interval=0.1, timeout=30.0,
                  backoff_base=20.0)        # retries far apart, as in a long outage
for i in range(1000000):
    s.log("v", i)
    sys.stdout.write("%d\n" % i)
    sys.stdout.flush()
    if i % 10 == 9:
        time.sleep(0.01)                # a reading of 10 sensors every 10 ms
'''


class DurableJournalTest(Issue9Case):
    """Durable mode journals on schedule whatever the network is doing."""

    def kill_while_logging(self, rule, seconds=1.2, sync_interval=0.2, slack=0.3):
        sink = self.sink(rule=rule)
        spool = os.path.join(self.tempdir(), "spool")
        proc = self.child(DURABLE_CHILD, sink.url, spool)
        seen = []
        for line in proc.stdout:
            seen.append((int(line), time.monotonic()))
            if seen[-1][1] - seen[0][1] >= seconds:
                break
        killed_at = time.monotonic()
        proc.kill()
        proc.communicate(timeout=30)
        safe = [v for v, t in seen if killed_at - t > sync_interval + slack]
        self.assertTrue(safe, "the child logged nothing early enough")
        on_disk = disk_values(spool)
        missing = [v for v in safe if not on_disk[v]]
        self.assertEqual(len(missing), 0, "%d of %d events logged over %.1f s before "
                         "SIGKILL are not in the journal (first missing: %s)"
                         % (len(missing), len(safe), sync_interval + slack, missing[:3]))

    def test_journal_kept_while_request_hangs_or_server_refuses(self):
        """Durable: SIGKILL during a hung request (full matrix: 503s, a 429) loses nothing journalled."""
        if not hasattr(signal, "SIGKILL"):
            self.skipTest("needs POSIX signals")
        servers = (("never answers", hang_forever),
                   ("503 always", lambda handler, path: 503),
                   ("429 Retry-After 60", lambda handler, path: (429, {"Retry-After": "60"})))
        concurrently(self, [(dict(server=name), lambda rule=rule: self.kill_while_logging(rule))
                            for name, rule in full_or(servers, servers[:1])])


class UnwritableSpoolTest(DeliveryTestCase):
    """A spool that cannot be written: counted drops, a warning, the Streamer lives on."""

    def unwritable_dir(self):
        folder = self.tempdir()
        path = os.path.join(folder, "spool")
        os.mkdir(path, 0o700)
        os.chmod(path, 0o500)
        self.addCleanup(os.chmod, path, 0o700)
        try:
            probe = os.path.join(path, "probe")
            with open(probe, "w"):
                pass
        except OSError:
            return path                     # the permission bits hold (not root)
        os.unlink(probe)
        os.chmod(path, 0o700)
        path = os.path.join(folder, "not-a-dir")    # root: make mkdir fail instead
        with open(path, "w") as handle:
            handle.write("a file where the spool folder should be\n")
        return path

    def test_close_is_false_when_events_were_dropped(self):
        """Spool: close() answers False when events had to be dropped, not True."""
        outage = Outage(self, up=False)
        s = self.streamer(outage.url, spool_dir=self.unwritable_dir(), max_retries=1)
        with self.assertLogs("isstreamer_lite", "WARNING"):
            log_all(s, events("x", 5))
            self.assertFalse(closed_and_stopped(s, 0.5))
        self.assertEqual(s.stats()["dropped"], {"spool_unwritable": 5})

    def test_folders_made_are_0700_whatever_the_umask(self):
        """Spool: every folder it makes, missing parents included, is 0700 under umask 000."""
        outage = Outage(self, up=False)
        spool = os.path.join(self.tempdir(), "state", "isstreamer_lite")
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)
        s = self.streamer(outage.url, spool_dir=spool, max_retries=1)
        log_all(s, events("x", 3))
        self.assertFalse(closed_and_stopped(s, 0.5))
        os.umask(previous)
        for folder in [os.path.dirname(spool), spool] + glob.glob(os.path.join(spool, "*")) + \
                glob.glob(os.path.join(spool, "*", "*")):
            if os.path.isdir(folder):
                self.assertEqual(stat.S_IMODE(os.stat(folder).st_mode), 0o700, folder)

    def test_unwritable_spool_keeps_events_in_memory_up_to_max_queue(self):
        """Spool: unwritable, events stay in memory up to max_queue; the oldest excess drops."""
        outage = Outage(self, up=False)
        s = self.streamer(outage.url, spool_dir=self.unwritable_dir(), max_retries=1,
                          max_queue=30)
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            log_all(s, events("x", 50))
            self.assertTrue(self.wait_stats(
                s, lambda st: sum(st["dropped"].values()) >= 20), s.stats())
        self.assertEqual(s.stats()["dropped"], {"spool_unwritable": 20})
        self.assertTrue(any("dropped" in line and "spool_unwritable" in line
                            for line in logs.output), logs.output)
        outage.up()
        # The 30 kept in memory are delivered; 20 logged before the call were dropped.
        self.assertFalse(s.flush(10), s.stats())
        self.assertExactlyOnce(self.received(outage), events("x", 50)[20:])
        after = events("y", 15)
        log_all(s, after)
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertExactlyOnce(self.received(outage), events("x", 50)[20:] + after)
        self.assertTrue(s.close(5))


class SpoolEvictionTest(LiteTestCase):
    """Evicting a segment counts only the events it still held, oldest first."""

    def spool(self):
        spool = lite._Spool(self.tempdir(), "key")
        reader = lite._SpoolReader(spool)
        return reader, lite._SpoolWriter(spool, reader, None)

    def parts(self, count):
        return [lite._encode_event(("k", i, 1.0)) for i in range(count)]

    def test_evicted_segment_counts_only_undelivered_events(self):
        """Spool: eviction drops (and counts) the unretired lines, not delivered ones."""
        reader, writer = self.spool()
        first = writer.append(("bucket", ""), self.parts(3))
        writer.append(("bucket", ""), self.parts(3))
        path = first.segment.path
        batch = reader.take(first.end - first.start)      # room for one line only
        self.assertEqual([r.start for r in batch.refs], [first.start])
        reader.ack(batch.refs)                  # the first line was delivered
        self.assertEqual(reader.evict_oldest(), 3)
        self.assertFalse(os.path.exists(path))
        self.assertFalse(os.path.exists(path + ".ack"))

    def test_oldest_goes_first_even_when_held_by_this_streamer(self):
        """Spool: the oldest segment is evicted although this Streamer holds it."""
        reader, writer = self.spool()
        old = writer.append(("bucket", ""), self.parts(5)).segment
        writer.close()
        new = writer.append(("bucket", ""), self.parts(2)).segment
        self.assertIsNot(old, new)
        self.assertEqual(reader.evict_oldest(), 5)
        self.assertFalse(os.path.exists(old.path))
        self.assertTrue(os.path.exists(new.path))



class SpoolViewTest(LiteTestCase):
    """One _Spool for the runner and the command line: they see the same folder."""

    def test_command_line_counts_what_the_runner_wrote_and_spares_what_it_holds(self):
        """Spool: summary() counts the writer's lines; _discard() keeps a segment still held."""
        spool = lite._Spool(self.tempdir(), "key")
        reader = lite._SpoolReader(spool)
        writer = lite._SpoolWriter(spool, reader, None)
        self.addCleanup(reader.release_all)
        parts = [lite._encode_event(("k", i, 1.0)) for i in range(3)]
        writer.append(("b1", "Bucket"), parts[:2])
        writer.append(("b1", "Bucket"), parts[2:])
        self.assertEqual([(r["bucket_key"], r["bucket_name"], r["segments"], r["lines"],
                           r["events"]) for r in spool.summary()], [("b1", "Bucket", 1, 2, 3)])
        self.assertEqual(lite._discard(spool.segments()), 1)    # the writer holds it
        self.assertEqual(len(spool.segments()), 1)
        writer.close()
        reader.release_all()                # undelivered: left on disk, unlocked
        self.assertEqual(lite._discard(spool.segments()), 0)
        self.assertEqual((spool.segments(), spool.summary()), ([], []))

    def test_dead_letters_append_and_count_with_the_newest(self):
        """Spool: _DeadLetters appends one record a line and reads back (count, newest)."""
        dead = lite._Spool(self.tempdir(), "key").dead_letters
        self.assertEqual(dead.read(), (0, None))
        dead.add("b1", b'[{"key": "k", "value": 1}]', 400, "no")
        dead.add("b2", b"\xff", None, "unreadable spool line")
        count, newest = dead.read()
        self.assertEqual(count, 2)
        self.assertEqual((newest["bucketKey"], newest["status"], newest["reply"],
                          newest["body"]), ("b2", None, "unreadable spool line", "\ufffd"))


class ClaimsTest(LiteTestCase):
    """_Claims finds the segments no process holds, claims one by its lock, evicts one."""

    def left_behind(self, lines):
        """A spool with one segment of ``lines`` (lists of values, or raw bytes) that
        no process holds; (spool, its path)."""
        spool = lite._Spool(self.tempdir(), "key")
        reader = lite._SpoolReader(spool)
        writer = lite._SpoolWriter(spool, reader, None)
        for line in lines:
            if isinstance(line, bytes):
                lite._write_all(writer._segment_for(("b1", "")).fd, line)
            else:
                writer.append(("b1", ""), [lite._encode_event(("k", v, 1.0)) for v in line])
        writer.close()
        reader.release_all()
        return spool, spool.segments()[0]

    def test_looks_once_a_second_and_claims_by_lock(self):
        """Claims: scan() paces the looking; claim() reads lines; a held one is not claimed."""
        spool, path = self.left_behind([[1, 2], [3]])
        claims = lite._Claims(spool)
        self.assertEqual(claims.on_disk(), [path])
        self.assertTrue(claims.claimable(0.0, set()))
        self.assertFalse(lite._Claims(spool).claimable(0.0, {path}))
        self.assertEqual([claims.scan(t) for t in (0.0, 0.5, 1.0)], [True, False, True])
        segment, bad = claims.claim(path)
        self.addCleanup(segment.close)
        self.assertEqual(([r.count for r in segment.lines], bad), ([2, 1], []))
        other = lite._Claims(spool)
        self.assertIsNone(other.claim(path))            # this process's lock stands
        self.assertIsNone(other.evict(path))
        segment.close()
        self.assertEqual(other.evict(path), 3)
        self.assertEqual(spool.segments(), [])

    def test_unreadable_lines_are_set_aside_for_the_dead_letter_file(self):
        """Claims: a line that does not decode comes back as a bad ref and in unreadable."""
        spool, path = self.left_behind([[1], b"not json\n", [2]])
        claims = lite._Claims(spool)
        segment, bad = claims.claim(path)
        self.addCleanup(segment.close)
        self.assertEqual(([r.count for r in segment.lines], len(bad)), ([1, 1], 1))
        self.assertEqual([(b, body) for b, body, _ in claims.unreadable],
                         [(("b1", ""), b"not json")])

    def test_segment_packs_lines_up_to_the_byte_and_event_limits(self):
        """Segment: pack() hands out whole lines within the limits, a long one alone."""
        segment = lite._Segment("p", -1, ("b", ""))
        for start, count in ((0, 2), (10, 2), (20, 2)):
            segment.lines.append(lite._Ref(segment, start, start + 10, count))
        self.assertEqual([r.start for r in segment.pack(5, 100)], [0])
        self.assertEqual([r.start for r in segment.pack(100, 3)], [10])
        self.assertEqual((segment.out, segment.finished()), (2, False))
        self.assertEqual([r.start for r in segment.pack(100, 100)], [20])

class EvictionOrderTest(Issue9Case):
    """A full spool gives up its oldest events first, and counts them."""

    def spool_size(self, spool):
        return sum(os.path.getsize(p) for p in spool_segments(spool))

    def test_oldest_events_evicted_first(self):
        """Eviction: a full spool drops the oldest events, and the count matches."""
        dead, spool = dead_url(), self.tempdir()
        old = ["old%03d" % i for i in range(200)]
        first = self.streamer(dead, spool_dir=spool, max_retries=1)
        for key in old:
            first.log(key, 1)
        self.assertFalse(closed_and_stopped(first, 1.0))
        self.assertEqual(sorted(disk_keys(spool)), old)
        budget = int(self.spool_size(spool) * 1.5)
        new = ["new%03d" % i for i in range(200)]
        second = self.streamer(dead, spool_dir=spool, max_retries=1, spool_max_bytes=budget)
        for key in new:
            second.log(key, 1)
        self.assertFalse(closed_and_stopped(second, 1.0))
        keys = disk_keys(spool)
        self.assertEqual([k for k in new if not keys[k]], [], "newest events not in the spool")
        kept_old = [k for k in old if keys[k]]
        self.assertEqual(kept_old, old[len(old) - len(kept_old):],
                         "kept old events are not the newest of them")
        vanished = len(old) - len(kept_old)
        self.assertGreater(vanished, 0, "nothing had to be evicted (budget %d)" % budget)
        self.assertEqual(sum(second.stats()["dropped"].values()), vanished)


class RemovedSpoolTest(Issue9Case):
    """The spool folder vanishing under a running Streamer."""

    def test_spool_recreated_after_rmtree(self):
        """Spool: after rmtree of spool_dir, later events are spooled in a new folder."""
        spool = os.path.join(self.tempdir(), "spool")
        s = self.streamer(dead_url(), spool_dir=spool, max_retries=1)
        for i in range(20):
            s.log("early", i)
        self.assertTrue(self.wait_stats(s, lambda st: st["spooled"] >= 20), s.stats())

        def removed():                  # the worker may be writing a file in it meanwhile
            shutil.rmtree(spool, ignore_errors=True)
            return not os.path.exists(spool)
        self.assertTrue(bounded_poll(removed, 5))
        for i in range(30):
            s.log("late", i)
        closed = closed_and_stopped(s, 1.0)
        on_disk = disk_values(spool, "late")
        self.assertEqual([i for i in range(30) if not on_disk[i]], [],
                         "late events are not in the spool")
        self.assertLessEqual(sum(s.stats()["dropped"].values()), 20)
        self.assertFalse(closed, "close() answered True with the server down")


class SpoolSafetyTest(Issue9Case):
    """The spool never follows planted symlinks and is private to its owner."""

    def test_symlinks_umask_and_open_folders(self):
        """Spool: no planted symlink followed; 0700 under umask 0; a 0777 spool_dir refused."""
        with self.subTest("planted symlink at bucket.json.<pid>.tmp"):
            spool = os.path.join(self.tempdir(), "spool")
            bucket_dir = os.path.join(spool, fingerprint(KEY), fingerprint("delivery-bucket"))
            os.makedirs(bucket_dir, 0o700)
            victim = os.path.join(self.tempdir(), "victim.txt")
            with open(victim, "w") as handle:
                handle.write("precious\n")
            os.symlink(victim, os.path.join(bucket_dir, "bucket.json.%d.tmp" % os.getpid()))
            s = self.streamer(dead_url(), spool_dir=spool, max_retries=1)
            log_all(s, events("s", 5))
            closed_and_stopped(s, 0.5)
            with open(victim) as handle:
                self.assertEqual(handle.read(), "precious\n", "the symlink was followed")
        with self.subTest("umask 0"):
            root = self.tempdir()
            spool = os.path.join(root, "made", "by", "lib", "spool")
            old = os.umask(0)
            self.addCleanup(os.umask, old)
            try:
                s = self.streamer(dead_url(), spool_dir=spool, max_retries=1)
                log_all(s, events("u", 5))
                closed_and_stopped(s, 0.5)
            finally:
                os.umask(old)
            folders = [os.path.join(root, "made"), os.path.join(root, "made", "by"),
                       os.path.join(root, "made", "by", "lib")]
            folders += [d for d, _, _ in os.walk(spool)]
            modes = {d: oct(stat.S_IMODE(os.stat(d).st_mode)) for d in folders}
            self.assertEqual({d: m for d, m in modes.items() if m != oct(0o700)}, {})
        with self.subTest("spool_dir open to group and others"):
            spool = os.path.join(self.tempdir(), "open")
            os.mkdir(spool)
            os.chmod(spool, 0o777)
            try:
                s = lite.Streamer("", "delivery-bucket", KEY, ini_file_location=False,
                                  api_base=dead_url(), spool_dir=spool)
            except lite.ConfigError as exc:
                self.assertIn(spool, str(exc))
            else:
                s.close(0.5)
                self.fail("a 0777 spool_dir was accepted")


WRITER_CHILD = r'''
import sys, time
import isstreamer_lite as lite
api_base, spool_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = lite.Streamer("", "shared-bucket", "ist_issue9_access_key_0123456789",
                  ini_file_location=False, api_base=api_base, spool_dir=spool_dir,
                  flush_interval=0.02, max_retries=1, backoff_base=0.001, backoff_cap=0.005)
for i in range(count):
    s.log("w", i)
    sum(range(3000))                    # a busy application holds the GIL...
    if i % 100 == 99:
        time.sleep(0.03)                # ...in bursts: idle gaps let the writer seal segments
sys.stdout.write("closed %s\n" % s.close(1))      # the server is down: spool the rest
'''


class ConcurrentReplayTest(Issue9Case):
    """A spooling writer and a replayer of the same key, in two processes."""

    def replay(self, sink, spool, ini):
        return subprocess.run(
            PYTHON + ["-m", "isstreamer_lite", "replay", "--spool-dir", spool,
             "--api-base", sink.url, "--ini", ini, "--timeout", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            timeout=30, env=child_env(IS_ACCESS_KEY=ISSUE_KEY))

    def test_writer_and_replayer_lose_nothing(self):
        """Replay: writer spooling while a replayer sends: each value once, or still on disk."""
        sink, folder = self.sink(), self.tempdir()
        spool, ini = os.path.join(folder, "spool"), os.path.join(folder, "empty.ini")
        with open(ini, "w"):
            pass
        count = full_or(3000, 1000)
        writer = self.child(WRITER_CHILD, dead_url(), spool, count)
        runs = 0
        while writer.poll() is None and runs < 40:
            self.replay(sink, spool, ini)
            runs += 1
        during = len(self.received(sink))
        self.finish(writer)
        self.replay(sink, spool, ini)
        got = collections.Counter(v for _, v in self.received(sink))
        on_disk = disk_values(spool)
        lost = [v for v in range(count) if not got[v] and not on_disk[v]]
        twice = [v for v in range(count) if got[v] > 1 or (got[v] and on_disk[v])]
        self.assertEqual((len(lost), len(twice)), (0, 0),
                         "lost %s..., duplicated %s... (%d replay runs sent %d while the "
                         "writer ran)" % (lost[:5], twice[:5], runs, during))


HELD_CHILD = """\
import os, sys
import isstreamer_lite
s = isstreamer_lite.Streamer("Held", "cli-held", %(key)r, ini_file_location=False,
                             api_base=%(url)r, spool_dir=%(spool)r, max_retries=1000,
                             backoff_base=0.2, backoff_cap=0.5, exit_timeout=0.5)
for i in range(12):
    s.log("n", i)
state = os.path.join(%(spool)r, isstreamer_lite._fingerprint(%(key)r), "state.json")
for attempt in range(100):              # the first failure is written at once
    if s.flush(0.1) or os.path.exists(state):
        break
print("READY", s.stats()["queued"], s.stats()["spooled"], os.getpid())
sys.stdout.flush()
sys.stdin.readline()
"""


class StateMergeTest(IsolatedCase):
    """state.json merges what a process writes into what it says: it never forgets."""

    def test_merge_keeps_the_latest_success_and_running_pids(self):
        """State: a later failed run keeps the last success; ended pids leave the list."""
        me, dead = os.getpid(), 2 ** 22 + 12345        # beyond pid_max: never alive
        old = {"last_success": 100.0, "last_error": "old", "pids": [dead, me], "x": 1}
        for new, running, success, error, pids in (
                ({"last_success": None, "last_error": None}, True, 100.0, "old", [me]),
                ({"last_success": 50.0, "last_error": "new"}, True, 100.0, "new", [me]),
                ({"last_success": 200.0, "last_error": None}, False, 200.0, "old", [])):
            with self.subTest(new=new, running=running):
                merged = lite._merge_state(old, new, me, running)
                self.assertEqual((merged["last_success"], merged["last_error"],
                                  merged["pids"], merged["x"]), (success, error, pids, 1))


# --- Delivery core and worker ------------------------------------------------
# The core from tables of plain values; the runner on a fake clock.

class FakeClock(object):
    """Monotonic time that moves only when the test says so."""

    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now


class FakeTransport(object):
    """Answers from a script: a status, (status, headers), or an exception to raise."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.posts = []
        self.connections = 0

    def post(self, path, body, headers, deadline):
        self.posts.append((path, json.loads(body.decode("utf-8"))))
        answer = self.answers.pop(0) if self.answers else 204
        if isinstance(answer, BaseException):
            raise answer
        status, answer_headers = answer if isinstance(answer, tuple) else (answer, {})
        return lite._Response(status, answer_headers, b"")

    def events(self):
        return [len(body) for path, body in self.posts if path == "/api/events"]

    def abort(self):
        pass

    def close(self):
        pass


class WindowTransport(FakeTransport):
    """A server of fixed windows on the fake clock: ``limit`` calls each, 429 beyond."""

    def __init__(self, clock, limit, window=10.0):
        FakeTransport.__init__(self)
        self.clock, self.limit, self.window = clock, limit, window
        self.used = collections.Counter()
        self.refused = 0

    def post(self, path, body, headers, deadline):
        self.posts.append((path, json.loads(body.decode("utf-8"))))
        window = int(self.clock() // self.window)
        self.used[window] += 1
        answer = {"x-ratelimit-limit": str(self.limit),
                  "x-ratelimit-remaining": str(max(0, self.limit - self.used[window])),
                  "x-ratelimit-reset": "%.3f" % ((window + 1) * self.window)}
        if self.used[window] > self.limit:
            self.refused += 1
            answer["retry-after"] = "%.3f" % ((window + 1) * self.window - self.clock())
            return lite._Response(429, answer, b"")
        return lite._Response(204, answer, b"")


class SilentCourier(object):
    """A courier whose request never answers (until the core gives up on it)."""

    job = None

    def start(self, job):
        self.job = job

    def poll(self):
        return None

    def abandon(self):
        self.job = None

    def stop(self):
        pass


class Waiter(object):
    """A flush() or close() waiter as the core sees it: what it waits for, and how."""

    def __init__(self, upto, close_at=None):
        self.upto, self.close_at = upto, close_at

    def __repr__(self):
        return "Waiter(%r, %r)" % (self.upto, self.close_at)


class CoreTest(IsolatedCase):
    """The delivery core's decisions from tables: time and inputs in, decisions out."""

    def test_memory_due(self):
        """Core: memory's events go at buffer_size, a bucket change, close, a flush or age."""
        # (now, oldest (seq, since), count, runs, closing, asked_upto) -> due
        # with buffer_size 10 and flush_interval 1.0
        table = [
            (5.0, None, 0, 0, True, 99, False),        # nothing to send
            (5.0, (0, 4.5), 9, 1, False, -1, False),     # young, not full: wait for more
            (5.0, (0, 4.5), 10, 1, False, -1, True),     # a full call (the per-call cap)
            (5.0, (0, 4.5), 2, 2, False, -1, True),      # two buckets: the first run goes
            (5.0, (0, 4.5), 2, 1, True, -1, True),       # closing
            (5.0, (3, 4.5), 2, 1, False, 3, True),       # a flush() waits for it
            (5.0, (3, 4.5), 2, 1, False, 2, False),      # a flush() of what went already
            (5.5, (0, 4.5), 1, 1, False, -1, True),      # flush_interval reached
        ]
        for now, oldest, count, runs, closing, upto, due in table:
            with self.subTest(now=now, oldest=oldest, count=count, runs=runs):
                self.assertIs(lite._memory_due(now, oldest, count, runs, closing, upto,
                                               10, 1.0), due)

    def test_call_deadline_grows_with_the_body(self):
        """Core: a call's deadline is timeout plus the body at 2 KiB/s, within the limits."""
        table = [
            (100.0, 0, 10.0, (), 110.0),
            (100.0, 20480, 10.0, (), 120.0),           # 20 KiB: 10 s more
            (100.0, 1048576, 10.0, (), 622.0),         # 1 MB: 512 s more
            (100.0, 20480, 10.0, (None, 105.0), 105.0),  # a close() or flush() deadline
            (100.0, 0, 10.0, (150.0, 103.0), 103.0),   # the earliest limit wins
            (100.0, 0, 10.0, (99.0,), 100.05),         # a passed limit: a moment to try
        ]
        for now, size, timeout, limits, end in table:
            with self.subTest(size=size, limits=limits):
                self.assertAlmostEqual(lite._call_deadline(now, size, timeout, limits), end)

    def test_after_failure(self):
        """Core: retries back off and count; a 429 waits as told; a pause sets the batch aside."""
        D = lite._Decision
        # (decision, failures, attempts, max_retries) -> _Retry
        table = [
            (D(lite._RETRY, 0.5, "503"), 0, 0, 5,
             (10.5, 1, "backing off after 503", 1, None)),
            (D(lite._RETRY, 4.0, "timeout"), 3, 4, 5,
             (14.0, 4, "backing off after timeout", 5, "5 attempts failed")),
            (D(lite._RETRY, 2.0, "connection"), 1, None, 5,          # a bucket creation
             (12.0, 2, "backing off after connection", None, None)),
            (D(lite._WAIT, 7.0, "429"), 2, 4, 5,                     # Retry-After: 7
             (17.0, 3, "rate limited (429)", 4, None)),
            (D(lite._PAUSE, 60.0, "key_rejected"), 1, 2, 5,
             (70.0, 1, "paused: key_rejected", 2, "delivery paused (key_rejected)")),
        ]
        for decision, failures, attempts, most, expected in table:
            with self.subTest(decision=decision, attempts=attempts):
                self.assertEqual(tuple(lite._after_failure(10.0, decision, failures, attempts,
                                                           most)), expected)

    def test_decisions_feed_the_retry_plan(self):
        """Core: status and headers in, through _decide and _after_failure, the next try out."""
        table = [       # (status, headers, error, failures) -> (action, waiting, retry_in)
            (429, {"retry-after": "3"}, None, 0, (lite._WAIT, "rate limited (429)", 3.0)),
            (401, {}, None, 0, (lite._PAUSE, "paused: key_rejected", 60.0)),
            (None, None, ConnectionRefusedError("refused"), 2,       # base * 2 ** failures
             (lite._RETRY, "backing off after network", 2.0)),
            (503, {}, None, 0, (lite._RETRY, "backing off after server_error", 0.5)),
        ]
        for status, headers, error, failures, (action, waiting, retry_in) in table:
            with self.subTest(status=status, error=error):
                decision = lite._decide(status, headers, error, failures, base=0.5, cap=30.0,
                                        retry_after_cap=120.0, pause=60.0,
                                        now=1700000000.0, rand=lambda: 1.0)
                plan = lite._after_failure(10.0, decision, failures, 0, 5)
                self.assertEqual((decision.action, plan.waiting), (action, waiting))
                self.assertAlmostEqual(plan.retry_at, 10.0 + retry_in)

    def test_answerable_waiters(self):
        """Core: flush() is answered once all it asked for is delivered and no backlog is left."""
        a, b, c = Waiter(4), Waiter(9), Waiter(9, close_at=50.0)
        table = [       # (oldest pending seq, backlog) -> (answered, still waiting)
            (None, False, [a, b], [c]),
            (5, False, [a], [b, c]),
            (4, False, [], [a, b, c]),
            (None, True, [], [a, b, c]),        # spool lines or a bucket still to create
            (10, False, [a, b], [c]),           # close() waiters wait for the halt
        ]
        for oldest, backlog, done, keep in table:
            with self.subTest(oldest=oldest, backlog=backlog):
                self.assertEqual(lite._answerable([a, b, c], oldest, backlog), (done, keep))

    def test_close_plan(self):
        """Core: several close() calls: the earliest end wins, a hard deadline beats idle."""
        table = [       # (close_at, idle, asked_at, asked_idle) -> (close_at, idle)
            (None, None, 30.0, 10.0, (30.0, 10.0)),
            (30.0, 10.0, 20.0, 10.0, (20.0, 10.0)),
            (30.0, 10.0, 40.0, None, (30.0, None)),
            (30.0, None, 25.0, 10.0, (25.0, None)),
        ]
        for close_at, idle, asked_at, asked_idle, expected in table:
            with self.subTest(close_at=close_at, asked_at=asked_at):
                self.assertEqual(lite._close_plan(close_at, idle, asked_at, asked_idle),
                                 expected)

    def test_next_wake(self):
        """Core: the runner wakes at the earliest thing due, at once if overdue, or never."""
        for dues, wake in (([], None), ([None, None], None), ([3.0, None, 0.5], 0.5),
                           ([-2.0, 4.0], 0.0)):
            with self.subTest(dues=dues):
                self.assertEqual(lite._next_wake(dues), wake)


_CORE_SETTINGS = []


def core_settings(**changes):
    """Settings for a _Core (built once, then only replaced: no file, no clock)."""
    if not _CORE_SETTINGS:
        folder = tempfile.mkdtemp(prefix="isl-core-")
        options = replay_options(spool_dir=folder)
        options.update(bucket_key="b", buffer_size=10, flush_interval=1.0, backoff_base=0.5,
                       backoff_cap=4.0, max_retries=3, pause_interval=60.0, max_queue=100)
        _CORE_SETTINGS.append(lite._resolve_settings(**options))
        shutil.rmtree(folder, True)
    return _CORE_SETTINGS[0]._replace(**changes)


def core_events(count, start=0, key="k"):
    return [(key, start + i, 1700000000.0 + i) for i in range(count)]


def disk_batch(values, seq=None):
    """A batch of one spool line as the shell's _Read offers it (a ref, no file)."""
    line = lite._encode_events([("k", v, 1700000000.0) for v in values]) + b"\n"
    ref = lite._Ref(None, 0, len(line), len(values), seq)
    return lite._Batch(("b", ""), None, None, [ref], lite._join_arrays([line]), lines=[line])


class PlainWait(object):
    """A flush() or close() as the core takes it from the inbox (no threading.Event)."""

    def __init__(self, lost=0, close_at=None, idle=None):
        self.lost, self.close_at, self.idle, self.upto = lost, close_at, idle, None


class Shell(object):
    """A runner for a _Core made of plain values: the inbox, a script of answers, spool
    batches to offer; it records every action the core asks for.

    An answer is a status, (status, headers), an exception, None (the call stays
    out) or ("defer", seconds) (the rate budget has no call before then). With
    ``budget`` (a _RateBudget) and ``window`` (calls per 10 s), calls are paced
    as the runner does and answered as a server counting fixed windows would.
    """

    def __init__(self, core, answers=(), disk=(), budget=None, window=None):
        self.core = core
        self.answers = list(answers)
        self.disk = list(disk)
        self.budget, self.window = budget, window
        self.used = collections.Counter()   # calls the server counted in each window
        self.actions = []
        self.when = []                  # the time of each action
        self.calls = []                 # the event count of each call, when it was made
        self.times = []                 # when each call was made

    def turn(self, now, inbox=(), view=None, deadline=None):
        """One turn at ``now``: take ``inbox``, carry out actions; the sleep asked for."""
        core, wall = self.core, 1700000000.0 + now
        core.take(collections.deque(inbox), now, wall)
        for _ in range(10000):
            action = core.next_action(now, deadline, view or lite._NO_DISK)
            if type(action) is lite._Sleep:
                return action.due
            self.actions.append(action)
            self.when.append(now)
            if type(action) is lite._Post:
                wait = self.budget.reserve(now) if self.budget is not None else 0.0
                if wait > 0:
                    core.defer(action.job, now + wait, "rate limit window")
                    continue
                if action.job.batch is not None:
                    self.calls.append(action.job.batch.count)
                    self.times.append(now)
                answer = self.answers.pop(0) if self.answers else self.server(now, wall)
                if answer is None:
                    continue
                if type(answer) is tuple and answer[0] == "defer":
                    core.defer(action.job, now + answer[1], "rate limit window")
                elif isinstance(answer, BaseException):
                    core.outcome(action.job, None, answer, now, wall)
                else:
                    status, headers = answer if type(answer) is tuple else (answer, {})
                    core.outcome(action.job, lite._Response(status, headers, b"{}"), None,
                                 now, wall)
            elif type(action) is lite._Write:
                core.written(action, True)
            elif type(action) is lite._Read:
                core.offer(self.disk.pop(0) if self.disk else None)
        raise AssertionError("the core never asked to sleep")

    def server(self, now, wall):
        """204, or 429 past ``window`` calls in a 10 s window; with the X-RateLimit headers."""
        if self.window is None:
            return 204
        index = int(now // 10.0)
        self.used[index] += 1
        headers = {"x-ratelimit-limit": str(self.window),
                   "x-ratelimit-remaining": str(max(0, self.window - self.used[index])),
                   "x-ratelimit-reset": "%.3f" % (wall - now + (index + 1) * 10.0)}
        if self.budget is not None:
            self.budget.update(headers, now, wall)
        return (429 if self.used[index] > self.window else 204), headers

    def run(self, now, inbox=(), view=None, turns=100):
        """Turns at ``now`` while the core asks for one at once; the sleep it asks for then."""
        for _ in range(turns):
            due = self.turn(now, inbox, view)
            inbox = ()
            if due is None or due > 0:
                return due
        raise AssertionError("the core never settled")

    def of(self, kind):
        return [a for a in self.actions if type(a) is kind]

    def times_of(self, *kinds):
        """(time, action) of the actions of these kinds, in order."""
        return [(t, a) for t, a in zip(self.when, self.actions) if type(a) in kinds]

    def sent(self):
        """The event counts of the calls made, in order."""
        return self.calls


class CoreStepTest(IsolatedCase):
    """The _Core from tables: time and inputs in, actions out; no thread, file or clock."""

    def core(self, spool=True, **changes):
        core = lite._Core(core_settings(**changes), ("b", ""), spool, 1700000000.0)
        core.created.add("b")                   # the bucket exists
        core.to_create = []
        return core

    def test_calls_carry_at_most_buffer_size_events(self):
        """Core: never more than buffer_size events a call; the rest waits flush_interval."""
        table = [       # (buffer_size, events) -> (sent at once, sleep, sent after it)
            (10, 25, [10, 10], 1.0, [5]),
            (10, 9, [], 1.0, [9]),
            (3, 7, [3, 3], 1.0, [1]),
            (200, 1000, [200] * 5, None, []),
        ]
        for size, count, first, sleep, then in table:
            with self.subTest(size=size, count=count):
                shell = Shell(self.core(buffer_size=size, max_queue=10000))
                self.assertEqual(shell.run(5.0, core_events(count)), sleep)
                self.assertEqual(shell.sent(), first)
                shell.run(5.0 + (sleep or 0.0))
                self.assertEqual(shell.sent(), first + then)
                values = [e["value"] for a in shell.of(lite._Post)
                          for e in json.loads(a.job.body.decode())]
                self.assertEqual(values, list(range(count)))

    def test_retries_back_off_and_429_waits_as_told(self):
        """Core: 503 backs off (jitter under base * 2^n); 429 waits Retry-After; after
        max_retries the batch is set aside on disk."""
        table = [       # (answers) -> (sleep at most, at least, waiting, set aside)
            ([503], 0.5, 0.0, "backing off after server_error", None),
            ([(429, {"retry-after": "3"})], 3.0, 3.0, "rate limited (429)", None),
            ([503, 503, 503], 4.0, 0.0, "backing off after server_error",
             "3 attempts failed"),
        ]
        for answers, most, least, waiting, aside in table:
            with self.subTest(answers=answers):
                shell = Shell(self.core(), answers)
                due = shell.run(10.0, core_events(10))
                now = 10.0
                for _ in answers[1:]:
                    now += due
                    due = shell.run(now)
                self.assertLessEqual(due, most)
                self.assertGreaterEqual(due, least)
                self.assertAlmostEqual(shell.core.waiting[0], now + due)
                self.assertEqual(shell.core.waiting[1], waiting)
                self.assertEqual(len(shell.of(lite._Post)), len(answers))
                if due > 0.05:
                    shell.run(now + due - 0.05)         # not before the time told
                    self.assertEqual(len(shell.of(lite._Post)), len(answers))
                writes = shell.of(lite._Write)
                self.assertEqual([w.why for w in writes], [aside] if aside else [])
                if aside is None:
                    shell.run(now + due)
                    self.assertEqual(shell.sent(), [10] * (len(answers) + 1))
                    self.assertEqual(shell.core.book.stats["delivered"], 10)

    def test_live_events_go_before_a_backlog_batch_that_waits(self):
        """Core: a spooled batch waiting for the window lets live events go first."""
        shell = Shell(self.core(), [("defer", 5.0)], disk=[disk_batch(range(100, 110))])
        self.assertEqual(shell.run(1.0), 5.0)               # the backlog waits for the window
        self.assertEqual(shell.sent(), [10])                # (asked for, deferred)
        shell.run(2.0, core_events(10))                     # live, while it waits
        self.assertEqual(shell.run(6.0), None)
        calls = [json.loads(a.job.body.decode())[0]["value"] for a in shell.of(lite._Post)]
        self.assertEqual(calls, [100, 0, 100])
        self.assertEqual(shell.core.book.stats["replayed"], 10)
        self.assertEqual(len(shell.of(lite._Ack)), 1)

    def test_413_halves_and_400_narrows_down_to_the_refused_event(self):
        """Core: 413 sends each half; 400 bisects to the refused event, which is
        dead-lettered; a spool line halved is acked once both halves are delivered."""
        table = [       # (answers, from disk) -> (sent, dead letters, acks)
            ([413, 204, 204], False, [8, 4, 4], 0, 0),
            ([400, 204, 400, 204, 400, 204, 400], False, [8, 4, 4, 2, 2, 1, 1], 1, 0),
            ([413, 204, 204], True, [8, 4, 4], 0, 1),
        ]
        for answers, spooled, sent, dead, acks in table:
            with self.subTest(answers=answers, spooled=spooled):
                disk = [disk_batch(range(8))] if spooled else []
                shell = Shell(self.core(buffer_size=8), answers, disk)
                shell.run(1.0, [] if spooled else core_events(8))
                self.assertEqual(shell.sent(), sent)
                self.assertEqual(len(shell.of(lite._DeadLetter)), dead)
                self.assertEqual(shell.core.book.lost, dead)
                self.assertEqual([len(a.refs) for a in shell.of(lite._Ack)], [1] * acks)
                if acks:        # after the last half, not before
                    kinds = [type(a) for a in shell.actions]
                    self.assertGreater(kinds.index(lite._Ack),
                                       len(kinds) - 1 - kinds[::-1].index(lite._Post))
                stats = shell.core.book.stats
                self.assertEqual(stats["replayed" if spooled else "delivered"], 8 - dead)

    new_budget = lite._RateBudget       # the shell's (PurityTest hands out ones built before)

    def test_calls_are_paced_over_the_window_the_server_tells(self):
        """Core: through the shell's budget, calls spread over the window the server tells,
        never past its limit (no 429), and go on in the next; the window is used whole."""
        table = [       # (calls a window, events) -> (windows it takes)
            (3, 100, 4),
            (10, 300, 3),
            (30, 300, 1),
        ]
        for limit, count, windows in table:
            with self.subTest(limit=limit, count=count):
                shell = Shell(self.core(max_queue=10000), budget=self.new_budget(),
                              window=limit)
                now, due = 0.0, shell.run(0.0, core_events(count))
                while due is not None:
                    now += max(due, 0.001)
                    due = shell.run(now)
                self.assertEqual(sum(shell.calls), count)
                self.assertEqual(max(shell.calls), 10)
                per_window = collections.Counter(int(t // 10.0) for t in shell.times)
                self.assertEqual(max(per_window.values()), limit)     # all of it, no more
                self.assertEqual(len(per_window), windows)
                self.assertEqual(shell.core.book.stats["rate_limited"], 0)
                gaps = [b - a for a, b in zip(shell.times[1:], shell.times[2:])]
                self.assertGreaterEqual(min(gaps), 10.0 / limit / 2)     # spread, not bursts

    def test_durable_mode_journals_memory_and_fsyncs_on_time(self):
        """Core: durable mode writes memory half a sync_interval old as journal lines and
        asks for an fsync half a sync_interval after a write, a call out or not."""
        table = [       # (a call out) -> [(time, what the core asks for)]
            (False, [(0.5, "journal 3"), (1.0, "sync")]),
            (True, [(0.0, "post"), (0.5, "journal 3"), (1.0, "sync")]),
        ]
        names = {lite._Post: "post", lite._Sync: "sync", lite._Write: "journal"}
        for call_out, expected in table:
            with self.subTest(call_out=call_out):
                core = lite._Core(core_settings(durable=True, sync_interval=1.0), ("b", ""),
                                  True, 1700000000.0)
                if not call_out:
                    core.to_create = []             # else: creating it goes out, stays out
                shell = Shell(core, [None])
                now, due = 0.0, shell.run(0.0, core_events(3))
                while due is not None and now < 5.0:
                    now += due
                    due = shell.run(now)
                asked = [(when, names[type(a)] + (" %d" % a.batch.count if type(a) is
                                                  lite._Write else ""))
                         for when, a in shell.times_of(lite._Post, lite._Sync, lite._Write)]
                self.assertEqual(asked, expected)

    def test_401_pauses_sets_aside_and_probes_after_pause_interval(self):
        """Core: 401 sets the batch aside, tells on_error and the log, probes after the pause."""
        shell = Shell(self.core(), [401, 204])
        self.assertEqual(shell.run(1.0, core_events(10)), 60.0)
        self.assertEqual([w.why for w in shell.of(lite._Write)],
                         ["delivery paused (key_rejected)"])
        self.assertEqual(shell.core.book.stats["paused"], "key_rejected")
        self.assertEqual([r.error.reason for r in shell.of(lite._Report)], ["key_rejected"])
        self.assertIn(lite._ERROR, [a.level for a in shell.of(lite._Log)])
        shell.run(60.9)
        self.assertEqual(len(shell.of(lite._Post)), 1)
        shell.run(61.0, core_events(10))
        self.assertEqual(len(shell.of(lite._Post)), 2)      # the probe
        self.assertEqual(shell.core.book.stats["paused"], "")

    def test_close_plan(self):
        """Core: close() waits for a window that opens before its deadline, halts at once
        if it opens later; without a timeout it goes on while calls go through."""
        # (window opens in, close in, idle, events) -> (halts at once, sent, ok, spooled)
        table = [
            (3.0, 5.0, None, 10, False, [10, 10], True, 0),
            (3.0, 2.0, None, 10, True, [10], False, 10),     # the window opens too late
            (0.0, 2.0, None, 50, True, [10] * 5, True, 0),
            (0.0, 0.0, 10.0, 10, True, [], False, 10),      # the deadline is now: no call
        ]
        for opens, ends, idle, count, at_once, sent, ok, spooled in table:
            with self.subTest(opens=opens, ends=ends, idle=idle):
                answers = [("defer", opens)] if opens else []
                shell = Shell(self.core(), answers)
                wait = PlainWait(0, 1.0 + ends, idle)
                due = shell.run(1.0, core_events(count) + [wait])
                self.assertEqual(due is None, at_once)
                if due is not None:
                    due = shell.run(1.0 + due)
                self.assertIsNone(due)
                self.assertEqual(shell.core.state, "stopped")
                self.assertEqual(shell.sent(), sent)
                self.assertEqual([(a.wait, a.ok) for a in shell.of(lite._Answer)], [(wait, ok)])
                self.assertEqual(sum(w.batch.count for w in shell.of(lite._Write)), spooled)
                kinds = [type(a) for a in shell.actions]
                self.assertLess(kinds.index(lite._Halted), kinds.index(lite._Answer))

    def test_close_without_timeout_ends_idle_seconds_after_the_last_success(self):
        """Core: each call that goes through moves close()'s end idle seconds later."""
        shell = Shell(self.core(max_retries=100), [204] + [503] * 100)
        wait = PlainWait(0, 3.0, 10.0)         # close(2) with idle 10
        now = 1.0
        due = shell.run(now, core_events(30) + [wait])
        while due is not None:
            now += due
            due = shell.run(now)
        self.assertEqual(shell.sent()[0], 10)
        self.assertEqual(shell.core.close_at, 11.0)     # moved: 10 s after the success at 1.0
        self.assertGreater(now, 3.0)                    # retried past the first end ...
        self.assertLessEqual(now, 11.0)                 # ... and never past the moved one
        self.assertIn("close() deadline", shell.of(lite._Halted)[0].why)
        self.assertEqual([a.ok for a in shell.of(lite._Answer)], [False])

    def test_max_queue_sets_aside_the_oldest_excess(self):
        """Core: past max_queue the oldest excess goes to disk (no spool: dropped, counted)."""
        table = [       # (spool) -> (written, dropped)
            (True, 160, {}),
            (False, 0, {"no_spool": 160}),
        ]
        for spool, written, dropped in table:
            with self.subTest(spool=spool):
                shell = Shell(self.core(spool=spool), [None])   # a call that stays out
                shell.run(1.0, core_events(10))
                shell.run(1.5, core_events(250, 10))
                self.assertEqual(shell.core.count, 100)
                writes = shell.of(lite._Write)
                self.assertEqual(sum(w.batch.count for w in writes), written)
                self.assertTrue(all(w.drop for w in writes))
                self.assertEqual(shell.core.book.stats["dropped"], dropped)
                self.assertEqual(shell.core.book.lost, sum(dropped.values()))
                self.assertEqual(shell.core.memory.oldest()[0], 170)    # the newest stay

    def test_flush_answers_are_truthful(self):
        """Core: flush() is answered True once all it asked for is delivered and nothing
        was lost since the last answer; False once, after a loss; not while a backlog waits."""
        nan = float("nan")
        table = [       # (events, disk view) -> answers
            (core_events(5), None, [True]),
            (core_events(2) + [("k", nan, 1.0)], None, [False]),
            (core_events(5), lite._Disk(True, None), []),      # spool lines still wait
            (core_events(5), lite._Disk(False, 3), []),        # our own, on disk
        ]
        for logged, view, answers in table:
            with self.subTest(logged=len(logged), view=view):
                shell = Shell(self.core())
                wait = PlainWait(shell.core.book.lost)
                shell.run(1.0, logged + [wait], view=view)
                self.assertEqual([a.ok for a in shell.of(lite._Answer)], answers)
                if answers:
                    again = PlainWait(shell.core.book.lost)
                    shell.run(2.0, [again])
                    self.assertEqual([a.ok for a in shell.of(lite._Answer)], answers + [True])

    def test_count_follows_a_batch_that_grows_on_retry(self):
        """Core: a failed batch that grows on its retry is counted once (it was not)."""
        shell = Shell(self.core(), [(429, {"retry-after": "2"}), None])
        self.assertEqual(shell.run(1.0, core_events(3) + [PlainWait()]), 2.0)
        shell.run(2.0, core_events(7, 3))
        self.assertEqual(shell.core.count, 10)
        shell.run(3.0)                          # the retry, grown to 10, stays out
        self.assertEqual(shell.sent(), [3, 10])
        self.assertEqual(shell.core.count, 10)
        shell.core.outcome(shell.core.out, lite._Response(204, {}, b""), None, 2.0, 0.0)
        self.assertEqual(shell.core.count, 0)

    def backlog(self, memory=0, held=(), disk=lite._NO_DISK):
        """A _Backlog holding ``memory`` events (values 0, 1, ...) and ``held`` batches:
        ("live", n) takes n of memory's, ("fixed", n) the same as a half after 413,
        ("ours", seq) and ("earlier", None) are spool lines of 5 events (values 100...)."""
        book = lite._Book(core_settings(), True, collections.deque(), 1700000000.0)
        backlog = lite._Backlog(("b", ""), book)
        backlog.memory.extend(core_events(memory), 0.0)
        for kind, arg in held:
            if kind in ("live", "fixed"):
                batch = backlog.take_live(arg)
                batch.fixed = kind == "fixed"
            else:
                batch = disk_batch(range(100, 105), arg)
            backlog.batches.hold(batch)
        backlog.disk = disk
        return backlog

    def test_backlog_answers_from_what_it_holds(self):
        """Backlog: counts, the oldest event and what is pending come from memory, the
        batches and the spool's view alike."""
        D = lite._Disk
        table = [       # (memory, held, disk) -> (count, on disk, oldest, pending, spooled, empty)
            (0, [], lite._NO_DISK, (0, 0, None, False, False, True)),
            (5, [], lite._NO_DISK, (5, 0, 0, True, False, False)),
            (5, [("live", 3)], lite._NO_DISK, (5, 0, 0, True, False, False)),
            (0, [("ours", 7)], lite._NO_DISK, (0, 5, 7, True, False, False)),
            (0, [("earlier", None)], lite._NO_DISK, (0, 5, None, True, True, False)),
            (0, [], D(True, None), (0, 0, None, True, True, False)),     # lines wait on disk
            (0, [], D(False, 4), (0, 0, 4, False, False, False)),        # ours, handed out
            (2, [("ours", 7)], D(False, 4), (2, 5, 0, True, False, False)),
        ]
        for memory, held, disk, expected in table:
            with self.subTest(memory=memory, held=held, disk=disk):
                backlog = self.backlog(memory, held, disk)
                self.assertEqual((backlog.count, backlog.on_disk(), backlog.oldest_seq(),
                                  backlog.pending(), backlog.spooled(), backlog.empty()),
                                 expected)

    def test_backlog_chooses_the_next_batch(self):
        """Backlog: a live head grows to most; live events that are due go before a backlog
        batch; a fixed half never grows."""
        table = [       # (memory, held, live due) -> (first value, events, batches held)
            (0, [], False, None),
            (20, [("live", 3)], False, (0, 10, 1)),             # fell behind: grown
            (20, [("fixed", 3)], False, (0, 3, 1)),
            (5, [("ours", 7)], False, (100, 5, 1)),
            (5, [("ours", 7)], True, (0, 5, 2)),                # live first
            (0, [("earlier", None)], True, (100, 5, 1)),        # nothing live to go
        ]
        for memory, held, live_due, expected in table:
            with self.subTest(memory=memory, held=held, live_due=live_due):
                backlog = self.backlog(memory, held)
                batch = backlog.next_batch(10, live_due)
                self.assertEqual(batch and (batch.tuples()[0][1], batch.count,
                                            len(backlog.batches.queue)), expected)
                self.assertIs(batch, backlog.batches.queue[0] if batch else None)

    def test_backlog_sets_aside_the_excess_then_everything_at_a_halt(self):
        """Backlog: past the limit the oldest live batches go (not the one in a call), in
        batches of most; at a halt the batches held, then memory's."""
        table = [       # (memory, held, limit, the call's batch) -> [(first value, events)]
            (15, [], 20, None, []),
            (25, [], 20, None, [(0, 5)]),
            (50, [], 20, None, [(0, 10), (10, 10), (20, 10)]),
            (25, [("live", 3)], 20, None, [(0, 3), (3, 2)]),
            (25, [("live", 3)], 20, 0, [(3, 5)]),               # the batch out stays
            (25, [("ours", 7), ("live", 3)], None, None,        # a halt
             [(100, 5), (0, 3), (3, 10), (13, 10), (23, 2)]),
        ]
        for memory, held, limit, out, expected in table:
            with self.subTest(memory=memory, held=held, limit=limit, out=out):
                backlog = self.backlog(memory, held)
                if out is not None:
                    out = backlog.batches.queue[out]
                aside = []
                for _ in range(10):
                    batch = backlog.leftover(10) if limit is None else \
                        backlog.excess(limit, 10, out)
                    if batch is None:
                        break
                    self.assertIn(batch, backlog.batches.queue)     # held until set aside
                    aside.append((batch.tuples()[0][1], batch.count))
                    backlog.batches.remove(batch)
                self.assertEqual(aside, expected)


class CalendarTest(IsolatedCase):
    """_month_of and _month_left: calendar arithmetic equal to time.gmtime's, without it."""

    def test_months_match_gmtime(self):
        """Core: month and seconds left agree with time.gmtime over leap years and centuries."""
        import random
        rand = random.Random(17)
        walls = [0.0, 951782399.5, 951782400.0, 4107542399.25, 4107542400.0, 1709251199.999,
                 253402300799.0] + [rand.uniform(0, 253402300799) for _ in range(2000)]
        for wall in walls:
            g = time.gmtime(wall)
            leap = g.tm_year % 4 == 0 and (g.tm_year % 100 != 0 or g.tm_year % 400 == 0)
            days = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[g.tm_mon - 1]
            done = (g.tm_mday - 1) * 86400 + g.tm_hour * 3600 + g.tm_min * 60 + g.tm_sec
            with self.subTest(wall=wall):
                self.assertEqual(lite._month_of(wall), time.strftime("%Y-%m", g))
                self.assertAlmostEqual(lite._month_left(wall),
                                       days * 86400 - done - wall % 1, places=5)
        tally = lite._MonthTally()          # keeps the last month's span: still the same names
        for wall in sorted(walls) + walls:
            self.assertEqual(tally.month_of(wall), time.strftime("%Y-%m", time.gmtime(wall)))


class Forbidden(object):
    """Stands in for a module the core must not touch: any attribute access raises."""

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def __getattribute__(self, attribute):
        raise AssertionError("the core used %s.%s" % (object.__getattribute__(self, "_name"),
                                                      attribute))


class PurityTest(IsolatedCase):
    """The delivery core does no I/O: time, threading, socket and os raise while it steps."""

    def forbid(self):
        """Make the module's time, threading, socket and os (and its clocks) raise."""
        patches = [mock.patch.object(lite, name, Forbidden(name), create=True)
                   for name in ("time", "threading", "socket", "os")]
        patches += [mock.patch.object(lite, name, Forbidden(name))
                    for name in ("_time", "_monotonic")]
        for patcher in patches:
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_core_steps_with_time_threading_socket_and_os_forbidden(self):
        """Core: every decision runs with the module's clocks, threads, sockets and files gone."""
        budget = lite._RateBudget()     # built by the shell: its lock (Streamers of a key share it)
        tally = lite._MonthTally()
        self.forbid()
        CoreTest("test_memory_due").test_memory_due()
        CoreTest("test_call_deadline_grows_with_the_body").test_call_deadline_grows_with_the_body()
        CoreTest("test_after_failure").test_after_failure()
        CoreTest("test_decisions_feed_the_retry_plan").test_decisions_feed_the_retry_plan()
        CoreTest("test_answerable_waiters").test_answerable_waiters()
        CoreTest("test_close_plan").test_close_plan()
        CoreTest("test_next_wake").test_next_wake()
        budget.update({"x-ratelimit-limit": "30", "x-ratelimit-remaining": "0",
                       "x-ratelimit-reset": "1700000005"}, 500.0, 1700000000.0)
        self.assertGreater(budget.reserve(500.0), 0.0)
        tally.add(10, 1700000000.0)
        self.assertGreater(tally.projected(1700000060.0), 10)
        with self.assertRaises(AssertionError):     # the guard itself works
            lite.time.monotonic()

    def test_core_object_steps_with_time_threading_socket_and_os_forbidden(self):
        """Core: the _Core's table tests pass with the module's clocks, threads, sockets
        and files gone."""
        core_settings()                 # built by the shell beforehand: it checks the folder
        budgets = [lite._RateBudget() for _ in range(10)]       # each makes a lock
        self.addCleanup(setattr, CoreStepTest, "new_budget", CoreStepTest.new_budget)
        CoreStepTest.new_budget = budgets.pop
        self.forbid()
        tests = sorted(name for name in dir(CoreStepTest) if name.startswith("test_"))
        self.assertGreaterEqual(len(tests), 10)
        for name in tests:
            getattr(CoreStepTest(name), name)()
        with self.assertRaises(AssertionError):     # the guard itself works
            lite.os.getpid()


class MemoryTest(IsolatedCase):
    """_Memory.fill: a batch takes events in order up to buffer_size and 1 MB, refusing the
    unencodable, whether the events go in at once or one by one."""

    def fill(self, values, most, limit=lite._MAX_BODY_BYTES, bucket=("b", "")):
        memory = lite._Memory(bucket)
        memory.extend([("k", v, 1.0) for v in values], 0.0)
        batch, rejected = memory.take(limit, most)
        return ([e[1] for e in batch.events] if batch else [], [r[0][1] for r in rejected],
                memory.count, batch)

    def test_fill_table(self):
        """Memory: order, the cap, the byte limit and rejections alike on both paths."""
        nan = float("nan")
        one = len(lite._encode_event(("k", 0, 1.0))) + 1
        table = [       # (values, most, limit) -> (taken, rejected, left in memory)
            (list(range(25)), 10, lite._MAX_BODY_BYTES, (list(range(10)), [], 15)),
            (list(range(5)), 10, lite._MAX_BODY_BYTES, (list(range(5)), [], 0)),
            ([0, 1, nan, 3, 4], 10, lite._MAX_BODY_BYTES, ([0, 1, 3, 4], [nan], 0)),
            ([0, 1, nan, 3, 4, 5], 3, lite._MAX_BODY_BYTES, ([0, 1, 3], [nan], 2)),
            (list(range(10)), 10, 2 + 4 * one, (list(range(4)), [], 6)),
            ([0, 1, 2], 10, 2, ([0], [], 2)),           # one event always goes, alone
        ]
        for values, most, limit, (taken, rejected, left) in table:
            with self.subTest(values=values, most=most, limit=limit):
                got = self.fill(values, most, limit)
                self.assertEqual(got[0], taken)
                self.assertEqual(len(got[1]), len(rejected))
                self.assertEqual(got[2], left)
                self.assertEqual(got[3].body, lite._encode_events(
                    [("k", v, 1.0) for v in taken]))
                self.assertEqual(got[3].size, len(got[3].body) + 1)


class DoorbellTest(IsolatedCase):
    """_Doorbell: an Event's set/clear/wait/is_set on one plain lock."""

    def test_event_semantics(self):
        """Worker: set twice is set once, wait leaves it set, clear resets, a wait times out."""
        bell = lite._Doorbell()
        self.assertFalse(bell.is_set())
        self.assertFalse(bell.wait(0.0))
        self.assertFalse(bell.wait(-1.0))
        bell.set()
        bell.set()
        self.assertTrue(bell.is_set())
        self.assertTrue(bell.wait(0.0))
        self.assertTrue(bell.wait(5.0))             # still set: returns at once
        bell.clear()
        bell.clear()
        self.assertFalse(bell.is_set())
        started = time.monotonic()
        self.assertFalse(bell.wait(0.05))
        self.assertGreaterEqual(time.monotonic() - started, 0.04)

    def test_set_from_another_thread_wakes_a_waiter(self):
        """Worker: a set() from another thread ends a wait long before its timeout."""
        bell, rang = lite._Doorbell(), threading.Event()
        thread = threading.Thread(target=lambda: (rang.wait(10), bell.set()))
        thread.start()
        self.addCleanup(thread.join, 10)
        rang.set()
        self.assertTrue(bell.wait(10))


class CourierTest(LiteTestCase):
    """_Courier: one request at a time on its own thread, or here when none can start."""

    def test_no_thread_at_interpreter_shutdown_posts_in_the_caller(self):
        """Courier: where no thread can start (3.12's exit hook), the request is made inline."""
        transport = FakeTransport(204)
        courier = lite._Courier(lite._Sender(lite._resolve_settings(**replay_options()),
                                             transport), lite._Doorbell(), "test")
        job = lite._Job("/api/events", b'[{"key": "k", "value": 1}]', ("b", ""), None,
                        time.monotonic() + 5)

        def refuse(thread):
            raise RuntimeError("can't create new thread at interpreter shutdown")
        with mock.patch.object(lite, "_start_thread", refuse):
            courier.start(job)
        outcome = courier.poll()
        self.assertIsNotNone(outcome, "the request was not made")
        self.assertIs(outcome[0], job)
        self.assertEqual(outcome[1][0].status, 204)
        self.assertEqual(len(transport.posts), 1)
        courier.stop()                      # no thread to join: it never started


    def test_call_answered_at_once_needs_no_thread(self):
        """Courier: on an open connection, a call answered within _QUICK is made in the
        worker's thread; a later answer is read by the courier's own thread."""
        release = threading.Event()
        self.addCleanup(release.set)
        release.set()

        def answer(conn, number, stop):
            while read_request(conn) is not None:
                self.assertTrue(release.wait(10))
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        server = RawServer(self, answer)
        settings = lite._resolve_settings(**replay_options(api_base=server.url))
        wake, transport = lite._Doorbell(), lite._HTTPTransport(server.url, 5.0)
        self.addCleanup(transport.close)
        courier = lite._Courier(lite._Sender(settings, transport), wake, "test")
        self.addCleanup(courier.stop)

        def job():
            return lite._Job("/api/events", b"[]", ("b", ""), None, time.monotonic() + 5)

        def outcome():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                result = courier.poll()
                if result is not None:
                    return result
                wake.wait(deadline - time.monotonic())
                wake.clear()                # polled again before the next wait
            self.fail("the courier's thread never answered")
        first = job()
        courier.start(first)                # no connection yet: the thread opens it
        self.assertIsNotNone(courier._thread)
        result = outcome()
        self.assertIs(result[0], first)
        self.assertEqual(result[1][0].status, 204)
        second = job()
        with mock.patch.object(lite, "_QUICK", 10.0):   # "at once", on a busy machine too
            courier.start(second)
        result = courier.poll()
        self.assertIsNotNone(result, "an answer at once went to the thread")
        self.assertEqual((result[0], result[1][0].status), (second, 204))
        release.clear()
        third = job()
        courier.start(third)                # unanswered within _QUICK: the thread waits
        self.assertIsNone(courier.poll())
        release.set()
        result = outcome()
        self.assertEqual((result[0], result[1][0].status), (third, 204))


    def test_sync_call_answered_at_once_starts_no_watchdog(self):
        """Courier: use_async=False starts a watchdog timer only for a call not answered
        within _QUICK (here: the first, which opens the connection)."""
        def answer(conn, number, stop):
            while read_request(conn) is not None:
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        server = RawServer(self, answer)
        settings = lite._resolve_settings(**replay_options(api_base=server.url))
        transport = lite._HTTPTransport(server.url, 5.0)
        self.addCleanup(transport.close)
        courier = lite._InlineCourier(lite._Sender(settings, transport))
        timers, real_timer = [], threading.Timer

        def timer(*args, **kwargs):
            timers.append(real_timer(*args, **kwargs))
            return timers[-1]
        with mock.patch.object(lite.threading, "Timer", timer), \
                mock.patch.object(lite, "_QUICK", 10.0):    # "at once", on a busy machine too
            for _ in range(5):
                job = lite._Job("/api/events", b"[]", ("b", ""), None, time.monotonic() + 5)
                courier.start(job)
                result = courier.poll()
                self.assertEqual((result[0], result[1][0].status), (job, 204))
        self.assertEqual(len(timers), 1, "a watchdog for a call answered at once")


class WorkerTest(LiteTestCase):
    """The worker's decisions, stepped by hand: no threads, no sockets, no real time."""

    def worker(self, *answers, **options):
        import inspect
        settings = {name: p.default for name, p in
                    inspect.signature(lite.Streamer.__init__).parameters.items()
                    if name != "self"}
        settings.update(bucket_key="fake", access_key=KEY, ini_file_location=False,
                        api_base="http://127.0.0.1:9", spool_dir=self.tempdir(),
                        backoff_base=0.5, backoff_cap=4.0, flush_interval=1.0)
        settings.update(options)
        budget = settings.pop("budget", None)
        settings = lite._resolve_settings(**settings)
        bucket = (settings.bucket_key, settings.bucket_name)
        self.clock = FakeClock()
        self.transport = FakeTransport(*answers)
        sender = lite._Sender(settings, self.transport)
        worker = lite._new_worker(settings, bucket)
        worker.sender, worker.budget, worker.clock = sender, budget, self.clock
        worker.courier = lite._InlineCourier(sender, watchdog=False)
        return worker

    def log(self, worker, count, key="k"):
        for i in range(count):
            worker.inbox.append((key, i, 1700000000.0 + i))

    def run_until_idle(self, worker, steps=50):
        """Step while something is due now; return the delay the worker asked for."""
        for _ in range(steps):
            delay = worker.step()
            if delay is None or delay > 0:
                return delay
        self.fail("the worker never settled")

    def sent_values(self):
        return [e["value"] for path, body in self.transport.posts if path == "/api/events"
                for e in body]

    def test_behind_means_calls_of_buffer_size(self):
        """Worker: 1,000 waiting events go in calls of buffer_size, never packed beyond, in order."""
        for size, durable in ((10, False), (200, False), (10, True), (7, True)):
            worker = self.worker(buffer_size=size, durable=durable)
            self.log(worker, 1000)
            self.run_until_idle(worker, steps=1000)
            self.assertEqual(self.transport.posts[0][0], "/api/buckets")
            self.assertEqual(self.transport.events(), [size] * (1000 // size) + (
                [1000 % size] if 1000 % size else []), (size, durable))
            self.assertEqual(self.sent_values(), list(range(1000)))

    def spool_lines(self, folder, *counts):
        """Spool lines of ``counts`` events left on disk by an earlier run (older versions
        wrote a line of any length)."""
        old = self.worker(spool_dir=folder)
        value = 0
        for count in counts:
            parts = [lite._encode_event(("k", value + i, 1700000000.0)) for i in range(count)]
            old.writer.append(old.core.memory.bucket, parts)
            value += count
        old.halt("test over")                   # the lines stay on disk, unlocked
        self.assertEqual(len(spooled_events(folder)), value)

    def test_spooled_lines_are_packed_up_to_buffer_size_only(self):
        """Worker: spool replay packs whole lines while the call stays within buffer_size."""
        folder = self.tempdir()
        self.spool_lines(folder, 4, 4, 4, 4, 4)
        worker = self.worker(spool_dir=folder, buffer_size=10)
        self.run_until_idle(worker, steps=100)
        self.assertEqual(self.transport.events(), [8, 8, 4])
        self.assertEqual(self.sent_values(), list(range(20)))
        self.assertEqual(spool_segments(folder), [])

    def test_spooled_line_over_buffer_size_goes_in_slices_acked_once_all_are_delivered(self):
        """Worker: an old spool line of 25 events goes in calls of 10, 10, 5; it is retired
        only when the last slice is delivered, so a crash in between resends it, loses nothing."""
        folder = self.tempdir()
        self.spool_lines(folder, 25)
        worker = self.worker(204, 204, 500, spool_dir=folder, buffer_size=10)
        self.run_until_idle(worker, steps=100)
        self.assertEqual(self.transport.events(), [10, 10])        # the second failed
        self.assertEqual(len(spooled_events(folder)), 25)          # not retired yet
        self.assertEqual(sum(b.count for b in worker.core.batches.queue), 15)
        # A crash now: another process claims the line and sends all of it again.
        worker.reader.forget_after_fork()
        again = self.worker(spool_dir=folder, buffer_size=10)
        self.run_until_idle(again, steps=100)
        self.assertEqual(self.transport.events(), [10, 10, 5])
        self.assertEqual(self.sent_values(), list(range(25)))
        self.assertEqual(spool_segments(folder), [])
        # Without the crash, the rest goes once the back-off is over.
        self.spool_lines(folder, 25)
        worker = self.worker(204, 413, spool_dir=folder, buffer_size=10)
        self.run_until_idle(worker, steps=100)
        self.assertEqual(self.transport.events(), [10, 5, 5, 10, 5])   # 413 halves a slice
        self.assertEqual(self.sent_values()[10:], list(range(25)))
        self.assertEqual(spool_segments(folder), [])
        self.assertEqual(worker.stats["replayed"], 25)

    def test_live_events_go_before_spool_replay_waiting_for_the_window(self):
        """Worker: a backlog batch waits for the window; live events ready meanwhile go first."""
        folder = self.tempdir()
        self.spool_lines(folder, 10, 10)
        budget = lite._RateBudget()
        worker = self.worker(spool_dir=folder, buffer_size=10, budget=budget)
        worker.core.created.add("fake")
        worker.core.to_create = []
        budget.update({"x-ratelimit-limit": "30", "x-ratelimit-remaining": "0",
                       "x-ratelimit-reset": "%.3f" % (time.time() + 5.0)},
                      self.clock(), time.time())
        delay = self.run_until_idle(worker)
        self.assertEqual(self.transport.posts, [])
        self.assertIsNotNone(worker.core.batches.queue[0].refs)   # the backlog, waiting
        self.log(worker, 10, key="live")
        self.clock.now += delay
        for _ in range(10):
            delay = self.run_until_idle(worker, steps=100)
            self.clock.now += 0.01 if delay is None else delay
        self.assertEqual([body[0]["key"] for path, body in self.transport.posts],
                         ["live", "k", "k"])

    def test_packing_stops_under_one_megabyte(self):
        """Worker: a request never carries a body over 1 MB, whatever buffer_size; the rest goes next."""
        worker = self.worker(buffer_size=3000)
        for i in range(3000):
            worker.inbox.append(("k", "x" * 1000, 1.0))
        self.run_until_idle(worker)
        self.clock.now += 1.0                   # flush_interval: the rest of the 3000
        self.run_until_idle(worker)
        self.assertEqual(sum(self.transport.events()), 3000)
        self.assertGreater(len(self.transport.events()), 2)
        for path, body in self.transport.posts:
            self.assertLessEqual(len(json.dumps(body, separators=(",", ":"))),
                                 lite._MAX_BODY_BYTES)

    def test_partial_batch_waits_for_flush_interval(self):
        """Worker: fewer than buffer_size events wait flush_interval on the clock, then go."""
        worker = self.worker(buffer_size=10, flush_interval=1.0)
        self.log(worker, 3)
        delay = self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [])
        self.assertAlmostEqual(delay, 1.0)
        self.clock.now += 0.5
        self.assertAlmostEqual(self.run_until_idle(worker), 0.5)
        self.assertEqual(self.transport.events(), [])
        self.clock.now += 0.5
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [3])

    def test_network_error_backs_off_then_delivers_once(self):
        """Worker: a refused connection is retried after the back-off, and sent once."""
        worker = self.worker(204, ConnectionRefusedError(), buffer_size=5)
        self.log(worker, 5)
        delay = self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [5])          # the failed attempt
        self.assertGreaterEqual(delay, 0.0)
        self.assertLessEqual(delay, 0.5)
        self.clock.now += delay
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [5, 5])
        self.assertEqual(worker.stats["delivered"], 5)
        self.assertEqual(worker.stats["retried"], 1)

    def test_retry_after_is_waited_on_the_clock(self):
        """Worker: 429 with Retry-After 2 sends nothing for 2 s, then retries."""
        worker = self.worker(204, (429, {"retry-after": "2"}), buffer_size=5)
        self.log(worker, 5)
        self.assertAlmostEqual(self.run_until_idle(worker), 2.0)
        self.clock.now += 1.9
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [5])
        self.clock.now += 0.1
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [5, 5])
        self.assertEqual(worker.stats["rate_limited"], 1)

    def test_timed_out_request_is_retried_in_halves_never_bigger(self):
        """Worker: a timeout retries the batch in halves; events logged meanwhile wait."""
        worker = self.worker(204, socket.timeout("timed out"), 204, 204, 204, buffer_size=8)
        self.log(worker, 8)
        delay = self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [8])
        self.log(worker, 8, key="later")        # would make the retry bigger
        self.clock.now += delay
        self.run_until_idle(worker)
        self.clock.now += 1.0
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [8, 4, 4, 8])
        self.assertEqual([e["value"] for e in self.transport.posts[2][1]], [0, 1, 2, 3])
        self.assertEqual(worker.stats["delivered"], 16)

    def test_request_deadline_grows_with_its_body(self):
        """Worker: a request's overall deadline is timeout plus a second per 2 KiB of body."""
        worker = self.worker(buffer_size=100, timeout=10.0)
        deadlines = []
        post = self.transport.post

        def noting(path, body, headers, deadline):
            deadlines.append((len(body), deadline - self.clock()))
            return post(path, body, headers, deadline)
        self.transport.post = noting
        worker.inbox.append(("k", "x" * 1900, 1.0))
        for i in range(99):
            worker.inbox.append(("k", "y" * 1900, 1.0))
        self.run_until_idle(worker)
        size, allowed = deadlines[-1]
        self.assertGreater(size, 190000)
        self.assertAlmostEqual(allowed, 10.0 + size / 2048.0, places=3)

    def test_reset_in_milliseconds_or_1e12_waits_one_window_at_most(self):
        """Worker: Remaining 0 with a Reset in ms or 1e12: the next call goes within 11 s."""
        for reset in ("%.0f" % ((time.time() + 5) * 1000), "1e12", "inf"):
            headers = {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "0",
                       "x-ratelimit-reset": reset}
            worker = self.worker(204, (204, headers), buffer_size=10,
                                 budget=lite._RateBudget())
            self.log(worker, 20)
            delay = self.run_until_idle(worker)
            self.assertEqual(self.transport.events(), [10], reset)
            self.assertLessEqual(delay, 11.01, reset)
            self.clock.now += delay
            self.run_until_idle(worker)
            self.assertEqual(self.transport.events(), [10, 10], reset)

    def test_413_splits_and_400_bisects(self):
        """Worker: 413 sends each half; 400 narrows down to the refused event."""
        worker = self.worker(204, 413, 204, 204, buffer_size=8)
        self.log(worker, 8)
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [8, 4, 4])
        worker = self.worker(204, 400, 204, 400, 204, 400, buffer_size=4)
        self.log(worker, 4)
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [4, 2, 2, 1, 1])
        self.assertEqual(worker.stats["dead_lettered"], 1)
        self.assertEqual(worker.stats["delivered"], 3)

    def run_paced(self, worker, wait, seconds):
        """Step the worker on the fake clock, sleeping as it asks, for ``seconds`` at most."""
        end = self.clock.now + seconds
        while not wait.done.is_set() and self.clock.now < end:
            delay = self.run_until_idle(worker, steps=1000)
            self.clock.now += 0.01 if delay is None else max(delay, 0.001)

    def test_close_without_timeout_waits_while_calls_succeed(self):
        """Worker: close with idle 10 s: 900 events at 30 calls/10 s all go (~30 s), no 429."""
        for idle, delivered in ((10.0, 900), (None, 290)):     # 29 calls + the bucket
            worker = self.worker(buffer_size=10, budget=lite._RateBudget())
            worker.wall = lambda: self.clock.now             # the server's clock is ours
            self.transport = worker.sender.transport = WindowTransport(self.clock, 30)
            self.log(worker, 900)
            # close() with no timeout: give up after 10 s without a delivered call; or
            # the hard 10 s deadline an explicit close(10) sets.
            wait = lite._Wait(0, self.clock.now + 10.0, idle=idle)
            worker.inbox.append(wait)
            self.run_paced(worker, wait, 120.0)
            self.assertEqual(worker.state, "stopped")
            self.assertEqual(sum(self.transport.events()), delivered, idle)
            self.assertEqual(max(self.transport.events()), 10)
            self.assertEqual(self.transport.refused, 0)
            self.assertEqual(wait.ok, delivered == 900)

    def test_close_without_timeout_gives_up_after_idle_seconds_without_progress(self):
        """Worker: close with idle 10 s and the server down: stops 10 s after the last success."""
        answers = [204, 204] + [ConnectionRefusedError()] * 1000
        worker = self.worker(*answers, buffer_size=10, max_retries=1000, backoff_cap=1.0)
        self.log(worker, 30)
        started = self.clock.now
        wait = lite._Wait(0, self.clock.now + 10.0, idle=10.0)
        worker.inbox.append(wait)
        self.run_paced(worker, wait, 120.0)
        self.assertEqual(worker.state, "stopped")
        self.assertEqual(self.transport.events()[0], 10)
        self.assertLessEqual(self.clock.now - started, 10.5)
        self.assertFalse(wait.ok)

    def test_close_waits_for_a_window_that_opens_before_its_deadline(self):
        """Worker: close() waits for a rate-limit window opening in time, else spools now."""
        for deadline, sent in ((5.0, [10]), (2.0, [])):
            budget = lite._RateBudget()
            worker = self.worker(buffer_size=100, budget=budget)
            worker.core.created.add("fake")
            worker.core.to_create = []
            wall = time.time()                  # one reading: the reset is 3 s after it
            budget.update({"x-ratelimit-limit": "30", "x-ratelimit-remaining": "0",
                           "x-ratelimit-reset": "%.3f" % (wall + 3.0)},
                          self.clock(), wall)
            self.log(worker, 10)
            wait = lite._Wait(0, self.clock() + deadline)
            worker.inbox.append(wait)
            delay = self.run_until_idle(worker)
            if sent:
                self.assertAlmostEqual(delay, 3.01, places=2)
                self.clock.now += delay
                self.run_until_idle(worker)
                self.run_until_idle(worker)
                self.assertTrue(wait.done.is_set() and wait.ok)
            else:
                self.assertIsNone(delay)            # stopped at once, nothing to wait for
                self.assertEqual(worker.state, "stopped")
                self.assertEqual(worker.stats["spooled"], 10)
                self.assertFalse(wait.ok)
            self.assertEqual(self.transport.events(), sent)

    def test_401_spools_then_probes_every_pause_interval(self):
        """Worker: 401 spools the batch, sends nothing for pause_interval, then probes."""
        worker = self.worker(204, 401, 401, 204, buffer_size=5, pause_interval=10.0)
        self.log(worker, 5)
        self.assertAlmostEqual(self.run_until_idle(worker), 10.0)
        self.assertEqual((worker.stats["paused"], worker.stats["spooled"]), ("key_rejected", 5))
        self.assertEqual(worker.waiting, (self.clock.now + 10.0, "paused: key_rejected"))
        self.clock.now += 9.9
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [5])
        self.clock.now += 0.1
        self.assertAlmostEqual(self.run_until_idle(worker), 10.0)   # the probe: 401 again
        self.clock.now += 10.0
        self.run_until_idle(worker)
        self.assertEqual(self.transport.events(), [5, 5, 5])
        self.assertEqual((worker.stats["paused"], worker.stats["replayed"]), ("", 5))

    def test_written_on_the_first_news_then_at_most_once_a_minute(self):
        """Worker: state.json after the first error, rewritten at most every 60 s however busy; at close."""
        answers = [204] + [ConnectionRefusedError()] * 400
        worker = self.worker(*answers, buffer_size=1, backoff_base=0.01, backoff_cap=0.02,
                             max_retries=1000)
        writes = []
        worker.reader.spool.status.save = lambda state: writes.append((self.clock.now, state))
        for second in range(180):
            self.log(worker, 1)
            for _ in range(2):
                worker.step()
            self.clock.now += 1.0
        self.assertGreaterEqual(len(self.transport.posts), 150)    # one a second
        times = [when for when, _ in writes]
        self.assertLessEqual(len(times), 4, times)
        self.assertTrue(all(b - a >= 60 for a, b in zip(times, times[1:])), times)
        worker.halt("test over")
        self.assertEqual(len(writes), len(times) + 1)
        self.assertIn("ConnectionRefusedError", writes[-1][1]["last_error"])
        self.assertEqual(writes[-1][1]["key"], lite._mask(KEY))

    def test_state_file_follows_drops_too(self):
        """Worker: a change in the drops alone is written to state.json (after the minute)."""
        worker = self.worker()
        writes = []
        worker.reader.spool.status.save = lambda state: writes.append(dict(state))
        worker.core.book.drop(3, "spool_full", None)
        worker.step()
        self.clock.now += 61.0
        worker.core.book.drop(2, "spool_full", None)
        worker.step()
        self.assertEqual([w["dropped"] for w in writes],
                         [{"spool_full": 3}, {"spool_full": 5}])

    def test_max_queue_spills_only_the_excess_while_a_request_is_out(self):
        """Worker: past max_queue the oldest excess goes to disk, nothing is dropped."""
        worker = self.worker(buffer_size=10, max_queue=100)
        worker.courier = SilentCourier()    # a request that does not answer
        worker.step()                       # the bucket's creation goes out
        self.log(worker, 250)
        worker.step()
        self.assertEqual(worker.core.memory.count, 100)
        self.assertEqual(worker.stats["spooled"], 150)
        self.assertEqual(worker.stats["dropped"], {})


# --- Worker, end to end ------------------------------------------------------
# Faults on the wire, through a real Streamer and sink.

class RetryTest(DeliveryTestCase):
    """5xx, 408, resets, refused connections and timeouts, then success."""

    def check_recovers(self, *actions, **options):
        sink = self.sink()
        sink.script("/api/events", *actions)
        s = self.streamer(sink.url, **options)
        expected = events("r", 25)
        log_all(s, expected)
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertExactlyOnce(self.received(sink), expected)
        self.assertGreater(s.stats()["retried"], 0)
        self.assertEqual(s.stats()["dropped"], {})
        return s, sink

    def test_server_errors_then_success(self):
        """Retry: 500, 503, 502, 504 then success delivers every event once."""
        self.check_recovers(500, 503, 502, 504)

    def test_408_then_success(self):
        """Retry: 408 twice then success delivers every event once."""
        self.check_recovers(408, 408)

    def test_resets_then_success(self):
        """Retry: connections reset three times then success delivers every event once."""
        self.check_recovers("reset", "reset", "reset")

    def test_dropped_connections_then_success(self):
        """Retry: connections closed without an answer, then success: each event once."""
        self.check_recovers("drop", "drop", "drop")

    def test_timeout_then_success(self):
        """Retry: a request that times out (no answer) is retried and delivered once."""
        s, sink = self.check_recovers(("hang", 5.0), timeout=0.3)
        self.assertIn("timed out", s.stats()["last_error"] or "")

    def test_refused_then_success(self):
        """Retry: connection refused until the server comes up, then each event once."""
        outage = Outage(self, up=False)
        failed = threading.Event()
        s = self.streamer(outage.url, on_error=lambda exc, batch: failed.set())
        expected = events("c", 25)
        log_all(s, expected)
        self.assertTrue(failed.wait(10))
        self.assertIn("ConnectionRefusedError", s.stats()["last_error"])
        outage.up()
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertExactlyOnce(self.received(outage), expected)
        self.assertGreater(s.stats()["retried"], 0)

    def test_slow_answer_is_not_a_failure(self):
        """Retry: an answer that is slow but within timeout is delivered, not retried."""
        sink = self.sink()
        sink.script("/api/events", ("delay", 0.2))
        s = self.streamer(sink.url)
        log_all(s, events("s", 10))
        self.assertTrue(s.flush(10))
        self.assertEqual(s.stats()["retried"], 0)
        self.assertExactlyOnce(self.received(sink), events("s", 10))


class RateLimitedTest(DeliveryTestCase):
    """429 waits as told and is not a failure."""

    def gaps_after_429(self, sink):
        seen = [(t, a) for t, p, a in sink.seen if p == "/api/events"]
        return [seen[i + 1][0] - t for i, (t, a) in enumerate(seen[:-1])
                if isinstance(a, tuple) and a[0] == 429]

    def test_retry_after_seconds_honoured(self):
        """429: Retry-After seconds are waited; counted as rate_limited, not retried."""
        sink = self.sink()
        sink.script("/api/events", (429, {"Retry-After": "0.25"}), (429, {"Retry-After": "0.25"}))
        s = self.streamer(sink.url)
        log_all(s, events("w", 10))
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertExactlyOnce(self.received(sink), events("w", 10))
        stats = s.stats()
        self.assertEqual((stats["rate_limited"], stats["retried"], stats["spooled"]), (2, 0, 0))
        gaps = self.gaps_after_429(sink)
        self.assertEqual(len(gaps), 2)
        for gap in gaps:
            self.assertGreaterEqual(gap, 0.23)

    def test_stats_show_the_learned_limit_and_what_waits(self):
        """stats(): the calls per window the server told of; events in memory and on disk."""
        sink = self.sink(rate_limit=30, window=10.0)
        s = self.streamer(sink.url)
        self.assertIsNone(s.stats()["rate_limit"])
        log_all(s, events("w", 10))
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertEqual(s.stats()["rate_limit"], {"calls": 30, "window_s": 10.0})
        outage = Outage(self, up=False)
        s = self.streamer(outage.url, max_retries=1)
        log_all(s, events("x", 30))
        self.assertTrue(bounded_poll(lambda: s.stats()["backlog"] == 30, 20), s.stats())
        self.assertEqual(s.stats()["queued"], 0)

    def test_flush_and_close_without_timeout_wait_while_calls_go_through(self):
        """flush(), close(): no timeout waits past wait_timeout while calls succeed."""
        sink = self.sink(rate_limit=20, window=1.0)
        s = self.streamer(sink.url, access_key="ist_unbounded_%d" % os.getpid(),
                          wait_timeout=1.0, buffer_size=10)
        count = full_or(400, 150)               # 40 calls (15) at 20 a second
        log_all(s, events("f", count))
        self.assertTrue(s.flush(), s.stats())
        log_all(s, events("c", count))
        self.assertTrue(s.close(), s.stats())
        self.assertExactlyOnce(self.received(sink), events("f", count) + events("c", count))
        self.assertEqual(sink.rate_limited, 0)

    def test_retry_after_http_date_honoured(self):
        """429: an HTTP-date Retry-After is waited for (1 s resolution)."""
        sink = self.sink()
        target = int(time.time()) + 1           # up to 1 s away (HTTP dates are whole seconds)
        sink.script("/api/events", (429, {"Retry-After": email.utils.formatdate(
            target, usegmt=True)}))
        s = self.streamer(sink.url)
        log_all(s, events("d", 10))
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertGreaterEqual(time.time(), target - 0.05)
        self.assertEqual(s.stats()["rate_limited"], 1)
        self.assertExactlyOnce(self.received(sink), events("d", 10))

    def test_many_429_do_not_spool_or_grow_backoff(self):
        """429: more 429s than max_retries neither spools the batch nor counts failures."""
        sink = self.sink()
        sink.script("/api/events", *[(429, {"Retry-After": "0.01"})] * 8)
        s = self.streamer(sink.url, max_retries=3)
        log_all(s, events("m", 10))
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        stats = s.stats()
        self.assertEqual((stats["rate_limited"], stats["retried"], stats["spooled"]), (8, 0, 0))
        self.assertExactlyOnce(self.received(sink), events("m", 10))

    def test_retry_after_counts_from_the_answer(self):
        """429: Retry-After is counted from when the answer arrived, not from the request."""
        sink = self.sink()
        sink.script("/api/events", ("delay", 0.3, (429, {"Retry-After": "0.3"})))
        s = self.streamer(sink.url)
        log_all(s, events("a", 10))
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        seen = [t for t, p, a in sink.seen if p == "/api/events"]
        self.assertEqual(len(seen), 2)
        # the 429 left the server 0.3 s after the request arrived; the retry must come
        # at least 0.3 s after that, so at least 0.6 s after the first request
        self.assertGreaterEqual(seen[1] - seen[0], 0.58)


class SharedPacingTest(DeliveryTestCase):
    """Two Streamers of one access key share one rate-limit budget."""

    def test_two_streamers_one_budget(self):
        """Pacing: two Streamers of one key against a limit get at most one 429 between them."""
        key = "ist_shared_pacing_key_%d" % os.getpid()
        sink = self.sink(rate_limit=20, window=1.0)
        a = self.streamer(sink.url, access_key=key, bucket_key="shared-a")
        b = self.streamer(sink.url, access_key=key, bucket_key="shared-b")
        self.assertIs(a._session.worker.budget, b._session.worker.budget)
        first, second = events("a", 150), events("b", 150)
        log_all(a, first)
        log_all(b, second)
        self.assertTrue(a.flush(15), a.stats()["last_error"])
        self.assertTrue(b.flush(15), b.stats()["last_error"])
        self.assertExactlyOnce(self.received(sink), first + second)
        self.assertLessEqual(sink.rate_limited, 1)


class SplitTest(DeliveryTestCase):
    """413: the batch is split until it fits."""

    def test_413_splits_until_accepted(self):
        """413: a server taking at most 3 events a request gets every event, once, in order."""
        def rule(handler, path):
            if path == "/api/events" and len(json.loads(handler.body.decode("utf-8"))) > 3:
                return 413
            return None
        sink = self.sink(rule=rule)
        s = self.streamer(sink.url, buffer_size=10)
        expected = events("t", 30)
        log_all(s, expected)
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertExactlyOnce(self.received(sink), expected)
        self.assertEqual(self.received(sink), expected)
        self.assertEqual(s.stats()["dead_lettered"], 0)

    def test_single_event_too_large_is_dead_lettered(self):
        """413: one event that is still too large alone is dead-lettered; the rest arrive."""
        def rule(handler, path):
            if path == "/api/events" and b'"huge"' in handler.body:
                return 413
            return None
        sink = self.sink(rule=rule)
        spool_dir = self.tempdir()
        s = self.streamer(sink.url, spool_dir=spool_dir)
        good = events("t", 9)
        log_all(s, good[:4] + [("huge", 1)] + good[4:])
        self.assertFalse(s.flush(10))            # one event was dead-lettered
        self.assertExactlyOnce(self.received(sink), good)
        self.assertEqual(s.stats()["dead_lettered"], 1)
        files = glob.glob(os.path.join(spool_dir, "*", "deadletter.jsonl"))
        with open(files[0], encoding="utf-8") as handle:
            record = json.loads(handle.readline())
        self.assertEqual((record["status"], json.loads(record["body"])[0]["key"]), (413, "huge"))


class PoisonTest(DeliveryTestCase):
    """400: bisect down to the rejected events and dead-letter only those."""

    def test_poison_events_dead_lettered_rest_delivered(self):
        """400: good events all delivered; each poison one in deadletter.jsonl with the reply."""
        def rule(handler, path):
            if path != "/api/events":
                return None
            body = json.loads(handler.body.decode("utf-8"))
            body = body if isinstance(body, list) else [body]
            if any(str(e.get("key", "")).startswith("poison") for e in body):
                return (400, {"X-Why": "poison"})
            return None
        sink = self.sink(rule=rule)
        spool_dir = self.tempdir()
        s = self.streamer(sink.url, spool_dir=spool_dir)
        good = events("g", 40)
        poison = [("poison_%d" % i, i) for i in range(4)]
        mixed = list(good)
        for index, event in zip((3, 10, 11, 37), poison):
            mixed.insert(index, event)
        log_all(s, mixed)
        self.assertFalse(s.flush(10))            # the poison events were dead-lettered
        self.assertExactlyOnce(self.received(sink), good)
        self.assertEqual(s.stats()["dead_lettered"], 4)
        files = glob.glob(os.path.join(spool_dir, "*", "deadletter.jsonl"))
        self.assertEqual(len(files), 1)
        self.assertEqual(stat.S_IMODE(os.stat(files[0]).st_mode), 0o600)
        with open(files[0], encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        dead = []
        for record in records:
            self.assertEqual(record["status"], 400)
            self.assertIn("scripted 400", record["reply"])
            self.assertEqual(record["bucketKey"], "delivery-bucket")
            dead.extend((e["key"], e["value"]) for e in json.loads(record["body"]))
        self.assertExactlyOnce(dead, poison)
        with open(files[0], encoding="utf-8") as handle:
            self.assertNotIn(KEY, handle.read())


class PauseTest(DeliveryTestCase):
    """401/403 and 402: spool, one error, pause, probe, resume."""

    def check_pause(self, status, reason):
        refusing = [True]

        def rule(handler, path):
            return status if refusing[0] else None
        sink = self.sink(rule=rule)
        spool_dir = self.tempdir()
        expected = events("p", 10)
        with self.assertLogs("isstreamer_lite", "INFO") as logs:
            s = self.streamer(sink.url, spool_dir=spool_dir, pause_interval=0.1)
            log_all(s, expected)
            # After the events are logged the worker refuses at most one request without
            # them, then one with them (and spools them), then probes: wait for three.
            with sink.changed:
                start = len(sink.seen)
            self.assertTrue(sink.wait_seen(lambda seen: len(seen) >= start + 3))
            self.assertEqual(s.stats()["paused"], reason)
            self.assertEqual(s.stats()["spooled"], 10)
            self.assertTrue(spool_segments(spool_dir))
            self.assertEqual(sorted((e["key"], e["value"]) for e in spooled_events(spool_dir)),
                             expected)
            self.assertFalse(s.flush(0.2))
        errors = [r for r in logs.records if r.levelno >= logging.ERROR]
        self.assertEqual(len(errors), 1, [r.getMessage() for r in errors])
        self.assertNotIn(KEY, errors[0].getMessage())
        self.assertEqual(self.received(sink), [])
        refusing[0] = False
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertExactlyOnce(self.received(sink), expected)
        self.assertEqual(s.stats()["paused"], "")
        self.assertTrue(s.close(5))
        self.assertEqual(spool_segments(spool_dir), [])
        return errors[0].getMessage()

    def test_401_spools_pauses_and_resumes(self):
        """Pause: 401 spools the batch, logs one error, pauses, delivers when accepted again."""
        message = self.check_pause(401, "key_rejected")
        self.assertIn("access key", message)

    def test_402_spools_pauses_and_resumes(self):
        """Pause: 402 (quota) spools, logs one error, pauses, delivers when accepted again."""
        message = self.check_pause(402, "quota")
        self.assertIn("event limit", message)
        self.assertIn("monthly quota of events", message)


class MonthlyQuotaTest(DeliveryTestCase):
    """stats() and status count the month's events; one warning past monthly_quota."""

    def quota_warnings(self, logs):
        return [r.getMessage() for r in logs.records if "monthly quota of" in r.getMessage()]

    def test_one_warning_when_the_projection_passes_the_quota(self):
        """Quota: the projection passing monthly_quota warns once, naming both numbers."""
        sink = self.sink()
        s = self.streamer(sink.url, monthly_quota=100)
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            for round in range(3):
                log_all(s, events("q%d" % round, 20))
                self.assertTrue(s.flush(10), s.stats()["last_error"])
        warnings = self.quota_warnings(logs)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("more than the monthly quota of 100 (monthly_quota", warnings[0])
        self.assertNotIn(KEY[:-4], warnings[0])
        month = s.stats()["month"]
        self.assertEqual((month["month"], month["delivered"], month["quota"]),
                         (lite._month_of(time.time()), 60, 100))
        self.assertGreater(month["projected"], 100)

    def test_no_warning_with_quota_0_or_an_enterprise_rate_limit(self):
        """Quota: monthly_quota=0, or X-RateLimit-Limit of 60 a window, never warns."""
        for limit, quota in ((None, 0), (60, 100)):
            with self.subTest(rate_limit=limit, monthly_quota=quota):
                sink = self.sink(rate_limit=limit) if limit else self.sink()
                s = self.streamer(sink.url, monthly_quota=quota)
                records = []
                handler = logging.Handler()
                handler.emit = records.append
                logging.getLogger("isstreamer_lite").addHandler(handler)
                self.addCleanup(logging.getLogger("isstreamer_lite").removeHandler, handler)
                log_all(s, events("e", 30))
                self.assertTrue(s.flush(10), s.stats()["last_error"])
                self.assertEqual([r.getMessage() for r in records], [])
                self.assertIsNone(s.stats()["month"]["quota"])
                self.assertEqual(s.stats()["month"]["delivered"], 30)

    def test_month_kept_across_runs_and_shown_by_status(self):
        """Quota: the month's count survives the run (state.json); status shows it."""
        sink, spool = self.sink(), self.tempdir()
        for run in range(2):
            s = self.streamer(sink.url, spool_dir=spool, monthly_quota=10 ** 9)
            log_all(s, events("r%d" % run, 5))
            self.assertTrue(s.close(10), s.stats()["last_error"])
        self.assertEqual(s.stats()["month"]["delivered"], 10)
        self.assertRegex(self.status_text(spool),
                         r"this month \(%s, UTC\): 10 events delivered, about [\d,]+ by its "
                         r"end at the recent rate, within the monthly quota of 1,000,000,000"
                         % lite._month_of(time.time()))

    def status_text(self, spool):
        ini = os.path.join(self.tempdir(), "empty.ini")
        open(ini, "w").close()
        out = io.StringIO()
        with mock.patch.dict(os.environ, {"IS_MONTHLY_QUOTA": "1000000000"}), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            lite.main(["status", "--spool-dir", spool, "--ini", ini])
        return out.getvalue()

    def test_bad_monthly_quota_is_refused_naming_value_and_rule(self):
        """Quota: a negative, fractional or non-number monthly_quota is refused at construction."""
        for value in (-1, 1.5, "many", True):
            with self.subTest(value=value):
                with self.assertRaises(ValueError) as caught:
                    self.streamer("http://127.0.0.1:9", monthly_quota=value)
                self.assertIn("monthly_quota is %r; it must be a whole number of events a "
                              "month, at least 0" % (value,), str(caught.exception))
        with mock.patch.dict(os.environ, {"IS_MONTHLY_QUOTA": "lots"}):
            with self.assertRaises(lite.ConfigError) as caught:
                self.streamer("http://127.0.0.1:9")
        self.assertIn("IS_MONTHLY_QUOTA is 'lots'", str(caught.exception))
        folder = self.tempdir()
        ini = os.path.join(folder, "isstreamer.ini")
        with open(ini, "w") as handle:
            handle.write("[isstreamer.client_config]\nmonthly_quota = 500_000\n")
        for env, expected in (({}, 500000), ({"IS_MONTHLY_QUOTA": "0"}, 0)):
            with mock.patch.dict(os.environ, env):
                s = self.streamer("http://127.0.0.1:9", ini_file_location=ini)
            self.assertEqual(s._settings.monthly_quota, expected)
        self.assertEqual(self.streamer("http://127.0.0.1:9")._settings.monthly_quota,
                         3000000)


class OverflowTest(DeliveryTestCase):
    """max_queue: events beyond it go to the spool while the server is down."""

    def test_overflow_spooled_then_delivered(self):
        """Overflow: beyond max_queue events are spooled, and delivered once the server is up."""
        outage = Outage(self, up=False)
        spool_dir = self.tempdir()
        s = self.streamer(outage.url, spool_dir=spool_dir, max_queue=20, max_retries=10 ** 6)
        expected = events("o", 100)
        log_all(s, expected)
        self.assertTrue(self.wait_stats(s, lambda st: st["spooled"] >= 80), s.stats())
        self.assertLessEqual(s.stats()["queued"], 20)
        self.assertGreaterEqual(len(spooled_events(spool_dir)), 80)
        outage.up()
        self.assertTrue(s.flush(10), s.stats()["last_error"])
        self.assertExactlyOnce(self.received(outage), expected)
        self.assertEqual(s.stats()["dropped"], {})


class BlockedQueueTest(Issue9Case):
    """max_queue holds even while the worker waits on a request."""

    def test_max_queue_enforced_while_request_hangs(self):
        """Overflow: 20,000 events with max_queue=1000 and a hung request: the rest is spooled."""
        sink = self.sink(rule=hang_forever)
        spool = self.tempdir()
        s = self.streamer(sink.url, spool_dir=spool, max_queue=1000, timeout=30.0)
        self.addCleanup(sink.released.set)          # before the Streamer's close
        for i in range(20000):
            s.log("v", i)
        self.assertFalse(s.flush(1.0))
        limit = 1000 + 10

        def settled():
            return s.stats()["queued"] <= limit and \
                len(disk_values(spool)) + s.stats()["queued"] >= 20000
        bounded_poll(settled, 4.0)
        stats = s.stats()
        self.assertLessEqual(stats["queued"], limit, "queued in memory while blocked")
        self.assertEqual(stats["dropped"], {})
        self.assertEqual(len(disk_values(spool)) + stats["queued"], 20000)


class DroppedCloseTest(Issue9Case):
    """close() never claims success after events were dropped."""

    def test_close_false_after_spool_full_drops(self):
        """close: spool_max_bytes=2000, server down, 5,000 events: False and drops counted."""
        s = self.streamer(dead_url(), spool_max_bytes=2000)
        for i in range(5000):
            s.log("v", i)
        ok = s.close(2)
        self.assertNotEqual(s.stats()["dropped"], {}, "nothing counted as dropped")
        self.assertFalse(ok, "close() answered True after dropping %s" % s.stats()["dropped"])

    def dropped_in_an_outage(self):
        """A Streamer that dropped events (full spool) while the server was down, now back."""
        outage = Outage(self, up=False)
        s = self.streamer(outage.url, spool_max_bytes=4000, max_retries=1)
        for i in range(2000):
            s.log("v", i)
        self.assertTrue(bounded_poll(lambda: s.stats()["dropped"], 30), s.stats())
        outage.up()
        return s

    def test_close_false_after_drops_during_an_outage_the_server_came_back_from(self):
        """close: events dropped (full spool) while the server was down, then it is back: False."""
        s = self.dropped_in_an_outage()
        self.assertFalse(s.close(10), "close() answered True after dropping %s"
                         % s.stats()["dropped"])
        self.assertEqual(s.stats()["queued"], 0)

    def test_flush_false_after_drops_it_did_not_see(self):
        """flush: events dropped before the call make the next answer False, once."""
        s = self.dropped_in_an_outage()
        answers = [s.flush(30), s.flush(30)]
        self.assertEqual(answers, [False, True], s.stats())


class DeadlineTest(DeliveryTestCase):
    """flush(timeout) and close(timeout) return by their deadline; close spools."""

    SLACK = 0.5     # scheduling on a loaded 2-core machine

    def check_deadlines(self, url, spool_dir, sink=None):
        s = self.streamer(url, spool_dir=spool_dir, timeout=10.0)
        if sink is not None:
            self.addCleanup(sink.released.set)      # before the Streamer's own cleanup
        expected = events("l", 25)
        log_all(s, expected)
        started = time.monotonic()
        self.assertFalse(s.flush(0.3))
        self.assertLess(time.monotonic() - started, 0.3 + self.SLACK)
        started = time.monotonic()
        self.assertFalse(s.close(0.8))
        self.assertLess(time.monotonic() - started, 0.8 + self.SLACK)
        assert_worker_stopped(s, 5)
        on_disk = [(e["key"], e["value"]) for e in spooled_events(spool_dir)]
        self.assertExactlyOnce(on_disk, expected)
        self.assertEqual(s.stats()["dropped"], {})

    def test_server_down(self):
        """Deadlines: with the server down, flush and close return in time; all is spooled."""
        outage = Outage(self, up=False)
        self.check_deadlines(outage.url, self.tempdir())

    def test_server_never_answers(self):
        """Deadlines: with a server that accepts but never answers, the same holds."""
        sink = self.sink()
        sink.script("*", *[("hang", 15.0)] * 20)
        self.check_deadlines(sink.url, self.tempdir(), sink)
        self.assertEqual(sink.events, [])

    def test_a_dripping_answer_is_cut_at_the_request_deadline(self):
        """Deadlines: a server dripping a byte every 0.1 s is cut off at timeout, overall."""
        def drip(conn, number, stop):
            conn.recv(65536)
            for byte in b"HTTP/1.1 204 No Content\r\nX-Drip: " + b"x" * 1000:
                if stop.wait(0.1):
                    return
                conn.send(bytes([byte]))
        server = RawServer(self, drip)
        s = self.streamer(server.url, timeout=0.4, max_retries=100)
        log_all(s, events("d", 5))
        self.assertFalse(s.flush(2.0))
        # A per-read timeout never fires here (a byte comes every 0.1 s): only an overall
        # deadline ends each attempt, so several attempts fit in 2 s.
        self.assertGreaterEqual(server.connections, 3, s.stats())
        self.assertIn("timed out", s.stats()["last_error"])
        self.assertFalse(closed_and_stopped(s, 0.2))


class OnErrorTest(DeliveryTestCase):
    """on_error(exc, events) on each failure; its exceptions are logged."""

    def test_called_with_exception_and_events(self):
        """on_error: gets a DeliveryError with status and reason, and the batch's events."""
        calls = []
        sink = self.sink()
        sink.script("/api/events", 503)
        # One batch, formed by flush(): a stall in log_all cannot split it.
        s = self.streamer(sink.url, on_error=lambda exc, batch: calls.append((exc, batch)),
                          buffer_size=100, flush_interval=3600)
        expected = events("e", 10)
        log_all(s, expected)
        self.assertTrue(s.flush(10))
        self.assertEqual(len(calls), 1)
        exc, batch = calls[0]
        self.assertIsInstance(exc, lite.DeliveryError)
        self.assertEqual((exc.status, exc.reason, exc.bucket_key),
                         (503, "server_error", "delivery-bucket"))
        self.assertEqual([(e[0], e[1]) for e in batch], expected)

    def test_flush_and_close_inside_it_answer_without_waiting_for_the_worker(self):
        """on_error: flush() and close() in it answer at once; the close happens after."""
        answers, answered = [], threading.Event()

        def callback(exc, batch):
            if not answered.is_set():
                answers.extend([s.flush(), s.close()])
                answered.set()
        sink = self.sink()
        sink.script("/api/events", 503)
        s = self.streamer(sink.url, on_error=callback, wait_timeout=60.0)
        log_all(s, events("e", 10))
        # The worker calls on_error: waiting for itself would take wait_timeout (60 s).
        self.assertTrue(answered.wait(20), "flush() or close() inside on_error waited")
        self.assertEqual(answers, [False, False])
        assert_worker_stopped(s, 20)
        self.assertEqual(s.stats()["state"], "stopped")

    def test_exception_in_callback_is_logged_not_raised(self):
        """on_error: an exception inside it is logged and delivery goes on."""
        def callback(exc, batch):
            raise RuntimeError("callback bug")
        sink = self.sink()
        sink.script("/api/events", 500, 500)
        s = self.streamer(sink.url, on_error=callback)
        with self.assertLogs("isstreamer_lite", "ERROR") as logs:
            log_all(s, events("e", 10))
            self.assertTrue(s.flush(10))
        self.assertTrue(any("on_error" in line and "callback bug" in line
                            for line in logs.output), logs.output)
        self.assertExactlyOnce(self.received(sink), events("e", 10))


SYNC_CALLBACK_CHILD = r'''
import os, sys, threading
import isstreamer_lite as lite
api_base, spool_dir, then = sys.argv[1:4]      # then: "flush-close" or "exit"
calls = []
def on_error(exc, events):
    calls.append(s.flush(0.1))
s = lite.Streamer("", "sync-bucket", "ist_issue9_access_key_0123456789",
                  ini_file_location=False, api_base=api_base, spool_dir=spool_dir,
                  use_async=False, on_error=on_error, backoff_base=0.01, backoff_cap=0.05)
def scenario():
    for i in range(10):
        s.log("v", i)
    if then == "flush-close":
        s.flush(5)
thread = threading.Thread(target=scenario, daemon=True)
thread.start()
thread.join(20)
if thread.is_alive():
    sys.stdout.write("deadlock\n")
    sys.stdout.flush()
    os._exit(0)
sys.stdout.write("calls %d answers %s\n" % (len(calls), sorted(set(calls))))
if then == "exit":
    sys.stdout.flush()
    os._exit(0)
sys.stdout.write("closed %s\n" % s.close(5))
'''


class SyncModeTest(Issue9Case):
    """use_async=False: callbacks may call back in; deadlines hold."""

    def test_flush_from_on_error_answers_without_pumping(self):
        """Sync mode: server down, on_error calls flush(0.2): log() returns, flush() answers False."""
        out = self.finish(self.child(SYNC_CALLBACK_CHILD, dead_url(), self.tempdir(), "exit"))
        self.assertNotIn("deadlock", out)
        self.assertIn("answers [False]", out)

    def test_sync_callback_reentry_and_flush_deadline(self):
        """Sync mode: on_error calling flush() does not deadlock; flush(0.3) is bounded."""
        with self.subTest("on_error calls flush"):
            sink = self.sink()
            sink.script("/api/events", 500)
            out = self.finish(self.child(SYNC_CALLBACK_CHILD, sink.url, self.tempdir(),
                                         "flush-close"))
            self.assertNotIn("deadlock", out)
            self.assertIn("closed True", out)
            self.assertExactlyOnce([v for _, v in self.received(sink)], range(10))
        with self.subTest("flush(0.3) against a silent server"):
            sink = self.sink(rule=hang_forever)
            s = self.streamer(sink.url, use_async=False, timeout=3.0)
            self.addCleanup(sink.released.set)
            for i in range(5):
                s.log("v", i)
            started = time.monotonic()
            self.assertFalse(s.flush(0.3))
            self.assertLess(time.monotonic() - started, 1.0)


REPLAY_CHILD = r'''
import sys
import isstreamer_lite as lite
api_base, spool_dir, bucket = sys.argv[1:4]
s = lite.Streamer("", bucket, "ist_test_access_key_0123456789", ini_file_location=False,
                  api_base=api_base, spool_dir=spool_dir, backoff_base=0.01, backoff_cap=0.05)
sys.stdout.write("closed %s\n" % s.close(5))
'''


class FlushAfterCloseTest(Issue9Case):
    """After close(), flush() tells the truth and holds no spool segment."""

    def test_flush_after_close_truthful_and_unlocks(self):
        """flush after close: False while spooled; the segments stay free for another process."""
        spool = self.tempdir()
        s = self.streamer(dead_url(), spool_dir=spool, max_retries=1)
        expected = events("c", 30)
        log_all(s, expected)
        self.assertFalse(closed_and_stopped(s, 0.5))
        self.assertEqual(len(spooled_events(spool)), 30)
        self.assertFalse(s.flush(0.2), "flush() after close() answered True with 30 spooled")
        self.assertFalse(s.flush(0.2), "second flush() after close() answered True")
        sink = self.sink()
        out = self.finish(self.child(REPLAY_CHILD, sink.url, spool, "delivery-bucket"))
        self.assertIn("closed True", out)
        self.assertExactlyOnce(self.received(sink), expected)


class SlowCallbackCloseTest(Issue9Case):
    """close(timeout) while the worker is inside on_error."""

    def test_close_during_slow_on_error_spools_once(self):
        """close: during a 1 s on_error, every event is spooled once and no fd is left open."""
        started, finished, never = threading.Event(), threading.Event(), threading.Event()
        self.addCleanup(never.set)

        def on_error(exc, batch):
            started.set()
            try:
                never.wait(1.0)             # the slow callback under test
            finally:
                finished.set()
        sink = self.sink(rule=lambda handler, path: 500 if path == "/api/events" else None)
        spool = self.tempdir()
        before = threading.enumerate()
        s = self.streamer(sink.url, spool_dir=spool, on_error=on_error, max_retries=1)
        workers = self.worker_threads(before)
        for i in range(25):
            s.log("v", i)
        self.assertTrue(started.wait(5), "on_error was never called")
        self.assertFalse(closed_and_stopped(s, 0.3))
        self.assertTrue(finished.wait(5))
        for worker in workers:
            worker.join(5)
        counts = disk_values(spool)
        missing = [v for v in range(25) if not counts[v]]
        twice = sorted(v for v, n in counts.items() if n > 1)
        open_fds = fds_under(spool) or []           # None where there is no /proc
        self.assertEqual((missing, twice, open_fds), ([], [], []),
                         "(not spooled, spooled twice, spool files left open)")


class CallbackExitTest(Issue9Case):
    """An on_error raising SystemExit or KeyboardInterrupt cannot stop delivery."""

    def setUp(self):
        Issue9Case.setUp(self)
        if hasattr(threading, "excepthook"):        # keep a dying worker's trace quiet
            patcher = mock.patch.object(threading, "excepthook", lambda args: None)
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_on_error_raising_system_exit(self):
        """on_error: SystemExit/KeyboardInterrupt in it: delivery goes on, or close() spools."""
        for exc_type in (SystemExit, KeyboardInterrupt):
            with self.subTest("server 500 then ok", raises=exc_type.__name__):
                def on_error(exc, batch, exc_type=exc_type):
                    raise exc_type(3)
                sink = self.sink()
                sink.script("/api/events", 500)
                s = self.streamer(sink.url, on_error=on_error)
                expected = events("x", 50)
                log_all(s, expected)
                self.assertTrue(s.close(5), s.stats())
                self.assertExactlyOnce(self.received(sink), expected)
        with self.subTest("server down"):
            def on_error(exc, batch):
                raise SystemExit(3)
            spool = self.tempdir()
            s = self.streamer(dead_url(), spool_dir=spool, on_error=on_error)
            for i in range(5000):
                s.log("v", i)
            self.assertFalse(closed_and_stopped(s, 2))
            on_disk = disk_values(spool)
            missing = [i for i in range(5000) if not on_disk[i]]
            self.assertEqual(len(missing), 0, "%d of 5000 events neither delivered nor "
                             "spooled" % len(missing))


class DoneWhenTest(DeliveryTestCase):
    """The issue's three acceptance scenarios, with their figures printed."""

    def test_outage_of_5s_loses_nothing_and_log_stays_fast(self):
        """Done when 1: a 5 s outage (1 s by default) amid events 10 ms apart: 0 lost, log() < 50 ms."""
        outage = Outage(self)
        s = self.streamer(outage.url, flush_interval=1.0)
        seconds = full_or(5.0, 1.0)
        expected = events("o", 100 + int(seconds * 100) + 50)   # 0.5 s before, 1.5 s after
        durations = []
        thread = None
        started = time.perf_counter()
        for i, (key, value) in enumerate(expected):
            if i == 50:
                thread = outage.later(True, seconds)    # down now, up in 5 s (or 1 s)
            before = time.perf_counter()
            s.log(key, value)
            durations.append(time.perf_counter() - before)
            pause = started + (i + 1) * 0.01 - time.perf_counter()
            if pause > 0:
                time.sleep(pause)           # pacing the events, not synchronising
        self.assertTrue(s.flush(20), s.stats()["last_error"])
        thread.join(10)
        got = self.received(outage)
        counts = collections.Counter(got)
        stats = s.stats()
        report("done-when 1", lost=len(set(expected) - set(counts)),
               duplicates=sum(n - 1 for n in counts.values()),
               max_log_ms=max(durations) * 1000, retried=stats["retried"],
               spooled=stats["spooled"], replayed=stats["replayed"],
               total_s=time.perf_counter() - started)
        self.assertEqual(len(set(expected) - set(counts)), 0)
        self.assertLess(max(durations), 0.05)
        self.assertGreater(stats["retried"], 0)

    def test_down_for_the_whole_run_then_new_process_delivers(self):
        """Done when 2: server down all run: close() < 20 s, spooled; a new process sends all."""
        outage = Outage(self, up=False)
        spool_dir = self.tempdir()
        s = lite.Streamer(bucket_key="dw2-bucket", access_key=KEY, ini_file_location=False,
                          api_base=outage.url, spool_dir=spool_dir,
                          wait_timeout=full_or(3.0, 1.0))
        self.addCleanup(s.close, 1.0)
        expected = events("d", 300)
        log_all(s, expected)
        started = time.monotonic()
        closed = s.close()
        close_seconds = time.monotonic() - started
        self.assertFalse(closed)
        self.assertLess(close_seconds, 20.0)
        on_disk = [(e["key"], e["value"]) for e in spooled_events(spool_dir)]
        self.assertExactlyOnce(on_disk, expected)
        outage.up()
        script = (
            "import json, os, sys\n"
            "import isstreamer_lite as lite\n"
            "s = lite.Streamer(bucket_key='dw2-replayer', ini_file_location=False,\n"
            "                  api_base=sys.argv[1], spool_dir=sys.argv[2],\n"
            "                  flush_interval=0.05, backoff_base=0.01, backoff_cap=0.05)\n"
            "flushed = s.flush(20.0)\n"
            "closed = s.close(10.0)\n"
            "print(json.dumps({'flushed': flushed, 'closed': closed,\n"
            "                  'replayed': s.stats()['replayed']}))\n")
        started = time.monotonic()
        result = subprocess.run(PYTHON + ["-c", script, outage.url, spool_dir],
                                env=child_env(IS_ACCESS_KEY=KEY), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        replay_seconds = time.monotonic() - started
        self.assertEqual(result.returncode, 0, result.stderr)
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
        got = self.received(outage, "dw2-bucket")
        counts = collections.Counter(got)
        report("done-when 2", close_s=close_seconds, lost=len(set(expected) - set(counts)),
               duplicates=sum(n - 1 for n in counts.values()), spooled_on_disk=len(on_disk),
               replay_process_s=replay_seconds, child=outcome)
        self.assertEqual(outcome, {"flushed": True, "closed": True, "replayed": 300})
        self.assertExactlyOnce(got, expected)
        self.assertEqual(spool_segments(spool_dir), [])

    def test_burst_of_900_paced_under_rate_limit(self):
        """Done when 3: 900 events (300 by default) against 30 requests/1 s: calls of 10, 0 lost, <= one 429."""
        limit, window, buffer_size, count = 30, 1.0, 10, full_or(900, 300)
        sink = self.sink(SizedFaultSink, rate_limit=limit, window=window)
        s = self.streamer(sink.url, access_key="ist_done_when_3_%d" % os.getpid(),
                          buffer_size=buffer_size, flush_interval=1.0)
        expected = events("b", count)
        started = time.monotonic()
        log_all(s, expected)
        self.assertTrue(s.flush(20), s.stats()["last_error"])
        elapsed = time.monotonic() - started
        got = self.received(sink)
        counts = collections.Counter(got)
        report("done-when 3", lost=len(set(expected) - set(counts)),
               duplicates=sum(n - 1 for n in counts.values()), status_429=sink.rate_limited,
               elapsed_s=elapsed, requests=s.stats()["requests"], largest=max(sink.sizes))
        self.assertExactlyOnce(got, expected)
        self.assertLessEqual(sink.rate_limited, 1)
        # The contract: a call carries at most buffer_size events, so 900 take 90 calls.
        self.assertEqual(max(sink.sizes), buffer_size)
        self.assertGreaterEqual(s.stats()["requests"], count // buffer_size)


# --- Streamer ----------------------------------------------------------------
# Buckets, batching, threads, processes, signals, SIGKILL and fork.

class BucketTest(LiteTestCase):
    """set_bucket sends later events to the new bucket only."""

    def test_set_bucket_splits_unflushed_events(self):
        """set_bucket: events before go to the old bucket, after to the new; requests never mix."""
        sink = self.sink(RecordingSink)
        s = self.streamer(sink, buffer_size=100, flush_interval=30)
        s.log("a", 1)
        s.log("b", 2)
        s.set_bucket("Second", "second-bucket")
        s.log("c", 3)
        self.assertTrue(s.close(5))
        self.assertEqual(self.received(sink, "test-bucket"), [("a", 1), ("b", 2)])
        self.assertEqual(self.received(sink, "second-bucket"), [("c", 3)])
        self.assertEqual(sink.buckets["second-bucket"], "Second")
        self.assertEqual(s.bucket_key, "second-bucket")
        events_requests = [h["X-IS-BucketKey"] for p, h, _ in sink.seen if p == "/api/events"]
        self.assertEqual(events_requests, ["test-bucket", "second-bucket"])

    def test_set_bucket_creates_bucket_before_its_events(self):
        """set_bucket: the new bucket is created before any of its events is sent."""
        sink = self.sink(RecordingSink)
        s = self.streamer(sink)
        s.set_bucket("", "other")
        s.log("x", 1)
        self.assertTrue(s.close(5))
        order = [(p, h.get("X-IS-BucketKey")) for p, h, _ in sink.seen]
        self.assertLess(order.index(("/api/buckets", "other")),
                        order.index(("/api/events", "other")))

    def test_bucket_created_at_construction(self):
        """Bucket: the bucket is created even before anything is logged."""
        sink = self.sink()
        s = self.streamer(sink)
        self.assertTrue(s.flush(5))
        self.assertIn("test-bucket", sink.buckets)


class BatchingTest(LiteTestCase):
    """When the worker sends: full buffer, flush_interval, flush() and close()."""

    def test_full_buffer_is_sent_without_flush(self):
        """Batching: buffer_size events are sent without waiting for flush_interval."""
        sink = self.sink()
        s = self.streamer(sink, buffer_size=5, flush_interval=3600)
        for i in range(5):
            s.log("k", i)
        self.assertTrue(sink.wait_for(5, 10))

    def test_flush_interval_sends_a_partial_batch(self):
        """Batching: a partial batch goes once flush_interval has passed."""
        sink = self.sink()
        s = self.streamer(sink, buffer_size=100, flush_interval=0.05)
        s.log("k", 1)
        self.assertTrue(sink.wait_for(1, 10))

    def test_flush_returns_true_when_delivered(self):
        """flush: returns True once everything logged before it is delivered."""
        sink = self.sink()
        s = self.streamer(sink, buffer_size=100, flush_interval=3600)
        for i in range(42):
            s.log("k", i)
        self.assertTrue(s.flush(5))
        self.assertEqual(len(sink.events), 42)

    def test_close_is_idempotent_and_context_manager(self):
        """close: idempotent; with-statement closes and delivers."""
        sink = self.sink()
        with self.streamer(sink, buffer_size=100, flush_interval=3600) as s:
            s.log("k", 1)
        self.assertEqual(self.received(sink), [("k", 1)])
        self.assertTrue(s.close(1))
        self.assertTrue(s.stats()["closed"])

    def test_threads_exactly_once_in_order(self):
        """log: 8 threads x 5,000 calls arrive exactly once each, in per-thread order."""
        sink = self.sink()
        s = self.streamer(sink, buffer_size=500, max_queue=100000)
        start = threading.Event()

        def produce(n):
            start.wait(10)
            for i in range(5000):
                s.log("t%d" % n, i)
        threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        start.set()
        for t in threads:
            t.join(60)
        self.assertTrue(s.close(30))
        per_thread = collections.defaultdict(list)
        for key, value in self.received(sink):
            per_thread[key].append(value)
        self.assertEqual(sorted(per_thread), ["t%d" % n for n in range(8)])
        for key, values in per_thread.items():
            self.assertEqual(values, list(range(5000)), key)

    def test_close_between_the_closed_check_and_the_key_cache_never_raises(self):
        """log: a close() right after log() found the Streamer open raises nothing in log()."""
        sink = self.sink()
        s = self.streamer(sink)
        closed = []

        class ClosingKeys(set):
            """The key cache; close() runs in the moment log() looks at it."""

            def __len__(inner):
                if not closed:
                    closed.append(s.close(5))
                return set.__len__(inner)
        s._session.keys = ClosingKeys()
        s.log("new-key", 1)                 # slow path: a key not yet in the cache
        self.assertEqual(closed, [True])
        self.assertTrue(s.close(5))         # the event reopened it, or went with the close
        self.assertEqual(self.received(sink), [("new-key", 1)])

    def test_synchronous_mode_sends_in_callers_thread(self):
        """use_async=False: the caller's thread delivers when the buffer fills."""
        sink = self.sink(RecordingSink)
        s = self.streamer(sink, buffer_size=3, use_async=False)
        self.assertIsNone(s._session.thread)
        for i in range(3):
            s.log("k", i)
        self.assertEqual(self.received(sink), [("k", 0), ("k", 1), ("k", 2)])
        s.log("k", 3)
        self.assertEqual(len(sink.events), 3)
        self.assertTrue(s.flush(5))
        self.assertEqual(len(sink.events), 4)
        s.log("k", 4)
        self.assertTrue(s.close(5))
        self.assertEqual([v for _, v in self.received(sink)], [0, 1, 2, 3, 4])


class OfflineTest(LiteTestCase):
    """offline=True writes epoch,key,value rows and sends nothing."""

    def test_rows_appended_never_truncated(self):
        """offline: CSV rows are appended across Streamers, quoting intact."""
        path = os.path.join(self.tempdir(), "out.csv")
        for run in range(2):
            s = lite.Streamer("b", access_key="", offline=True, offline_file=path,
                              ini_file_location=False, api_base="http://127.0.0.1:9")
            s.log("run", run, epoch=1000.5 + run)
            s.log("text", 'a, "quoted" value')
            self.assertTrue(s.close(5))
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        self.assertEqual(rows, [["1000.5", "run", "0"], [rows[1][0], "text", 'a, "quoted" value'],
                                ["1001.5", "run", "1"], [rows[3][0], "text", 'a, "quoted" value']])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


class ProcessTest(LiteTestCase):
    """Import, exit and the smoke test, in fresh interpreters."""

    def run_python(self, code, timeout=60, **env):
        return subprocess.run(PYTHON + ["-c", code], env=child_env(**env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout)

    def test_import_has_no_side_effects(self):
        """Import: no thread, no network modules (ssl, http.client, urllib.request)."""
        result = self.run_python(
            "import sys, threading, isstreamer_lite\n"
            "print(threading.active_count(), sorted(m for m in ('ssl', 'http.client', "
            "'urllib.request', 'uuid', 'configparser') if m in sys.modules))")
        self.assertEqual(result.stdout.split("\n")[0], "1 []", result.stderr)

    def test_exit_without_close_delivers(self):
        """Exit: a script that never calls close() delivers everything it logged."""
        sink = self.sink()
        result = self.run_python(
            "import isstreamer_lite\n"
            "s = isstreamer_lite.Streamer('b', 'exit-bucket', 'ist_k', ini_file_location=False,"
            " api_base=%r, spool_dir=%r, buffer_size=7, flush_interval=60)\n"
            "for i in range(100): s.log('k', i)\n" % (sink.url, self.tempdir()))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([v for _, v in self.received(sink)], list(range(100)))

    def test_exit_hook_waits_for_a_late_worker_to_spool(self):
        """Exit: a worker not done by exit_timeout (starved of CPU) still spools it all."""
        spool = self.tempdir()
        result = self.run_python(
            "import threading, isstreamer_lite as lite\n"
            "given_up = threading.Event()\n"
            "finish, write = lite.Streamer._finish_close, lite._Actions.spool\n"
            "def finish_close(self, *args, **kwargs):\n"
            "    try:\n"
            "        return finish(self, *args, **kwargs)\n"
            "    finally:\n"
            "        given_up.set()          # the hook's own wait is over\n"
            "def spool(self, action):       # a worker that gets no CPU until then\n"
            "    given_up.wait(30)\n"
            "    return write(self, action)\n"
            "lite.Streamer._finish_close, lite._Actions.spool = finish_close, spool\n"
            "s = lite.Streamer('b', 'late-worker', 'ist_k', ini_file_location=False,"
            " api_base=%r, spool_dir=%r, exit_timeout=0.3)\n"
            "for i in range(100): s.log('k', i)\n" % (dead_url(), spool))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(e["value"] for e in spooled_events(spool)), list(range(100)),
                         result.stderr[-600:])

    def test_smoke_test_passes(self):
        """Smoke test: python3 -m isstreamer_lite exits 0 and says OK."""
        result = subprocess.run(PYTHON + ["-m", "isstreamer_lite"], env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=60, cwd=self.tempdir())
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("OK", result.stdout)

    def test_smoke_test_without_a_writable_temp_folder(self):
        """Smoke test: no writable temp folder is a one-line failure, not a traceback."""
        out = io.StringIO()
        with mock.patch("tempfile.mkdtemp", side_effect=FileNotFoundError(
                2, "No usable temporary directory found")):
            with contextlib.redirect_stdout(out):
                status = lite.main([])
        self.assertEqual(status, 1)
        self.assertIn("no temporary folder can be written", out.getvalue())
        self.assertIn("TMPDIR", out.getvalue())

    def test_main_selftest_in_process(self):
        """Smoke test: main([]) and main(["selftest"]) return 0 and report OK."""
        import contextlib
        for argv in ([], ["selftest"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(lite.main(argv), 0, out.getvalue())
            self.assertIn("OK", out.getvalue())


class ReuseAfterCloseTest(LiteTestCase):
    """close() only flushes, as ISStreamer's did: a closed Streamer keeps working."""

    def test_close_each_iteration_then_log_again(self):
        """Reuse: 5 x (log 3; close()) delivers all 15 at debug_level 0 and 2."""
        for level in (0, 2):
            with self.subTest(debug_level=level):
                sink = self.sink()
                streamer = self.streamer(sink, debug_level=level)
                expected = []
                for loop in range(5):
                    for j in range(3):
                        expected.append(("k%d" % j, loop * 3 + j))
                        try:
                            streamer.log(*expected[-1])
                        except lite.StreamerError as exc:
                            self.fail("log() in iteration %d raised %r" % (loop, exc))
                    self.assertTrue(streamer.close(10), "close() in iteration %d" % loop)
                self.assertEqual(once_problems(self.received(sink), expected), "")

    def test_set_bucket_after_close(self):
        """Reuse: set_bucket() after close() sends later events to the new bucket."""
        sink = self.sink()
        streamer = self.streamer(sink, bucket_key="before-bucket")
        streamer.log("a", 1)
        self.assertTrue(streamer.close(10))
        streamer.set_bucket("After", "after-bucket")
        self.assertEqual(streamer.bucket_key, "after-bucket")
        streamer.log("b", 2)
        self.assertTrue(streamer.close(10))
        self.assertEqual(self.received(sink, "before-bucket"), [("a", 1)])
        self.assertEqual(self.received(sink, "after-bucket"), [("b", 2)])
        self.assertEqual(sink.buckets.get("after-bucket"), "After")



class FacadeTest(LiteTestCase):
    """Streamer is a facade: callers' threads hand events over and read what the
    worker publishes; they never write its fields."""

    def test_callers_never_write_a_started_worker_or_its_book(self):
        """Streamer: log(), flush(), close() and a reopen write no field of a started worker."""
        started, written = set(), []
        caller = threading.current_thread()
        start_thread = lite._start_thread

        def tracked(thread):
            worker = getattr(getattr(thread, "_target", None), "__self__", None)
            if isinstance(worker, lite._Worker):
                started.update((id(worker), id(worker.book)))
            start_thread(thread)

        def spy(obj, name, value):
            if threading.current_thread() is caller and id(obj) in started:
                written.append((type(obj).__name__, name))
            object.__setattr__(obj, name, value)
        for cls in (lite._Worker, lite._Book):
            cls.__setattr__ = spy
            self.addCleanup(delattr, cls, "__setattr__")
        with mock.patch.object(lite, "_start_thread", tracked):
            sink = self.sink()
            s = self.streamer(sink, buffer_size=2)
            for loop in range(3):
                for i in range(5):
                    s.log("k", loop * 5 + i)
                self.assertTrue(s.flush(10))
                self.assertTrue(s.close(10))        # the next log() reopens it
        self.assertEqual(len(self.received(sink)), 15)
        self.assertGreaterEqual(len(started), 6)
        self.assertEqual(written, [])

    def test_flush_and_close_without_a_timeout_wait_wait_timeout_of_idleness(self):
        """Streamer: _deadline() is the timeout, or wait_timeout that moves (idle)."""
        with mock.patch.object(lite, "_monotonic", lambda: 100.0):
            self.assertEqual(lite._deadline(None, 7.0), (107.0, 7.0))
            self.assertEqual(lite._deadline(2.5, 7.0), (102.5, None))

    def test_a_reopen_reads_the_spool_and_starts_its_worker_outside_the_lock(self):
        """Streamer: while a reopen builds its worker (files, a thread), others get the lock."""
        sink = self.sink()
        s = self.streamer(sink)
        self.assertTrue(s.close(5))
        free = []
        new_worker = lite._new_worker

        def building(*args, **kwargs):
            other = threading.Thread(target=lambda: free.append(
                s._lock.acquire(True, 2.0) and (s._lock.release() or True)))
            other.start()
            other.join(5)
            return new_worker(*args, **kwargs)
        with mock.patch.object(lite, "_new_worker", building):
            s.log("k", 1)                   # reopens
        self.assertEqual(free, [True])
        self.assertTrue(s.close(5))
        self.assertEqual(self.received(sink), [("k", 1)])

    def test_of_two_racing_reopens_one_run_is_kept_and_the_other_stops(self):
        """Streamer: two threads reopening at once: one new run takes both events."""
        for use_async in (True, False):
            with self.subTest(use_async=use_async):
                sink = self.sink()
                s = self.streamer(sink, use_async=use_async)
                self.assertTrue(s.close(5))
                built = []
                new_worker = lite._new_worker

                def building(*args, **kwargs):
                    worker = new_worker(*args, **kwargs)
                    built.append(worker)
                    if len(built) == 1:         # another thread reopens meanwhile
                        other = threading.Thread(target=s.log, args=("b", 2))
                        other.start()
                        other.join(10)
                    return worker
                with mock.patch.object(lite, "_new_worker", building):
                    s.log("a", 1)
                self.assertEqual(len(built), 2)
                kept = s._session.worker
                lost = [w for w in built if w is not kept]
                self.assertEqual(len(lost), 1)
                self.assertTrue(lost[0].stopped.is_set())
                self.assertTrue(s.close(5))
                self.assertEqual(sorted(self.received(sink)), [("a", 1), ("b", 2)])

    def test_a_close_ending_after_a_reopen_leaves_the_new_run_to_the_exit_hook(self):
        """Streamer: a run reopened while close() waited is not closed by it, and is at exit."""
        for use_async in (False, True):
            with self.subTest(use_async=use_async):
                sink = self.sink()
                s = self.streamer(sink, use_async=use_async)
                s.log("a", 1)
                session = s._begin_close(time.monotonic() + 5)
                s.log("b", 2)               # reopens while that close is under way
                self.assertTrue(s._finish_close(session, time.monotonic() + 5))
                self.assertEqual((repr(s)[-5:], s in lite._open_streamers), ("open>", True))
                self.assertTrue(s.close(5))
                self.assertNotIn(s, lite._open_streamers)
                self.assertEqual(sorted(self.received(sink)), [("a", 1), ("b", 2)])

STREAMING_CHILD = r'''
import sys, time
import isstreamer_lite as lite
api_base, spool_dir, start, count, mode = sys.argv[1:6]
start, count = int(start), int(count)
streamer = lite.Streamer("", "crash-bucket", "ist_crash_key", ini_file_location=False,
                         api_base=api_base, spool_dir=spool_dir, buffer_size=10,
                         flush_interval=0.1, sync_interval=0.2, durable=(mode == "durable"),
                         backoff_base=0.01, backoff_cap=0.1, exit_timeout=5.0)
for i in range(start, start + count):
    streamer.log("v", i)
    if i % 10 == 9:
        sys.stdout.write("%d\n" % i)
        sys.stdout.flush()
    time.sleep(0.0005)
sys.stdout.write("done\n")
sys.stdout.flush()
if mode != "no-close":
    closed = streamer.close(10)
    stats = streamer.stats()
    sys.stdout.write("closed %s: %s\n" % (closed, {k: stats[k] for k in (
        "requests", "rate_limited", "retried", "replayed", "spooled", "last_error")}))
'''


class CrashTest(LiteTestCase):
    """Durable mode, SIGTERM and SIGKILL: what survives a dying process."""

    def setUp(self):
        LiteTestCase.setUp(self)
        if not hasattr(signal, "SIGKILL"):
            self.skipTest("needs POSIX signals")
        self.folder = self.tempdir()
        self.spool = os.path.join(self.folder, "spool")
        self.script = os.path.join(self.folder, "child.py")
        with open(self.script, "w") as handle:
            handle.write(STREAMING_CHILD)

    def start_child(self, api_base, start, count, mode, spool=None):
        return subprocess.Popen(PYTHON + [self.script, api_base, spool or self.spool,
                                 str(start), str(count), mode], env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)

    def stream_until(self, child, last):
        """Read progress lines until ``last`` was logged; return [(value, time read)]."""
        seen = []
        for line in child.stdout:
            if line.strip() == "done":
                break
            seen.append((int(line), time.monotonic()))
            if seen[-1][0] >= last:
                break
        return seen

    def kill_runs(self, api_base, mode, kills, per_run=1000, spool=None):
        """Kill a streaming child with SIGKILL ``kills`` times; return [(start, safe upto)]."""
        import random
        rng = random.Random(1234)
        runs = []
        for k in range(kills):
            start = k * per_run
            child = self.start_child(api_base, start, per_run, mode, spool)
            seen = self.stream_until(child, start + rng.randrange(50, per_run - 50))
            killed_at = time.monotonic()
            child.kill()
            child.communicate(timeout=30)
            # sync_interval, plus the worker's turn on a loaded machine: a child
            # starved for more than half of it journals late (13 of 240 runs with
            # five busy processes on 2 cores lost events 0.2 to 0.3 s old).
            safe = [v for v, t in seen if killed_at - t > 0.2 + 0.3]
            runs.append((start, max(safe) if safe else start - 1))
        return runs

    def finish_run(self, api_base, start, spool=None):
        """A last run that delivers its own events and every earlier run's backlog."""
        child = self.start_child(api_base, start, 20, "durable", spool)
        out, err = child.communicate(timeout=60)
        self.assertEqual(child.returncode, 0, err)
        self.assertIn("closed True", out, err)

    def check(self, sink, runs, per_run=1000):
        """Nothing safe lost; each kill resends at most the one request it cut short.

        The request a kill cuts short may hold an earlier run's backlog (a run
        replays what the runs before it left), so duplicates are bounded over
        all runs, not per run: one request's events per kill.
        """
        values = collections.Counter(e["value"] for _, e in sink.events)
        duplicates = 0
        for start, safe in runs:
            missing = [v for v in range(start, safe + 1) if not values[v]]
            self.assertEqual(missing, [], "run from %d lost events" % start)
            duplicates += sum(values[v] - 1 for v in range(start, start + per_run)
                              if values[v] > 1)
        self.assertLessEqual(duplicates, len(runs) * max(sink.sizes),
                             "more than one request resent per kill (%d kills)" % len(runs))
        self.assertLessEqual(max(values.values()), 1 + len(runs), "an event sent too often")
        return duplicates

    def test_durable_survives_sigkill(self):
        """Durable: SIGKILLs while streaming (2; full matrix 10) lose nothing a sync_interval old."""
        sink = self.sink(RequestSizeSink)
        per_run = full_or(1000, 300)
        runs = self.kill_runs(sink.url, "durable", full_or(10, 2), per_run=per_run)
        self.finish_run(sink.url, 100000)
        self.check(sink, runs, per_run=per_run)
        leftovers = [n for _, _, names in os.walk(self.spool) for n in names
                     if n.endswith(".jsonl")]
        self.assertEqual(leftovers, [])

    def test_durable_survives_sigkill_with_server_down(self):
        """Durable: SIGKILLs (2; full matrix 10) while the server is down; all arrives later."""
        down = dead_url()
        runs = self.kill_runs(down, "durable", full_or(10, 2), per_run=400)
        sink = self.sink(RequestSizeSink)
        self.finish_run(sink.url, 100000)
        self.assertEqual(self.check(sink, runs, per_run=400), 0)

    def test_durable_survives_sigkill_under_server_faults(self):
        """Durable: SIGKILLs while the server hangs (full matrix: or answers 429, 503, 401) lose nothing."""
        faults = {
            "hang": lambda handler, path: ("hang", 30.0) if path == "/api/events" else None,
            "429": lambda handler, path: (429, {"Retry-After": "60"})
            if path == "/api/events" else None,
            "503": lambda handler, path: 503 if path == "/api/events" else None,
            "401": lambda handler, path: 401,
        }
        def cell(rule):
            spool = os.path.join(self.tempdir(), "spool")
            faulty = self.sink(FaultSink, rule=rule)
            self.addCleanup(faulty.released.set)
            runs = self.kill_runs(faulty.url, "durable", full_or(2, 1), per_run=600,
                                  spool=spool)
            faulty.released.set()
            self.assertEqual(faulty.events, [])
            healthy = self.sink(RequestSizeSink)
            self.finish_run(healthy.url, 100000, spool)
            self.assertEqual(self.check(healthy, runs, per_run=600), 0)
        names = full_or(sorted(faults), ["hang"])
        concurrently(self, [(dict(fault=name), lambda rule=faults[name]: cell(rule))
                            for name in names])

    def test_durable_survives_sigkill_while_paced(self):
        """Durable: SIGKILLs under the rate limit lose nothing and resend at most a request."""
        # 50 calls of 10 a second: the children log faster, the last run's close(10)
        # has time for the three backlogs (at most 1,800 events, 180 calls).
        sink = self.sink(RequestSizeSink, rate_limit=50, window=1.0)
        runs = self.kill_runs(sink.url, "durable", full_or(3, 1), per_run=600)
        self.finish_run(sink.url, 100000)
        self.check(sink, runs, per_run=600)

    def test_sigterm_loses_nothing(self):
        """SIGTERM: a streaming process exits through the exit hook and delivers everything."""
        sink = self.sink()
        child = self.start_child(sink.url, 0, 5000, "no-close")
        seen = self.stream_until(child, 300)
        child.terminate()
        child.communicate(timeout=30)
        self.assertEqual(child.returncode, 143)
        values = sorted(e["value"] for _, e in sink.events)
        self.assertGreaterEqual(len(values), seen[-1][0] + 1)
        self.assertEqual(values, list(range(len(values))))

    def test_sigkill_default_mode_loses_at_most_last_flush_interval(self):
        """SIGKILL, default mode: only what was logged in the last flush_interval may be lost."""
        sink = self.sink()
        child = self.start_child(sink.url, 0, 5000, "default")
        seen = self.stream_until(child, 3000)
        killed_at = time.monotonic()
        child.kill()
        child.communicate(timeout=30)
        with sink.changed:
            values = set(e["value"] for _, e in sink.events)
        # flush_interval + slack for a loaded machine (the child logs 2,000 a second at most)
        old_enough = [v for v, t in seen if killed_at - t > 0.1 + 0.7]
        self.assertTrue(old_enough)
        self.assertEqual([v for v in range(max(old_enough) + 1) if v not in values], [])

    def test_sigterm_handler_of_application_is_kept(self):
        """SIGTERM: a handler the application installed is never replaced; opt-out works."""
        previous = signal.getsignal(signal.SIGTERM)
        self.addCleanup(signal.signal, signal.SIGTERM, previous)

        def mine(signum, frame):
            pass
        signal.signal(signal.SIGTERM, mine)
        self.streamer(None, offline=True, offline_file=os.path.join(self.folder, "o.csv"))
        self.assertIs(signal.getsignal(signal.SIGTERM), mine)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.streamer(None, offline=True, offline_file=os.path.join(self.folder, "o.csv"),
                      handle_sigterm=False)
        self.assertIs(signal.getsignal(signal.SIGTERM), signal.SIG_DFL)
        self.streamer(None, offline=True, offline_file=os.path.join(self.folder, "o.csv"))
        self.assertIs(signal.getsignal(signal.SIGTERM), lite._on_sigterm)

    def test_journal_bytes_per_event(self):
        """Durable: the journal written per event is at most 1.5x the event's JSON size."""
        sink = self.sink()
        s = self.streamer(sink, durable=True, buffer_size=10, sync_interval=0.2)
        json_bytes = 0
        for i in range(2000):
            s.log("temperature", 20.0 + i / 100.0)
        self.assertTrue(s.close(10))
        for _, event in sink.events:
            json_bytes += len(json.dumps(event, separators=(",", ":")))
        written = s.stats()["journal_bytes"]
        self.assertGreater(written, 0)
        self.assertLessEqual(written / float(json_bytes), 1.5)
        self.assertEqual(s.stats()["journalled"], 2000)

    def test_durable_log_is_not_blocked_by_disk(self):
        """Durable: log() returns while the journal's disk is stuck; the worker writes it."""
        sink = self.sink()
        s = self.streamer(sink, durable=True, sync_interval=0.05)
        calls = []
        entered, release = threading.Event(), threading.Event()
        original = s._session.worker.writer.append

        def stuck_disk(*args, **kwargs):
            calls.append(threading.current_thread().name)
            entered.set()
            release.wait(10)
            return original(*args, **kwargs)
        s._session.worker.writer.append = stuck_disk
        s.log("k", 0)
        self.assertTrue(entered.wait(5))
        for i in range(1, 50):
            s.log("k", i)                       # would hang here if log() wrote the journal
        self.assertFalse(release.is_set())
        release.set()
        self.assertTrue(s.close(10))
        self.assertEqual(sorted(v for _, v in self.received(sink)), list(range(50)))
        self.assertTrue(all(name.startswith("isstreamer_lite[") for name in calls), calls)


LIFE_KEY = "ist_lifecycle_key_0123456789"


# A script started from a terminal has SIGINT raising KeyboardInterrupt and
# SIGHUP at its default; a test runner started under nohup or in the
# background may pass them on ignored, so every child puts them back.
_PRELUDE = r'''
import signal, sys, time
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def say(word):
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def wait_for_a_signal():
    # Short sleeps: PyPy runs a signal's handler between bytecodes, now and then,
    # so a signal that lands just before one long sleep would wait it out.
    for _ in range(600):
        time.sleep(0.1)
'''


# The SIGINT exit status of a plain script (no Streamer), to expect the same.
_PLAIN_CHILD = _PRELUDE + r'''
say("ready")
wait_for_a_signal()
'''


LIFECYCLE_CHILD = _PRELUDE + r'''
import isstreamer_lite as lite
mode, api_base, spool_dir, key, count, exit_timeout, count_path = sys.argv[1:8]
streamer = lite.Streamer("", "life-bucket", key, ini_file_location=False, api_base=api_base,
                         spool_dir=spool_dir, buffer_size=10, flush_interval=0.05,
                         backoff_base=0.05, backoff_cap=0.2, max_retries=1000,
                         exit_timeout=float(exit_timeout))
if mode == "replay":
    sys.exit(0 if streamer.close(30) else 1)
for i in range(int(count)):
    streamer.log("v", i)
if mode == "close":
    say("closing")
    streamer.close(30)
elif mode in ("idle", "exit-idle"):
    say("idle" if mode == "idle" else "exiting")
    wait_for_a_signal()
elif mode == "logging":
    logged = int(count)
    try:
        say("logging")
        while True:                 # a sensor loop, about a thousand events a second
            streamer.log("v", logged)
            logged += 1
            time.sleep(0.001)
    finally:
        with open(count_path, "w") as handle:
            handle.write("%d\n" % logged)
elif mode == "exit-end":
    say("exiting")
'''


FORK_CHILD = r'''
import multiprocessing, sys
import isstreamer_lite as lite


def work(api_base, spool_dir):
    streamer = lite.Streamer("", "fork-bucket", "ist_fork_key", ini_file_location=False,
                             api_base=api_base, spool_dir=spool_dir, buffer_size=100,
                             flush_interval=60)
    for i in range(25):
        streamer.log("v", i)


# The fork start method needs no __main__ guard: the child does not re-import this.
process = multiprocessing.get_context("fork").Process(target=work, args=sys.argv[1:3])
process.start()
process.join(60)
sys.exit(99 if process.exitcode is None else process.exitcode)
'''


# Forks while the worker's first request reaches argv[3]: "import" (a library thread
# imports a module: it holds that module's lock), "getaddrinfo" or "post". The child
# logs 20 events and closes; it exits 0 if they were delivered. Prints "no import" if
# the first request imported nothing in a library thread.
FORK_MOMENT_CHILD = r'''
import os, signal, socket, sys, threading
import isstreamer_lite as lite

api_base, spool_dir, moment = sys.argv[1:4]
reached, forked, flushed = threading.Event(), threading.Event(), []


def pause(what):
    if threading.current_thread().name.startswith("isstreamer_lite") and \
            not reached.is_set():
        print("paused at %s %s" % (moment, what), flush=True)
        reached.set()
        forked.wait(10)


class Finder(object):
    def find_spec(self, name, path=None, target=None):
        if moment == "import":
            pause(name)
        return None


real_getaddrinfo, real_post = socket.getaddrinfo, lite._HTTPTransport.post


def getaddrinfo(*args, **kwargs):
    if moment == "getaddrinfo":
        pause("")
    return real_getaddrinfo(*args, **kwargs)


def post(self, *args, **kwargs):
    if moment == "post":
        pause("")
    return real_post(self, *args, **kwargs)


socket.getaddrinfo, lite._HTTPTransport.post = getaddrinfo, post
sys.meta_path.insert(0, Finder())
streamer = lite.Streamer("", "fork-moment", "ist_fork_moment_key", ini_file_location=False,
                         api_base=api_base, spool_dir=spool_dir, flush_interval=60)


def flush():
    flushed.append(streamer.flush(15))
    reached.set()


threading.Thread(target=flush, name="flusher", daemon=True).start()
reached.wait(20)
if flushed:
    print("no %s" % moment, flush=True)
    sys.exit(0 if flushed[0] else 4)
pid = os.fork()
if pid == 0:
    code = 1
    try:
        signal.alarm(20)
        for i in range(20):
            streamer.log("child", i)
        code = 0 if streamer.close(5) else 3
    finally:
        os._exit(code)
forked.set()
_, status = os.waitpid(pid, 0)
streamer.close(5)
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 100 + os.WTERMSIG(status))
'''


# Builds, uses and closes a Streamer in a sub-interpreter of config argv[1].
SUB_INTERPRETER_CHILD = r'''
import sys
try:
    import _interpreters as interpreters                # 3.13
    interp = interpreters.create(sys.argv[1])
except ImportError:
    import _xxsubinterpreters as interpreters           # 3.12
    interp = interpreters.create(isolated=(sys.argv[1] == "isolated"))
out = sys.argv[2]
code = "\n".join([
    "import traceback",
    "try:",
    "    import isstreamer_lite as lite",
    "    s = lite.Streamer('', 'sub', '', ini_file_location=False, offline=True,"
    " offline_file=%r)" % (out + ".csv"),
    "    s.log('a', 1)",
    "    text = 'closed %r' % (s.close(5),)",
    "except BaseException:",
    "    text = traceback.format_exc()",
    "with open(%r, 'w') as handle:" % out,
    "    handle.write(text)"])
interpreters.run_string(interp, code)
interpreters.destroy(interp)
with open(out) as handle:
    print(handle.read())
'''


SIGNALS = (("SIGTERM", 143), ("SIGINT", None), ("SIGHUP", 129))


def once_problems(got, expected):
    """'' if ``got`` holds each of ``expected`` exactly once, else what is wrong."""
    counts = collections.Counter(got)
    lost = [v for v in expected if not counts[v]]
    doubled = [v for v, n in counts.items() if n > 1]
    extra = [v for v in counts if v not in set(expected)]
    if not (lost or doubled or extra):
        return ""
    return "lost %d of %d (first %r), duplicated %d, unexpected %d" % (
        len(lost), len(expected), lost[:3], len(doubled), len(extra))


class SignalLifecycleTest(LifecycleCase):
    """Signals, server down: every logged event ends up in the spool, then delivered."""

    def signal_at(self, name, mode, line, status):
        """One cell: SIGname while the child is at ``mode``; all spooled, then delivered."""
        if PYPY and name == "SIGINT":
            self.skipTest(PYPY_NO_ATEXIT_ON_SIGINT)
        spool = self.tempdir()
        child, count_path = self.lifecycle(mode, dead_url(), spool)
        self.read_line(child, line)
        self.still_running(child, 0.3)  # well into close(), idle or logging
        child.send_signal(getattr(signal, name))
        status_, err = self.finish(child)
        expected = list(range(100))
        if mode == "logging":
            self.assertTrue(os.path.exists(count_path),
                            "the loop's finally never ran (exit status %s)" % status_)
            with open(count_path) as handle:
                logged = int(handle.read())
            # The signal may land inside log(), after its append.
            spooled = len(spooled_events(spool))
            expected = list(range(spooled if spooled == logged + 1 else logged))
        self.assertSpooled(spool, expected, status_, err)
        self.assertEqual(status_, status, err[-600:])
        self.assertReplayed(spool, expected)

    def test_signal_at_each_moment_spools_everything(self):
        """Signals: SIGTERM while logging loses nothing; full matrix: each signal at each moment."""
        moments = (("close", "closing"), ("idle", "idle"), ("logging", "logging"))
        cells = full_or([(name, moment) for name, _ in SIGNALS for moment in moments],
                        [("SIGTERM", ("logging", "logging"))])
        statuses = dict(SIGNALS)
        if any(name == "SIGINT" for name, _ in cells) and not PYPY:     # PyPy skips them
            statuses["SIGINT"] = self.plain_sigint_status()
        self.script(LIFECYCLE_CHILD)        # written once, before the cells start
        concurrently(self, [
            (dict(signal=name, moment=mode),
             lambda name=name, mode=mode, line=line: self.signal_at(
                 name, mode, line, statuses[name]))
            for name, (mode, line) in cells])

    def second_signal(self, name, mode, status):
        """One cell: SIGname as the exit hook starts or waits, maybe twice; nothing lost."""
        if PYPY and name == "SIGINT":
            self.skipTest(PYPY_NO_ATEXIT_ON_SIGINT)
        sig = getattr(signal, name)
        spool = self.tempdir()
        child, _ = self.lifecycle(mode, dead_url(), spool, exit_timeout=30.0)
        self.read_line(child, "exiting")
        sent = 0
        if mode == "exit-idle":
            child.send_signal(sig)          # ends the script: the exit hook runs
            sent = 1
        while sent < 2:
            try:
                child.wait(0.5)             # exited already: nothing to interrupt
                break
            except subprocess.TimeoutExpired:
                child.send_signal(sig)      # the exit hook is still waiting
                sent += 1
        status_, err = self.finish(child)
        self.assertSpooled(spool, list(range(100)), status_, err)
        if mode == "exit-idle":
            self.assertEqual(status_, status, err[-600:])
        self.assertReplayed(spool, list(range(100)))

    def test_second_signal_during_exit_hook_spools_everything(self):
        """Signals: a signal while the exit hook waits, or a second one, loses nothing."""
        cells = full_or((("SIGTERM", "exit-idle"), ("SIGINT", "exit-idle"),
                         ("SIGTERM", "exit-end")), (("SIGTERM", "exit-idle"),))
        statuses = dict(SIGNALS)
        if any(name == "SIGINT" for name, _ in cells) and not PYPY:     # PyPy skips them
            statuses["SIGINT"] = self.plain_sigint_status()
        self.script(LIFECYCLE_CHILD)
        concurrently(self, [
            (dict(signal=name, script=mode),
             lambda name=name, mode=mode: self.second_signal(name, mode, statuses[name]))
            for name, mode in cells])

    def test_exit_hook_warns_once_about_spooled_events(self):
        """Exit hook: events it leaves in the spool are reported in one stderr line."""
        spool = self.tempdir()
        child, _ = self.lifecycle("exit-end", dead_url(), spool, count=10, exit_timeout=0.5)
        self.read_line(child, "exiting")
        status, err = self.finish(child)
        self.assertSpooled(spool, list(range(10)), status, err)
        lines = [line for line in err.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, "stderr: %r" % err[-600:])
        self.assertRegex(lines[0], r"\b10\b")
        self.assertIn(spool, lines[0])


class PipeLifecycleTest(LifecycleCase):
    """CLI pipe: SIGTERM after the end of input, while closing, loses nothing."""

    def test_sigterm_while_closing_spools_everything(self):
        """CLI pipe: SIGTERM after the last line was read, server down: all 200 spooled."""
        spool, ini = self.tempdir(), os.path.join(self.folder, "empty.ini")
        with open(ini, "w"):
            pass
        child = self.popen(PYTHON + ["-m", "isstreamer_lite", "pipe", "--access-key",
                            LIFE_KEY, "--bucket-key", "life-pipe", "--api-base", dead_url(),
                            "--spool-dir", spool, "--ini", ini, "--timeout", "30",
                            "--debug", "1"])
        child.stdin.write("".join("v,%d\n" % i for i in range(200)))
        child.stdin.close()
        child.stdin = None                  # communicate() must not flush it
        echoed = 0
        for line in child.stderr:           # --debug 1 echoes each event as it is logged
            echoed += bool(ECHO.match(line))
            if echoed == 200:
                break
        self.assertEqual(echoed, 200)
        self.still_running(child, 0.3)      # past the end of input: in close(--timeout)
        child.send_signal(signal.SIGTERM)
        status, err = self.finish(child)
        self.assertSpooled(spool, list(range(200)), status, err)
        self.assertIn(status, (1, 143), err[-600:])
        self.assertReplayed(spool, list(range(200)))


class NoSignalHandlersTest(LifecycleCase):
    """Streamer() works where signal handlers cannot be installed."""

    def offline_file(self):
        return os.path.join(self.tempdir(), "out.csv")

    def test_signal_signal_raises(self):
        """No signals: Streamer() works when signal.signal raises ValueError."""
        for name in ("SIGTERM", "SIGHUP"):      # the defaults a fresh process starts with
            sig = getattr(signal, name, None)
            if sig is not None:
                self.addCleanup(signal.signal, sig, signal.getsignal(sig))
                signal.signal(sig, signal.SIG_DFL)
        refuse = ValueError("signal only works in main thread of the main interpreter")
        with mock.patch("signal.signal", side_effect=refuse):
            streamer = self.streamer(None, offline=True, offline_file=self.offline_file())
            streamer.log("a", 1)
            self.assertTrue(streamer.close(5))

    def test_close_leaves_no_thread_running(self):
        """close: once it answers, no thread of the Streamer is alive (nor a watchdog timer)."""
        sink = self.sink()

        def ours(before):
            return [t.name for t in threading.enumerate() if t not in before and t.is_alive()
                    and (t.name.startswith("isstreamer_lite[") or isinstance(t, threading.Timer))]
        cases = (("offline", dict(offline=True, offline_file=self.offline_file())),
                 ("http", dict(api_base=sink.url)),
                 ("use_async=False", dict(api_base=sink.url, use_async=False)))
        for name, options in cases:
            with self.subTest(name):
                for round_ in range(20):        # each answer raced the threads' ending
                    before = set(threading.enumerate())
                    streamer = self.streamer(None, **options)
                    streamer.log("a", round_)
                    self.assertTrue(streamer.close(5))
                    self.assertEqual(ours(before), [], "round %d" % round_)

    def test_threads_leave_signals_to_the_main_thread(self):
        """Signals: the Streamer's threads block SIGTERM, SIGHUP and SIGINT; the caller's mask is kept."""
        if not hasattr(threading.Thread, "native_id") or not os.path.exists("/proc/self/task"):
            self.skipTest("needs Thread.native_id (3.8+) and /proc")
        sink = self.sink()
        before = set(threading.enumerate())
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        for options in (dict(api_base=sink.url), dict(api_base=sink.url, use_async=False)):
            streamer = self.streamer(None, **options)
            streamer.log("a", 1)
            self.assertTrue(streamer.flush(5))      # the courier (or watchdog) has run
        self.assertEqual(signal.pthread_sigmask(signal.SIG_BLOCK, []), mask)
        wanted = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
        checked = []
        for thread in threading.enumerate():
            if thread in before or not thread.name.startswith("isstreamer_lite["):
                continue
            with open("/proc/self/task/%d/status" % thread.native_id) as handle:
                blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", handle.read(), re.M).group(1), 16)
            self.assertEqual({n for n in wanted if blocked >> (n - 1) & 1}, wanted, thread.name)
            checked.append(thread.name)
        self.assertEqual(len(checked), 2, checked)  # the worker and its courier

    def test_sub_interpreter(self):
        """No signals: Streamer() works in a sub-interpreter (3.12+), legacy and isolated."""
        if sys.version_info < (3, 12):
            self.skipTest("sub-interpreters with a config of their own need 3.12+")
        for config in ("legacy", "isolated"):
            with self.subTest(config=config):
                # In a child: a thread left running in a sub-interpreter is a fatal error.
                out = os.path.join(self.tempdir(), "out")
                result = subprocess.run(
                    PYTHON + [self.script(SUB_INTERPRETER_CHILD), config, out],
                    env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    universal_newlines=True, timeout=60)
                self.assertEqual((result.returncode, result.stdout.strip()[-300:]),
                                 (0, "closed True"), result.stderr[-800:])


NOHUP_CHILD = r'''
import os, signal, sys
import isstreamer_lite as lite
api_base, spool_dir, key = sys.argv[1:4]
streamer = lite.Streamer("Nohup", "nohup", key, ini_file_location=False, api_base=api_base,
                         spool_dir=spool_dir, flush_interval=0.05)
streamer.log("before", 1)
os.kill(os.getpid(), signal.SIGHUP)            # the SSH session drops
streamer.log("after", 2)
ignored = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN or lite._ignored_by_kernel(
    signal.SIGHUP)                              # PyPy's getsignal() says SIG_DFL
print("ignored" if ignored else "replaced")
sys.exit(0 if streamer.close(10) else 1)
'''


class NohupTest(LiteTestCase):
    """Under nohup SIGHUP stays ignored: the script outlives the session that started it."""

    def test_sighup_under_nohup_is_left_ignored(self):
        """Signals: under nohup a SIGHUP neither stops the script nor loses an event."""
        nohup = shutil.which("nohup")
        if nohup is None:
            self.skipTest("no nohup command")
        sink = self.sink()
        folder = self.tempdir()
        script = os.path.join(folder, "child.py")
        with open(script, "w") as handle:
            handle.write(NOHUP_CHILD)
        result = subprocess.run([nohup] + PYTHON + [script, sink.url,
                                 os.path.join(folder, "spool"), KEY],
                                env=child_env(), cwd=folder, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "ignored\n")
        self.assertEqual(self.received(sink), [("before", 1), ("after", 2)])


@unittest.skipUnless(hasattr(os, "fork") and sys.version_info >= (3, 7),
                     "needs os.fork and os.register_at_fork (Python 3.7+)")
class ForkTest(DeliveryTestCase):
    """A forked child starts afresh: parent events are sent once, by the parent."""

    @unittest.skipIf(PYPY, "PyPy 7.3.11: a child forked from a process whose threads are "
                           "running can stop forever at an internal lock")
    def test_child_gets_fresh_queue(self):
        """fork: parent logs N, child logs M, both close: the server gets N + M, once each."""
        sink = self.sink()
        s = self.streamer(sink.url, buffer_size=100, flush_interval=30.0)
        parent, child = events("parent", 20), events("child", 15)
        log_all(s, parent)                  # still queued in memory at the fork
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # 3.12+: fork of a threaded process
            pid = os.fork()
        if pid == 0:                        # the child: never return into unittest
            code = 1
            try:
                signal.alarm(20)            # never outlive a stuck test
                log_all(s, child)
                stats = s.stats()
                ok = s.close(10)
                code = 0 if ok and stats["logged"] <= len(child) else 3
            finally:
                os._exit(code)
        guard = threading.Timer(60, os.kill, (pid, signal.SIGKILL))  # a failure guard:
        guard.daemon = True                 # a child stuck at a lock ignores its alarm
        guard.start()
        _, status = os.waitpid(pid, 0)
        guard.cancel()
        self.assertEqual(os.WEXITSTATUS(status) if os.WIFEXITED(status) else -status, 0)
        self.assertTrue(s.close(10))
        self.assertExactlyOnce(self.received(sink), parent + child)


FORK_IMPORT_CHILD = r'''
import os, signal, sys, time, warnings
import isstreamer_lite as lite
api_base, spool_dir, run, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
s = lite.Streamer("", "fork-bucket", "ist_issue9_access_key_0123456789",
                  ini_file_location=False, api_base=api_base, spool_dir=spool_dir,
                  flush_interval=0.05, backoff_base=0.01, backoff_cap=0.05)
if delay:
    time.sleep(delay)                   # where the fork lands in the worker's first imports
with warnings.catch_warnings():
    warnings.simplefilter("ignore")     # 3.12+: fork of a threaded process
    pid = os.fork()
if pid == 0:
    signal.alarm(7)                     # a stuck child must not outlive the test
    try:
        for i in range(15):
            s.log("r%s_%02d" % (run, i), i)
        sys.stdout.write("child closed %s\n" % s.close(5))
        sys.stdout.flush()
    finally:
        os._exit(0)
_, status = os.waitpid(pid, 0)
sys.stdout.write("child status %d\n" % status)
s.close(5)                              # also replays what the child spooled
'''


@unittest.skipUnless(hasattr(os, "register_at_fork"), "needs os.register_at_fork (3.7+)")
class ForkDuringImportTest(Issue9Case):
    """fork() right after construction, while the worker imports what it needs."""

    @unittest.skipIf(PYPY, "PyPy 7.3.11: a child forked while the new Streamer's threads "
                           "start dies of SIGSEGV in one run of two")
    def test_fork_right_after_construction(self):
        """fork: a child forked at once delivers (or spools) its events; close() tells which."""
        sink = self.sink()
        # A fresh interpreter per run (the imports are lazy); the fork lands 0-2 ms
        # after construction, in the worker's first imports of json and http.client.
        for run, delay in enumerate((0.0005, 0.001, 0.002, 0.0)):
            spool = self.tempdir()
            out = self.finish(self.child(FORK_IMPORT_CHILD, sink.url, spool, run, delay))
            self.assertIn("child status 0", out, "run %d: the child was stuck: %r" % (run, out))
            self.assertRegex(out, r"child closed (True|False)")
            keys = ["r%d_%02d" % (run, i) for i in range(15)]
            got = collections.Counter(k for k, _ in self.received(sink))
            on_disk = disk_keys(spool)
            lost = [k for k in keys if not got[k] and not on_disk[k]]
            unsent = [k for k in keys if got[k] != 1]
            said_true = "child closed True" in out
            self.assertEqual((len(lost), len(unsent) if said_true else 0), (0, 0),
                             "run %d, fork after %.1f ms: child's close() answered %s; %d "
                             "events neither sent nor spooled" % (run, delay * 1000,
                                                                  said_true, len(lost)))


class ForkedChildTest(LifecycleCase):
    """multiprocessing: a fork-started child delivers its events without close()."""

    def test_fork_child_delivers_without_close(self):
        """multiprocessing fork: a Process that logs 25 events and returns delivers all 25."""
        if not hasattr(os, "fork"):
            self.skipTest("needs fork")
        sink = self.sink()
        result = subprocess.run(PYTHON + [self.script(FORK_CHILD), sink.url,
                                 self.tempdir()], env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=90)
        self.assertEqual(result.returncode, 0, result.stderr[-600:])
        sink.wait_for(25, timeout=5.0)
        with sink.changed:
            values = [e["value"] for _, e in sink.events]
        self.assertEqual(once_problems(values, list(range(25))), "")


class ForkMomentTest(LifecycleCase):
    """fork at each moment of the first request: the child's Streamer still delivers."""

    @unittest.skipIf(PYPY, "PyPy 7.3.11: a child forked while another thread is inside "
                           "getaddrinfo exited 111 in one run of two (as its other fork "
                           "tests beside running threads, see the README)")
    def test_fork_during_first_request_child_delivers(self):
        """fork: while a library thread imports, resolves or posts, the child delivers its 20."""
        if not hasattr(os, "fork") or not hasattr(os, "register_at_fork"):
            self.skipTest("needs os.fork and os.register_at_fork (POSIX, Python 3.7+)")
        for moment in ("import", "getaddrinfo", "post"):
            with self.subTest(moment=moment):
                sink = self.sink()
                result = subprocess.run(
                    PYTHON + ["-W", "ignore", self.script(FORK_MOMENT_CHILD), sink.url,
                     self.tempdir(), moment], env=child_env(), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, universal_newlines=True, timeout=90)
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr[-600:])
                if moment == "import":
                    # Everything the request path needs was imported by the constructor.
                    self.assertEqual(result.stdout, "no import\n")
                    continue
                self.assertEqual(result.stdout, "paused at %s \n" % moment)
                self.assertEqual(sorted(v for k, v in self.received(sink) if k == "child"),
                                 list(range(20)))


# --- Command line ------------------------------------------------------------
# send, pipe, replay, sink, selftest and status.

class CliHelpTest(CliTestCase):
    """CLI help: --version, --help, usage errors."""

    def test_version(self):
        """CLI help: --version prints the version and exits 0."""
        status, out, err = self.main(["--version"])
        self.assertEqual(status, 0, err)
        self.assertEqual(out.strip(), "isstreamer_lite " + lite.__version__)

    def test_top_level_help_lists_commands(self):
        """CLI help: --help exits 0 and names every command and the exit codes."""
        status, out, err = self.main(["--help"])
        self.assertEqual(status, 0, err)
        for command in COMMANDS:
            self.assertIn(command, out)
        self.assertIn("Exit codes", out)

    def test_every_command_help_shows_an_example(self):
        """CLI help: <command> --help exits 0 and shows an example of that command."""
        for command in COMMANDS:
            with self.subTest(command=command):
                status, out, err = self.main([command, "--help"])
                self.assertEqual(status, 0, err)
                self.assertIn("example:", out)
                self.assertIn("python3 -m isstreamer_lite %s" % command, out)

    def test_unknown_command_exits_2(self):
        """CLI help: an unknown command exits 2 with a usage message."""
        status, out, err = self.main(["launch"])
        self.assertEqual(status, 2)
        self.assertIn("invalid choice", err)

    def test_unknown_option_exits_2(self):
        """CLI help: an unknown option exits 2 for the top level and for a command."""
        for argv in (["--frobnicate"], ["send", "--frobnicate", "a", "1"],
                     ["sink", "--port", "not-a-number"]):
            with self.subTest(argv=argv):
                status, out, err = self.main(argv)
                self.assertEqual(status, 2)
                self.assertIn("usage:", err)

    def test_help_and_version_as_subprocess(self):
        """CLI help: python -m isstreamer_lite --version, --help and pipe --help exit 0."""
        for args, expected in ((["--version"], lite.__version__), (["--help"], "COMMAND"),
                               (["pipe", "--help"], "example:")):
            with self.subTest(args=args):
                result = self.run_cli(args)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn(expected, result.stdout)

    def test_usage_error_as_subprocess(self):
        """CLI help: a usage error in a child exits 2."""
        result = self.run_cli(["send", "lonely"], IS_ACCESS_KEY=CLI_KEY)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("KEY VALUE pairs", result.stderr)

    def test_underscore_spellings_are_aliases(self):
        """CLI help: --bucket_key, --bucket_name, --access_key, --api_base, --spool_dir work."""
        sink = self.sink()
        status, out, err = self.main(["send", "--bucket_key", "cli-under", "--bucket_name",
                                      "Under", "--api_base", sink.url, "--access_key", CLI_KEY,
                                      "--ini", self.ini, "--spool_dir=" + self.spool, "a", "1"])
        self.assertEqual(status, 0, err)
        self.assertEqual(sink.buckets, {"cli-under": "Under"})
        self.assertEqual(self.received(sink, "cli-under"), [("a", 1)])
        status, out, err = self.main(["replay", "--dry_run", "--spool_dir", self.spool,
                                      "--access_key", CLI_KEY, "--ini", self.ini])
        self.assertEqual(status, 0, err)
        self.assertIn("nothing pending in %s" % self.spool, out)

    def test_unknown_option_of_a_command_shows_its_usage(self):
        """CLI help: an unknown option after a command shows that command's usage and a guess."""
        status, out, err = self.main(["send", "--bucket-kee", "x", "a", "1"])
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith("usage: python3 -m isstreamer_lite send "), err)
        self.assertIn("unrecognized arguments: --bucket-kee (did you mean --bucket-key?)", err)
        self.assertNotIn("COMMAND", err)

    def test_common_flags_before_the_command(self):
        """CLI help: the common flags work before the command; given after it too, that wins."""
        sink = self.sink()
        status, out, err = self.main(["--bucket-key", "cli-before", "--debug", "1"]
                                     + self.common(sink.url) + ["send", "k", "1"])
        self.assertEqual(status, 0, err)
        self.assertEqual(self.received(sink, "cli-before"), [("k", 1)])
        self.assertTrue(any(ECHO.match(line) for line in err.splitlines()), err)
        status, out, err = self.main(["--bucket-key", "cli-outer", "--timeout", "0.001", "send",
                                      "--bucket-key", "cli-inner", "--timeout", "20"]
                                     + self.common(sink.url) + ["k", "2"])
        self.assertEqual(status, 0, err)
        self.assertEqual(self.received(sink, "cli-inner"), [("k", 2)])
        self.assertNotIn("cli-outer", sink.buckets)

    def test_flags_before_sink_are_refused(self):
        """CLI help: a streaming flag before sink exits 2 and says to give sink's own after it."""
        for flags in (["--bucket-key", "x"], ["--access-key", CLI_KEY], ["--timeout", "5"]):
            with self.subTest(flags=flags):
                status, out, err = self.main(flags + ["sink", "--port", "0"])
                self.assertEqual(status, 2)
                self.assertIn("sink takes no %s before the command" % flags[0], err)

    def test_debug_level_is_0_to_3(self):
        """CLI help: --debug 7, --debug -1 and --debug x exit 2 naming the levels 0 to 3."""
        for level in ("7", "-1", "x"):
            for argv in (["send", "--debug", level, "a", "1"],
                         ["--debug", level, "send", "a", "1"]):
                with self.subTest(argv=argv):
                    status, out, err = self.main(argv)
                    self.assertEqual(status, 2)
                    self.assertIn("argument --debug: the debug level must be a whole number "
                                  "from 0 to 3, not %r" % level, err)

    def test_help_names_the_program_as_it_was_started(self):
        """CLI help: usage and examples say isstreamer-lite when started as that script."""
        # What pip's console-script wrapper for isstreamer-lite does.
        script = os.path.join(self.tempdir(), "isstreamer-lite")
        with open(script, "w") as handle:
            handle.write("import sys\nfrom isstreamer_lite import main\n"
                         "if __name__ == '__main__':\n    sys.exit(main())\n")
        for argv, prog in ((PYTHON + [script], "isstreamer-lite"),
                           (PYTHON + ["-m", "isstreamer_lite"],
                            "python3 -m isstreamer_lite")):
            for command in ([], ["send"], ["sink"]):
                with self.subTest(prog=prog, command=command):
                    result = subprocess.run(argv + command + ["--help"], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, universal_newlines=True,
                                            timeout=60, cwd=self.home, env=self.env())
                    self.assertEqual(result.returncode, 0, result.stderr)
                    self.assertTrue(result.stdout.startswith(
                        "usage: %s %s" % (prog, " ".join(command))), result.stdout)
                    if command:
                        example = result.stdout.split("example:\n")[1].split("\n\n")[0]
                        self.assertIn(" %s %s --" % (prog, command[0]), " " + example)
                    if prog == "isstreamer-lite":
                        self.assertNotIn("python3 -m", result.stdout)


class CliSendTest(CliTestCase):
    """CLI send: typed values, timestamps, usage errors, a server that is down."""

    def send(self, sink, *words):
        return self.main(["send", "--bucket-key", "cli-send"] + self.common(sink.url)
                         + list(words))

    def test_numbers_and_booleans_are_typed(self):
        """CLI send: numbers become int/float, true/false booleans, the rest text."""
        sink = self.sink()
        status, out, err = self.send(sink, "temp", "21.5", "count", "3", "open", "true",
                                     "shut", "FALSE", "name", "porch", "odd", "nan",
                                     "big", "1e3")
        self.assertEqual(status, 0, err)
        self.assertIn("sent 7 events to bucket cli-send", out)
        got = self.received(sink, "cli-send")
        self.assertEqual(got, [("temp", 21.5), ("count", 3), ("open", True), ("shut", False),
                               ("name", "porch"), ("odd", "nan"), ("big", 1000.0)])
        self.assertEqual([type(v) for _, v in got],
                         [float, int, bool, bool, str, str, float])
        self.assertIn("cli-send", sink.buckets)

    def test_raw_keeps_text(self):
        """CLI send: --raw sends every value as the text it was given."""
        sink = self.sink()
        status, out, err = self.send(sink, "--raw", "temp", "21.5", "open", "true")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.received(sink), [("temp", "21.5"), ("open", "true")])

    def test_epoch_as_unix_seconds(self):
        """CLI send: --epoch in Unix seconds stamps every event."""
        sink = self.sink()
        status, out, err = self.send(sink, "--epoch", "1700000000.25", "a", "1", "b", "2")
        self.assertEqual(status, 0, err)
        self.assertEqual([e["epoch"] for _, e in sink.events], [1700000000.25] * 2)

    def test_epoch_as_iso8601(self):
        """CLI send: --epoch accepts ISO-8601 with Z and with a +02:00 offset."""
        noon = calendar.timegm((2026, 5, 1, 12, 0, 0, 0, 0, 0))
        for text, expected in (("2026-05-01T12:00:00Z", noon),
                               ("2026-05-01T12:00:00.5Z", noon + 0.5),
                               ("2026-05-01T14:00:00+02:00", noon),
                               ("2026-05-01 10:00:00-0200", noon)):
            with self.subTest(epoch=text):
                sink = self.sink()
                status, out, err = self.send(sink, "--epoch", text, "a", "1")
                self.assertEqual(status, 0, err)
                self.assertEqual([e["epoch"] for _, e in sink.events], [expected])

    def test_bad_epoch_exits_2(self):
        """CLI send: an --epoch that is neither a number nor ISO-8601 exits 2."""
        sink = self.sink()
        status, out, err = self.send(sink, "--epoch", "yesterday", "a", "1")
        self.assertEqual(status, 2)
        self.assertIn("yesterday", err)
        self.assertEqual(sink.requests, 0)

    def test_counts_of_one_are_singular(self):
        """CLI send: "sent 1 event", "got 1 word"; other counts stay plural."""
        sink = self.sink()
        status, out, err = self.send(sink, "a", "1")
        self.assertEqual(status, 0, err)
        self.assertIn("sent 1 event to bucket cli-send", out)
        status, out, err = self.send(sink, "lonely")
        self.assertEqual(status, 2)
        self.assertIn("got 1 word\n", err)
        status, out, err = self.send(sink, "a", "1", "b", "2")
        self.assertIn("sent 2 events to bucket cli-send", out)

    def test_odd_number_of_words_exits_2(self):
        """CLI send: KEY VALUE pairs with a word missing exit 2 and send nothing."""
        sink = self.sink()
        status, out, err = self.send(sink, "temp", "21.5", "humidity")
        self.assertEqual(status, 2)
        self.assertIn("got 3 words", err)
        self.assertEqual(sink.requests, 0)

    def test_bad_bucket_key_exits_2(self):
        """CLI send: a bucket key with a colon exits 2 and names the rule."""
        sink = self.sink()
        status, out, err = self.main(["send", "--bucket-key", "garden:north"]
                                     + self.common(sink.url) + ["a", "1"])
        self.assertEqual(status, 2)
        self.assertIn("bucket_key", err)
        self.assertEqual(sink.requests, 0)

    def test_key_over_250_characters_exits_2(self):
        """CLI send: a 251-character key exits 2 and names the length and the limit."""
        sink = self.sink()
        status, out, err = self.send(sink, "k" * 251, "1")
        self.assertEqual(status, 2)
        self.assertIn("251 characters; the limit is 250", err)
        self.assertEqual(sink.requests, 0)

    def test_missing_access_key_exits_2(self):
        """CLI send: no access key anywhere exits 2 and says where to put one."""
        sink = self.sink()
        status, out, err = self.main(["send", "--api-base", sink.url, "--ini", self.ini,
                                      "--spool-dir", self.spool, "a", "1"])
        self.assertEqual(status, 2)
        self.assertIn("IS_ACCESS_KEY", err)

    def test_missing_ini_is_named_as_the_flag(self):
        """CLI send: --ini of a missing file or a folder exits 2 naming --ini, sends nothing."""
        sink = self.sink()
        for path in (os.path.join(self.home, "nope.ini"), self.home):
            for command in (["send", "a", "1"], ["replay", "--dry-run"]):
                with self.subTest(path=path, command=command):
                    status, out, err = self.main(command[:1] + [
                        "--ini", path, "--api-base", sink.url, "--access-key", CLI_KEY,
                        "--spool-dir", self.spool] + command[1:])
                    self.assertEqual(status, 2)
                    self.assertIn("--ini %s does not exist or is not a file" % path, err)
                    self.assertNotIn("ini_file_location", err)
        self.assertEqual(sink.requests, 0)

    def test_server_down_exits_1_and_spools(self):
        """CLI send: with the server down it exits 1 within --timeout, events spooled."""
        url = dead_url()
        started = time.monotonic()
        status, out, err = self.main(["send", "--bucket-key", "cli-down", "--timeout", "1"]
                                     + self.common(url) + ["a", "1", "b", "two"])
        elapsed = time.monotonic() - started
        self.assertEqual(status, 1, err)
        self.assertLess(elapsed, 3.0)
        self.assertIn("spooled", err)
        self.assertTrue(spool_segments(self.spool))
        rows = lite._Spool.of_key(self.spool, CLI_KEY).summary()
        self.assertEqual([(r["bucket_key"], r["events"]) for r in rows], [("cli-down", 2)])

    def test_spooled_after_retries_is_not_reported_sent(self):
        """CLI send: events spooled after failed retries are never reported as sent."""
        # Five quick failures spool the batch; the next retry is due after --timeout,
        # as with the default back-off once the server has been down for a few seconds.
        def delay(failures, base, cap, rand=None):
            return 0.01 if failures < 6 else 60.0
        with mock.patch.object(lite, "_retry_delay", delay):
            status, out, err = self.main(["send", "--bucket-key", "cli-retried", "--timeout",
                                          "10"] + self.common(dead_url()) + ["a", "1"])
        self.assertEqual((status, out), (1, ""), err)
        self.assertIn("spooled", err)
        rows = lite._Spool.of_key(self.spool, CLI_KEY).summary()
        self.assertEqual([(r["bucket_key"], r["events"]) for r in rows], [("cli-retried", 1)])

    def failed_send(self, sink_url, *words, **kwargs):
        """Send a b 2 and fail; return (seconds it took, stderr)."""
        started = time.monotonic()
        status, out, err = self.main(["send", "--bucket-key", "cli-failed"] + list(words)
                                     + self.common(sink_url) + ["a", "1", "b", "2"])
        self.assertEqual((status, out), (1, ""), err)
        return time.monotonic() - started, err

    def assert_elapsed_reported(self, err, took, timeout):
        match = re.search(r"^not delivered after (\d+\.\d+) s \(--timeout %s\): " % timeout,
                          err, re.M)
        self.assertIsNotNone(match, err)
        self.assertLessEqual(float(match.group(1)), took + 0.005)      # shown to 0.01 s
        self.assertNotIn("within", err)

    def test_rejected_key_reports_time_reason_and_hint(self):
        """CLI send: a 401 says how long it took, that sending is paused, and what to check."""
        sink = self.sink(access_key="ist_some_other_key")
        took, err = self.failed_send(sink.url)
        self.assertLess(took, 10)
        self.assert_elapsed_reported(err, took, 30)
        self.assertIn("401", err)
        self.assertIn("sending is paused (key_rejected)", err)
        self.assertIn("check the access key (%s): --access-key, IS_ACCESS_KEY or access_key "
                      "in isstreamer.ini" % lite._mask(CLI_KEY), err)
        self.assertNotIn(CLI_KEY, err)
        self.assertIn("2 events spooled;", err)
        self.assertEqual([r["events"] for r in
                          lite._Spool.of_key(self.spool, CLI_KEY).summary()], [2])

    def test_rejected_key_hint_masks_the_key_from_env_or_ini(self):
        """CLI send: the key hint shows the masked key from IS_ACCESS_KEY or the ini too."""
        sink = self.sink(access_key="ist_some_other_key")
        with open(self.ini, "w") as handle:
            handle.write("[isstreamer.client_config]\naccess_key = %s\n" % CLI_KEY)
        for env in ({"IS_ACCESS_KEY": CLI_KEY}, {}):
            with self.subTest(env=sorted(env)), mock.patch.dict(os.environ, env):
                status, out, err = self.main(
                    ["send", "--bucket-key", "cli-hint", "--api-base", sink.url, "--ini",
                     self.ini, "--spool-dir", self.spool, "a", "1"])
                self.assertEqual(status, 1, err)
                self.assertIn("check the access key (%s)" % lite._mask(CLI_KEY), err)
                self.assertNotIn("(none)", err)
                self.assertNotIn(CLI_KEY[:-4], err)

    def test_long_retry_after_is_reported_as_the_reason(self):
        """CLI send: a 429 asking to wait past --timeout ends at once and says it is rate limited."""
        sink = FaultSink(rule=lambda handler, path: (429, {"Retry-After": "8"})
                         if path.endswith("/api/events") else None).start()
        self.addCleanup(sink.stop)
        self.addCleanup(sink.released.set)
        took, err = self.failed_send(sink.url, "--timeout", "5")
        self.assertLess(took, 5)
        self.assert_elapsed_reported(err, took, 5)
        self.assertIn("429", err)
        self.assertIn("rate limited (429), and the next attempt is due after the 5 s timeout",
                      err)
        self.assertIn("2 events spooled;", err)

    def test_unwritable_spool_says_dropped_not_spooled(self):
        """CLI send: with a spool it cannot write it says how many were dropped, not spooled."""
        spool = os.path.join(self.home, "not-a-folder")
        with open(spool, "w") as handle:
            handle.write("a file where the spool folder should be\n")
        started = time.monotonic()
        status, out, err = self.main(["send", "--bucket-key", "cli-dropped", "--timeout", "1",
                                      "--api-base", dead_url(), "--access-key", CLI_KEY,
                                      "--ini", self.ini, "--spool-dir", spool, "a", "1", "b", "2"])
        took = time.monotonic() - started
        self.assertEqual((status, out), (1, ""), err)
        self.assert_elapsed_reported(err, took, 1)
        self.assertIn("2 events dropped (spool_unwritable: 2)", err)
        self.assertNotIn("spooled", err)
        self.assertNotIn("sent later", err)

    def test_send_as_subprocess(self):
        """CLI send: a child configured by IS_* variables delivers and exits 0."""
        sink = self.sink()
        result = self.run_cli(["send", "--bucket-key", "cli-child", "temp", "21.5", "ok",
                               "true"], IS_ACCESS_KEY=CLI_KEY, IS_API_BASE=sink.url,
                              IS_SPOOL_DIR=self.spool)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("sent 2 events to bucket cli-child", result.stdout)
        self.assertEqual(self.received(sink, "cli-child"), [("temp", 21.5), ("ok", True)])

    def test_server_down_as_subprocess(self):
        """CLI send: a child facing a dead server exits 1 and leaves the events spooled."""
        result = self.run_cli(["send", "--bucket-key", "cli-child-down", "--timeout", "1",
                               "a", "1"], IS_ACCESS_KEY=CLI_KEY, IS_API_BASE=dead_url(),
                              IS_SPOOL_DIR=self.spool)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("spooled", result.stderr)
        rows = lite._Spool.of_key(self.spool, CLI_KEY).summary()
        self.assertEqual([(r["bucket_key"], r["events"]) for r in rows],
                         [("cli-child-down", 1)])


class CliPipeTest(CliTestCase):
    """CLI pipe: line formats, bad lines, empty input, SIGTERM."""

    def pipe(self, sink, text, *flags):
        return self.main(["pipe", "--bucket-key", "cli-pipe"] + self.common(sink.url)
                         + list(flags), stdin=text)

    def test_every_line_format(self):
        """CLI pipe: key,value, key=value and JSON lines with epoch or iso8601 arrive."""
        sink = self.sink()
        noon = calendar.timegm((2026, 5, 1, 12, 0, 0, 0, 0, 0))
        status, out, err = self.pipe(sink, "\n".join([
            "temp,21.5",
            "humidity=40",
            "note = hello, world",
            "door,open",
            "flag,true",
            '{"key": "ok", "value": true}',
            '{"key": "text", "value": "21.5", "epoch": 1700000000.5}',
            '{"key": "when", "value": 1, "iso8601": "2026-05-01T14:00:00+02:00"}',
        ]) + "\n")
        self.assertEqual(status, 0, err)
        self.assertIn("8 lines read, 0 skipped, all delivered", err)
        self.assertEqual(self.received(sink, "cli-pipe"), [
            ("temp", 21.5), ("humidity", 40), ("note", "hello, world"), ("door", "open"),
            ("flag", True), ("ok", True), ("text", "21.5"), ("when", 1)])
        epochs = {e["key"]: e["epoch"] for _, e in sink.events}
        self.assertEqual(epochs["text"], 1700000000.5)
        self.assertEqual(epochs["when"], noon)

    def test_raw_keeps_text(self):
        """CLI pipe: --raw keeps key,value values as text; JSON values keep their type."""
        sink = self.sink()
        status, out, err = self.pipe(sink, 'temp,21.5\nflag=true\n{"key": "n", "value": 3}\n',
                                     "--raw")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.received(sink), [("temp", "21.5"), ("flag", "true"), ("n", 3)])

    def test_bad_lines_are_reported_and_skipped(self):
        """CLI pipe: bad lines are reported with their line numbers and the rest arrive."""
        sink = self.sink()
        lines = ["good,1",                                   # 1
                 "no separator here",                        # 2
                 "",                                         # 3 (blank: ignored)
                 "{not json",                                # 4
                 '{"key": "k"}',                             # 5 no value
                 "=5",                                       # 6 empty key
                 "k" * 251 + ",1",                           # 7 key too long
                 '{"key": "list", "value": [1, 2]}',         # 8 not a scalar
                 '{"key": "t", "value": 1, "iso8601": "soon"}',  # 9 bad time
                 '{"key": "", "value": 1}',                  # 10 empty key
                 "good=2"]                                   # 11
        status, out, err = self.pipe(sink, "\n".join(lines) + "\n")
        self.assertEqual(status, 0, err)
        reported = [int(n) for n in re.findall(r"^line (\d+) skipped: ", err, re.M)]
        self.assertEqual(reported, [2, 4, 5, 6, 7, 8, 9, 10])
        self.assertIn("251 characters", err)
        self.assertIn("10 lines read, 8 skipped, all delivered", err)
        self.assertEqual(self.received(sink), [("good", 1), ("good", 2)])

    def test_non_numeric_epoch_is_a_bad_line(self):
        """CLI pipe: a JSON line whose epoch is not a number is reported and skipped."""
        sink = self.sink()
        status, out, err = self.pipe(sink, '{"key": "a", "value": 1, "epoch": "noon"}\n'
                                           'b,2\n')
        self.assertEqual(status, 0, err)
        self.assertRegex(err, r"(?m)^line 1 skipped: ")
        self.assertEqual(self.received(sink), [("b", 2)])

    def test_one_line_is_singular(self):
        """CLI pipe: one line read is "1 line read", not "1 lines"."""
        sink = self.sink()
        status, out, err = self.pipe(sink, "a,1\n")
        self.assertEqual(status, 0, err)
        self.assertIn("1 line read, 0 skipped, all delivered", err)

    def test_empty_input(self):
        """CLI pipe: empty input exits 0 without sending anything."""
        sink = self.sink()
        status, out, err = self.pipe(sink, "")
        self.assertEqual(status, 0, err)
        self.assertIn("0 lines read, 0 skipped, all delivered", err)
        self.assertEqual(sink.events, [])

    def test_server_down_exits_1(self):
        """CLI pipe: lines that cannot be delivered in --timeout are spooled, exit 1."""
        status, out, err = self.main(["pipe", "--bucket-key", "cli-pipe-down", "--timeout",
                                      "1"] + self.common(dead_url()), stdin="a,1\nb,2\n")
        self.assertEqual(status, 1, err)
        self.assertIn("some not delivered yet (spooled: 2)", err)
        self.assertEqual([r["events"] for r in
                          lite._Spool.of_key(self.spool, CLI_KEY).summary()], [2])

    def test_sigterm_handler_restored(self):
        """CLI pipe: main() gives the caller's SIGTERM handler back when it returns."""
        def mine(signum, frame):
            pass
        signal.signal(signal.SIGTERM, mine)
        sink = self.sink()
        status, out, err = self.pipe(sink, "a,1\n")
        self.assertEqual(status, 0, err)
        self.assertIs(signal.getsignal(signal.SIGTERM), mine)

    def test_sigterm_while_echoing_stops(self):
        """CLI pipe: SIGTERM arriving while an event is echoed (--debug 1) still stops."""
        sink = self.sink()

        class SignalOnWrite(io.StringIO):
            # The handler main() installed runs as soon as write() returns, inside
            # logging's StreamHandler.emit, as when a real SIGTERM lands there.
            def write(self, text):
                written = io.StringIO.write(self, text)
                handled = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL,
                                                                   signal.SIG_IGN, None)
                if ECHO.match(text) and handled and not getattr(self, "sent", False):
                    self.sent = True            # never SIGTERM this process unhandled
                    os.kill(os.getpid(), signal.SIGTERM)
                return written
        echo = SignalOnWrite()
        handler = logging.StreamHandler(echo)
        handler.setFormatter(logging.Formatter("isstreamer_lite: %(message)s"))
        lite._log.addHandler(handler)
        status, out, err = self.pipe(sink, "a,1\nb,2\nc,3\n", "--debug", "1")
        self.assertEqual(status, 0, err)
        self.assertTrue(echo.sent)
        self.assertNotIn("Logging error", err)
        self.assertIn("stopping: flushing what was read", err)
        self.assertIn("1 line read, 0 skipped, all delivered", err)
        self.assertEqual(self.received(sink), [("a", 1)])

    def test_pipe_as_subprocess(self):
        """CLI pipe: a child reads standard input, skips a bad line, exits 0."""
        sink = self.sink()
        result = self.run_cli(["pipe", "--bucket-key", "cli-pipe-child"],
                              input='temp,21.5\nnonsense\n{"key": "ok", "value": false}\n',
                              IS_ACCESS_KEY=CLI_KEY, IS_API_BASE=sink.url,
                              IS_SPOOL_DIR=self.spool)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("line 2 skipped", result.stderr)
        self.assertIn("3 lines read, 1 skipped, all delivered", result.stderr)
        self.assertEqual(self.received(sink, "cli-pipe-child"), [("temp", 21.5), ("ok", False)])

    def test_sigterm_flushes_what_was_read(self):
        """CLI pipe: SIGTERM after lines were read delivers them all and exits 0."""
        sink = self.sink()
        child = self.popen(PYTHON + ["-m", "isstreamer_lite", "pipe", "--bucket-key",
                            "cli-sigterm", "--debug", "1"], IS_ACCESS_KEY=CLI_KEY,
                           IS_API_BASE=sink.url, IS_SPOOL_DIR=self.spool)
        count = 5                           # under buffer_size: still queued at SIGTERM
        child.stdin.write("".join("k%d,%d\n" % (i, i) for i in range(count)))
        child.stdin.flush()
        echoed, seen = [], []
        while len(echoed) < count:
            line = child.stderr.readline()
            self.assertTrue(line, "the child ended early: %s" % "".join(seen))
            seen.append(line)
            if ECHO.match(line.rstrip("\n")):
                echoed.append(line)
        child.send_signal(signal.SIGTERM)
        # Standard input stays open: only SIGTERM can end the child now.
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate(timeout=30)
            self.fail("pipe did not stop on SIGTERM: %s" % err)
        out, err = child.communicate(timeout=30)
        self.assertEqual(child.returncode, 0, "".join(seen) + err)
        self.assertIn("stopping: flushing what was read", err)
        self.assertIn("5 lines read, 0 skipped, all delivered", err)
        self.assertTrue(sink.wait_for(count, 10))
        self.assertEqual(self.received(sink, "cli-sigterm"),
                         [("k%d" % i, i) for i in range(count)])


class PipeInputTest(CliTestCase):
    """CLI pipe: bytes in, UTF-8 per line, numbers by JSON's grammar."""

    def pipe(self, sink, data):
        result = subprocess.run(
            PYTHON + ["-m", "isstreamer_lite", "pipe", "--bucket-key", "pipe-in"]
            + self.common(sink.url), input=data, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=self.env(IS_ACCESS_KEY=CLI_KEY, LC_ALL="C.UTF-8"),
            timeout=60, cwd=self.home)
        return result.returncode, result.stderr.decode("utf-8", "replace")

    def test_undecodable_line_is_skipped_and_the_rest_sent(self):
        """CLI pipe: one invalid UTF-8 byte skips that line only; a BOM is dropped."""
        sink = self.sink()
        lines = [b"\xef\xbb\xbffirst,1\n"] + [b"k%d,%d\n" % (i, i) for i in range(100)]
        lines.insert(50, b"bad\xff,1\n")
        status, err = self.pipe(sink, b"".join(lines))
        self.assertEqual(status, 0, err)
        self.assertIn("line 51 skipped: not UTF-8", err)
        got = self.received(sink, "pipe-in")
        self.assertEqual(got[0], ("first", 1))
        self.assertEqual(len(got), 101)

    def test_numbers_by_json_grammar_and_csv_rows(self):
        """CLI pipe: JSON numbers and true/false typed; 007, nan, 12_34, \u0663 stay text."""
        sink = self.sink()
        data = ("a,7\nb,-2.5e3\nc,007\nd,nan\ne,12_34\nf,\u0663\ng,true\nh,1e999\n"
                "1700000000.5,i,21.5\n").encode("utf-8")
        status, err = self.pipe(sink, data)
        self.assertEqual(status, 0, err)
        got = dict(self.received(sink, "pipe-in"))
        self.assertEqual(got, {"a": 7, "b": -2500.0, "c": "007", "d": "nan", "e": "12_34",
                               "f": "\u0663", "g": True, "h": "1e999", "i": 21.5})
        epochs = [e["epoch"] for _, e in sink.events if e["key"] == "i"]
        self.assertEqual(epochs, [1700000000.5])

    def test_sink_prints_what_its_terminal_cannot_encode(self):
        """CLI sink: an event its ASCII terminal cannot print is escaped, answered once."""
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        number = port.getsockname()[1]
        port.close()
        jsonl = os.path.join(self.home, "events.jsonl")
        child = self.popen(PYTHON + ["-m", "isstreamer_lite", "sink", "--port",
                            str(number), "--jsonl", jsonl], PYTHONIOENCODING="ascii")
        self.assertIn("events API on", child.stdout.readline())
        s = lite.Streamer("", "terminal", CLI_KEY, ini_file_location=False,
                          api_base="http://127.0.0.1:%d" % number,
                          spool_dir=os.path.join(self.home, "spool"))
        s.log("greenhouse", "\u6e29\u5ba4 \U0001f331")
        self.assertTrue(s.close(10))
        self.assertEqual(s.stats()["requests"], 2)          # the bucket, then the event
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
        self.assertIn("\\u6e29\\u5ba4", out)
        with open(jsonl, encoding="utf-8") as handle:
            self.assertEqual(len(handle.readlines()), 1)


# A process that spools 50 events (nothing listens at api_base), says READY and
# waits to be killed: no close(), no exit hook.
KILLED_CHILD = """\
import sys
import isstreamer_lite
s = isstreamer_lite.Streamer("Killed", "cli-killed", %(key)r, ini_file_location=False,
                             api_base=%(url)r, spool_dir=%(spool)r, max_retries=1,
                             backoff_base=0.01, backoff_cap=0.05, flush_interval=0.01)
for i in range(50):
    s.log("n", i)
print("READY", s.flush(1), s.stats()["spooled"])
sys.stdout.flush()
sys.stdin.readline()
"""


class CliReplayTest(CliTestCase):
    """CLI replay: dry run, the spool of a killed process, segment files, offline CSV."""

    def replay(self, api_base, *args):
        return self.main(["replay"] + self.common(api_base) + list(args))

    def test_dry_run_lists_pending_per_bucket(self):
        """CLI replay: --dry-run lists events per bucket and sends nothing."""
        self.spool_events(dead_url(), [("cli-a", "Bucket A", [("x", 1), ("y", 2), ("z", 3)]),
                                       ("cli-b", "", [("w", "text")])])
        before = spool_segments(self.spool)
        sink = self.sink()
        status, out, err = self.replay(sink.url, "--dry-run")
        self.assertEqual(status, 0, err)
        self.assertRegex(out, r"bucket 'cli-a' \(Bucket A\): 3 events in \d+ lines?, "
                              r"1 segment\n")
        self.assertRegex(out, r"bucket 'cli-b' \(no name\): 1 event in 1 line,")
        self.assertEqual(sink.requests, 0)
        self.assertEqual(spool_segments(self.spool), before)

    def test_counts_of_one_are_singular(self):
        """CLI replay: one spooled event is "1 event in 1 line, 1 segment", "replayed 1 event"."""
        self.spool_events(dead_url(), [("cli-one", "", [("x", 1)])])
        sink = self.sink()
        status, out, err = self.replay(sink.url, "--dry-run")
        self.assertEqual(status, 0, err)
        self.assertIn("bucket 'cli-one' (no name): 1 event in 1 line, 1 segment\n", out)
        status, out, err = self.replay(sink.url)
        self.assertEqual(status, 0, out + err)
        self.assertRegex(out, r"^replayed 1 event in \d+ requests?; 0 dead-lettered; spool empty")
        path = os.path.join(self.home, "one.csv")
        with open(path, "w") as handle:
            handle.write("1700000000.0,k,1\n")
        status, out, err = self.replay(sink.url, "--csv", path, "--bucket-key", "cli-one")
        self.assertEqual(status, 0, err)
        self.assertIn("sent 1 event from %s to bucket cli-one" % path, out)

    def test_dry_run_with_nothing_pending(self):
        """CLI replay: --dry-run on an empty spool says nothing is pending."""
        status, out, err = self.replay(dead_url(), "--dry-run")
        self.assertEqual(status, 0, err)
        self.assertIn("nothing pending in %s" % self.spool, out)

    def test_spool_of_killed_process_sent_once(self):
        """CLI replay: the spool of a SIGKILLed process arrives once; replay again is a no-op."""
        child = self.popen(PYTHON + ["-c", KILLED_CHILD % {
            "key": CLI_KEY, "url": dead_url(), "spool": self.spool}])
        ready = child.stdout.readline()
        self.assertEqual(ready.split(), ["READY", "False", "50"], child.stderr.read()
                         if not ready else ready)
        child.kill()
        child.wait(30)
        sink = self.sink()
        result = self.run_cli(["replay"], IS_ACCESS_KEY=CLI_KEY, IS_API_BASE=sink.url,
                              IS_SPOOL_DIR=self.spool)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("replayed 50 events", result.stdout)
        self.assertIn("spool empty", result.stdout)
        self.assertEqual(self.received(sink, "cli-killed"), [("n", i) for i in range(50)])
        self.assertEqual(sink.buckets.get("cli-killed"), "Killed")
        self.assertEqual(spool_segments(self.spool), [])
        status, out, err = self.replay(sink.url)
        self.assertEqual(status, 0, err)
        self.assertIn("replayed 0 events", out)
        self.assertEqual(len(sink.events), 50)

    def test_dry_run_after_replay_says_nothing_pending(self):
        """CLI replay: once a spool is replayed, --dry-run says nothing is pending."""
        self.spool_events(dead_url(), [("cli-a", "A", [("x", 1)])])
        sink = self.sink()
        status, out, err = self.replay(sink.url)
        self.assertEqual(status, 0, out + err)
        status, out, err = self.replay(sink.url, "--dry-run")
        self.assertEqual(status, 0, err)
        self.assertIn("nothing pending", out)

    def test_replay_in_process(self):
        """CLI replay: main(["replay"]) sends every bucket's spool and empties it."""
        self.spool_events(dead_url(), [("cli-a", "A", [("x", 1), ("y", 2)]),
                                       ("cli-b", "B", [("z", 3)])])
        sink = self.sink()
        status, out, err = self.replay(sink.url)
        self.assertEqual(status, 0, err)
        self.assertIn("replayed 3 events", out)
        self.assertEqual(self.received(sink, "cli-a"), [("x", 1), ("y", 2)])
        self.assertEqual(self.received(sink, "cli-b"), [("z", 3)])
        self.assertEqual(spool_segments(self.spool), [])

    def test_server_down_exits_1_and_keeps_spool(self):
        """CLI replay: with the server down it exits 1 and the spool stays as it was."""
        url = dead_url()
        self.spool_events(url, [("cli-a", "A", [("x", 1)])])
        status, out, err = self.replay(url, "--timeout", "1")
        self.assertEqual(status, 1, out + err)
        self.assertIn("some remain", out)
        self.assertEqual([r["events"] for r in
                          lite._Spool.of_key(self.spool, CLI_KEY).summary()], [1])

    def test_explicit_segment_files(self):
        """CLI replay: given segment files, only their events are sent."""
        self.spool_events(dead_url(), [("cli-a", "A", [("x", 1), ("y", 2)]),
                                       ("cli-b", "B", [("z", 3)])])
        only_a = []
        for path in spool_segments(self.spool):
            with open(os.path.join(os.path.dirname(path), "bucket.json")) as handle:
                if json.load(handle)["bucketKey"] == "cli-a":
                    only_a.append(path)
        self.assertTrue(only_a)
        sink = self.sink()
        status, out, err = self.replay(sink.url, *only_a)
        self.assertEqual(status, 0, out + err)
        self.assertIn("replayed 2 events", out)
        self.assertEqual(self.received(sink), [("x", 1), ("y", 2)])
        rows = lite._Spool.of_key(self.spool, CLI_KEY).summary()
        self.assertEqual({r["bucket_key"]: r["events"] for r in rows}.get("cli-b"), 1)

    def offline_csv(self):
        path = os.path.join(self.home, "isstreamer_out.csv")
        streamer = lite.Streamer("Offline", "ignored", ini_file_location=False, offline=True,
                                 offline_file=path, flush_interval=0.05)
        streamer.log("temp", 21.5, epoch=1700000000.25)
        streamer.log("count", 3, epoch=1700000001)
        streamer.log("open", True, epoch=1700000002)
        streamer.log("note", "hello, \"world\"", epoch=1700000003)
        self.assertTrue(streamer.close(10))
        return path

    def test_csv_of_offline_mode(self):
        """CLI replay: --csv sends an offline CSV's rows, typed, with their epochs."""
        path = self.offline_csv()
        sink = self.sink()
        status, out, err = self.replay(sink.url, "--csv", path, "--bucket-key", "cli-csv")
        self.assertEqual(status, 0, err)
        self.assertIn("sent 4 events from %s to bucket cli-csv" % path, out)
        self.assertEqual(self.received(sink, "cli-csv"), [
            ("temp", 21.5), ("count", 3), ("open", True), ("note", 'hello, "world"')])
        self.assertEqual([e["epoch"] for _, e in sink.events],
                         [1700000000.25, 1700000001.0, 1700000002.0, 1700000003.0])

    def test_csv_bad_rows_skipped(self):
        """CLI replay: --csv reports rows that are not epoch,key,value and sends the rest."""
        path = self.offline_csv()
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("just,two\nsoon,k,1\n1700000004.0,last,9\n")
        sink = self.sink()
        status, out, err = self.replay(sink.url, "--csv", path, "--bucket-key", "cli-csv")
        self.assertEqual(status, 0, err)
        self.assertIn("line 5 skipped: expected epoch,key,value", err)
        self.assertIn("line 6 skipped", err)
        self.assertEqual(self.received(sink)[-1], ("last", 9))
        self.assertEqual(len(sink.events), 5)

    def test_missing_file_exits_2(self):
        """CLI replay: a segment file or --csv that does not exist exits 2, sends nothing."""
        sink = self.sink()
        missing = os.path.join(self.home, "nope.jsonl")
        pattern = os.path.join(self.home, "*.jsonl")        # a glob the shell left unmatched
        for args, path in (([missing], missing), ([pattern], pattern),
                           (["--csv", missing, "--bucket-key", "cli-csv"], missing)):
            with self.subTest(args=args):
                status, out, err = self.replay(sink.url, *args)
                self.assertEqual(status, 2, out + err)
                self.assertIn("no such file: %s" % path, err)
                self.assertNotIn("replayed", out)
        self.assertEqual(sink.requests, 0)

    def test_csv_without_bucket_key_exits_2(self):
        """CLI replay: --csv without --bucket-key exits 2 and sends nothing."""
        path = self.offline_csv()
        sink = self.sink()
        status, out, err = self.replay(sink.url, "--csv", path)
        self.assertEqual(status, 2)
        self.assertIn("--bucket-key", err)
        self.assertEqual(sink.requests, 0)


class RateWindowTest(LiteTestCase):
    """The sink's rate limit from plain times: its headers, 429 past the limit, the reset."""

    def test_limit_per_window_then_retry_after_until_it_ends(self):
        """Sink: a window allows ``limit`` requests, then tells Retry-After until it ends."""
        window = lite._RateWindow(2, 10.0)
        self.assertEqual(window.count(103.0), (True, {
            "X-RateLimit-Limit": 2, "X-RateLimit-Remaining": 1, "X-RateLimit-Reset": "110.000"}))
        self.assertTrue(window.count(104.0)[0])
        allowed, headers = window.count(106.5)
        self.assertEqual((allowed, headers["X-RateLimit-Remaining"], headers["Retry-After"]),
                         (False, 0, "3.500"))
        self.assertEqual(window.count(110.0)[1]["X-RateLimit-Remaining"], 1)    # the next one

    def test_without_a_limit_every_request_passes_without_headers(self):
        """Sink: no rate_limit, no X-RateLimit-* headers and no refusal."""
        self.assertEqual(lite._RateWindow(None, 10.0).count(5.0), (True, {}))


class CliSinkTest(CliTestCase):
    """CLI sink: a child server on a free port, its output, --jsonl, rate limits, SIGTERM."""

    def start_sink(self, *args, host=r"127\.0\.0\.1"):
        """Start ``sink --port 0 ARGS``; return (child, its URL from the first line)."""
        child = self.popen(PYTHON + ["-m", "isstreamer_lite", "sink", "--port", "0"]
                           + list(args))
        first = child.stdout.readline()
        match = re.match(r"events API on (http://%s:(\d+)) " % host, first)
        self.assertIsNotNone(match, first or child.stderr.read())
        self.assertNotEqual(match.group(2), "0")
        return child, match.group(1)

    def stream(self, url, events, bucket_key="cli-sink"):
        streamer = lite.Streamer("", bucket_key, CLI_KEY, ini_file_location=False,
                                 api_base=url, spool_dir=self.spool, flush_interval=0.05)
        for key, value in events:
            streamer.log(key, value)
        self.assertTrue(streamer.close(10))

    def stop(self, child):
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
        self.assertEqual(child.returncode, 0, err)
        return out

    def test_prints_events_and_stops_on_sigterm(self):
        """CLI sink: prints each event it receives; SIGTERM stops it with exit 0."""
        child, url = self.start_sink()
        self.stream(url, [("temp", 21.5), ("door", "open")])
        self.assertEqual(child.stdout.readline(), "bucket cli-sink created\n")
        when = r" at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z\n\Z"
        self.assertRegex(child.stdout.readline(), r"\Acli-sink temp = 21\.5" + when)
        self.assertRegex(child.stdout.readline(), r"\Acli-sink door = 'open'" + when)
        out = self.stop(child)
        self.assertRegex(out, r"2 events in \d+ requests")

    def post(self, url, path, data, bucket_key=None):
        """POST ``data`` as JSON to the sink at ``url``; return the status."""
        conn = http.client.HTTPConnection(url.split("//")[1].rsplit(":", 1)[0].strip("[]"),
                                          int(url.rsplit(":", 1)[1]), timeout=30)
        self.addCleanup(conn.close)
        headers = {"X-IS-AccessKey": CLI_KEY, "Content-Type": "application/json"}
        if bucket_key:
            headers["X-IS-BucketKey"] = bucket_key
        conn.request("POST", path, json.dumps(data), headers)
        response = conn.getresponse()
        response.read()
        return response.status

    def test_prints_bucket_creations_and_epochs(self):
        """CLI sink: prints "bucket KEY created (NAME)", "bucket KEY exists" and UTC times."""
        child, url = self.start_sink()
        bucket = {"bucketKey": "cli-b", "bucketName": "Garden"}
        self.assertEqual(self.post(url, "/api/buckets", bucket), 201)
        self.assertEqual(self.post(url, "/api/buckets", bucket), 204)
        self.assertEqual(self.post(url, "/api/events", [
            {"key": "t", "value": 1, "epoch": 1700000000.25},
            {"key": "n", "value": "x"},
            {"key": "i", "value": True, "iso8601": "2026-05-01T12:00:00Z"},
            {"key": "w", "value": 2, "epoch": 1700000000}], "cli-b"), 204)
        self.assertEqual([child.stdout.readline() for _ in range(6)], [
            "bucket cli-b created (Garden)\n", "bucket cli-b exists\n",
            "cli-b t = 1 at 2023-11-14T22:13:20.250Z\n", "cli-b n = 'x'\n",
            "cli-b i = True at 2026-05-01T12:00:00Z\n", "cli-b w = 2 at 2023-11-14T22:13:20Z\n"])
        self.stop(child)

    def test_port_out_of_range_exits_2(self):
        """CLI sink: --port 99999 and --port -1 exit 2 naming the range, no traceback."""
        for port in ("99999", "-1"):
            with self.subTest(port=port):
                status, out, err = self.main(["sink", "--port", port])
                self.assertEqual(status, 2)
                self.assertIn("argument --port: the port must be a whole number from 0 to "
                              "65535, not %r" % port, err)

    def test_port_in_use_says_how_to_pick_another(self):
        """CLI sink: a port in use exits 2 naming the port and --port 0, no traceback."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = self.run_cli(["sink", "--port", str(port)])
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("port %d on 127.0.0.1 is already in use: pick another with --port, or "
                      "--port 0 for a free one" % port, result.stderr)

    def test_wildcard_host_advertises_loopback(self):
        """CLI sink: --host 0.0.0.0 and :: advertise 127.0.0.1 and [::1], with a note."""
        hosts = [("0.0.0.0", r"127\.0\.0\.1"), ("", r"127\.0\.0\.1")]
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
            hosts.append(("::", r"\[::1\]"))
        except OSError:
            pass                            # no IPv6 here: the IPv4 cases still run
        for host, reachable in hosts:
            with self.subTest(host=host):
                child, url = self.start_sink("--host", host, host=reachable)
                self.assertNotIn("0.0.0.0", url)
                note = child.stdout.readline()
                self.assertIn("listening on every address: other machines use this machine's "
                              "address", note)
                self.assertEqual(self.post(url, "/api/buckets", {"bucketKey": "w"}), 201)
                self.stop(child)

    def test_help_example_sets_the_access_key(self):
        """CLI sink: the --help example shows IS_ACCESS_KEY next to IS_API_BASE."""
        status, out, err = self.main(["sink", "--help"])
        self.assertEqual(status, 0, err)
        self.assertRegex(out, r"IS_ACCESS_KEY=\S+ IS_API_BASE=http://127\.0\.0\.1:8080 ")

    def test_access_key_option_rejects_other_keys(self):
        """CLI sink: --access-key answers 401 to any other key, 204 to that one."""
        child, url = self.start_sink("--access-key", CLI_KEY, "--quiet")
        port = int(url.rsplit(":", 1)[1])
        for key, status in (("ist_wrong_key", 401), (CLI_KEY, 204)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/api/events", b'[{"key": "k", "value": 1}]',
                         {"X-IS-AccessKey": key, "X-IS-BucketKey": "b",
                          "Content-Type": "application/json"})
            self.assertEqual(conn.getresponse().status, status)
            conn.close()
        self.stop(child)

    def test_one_event_is_singular(self):
        """CLI sink: after one event it says "1 event in 2 requests"."""
        child, url = self.start_sink("--quiet")
        self.stream(url, [("a", 1)])
        self.assertIn("1 event in 2 requests\n", self.stop(child))

    def test_sigterm_right_after_start(self):
        """CLI sink: SIGTERM as soon as it printed its URL stops it with exit 0."""
        child, url = self.start_sink()
        out = self.stop(child)
        self.assertIn("0 events in 0 requests", out)

    def test_jsonl_file(self):
        """CLI sink: --jsonl appends each event as a JSON line with its bucket key."""
        path = os.path.join(self.home, "events.jsonl")
        child, url = self.start_sink("--jsonl", path, "--quiet")
        self.stream(url, [("a", 1), ("b", True), ("c", "three")])
        out = self.stop(child)
        self.assertNotIn("cli-sink a", out)
        with open(path, encoding="utf-8") as handle:
            lines = [json.loads(line) for line in handle]
        self.assertEqual([(d["bucketKey"], d["key"], d["value"]) for d in lines],
                         [("cli-sink", "a", 1), ("cli-sink", "b", True),
                          ("cli-sink", "c", "three")])
        self.assertTrue(all(isinstance(d["epoch"], float) for d in lines))

    def test_rate_limit_answers_429(self):
        """CLI sink: --rate-limit 2 answers the third request 429 with the documented headers."""
        # A long window, so that the three requests never straddle a window boundary.
        child, url = self.start_sink("--rate-limit", "2", "--window", "3600", "--quiet")
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.addCleanup(conn.close)
        body = json.dumps([{"key": "a", "value": 1}])
        headers = {"X-IS-AccessKey": CLI_KEY, "X-IS-BucketKey": "cli-rate",
                   "Content-Type": "application/json", "Accept-Version": "~0"}
        answers = []
        for _ in range(3):
            conn.request("POST", "/api/events", body, headers)
            response = conn.getresponse()
            response.read()
            answers.append((response.status, response.getheader("X-RateLimit-Limit"),
                            response.getheader("X-RateLimit-Remaining"),
                            response.getheader("X-RateLimit-Reset"),
                            response.getheader("Retry-After")))
        now = time.time()
        self.assertEqual([a[:3] for a in answers],
                         [(204, "2", "1"), (204, "2", "0"), (429, "2", "0")])
        self.assertIsNone(answers[0][4])
        reset, retry_after = float(answers[2][3]), float(answers[2][4])
        self.assertGreater(reset, now - 1)
        self.assertLessEqual(reset, now + 3600)
        self.assertTrue(0 <= retry_after <= 3600, retry_after)
        out = self.stop(child)
        self.assertIn("2 events in 3 requests", out)


class CliSelftestTest(CliTestCase):
    """CLI selftest: offline smoke test and --live against a loopback server."""

    def live(self, api_base, *args):
        return self.main(["selftest", "--live"] + self.common(api_base) + list(args))

    def test_live_against_sink(self):
        """CLI selftest: --live creates the bucket, sends 3 events, shows 201 and 204."""
        sink = self.sink()
        status, out, err = self.live(sink.url)
        self.assertEqual(status, 0, out + err)
        self.assertIn("POST /api/buckets -> 201", out)
        self.assertIn("POST /api/events -> 204", out)
        self.assertIn("OK", out)
        self.assertIn(CLI_KEY[-4:], out)
        self.assertNotIn(CLI_KEY, out)
        self.assertEqual(len(self.received(sink, "isstreamer_lite-selftest")), 3)

    def test_live_shows_rate_limit_headers(self):
        """CLI selftest: --live shows the server's rate-limit headers."""
        sink = self.sink(rate_limit=5, window=3600)
        status, out, err = self.live(sink.url, "--bucket-key", "cli-live")
        self.assertEqual(status, 0, out + err)
        self.assertIn("x-ratelimit-limit=5", out.lower())
        self.assertIn("x-ratelimit-remaining=4", out.lower())
        self.assertIn("cli-live", sink.buckets)

    def test_live_rejected_key_exits_1(self):
        """CLI selftest: --live with a key the server refuses shows 401 and exits 1."""
        sink = self.sink(access_key="ist_some_other_key")
        status, out, err = self.live(sink.url)
        self.assertEqual(status, 1, out + err)
        self.assertIn("-> 401", out)
        self.assertIn("FAILED", out)

    def test_live_says_it_creates_a_bucket(self):
        """CLI selftest: --help and the first line of --live name the bucket it creates."""
        status, out, err = self.main(["selftest", "--help"])
        self.assertEqual(status, 0, err)
        self.assertIn('--live creates (or reuses) a bucket named "isstreamer_lite selftest"',
                      " ".join(out.split()))
        sink = self.sink()
        status, out, err = self.live(sink.url)
        self.assertEqual(status, 0, out + err)
        self.assertIn('creates (or reuses) a bucket named "isstreamer_lite selftest" (key '
                      'isstreamer_lite-selftest)', out.splitlines()[0])
        self.assertEqual(sink.buckets, {"isstreamer_lite-selftest": "isstreamer_lite selftest"})

    def test_live_rejected_key_hints_where_the_key_comes_from(self):
        """CLI selftest: FAILED after a 401 says where the (masked) access key comes from."""
        sink = self.sink(access_key="ist_some_other_key")
        status, out, err = self.live(sink.url)
        self.assertEqual(status, 1, out + err)
        self.assertIn("FAILED: check the access key (%s): --access-key, IS_ACCESS_KEY or "
                      "access_key in isstreamer.ini" % lite._mask(CLI_KEY), out)
        self.assertNotIn(CLI_KEY, out + err)

    def test_live_shows_rate_limit_reset_from_now(self):
        """CLI selftest: X-RateLimit-Reset is also shown as seconds from now."""
        sink = self.sink(rate_limit=5, window=3600)
        status, out, err = self.live(sink.url)
        self.assertEqual(status, 0, out + err)
        match = re.search(r"x-ratelimit-reset=([\d.]+) \(resets in (\d+) s\)", out)
        self.assertIsNotNone(match, out)
        self.assertAlmostEqual(int(match.group(2)), float(match.group(1)) - time.time(),
                               delta=5)

    def test_live_server_down_exits_1(self):
        """CLI selftest: --live against a dead server names the error and exits 1."""
        status, out, err = self.live(dead_url())
        self.assertEqual(status, 1, out + err)
        self.assertIn("ConnectionRefusedError", out)
        self.assertIn("FAILED", out)

    def test_offline_selftest_counts_one_connection(self):
        """CLI selftest: the offline test says "over 1 connection", not "connection(s)"."""
        status, out, err = self.main(["selftest"])
        self.assertEqual(status, 0, out + err)
        self.assertRegex(out, r"\d+ events in \d+ requests over 1 connection to a loopback")

    def test_offline_selftest_as_subprocess(self):
        """CLI selftest: python -m isstreamer_lite selftest exits 0 and says OK."""
        result = self.run_cli(["selftest"])
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("OK", result.stdout)

    def test_live_as_subprocess(self):
        """CLI selftest: selftest --live in a child uses IS_* and shows the status codes."""
        sink = self.sink()
        result = self.run_cli(["selftest", "--live"], IS_ACCESS_KEY=CLI_KEY,
                              IS_API_BASE=sink.url, IS_SPOOL_DIR=self.spool)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("-> 201", result.stdout)
        self.assertIn("-> 204", result.stdout)


class CliProxyTest(CliTestCase):
    """CLI and transport: loopback is never proxied; the proxy used is named, its password not."""

    def test_send_to_loopback_ignores_http_proxy(self):
        """CLI send: with http_proxy set, 127.0.0.1 and localhost are reached directly."""
        os.environ["http_proxy"] = dead_url()           # a proxy that refuses everything
        sink = self.sink()
        for host in ("127.0.0.1", "localhost"):
            with self.subTest(host=host):
                url = "http://%s:%d" % (host, sink.port)
                status, out, err = self.main(["send", "--bucket-key", "cli-proxy", "--timeout",
                                              "10"] + self.common(url) + ["via", host])
                self.assertEqual(status, 0, err)
        self.assertEqual(self.received(sink, "cli-proxy"),
                         [("via", "127.0.0.1"), ("via", "localhost")])

    def test_loopback_hosts_get_no_proxy(self):
        """Transport: no proxy for 127.0.0.1, ::1 or localhost, whatever the environment says."""
        os.environ["http_proxy"] = os.environ["https_proxy"] = "http://127.0.0.1:3128"
        for base in ("http://127.0.0.1:8080", "https://127.0.0.1", "http://[::1]:8080",
                     "http://localhost:8080", "https://LOCALHOST"):
            with self.subTest(base=base):
                self.assertIsNone(lite._Dialer(base)._resolve_proxy())

    def test_proxy_is_named_at_debug_level_without_credentials(self):
        """Transport: the proxy a remote host is reached through is logged, with no password."""
        os.environ["https_proxy"] = "http://proxyuser:s3cret@127.0.0.1:3128"
        dialer = lite._Dialer("https://groker.init.st")
        with self.assertLogs("isstreamer_lite", "DEBUG") as logs:
            proxy = dialer._resolve_proxy()
        self.assertEqual(proxy[:2], ("127.0.0.1", 3128))
        text = "\n".join(logs.output)
        self.assertIn("groker.init.st through the proxy 127.0.0.1:3128", text)
        self.assertNotIn("s3cret", text)
        self.assertNotIn("proxyuser", text)


class StatusTest(CliTestCase):
    """CLI status and discard, against a spool a killed process left behind."""

    def killed_child_spool(self):
        child = self.popen(PYTHON + ["-c", KILLED_CHILD % {
            "key": CLI_KEY, "url": dead_url(), "spool": self.spool}])
        self.assertEqual(child.stdout.readline().split(), ["READY", "False", "50"])
        child.kill()
        child.wait(30)

    def test_status_shows_backlog_error_and_exit_1(self):
        """CLI status: backlog per bucket, its age and the last error; exit 1; key masked."""
        self.killed_child_spool()
        result = self.run_cli(["status", "--spool-dir", self.spool])
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("backlog: bucket 'cli-killed' (Killed): 50 events", result.stdout)
        self.assertIn("last error: creating bucket 'cli-killed'", result.stdout)
        self.assertIn("last success: never", result.stdout)
        self.assertNotIn(CLI_KEY[:-4], result.stdout + result.stderr)
        result = self.run_cli(["status", "--json", "--spool-dir", self.spool])
        report = json.loads(result.stdout)
        self.assertEqual(report["pending_events"], 50)
        self.assertEqual(report["keys"][0]["backlog"][0]["bucket_key"], "cli-killed")
        self.assertLess(report["keys"][0]["backlog"][0]["oldest_age_s"], 60)
        self.assertEqual(report["keys"][0]["key"], lite._mask(CLI_KEY))

    def test_status_after_delivery_says_nothing_pending(self):
        """CLI status: once a replay sent the backlog, exit 0 and the last success shown."""
        self.killed_child_spool()
        sink = self.sink(rate_limit=30, window=10.0)
        status, out, err = self.main(["replay"] + self.common(sink.url))
        self.assertEqual(status, 0, err)
        result = self.run_cli(["status", "--spool-dir", self.spool])
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("nothing pending", result.stdout)
        self.assertRegex(result.stdout, r"last success: \d+ s ago")
        self.assertIn("rate limit: 30 calls per 10 s (told by the server)", result.stdout)

    def test_discard_asks_then_deletes(self):
        """CLI discard: refuses without a terminal or --yes; with --yes deletes the backlog."""
        self.killed_child_spool()
        result = self.run_cli(["discard", "--bucket-key", "cli-killed", "--spool-dir",
                               self.spool], IS_ACCESS_KEY=CLI_KEY)
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("--yes", result.stderr)
        self.assertEqual(len(spool_segments(self.spool)), 1)
        result = self.run_cli(["discard", "--bucket-key", "cli-killed", "--yes",
                               "--spool-dir", self.spool], IS_ACCESS_KEY=CLI_KEY)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("discarded 50 spooled events of bucket 'cli-killed'", result.stdout)
        self.assertEqual(spool_segments(self.spool), [])

    def test_dead_letters_shown_by_dry_run_and_status_then_discarded(self):
        """CLI: replay --dry-run and status show dead letters; discard --dead-letters clears."""
        sink = self.sink()
        s = lite.Streamer("", "poisoned", CLI_KEY, ini_file_location=False, api_base=sink.url,
                          spool_dir=self.spool)
        sink.fault = lambda handler, path: path == "/api/events" and (
            lite._Sink.reply(handler, 400, {"message": "no such thing"}) or True)
        s.log("x", 1)
        self.assertFalse(closed_and_stopped(s, 5))
        status, out, err = self.main(["replay", "--dry-run"] + self.common(sink.url))
        self.assertIn("1 dead letter (events the server refused)", out)
        result = self.run_cli(["status", "--spool-dir", self.spool])
        self.assertIn("dead letters: 1, newest: ", result.stdout)
        self.assertIn("no such thing", result.stdout)
        result = self.run_cli(["discard", "--dead-letters", "--yes", "--spool-dir",
                               self.spool], IS_ACCESS_KEY=CLI_KEY)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(glob.glob(os.path.join(self.spool, "*", "deadletter.jsonl")), [])


class StatusTruthTest(CliTestCase):
    """CLI status agrees with the truth: across runs, in running processes, after recovery."""

    def status(self, *words):
        return self.main(["status", "--spool-dir", self.spool] + list(words))

    def test_last_success_survives_a_later_failed_run(self):
        """status: a run with the server down does not make the last success 'never'."""
        sink = self.sink()
        s = lite.Streamer("", "cli-kept", CLI_KEY, ini_file_location=False, api_base=sink.url,
                          spool_dir=self.spool)
        s.log("n", 1)
        self.assertTrue(closed_and_stopped(s, 10))
        s = lite.Streamer("", "cli-kept", CLI_KEY, ini_file_location=False,
                          api_base=dead_url(), spool_dir=self.spool, wait_timeout=0.5,
                          backoff_base=0.01, backoff_cap=0.05)
        s.log("n", 2)
        with self.assertLogs("isstreamer_lite", "WARNING"):
            self.assertFalse(closed_and_stopped(s, 0.5))
        status, out, err = self.status()
        self.assertEqual(status, 1, out + err)
        self.assertRegex(out, r"last success: \d+ s ago")
        self.assertIn("last error: creating bucket 'cli-kept'", out)

    def test_events_in_a_running_process_are_counted(self):
        """status: events a running script holds in memory are pending, with its pid."""
        child = self.popen(PYTHON + ["-c", HELD_CHILD % {
            "key": CLI_KEY, "url": dead_url(), "spool": self.spool}])
        ready = child.stdout.readline().split()
        self.assertEqual(ready[:3], ["READY", "12", "0"], child.stderr.read()
                         if ready[:1] != ["READY"] else ready)
        started = time.monotonic()
        status, out, err = self.status()
        self.assertLess(time.monotonic() - started, 3.0)     # it asked and was answered
        self.assertEqual(status, 1, out + err)
        self.assertIn("12 events pending", out)
        self.assertIn("running: process %s, 12 events held in memory\n" % ready[3], out)
        status, out, err = self.status("--json")
        report = json.loads(out)
        self.assertEqual((report["pending_events"], report["keys"][0]["in_memory"]), (12, 12))
        child.stdin.write("\n")
        child.stdin.close()
        self.assertEqual(child.wait(30), 0)
        status, out, err = self.status()        # its exit hook spooled them
        self.assertIn("backlog: bucket 'cli-held' (Held): 12 events", out)
        self.assertNotIn("running:", out)

    def test_recovered_key_is_idle_not_paused(self):
        """status: a rejected key whose backlog another key's replay sent is idle."""
        wrong = "ist_wrong_key_0123456789"
        sink = self.sink(access_key=CLI_KEY)        # answers 401 to any other key
        s = lite.Streamer("", "cli-wrong", wrong, ini_file_location=False,
                          api_base=sink.url, spool_dir=self.spool, wait_timeout=0.5)
        s.log("n", 1)
        with self.assertLogs("isstreamer_lite", "WARNING"):
            self.assertFalse(closed_and_stopped(s, 0.5))
        status, out, err = self.status()
        self.assertIn("sending paused: key_rejected", out)
        status, out, err = self.main(["replay"] + spool_segments(self.spool)
                                     + self.common(sink.url))
        self.assertEqual(status, 0, out + err)
        status, out, err = self.status()
        self.assertEqual(status, 0, out + err)
        self.assertNotIn("sending paused", out)
        self.assertIn("idle: nothing to send and no process running (its last run was "
                      "paused: key_rejected)", out)

    def test_short_keys_are_told_apart_by_fingerprint(self):
        """status: keys too short to show four characters are named by their fingerprints."""
        for key in ("ist_a1", "ist_b2"):
            s = lite.Streamer("", "cli-short", key, ini_file_location=False,
                              api_base=dead_url(), spool_dir=self.spool, wait_timeout=0.2,
                              backoff_base=0.01, backoff_cap=0.05)
            s.log("n", 1)
            with self.assertLogs("isstreamer_lite", "WARNING"):
                closed_and_stopped(s, 0.2)
        status, out, err = self.status()
        self.assertNotIn("key ****", out)
        for key in ("ist_a1", "ist_b2"):
            self.assertIn("key with fingerprint %s\n" % lite._fingerprint(key), out)


# --- Examples, README and installation ---------------------------------------
# What a new user runs first.

# The seed README's "Basic Usage" block, verbatim but for the import line.
README_BASIC = '''\
from isstreamer_lite import Streamer

# create or append to a Streamer instance
streamer = Streamer(bucket_name="Some Bucket Name", bucket_key="bucket_key", access_key="YourAccessKey")

# send some data
streamer.log("test", "hi")
streamer.log("temperature", 32)

# flush data (force the buffer to empty and send)
streamer.flush()

# close the stream
streamer.close()
'''


# An ISStreamer-style device script that never calls flush() or close().
NO_CLOSE_SCRIPT = '''\
from isstreamer_lite import Streamer

streamer = Streamer(bucket_name="No Close", bucket_key="no_close", buffer_size=200)
for reading in range(25):
    streamer.log("reading", reading)
streamer.log_object({"a": 1, "b": 2}, key_prefix="last")
'''


class ExamplesTest(ExampleCase):
    """examples/*.py and ISStreamer scripts run unchanged but for the import."""

    def test_basic_logs_two_events(self):
        """examples/basic.py: test=hi and temperature=32 reach bucket_key, named."""
        self.run_example("basic.py")
        self.assertEqual(self.received(), [("Some Bucket Name", "test", "hi"),
                                           ("Some Bucket Name", "temperature", 32)])
        self.assertEqual(self.sink.buckets, {"bucket_key": "Some Bucket Name"})
        self.assertEqual({b for b, _ in self.sink.events}, {"bucket_key"})
        self.epochs()

    def test_flush_each_loop_sends_each_pass_whole(self):
        """examples/flush_each_loop.py: counter, dict and growing list; no request spans two passes."""
        self.run_example("flush_each_loop.py")
        expected = []
        for counter in range(3):
            expected.append(("loop_counter", counter))
            expected.extend([("some_dict_a", 1), ("some_dict_b", 2), ("some_dict_c", 3)])
            expected.extend(("list_%d" % i, i) for i in range(counter + 1))
        self.assertEqual(self.received(), [("Dynamic Buffer",) + e for e in expected])
        self.assertEqual(list(self.sink.buckets.values()), ["Dynamic Buffer"])
        # flush() ends each pass: every pass ends at a request boundary.
        ends, total = set(), 0
        for events in self.sink.requests_events:
            total += len(events)
            ends.add(total)
        self.assertLessEqual({5, 11, 18}, ends)
        self.epochs()

    def test_log_object_keys_and_one_epoch_per_call(self):
        """examples/log_object.py: dict, prefixed list, list and namedtuple keys; one epoch per call."""
        self.run_example("log_object.py")
        self.assertEqual([(k, v) for _, k, v in self.received()], [
            ("dict_foo", "1"), ("dict_bar", "2"), ("cpu_0", 12.5), ("cpu_1", 40.0),
            ("list_0", "1"), ("list_1", "2"), ("list_2", "3"),
            ("svmem_total", 8000), ("svmem_available", 6000), ("svmem_percent", 25.0)])
        self.assertEqual(list(self.sink.buckets.values()), ["test object logging"])
        epochs = self.epochs()
        calls = [epochs[0:2], epochs[2:4], epochs[4:7], epochs[7:10]]
        self.assertEqual([len(set(call)) for call in calls], [1, 1, 1, 1])
        self.assertEqual(len(set(epochs)), 4)

    def test_switch_bucket_lands_in_both(self):
        """examples/switch_bucket.py: key1=starting in two buckets of fixed keys."""
        self.run_example("switch_bucket.py")
        self.assertEqual(self.received(), [("Starting Bucket", "key1", "starting"),
                                           ("New Bucket", "key1", "starting")])
        self.assertEqual(sorted(self.sink.buckets.values()), ["New Bucket", "Starting Bucket"])
        self.assertEqual([b for b, _ in self.sink.events],
                         ["switch_bucket_start", "switch_bucket_new"])
        self.epochs()

    def test_timestamp_override_pairs_share_epoch(self):
        """examples/timestamp_override.py: each pass's two events carry the one epoch given."""
        self.run_example("timestamp_override.py")
        expected = []
        for x in range(3):
            expected.extend([("iteration", x), ("message", "same time")])
        self.assertEqual([(k, v) for _, k, v in self.received()], expected)
        self.assertEqual(list(self.sink.buckets.values()), ["Time Override Example"])
        epochs = self.epochs()
        self.assertEqual(epochs[0::2], epochs[1::2])    # logged 10 ms apart, same stamp
        self.assertEqual(epochs[0::2], sorted(set(epochs)))

    def test_offline_csv_writes_rows_sends_nothing(self):
        """examples/offline_csv.py: epoch,key,value rows in ./isstreamer_out.csv; no request."""
        self.run_example("offline_csv.py")
        with open(os.path.join(self.dir, "isstreamer_out.csv"), newline="") as handle:
            rows = list(csv.reader(handle))
        expected = [["My Messages", "Stream Starting"]]
        for num in range(1, 7):
            expected.extend([["My Numbers", str(num)], ["My Booleans", str(num % 2 == 1)]])
            if num % 3 == 0:
                expected.append(["My Events", "pop"])
        expected.append(["My Messages", "Stream Done"])
        self.assertEqual([row[1:] for row in rows], expected)
        for row in rows:
            self.assertTrue(self.started - 1 <= float(row[0]) <= self.finished + 1, row)
        self.assertEqual((self.sink.requests, self.sink.events, self.sink.buckets), (0, [], {}))

    def test_debug_level_echoes_and_raises(self):
        """examples/debug_level.py: the event is echoed on stderr, NaN raises, the key never shows."""
        result = self.run_example("debug_level.py", quiet=False)
        self.assertEqual(self.received(), [("SomeBucketName", "temperature", 21.5)])
        self.assertRegex(result.stdout, r"^rejected: .*'temperature'.*nan")
        lines = result.stderr.splitlines()
        self.assertRegex(lines[-1], r"^isstreamer_lite: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: "
                                    r"temperature 21\.5$")
        self.assertNotIn(EXAMPLES_KEY, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn("Warning", result.stderr)
        self.epochs()

    def test_readme_basic_block_runs_unchanged(self):
        """ISStreamer script: the seed README's basic block runs with only the import changed."""
        self.sink.access_key = "YourAccessKey"          # the key written in the script is used
        self.run_text(README_BASIC)
        self.assertEqual(self.received(), [("Some Bucket Name", "test", "hi"),
                                           ("Some Bucket Name", "temperature", 32)])
        self.assertEqual(self.sink.buckets, {"bucket_key": "Some Bucket Name"})
        self.epochs()

    def test_script_without_close_delivers_at_exit(self):
        """ISStreamer script: never calling flush() or close(), the exit hook delivers everything."""
        self.run_text(NO_CLOSE_SCRIPT)
        self.assertEqual([(k, v) for _, k, v in self.received()],
                         [("reading", i) for i in range(25)] + [("last_a", 1), ("last_b", 2)])
        self.assertEqual(self.sink.buckets, {"no_close": "No Close"})
        self.epochs()


# The bucket keys and names each example streams to; the same on every run.
EXAMPLE_BUCKETS = {
    "basic.py": {"bucket_key": "Some Bucket Name"},
    "debug_level.py": {"debug_level_example": "SomeBucketName"},
    "flush_each_loop.py": {"dynamic_buffer_example": "Dynamic Buffer"},
    "log_object.py": {"log_object_example": "test object logging"},
    "switch_bucket.py": {"switch_bucket_start": "Starting Bucket",
                         "switch_bucket_new": "New Bucket"},
    "timestamp_override.py": {"timestamp_override_example": "Time Override Example"},
}


class ExampleBucketKeyTest(ExampleCase):
    """Examples stream to fixed bucket keys: a second run creates no new bucket."""

    def test_every_streamer_and_set_bucket_call_names_a_bucket_key(self):
        """examples/*.py: every Streamer() and set_bucket() call passes bucket_key."""
        paths = sorted(glob.glob(os.path.join(EXAMPLES_DIR, "*.py")))
        if not paths:
            self.skipTest("no examples/ beside %s (a vendored copy)" % lite.__file__)
        for path in paths:
            with open(path) as handle:
                tree = ast.parse(handle.read(), path)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name in ("Streamer", "set_bucket"):
                    with self.subTest(example=os.path.basename(path), line=node.lineno):
                        self.assertIn("bucket_key", [k.arg for k in node.keywords])

    def test_examples_send_to_their_fixed_keys(self):
        """examples/*.py: each sends to its own fixed keys, in order, under the names shown."""
        for name, buckets in sorted(EXAMPLE_BUCKETS.items()):
            with self.subTest(example=name):
                self.sink = ExamplesSink().start()
                self.addCleanup(self.sink.stop)
                self.run_example(name, quiet=name != "debug_level.py")
                self.assertEqual(self.sink.buckets, buckets)
                used = []
                for bucket, _ in self.sink.events:
                    if bucket not in used:
                        used.append(bucket)
                self.assertEqual(used, list(buckets))     # switch_bucket: start, then new


# A device script that closes its Streamer itself, as examples/basic.py does.
CLOSING_SCRIPT = '''\
from isstreamer_lite import Streamer

streamer = Streamer(bucket_name="Closes", bucket_key="closes", wait_timeout=0.5)
streamer.log("test", "hi")
streamer.log("temperature", 32)
streamer.close()
'''


class UndeliveredNoteTest(ExampleCase):
    """A run that ends with events undelivered says so once, at warning level."""

    def run_down(self, text, api_base=None):
        """Run ``text`` against ``api_base`` (default: the server down); its stderr lines."""
        path = os.path.join(self.dir, "device_script.py")
        with open(path, "w") as handle:
            handle.write(text)
        env = self.example_env()
        env["IS_API_BASE"] = api_base or dead_url()
        result = subprocess.run(PYTHON + [path], cwd=self.dir, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                                env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stderr.splitlines()

    def assert_note(self, lines, why, before=0):
        """The last line is the note; ``before``: lines the run printed before it."""
        self.assertEqual(len(lines), before + 1, lines)
        lines = lines[before:]
        self.assertIn("isstreamer_lite: 2 events not delivered: ", lines[0])
        self.assertIn(why, lines[0])
        self.assertIn("They wait in the spool %s" % os.path.join(
            self.dir, "spool", lite._fingerprint(EXAMPLES_KEY)), lines[0])
        self.assertIn("the next run with access key %s sends them" % lite._mask(EXAMPLES_KEY),
                      lines[0])
        self.assertNotIn(EXAMPLES_KEY[:-4], lines[0])

    def test_close_with_server_down_warns_once(self):
        """Undelivered: a script whose close() spools its events prints one line, exit hook included."""
        lines = self.run_down(CLOSING_SCRIPT)
        self.assert_note(lines, "the server has been unreachable since ")
        self.assertRegex(lines[0], r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \((creating|sending "
                                   r"2 events to) bucket 'closes': ConnectionRefusedError")

    def test_exit_hook_with_server_down_warns_once(self):
        """Undelivered: a script that never closes hears the same one line from the exit hook."""
        text = CLOSING_SCRIPT.replace("streamer.close()\n", "").replace(
            "wait_timeout=0.5", "exit_timeout=0.5")
        self.assert_note(self.run_down(text), "the server has been unreachable since ")

    def test_rejected_key_says_so(self):
        """Undelivered: after a 401 the line says the key (masked) was rejected."""
        sink = ExamplesSink(access_key="ist_someone_else").start()
        self.addCleanup(sink.stop)
        self.assert_note(self.run_down(CLOSING_SCRIPT, sink.url),
                         "the server rejected the access key %s" % lite._mask(EXAMPLES_KEY),
                         before=1)      # the pause said so as it happened

    def test_delivered_run_says_nothing(self):
        """Undelivered: a run that delivered everything prints nothing."""
        self.assertEqual(self.run_down(CLOSING_SCRIPT, self.sink.url), [])


class DeviceExamplesTest(ExampleCase):
    """The device examples: Pi CPU temperature, the pipe one-liner, the systemd unit."""

    def example_path(self, name):
        if not os.path.isdir(EXAMPLES_DIR):
            self.skipTest("no examples/ beside %s (a vendored copy)" % lite.__file__)
        return os.path.join(EXAMPLES_DIR, name)

    def fake_sensor(self, millidegrees):
        path = os.path.join(self.dir, "temp")
        with open(path, "w") as handle:
            handle.write("%d\n" % millidegrees)
        return path

    def test_pi_cpu_temperature_reads_thermal_zone(self):
        """examples/pi_cpu_temperature.py: logs the thermal zone in degrees Celsius."""
        env = self.example_env(CPU_TEMP_FILE=self.fake_sensor(48312), CPU_TEMP_INTERVAL="0",
                               CPU_TEMP_COUNT="3")
        result = subprocess.run(PYTHON + [self.example_path("pi_cpu_temperature.py")],
                                cwd=self.dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.received(), [("Pi CPU", "cpu_temp_c", 48.312)] * 3)

    def test_service_stop_loses_nothing(self):
        """examples/isstreamer-pi.service: SIGTERM (systemctl stop) delivers every reading."""
        env = self.example_env(CPU_TEMP_FILE=self.fake_sensor(51000),
                               CPU_TEMP_INTERVAL="3600")   # asleep when the stop comes
        child = subprocess.Popen(PYTHON + [self.example_path("pi_cpu_temperature.py")],
                                 cwd=self.dir, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(child.stdout.readline().strip(), "cpu_temp_c 51.0")
        child.terminate()
        out, err = child.communicate(timeout=30)
        self.assertEqual(child.returncode, 143, err)     # SuccessExitStatus=143 in the unit
        self.assertEqual(self.received(), [("Pi CPU", "cpu_temp_c", 51.0)])

    def test_service_unit_settings(self):
        """examples/isstreamer-pi.service: stops with SIGTERM in time and counts 143 as success."""
        import configparser
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str
        unit.read(self.example_path("isstreamer-pi.service"))
        service = unit["Service"]
        self.assertIn("pi_cpu_temperature.py", service["ExecStart"])
        self.assertEqual(service["KillSignal"], "SIGTERM")
        self.assertIn("143", service["SuccessExitStatus"].split())
        self.assertGreater(float(service["TimeoutStopSec"]), 5.0)    # exit_timeout
        self.assertIn("multi-user.target", unit["Install"]["WantedBy"])

    def test_load_average_pipe_one_liner(self):
        """examples/load_average_pipe.sh: a shell loop into pipe streams each reading."""
        if not os.path.exists("/proc/loadavg"):
            self.skipTest("needs /proc/loadavg")
        env = self.example_env(COUNT="3", INTERVAL="0", PYTHON=sys.executable)
        result = subprocess.run(["sh", self.example_path("load_average_pipe.sh")],
                                cwd=self.dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        got = self.received()
        self.assertEqual([(b, k) for b, k, _ in got], [("Pi load", "load_1m")] * 3)
        self.assertTrue(all(isinstance(v, float) for _, _, v in got), got)


class PiTemperatureReadTest(ExampleCase):
    """examples/pi_cpu_temperature.py keeps streaming through failed sensor reads."""

    def test_failed_reads_warn_and_streaming_goes_on(self):
        """examples/pi_cpu_temperature.py: a missing then garbled sensor file warns; no exit."""
        path = os.path.join(EXAMPLES_DIR, "pi_cpu_temperature.py")
        if not os.path.isfile(path):
            self.skipTest("no examples/ beside %s (a vendored copy)" % lite.__file__)
        sensor = os.path.join(self.dir, "temp")
        env = self.example_env(CPU_TEMP_FILE=sensor, CPU_TEMP_INTERVAL="0.02",
                               CPU_TEMP_COUNT="2")
        child = guarded_popen(self, PYTHON + [path], self.dir, env, 60)

        def warned(about):
            """Read stderr up to a warning about `about`; return that line."""
            line = child.stderr.readline()
            while line and about not in line:
                line = child.stderr.readline()
            self.assertIn(about, line)      # "" at end of output: the child gave up
            self.assertIn(sensor, line)
            return line

        def present(text):
            """The sensor file appears whole (a reader never sees half of it)."""
            with open(sensor + ".new", "w") as handle:
                handle.write(text)
            os.replace(sensor + ".new", sensor)

        warned("No such file")
        present("garbage\n")
        warned("invalid literal")
        present("48312\n")
        out, err = child.communicate(timeout=30)
        self.assertEqual(child.returncode, 0, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(out.splitlines(), ["cpu_temp_c 48.3"] * 2)
        self.assertEqual(self.received(), [("Pi CPU", "cpu_temp_c", 48.312)] * 2)


def unit_lines(path):
    """[(section, key, value)] of a systemd unit file, repeated keys kept, in order."""
    lines, section = [], None
    with open(path) as handle:
        for raw in handle:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, _, value = line.partition("=")
            lines.append((section, key.strip(), value.strip()))
    return lines


class ServiceUnitStateTest(IsolatedCase):
    """examples/isstreamer-pi.service: spool in its state directory, a user you choose."""

    def setUp(self):
        IsolatedCase.setUp(self)
        self.path = os.path.join(EXAMPLES_DIR, "isstreamer-pi.service")
        if not os.path.isfile(self.path):
            self.skipTest("no examples/ beside %s (a vendored copy)" % lite.__file__)
        self.lines = unit_lines(self.path)

    def values(self, key):
        return [v for section, k, v in self.lines if section == "Service" and k == key]

    def test_spool_is_in_the_state_directory(self):
        """Service unit: StateDirectory= is set and IS_SPOOL_DIR is %S/ that directory."""
        state = self.values("StateDirectory")
        self.assertEqual(len(state), 1, self.lines)
        self.assertRegex(state[0], r"^[A-Za-z0-9_.-]+$")     # one relative name
        environment = " ".join(self.values("Environment")).split()
        self.assertIn("IS_SPOOL_DIR=%%S/%s" % state[0], environment)
        self.assertIn("IS_DURABLE=1", environment)
        self.assertEqual(self.values("StateDirectoryMode"), ["0700"])

    def test_user_is_a_placeholder_that_says_how_to_choose(self):
        """Service unit: User= is not the stale "pi" (nor root); id -un fills it in."""
        users = self.values("User")
        self.assertEqual(len(users), 1, self.lines)
        self.assertNotIn(users[0], ("", "pi", "root", "0"))
        with open(self.path) as handle:
            text = handle.read()
        self.assertIn("id -un", text)
        # The setup line in the header turns the placeholder into the current user.
        match = re.search(r'sed -i "s/\^User=\.\*/User=\$\(id -un\)/"', text)
        self.assertIsNotNone(match, text)

    def test_unit_passes_systemd_analyze_verify(self):
        """Service unit: systemd-analyze verify accepts it once User= is filled in."""
        analyze = shutil.which("systemd-analyze")
        python = self.values("ExecStart")[0].split()[0]
        if analyze is None or not os.access(python, os.X_OK):
            self.skipTest("needs systemd-analyze and %s" % python)
        folder = tempfile.mkdtemp(prefix="isl-unit-")
        self.addCleanup(shutil.rmtree, folder, True)
        with open(self.path) as handle:
            text = re.sub(r"(?m)^User=.*$", "User=sensor", handle.read())
        unit = os.path.join(folder, "isstreamer-pi.service")
        with open(unit, "w") as handle:
            handle.write(text)
        result = subprocess.run([analyze, "verify", unit], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertNotIn("isstreamer-pi.service:", result.stdout)   # no warning about it


class ReadmeCommandsTest(CliTestCase):
    """The README's shell commands that can run offline run, against the local sink."""

    def readme_lines(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
            text = handle.read()
        lines = []
        for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if "python3 -m isstreamer_lite" in line:
                    lines.append(line)
        return lines

    def test_every_offline_command_of_the_readme_runs(self):
        """README: each isstreamer_lite command in its shell blocks exits 0, no traceback."""
        sink = self.sink()
        with open(os.path.join(self.home, "isstreamer_out.csv"), "w") as handle:
            handle.write("1700000000.0,temperature,21.5\n")
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        free = port.getsockname()[1]
        port.close()
        ran = 0
        # journalctl follows the journal forever: this one prints two messages, as
        # `-o cat` does (the message alone), only when asked as the README asks.
        bin_dir = self.tempdir()
        with open(os.path.join(bin_dir, "journalctl"), "w") as handle:
            handle.write('#!/bin/sh\n[ "$*" = "-f -n 0 -o cat -t sensor" ] || exit 9\n'
                         'printf "temperature=21.5\\nhumidity,40\\n"\n')
        os.chmod(os.path.join(bin_dir, "journalctl"), 0o755)
        for line in self.readme_lines():
            command = line.replace("ist_...", CLI_KEY).replace(
                "python3 -m", shlex.quote(sys.executable) + " -S -m").replace(
                "--port 8080", "--port %d" % free)
            with self.subTest(command=line):
                env = self.env(IS_API_BASE=sink.url, IS_SPOOL_DIR=self.spool,
                               PATH=bin_dir + os.pathsep + os.environ["PATH"])
                if " sink " in command + " ":
                    child = subprocess.Popen(["sh", "-c", "exec " + command], cwd=self.home,
                                             env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, universal_newlines=True)
                    self.assertIn("events API on", child.stdout.readline())
                    child.terminate()
                    out, err = child.communicate(timeout=30)
                    status = child.returncode
                else:
                    result = subprocess.run(["sh", "-c", command], cwd=self.home, env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, universal_newlines=True,
                                            timeout=120)
                    status, out, err = result.returncode, result.stdout, result.stderr
                self.assertNotIn("Traceback", out + err)
                self.assertEqual(status, 0, out + err)
                ran += 1
        self.assertGreaterEqual(ran, 9)
        self.assertIn("garden", sink.buckets)
        self.assertIn(("humidity", 40), self.received(sink, "garden"))

    def test_bookworm_notes(self):
        """README: python3-venv before the first venv, the offline pip command, the unit's editor."""
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
            readme = handle.read()
        self.assertLess(readme.index("sudo apt install python3-venv"),
                        readme.index("python3 -m venv"))
        self.assertIn("pip install --no-build-isolation .", readme)
        self.assertNotIn("tail -f /var/log", readme)
        with open(os.path.join(EXAMPLES_DIR, "isstreamer-pi.service")) as handle:
            unit = handle.read()
        self.assertIn("#   sudo nano /etc/isstreamer.env", unit)
        self.assertNotIn("sudoedit", unit)


ONE_INSTALL = "one install.sh run, into the user site-packages and back out"


class InstallScriptTest(LiteTestCase):
    """install.sh, run with sh into temporary folders (never the real home)."""

    @classmethod
    def setUpClass(cls):
        cls.script = os.path.join(HERE, "install.sh")
        if not os.path.isfile(cls.script):
            raise unittest.SkipTest("no install.sh next to %s (a vendored copy?)"
                                    % lite.__file__)
        pythons = installed_pythons()
        supported = sorted(version for version in pythons if version >= (3, 6))
        cls.oldest, cls.newest = pythons[supported[0]], pythons[supported[-1]]
        old = sorted(version for version in pythons if version < (3, 0))
        cls.python2 = pythons[old[-1]] if old else None

    def install(self, *args, script=None, **env):
        """Run install.sh with args; HOME and the user base are temporary folders."""
        environ = child_env(HOME=self.tempdir(), PYTHONUSERBASE=self.tempdir())
        environ.update(env)
        del environ["PYTHONPATH"]  # the checkout must not shadow the installed copy
        return subprocess.run(["sh", script or self.script] + list(args), env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60, cwd=self.tempdir())

    def assertInstalled(self, result, folder):
        """Exit 0, exactly the module in folder, byte for byte, and the smoke test ran."""
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertEqual(sorted(os.listdir(folder)), ["__pycache__", "isstreamer_lite.py"],
                         output)
        self.assertEqual(len(glob.glob(os.path.join(folder, "__pycache__",
                                                     "isstreamer_lite.*.pyc"))), 1, output)
        self.assertTrue(filecmp.cmp(lite.__file__, os.path.join(folder, "isstreamer_lite.py"),
                                    shallow=False), output)
        self.assertIn("selftest on Python", result.stdout, output)
        self.assertIn("OK", result.stdout, output)

    @full_matrix_only(ONE_INSTALL)
    def test_target_installs_for_oldest_and_newest_python(self):
        """install.sh: --target creates the folder, copies the module, runs the smoke test."""
        for python in full_or(sorted({self.oldest, self.newest}), [self.newest]):
            with self.subTest(python=python):
                target = os.path.join(self.tempdir(), "vendor", "lib")
                result = self.install("--python", python, "--target", target)
                self.assertInstalled(result, target)
                self.assertIn("PYTHONPATH", result.stdout)
                self.assertIn("from isstreamer_lite import Streamer", result.stdout)

    @full_matrix_only(ONE_INSTALL)
    def test_second_run_is_idempotent(self):
        """install.sh: a second run into the same folder succeeds with the same result."""
        target = self.tempdir()
        self.assertInstalled(self.install("--python", self.newest, "--target", target), target)
        self.assertInstalled(self.install("--python", self.newest, "--target", target), target)

    @full_matrix_only(ONE_INSTALL)
    def test_uninstall_removes_target_copy(self):
        """install.sh: --uninstall --target removes the module, then finds nothing."""
        target = self.tempdir()
        self.assertInstalled(self.install("--python", self.newest, "--target", target), target)
        for expected in ("Removed", "Nothing to remove"):
            result = self.install("--python", self.newest, "--uninstall", "--target", target)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn(expected, result.stdout)
            self.assertEqual(os.listdir(target), [])

    def test_user_site_install_and_uninstall(self):
        """install.sh: the default installs into the user site-packages (a temp home)."""
        home, userbase = self.tempdir(), self.tempdir()
        probe = subprocess.run([self.newest, "-m", "site", "--user-site"],
                               env=child_env(HOME=home, PYTHONUSERBASE=userbase),
                               stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
        if probe.returncode != 0:
            self.skipTest("%s does not use a user site-packages" % self.newest)
        site = probe.stdout.strip()
        self.assertTrue(site.startswith(userbase), site)
        result = self.install("--python", self.newest, HOME=home, PYTHONUSERBASE=userbase)
        self.assertInstalled(result, site)
        self.assertEqual(stat.S_IMODE(os.stat(site).st_mode), 0o755)
        result = self.install("--python", self.newest, "--uninstall", HOME=home,
                              PYTHONUSERBASE=userbase)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(os.listdir(site), [])

    def test_failing_smoke_test_exits_1(self):
        """install.sh: a module whose smoke test fails makes the install exit 1."""
        folder, target = self.tempdir(), self.tempdir()
        shutil.copy(self.script, folder)
        with open(os.path.join(folder, "isstreamer_lite.py"), "w") as handle:
            handle.write('__version__ = "0.0.0"\nimport sys\n'
                         'if __name__ == "__main__":\n    sys.exit("broken on purpose")\n')
        result = self.install("--python", self.newest, "--target", target,
                              script=os.path.join(folder, "install.sh"))
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("smoke test failed", result.stderr)

    def test_python_2_is_refused(self):
        """install.sh: Python 2.7 is refused with exit 2 and nothing installed."""
        if self.python2 is None:
            self.skipTest("no Python 2 installed")
        target = os.path.join(self.tempdir(), "lib")
        result = self.install("--python", self.python2, "--target", target)
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("3.6 or newer", result.stderr)
        self.assertFalse(os.path.exists(target))

    def test_unknown_option_is_usage_error(self):
        """install.sh: an unknown option exits 2, naming it and pointing to --help."""
        result = self.install("--frobnicate")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("--frobnicate", result.stderr)
        self.assertIn("--help", result.stderr)

    def test_missing_argument_is_usage_error(self):
        """install.sh: --target or --python without its argument exits 2."""
        for option in ("--target", "--python"):
            with self.subTest(option=option):
                result = self.install(option)
                self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
                self.assertIn(option, result.stderr)

    def test_help_documents_every_option(self):
        """install.sh: --help and -h exit 0 and document every option with examples."""
        for flag in ("--help", "-h"):
            with self.subTest(flag=flag):
                result = self.install(flag)
                self.assertEqual(result.returncode, 0, result.stderr)
                for word in ("--user", "--system", "--target", "--python", "--uninstall",
                             "Examples"):
                    self.assertIn(word, result.stdout)

    def shadowed_system_install(self, **env):
        """--system for a Python whose user site (in a temp home) holds an old copy.

        The Python is the newest one with PYTHONHOME set to a prefix of links to
        its standard library and a site-packages of its own. Returns (install.sh's
        result, the old copy's path).
        """
        prefix, home = self.tempdir(), self.tempdir()
        stdlib = subprocess.run([self.newest, "-c", "import sysconfig; print(sysconfig."
                                 "get_paths()['stdlib'])"], stdout=subprocess.PIPE,
                                universal_newlines=True, timeout=60).stdout.strip()
        lib = os.path.join(prefix, "lib", os.path.basename(stdlib))
        os.makedirs(os.path.join(lib, "site-packages"))
        for name in os.listdir(stdlib):
            if name != "site-packages":
                os.symlink(os.path.join(stdlib, name), os.path.join(lib, name))
        site = subprocess.run([self.newest, "-m", "site", "--user-site"],
                              stdout=subprocess.PIPE, universal_newlines=True, timeout=60,
                              env=child_env(HOME=home, PYTHONUSERBASE="",
                                            PYTHONHOME=prefix)).stdout.strip()
        os.makedirs(site)
        old = os.path.join(site, "isstreamer_lite.py")
        with open(old, "w") as handle:
            handle.write('__version__ = "0.9.0"\n')
        bin_dir = self.tempdir()        # getent tells the home of the user who ran sudo
        with open(os.path.join(bin_dir, "getent"), "w") as handle:
            handle.write("#!/bin/sh\n[ \"$2\" = pi ] && echo 'pi:x:1000:1000::%s:/bin/sh'\n"
                         % home)
        os.chmod(os.path.join(bin_dir, "getent"), 0o755)
        env = dict(env, PATH=bin_dir + os.pathsep + os.environ["PATH"], PYTHONHOME=prefix)
        if "SUDO_USER" not in env:
            env.update(HOME=home, PYTHONUSERBASE="")
        result = self.install("--python", self.newest, "--system", **env)
        self.assertTrue(os.path.exists(os.path.join(lib, "site-packages", "isstreamer_lite.py")),
                        result.stdout + result.stderr)
        return result, old

    @full_matrix_only(ONE_INSTALL)
    def test_warns_of_a_copy_in_the_sudo_users_site(self):
        """install.sh: sudo --system names the copy in the user's site that would shadow it."""
        result, old = self.shadowed_system_install(SUDO_USER="pi")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("warning: for pi, ", result.stderr)
        self.assertIn("imports isstreamer_lite from %s, not from" % old,
                      " ".join(result.stderr.split()))
        result, old = self.shadowed_system_install(SUDO_USER="someone_else")
        self.assertNotIn("for someone_else", result.stderr)

    @full_matrix_only(ONE_INSTALL)
    def test_warns_of_a_copy_earlier_on_sys_path(self):
        """install.sh: a copy earlier on the installing user's sys.path is named."""
        result, old = self.shadowed_system_install()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("imports isstreamer_lite from %s, not from" % old,
                      " ".join(result.stderr.split()))

    def test_shellcheck_is_clean(self):
        """install.sh: shellcheck finds nothing."""
        shellcheck = shutil.which("shellcheck")
        if shellcheck is None:
            self.skipTest("shellcheck is not installed")
        result = subprocess.run([shellcheck, self.script], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout)


@full_matrix_only(ONE_INSTALL)
class InstallShellsTest(LiteTestCase):
    """install.sh under dash and busybox sh: bytecode, venv refusal, re-runs."""

    @classmethod
    def setUpClass(cls):
        # As InstallScriptTest: the script, the oldest and the newest Python.
        InstallScriptTest.setUpClass.__func__(cls)
        cls.shells = posix_shells()
        if not cls.shells:
            raise unittest.SkipTest("neither dash nor busybox is installed")
        cls.version = lite.__version__

    def run_install(self, shell, *args, **env):
        """install.sh args under shell; HOME and the user base are temporary folders."""
        environ = child_env(HOME=self.tempdir(), PYTHONUSERBASE=self.tempdir())
        del environ["PYTHONPATH"]  # the checkout must not shadow the installed copy
        environ.pop("PYTHONNOUSERSITE", None)
        environ.update(env)
        return subprocess.run(shell + [self.script] + list(args), env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60, cwd=self.tempdir())

    def python_says(self, python, code, *args, options=(), **env):
        """python [options] -c code args, from an empty folder, without the checkout."""
        environ = child_env()
        del environ["PYTHONPATH"]
        environ.update(env)
        argv = [python] + list(options) + ["-c", code] + list(args)
        result = subprocess.run(argv, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=60, cwd=self.tempdir())
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def test_install_precompiles_for_the_pythons_cache_tag(self):
        """install.sh: the .pyc of the chosen Python's cache tag is written and used as is."""
        for label, shell in self.shells:
            for python in full_or(sorted({self.oldest, self.newest}), [self.newest]):
                with self.subTest(shell=label, python=python):
                    target = os.path.realpath(self.tempdir())
                    result = self.run_install(shell, "--python", python, "--target", target)
                    output = result.stdout + result.stderr
                    self.assertEqual(result.returncode, 0, output)
                    module = os.path.join(target, "isstreamer_lite.py")
                    cached = self.python_says(
                        python, "import importlib.util, sys; "
                                "print(importlib.util.cache_from_source(sys.argv[1]))",
                        module).stdout.strip()
                    self.assertTrue(os.path.isfile(cached), output)
                    self.assertIn("Precompiled %s" % cached, result.stdout)
                    before = os.stat(cached)
                    # As on a read-only image: nothing may be written, the .pyc is used.
                    verbose = self.python_says(python, "import isstreamer_lite", options=["-v"],
                                               PYTHONPATH=target, PYTHONDONTWRITEBYTECODE="1")
                    self.assertIn("%s matches %s" % (cached, module), verbose.stderr)
                    self.python_says(python, "import isstreamer_lite", PYTHONPATH=target)
                    after = os.stat(cached)
                    self.assertEqual((after.st_ino, after.st_mtime_ns, after.st_size),
                                     (before.st_ino, before.st_mtime_ns, before.st_size))
                    self.assertEqual(os.listdir(os.path.dirname(cached)),
                                     [os.path.basename(cached)])

    def test_uninstall_removes_bytecode_and_empty_cache_folder(self):
        """install.sh: --uninstall removes the .pyc, and __pycache__ unless others use it."""
        for label, shell in self.shells:
            with self.subTest(shell=label):
                lonely, shared = self.tempdir(), self.tempdir()
                for target in (lonely, shared):
                    result = self.run_install(shell, "--python", self.newest, "--target", target)
                    self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                other = os.path.join(shared, "__pycache__", "other.cpython-39.pyc")
                open(other, "wb").close()
                for target in (lonely, shared):
                    result = self.run_install(shell, "--python", self.newest, "--uninstall",
                                              "--target", target)
                    self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                    self.assertRegex(result.stdout, r"Removed .*__pycache__/isstreamer_lite\."
                                                    r"[^/]*\.pyc")
                self.assertEqual(os.listdir(lonely), [])
                self.assertEqual(os.listdir(shared), ["__pycache__"])
                self.assertEqual(os.listdir(os.path.join(shared, "__pycache__")),
                                 ["other.cpython-39.pyc"])

    def test_user_mode_refuses_a_venv_python(self):
        """install.sh: a venv's Python in user mode exits 2, installs nothing, names --system."""
        venv = os.path.join(self.tempdir(), "venv")
        subprocess.run([self.newest, "-m", "venv", "--without-pip", venv], check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        venv_python = os.path.join(venv, "bin", "python")
        purelib = self.python_says(venv_python, "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])").stdout.strip()
        for label, shell in self.shells:
            with self.subTest(shell=label):
                home, userbase = self.tempdir(), self.tempdir()
                result = self.run_install(shell, "--python", venv_python, HOME=home,
                                          PYTHONUSERBASE=userbase)
                output = result.stdout + result.stderr
                self.assertEqual(result.returncode, 2, output)
                self.assertIn("virtual environment", result.stderr)
                self.assertNotIn("Done", result.stdout)
                for folder in (home, userbase, purelib):
                    self.assertEqual(
                        glob.glob(os.path.join(folder, "**", "isstreamer_lite*"),
                                  recursive=True), [], output)
                # The command the message gives works, with the same shell.
                suggested = [shlex.split(line) for line in result.stderr.splitlines()
                             if line.startswith("  sh ")]
                self.assertEqual(len(suggested), 1, output)
                self.assertEqual(suggested[0][1:], [self.script, "--python", venv_python,
                                                    "--system"])
                result = self.run_install(shell, *suggested[0][2:], HOME=home,
                                          PYTHONUSERBASE=userbase)
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                found = self.python_says(venv_python, "import isstreamer_lite; "
                                         "print(isstreamer_lite.__file__)").stdout.strip()
                self.assertEqual(os.path.dirname(os.path.realpath(found)),
                                 os.path.realpath(purelib))
                result = self.run_install(shell, *(suggested[0][2:] + ["--uninstall"]))
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_user_mode_refuses_pythonnousersite(self):
        """install.sh: PYTHONNOUSERSITE in user mode exits 2, naming it and other places."""
        for label, shell in self.shells:
            with self.subTest(shell=label):
                userbase = self.tempdir()
                result = self.run_install(shell, "--python", self.newest,
                                          PYTHONUSERBASE=userbase, PYTHONNOUSERSITE="1")
                self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
                for word in ("PYTHONNOUSERSITE", "--system", "--target"):
                    self.assertIn(word, result.stderr)
                self.assertEqual(os.listdir(userbase), [])

    def test_rerun_says_upgraded_reinstalled_or_already_installed(self):
        """install.sh: a re-run names what it replaced: Upgraded X -> Y, Reinstalled, identical."""
        for label, shell in self.shells:
            with self.subTest(shell=label):
                target = self.tempdir()
                installed = os.path.join(target, "isstreamer_lite.py")

                def rerun():
                    result = self.run_install(shell, "--python", self.newest, "--target", target)
                    self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                    with open(installed) as handle, open(lite.__file__) as source:
                        self.assertEqual(handle.read(), source.read())
                    return result.stdout

                def edit(old, new):
                    with open(installed) as handle:
                        text = handle.read()
                    self.assertIn(old, text)
                    with open(installed, "w") as handle:
                        handle.write(text.replace(old, new, 1))

                self.assertIn("Installed isstreamer_lite %s to " % self.version, rerun())
                edit('__version__ = "%s"' % self.version, '__version__ = "0.0.1"')
                out = rerun()
                self.assertIn("Upgraded isstreamer_lite 0.0.1 -> %s" % self.version, out)
                self.assertNotIn("Installed isstreamer_lite", out)
                edit('__version__ = "%s"' % self.version, '__version__ = "999.0.0"')
                self.assertIn("Downgraded isstreamer_lite 999.0.0 -> %s" % self.version,
                              rerun())
                edit("\n", "\n# edited by hand\n")
                out = rerun()
                self.assertIn("Reinstalled isstreamer_lite %s" % self.version, out)
                self.assertNotIn("Installed isstreamer_lite", out)
                self.assertIn("isstreamer_lite %s is already installed" % self.version, rerun())


class PackagingTest(LiteTestCase):
    """pyproject.toml builds offline with an older setuptools, such as Debian 12's 66.1.1."""

    def pyproject(self):
        path = os.path.join(HERE, "pyproject.toml")
        if not os.path.isfile(path):
            self.skipTest("no pyproject.toml next to %s (a vendored copy?)" % lite.__file__)
        with open(path, encoding="utf-8") as handle:
            return handle.read()

    def test_build_needs_only_what_setuptools_66_has(self):
        """pyproject: build requirements setuptools 66.1.1 meets; the licence as a table."""
        text = self.pyproject()
        requires = re.search(r"^requires = \[(.*?)\]$", text, re.M).group(1)
        for requirement in re.findall(r'"([^"]*)"', requires):
            name, low = re.match(r"^([A-Za-z0-9_.-]+)(?:>=([0-9.]+))?$", requirement).groups()
            self.assertEqual(name, "setuptools", requirement)
            self.assertLessEqual(tuple(int(n) for n in (low or "0").split(".")), (66, 1, 1))
        # The SPDX string (license = "MIT") and license-files need setuptools>=77.
        self.assertRegex(text, r'(?m)^license = \{ *(text|file) = "[^"]+" *\}$')
        self.assertNotRegex(text, r"(?m)^license-files")

    def test_offline_pip_install(self):
        """pip install --no-build-isolation --no-index . works without network (ISL_PIP_PYTHON)."""
        python = os.environ.get("ISL_PIP_PYTHON")
        if not python:
            self.skipTest("set ISL_PIP_PYTHON to a Python with pip, setuptools>=61 and wheel")
        self.pyproject()
        source, target = self.tempdir(), self.tempdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "isstreamer_lite.py"):
            shutil.copy(os.path.join(HERE, name), source)
        result = subprocess.run(
            [python, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--target",
             target, "."], cwd=source, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=300,
            env=child_env(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1"))
        self.assertEqual(result.returncode, 0, result.stdout[-2000:])
        self.assertTrue(filecmp.cmp(lite.__file__, os.path.join(target, "isstreamer_lite.py"),
                                    shallow=False))


if __name__ == "__main__":
    unittest.main()
