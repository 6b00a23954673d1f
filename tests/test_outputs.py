"""Nothing lost: outputs never replace what is not ours, a killed write leaves the old output or the new one,
nonsense arguments are refused before any model loads, and every user error is one line (issue "Nothing lost")."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_io import checkpoint as C, outputs as O
import data
import graft
import scores
import train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_tiny):
    return make_tiny(tmp_path_factory.mktemp("tiny"), n_layers=2)


@pytest.fixture(scope="module")
def trained(tiny_dir, small_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train_main(tiny_dir, small_json, out)
    return out


def train_main(tiny_dir, small_json, out, *extra):
    return train.main(["--model", str(tiny_dir), "--dataset", small_json, "--out", str(out), "--epochs", "1",
                       "--lr", "1e-3", "--device", "cpu", "--threads", "1", *extra])


def one_line_error(fn, *args):
    """The message of the SystemExit that fn raises: one line, starting 'error:'."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error:") and "\n" not in msg, msg
    return msg


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- outputs that are not ours survive -------------------------------------------------------------------------

def test_train_refuses_a_directory_and_a_file_that_are_not_ours(tiny_dir, small_json, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    before = snapshot(notes)
    assert "not a checkpoint output of ours" in one_line_error(train_main, tiny_dir, small_json, notes)
    assert snapshot(notes) == before
    f = tmp_path / "a_file"
    f.write_text("keep me")
    assert "is a file" in one_line_error(train_main, tiny_dir, small_json, f)
    assert f.read_text() == "keep me"
    # --overwrite replaces it, and a second run replaces our own checkpoint without asking
    train_main(tiny_dir, small_json, notes, "--overwrite")
    assert not (notes / "todo.txt").exists() and O.is_ours(notes, "checkpoint")
    train_main(tiny_dir, small_json, notes)


def test_a_checkpoint_with_files_added_by_hand_is_not_replaced(trained, tiny_dir, small_json, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for f in trained.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "scores").mkdir()                                       # the old layout kept scores inside
    (out / "scores" / "scores.safetensors").write_bytes(b"x")
    assert "files added by hand" in one_line_error(train_main, tiny_dir, small_json, out)
    assert (out / "scores" / "scores.safetensors").read_bytes() == b"x"


def test_scores_default_output_is_beside_the_checkpoint_and_survives_retraining(trained, tiny_dir, small_json,
                                                                               tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scores.main([str(tiny_dir), str(trained), "--device", "cpu"])
    sc = tmp_path / "runs" / f"{trained.name}.scores"
    assert O.is_ours(sc, "scores") and sorted(p.name for p in sc.iterdir()) == sorted(
        ["scores.safetensors", "scores.png", "summary.txt", "settings.json", O.MARKER])
    before = snapshot(sc)
    train_main(tiny_dir, small_json, trained)                      # a re-run of training replaces its checkpoint ...
    assert snapshot(sc) == before                                  # ... and keeps the scores


def test_scores_and_graft_refuse_outputs_that_are_not_ours_before_any_work(trained, tiny_dir, tmp_path,
                                                                          monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    monkeypatch.setattr(scores, "linearized", lambda *a: pytest.fail("the passes ran before --out was checked"))
    one_line_error(scores.main, [str(tiny_dir), str(trained), "--out", str(notes), "--device", "cpu"])
    assert (notes / "keep.txt").read_text() == "mine"
    f = tmp_path / "file.txt"
    f.write_text("mine")
    one_line_error(graft.main, [str(f), "--base", str(tiny_dir), "--add", str(trained), "--sub", str(tiny_dir)])
    assert f.read_text() == "mine"
    # an output that would replace one of the inputs
    assert "would replace the input" in one_line_error(
        graft.main, [str(trained), "--base", str(tiny_dir), "--add", str(trained), "--sub", str(tiny_dir)])


def test_odd_dataset_names_never_make_runs_the_output(tmp_path):
    for name in (".json", "..json", "/tmp/.json", "a b?.json"):
        n = data.dataset_name(name)
        assert n not in ("", ".", "..") and "/" not in n and " " not in n, (name, n)


# --- killed runs: the old output or the new one, never a mix ------------------------------------------------------

def test_a_scores_write_killed_midway_leaves_the_old_set(trained, tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "sc"
    scores.main([str(tiny_dir), str(trained), "--out", str(out), "--device", "cpu"])
    before = snapshot(out)

    def killed(*args):
        raise KeyboardInterrupt                                    # after scores.safetensors, before the figure
    monkeypatch.setattr(scores, "figure", killed)
    with pytest.raises(SystemExit):
        scores.main([str(tiny_dir), str(trained), "--out", str(out), "--device", "cpu", "--dataset", "first_hop"])
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sc"]          # and no temporary left behind


def test_leftovers_of_a_killed_run_are_cleaned_or_put_back(tmp_path):
    out = tmp_path / "out"
    dead = 2 ** 22 + 12345                                         # above Linux's default pid_max: never alive
    tmp = tmp_path / f".out.tmp-{dead}-abcdef"
    tmp.mkdir()
    (tmp / "big").write_bytes(b"0" * 1000)
    old = tmp_path / f".out.old-{dead}-abcdef"                     # killed between the two renames of _publish
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    live = tmp_path / f".out.tmp-{os.getpid()}-abcdef"             # a live process's temporary: left alone
    live.mkdir()
    notes = []
    O.clean_leftovers(out, notes.append)
    assert not tmp.exists() and live.exists() and (out / "metrics.json").exists() and not old.exists()
    assert len(notes) == 2
    # a stale legacy ".out.old" does not block a new output either
    (tmp_path / ".out.old").mkdir()
    with O.atomic_dir(out, "checkpoint", overwrite=True) as d:
        (d / "x").write_text("new")
    assert (out / "x").read_text() == "new"


def test_strict_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        O.write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert not list(tmp_path.iterdir())


# --- arguments and inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"),
                                         ("--lr", "0"), ("--batch-size", "0"), ("--threads", "0"),
                                         ("--eval-batch-size", "0"), ("--epochs", "two")])
def test_nonsense_numbers_are_refused_before_the_model_loads(flag, value, monkeypatch, capsys):
    monkeypatch.setattr(train, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as e:
        train.main([flag, value])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_a_diverging_run_stops_with_one_line_and_writes_nothing(tiny_dir, small_json, tmp_path):
    msg = one_line_error(train_main, tiny_dir, small_json, tmp_path / "out", "--lr", "1e30")
    assert "diverged" in msg and not (tmp_path / "out").exists()


def test_a_prompt_longer_than_the_context_is_named(tiny_dir, tmp_path):
    long = tmp_path / "long.json"
    prompt = "Ada " * 80 + "lives in"                              # the tiny model's context is 64 positions
    long.write_text(json.dumps({"facts": [{"prompt": prompt, "answer": "Lima"}],
                                "implications": [{"prompt": "Ada speaks", "answer": "Spanish"}]}))
    msg = one_line_error(train.main, ["--model", str(tiny_dir), "--dataset", str(long), "--out",
                                      str(tmp_path / "o"), "--device", "cpu"])
    assert "more than the model's context of 64" in msg and "Ada Ada" in msg


def copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_checkpoints_give_one_line(trained, tiny_dir, small_json, tmp_path):
    cases = {}
    d = copy_ckpt(tiny_dir, tmp_path / "tok")
    (d / "tokenizer.json").write_text("{not json")
    cases["tokenizer"] = d
    d = copy_ckpt(tiny_dir, tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    cases["config key"] = d
    d = copy_ckpt(tiny_dir, tmp_path / "cfgjson")
    (d / "config.json").write_text("{")
    cases["config json"] = d
    d = copy_ckpt(tiny_dir, tmp_path / "trunc")
    w = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(w[:len(w) // 2])
    cases["truncated"] = d
    d = copy_ckpt(tiny_dir, tmp_path / "escape")
    (tmp_path / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    (d / "model.safetensors").unlink()
    keys = load_file(str(tmp_path / "outside.safetensors")).keys()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../outside.safetensors"
                                                                               for k in keys}}))
    cases["index outside"] = d
    for what, ckpt in cases.items():
        m = one_line_error(train_main, ckpt, small_json, tmp_path / f"o_{ckpt.name}")
        assert str(ckpt) in m or ckpt.name in m, (what, m)
        one_line_error(scores.main, [str(ckpt), str(trained), "--out", str(tmp_path / f"s_{ckpt.name}")])
        one_line_error(graft.main, [str(tmp_path / f"g_{ckpt.name}"), "--base", str(trained), "--add", str(ckpt),
                                    "--sub", str(trained)])
    assert "outside the checkpoint" in one_line_error(train_main, cases["index outside"], small_json, tmp_path / "x")


def test_same_seed_gives_a_bit_identical_checkpoint(tiny_dir, small_json, tmp_path):
    train_main(tiny_dir, small_json, tmp_path / "a", "--seed", "5")
    train_main(tiny_dir, small_json, tmp_path / "b", "--seed", "5")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["records"] == json.loads((tmp_path / "b" / "metrics.json").read_text())["records"]
    assert torch.isfinite(torch.tensor([r["loss"] for r in m["records"]])).all()
