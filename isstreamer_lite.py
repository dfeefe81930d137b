# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The isstreamer_lite authors
"""Stream sensor data to Initial State from one standard-library file.

A drop-in replacement for the ``ISStreamer`` client: the same ``Streamer``
API and ``isstreamer.ini``, with a ``log()`` that never blocks, one daemon
worker thread per Streamer that batches events (a second one makes its
requests, so a hung server holds nothing up) and ships them over a
kept-alive HTTPS connection, packed up to the 1 MB body limit when it falls
behind, retries with back-off and rate-limit pacing, and a disk spool for
whatever still cannot be delivered::

    from isstreamer_lite import Streamer

    streamer = Streamer(bucket_name="Garden", access_key="ist_...")
    streamer.log("temperature", 21.5)
    streamer.log_object({"humidity": 40, "soil": 0.31})
    streamer.close()

Thread safety: ``log``, ``log_object``, ``set_bucket``, ``flush`` and
``close`` may be called from any number of threads at once. ``log`` appends
to a lock-free ``collections.deque`` and returns; each thread's events keep
their order. Everything that touches the disk runs on the Streamer's worker
thread and the network on its courier thread (or, with ``use_async=False``,
both in the thread that filled the buffer).

Runs on CPython 3.6 to 3.13 with nothing but the standard library.
``python3 -m isstreamer_lite`` runs an offline smoke test.
"""

__version__ = "1.0.0"
__all__ = [
    "Streamer",
    "StreamerError",
    "ConfigError",
    "DeliveryError",
    "StreamerClosedError",
    "main",
]

import collections
import os
import stat
import sys
import threading
import time


class _Logger(object):
    """The ``isstreamer_lite`` logger, importing ``logging`` on first use.

    ``logging`` (like ``json``) takes milliseconds to import on small devices
    and new Pythons, so the module defers both until they are needed.
    """

    __slots__ = ()

    def __getattr__(self, name):
        global _log
        import logging
        _log = logging.getLogger("isstreamer_lite")
        return getattr(_log, name)


_log = _Logger()
# log()'s fast path takes ASCII text only (no surrogate can hide in it); other
# text is checked on the slow path. Python 3.6 has no str.isascii.
_isascii = getattr(str, "isascii", lambda text: False)
_time = time.time
_monotonic = time.monotonic


# --- Constants ---------------------------------------------------------------

# The API's documented default base; groker.initialstate.com answers too.
_DEFAULT_API_BASE = "https://groker.init.st"
# Semver range of the events API we speak (ISStreamer sent "<=0.0.4").
_ACCEPT_VERSION = "~0"
# Event and bucket limits from the API; the project enforces 250 for keys.
_MAX_KEY_CHARS = 250
# The API reference's key limit (ISStreamer said 250): a longer key is sent, with
# one warning per key.
_API_KEY_CHARS = 100
_MAX_VALUE_CHARS = 2000
_MAX_BUCKET_CHARS = 250
_BUCKET_KEY_FORBIDDEN = ':"\''
# The API answers 413 above 1 MB; stay a little under it.
_MAX_BODY_BYTES = 1000000
# A spool segment is closed and a new one begun past this size, so that a
# delivered segment can be deleted whole instead of rewritten.
_SEGMENT_BYTES = 1 << 20
# Validated keys remembered for log()'s fast path; more go the slow path.
_KNOWN_KEYS = 1000
# wake_at while the worker is awake: log() then never signals it.
_NEVER = sys.maxsize
# Longest idle wait of the worker: every wait has a timeout.
_IDLE_WAIT = 60.0
# Longest wait for a thread of ours that was told to end and has nothing left to do.
_JOIN_WAIT = 1.0
# Warnings about dropped events are repeated at most this often.
_DROP_WARN_EVERY = 60.0
# The documented rate-limit window. A Reset or Retry-After that is not a sane
# time within it (milliseconds, years ahead, non-finite) counts as its end: the
# server's word is untrusted input and must not stall a client past the window.
_WINDOW = 10.0
# What a Reset or Retry-After may exceed the window by (clock skew, rounding).
_WINDOW_SLACK = 1.0
# A process that heard of no window looks this often for the file in which other
# processes of its key share one (a look a call was 3% of the CPU of 2,000 calls
# to a server without the headers; with them, the file is read on every call).
_RATE_FILE_LOOK = 1.0
# 9999-12-31T23:59:59Z: later epochs are not Unix seconds (milliseconds, garbage).
_MAX_EPOCH = 253402300799.0
# Integers beyond this do not survive the trip through most JSON consumers.
_INT_LIMIT = 2 ** 63
# Error bodies are read up to this much; the rest of the answer is discarded.
_MAX_REPLY_BYTES = 64 * 1024
# A body goes out in pieces, each of which may take `timeout`, through a small
# send buffer (the kernel's own can hold megabytes, and then the upload would
# count as silence awaiting the answer). Linux doubles the buffer asked for:
# 16 KiB drain in 8 s over the slowest link below, within the default timeout.
_SEND_CHUNK = 8 * 1024
_SEND_BUFFER = 8 * 1024
# The worker thread sends a call on an open connection and waits this long for
# the answer itself; only a call still unanswered then goes to the courier's
# thread. The two threads' hand-offs were a sixth of the CPU of 2,000 calls to a
# server that answers at once (loopback, a LAN gateway).
_QUICK = 0.02
# A request's overall deadline grows by a second for each this many bytes of
# body: a 1 MB body may take 8 minutes, as over a 16 kbit/s link.
_SLOWEST_LINK = 2 * 1024
# The Student and Individual plans cap an account at 3 million events a calendar
# month, then throttle (402); an X-RateLimit-Limit of 60 or more a 10 s window
# is the Enterprise plan, which pays as it goes and has no cap.
_MONTHLY_QUOTA = 3000000
_ENTERPRISE_LIMIT = 60
# The month's total is projected from the events delivered in the last hour,
# spread over the whole hour even when they came in its last minute: a burst
# (a script's first thousands of events, a backlog sent after an outage) is
# no alarm unless it is an hour's worth at a rate past the quota.
_RATE_WINDOW = 3600.0
_RATE_MIN_SPAN = 3600.0
# Months kept in state.json, newest first.
_MONTHS_KEPT = 13
# The status file beside the spool is rewritten at most this often (flash wear).
_STATE_EVERY = 60.0
_STATE_FILE = "state.json"
# `status` touches this file in a key's folder to ask running Streamers what they
# hold in memory; each answers in live-<pid>.json. A worker holding events looks
# at most every _ASK_EVERY seconds; `status` waits _STATUS_WAIT for the answers.
_ASK_FILE = "status.ask"
_LIVE_FILE = "live-%d.json"
_ASK_EVERY = 1.0
_STATUS_WAIT = 2.0
_SPOOL_SUFFIX = ".jsonl"
_ACK_SUFFIX = ".ack"


# --- Exceptions --------------------------------------------------------------

class StreamerError(Exception):
    """Base class of the errors isstreamer_lite raises."""


class ConfigError(StreamerError, ValueError):
    """The configuration cannot work: missing key, bad URL, bad bucket key."""


class StreamerClosedError(StreamerError, RuntimeError):
    """Kept so that code catching it still imports: never raised any more.

    As with ISStreamer, ``log()`` after ``close()`` reopens the Streamer.
    """


class DeliveryError(StreamerError):
    """A batch could not be delivered now; passed to ``on_error``.

    ``status`` is the HTTP status (None for a network error), ``reason`` a
    short machine-readable word ("network", "rate_limited", "rejected",
    "key_rejected", "quota", "server_error", ...), ``bucket_key`` the bucket.
    """

    def __init__(self, message, status=None, reason="", bucket_key=""):
        StreamerError.__init__(self, message)
        self.status = status
        self.reason = reason
        self.bucket_key = bucket_key


# --- Configuration -----------------------------------------------------------

def _count(number, noun):
    """``1 event``, ``0 events``, ``2 events``: a count the way it is said."""
    return "%d %s%s" % (number, noun, "" if number == 1 else "s")


def _mask(secret):
    """Show at most the last four characters of a secret."""
    if not secret:
        return "(none)"
    return "..." + secret[-4:] if len(secret) > 8 else "****"


def _scrub(text, secret):
    """``text`` with every copy of ``secret`` (plain or escaped) masked."""
    if secret:
        for form in (secret, repr(secret)[1:-1]):
            if form and form in text:
                text = text.replace(form, _mask(secret))
    return text


