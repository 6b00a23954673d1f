"""Launchers for tests/test_distributed.py, started by `python` (one process) or by `torchrun` (several), with the
tests' hooks here rather than in the scripts:

    torchrun_launch.py report MODEL WORK        a shrunk report.py for one seed: the first hop's stages at 2 epochs,
                                                a grid of one cell per hop, a stage that fails on the last rank only,
                                                and a stage whose save rank 0 refuses (its output is a user's
                                                directory); the ranks must record both failures and go on together
    torchrun_launch.py train-save-fails ARGS    train.py ARGS, with rank 0's --out made a user's directory after the
                                                training, so that only rank 0's save fails; every rank must end
    torchrun_launch.py train-step-fails ARGS    train.py ARGS, the last rank raising inside its third training step
"""
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_setup import dist                                                       # noqa: E402
import report                                                     # noqa: E402
from paper_report import sweep                                                      # noqa: E402
import train                                                      # noqa: E402
from checkpoint_io.outputs import work_dir                                      # noqa: E402

KEEP = ("preconditions", "first_hop", "scores_first_hop", "freeze_post_first_hop", "first_hop_early_pre")
REFUSED = "first_hop_early_pre"                                   # its output directory is a user's


def fail_on_the_last_rank():
    if dist.rank() == dist.world_size() - 1:                      # one process: rank 0 is the last
        raise ValueError("a test failure on the last rank only")


def users_directory(path):
    """`path` made a directory that is not ours: a save into it is refused (outputs.check_output)."""
    Path(path).mkdir(parents=True)
    (Path(path) / "notes.txt").write_text("the user's\n")


def shrunk_report(model, work):
    @dataclasses.dataclass
    class Short(train.Settings):                                  # every stage's finetune: 2 epochs, not 8
        epochs: int = 2
    train.Settings = Short
    sweep.LRS, sweep.EPOCHS, sweep.LEARNED = (1e-2,), (1,), -1.0  # one cell per hop; no gentle cell
    full = report.stages

    def stages(model, seed, w, base, device, **kw):
        keep = [st for st in full(model, seed, w, base, device, **kw) if st[0] in KEEP]
        return keep[:2] + [("fails_on_the_last_rank", w / "never", fail_on_the_last_rank)] + keep[2:]
    report.stages = stages
    w = Path(work) / "seed0"
    if int(os.environ.get("RANK", "0")) == 0:                     # before the process group: the others wait in it
        work_dir(w, "report-work")
        users_directory(w / REFUSED)
    report.run_stages(model, [0], Path(work), device="cpu", grid=True)
    dist.close()


def train_save_fails(argv):
    run = train.run

    def run_then_block(s, *a, **k):
        out = run(s, *a, **k)
        if dist.is_main():
            users_directory(s.out)
        return out
    train.run = run_then_block
    try:
        train.main(argv)
    except SystemExit as e:                                      # each rank says that it ended by itself
        print(f"[launcher] rank {os.environ.get('RANK', '0')} ends: {e.code!r}", flush=True)
        raise


def train_step_fails(argv):
    """train.py ARGS with the last rank's third training step raising, inside the sharded step (before its
    backward's collectives), while the other ranks go on into theirs."""
    loss, calls = train.answer_loss, []

    def failing(*a, **k):
        calls.extend([1] if torch.is_grad_enabled() else [])      # training steps, not the epoch-0 loss
        if len(calls) == 3 and dist.rank() == dist.world_size() - 1 and torch.is_grad_enabled():
            raise RuntimeError("a test failure inside a training step on the last rank")
        return loss(*a, **k)
    train.answer_loss = failing
    train.main(argv)


if __name__ == "__main__":
    {"report": lambda a: shrunk_report(*a[:2]), "train-save-fails": train_save_fails,
     "train-step-fails": train_step_fails}[sys.argv[1]](sys.argv[2:])
