# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The isstreamer_lite authors
"""Stream sensor data to Initial State from one standard-library file.

A drop-in replacement for the ``ISStreamer`` client: the same ``Streamer``
API and ``isstreamer.ini``, with a ``log()`` that never blocks, one daemon
worker thread per Streamer that batches events and ships them over a
kept-alive HTTPS connection, retries with back-off and rate-limit pacing,
and a disk spool for whatever still cannot be delivered::

    from isstreamer_lite import Streamer

    streamer = Streamer(bucket_name="Garden", access_key="ist_...")
    streamer.log("temperature", 21.5)
    streamer.log_object({"humidity": 40, "soil": 0.31})
    streamer.close()

Thread safety: ``log``, ``log_object``, ``set_bucket``, ``flush`` and
``close`` may be called from any number of threads at once. ``log`` appends
to a lock-free ``collections.deque`` and returns; each thread's events keep
their order. Everything that touches the network or the disk runs on the
Streamer's worker thread (or, with ``use_async=False``, in the thread that
filled the buffer).

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
_time = time.time
_monotonic = time.monotonic


# --- Constants ---------------------------------------------------------------

# The API's documented default base; groker.initialstate.com answers too.
_DEFAULT_API_BASE = "https://groker.init.st"
# Semver range of the events API we speak (ISStreamer sent "<=0.0.4").
_ACCEPT_VERSION = "~0"
# Event and bucket limits from the API; the project enforces 250 for keys.
_MAX_KEY_CHARS = 250
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
# Warnings about dropped events are repeated at most this often.
_DROP_WARN_EVERY = 60.0
# Longest a rate-limit window is believed to last, guarding against a
# nonsense X-RateLimit-Reset or a badly skewed clock.
_MAX_WINDOW_WAIT = 120.0
_SPOOL_SUFFIX = ".jsonl"
_ACK_SUFFIX = ".ack"


# --- Exceptions --------------------------------------------------------------

class StreamerError(Exception):
    """Base class of the errors isstreamer_lite raises."""


class ConfigError(StreamerError, ValueError):
    """The configuration cannot work: missing key, bad URL, bad bucket key."""


class StreamerClosedError(StreamerError, RuntimeError):
    """An event was logged after ``close()``."""


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

def _mask(secret):
    """Show at most the last four characters of a secret."""
    if not secret:
        return "(none)"
    return "..." + secret[-4:] if len(secret) > 8 else "****"


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
    except (OSError, configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError("cannot read ini file %s: %s" % (path, exc))
    found = {}
    for section, option, name in (
            ("isstreamer.client_config", "access_key", "access_key"),
            ("isstreamer.client_config", "default_bucket", "bucket_name"),
            ("isstreamer.client_config", "bucket_key", "bucket_key"),
            ("isstreamer.client_config", "offline_mode", "offline_mode"),
            ("isstreamer.client_config", "offline_file", "offline_file"),
            ("isstreamer.client_config", "spool_dir", "spool_dir"),
            ("isstreamer.client_config", "durable", "durable"),
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
    """Constructor argument, then environment variable, then ini, then default."""
    if argument not in (None, ""):
        return argument
    if env_name and os.environ.get(env_name):
        return os.environ[env_name]
    if ini.get(ini_name):
        return ini[ini_name]
    return default


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
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


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
    if not isinstance(bucket_name, str):
        raise ConfigError("bucket_name must be a string, not %s" % type(bucket_name).__name__)
    if len(bucket_name) > _MAX_BUCKET_CHARS:
        raise ConfigError("bucket_name is %d characters; the limit is %d"
                          % (len(bucket_name), _MAX_BUCKET_CHARS))


def _default_spool_dir():
    """The user's XDG state directory for our spool."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "isstreamer_lite")


def _check_number(name, value, low, high=None):
    """Validate a numeric option; raise ValueError naming the value and range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError("%s must be a number, not %r" % (name, value))
    if value < low or (high is not None and value > high):
        limit = "at least %s" % low if high is None else "between %s and %s" % (low, high)
        raise ValueError("%s is %r; it must be %s" % (name, value, limit))
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


def _resolve_settings(bucket_name, bucket_key, access_key, ini_file_location, debug_level,
                      buffer_size, offline, use_async, api_base, flush_interval, timeout,
                      wait_timeout, exit_timeout, max_retries, backoff_base, backoff_cap,
                      retry_after_cap, pause_interval, max_queue, spool_dir, spool_max_bytes,
                      offline_file, on_error, ssl_context, durable, sync_interval,
                      handle_sigterm):
    """Validate the options and merge them with environment, ini and defaults.

    Returns the settings dict the engine reads; raises ConfigError,
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
        _check_number("spool_max_bytes", spool_max_bytes, 0)
    if on_error is not None and not callable(on_error):
        raise TypeError("on_error must be callable, not %r" % (on_error,))
    if not offline and not access_key:
        raise ConfigError("no access key: pass access_key=, set IS_ACCESS_KEY, or put "
                          "access_key in [isstreamer.client_config] of isstreamer.ini")
    if not isinstance(access_key, str):
        raise ConfigError("access_key must be a string, not %s" % type(access_key).__name__)
    scheme, host = _check_api_base(api_base)[:2]
    if not bucket_key:
        bucket_key = _new_bucket_key()
    _check_bucket(bucket_key, bucket_name)

    if debug_level >= 1:
        _enable_console_logging(debug_level)
    if scheme == "http" and not _is_loopback(host) and not offline:
        _log.warning("api_base %s is plain http://: the access key travels in clear text",
                     api_base)
    return {
        "access_key": access_key, "api_base": api_base, "buffer_size": buffer_size,
        "flush_interval": float(flush_interval), "timeout": float(timeout),
        "wait_timeout": float(wait_timeout), "exit_timeout": float(exit_timeout),
        "max_retries": int(max_retries), "backoff_base": float(backoff_base),
        "backoff_cap": float(backoff_cap), "retry_after_cap": float(retry_after_cap),
        "pause_interval": float(pause_interval), "max_queue": max_queue,
        "spool_dir": _pick(spool_dir, "IS_SPOOL_DIR", ini, "spool_dir",
                           _default_spool_dir()),
        "spool_max_bytes": spool_max_bytes, "on_error": on_error,
        "ssl_context": ssl_context, "offline": bool(offline), "use_async": bool(use_async),
        "offline_file": _pick(offline_file, None, ini, "offline_file",
                              "./isstreamer_out.csv"),
        "debug_level": debug_level, "durable": bool(durable) and not offline,
        "sync_interval": float(sync_interval), "handle_sigterm": bool(handle_sigterm),
        "user_agent": "isstreamer_lite/%s Python/%d.%d" % ((__version__,) + sys.version_info[:2]),
        "bucket_key": bucket_key, "bucket_name": bucket_name,
    }


# --- Event validation and encoding -------------------------------------------