def _fingerprint(text):
    """A stable, non-reversible short name for an access or bucket key."""
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _find_ini(location):
    """Return the ini path ISStreamer would read, or None.

    ``location`` if given (it must exist), else ``~/isstreamer.ini``, else
    ``./isstreamer.ini``.
    """
    if location is not None:
        if not os.path.isfile(location):
            raise ConfigError(
                "ini_file_location %r does not exist or is not a file" % (location,))
        return location
    for candidate in (os.path.join(os.path.expanduser("~"), "isstreamer.ini"),
                      os.path.join(os.getcwd(), "isstreamer.ini")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_ini(path):
    """Read ``isstreamer.ini`` into a flat dict of the settings we know.

    Unlike ISStreamer, ``[isstreamer.api_config]`` is read whether or not
    ``[isstreamer.client_config]`` exists.
    """
    if path is None:
        return {}
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("cannot read ini file %s: %s" % (path, exc))
    except configparser.Error as exc:
        # configparser quotes the offending line, which may hold the access key: the
        # error is described by its line number and neither chained nor kept as context.
        lines = [str(n) for n, _ in getattr(exc, "errors", [])] or \
            ([str(exc.lineno)] if getattr(exc, "lineno", None) else [])
        problem = "cannot read ini file %s: %s%s" % (
            path, type(exc).__name__, " at line %s" % ", ".join(lines) if lines else "")
    else:
        problem = None
    if problem is not None:
        raise ConfigError(problem)      # outside the handler: no __context__ to print
    found = {}
    for section, option, name in (
            ("isstreamer.client_config", "access_key", "access_key"),
            ("isstreamer.client_config", "default_bucket", "bucket_name"),
            ("isstreamer.client_config", "bucket_key", "bucket_key"),
            ("isstreamer.client_config", "offline_mode", "offline_mode"),
            ("isstreamer.client_config", "offline_file", "offline_file"),
            ("isstreamer.client_config", "spool_dir", "spool_dir"),
            ("isstreamer.client_config", "durable", "durable"),
            ("isstreamer.client_config", "monthly_quota", "monthly_quota"),
            ("isstreamer.api_config", "stream_api_base", "api_base")):
        if parser.has_option(section, option):
            found[name] = parser.get(section, option).strip()
    found["path"] = path
    return found


def _parse_bool(text, what):
    """Read an ini or environment boolean ("true", "1", "yes", "on", ...)."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError("%s is %r; expected true or false" % (what, text))


def _pick(argument, env_name, ini, ini_name, default=None):
    """Constructor argument, then environment variable, then ini, then default.

    Surrounding whitespace of an environment value is dropped (a CRLF env
    file, an ``echo`` into a variable), as it is of ini values.
    """
    if argument not in (None, ""):
        return argument
    if env_name and os.environ.get(env_name, "").strip():
        return os.environ[env_name].strip()
    if ini.get(ini_name):
        return ini[ini_name]
    return default


def _header_problem(text):
    """Why ``text`` cannot travel in an HTTP header, or None."""
    bad = [c for c in text if ord(c) < 32 or ord(c) == 127]
    if bad:
        return "contains control characters (%s)" % ", ".join(
            sorted(set("0x%02x" % ord(c) for c in bad)))
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return "contains characters an HTTP header cannot carry (only Latin-1 travels)"
    return None


def _check_access_key(access_key):
    """A ConfigError that never shows the key, if it cannot be sent."""
    if not isinstance(access_key, str):
        raise ConfigError("access_key must be a string, not %s" % type(access_key).__name__)
    problem = _header_problem(access_key)
    if problem:
        raise ConfigError("the access key (%s) %s; copy it again from your account "
                          "settings" % (_mask(access_key.strip()), problem))


def _check_api_base(api_base):
    """Return (scheme, host, port, path prefix) of an http(s) base URL."""
    from urllib.parse import urlsplit
    if not isinstance(api_base, str):
        raise ConfigError("api_base must be a string, not %s" % type(api_base).__name__)
    parts = urlsplit(api_base.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "api_base %r is not an http:// or https:// URL with a host" % (api_base,))
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError("api_base %r has an invalid port" % (api_base,))
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ConfigError("api_base %r has a path; give the server only, such as "
                          "https://groker.init.st (the /api/... paths are added)" % (api_base,))
    return parts.scheme, parts.hostname, port, ""


def _check_bucket(bucket_key, bucket_name):
    """Validate a bucket key and name; raise ConfigError naming the rule."""
    if not isinstance(bucket_key, str):
        raise ConfigError("bucket_key must be a string, not %s" % type(bucket_key).__name__)
    if len(bucket_key) > _MAX_BUCKET_CHARS:
        raise ConfigError("bucket_key is %d characters; the limit is %d"
                          % (len(bucket_key), _MAX_BUCKET_CHARS))
    bad = sorted(set(bucket_key) & set(_BUCKET_KEY_FORBIDDEN))
    if bad:
        raise ConfigError("bucket_key %r contains %s; a bucket key may not contain : \" or '"
                          % (bucket_key, " ".join(repr(c) for c in bad)))
    if not bucket_key.strip():
        raise ConfigError("bucket_key %r is blank; leave it empty for a new one" % (bucket_key,))
    problem = _header_problem(bucket_key)
    if problem:
        raise ConfigError("bucket_key %r %s (it travels in the X-IS-BucketKey header)"
                          % (bucket_key, problem))
    if not isinstance(bucket_name, str):
        raise ConfigError("bucket_name must be a string, not %s" % type(bucket_name).__name__)
    if len(bucket_name) > _MAX_BUCKET_CHARS:
        raise ConfigError("bucket_name is %d characters; the limit is %d"
                          % (len(bucket_name), _MAX_BUCKET_CHARS))


def _could_create(path):
    """Whether ``path`` exists as a writable folder or could be made (no I/O but stat)."""
    head = os.path.abspath(path)
    while not os.path.exists(head):
        parent = os.path.dirname(head)
        if parent == head:
            return False
        head = parent
    return os.path.isdir(head) and os.access(head, os.W_OK | os.X_OK)


def _default_spool_dir():
    """Where the spool goes when no spool_dir is given, first that can be written.

    $XDG_STATE_HOME/isstreamer_lite, else ~/.local/state/isstreamer_lite
    (only with a real home: HOME set, or a passwd entry), else
    $XDG_RUNTIME_DIR/isstreamer_lite (a read-only image; lost at reboot),
    else a private isstreamer_lite-<uid> folder in the system temp folder.
    """
    candidates = []
    if os.environ.get("XDG_STATE_HOME", "").strip():
        candidates.append(os.environ["XDG_STATE_HOME"].strip())
    home = os.path.expanduser("~")
    if home != "~" and os.path.isabs(home):
        candidates.append(os.path.join(home, ".local", "state"))
    if os.environ.get("XDG_RUNTIME_DIR", "").strip():
        candidates.append(os.environ["XDG_RUNTIME_DIR"].strip())
    for base in candidates:
        if _could_create(os.path.join(base, "isstreamer_lite")):
            return os.path.join(base, "isstreamer_lite")
    import tempfile
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), "isstreamer_lite-%d" % uid)


def _check_number(name, value, low, high=None):
    """Validate a numeric option; raise ValueError naming the value and range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError("%s must be a number, not %r" % (name, value))
    if value < low or (high is not None and value > high):
        limit = "at least %s" % low if high is None else "between %s and %s" % (low, high)
        raise ValueError("%s is %r; it must be %s" % (name, value, limit))
    return value


def _check_quota(monthly_quota, ini, where):
    """monthly_quota: the argument, else IS_MONTHLY_QUOTA, else the ini's, else 3,000,000."""
    source = "monthly_quota"
    if monthly_quota is None:
        if os.environ.get("IS_MONTHLY_QUOTA", "").strip():
            monthly_quota, source = os.environ["IS_MONTHLY_QUOTA"].strip(), "IS_MONTHLY_QUOTA"
        elif ini.get("monthly_quota"):
            monthly_quota, source = ini["monthly_quota"], "monthly_quota" + where
        else:
            return _MONTHLY_QUOTA
    value = monthly_quota
    if isinstance(value, str) and value.strip().replace("_", "").isdigit():
        value = int(value.strip().replace("_", ""))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        error = ValueError if source == "monthly_quota" else ConfigError
        raise error("%s is %r; it must be a whole number of events a month, at least 0 "
                         "(0 turns the quota warning off)" % (source, monthly_quota))
    return value


def _new_bucket_key():
    """A random UUID4 string, as ISStreamer made for an empty bucket_key."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    text = "".join("%02x" % b for b in raw)
    return "-".join((text[:8], text[8:12], text[12:16], text[16:20], text[20:]))


def _enable_console_logging(debug_level):
    """debug_level >= 1: show our messages on stderr unless logging is set up."""
    import logging
    if _log.level == logging.NOTSET:
        _log.setLevel(logging.DEBUG if debug_level >= 3 else logging.INFO)
    if not _log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("isstreamer_lite: %(message)s"))
        _log.addHandler(handler)


class _Settings(collections.namedtuple("_Settings", (
        "access_key api_base buffer_size flush_interval timeout wait_timeout exit_timeout "
        "max_retries backoff_base backoff_cap retry_after_cap pause_interval max_queue "
        "spool_dir spool_max_bytes on_error ssl_context offline use_async offline_file "
        "debug_level durable sync_interval handle_sigterm monthly_quota user_agent "
        "bucket_key bucket_name"))):
    """Every option, validated and merged once by _resolve_settings; immutable.

    The engine reads fields by name; a tuple, so no thread can change one
    under another. repr() masks the access key (it must never be printed).
    """

    __slots__ = ()

    def __repr__(self):
        return "_Settings(%s)" % ", ".join(
            "%s=%r" % (name, _mask(value) if name == "access_key" else value)
            for name, value in zip(self._fields, self))


def _resolve_settings(bucket_name, bucket_key, access_key, ini_file_location, debug_level,
                      buffer_size, offline, use_async, api_base, flush_interval, timeout,
                      wait_timeout, exit_timeout, max_retries, backoff_base, backoff_cap,
                      retry_after_cap, pause_interval, max_queue, spool_dir, spool_max_bytes,
                      offline_file, on_error, ssl_context, durable, sync_interval,
                      handle_sigterm, monthly_quota=None):
    """Validate the options and merge them with environment, ini and defaults.

    Returns the _Settings the engine reads; raises ConfigError,
    ValueError or TypeError naming the value and the rule.
    """
    ini = {} if ini_file_location is False else _read_ini(_find_ini(ini_file_location))
    where = " in %s" % ini["path"] if "path" in ini else ""
    access_key = _pick(access_key, "IS_ACCESS_KEY", ini, "access_key", "")
    bucket_key = _pick(bucket_key, "IS_BUCKET_KEY", ini, "bucket_key", "")
    bucket_name = _pick(bucket_name, "IS_BUCKET_NAME", ini, "bucket_name", "")
    api_base = _pick(api_base, "IS_API_BASE", ini, "api_base", _DEFAULT_API_BASE)
    if offline is None:
        offline = _parse_bool(ini.get("offline_mode", "false"), "offline_mode" + where)
    if durable is None:
        durable = _parse_bool(os.environ.get("IS_DURABLE") or ini.get("durable", "false"),
                              "IS_DURABLE" if os.environ.get("IS_DURABLE") else
                              "durable" + where)
    if not isinstance(debug_level, int) or isinstance(debug_level, bool):
        raise ValueError("debug_level must be an int, not %r" % (debug_level,))
    if not isinstance(buffer_size, int) or isinstance(buffer_size, bool) or buffer_size < 1:
        raise ValueError("buffer_size is %r; it must be a whole number of at least 1"
                         % (buffer_size,))
    if not isinstance(max_queue, int) or max_queue < buffer_size:
        raise ValueError("max_queue is %r; it must be a whole number of at least "
                         "buffer_size (%d)" % (max_queue, buffer_size))
    for name, value, low in (("flush_interval", flush_interval, 0.001),
                             ("timeout", timeout, 0.001), ("wait_timeout", wait_timeout, 0),
                             ("exit_timeout", exit_timeout, 0),
                             ("max_retries", max_retries, 1),
                             ("backoff_base", backoff_base, 0.0001),
                             ("backoff_cap", backoff_cap, 0.0001),
                             ("retry_after_cap", retry_after_cap, 0),
                             ("pause_interval", pause_interval, 0.001),
                             ("sync_interval", sync_interval, 0.001)):
        _check_number(name, value, low)
    if spool_max_bytes is not None:
        _check_number("spool_max_bytes", spool_max_bytes, 1)     # None: no limit
    monthly_quota = _check_quota(monthly_quota, ini, where)
    if on_error is not None and not callable(on_error):
        raise TypeError("on_error must be callable, not %r" % (on_error,))
    if not offline and not access_key:
        raise ConfigError("no access key: pass access_key=, set IS_ACCESS_KEY, or put "
                          "access_key in [isstreamer.client_config] of isstreamer.ini")
    if not offline:
        _check_access_key(access_key)
    scheme, host = _check_api_base(api_base)[:2]
    if not bucket_key:
        bucket_key = _new_bucket_key()
    _check_bucket(bucket_key, bucket_name)

    spool_dir = _pick(spool_dir, "IS_SPOOL_DIR", ini, "spool_dir", _default_spool_dir())
    if not offline:
        _check_private_dir(spool_dir)
        _check_private_dir(os.path.join(spool_dir, _fingerprint(access_key)),
                           "the spool folder")
    if debug_level >= 1:
        _enable_console_logging(debug_level)
    if scheme == "http" and not _is_loopback(host) and not offline:
        _log.warning("api_base %s is plain http://: the access key travels in clear text",
                     api_base)
    return _Settings(
        access_key=access_key, api_base=api_base, buffer_size=buffer_size,
        flush_interval=float(flush_interval), timeout=float(timeout),
        wait_timeout=float(wait_timeout), exit_timeout=float(exit_timeout),
        max_retries=int(max_retries), backoff_base=float(backoff_base),
        backoff_cap=float(backoff_cap), retry_after_cap=float(retry_after_cap),
        pause_interval=float(pause_interval), max_queue=max_queue, spool_dir=spool_dir,
        spool_max_bytes=spool_max_bytes, on_error=on_error, ssl_context=ssl_context,
        offline=bool(offline), use_async=bool(use_async),
        offline_file=_pick(offline_file, None, ini, "offline_file", "./isstreamer_out.csv"),
        debug_level=debug_level, durable=bool(durable) and not offline,
        sync_interval=float(sync_interval), handle_sigterm=bool(handle_sigterm),
        monthly_quota=monthly_quota,
        user_agent="isstreamer_lite/%s Python/%d.%d" % ((__version__,) + sys.version_info[:2]),
        bucket_key=bucket_key, bucket_name=bucket_name)


# --- Event validation and encoding -------------------------------------------

def _invalid(kind, reason, message):
    """A ValueError/TypeError for a refused event, with a short ``reason`` for stats()."""
    exc = kind(message)
    exc.reason = reason
    return exc


def _normalise_value(key, value):
    """Return ``value`` as a JSON-safe str, bool, int or finite float.

    Raises TypeError or ValueError naming the key, the value's type and the
    rule. Real numbers of other types (Decimal, Fraction, numpy scalars) are
    converted.
    """
    kind = type(value)
    if kind is int and not -_INT_LIMIT <= value <= _INT_LIMIT:
        raise _invalid(ValueError, "int_too_large", "value for key %r is an integer of %d bits; the limit is 64 bits "
                         "(JSON readers lose larger ones)" % (key, value.bit_length()))
    if kind is bool or kind is int:
        return value
    if kind is float:
        if value - value == 0.0:
            return value
        raise _invalid(ValueError, "not_finite", "value for key %r is %r; numbers must be finite "
                         "(JSON has no NaN or Infinity)" % (key, value))
    if kind is str:
        if len(value) > _MAX_VALUE_CHARS:
            raise _invalid(ValueError, "value_too_long", "value for key %r is a str of %d characters; the limit is %d"
                             % (key, len(value), _MAX_VALUE_CHARS))
        _check_utf8("value for key %r" % (key,), value)
        return value
    if isinstance(value, str):
        return _normalise_value(key, str.__str__(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return _normalise_value(key, int(value))
    if isinstance(value, float):
        return _normalise_value(key, float(value))
    item = getattr(value, "item", None)
    if callable(item) and hasattr(value, "dtype"):     # a numpy-like scalar
        return _normalise_value(key, item())
    import numbers
    if isinstance(value, numbers.Number) and not isinstance(value, numbers.Complex) \
            or type(value).__name__ == "Decimal" or isinstance(value, numbers.Real):
        try:
            return _normalise_value(key, float(value))
        except (TypeError, ValueError, OverflowError):
            pass
    raise _invalid(TypeError, "value_type", "value for key %r is of type %s; values must be str, bool, int "
                    "or a finite real number" % (key, type(value).__name__))


def _check_utf8(what, text):
    """ValueError if ``text`` holds a lone surrogate (not valid UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid(ValueError, "not_utf8", "%s holds a lone surrogate %r at position %d; text must be valid "
                         "UTF-8 (decode bytes with errors='replace')"
                         % (what, text[exc.start], exc.start))


def _check_key(key):
    """The key as an exact str; TypeError/ValueError unless it is a legal event key."""
    if not isinstance(key, str):
        raise _invalid(TypeError, "key_type", "key %r is of type %s; keys must be str"
                        % (key, type(key).__name__))
    key = "".join((key,))                   # an exact str: a subclass's __len__ may lie
    if not key:
        raise _invalid(ValueError, "key_empty", "key is empty; keys must be 1 to %d characters" % _MAX_KEY_CHARS)
    if len(key) > _MAX_KEY_CHARS:
        raise _invalid(ValueError, "key_too_long", "key %r... is %d characters; the limit is %d"
                         % (key[:20], len(key), _MAX_KEY_CHARS))
    _check_utf8("key %r" % (key,), key)
    return key


def _normalise_epoch(epoch):
    """Unix seconds from a number or a datetime; ValueError if unusable."""
    if hasattr(epoch, "timestamp") and callable(epoch.timestamp):
        epoch = epoch.timestamp()
    elif callable(getattr(epoch, "item", None)):
        epoch = epoch.item()
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        raise ValueError("epoch %r is not a number or a datetime" % (epoch,))
    try:
        epoch = float(epoch)
    except OverflowError:
        epoch = float("inf")
    if not epoch - epoch == 0.0 or epoch < 0:
        raise ValueError("epoch %r is not a finite, non-negative Unix time" % (epoch,))
    if epoch > _MAX_EPOCH:
        hint = " (it looks like milliseconds: divide by 1000)" \
            if epoch / 1000.0 <= _MAX_EPOCH else ""
        raise ValueError("epoch %r is after the year 9999%s; epochs are Unix seconds"
                         % (epoch, hint))
    return epoch


def _json_bytes(data):
    """Compact JSON of ``data`` as UTF-8 bytes."""
    import json
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def _json_load(text):
    """Parse JSON from str or UTF-8 bytes; ValueError if it is not JSON."""
    import json
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)


def _encode_json(data):
    """Compact JSON text, NaN refused; replaces itself with the C encoder on first use."""
    global _encode_json
    import json
    _encode_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    return _encode_json(data)


def _encode_events(events):
    """The JSON array body for a list of (key, value, epoch) tuples."""
    return b"[" + b",".join(_encode_event(e) for e in events) + b"]"


def _decode_body(body):
    """Events from a JSON body (array or single object); ValueError if bad."""
    data = _json_load(body)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError("body is JSON %s, not an array of events" % type(data).__name__)
    events = []
    for item in data:
        if not isinstance(item, dict) or "key" not in item or "value" not in item:
            raise ValueError("not an event object: %r" % (item,))
        events.append((item["key"], item["value"], item.get("epoch", item.get("iso8601"))))
    return events


# --- Transport ---------------------------------------------------------------

class _Response(object):
    """What the server answered: status, lower-cased headers and body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def text(self, limit=300):
        return self.body[:limit].decode("utf-8", "replace")


_MAX_HEAD_LINE = 65536          # http.client's limits for one line and for the headers
_MAX_HEADERS = 100


def _read_reply(reader, limit):
    """Read one HTTP/1.x answer from ``reader`` (a _SocketLines): (status, headers, body,
    reusable).

    ``headers`` are lower-cased (the last of a repeated name wins); at most
    ``limit`` bytes of the body are read. ``reusable`` is False when the
    connection must not carry another request: the server closes it, the body
    was longer than ``limit`` or had no length, or bytes already read follow
    it. 100 Continue is skipped; another 1xx is returned, never reusable (the
    caller refuses it).
    Raises RemoteDisconnected if the connection closed before a status line,
    other HTTPExceptions for what is not HTTP, OSError from the socket. After a
    timeout, ``reader.rewind()`` lets it read the answer again from its start.
    """
    import http.client
    while True:
        line = reader.line()
        if not line:
            raise http.client.RemoteDisconnected("Remote end closed connection without response")
        parts = line.decode("latin-1").rstrip("\r\n").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit() \
                or len(parts[1]) != 3:
            raise http.client.BadStatusLine(line[:80].decode("latin-1"))
        status, version = int(parts[1]), parts[0]
        headers = reader.headers()
        if status != 100:
            break
    connection = headers.get("connection", "").lower()
    reusable = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    if status < 200:                    # an interim answer where the final one belongs
        return status, headers, b"", False
    if status in (204, 304):
        return status, headers, b"", reusable and not reader.buffered()
    if headers.get("transfer-encoding", "").lower().rsplit(",", 1)[-1].strip() == "chunked":
        body, complete = reader.chunked(limit)
    else:
        length = headers.get("content-length", "").strip()
        if length.isdigit():
            body = reader.read(min(int(length), limit))
            complete = len(body) == int(length)
        else:                           # no length: the body ends when the connection does
            body, complete = reader.read(limit), False
    return status, headers, body, reusable and complete and not reader.buffered()


class _SocketLines(object):
    """Lines and bytes from a socket, read in large pieces; the parser of _read_reply.

    ``data`` is all that was received of the answer, ``data[pos:]`` what is not
    parsed yet: a read that timed out can be parsed again from the start.
    """

    def __init__(self, sock, arm=None):
        self.sock = sock
        self.arm = arm                  # called before each recv: sets its timeout
        self.data = b""
        self.pos = 0
        self.eof = False

    def _more(self):
        if not self.eof and self.arm is not None:
            self.arm()
        piece = b"" if self.eof else self.sock.recv(65536)
        self.eof = not piece
        self.data += piece
        return bool(piece)

    def rewind(self):
        """Parse again from the first byte received (after a timeout)."""
        self.pos = 0

    def line(self):
        """The next line with its end (b"" at the end of the stream)."""
        while True:
            pos = self.pos
            end = self.data.find(b"\n", pos, pos + _MAX_HEAD_LINE + 1)
            if end >= 0:
                self.pos = end + 1
                return self.data[pos:end + 1]
            if len(self.data) - pos > _MAX_HEAD_LINE:
                import http.client
                raise http.client.LineTooLong("header line")
            if not self._more():
                line, self.data, self.pos = self.data[self.pos:], b"", 0
                return line

    def headers(self):
        """The header block after a status line, as a dict of lower-cased names."""
        import http.client
        found, name = {}, None
        lines = self._block()
        for _ in range(_MAX_HEADERS + 1):
            line = self.line() if lines is None else lines.pop() if lines else b""
            if line in (b"\r\n", b"\n", b""):
                return found
            text = line.decode("latin-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and name is not None:     # a folded line
                found[name] += " " + text.strip()
                continue
            name, colon, value = text.partition(":")
            if not colon:
                raise http.client.HTTPException("malformed header line %r" % text[:80])
            name = name.strip().lower()
            found[name] = value.strip()
        raise http.client.HTTPException("got more than %d headers" % _MAX_HEADERS)

    def _block(self):
        """The usual case, at one split: a whole, small header block already received
        and ended by CRLF CRLF; its lines, last first (None: read line by line)."""
        data, pos = self.data, self.pos
        if data.startswith(b"\r\n", pos):
            self.pos = pos + 2
            return []
        end = data.find(b"\r\n\r\n", pos, pos + _MAX_HEAD_LINE)
        if end < 0:
            return None
        block = data[pos:end]
        if block.startswith(b"\n") or b"\n\n" in block or b"\n\r\n" in block \
                or block.count(b"\n") >= _MAX_HEADERS:
            return None                 # an earlier empty line ends it, or too many lines
        self.pos = end + 4
        return block.split(b"\n")[::-1]

    def read(self, count):
        """Up to ``count`` bytes (fewer only at the end of the stream)."""
        while len(self.data) - self.pos < count and self._more():
            pass
        body = self.data[self.pos:self.pos + count]
        self.pos += len(body)
        return body

    def chunked(self, limit):
        """A chunked body, at most ``limit`` bytes: (body, whether it ended)."""
        import http.client
        pieces, size = [], 0
        while True:
            line = self.line()
            try:
                length = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise http.client.HTTPException("bad chunk size line %r" % line[:80])
            if length == 0:
                self.headers()                  # trailers, dropped
                return b"".join(pieces), True
            if size + length > limit:
                pieces.append(self.read(limit - size))
                return b"".join(pieces), False
            piece = self.read(length)
            pieces.append(piece)
            size += len(piece)
            if len(piece) < length or self.line() not in (b"\r\n", b"\n"):
                return b"".join(pieces), False

    def buffered(self):
        """Whether bytes came after the answer (a connection that cannot be trusted)."""
        return self.pos < len(self.data)


def _is_loopback(host):
    """Whether ``host`` is this machine: "localhost" or a loopback address."""
    if host.lower() == "localhost":
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Exchange(object):
    """One request on its way: what to send, the tries so far, what was read of the answer."""

    __slots__ = ("path", "body", "headers", "deadline", "attempt", "reused", "reader",
                 "quick", "quick_bound")

    def __init__(self, path, body, headers, deadline):
        self.path, self.body, self.headers, self.deadline = path, body, headers, deadline
        self.attempt = 0
        self.reused = False
        self.reader = None              # a _SocketLines once the request is sent
        self.quick = None               # this try's quick time (monotonic), or None
        self.quick_bound = False        # the quick time bounds the blocking step under way


class _Unfinished(Exception):
    """A quick post's time ran out: ``exchange`` is sent (or not yet) and waits to be
    finished by _HTTPTransport.finish()."""

    def __init__(self, exchange):
        Exception.__init__(self, "unfinished")
        self.exchange = exchange


class _Dialer(object):
    """How the transport reaches the API: the proxy to go through (resolved at the first
    connection), and each new connection (TLS, a proxy's tunnel, a small send buffer).
    """

    def __init__(self, api_base, ssl_context=None):
        self.scheme, self.host, self.port, self.prefix = _check_api_base(api_base)
        self.ssl_context = ssl_context
        self.connections = 0
        self.proxy = None               # (host, port, auth header or None)
        self._proxy_resolved = False

    def _resolve_proxy(self):
        """(host, port, auth header or None) of the proxy to use, or None.

        This machine (loopback) is never reached through a proxy.
        """
        if _is_loopback(self.host):
            return None
        import urllib.request
        from urllib.parse import urlsplit
        url = urllib.request.getproxies().get(self.scheme)
        if not url or urllib.request.proxy_bypass(self.host):
            return None
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme != "http":
            _log.warning("proxy %s://%s ignored: only http:// proxies are supported",
                         parts.scheme, parts.hostname)
            return None
        auth = None
        if parts.username:
            import base64
            from urllib.parse import unquote
            pair = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
            auth = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
        _log.debug("connecting to %s through the proxy %s:%d", self.host, parts.hostname,
                   parts.port or 8080)                  # never the proxy's credentials
        return parts.hostname, parts.port or 8080, auth

    def connect(self, timeout):
        """A new, connected http.client connection (its ``sock`` is what we use)."""
        import http.client
        if not self._proxy_resolved:
            self.proxy = self._resolve_proxy()
            self._proxy_resolved = True
        host, port = self.host, self.port
        if self.proxy is not None:
            host, port = self.proxy[0], self.proxy[1]
        if self.scheme == "https":
            context = self.ssl_context
            if context is None:
                import ssl
                context = ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if self.proxy is not None and self.scheme == "https":
            headers = {"Proxy-Authorization": self.proxy[2]} if self.proxy[2] else None
            conn.set_tunnel(self.host, self.port, headers=headers)
        conn.connect()
        self.connections += 1
        # A small send buffer: a send then waits for the link, not for the kernel's
        # buffer, so a slow upload is not counted as silence awaiting the answer.
        try:
            import socket
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        except (OSError, AttributeError):
            pass
        return conn

    def plain_proxy(self):
        """Whether requests go in clear through an http:// proxy (absolute URLs, and its
        credentials in each request's headers)."""
        return self.proxy is not None and self.scheme == "http"

    def head(self, path, headers):
        """The request line and the headers but Content-Length, as http.client writes them."""
        host = self.host if ":" not in self.host else "[%s]" % self.host
        if self.port != (443 if self.scheme == "https" else 80):
            host = "%s:%d" % (host, self.port)
        target = self.prefix + path
        if self.plain_proxy():
            target = "http://%s:%d%s" % (self.host, self.port, target)
        lines = ["POST %s HTTP/1.1" % target, "Host: " + host, "Accept-Encoding: identity"]
        lines.extend("%s: %s" % item for item in headers.items())
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")


class _HTTPTransport(object):
    """One persistent HTTP/1.1 connection to the API, reopened as needed (_Dialer).

    Only the worker uses it, so it needs no lock; a request a quick post()
    left unfinished goes to one other thread (the courier's) with it. A
    request that fails on a reused connection before any response arrives
    (the server closed it while idle) is sent once more on a new connection.
    """

    def __init__(self, api_base, timeout, ssl_context=None, user_agent=None):
        self.dialer = _Dialer(api_base, ssl_context)
        self.timeout = timeout
        self.user_agent = user_agent
        self._conn = None
        self._last_head = (None, b"")   # ((path, headers, proxy), head without length)

    @property
    def connections(self):
        return self.dialer.connections

    def post(self, path, body, headers, deadline=None, quick=None):
        """POST ``body`` before ``deadline`` (monotonic); a _Response, or raise.

        Raises OSError or HTTPException. The request is written and the answer
        read here (_read_reply), not by http.client, whose header parser costs
        more than the rest of a call; http.client still opens the connection
        (TLS, proxy tunnel). At most _MAX_REPLY_BYTES of the answer are read; a
        connection with more, or that answered with an interim 1xx, is not reused.
        With ``quick`` (monotonic), raises _Unfinished if no connection is open or
        the answer has not all come by then: ``finish()`` it, in another thread.
        """
        if deadline is None:
            deadline = _monotonic() + self.timeout
        headers = dict(headers)
        if self.dialer.plain_proxy() and self.dialer.proxy[2]:
            headers["Proxy-Authorization"] = self.dialer.proxy[2]
        return self._exchange(_Exchange(path, body, headers, deadline), quick)

    def finish(self, exchange):
        """The answer to a request a quick post() left unfinished (_Unfinished.exchange)."""
        return self._exchange(exchange, None)

    def _exchange(self, ex, quick):
        """Send ``ex`` (again on a new connection if a kept-alive one was closed under
        it) unless it is out, and read its answer: a _Response."""
        import http.client
        import socket
        ex.quick = quick
        while True:
            if ex.reader is None:
                if self._conn is None and quick is not None:
                    raise _Unfinished(ex)       # connecting may take long: not here
                ex.attempt += 1
                ex.reused = self._conn is not None
                if self._conn is None:
                    self._conn = self.dialer.connect(self._time_left(ex.deadline))
            sock, sending = self._conn.sock, ex.reader is None
            try:
                if sending:
                    # One packet for a small request: the head and the first piece together.
                    body = ex.body
                    pieces = [self._head(ex.path, ex.headers, len(body)) + body[:_SEND_CHUNK]]
                    pieces.extend(body[start:start + _SEND_CHUNK]
                                  for start in range(_SEND_CHUNK, len(body), _SEND_CHUNK))
                    for piece in pieces:
                        self._arm(sock, ex)
                        sock.sendall(piece)
                    ex.reader = _SocketLines(sock, lambda: self._arm(sock, ex))
                    sending = False
                ex.reader.rewind()
                status, answer, data, reusable = _read_reply(ex.reader, _MAX_REPLY_BYTES)
                if status < 200:
                    raise http.client.HTTPException(
                        "the server sent an interim %d answer as final" % status)
            except socket.timeout:
                if not ex.quick_bound:
                    self.close(reset=True)      # the request's own timeout
                    raise
                if sending:                     # part of it may be out: send it all again
                    self.close(reset=True)
                    ex.reader, ex.attempt = None, ex.attempt - 1
                raise _Unfinished(ex)
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    ConnectionAbortedError, BrokenPipeError, http.client.BadStatusLine):
                self.close(reset=True)
                if ex.reused and ex.attempt == 1:
                    _log.debug("kept-alive connection was closed by the server; reconnecting")
                    ex.reader = None
                    continue
                raise
            except BaseException:
                self.close(reset=True)
                raise
            if not reusable:
                self.close()            # it closes, or more came than we read: never reuse it
            return _Response(status, answer, data)

    def _head(self, path, headers, length):
        """The request line and headers: all but Content-Length are the same call after
        call, kept for the last (path, headers, proxy) seen."""
        key = (path, tuple(headers.items()), self.dialer.proxy)
        if self._last_head[0] != key:
            self._last_head = (key, self.dialer.head(path, headers))
        return self._last_head[1] + b"Content-Length: %d\r\n\r\n" % length

    def _time_left(self, deadline):
        """Seconds a blocking step may take: ``timeout`` of silence, within the deadline."""
        left = min(self.timeout, deadline - _monotonic())
        if left <= 0:
            raise TimeoutError("no answer before the request's deadline")
        return left

    def _arm(self, sock, ex):
        """Bound the socket's next blocking step, a send or each read: ``timeout`` of
        silence within the deadline (_time_left), and ``ex.quick`` if set. Records in
        ``ex.quick_bound`` whether the quick time is the bound: a timeout says which by
        this, not by the clock read after it (PyPy's fire a little early). Armed before
        every read, a server that trickles its answer cannot keep the worker past it.
        """
        ex.quick_bound = False
        left = self._time_left(ex.deadline)
        if ex.quick is not None and ex.quick - _monotonic() < left:
            sock.settimeout(max(0.001, ex.quick - _monotonic()))
            ex.quick_bound = True
        else:
            sock.settimeout(left)

    def abort(self):
        """Break a request running in another thread (its deadline passed).

        The connection is reset, not closed: the kernel drops what it still
        had to send, so the server never stores a request given up on.
        """
        conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            _linger_zero(sock)
            try:
                sock.shutdown(2)            # SHUT_RDWR: the blocked send or read returns
            except OSError:
                pass

    def forget(self):
        """In a forked child: drop the parent's connection without closing it."""
        self._conn = None

    def close(self, reset=False):
        """Close the connection; ``reset`` (a request broke off) discards unsent bytes."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if reset and conn.sock is not None:
                _linger_zero(conn.sock)
            try:
                conn.close()
            except OSError:
                pass


def _linger_zero(sock):
    """Make close() reset the connection (RST) and drop the unsent data."""
    import socket
    import struct
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass


# --- Delivery policy (retry, back-off, pacing) --------------------------------

_DELIVERED = "delivered"      # 2xx
_RETRY = "retry"              # network error, 408, 5xx: back off and retry
_WAIT = "wait"                # 429: wait as told, retry, not a failure
_SPLIT = "split"              # 413: send each half
_BISECT = "bisect"            # 400: find the rejected events
_PAUSE = "pause"              # 401/403/402/other 4xx: spool, pause, probe
_REFUSE = "refuse"            # an error no retry can mend: dead-letter the batch


class _Decision(object):
    """What to do with a batch after one request: action, delay, reason."""

    __slots__ = ("action", "delay", "reason")

    def __init__(self, action, delay=0.0, reason=""):
        self.action = action
        self.delay = delay
        self.reason = reason

    def __repr__(self):
        return "_Decision(%r, %.3f, %r)" % (self.action, self.delay, self.reason)


def _retry_delay(failures, base, cap, rand=None):
    """Exponential back-off with full jitter: uniform in [0, min(cap, base*2^n)].

    ``rand`` returns a float in [0, 1) (default ``random.random``).
    """
    if rand is None:
        import random
        rand = random.random
    return rand() * min(cap, base * (2 ** min(failures, 30)))


def _parse_retry_after(value, now):
    """Seconds to wait from a Retry-After header (seconds or HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_tz, mktime_tz
    parsed = parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, mktime_tz(parsed) - now)


def _decide(status, headers=None, error=None, failures=0, base=0.5, cap=30.0,
            retry_after_cap=120.0, pause=60.0, now=None, rand=None):
    """The delivery policy: one request's outcome -> a _Decision.

    ``status`` is the HTTP status or None when ``error`` (an exception)
    happened instead; ``failures`` counts the consecutive failures before
    this one. Pure: no I/O, no clock unless ``now`` is None.
    """
    if error is not None or status is None:
        import http.client
        if error is not None and not isinstance(error, (OSError, EOFError,
                                                        http.client.HTTPException)):
            return _Decision(_REFUSE, 0.0, "cannot be sent: %s: %s"
                             % (type(error).__name__, error))
        reason = "timeout" if isinstance(error, TimeoutError) or \
            type(error).__name__ == "timeout" else "network"
        return _Decision(_RETRY, _retry_delay(failures, base, cap, rand), reason)
    if 200 <= status < 300:
        return _Decision(_DELIVERED)
    if status == 429:
        now = _time() if now is None else now
        after = _parse_retry_after((headers or {}).get("retry-after"), now)
        if after is None:
            return _Decision(_WAIT, _retry_delay(failures, base, cap, rand), "rate_limited")
        if not after <= _WINDOW + _WINDOW_SLACK:
            after = _WINDOW             # ms, years ahead, infinite: the window's end
        # A Retry-After of 0 or in the past still waits, longer each time in a row.
        floor = min(cap, base * (2 ** min(failures, 30))) / 2.0
        return _Decision(_WAIT, max(floor, min(after, retry_after_cap)), "rate_limited")
    if status == 413:
        return _Decision(_SPLIT, 0.0, "too_large")
    if status == 400:
        return _Decision(_BISECT, 0.0, "rejected")
    if status == 408 or status >= 500:
        return _Decision(_RETRY, _retry_delay(failures, base, cap, rand), "server_error")
    if status in (401, 403):
        return _Decision(_PAUSE, pause, "key_rejected")
    if status == 402:
        return _Decision(_PAUSE, pause, "quota")
    return _Decision(_PAUSE, pause, "http_%d" % status)


_PAUSE_ADVICE = {
    "key_rejected": "the access key (%s) was rejected: check access_key / IS_ACCESS_KEY "
                    "against your Initial State account settings",
    "quota": "the server answered 402: the account's monthly quota of events (the event "
             "limit of this billing cycle; 3 million a month on the Student and Individual "
             "plans) is used up (key %s), and nothing is stored until the next billing "
             "month or a plan change",
}


class _RateBudget(object):
    """Requests left in the rate-limit window of one access key.

    Learnt from X-RateLimit-Limit/Remaining/Reset on every response and
    shared by every Streamer of the process using that key. Kept in
    monotonic time: the server's reset is turned into "seconds from now"
    when its answer arrives, so a wall clock that steps cannot stall
    sending. Seconds from now are read against the server's own clock (its
    Date header, in whole seconds, so the end found is at most a second
    late) or, without one, against ours; when an answer tells of a new
    window, the one before ended already, so the new one ends at most a
    window from now: the end found is never early (no 429 from a clock that
    runs ahead) and, while calls are frequent, late by one call at most.
    Windows are told apart by the Reset value the server gives them (one
    older than the last is a late answer, ignored), and their length is the
    step between two of them (the documented 10 s until two are seen). A
    window refilled here before the server's ended is put right by the next
    answer that still tells of the old one. A reset that is not a
    sane time within the documented window (milliseconds, years ahead,
    non-finite) counts as the window's end, _WINDOW seconds from now. What
    is left of a window is spread over its remaining time rather than spent
    at once, so a flush() or close() always finds a request to make. Until
    a server sends those headers nothing is paced, and what it told is
    forgotten once the window after the one it told of is over with no news.
    """

    def __init__(self):
        self._lock = threading.Lock()   # guards the fields below; arithmetic only under it
        self._limit = None
        self._remaining = None
        self._reset = None              # monotonic time the window refills
        self._told = None               # the Reset value of the last answer
        self._refilled = False          # _reset is a window after _told's, not yet heard of
        self._heard = None              # the reset the last answer with headers told of
        self._span = _WINDOW            # the window's length, seconds
        self._next = 0.0                # monotonic time of the next evenly spaced request
        self._learned = None            # (limit, span) last told, kept when forgotten
        self._booked = collections.deque()  # this process's turns, booked by waiting

    def learned(self):
        """What the server last told of its window: {"calls", "window_s"}, or None."""
        with self._lock:
            if self._learned is None:
                return None
            return {"calls": self._learned[0], "window_s": round(self._learned[1], 3)}

    def reserve(self, now):
        """Take one request from the window: 0.0, or seconds to wait first."""
        with self._lock:
            if self._remaining is None:
                return 0.0
            if now >= self._heard + self._span:
                # No answer told of a window for the whole of the next one: what we
                # knew is stale (a server that stopped sending the headers, or a
                # hostile one that sent them once). Nothing is paced until they come.
                self._limit = self._remaining = self._reset = self._heard = None
                self._told, self._refilled = None, False
                self._booked.clear()
                return 0.0
            if now >= self._reset:
                self._reset += self._span           # the next window, until we hear of it
                self._refilled = True
                self._remaining = self._limit
                self._next = 0.0
            if self._remaining <= 0:
                return self._reset - now + 0.01
            if self._booked:
                if self._booked[0] > now:
                    return self._booked[0] - now    # our turn is booked: wait for it
                self._booked.popleft()
            elif now < self._next:
                # Book the next turn and move it on for whoever asks after us: the
                # processes of a key take turns first come, first served, instead of
                # racing for each one (one could lose many in a row). A turn is time,
                # not a call: the call is counted when it is made, as a late one is.
                self._booked.append(self._next)
                wait = self._next - now
                self._next += (self._reset - self._next) / self._remaining
                return wait
            self._next = max(self._next, now + (self._reset - now) / self._remaining)
            self._remaining -= 1
            return 0.0

    def update(self, headers, now, wall):
        """Learn the window from an answer's headers (``now`` monotonic, ``wall`` Unix)."""
        try:
            limit = int(headers["x-ratelimit-limit"])
            remaining = int(headers["x-ratelimit-remaining"])
            told = float(headers["x-ratelimit-reset"])
        except (KeyError, ValueError, TypeError, OverflowError):
            return
        server_now = wall
        date = headers.get("date")
        if date:
            from email.utils import parsedate_tz, mktime_tz
            parsed = parsedate_tz(date)
            if parsed is not None:
                server_now = mktime_tz(parsed)  # whole seconds: the end found is late, never early
        left = told - server_now
        if limit < 1 or left <= 0.0:
            return              # nonsense, or a late answer from a window that is over
        if not left <= _WINDOW + _WINDOW_SLACK:
            left = _WINDOW      # milliseconds, years ahead, non-finite: the window's end
        with self._lock:
            if not told - told == 0.0:
                told = self._told if self._told is not None else 0.0    # no window to tell
            if self._told is not None and told < self._told - 0.5:
                return          # an answer from a window that is over
            if self._told is None:
                self._next = 0.0
            elif abs(told - self._told) <= 0.5:
                if not self._refilled:
                    # The same window: what is left only decreases, its end only comes closer.
                    remaining = min(remaining, self._remaining)
                    left = min(left, self._reset - now)
                else:
                    self._next = 0.0    # refilled too early: the server's count stands
            else:
                gap = told - self._told
                if gap <= _WINDOW + _WINDOW_SLACK:
                    self._span = gap    # two windows in a row: their length
                left = min(left, self._span)        # the one before is over: this one began
                if self._refilled:
                    remaining = min(remaining, self._remaining)
                else:
                    self._next = 0.0
            self._told, self._refilled = told, False
            self._limit, self._remaining, self._reset = limit, max(0, remaining), now + left
            self._heard = self._reset
            self._learned = (limit, self._span)


class _SharedBudget(_RateBudget):
    """A _RateBudget whose window lives in a small file every process of the machine
    using the access key (and API base) reads and writes, under an flock.

    Each reserve() and update() opens the file, locks it (without blocking:
    a few tries, then this process paces alone for that call), reads the
    window into the fields, runs _RateBudget's arithmetic, writes them back
    and closes the file, which lets go of the lock: the lock is held across
    that tiny file's I/O and nothing else. Times are monotonic (one clock for
    the whole machine on Linux and macOS); a file last written in the future
    or two windows ago (another boot, a stale window) is ignored. Where the
    file cannot be made or read (read-only spool, no fcntl), each process
    paces alone, as _RateBudget does. Created 0600 in the key's 0700 folder,
    never through a symlink.
    """

    _FIELDS = ("_limit", "_remaining", "_reset", "_told", "_refilled", "_heard", "_span",
               "_next", "_learned")

    def __init__(self, path):
        _RateBudget.__init__(self)
        self.path = path
        self._missing_until = 0.0       # the file was missing: not looked for again before

    def reserve(self, now):
        if self._remaining is None:
            if now < self._missing_until:
                return 0.0
            if not os.path.exists(self.path):
                self._missing_until = now + _RATE_FILE_LOOK
                return 0.0              # nobody on this machine heard of a window
        return self._shared(now, _RateBudget.reserve, (self, now))

    def update(self, headers, now, wall):
        if "x-ratelimit-limit" in headers:
            self._shared(now, _RateBudget.update, (self, headers, now, wall))

    def _shared(self, now, operation, args):
        fd = self._open_locked()
        if fd is None:
            return operation(*args)
        try:
            try:
                state = _json_load(_read_at(fd, 0, 4096))
                fields = [(name, state[name]) for name in self._FIELDS]
                if not now - 2 * state["_span"] <= state["saved"] <= now + 1.0:
                    fields = None       # another boot's, or a window long over
            except (OSError, ValueError, KeyError, TypeError):
                fields = None           # none yet, or garbage: what this process knows
            if fields is not None:
                with self._lock:
                    for name, value in fields:
                        setattr(self, name, tuple(value) if isinstance(value, list) else value)
            result = operation(*args)
            with self._lock:
                state = dict((name, getattr(self, name)) for name in self._FIELDS)
            state["saved"] = now
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                _write_all(fd, _json_bytes(state))
            except OSError:
                pass                    # the next reader finds garbage and paces alone
            return result
        finally:
            os.close(fd)                # lets go of the lock

    def _open_locked(self):
        """The file, open and locked; None where it cannot be (then: pace alone)."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            _private_dir(os.path.dirname(self.path))
            fd = _open_private(self.path, os.O_RDWR | os.O_CREAT)
        except OSError:
            return None
        for attempt in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError:
                time.sleep(0.0005)      # held for microseconds by another process
        os.close(fd)
        return None


_budgets = {}
_budgets_lock = threading.Lock()        # guards _budgets


def _budget_for(api_base, access_key, folder=None):
    """The rate budget of a key and API base: shared through a file in ``folder``
    (the key's spool folder) with the other processes, if given."""
    key = (api_base, _fingerprint(access_key or ""))
    with _budgets_lock:
        budget = _budgets.get(key)
        if budget is None:
            budget = _budgets[key] = _RateBudget() if folder is None else _SharedBudget(
                os.path.join(folder, "rate-%s.json" % _fingerprint(api_base)))
        return budget


def _civil(wall):
    """(year, month, seconds since the month began) of Unix time ``wall``, UTC.

    Integer calendar arithmetic (the proleptic Gregorian calendar, days counted
    from 0000-03-01), so the month tally needs no clock module.
    """
    days, seconds = divmod(wall, 86400)
    z = int(days) + 719468
    era = z // 146097
    doe = z - era * 146097                                      # day of the 400-year era
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)             # day of the March year
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day * 86400 + seconds


def _month_of(wall):
    """The calendar month (UTC) of Unix time ``wall``: "2026-12"."""
    year, month, _ = _civil(wall)
    return "%04d-%02d" % (year, month)


def _month_left(wall):
    """Seconds from ``wall`` to the end of its calendar month (UTC)."""
    year, month, done = _civil(wall)
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[month - 1]
    return max(0.0, days * 86400 - done)


class _MonthTally(object):
    """Events delivered per calendar month (UTC), and the month's total projected.

    Pure: given the times, does no I/O and reads no clock. ``months`` are the
    totals known (earlier runs' included); ``unsaved`` what this process added
    since they were last written; ``recent`` the deliveries of the last hour.
    """

    def __init__(self, months=None):
        self.months = dict((k, v) for k, v in (months or {}).items()
                           if isinstance(k, str) and isinstance(v, int))
        self.unsaved = {}
        self.recent = collections.deque()       # (wall, events), oldest first
        self.in_recent = 0                      # the events of ``recent``, summed
        self.span = (0.0, 0.0, "")              # (start, end, name) of the last month seen

    def month_of(self, wall):
        """_month_of(wall), computed once a month (a call is counted every few ms)."""
        start, end, name = self.span
        if not start <= wall < end:
            name = _month_of(wall)
            self.span = (wall - _civil(wall)[2], wall + _month_left(wall), name)
        return name

    def add(self, count, wall):
        month = self.month_of(wall)
        self.months[month] = self.months.get(month, 0) + count
        self.unsaved[month] = self.unsaved.get(month, 0) + count
        self.recent.append((wall, count))
        self.in_recent += count
        self._forget_before(wall - _RATE_WINDOW)

    def _forget_before(self, start):
        """Drop the deliveries at or before ``start`` (O(1) a delivery, not a scan)."""
        recent = self.recent
        while recent and recent[0][0] <= start:
            self.in_recent -= recent.popleft()[1]

    def rate(self, wall):
        """Events a second over the last hour, spread over at least _RATE_MIN_SPAN."""
        self._forget_before(wall - _RATE_WINDOW)
        if not self.recent:
            return 0.0
        return self.in_recent / max(_RATE_MIN_SPAN, wall - self.recent[0][0])

    def projected(self, wall):
        """This month's total if the recent rate goes on to its end."""
        month = self.month_of(wall)         # self.span[1]: when that month ends
        return int(self.months.get(month, 0) + self.rate(wall) * max(0.0, self.span[1] - wall))

    def merged(self, saved):
        """The months of ``saved`` (a state file's) plus what this process added since."""
        months = dict((k, v) for k, v in (saved or {}).items()
                      if isinstance(k, str) and isinstance(v, int))
        for month, count in self.unsaved.items():
            months[month] = months.get(month, 0) + count
        return dict(sorted(months.items())[-_MONTHS_KEPT:])

    def saved(self, months):
        """``months`` were written: they are the totals now, nothing is unsaved."""
        self.months, self.unsaved = dict(months), {}


# --- Spool -------------------------------------------------------------------

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)     # never follow a link we did not make
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _private_dir(path):
    """Create ``path`` and its missing parents 0700, whatever the umask."""
    missing = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue
        os.chmod(folder, 0o700)
        _fsync_dir(os.path.dirname(folder))     # the new entry survives a power cut


