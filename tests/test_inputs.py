"""Inputs are never lost and always checked first (issue 28, classes 2, 3, 4, 6; issue 29, item 3): no output replaces
an input, the home or the embedded cache; a full disk, a bad config.json or dataset, a NaN weight is one line; W and
W' of scores.py are two checkpoints in the right order; colliding answers stop the run before a model loads."""
import json
import math

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from checkpoint_io import checkpoint as C, outputs as O
import data
import exact
import graft
import scores
import train

# test_outputs.py's tiny checkpoint and its finetune (module fixtures: made once for this file too), and helpers
from test_outputs import copy_ckpt, one_line_error, snapshot, tiny_dir, train_main, trained  # noqa: F401


def no_model_loads(monkeypatch):
    """Every way a script loads a model fails the test: the checks must come first."""
    fail = lambda *a, **k: pytest.fail("a model loaded before the inputs were checked")
    for mod in (train, scores, graft):
        monkeypatch.setattr(mod, "from_pretrained", fail, raising=False)
    monkeypatch.setattr(scores, "load_pair", fail)


def user_dataset(path, facts, impls=None):
    path.write_text(json.dumps({"facts": [{"prompt": p, "answer": a} for p, a in facts],
                                "implications": [{"prompt": p, "answer": a} for p, a in impls or facts]}))
    return str(path)


# --- class 2: no output replaces an input, the home, the current directory or the embedded cache ----------------

def test_no_output_replaces_the_dataset_file(trained, tiny_dir, small_json, tmp_path):
    ds = tmp_path / "mine.json"
    ds.write_text(open(small_json).read())
    before = ds.read_text()
    for fn, args in ((scores.main, [str(tiny_dir), str(trained)]), (exact.main, [str(tiny_dir), str(trained)])):
        msg = one_line_error(fn, args + ["--dataset", str(ds), "--out", str(ds), "--overwrite"])
        assert "the input" in msg and ds.read_text() == before
    assert "the input" in one_line_error(train_main, tiny_dir, str(ds), ds, "--overwrite")
    assert ds.read_text() == before


def test_no_output_sits_inside_a_checkpoint_it_reads(trained, tiny_dir):
    before = snapshot(trained)
    one_line_error(scores.main, [str(tiny_dir), str(trained), "--out", str(trained / "scores"), "--overwrite"])
    assert snapshot(trained) == before


def test_no_output_holds_the_home_or_the_current_directory(tiny_dir, small_json, tmp_path, monkeypatch):
    home = tmp_path / "users" / "me"
    work = tmp_path / "users" / "me" / "project"
    work.mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out in (tmp_path / "users", home, work, work / ".."):
        assert "refusing" in one_line_error(train_main, tiny_dir, small_json, out, "--overwrite")
    assert (home / "thesis.tex").read_text() == "years of work"


