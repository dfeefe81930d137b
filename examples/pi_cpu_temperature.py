"""Stream a Raspberry Pi's CPU temperature every 10 seconds.

Reads /sys/class/thermal/thermal_zone0/temp (millidegrees Celsius) and logs
it as "cpu_temp_c". A read that fails (the file missing for a moment, an I/O
error, a garbled value) is a warning on stderr, and the next read comes
after the usual interval. Runs until stopped; SIGTERM (systemctl stop) or
Ctrl-C flush what was logged before the process exits. Run it as a service
with examples/isstreamer-pi.service, or by hand:
    IS_ACCESS_KEY=ist_... python3 examples/pi_cpu_temperature.py
CPU_TEMP_INTERVAL, CPU_TEMP_COUNT (readings to log, 0 = forever) and
CPU_TEMP_FILE override the defaults, for trying it elsewhere.
"""
import importlib.util
import os
import sys
import time

if importlib.util.find_spec("isstreamer_lite") is None:     # run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isstreamer_lite import Streamer

SENSOR = os.environ.get("CPU_TEMP_FILE", "/sys/class/thermal/thermal_zone0/temp")
INTERVAL = float(os.environ.get("CPU_TEMP_INTERVAL", "10"))
COUNT = int(os.environ.get("CPU_TEMP_COUNT", "0"))

streamer = Streamer(bucket_name="Pi CPU", bucket_key="pi_cpu")
readings = 0
while COUNT == 0 or readings < COUNT:
    try:
        with open(SENSOR) as sensor:
            celsius = int(sensor.read().strip()) / 1000.0
    except (OSError, ValueError) as exc:      # one bad read must not end the stream
        print("warning: could not read %s: %s; trying again in %g s" % (SENSOR, exc, INTERVAL),
              file=sys.stderr, flush=True)
    else:
        streamer.log("cpu_temp_c", celsius)
        readings += 1
        print("cpu_temp_c %.1f" % celsius, flush=True)
    time.sleep(INTERVAL)
streamer.close()