def _check_private_dir(path, what="spool_dir"):
    """Refuse an existing folder that another user owns or others may write."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return                          # made 0700 when first needed
    except OSError as exc:
        raise ConfigError("%s %s cannot be read: %s" % (what, path, exc))
    if not stat.S_ISDIR(st.st_mode):
        return                          # unwritable: events stay in memory, then drop
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise ConfigError("%s %s belongs to uid %d, not to this user (uid %d); use a "
                          "folder of your own" % (what, path, st.st_uid, os.geteuid()))
    if st.st_mode & 0o022:
        raise ConfigError("%s %s is writable by group or others (mode %04o); "
                          "chmod 700 it or use another folder"
                          % (what, path, stat.S_IMODE(st.st_mode)))


def _open_private(path, flags):
    """os.open a file 0600 without following a symlink at ``path``."""
    return os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC, 0o600)


def _lock_file(fd):
    """Take an exclusive, non-blocking lock on ``fd``; False if held elsewhere."""
    try:
        import fcntl
    except ImportError:                                 # Windows: no locking
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _probe_lock(path):
    """Whether nobody holds the segment's lock (taken and let go at once)."""
    try:
        fd = _open_private(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if not _lock_file(fd):
            return False
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_UN)
        except ImportError:
            pass
        return os.fstat(fd).st_nlink > 0
    finally:
        os.close(fd)


def _fsync_dir(folder):
    """Make ``folder``'s entries (created, renamed, removed names) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _SpoolFull(OSError):
    """The spool reached spool_max_bytes."""


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_at(fd, start, length):
    if hasattr(os, "pread"):
        return os.pread(fd, length, start)
    os.lseek(fd, start, os.SEEK_SET)
    return os.read(fd, length)


def _replace_file(path, data):
    """Put ``data`` at ``path`` atomically and durably: never a torn or empty file.

    Written under a private name and fsynced before the rename (a renamed
    name can reach the disk before the bytes it names), then the folder.
    """
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), os.urandom(4).hex())
    fd = _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _retired_offsets(path):
    """{start: end} of the segment's lines recorded in its ack log.

    A record is ``b"<start> <end>\\n"``; anything else (a torn record, or one
    glued to a torn record by an older version) retires nothing.
    """
    retired = {}
    try:
        fd = _open_private(path + _ACK_SUFFIX, os.O_RDONLY)
    except OSError:
        return retired
    with os.fdopen(fd, "rb") as handle:
        for line in handle:
            fields = line.split(b" ")
            if len(fields) == 2 and line.endswith(b"\n") and fields[0].isdigit() \
                    and fields[1][:-1].isdigit() and int(fields[0]) < int(fields[1]):
                retired[int(fields[0])] = int(fields[1])
    return retired


def _unretired_lines(path, data):
    """Yield (start, end, body, torn) for each line of a segment not yet retired.

    ``data`` is the segment's content; ``torn`` marks a last line without its
    newline (a crash while writing it).
    """
    retired = _retired_offsets(path)
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        torn = end < 0
        end = len(data) if torn else end + 1
        if retired.get(start) != end:
            yield start, end, data[start:end].rstrip(b"\n"), torn
        start = end


def _torn_tail(fd):
    """Whether an ack log ends in a torn record (a crash while appending it).

    The next record then starts on a line of its own: a torn record, given
    its newline, retires nothing (see _retired_offsets).
    """
    size = os.fstat(fd).st_size
    return size > 0 and _read_at(fd, size - 1, 1) != b"\n"


def _remove_segment(path, durable):
    """Delete a segment, then its ack log, in an order a power cut cannot undo halfway.

    Durable mode fsyncs the folder in between: a segment that came back after
    its ack log was gone would be sent again whole.
    """
    try:
        os.unlink(path)
    except OSError:
        pass
    if durable:
        _fsync_dir(os.path.dirname(path))
    try:
        os.unlink(path + _ACK_SUFFIX)
    except OSError:
        pass


def _sweep_ack(path):
    """Delete an ack log whose segment is gone: a power cut kept the segment's
    removal but not the log's (segment names are never used twice)."""
    if not os.path.lexists(path[:-len(_ACK_SUFFIX)]):
        try:
            os.unlink(path)
        except OSError:
            pass


def _count_events(bodies):
    """Events in spool line bodies; unreadable ones count none."""
    count = 0
    for body in bodies:
        try:
            count += len(_decode_body(body))
        except ValueError:
            pass
    return count


def _join_arrays(lines):
    """One JSON array body from several JSON array lines, without parsing them."""
    inner = [line.strip()[1:-1].strip() for line in lines]
    return b"[" + b",".join(part for part in inner if part) + b"]"


def _read_json_file(path):
    """The JSON object in ``path`` (not followed if a symlink), or {} if none or unreadable."""
    try:
        fd = _open_private(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as handle:
            data = _json_load(handle.read())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid):
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, TypeError, ValueError):
        return isinstance(pid, int) and pid > 0
    return True


def _merge_state(old, new, pid, running):
    """What ``state.json`` says after a process writes ``new`` over ``old``: it never forgets.

    The last success is the latest either knows of; an error or drop stays until a
    later one replaces it; ``pids`` lists the processes of the key still running.
    """
    merged = dict(old)
    merged.update(new)
    successes = [t for t in (old.get("last_success"), new.get("last_success"))
                 if isinstance(t, (int, float))]
    merged["last_success"] = max(successes) if successes else None
    for name in ("last_error", "dropped"):
        if not new.get(name) and old.get(name):
            merged[name] = old[name]
    pids = [p for p in old.get("pids", []) if isinstance(p, int) and p != pid and _alive(p)]
    merged["pids"] = sorted(pids + [pid]) if running else pids
    return merged


class _StatusFiles(object):
    """The files beside a key's spool that ``status`` reads: ``state.json`` (what the
    key's processes last told) and the question ``status.ask`` with each running
    process's answer ``live-<pid>.json``. Reached as ``_Spool.status``.
    """

    def __init__(self, folder):
        self.folder = folder

    def read(self, name=_STATE_FILE):
        return _read_json_file(os.path.join(self.folder, name))

    def save(self, state, name=_STATE_FILE):
        """Replace ``state.json`` (what ``status`` shows) under a private name, atomically."""
        _private_dir(self.folder)
        _replace_file(os.path.join(self.folder, name), _json_bytes(state))

    def ask_running(self, wait=_STATUS_WAIT, clock=_monotonic, sleep=time.sleep):
        """Ask the key's running processes what they hold in memory.

        Returns ({pid: events} of those that answered within ``wait`` seconds, the
        pids still running). A process holding nothing may sleep through the
        question: it counts as holding nothing, which it does.
        """
        state = self.read()
        running = [p for p in state.get("pids", []) if isinstance(p, int) and _alive(p)]
        answers = {}
        if not running:
            return answers, running
        try:
            fd = _open_private(os.path.join(self.folder, _ASK_FILE),
                               os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                _write_all(fd, b"?\n")        # the write stamps the question's mtime
                asked = os.fstat(fd).st_mtime
            finally:
                os.close(fd)
        except OSError:
            return answers, running
        give_up = clock() + wait
        while True:
            for pid in running:
                live = self.read(_LIVE_FILE % pid)
                if live.get("asked") == asked and isinstance(live.get("events"), int):
                    answers[pid] = live["events"]
            if len(answers) == len(running) or clock() >= give_up:
                return answers, running
            sleep(0.05)

    def asked(self):
        """When ``status`` last asked (the mtime of its question), or None."""
        try:
            st = os.lstat(os.path.join(self.folder, _ASK_FILE))
        except OSError:
            return None
        return st.st_mtime if stat.S_ISREG(st.st_mode) else None

    def answer(self, asked, held, wall):
        """Tell ``status`` that this process holds ``held`` events in memory."""
        self.save({"pid": os.getpid(), "asked": asked, "events": held,
                         "updated": wall}, _LIVE_FILE % os.getpid())

    def forget_answer(self):
        try:
            os.unlink(os.path.join(self.folder, _LIVE_FILE % os.getpid()))
        except OSError:
            pass


class _DeadLetters(object):
    """A key's ``deadletter.jsonl``: what the server refused (or a spool line that
    could not be read), one JSON record a line, appended and never rewritten.
    Reached as ``_Spool.dead_letters``.
    """

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, "deadletter.jsonl")

    def add(self, bucket_key, body, status, reply):
        """Append a rejected event (or unreadable line) to ``deadletter.jsonl``."""
        _private_dir(self.folder)
        record = _json_bytes({"time": _time(), "bucketKey": bucket_key, "status": status,
                              "reply": reply, "body": body.decode("utf-8", "replace")})
        fd = _open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            _write_all(fd, record + b"\n")
        finally:
            os.close(fd)

    def read(self):
        """(count, newest record or None) of the dead-letter file."""
        count, newest = 0, None
        try:
            fd = _open_private(self.path, os.O_RDONLY)
        except OSError:
            return 0, None
        with os.fdopen(fd, "rb") as handle:
            for line in handle:
                count += 1
                newest = line
        try:
            newest = _json_load(newest) if newest else None
        except ValueError:
            newest = None
        return count, newest


# A segment file by its path, wherever it lies: the lock that makes it one
# process's, what it still holds, and its deletion with its .ack. They need
# no layout, only the rule that a segment is sent only by whoever locks it.

def _lock_segment(path, flags=os.O_RDWR):
    """An fd of the segment at ``path``, locked and still linked there, or None."""
    try:
        fd = _open_private(path, flags)
    except OSError:
        return None
    try:
        if _lock_file(fd) and os.fstat(fd).st_nlink > 0 and \
                os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _pending(path):
    """Bodies of a segment's lines not yet delivered, torn ones left out ([] if unreadable)."""
    try:
        fd = _open_private(path, os.O_RDONLY)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    return [body for _, _, body, torn in _unretired_lines(path, data) if not torn]


def _discard(paths):
    """Delete files, a segment with its .ack unless a process holds it; how many were held."""
    kept = 0
    for path in paths:
        try:
            fd = _open_private(path, os.O_RDWR)
        except OSError:
            continue
        try:
            if path.endswith(_SPOOL_SUFFIX) and not _lock_file(fd):
                kept += 1                   # a running process holds it
                continue
            for name in (path, path + _ACK_SUFFIX):
                try:
                    os.unlink(name)
                except OSError:
                    pass
        finally:
            os.close(fd)
    return kept


class _Spool(object):
    """One access key's spool on disk: its layout and rules, known here alone.

    The runner reaches it through its _SpoolReader and _SpoolWriter (the
    lines it holds in flight); the command line's status, replay and discard
    use it directly. Under ``<spool_dir>/<fingerprint of the key>/``::

        <fingerprint of the bucket key>/bucket.json  {"bucketKey": .., "bucketName": ..}
        <fingerprint of the bucket key>/<us>-<pid>-<hex>.jsonl  a segment: one JSON
            array of events a line, appended by the one process that locks it
        <segment>.ack          "<start> <end>" of each line delivered or dead-lettered
        .<segment>.new         a segment being made: locked, then renamed into place
        deadletter.jsonl       what the server refused, one JSON record a line (_DeadLetters)
        state.json             what ``status`` shows (status.ask, live-<pid>.json: its
                               question to running processes and their answers)
        rate-<fingerprint of the API base>.json   the key's shared rate budget

    A segment is flocked by the process that writes or replays it, and only a
    segment still linked once locked is sent (_lock_segment); its name is never
    used twice.
    """

    def __init__(self, spool_dir, fingerprint, durable=False):
        self.spool_dir = spool_dir
        self.fingerprint = fingerprint
        self.folder = os.path.join(spool_dir, fingerprint)
        self.durable = durable
        self.status = _StatusFiles(self.folder)
        self.dead_letters = _DeadLetters(self.folder)

    @classmethod
    def of_key(cls, spool_dir, access_key, durable=False):
        return cls(spool_dir, _fingerprint(access_key), durable)

    @classmethod
    def every_key(cls, spool_dir):
        """A _Spool for each key folder in ``spool_dir``, by fingerprint."""
        names = os.listdir(spool_dir) if os.path.isdir(spool_dir) else []
        return [cls(spool_dir, name) for name in sorted(names)
                if os.path.isdir(os.path.join(spool_dir, name))]

    # buckets and segments

    def bucket_folder(self, bucket_key):
        return os.path.join(self.folder, _fingerprint(bucket_key))

    def bucket_folders(self):
        names = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
        return [p for p in (os.path.join(self.folder, n) for n in names) if os.path.isdir(p)]

    @staticmethod
    def read_bucket(folder):
        """(bucket key, name) from a bucket folder's ``bucket.json``; ValueError if unreadable."""
        fd = _open_private(os.path.join(folder, "bucket.json"), os.O_RDONLY)
        with os.fdopen(fd, "rb") as handle:
            meta = _json_load(handle.read())
        try:
            key, name = meta["bucketKey"], meta.get("bucketName", "")
        except (KeyError, TypeError, AttributeError):
            raise ValueError("bucket.json has no bucketKey") from None
        if not isinstance(key, str) or not key or not isinstance(name, str):
            raise ValueError("bucket.json has no bucketKey")
        return key, name

    @staticmethod
    def write_bucket(folder, bucket):
        _replace_file(os.path.join(folder, "bucket.json"),
                      _json_bytes({"bucketKey": bucket[0], "bucketName": bucket[1]}))

    def segments(self, folder=None, sweep=False):
        """Paths of the segments of one bucket folder, or of all, oldest first.

        ``sweep``: delete the .ack logs whose segment is gone on the way.
        """
        found = []
        try:
            buckets = [folder] if folder else [os.path.join(self.folder, n)
                                               for n in os.listdir(self.folder)]
        except OSError:
            return found
        for bucket in buckets:
            try:
                names = os.listdir(bucket)
            except OSError:
                continue
            found.extend(os.path.join(bucket, n) for n in names
                         if n.endswith(_SPOOL_SUFFIX) and not n.startswith("."))
            for name in names if sweep else ():
                if name.endswith(_SPOOL_SUFFIX + _ACK_SUFFIX):
                    _sweep_ack(os.path.join(bucket, name))
        found.sort(key=os.path.basename)
        return found

    def new_segment(self, bucket):
        """Create and lock a new segment of ``bucket``; (path, fd). Raises OSError."""
        folder = self.bucket_folder(bucket[0])
        _private_dir(folder)
        try:
            self.read_bucket(folder)
        except (OSError, ValueError):
            self.write_bucket(folder, bucket)       # missing, or emptied by a power cut
        name = "%017d-%d-%s%s" % (int(_time() * 1e6), os.getpid(), os.urandom(4).hex(),
                                  _SPOOL_SUFFIX)
        hidden = os.path.join(folder, "." + name + ".new")
        fd = _open_private(hidden, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)
        try:
            _lock_file(fd)
            path = os.path.join(folder, name)
            os.rename(hidden, path)
        except BaseException:
            os.close(fd)
            raise
        _fsync_dir(folder)              # the segment's name is as durable as its lines
        return path, fd

    def remove(self, path):
        _remove_segment(path, self.durable)

    def summary(self):
        """What waits, per bucket with anything pending: a list of dicts (no network)."""
        rows = []
        for folder in self.bucket_folders():
            try:
                bucket_key, bucket_name = self.read_bucket(folder)
            except (OSError, ValueError, KeyError):
                bucket_key, bucket_name = "?", ""
            lines = events = 0
            oldest = None
            paths = self.segments(folder)
            for path in paths:
                try:
                    made = int(os.path.basename(path).split("-")[0]) / 1e6
                    oldest = made if oldest is None else min(oldest, made)
                except ValueError:
                    pass
                bodies = _pending(path)
                lines += len(bodies)
                events += _count_events(bodies)
            if lines:
                rows.append({"key": self.fingerprint, "bucket_key": bucket_key,
                             "bucket_name": bucket_name, "segments": len(paths),
                             "lines": lines, "events": events, "oldest": oldest,
                             "folder": folder})
        return rows


class _Ref(object):
    """One line of a spool segment: where it is and how many events it holds.

    ``seq`` is the first event's sequence number when this Streamer logged
    them (None for lines of earlier runs); ``journal`` marks durable-mode
    lines written before their first attempt.
    """

    __slots__ = ("segment", "start", "end", "count", "seq", "journal")

    def __init__(self, segment, start, end, count, seq=None, journal=False):
        self.segment = segment
        self.start = start
        self.end = end
        self.count = count
        self.seq = seq
        self.journal = journal