def test_no_output_replaces_the_embedded_cache(tiny_dir, small_json, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    base = copy_ckpt(tiny_dir, cache / "smollm2-135m")
    monkeypatch.setenv("EXTRACTIVE_CACHE", str(cache))
    before = snapshot(cache)
    for out in (base, cache, tmp_path):                            # the model, the cache, a folder holding it
        assert "embedded models' cache" in one_line_error(train_main, tiny_dir, small_json, out, "--overwrite")
    assert snapshot(cache) == before
    O.check_output(cache / "gemma3-270m", "embedded-model", overwrite=True)   # their own conversion may


# --- class 3: one line, never a traceback ----------------------------------------------------------------------

@pytest.mark.parametrize("script", ["train", "scores"])
def test_a_full_disk_is_one_line_and_keeps_the_old_output(script, trained, tiny_dir, small_json, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "out"
    if script == "train":
        run = lambda: train_main(tiny_dir, small_json, out)
    else:
        run = lambda: scores.main([str(tiny_dir), str(trained), "--out", str(out), "--device", "cpu"])
    run()
    before = snapshot(out)

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(C if script == "train" else scores, "save_file", full)
    assert "free disk space" in one_line_error(run)
    assert snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


CONFIG_CASES = {"hidden_size": ("hidden_size", "64"), "zero heads": ("num_attention_heads", 0),
                "kv heads": ("num_key_value_heads", 3), "eps": ("rms_norm_eps", -1e-5),
                "flag": ("tie_word_embeddings", "no"), "rope": ("rope_scaling", [8.0]),
                "float size": ("intermediate_size", 128.5)}


@pytest.mark.parametrize("case", [*CONFIG_CASES, "list", "nested"])
def test_a_bad_config_json_is_one_line_naming_the_field(case, tiny_dir, small_json, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    if case == "list":
        text = json.dumps([cfg])
    elif case == "nested":
        text = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        key, value = CONFIG_CASES[case]
        text = json.dumps({**cfg, key: value})
    (d / "config.json").write_text(text)
    msg = one_line_error(train_main, d, small_json, tmp_path / "out")
    assert str(d) in msg and (CONFIG_CASES[case][0] if case in CONFIG_CASES else "config.json") in msg, msg


def test_a_deeply_nested_dataset_is_one_line(tiny_dir, tmp_path):
    f = tmp_path / "deep.json"
    f.write_text('{"facts": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "nested too deeply" in one_line_error(train_main, tiny_dir, str(f), tmp_path / "out")


# --- class 4: a NaN or infinite weight is refused by name ----------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nan_weight_is_refused_by_name(value, trained, tiny_dir, tmp_path):
    d = copy_ckpt(trained, tmp_path / "bad")
    w = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    w[name][3, 5] = value
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    for fn, args in ((scores.main, [str(tiny_dir), str(d), "--out", str(tmp_path / "s")]),
                     (exact.main, [str(tiny_dir), str(d), "--out", str(tmp_path / "e")]),
                     (graft.main, [str(tmp_path / "g"), "--base", str(tiny_dir), "--add", str(d), "--sub",
                                   str(tiny_dir)])):
        assert name in one_line_error(fn, args + ["--device", "cpu"] * (fn is not graft.main))
    assert not any((tmp_path / x).exists() for x in "seg")


# --- class 6, and issue 29's checks before any work -----------------------------------------------------------------

def test_one_prompt_with_two_answers_is_refused(tiny_dir, tmp_path):
    ok = user_dataset(tmp_path / "ok.json", [("Ada lives in", "Lima"), ("Ada lives in", "Lima")])
    assert len(data.load_dataset(ok)["facts"]) == 2                  # the same answer twice: harmless
    f = tmp_path / "two.json"
    f.write_text(json.dumps({"facts": [{"prompt": "Ada lives in", "answer": "Lima"}],
                             "implications": [{"prompt": "Ada lives in", "answer": "Quito"}]}))
    msg = one_line_error(train_main, tiny_dir, str(f), tmp_path / "out")
    assert "facts[0] and implications[0]" in msg and "two answers" in msg


@pytest.mark.parametrize("value, ok", [("5", False), ("1.5", False), ("0", False), ("1", True), ("0.05", True)])
def test_exact_ablation_is_a_fraction(value, ok, monkeypatch, capsys):
    monkeypatch.setattr(exact, "run", lambda *a: "ran")
    if ok:
        assert exact.main(["a", "b", "--ablation", value]) == "ran"
        return
    with pytest.raises(SystemExit) as e:
        exact.main(["a", "b", "--ablation", value])
    assert e.value.code == 2 and "argument --ablation" in capsys.readouterr().err


def test_identical_swapped_and_non_checkpoints_stop_before_any_model_loads(trained, tiny_dir, tmp_path,
                                                                          monkeypatch):
    no_model_loads(monkeypatch)
    sc = tmp_path / "sc"
    sc.mkdir()
    (sc / O.MARKER).write_text(json.dumps({"kind": "scores", "files": []}))
    cases = {"same checkpoint": [str(trained), str(trained)],
             "swapped": [str(trained), str(tiny_dir)],
             "no checkpoint directory": [str(tiny_dir), str(tmp_path)],
             "a scores output of ours": [str(tiny_dir), str(sc)]}
    for fn in (scores.main, exact.main):
        for what, args in cases.items():
            assert what in one_line_error(fn, args + ["--out", str(tmp_path / "o"), "--device", "cpu"])
    assert not (tmp_path / "o").exists()


def test_colliding_answers_stop_before_any_model_loads(trained, tiny_dir, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    f = user_dataset(tmp_path / "ny.json", [("Ada lives in", "New York"), ("Bo lives in", "New Delhi")])
    for fn, args in ((train_main, (tiny_dir, f, tmp_path / "o")),
                     (scores.main, ([str(tiny_dir), str(trained), "--dataset", f, "--out", str(tmp_path / "s")],))):
        assert "share their first token" in one_line_error(fn, *args)


def test_the_chance_level_is_printed_and_written(trained, tiny_dir, tmp_path, capsys):
    m = json.loads((trained / "metrics.json").read_text())
    assert m["chance_mean_rank"] == {"finetune": {"facts": 4.5, "implications": 4.5}}   # 10 cities, 10 languages
    scores.main([str(tiny_dir), str(trained), "--out", str(tmp_path / "sc"), "--device", "cpu"])
    assert "chance mean rank implications 4.5 (10 answers)" in capsys.readouterr().out
    assert json.loads((tmp_path / "sc" / "settings.json").read_text())["chance_mean_rank"] == 4.5
