"""bench/train_speed.py's contenders run what their names say: `transformers-bf16` trains under bf16 autocast (a
training step of it once ran in fp32, so its lock-step numbers were fp32's under another name), `transformers` in
fp32. One training step each on a tiny checkpoint, through the bench's own worker."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import train_speed                                                # noqa: E402

LINEAR = torch.nn.functional.linear


class Conn:
    """The worker's end of a pipe: hands it `messages` in turn, keeps what it sends."""

    def __init__(self, messages):
        self.messages, self.sent = list(messages), []

    def recv(self):
        return self.messages.pop(0)

    def send(self, x):
        self.sent.append(x)


def first_step(kind, path, monkeypatch):
    """(the step's loss, the dtypes of the matmuls it ran) of the bench's worker `kind`."""
    dtypes = set()

    def linear(x, w, b=None):
        out = LINEAR(x, w, b)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    conn = Conn([("step", [0, 1, 2, 3], 1e-3), ("stop",)])
    train_speed.worker(kind, str(path), "first_hop", 0, 1e-3, False, False, torch.get_num_threads(), conn)
    return conn.sent[1][1], dtypes


def test_transformers_bf16_contender_trains_under_autocast(tmp_path, make_tiny, monkeypatch):
    pytest.importorskip("transformers")
    path = make_tiny(tmp_path / "tiny")
    loss32, d32 = first_step("transformers", path, monkeypatch)
    loss16, d16 = first_step("transformers-bf16", path, monkeypatch)
    assert d32 == {torch.float32}
    assert torch.bfloat16 in d16
    assert loss16 != loss32                                       # bf16 matmuls round: not the fp32 loss