def _normalise_value(key, value):
    """Return ``value`` as a JSON-safe str, bool, int or finite float.

    Raises TypeError or ValueError naming the key, the value's type and the
    rule. Real numbers of other types (Decimal, Fraction, numpy scalars) are
    converted.
    """
    kind = type(value)
    if kind is bool or kind is int:
        return value
    if kind is float:
        if value - value == 0.0:
            return value
        raise ValueError("value for key %r is %r; numbers must be finite "
                         "(JSON has no NaN or Infinity)" % (key, value))
    if kind is str:
        if len(value) <= _MAX_VALUE_CHARS:
            return value
        raise ValueError("value for key %r is a str of %d characters; the limit is %d"
                         % (key, len(value), _MAX_VALUE_CHARS))
    if isinstance(value, str):
        return _normalise_value(key, str.__str__(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
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
    raise TypeError("value for key %r is of type %s; values must be str, bool, int "
                    "or a finite real number" % (key, type(value).__name__))


def _check_key(key):
    """Raise TypeError/ValueError unless ``key`` is a legal event key."""
    if not isinstance(key, str):
        raise TypeError("key %r is of type %s; keys must be str"
                        % (key, type(key).__name__))
    if not key:
        raise ValueError("key is empty; keys must be 1 to %d characters" % _MAX_KEY_CHARS)
    if len(key) > _MAX_KEY_CHARS:
        raise ValueError("key %r... is %d characters; the limit is %d"
                         % (key[:20], len(key), _MAX_KEY_CHARS))
    return str.__str__(key)


def _normalise_epoch(epoch):
    """Unix seconds from a number or a datetime; ValueError if unusable."""
    if hasattr(epoch, "timestamp") and callable(epoch.timestamp):
        epoch = epoch.timestamp()
    elif callable(getattr(epoch, "item", None)):
        epoch = epoch.item()
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        raise ValueError("epoch %r is not a number or a datetime" % (epoch,))
    epoch = float(epoch)
    if not epoch - epoch == 0.0 or epoch < 0:
        raise ValueError("epoch %r is not a finite, non-negative Unix time" % (epoch,))
    return epoch


def _json_bytes(data):
    """Compact JSON of ``data`` as UTF-8 bytes."""
    import json
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def _json_load(text):
    """Parse JSON from str or UTF-8 bytes; ValueError if it is not JSON."""
    import json
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)


def _event_dict(event):
    return {"key": event[0], "value": event[1], "epoch": event[2]}


def _encode_events(events):
    """The JSON array body for a list of (key, value, epoch) tuples."""
    return _json_bytes([_event_dict(e) for e in events])


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


def _split(events):
    half = len(events) // 2
    return events[:half], events[half:]


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


def _is_loopback(host):
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


class _HTTPTransport(object):
    """One persistent HTTP/1.1 connection to the API, reopened as needed.

    Only the worker uses it, so it needs no lock. A request that fails on a
    reused connection before any response arrives (the server closed it
    while idle) is sent once more on a new connection.
    """

    def __init__(self, api_base, timeout, ssl_context=None, user_agent=None):
        self.scheme, self.host, self.port, self.prefix = _check_api_base(api_base)
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.user_agent = user_agent
        self.connections = 0
        self._conn = None
        self._proxy = None
        self._proxy_resolved = False

    def _resolve_proxy(self):
        """(host, port, auth header or None) of the proxy to use, or None."""
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
        return parts.hostname, parts.port or 8080, auth

    def _connect(self, timeout):
        import http.client
        if not self._proxy_resolved:
            self._proxy = self._resolve_proxy()
            self._proxy_resolved = True
        host, port = self.host, self.port
        if self._proxy is not None:
            host, port = self._proxy[0], self._proxy[1]
        if self.scheme == "https":
            context = self.ssl_context
            if context is None:
                import ssl
                context = ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if self._proxy is not None and self.scheme == "https":
            headers = {"Proxy-Authorization": self._proxy[2]} if self._proxy[2] else None
            conn.set_tunnel(self.host, self.port, headers=headers)
        conn.connect()
        self.connections += 1
        return conn

    def _target(self, path):
        if self._proxy is not None and self.scheme == "http":
            return "http://%s:%d%s%s" % (self.host, self.port, self.prefix, path)
        return self.prefix + path

    def post(self, path, body, headers, timeout=None):
        """POST ``body``; return a _Response or raise OSError/HTTPException."""
        import http.client
        timeout = self.timeout if timeout is None else timeout
        headers = dict(headers)
        if self._proxy is not None and self.scheme == "http" and self._proxy[2]:
            headers["Proxy-Authorization"] = self._proxy[2]
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect(timeout)
            conn = self._conn
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request("POST", self._target(path), body, headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    ConnectionAbortedError, BrokenPipeError, http.client.BadStatusLine):
                self.close()
                if reused and attempt == 1:
                    _log.debug("kept-alive connection was closed by the server; reconnecting")
                    continue
                raise
            except BaseException:
                self.close()
                raise
            if response.will_close:
                self.close()
            return _Response(response.status,
                             {k.lower(): v for k, v in response.getheaders()}, data)
        raise AssertionError("unreachable")

    def close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass


# --- Delivery policy (retry, back-off, pacing) --------------------------------

_DELIVERED = "delivered"      # 2xx
_RETRY = "retry"              # network error, 408, 5xx: back off and retry
_WAIT = "wait"                # 429: wait as told, retry, not a failure
_SPLIT = "split"              # 413: send each half
_BISECT = "bisect"            # 400: find the rejected events
_PAUSE = "pause"              # 401/403/402/other 4xx: spool, pause, probe


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
        return _Decision(_WAIT, min(after, retry_after_cap), "rate_limited")
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
    "quota": "the account's event limit for this billing cycle is used up (key %s): "
             "upgrade the plan or wait for the next cycle",
}


class _RateBudget(object):
    """Requests left in the rate-limit window of one access key.

    Learnt from X-RateLimit-Limit/Remaining/Reset on every response and
    shared by every Streamer of the process using that key. Until a server
    sends those headers nothing is paced.
    """

    def __init__(self):
        self._lock = threading.Lock()   # guards the three fields below
        self._limit = None
        self._remaining = None
        self._reset = None              # wall-clock time the window refills

    def reserve(self, now):
        """Take one request from the window: 0.0, or seconds to wait first."""
        with self._lock:
            if self._remaining is None:
                return 0.0
            if self._reset is not None and now >= self._reset:
                self._remaining = self._limit
                self._reset = None
            if self._remaining > 0:
                self._remaining -= 1
                return 0.0
            if self._reset is None:
                return 0.0
            return min(self._reset - now, _MAX_WINDOW_WAIT) + 0.01

    def update(self, headers, now):
        """Learn the window from a response's headers."""
        try:
            limit = int(headers["x-ratelimit-limit"])
            remaining = int(headers["x-ratelimit-remaining"])
            reset = float(headers["x-ratelimit-reset"])
        except (KeyError, ValueError):
            return
        skew = 0.0
        date = headers.get("date")
        if date:
            from email.utils import parsedate_tz, mktime_tz
            parsed = parsedate_tz(date)
            if parsed is not None and abs(mktime_tz(parsed) - now) > 2.0:
                skew = mktime_tz(parsed) - now
        reset -= skew
        if reset <= now:
            return              # a late answer from a window that is already over
        with self._lock:
            same_window = self._reset is not None and abs(reset - self._reset) < 1.0
            if same_window and self._remaining is not None:
                remaining = min(remaining, self._remaining)
            self._limit, self._remaining, self._reset = limit, remaining, reset


_budgets = {}
_budgets_lock = threading.Lock()        # guards _budgets


def _budget_for(api_base, access_key):
    key = (api_base, _fingerprint(access_key or ""))
    with _budgets_lock:
        budget = _budgets.get(key)
        if budget is None:
            budget = _budgets[key] = _RateBudget()
        return budget


# --- Spool -------------------------------------------------------------------

def _make_private_dir(path):
    """Create the folder ``path`` 0700; missing parents get the usual mode."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


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


class _SpoolFull(OSError):
    """The spool reached spool_max_bytes."""


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _retired_offsets(path):
    """Start offsets of the segment's lines recorded in its ack log."""
    retired = set()
    try:
        with open(path + _ACK_SUFFIX, "rb") as handle:
            for line in handle:
                if line.endswith(b"\n"):           # a torn last record retires nothing
                    try:
                        retired.add(int(line.split(b" ")[0]))
                    except ValueError:
                        pass
    except OSError:
        pass
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
        if start not in retired:
            yield start, end, data[start:end].rstrip(b"\n"), torn
        start = end


def _count_events(bodies):
    """Events in spool line bodies; unreadable ones count none."""
    count = 0
    for body in bodies:
        try:
            count += len(_decode_body(body))
        except ValueError:
            pass
    return count


class _SpoolItem(object):
    """One line of a spool segment, claimed for delivery."""

    __slots__ = ("segment", "start", "end", "body", "events")

    def __init__(self, segment, start, end, body, events):
        self.segment = segment
        self.start = start
        self.end = end
        self.body = body
        self.events = events


class _Segment(object):
    """A claimed spool segment being replayed: its lines and retired ones."""

    def __init__(self, path, fd, bucket_key, bucket_name):
        self.path = path
        self.fd = fd
        self.bucket_key = bucket_key
        self.bucket_name = bucket_name
        self.lines = collections.deque()
        self.outstanding = 0


