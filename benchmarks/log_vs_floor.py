"""log() against deque.append, timed call by call, optionally beside another checkout.

    python3 benchmarks/log_vs_floor.py [--baseline PATH_TO_ANOTHER_CHECKOUT] [--repeats 5]

For float, int and str values, the median single-call cost of log() over
that of ``deque.append((key, value, time.time()))`` in the same process
(the target is at most 3x), repeated in fresh processes, interleaved with
the baseline checkout when one is given (``git worktree add /tmp/old REV``).
"""
import argparse
import os
import statistics
import subprocess
import sys
CHILD = r'''
import sys, time, collections, tempfile
sys.path.insert(0, sys.argv[1])
import isstreamer_lite as lite
s = lite.Streamer("b", "bench", "ist_bench_key_000000", ini_file_location=False,
                  api_base="http://127.0.0.1:9", spool_dir=tempfile.mkdtemp(), buffer_size=10**6,
                  max_queue=10**7, flush_interval=3600, exit_timeout=0)
pc = time.perf_counter
q = collections.deque(); now = time.time
def med(f, n=200000):
    t = []
    for i in range(n):
        a = pc(); f(i); t.append(pc() - a)
    t.sort(); return t[n // 2]
s.log("temperature", 1.5)
for kind, make in (("float", lambda i: 21.5 + i), ("int", lambda i: i), ("str", lambda i: "on")):
    floor = med(lambda i: q.append(("temperature", i, now())))
    cost = med(lambda i, m=make: s.log("temperature", m(i)))
    print(kind, cost / floor)
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="another checkout to measure beside this one")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkouts = [("this", here)] + ([("baseline", args.baseline)] if args.baseline else [])
    results = {name: {} for name, _ in checkouts}
    for _ in range(args.repeats):
        for name, path in checkouts:
            out = subprocess.run([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, universal_newlines=True,
                                 timeout=300).stdout
            for line in out.split("\n"):
                if line:
                    kind, ratio = line.split()
                    results[name].setdefault(kind, []).append(float(ratio))
    worst = 0.0
    for kind in ("float", "int", "str"):
        mine = statistics.median(results["this"][kind])
        worst = max(worst, mine)
        line = "%-5s log() / deque.append, median of %d: %.2f (target <= 3)" % (
            kind, args.repeats, mine)
        if args.baseline:
            base = statistics.median(results["baseline"][kind])
            line += "; baseline %.2f; this / baseline %.2f" % (base, mine / base)
        print(line)
    return 0 if worst <= 3.0 else 1


if __name__ == "__main__":
    sys.exit(main())
