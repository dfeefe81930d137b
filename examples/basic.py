"""Basic usage: create (or append to) a bucket, log two events, flush, close.

Run from the repository root:
    IS_ACCESS_KEY=ist_... python3 examples/basic.py
or against the local server (python3 -m isstreamer_lite sink):
    IS_ACCESS_KEY=ist_any IS_API_BASE=http://127.0.0.1:PORT python3 examples/basic.py
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

# The access key comes from IS_ACCESS_KEY (or isstreamer.ini), never from here.
streamer = Streamer(bucket_name="Some Bucket Name", bucket_key="bucket_key")
streamer.log("test", "hi")
streamer.log("temperature", 32)
streamer.flush()            # send what is buffered now
streamer.close()            # flush again and stop the worker