class _Spool(object):
    """Segments of JSON-array lines for one access key, one folder a bucket.

    Layout: ``<root>/<key fingerprint>/<bucket fingerprint>/`` holds
    ``bucket.json`` (the bucket's key and name) and segments named
    ``<microseconds>-<pid>-<random>.jsonl``; each line is a body that
    ``POST /api/events`` accepts as-is. A writer holds an exclusive lock on
    its segment; a replayer claims a segment by locking it, so no two
    processes or Streamers send the same line. Delivered lines are recorded
    by appending their offsets to ``<segment>.ack``; a fully delivered
    segment is deleted. Used only by the worker thread (and by ``close()``
    once the worker has stopped), so it needs no lock of its own.
    """

    def __init__(self, root, access_key, max_bytes, fsync_each=False, only=None):
        self.root = root
        self.dir = os.path.join(root, _fingerprint(access_key))
        self.only = only            # replay just these segment files (command line)
        self.max_bytes = max_bytes
        self.fsync_each = fsync_each
        self._writers = {}          # bucket key -> (path, fd, size)
        self._known_buckets = set()
        self._segment = None        # the _Segment being replayed
        self._scan_due = 0.0
        self._size = 0
        self._size_due = 0.0
        self._sealed = []           # own segments closed this run, deleted once retired
        self.orphans = 0            # lines in open segments no longer held in memory
        self.bytes_written = 0      # segment lines and ack records, for flash wear
        self.on_seal = None         # called with a segment's path when it is closed
        self.warned_torn = set()

    # writing

    def _bucket_dir(self, bucket_key, bucket_name):
        path = os.path.join(self.dir, _fingerprint(bucket_key))
        if bucket_key not in self._known_buckets:
            for folder in (self.root, self.dir, path):
                _make_private_dir(folder)
            meta = os.path.join(path, "bucket.json")
            if not os.path.exists(meta):
                tmp = "%s.%d.tmp" % (meta, os.getpid())
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    _write_all(fd, _json_bytes({"bucketKey": bucket_key,
                                                "bucketName": bucket_name}))
                finally:
                    os.close(fd)
                os.replace(tmp, meta)
            self._known_buckets.add(bucket_key)
        return path

    def size(self, now):
        """Bytes in all segments of this access key (re-read every few seconds)."""
        if now >= self._size_due:
            total = 0
            for path in self._all_segments():
                try:
                    total += os.path.getsize(path)
                except OSError:
                    pass
            self._size = total
            self._size_due = now + 5.0
        return self._size

    def append(self, bucket_key, bucket_name, body):
        """Append one line; return its (path, start, end). Raises OSError."""
        line = body + b"\n"
        if self.max_bytes and self.size(_monotonic()) + len(line) > self.max_bytes:
            raise _SpoolFull("spool_max_bytes (%d) reached" % self.max_bytes)
        writer = self._writers.get(bucket_key)
        if writer is not None and writer[2] >= _SEGMENT_BYTES:
            self._seal(bucket_key)
            writer = None
        if writer is None:
            folder = self._bucket_dir(bucket_key, bucket_name)
            name = "%017d-%d-%s%s" % (int(_time() * 1e6), os.getpid(),
                                      os.urandom(4).hex(), _SPOOL_SUFFIX)
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            _lock_file(fd)
            writer = (path, fd, 0)
        path, fd, size = writer
        try:
            _write_all(fd, line)
            if self.fsync_each:
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)      # never leave a torn line behind
            except OSError:
                pass
            self._writers[bucket_key] = writer
            raise
        self._writers[bucket_key] = (path, fd, size + len(line))
        self._size += len(line)
        self.bytes_written += len(line)
        return path, size, size + len(line)

    def sync(self):
        for path, fd, size in list(self._writers.values()):
            try:
                os.fsync(fd)
            except OSError as exc:
                _log.warning("fsync of spool segment failed: %s", exc)

    def _seal(self, bucket_key):
        path, fd, size = self._writers.pop(bucket_key)
        try:
            os.fsync(fd)
        except OSError:
            pass
        os.close(fd)
        if size == 0:
            try:
                os.unlink(path)
            except OSError:
                pass
            return
        self._sealed.append(path)
        self._scan_due = 0.0
        if self.on_seal is not None:
            self.on_seal(path)

    def seal_all(self):
        """Close every segment being written so it can be replayed."""
        for bucket_key in list(self._writers):
            self._seal(bucket_key)
        self.orphans = 0

    def cleanup(self):
        """Delete the segments this run closed whose lines were all retired."""
        sealed, self._sealed = self._sealed, []
        for path in sealed:
            if self._segment is None and os.path.exists(path) and self._claim(path):
                self.release_all()          # still has lines: leave it for replay

    def writing(self, path):
        return any(w[0] == path for w in self._writers.values())

    def writing_any(self):
        return bool(self._writers)

    def forget_after_fork(self):
        """In a forked child: drop the parent's open segments without unlocking."""
        for path, fd, size in self._writers.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._writers = {}
        if self._segment is not None:
            try:
                os.close(self._segment.fd)
            except OSError:
                pass
            self._segment = None

    # replaying

    def _all_segments(self):
        if self.only is not None:
            return [p for p in self.only if os.path.exists(p)]
        found = []
        try:
            buckets = os.listdir(self.dir)
        except OSError:
            return found
        for bucket in buckets:
            folder = os.path.join(self.dir, bucket)
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            found.extend(os.path.join(folder, n) for n in names if n.endswith(_SPOOL_SUFFIX))
        found.sort(key=os.path.basename)
        return found

    def pending(self, now):
        """True if this Streamer has spooled lines it can replay.

        Its own open segments count; other segments are looked for on disk at
        most once a second, and those locked by another writer or replayer
        do not count.
        """
        if self.orphans:
            return True                     # our own spooled lines, sealed before replay
        segment = self._segment
        if segment is not None:
            if segment.lines or segment.outstanding:
                return True
            self._finish(segment)
        if now < self._scan_due:
            return False
        self._scan_due = now + 1.0
        for path in self._all_segments():
            if not self.writing(path) and self._claim(path):
                return True
        return False

    def next_item(self, now):
        """The oldest unretired line this Streamer can claim, or None."""
        while self.pending(now):
            segment = self._segment
            if segment is None:
                return None                 # only orphans in open segments; sealed first
            if segment.lines:
                item = segment.lines.popleft()
                segment.outstanding += 1
                return item
            if segment.outstanding:
                return None
        return None

    def _claim(self, path):
        """Lock a segment and load its unretired lines; False if not possible."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False
        if not _lock_file(fd):
            os.close(fd)
            return False
        try:
            segment = self._load(path, fd)
        except OSError as exc:
            os.close(fd)
            _log.warning("cannot read spool segment %s: %s", path, exc)
            return False
        if segment is None:
            return False
        self._segment = segment
        if not segment.lines:
            self._finish(segment)
            return False
        return True

    def _load(self, path, fd):
        """Read a claimed segment's unretired lines into a _Segment."""
        folder = os.path.dirname(path)
        try:
            with open(os.path.join(folder, "bucket.json"), encoding="utf-8") as handle:
                meta = _json_load(handle.read())
            bucket_key, bucket_name = meta["bucketKey"], meta.get("bucketName", "")
        except (OSError, ValueError, KeyError) as exc:
            _log.warning("spool folder %s has no readable bucket.json (%s); "
                         "its segments are left in place", folder, exc)
            os.close(fd)
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read()
        segment = _Segment(path, fd, bucket_key, bucket_name)
        for start, end, body, torn in _unretired_lines(path, data):
            try:
                if torn:
                    raise ValueError("torn line (no newline at end of segment)")
                events = _decode_body(body)
            except ValueError as exc:
                segment.lines.append(_SpoolItem(segment, start, end, body, None))
                if path not in self.warned_torn:
                    self.warned_torn.add(path)
                    _log.warning("spool segment %s: skipping unreadable line at byte %d "
                                 "(%s); it goes to the dead-letter file", path, start, exc)
            else:
                segment.lines.append(_SpoolItem(segment, start, end, body, events))
        return segment

    def ack(self, path, start, end):
        """Record the line at [start, end) of a segment as retired."""
        record = ("%d %d\n" % (start, end)).encode("ascii")
        fd = os.open(path + _ACK_SUFFIX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _write_all(fd, record)
        finally:
            os.close(fd)
        self.bytes_written += len(record)

    def retire(self, item):
        """Record a claimed line as delivered (or dead-lettered); delete a finished segment."""
        segment = item.segment
        segment.outstanding -= 1
        self.ack(segment.path, item.start, item.end)
        if not segment.lines and not segment.outstanding:
            self._finish(segment)

    def release(self, item):
        """Give a claimed line back, to be tried again later."""
        item.segment.outstanding -= 1
        item.segment.lines.appendleft(item)

    def _finish(self, segment):
        """Delete a fully retired segment (segment first, then its acks)."""
        if segment is self._segment:
            self._segment = None
        self._scan_due = 0.0
        if not segment.lines and not segment.outstanding:
            for path in (segment.path, segment.path + _ACK_SUFFIX):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        os.close(segment.fd)

    def release_all(self):
        """Let go of the claimed segment (at close) so another process may take it."""
        segment, self._segment = self._segment, None
        if segment is not None:
            os.close(segment.fd)

    def evict_oldest(self):
        """Delete the oldest claimable segment; return its undelivered events or None."""
        for path in self._all_segments():
            if self.writing(path):
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                if not _lock_file(fd):
                    continue
                with os.fdopen(os.dup(fd), "rb") as handle:
                    data = handle.read()
                events = _count_events(body for _, _, body, _ in _unretired_lines(path, data))
                os.unlink(path)
                try:
                    os.unlink(path + _ACK_SUFFIX)
                except OSError:
                    pass
                self._size_due = 0.0
                return events
            finally:
                os.close(fd)
        return None

    def dead_letter(self, bucket_key, body, status, reply):
        """Append a rejected event (or unreadable line) to ``deadletter.jsonl``."""
        for folder in (self.root, self.dir):
            _make_private_dir(folder)
        record = _json_bytes({"time": _time(), "bucketKey": bucket_key, "status": status,
                              "reply": reply, "body": body.decode("utf-8", "replace")})
        fd = os.open(os.path.join(self.dir, "deadletter.jsonl"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _write_all(fd, record + b"\n")
        finally:
            os.close(fd)


# --- Worker ------------------------------------------------------------------

class _BucketSwitch(object):
    """Queue marker: events after it belong to another bucket."""

    __slots__ = ("key", "name")

    def __init__(self, key, name):
        self.key = key
        self.name = name


class _FlushRequest(object):
    """Queue marker: set ``done`` once everything before it is settled.

    ``lost`` tells whether events were dropped meanwhile (then flush() and
    close() answer False although nothing is left to send).
    """

    __slots__ = ("done", "upto", "dropped", "lost")

    def __init__(self):
        self.done = threading.Event()
        self.upto = None
        self.dropped = 0
        self.lost = False

    def succeeded(self):
        return self.done.is_set() and not self.lost


class _Batch(object):
    """Events of one bucket sent in one request, and how they fared."""

    __slots__ = ("seq", "bucket_key", "bucket_name", "events", "attempts",
                 "bisecting", "spool_item", "body", "opened", "journal")

    def __init__(self, seq, bucket_key, bucket_name, events, opened=0.0):
        self.seq = seq
        self.bucket_key = bucket_key
        self.bucket_name = bucket_name
        self.events = events
        self.attempts = 0
        self.bisecting = False
        self.spool_item = None
        self.body = None
        self.opened = opened
        self.journal = None         # durable mode: (segment path, start, end) on disk

    def encoded(self):
        if self.body is None:
            self.body = _encode_events(self.events)
        return self.body

    def halves(self):
        parts = []
        for events in _split(self.events):
            half = _Batch(self.seq, self.bucket_key, self.bucket_name, events, self.opened)
            half.bisecting = self.bisecting
            parts.append(half)
        return parts


class _Engine(object):
    """Turns the queue into requests: the one place a batch's fate is decided.

    Owned by one thread at a time: the worker thread (``use_async=True``) or
    the caller holding ``pump_lock`` (``use_async=False``). Only ``queue``,
    ``wake`` and the ``stats`` counters are shared with other threads:
    ``queue`` is a deque (atomic appends and pops), ``wake`` an Event, the
    counters plain ints read without a lock.
    """

    def __init__(self, settings, transport, spool, budget):
        self.settings = settings
        self.transport = transport
        self.spool = spool
        self.budget = budget
        self.queue = collections.deque()
        self.wake = threading.Event()
        self.wake_at = settings["buffer_size"]
        self.bucket = None                      # (key, name) of the events being taken
        self.batches = collections.deque()      # in memory, oldest first
        self.in_memory = 0                      # events in self.batches
        self.seq = 0
        self.force_upto = -1
        self.flushes = []
        self.created = set()
        self.to_create = []                     # buckets to create before they are used
        self.retry_at = 0.0
        self.failures = 0
        self.pause_reason = ""
        self.closing = False
        self.close_deadline = None
        self.stopped = False
        self.last_sync = 0.0
        self.unsynced = False
        self.last_drop_warning = -1e9
        self.dropped_total = 0
        self.stats = {
            "logged": 0, "delivered": 0, "retried": 0, "spooled": 0, "replayed": 0,
            "dead_lettered": 0, "dropped": {}, "requests": 0, "rate_limited": 0,
            "buckets_created": 0, "last_error": None, "last_success": None,
            "paused": "", "journalled": 0, "journal_errors": 0,
        }
        if spool is not None:
            spool.on_seal = self.segment_sealed

    # taking from the queue

    def absorb(self, now):
        """Move everything logged so far from the queue into batches."""
        queue = self.queue
        size = self.settings["buffer_size"]
        batches = self.batches
        tail = batches[-1] if batches else None
        open_tail = tail is not None and tail.spool_item is None and tail.seq > self.force_upto \
            and tail.attempts == 0 and not tail.bisecting and tail.journal is None \
            and len(tail.events) < size
        taken = 0
        while True:
            try:
                item = queue.popleft()
            except IndexError:
                break
            if type(item) is tuple:
                taken += 1
                if not open_tail or tail.bucket_key != self.bucket[0] \
                        or len(tail.events) >= size:
                    self.seq += 1
                    tail = _Batch(self.seq, self.bucket[0], self.bucket[1], [], now)
                    batches.append(tail)
                    open_tail = True
                tail.body = None
                tail.events.append(item)
            elif type(item) is _BucketSwitch:
                self.bucket = (item.key, item.name)
                if item.key not in self.created:
                    self.to_create.append(self.bucket)
                open_tail = False
            else:
                item.upto = self.seq
                item.dropped = self.dropped_total
                self.force_upto = self.seq
                self.flushes.append(item)
                open_tail = False
        if taken:
            self.stats["logged"] += taken
            self.in_memory += taken
        if self.in_memory > self.settings["max_queue"]:
            self.overflow()

    def overflow(self):
        """Spool the oldest batches while more than max_queue events are in memory."""
        limit = self.settings["max_queue"]
        while self.in_memory > limit and self.batches:
            batch = self.batches[0]
            if batch.spool_item is not None:
                self.batches.rotate(-1)
                if all(b.spool_item is not None for b in self.batches):
                    break
                continue
            self.batches.popleft()
            self.in_memory -= len(batch.events)
            self.to_spool(batch, "over max_queue (%d events)" % limit)

    # choosing what to send

    def ready(self, batch, now):
        """Whether a batch should go now rather than wait for more events."""
        return (batch.spool_item is not None or batch.attempts or batch.bisecting
                or batch is not self.batches[-1]            # closed: it cannot grow
                or len(batch.events) >= self.settings["buffer_size"]
                or batch.seq <= self.force_upto or self.closing
                or now - batch.opened >= self.settings["flush_interval"])

    def next_batch(self, now):
        """The batch to send now, or None. Live batches before spooled lines."""
        if self.batches and self.ready(self.batches[0], now):
            return self.batches[0]
        if self.spool is None or self.settings["offline"]:
            return None
        if self.spool.orphans:
            self.spool.seal_all()           # make our own spooled lines replayable
        item = self.spool.next_item(now)
        while item is not None and item.events is None:
            self.unreadable(item)           # a torn or corrupt line: never sent
            item = self.spool.next_item(now)
        if item is None:
            return None
        segment = item.segment
        batch = _Batch(0, segment.bucket_key, segment.bucket_name, item.events or [], now)
        batch.spool_item = item
        batch.body = item.body
        self.batches.appendleft(batch)
        return batch

    def step(self):
        """Do one thing; return seconds until the next is due, or None if idle."""
        now = _monotonic()
        self.absorb(now)
        if self.closing and (now >= self.close_deadline or self.retry_at >= self.close_deadline):
            self.give_up()
            return None
        self.settle_flushes(now)
        if not self.settings["durable"]:
            return self.advance(now)
        due = self.journal(now)
        delay = self.advance(now)
        if due is None or delay is None:
            return delay if due is None else due
        return min(due, delay)

    def advance(self, now):
        """Create a bucket or send a batch if one is due; the delay to the next."""
        if now < self.retry_at:
            return self.retry_at - now
        batch = self.next_batch(now)
        if batch is None and self.to_create and not self.settings["offline"]:
            bucket_key, bucket_name = self.to_create[0]
            if self.ensure_bucket(bucket_key, bucket_name, None, now):
                self.to_create.pop(0)
            return 0.0
        if batch is None:
            if self.batches:
                return max(0.0, self.batches[0].opened + self.settings["flush_interval"] - now)
            return None
        self.send(batch, now)
        return 0.0

    # sending

    def headers(self, bucket_key):
        s = self.settings
        return {"Content-Type": "application/json", "Accept-Version": _ACCEPT_VERSION,
                "User-Agent": s["user_agent"], "X-IS-AccessKey": s["access_key"],
                "X-IS-BucketKey": bucket_key}

    def request(self, path, body, bucket_key):
        """One POST; return (response or None, error or None)."""
        self.stats["requests"] += 1
        timeout = self.settings["timeout"]
        if self.closing:
            timeout = max(0.05, min(timeout, self.close_deadline - _monotonic()))
        try:
            response = self.transport.post(path, body, self.headers(bucket_key), timeout)
        except Exception as exc:        # any failure of the request is a network error
            if self.settings["debug_level"] >= 3:
                _log.debug("POST %s (bucket %s): %s", path, bucket_key, exc)
            return None, exc
        if self.budget is not None:
            self.budget.update(response.headers, _time())
        if self.settings["debug_level"] >= 3:
            _log.debug("POST %s (bucket %s, %d bytes) -> %d %s", path, bucket_key,
                       len(body), response.status, response.text())
        return response, None

    def decide(self, response, error):
        s = self.settings
        return _decide(response.status if response is not None else None,
                       response.headers if response is not None else None, error,
                       self.failures, s["backoff_base"], s["backoff_cap"],
                       s["retry_after_cap"], s["pause_interval"])

    def ensure_bucket(self, bucket_key, bucket_name, batch, now):
        """Create a bucket (once per Streamer); False if it is not there yet."""
        if bucket_key in self.created:
            return True
        if self.pace(now):
            return False
        fields = {"bucketKey": bucket_key}
        if bucket_name:
            fields["bucketName"] = bucket_name
        response, error = self.request("/api/buckets", _json_bytes(fields), bucket_key)
        if self.stopped:
            return False
        decision = self.decide(response, error)
        if decision.action == _DELIVERED:
            self.stats["buckets_created"] += 1
            self.created.add(bucket_key)
            self.failures = 0
            return True
        if decision.action in (_BISECT, _SPLIT):
            _log.warning("creating bucket %r was refused (%d %s); sending its events anyway",
                         bucket_key, response.status, response.text())
            self.created.add(bucket_key)
            return True
        self.failed(batch, decision, response, error, _monotonic(), creating=bucket_key)
        return False

    def pace(self, now):
        """Seconds to wait for the rate-limit window, after setting retry_at."""
        if self.budget is None:
            return 0.0
        wait = self.budget.reserve(_time())
        if wait > 0:
            self.retry_at = now + wait
        return wait

    def send(self, batch, now):
        if self.settings["offline"]:
            self.write_offline(batch)
            return
        if not self.ensure_bucket(batch.bucket_key, batch.bucket_name, batch, now):
            return
        body = batch.encoded()
        if len(body) > _MAX_BODY_BYTES and len(batch.events) > 1:
            self.replace(batch, batch.halves())
            return
        if self.pace(now):
            return
        response, error = self.request("/api/events", body, batch.bucket_key)
        if self.stopped:                # close() gave up on us while we waited
            return
        decision = self.decide(response, error)
        if decision.action == _DELIVERED:
            self.delivered(batch)
        elif decision.action == _SPLIT and len(batch.events) > 1:
            self.replace(batch, batch.halves())
        elif decision.action in (_BISECT, _SPLIT):
            if len(batch.events) > 1 and batch.events:
                halves = batch.halves()
                for half in halves:
                    half.bisecting = True
                self.replace(batch, halves)
            else:
                self.reject(batch, response)
        else:
            self.failed(batch, decision, response, error, _monotonic())

    def delivered(self, batch):
        self.failures = 0
        self.stats["last_success"] = _time()
        self.stats["paused"] = self.pause_reason = ""
        self.remove(batch)
        if batch.journal is not None:
            self.unjournal(batch)
        if batch.spool_item is not None:
            self.stats["replayed"] += len(batch.events)
            self.retire(batch.spool_item)
        else:
            self.stats["delivered"] += len(batch.events)

    def failed(self, batch, decision, response, error, now, creating=None):
        """A request did not go through: back off, pause, or spool the batch.

        ``batch`` is None when a bucket was being created ahead of its events.
        """
        status = response.status if response is not None else None
        what = "creating bucket %r" % creating if creating is not None else \
            "sending %d events to bucket %r" % (len(batch.events), batch.bucket_key)
        detail = ("%d %s" % (status, response.text(120))) if response is not None \
            else "%s: %s" % (type(error).__name__, error)
        self.stats["last_error"] = "%s: %s" % (what, detail)
        self.retry_at = now + decision.delay
        if decision.action == _WAIT:
            self.stats["rate_limited"] += 1
            _log.info("rate limited while %s; retrying in %.1f s", what, decision.delay)
            return
        if decision.action == _PAUSE:
            self.pause(decision, detail)
            if batch is None:
                return
            if batch.spool_item is not None:
                self.release(batch)
            elif not self.closing:
                self.to_spool_head(batch, "delivery paused (%s)" % decision.reason)
            return
        self.failures += 1
        self.stats["retried"] += 1
        _log.info("%s failed (%s); retrying in %.2f s", what, detail, decision.delay)
        if batch is None:
            self.report(DeliveryError("%s failed: %s" % (what, detail), status,
                                      decision.reason, creating), [])
            return
        batch.attempts += 1
        self.report(DeliveryError("%s failed: %s" % (what, detail), status, decision.reason,
                                  batch.bucket_key), batch.events)
        if batch.spool_item is not None:
            self.release(batch)
        elif batch.attempts >= self.settings["max_retries"]:
            self.to_spool_head(batch, "%d attempts failed" % batch.attempts)

    def pause(self, decision, detail):
        if self.pause_reason != decision.reason:
            advice = _PAUSE_ADVICE.get(decision.reason, "the server answered %s; check "
                                       "api_base and the account" % detail)
            if "%s" in advice:
                advice = advice % _mask(self.settings["access_key"])
            _log.error("isstreamer_lite: %s. Sending is paused; events are spooled and "
                       "retried every %.0f s.", advice, decision.delay)
        self.stats["paused"] = self.pause_reason = decision.reason
        self.report(DeliveryError(detail, None, decision.reason), [])

    def reject(self, batch, response):
        """The server refuses this one event: dead-letter it, with its reply."""
        self.remove(batch)
        self.stats["dead_lettered"] += max(1, len(batch.events))
        status = response.status if response is not None else None
        reply = response.text(2000) if response is not None else ""
        _log.warning("the server rejected an event of bucket %r (%s %s); it was moved to "
                     "the dead-letter file", batch.bucket_key, status, reply[:200])
        try:
            self.spool.dead_letter(batch.bucket_key, batch.encoded() if batch.events
                                   else batch.body, status, reply)
        except OSError as exc:
            self.drop(len(batch.events), "dead_letter_unwritable", exc)
        if batch.spool_item is not None:
            self.retire(batch.spool_item)
        if batch.journal is not None:
            self.unjournal(batch)
        self.report(DeliveryError("event rejected by the server: %s" % reply[:200], status,
                                  "rejected", batch.bucket_key), batch.events)

    def unreadable(self, item):
        """A spool line that is not a JSON array of events: dead-letter it as is."""
        self.stats["dead_lettered"] += 1
        try:
            self.spool.dead_letter(item.segment.bucket_key, item.body, None,
                                   "unreadable spool line (torn by a crash?)")
        except OSError as exc:
            self.drop(1, "dead_letter_unwritable", exc)
        self.retire(item)

    # bookkeeping

    def remove(self, batch):
        try:
            self.batches.remove(batch)
        except ValueError:
            return
        if batch.spool_item is None:
            self.in_memory -= len(batch.events)

    def replace(self, batch, parts):
        index = self.batches.index(batch)
        del self.batches[index]
        if batch.spool_item is not None:
            # Write the halves back as new spool lines, then retire the old one,
            # so that a crash in between duplicates rather than loses.
            for part in parts:
                self.to_spool(part, None)
            self.retire(batch.spool_item)
            return
        for part in reversed(parts):
            self.batches.insert(index, part)
        if batch.journal is not None:       # journal the halves, then retire the whole
            for part in parts:
                self.journal_batch(part)
            self.unjournal(batch)

    def retire(self, item):
        try:
            self.spool.retire(item)
        except OSError as exc:
            _log.warning("cannot record delivery in the spool (%s); those lines may be "
                         "sent again", exc)

    def release(self, batch):
        self.batches.remove(batch)
        self.spool.release(batch.spool_item)

    def to_spool_head(self, batch, why):
        self.remove(batch)
        self.to_spool(batch, why)

    def to_spool(self, batch, why):
        """Put an in-memory batch on disk; drop it only if the disk refuses."""
        if self.spool is None:
            self.drop(len(batch.events), "no_spool", None)
            return
        if batch.journal is not None:       # durable mode: it is on disk already
            self.spool.orphans += 1
            self.stats["spooled"] += len(batch.events)
            return
        body = batch.encoded()
        try:
            self.spool.append(batch.bucket_key, batch.bucket_name, body)
        except OSError as exc:
            import errno
            if isinstance(exc, _SpoolFull) or exc.errno == errno.ENOSPC:
                evicted = self.spool.evict_oldest()
                if evicted is None and self.spool.writing_any():
                    self.spool.seal_all()       # the oldest may be the one being written
                    evicted = self.spool.evict_oldest()
                if evicted is not None:
                    self.drop(evicted, "spool_full", exc)
                    self.to_spool(batch, why)
                    return
                reason = "spool_full"
            else:
                reason = "spool_unwritable"
            self.drop(len(batch.events), reason, exc)
            return
        self.spool.orphans += 1
        self.stats["spooled"] += len(batch.events)
        if why:
            _log.info("spooled %d events of bucket %r: %s", len(batch.events),
                      batch.bucket_key, why)

    # durable mode: the journal is the spool, written before delivery

    def journal(self, now):
        """Journal batches that are ready or half a sync_interval old; fsync on time.

        Returns the seconds until this must run again, or None if nothing waits.
        """
        half = self.settings["sync_interval"] / 2.0
        due = None
        for batch in list(self.batches):
            if batch.spool_item is not None or batch.journal is not None:
                continue
            age = now - batch.opened
            if age >= half or self.ready(batch, now):
                self.journal_batch(batch)
            else:
                due = half - age if due is None else min(due, half - age)
        if self.unsynced:
            if now - self.last_sync >= half:
                self.spool.sync()
                self.unsynced = False
                self.last_sync = now
            else:
                wait = self.last_sync + half - now
                due = wait if due is None else min(due, wait)
        return None if due is None else max(0.0, due)

    def journal_batch(self, batch):
        """Append one batch to the journal; on failure it is still sent from memory."""
        try:
            batch.journal = self.spool.append(batch.bucket_key, batch.bucket_name,
                                              batch.encoded())
        except OSError as exc:
            self.stats["journal_errors"] += 1
            self.stats["last_error"] = "journal: %s" % exc
            now = _monotonic()
            if now - self.last_drop_warning >= _DROP_WARN_EVERY:
                self.last_drop_warning = now
                _log.warning("cannot write the durable journal (%s); events are kept in "
                             "memory only until it works again", exc)
            return
        self.unsynced = True
        self.stats["journalled"] += len(batch.events)

    def unjournal(self, batch):
        """A journalled batch was delivered or dead-lettered: retire its line."""
        path, start, end = batch.journal
        batch.journal = None
        try:
            self.spool.ack(path, start, end)
        except OSError as exc:
            _log.warning("cannot record delivery in the journal (%s); those events may "
                         "be sent again", exc)

    def segment_sealed(self, path):
        """A journal segment was closed: batches in it are now replayed from disk."""
        for batch in list(self.batches):
            if batch.journal is not None and batch.journal[0] == path:
                self.batches.remove(batch)
                self.in_memory -= len(batch.events)

    def drop(self, count, reason, exc):
        dropped = self.stats["dropped"]
        dropped[reason] = dropped.get(reason, 0) + count
        self.dropped_total += count
        now = _monotonic()
        if now - self.last_drop_warning >= _DROP_WARN_EVERY:
            self.last_drop_warning = now
            _log.warning("dropped %d events (%s: %s); dropped so far: %s", count, reason,
                         exc, dropped)

    def report(self, exc, events):
        callback = self.settings["on_error"]
        if callback is None:
            return
        try:
            callback(exc, list(events))
        except Exception:
            _log.exception("on_error callback raised; ignored")

    def write_offline(self, batch):
        """offline=True: append ``epoch,key,value`` rows to the CSV file."""
        import csv
        import io
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for key, value, epoch in batch.events:
            writer.writerow((repr(epoch), key, value))
        try:
            fd = os.open(self.settings["offline_file"],
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                _write_all(fd, buffer.getvalue().encode("utf-8"))
            finally:
                os.close(fd)
        except OSError as exc:
            self.stats["last_error"] = "writing %s: %s" % (self.settings["offline_file"], exc)
            self.failures += 1
            batch.attempts += 1
            self.retry_at = _monotonic() + _retry_delay(
                self.failures, self.settings["backoff_base"], self.settings["backoff_cap"])
            if batch.attempts >= self.settings["max_retries"] or self.closing:
                self.remove(batch)
                self.drop(len(batch.events), "offline_file_unwritable", exc)
            return
        self.failures = 0
        self.remove(batch)
        self.stats["delivered"] += len(batch.events)
        self.stats["last_success"] = _time()

    # flush and close

    def pending(self, now):
        """True while something is in memory or claimable in the spool."""
        if self.batches or self.queue:
            return True
        if self.spool is None or self.settings["offline"]:
            return False
        return self.spool.pending(now)

    def settle_flushes(self, now):
        if not self.flushes:
            return
        # Live batches stay in seq order, so the first one is the oldest.
        oldest = next((b.seq for b in self.batches if b.spool_item is None), None)
        spool_busy = self.spool is not None and not self.settings["offline"] \
            and self.spool.pending(now)
        keep = []
        for request in self.flushes:
            if (oldest is None or oldest > request.upto) and not spool_busy:
                self.settle(request)
            else:
                keep.append(request)
        self.flushes = keep

    def settle(self, request):
        request.lost = self.dropped_total > request.dropped
        request.done.set()

    def give_up(self):
        """The close deadline passed: spool what is in memory and stop."""
        self.absorb(_monotonic())
        while self.batches:
            batch = self.batches.popleft()
            if batch.spool_item is not None:
                self.spool.release(batch.spool_item)
                continue
            self.in_memory -= len(batch.events)
            if self.settings["offline"]:
                self.drop(len(batch.events), "offline_file_unwritable", None)
            else:
                self.to_spool(batch, "close() deadline reached")
        self.finish()

    def finish(self):
        self.stopped = True
        left = self.pending(_monotonic())
        if self.spool is not None:
            try:
                self.spool.seal_all()
                self.spool.release_all()
                self.spool.cleanup()
            except OSError as exc:
                _log.warning("closing spool segments: %s", exc)
        self.transport.close()
        for request in self.flushes:
            if not left:
                self.settle(request)

    # driving the engine

    def run(self):
        """The worker thread: step, then sleep until woken or something is due."""
        size = self.settings["buffer_size"]
        while not self.stopped:
            self.wake.clear()
            self.wake_at = _NEVER           # awake: log() need not signal us
            try:
                delay = self.step()
            except Exception:               # never let the worker die with events queued
                _log.exception("isstreamer_lite worker error; continuing in 1 s")
                delay = 1.0
            if self.stopped:
                break
            now = _monotonic()
            if self.closing and delay is None and not self.pending(now):
                self.finish()
                break
            if delay is None:
                delay = _IDLE_WAIT
            if delay > 0:
                # While backing off, wake for the queue only when it must spill.
                if self.retry_at > now:
                    self.wake_at = max(size, self.settings["max_queue"] - self.in_memory + 1)
                elif self.in_memory:
                    self.wake_at = max(1, size - self.in_memory)    # when a batch is full
                else:
                    self.wake_at = 1        # the first event starts flush_interval
                if len(self.queue) >= self.wake_at:
                    continue                # filled up before wake_at was armed
                if self.closing:
                    delay = min(delay, max(0.0, self.close_deadline - now))
                self.wake.wait(delay)

    def pump(self, done=None, deadline=None):
        """use_async=False: step in the caller's thread until idle, done or deadline."""
        while not self.stopped:
            self.wake.clear()
            delay = self.step()
            if self.stopped or (done is not None and done.is_set()):
                return
            now = _monotonic()
            if self.closing and delay is None and not self.pending(now):
                self.finish()
                return
            if delay is None or (delay > 0 and done is None and self.retry_at <= now):
                return                      # idle, or only waiting for a batch to fill
            if delay > 0:
                if deadline is None or now + delay > deadline:
                    return
                self.wake.wait(delay)

    def abandon(self):
        """close() ran out of time while the worker is stuck (e.g. resolving DNS).

        Called from the closing thread: marks the engine stopped first, so the
        worker touches nothing when its request returns, then spools what is
        in memory. The batch in flight is spooled too and may be sent twice.
        """
        self.stopped = True
        self.give_up()


# --- Streamer ----------------------------------------------------------------

_open_streamers = set()                 # closed at exit; guarded by _hooks_lock
_hooks_lock = threading.Lock()
_hooks_installed = False


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
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _exit_on_sigterm():
    """Make SIGTERM a normal exit (so the exit hook flushes), unless it is handled.

    Only from the main thread, and only while SIGTERM has its default
    disposition: a handler the application installed is never replaced.
    """
    import signal
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _close_all_at_exit():
    """Flush and close every open Streamer, together, within exit_timeout."""
    with _hooks_lock:
        streamers = list(_open_streamers)
    if not streamers:
        return
    deadline = _monotonic() + max(s._settings["exit_timeout"] for s in streamers)
    for streamer in streamers:
        streamer._begin_close(deadline)
    for streamer in streamers:
        streamer._finish_close(deadline)


def _after_fork_in_child():
    """A forked child starts its Streamers afresh: no parent events, new worker."""
    global _budgets, _budgets_lock, _hooks_lock
    _budgets = {}
    _budgets_lock = threading.Lock()
    _hooks_lock = threading.Lock()
    for streamer in list(_open_streamers):
        streamer._restart_after_fork()


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


class Streamer(object):
    """Stream events to one Initial State bucket at a time.

    Drop-in for ISStreamer 2.0.0's ``Streamer``; the options after ``*`` are
    new and keyword-only. See the README for every option and its default.
    """

    def __init__(self, bucket_name="", bucket_key="", access_key="", ini_file_location=None,
                 debug_level=0, buffer_size=10, offline=None, use_async=True, *,
                 api_base=None, flush_interval=1.0, timeout=10.0, wait_timeout=10.0,
                 exit_timeout=5.0, max_retries=5, backoff_base=0.5, backoff_cap=30.0,
                 retry_after_cap=120.0, pause_interval=60.0, max_queue=10000,
                 spool_dir=None, spool_max_bytes=64 * 1024 * 1024, offline_file=None,
                 on_error=None, ssl_context=None, durable=None, sync_interval=1.0,
                 handle_sigterm=True):
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
            handle_sigterm=handle_sigterm)
        self._settings = settings
        bucket_key, bucket_name = settings.pop("bucket_key"), settings.pop("bucket_name")
        self._strict = debug_level >= 2
        self._echo = debug_level >= 1
        self._bucket = (bucket_key, bucket_name)
        self._closed = False
        self._close_started = False
        self._close_lock = threading.Lock()     # makes close() idempotent
        self._close_request = None
        self._start_engine()
        with _hooks_lock:
            _open_streamers.add(self)
        _install_process_hooks()
        if settings["handle_sigterm"]:
            _exit_on_sigterm()
        if self._echo:
            _log.info("streaming to bucket %r (%r) at %s with access key %s%s%s", bucket_key,
                      bucket_name, "offline file " + settings["offline_file"]
                      if settings["offline"] else settings["api_base"],
                      _mask(settings["access_key"]),
                      "" if settings["use_async"] else " (synchronous)",
                      " (durable)" if settings["durable"] else "")

    def _start_engine(self):
        """Build the engine and, with use_async, its worker thread."""
        s = self._settings
        spool = None if s["offline"] else _Spool(s["spool_dir"], s["access_key"],
                                                 s["spool_max_bytes"])
        transport = _HTTPTransport(s["api_base"], s["timeout"], s["ssl_context"],
                                   s["user_agent"])
        budget = None if s["offline"] else _budget_for(s["api_base"], s["access_key"])
        engine = _Engine(s, transport, spool, budget)
        engine.queue.append(_BucketSwitch(*self._bucket))
        self._engine = engine
        self._queue = engine.queue
        # Keys already validated, so log() need not check them again; emptied
        # on close() and never filled when events are echoed (slow path).
        self._keys = set()
        self._pump_lock = threading.Lock()      # serialises use_async=False delivery
        self._thread = None
        if not s["use_async"]:
            engine.wake_at = 1                  # log() always asks _notify()
        else:
            self._thread = threading.Thread(
                target=engine.run, daemon=True,
                name="isstreamer_lite[%s]" % self._bucket[0][:32])
            self._thread.start()

    def _restart_after_fork(self):
        old = self._engine
        if old.spool is not None:
            old.spool.forget_after_fork()
        old.transport._conn = None
        self._close_lock = threading.Lock()
        if not self._closed:
            self._start_engine()

    # the caller's path

    def log(self, key, value, epoch=None):
        """Queue one event; never blocks. ``epoch``: Unix seconds or a datetime.

        ``key``: a non-empty str of at most 250 characters. ``value``: a str
        of at most 2000 characters, a bool, an int or a finite real number.
        A bad event is not queued: it is a warning, or with ``debug_level``
        2 or more a ValueError/TypeError raised here.
        """
        kind = type(value)
        if epoch is None and type(key) is str and key in self._keys and (
                kind is float and value - value == 0.0 or kind is int or kind is bool
                or kind is str and len(value) <= _MAX_VALUE_CHARS):
            queue = self._queue
            queue.append((key, value, _time()))
            if len(queue) >= self._engine.wake_at:
                self._notify()
            return
        self._log_checked(key, value, epoch)

    def _log_checked(self, key, value, epoch):
        """The slow path of log(): new keys, epochs, conversion, rejection, echo."""
        epoch = _time() if epoch is None else self._epoch(epoch)
        try:
            if self._closed:
                raise StreamerClosedError("the Streamer is closed; event %r was not logged"
                                          % (key,))
            key = _check_key(key)
            value = _normalise_value(key, value)
        except (TypeError, ValueError, StreamerClosedError) as exc:
            if self._strict:
                raise
            _log.warning("event not logged: %s", exc)
            return
        if not (self._echo or self._closed) and len(self._keys) < _KNOWN_KEYS:
            self._keys.add(key)
        queue = self._queue
        queue.append((key, value, epoch))
        if len(queue) >= self._engine.wake_at:
            self._notify()
        if self._echo:
            _log.info("%s: %s %r", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)),
                      key, value)

    def _epoch(self, epoch):
        try:
            return _normalise_epoch(epoch)
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            _log.warning("%s; using the current time instead", exc)
            return _time()

    def _notify(self):
        engine = self._engine
        if self._thread is not None:
            engine.wake_at = _NEVER         # one signal per wake-up is enough
            engine.wake.set()
        elif len(engine.queue) + engine.in_memory >= self._settings["buffer_size"]:
            with self._pump_lock:
                engine.pump(deadline=_monotonic() + self._settings["timeout"])

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
        first_error = None
        for key, value in _flatten(key_prefix, obj):
            try:
                self.log(key, value, epoch)
            except (TypeError, ValueError, StreamerClosedError) as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def set_bucket(self, bucket_name="", bucket_key="", retries=None):
        """Send events logged from now on to another bucket (created if needed).

        Events logged before the call still go to the previous bucket.
        ``retries`` is accepted for ISStreamer compatibility; retrying follows
        ``max_retries``.
        """
        if not bucket_key:
            bucket_key = _new_bucket_key()
        _check_bucket(bucket_key, bucket_name)
        self._bucket = (bucket_key, bucket_name)
        self._queue.append(_BucketSwitch(bucket_key, bucket_name))
        self._notify()

    @property
    def bucket_key(self):
        """The bucket events logged now go to."""
        return self._bucket[0]

    @property
    def bucket_name(self):
        return self._bucket[1]

    BucketKey = bucket_key                  # ISStreamer's attribute names
    BucketName = bucket_name

    # waiting

    def flush(self, timeout=None):
        """Deliver everything logged so far (and this key's spool); True if done.

        Waits at most ``timeout`` seconds (default ``wait_timeout``); what is
        not delivered by then stays queued or spooled and goes later.
        """
        timeout = self._settings["wait_timeout"] if timeout is None else timeout
        if self._engine.stopped:
            return not self._engine.pending(_monotonic())
        request = _FlushRequest()
        self._queue.append(request)
        if self._thread is not None:
            self._engine.wake.set()
            request.done.wait(timeout)
            return request.succeeded()
        deadline = _monotonic() + timeout
        with self._pump_lock:
            self._engine.pump(request.done, deadline)
        return request.succeeded()

    def close(self, timeout=None):
        """Flush, spool what cannot be delivered by the deadline, stop the worker.

        Returns True if everything was delivered. Idempotent; ``log()`` after
        ``close()`` is rejected. ``timeout`` defaults to ``wait_timeout``.
        """
        timeout = self._settings["wait_timeout"] if timeout is None else timeout
        deadline = _monotonic() + timeout
        self._begin_close(deadline)
        return self._finish_close(deadline)

    def _begin_close(self, deadline):
        with self._close_lock:
            if self._close_started:
                return
            self._close_started = True
            self._closed = True
            self._keys = frozenset()
            self._close_request = _FlushRequest()
        engine = self._engine
        self._queue.append(self._close_request)
        # Keep a little time to spool what is left once the deadline passes.
        margin = min(0.5, max(0.0, deadline - _monotonic()) * 0.1)
        engine.close_deadline = deadline - margin
        engine.closing = True
        engine.wake.set()

    def _finish_close(self, deadline):
        engine = self._engine
        if self._thread is not None:
            if not engine.stopped:
                self._thread.join(max(0.0, deadline - _monotonic()))
            if self._thread.is_alive() and not engine.stopped:
                engine.abandon()
        else:
            with self._pump_lock:
                engine.pump(None, deadline)
                if not engine.stopped:
                    engine.give_up()
        with _hooks_lock:
            _open_streamers.discard(self)
        return self._close_request.succeeded()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def stats(self):
        """Counters: logged, delivered, retried, spooled, replayed, dead-lettered..."""
        engine = self._engine
        counters = dict(engine.stats)
        counters["dropped"] = dict(counters["dropped"])
        counters["queued"] = len(engine.queue) + engine.in_memory
        counters["connections"] = engine.transport.connections
        counters["journal_bytes"] = engine.spool.bytes_written if engine.spool else 0
        counters["closed"] = self._closed
        return counters

    def __repr__(self):
        return "<Streamer bucket=%r key=%s %s>" % (
            self._bucket[0], _mask(self._settings["access_key"]),
            "closed" if self._closed else "open")




# --- Local sink --------------------------------------------------------------

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


class _Sink(object):
    """A local server that speaks the events API, for development and tests.

    Accepts ``POST /api/buckets`` and ``POST /api/events`` with the documented
    status codes, keeps what it received in ``events`` (a list of
    ``(bucket_key, event)``) and ``buckets``, and with ``rate_limit`` set
    enforces that many requests per ``window`` seconds with the
    X-RateLimit-* headers and 429 + Retry-After. Subclasses may override
    ``fault(handler, path)`` to answer a request their own way (tests do).
    """

    def __init__(self, host="127.0.0.1", port=0, rate_limit=None, window=10.0,
                 access_key=None, jsonl=None, echo=None, ssl_context=None):
        self.host = host
        self.ssl_context = ssl_context
        self.port = port
        self.rate_limit = rate_limit
        self.window = window
        self.access_key = access_key
        self.jsonl = jsonl
        self.echo = echo
        self.events = []
        self.buckets = {}
        self.requests = 0
        self.connections = 0
        self.rate_limited = 0
        self.changed = threading.Condition()   # guards the counters and lists above
        self._window_start = 0.0
        self._window_used = 0
        self._server = None
        self._thread = None

    @property
    def url(self):
        return "%s://%s:%d" % ("https" if self.ssl_context else "http", self.host, self.port)

    def start(self):
        import http.server
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

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, OSError)):
                    http.server.HTTPServer.handle_error(self, request, client_address)

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(self._server.socket,
                                                               server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name="isstreamer_lite-sink")
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5.0)
            self._server = None

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

    def _rate_headers(self):
        """Count this request against the window; return (allowed, headers)."""
        if not self.rate_limit:
            return True, {}
        now = _time()
        if now >= self._window_start + self.window:
            self._window_start = now - (now % self.window) if self.window >= 1 else now
            self._window_used = 0
        self._window_used += 1
        reset = self._window_start + self.window
        headers = {"X-RateLimit-Limit": self.rate_limit,
                   "X-RateLimit-Remaining": max(0, self.rate_limit - self._window_used),
                   "X-RateLimit-Reset": "%.3f" % reset}
        if self._window_used > self.rate_limit:
            headers["Retry-After"] = "%.3f" % max(0.0, reset - now)
            return False, headers
        return True, headers

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
        with self.changed:
            existed = bucket_key in self.buckets
            self.buckets[bucket_key] = data.get("bucketName", "")
        self.reply(handler, 204 if existed else 201)

    def _add_events(self, handler, data):
        bucket_key = handler.headers.get("X-IS-BucketKey")
        with self.changed:
            allowed, headers = self._rate_headers()
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
        if self.echo is not None:
            for item in items:
                self.echo("%s %s = %r" % (bucket_key, item["key"], item["value"]))
        self.reply(handler, 204, b"", headers)