class _Segment(object):
    """A segment file this process holds open and locked, and its unsent lines.

    ``lines`` are refs not handed out, oldest first; ``out`` counts refs
    handed out in a batch and not yet acked or given back; ``writing`` is
    True while the spool writer still appends to it.
    """

    __slots__ = ("path", "fd", "bucket", "size", "lines", "out", "writing", "ack_ready",
                 "ack_fd")

    def __init__(self, path, fd, bucket, size=0, writing=False):
        self.path = path
        self.fd = fd
        self.bucket = bucket            # (key, name)
        self.size = size
        self.lines = collections.deque()
        self.out = 0
        self.writing = writing
        self.ack_ready = False          # its .ack has a durable name and no torn tail
        self.ack_fd = -1                # its .ack, open for appending once acked to

    def finished(self):
        """Nothing left to send, nothing out, nobody writing: the file may go."""
        return not (self.lines or self.out or self.writing)

    def pack(self, limit, most):
        """Hand out the oldest lines, up to ``limit`` bytes in a JSON array and ``most``
        events (a longer line, written by an older version, comes alone)."""
        refs, size, count = [], 2, 0
        while self.lines and (not refs or size + self.lines[0].end - self.lines[0].start
                              <= limit and count + self.lines[0].count <= most):
            ref = self.lines.popleft()
            refs.append(ref)
            size += ref.end - ref.start
            count += ref.count
        self.out += len(refs)
        return refs

    def close(self):
        """Close the file (its lock goes with it) and its .ack; its lines stay on disk."""
        for fd in (self.ack_fd, self.fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.ack_fd = -1


class _SpoolWriter(object):
    """Appends lines to this process's own segments, one open segment a bucket.

    A new segment is created under a hidden name, locked, then renamed into
    place (_Spool.new_segment), so no other process ever sees it unlocked. Its lines become the
    reader's at once (``reader.hold``): a writer's lines are replayable
    without closing the segment. Used by the worker thread only.
    """

    def __init__(self, spool, reader, max_bytes):
        self.spool = spool
        self.reader = reader
        self.max_bytes = max_bytes
        self.open = {}                  # bucket key -> the _Segment being written
        self.unsynced = False
        self.bytes_written = 0
        self._size = 0
        self._size_due = 0.0

    def size(self, now):
        """Bytes in all segments of this access key (re-read every few seconds)."""
        if now >= self._size_due:
            total = 0
            for path in self.spool.segments():
                try:
                    total += os.path.getsize(path)
                except OSError:
                    pass
            self._size, self._size_due = total, now + 5.0
        return self._size

    def measure_again(self):
        """Re-read the spool's size at the next append (something was deleted)."""
        self._size_due = 0.0

    def append(self, bucket, parts, seq=None, journal=False):
        """Write one line of encoded events; return its _Ref. Raises OSError."""
        line = b"[" + b",".join(parts) + b"]\n"
        if self.max_bytes and self.size(_monotonic()) + len(line) > self.max_bytes:
            raise _SpoolFull("spool_max_bytes (%d) reached" % self.max_bytes)
        segment = self._segment_for(bucket)
        try:
            _write_all(segment.fd, line)
        except OSError:
            try:
                os.ftruncate(segment.fd, segment.size)      # never leave a torn line
            except OSError:
                pass
            raise
        ref = _Ref(segment, segment.size, segment.size + len(line), len(parts), seq, journal)
        segment.size += len(line)
        segment.lines.append(ref)
        self._size += len(line)
        self.bytes_written += len(line)
        self.unsynced = True
        return ref

    def _segment_for(self, bucket):
        segment = self.open.get(bucket[0])
        if segment is not None and (segment.fd < 0 or segment.size >= _SEGMENT_BYTES
                                    or os.fstat(segment.fd).st_nlink == 0):
            self._finish(segment)       # full, or removed under us: begin another
            segment = None
        if segment is None:
            segment = self._create(bucket)
            self.open[bucket[0]] = segment
        return segment

    def _create(self, bucket):
        self.reader.know(bucket)
        path, fd = self.spool.new_segment(bucket)
        segment = _Segment(path, fd, bucket, 0, writing=True)
        self.reader.hold(segment)
        return segment

    def _finish(self, segment):
        """Stop appending to a segment; the reader deletes it once delivered."""
        if self.open.get(segment.bucket[0]) is segment:
            del self.open[segment.bucket[0]]
        segment.writing = False
        if segment.fd >= 0:
            try:
                os.fsync(segment.fd)
            except OSError:
                pass
        self.reader.settle(segment)

    def sync(self):
        """fsync every open segment (durable mode's schedule calls this)."""
        self.unsynced = False
        for segment in list(self.open.values()):
            if segment.fd < 0:
                continue
            try:
                os.fsync(segment.fd)
            except OSError as exc:
                _log.warning("fsync of spool segment failed: %s", exc)

    def close(self):
        for segment in list(self.open.values()):
            self._finish(segment)
        self.unsynced = False


def _read_locked(fd):
    """All of the file behind a locked ``fd``, read through a copy of it: closing
    the copy must not close ``fd``, nor let go of its lock."""
    with os.fdopen(os.dup(fd), "rb") as handle:
        return handle.read()


class _Claims(object):
    """The segments on disk that no process holds: left by an earlier run or a
    process of the key that ended (with ``only``, just those files: replay).

    Looking is paced, once a second, and at once after the reader lets a
    segment go. Claiming locks a segment, then checks it is still linked, so
    a segment deleted meanwhile is never sent again; its lines are read into
    a _Segment, and a line that cannot be read is set aside in ``unreadable``
    for the dead-letter file. A segment that cannot be read at all is left in
    place and warned of once. Used by its _SpoolReader, in the worker thread.
    """

    def __init__(self, spool, only=None):
        self.spool = spool
        self.only = only            # replay just these segment files (command line)
        self.scan_due = 0.0
        self.probe_due = 0.0
        self.probed = False
        self.warned = set()
        self.unreadable = []        # (bucket, body, why) of lines never to be sent
        self.known = {}             # bucket folder name -> (key, name) this process uses

    def know(self, bucket):
        """A bucket this process logs to: its folder's bucket.json can be repaired."""
        self.known[_fingerprint(bucket[0])] = bucket

    def on_disk(self):
        """Paths of this key's segments, oldest first."""
        if self.only is not None:
            return [p for p in self.only if os.path.exists(p)]
        return self.spool.segments(sweep=True)

    def look_again(self):
        self.scan_due = self.probe_due = 0.0

    def claimable(self, now, held):
        """Whether a segment on disk, not in ``held`` (paths), could be claimed now
        (read-only, cached 1 s)."""
        if now >= self.probe_due:
            self.probe_due = now + 1.0
            self.probed = any(path not in held and path not in self.warned
                              and _probe_lock(path) for path in self.on_disk())
        return self.probed

    def scan(self, now):
        """Whether it is time to look for a segment to claim (then not for a second)."""
        if now < self.scan_due:
            return False
        self.scan_due = now + 1.0
        return True

    def claim(self, path):
        """Lock the segment at ``path`` and read its lines: (the _Segment, refs of its
        unreadable lines), or None if a process holds it or it cannot be read."""
        fd = _lock_segment(path)
        if fd is None:
            return None
        try:
            bucket = self._bucket_of(os.path.dirname(path))
            data = _read_locked(fd)
        except (OSError, ValueError, KeyError) as exc:
            os.close(fd)
            if path not in self.warned:
                self.warned.add(path)
                _log.warning("spool segment %s cannot be read (%s); it is left in place",
                             path, exc)
            return None
        segment = _Segment(path, fd, bucket, len(data))
        bad = []
        for start, end, body, torn in _unretired_lines(path, data):
            try:
                if torn:
                    raise ValueError("torn line (no newline at end of segment)")
                count = len(_decode_body(body))
            except ValueError as exc:
                bad.append(_Ref(segment, start, end, 0))
                self.unreadable.append((bucket, body, str(exc)))
                continue
            segment.lines.append(_Ref(segment, start, end, count))
        if bad:
            _log.warning("spool segment %s: %d unreadable line(s) moved to the dead-letter "
                         "file", path, len(bad))
        return segment, bad

    def _bucket_of(self, folder):
        """The bucket of a folder on disk; an unreadable bucket.json is rewritten if known."""
        try:
            return self.spool.read_bucket(folder)
        except (OSError, ValueError) as exc:
            bucket = self.known.get(os.path.basename(folder))
            if bucket is None:
                raise
            _log.warning("%s was unreadable (%s); rewritten for bucket %r", os.path.join(
                folder, "bucket.json"), exc, bucket[0])
            self.spool.write_bucket(folder, bucket)
            return bucket

    def evict(self, path):
        """Delete the segment at ``path`` unless a process holds it: its undelivered
        events, or None if it is held."""
        fd = _lock_segment(path)
        if fd is None:
            return None
        try:
            data = _read_locked(fd)
            dropped = _count_events(b for _, _, b, _ in _unretired_lines(path, data))
            self.spool.remove(path)
            return dropped
        finally:
            os.close(fd)


# What a power cut may leave, and why it is safe (durable mode): a file's bytes
# survive only through its own fsync, a name only through its folder's. So
# bucket.json is fsynced before its rename, every new folder and segment name is
# fsynced in its parent, an .ack's name is fsynced when it is created and its
# records as they are written, and a finished segment goes first (its removal
# fsynced), then its .ack: no order of the disk's writes brings a segment back
# without the record of what was delivered from it. A record after a torn .ack
# tail starts on a line of its own; an empty bucket.json is rewritten by a
# Streamer that knows the bucket (_Claims._bucket_of).

def _append_ack(segment, record, durable):
    """Append to the segment's ack log; the first time, make it sound and durable.

    The log stays open while the segment is held (an open and a close an ack
    were a twentieth of the CPU of replaying a spool); after a failed write it
    is opened again and its tail checked again.
    """
    path = segment.path + _ACK_SUFFIX
    created = False
    if segment.ack_fd < 0:
        segment.ack_ready = False
        try:
            segment.ack_fd = _open_private(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            segment.ack_fd = _open_private(path, os.O_RDWR | os.O_APPEND | os.O_CREAT
                                           | os.O_EXCL)
            created = True
    fd = segment.ack_fd
    try:
        if not segment.ack_ready and _torn_tail(fd):
            record = b"\n" + record
        _write_all(fd, record)
        if durable:
            os.fsync(fd)
            if created or not segment.ack_ready:
                _fsync_dir(os.path.dirname(path))
    except OSError:
        segment.ack_fd = -1             # opened again, its tail looked at, next time
        os.close(fd)
        raise
    segment.ack_ready = True


class _SpoolReader(object):
    """Hands out spooled lines as packed batches and records their delivery.

    Holds, oldest first, the segments this process has locked: its own (from
    the writer) and at most one claimed from disk through its _Claims. Lines
    delivered are recorded in ``<segment>.ack`` (_append_ack); a segment with
    nothing left is deleted. Used by the worker thread only.
    """

    def __init__(self, spool, only=None):
        self.spool = spool
        self.folder = spool.folder
        self.disk = _Claims(spool, only)
        self.held = []              # _Segment objects, oldest first
        self.ack_bytes = 0          # ack records written, for flash wear (journal_bytes)

    def know(self, bucket):
        self.disk.know(bucket)

    def hold(self, segment):
        self.held.append(segment)

    def waiting(self, own=False):
        """Events in held lines not handed out (read-only); ``own``: this run's only."""
        return sum(ref.count for segment in self.held for ref in segment.lines
                   if not own or ref.seq is not None)

    def any_waiting(self):
        """Whether a held line has an event not handed out: waiting() > 0, without the sum."""
        return any(ref.count for segment in self.held for ref in segment.lines)

    def oldest_seq(self):
        """The lowest sequence number of this Streamer's undelivered lines, or None."""
        found = None
        for segment in self.held:
            for ref in segment.lines:
                if ref.seq is not None:
                    found = ref.seq if found is None else min(found, ref.seq)
                    break
        return found

    def take(self, limit, most=_NEVER):
        """The oldest held lines of one segment as a batch (_Segment.pack), or None."""
        for segment in self.held:
            if not segment.lines:
                continue
            refs = segment.pack(limit, most)
            try:
                lines = [_read_at(segment.fd, r.start, r.end - r.start) for r in refs]
            except OSError as exc:
                self.give_back(refs)
                _log.warning("cannot read spool segment %s: %s", segment.path, exc)
                return None
            return _Batch(segment.bucket, None, None, refs, _join_arrays(lines), lines=lines)
        return None

    def give_back(self, refs):
        """Refs not delivered this time: first in line again."""
        for ref in reversed(refs):
            ref.segment.out -= 1
            ref.segment.lines.appendleft(ref)

    def ack(self, refs):
        """Record refs as delivered (or dead-lettered); delete finished segments."""
        by_segment = collections.OrderedDict()
        for ref in refs:
            by_segment.setdefault(id(ref.segment), (ref.segment, []))[1].append(ref)
        for segment, done in by_segment.values():
            segment.out -= len(done)
            record = b"".join(("%d %d\n" % (r.start, r.end)).encode("ascii") for r in done)
            if not segment.finished():          # else it goes whole
                try:
                    _append_ack(segment, record, self.spool.durable)
                    self.ack_bytes += len(record)
                except OSError as exc:
                    _log.warning("cannot record delivery in %s%s (%s); those lines may "
                                 "be sent again", segment.path, _ACK_SUFFIX, exc)
            self.settle(segment)

    def settle(self, segment):
        """Delete a segment with nothing left to send and nobody writing it."""
        if not segment.finished():
            return
        self.spool.remove(segment.path)
        self._let_go(segment)

    def _let_go(self, segment):
        if segment in self.held:
            self.held.remove(segment)
        segment.close()
        self.disk.look_again()          # look at the disk again at once

    def claimable(self, now):
        """Whether a segment on disk could be claimed now (read-only, cached 1 s)."""
        return self.disk.claimable(now, set(s.path for s in self.held))

    def claim(self, now):
        """Lock the oldest unheld segment on disk and hold its lines; True if one was
        (one with nothing left is deleted, and the next one tried)."""
        if any(not s.writing for s in self.held) or not self.disk.scan(now):
            return False                # one claimed segment at a time
        held = set(s.path for s in self.held)
        for path in self.disk.on_disk():
            claimed = None if path in held else self.disk.claim(path)
            if claimed is None:
                continue
            segment, bad = claimed
            self.held.append(segment)
            if bad:
                segment.out += len(bad)
                self.ack(bad)
            else:
                self.settle(segment)
            if segment in self.held:
                return True
        return False

    def evict_oldest(self):
        """Delete the oldest segment not in flight; return its undelivered events or None."""
        held = dict((s.path, s) for s in self.held)
        for path in self.disk.on_disk():
            segment = held.get(path)
            if segment is None:
                dropped = self.disk.evict(path)
                if dropped is not None:
                    return dropped
            elif not segment.out:
                dropped = sum(ref.count for ref in segment.lines)
                segment.lines.clear()
                segment.writing = False
                self.settle(segment)
                return dropped
        return None

    def release_all(self):
        """Let go of every held segment (at close) so another process may take it."""
        for segment in list(self.held):
            segment.writing = False
            if segment.lines or segment.out:
                self._let_go(segment)       # undelivered lines stay on disk
            else:
                self.settle(segment)

    def forget_after_fork(self):
        """In a forked child: drop the parent's segments without unlocking them."""
        for segment in self.held:
            segment.close()             # no LOCK_UN: the parent's lock stays
        self.held = []


# --- Delivery core -----------------------------------------------------------
#
# Rule 1: every decision about an undelivered event lives here: when memory's
# events go, in what batches (never more than buffer_size events, nor 1 MB), in
# what order (live before backlog), by when a call must end, what a failed call
# means for the next attempt, what is set aside on disk, dropped or
# dead-lettered, which flush()/close() waiters are answered and how, when
# close() stops. The shell (the worker section below) carries out what the core
# asks and reports what happened; it decides nothing of its own there.
#
# Rule 2: nothing here does I/O, reads a clock, takes a lock, logs or starts a
# thread; the time is an argument (monotonic seconds, and Unix seconds where the
# server's dates are read). PurityTest steps the core with `time`, `threading`,
# `socket` and `os` made to raise. _decide, _RateBudget and _MonthTally (above)
# follow the same rules.
#
# Theory of operation, as h11 drives HTTP/1.1: the runner gives the core the
# inbox (core.take: events, bucket switches, flush()/close() waits) and the
# time, then asks core.next_action() again and again, carrying out each answer,
# until it answers _Sleep(seconds). The answers are plain values: _Post a
# request (the outcome comes back through core.outcome; core.defer if the rate
# budget, which the shell keeps with its shared file, has no call yet), _Read
# the next spooled batch (core.offer), _Write a batch as a spool line
# (core.written), _Ack or _GiveBack spool lines, _DeadLetter, _Answer a waiter,
# _Report to on_error, _Log, _Abandon the call out, _Sync the spool (durable
# mode), _Halted (let go of files and sockets). One _Backlog holds every
# undelivered event: in memory (_Memory, which numbers them), in batches formed
# from memory (live) or read from the spool (backlog: ours, or an earlier
# run's), and the spool's lines not handed out yet, which the shell describes
# each turn as a _Disk (whether any wait, the oldest of ours). Counts, the
# oldest event, which batch goes next and what a waiter is told are derived from
# it; the _Book counts what became of the events, and the losses. _Core is
# made of parts over its one state, each a class of two screens at most: how it
# takes the inbox and runs a turn (_Core), which call goes next (_Dispatching),
# what a call's answer means (_Outcomes), what goes to disk and back
# (_Spilling), the waiters, close() and the halt (_Closing).
# Inside next_action, in this order: a call past its deadline is abandoned;
# close()'s deadline halts; durable mode journals memory (and _Syncs what was
# written half a sync_interval later, whatever the network does); past
# max_queue the oldest excess is set aside; then, one call a turn at most: is a
# retry or the window waited for (_after_failure; the budget is the shell's),
# is memory due (_memory_due), live events before a backlog batch
# (_Backlog.next_batch), else a spooled batch; by when must the call end
# (_call_deadline)? Then the waiters (_answerable), close() with nothing left,
# and the earliest thing due (_next_wake).

_Retry = collections.namedtuple("_Retry", "retry_at failures waiting attempts set_aside")


def _memory_due(now, oldest, count, runs, closing, asked_upto, buffer_size, flush_interval):
    """Whether memory's oldest events go now rather than wait for more.

    ``oldest``: (sequence number, time it reached memory) or None; ``runs``:
    how many buckets' runs memory holds; ``asked_upto``: the highest sequence
    number a flush() or close() waits for (-1: none).
    """
    if oldest is None:
        return False
    seq, since = oldest
    return (count >= buffer_size or runs > 1 or closing or asked_upto >= seq
            or now - since >= flush_interval)


def _call_deadline(now, size, timeout, limits=()):
    """When a call of ``size`` bytes started at ``now`` is given up on.

    ``timeout`` bounds each silence (the transport's job); the whole call may
    take longer the bigger its body, as on the slowest link assumed. Never past
    a limit in ``limits`` (None: no limit), but always a moment to try.
    """
    end = now + timeout + size / float(_SLOWEST_LINK)
    for limit in limits:
        if limit is not None:
            end = min(end, max(now + 0.05, limit))
    return end


def _after_failure(now, decision, failures, attempts, max_retries):
    """What a call that did not go through means: a _Retry.

    ``attempts``: the batch's failed attempts so far (None for a bucket
    creation). A 429 (_WAIT) or a pause does not count against the batch;
    anything else does, and after ``max_retries`` the batch is set aside.
    """
    retry_at = now + decision.delay
    if decision.action == _WAIT:
        return _Retry(retry_at, failures + 1, "rate limited (429)", attempts, None)
    if decision.action == _PAUSE:
        return _Retry(retry_at, failures, "paused: %s" % decision.reason, attempts,
                      "delivery paused (%s)" % decision.reason)
    aside = None
    if attempts is not None:
        attempts += 1
        if attempts >= max_retries:
            aside = "%d attempts failed" % attempts
    return _Retry(retry_at, failures + 1, "backing off after %s" % decision.reason,
                  attempts, aside)


def _answerable(waits, oldest_seq, backlog):
    """(flush() waiters answered True now, the others), in order.

    A waiter is answered once nothing up to its sequence number is pending
    (``oldest_seq``: the oldest pending, or None) and no backlog remains;
    close() waiters (close_at set) are answered by the halt instead.
    """
    done, keep = [], []
    for wait in waits:
        if (oldest_seq is None or oldest_seq > wait.upto) and not backlog \
                and wait.close_at is None:
            done.append(wait)
        else:
            keep.append(wait)
    return done, keep


def _close_plan(close_at, close_idle, asked_at, asked_idle):
    """(close_at, close_idle) once another close() asks to end by ``asked_at``.

    ``idle`` (None: a hard deadline) is how far each call that goes through
    pushes the end; the earliest end wins, and a hard deadline wins over idle.
    """
    if close_at is None:
        return asked_at, asked_idle
    return min(close_at, asked_at), (None if asked_idle is None else close_idle)


def _next_wake(dues):
    """Seconds until the earliest of ``dues`` (None entries: nothing due), or None."""
    dues = [d for d in dues if d is not None]
    return max(0.0, min(dues)) if dues else None


class _BucketSwitch(object):
    """Inbox marker: events after it belong to another bucket."""

    __slots__ = ("bucket",)

    def __init__(self, key, name):
        self.bucket = (key, name)


class _Wait(object):
    """Inbox marker of flush() and close(): ``done`` is set once it is settled.

    ``lost`` is the core's count of lost events that an earlier answer
    already told of (the core sets it when it takes the wait); ``ok``
    becomes True only if everything logged before the call was delivered
    and nothing was lost since an answer last said so. ``close_at``
    (monotonic) asks the core to stop by then; with ``idle``, by ``idle``
    seconds after the last call that went through, if that is later.
    """

    __slots__ = ("done", "lost", "ok", "upto", "close_at", "idle")

    def __init__(self, lost, close_at=None, idle=None):
        self.done = threading.Event()
        self.lost = lost
        self.ok = False
        self.upto = None
        self.close_at = close_at
        self.idle = idle


class _Line(object):
    """A spool line sent in slices (longer than buffer_size, or halved after 413 or 400):
    ``left`` of them undelivered.

    The line is retired when ``left`` reaches 0; until then it is out, so a
    crash sends all of it again (at least once, never lost).
    """

    __slots__ = ("left",)

    def __init__(self, left):
        self.left = left


class _Batch(object):
    """The events of one bucket for one request, and how often it was tried.

    Live (from memory): ``events`` (key, value, epoch) and their encoded
    ``parts``, ``seq`` the first event's sequence number. Backlog (from disk):
    ``refs`` to spool lines, each ``lines`` as read, and their joined ``body``;
    a slice of one line has its ``parts`` and the ``line`` it belongs to; the
    lines are ours (their refs carry our sequence numbers) or an ``earlier``
    run's. A ``fixed`` batch (a half after 413 or 400) never grows.
    """

    __slots__ = ("bucket", "events", "parts", "refs", "_body", "seq", "attempts", "fixed",
                 "size", "line", "lines")

    def __init__(self, bucket, events, parts, refs=None, body=None, seq=None, line=None,
                 lines=None):
        self.bucket = bucket
        self.events = events
        self.parts = parts
        self.refs = refs
        self._body = body
        self.seq = seq
        self.attempts = 0
        self.fixed = False
        self.size = 2 + sum(len(p) + 1 for p in parts) if parts else 2
        self.line = line
        self.lines = lines              # from disk: each ref's line, as read

    @property
    def live(self):
        """From memory: this run's events, on no spool line."""
        return self.refs is None

    @property
    def earlier(self):
        """Spool lines of an earlier run (no sequence number of ours)."""
        return self.refs is not None and self.refs[0].seq is None

    @property
    def count(self):
        if self.parts is not None:
            return len(self.parts)
        return sum(ref.count for ref in self.refs)

    @property
    def body(self):
        if self._body is None:
            self._body = b"[" + b",".join(self.parts) + b"]"
        return self._body

    def add(self, event, part):
        self.extend((event,), (part,), len(part) + 1)

    def tuples(self):
        """Its events as (key, value, epoch), for on_error ([] if its lines are not JSON)."""
        if self.live:
            return list(self.events)
        try:
            return _decode_body(self.body)
        except ValueError:
            return []

    def extend(self, events, parts, size):
        """Append ``events`` and their ``parts``, ``size`` bytes with the commas."""
        self.events.extend(events)
        self.parts.extend(parts)
        self.size += size
        self._body = None


def _encode_event(event):
    """One event's JSON bytes; ValueError/TypeError/OverflowError if impossible.

    The values log() lets through (str key; str, bool, int or finite float
    value; int or finite float epoch) are formatted here, as the encoder
    would (same quoting function, same number repr): a third of the CPU of
    the generic encoder per event. Anything else goes to _encode_json.
    """
    key, value, epoch = event
    kind, when = type(value), type(epoch)
    if type(key) is str and (when is float and epoch - epoch == 0.0 or when is int):
        if kind is str:
            text = _quote_json(value)
        elif kind is float and value - value == 0.0 or kind is int:
            text = repr(value)
        elif kind is bool:
            text = "true" if value else "false"
        else:
            text = None
        if text is not None:
            return ('{"key":%s,"value":%s,"epoch":%r}' % (_quote_json(key), text, epoch)
                    ).encode("ascii")
    return _encode_json({"key": key, "value": value, "epoch": epoch}).encode("utf-8")


def _quote_json(text):
    """``text`` as a JSON string in ASCII (json's own C function); replaces itself on first use."""
    global _quote_json
    from json.encoder import encode_basestring_ascii as _quote_json
    return _quote_json(text)


class _Run(object):
    """Consecutive events of one bucket in the core's memory."""

    __slots__ = ("bucket", "events", "seq", "since")

    def __init__(self, bucket, seq, since):
        self.bucket = bucket
        self.events = collections.deque()
        self.seq = seq                  # sequence number of events[0]
        self.since = since              # when its oldest event reached memory


class _Memory(object):
    """Events taken from the inbox and not yet in a batch or on disk, in order.

    Every event gets a sequence number: how many events this core took
    before it. Owned by the core.
    """

    def __init__(self, bucket):
        self.runs = collections.deque()
        self.count = 0
        self.next_seq = 0
        self.bucket = bucket

    def extend(self, events, now):
        """Take ``events`` (a list, oldest first) for the current bucket."""
        runs = self.runs
        if not runs or runs[-1].bucket != self.bucket:
            runs.append(_Run(self.bucket, self.next_seq, now))
        runs[-1].events.extend(events)
        self.count += len(events)
        self.next_seq += len(events)

    def oldest(self):
        """(seq, since) of the oldest event, or None."""
        for run in self.runs:
            if run.events:
                return run.seq, run.since
        return None

    def fill(self, batch, limit=_MAX_BODY_BYTES, most=_NEVER):
        """Move events of batch's bucket from the head run into it, up to ``limit`` bytes
        and ``most`` events.

        Returns the events that cannot be encoded as [(event, exception, bucket key)].
        """
        import itertools
        rejected, whole = [], True
        room = most - len(batch.parts)
        while self.runs:
            run = self.runs[0]
            if run.bucket != batch.bucket:
                break
            events = run.events
            while events:
                if room <= 0:
                    return rejected             # full: the next event is not encoded yet
                if whole:
                    # The usual case: the next `room` events all encode and fit; taken at once.
                    chunk = list(itertools.islice(events, room))
                    try:
                        parts = [_encode_event(event) for event in chunk]
                        size = sum(map(len, parts)) + len(parts)
                    except (ValueError, TypeError, OverflowError):
                        size = _NEVER
                    if batch.size + size <= limit:
                        batch.extend(chunk, parts, size)
                        for _ in chunk:
                            events.popleft()
                        room -= len(chunk)
                        run.seq += len(chunk)
                        self.count -= len(chunk)
                        continue
                    whole = False               # event by event from here
                try:
                    part = _encode_event(events[0])
                except (ValueError, TypeError, OverflowError) as exc:
                    rejected.append((events.popleft(), exc, run.bucket[0]))
                    run.seq += 1
                    self.count -= 1
                    continue
                if batch.parts and batch.size + len(part) + 1 > limit:
                    return rejected
                batch.add(events.popleft(), part)
                room -= 1
                run.seq += 1
                self.count -= 1
            self.runs.popleft()
        return rejected

    def take(self, limit=_MAX_BODY_BYTES, most=_NEVER):
        """A new batch of the oldest run's events; (batch or None, rejected)."""
        while self.runs and not self.runs[0].events:
            self.runs.popleft()
        if not self.runs:
            return None, []
        run = self.runs[0]
        batch = _Batch(run.bucket, [], [], seq=run.seq)
        rejected = self.fill(batch, limit, most)
        return (batch if batch.parts else None), rejected


class _Job(object):
    """One request the core wants made: path, body, bucket and overall deadline."""

    __slots__ = ("path", "body", "bucket", "batch", "deadline", "waiting")

    def __init__(self, path, body, bucket, batch, deadline, waiting=None):
        self.path = path
        self.body = body
        self.bucket = bucket
        self.batch = batch              # None when creating a bucket
        self.deadline = deadline
        self.waiting = waiting          # creating a bucket: the batch that waits for it


# What the core asks the shell to do: plain values, carried out in the order given.
_Post = collections.namedtuple("_Post", "job")     # start it; then core.outcome()
_Read = collections.namedtuple("_Read", "most claim")   # core.offer() the next spooled batch
_Write = collections.namedtuple("_Write", "batch why journal drop")    # core.written()
_Ack = collections.namedtuple("_Ack", "refs")              # these lines are delivered
_GiveBack = collections.namedtuple("_GiveBack", "refs")    # first in line on disk again
_DeadLetter = collections.namedtuple("_DeadLetter", "bucket_key body status reply")
_Answer = collections.namedtuple("_Answer", "wait ok")     # settle a flush()/close()
_Report = collections.namedtuple("_Report", "error events")    # for on_error
_Log = collections.namedtuple("_Log", "level message")
_Abandon = collections.namedtuple("_Abandon", "job")       # break the call out
_Sync = collections.namedtuple("_Sync", "")                # fsync the segments written to
_Halted = collections.namedtuple("_Halted", "why")     # halted: let go of files and sockets
_Sleep = collections.namedtuple("_Sleep", "due")   # seconds until something is due, or None
# What the shell knows of the spool's lines not handed out: whether any waits (or
# a segment left by another run could be claimed), the oldest sequence number of ours.
_Disk = collections.namedtuple("_Disk", "waiting oldest_seq")
_NO_DISK = _Disk(False, None)
_INFO, _WARNING, _ERROR = 20, 30, 40                # logging's levels
_RUNNING, _CLOSING, _STOPPED = "running", "closing", "stopped"


def _chunks(body, most, limit):
    """A spool line's events re-encoded in runs of ``most`` events and ``limit`` bytes at
    most; None if the line is not a JSON array of events."""
    try:
        parts = [_encode_event(e) for e in _decode_body(body)]
    except (ValueError, TypeError, OverflowError):
        return None
    chunks, size = [[]], 2
    for part in parts:
        if chunks[-1] and (len(chunks[-1]) >= most or size + len(part) + 1 > limit):
            chunks.append([])
            size = 2
        chunks[-1].append(part)
        size += len(part) + 1
    return chunks


class _Batches(object):
    """The batches formed and not yet delivered, head first: from memory (events and
    their encoded parts) or from the spool (refs to its lines).

    The one place a batch is held, halved or sliced; nothing here reads or writes
    a file (a spool line is halved by slicing it, as a long one is). Owned by
    the core.
    """

    def __init__(self):
        self.queue = collections.deque()

    def hold(self, batch, first=False):
        """A batch waits at the tail, or ``first`` at the head (None: nothing to hold)."""
        if batch is not None:
            if first:
                self.queue.appendleft(batch)
            else:
                self.queue.append(batch)

    def remove(self, batch):
        """A batch is done with (delivered, dead-lettered or set aside); False if not held."""
        if batch not in self.queue:
            return False
        self.queue.remove(batch)
        return True

    def take_back(self, batch):
        """A disk batch goes back to the spool: its refs, or None if it is not held. A
        slice takes its whole line with it (the line is resent whole)."""
        if batch not in self.queue:
            return None
        for other in [b for b in self.queue if b is batch
                      or batch.line is not None and b.line is batch.line]:
            self.queue.remove(other)
        return batch.refs

    def split(self, batch):
        """413 or 400: put both halves where the batch was (halves never grow).

        False if it cannot be halved (one event, or a line that is not JSON):
        the caller dead-letters it.
        """
        halves = self._halves(batch)
        if halves is None:
            return False
        index = self.queue.index(batch)
        del self.queue[index]
        for part in reversed(halves):
            part.fixed = True
            self.queue.insert(index, part)
        return True

    def slice(self, batch, most, limit=_MAX_BODY_BYTES):
        """Put slices of at most ``most`` events (and ``limit`` bytes) where a spool line
        was; a line that cannot be parsed stays whole (400 then bisects it)."""
        chunks = _chunks(batch.body, most, limit)
        if chunks is None:
            return
        index = self.queue.index(batch)
        del self.queue[index]
        line = _Line(len(chunks))
        for chunk in reversed(chunks):
            part = _Batch(batch.bucket, None, chunk, batch.refs, line=line)
            part.fixed = True
            self.queue.insert(index, part)

    def finished(self, batch):
        """A disk batch is done with: whether its lines may be retired now."""
        if batch.line is None:
            return True
        batch.line.left -= 1
        return batch.line.left == 0

    def _halves(self, batch):
        if batch.count < 2:
            return None
        if batch.live:
            half = len(batch.parts) // 2
            return [_Batch(batch.bucket, batch.events[lo:hi], batch.parts[lo:hi],
                           seq=None if batch.seq is None else batch.seq + lo)
                    for lo, hi in ((0, half), (half, len(batch.parts)))]
        if batch.line is not None:          # a slice: halves of the slice
            batch.line.left += 1
            half = len(batch.parts) // 2
            return [_Batch(batch.bucket, None, parts, batch.refs, line=batch.line)
                    for parts in (batch.parts[:half], batch.parts[half:])]
        if len(batch.refs) > 1:
            half = len(batch.refs) // 2
            return [_Batch(batch.bucket, None, None, batch.refs[lo:hi],
                           _join_arrays(batch.lines[lo:hi]), lines=batch.lines[lo:hi])
                    for lo, hi in ((0, half), (half, len(batch.refs)))]
        # One line: two slices of it, retired once both are done with.
        chunks = _chunks(batch.body, _NEVER, _NEVER)
        if chunks is None or len(chunks[0]) < 2:
            return None
        parts, line = chunks[0], _Line(2)
        return [_Batch(batch.bucket, None, chunk, batch.refs, line=line)
                for chunk in (parts[:len(parts) // 2], parts[len(parts) // 2:])]

    def oldest_seq(self):
        """Sequence number of the oldest event of this run held here, or None."""
        found = [b.seq for b in self.queue if b.seq is not None]
        found += [r.seq for b in self.queue if b.refs for r in b.refs if r.seq is not None]
        return min(found) if found else None

    def others_in_flight(self):
        """Whether a batch of an earlier run's lines is held."""
        return any(b.earlier for b in self.queue)

    def in_memory(self):
        """Events of the memory batches (counted from them: a batch may grow)."""
        return sum(b.count for b in self.queue if b.live)

    def on_disk(self):
        """Events of the spooled lines held here (a line sliced counts once a slice)."""
        return sum(b.count for b in self.queue if not b.live)


class _Book(object):
    """What became of the events the core took: the counts, the losses and what an
    answer told of them, the month's deliveries.

    Pure, like the core that owns it: the dead letters and warnings it decides
    go to the core's ``todo``, in order with the core's own actions. ``stats``
    (ints and a dict of ints), ``lost`` (dropped plus dead-lettered, ever),
    ``told`` (of those, what a flush()/close() answer told of) and
    ``month_view`` are read by other threads.
    """

    def __init__(self, settings, spool, todo, wall, stats=None, months=None):
        self.settings = settings
        self.spool = spool
        self.todo = todo
        self.nowhere = "offline_file_unwritable" if settings.offline else "no_spool"
        self.now = 0.0
        self.lost = self.told = 0
        self.last_warning = -1e9
        self.stats = stats if stats is not None else {
            "logged": 0, "delivered": 0, "retried": 0, "spooled": 0, "replayed": 0,
            "dead_lettered": 0, "dropped": {}, "requests": 0, "rate_limited": 0,
            "buckets_created": 0, "last_error": None, "last_success": None,
            "paused": "", "journalled": 0, "journal_errors": 0,
        }
        self.month = _MonthTally(months)
        month = _month_of(wall)
        self.month_view = (month, self.month.months.get(month, 0),
                           self.month.months.get(month, 0))    # (month, delivered, projected)
        self.enterprise = False             # X-RateLimit-Limit says the plan has no cap
        self.quota_warned = False

    def learn(self, headers):
        """An answer's X-RateLimit-Limit tells whether the plan has a monthly cap."""
        if not self.enterprise:
            try:
                self.enterprise = int(headers.get("x-ratelimit-limit", 0)) >= _ENTERPRISE_LIMIT
            except (TypeError, ValueError):
                pass

    def delivered(self, count, wall):
        """Count delivered events in their month; warn once if the month would pass the quota."""
        self.month.add(count, wall)
        projected = self.month.projected(wall)
        month = self.month.month_of(wall)
        self.month_view = (month, self.month.months[month], projected)
        quota = self.settings.monthly_quota
        if quota and projected > quota and not self.enterprise and not self.quota_warned:
            self.quota_warned = True
            self.log(_WARNING, (
                "isstreamer_lite: at the rate of the last hour, access key %s would deliver "
                "about %s events this month (%s so far, from this device), more than the "
                "monthly quota of %s (monthly_quota; the Student and Individual plans' cap, "
                "past which the server refuses events with 402 until the next billing "
                "month). Log less often, or set monthly_quota=0 on a plan without a cap.") % (
                    _mask(self.settings.access_key), "{:,}".format(projected),
                    "{:,}".format(self.month_view[1]), "{:,}".format(quota)))

    def answer(self, wait, delivered):
        """Settle a waiter: True only if all was delivered and nothing lost since the last
        answer told of it."""
        self.todo.append(_Answer(wait, delivered and self.lost == wait.lost))
        self.told = self.lost

    def unencodable(self, rejected):
        """Events the JSON encoder refused: dead letters, each with its reason."""
        for event, exc, bucket_key in rejected:
            why = "cannot be encoded as JSON: %s" % exc
            self.log(_WARNING, "event %r of bucket %r %s; it was moved to the dead-letter file"
                     % (event[0], bucket_key, why))
            self.dead_letter(bucket_key, _json_bytes({"key": event[0], "epoch": event[2],
                                                      "value": repr(event[1])[:200]}),
                             None, why)

    def dead_letter(self, bucket_key, body, status, reply, count=1):
        """Count events the server refuses (or that cannot be sent) and keep them."""
        self.stats["dead_lettered"] += count
        self.lost += count
        if self.spool:
            self.todo.append(_DeadLetter(bucket_key, body, status, reply))

    def drop(self, count, reason, exc):
        dropped = self.stats["dropped"]
        dropped[reason] = dropped.get(reason, 0) + count
        self.lost += count
        self.stats["last_error"] = "%s: %s" % (reason, exc)
        self.warn("dropped %s (%s: %s); dropped so far: %s" % (_count(count, "event"), reason,
                                                               exc, dropped))

    def warn(self, message):
        """A warning, at most once every _DROP_WARN_EVERY seconds."""
        if self.now - self.last_warning >= _DROP_WARN_EVERY:
            self.last_warning = self.now
            self.log(_WARNING, message)

    def log(self, level, message):
        self.todo.append(_Log(level, message))


class _Backlog(object):
    """Every undelivered event the core holds, and the one place that answers for them.

    Owns ``memory`` (a _Memory: events not in a batch yet; it hands out the
    sequence numbers) and ``batches`` (a _Batches: live batches of memory's
    events, backlog batches of spool lines, ours or an earlier run's), and
    keeps ``disk``, the latest _Disk the shell gave of the spool's lines not
    handed out. Counts, the oldest event, what goes next and what is set
    aside are derived from these, never kept beside them. Events the encoder
    refuses go to the ``book`` as dead letters. Owned by the core.
    """

    def __init__(self, bucket, book):
        self.memory = _Memory(bucket)
        self.batches = _Batches()
        self.disk = _NO_DISK
        self.book = book

    @property
    def count(self):
        """Events held in memory, in a live batch or not."""
        return self.memory.count + self.batches.in_memory()

    def on_disk(self):
        """Events of the spool lines held in batches (the shell counts the others)."""
        return self.batches.on_disk()

    def oldest_seq(self):
        """The sequence number of the oldest event of this run held, or None."""
        found = [s for s in (self.batches.oldest_seq(), self.disk.oldest_seq) if s is not None]
        oldest = self.memory.oldest()
        if oldest is not None:
            found.append(oldest[0])
        return min(found) if found else None

    def pending(self):
        """Whether anything is held: in memory, in a batch, or on disk."""
        return bool(self.memory.count or self.batches.queue or self.disk.waiting)

    def empty(self):
        """Nothing held, and no event of this run left anywhere."""
        return not self.pending() and self.oldest_seq() is None

    def spooled(self):
        """Whether spool lines wait, or an earlier run's batch is held."""
        return bool(self.batches.others_in_flight() or self.disk.waiting)

    def take_live(self, most):
        """A live batch of memory's oldest run, up to ``most`` events, not held; or None."""
        batch, rejected = self.memory.take(most=most)
        self.book.unencodable(rejected)
        return batch

    def next_batch(self, most, live_due):
        """The held batch that goes next, left at the head; None if none is held.

        A live head that fell behind grows up to ``most`` events; a backlog
        head (it waited for the window, or a retry) lets live events go first
        when they are due (``live_due``).
        """
        queue = self.batches.queue
        if not queue:
            return None
        head = queue[0]
        if head.live and not head.fixed:
            self.book.unencodable(self.memory.fill(head, most=most))
        elif not head.live and live_due:
            self.batches.hold(self.take_live(most), first=True)
        return queue[0]

    def excess(self, limit, most, out=None):
        """Past ``limit`` events in memory: the oldest live batch to set aside (not
        ``out``, the one in a call), held; at most ``most`` events. None if within."""
        if self.memory.count + most * len(self.batches.queue) <= limit:
            return None                 # within: no batch holds more than ``most``
        over = self.count - limit
        if over <= 0:
            return None
        batch = next((b for b in self.batches.queue if b.live and b is not out), None)
        if batch is None:
            batch = self.take_live(min(over, most))
            self.batches.hold(batch)
        return batch

    def leftover(self, most):
        """At a halt: the next batch to set aside (those held first, then memory's in
        batches of ``most``), held; None once nothing is left."""
        queue = self.batches.queue
        while not queue and self.memory.count:
            self.batches.hold(self.take_live(most))
        return queue[0] if queue else None


class _Dispatching(object):
    """Which call goes next, and when. A part of _Core: the fields named are the core's.

    Not before ``retry_at``; memory's events when due (_memory_due), live
    before a backlog batch (the backlog decides), else a spooled batch; a
    bucket in ``to_create`` first. Starts the call out (``out``, ``started``)
    and publishes why nothing goes yet (``waiting``).
    """

    def _ready(self, now):
        """Whether memory's oldest events should go now rather than wait for more."""
        memory = self.memory
        return _memory_due(now, memory.oldest(), memory.count, len(memory.runs),
                           self.state is _CLOSING, max([w.upto for w in self.waits] or [-1]),
                           self.settings.buffer_size, self.settings.flush_interval)

    def _next_batch(self, now):
        """The batch to send next, left at the head of the queue; an action to get one
        (a journal line to write, a spooled batch to read); or None.

        A batch never holds more than buffer_size events (nor 1 MB).
        """
        most, ready = self.settings.buffer_size, self._ready(now)
        batch = self.backlog.next_batch(most, ready and not self.journal)
        if batch is not None:
            return batch
        if ready:
            if self.journal and not self._turn[2]:
                action = self._journal_next()       # all of memory, then sent from disk
                if action is not None:
                    self._journaling = True
                    return action
            else:
                batch = self.backlog.take_live(most)
                if batch is not None:
                    self.batches.hold(batch)
                    return batch
        if not self.spool or self._turn[1]:
            return None
        # Another run's backlog is claimed only once the server answers (our bucket is
        # created) and while requests go through.
        return _Read(most, self.failures == 0 and not self.to_create)

    def _dispatch(self, now, deadline):
        """A _Post if a call is due (or an action to get its batch); else the seconds
        until one may be (None: nothing to send)."""
        if now < self.retry_at:
            return self._wait_until(self.retry_at, self.waiting[1], now)
        batch = self._next_batch(now)
        if batch is not None and type(batch) is not _Batch:
            return batch                    # an action that gets the batch
        if batch is not None and self.creates_buckets and batch.bucket[0] not in self.created:
            bucket = batch.bucket
        elif self.to_create:
            bucket = self.to_create[0]
            if bucket[0] in self.created:
                self.to_create.pop(0)
                return 0.0
        else:
            bucket = None
        if batch is None and bucket is None:
            oldest = self.memory.oldest()
            return None if oldest is None else max(
                0.0, oldest[1] + self.settings.flush_interval - now)
        if bucket is not None:
            fields = {"bucketKey": bucket[0]}
            if bucket[1]:
                fields["bucketName"] = bucket[1]
            job = _Job("/api/buckets", _json_bytes(fields), bucket, None, 0.0, batch)
        else:
            job = _Job("/api/events", batch.body, batch.bucket, batch, 0.0)
        job.deadline = _call_deadline(now, len(job.body), self.settings.timeout,
                                      (self.close_at, deadline))
        self.book.stats["requests"] += 1
        self.out, self.started, self._turn[0] = job, now, True
        return _Post(job)

    def _wait_until(self, when, why, now):
        """Nothing is sent before ``when``: publish it; close() halts if that is too late."""
        self.waiting = (when, why)
        if self.state is _CLOSING and when >= self.close_at:
            return self.halt("close() deadline comes before %s" % (why or "the next attempt"),
                             self.backlog.disk)
        return when - now


class _Outcomes(object):
    """What one call's answer means. A part of _Core: the fields named are the core's.

    The answer (through _decide) moves the call state on: ``failures``,
    ``failing_since``, ``waiting``, ``retry_at``, ``progress``, the buckets
    ``created`` and ``to_create``; the batch is delivered (its lines acked),
    halved, dead-lettered, or retried and set aside after max_retries; the
    counts go to the ``book``, the actions to ``_todo``.
    """

    def outcome(self, job, response, error, now, wall):
        """What one call's answer (a _Response, or the error instead) means."""
        self.out = None
        s = self.settings
        if response is not None:
            self.book.learn(response.headers)
        decision = _decide(response.status if response is not None else None,
                           response.headers if response is not None else None, error,
                           self.failures, s.backoff_base, s.backoff_cap,
                           s.retry_after_cap, s.pause_interval, now=wall)
        batch = job.batch
        if batch is None:
            self._bucket_outcome(job, decision, response, error, now, wall)
        elif decision.action == _DELIVERED:
            self._delivered(batch, now, wall)
        elif decision.action in (_SPLIT, _BISECT):
            if not self.batches.split(batch):
                self._reject(batch, response, now)
        elif decision.action == _REFUSE:
            self._reject(batch, None, now, _scrub(decision.reason, s.access_key))
        else:
            self._failed(batch, decision, response, error, now, wall)
            if decision.reason == "timeout" and batch in self.batches.queue \
                    and batch.count > 1:
                self.batches.split(batch)   # too slow a link for it: retried in halves

    def _bucket_outcome(self, job, decision, response, error, now, wall):
        bucket = job.bucket
        if decision.action in (_DELIVERED, _SPLIT, _BISECT, _REFUSE):
            if decision.action != _DELIVERED:
                why = decision.reason if response is None else "%d %s" % (
                    response.status, self._reply(response))
                self.book.log(_WARNING, "creating bucket %r was refused (%s); sending its "
                              "events anyway" % (bucket[0], _scrub(why, self.settings.access_key)))
            else:
                self.book.stats["buckets_created"] += 1
                self.failures = 0
                self._progressed(now)
            self.created.add(bucket[0])
            if bucket in self.to_create:
                self.to_create.remove(bucket)
            return
        self._failed(job.waiting, decision, response, error, now, wall, bucket)

    def _delivered(self, batch, now, wall):
        stats = self.book.stats
        self._progressed(now)
        self.failures = 0
        self.failing_since = None
        self.waiting = (0.0, "")
        stats["last_success"] = wall
        stats["paused"] = ""
        self.batches.remove(batch)
        self.book.delivered(batch.count, wall)
        if batch.live:
            stats["delivered"] += batch.count
            return
        journal = sum(r.count for r in batch.refs if r.journal) if batch.line is None \
            else batch.count if batch.refs[0].journal else 0
        stats["delivered"] += journal
        stats["replayed"] += batch.count - journal
        self._retire(batch)

    def _retire(self, batch):
        """A backlog batch is done with: its lines are acked once all of them are."""
        if self.batches.finished(batch):
            self._todo.append(_Ack(batch.refs))

    def _failed(self, batch, decision, response, error, now, wall, creating=None):
        """A call did not go through: wait, back off, or pause and set the batch aside.

        ``creating``: the bucket whose creation failed (``batch`` waits for it).
        """
        bucket = creating or batch.bucket
        what = ("creating bucket %r" % bucket[0]) if creating is not None else \
            "sending %s to bucket %r" % (_count(batch.count, "event"), bucket[0])
        detail = ("%d %s" % (response.status, self._reply(response, 120))) \
            if response is not None else "%s: %s" % (type(error).__name__, error)
        detail = _scrub(detail, self.settings.access_key)
        self.book.stats["last_error"] = "%s: %s" % (what, detail)
        if self.failing_since is None:
            self.failing_since = (wall, response is not None)
        plan = _after_failure(now, decision, self.failures,
                              batch.attempts if batch is not None else None,
                              self.settings.max_retries)
        self.retry_at, self.failures = plan.retry_at, plan.failures
        self.waiting = (plan.retry_at, plan.waiting)
        if batch is not None:
            batch.attempts = plan.attempts
        if decision.action == _WAIT:        # a 429 in a row waits longer, however told
            self.book.stats["rate_limited"] += 1
            self.book.log(_INFO, "rate limited while %s; retrying in %.1f s"
                          % (what, decision.delay))
            return
        if decision.action == _PAUSE:
            self._pause(decision, detail)
            if batch is not None:
                self._then(self.set_aside(batch, plan.set_aside))
            return
        self.book.stats["retried"] += 1
        self.book.log(_INFO, "%s failed (%s); retrying in %.2f s"
                      % (what, detail, decision.delay))
        self._todo.append(_Report(DeliveryError(
            "%s failed: %s" % (what, detail), response.status if response is not None
            else None, decision.reason, bucket[0]), self._events_of(batch)))
        if plan.set_aside is not None:
            self._then(self.set_aside(batch, plan.set_aside))

    def _pause(self, decision, detail):
        if self.book.stats["paused"] != decision.reason:
            advice = _PAUSE_ADVICE.get(decision.reason, "the server answered %s; check "
                                       "api_base and the account" % detail)
            if "%s" in advice:
                advice = advice % _mask(self.settings.access_key)
            self.book.log(_ERROR, "isstreamer_lite: %s. Sending is paused; events are spooled "
                          "and retried every %.0f s." % (advice, decision.delay))
        self.book.stats["paused"] = decision.reason
        self._todo.append(_Report(DeliveryError(detail, None, decision.reason), []))

    def _reject(self, batch, response, now, why=None):
        """The server refuses this one event: dead-letter it with the reply."""
        self._progressed(now)
        self.batches.remove(batch)
        status = response.status if response is not None else None
        reply = why or (self._reply(response, 2000) if response is not None else "")
        self.book.log(_WARNING, "the server rejected an event of bucket %r (%s %s); it was "
                      "moved to the dead-letter file" % (batch.bucket[0], status, reply[:200]))
        self.book.dead_letter(batch.bucket[0], batch.body, status, reply, max(1, batch.count))
        if not batch.live:
            self._retire(batch)
        self._todo.append(_Report(DeliveryError("event rejected by the server: %s"
                                                % reply[:200], status, "rejected",
                                                batch.bucket[0]), self._events_of(batch)))

    def _events_of(self, batch):
        """The (key, value, epoch) tuples of a batch, for on_error."""
        if batch is None or self.settings.on_error is None:
            return []
        return batch.tuples()

    def _reply(self, response, limit=300):
        return _scrub(response.text(limit), self.settings.access_key)


class _Spilling(object):
    """Where undelivered events go on disk, and come back from. A part of _Core: the
    fields named are the core's.

    Durable mode journals memory (``_journaling``) and asks for an fsync
    (``sync_due``); past max_queue the backlog's oldest live excess is set
    aside; a failed batch is set aside; the shell's answers to _Read and
    _Write come in here.
    """

    def offer(self, batch, unreadable=()):
        """The shell's answer to _Read: the next spooled batch or None, and the lines it
        found unreadable as (bucket, body, why)."""
        for bucket, body, why in unreadable:
            self.book.dead_letter(bucket[0], body, None, "unreadable spool line (%s)" % why)
        if batch is None:
            self._turn[1] = True            # nothing more on disk this turn
            return
        self.batches.hold(batch)
        if batch.count > self.settings.buffer_size:
            self.batches.slice(batch, self.settings.buffer_size)

    def written(self, action, ok, error=None, evicted=()):
        """The shell's answer to _Write; ``evicted``: (events, error) of segments the full
        spool lost to make room."""
        for count, exc in evicted:
            self.book.drop(count, "spool_full", exc)
        batch, stats = action.batch, self.book.stats
        if ok:
            if self.journal and self.sync_due is None:
                self.sync_due = self.now + self.settings.sync_interval / 2.0
            if action.journal:
                stats["journalled"] += batch.count
                return
            stats["spooled"] += batch.count
            if action.why:
                self.book.log(_INFO, "spooled %s of bucket %r: %s" % (
                    _count(batch.count, "event"), batch.bucket[0], action.why))
            self.batches.remove(batch)
            return
        stats["last_error"] = "writing the spool: %s" % error
        if action.journal:
            stats["journal_errors"] += 1
            self.book.warn("cannot write the durable journal (%s); events are kept in "
                           "memory until it works again" % stats["last_error"])
            self.batches.hold(batch)        # sent from memory
            self._journaling, self._turn[2] = False, True
        elif action.drop:
            import errno
            full = isinstance(error, _SpoolFull) or getattr(error, "errno", None) == errno.ENOSPC
            self.book.drop(batch.count, "spool_full" if full else "spool_unwritable", error)

    def dropped(self, count, reason, error):
        """Events the shell lost (a dead letter it could not write: 0 events)."""
        self.book.drop(count, reason, error)

    def _journal_due(self, now):
        oldest = self.memory.oldest() if self.journal else None
        return None if oldest is None else oldest[1] + self.settings.sync_interval / 2.0 - now

    def _journal_or_spill(self, now):
        """Durable mode: memory half a sync_interval old goes to disk; past max_queue
        the oldest excess is set aside (dropped where the disk refuses)."""
        limit = self.settings.max_queue
        if self.journal and not self._turn[2] and self.memory.count and (
                self._journaling or self._journal_due(now) <= 0 or self.count > limit):
            self._journaling = True
            action = self._journal_next()
            if action is not None:
                return action
        self._journaling = False
        in_flight = self.out.batch if self.out is not None else None
        while True:
            batch = self.backlog.excess(limit, self.settings.buffer_size, in_flight)
            if batch is None:
                break
            action = self.set_aside(batch, "over max_queue (%d events)" % limit, drop=True)
            if action is not None:
                return action
        return self._todo.popleft() if self._todo else None

    def _journal_next(self):
        """The next memory batch as a journal line, or None once memory is empty."""
        while self.memory.count:
            batch = self.backlog.take_live(self.settings.buffer_size)
            if batch is not None:
                return _Write(batch, None, True, False)
        return None

    def set_aside(self, batch, why, drop=False):
        """Stop trying a batch for now: the action that puts a live batch on disk or a
        backlog one back, or None. Where the disk refuses, a live batch stays (max_queue
        then decides what is dropped), unless ``drop`` (stopping, or over max_queue)."""
        if not batch.live:
            refs = self.batches.take_back(batch)
            return None if refs is None else _GiveBack(refs)
        if drop:
            self.batches.remove(batch)
        if not self.spool:
            if drop:
                self.book.drop(batch.count, self.book.nowhere, None)
            return None
        return _Write(batch, why, False, drop)

    def _then(self, action):
        """Hand out ``action`` (None: nothing) after the ones decided before it."""
        if action is not None:
            self._todo.append(action)


class _Closing(object):
    """The flush() and close() waiters, and the halt. A part of _Core: the fields named
    are the core's.

    Keeps the ``waits`` taken from the inbox, ``state`` (running, closing,
    stopped), close()'s end (``close_at``, ``close_idle``) and the halt
    (``halting``, ``halt_why``); a waiter is answered from the backlog.
    """

    def _wait(self, wait):
        """A flush() or close() from the inbox: it waits for every event taken before it."""
        wait.upto = self.memory.next_seq - 1
        wait.lost = min(wait.lost, self.book.told)  # losses no answer told of
        self.waits.append(wait)
        if wait.close_at is not None and not self.halting and self.state is not _STOPPED:
            self.state = _CLOSING
            self.close_at, self.close_idle = _close_plan(
                self.close_at, self.close_idle, wait.close_at, wait.idle)

    def _progressed(self, now):
        """A call went through: closing without a timeout waits idle seconds more."""
        self.progress += 1
        if self.close_idle is not None and self.state is _CLOSING:
            self.close_at = max(self.close_at, now + self.close_idle)

    @property
    def needs_disk(self):
        """Whether next_action needs a _Disk: it decides (no action decided before is
        still to be handed out) while waiters wait or close() runs."""
        return not self._todo and (bool(self.waits) or self.state is not _RUNNING)

    def pending_any(self):
        """Anything held (in memory, in a batch, on disk) or a bucket to create."""
        return bool(self.to_create) or self.backlog.pending()

    def settled(self, disk):
        """Everything taken is delivered and every loss told of (flush() from on_error)."""
        self.backlog.disk = disk
        return not self.to_create and self.backlog.empty() and self.book.lost == self.book.told

    def _settle(self):
        if all(wait.close_at is not None for wait in self.waits):
            return                          # no flush() waits: the halt answers close()
        held = bool(self.to_create) or self.spool and self.backlog.spooled()
        done, self.waits = _answerable(self.waits, self.backlog.oldest_seq(), held)
        for wait in done:
            self.book.answer(wait, True)

    def halt(self, why, disk):
        """Stop: the call out is abandoned, what is undelivered set aside, the waiters
        answered (True if nothing was left when the halt began). Returns the first action."""
        if not self.halting and self.state is not _STOPPED:
            self.backlog.disk = disk
            self.halting, self.halt_why = True, why
            self._all_delivered = not self.to_create and self.backlog.empty()
            if self.out is not None:
                self._todo.append(_Abandon(self.out))
                self.out = None
        return self.next_action(self.now, None, disk)

    def _halt_step(self):
        why = self.halt_why
        while True:
            batch = self.backlog.leftover(self.settings.buffer_size)
            if batch is None:
                break
            action = self.set_aside(batch, why, drop=True)
            if action is not None:
                return action
        if self._todo:
            return self._todo.popleft()
        if not self._stop_told:
            self._stop_told = True
            return _Halted(why)
        waits, self.waits = self.waits, []
        for wait in waits:
            self.book.answer(wait, self._all_delivered)
        self.state = _STOPPED
        return self._todo.popleft() if self._todo else _Sleep(None)


class _Core(_Dispatching, _Outcomes, _Spilling, _Closing):
    """The delivery core: events and outcomes in, actions out (see the section's opening).

    Owns every event it took until it is delivered, set aside on disk,
    dead-lettered or dropped: its ``backlog`` (a _Backlog) holds them, its
    ``book`` (a _Book) keeps the counts. Here: its state (each field under the
    part that keeps it), the inbox taken, and the turn (next_action); the
    parts it is made of decide the rest. Driven by one thread at a time;
    other threads read ``state``, ``waiting``, ``progress``, ``count`` and
    the book's counts (ints, tuples and a dict of ints) and write nothing here.
    """

    def __init__(self, settings, bucket, spool, wall, stats=None, months=None):
        self.settings = settings
        self.spool = spool                  # a spool to write to and read from
        self.journal = spool and settings.durable
        self.creates_buckets = not settings.offline
        self.now, self.wall = 0.0, wall
        self._todo = collections.deque()    # actions decided, not yet handed out
        self._turn = [False, False, False]  # this turn: posted, spool dry, journal refused
        self.book = _Book(settings, spool, self._todo, wall, stats, months)
        self.backlog = _Backlog(bucket, self.book)
        # _Dispatching and _Outcomes: the call out, and what the calls so far said
        self.out = None                     # the job of the call out
        self.started = 0.0
        self.retry_at = 0.0
        self.failures = 0
        self.failing_since = None           # (wall time, answered) of the first failure in a row
        self.waiting = (0.0, "")            # nothing is sent before [0], because of [1]
        self.progress = 0                   # calls that went through
        self.created = set()
        self.to_create = [bucket] if bucket is not None and self.creates_buckets else []
        # _Spilling: durable mode's journal
        self._journaling = False
        self.sync_due = None                # durable mode: when lines written must be fsynced
        # _Closing: the waiters, close() and the halt
        self.waits = []
        self.state = _RUNNING
        self.close_at = self.close_idle = None
        self.halting = False                # a halt began (why: halt_why)
        self.halt_why = None
        self._stop_told = False
        self._all_delivered = False         # halting: all was delivered when it began

    # The backlog's, read here, by the Streamer and by tests: not a second owner.
    memory = property(lambda self: self.backlog.memory)
    batches = property(lambda self: self.backlog.batches)

    @property
    def count(self):
        """Events in memory, in a batch or not (read by other threads)."""
        return self.backlog.count

    def take(self, inbox, now, wall):
        """A new turn at ``now`` (monotonic; ``wall`` Unix): take everything in ``inbox``."""
        self.now = self.book.now = now
        self.wall = wall
        self._turn = [False, False, False]
        memory, fresh, taken = self.memory, [], 0
        while True:
            try:
                item = inbox.popleft()
            except IndexError:
                break
            if type(item) is tuple:
                fresh.append(item)
                continue
            if fresh:                       # events go to memory together, before the item
                memory.extend(fresh, now)
                taken, fresh = taken + len(fresh), []
            if type(item) is _BucketSwitch:
                memory.bucket = item.bucket
                if item.bucket[0] not in self.created and self.creates_buckets:
                    self.to_create.append(item.bucket)
                continue
            self._wait(item)
        if fresh:
            memory.extend(fresh, now)
            taken += len(fresh)
        if taken:
            self.book.stats["logged"] += taken

    def defer(self, job, until, why):
        """The shell's rate budget has no call for ``job`` before ``until``."""
        self.out = None
        self.book.stats["requests"] -= 1
        self._turn[0] = False
        self.retry_at, self.waiting = until, (until, why)

    def next_action(self, now, deadline=None, disk=_NO_DISK):
        """What the shell does next; _Sleep(seconds or None) when nothing more is due now.

        ``deadline``: a caller's (use_async=False); ``disk``: a _Disk, needed while
        waiters wait or close() runs (``needs_disk``).
        """
        self.backlog.disk = disk
        if self._todo:
            return self._todo.popleft()
        if self.state is _STOPPED:
            return _Sleep(None)
        if self.halting:
            return self._halt_step()
        out = self.out
        if out is not None and now >= out.deadline:
            self.outcome(out, None, TimeoutError("timed out: no answer within %.1f s"
                                                 % (out.deadline - self.started)), now, self.wall)
            return _Abandon(out)
        if self.state is _CLOSING and now >= self.close_at:
            return self.halt("close() deadline reached", disk)
        action = self._journal_or_spill(now)
        if action is not None:
            return action
        if self.sync_due is not None and now >= self.sync_due:
            self.sync_due = None            # on time, whatever the network does
            return _Sync()
        due = [self._journal_due(now), None if self.sync_due is None else self.sync_due - now]
        if self.out is None:
            if self._turn[0]:
                due.append(0.0)             # one call a turn: the next, at once
            else:
                step = self._dispatch(now, deadline)
                if type(step) is not float and step is not None:
                    return step
                due.append(step)
        if self.out is not None:
            due.append(self.out.deadline - now)
        self._settle()
        if self._todo:
            return self._todo.popleft()
        if self.state is _CLOSING:
            if self.out is None and not self.pending_any():
                return self.halt(None, disk)
            due.append(self.close_at - now)
        return _Sleep(_next_wake(due))

    def inbox_room(self, now):
        """How many items the inbox may hold before log() must wake the runner."""
        size, count = self.settings.buffer_size, self.memory.count
        if self.out is not None or now < self.retry_at:
            return 1 if count == 0 and self.journal else \
                max(1, self.settings.max_queue - self.count + 1)
        if count == 0:
            return 1                        # the first event starts flush_interval
        return max(1, size - count)


# --- Worker ------------------------------------------------------------------

class _Sender(object):
    """Speaks the events API over a transport; holds no state of its own."""

    def __init__(self, settings, transport):
        self.transport = transport
        self._base_headers = {"Content-Type": "application/json",
                              "Accept-Version": _ACCEPT_VERSION,
                              "User-Agent": settings.user_agent,
                              "X-IS-AccessKey": settings.access_key}
        self.debug = settings.debug_level >= 3
        self.secret = settings.access_key

    def post(self, job, quick=None, exchange=None):
        """Make one request; return (response or None, error or None).

        ``quick``: raise _Unfinished unless it is answered by then (monotonic);
        ``exchange``: finish the request that raised it.
        """
        headers = dict(self._base_headers)
        headers["X-IS-BucketKey"] = job.bucket[0]
        try:
            if exchange is not None:
                response = self.transport.finish(exchange)
            elif quick is not None:
                response = self.transport.post(job.path, job.body, headers, job.deadline, quick)
            else:
                response = self.transport.post(job.path, job.body, headers, job.deadline)
        except _Unfinished:
            raise
        except Exception as exc:
            if self.debug:
                _log.debug("POST %s (bucket %s): %s", job.path, job.bucket[0],
                           _scrub(str(exc), self.secret))
            return None, exc
        if self.debug:
            _log.debug("POST %s (bucket %s, %d bytes) -> %d %s", job.path, job.bucket[0],
                       len(job.body), response.status, _scrub(response.text(), self.secret))
        return response, None


def _start_thread(thread):
    """Start ``thread`` with SIGTERM, SIGHUP and SIGINT blocked in it, for good.

    Python runs signal handlers in the main thread only, and only a signal
    the kernel delivers to that thread interrupts its blocking calls: one
    delivered to a helper thread left a SIGTERMed script asleep in
    ``time.sleep(3600)`` (1 run in 300). A new thread inherits the mask of the
    thread that starts it, so it is blocked around ``start()`` and restored.
    """
    import signal
    mask = None
    try:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, name) for name in (
            "SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name)])
    except (AttributeError, ValueError, OSError):   # Windows: no pthread_sigmask
        pass
    try:
        thread.start()
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _try_quick(sender, job):
    """Make ``job``'s call here if it is answered within _QUICK: (outcome, None); else
    (None, the _Exchange left for _finish(), or None where the transport has no quick
    post: the CSV file, a test's fake)."""
    if not hasattr(sender.transport, "finish"):
        return None, None
    try:
        return sender.post(job, quick=_monotonic() + _QUICK), None
    except _Unfinished as unfinished:
        return None, unfinished.exchange


def _finish(sender, job, exchange):
    """Make ``job``'s call, or finish ``exchange``: what _try_quick() left of it."""
    if exchange is None:
        return sender.post(job)
    return sender.post(job, exchange=exchange)


class _Doorbell(object):
    """threading.Event's set/clear/wait/is_set on one plain lock: unlocked means set.

    A fraction of an Event's cost (a Condition, a new lock for every wait):
    the worker and the courier ring each other on every call. Any thread may
    set or clear it; a lock that was already in the asked state is left so.
    """

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()            # not set

    def set(self):
        try:
            self._lock.release()
        except RuntimeError:            # already set
            pass

    def clear(self):
        self._lock.acquire(False)

    def is_set(self):
        return not self._lock.locked()

    def wait(self, timeout):
        """Block until set or ``timeout`` seconds passed; whether it is set. Leaves it set."""
        if not self._lock.acquire(True, max(0.0, timeout)):
            return False
        self.set()
        return True


class _Courier(object):
    """Makes one request at a time on a daemon thread of its own.

    The worker hands it a job and goes on journalling, spilling and
    closing: it never waits on the network longer than _QUICK. Within that,
    ``start()`` makes the call in the worker's thread when the connection is
    open (and the thread idle), and hands the thread only a call still
    unanswered then: most answers on a LAN need no thread at all.
    ``_lock`` guards ``_job``, ``_result``, ``_stop`` and ``_posting``; the
    request itself runs outside it. ``_signal`` (a _Doorbell) tells the thread
    that something changed. ``abandon()`` breaks a request the worker stopped
    waiting for; its late answer is dropped.
    """

    def __init__(self, sender, wake, name):
        self.sender = sender
        self.wake = wake
        self.name = name
        self.busy = False               # worker's view: a job is out
        self._lock = threading.Lock()
        self._signal = _Doorbell()
        self.job = None                 # the job out, as the worker sees it
        self._job = None                # the job for the thread to take
        self._result = None
        self._stop = False
        self._posting = False           # the thread is inside sender.post()
        self._thread = None

    def start(self, job):
        with self._lock:
            self.busy, self.job = True, job
            self._result = None
            quick = not self._posting
        outcome = exchange = None
        if quick:                           # the thread is out of the transport: ours
            outcome, exchange = _try_quick(self.sender, job)
            if outcome is not None:
                with self._lock:
                    self._result = (job, outcome)
                return
        with self._lock:
            self._job = (job, exchange)
            begin = self._thread is None
            if begin:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=self.name + "-courier")
        if begin:
            try:
                _start_thread(self._thread)
            except RuntimeError:
                # At interpreter shutdown (the exit hook, 3.12 and later) no thread
                # starts: the request is made here, bounded by the transport's timeouts.
                with self._lock:
                    self._thread = self._job = None
                outcome = _finish(self.sender, job, exchange)
                with self._lock:
                    if job is self.job:
                        self._result = (job, outcome)
                return
        self._signal.set()

    def poll(self):
        """(job, (response, error)) once the request ended, else None."""
        with self._lock:
            result, self._result = self._result, None
        if result is not None:
            self.busy, self.job = False, None
        return result

    def abandon(self):
        with self._lock:
            self._job = None
            self._result = None
            self.busy, self.job = False, None
        self.sender.transport.abort()

    def stop(self):
        """Ask the thread to end; an idle one is waited for (briefly), a posting one not.

        A thread left running is harmless in a process, but a sub-interpreter
        cannot be destroyed while one of its threads is alive.
        """
        with self._lock:
            self._stop = True
            idle = not self._posting
        self._signal.set()
        if idle and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_WAIT)

    def _run(self):
        while True:
            with self._lock:
                if self._stop:
                    return
                given, self._job = self._job, None
                self._posting = given is not None
            if given is None:
                self._signal.wait(_IDLE_WAIT)
                self._signal.clear()            # the state is read again before waiting
                continue
            job, outcome = given[0], None
            try:
                outcome = _finish(self.sender, job, given[1])
            finally:
                with self._lock:
                    self._posting = False
                    if outcome is not None and job is self.job:
                        self._result = (job, outcome)
            self.wake.set()


class _InlineCourier(object):
    """use_async=False (and tests): the request is made inside ``start()``.

    With ``watchdog`` a timer breaks a request still running at its deadline:
    one not answered within _QUICK (a thread a call was most of sync mode's CPU).
    """

    def __init__(self, sender, watchdog=True):
        self.sender = sender
        self.watchdog = watchdog
        self.busy = False
        self.job = None
        self._result = None

    def start(self, job):
        self.busy, self.job = True, job
        outcome, exchange = _try_quick(self.sender, job)
        if outcome is not None:
            self._result = (job, outcome)
            return
        timer = None
        if self.watchdog:
            try:
                timer = threading.Timer(max(0.0, job.deadline - _monotonic()),
                                        self.sender.transport.abort)
                timer.daemon = True
                _start_thread(timer)
            except RuntimeError:    # no daemon threads here: socket timeouts bound it
                self.watchdog, timer = False, None
        try:
            self._result = (job, _finish(self.sender, job, exchange))
        finally:
            if timer is not None:
                timer.cancel()
                timer.join(_JOIN_WAIT)      # it ends at once; see _Courier.stop()

    def poll(self):
        result, self._result = self._result, None
        if result is not None:
            self.busy, self.job = False, None
        return result

    def abandon(self):
        self._result = None
        self.busy, self.job = False, None

    def stop(self):
        pass


class _CsvSender(object):
    """offline=True: "sends" a batch by appending ``epoch,key,value`` rows to a CSV file.

    It answers as the API would (204), or fails as the network does
    (OSError), so the worker retries a file it cannot write, then keeps the
    rows in memory up to max_queue. It is also its own transport.
    """

    connections = 0

    def __init__(self, path):
        self.path = path
        self.transport = self

    def post(self, job):
        import csv
        import io
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for key, value, epoch in job.batch.events:
            writer.writerow((repr(epoch), key, value))
        try:
            fd = _open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                _write_all(fd, buffer.getvalue().encode("utf-8", "backslashreplace"))
            finally:
                os.close(fd)
        except OSError as exc:
            return None, exc
        return _Response(204, {}, b""), None

    def abort(self):
        pass

    def close(self):
        pass


def _append_line(writer, reader, batch, journal):
    """Append ``batch`` as one spool line: (True, None, evicted) or (False, error, evicted),
    ``evicted`` the (events, error) of segments deleted to make room: a full spool loses
    its oldest segment first."""
    evicted = []
    for attempt in (1, 2, 3):
        try:
            writer.append(batch.bucket, batch.parts, batch.seq, journal)
        except OSError as exc:
            import errno
            full = isinstance(exc, _SpoolFull) or exc.errno == errno.ENOSPC
            dropped = reader.evict_oldest() if full and attempt < 3 else None
            if dropped is None:
                return False, exc, evicted
            evicted.append((dropped, exc))
            writer.measure_again()          # the eviction freed room
            continue
        return True, None, evicted
    return False, None, evicted


class _StatusBoard(object):
    """What ``status`` shows of this process, in files beside the spool: state.json
    (merged with other runs' and processes') and, when status.ask asks, live-<pid>.json.
    Used by the runner's thread only.
    """

    def __init__(self, settings, reader, book, budget, wall):
        self.settings = settings
        self.reader = reader
        self.book = book
        self.budget = budget
        self.wall = wall
        self.due = 0.0                      # when state.json may be written again
        self.saved_state = None
        self.ask_due = 0.0                  # when status.ask is looked at again
        self.asked = None                   # the status question last answered

    def tick(self, now, waiting, held):
        """Answer a status question; write state.json on the first news, then once a minute.

        ``held()``: the events this process holds in memory (counted only when asked).
        """
        if self.reader is not None:
            self.answer(now, held)
        if now >= self.due and self.save(waiting, now):
            self.due = now + _STATE_EVERY   # the first news at once, then slowly

    def save(self, waiting, now, running=True):
        """Keep what ``status`` shows beside the spool, if it changed; True if written.

        Merged into what the file says (other runs, other processes of the key).
        """
        book = self.book
        stats = book.stats
        state = {"version": 1, "key": _mask(self.settings.access_key),
                 "last_success": stats["last_success"], "last_error": stats["last_error"],
                 "paused": stats["paused"], "waiting": waiting[1] if
                 waiting[0] > now else "", "dropped": dict(stats["dropped"]),
                 "dead_lettered": stats["dead_lettered"], "delivered": stats["delivered"],
                 "replayed": stats["replayed"], "spooled": stats["spooled"],
                 "spool_dir": self.settings.spool_dir,
                 "rate_limit": self.budget.learned() if self.budget is not None else None,
                 "month": book.month_view[:2]}
        if self.reader is None or (state == self.saved_state and running) or not (
                state["last_success"] or state["last_error"] or state["dropped"]
                or state["dead_lettered"]):
            return False                    # unchanged, or nothing to tell yet
        self.saved_state = dict(state)
        del state["month"]                  # compared only: the file keeps "months"
        wall = self.wall()
        state.update(updated=wall, pid=os.getpid(), rate=book.month.rate(wall),
                     enterprise=book.enterprise)
        old = self.reader.spool.status.read()
        state["months"] = book.month.merged(old.get("months"))
        try:
            self.reader.spool.status.save(_merge_state(old, state, os.getpid(), running))
        except OSError as exc:
            _log.debug("cannot write the status file: %s", exc)
        else:
            book.month.saved(state["months"])
        return True

    def answer(self, now, held):
        """Tell a ``status`` command that asked what this process holds in memory.

        The question (the mtime of status.ask) is looked at once a second at
        most; while events are held here the worker thread wakes for it (see
        ``_Worker.run``), so the answer comes within about a second.
        """
        if now >= self.ask_due:
            self.ask_due = now + _ASK_EVERY
            asked = self.reader.spool.status.asked()
            if asked is not None and asked != self.asked:
                self.asked = asked
                try:
                    self.reader.spool.status.answer(asked, held(), self.wall())
                except OSError as exc:
                    _log.debug("cannot answer status: %s", exc)

    def forget(self):
        """Stopped: remove live-<pid>.json, if a status question made it."""
        if self.asked is not None:
            self.reader.spool.status.forget_answer()


class _DiskView(object):
    """A _Disk read from the spool reader on first use: ``waiting`` (a line waits, or
    a segment left by another run could be claimed) and ``oldest_seq``."""

    __slots__ = ("_reader", "_now", "_waiting", "_oldest")
    _UNREAD = object()

    def __init__(self, reader, now):
        self._reader, self._now = reader, now
        self._waiting = self._oldest = self._UNREAD

    @property
    def waiting(self):
        if self._waiting is self._UNREAD:
            self._waiting = self._reader.any_waiting() or self._reader.claimable(self._now)
        return self._waiting

    @property
    def oldest_seq(self):
        if self._oldest is self._UNREAD:
            self._oldest = self._reader.oldest_seq()
        return self._oldest


# The actions after which the spool's lines are as they were: a turn's _Disk still holds.
_KEEP_DISK = frozenset((_Post, _Answer, _Report, _Log, _Abandon, _Sync))


def _left_behind(worker, why):
    """The one warning of a run that ends with events undelivered: how many, why, where
    they wait and what sends them."""
    stats, key, left = worker.stats, _mask(worker.settings.access_key), worker.left
    failing_since = worker.core.failing_since
    if stats["paused"] == "key_rejected":
        cause = "the server rejected the access key %s (check access_key / " \
                "IS_ACCESS_KEY)" % key
    elif stats["paused"]:
        cause = "sending is paused (%s)" % stats["paused"]
    elif failing_since is not None:
        cause = "the server has been %s since %s (%s)" % (
            "failing" if failing_since[1] else "unreachable",
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(failing_since[0])),
            stats["last_error"])
    else:
        cause = why or "the run ended before they were sent"
    return ("isstreamer_lite: %s not delivered: %s. %s in the spool %s; the next run "
            "with access key %s sends %s (or: python3 -m isstreamer_lite replay)" % (
                _count(left, "event"), cause, "It waits" if left == 1 else "They wait",
                worker.reader.folder, key, "it" if left == 1 else "them"))


class _Actions(object):
    """How the worker carries out what its core asks (one method an action type, in
    ``carry_out``). A part of _Worker: the fields named are the worker's.

    Calls go through the rate ``budget`` to the ``courier`` and their outcome
    back to the ``core``; spool lines are written with the ``writer``, read,
    acked and given back with the ``reader``; waiters are answered, on_error
    reports kept for the loop to run; a halt (close()'s deadline, a signal)
    sets aside what is undelivered and lets go of files, threads and sockets.
    """

    def post(self, action):
        job = action.job
        wait = self.budget.reserve(self.clock()) if self.budget is not None else 0.0
        if wait > 0:
            self.core.defer(job, self.clock() + wait, "rate limit window")
            return
        if job.batch is None and self.reader is not None:
            self.reader.know(job.bucket)    # its folder's bucket.json can be repaired
        self.courier.start(job)
        result = self.courier.poll()
        if result is not None:
            self.collect(result)

    def collect(self, result):
        """A call's outcome, to the budget and the core."""
        job, (response, error) = result
        now = self.clock()
        if response is not None and self.budget is not None:
            self.budget.update(response.headers, now, self.wall())
        self.core.outcome(job, response, error, now, self.wall())

    def read(self, action):
        reader, now = self.reader, self.clock()
        batch = reader.take(_MAX_BODY_BYTES, action.most)
        if batch is None and action.claim and reader.claim(now):
            batch = reader.take(_MAX_BODY_BYTES, action.most)
        unreadable, reader.disk.unreadable = reader.disk.unreadable, []
        self.core.offer(batch, unreadable)

    def spool(self, action):
        self.core.written(action, *_append_line(self.writer, self.reader, action.batch,
                                                action.journal))

    def sync(self, action):
        self.writer.sync()

    def ack(self, action):
        self.reader.ack(action.refs)

    def give_back(self, action):
        self.reader.give_back(action.refs)

    def dead_letter(self, action):
        try:
            self.reader.spool.dead_letters.add(*action)
        except OSError as exc:
            self.core.dropped(0, "dead_letter_unwritable", exc)

    def answer(self, action):
        action.wait.ok = action.ok
        action.wait.done.set()

    def log(self, action):
        _log.log(action.level, "%s", action.message)

    def abandon(self, action):
        self.courier.abandon()

    def halt(self, why):
        """Stop now (close()'s deadline, a signal): what is undelivered goes to disk,
        claims are let go, waiters answered."""
        try:
            now = self.clock()
            self.core.take(self.inbox, now, self.wall())
            if self.core.state is not _STOPPED:
                self.step(first=self.core.halt(why, self.disk(now)))
        finally:
            core = self.core
            core.state = _STOPPED
            waits, core.waits = core.waits, []
            for wait in waits:
                wait.done.set()
            self.stopped.set()

    def let_go(self, action):
        """The core halted: warn of what is left, let go of files, threads and sockets."""
        if self.reader is not None:
            self.left = self.reader.waiting(own=True)
        if self.left:
            _log.warning("%s", _left_behind(self, action.why))
        self.status.save(self.core.waiting, self.clock(), running=False)
        self.status.forget()
        if self.writer is not None:
            self.writer.close()
        if self.reader is not None:
            self.reader.release_all()
        if self.courier is not None:
            self.courier.stop()
        self.sender.transport.close()


class _Worker(_Actions):
    """The shell around a _Core: takes the inbox, steps the core, carries out its actions
    (_Actions) with the courier, the spool and the budget, and waits until the next wake.

    One thread drives it: the Streamer's worker thread, or with
    ``use_async=False`` the caller holding the pump baton. Other threads
    only append to ``inbox``, set ``wake`` and read the published fields
    (``state``, ``stopped``, ``wake_at``, ``waiting``, ``progress``, the
    core's ``count`` and the ``book``'s counts): they never write its fields.
    ``wake_at`` is the inbox length at which a caller rings ``wake``; the
    runner sets it to _NEVER while awake.
    """

    def __init__(self, settings, sender, writer, reader, budget, bucket, clock=_monotonic,
                 wall=_time):
        self.settings = settings
        self.sender = sender
        self.writer = writer
        self.reader = reader
        self.budget = budget
        self.clock = clock
        self.wall = wall
        self.courier = None                 # set by its owner: _Courier or _InlineCourier
        self.inbox = collections.deque()
        self.wake = _Doorbell()
        self.stopped = threading.Event()
        self.wake_at = 1
        self.core = _Core(settings, bucket, writer is not None, wall(),
                          months=reader.spool.status.read().get("months") if reader else None)
        self.book = self.core.book          # the counts: read by the Streamer
        self.left = 0                       # own events left on disk when it stopped
        self.backlog = 0                    # events of spooled lines, each second
        self.backlog_due = 0.0
        self.status = _StatusBoard(settings, reader, self.book, budget, wall)
        self.reports = []                   # (exception, events) for on_error
        self.carry_out = {_Post: self.post, _Read: self.read, _Write: self.spool,
                          _Ack: self.ack, _GiveBack: self.give_back,
                          _DeadLetter: self.dead_letter, _Answer: self.answer,
                          _Report: self.reports.append, _Log: self.log,
                          _Abandon: self.abandon, _Sync: self.sync, _Halted: self.let_go}
        if bucket is not None and reader is not None:
            reader.know(bucket)

    # what others read
    state = property(lambda self: self.core.state)
    waiting = property(lambda self: self.core.waiting)
    progress = property(lambda self: self.core.progress)
    stats = property(lambda self: self.core.book.stats)

    # the loop

    def run(self):
        """The worker thread: step, call back, sleep until woken or something is due."""
        try:
            while self.core.state is not _STOPPED:
                self.wake.clear()
                self.wake_at = _NEVER           # awake: log() need not signal us
                try:
                    delay = self.step()
                except Exception:               # never die with events in memory
                    _log.exception("isstreamer_lite worker error; continuing in 1 s")
                    delay = 1.0
                if self.reports:
                    self.call_back()
                if self.core.state is _STOPPED:
                    break
                if delay == 0:
                    continue                    # the next turn is due at once
                self.wake_at = self.core.inbox_room(self.clock())
                if len(self.inbox) >= self.wake_at:
                    continue                    # filled up before wake_at was armed
                if self.reader is not None and (self.inbox or self.core.count):
                    # Holding events: look for a status question once a second.
                    delay = _ASK_EVERY if delay is None else min(delay, _ASK_EVERY)
                self.wake.wait(_IDLE_WAIT if delay is None else min(delay, _IDLE_WAIT))
        finally:
            if self.core.state is not _STOPPED:
                self.halt("the worker stopped unexpectedly")

    def pump(self, deadline, until=None):
        """use_async=False: step in the caller's thread until idle, ``until`` or deadline.

        Returns the on_error reports to run once the caller let go of the baton.
        """
        while self.core.state is not _STOPPED and self.clock() < deadline:
            if until is not None and until.is_set():
                break
            self.wake.clear()
            delay = self.step(deadline)
            if delay is None or (until is None and delay > 0):
                break
            if delay > 0:
                self.wake.wait(min(delay, max(0.0, deadline - self.clock())))
        reports, self.reports[:] = list(self.reports), []
        return reports

    def call_back(self):
        reports, self.reports[:] = list(self.reports), []
        _run_reports(self.settings.on_error, reports, self)

    def step(self, deadline=None, first=None):
        """One turn: take the inbox, collect the call, carry out what the core asks; the
        seconds until the next turn is due, or None if idle."""
        now, core = self.clock(), self.core
        core.take(self.inbox, now, self.wall())
        if core.out is not None:
            result = self.courier.poll()
            if result is not None:
                self.collect(result)
        action, disk = first, None
        while True:
            if action is None:
                if disk is None and core.needs_disk:
                    disk = self.disk(now)
                action = core.next_action(now, deadline, _NO_DISK if disk is None else disk)
            if type(action) is _Sleep:
                break
            self.carry_out[type(action)](action)
            if type(action) not in _KEEP_DISK:
                disk = None                 # the spool's lines may have changed
            action = None
        if core.state is _STOPPED:
            self.stopped.set()
            return None
        due = [action.due]
        if self.reader is not None:
            if core.state is _CLOSING and self.reader.disk.probed:
                due.append(self.reader.disk.probe_due - now)     # is that backlog still there?
            if now >= self.backlog_due:
                self.backlog = self.reader.waiting() + core.backlog.on_disk()
                self.backlog_due = now + 1.0
        self.status.tick(now, core.waiting, self.held)
        return _next_wake(due)

    def disk(self, now):
        """What the core needs to know of the spool's lines not handed out: a _Disk, or
        a _DiskView that looks when the core asks (most turns it does not)."""
        if self.reader is None:
            return _NO_DISK
        return _DiskView(self.reader, now)

    def held(self):
        """Events in the inbox and in the core's memory."""
        return len(self.inbox) + self.core.count

    def settled(self):
        """Everything logged is delivered and every loss told of (flush() from on_error)."""
        return not self.inbox and self.core.settled(self.disk(self.clock()))


# The workers whose on_error this thread is running: a callback must not re-enter
# the pump that called it (flush() from on_error answers from the state instead).
_calling_back = threading.local()


def _in_callback(worker):
    """Whether this thread is inside an on_error callback of ``worker``."""
    return worker in getattr(_calling_back, "workers", ())


def _run_reports(callback, reports, worker):
    """Call on_error for each report, outside every lock; nothing it raises escapes."""
    if callback is None or not reports:
        return
    outer = getattr(_calling_back, "workers", frozenset())
    _calling_back.workers = outer | {worker}
    try:
        for exc, events in reports:
            try:
                callback(exc, events)
            except BaseException:           # SystemExit and KeyboardInterrupt too
                _log.exception("on_error callback raised; ignored")
    finally:
        _calling_back.workers = outer


# --- Streamer ----------------------------------------------------------------

_open_streamers = set()                 # closed at exit; guarded by _hooks_lock
_hooks_lock = threading.Lock()
_hooks_installed = False
_mp_finalizer_pid = None                # the process whose multiprocessing exit flushes us
# How long an interrupted close() waits for the worker to put memory on disk.
_URGENT_WAIT = 3.0


class _ForkToken(object):
    """What multiprocessing's after-fork registry holds on to (it keeps weak refs)."""


_fork_token = _ForkToken()


def _install_process_hooks():
    """Once per process, at the first Streamer: the exit hook and the fork hook."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    import atexit
    atexit.register(_close_all_at_exit)
    if hasattr(os, "register_at_fork"):
        try:
            os.register_at_fork(after_in_child=_after_fork_in_child)
        except RuntimeError as exc:             # some sub-interpreters refuse it
            _log.debug("fork hook not installed: %s", exc)


def _flush_at_multiprocessing_exit():
    """In a multiprocessing child, close our Streamers before it calls os._exit().

    multiprocessing ends its children without atexit but runs its own
    finalizers first: register one, once per process.
    """
    global _mp_finalizer_pid
    mp = sys.modules.get("multiprocessing")
    if mp is None or _mp_finalizer_pid == os.getpid():
        return
    try:
        if type(mp.current_process()).__name__ == "_MainProcess":
            return
        import multiprocessing.util
        multiprocessing.util.Finalize(None, _close_all_at_exit, exitpriority=100)
    except Exception as exc:            # an odd multiprocessing: the exit hook remains
        _log.debug("multiprocessing exit hook not installed: %s", exc)
        return
    _mp_finalizer_pid = os.getpid()


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _ignored_by_kernel(number):
    """Whether the kernel has signal ``number`` ignored (as nohup leaves SIGHUP).

    CPython's getsignal() says SIG_IGN then; PyPy's says SIG_DFL, so the
    kernel's own mask is read where there is one (Linux).
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (number - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _exit_on_signals():
    """Make SIGTERM and SIGHUP a normal exit (so the exit hook flushes).

    Only where a handler can be installed (the main thread of the main
    interpreter), and only while the signal has its default disposition: a
    handler the application installed is never replaced.
    """
    try:
        import signal
        if threading.current_thread() is not threading.main_thread():
            return False
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is signal.SIG_DFL \
                    and not _ignored_by_kernel(number):
                signal.signal(number, _on_sigterm)
    except (ValueError, OSError, RuntimeError) as exc:
        _log.debug("signal handlers not installed (%s): SIGTERM and SIGHUP end the process "
                   "without flushing", exc)
        return False
    return True


def _close_all_at_exit():
    """Flush and close every open Streamer, together, within exit_timeout.

    A signal or Ctrl-C meanwhile stops the waiting: what is in memory goes to
    the spool at once, and the process exits as the first signal decided. So
    does a worker not stopped by the deadline (starved of CPU on a busy
    machine, or in a slow write): it is halting, and the process waits for it
    to set aside what it holds, _URGENT_WAIT at most, instead of killing it.
    """
    with _hooks_lock:
        streamers = list(_open_streamers)
    if not streamers:
        return
    deadline = _monotonic() + max(s._settings.exit_timeout for s in streamers)
    closing = []                        # those this hook closes (or waits for)
    try:
        for streamer in streamers:
            session = streamer._begin_close(deadline, again=True)
            if session is not None:
                closing.append((streamer, session))
        for streamer, session in closing:
            streamer._finish_close(session, deadline)
        late = [streamer for streamer, session in closing
                if not session.worker.stopped.is_set()]
    except BaseException:
        late = streamers
    for streamer in late:
        streamer._close_now()


def _after_fork_in_child():
    """A forked child starts its Streamers afresh: no parent events, new worker."""
    global _budgets, _budgets_lock, _hooks_lock, _mp_finalizer_pid
    _budgets = {}
    _budgets_lock = threading.Lock()
    _hooks_lock = threading.Lock()
    _mp_finalizer_pid = None
    for streamer in list(_open_streamers):
        streamer._restart_after_fork()
    mp_util = sys.modules.get("multiprocessing.util")
    if _open_streamers and mp_util is not None:
        # multiprocessing clears its finalizers after the fork, then runs these.
        mp_util.register_after_fork(_fork_token, lambda token: _flush_at_multiprocessing_exit())


def _preload(settings):
    """Import what the worker needs now, so no fork inherits a half-done import."""
    import errno        # noqa: F401
    import random       # noqa: F401
    try:
        import fcntl    # noqa: F401
    except ImportError:                 # Windows: the spool is not locked
        pass
    import socket       # noqa: F401  (first imported at exit, it turns Ctrl-C's -2 into 1)
    _log.name           # logging too: the exit hook may need to warn
    _encode_json(None)
    if settings.offline:
        import csv      # noqa: F401
        import io       # noqa: F401
        return
    import email.utils  # noqa: F401
    import http.client  # noqa: F401
    import urllib.request   # noqa: F401
    # socket.getaddrinfo() and ssl encode the host name with the IDNA codec, which
    # imports encodings.idna (stringprep, unicodedata) at the first request: a fork
    # meanwhile left the child that import's lock, held for good.
    "localhost".encode("idna")
    if settings.api_base.strip().lower().startswith("https:"):
        try:
            import ssl  # noqa: F401
        except ImportError:
            raise ConfigError("api_base %s is https:// but this Python was built without "
                              "the ssl module" % settings.api_base)


def _attributes(obj):
    """Public, non-callable attributes of an object, properties included."""
    fields = getattr(type(obj), "__dataclass_fields__", None)
    names = list(fields) if fields is not None else sorted(
        n for n in dir(obj) if not n.startswith("_"))
    found = []
    for name in names:
        try:
            value = getattr(obj, name)
        except Exception:               # a property that fails is skipped
            continue
        if not callable(value):
            found.append((name, value))
    return found


def _flatten(prefix, obj, depth=0, seen=None):
    """Yield (key, value) pairs of a dict, sequence, namedtuple or object."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, (str, bytes, int, float)):
        yield prefix, obj                   # a plain value is logged under the prefix
        return
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        items = list(zip(obj._fields, obj))
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    elif depth == 0 or hasattr(type(obj), "__dataclass_fields__"):
        items = _attributes(obj)
    else:
        yield prefix, obj
        return
    if id(obj) in seen or depth > 8:
        yield prefix, obj
        return
    seen.add(id(obj))
    for name, value in items:
        key = "%s_%s" % (prefix, name) if prefix else str(name)
        if isinstance(value, (dict, list, tuple)) or \
                hasattr(type(value), "__dataclass_fields__"):
            for pair in _flatten(key, value, depth + 1, seen):
                yield pair
        else:
            yield key, value
    seen.discard(id(obj))


def _new_worker(settings, bucket, book=None, only=None):
    """A worker with its sender, spool and rate budget (no thread yet); ``book``: the
    previous run's, whose counts go on."""
    transport = _HTTPTransport(settings.api_base, settings.timeout,
                               settings.ssl_context, settings.user_agent)
    sender = _Sender(settings, transport)
    writer = reader = budget = None
    if not settings.offline:
        spool = _Spool.of_key(settings.spool_dir, settings.access_key, settings.durable)
        reader = _SpoolReader(spool, only)
        writer = _SpoolWriter(spool, reader, settings.spool_max_bytes)
        budget = _budget_for(settings.api_base, settings.access_key, spool.folder)
    if settings.offline:
        sender = _CsvSender(settings.offline_file)
    worker = _Worker(settings, sender, writer, reader, budget, bucket)
    if book is not None:
        worker.book.stats, worker.book.lost, worker.book.told = book.stats, book.lost, book.told
    return worker


class _Session(object):
    """One run of a Streamer: a worker and what drives it, from its start to its stop.

    The worker's own thread drives it; with use_async=False (or where no
    thread may start) a caller holding ``baton`` pumps it in the caller's
    thread. A session is made, and its worker started, before the Streamer
    publishes it, and is never reused once stopped. The Streamer writes
    ``keys`` and ``close_wait`` under its lock; nothing else here changes
    after the start (but the baton, renewed in a forked child). Callers' threads append to the inbox, ring ``wake`` and
    read what the worker publishes: they never write the worker's fields.
    """

    def __init__(self, settings, bucket, book=None):
        self.settings = settings
        self.worker = worker = _new_worker(settings, bucket, book)
        self.inbox = worker.inbox
        self.keys = set()               # validated keys: log()'s fast path (see Streamer)
        self.close_wait = None          # what close() asked of this run
        self.baton = threading.Lock()   # use_async=False: whoever holds it runs the worker
        self.thread = None
        name = "isstreamer_lite[%s]" % bucket[0][:32]
        if settings.use_async:
            worker.courier = _Courier(worker.sender, worker.wake, name)
            try:
                thread = threading.Thread(target=worker.run, daemon=True, name=name)
                _start_thread(thread)
                self.thread = thread
            except RuntimeError as exc:     # an isolated sub-interpreter: no daemon threads
                _log.info("no worker thread here (%s): events are sent from the threads "
                          "that log them, as with use_async=False", exc)
        if self.thread is None:
            worker.courier = _InlineCourier(worker.sender, watchdog=not settings.offline)

    def ring(self):
        """The inbox reached the worker's threshold: wake its thread, or pump it here."""
        worker = self.worker
        if self.thread is not None:
            if not worker.wake.is_set():    # one signal per wake-up is enough
                worker.wake.set()
        elif len(worker.inbox) + worker.core.memory.count >= self.settings.buffer_size:
            # A signal handler's log() must never wait for the baton it interrupted.
            self.pump(_monotonic() + self.settings.timeout, block=False)

    def pump(self, deadline, until=None, block=True):
        """Without a thread: run the worker here until idle, ``until`` or ``deadline``
        holding the baton (if it can be had), then its on_error calls, outside it."""
        baton = self.baton
        if not (baton.acquire(True, max(0.0, deadline - _monotonic())) if block
                else baton.acquire(False)):
            return
        try:
            reports = self.worker.pump(deadline, until)
        finally:
            baton.release()
        _run_reports(self.settings.on_error, reports, self.worker)

    def halt(self, why):
        """Without a thread: stop the worker now, unless a caller is pumping it."""
        if self.baton.acquire(False):
            try:
                self.worker.halt(why)
            finally:
                self.baton.release()

    def wait_for(self, until, deadline, idle=None):
        """Wait until ``until`` is set or ``deadline``; with ``idle``, the deadline moves
        to ``idle`` seconds after each call that goes through. Returns the deadline.

        Inside the worker's on_error nothing is waited for: the worker is below us.
        """
        worker = self.worker
        if _in_callback(worker):
            return deadline
        while not until.is_set():
            now = _monotonic()
            if now >= deadline:
                break
            seen = worker.progress
            # With idle, look again each second: a call that went through moves the deadline.
            end = deadline if idle is None else min(deadline, now + 1.0)
            if self.thread is not None:
                until.wait(max(0.0, end - now))
            else:
                self.pump(deadline, until)
            if idle is not None and worker.progress != seen:
                deadline = max(deadline, _monotonic() + idle)
            elif self.thread is None:
                break                   # the pump ran to the deadline, or cannot run
        return deadline

    def settled_now(self):
        """flush() from on_error: whether everything is delivered, from the state, at once.

        The callback cannot wait for the worker that called it, nor pump it again.
        """
        if self.thread is not None:
            return self.worker.settled()
        if not self.baton.acquire(False):
            return False
        try:
            return self.worker.settled()
        finally:
            self.baton.release()

    def stop(self, deadline, idle=None):
        """close(): wait for the worker to stop, then for its thread to end; whether it did.

        Without a thread, a worker not stopped by the deadline is halted here.
        """
        worker = self.worker
        deadline = self.wait_for(worker.stopped, deadline, idle)
        if self.thread is None:
            if not worker.stopped.is_set():
                self.halt("close() deadline reached")
        elif worker.stopped.is_set() and self.thread is not threading.current_thread():
            # Its last on_error calls, then it ends: a sub-interpreter cannot
            # be destroyed while it is alive. Never past the deadline.
            self.thread.join(min(_JOIN_WAIT, max(0.0, deadline - _monotonic())))
        return worker.stopped.is_set()

    def stop_now(self):
        """A signal or Ctrl-C: memory goes to the spool at once; a few seconds at most,
        however many signals come. Whether the worker stopped."""
        worker = self.worker
        worker.wake.set()
        give_up = _monotonic() + _URGENT_WAIT
        while not worker.stopped.is_set() and _monotonic() < give_up:
            try:
                if self.thread is None:
                    self.halt("interrupted")
                    break
                worker.stopped.wait(max(0.0, give_up - _monotonic()))
            except BaseException:           # a second signal: keep spooling
                continue
        return worker.stopped.is_set()

    def forget_after_fork(self):
        """In a forked child: let go of the parent's segments and socket, unlocked."""
        worker = self.worker
        if worker.reader is not None:
            worker.reader.forget_after_fork()
        worker.sender.transport.forget()
        self.baton = threading.Lock()       # the parent's may have been held at the fork


# The Streamer's one state field: _OPEN (its session takes events), _CLOSING (the
# core's name too: close() asked the session to stop), _CLOSED (the Streamer saw
# that session stop). log(), flush() and set_bucket() reopen it from either.
_OPEN, _CLOSED = "open", "closed"


def _announce(settings, handlers):
    """debug_level 1: say where events go, once, at the start."""
    _log.info("streaming to bucket %r (%r) at %s with access key %s%s%s%s%s",
              settings.bucket_key, settings.bucket_name,
              "offline file " + settings.offline_file if settings.offline else settings.api_base,
              _mask(settings.access_key),
              "" if settings.offline else ", spool %s" % settings.spool_dir,
              "" if settings.use_async else " (synchronous)",
              " (durable)" if settings.durable else "",
              "" if handlers or not settings.handle_sigterm else
              " (no signal handlers here: SIGTERM and SIGHUP do not flush)")


def _deadline(timeout, wait_timeout):
    """(deadline, idle) of flush() or close() with ``timeout``; without one, the wait
    goes on while calls go through, and ends ``wait_timeout`` seconds after the last."""
    idle = wait_timeout if timeout is None else None
    return _monotonic() + (idle if timeout is None else timeout), idle


def _counters(worker, closed, rejected, quota):
    """stats(): what ``worker`` publishes, with the Streamer's ``closed`` and ``rejected``."""
    counters = dict(worker.stats)
    counters["dropped"] = dict(counters["dropped"])
    counters["queued"] = len(worker.inbox) + worker.core.count
    counters["backlog"] = worker.backlog
    counters["rate_limit"] = worker.budget.learned() if worker.budget is not None else None
    counters["connections"] = worker.sender.transport.connections
    counters["journal_bytes"] = worker.writer.bytes_written + worker.reader.ack_bytes \
        if worker.writer else 0
    counters["closed"] = closed
    counters["rejected"] = rejected
    counters["state"] = worker.state
    until, why = worker.waiting
    counters["waiting"] = why if until > _monotonic() else ""
    month, delivered, projected = worker.book.month_view
    counters["month"] = {"month": month, "delivered": delivered, "projected": projected,
                         "quota": None if worker.book.enterprise or not quota else quota}
    return counters


# A Streamer is built in three layers, each on the one before, because log()'s
# fast path reads the Streamer's own fields (_session, its keys and inbox) with no
# object in between: _Lifecycle (the state field, the session and the one lock),
# _Intake (log()'s slow path: checks, refusals, echo), then Streamer (every
# public method, its signature and docstring).
class _Lifecycle(object):
    """A Streamer's state field and its session, and their transitions: open ->
    closing (close() asked the worker to stop) -> closed (the Streamer saw it
    stop), and reopen after close as ISStreamer allows; flush() and close() wait
    here. The first layer of a Streamer; the exit and fork hooks call it directly.
    """

    def __init__(self, settings):
        self._settings = settings
        self._bucket = (settings.bucket_key, settings.bucket_name)
        # The one lock. It guards _state and _session (swapped together when the
        # Streamer closes or reopens), the session's keys and close_wait, and the
        # counts of events refused at log() (_rejected, _warned, _long_keys). It is
        # never held across I/O, a sleep, a wait or a user callback; re-entrant, for
        # a log() from a signal handler that interrupted its holder. _hooks_lock may
        # be taken inside it, never the other way round.
        self._lock = threading.RLock()
        self._state = _OPEN
        self._session = _Session(settings, self._bucket)

    def _opened(self):
        with _hooks_lock:
            _open_streamers.add(self)

    def _reopen(self):
        """After close(): a new session with the same settings, as ISStreamer's close()
        allows. The new worker starts outside the lock; one that lost a race to
        another reopen stops at once, having taken nothing."""
        while True:
            with self._lock:
                if self._state is _OPEN:
                    return
                old = self._session
            session = _Session(self._settings, self._bucket, old.worker.book)
            with self._lock:
                won = self._state is not _OPEN and self._session is old
                if won:
                    self._state, self._session = _OPEN, session
                    if old.worker.stopped.is_set():
                        self._adopt(old)
            if won:
                self._opened()
                return
            session.close_wait = _Wait(0, _monotonic())
            session.inbox.append(session.close_wait)
            session.stop_now()

    def _begin_close(self, deadline, again=False, idle=None):
        """open -> closing: ask the worker to stop by the deadline; the session, or None
        if already closing or closed.

        ``again`` (the exit hook): a close still under way is waited for too.
        ``idle``: the deadline moves to ``idle`` seconds after each call that
        goes through.
        """
        with self._lock:
            session = self._session
            if self._state is not _OPEN:
                if again and self._state is _CLOSING and not session.worker.stopped.is_set():
                    return session
                return None
            worker = session.worker
            # Keep a little time to spool what is left once the deadline passes.
            margin = min(0.5, max(0.0, deadline - _monotonic()) * 0.1)
            self._state = _CLOSING
            session.keys = frozenset()
            session.close_wait = _Wait(worker.book.lost, deadline - margin,
                                       None if idle is None else idle - margin)
            worker.inbox.append(session.close_wait)
        worker.wake.set()
        return session

    def _finish_close(self, session, deadline, idle=None):
        """closing -> closed once the session's worker stopped; close()'s answer."""
        if not session.stop(deadline, idle):
            return False
        self._closed(session)
        return session.close_wait.ok

    def _closed(self, session):
        """closing -> closed, unless the Streamer reopened meanwhile: the exit hook
        then still has the new session to close."""
        with self._lock:
            if self._session is not session:
                self._adopt(session)
                return
            self._state = _CLOSED
            with _hooks_lock:
                _open_streamers.discard(self)

    def _adopt(self, stopped):
        """Hand what reached a stopped session's inbox (logged as it stopped) to the
        current one; a close() asked of the stopped run is not passed on. Under _lock."""
        while stopped.inbox:
            item = stopped.inbox.popleft()
            if type(item) is not _Wait or item.close_at is None:
                self._session.inbox.append(item)

    def _close_now(self):
        """A signal or Ctrl-C interrupted a wait: spool what is in memory, at once."""
        with self._lock:
            session = self._session
            self._state = _CLOSING
            session.keys = frozenset()
            session.close_wait = _Wait(session.worker.book.lost, _monotonic())
            session.inbox.append(session.close_wait)
        if session.stop_now():
            self._closed(session)

    def _restart_after_fork(self):
        """In a forked child: no parent events; an open Streamer gets a new session."""
        self._lock = threading.RLock()
        self._session.forget_after_fork()
        if self._state is _OPEN:
            self._session = _Session(self._settings, self._bucket)

    # flush() and close(): their waits

    def _flush(self, timeout):
        """flush(): reopen if closed, then wait for what was logged so far to go."""
        deadline, idle = _deadline(timeout, self._settings.wait_timeout)
        if self._state is not _OPEN:
            self._reopen()
        session = self._session
        worker = session.worker
        if _in_callback(worker):
            return session.settled_now()
        wait = _Wait(worker.book.lost)
        session.inbox.append(wait)
        try:
            worker.wake.set()
            session.wait_for(wait.done, deadline, idle)
        except BaseException:
            self._close_now()
            raise
        return wait.done.is_set() and wait.ok

    def _close(self, timeout):
        """close(): open -> closing -> closed by the deadline; a second close() answers
        again without waiting."""
        deadline, idle = _deadline(timeout, self._settings.wait_timeout)
        session = self._begin_close(deadline, idle=idle)
        if session is None:
            wait = self._session.close_wait
            return wait is not None and wait.done.is_set() and wait.ok
        try:
            return self._finish_close(session, deadline, idle)
        except BaseException:
            self._close_now()
            raise


class _Intake(_Lifecycle):
    """log()'s slow path, for what the fast path does not take: a new key, an epoch,
    a value to convert or refuse; and the counts of refused events, each reason
    warned of at most once a minute. The second layer of a Streamer.
    """

    def __init__(self, settings):
        _Lifecycle.__init__(self, settings)
        self._strict = settings.debug_level >= 2
        self._echo = settings.debug_level >= 1
        self._rejected = {}             # these three under _lock
        self._warned = {}
        self._long_keys = set()         # keys over _API_KEY_CHARS warned of

    def _log_checked(self, key, value, epoch):
        """The slow path of log(): new keys, epochs, conversion, rejection, echo."""
        epoch = _time() if epoch is None else self._epoch(epoch)
        try:
            key = _check_key(key)
            value = _normalise_value(key, value)
        except (TypeError, ValueError) as exc:
            if self._strict:
                raise
            self._refused(exc)
            return
        if len(key) > _API_KEY_CHARS:
            self._warn_long_key(key)
        if self._state is not _OPEN:
            self._reopen()
        session = self._session
        # close() may run at any moment here and replace the cache with a frozenset:
        # read it once, and add only to a set (an old one is no longer read).
        keys = session.keys
        if not self._echo and type(key) is str and isinstance(keys, set) \
                and len(keys) < _KNOWN_KEYS:
            keys.add(key)
        session.inbox.append((key, value, epoch))
        if self._state is not _OPEN:
            self._reopen()          # closed meanwhile: the event goes to the new worker
        elif len(session.inbox) >= session.worker.wake_at:
            session.ring()
        if self._echo:
            _log.info("%s: %s %r", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)),
                      key, value)

    def _warn_long_key(self, key):
        """One warning per key over the API reference's 100 characters (for 1,000 keys)."""
        with self._lock:
            if key in self._long_keys or len(self._long_keys) >= _KNOWN_KEYS:
                return
            self._long_keys.add(key)
        _log.warning("key %r... is %d characters; the API reference allows %d (ISStreamer and "
                     "this library accept up to %d): the server may refuse or cut it",
                     key[:20], len(key), _API_KEY_CHARS, _MAX_KEY_CHARS)

    def _refused(self, exc):
        """Count an event refused at log(); warn at most once a minute per reason."""
        reason = getattr(exc, "reason", "invalid")
        now = _monotonic()
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1
            last, quiet = self._warned.get(reason, (-1e9, 0))
            if now - last < _DROP_WARN_EVERY:
                self._warned[reason] = (last, quiet + 1)
                return
            self._warned[reason] = (now, 0)
        _log.warning("event not logged: %s%s", exc, " (and %d more refused for the same "
                     "reason in the last minute)" % quiet if quiet else "")

    def _log_each(self, pairs, epoch):
        """log_object(): log every (key, value) pair; the first error is raised after
        the rest are logged."""
        first_error = None
        for key, value in pairs:
            try:
                self.log(key, value, epoch)
            except (TypeError, ValueError) as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def _epoch(self, epoch):
        """Unix seconds from ``epoch``; a bad one is now, with a warning (raised at level 2)."""
        try:
            return _normalise_epoch(epoch)
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            if self._strict:
                raise ValueError(str(exc))
            _log.warning("%s; using the current time instead", exc)
            return _time()


class Streamer(_Intake):
    """Stream events to one Initial State bucket at a time.

    Drop-in for ISStreamer 2.0.0's ``Streamer``; the options after ``*`` are
    new and keyword-only. See the README for every option and its default.
    A facade: the worker of its current ``_Session`` does the work, and
    _Lifecycle and _Intake (below it, above) its private machinery.
    """

    def __init__(self, bucket_name="", bucket_key="", access_key="", ini_file_location=None,
                 debug_level=0, buffer_size=10, offline=None, use_async=True, *,
                 api_base=None, flush_interval=1.0, timeout=10.0, wait_timeout=10.0,
                 exit_timeout=5.0, max_retries=5, backoff_base=0.5, backoff_cap=30.0,
                 retry_after_cap=120.0, pause_interval=60.0, max_queue=10000,
                 spool_dir=None, spool_max_bytes=64 * 1024 * 1024, offline_file=None,
                 on_error=None, ssl_context=None, durable=None, sync_interval=1.0,
                 handle_sigterm=True, monthly_quota=None):
        settings = _resolve_settings(
            bucket_name=bucket_name, bucket_key=bucket_key, access_key=access_key,
            ini_file_location=ini_file_location, debug_level=debug_level,
            buffer_size=buffer_size, offline=offline, use_async=use_async, api_base=api_base,
            flush_interval=flush_interval, timeout=timeout, wait_timeout=wait_timeout,
            exit_timeout=exit_timeout, max_retries=max_retries, backoff_base=backoff_base,
            backoff_cap=backoff_cap, retry_after_cap=retry_after_cap,
            pause_interval=pause_interval, max_queue=max_queue, spool_dir=spool_dir,
            spool_max_bytes=spool_max_bytes, offline_file=offline_file, on_error=on_error,
            ssl_context=ssl_context, durable=durable, sync_interval=sync_interval,
            handle_sigterm=handle_sigterm, monthly_quota=monthly_quota)
        _preload(settings)
        _Intake.__init__(self, settings)
        self._opened()
        _install_process_hooks()
        _flush_at_multiprocessing_exit()
        handlers = settings.handle_sigterm and _exit_on_signals()
        if self._echo:
            _announce(settings, handlers)

    # the caller's path

    def log(self, key, value, epoch=None):
        """Queue one event; never blocks. ``epoch``: Unix seconds or a datetime.

        ``key``: a non-empty str of at most 250 characters. ``value``: a str
        of at most 2000 characters, a bool, an int or a finite real number.
        A bad event is not queued: it is a warning, or with ``debug_level``
        2 or more a ValueError/TypeError raised here.
        """
        kind = type(value)
        session = self._session
        if epoch is None and type(key) is str and key in session.keys and (
                kind is float and value - value == 0.0 or kind is bool
                or kind is int and -_INT_LIMIT <= value <= _INT_LIMIT
                or kind is str and len(value) <= _MAX_VALUE_CHARS and _isascii(value)):
            queue = session.inbox
            queue.append((key, value, _time()))
            if len(queue) >= session.worker.wake_at:
                session.ring()
            return
        self._log_checked(key, value, epoch)

    def log_object(self, obj, key_prefix=None, epoch=None):
        """Log each field of a dict, list, tuple, namedtuple, dataclass or object.

        Keys are ``<key_prefix>_<field>`` (nested containers flatten with
        ``_``); the default prefix is the type's name (``dict``, ``list``,
        ``svmem``...), and ``key_prefix=""`` means none. All events share one
        timestamp. A value that cannot be logged is skipped with a warning
        (raised after the rest are logged, with ``debug_level`` 2 or more).
        """
        epoch = _time() if epoch is None else self._epoch(epoch)
        if key_prefix is None:
            key_prefix = type(obj).__name__
        self._log_each(_flatten(key_prefix, obj), epoch)

    def set_bucket(self, bucket_name="", bucket_key="", retries=None):
        """Send events logged from now on to another bucket (created if needed).

        Events logged before the call still go to the previous bucket.
        ``retries`` is accepted for ISStreamer compatibility; retrying follows
        ``max_retries``.
        """
        if not bucket_key:
            bucket_key = _new_bucket_key()
        _check_bucket(bucket_key, bucket_name)
        if self._state is not _OPEN:
            self._reopen()
        self._bucket = (bucket_key, bucket_name)
        session = self._session
        session.inbox.append(_BucketSwitch(bucket_key, bucket_name))
        session.ring()

    @property
    def bucket_key(self):
        """The bucket events logged now go to."""
        return self._bucket[0]

    @property
    def bucket_name(self):
        return self._bucket[1]

    BucketKey = bucket_key                  # ISStreamer's attribute names
    BucketName = bucket_name

    def flush(self, timeout=None):
        """Deliver everything logged so far (and this key's spool); True if done.

        Waits at most ``timeout`` seconds; without one, as long as calls keep
        going through, giving up after ``wait_timeout`` seconds in which none
        did. What is not delivered by then stays queued or spooled and goes
        later. After ``close()`` it reopens the Streamer, as ``log()`` does.
        """
        return self._flush(timeout)

    def close(self, timeout=None):
        """Flush, spool what cannot be delivered by the deadline, stop the worker.

        Returns True if everything was delivered. A second close() answers
        again without waiting. ``log()``, ``flush()`` or ``set_bucket()``
        afterwards reopen the Streamer, as with ISStreamer. Without a
        ``timeout`` it waits as long as calls keep going through and gives up
        after ``wait_timeout`` seconds in which none did, as ISStreamer's
        blocking close() sent everything.
        """
        return self._close(timeout)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def stats(self):
        """Counters: logged, delivered, retried, spooled, replayed, dead-lettered..."""
        worker = self._session.worker
        closed = self._state is not _OPEN
        with self._lock:
            rejected = dict(self._rejected)
        return _counters(worker, closed, rejected, self._settings.monthly_quota)

    def __repr__(self):
        return "<Streamer bucket=%r key=%s %s>" % (
            self._bucket[0], _mask(self._settings.access_key),
            "open" if self._state is _OPEN else "closed")


# --- Local sink --------------------------------------------------------------

# A sink listening on every address is reached on this machine's loopback.
_LOOPBACK_OF = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def _iso_utc(epoch):
    """Unix seconds as ISO-8601 UTC (2026-05-01T12:00:00.250Z); repr if out of range."""
    try:
        whole = int(epoch // 1)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    except (OverflowError, OSError, ValueError):
        return repr(epoch)
    return text + (".%03d" % int((epoch - whole) * 1000) if epoch != whole else "") + "Z"


def _check_event(item):
    """Why the events API would refuse one event object, or None if it is fine."""
    if not isinstance(item, dict):
        return "an event must be a JSON object, not %s" % type(item).__name__
    key, value = item.get("key"), item.get("value")
    if not isinstance(key, str) or not 0 < len(key) <= _MAX_KEY_CHARS:
        return "key must be a string of 1 to %d characters" % _MAX_KEY_CHARS
    if isinstance(value, str):
        if len(value) > _MAX_VALUE_CHARS:
            return "value of %r is over %d characters" % (key, _MAX_VALUE_CHARS)
    elif not isinstance(value, (bool, int, float)):
        return "value of %r must be a string, boolean or number" % key
    epoch = item.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, (int, float))):
        return "epoch of %r must be a number" % key
    return None


