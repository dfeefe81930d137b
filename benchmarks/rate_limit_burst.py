#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The isstreamer_lite authors
"""900 events as fast as possible against the documented rate limit, at full scale.

The test suite runs this scenario at a tenth of the time scale (30 requests per
1 s window); this script runs it as the API documents it: 3 requests a second
counted in 10 s windows (30 per window), on a loopback sink. It prints what was
lost, how many 429s the server sent and the elapsed time against the least
the limit allows from that start (the sink's windows begin on multiples of the
window, like a server's clock)::

    python3 benchmarks/rate_limit_burst.py            # about 20 s
    python3 benchmarks/rate_limit_burst.py --window 1 # the test suite's scale
"""

import argparse
import collections
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import isstreamer_lite as lite  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=900)
    parser.add_argument("--buffer-size", type=int, default=10)
    parser.add_argument("--limit", type=int, default=30, help="requests per window")
    parser.add_argument("--window", type=float, default=10.0, help="window seconds")
    args = parser.parse_args()
    sink = lite._Sink(rate_limit=args.limit, window=args.window).start()
    spool = tempfile.mkdtemp(prefix="isl-rate-")
    try:
        streamer = lite.Streamer("", "rate-burst", "ist_rate_burst_local", ini_file_location=False,
                                 api_base=sink.url, spool_dir=spool,
                                 buffer_size=args.buffer_size, handle_sigterm=False)
        started_wall, started = time.time(), time.monotonic()
        for i in range(args.events):
            streamer.log("v", i)
        flushed = streamer.flush(10 * args.window + 60)
        elapsed = time.monotonic() - started
        streamer.close(5)
    finally:
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)
    values = collections.Counter(event["value"] for _, event in sink.events)
    requests = math.ceil(args.events / float(args.buffer_size))
    windows = math.ceil(requests / float(args.limit))
    # The last window the burst needs opens (windows - 1) boundaries after the start.
    into_first = started_wall % args.window if args.window >= 1 else 0.0
    minimum = (windows - 1) * args.window - into_first
    print("events %d, delivered %d, lost %d, duplicated %d, flushed %s"
          % (args.events, len(values), sum(1 for i in range(args.events) if not values[i]),
             sum(n - 1 for n in values.values() if n > 1), flushed))
    print("requests %d (the batch requests need %d), 429 answers %d"
          % (sink.requests, requests, sink.rate_limited))
    print("elapsed %.2f s; the limit allows no less than %.2f s from this start; ratio %.2f"
          % (elapsed, minimum, elapsed / minimum if minimum > 0 else float("nan")))
    return 0 if flushed and len(values) == args.events and sink.rate_limited <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
