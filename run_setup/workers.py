"""Groups of stages on several processes: report.py's `--workers N`.

On a CPU with few cores one process does not use them all: torch splits a small model's matmuls over threads
poorly, and the rest of a step (Python, the optimizer, evaluation, saving) runs on one. On this project's 2-core AMD
EPYC two single-thread finetunes of SmolLM2 finished together in 71 s, one with two threads in 66 s: two workers do
1.9x the work in the same time (bench/README.md). The workers are spawned (a forked child would inherit torch's
thread pools) and each takes up the next item whose `after` items have ended, in the order given.
"""
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import torch

from run_setup import progress


@dataclass(frozen=True)
class Item:
    """One group of stages that runs in one process, in order (report.plan says which): `kind` and `seed` (and
    `lr`) name it; `after`: the keys of the items whose outputs it reads or whose files it shares, which must end
    first."""
    kind: str
    seed: int
    lr: float | None = None
    after: tuple = ()

    @property
    def key(self):
        return self.kind, self.seed, self.lr


def _start(threads):
    torch.set_num_threads(threads)
    progress.PLAIN = True                                         # lines, not bars: the workers share a terminal


def run_parallel(fn, items, workers, threads, log):
    """fn(item) for each of `items` on `workers` spawned processes of threads // workers threads each (`fn` must
    pickle: a module's function, or a functools.partial of one). An item starts once its `after` items have
    ended; a failed item is logged and the rest go on (its finished stages stay)."""
    pending, running, ended = list(items), {}, set()
    each = max(1, threads // workers)
    log(f"{len(items)} groups of stages on {workers} workers of {each} thread(s)")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                             initargs=(each,)) as pool:
        while pending or running:
            for item in [i for i in pending if set(i.after) <= ended][:workers - len(running)]:
                pending.remove(item)
                running[pool.submit(fn, item)] = item
            if not running:                                       # every item must come after its `after` items
                raise RuntimeError(f"no item can start: {pending}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                item = running.pop(f)
                ended.add(item.key)
                if f.exception() is not None:
                    log(f"seed {item.seed} {item.kind}: its worker FAILED: {f.exception()}")


def suggest(n_items, threads, device, log):
    """One process with several threads on a CPU: say that --workers would run the independent groups side by side
    (the measurement above), and what it costs (each worker loads its own models)."""
    if str(device) == "cpu" and n_items > 1 and threads > 1:
        n = min(threads, n_items)
        log(f"{n_items} groups of stages in one process of {threads} threads; `--workers {n}` runs {n} of them side by "
            "side, one thread and its own copies of the model each (on a 2-core CPU two single-thread SmolLM2 "
            "finetunes took 71 s together, one with two threads 66 s)")
