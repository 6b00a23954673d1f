"""bench/train_speed.py's contenders run what their names say: `transformers-bf16` trains under bf16 autocast (a
training step of it once ran in fp32, so its lock-step numbers were fp32's under another name), `transformers` in
fp32. One training step each on a tiny checkpoint, through the bench's own worker. bench/scores_speed.py's
`transformers` peer computes our scores (so it times the same job), and its bf16 contender runs bf16 matmuls."""
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


def matmul_dtypes(monkeypatch):
    """A set that every torch.nn.functional.linear call from now on adds its output's dtype to."""
    dtypes = set()

    def linear(x, w, b=None):
        out = LINEAR(x, w, b)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    return dtypes


def first_step(kind, path, monkeypatch):
    """(the step's loss, the dtypes of the matmuls it ran) of the bench's worker `kind`."""
    dtypes = matmul_dtypes(monkeypatch)
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


def tiny_pair_dirs(tmp_path, make_tiny):
    """W: a tiny random Llama checkpoint (3 layers, 4 heads on 2 kv heads); W' = W + 1% of a random change of
    every block weight, saved beside it."""
    import transformers
    a = make_tiny(tmp_path / "a", n_layers=3)
    m = transformers.AutoModelForCausalLM.from_pretrained(a)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".layers." in name:
                p.add_(1e-2 * torch.randn_like(p) * p.std())
    m.save_pretrained(tmp_path / "b")
    return a, tmp_path / "b"


def test_scores_peer_computes_our_scores(tmp_path, make_tiny):
    """bench/scores_speed.py's `transformers` peer times the job scores.py runs: its per-prompt scores, every
    kind, are scores.linearized's, on real positions, within 1e-4 of the largest: float64 passes, but
    `transformers`' RMSNorm computes in fp32 whatever its input (the differences of activations in eqs. 5 and 6 then
    differ by up to 1e-5 relative); a wrong term, sign or layer would be off by far more."""
    pytest.importorskip("transformers")
    import data
    import scores as S
    import scores_speed
    from checkpoint_io.checkpoint import from_pretrained, load_tokenizer
    a, b = tiny_pair_dirs(tmp_path, make_tiny)
    p = S.make_prompts(load_tokenizer(a), data.load_dataset("second_hop")["implications"][:6])
    assert (p.mask == 0).any()                                    # padded rows: the peer's mask is exercised
    ours = S.linearized(*(from_pretrained(d, dtype=torch.float64).requires_grad_(False) for d in (a, b)), p)
    peer = scores_speed.contender("transformers", None,
                                  tuple(scores_speed.load_hf(d, torch.float64) for d in (a, b)), p)
    assert peer.keys() == ours.keys()
    keep = p.mask.bool()
    for k, v in ours.items():
        ref, got = v[keep], peer[k][keep]
        assert ref.abs().max() > 1e-8, k                          # the score measures something
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), k


def test_scores_bf16_contender_runs_bf16_matmuls(tmp_path, make_tiny, monkeypatch):
    """The `transformers-bf16` contender's passes run under bf16 autocast, `transformers` in fp32."""
    pytest.importorskip("transformers")
    import data
    import scores as S
    import scores_speed
    from checkpoint_io.checkpoint import load_tokenizer
    a, b = tiny_pair_dirs(tmp_path, make_tiny)
    p = S.make_prompts(load_tokenizer(a), data.load_dataset("second_hop")["implications"][:4])
    hf = tuple(scores_speed.load_hf(d) for d in (a, b))
    seen = {}
    for kind in ("transformers", "transformers-bf16"):
        dtypes = matmul_dtypes(monkeypatch)
        seen[kind] = dtypes, scores_speed.contender(kind, None, hf, p)
    assert seen["transformers"][0] == {torch.float32}
    assert torch.bfloat16 in seen["transformers-bf16"][0]
    assert not torch.equal(seen["transformers"][1]["informative.mlp"], seen["transformers-bf16"][1]["informative.mlp"])
