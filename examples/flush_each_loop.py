"""A dynamic buffer: a large buffer_size and one flush() at the end of each loop.

Each pass logs a counter, a dict and a list whose length changes from pass
to pass; flush() sends the whole pass at once, however many events it made.

    IS_ACCESS_KEY=ist_... python3 examples/flush_each_loop.py
"""
import importlib.util
import os
import sys
import time

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

streamer = Streamer(bucket_name="Dynamic Buffer", bucket_key="dynamic_buffer_example",
                    buffer_size=200)
for counter in range(3):
    streamer.log("loop_counter", counter)
    streamer.log_object({"a": 1, "b": 2, "c": 3}, key_prefix="some_dict")
    dynamic_list = list(range(counter + 1))     # its length is not known in advance
    streamer.log_object(dynamic_list)           # keys list_0, list_1, ...
    streamer.flush()
    time.sleep(0.01)        # a real device would sleep for seconds here
streamer.close()