class _RateWindow(object):
    """The sink's rate limit: at most ``limit`` requests (none if it is falsy) in
    each window of ``window`` seconds, told in the X-RateLimit-* headers, and past
    it a refusal with Retry-After, as the events API does. Windows of a second
    or more start at whole multiples of ``window``. Given the time, it reads no
    clock. The sink's ``changed`` guards it.
    """

    def __init__(self, limit, window):
        self.limit = limit
        self.window = window
        self.start = 0.0
        self.used = 0

    def count(self, now):
        """Count one request at ``now`` (Unix seconds); return (allowed, headers)."""
        if not self.limit:
            return True, {}
        if now >= self.start + self.window:
            self.start = now - (now % self.window) if self.window >= 1 else now
            self.used = 0
        self.used += 1
        reset = self.start + self.window
        headers = {"X-RateLimit-Limit": self.limit,
                   "X-RateLimit-Remaining": max(0, self.limit - self.used),
                   "X-RateLimit-Reset": "%.3f" % reset}
        if self.used > self.limit:
            headers["Retry-After"] = "%.3f" % max(0.0, reset - now)
            return False, headers
        return True, headers


class _EventsAPI(object):
    """What the local sink answers, without the server: the events API's requests
    (``POST /api/buckets`` and ``POST /api/events``) with its documented status
    codes, and the record of what it accepted: ``events`` (a list of
    ``(bucket_key, event)``), ``buckets``, the counts, ``jsonl`` and ``echo``.
    Subclasses may override ``fault(handler, path)`` to answer a request their
    own way (tests do). _Sink serves it over HTTP.
    """

    def __init__(self, rate_limit=None, window=10.0, access_key=None, jsonl=None, echo=None):
        self.rate = _RateWindow(rate_limit, window)
        self.access_key = access_key
        self.jsonl = jsonl
        self.echo = echo
        self.events = []
        self.buckets = {}
        self.requests = 0
        self.connections = 0
        self.rate_limited = 0
        self.changed = threading.Condition()   # guards the counters and lists above, and rate

    def wait_for(self, count, timeout=10.0):
        """Wait until ``count`` events arrived; True if they did."""
        deadline = _monotonic() + timeout
        with self.changed:
            while len(self.events) < count:
                left = deadline - _monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True

    def fault(self, handler, path):
        """Answer the request yourself and return True (tests override it).

        The request body is already read, as ``handler.body``.
        """
        return False

    @staticmethod
    def reply(handler, status, body=b"", headers=None):
        if isinstance(body, dict):
            body = _json_bytes(body)
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, str(value))
        if body:
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if body:
            handler.wfile.write(body)

    def handle(self, handler):
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?")[0]
        handler.body = body
        with self.changed:
            self.requests += 1
        if self.fault(handler, path):
            return
        key = handler.headers.get("X-IS-AccessKey")
        if not key or (self.access_key is not None and key != self.access_key):
            return self.reply(handler, 401, {"message": "invalid access key"})
        if length > _MAX_BODY_BYTES:
            return self.reply(handler, 413, {"message": "request body over 1 MB"})
        try:
            data = _json_load(body)
        except (UnicodeDecodeError, ValueError):
            return self.reply(handler, 400, {"message": "body is not valid JSON"})
        if path.endswith("/api/buckets"):
            return self._create_bucket(handler, data)
        if path.endswith("/api/events"):
            return self._add_events(handler, data)
        return self.reply(handler, 404, {"message": "no such resource %s" % path})

    def _create_bucket(self, handler, data):
        bucket_key = data.get("bucketKey") if isinstance(data, dict) else None
        if not isinstance(bucket_key, str) or not 0 < len(bucket_key) <= _MAX_BUCKET_CHARS \
                or set(bucket_key) & set(_BUCKET_KEY_FORBIDDEN):
            return self.reply(handler, 400, {"message": "invalid bucketKey"})
        name = data.get("bucketName", "")
        with self.changed:
            existed = bucket_key in self.buckets
            self.buckets[bucket_key] = name
        # Printed before the answer, so lines come in the order of the requests;
        # print_line never fails the request.
        self.print_line("bucket %s exists" % bucket_key if existed else "bucket %s created%s"
                        % (bucket_key, " (%s)" % name if name else ""))
        self.reply(handler, 204 if existed else 201)

    def _add_events(self, handler, data):
        bucket_key = handler.headers.get("X-IS-BucketKey")
        with self.changed:
            allowed, headers = self.rate.count(_time())
            if not allowed:
                self.rate_limited += 1
        if not allowed:
            return self.reply(handler, 429, {"message": "rate limit exceeded"}, headers)
        if not bucket_key:
            return self.reply(handler, 400, {"message": "missing X-IS-BucketKey"}, headers)
        items = data if isinstance(data, list) else [data]
        for item in items:
            problem = _check_event(item)
            if problem:
                return self.reply(handler, 400, {"message": problem}, headers)
        with self.changed:
            self.events.extend((bucket_key, item) for item in items)
            self.changed.notify_all()
        if self.jsonl is not None:
            lines = b"".join(_json_bytes(dict(item, bucketKey=bucket_key)) + b"\n"
                             for item in items)
            with open(self.jsonl, "ab") as handle:
                handle.write(lines)
        for item in items:                  # printed first, as bucket lines are
            when = item.get("epoch")
            when = item.get("iso8601") if when is None else _iso_utc(when)
            self.print_line("%s %s = %r%s" % (bucket_key, item["key"], item["value"],
                                              "" if when is None else " at %s" % when))
        self.reply(handler, 204, b"", headers)

    def print_line(self, line):
        """Hand one line to ``echo``, if there is one; never fail the request over it."""
        if self.echo is None:
            return
        try:
            self.echo(line)
        except Exception as exc:
            _log.debug("sink could not print %r: %s", line[:80], exc)


