"""FSDP2 under torchrun (dist.py), on this CPU with gloo: two processes train as one does, and write a checkpoint
that loads; wrong launches end with one line; big checkpoints are written as shards with an index.
The multi-process tests carry the `distributed` marker (`pytest -m distributed` runs them alone)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint as C
import outputs as O
import data
import scores
import train

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def torchrun(n, *argv, cwd):
    """`python -m torch.distributed.run --nproc_per_node n --standalone train.py argv`, in a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--standalone",
                           str(ROOT / "train.py"), *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.mark.distributed
def test_two_processes_train_and_score_as_one(tmp_path, make_tiny, small_json):
    """torchrun --nproc_per_node 2 (gloo): the blocks sharded over two ranks, each training on the same batches.
    Losses within 1e-5 relative and the same ranks as one process (in fp32 the reduce-scatter averages two equal
    gradients, which is exact, so they are in fact equal here); the "post" freeze resets the early layers' shards;
    the saved checkpoint is an ordinary one that from_pretrained and transformers load to the same logits."""
    tiny = make_tiny(tmp_path / "tiny")
    args = ["--model", str(tiny), "--dataset", small_json, "--epochs", "2", "--lr", "1e-2", "--device", "cpu",
            "--threads", "1", "--freeze", "early", "--freeze-when", "post"]
    p = torchrun(2, *args, "--out", str(tmp_path / "two"), cwd=tmp_path)
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
    # scores.py under torchrun: each rank a share of the prompts, the same scores as one process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(ROOT / "scores.py"), str(tiny), str(tmp_path / "two"), "--out", str(tmp_path / "s2"),
                        "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    scores.run(tiny, tmp_path / "two", tmp_path / "s1", log=lambda *a: None)
    s1, s2 = load_file(str(tmp_path / "s1" / "scores.safetensors")), load_file(str(tmp_path / "s2" / "scores.safetensors"))
    assert s1.keys() == s2.keys() and len(s1) == 8
    for k in s1:                                                  # sums over prompts in another order: 1e-6
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-5, atol=1e-6 * float(s1[k].abs().max()))
    assert json.loads((tmp_path / "s2" / "settings.json").read_text())["world_size"] == 2


@pytest.mark.distributed
def test_wrong_launches_get_one_line(tmp_path, make_tiny, small_json):
    """More processes than layers; and --train-all, whose embeddings and head FSDP2 does not shard here."""
    tiny1, tiny = make_tiny(tmp_path / "tiny1", n_layers=1), make_tiny(tmp_path / "tiny")
    base = ["--dataset", small_json, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "o")]
    for extra, msg in ((["--model", str(tiny1)], "error: train.py: 2 processes for a model of 1 layers: launch at "
                                                 "most 1"),
                       (["--model", str(tiny), "--train-all"], "error: --train-all under torchrun")):
        p = torchrun(2, *base, *extra, cwd=tmp_path)
        assert p.returncode != 0
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]   # rank 0's line only
        assert len(errors) == 1 and errors[0].startswith(msg), p.stderr[-2000:]
        assert 'train.py", line' not in p.stderr                  # no traceback of ours (torchrun adds its report)
        assert not (tmp_path / "o").exists()


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