# --- Command line ------------------------------------------------------------

def _selftest(out):
    """The offline smoke test: stream through a loopback sink and check arrival."""
    import shutil
    import tempfile
    started = _monotonic()
    sink = _Sink().start()
    spool_dir = tempfile.mkdtemp(prefix="isstreamer_lite-selftest-")
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
    out.write("  %d events in %d requests over %d connection(s) to a loopback server, "
              "%.2f s\n" % (len(sink.events), stats["requests"], sink.connections, elapsed))
    for problem in problems:
        out.write("  FAIL: %s\n" % problem)
    out.write("  %s\n" % ("FAILED" if problems else "OK: bucket created, events batched, "
                          "delivered intact and in order"))
    return 1 if problems else 0


class _UsageError(Exception):
    """A command-line input the user must fix (exit status 2)."""


class _Stop(BaseException):
    """SIGTERM arrived while a command was streaming."""


def _parse_cli_value(text, raw=False):
    """A command-line value: true/false -> bool, numbers -> int/float, else str."""
    if raw:
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
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

    Accepts ``key,value``, ``key=value`` and JSON objects with ``key``,
    ``value`` and optional ``epoch`` or ``iso8601``. Raises ValueError.
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
    """A second SIGTERM while closing ends the process at once, as usual."""
    import signal
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


