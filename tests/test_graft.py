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
