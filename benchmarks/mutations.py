"""Remove one behaviour at a time from the module and show which tests catch it.

    python3 benchmarks/mutations.py [--only NAME]

Each mutation edits a copy of isstreamer_lite.py in a temporary folder (the
repository is not touched), runs the tests that guard the behaviour, and
prints whether at least one of them failed, as it must. Exit status 1 if a
mutation survived (no test noticed the behaviour was gone).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (behaviour, text in the module, what replaces it, tests that must notice)
MUTATIONS = [
    ("flush_interval",
     "            or now - since >= flush_interval)", "            or False)",
     ["WorkerTest.test_partial_batch_waits_for_flush_interval",
      "CoreStepTest.test_calls_carry_at_most_buffer_size_events",
      "BatchingTest.test_flush_interval_sends_a_partial_batch"]),
    ("Retry-After",
     'return _Decision(_WAIT, max(floor, min(after, retry_after_cap)), "rate_limited")',
     'return _Decision(_WAIT, floor, "rate_limited")',
     ["WorkerTest.test_retry_after_is_waited_on_the_clock",
      "CoreStepTest.test_retries_back_off_and_429_waits_as_told",
      "DecideTest.test_429_waits_retry_after_seconds"]),
    ("max_queue",
     "        over = self.count - limit\n", "        over = 0\n",
     ["WorkerTest.test_max_queue_spills_only_the_excess_while_a_request_is_out",
      "CoreStepTest.test_max_queue_sets_aside_the_oldest_excess", "BlockedQueueTest"]),
    ("per-thread ordering",
     "        runs[-1].events.extend(events)", "        runs[-1].events.extendleft(events)",
     ["BatchingTest.test_threads_exactly_once_in_order"]),
    ("per-call cap of buffer_size events",
     "        most, ready = self.settings.buffer_size, self._ready(now)\n",
     "        most, ready = _NEVER, self._ready(now)\n",
     ["WorkerTest.test_behind_means_calls_of_buffer_size",
      "CoreStepTest.test_calls_carry_at_most_buffer_size_events",
      "WorkerTest.test_spooled_line_over_buffer_size_goes_in_slices_acked_once_all_are_delivered"]),
    ("live first",
     "        elif not head.live and live_due:",
     "        elif False:",
     ["WorkerTest.test_live_events_go_before_spool_replay_waiting_for_the_window",
      "CoreStepTest.test_live_events_go_before_a_backlog_batch_that_waits"]),
    ("shared budget",
     "            if fields is not None:\n", "            if False:\n",
     ["RateBudgetTest.test_processes_of_one_key_spend_one_window_through_a_file",
      "SharedPacingTest"]),
    ("turns first come, first served",
     "                self._booked.append(self._next)\n"
     "                wait = self._next - now\n"
     "                self._next += (self._reset - self._next) / self._remaining\n"
     "                return wait\n",
     "                return self._next - now\n",
     ["RateBudgetTest.test_processes_take_turns_in_the_order_they_asked"]),
    ("413 splitting",
     'return _Decision(_SPLIT, 0.0, "too_large")', 'return _Decision(_RETRY, 0.1, "too_large")',
     ["WorkerTest.test_413_splits_and_400_bisects",
      "CoreStepTest.test_413_halves_and_400_narrows_down_to_the_refused_event", "SplitTest"]),
    ("400 bisection",
     'return _Decision(_BISECT, 0.0, "rejected")', 'return _Decision(_REFUSE, 0.0, "rejected")',
     ["WorkerTest.test_413_splits_and_400_bisects",
      "CoreStepTest.test_413_halves_and_400_narrows_down_to_the_refused_event", "PoisonTest"]),
    ("spool replay",
     "        if batch is None and action.claim and reader.claim(now):",
     "        if batch is None and False:",
     ["DoneWhenTest.test_down_for_the_whole_run_then_new_process_delivers",
      "CliReplayTest.test_spool_of_killed_process_sent_once"]),
    ("durable journalling",
     "        self.journal = spool and settings.durable\n", "        self.journal = False\n",
     ["CrashTest.test_durable_survives_sigkill_under_server_faults", "DurableJournalTest"]),
    ("key masking",
     'return "..." + secret[-4:] if len(secret) > 8 else "****"', "return secret",
     ["KeyLeakTest", "StatusTest.test_status_shows_backlog_error_and_exit_1"]),
    ("SIGTERM handling",
     "                signal.signal(number, _on_sigterm)", "                pass",
     ["CrashTest.test_sigterm_loses_nothing"]),
    ("fsync before rename",
     "        _write_all(fd, data)\n        os.fsync(fd)\n", "        _write_all(fd, data)\n",
     ["CrashStateTest"]),
    ("fsync of a new folder",
     "        _fsync_dir(os.path.dirname(folder))     # the new entry", "        pass  #",
     ["CrashStateTest"]),
    ("fsync of a new .ack",
     "            if created or not segment.ack_ready:\n",
     "            if False:\n", ["CrashStateTest"]),
    ("segment removal order",
     "    if durable:\n        _fsync_dir(os.path.dirname(path))\n    try:\n"
     "        os.unlink(path + _ACK_SUFFIX)",
     "    try:\n        os.unlink(path + _ACK_SUFFIX)", ["CrashStateTest"]),
    ("torn .ack record",
     "            record = b\"\\n\" + record\n", "            pass\n",
     ["SpoolRepairTest"]),
    ("bucket.json repair",
     "            bucket = self.known.get(os.path.basename(folder))",
     "            bucket = None", ["SpoolRepairTest"]),
    ("timeout halves",
     "                self.batches.split(batch)   # too slow a link for it: retried in halves",
     "                pass", ["WorkerTest.test_timed_out_request_is_retried_in_halves_never_bigger"]),
    ("deadline fits the body",
     " + size / float(_SLOWEST_LINK)", "",
     ["WorkerTest.test_request_deadline_grows_with_its_body"]),
    ("inactivity timeout",
     "        return self._exchange(_Exchange(path, body, headers, deadline), quick)",
     "        deadline = min(deadline, _monotonic() + self.timeout)\n"
     "        return self._exchange(_Exchange(path, body, headers, deadline), quick)",
     ["SlowLinkTest.test_slow_upload_is_not_a_timeout"]),
    ("reset on give-up",
     "    try:\n        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER",
     "    return\n    try:\n        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER",
     ["SlowLinkTest.test_abandoned_request_is_reset_not_delivered_later"]),
    ("quick call in the worker",
     'quick = not self._posting', "quick = False",
     ["CourierTest.test_call_answered_at_once_needs_no_thread"]),
    ("late answer read whole",
     "        self.pos = 0\n\n    def line(self):", "        pass\n\n    def line(self):",
     ["QuickPostTest.test_answer_cut_by_the_quick_time_is_parsed_again_whole"]),
    ("a late worker at exit",
     "        late = [streamer for streamer, session in closing\n"
     "                if not session.worker.stopped.is_set()]",
     "        late = []",
     ["ProcessTest.test_exit_hook_waits_for_a_late_worker_to_spool"]),
    ("the exit hook",
     "    atexit.register(_close_all_at_exit)", "    pass",
     ["ProcessTest.test_exit_without_close_delivers",
      "ExamplesTest.test_script_without_close_delivers_at_exit"]),
]


def run_one(name, old, new, tests, python):
    folder = tempfile.mkdtemp(prefix="isl-mutation-")
    try:
        for name_ in ("isstreamer_lite.py", "test_isstreamer_lite.py"):
            shutil.copy(os.path.join(HERE, name_), folder)
        shutil.copytree(os.path.join(HERE, "examples"), os.path.join(folder, "examples"))
        path = os.path.join(folder, "isstreamer_lite.py")
        with open(path) as handle:
            source = handle.read()
        if source.count(old) != 1:
            return "the text to remove was not found once (%d times)" % source.count(old), None
        with open(path, "w") as handle:
            handle.write(source.replace(old, new))
        started = time.monotonic()
        result = subprocess.run(
            [python, "-m", "unittest"] + ["test_isstreamer_lite." + t for t in tests],
            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=600)
        failed = [line.split("(")[0].split(":", 1)[1].strip() for line in
                  result.stdout.splitlines() if line.startswith(("FAIL:", "ERROR:"))]
        return failed, time.monotonic() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", help="run just this mutation (repeatable)")
    args = parser.parse_args()
    survived = 0
    print("%-22s %-8s %s" % ("behaviour removed", "caught", "tests that failed"))
    for name, old, new, tests in MUTATIONS:
        if args.only and name not in args.only:
            continue
        failed, elapsed = run_one(name, old, new, tests, sys.executable)
        if elapsed is None:
            print("%-22s %-8s %s" % (name, "ERROR", failed))
            survived += 1
            continue
        caught = bool(failed)
        survived += not caught
        print("%-22s %-8s %s (%.0f s)" % (name, "yes" if caught else "NO",
                                          ", ".join(sorted(set(failed))) or "none", elapsed))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
