"""Progress with an estimate of the time left, for every pass that can run longer than a few seconds: the one
helper every script uses (training steps, rank evaluation, the scores' passes, the exact interventions, the
benchmarks), so that no command stays silent while it works.

    for i in progress(range(n), "finetune epoch 3/8", unit="step"):   # or progress(total=n, ...) and .update()
    with ticking("pass 2/3", expected_s=t1):                         # one long call that has no steps to count

On a terminal: a tqdm bar (rate, elapsed, time left), shown only once the pass has run DELAY_S, and cleared when
it ends, so that the script's own log lines stay as they were. Not on a terminal (a log file, a pipe, a test's
captured output): a plain line on stderr every EVERY_S seconds with the elapsed and the estimated remaining time,
flushed; tqdm's carriage returns would make such a log unreadable. Under torchrun only rank 0 reports, as rank 0
alone logs (run_setup/dist.py); RANK is read from the environment, which torchrun sets before any process group.
"""
import os
import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

DELAY_S = 2.0      # a pass shorter than this shows nothing
PLAIN = False      # lines even on a terminal: report.py's workers, which share one
EVERY_S = 5.0      # not on a terminal: at most one line per EVERY_S seconds


def duration(s):
    """Seconds as a reader says them: '45 s', '12.5 min', '2.1 h'."""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def count(n, unit):
    """'1 batch', '3 batches', '2 steps'."""
    return f"{n} {unit}" if n == 1 else f"{n} {unit}{'es' if unit.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


def estimate(done, total, elapsed):
    """'12 s elapsed, about 30 s left': the time left at the mean pace so far (unknown before the first item)."""
    left = "time left unknown" if not done or total is None else \
        f"about {duration(max(0.0, elapsed / done * (total - done)))} left"
    return f"{duration(elapsed)} elapsed, {left}"


class Lines:
    """tqdm's interface as far as our loops use it (iterate, update, close, `with`), printing plain lines."""

    def __init__(self, iterable, total, desc, unit):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None or not hasattr(iterable, "__len__") else len(iterable)
        self.n, self.t0, self.said = 0, time.monotonic(), False
        self.last = self.t0

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update()                                          # after the loop's body: an item is done
        self.close()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= EVERY_S and self.n != self.total:   # the last item: close() says it
            self.last, self.said = now, True
            print(f"{self.desc}: {self.n}/{count(self.total or '?', self.unit)}, "
                  f"{estimate(self.n, self.total, now - self.t0)}", file=sys.stderr, flush=True)

    def close(self):
        elapsed = time.monotonic() - self.t0
        if self.said or elapsed >= EVERY_S:                        # a pass that took a while says when it ended
            self.said, self.t0 = False, float("inf")                # once
            print(f"{self.desc}: done, {count(self.n, self.unit)} in {duration(elapsed)}", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable=None, desc="", total=None, unit="step"):
    """`iterable` (or `total` items counted with .update()) with progress on stderr: a tqdm bar on a terminal,
    plain lines elsewhere, nothing on a torchrun rank other than 0."""
    if os.environ.get("RANK", "0") != "0":
        return tqdm(iterable, total=total, disable=True)           # passes the items through, prints nothing
    if sys.stderr.isatty() and not PLAIN:
        return tqdm(iterable, desc=desc, total=total, unit=unit, delay=DELAY_S, leave=False, dynamic_ncols=True,
                    file=sys.stderr)
    return Lines(iterable, total, desc, unit)


@contextmanager
def ticking(desc, expected_s=None):
    """Progress of one long call that has no steps to count (a batched forward and backward): its seconds, ticked
    by a thread, against `expected_s` (what a like call took) when known."""
    bar = progress(desc=desc, total=None if expected_s is None else max(1, round(expected_s)), unit="second")
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.update()
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
