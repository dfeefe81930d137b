"""Tests for isstreamer_lite: ``python3 -m unittest -v test_isstreamer_lite``.

Real HTTP to servers on 127.0.0.1 started by the tests; no sleeps to
synchronise; nothing reaches the real Initial State servers.
"""

import calendar
import collections
import contextlib
import csv
import datetime
import decimal
import filecmp
import fractions
import glob
import http.client
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import isstreamer_lite as lite

HERE = os.path.dirname(os.path.abspath(lite.__file__))
KEY = "ist_test_access_key_0123456789"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy",
              "NO_PROXY", "all_proxy", "ALL_PROXY")
CONFIG_VARS = ("IS_ACCESS_KEY", "IS_BUCKET_KEY", "IS_BUCKET_NAME", "IS_API_BASE",
               "IS_SPOOL_DIR", "IS_DURABLE")
_saved_env = {}

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


def setUpModule():
    """Keep the developer's proxies and IS_* settings out of the tests."""
    for name in PROXY_VARS + CONFIG_VARS:
        if name in os.environ:
            _saved_env[name] = os.environ.pop(name)


def tearDownModule():
    os.environ.update(_saved_env)


def child_env(**extra):
    """Environment for a subprocess: no proxies, no IS_* settings, this module."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS + CONFIG_VARS}
    env["PYTHONPATH"] = HERE
    env.update(extra)
    return env


class LiteTestCase(unittest.TestCase):
    """Helpers: a sink per test, a temp spool, Streamers closed at cleanup."""

    def setUp(self):
        logger = logging.getLogger("isstreamer_lite")
        state = (logger.level, list(logger.handlers))

        def restore():
            logger.setLevel(state[0])
            logger.handlers[:] = state[1]
        self.addCleanup(restore)
        # A handler of our own keeps debug_level >= 1 from adding a console one.
        logger.addHandler(logging.NullHandler())

    def sink(self, cls=lite._Sink, **kwargs):
        sink = cls(**kwargs).start()
        self.addCleanup(sink.stop)
        return sink

    def tempdir(self):
        path = tempfile.mkdtemp(prefix="isl-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def streamer(self, sink=None, **kwargs):
        options = dict(bucket_key="test-bucket", access_key=KEY, ini_file_location=False,
                       spool_dir=self.tempdir(), flush_interval=0.05, backoff_base=0.01,
                       backoff_cap=0.05)
        if sink is not None:
            options["api_base"] = sink.url
        options.update(kwargs)
        streamer = lite.Streamer(**options)
        self.addCleanup(streamer.close, 2.0)
        return streamer

    def received(self, sink, bucket=None):
        with sink.changed:
            return [(e["key"], e["value"]) for b, e in sink.events
                    if bucket is None or b == bucket]


class RecordingSink(lite._Sink):
    """A sink that also keeps each request's headers and bucket."""

    def __init__(self, **kwargs):
        lite._Sink.__init__(self, **kwargs)
        self.seen = []

    def fault(self, handler, path):
        with self.changed:
            self.seen.append((path, dict(handler.headers), threading.get_ident()))
        return False


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
        self.assertEqual(s._settings["access_key"], "ini_key")
        self.assertEqual(s.bucket_name, "ini name")
        self.assertEqual(s._settings["api_base"], "http://127.0.0.1:9")
        os.environ["IS_ACCESS_KEY"] = "env_key"
        os.environ["IS_BUCKET_NAME"] = "env name"
        os.environ["IS_BUCKET_KEY"] = "env-bucket"
        os.environ["IS_API_BASE"] = "http://127.0.0.1:10"
        s = self.make(offline=True)
        self.assertEqual((s._settings["access_key"], s.bucket_name, s.bucket_key,
                          s._settings["api_base"]),
                         ("env_key", "env name", "env-bucket", "http://127.0.0.1:10"))
        s = self.make(access_key="arg_key", bucket_name="arg name", bucket_key="arg-bucket",
                      api_base="http://127.0.0.1:11", offline=True)
        self.assertEqual((s._settings["access_key"], s.bucket_name, s.bucket_key,
                          s._settings["api_base"]),
                         ("arg_key", "arg name", "arg-bucket", "http://127.0.0.1:11"))

    def test_default_api_base(self):
        """Configuration: with nothing set the base is https://groker.init.st."""
        s = self.make(access_key="k", offline=True)
        self.assertEqual(s._settings["api_base"], "https://groker.init.st")

    def test_api_config_read_without_client_config(self):
        """Configuration: [isstreamer.api_config] counts even alone (ISStreamer ignored it)."""
        self.write_ini(self.home, "[isstreamer.api_config]\nstream_api_base = http://127.0.0.1:12\n")
        s = self.make(access_key="k", offline=True)
        self.assertEqual(s._settings["api_base"], "http://127.0.0.1:12")

    def test_ini_search_order(self):
        """Configuration: ini_file_location, else ~/isstreamer.ini, else ./isstreamer.ini."""
        self.write_ini(self.cwd, "[isstreamer.client_config]\naccess_key = cwd_key\n")
        self.assertEqual(self.make(offline=True)._settings["access_key"], "cwd_key")
        self.write_ini(self.home, "[isstreamer.client_config]\naccess_key = home_key\n")
        self.assertEqual(self.make(offline=True)._settings["access_key"], "home_key")
        other = self.write_ini(self.tempdir(), "[isstreamer.client_config]\naccess_key = own\n")
        self.assertEqual(self.make(offline=True, ini_file_location=other)
                         ._settings["access_key"], "own")

    def test_missing_ini_location_is_an_error(self):
        """Configuration: a given ini_file_location that does not exist is a ConfigError."""
        with self.assertRaisesRegex(lite.ConfigError, "does not exist"):
            self.make(ini_file_location=os.path.join(self.cwd, "nope.ini"))

    def test_offline_mode_and_file_from_ini(self):
        """Configuration: offline_mode and offline_file come from the ini."""
        self.write_ini(self.home, "[isstreamer.client_config]\noffline_mode = true\n"
                                  "offline_file = out.csv\n")
        s = self.make()
        self.assertTrue(s._settings["offline"])
        self.assertEqual(s._settings["offline_file"], "out.csv")

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
        for options in ({"buffer_size": 0}, {"flush_interval": -1}, {"max_queue": 1,
                        "buffer_size": 10}, {"timeout": "soon"}, {"on_error": 5}):
            with self.assertRaises((ValueError, TypeError), msg=repr(options)):
                self.make(access_key="k", offline=True, **options)


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
        self.assertEqual(paths[1:], ["/api/events", "/api/events"])
        headers = sink.seen[1][1]
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(headers["X-IS-AccessKey"], KEY)
        self.assertEqual(headers["X-IS-BucketKey"], "test-bucket")
        self.assertEqual(headers["Accept-Version"], "~0")
        self.assertTrue(headers["User-Agent"].startswith("isstreamer_lite/%s Python/"
                                                         % lite.__version__))
        self.assertEqual(self.received(sink), [("k%d" % i, i) for i in range(5)])

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


