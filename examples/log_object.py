"""log_object: one event per item of a dict, a list or an object's fields.

Keys are <prefix>_<dict key | list index | attribute>; the default prefix is
the type's name (dict, list, svmem, ...) and key_prefix= replaces it. All
events of one call share one timestamp.

    IS_ACCESS_KEY=ist_... python3 examples/log_object.py
"""
import collections
import importlib.util
import os
import sys

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

# The shape of psutil.virtual_memory(), without needing psutil.
svmem = collections.namedtuple("svmem", "total available percent")

streamer = Streamer(bucket_name="test object logging", bucket_key="log_object_example")
streamer.log_object({"foo": "1", "bar": "2"})               # dict_foo, dict_bar
streamer.log_object([12.5, 40.0], key_prefix="cpu")        # cpu_0, cpu_1
streamer.log_object(["1", "2", "3"])                        # list_0, list_1, list_2
streamer.log_object(svmem(8000, 6000, 25.0))                # svmem_total, ...
streamer.close()
