"""set_bucket: switch to a new bucket mid-run; key1=starting lands in both.

Both buckets have a fixed bucket_key, so running it again appends to the
same two buckets. Without one, each run would create two new buckets (a new
random uuid4 key each time).

    IS_ACCESS_KEY=ist_... python3 examples/switch_bucket.py
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

streamer = Streamer(bucket_name="Starting Bucket", bucket_key="switch_bucket_start")
streamer.log("key1", "starting")
# Events logged from now on go to the new bucket; the one above stays in the first.
streamer.set_bucket(bucket_name="New Bucket", bucket_key="switch_bucket_new")
streamer.log("key1", "starting")
streamer.close()