class ValidationTest(LiteTestCase):
    """log() accepts the documented values, converts real numbers, rejects the rest."""

    BAD = [("none", None), ("nan", float("nan")), ("inf", float("inf")),
           ("bytes", b"raw"), ("dict", {"a": 1}), ("list", [1]), ("complex", 1j),
           ("x" * 251, 1), ("long", "v" * 2001), (7, "non-str key"), ("", "empty key"),
           ("dnan", decimal.Decimal("NaN"))]

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
        self.assertEqual(len(logs.records), len(self.BAD))

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
        s.log("big", 2 ** 70)
        s.log("flag", False)
        self.assertTrue(s.close(5))
        got = dict(self.received(sink))
        self.assertEqual(got, {"dec": 1.25, "frac": 0.25, "np": 2.5, "sub": 3.5,
                               "big": 2 ** 70, "flag": False})
        self.assertIs(got["flag"], False)

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

    def test_log_after_close_is_rejected(self):
        """Validation: log() after close() is a warning, or StreamerClosedError at level 2."""
        sink = self.sink()
        s = self.streamer(sink)
        self.assertTrue(s.close(5))
        with self.assertLogs("isstreamer_lite", "WARNING") as logs:
            s.log("late", 1)
        self.assertIn("closed", logs.output[0])
        strict = self.streamer(sink, debug_level=2)
        logging.getLogger("isstreamer_lite").setLevel(logging.WARNING)
        strict.close(5)
        with self.assertRaises(lite.StreamerClosedError):
            strict.log("late", 1)
        self.assertNotIn(("late", 1), self.received(sink))


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

    def test_synchronous_mode_sends_in_callers_thread(self):
        """use_async=False: the caller's thread delivers when the buffer fills."""
        sink = self.sink(RecordingSink)
        s = self.streamer(sink, buffer_size=3, use_async=False)
        self.assertIsNone(s._thread)
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


