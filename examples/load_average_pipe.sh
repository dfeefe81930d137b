#!/bin/sh
# Stream the 1-minute load average every 10 s with the pipe command: a
# shell loop is all it takes. Stop it with Ctrl-C; what was read is flushed.
#   IS_ACCESS_KEY=ist_... sh examples/load_average_pipe.sh
# INTERVAL and COUNT (0 = forever) override the defaults; PYTHON picks the
# interpreter.
INTERVAL=${INTERVAL:-10}
COUNT=${COUNT:-0}
i=0
while [ "$COUNT" -eq 0 ] || [ "$i" -lt "$COUNT" ]; do
    echo "load_1m,$(cut -d' ' -f1 /proc/loadavg)"
    i=$((i + 1))
    sleep "$INTERVAL"
done | "${PYTHON:-python3}" -m isstreamer_lite pipe --bucket-key pi_load --bucket-name "Pi load"
