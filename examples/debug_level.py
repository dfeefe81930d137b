"""debug_level: 1 echoes each event on stderr; 2 or more also raises on bad events.

The access key is never shown in full.

    IS_ACCESS_KEY=ist_... python3 examples/debug_level.py
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

streamer = Streamer(bucket_name="SomeBucketName", bucket_key="debug_level_example",
                    debug_level=2)
streamer.log("temperature", 21.5)           # echoed: "... temperature 21.5"
try:
    streamer.log("temperature", float("nan"))
except ValueError as exc:                   # at debug_level 0 or 1: a warning instead
    print("rejected:", exc)
streamer.close()
