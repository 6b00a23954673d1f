"""graft.py: A + (B - C) bit-exact where it must be, against a float64 reference, refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import graft as G
from checkpoint_io import checkpoint as C

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, make_tiny):
    """A tiny random checkpoint A, and B, C: A with random changes of different sizes."""
    a = make_tiny(tmp_path_factory.mktemp("A"), n_layers=2)
    out = [a]
    for name, eps in (("B", 1e-2), ("C", 3e-3)):
        d = tmp_path_factory.mktemp(name)
        for f in a.iterdir():
            if f.suffix != ".safetensors":
                (d / f.name).write_bytes(f.read_bytes())
        torch.manual_seed(len(name) + int(eps * 1e4))
        w = load_file(a / "model.safetensors")
        save_file({k: v + eps * torch.randn_like(v) for k, v in w.items()}, str(d / "model.safetensors"))
        out.append(d)
    return out


def test_graft_of_a_with_itself_is_a_bit_for_bit(ckpts, tmp_path):
    a = ckpts[0]
    G.graft(a, a, a, tmp_path / "out", log=lambda *_: None)
    want, got = load_file(a / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype == torch.float32
        assert want[k].numpy().tobytes() == got[k].numpy().tobytes(), k
    # and it is a checkpoint like any other: our loader and the same tokenizer
    m = C.from_pretrained(tmp_path / "out")
    assert C.load_tokenizer(tmp_path / "out").get_vocab() == C.load_tokenizer(a).get_vocab()
    assert m.config == C.load_config(a)


def test_graft_matches_float64_reference(ckpts, tmp_path):
    a, b, c = ckpts
    G.graft(a, b, c, tmp_path / "g", log=lambda *_: None)
    got = load_file(tmp_path / "g" / "model.safetensors")
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    changed = 0
    for k in wa:
        ref = wa[k].double() + (wb[k].double() - wc[k].double())
        # two fp32 roundings (of B - C and of the sum): within 2 ulp of the largest operand
        scale = torch.maximum(wa[k].abs(), torch.maximum(wb[k].abs(), wc[k].abs())).double()
        err = (got[k].double() - ref).abs()
        assert (err <= 2 * torch.finfo(torch.float32).eps * scale + 1e-30).all(), k
        changed += int((got[k] != wa[k]).sum())
    assert changed > 0                                             # it did graft something
    meta = json.loads((tmp_path / "g" / "graft.json").read_text())
    assert meta["base"] == str(a) and meta["add"] == str(b) and meta["sub"] == str(c)


def test_mismatched_architecture_is_refused(ckpts, tmp_path, make_tiny):
    a = ckpts[0]
    other = make_tiny(tmp_path / "deeper", n_layers=3)
    with pytest.raises(ValueError, match="different architectures.*n_layers"):
        G.graft(a, other, a, tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    # the command line: one line starting "error:", no traceback, and a missing directory is named
    for add in (other, tmp_path / "nowhere"):
        with pytest.raises(SystemExit) as e:
            G.main(["--out", str(tmp_path / "o2"), "--base", str(a), "--add", str(add), "--sub", str(a)])
        msg = str(e.value.code)
        assert msg.startswith("error:") and "\n" not in msg
    assert "nowhere" in msg


def test_mismatched_tokenizer_is_refused(ckpts, tmp_path):
    a = ckpts[0]
    d = tmp_path / "tok"
    d.mkdir()
    for f in a.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    first = next(iter(vocab))
    vocab["zz_" + first] = vocab.pop(first)                        # same size, one token renamed
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="different tokenizers"):
        G.graft(a, a, d, tmp_path / "out", log=lambda *_: None)


@pytest.mark.parametrize("eval_", ["epochs", "final"])
def test_a_snapshot_is_the_shorter_stage(ckpts, tmp_path, eval_):
    """train_stage's snapshots (the graft sweep's shorter cells): at a constant rate, epoch 1 of a 3-epoch stage is
    the 1-epoch stage, the same weights to the bit and the same records; the 3-epoch stage's own records are those
    of a 3-epoch stage without snapshots."""
    import dataclasses
    import data
    import train as T
    quiet = lambda *_: None
    ex = data.load_dataset("daxwug", seed=0)
    F, IF = ex["train_facts"][:12], ex["train_impls"][:12]           # 2 steps an epoch at batch 8
    s = T.Settings(model=str(ckpts[0]), lr=3e-3, schedule="constant", epochs=3, eval=eval_, device="cpu")
    d = {k: tmp_path / k / "W_F" for k in ("long", "snap", "one", "plain")}     # a stage's name is its directory's
    long = G.train_stage(ckpts[0], F, IF, d["long"], s, quiet, snapshots={1: d["snap"]})
    one = G.train_stage(ckpts[0], F, IF, d["one"], dataclasses.replace(s, epochs=1), quiet)
    plain = G.train_stage(ckpts[0], F, IF, d["plain"], s, quiet)
    got, want = load_file(d["snap"] / "model.safetensors"), load_file(d["one"] / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not torch.equal(got["model.layers.1.mlp.up_proj.weight"],
                           load_file(d["long"] / "model.safetensors")["model.layers.1.mlp.up_proj.weight"])
    snap = json.loads((d["snap"] / "metrics.json").read_text())
    drop = lambda m: {k: v for k, v in m.items() if k not in ("wall_time_s", "snapshot_of")}
    assert drop(snap) == drop(one) and snap["snapshot_of"] == str(d["long"])
    assert len(snap["records"]) == (2 if eval_ == "epochs" else 1)
    assert drop(long) == drop(plain)                              # the snapshot changed nothing of the long run
    with pytest.raises(ValueError, match="constant rate"):        # under warmup and decay a shorter run differs
        G.train_stage(ckpts[0], F, IF, tmp_path / "wl", dataclasses.replace(s, schedule="warmup_linear"), quiet,
                      snapshots={1: tmp_path / "wl1"})


@pytest.mark.parametrize("order", sorted(G.CHAINED_ORDERS))
def test_a_chained_ordering_is_train_py_s(ckpts, tmp_path, order):
    """graft.ordering (report.py's Fig. 4 orderings that start from the experiment's W_F or W_ImplF) gives what
    `train.py --order order` gives in one run: the same records and the same final weights, to the bit."""
    import data
    import train as T
    quiet = lambda *_: None
    argv = ["--model", str(ckpts[0]), "--dataset", "daxwug", "--order", order, "--epochs", "1", "--lr", "1e-3",
            "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "train_py")]
    want = T.main(argv)
    s = G.work_settings(str(ckpts[0]), 0, "cpu", lr=1e-3, epochs=1)
    assert s.threads == 1 and s.schedule == want["args"]["schedule"]
    d = data.load_dataset("daxwug", seed=0)
    F, IF = d["train_facts"], d["train_impls"]
    first, _ = G.CHAINED_ORDERS[order]
    w = tmp_path / "report"
    G.train_stage(ckpts[0], *((F, IF) if first == "W_F" else (IF, F)), w / "graft" / first, s, quiet)   # as experiment
    G.ordering(order, s, w, quiet)
    got = json.loads((w / f"daxwug_{order}" / "metrics.json").read_text())
    assert [r["phase"] for r in got["records"]] == [r["phase"] for r in want["records"]]
    assert got["records"] == want["records"]
    a, b = load_file(w / f"daxwug_{order}" / "finetune" / "model.safetensors"), \
        load_file(tmp_path / "train_py" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="graft stage has to run first"):
        G.ordering(order, s, tmp_path / "empty", quiet)
