"""offline=True: nothing is sent; rows epoch,key,value go to a CSV file.

The file is ./isstreamer_out.csv (offline_file in isstreamer.ini changes it)
and is appended to, never truncated. No access key is needed.

    python3 examples/offline_csv.py && cat isstreamer_out.csv
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

logger = Streamer(bucket_name="Stream Example", bucket_key="offline_csv_example",
                  offline=True)
logger.log("My Messages", "Stream Starting")
for num in range(1, 7):
    logger.log("My Numbers", num)
    logger.log("My Booleans", num % 2 == 1)
    if num % 3 == 0:
        logger.log("My Events", "pop")
logger.log("My Messages", "Stream Done")
logger.close()