class ProcessTest(LiteTestCase):
    """Import, exit and the smoke test, in fresh interpreters."""

    def run_python(self, code, timeout=60, **env):
        return subprocess.run([sys.executable, "-c", code], env=child_env(**env),
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

    def test_smoke_test_passes(self):
        """Smoke test: python3 -m isstreamer_lite exits 0 and says OK."""
        result = subprocess.run([sys.executable, "-m", "isstreamer_lite"], env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=60, cwd=self.tempdir())
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("OK", result.stdout)

    def test_main_selftest_in_process(self):
        """Smoke test: main([]) and main(["selftest"]) return 0 and report OK."""
        import contextlib
        for argv in ([], ["selftest"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(lite.main(argv), 0, out.getvalue())
            self.assertIn("OK", out.getvalue())


def tls_files(case):
    """Write the test certificate and key; return (cert path, key path)."""
    folder = case.tempdir()
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert, "w") as handle:
        handle.write(_TEST_CERT)
    with open(key, "w") as handle:
        handle.write(_TEST_KEY)
    return cert, key


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
        self.assertFalse(s.flush(1.0))
        self.assertEqual(sink.events, [])
        self.assertIn("CERTIFICATE_VERIFY_FAILED", s.stats()["last_error"])

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
    streamer.close(10)
'''


def free_port():
    """A loopback port nothing listens on (bound, then released)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


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

    def start_child(self, api_base, start, count, mode):
        return subprocess.Popen([sys.executable, self.script, api_base, self.spool, str(start),
                                 str(count), mode], env=child_env(), stdout=subprocess.PIPE,
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

    def kill_runs(self, api_base, mode, kills, per_run=1000):
        """Kill a streaming child with SIGKILL ``kills`` times; return [(start, safe upto)]."""
        import random
        rng = random.Random(1234)
        runs = []
        for k in range(kills):
            start = k * per_run
            child = self.start_child(api_base, start, per_run, mode)
            seen = self.stream_until(child, start + rng.randrange(50, per_run - 50))
            killed_at = time.monotonic()
            child.kill()
            child.communicate(timeout=30)
            safe = [v for v, t in seen if killed_at - t > 0.2]      # sync_interval
            runs.append((start, max(safe) if safe else start - 1))
        return runs

    def finish_run(self, api_base, start):
        child = self.start_child(api_base, start, 20, "durable")
        out, err = child.communicate(timeout=60)
        self.assertEqual(child.returncode, 0, err)

    def check(self, sink, runs, per_run=1000):
        values = collections.Counter(e["value"] for _, e in sink.events)
        duplicates = 0
        for start, safe in runs:
            missing = [v for v in range(start, safe + 1) if not values[v]]
            self.assertEqual(missing, [], "run from %d lost events" % start)
            run_dups = sum(values[v] - 1 for v in range(start, start + per_run) if values[v] > 1)
            self.assertLessEqual(run_dups, 10, "more than one batch resent for run %d" % start)
            duplicates += run_dups
        return duplicates

    def test_durable_survives_sigkill(self):
        """Durable: 10 SIGKILLs while streaming lose nothing logged a sync_interval before."""
        sink = self.sink()
        runs = self.kill_runs(sink.url, "durable", 10)
        self.finish_run(sink.url, 100000)
        self.check(sink, runs)
        leftovers = [n for _, _, names in os.walk(self.spool) for n in names
                     if n.endswith(".jsonl")]
        self.assertEqual(leftovers, [])

    def test_durable_survives_sigkill_with_server_down(self):
        """Durable: SIGKILLs while the server is down; all of it arrives once it is up."""
        down = "http://127.0.0.1:%d" % free_port()
        runs = self.kill_runs(down, "durable", 4, per_run=400)
        sink = self.sink()
        self.finish_run(sink.url, 100000)
        self.assertEqual(self.check(sink, runs, per_run=400), 0)

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
        seen = self.stream_until(child, 2000)
        killed_at = time.monotonic()
        child.kill()
        child.communicate(timeout=30)
        values = set(e["value"] for _, e in sink.events)
        old_enough = [v for v, t in seen if killed_at - t > 0.1 + 0.3]   # flush_interval + slack
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
        """Durable: the caller never writes the journal; the worker does."""
        sink = self.sink()
        s = self.streamer(sink, durable=True)
        calls = []
        original = s._engine.spool.append

        def record(*args):
            calls.append(threading.current_thread().name)
            return original(*args)
        s._engine.spool.append = record
        for i in range(50):
            s.log("k", i)
        self.assertTrue(s.close(10))
        self.assertTrue(calls)
        self.assertTrue(all(name.startswith("isstreamer_lite[") for name in calls), calls)




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
        self.assertEqual(os.listdir(folder), ["isstreamer_lite.py"], output)
        self.assertTrue(filecmp.cmp(lite.__file__, os.path.join(folder, "isstreamer_lite.py"),
                                    shallow=False), output)
        self.assertIn("selftest on Python", result.stdout, output)
        self.assertIn("OK", result.stdout, output)

    def test_target_installs_for_oldest_and_newest_python(self):
        """install.sh: --target creates the folder, copies the module, runs the smoke test."""
        for python in sorted({self.oldest, self.newest}):
            with self.subTest(python=python):
                target = os.path.join(self.tempdir(), "vendor", "lib")
                result = self.install("--python", python, "--target", target)
                self.assertInstalled(result, target)
                self.assertIn("PYTHONPATH", result.stdout)
                self.assertIn("from isstreamer_lite import Streamer", result.stdout)

    def test_second_run_is_idempotent(self):
        """install.sh: a second run into the same folder succeeds with the same result."""
        target = self.tempdir()
        self.assertInstalled(self.install("--python", self.newest, "--target", target), target)
        self.assertInstalled(self.install("--python", self.newest, "--target", target), target)

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

    def test_shellcheck_is_clean(self):
        """install.sh: shellcheck finds nothing."""
        shellcheck = shutil.which("shellcheck")
        if shellcheck is None:
            self.skipTest("shellcheck is not installed")
        result = subprocess.run([shellcheck, self.script], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout)


if __name__ == "__main__":
    unittest.main()


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
        lines = []
        for path in glob.glob(os.path.join(spool, "*", "*", "*.jsonl")):
            with open(path) as handle:
                lines.extend(json.loads(line) for line in handle)
        self.assertEqual(sorted(e["value"] for line in lines for e in line), list(range(20)))


EXAMPLES_KEY = "ist_example_key"
EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(lite.__file__)), "examples")
EXAMPLES_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy",
                       "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")

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


class ExamplesTest(unittest.TestCase):
    """examples/*.py and ISStreamer scripts run unchanged but for the import."""

    def setUp(self):
        self.sink = ExamplesSink().start()
        self.addCleanup(self.sink.stop)
        self.dir = tempfile.mkdtemp(prefix="isl-examples-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def run_script(self, path):
        """Run a script as a child; return its result after checking a clean exit."""
        env = {k: v for k, v in os.environ.items()
               if k not in EXAMPLES_PROXY_VARS and not k.startswith("IS_")
               and k != "XDG_STATE_HOME"}
        env.update(IS_ACCESS_KEY=EXAMPLES_KEY, IS_API_BASE=self.sink.url,
                   IS_SPOOL_DIR=os.path.join(self.dir, "spool"), HOME=self.dir,
                   PYTHONPATH=os.path.dirname(os.path.abspath(lite.__file__)))
        self.started = time.time()
        result = subprocess.run([sys.executable, "-W", "default", path], cwd=self.dir,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=30)
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
        """examples/switch_bucket.py: key1=starting in "Starting Bucket" then "New Bucket"."""
        self.run_example("switch_bucket.py")
        self.assertEqual(self.received(), [("Starting Bucket", "key1", "starting"),
                                           ("New Bucket", "key1", "starting")])
        self.assertEqual(sorted(self.sink.buckets.values()), ["New Bucket", "Starting Bucket"])
        first, second = [b for b, _ in self.sink.events]
        self.assertNotEqual(first, second)
        for bucket_key in (first, second):
            self.assertRegex(bucket_key, r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-"
                                         r"[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
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


if __name__ == "__main__":
    unittest.main()


CLI_KEY = "ist_cli_test_key_0123456789"
CLI_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy",
                  "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
COMMANDS = ("selftest", "send", "pipe", "replay", "sink")
# "isstreamer_lite: 2026-05-01 12:00:00: key value", the --debug 1 echo of one event.
ECHO = re.compile(r"^isstreamer_lite: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: (\S+) (.*)$")


def dead_url():
    """An http:// base on 127.0.0.1 where nothing listens (connection refused)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    finally:
        probe.close()
    return "http://127.0.0.1:%d" % port


def cli_env(home, **extra):
    """A child's environment: no proxies, no IS_* settings, this module, HOME=home."""
    env = {k: v for k, v in os.environ.items()
           if k not in CLI_PROXY_VARS and not k.startswith("IS_") and k != "XDG_STATE_HOME"}
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(lite.__file__))
    env["HOME"] = home
    env.update(extra)
    return env


def spool_segments(spool_dir):
    return sorted(glob.glob(os.path.join(spool_dir, "*", "*", "*.jsonl")))


class CliTestCase(unittest.TestCase):
    """Helpers: temp dirs, sinks, main() with captured output, child processes."""

    def setUp(self):
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

    def tempdir(self):
        path = tempfile.mkdtemp(prefix="isl-cli-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def sink(self, **kwargs):
        sink = lite._Sink(**kwargs).start()
        self.addCleanup(sink.stop)
        return sink

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
        return subprocess.run([sys.executable, "-m", "isstreamer_lite"] + list(args),
                              input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout, cwd=self.home,
                              env=self.env(**env))

    def popen(self, argv, **env):
        """Start a child with pipes; killed at cleanup and by a 60 s failure guard."""
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, universal_newlines=True,
                                 cwd=self.home, env=self.env(**env))
        guard = threading.Timer(60.0, child.kill)
        guard.daemon = True
        guard.start()
        self.addCleanup(guard.cancel)

        def reap():
            if child.poll() is None:
                child.kill()
                child.wait(30)
            for stream in (child.stdin, child.stdout, child.stderr):
                stream.close()
        self.addCleanup(reap)
        return child

    def received(self, sink, bucket=None):
        with sink.changed:
            return [(e["key"], e["value"]) for b, e in sink.events
                    if bucket is None or b == bucket]

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
        streamer.close()
        self.assertEqual(streamer.stats()["delivered"], 0)
        rows = lite._spool_summary(self.spool, CLI_KEY)
        self.assertEqual(sorted((r["bucket_key"], r["events"]) for r in rows),
                         sorted((b[0], len(b[2])) for b in buckets))


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
        rows = lite._spool_summary(self.spool, CLI_KEY)
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
        rows = lite._spool_summary(self.spool, CLI_KEY)
        self.assertEqual([(r["bucket_key"], r["events"]) for r in rows], [("cli-retried", 1)])

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
        rows = lite._spool_summary(self.spool, CLI_KEY)
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
        self.assertEqual([r["events"] for r in lite._spool_summary(self.spool, CLI_KEY)], [2])

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
        self.assertIn("1 lines read, 0 skipped, all delivered", err)
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
        child = self.popen([sys.executable, "-m", "isstreamer_lite", "pipe", "--bucket-key",
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
        self.assertRegex(out, r"bucket 'cli-a' \(Bucket A\): 3 events in \d+ lines, "
                              r"1 segment\(s\)")
        self.assertRegex(out, r"bucket 'cli-b' \(no name\): 1 events in 1 lines")
        self.assertEqual(sink.requests, 0)
        self.assertEqual(spool_segments(self.spool), before)

    def test_dry_run_with_nothing_pending(self):
        """CLI replay: --dry-run on an empty spool says nothing is pending."""
        status, out, err = self.replay(dead_url(), "--dry-run")
        self.assertEqual(status, 0, err)
        self.assertIn("nothing pending in %s" % self.spool, out)

    def test_spool_of_killed_process_sent_once(self):
        """CLI replay: the spool of a SIGKILLed process arrives once; replay again is a no-op."""
        child = self.popen([sys.executable, "-c", KILLED_CHILD % {
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
        self.assertEqual([r["events"] for r in lite._spool_summary(self.spool, CLI_KEY)], [1])

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
        rows = lite._spool_summary(self.spool, CLI_KEY)
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

    def test_csv_without_bucket_key_exits_2(self):
        """CLI replay: --csv without --bucket-key exits 2 and sends nothing."""
        path = self.offline_csv()
        sink = self.sink()
        status, out, err = self.replay(sink.url, "--csv", path)
        self.assertEqual(status, 2)
        self.assertIn("--bucket-key", err)
        self.assertEqual(sink.requests, 0)


class CliSinkTest(CliTestCase):
    """CLI sink: a child server on a free port, its output, --jsonl, rate limits, SIGTERM."""

    def start_sink(self, *args):
        """Start ``sink --port 0 ARGS``; return (child, its URL from the first line)."""
        child = self.popen([sys.executable, "-m", "isstreamer_lite", "sink", "--port", "0"]
                           + list(args))
        first = child.stdout.readline()
        match = re.match(r"events API on (http://127\.0\.0\.1:(\d+)) ", first)
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
        self.assertEqual(child.stdout.readline(), "cli-sink temp = 21.5\n")
        self.assertEqual(child.stdout.readline(), "cli-sink door = 'open'\n")
        out = self.stop(child)
        self.assertRegex(out, r"2 events in \d+ requests")

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

    def test_live_server_down_exits_1(self):
        """CLI selftest: --live against a dead server names the error and exits 1."""
        status, out, err = self.live(dead_url())
        self.assertEqual(status, 1, out + err)
        self.assertIn("ConnectionRefusedError", out)
        self.assertIn("FAILED", out)

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


if __name__ == "__main__":
    unittest.main()