class _Sink(_EventsAPI):
    """A local server that speaks the events API, for development and tests.

    Serves _EventsAPI over HTTP (HTTPS with ``ssl_context``) from a thread, on
    ``host`` and ``port`` (0: a free one, read back from ``port``). With
    ``rate_limit`` set it enforces that many requests per ``window`` seconds
    (_RateWindow).
    """

    def __init__(self, host="127.0.0.1", port=0, rate_limit=None, window=10.0,
                 access_key=None, jsonl=None, echo=None, ssl_context=None):
        _EventsAPI.__init__(self, rate_limit, window, access_key, jsonl, echo)
        self.host = host.strip("[]")
        self.ssl_context = ssl_context
        self.port = port
        self._server = None
        self._thread = None

    @property
    def url(self):
        """The base URL to reach the sink at (loopback when it listens on every address)."""
        host = _LOOPBACK_OF.get(self.host, self.host)
        return "%s://%s:%d" % ("https" if self.ssl_context else "http",
                               "[%s]" % host if ":" in host else host, self.port)

    def start(self):
        import http.server
        import socket
        import socketserver
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30
            disable_nagle_algorithm = True      # answers are small: no delayed-ACK stalls

            def setup(self):
                http.server.BaseHTTPRequestHandler.setup(self)
                with sink.changed:
                    sink.connections += 1

            def log_message(self, *args):
                pass

            def do_POST(self):
                sink.handle(self)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in sink.host else socket.AF_INET

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, OSError)):
                    http.server.HTTPServer.handle_error(self, request, client_address)

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(self._server.socket,
                                                               server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name="isstreamer_lite-sink")
        _start_thread(self._thread)     # Ctrl-C reaches the main thread
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5.0)
            self._server = None


