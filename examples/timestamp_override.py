"""Overriding the timestamp: log(..., epoch=) stamps events with your own time.

Each pass takes one time.time() and logs two events with it, a moment
apart: both carry the same timestamp.

    IS_ACCESS_KEY=ist_... python3 examples/timestamp_override.py
"""
import importlib.util
import os
import sys
import time

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

streamer = Streamer(bucket_name="Time Override Example",
                    bucket_key="timestamp_override_example")
for x in range(3):
    iteration_time = time.time()
    streamer.log("iteration", x, epoch=iteration_time)
    time.sleep(0.01)        # later, but stamped with the same time
    streamer.log("message", "same time", epoch=iteration_time)
    streamer.flush()
streamer.close()
