"""set_bucket: switch to a new bucket mid-run; key1=starting lands in both.

With no bucket_key a new random one (uuid4) is made for each bucket.

    IS_ACCESS_KEY=ist_... python3 examples/switch_bucket.py
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

streamer = Streamer(bucket_name="Starting Bucket")
streamer.log("key1", "starting")
streamer.set_bucket(bucket_name="New Bucket")   # events from now on go to the new bucket
streamer.log("key1", "starting")
streamer.close()