# --- Command line ------------------------------------------------------------

def _selftest(out):
    """The offline smoke test: stream through a loopback sink and check arrival."""
    import shutil
    import tempfile
    started = _monotonic()
    try:
        spool_dir = tempfile.mkdtemp(prefix="isstreamer_lite-selftest-")
    except OSError as exc:
        out.write("isstreamer_lite %s selftest: FAILED: no temporary folder can be written "
                  "(%s); set TMPDIR to a writable folder\n" % (__version__, exc))
        return 1
    sink = _Sink().start()
    problems = []
    try:
        streamer = Streamer("isstreamer_lite selftest", "selftest-" + _new_bucket_key()[:8],
                            "ist_selftest_local_key", ini_file_location=False, offline=False,
                            api_base=sink.url, spool_dir=spool_dir, flush_interval=0.05)
        expected = [("count", i) for i in range(25)]
        expected += [("float", 21.5), ("text", 'quotes " \' and, commas \u00e9\u263a'),
                     ("flag", True), ("negative", -7)]
        for key, value in expected:
            streamer.log(key, value)
        streamer.log("past", 1.0, epoch=1700000000.25)
        streamer.log_object({"a": 1, "b": "two"}, key_prefix="obj")
        expected += [("past", 1.0), ("obj_a", 1), ("obj_b", "two")]
        if not streamer.flush(5.0):
            problems.append("flush() did not finish within 5 s: %s"
                            % streamer.stats()["last_error"])
        if not streamer.close(5.0):
            problems.append("close() did not finish within 5 s")
        got = [(e["key"], e["value"]) for _, e in sink.events]
        if got != expected:
            problems.append("expected %d events in order, the server got %d"
                            % (len(expected), len(got)))
        if streamer.bucket_key not in sink.buckets:
            problems.append("the bucket was not created")
        past = [e for _, e in sink.events if e["key"] == "past"]
        if not past or past[0].get("epoch") != 1700000000.25:
            problems.append("the epoch override did not arrive intact")
        stats = streamer.stats()
    finally:
        sink.stop()
        shutil.rmtree(spool_dir, ignore_errors=True)
    elapsed = _monotonic() - started
    out.write("isstreamer_lite %s selftest on Python %s\n" % (__version__,
                                                             sys.version.split()[0]))
    out.write("  %s in %s over %s to a loopback server, %.2f s\n" % (
        _count(len(sink.events), "event"), _count(stats["requests"], "request"),
        _count(sink.connections, "connection"), elapsed))
    for problem in problems:
        out.write("  FAIL: %s\n" % problem)
    out.write("  %s\n" % ("FAILED" if problems else "OK: bucket created, events batched, "
                          "delivered intact and in order"))
    return 1 if problems else 0


class _UsageError(Exception):
    """A command-line input the user must fix (exit status 2)."""


class _Stop(BaseException):
    """SIGTERM arrived while a command was streaming."""


_JSON_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"


def _parse_cli_value(text, raw=False):
    """A command-line value: true/false -> bool, JSON numbers -> int/float, else str.

    Numbers follow JSON's grammar, so "007", "12_34", "nan", "inf", "1e999"
    and digits of other scripts stay text.
    """
    if raw:
        return text
    stripped = text.strip()
    if stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    import re
    if not re.match(_JSON_NUMBER + r"\Z", stripped):
        return text
    if re.match(r"-?[0-9]+\Z", stripped):
        number = int(stripped)
        return number if -_INT_LIMIT <= number <= _INT_LIMIT else text
    number = float(stripped)
    return number if number - number == 0.0 else text


def _parse_iso8601(text):
    """Unix seconds from an ISO-8601 time; no zone means local time."""
    import calendar
    import re
    match = re.match(r"^(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(\.\d+)?)?)?"
                     r"\s*(Z|[+-]\d\d:?\d\d)?$", text.strip())
    if match is None:
        raise ValueError("%r is not an ISO-8601 time such as 2026-05-01T12:00:00Z" % text)
    parts = [int(p or 0) for p in match.groups()[:6]]
    fraction = float(match.group(7) or 0)
    zone = match.group(8)
    if zone is None:
        return time.mktime(tuple(parts) + (0, 0, -1)) + fraction
    offset = 0
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return calendar.timegm(tuple(parts) + (0, 0, 0)) - offset + fraction


def _parse_epoch(text):
    """--epoch: Unix seconds or an ISO-8601 time."""
    try:
        return float(text)
    except ValueError:
        return _parse_iso8601(text)


def _parse_line(line):
    """One ``pipe`` input line -> (key, value text or value, epoch or None).

    Accepts ``key,value``, ``key=value``, ``epoch,key,value`` (the offline
    CSV's rows) and JSON objects with ``key``, ``value`` and optional
    ``epoch`` or ``iso8601``. Raises ValueError.
    """
    text = line.strip()
    if text.startswith("{"):
        data = _json_load(text)
        if not isinstance(data, dict) or "key" not in data or "value" not in data:
            raise ValueError("a JSON line needs \"key\" and \"value\"")
        epoch = data.get("epoch")
        if epoch is None and data.get("iso8601") is not None:
            epoch = _parse_iso8601(str(data["iso8601"]))
        if epoch is not None:
            epoch = _normalise_epoch(epoch)
        return data["key"], data["value"], epoch, True
    import re
    if re.match(_JSON_NUMBER + ",", text):          # epoch,key,value (the offline CSV)
        import csv
        row = next(csv.reader([text]))
        if len(row) == 3:
            return row[1].strip(), row[2].strip(), _normalise_epoch(float(row[0])), False
    equals, comma = text.find("="), text.find(",")
    if equals > 0 and (comma < 0 or equals < comma):
        key, value = text[:equals], text[equals + 1:]
    elif comma > 0:
        key, value = text[:comma], text[comma + 1:]
    else:
        raise ValueError("expected key,value or key=value or a JSON object")
    return key.strip(), value.strip(), None, False


def _cli_options(args, **overrides):
    """Streamer keyword arguments from the common flags (then env, then ini)."""
    import inspect
    if args.ini is not None and not os.path.isfile(args.ini):
        raise _UsageError("--ini %s does not exist or is not a file" % args.ini)
    options = {name: p.default for name, p in
               inspect.signature(Streamer.__init__).parameters.items() if name != "self"}
    options.update(bucket_name=args.bucket_name or "", bucket_key=args.bucket_key or "",
                   access_key=args.access_key or "", ini_file_location=args.ini,
                   api_base=args.api_base, spool_dir=args.spool_dir, offline=False,
                   debug_level=args.debug)
    options.update(overrides)
    return options