def _cmd_send(args, out, err):
    if len(args.pairs) % 2:
        raise _UsageError("send takes KEY VALUE pairs; got %d words" % len(args.pairs))
    epoch = _parse_epoch(args.epoch) if args.epoch else None
    events = []
    for i in range(0, len(args.pairs), 2):
        key = _check_key(args.pairs[i])
        events.append((key, _normalise_value(key, _parse_cli_value(args.pairs[i + 1],
                                                                   args.raw))))
    streamer = Streamer(**_cli_options(args))
    for key, value in events:
        streamer.log(key, value, epoch)
    delivered = streamer.close(args.timeout)
    stats = streamer.stats()
    if delivered:
        out.write("sent %d events to bucket %s\n" % (len(args.pairs) // 2, streamer.bucket_key))
        return 0
    if stats["dropped"]:
        err.write("events were dropped: %s\n" % stats["dropped"])
    err.write("not everything was delivered within %g s (%s): what is left of these events "
              "and of the key's earlier backlog is spooled and will be sent later\n"
              % (args.timeout, stats["last_error"] or "server did not answer"))
    return 1


def _cmd_pipe(args, out, err):
    streamer = Streamer(**_cli_options(args))
    bad = lines = 0
    previous = _install_sigterm_stop()
    try:
        for number, line in enumerate(iter(sys.stdin.readline, ""), 1):
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
    _restore_sigterm()
    delivered = streamer.close(args.timeout)
    _restore_sigterm(previous)
    err.write("%d lines read, %d skipped, %s\n" % (lines, bad, "all delivered" if delivered
              else "some not delivered yet (spooled: %d)" % streamer.stats()["spooled"]))
    return 0 if delivered else 1


def _spool_summary(spool_dir, access_key=None):
    """Pending spool contents per bucket: list of dicts (no network)."""
    rows = []
    keys = [_fingerprint(access_key)] if access_key else sorted(
        d for d in (os.listdir(spool_dir) if os.path.isdir(spool_dir) else [])
        if os.path.isdir(os.path.join(spool_dir, d)))
    for fingerprint in keys:
        folder = os.path.join(spool_dir, fingerprint)
        for bucket in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, bucket)
            if not os.path.isdir(path):
                continue
            try:
                with open(os.path.join(path, "bucket.json"), encoding="utf-8") as handle:
                    meta = _json_load(handle.read())
            except (OSError, ValueError):
                meta = {}
            lines = events = segments = 0
            for name in sorted(os.listdir(path)):
                if not name.endswith(_SPOOL_SUFFIX):
                    continue
                segments += 1
                segment = os.path.join(path, name)
                with open(segment, "rb") as handle:
                    data = handle.read()
                bodies = [body for _, _, body, torn in _unretired_lines(segment, data)
                          if not torn]
                lines += len(bodies)
                events += _count_events(bodies)
            if not lines:
                continue
            rows.append({"key": fingerprint, "bucket_key": meta.get("bucketKey", "?"),
                         "bucket_name": meta.get("bucketName", ""), "segments": segments,
                         "lines": lines, "events": events})
    return rows


def _replay_spool(settings, paths, timeout):
    """Send spooled lines (all of the key's, or just ``paths``); return stats, pending."""
    spool = _Spool(settings["spool_dir"], settings["access_key"], settings["spool_max_bytes"],
                   only=paths)
    transport = _HTTPTransport(settings["api_base"], settings["timeout"],
                               settings["ssl_context"], settings["user_agent"])
    engine = _Engine(settings, transport, spool, _budget_for(settings["api_base"],
                                                            settings["access_key"]))
    deadline = _monotonic() + timeout
    engine.closing, engine.close_deadline = True, deadline
    engine.pump(None, deadline)
    if not engine.stopped:
        engine.give_up()
    return engine.stats, spool.pending(_monotonic() + 2.0)


def _cmd_replay(args, out, err):
    if args.csv:
        if not args.bucket_key:
            raise _UsageError("replay --csv needs --bucket-key (an offline CSV has no bucket)")
        import csv
        streamer = Streamer(**_cli_options(args))
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
        out.write("%s %d events from %s to bucket %s\n" % (
            "sent" if delivered else "could not send all of", count, args.csv, args.bucket_key))
        return 0 if delivered else 1
    options = _cli_options(args, bucket_key="replay")
    if args.dry_run:
        spool_dir = _resolve_settings(**dict(options, offline=True))["spool_dir"]
        key = None
        try:
            key = _resolve_settings(**options)["access_key"]
        except ConfigError:
            pass
        rows = _spool_summary(spool_dir, key)
        if not rows:
            out.write("nothing pending in %s\n" % spool_dir)
        for row in rows:
            out.write("key %s bucket %r (%s): %d events in %d lines, %d segment(s)\n" % (
                row["key"], row["bucket_key"], row["bucket_name"] or "no name", row["events"],
                row["lines"], row["segments"]))
        return 0
    options.pop("bucket_key")
    settings = _resolve_settings(**dict(options, bucket_key="replay"))
    paths = [os.path.abspath(p) for p in args.files] or None
    stats, pending = _replay_spool(settings, paths, args.timeout)
    out.write("replayed %d events in %d requests; %d dead-lettered; %s\n" % (
        stats["replayed"], stats["requests"], stats["dead_lettered"],
        "spool empty" if not pending else "some remain (%s)" % stats["last_error"]))
    return 1 if pending else 0


def _cmd_sink(args, out, err):
    def echo(line):
        out.write(line + "\n")
        out.flush()
    sink = _Sink(args.host, args.port, args.rate_limit, args.window,
                 access_key=args.access_key, jsonl=args.jsonl,
                 echo=None if args.quiet else echo)
    sink.start()
    previous = _install_sigterm_stop()
    try:
        out.write("events API on %s (IS_API_BASE=%s); Ctrl-C to stop\n" % (sink.url, sink.url))
        out.flush()
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        _restore_sigterm(previous)
        sink.stop()
    out.write("%d events in %d requests\n" % (len(sink.events), sink.requests))
    return 0


def _cmd_selftest(args, out, err):
    if not args.live:
        return _selftest(out)
    settings = _resolve_settings(**_cli_options(args, bucket_key=args.bucket_key or
                                                "isstreamer_lite-selftest",
                                                bucket_name=args.bucket_name or
                                                "isstreamer_lite selftest"))
    transport = _HTTPTransport(settings["api_base"], settings["timeout"], None,
                               settings["user_agent"])
    engine = _Engine(settings, transport, None, None)
    now = _time()
    events = [("selftest_number", 1), ("selftest_text", "hello from isstreamer_lite"),
              ("selftest_flag", True)]
    out.write("live selftest against %s with access key %s, bucket %r\n" % (
        settings["api_base"], _mask(settings["access_key"]), settings["bucket_key"]))
    failed = False
    for path, body in (("/api/buckets", _json_bytes({"bucketKey": settings["bucket_key"],
                                                     "bucketName": settings["bucket_name"]})),
                       ("/api/events", _encode_events([e + (now,) for e in events]))):
        response, error = engine.request(path, body, settings["bucket_key"])
        if error is not None:
            out.write("  POST %s: %s: %s\n" % (path, type(error).__name__, error))
            failed = True
            continue
        limits = ", ".join("%s=%s" % (h, response.headers[h]) for h in (
            "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after")
            if h in response.headers)
        out.write("  POST %s -> %d %s%s\n" % (path, response.status, response.text(200),
                                              " (%s)" % limits if limits else ""))
        failed = failed or not 200 <= response.status < 300
    transport.close()
    out.write("  %s\n" % ("FAILED" if failed else "OK: the account accepted 3 test events"))
    return 1 if failed else 0


_EXAMPLES = {
    "selftest": "python3 -m isstreamer_lite selftest\n"
                "  IS_ACCESS_KEY=ist_... python3 -m isstreamer_lite selftest --live",
    "send": "IS_ACCESS_KEY=ist_... python3 -m isstreamer_lite send --bucket-key garden "
            "temperature 21.5 door_open false",
    "pipe": "tail -f /var/log/sensor.log | python3 -m isstreamer_lite pipe --bucket-key garden\n"
            "  printf 'temp,21.5\\nhumidity=40\\n{\"key\": \"ok\", \"value\": true}\\n' | "
            "python3 -m isstreamer_lite pipe",
    "replay": "python3 -m isstreamer_lite replay --dry-run\n"
              "  python3 -m isstreamer_lite replay --csv isstreamer_out.csv --bucket-key garden",
    "sink": "python3 -m isstreamer_lite sink --port 8080 --jsonl events.jsonl\n"
            "  IS_API_BASE=http://127.0.0.1:8080 python3 my_sensor_script.py",
}


def _build_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="python3 -m isstreamer_lite",
        description="Stream events to Initial State from the shell. With no command, run "
                    "the offline smoke test.",
        epilog="Key, bucket and API base come from the flags, then IS_ACCESS_KEY, "
               "IS_BUCKET_KEY, IS_BUCKET_NAME, IS_API_BASE, then isstreamer.ini. "
               "Exit codes: 0 ok, 1 delivery failed or events remain undelivered, "
               "2 usage or configuration error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="isstreamer_lite " + __version__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--access-key", help="access key (prefer IS_ACCESS_KEY: flags show "
                                             "in the process list)")
    common.add_argument("--bucket-key", help="bucket key (default: IS_BUCKET_KEY, ini, "
                                             "or a new one)")
    common.add_argument("--bucket-name", help="bucket name shown in the UI")
    common.add_argument("--api-base", help="API base URL (default https://groker.init.st)")
    common.add_argument("--ini", help="isstreamer.ini to read (default: ~/ then ./)")
    common.add_argument("--spool-dir", help="spool folder (default: IS_SPOOL_DIR, ini, "
                                            "~/.local/state/isstreamer_lite)")
    common.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for delivery (default 30)")
    common.add_argument("--debug", type=int, default=0, help="debug_level (0-3)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text, description):
        return commands.add_parser(
            name, parents=[common], help=help_text,
            description=description + "\n\nexample:\n  " + _EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = command("selftest", "offline smoke test (the default command)",
                  "Start a loopback events server, stream events through the whole pipeline "
                  "and check that they arrived. With --live, send three test events to the "
                  "configured account and show the server's answers and rate-limit headers.")
    sub.add_argument("--live", action="store_true", help="talk to the configured API")
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
    sub = commands.add_parser(
        "sink", help="run a local events API server for development",
        description="A local server that speaks the events API, prints each event and "
                    "answers with the documented status codes and rate-limit headers.\n\n"
                    "example:\n  " + _EXAMPLES["sink"],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                         "127.0.0.1)")
    sub.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any)")
    sub.add_argument("--jsonl", help="also append each event as a JSON line to this file")
    sub.add_argument("--rate-limit", type=int, help="requests allowed per window (default "
                                                    "unlimited)")
    sub.add_argument("--window", type=float, default=10.0, help="window seconds (default 10)")
    sub.add_argument("--quiet", action="store_true", help="do not print events")
    sub.add_argument("--access-key", help="accept only this access key (others get 401, "
                                          "to try a wrong key); default: any")
    return parser


def main(argv=None):
    """The command line; returns the exit status (see ``--help``)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    handlers = {None: None, "selftest": _cmd_selftest, "send": _cmd_send,
                "pipe": _cmd_pipe, "replay": _cmd_replay, "sink": _cmd_sink}
    if args.command is None:
        return _selftest(out)
    try:
        return handlers[args.command](args, out, err)
    except (_UsageError, ConfigError, ValueError, TypeError, OSError) as exc:
        err.write("isstreamer_lite %s: %s\n" % (args.command, exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
