"""FSDP2 under torchrun (run_setup/dist.py), on this CPU with gloo: two processes train as one does, and write a checkpoint
that loads; graft.py --experiment and report.py's stages give one process's numbers; a failure on one rank (a
stage's, or rank 0's save) ends or is recorded by every rank, none waits forever; wrong launches end with one line;
big checkpoints are written as shards with an index.
The multi-process tests carry the `distributed` marker (`pytest -m distributed` runs them alone)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_io import checkpoint as C, outputs as O
import data
import graft
import report
import scores
import train

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def torchrun(n, script, *argv, cwd, timeout=300):
    """`python -m torch.distributed.run --nproc_per_node n --standalone script argv` in a subprocess, one thread a
    process; n = 1: `python script argv`, the one-process path. A run past `timeout` (a hang) is killed with its
    workers, and the test fails."""
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(n), "--standalone"] if n > 1
                                 else [])
    cmd = [*launch, str(ROOT / script), *argv]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)                          # torchrun and every worker
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory, make_tiny):
    """A tiny random checkpoint of 3 layers (early: 0-1, late: 2), made once for this module's tests."""
    return make_tiny(tmp_path_factory.mktemp("tiny3"), n_layers=3)


@pytest.mark.distributed
def test_two_processes_train_and_score_as_one(tmp_path, make_tiny, small_json):
    """torchrun --nproc_per_node 2 (gloo): the blocks sharded over two ranks, each training on the same batches.
    Losses within 1e-5 relative and the same ranks as one process (in fp32 the reduce-scatter averages two equal
    gradients, which is exact, so they are in fact equal here); the "post" freeze resets the early layers' shards;
    the saved checkpoint is an ordinary one that from_pretrained and transformers load to the same logits."""
    tiny = make_tiny(tmp_path / "tiny")
    args = ["--model", str(tiny), "--dataset", small_json, "--epochs", "2", "--lr", "1e-2", "--device", "cpu",
            "--threads", "1", "--freeze", "early", "--freeze-when", "post"]
    p = torchrun(2, "train.py", *args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("finetune epoch  2/2") == 1              # only rank 0 prints
    one = train.main([*args, "--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["n_trainable"] == one["n_trainable"] and two["n_trainable_this_rank"] < two["n_trainable"]
    assert [r["phase"] for r in two["records"]] == [r["phase"] for r in one["records"]]
    for a, b in zip(one["records"], two["records"]):
        if a["loss"] is not None:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (a["fact_mean_rank"], a["impl_mean_rank"]) == (b["fact_mean_rank"], b["impl_mean_rank"])
    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-7)
    base = load_file(str(tiny / "model.safetensors"))
    assert torch.equal(w2["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])  # reset
    assert not torch.equal(w2["model.layers.3.mlp.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])
    ids, mask = data.encode_prompts(C.load_tokenizer(tiny), ["The capital of France is", "Paris is in"])
    with torch.no_grad():
        ours = C.from_pretrained(tmp_path / "two")(ids, mask)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two").eval()(
            input_ids=ids, attention_mask=mask).logits
        want = C.from_pretrained(tmp_path / "one")(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref[real], ours[real], rtol=1e-4, atol=1e-4)
    # scores.py under torchrun: W and W' sharded over the ranks, each rank a share of the prompts, the same scores
    # as one process
    p = torchrun(2, "scores.py", str(tiny), str(tmp_path / "two"), "--out", str(tmp_path / "s2"), "--device", "cpu",
                 cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    scores.run(tiny, tmp_path / "two", tmp_path / "s1", log=lambda *a: None)
    s1, s2 = load_file(str(tmp_path / "s1" / "scores.safetensors")), load_file(str(tmp_path / "s2" / "scores.safetensors"))
    assert s1.keys() == s2.keys() and len(s1) == 9
    for k in s1:                                                  # sums over prompts in another order: 1e-6
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-5, atol=1e-6 * float(s1[k].abs().max()))
    st = json.loads((tmp_path / "s2" / "settings.json").read_text())
    assert st["world_size"] == 2 and st["params_this_rank"] < st["n_params"]     # W and W' sharded, not whole


@pytest.mark.distributed
def test_wrong_launches_get_one_line(tmp_path, make_tiny, small_json):
    """More processes than layers; and --train-all, whose embeddings and head FSDP2 does not shard here."""
    tiny1, tiny = make_tiny(tmp_path / "tiny1", n_layers=1), make_tiny(tmp_path / "tiny")
    base = ["--dataset", small_json, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "o")]
    for extra, msg in ((["--model", str(tiny1)], "error: train.py: 2 processes for a model of 1 layers: launch at "
                                                 "most 1"),
                       (["--model", str(tiny), "--train-all"], "error: --train-all under torchrun")):
        p = torchrun(2, "train.py", *base, *extra, cwd=tmp_path)
        assert p.returncode != 0
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]   # rank 0's line only
        assert len(errors) == 1 and errors[0].startswith(msg), p.stderr[-2000:]
        assert 'train.py", line' not in p.stderr                  # no traceback of ours (torchrun adds its report)
        assert not (tmp_path / "o").exists()


def close(a, b, rel, what=""):
    """Two JSON-like values alike: the same structure and strings, numbers within `rel` relative (1e-9 absolute)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            close(a[k], b[k], rel, f"{what}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, rel, f"{what}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=rel, abs=1e-9), what
    else:
        assert a == b, what


@pytest.mark.distributed
def test_graft_experiment_under_torchrun_gives_one_process_numbers(tmp_path, tiny3):
    """graft.py --experiment on two ranks (every stage trained sharded, Fig. 6's prompts shared out) against
    graft.experiment in this process, one thread. The trainings are the same computation (each rank trains on the
    same batches; the reduce-scatter averages two equal fp32 gradients exactly): Table 3's ranks and Fig. 4's
    facts-first records equal to 1e-5 relative, the train test's bound. Fig. 6's per-entry scores are sums over
    prompts that two ranks add in another order, as scores.py's: within 1e-5 relative; Pearson's r, a ratio of
    such sums within [-1, 1] (and near 0 here), moves by about as much in absolute terms: within 1e-5 absolute
    (measured: 7e-8)."""
    args = ["--experiment", "--model", str(tiny3), "--epochs", "1", "--lr", "1e-2", "--device", "cpu"]
    p = torchrun(2, "graft.py", *args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("[graft] wrote") == 1                  # only rank 0 logs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                      # as each rank: the same matmul blocking
    try:
        one = graft.experiment(str(tiny3), 0, tmp_path / "one", "cpu", log=lambda *_: None, lr=1e-2, epochs=1)
    finally:
        torch.set_num_threads(threads)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    assert (tmp_path / "two" / "fig6.png").exists() and (tmp_path / "two" / "W_graft" / "graft.json").exists()
    close(one["table3"], two["table3"], 1e-5, "table3")
    close(one["fig4_facts_first"], two["fig4_facts_first"], 1e-5, "fig4")
    for comp in ("mlp", "heads"):
        a, b = one["fig6"][comp], two["fig6"][comp]
        assert b["r"] == pytest.approx(a["r"], abs=1e-5) and b["shape"] == a["shape"]
        for key in ("downstream", "informative"):
            x, y = torch.tensor(a[key]), torch.tensor(b[key])
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6 * float(x.abs().max()))


@pytest.mark.distributed
def test_report_stages_under_torchrun_give_one_process_results(tmp_path, tiny3):
    """tests/torchrun_launch.py report: one seed's first-hop stages (preconditions, finetune, scores, freeze_post, a
    pre-frozen finetune whose save rank 0 refuses), a stage that fails on the last rank only, and a one-cell grid,
    in one process and on two ranks. Both record the same stages as failed and run every other one; collect()
    reads the same numbers: ranks and losses within 1e-5 relative (the train test's bound), Fig. 3's statistics
    within 1e-5 (scores summed over prompts in another order)."""
    for n, work in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        p = torchrun(n, "tests/torchrun_launch.py", "report", str(tiny3), str(work), cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("seed 0 first_hop: done") == 1          # rank 0 logs
    times = [{**json.loads((tmp_path / w / "seed0" / "stage_times.json").read_text()),       # the grid's own file
              **json.loads((tmp_path / w / "seed0" / "grid" / "stage_times.json").read_text())} for w in ("one", "two")]
    assert times[0].keys() == times[1].keys() and len(times[0]) == 8
    status = {k: v["status"] for k, v in times[1].items()}
    assert status == {k: v["status"] for k, v in times[0].items()}
    assert [k for k, v in status.items() if v == "failed"] == ["fails_on_the_last_rank", "first_hop_early_pre"]
    assert times[1]["fails_on_the_last_rank"]["error"] == "rank 1: a test failure on the last rank only"
    assert "first_hop_early_pre exists and is not a checkpoint output of ours" in times[1]["first_hop_early_pre"]["error"]
    assert (tmp_path / "two" / "seed0" / "first_hop_early_pre" / "notes.txt").exists()     # the user's, kept
    res = [report.collect(str(tiny3), [0], tmp_path / w) for w in ("one", "two")]
    for key in ("fig2", "table2", "preconditions"):
        close(res[0][key], res[1][key], 1e-5, key)
    close(res[0]["fig3"]["first_hop"]["stats"], res[1]["fig3"]["first_hop"]["stats"], 1e-5, "fig3")
    assert res[1]["table2"]["Early"]["first_hop"]["impl"][0] is not None                    # freeze_post ran
    cells = [sorted((tmp_path / w / "seed0" / "grid").glob("*_lr*.json")) for w in ("one", "two")]
    assert [c.name for c in cells[0]] == [c.name for c in cells[1]] and len(cells[0]) == 2
    for a, b in zip(*cells):
        x, y = json.loads(a.read_text()), json.loads(b.read_text())
        del x["seconds"], y["seconds"]
        close(x, y, 1e-5, a.name)


@pytest.mark.distributed
def test_a_failed_save_on_rank_0_ends_every_rank(tmp_path, tiny3, small_json):
    """tests/torchrun_launch.py train-save-fails: after the training rank 0 finds --out a user's directory and its
    save refuses; the other rank learns it (dist.on_main) and ends by itself, with one error line for both, instead
    of waiting at a barrier for a write that never comes."""
    out = tmp_path / "out"
    p = torchrun(2, "tests/torchrun_launch.py", "train-save-fails", "--model", str(tiny3), "--dataset", small_json,
                 "--epochs", "1", "--lr", "1e-2", "--device", "cpu", "--threads", "1", "--out", str(out),
                 cwd=tmp_path, timeout=120)
    assert p.returncode != 0
    assert "finetune epoch  1/1" in p.stdout                     # it trained: the save is what failed
    assert "[launcher] rank 1 ends: 1" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "exists and is not a checkpoint output of ours" in errors[0]
    assert sorted(f.name for f in out.iterdir()) == ["notes.txt"]                          # nothing of the user's lost


@pytest.mark.distributed
def test_a_rank_failing_inside_a_training_step_ends_the_launch(tmp_path, tiny3, small_json):
    """tests/torchrun_launch.py train-step-fails: the last rank raises inside a sharded step while rank 0 is in the
    step's collectives, which it never leaves by itself; torchrun's agent sees the failed rank and stops the others
    (SIGTERM), so the launch ends within seconds with that rank's error and no checkpoint, not at the process
    group's timeout (30 min for gloo)."""
    out = tmp_path / "out"
    p = torchrun(2, "tests/torchrun_launch.py", "train-step-fails", "--model", str(tiny3), "--dataset", small_json,
                 "--epochs", "2", "--lr", "1e-2", "--device", "cpu", "--threads", "1", "--out", str(out),
                 cwd=tmp_path, timeout=120)
    assert p.returncode != 0
    assert "finetune epoch  1/2" in p.stdout and "epoch  2/2" not in p.stdout      # failed in epoch 2's first step
    assert "RuntimeError: a test failure inside a training step on the last rank" in p.stderr
    assert not out.exists()


def test_sharded_checkpoint_loads(tmp_path, make_tiny):
    """write_checkpoint above shard_bytes: model-0000i-of-0000n.safetensors + model.safetensors.index.json, which
    from_pretrained and transformers read; a marker of ours still owns the directory (is_ours)."""
    tiny = make_tiny(tmp_path / "tiny")
    m = C.from_pretrained(tiny)
    with O.atomic_dir(tmp_path / "sharded", "checkpoint") as d:
        C.write_checkpoint(m, d, shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert O.is_ours(tmp_path / "sharded", "checkpoint")
    ids, mask = data.encode_prompts(C.load_tokenizer(tiny), ["The capital of France is"])
    with torch.no_grad():
        want = m(ids, mask)
        torch.testing.assert_close(C.from_pretrained(tmp_path / "sharded")(ids, mask), want, rtol=0, atol=0)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()(input_ids=ids).logits
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-4)