def _install_sigterm_stop():
    """Turn SIGTERM into _Stop in the main thread while a command streams."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise _Stop()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop)
    return previous


def _restore_sigterm(handler=None):
    """Put back the SIGTERM handler the command found."""
    import signal
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


def _key_hint(access_key):
    """What to check when the server refused the access key (shown masked)."""
    return "check the access key (%s): --access-key, IS_ACCESS_KEY or access_key in " \
           "isstreamer.ini" % _mask(access_key)


def _undelivered(streamer, started, timeout, err):
    """After close() said False: how long it took, why, and where the events are.

    The key hint masks the key the Streamer used, wherever it came from
    (--access-key, IS_ACCESS_KEY or isstreamer.ini).
    """
    stats = streamer.stats()
    why = stats["last_error"] or "the server did not answer in time"
    elapsed = _monotonic() - started
    if stats["paused"]:
        why += "; sending is paused (%s)" % stats["paused"]
    elif stats["waiting"] and elapsed < timeout:
        why += "; %s, and the next attempt is due after the %g s timeout" % (stats["waiting"],
                                                                             timeout)
    err.write("not delivered after %.2f s (--timeout %g): %s\n" % (elapsed, timeout, why))
    if stats["paused"] == "key_rejected":
        err.write("%s\n" % _key_hint(streamer._settings.access_key))
    dropped = sum(stats["dropped"].values())
    if stats["spooled"]:
        err.write("%s spooled; the next run with this access key (or replay) sends the "
                  "spool\n" % _count(stats["spooled"], "event"))
    if dropped:
        err.write("%s dropped (%s)\n" % (_count(dropped, "event"), ", ".join(
            "%s: %d" % item for item in sorted(stats["dropped"].items()))))
    if stats["dead_lettered"]:
        err.write("%s refused by the server, kept in the dead-letter file\n"
                  % _count(stats["dead_lettered"], "event"))


def _cmd_send(args, out, err):
    if len(args.pairs) % 2:
        raise _UsageError("send takes KEY VALUE pairs; got %s" % _count(len(args.pairs), "word"))
    epoch = _parse_epoch(args.epoch) if args.epoch else None
    events = []
    for i in range(0, len(args.pairs), 2):
        key = _check_key(args.pairs[i])
        events.append((key, _normalise_value(key, _parse_cli_value(args.pairs[i + 1],
                                                                   args.raw))))
    options = _cli_options(args)
    started = _monotonic()
    streamer = Streamer(**options)
    for key, value in events:
        streamer.log(key, value, epoch)
    if streamer.close(args.timeout):
        out.write("sent %s to bucket %s\n" % (_count(len(events), "event"), streamer.bucket_key))
        return 0
    _undelivered(streamer, started, args.timeout, err)
    return 1


def _cmd_pipe(args, out, err):
    options = _cli_options(args)
    started = _monotonic()
    streamer = Streamer(**options)
    bad = lines = 0
    previous = _install_sigterm_stop()
    try:
        source = getattr(sys.stdin, "buffer", None)
        for number, raw in enumerate(iter(source.readline if source else sys.stdin.readline,
                                          b"" if source else ""), 1):
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as exc:
                lines += 1
                bad += 1
                err.write("line %d skipped: not UTF-8 (byte 0x%02x at position %d)\n"
                          % (number, raw[exc.start], exc.start))
                continue
            if number == 1:
                line = line.lstrip("\ufeff")       # a byte-order mark is not part of a key
            if not line.strip():
                continue
            lines += 1
            try:
                key, value, epoch, typed = _parse_line(line)
                if not typed:
                    value = _parse_cli_value(value, args.raw)
                if not isinstance(key, str):
                    raise ValueError("the key %r is not a string" % (key,))
                _check_key(key)
                _normalise_value(key, value)
                streamer.log(key, value, epoch)
            except (TypeError, ValueError) as exc:
                bad += 1
                err.write("line %d skipped: %s\n" % (number, exc))
    except (KeyboardInterrupt, _Stop):
        err.write("stopping: flushing what was read\n")
    try:
        delivered = streamer.close(args.timeout)
    except (KeyboardInterrupt, _Stop) as exc:
        # close() put what it had not delivered in the spool before letting go.
        err.write("stopped while closing: what was not delivered is spooled\n")
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    finally:
        _restore_sigterm(previous)
    err.write("%s read, %d skipped, %s\n" % (
        _count(lines, "line"), bad, "all delivered" if delivered
        else "some not delivered yet (spooled: %d)" % streamer.stats()["spooled"]))
    if not delivered:
        _undelivered(streamer, started, args.timeout, err)
    return 0 if delivered else 1


def _key_status(spool, now, quota=_MONTHLY_QUOTA):
    """What ``status`` shows for one access key's spool."""
    folder, fingerprint = spool.folder, spool.fingerprint
    state = spool.status.read()
    dead, newest = spool.dead_letters.read()
    buckets = [{"bucket_key": r["bucket_key"], "bucket_name": r["bucket_name"],
                "events": r["events"], "lines": r["lines"],
                "oldest_age_s": None if r["oldest"] is None else max(0.0, now - r["oldest"])}
               for r in spool.summary()]
    answers, running = spool.status.ask_running()
    backlog = sum(b["events"] for b in buckets)
    in_memory = sum(answers.values())
    # A key with nothing left and nobody running it is idle, whatever its last run met.
    idle = not (backlog or in_memory or running)
    key = state.get("key")
    month = _month_of(now)
    months = state.get("months") if isinstance(state.get("months"), dict) else {}
    done = months.get(month, 0) if isinstance(months.get(month, 0), int) else 0
    rate = state.get("rate") if isinstance(state.get("rate"), (int, float)) else 0.0
    if not running and now - (state.get("updated") or 0) > _RATE_WINDOW:
        rate = 0.0                      # nobody has been sending lately
    unlimited = bool(state.get("enterprise")) or not quota
    return {"key_fingerprint": fingerprint, "month": {
                "month": month, "delivered": done, "quota": None if unlimited else quota,
                "projected": int(done + max(0.0, rate) * _month_left(now))}, "key": key if key and key != "****" else None,
            "folder": folder, "last_success": state.get("last_success"),
            "last_error": state.get("last_error"),
            "paused": "" if idle else state.get("paused", ""), "idle": idle,
            "last_paused": state.get("paused", "") if idle else "",
            "waiting": state.get("waiting", ""), "rate_limit": state.get("rate_limit"),
            "dropped": state.get("dropped", {}), "status_updated": state.get("updated"),
            "running_pids": running, "in_memory": in_memory,
            "unanswered_pids": [p for p in running if p not in answers],
            "backlog": buckets, "backlog_events": backlog,
            "dead_letters": dead, "newest_dead_letter": None if newest is None else {
                "time": newest.get("time"), "bucket_key": newest.get("bucketKey"),
                "status": newest.get("status"), "reason": str(newest.get("reply", ""))[:200]}}


def _ago(when, now):
    if not when:
        return "never"
    seconds = max(0, int(now - when))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return "%d %s ago" % (seconds // size, unit)
    return "%d s ago" % seconds


def _cmd_status(args, out, err):
    options = _cli_options(args, bucket_key="status")
    settings = _resolve_settings(**dict(options, offline=True))
    spool_dir, quota = settings.spool_dir, settings.monthly_quota
    now = _time()
    report = [_key_status(spool, now, quota) for spool in _Spool.every_key(spool_dir)]
    pending = sum(r["backlog_events"] + r["in_memory"] for r in report)
    if args.json:
        out.write(_json_bytes({"spool_dir": spool_dir, "keys": report,
                               "pending_events": pending}).decode("utf-8") + "\n")
        return 1 if pending else 0
    out.write("spool %s: %s\n" % (spool_dir, "%d events pending" % pending if pending
                                   else "nothing pending"))
    for r in report:
        # A key too short to show four characters is told apart by its fingerprint.
        out.write("key %s\n" % ("%s (fingerprint %s)" % (r["key"], r["key_fingerprint"])
                                 if r["key"] else "with fingerprint %s" % r["key_fingerprint"]))
        out.write("  last success: %s\n" % _ago(r["last_success"], now))
        if r["last_error"]:
            out.write("  last error: %s\n" % r["last_error"])
        if r["paused"]:
            out.write("  sending paused: %s\n" % r["paused"])
        if r["waiting"]:
            out.write("  waiting: %s\n" % r["waiting"])
        limit = r["rate_limit"]
        if isinstance(limit, dict) and isinstance(limit.get("calls"), int):
            out.write("  rate limit: %d calls per %g s (told by the server)\n" % (
                limit["calls"], limit.get("window_s") or _WINDOW))
        month = r["month"]
        if month["delivered"] or month["projected"]:
            out.write("  this month (%s, UTC): %s events delivered, about %s by its end at "
                      "the recent rate%s\n" % (
                          month["month"], "{:,}".format(month["delivered"]),
                          "{:,}".format(month["projected"]), "" if month["quota"] is None else
                          ", %s the monthly quota of %s" % (
                              "over" if month["projected"] > month["quota"] else "within",
                              "{:,}".format(month["quota"]))))
        if r["idle"]:
            out.write("  idle: nothing to send and no process running%s\n" % (
                " (its last run was paused: %s)" % r["last_paused"] if r["last_paused"] else ""))
        if r["running_pids"]:
            out.write("  running: process %s, %s held in memory%s\n" % (
                ", ".join(str(p) for p in r["running_pids"]), _count(r["in_memory"], "event"),
                " (no answer from %s)" % ", ".join(str(p) for p in r["unanswered_pids"])
                if r["unanswered_pids"] else ""))
        for b in r["backlog"]:
            out.write("  backlog: bucket %r (%s): %d event%s, oldest %s\n" % (
                b["bucket_key"], b["bucket_name"] or "no name", b["events"],
                "" if b["events"] == 1 else "s", "?" if b["oldest_age_s"] is None
                else _ago(now - b["oldest_age_s"], now)))
        if r["dead_letters"]:
            newest = r["newest_dead_letter"] or {}
            out.write("  dead letters: %d, newest: %s\n" % (
                r["dead_letters"], newest.get("reason") or newest.get("status")))
        if r["dropped"]:
            out.write("  dropped: %s\n" % ", ".join("%s %d" % kv for kv in
                                                   sorted(r["dropped"].items())))
    return 1 if pending else 0


def _cmd_discard(args, out, err):
    if not (args.bucket_key or args.dead_letters):
        raise _UsageError("discard needs --bucket-key KEY (its backlog) or --dead-letters")
    options = _cli_options(args, bucket_key=args.bucket_key or "discard")
    settings = _resolve_settings(**options)
    spool = _Spool.of_key(settings.spool_dir, settings.access_key)
    folder = spool.folder
    doomed, what = [], []
    if args.bucket_key:
        bucket = spool.bucket_folder(args.bucket_key)
        rows = [r for r in spool.summary() if r["folder"] == bucket]
        doomed += spool.segments(bucket)
        what.append("%d spooled events of bucket %r" % (sum(r["events"] for r in rows),
                                                        args.bucket_key))
    if args.dead_letters:
        if os.path.exists(spool.dead_letters.path):
            doomed.append(spool.dead_letters.path)
        what.append("%d dead letters" % spool.dead_letters.read()[0])
    if not doomed:
        out.write("nothing to discard in %s\n" % folder)
        return 0
    question = "discard %s in %s? [y/N] " % (" and ".join(what), folder)
    if not args.yes:
        if not sys.stdin.isatty():
            raise _UsageError("not at a terminal to ask: add --yes to %s" % question[:-8])
        out.write(question)
        out.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            out.write("nothing discarded\n")
            return 1
    kept = _discard(doomed)
    out.write("discarded %s%s\n" % (" and ".join(what), "; %d segment(s) in use by a running "
                                    "process were kept" % kept if kept else ""))
    return 0


def _replay_spool(settings, paths, timeout):
    """Send spooled lines (all of the key's, or just ``paths``); return stats, pending."""
    _preload(settings)
    worker = _new_worker(settings, None, only=paths)
    worker.courier = _InlineCourier(worker.sender)
    deadline = _monotonic() + timeout
    worker.inbox.append(_Wait(0, deadline))
    while not worker.stopped.is_set() and _monotonic() < deadline:
        _run_reports(settings.on_error, worker.pump(deadline, worker.stopped), worker)
    if not worker.stopped.is_set():
        worker.halt("replay deadline reached")
    spool = worker.reader.spool
    if paths is not None:
        pending = sum(len(_pending(path)) for path in paths)
    else:
        pending = sum(row["lines"] for row in spool.summary())
    return worker.stats, pending


def _cmd_replay(args, out, err):
    if args.csv:
        if not args.bucket_key:
            raise _UsageError("replay --csv needs --bucket-key (an offline CSV has no bucket)")
        if not os.path.isfile(args.csv):
            raise _UsageError("no such file: %s" % args.csv)
        import csv
        options = _cli_options(args)
        started = _monotonic()
        streamer = Streamer(**options)
        count = 0
        with open(args.csv, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.reader(handle), 1):
                if len(row) != 3:
                    err.write("%s line %d skipped: expected epoch,key,value\n" % (args.csv, number))
                    continue
                try:
                    streamer.log(row[1], _parse_cli_value(row[2], args.raw), float(row[0]))
                    count += 1
                except ValueError as exc:
                    err.write("%s line %d skipped: %s\n" % (args.csv, number, exc))
        delivered = streamer.close(args.timeout)
        out.write("%s %s from %s to bucket %s\n" % (
            "sent" if delivered else "could not send all of", _count(count, "event"), args.csv,
            args.bucket_key))
        if not delivered:
            _undelivered(streamer, started, args.timeout, err)
        return 0 if delivered else 1
    for path in args.files:
        if not os.path.isfile(path):
            raise _UsageError("no such file: %s" % path)
    options = _cli_options(args, bucket_key="replay")
    if args.dry_run:
        spool_dir = _resolve_settings(**dict(options, offline=True)).spool_dir
        key = None
        try:
            key = _resolve_settings(**options).access_key
        except ConfigError:
            pass
        spools = [_Spool.of_key(spool_dir, key)] if key else _Spool.every_key(spool_dir)
        rows = [row for spool in spools for row in spool.summary()]
        if not rows:
            out.write("nothing pending in %s\n" % spool_dir)
        for spool in spools:
            dead, newest = spool.dead_letters.read()
            if dead:
                out.write("key %s: %d dead letter%s (events the server refused), newest: %s\n"
                          % (spool.fingerprint, dead, "" if dead == 1 else "s",
                             str((newest or {}).get("reply", ""))[:120] or "?"))
        for row in rows:
            out.write("key %s bucket %r (%s): %s in %s, %s\n" % (
                row["key"], row["bucket_key"], row["bucket_name"] or "no name",
                _count(row["events"], "event"), _count(row["lines"], "line"),
                _count(row["segments"], "segment")))
        return 0
    options.pop("bucket_key")
    settings = _resolve_settings(**dict(options, bucket_key="replay"))
    paths = [os.path.abspath(p) for p in args.files] or None
    stats, pending = _replay_spool(settings, paths, args.timeout)
    out.write("replayed %s in %s; %d dead-lettered; %s\n" % (
        _count(stats["replayed"], "event"), _count(stats["requests"], "request"),
        stats["dead_lettered"],
        "spool empty" if not pending else "some remain (%s)" % stats["last_error"]))
    return 1 if pending else 0


def _cmd_sink(args, out, err):
    def echo(line):
        encoding = getattr(out, "encoding", None) or "ascii"
        out.write(line.encode(encoding, "backslashreplace").decode(encoding) + "\n")
        out.flush()
    sink = _Sink(args.host, args.port, args.rate_limit, args.window,
                 access_key=args.accept_key, jsonl=args.jsonl,
                 echo=None if args.quiet else echo)
    try:
        sink.start()
    except OSError as exc:
        import errno
        if exc.errno == errno.EADDRINUSE:
            raise _UsageError("port %d on %s is already in use: pick another with --port, or "
                              "--port 0 for a free one" % (args.port, args.host))
        raise _UsageError("cannot listen on %s port %d: %s" % (args.host, args.port,
                                                               exc.strerror or exc))
    previous = _install_sigterm_stop()
    try:
        out.write("events API on %s (IS_API_BASE=%s); Ctrl-C to stop\n" % (sink.url, sink.url))
        if sink.host in _LOOPBACK_OF:
            out.write("listening on every address: other machines use this machine's address "
                      "instead of %s\n" % _LOOPBACK_OF[sink.host])
        out.flush()
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        _restore_sigterm(previous)
        sink.stop()
    out.write("%s in %s\n" % (_count(len(sink.events), "event"),
                             _count(sink.requests, "request")))
    return 0


# The bucket selftest --live creates in the account (key, name) unless told otherwise.
_LIVE_BUCKET = ("isstreamer_lite-selftest", "isstreamer_lite selftest")


def _from_now(reset, now):
    """" (resets in 7 s)" for an X-RateLimit-Reset (Unix seconds); "" if no number."""
    try:
        left = float(reset) - now
    except ValueError:
        return ""
    if left != left or abs(left) == float("inf"):
        return ""
    return " (resets in %.0f s)" % left if left >= 0 else " (%.0f s in the past)" % -left


def _cmd_selftest(args, out, err):
    if not args.live:
        return _selftest(out)
    settings = _resolve_settings(**_cli_options(args, bucket_key=args.bucket_key or
                                                _LIVE_BUCKET[0],
                                                bucket_name=args.bucket_name or _LIVE_BUCKET[1]))
    _preload(settings)
    sender = _Sender(settings, _HTTPTransport(settings.api_base, settings.timeout, None,
                                              settings.user_agent))
    bucket = (settings.bucket_key, settings.bucket_name)
    now = _time()
    events = [("selftest_number", 1), ("selftest_text", "hello from isstreamer_lite"),
              ("selftest_flag", True)]
    out.write("live selftest against %s with access key %s: creates (or reuses) a bucket "
              "named \"%s\" (key %s) and sends it %d test events\n" % (
                  settings.api_base, _mask(settings.access_key), settings.bucket_name,
                  settings.bucket_key, len(events)))
    failed = key_rejected = False
    for path, body in (("/api/buckets", _json_bytes({"bucketKey": settings.bucket_key,
                                                     "bucketName": settings.bucket_name})),
                       ("/api/events", _encode_events([e + (now,) for e in events]))):
        response, error = sender.post(_Job(path, body, bucket, None,
                                           _monotonic() + settings.timeout))
        if error is not None:
            out.write("  POST %s: %s: %s\n" % (path, type(error).__name__, error))
            failed = True
            continue
        limits = ", ".join("%s=%s%s" % (h, response.headers[h], _from_now(
            response.headers[h], _time()) if h == "x-ratelimit-reset" else "") for h in (
            "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after")
            if h in response.headers)
        out.write("  POST %s -> %d %s%s\n" % (path, response.status, response.text(200),
                                              " (%s)" % limits if limits else ""))
        failed = failed or not 200 <= response.status < 300
        key_rejected = key_rejected or _decide(response.status).reason == "key_rejected"
    sender.transport.close()
    if key_rejected:
        out.write("  FAILED: %s\n" % _key_hint(settings.access_key))
    else:
        out.write("  %s\n" % ("FAILED" if failed else "OK: the account accepted %d test events"
                               % len(events)))
    return 1 if failed else 0


# Each command's examples; argparse puts in the command as started for %(prog)s.
_EXAMPLES = {
    "selftest": "%(prog)s\n"
                "  IS_ACCESS_KEY=ist_... %(prog)s --live",
    "send": "IS_ACCESS_KEY=ist_... %(prog)s --bucket-key garden temperature 21.5 door_open false",
    "pipe": "journalctl -f -n 0 -o cat -t sensor | %(prog)s --bucket-key garden\n"
            "  printf 'temp,21.5\\nhumidity=40\\n{\"key\": \"ok\", \"value\": true}\\n' | "
            "%(prog)s",
    "replay": "%(prog)s --dry-run\n"
              "  IS_ACCESS_KEY=ist_... %(prog)s --csv isstreamer_out.csv --bucket-key garden",
    "status": "%(prog)s\n"
              "  %(prog)s --json",
    "discard": "IS_ACCESS_KEY=ist_... %(prog)s --bucket-key garden\n"
               "  IS_ACCESS_KEY=ist_... %(prog)s --dead-letters --yes",
    "sink": "%(prog)s --port 8080 --jsonl events.jsonl\n"
            "  IS_ACCESS_KEY=ist_local IS_API_BASE=http://127.0.0.1:8080 python3 "
            "my_sensor_script.py",
}


# The options of every command but sink, which may also come before the command:
# (flag, default, add_argument keywords). argparse is given no default for
# them, since a command's default would overwrite what came before the
# command; main() fills these in.
_COMMON_FLAGS = (
    ("--access-key", None, {"help": "access key (prefer IS_ACCESS_KEY: flags show in the "
                                    "process list)"}),
    ("--bucket-key", None, {"help": "bucket key (default: IS_BUCKET_KEY, ini, or a new one)"}),
    ("--bucket-name", None, {"help": "bucket name shown in the UI"}),
    ("--api-base", None, {"help": "API base URL (default https://groker.init.st)"}),
    ("--ini", None, {"help": "isstreamer.ini to read (default: ~/ then ./)"}),
    ("--spool-dir", None, {"help": "spool folder (default: IS_SPOOL_DIR, ini, "
                                   "~/.local/state/isstreamer_lite)"}),
    ("--timeout", 30.0, {"type": float, "help": "seconds to wait for delivery (default 30)"}),
    ("--debug", 0, {"type": lambda text: _whole_number(text, 0, 3, "the debug level"),
                    "metavar": "0-3", "help": "debug_level: 1 echoes each event, 2 also "
                                              "raises on logging errors, 3 logs details"}),
)


def _whole_number(text, low, high, what):
    """An option's whole number from ``low`` to ``high``, or a message naming them."""
    import argparse
    try:
        number = int(text)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise argparse.ArgumentTypeError("%s must be a whole number from %d to %d, not %r"
                                         % (what, low, high, text))
    return number


def _dest(flag):
    """The attribute argparse stores a flag in: ``--bucket-key`` -> ``bucket_key``."""
    return flag[2:].replace("-", "_")


def _add_common_flags(parser):
    import argparse
    for flag, _, options in _COMMON_FLAGS:
        parser.add_argument(flag, default=argparse.SUPPRESS, **options)


def _prog(argv):
    """The program's name for usage lines and examples: what the user typed.

    When main() reads sys.argv itself, the name of the script that started
    it (pip's ``isstreamer-lite``); under ``-m``, or when a caller passes
    argv (its sys.argv[0] is another program's), ``python3 -m isstreamer_lite``.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and argv is None:
        name = spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return "python3 -m " + name
    name = os.path.basename(sys.argv[0]) if argv is None and sys.argv else ""
    if name in ("", "-c", "__main__.py"):
        return "python3 -m isstreamer_lite"
    return "python3 " + name if name.endswith(".py") else name


def _build_parser(prog):
    import argparse
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Stream events to Initial State from the shell. With no command, run "
                    "the offline smoke test.",
        epilog="Key, bucket and API base come from the flags, then IS_ACCESS_KEY, "
               "IS_BUCKET_KEY, IS_BUCKET_NAME, IS_API_BASE, then isstreamer.ini. Flags may "
               "be spelled with underscores too (--bucket_key), like ISStreamer's arguments. "
               "Exit codes: 0 ok, 1 delivery failed or events remain undelivered, "
               "2 usage or configuration error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="isstreamer_lite " + __version__)
    _add_common_flags(parser.add_argument_group(
        "options of every command but sink (before or after the command)"))
    common = argparse.ArgumentParser(add_help=False)
    _add_common_flags(common)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text, description):
        return commands.add_parser(
            name, parents=[common], help=help_text,
            description=description + "\n\nexample:\n  " + _EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = command("selftest", "offline smoke test (the default command)",
                  "Start a loopback events server, stream events through the whole pipeline "
                  "and check that they arrived. With --live, send three test events to the "
                  "configured account and show the server's answers and rate-limit headers:\n"
                  "--live creates (or reuses) a bucket named \"%s\" (key %s) in the account, "
                  "unless --bucket-name and --bucket-key name another."
                  % (_LIVE_BUCKET[1], _LIVE_BUCKET[0]))
    sub.add_argument("--live", action="store_true", help="talk to the configured API (creates "
                                                         "the bucket \"%s\")" % _LIVE_BUCKET[1])
    sub = command("send", "send KEY VALUE pairs once and wait for delivery",
                  "Send events once and wait until they are delivered; the exit status says "
                  "whether they arrived. Numbers and true/false are sent as such.")
    sub.add_argument("pairs", nargs="+", metavar="KEY VALUE")
    sub.add_argument("--epoch", help="timestamp: Unix seconds or ISO-8601 (default now)")
    sub.add_argument("--raw", action="store_true", help="send every value as text")
    sub = command("pipe", "stream lines from standard input",
                  "Read standard input line by line and stream each line as it comes: "
                  "key,value or key=value or a JSON object with key, value and optional "
                  "epoch or iso8601. Bad lines are reported with their number and skipped. "
                  "End of input, Ctrl-C and SIGTERM flush and close.")
    sub.add_argument("--raw", action="store_true", help="send every value as text")
    sub = command("replay", "send what is in the spool (or a CSV from offline mode)",
                  "Send the spooled events of the access key (or just the given segment "
                  "files), or the rows of an offline CSV written by offline=True.")
    sub.add_argument("files", nargs="*", help="spool segment files (default: all of the key)")
    sub.add_argument("--dry-run", action="store_true", help="list what is pending per bucket")
    sub.add_argument("--csv", help="offline CSV (epoch,key,value) to send; needs --bucket-key")
    sub.add_argument("--raw", action="store_true", help="send CSV values as text")
    sub = command("status", "what the spool holds, and how delivery is going",
                  "For each access key in the spool folder (shown by fingerprint, never the "
                  "key): the last success and error, why sending is paused, the backlog per "
                  "bucket and its age, dead letters and drops. Exit status 0 when nothing is "
                  "pending, 1 otherwise.")
    sub.add_argument("--json", action="store_true", help="the same, as JSON for scripts")
    sub = command("discard", "delete a bucket's backlog or the dead letters",
                  "Delete the spooled events of one bucket of the access key, or its dead "
                  "letters, after asking (--yes for scripts). Segments a running process "
                  "holds are kept.")
    sub.add_argument("--dead-letters", action="store_true", help="delete deadletter.jsonl")
    sub.add_argument("--yes", action="store_true", help="do not ask")
    sub = commands.add_parser(
        "sink", help="run a local events API server for development",
        description="A local server that speaks the events API, prints each event and "
                    "answers with the documented status codes and rate-limit headers.\n\n"
                    "example:\n  " + _EXAMPLES["sink"],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                         "127.0.0.1)")
    sub.add_argument("--port", type=lambda text: _whole_number(text, 0, 65535, "the port"),
                     default=8080, metavar="PORT", help="port (default 8080; 0 = any free one)")
    sub.add_argument("--jsonl", help="also append each event as a JSON line to this file")
    sub.add_argument("--rate-limit", type=int, help="requests allowed per window (default "
                                                    "unlimited)")
    sub.add_argument("--window", type=float, default=10.0, help="window seconds (default 10)")
    sub.add_argument("--quiet", action="store_true", help="do not print events")
    sub.add_argument("--access-key", dest="accept_key", metavar="ACCESS_KEY",
                     help="accept only this access key (others get 401, to try a wrong "
                          "key); default: any")
    return parser, commands.choices


def _flags(parser):
    """The long option strings of one parser (``--bucket-key``, ``--help``, ...)."""
    return [flag for flag in parser._option_string_actions if flag.startswith("--")]


def _dashed(argv, parsers):
    """``argv`` with ISStreamer-style ``--bucket_key`` spelled as our ``--bucket-key``.

    Only words before ``--`` change (argparse reads no other as an option),
    and only where the dashed spelling is a flag of one of ``parsers``.
    """
    known = set()
    for parser in parsers:
        known.update(_flags(parser))
    words = []
    for number, word in enumerate(argv):
        if word == "--":
            return words + argv[number:]
        name, equals, value = word.partition("=")
        dashed = name.replace("_", "-")
        words.append(dashed + equals + value if name.startswith("--") and dashed in known
                     else word)
    return words


def _unrecognized(parser, words):
    """Exit 2 with ``parser``'s usage, naming the words and the flag each may mean."""
    import difflib
    named = []
    for word in words:
        guess = difflib.get_close_matches(word.partition("=")[0], _flags(parser), 1) \
            if word.startswith("--") else []
        named.append(word + (" (did you mean %s?)" % guess[0] if guess else ""))
    parser.error("unrecognized arguments: %s" % " ".join(named))


def main(argv=None):
    """The command line; returns the exit status (see ``--help``)."""
    parser, commands = _build_parser(_prog(argv))
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(_dashed(argv, [parser] + list(commands.values())))
    if extra:
        _unrecognized(commands.get(args.command, parser), extra)
    for flag, default, _ in _COMMON_FLAGS:
        if args.command == "sink" and hasattr(args, _dest(flag)):
            commands["sink"].error("sink takes no %s before the command; sink's own options "
                                   "come after it" % flag)
        if not hasattr(args, _dest(flag)):
            setattr(args, _dest(flag), default)
    out, err = sys.stdout, sys.stderr
    handlers = {None: None, "selftest": _cmd_selftest, "send": _cmd_send,
                "pipe": _cmd_pipe, "replay": _cmd_replay, "sink": _cmd_sink,
                "status": _cmd_status, "discard": _cmd_discard}
    if args.command is None:
        return _selftest(out)
    try:
        return handlers[args.command](args, out, err)
    except (_UsageError, ConfigError, ValueError, TypeError, OSError) as exc:
        err.write("isstreamer_lite %s: %s\n" % (args.command, exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
